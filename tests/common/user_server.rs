//! A PostgreSQL server the test runs itself, as a user would (systemd, a VM): its own data
//! directory, port and superuser password, outside anything pgflip manages. Stopped and
//! removed when dropped, whatever the test's outcome.

use pgflip_engine::pg::connect;
use pgflip_engine::ports::{Addr, Credentials};
use pgflip_engine::run_as::{RunAs, free_port, run};
use pgflip_engine::toolchain::Toolchain;
use std::path::PathBuf;
use tokio_postgres::Client;

pub struct UserServer {
    pub dir: tempfile::TempDir,
    pub major: u32,
    pub port: u16,
    pub superuser: Credentials,
    /// A file holding the superuser's password (what `passwordFile` points at).
    pub password_file: PathBuf,
    bin: PathBuf,
    run_as: RunAs,
}

impl UserServer {
    /// initdb (superuser `postgres`, a random password, scram over TCP), then start it with
    /// `settings` appended to postgresql.conf.
    pub fn start(major: u32, settings: &[(&str, &str)]) -> UserServer {
        let dir = tempfile::Builder::new()
            .prefix(&format!("user-pg{major}-"))
            .tempdir()
            .unwrap();
        let run_as = RunAs::detect().unwrap();
        run_as.check_reachable(dir.path()).unwrap();
        run_as.own(dir.path()).unwrap();
        let bin = Toolchain::discover_blocking().server_bin(major).unwrap();
        let superuser = Credentials {
            user: "postgres".into(),
            password: pgflip_engine::random::token(16),
        };
        let password_file = dir.path().join("password");
        std::fs::write(&password_file, format!("{}\n", superuser.password)).unwrap();
        run_as.own(&password_file).unwrap();
        let data = dir.path().join("data");
        run(run_as
            .command(&bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "-A",
                "scram-sha-256",
                "-E",
                "UTF8",
                "--no-locale",
                "--no-sync",
            ])
            .arg(format!("--pwfile={}", password_file.display())))
        .unwrap();
        let port = free_port().unwrap();
        let mut conf = format!(
            "\nport = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n",
            dir.path().display()
        );
        for (k, v) in settings {
            conf.push_str(&format!("{k} = {v}\n"));
        }
        let conf_path = data.join("postgresql.conf");
        let mut existing = std::fs::read_to_string(&conf_path).unwrap();
        existing.push_str(&conf);
        std::fs::write(&conf_path, existing).unwrap();
        let server = UserServer {
            dir,
            major,
            port,
            superuser,
            password_file,
            bin,
            run_as,
        };
        run(server
            .run_as
            .command(&server.bin.join("pg_ctl"))
            .arg("start")
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(server.dir.path().join("server.log"))
            .args(["-w", "-t", "60"]))
        .unwrap();
        server
    }

    /// A server as pgflip needs it: logical WAL.
    pub fn logical(major: u32) -> UserServer {
        UserServer::start(major, &[("wal_level", "logical")])
    }

    pub fn addr(&self) -> Addr {
        Addr {
            host: "127.0.0.1".into(),
            port: self.port,
        }
    }

    pub async fn connect(&self, db: &str) -> Client {
        connect(&self.addr(), &self.superuser, db).await.unwrap()
    }

    /// Whether the server still answers.
    pub async fn is_running(&self) -> bool {
        connect(&self.addr(), &self.superuser, "postgres")
            .await
            .is_ok()
    }

    /// The `spec.adopt` entry for this server.
    pub fn adopt_entry(&self) -> String {
        format!(
            "  - host: 127.0.0.1\n    port: {}\n    user: postgres\n    passwordFile: {}\n",
            self.port,
            self.password_file.display()
        )
    }

    /// Everything of pgflip's on this server, as lines (empty when there is none).
    pub async fn pgflip_leftovers(&self, databases: &[&str]) -> Vec<String> {
        let postgres = self.connect("postgres").await;
        let mut out = Vec::new();
        for row in postgres
            .query(
                "SELECT 'slot ' || slot_name FROM pg_replication_slots
                 UNION ALL SELECT 'role ' || rolname FROM pg_roles WHERE rolname = 'pgflip'
                 UNION ALL SELECT 'fenced ' || r.rolname FROM pg_db_role_setting s
                   JOIN pg_roles r ON r.oid = s.setrole
                  WHERE 'default_transaction_read_only=on' = ANY (s.setconfig)
                 UNION ALL SELECT 'database comment ' || datname FROM pg_database
                  WHERE shobj_description(oid, 'pg_database') LIKE '%pgflip%'",
                &[],
            )
            .await
            .unwrap()
        {
            out.push(row.get(0));
        }
        for db in databases {
            let c = self.connect(db).await;
            for row in c
                .query(
                    "SELECT 'publication ' || pubname FROM pg_publication
                     UNION ALL SELECT 'subscription ' || subname FROM pg_subscription
                     UNION ALL SELECT 'schema ' || nspname FROM pg_namespace WHERE nspname = '_pgflip'",
                    &[],
                )
                .await
                .unwrap()
            {
                out.push(format!("{db}: {}", row.get::<_, String>(0)));
            }
        }
        out
    }
}

impl Drop for UserServer {
    fn drop(&mut self) {
        let _ = self
            .run_as
            .command(&self.bin.join("pg_ctl"))
            .arg("stop")
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "-w", "-t", "30"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}
