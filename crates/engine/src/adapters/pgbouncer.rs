//! Local mode's endpoint: one PgBouncer process in front of the serving instance, driven
//! through its admin console. Clients keep one address for the endpoint's whole life;
//! a switchover is `PAUSE` → [`Router::repoint`] (config rewritten, `RELOAD`) → `RESUME`.
//!
//! Layout: `<state>/endpoint/{pgbouncer.ini, userlist.txt, pgbouncer.pid, pgbouncer.log,
//! socket/}`; the directory is mode 0700 and owned by the server OS user. PgBouncer runs
//! detached (`-d`) so it outlives pgflip; a restarted pgflip adopts it through the pidfile.
//!
//! PgBouncer 1.18 behaviour this relies on (read from its source and checked by
//! `tests/pgbouncer_router.rs`):
//! - `PAUSE` (whole pooler) answers only once no server connection is active, and on the
//!   way closes every idle server connection ("pause mode"). So after `PAUSE`, `RELOAD`,
//!   `RESUME` every transaction runs on a fresh connection to the new target.
//! - Outside a pause, `RELOAD` with a changed `host`/`port`/`dbname` tags the database's
//!   server connections "close needed": each is closed when released (in transaction
//!   pooling: at the end of its current transaction), never reused.
//! - `RESUME` when not paused fails with "pooler is not paused/suspended".
//! - A second `PAUSE` while one is pending or done fails with "already suspended/paused".

pub use super::pgbouncer_console::AdminConsole;
use super::pgbouncer_console::CONSOLE_DB;
use crate::ports::{Addr, Credentials};
use crate::ports::{Result, Router};
use crate::run_as::{RunAs, run_async};
use crate::state::{StateDir, blocking, write_atomic};
use crate::toolchain::Toolchain;
use anyhow::{Context, bail};
use pgflip_core::spec::Desired;
use serde::{Deserialize, Serialize};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// First line of the ini: the configuration pgflip rendered it from, so the stored file
/// is the one source of truth for the target and is replaced in one atomic rename.
const CONFIG_MARKER: &str = "; pgflip endpoint ";
/// How long a started (or adopted) PgBouncer may take to answer on its console.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(15);

/// What the endpoint is configured to do; rendered into `pgbouncer.ini`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointConfig {
    pub listen_port: u16,
    pub target: Addr,
    pub databases: Vec<String>,
}

pub struct PgBouncer {
    dir: PathBuf,
    toolchain: Toolchain,
    run_as: RunAs,
    admin: Credentials,
    listen_port: u16,
    console: AdminConsole,
}

impl PgBouncer {
    pub fn new(
        state: StateDir,
        toolchain: Toolchain,
        admin: Credentials,
        listen_port: u16,
    ) -> anyhow::Result<PgBouncer> {
        let console = AdminConsole::new(
            Addr {
                host: "127.0.0.1".into(),
                port: listen_port,
            },
            admin.clone(),
        )?;
        Ok(PgBouncer {
            dir: endpoint_dir(&state),
            toolchain,
            run_as: RunAs::detect()?,
            admin,
            listen_port,
            console,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> Addr {
        Addr {
            host: "127.0.0.1".into(),
            port: self.listen_port,
        }
    }

    fn ini_path(&self) -> PathBuf {
        self.dir.join("pgbouncer.ini")
    }

    async fn read_config(&self) -> anyhow::Result<Option<EndpointConfig>> {
        let text = match tokio::fs::read_to_string(self.ini_path()).await {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).context("reading pgbouncer.ini"),
        };
        let json = text
            .lines()
            .find_map(|l| l.strip_prefix(CONFIG_MARKER))
            .with_context(|| format!("{} was not written by pgflip", self.ini_path().display()))?;
        Ok(Some(
            serde_json::from_str(json).context("reading pgbouncer.ini")?,
        ))
    }

    /// Writes (and fsyncs) the ini on the blocking pool: `repoint` does this while the
    /// clients are paused, and nothing else may stall meanwhile.
    async fn write_config(&self, config: &EndpointConfig) -> anyhow::Result<()> {
        let ini = render_ini(config, "127.0.0.1", &self.dir, &self.admin.user)?;
        let (path, run_as) = (self.ini_path(), self.run_as);
        blocking(move || {
            write_atomic(&path, ini.as_bytes(), 0o644)?;
            run_as.own(&path)
        })
        .await
    }

    /// The directory, socket directory and userlist, owned by the server user.
    async fn prepare_dir(&self) -> anyhow::Result<()> {
        let (dir, run_as) = (self.dir.clone(), self.run_as);
        // Plaintext, so PgBouncer can both answer the admin's SCRAM login and log in to
        // the servers as the admin (which `auth_query` needs for every other role).
        let line = format!(
            "{} {}\n",
            userlist_field(&self.admin.user),
            userlist_field(&self.admin.password)
        );
        blocking(move || {
            let socket = dir.join("socket");
            std::fs::create_dir_all(&socket)
                .with_context(|| format!("creating {}", socket.display()))?;
            for d in [&dir, &socket] {
                std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))?;
                run_as.own(d)?;
            }
            let userlist = dir.join("userlist.txt");
            write_atomic(&userlist, line.as_bytes(), 0o600)?;
            run_as.own(&userlist)
        })
        .await
    }

    /// The pid in the pidfile, if that process is alive (a killed PgBouncer can linger
    /// as a zombie until something reaps it: that is not alive).
    async fn pid(&self) -> Option<nix::unistd::Pid> {
        let text = tokio::fs::read_to_string(self.dir.join("pgbouncer.pid"))
            .await
            .ok()?;
        let pid = live_pid(&text)?;
        (!crate::run_as::is_zombie(pid.as_raw()).await).then_some(pid)
    }

    /// Starts PgBouncer; called only when [`Self::pid`] found none alive.
    async fn start(&self) -> anyhow::Result<()> {
        // A killed PgBouncer's pidfile stays, and PgBouncer refuses to start beside a
        // pid that still answers a signal (a zombie does).
        tokio::fs::remove_file(self.dir.join("pgbouncer.pid"))
            .await
            .ok();
        let bin = self.toolchain.pgbouncer()?;
        let mut cmd = self.run_as.command(&bin);
        cmd.arg("-d").arg(self.ini_path());
        run_async(cmd).await.with_context(|| {
            format!(
                "starting PgBouncer; see {}",
                self.dir.join("pgbouncer.log").display()
            )
        })?;
        self.console
            .wait_ready(STARTUP_TIMEOUT)
            .await
            .with_context(|| {
                format!(
                    "PgBouncer did not come up; see {}",
                    self.dir.join("pgbouncer.log").display()
                )
            })
    }

    /// Stops the PgBouncer process (tests, demo cleanup). Clients are disconnected.
    pub async fn stop(&self) -> anyhow::Result<()> {
        self.console.forget().await;
        let pidfile = self.dir.join("pgbouncer.pid");
        blocking(move || stop_pidfile(&pidfile)).await
    }
}

impl Router for PgBouncer {
    async fn ensure(&self, desired: &Desired, initial: &Addr) -> Result<()> {
        let mut databases = desired.databases.clone();
        databases.sort();
        databases.dedup();
        let stored = self.read_config().await?;
        let target = stored
            .as_ref()
            .map_or_else(|| initial.clone(), |c| c.target.clone());
        let wanted = EndpointConfig {
            listen_port: self.listen_port,
            target,
            databases,
        };
        let running = self.pid().await.is_some();
        if let Some(stored) = stored.as_ref().filter(|_| running)
            && stored.listen_port != self.listen_port
        {
            bail!(
                "PgBouncer already runs on port {} (asked for {}): stop it first",
                stored.listen_port,
                self.listen_port
            );
        }
        self.prepare_dir().await?;
        if stored.as_ref() != Some(&wanted) {
            self.write_config(&wanted).await?;
        }
        if running {
            self.console
                .wait_ready(STARTUP_TIMEOUT)
                .await
                .context("PgBouncer runs (pidfile) but its admin console does not answer")?;
            // Always: a pgflip killed between writing the ini and RELOAD (in `repoint`) left
            // a process serving an older file than `target()` reports. Unchanged database
            // entries keep their connections, so this is harmless otherwise.
            self.console.command("RELOAD").await?;
            return Ok(());
        }
        self.start().await
    }

    async fn target(&self) -> Result<Option<Addr>> {
        Ok(self.read_config().await?.map(|c| c.target))
    }

    async fn is_up(&self) -> Result<bool> {
        Ok(self.pid().await.is_some())
    }

    async fn pause(&self, timeout: Duration) -> Result<()> {
        self.console.pause(timeout).await
    }

    async fn repoint(&self, _desired: &Desired, target: &Addr) -> Result<()> {
        let mut config = self
            .read_config()
            .await?
            .context("the endpoint has no configuration yet: ensure it first")?;
        config.target = target.clone();
        self.write_config(&config).await?;
        self.console.command("RELOAD").await
    }

    async fn resume(&self) -> Result<()> {
        self.console.resume().await
    }
    async fn server_sockets(&self) -> Result<Vec<(String, u16)>> {
        self.console.server_sockets().await
    }
}

fn endpoint_dir(state: &StateDir) -> PathBuf {
    state.dir("endpoint")
}

/// A field of `userlist.txt`: double-quoted, inner quotes doubled.
pub fn userlist_field(value: &str) -> String {
    format!("\"{}\"", value.replace('"', "\"\""))
}

/// A key of the `[databases]` section: bare if PgBouncer allows it, else SQL-identifier quoted.
/// A value of a `[databases]` connection string: single-quoted, inner quotes doubled.
fn connstr_value(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// The ini for `config`, listening on `listen_addr`, with its socket, pidfile, log and
/// userlist in `dir`.
pub fn render_ini(
    config: &EndpointConfig,
    listen_addr: &str,
    dir: &Path,
    admin_user: &str,
) -> anyhow::Result<String> {
    let dir_text = dir
        .to_str()
        .context("the state directory's path is not UTF-8")?;
    if dir_text.contains(['\n', '\r', ';', '#']) {
        bail!("the state directory's path {dir_text:?} cannot be written into pgbouncer.ini");
    }
    let mut ini = format!("{CONFIG_MARKER}{}\n", serde_json::to_string(config)?);
    ini.push_str(
        "; Written by pgflip: edits are overwritten at the next switchover.\n\n[databases]\n",
    );
    for db in &config.databases {
        // The document's validation refuses these already; the ini never gets a line
        // PgBouncer would stop on.
        if !pgflip_core::spec::is_endpoint_name(db) || db == CONSOLE_DB {
            bail!("database name {db:?} cannot be served through PgBouncer");
        }
        ini.push_str(&format!(
            "{db} = host={} port={} dbname={}\n",
            connstr_value(&config.target.host),
            config.target.port,
            connstr_value(db)
        ));
    }
    let d = dir_text;
    ini.push_str(&format!(
        "\n[pgbouncer]\n\
         listen_addr = {listen_addr}\n\
         listen_port = {port}\n\
         unix_socket_dir = {d}/socket\n\
         pidfile = {d}/pgbouncer.pid\n\
         logfile = {d}/pgbouncer.log\n\
         auth_type = scram-sha-256\n\
         auth_file = {d}/userlist.txt\n\
         ; Roles other than the admin are looked up on the target, so roles created later work.\n\
         auth_user = {admin_user}\n\
         auth_query = SELECT usename, passwd FROM pg_catalog.pg_shadow WHERE usename=$1\n\
         admin_users = {admin_user}\n\
         ; PAUSE waits for in-flight transactions only in transaction pooling (in session\n\
         ; pooling it waits for every client to disconnect).\n\
         pool_mode = transaction\n\
         default_pool_size = 20\n\
         max_client_conn = 1000\n\
         ; JDBC sends extra_float_digits; application_name and client_encoding are tracked\n\
         ; natively. `options` is not ignored: dropping a client's settings silently is worse.\n\
         ignore_startup_parameters = extra_float_digits\n\
         ; Retry a failed server login after 1 s, not 15 s: a switchover waits on it.\n\
         server_login_retry = 1\n\
         ; A server named by a Kubernetes Service is looked up again after 1 s, not 15 s:\n\
         ; a pod that came back with a new address is found at once.\n\
         dns_max_ttl = 1\n\
         dns_nxdomain_ttl = 1\n",
        port = config.listen_port,
    ));
    Ok(ini)
}

fn read_live_pid(pidfile: &Path) -> Option<nix::unistd::Pid> {
    live_pid(&std::fs::read_to_string(pidfile).ok()?)
}

/// The pid written in a pidfile's `text`, if that process is alive.
fn live_pid(text: &str) -> Option<nix::unistd::Pid> {
    let pid = nix::unistd::Pid::from_raw(text.trim().parse().ok()?);
    nix::sys::signal::kill(pid, None).ok().map(|()| pid)
}

/// Stops the PgBouncer of a pidfile: SIGTERM (immediate shutdown), SIGKILL after 5 s.
fn stop_pidfile(pidfile: &Path) -> anyhow::Result<()> {
    use nix::sys::signal::{Signal, kill};
    let Some(pid) = read_live_pid(pidfile) else {
        return Ok(());
    };
    let _ = kill(pid, Signal::SIGTERM);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while kill(pid, None).is_ok() {
        if std::time::Instant::now() > deadline {
            kill(pid, Signal::SIGKILL).context("killing PgBouncer")?;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Stops the endpoint of a state directory, if one runs (for tests and `pgflip local --stop`).
pub fn stop_endpoint(state: &StateDir) -> anyhow::Result<()> {
    stop_pidfile(&endpoint_dir(state).join("pgbouncer.pid"))
}

/// [`stop_endpoint`] for async code: its wait for the process to exit runs on the
/// blocking pool.
pub async fn stop_endpoint_async(state: &StateDir) -> anyhow::Result<()> {
    let pidfile = endpoint_dir(state).join("pgbouncer.pid");
    blocking(move || stop_pidfile(&pidfile)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(databases: &[&str]) -> EndpointConfig {
        EndpointConfig {
            listen_port: 6432,
            target: Addr {
                host: "127.0.0.1".into(),
                port: 5433,
            },
            databases: databases.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn ini_quotes_names_and_carries_its_config() {
        let ini = render_ini(
            &config(&["app", "shop.orders-2"]),
            "127.0.0.1",
            Path::new("/s/endpoint"),
            "pgflip",
        )
        .unwrap();
        assert!(ini.contains("\napp = host='127.0.0.1' port=5433 dbname='app'\n"));
        assert!(
            ini.contains("\nshop.orders-2 = host='127.0.0.1' port=5433 dbname='shop.orders-2'\n")
        );
        assert!(ini.contains("pool_mode = transaction\n"));
        assert!(ini.contains("auth_file = /s/endpoint/userlist.txt\n"));
        let json = ini
            .lines()
            .find_map(|l| l.strip_prefix(CONFIG_MARKER))
            .unwrap();
        let back: EndpointConfig = serde_json::from_str(json).unwrap();
        assert_eq!(back, config(&["app", "shop.orders-2"]));
    }

    #[test]
    fn ini_refuses_what_it_cannot_express() {
        assert!(
            render_ini(
                &config(&["pgbouncer"]),
                "127.0.0.1",
                Path::new("/s"),
                "pgflip"
            )
            .is_err()
        );
        // PgBouncer 1.18 stops on any other character in a key, quoted or not.
        for name in ["a\nb", "we'ird", "a b", "\"quoted\"", "ünï"] {
            assert!(render_ini(&config(&[name]), "127.0.0.1", Path::new("/s"), "pgflip").is_err());
        }
        assert!(render_ini(&config(&["app"]), "127.0.0.1", Path::new("/s;x"), "pgflip").is_err());
    }

    #[test]
    fn userlist_fields_double_quotes() {
        assert_eq!(userlist_field("pa\"ss"), "\"pa\"\"ss\"");
    }

    mod hostile {
        use super::*;
        use proptest::prelude::*;

        /// A `[databases]` line read as PgBouncer 1.18 reads it: an unquoted key, then
        /// `dbname='…'` with `''` for a quote.
        fn read_back(ini: &str) -> Vec<(String, String)> {
            let section = ini.split("[databases]\n").nth(1).unwrap();
            let section = section.split("\n[pgbouncer]").next().unwrap();
            section
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| {
                    let (key, rest) = l.split_once(" = ").unwrap();
                    let value = rest.split("dbname='").nth(1).unwrap();
                    let value = value.strip_suffix('\'').unwrap().replace("''", "'");
                    (key.to_string(), value)
                })
                .collect()
        }

        proptest! {
            /// A name the document accepts is written so that it reads back as itself; any
            /// other is refused, never written.
            #[test]
            fn names_read_back_or_are_refused(
                db in prop_oneof!["[a-zA-Z0-9_.-]{1,30}", "[a-z'\"\\ \n;#=é]{1,30}"],
            ) {
                match render_ini(&config(&[&db]), "127.0.0.1", Path::new("/s"), "pgflip") {
                    Ok(ini) => prop_assert_eq!(read_back(&ini), vec![(db.clone(), db.clone())]),
                    Err(_) => prop_assert!(!pgflip_core::spec::is_endpoint_name(&db) || db == CONSOLE_DB),
                }
            }
        }
    }
}
