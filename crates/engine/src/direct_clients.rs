//! Clients connected to the serving server directly, not through the endpoint. The
//! switch's fence ends every such session (a write there after the switch would be lost),
//! so by default the switch waits for them to go, naming them (`spec.switchover.
//! directClients: wait`), unless the user chose to have them ended (`end`).
//!
//! A session came through the endpoint when its client address and port are the local
//! address and port of one of PgBouncer's server connections (`SHOW SERVERS`). pgflip's
//! own sessions (and PgBouncer's password lookups) log in as pgflip's role; replication
//! and background workers are not client backends.

use crate::ports::{ADMIN_USER, Router};
use std::collections::BTreeSet;
use std::fmt;
use tokio_postgres::Client;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct DirectSession {
    pub pid: i32,
    pub user: String,
    pub application: String,
    /// `address:port`, or `local socket`.
    pub client: String,
}

impl fmt::Display for DirectSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let app = if self.application.is_empty() {
            "no application name"
        } else {
            &self.application
        };
        write!(f, "{} ({app}) from {}", self.user, self.client)
    }
}

/// The sessions on the server `source` is connected to that bypass the endpoint. A
/// session counts only if it is there both before and after the endpoint's connections
/// are listed, so a connection the endpoint opens or closes meanwhile is not mistaken
/// for one.
pub async fn find<R: Router>(source: &Client, router: &R) -> anyhow::Result<Vec<DirectSession>> {
    let before = client_sessions(source).await?;
    if before.is_empty() {
        return Ok(Vec::new());
    }
    let through_endpoint: BTreeSet<(String, u16)> =
        router.server_sockets().await?.into_iter().collect();
    let after: BTreeSet<(i32, Option<(String, u16)>)> = client_sessions(source)
        .await?
        .into_iter()
        .map(|(s, socket)| (s.pid, socket))
        .collect();
    Ok(before
        .into_iter()
        .filter(|(_, socket)| {
            socket
                .as_ref()
                .is_none_or(|s| !through_endpoint.contains(s))
        })
        .filter(|(s, socket)| after.contains(&(s.pid, socket.clone())))
        .map(|(s, _)| s)
        .collect())
}

/// A status line naming them (at most five).
pub fn describe(sessions: &[DirectSession], server: &str) -> String {
    let mut names: Vec<String> = sessions.iter().take(5).map(ToString::to_string).collect();
    if sessions.len() > 5 {
        names.push(format!("and {} more", sessions.len() - 5));
    }
    format!(
        "waiting for {} session(s) connected to {server} directly, not through the endpoint: {} — the switch would end them; move them to the endpoint, or set spec.switchover.directClients: end",
        sessions.len(),
        names.join(", ")
    )
}

async fn client_sessions(
    source: &Client,
) -> anyhow::Result<Vec<(DirectSession, Option<(String, u16)>)>> {
    let rows = source
        .query(
            "SELECT pid, usename::text, coalesce(application_name, ''),
                    host(client_addr), client_port
               FROM pg_stat_activity
              WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()
                AND usename IS DISTINCT FROM $1
              ORDER BY pid",
            &[&ADMIN_USER],
        )
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let addr: Option<String> = r.get(3);
            let port: Option<i32> = r.get(4);
            let socket = addr.zip(port).map(|(a, p)| (a, p as u16));
            let client = socket
                .as_ref()
                .map_or_else(|| "local socket".to_string(), |(a, p)| format!("{a}:{p}"));
            (
                DirectSession {
                    pid: r.get(0),
                    user: r.get::<_, Option<String>>(1).unwrap_or_default(),
                    application: r.get(2),
                    client,
                },
                socket,
            )
        })
        .collect())
}
