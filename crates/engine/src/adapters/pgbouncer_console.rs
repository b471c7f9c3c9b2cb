//! PgBouncer's admin console, as both endpoints drive it (local mode's process, Kubernetes
//! mode's Deployment): one cached session, so `PAUSE` costs one round trip rather than a
//! SCRAM login, and the pause/resume rules that keep clients from being left held.
//!
//! PgBouncer 1.18 behaviour relied on (checked by `tests/pgbouncer_router.rs`):
//! - `RESUME` when not paused fails with "pooler is not paused/suspended".
//! - A second `PAUSE` while one is pending or done fails with "already suspended/paused".
//! - A timed-out `PAUSE` leaves its request pending on that session forever.

use crate::ports::{Addr, Credentials};
use anyhow::{Context, bail};
use std::time::Duration;
use tokio::sync::Mutex;
use tokio_postgres::{Client, NoTls};

/// The admin console's database name (reserved: no application database may use it).
pub const CONSOLE_DB: &str = "pgbouncer";
/// Error text of PgBouncer 1.18 for `RESUME` when nothing is paused.
const NOT_PAUSED: &str = "is not paused";

/// A live session; the connection task dies with it (a timed-out `PAUSE` leaves its
/// request pending forever, so dropping the client alone would leak it).
struct Session {
    addr: Addr,
    client: Client,
    connection: tokio::task::JoinHandle<()>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

pub struct AdminConsole {
    addr: std::sync::Mutex<Addr>,
    admin: Credentials,
    session: Mutex<Option<Session>>,
}

impl AdminConsole {
    pub fn new(addr: Addr, admin: Credentials) -> anyhow::Result<AdminConsole> {
        // The admin user is written bare into `auth_user` / `admin_users` and the console
        // login; anything needing quoting there is refused rather than half-supported.
        if admin.user.is_empty()
            || !admin
                .user
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            bail!(
                "the endpoint's admin user {:?} must consist of letters, digits and _",
                admin.user
            );
        }
        Ok(AdminConsole {
            addr: std::sync::Mutex::new(addr),
            admin,
            session: Mutex::new(None),
        })
    }

    /// Where the console is now (a Kubernetes endpoint pod that restarted has a new address).
    pub fn set_addr(&self, addr: Addr) {
        *self.addr.lock().unwrap() = addr;
    }

    pub fn addr(&self) -> Addr {
        self.addr.lock().unwrap().clone()
    }

    /// Whether a cached session is open (a console that went away closes it).
    pub async fn is_connected(&self) -> bool {
        self.session
            .lock()
            .await
            .as_ref()
            .is_some_and(|s| !s.client.is_closed())
    }

    /// Drops the cached session.
    pub async fn forget(&self) {
        *self.session.lock().await = None;
    }

    /// Waits until the console answers.
    pub async fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match self.command("SHOW VERSION").await {
                Ok(()) => return Ok(()),
                Err(e) if tokio::time::Instant::now() > deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    async fn open(&self) -> anyhow::Result<Session> {
        let addr = self.addr();
        let mut config = crate::pg::config(&addr, &self.admin, CONSOLE_DB);
        config.connect_timeout(Duration::from_secs(5));
        let (client, connection) = config
            .connect(NoTls)
            .await
            .with_context(|| format!("connecting to PgBouncer's admin console at {addr}"))?;
        let connection = tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "PgBouncer console connection closed");
            }
        });
        Ok(Session {
            addr,
            client,
            connection,
        })
    }

    /// Runs one command on the cached session (opened or reopened as needed). A command
    /// that fails because the session broke is retried once on a new one.
    pub async fn command(&self, command: &str) -> anyhow::Result<()> {
        self.query(command).await.map(|_| ())
    }

    /// Like [`command`](Self::command), returning the rows as text.
    pub async fn query(
        &self,
        command: &str,
    ) -> anyhow::Result<Vec<tokio_postgres::SimpleQueryRow>> {
        let mut cached = self.session.lock().await;
        let addr = self.addr();
        for attempt in 0..2 {
            if cached
                .as_ref()
                .is_none_or(|c| c.client.is_closed() || c.addr != addr)
            {
                *cached = Some(self.open().await?);
            }
            let session = cached.as_ref().expect("opened above");
            match session.client.simple_query(command).await {
                Ok(messages) => {
                    return Ok(messages
                        .into_iter()
                        .filter_map(|m| match m {
                            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
                            _ => None,
                        })
                        .collect());
                }
                Err(e) if e.is_closed() && attempt == 0 => *cached = None,
                Err(e) => return Err(e).with_context(|| format!("PgBouncer {command}")),
            }
        }
        unreachable!("the second attempt returns")
    }

    /// `SHOW SERVERS`: the local address and port of every server connection, which the
    /// server sees as its session's client address and port.
    pub async fn server_sockets(&self) -> anyhow::Result<Vec<(String, u16)>> {
        let rows = self.query("SHOW SERVERS").await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let addr = row.try_get("local_addr")?.unwrap_or_default().to_string();
            let port = row
                .try_get("local_port")?
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            out.push((addr, port));
        }
        Ok(out)
    }

    /// `PAUSE`: holds new transactions once in-flight ones finish. On failure or `timeout`
    /// it resumes and fails, so clients are never left held.
    pub async fn pause(&self, timeout: Duration) -> anyhow::Result<()> {
        let outcome = tokio::time::timeout(timeout, self.command("PAUSE")).await;
        let failure = match outcome {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => e,
            Err(_) => anyhow::anyhow!(
                "in-flight transactions did not finish within {}",
                humantime::format_duration(timeout)
            ),
        };
        // Any failure resumes, "already suspended/paused" included: a pause left by a
        // killed pgflip (or an operator) would otherwise hold clients indefinitely.
        // The cached session may still wait for its PAUSE: never reuse it.
        self.forget().await;
        match self.resume_fresh().await {
            Ok(()) => Err(failure.context("PgBouncer PAUSE failed; resumed")),
            Err(e) => Err(failure.context(format!(
                "PgBouncer PAUSE failed and RESUME failed too ({e:#}): clients may be held"
            ))),
        }
    }

    /// `RESUME`; not being paused is fine.
    pub async fn resume(&self) -> anyhow::Result<()> {
        match self.command("RESUME").await {
            Err(e) if e.chain().any(|c| c.to_string().contains(NOT_PAUSED)) => Ok(()),
            other => other,
        }
    }

    /// `RESUME` on a session of its own: used when the cached one is stuck in a `PAUSE`.
    async fn resume_fresh(&self) -> anyhow::Result<()> {
        let session = self.open().await?;
        match session.client.simple_query("RESUME").await {
            Ok(_) => Ok(()),
            Err(e) if is_not_paused(&e) => Ok(()),
            Err(e) => Err(e).context("PgBouncer RESUME"),
        }
    }
}

fn is_not_paused(e: &tokio_postgres::Error) -> bool {
    e.as_db_error()
        .is_some_and(|d| d.message().contains(NOT_PAUSED))
}
