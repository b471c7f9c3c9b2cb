//! Local mode's instances: real PostgreSQL processes under the state directory, one per
//! color, started detached (they outlive pgflip, and a restarted pgflip adopts them).
//!
//! Layout: `<state>/instances/<color>/{data/, instance.json, server.log}`; the socket
//! directory is the instance directory itself (mode 0700, owned by the server user).

use super::run_as::{RunAs, free_port, run};
use crate::ports::{Addr, Credentials};
use crate::ports::{Instances, Result};
use crate::replication::SERVER_SETTINGS;
use crate::state::{StateDir, write_atomic};
use crate::toolchain::Toolchain;
use anyhow::{Context, bail};
use pgflip_core::plan::Member;
use pgflip_core::spec::Desired;
use pgflip_core::spec::Major;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct InstanceFile {
    major: Major,
    port: u16,
}

pub struct LocalInstances {
    state: StateDir,
    toolchain: Toolchain,
    run_as: RunAs,
    admin: Credentials,
}

/// Settings of a local instance beyond [`SERVER_SETTINGS`].
const LOCAL_SETTINGS: &[(&str, &str)] = &[
    ("listen_addresses", "'127.0.0.1'"),
    ("logging_collector", "off"),
    ("log_min_messages", "warning"),
];

impl LocalInstances {
    pub fn new(
        state: StateDir,
        toolchain: Toolchain,
        admin: Credentials,
    ) -> anyhow::Result<LocalInstances> {
        let run_as = RunAs::detect()?;
        run_as.check_reachable(&state.root)?;
        Ok(LocalInstances {
            state,
            toolchain,
            run_as,
            admin,
        })
    }

    fn dir(&self, member: &Member) -> PathBuf {
        self.state.dir("instances").join(member.color.as_str())
    }

    fn read_file(&self, member: &Member) -> Option<InstanceFile> {
        let bytes = std::fs::read(self.dir(member).join("instance.json")).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    fn pg_ctl(&self, major: Major) -> anyhow::Result<PathBuf> {
        Ok(self.toolchain.server_bin(major.0)?.join("pg_ctl"))
    }

    fn running(&self, member: &Member, major: Major) -> anyhow::Result<bool> {
        let data = self.dir(member).join("data");
        let status = self
            .run_as
            .command(&self.pg_ctl(major)?)
            .arg("status")
            .arg("-D")
            .arg(&data)
            .output()?;
        Ok(status.status.success())
    }

    fn init(&self, member: &Member) -> anyhow::Result<InstanceFile> {
        let bin = self.toolchain.server_bin(member.major.0)?;
        let dir = self.dir(member);
        // A half-made directory from an interrupted init is discarded and made again.
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::create_dir_all(&dir)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        self.run_as.own(&dir)?;
        let pwfile = dir.join("pwfile");
        write_atomic(&pwfile, self.admin.password.as_bytes(), 0o600)?;
        self.run_as.own(&pwfile)?;
        let data = dir.join("data");
        let result = run(self
            .run_as
            .command(&bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .arg("-U")
            .arg(&self.admin.user)
            .arg(format!("--pwfile={}", pwfile.display()))
            .args([
                "-A",
                "scram-sha-256",
                "--auth-local=trust",
                "-E",
                "UTF8",
                "--no-locale",
                "--no-sync",
            ]));
        let _ = std::fs::remove_file(&pwfile);
        result.context("initdb")?;
        let port = free_port()?;
        let mut conf = format!(
            "\n# pgflip\nport = {port}\nunix_socket_directories = '{}'\n",
            dir.display()
        );
        for (k, v) in SERVER_SETTINGS.iter().chain(LOCAL_SETTINGS) {
            conf.push_str(&format!("{k} = {v}\n"));
        }
        let conf_path = data.join("postgresql.conf");
        let mut existing = std::fs::read_to_string(&conf_path)?;
        existing.push_str(&conf);
        std::fs::write(&conf_path, existing)?;
        let hba = "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\nhost replication all 127.0.0.1/32 scram-sha-256\n";
        std::fs::write(data.join("pg_hba.conf"), hba)?;
        let file = InstanceFile {
            major: member.major,
            port,
        };
        write_atomic(
            &dir.join("instance.json"),
            &serde_json::to_vec(&file)?,
            0o644,
        )?;
        Ok(file)
    }

    fn start(&self, member: &Member, file: &InstanceFile) -> anyhow::Result<()> {
        let dir = self.dir(member);
        // Another process may have taken the port while the server was down: move it.
        let mut file = file.clone();
        if std::net::TcpListener::bind(("127.0.0.1", file.port)).is_err() {
            file.port = free_port()?;
            let conf_path = dir.join("data/postgresql.conf");
            let mut conf = std::fs::read_to_string(&conf_path)?;
            conf.push_str(&format!("port = {}\n", file.port));
            std::fs::write(&conf_path, conf)?;
            write_atomic(
                &dir.join("instance.json"),
                &serde_json::to_vec(&file)?,
                0o644,
            )?;
        }
        run(self
            .run_as
            .command(&self.pg_ctl(file.major)?)
            .arg("start")
            .arg("-D")
            .arg(dir.join("data"))
            .arg("-l")
            .arg(dir.join("server.log"))
            .args(["-w", "-t", "120"]))
        .with_context(|| {
            format!(
                "starting {member}; see {}",
                dir.join("server.log").display()
            )
        })?;
        Ok(())
    }
}

impl Instances for LocalInstances {
    async fn ensure(&self, member: &Member, _desired: &Desired) -> Result<Addr> {
        let member = *member;
        let file = match self.read_file(&member) {
            Some(f) if f.major == member.major => f,
            Some(f) => bail!(
                "{} already holds PostgreSQL {}, not {}: remove it first",
                member.color,
                f.major,
                member.major
            ),
            None => self.init(&member)?,
        };
        if !self.running(&member, file.major)? {
            self.start(&member, &file)?;
        }
        let file = self.read_file(&member).context("instance.json vanished")?;
        let addr = Addr {
            host: "127.0.0.1".into(),
            port: file.port,
        };
        crate::pg::wait_ready(&addr, &self.admin).await?;
        Ok(addr)
    }

    async fn addr(&self, member: &Member, _desired: &Desired) -> Result<Option<Addr>> {
        Ok(self
            .read_file(member)
            .filter(|f| f.major == member.major)
            .map(|f| Addr {
                host: "127.0.0.1".into(),
                port: f.port,
            }))
    }

    async fn remove(&self, member: &Member, _desired: &Desired) -> Result<()> {
        let dir = self.dir(member);
        if let Some(file) = self.read_file(member)
            && self.running(member, file.major)?
        {
            run(self
                .run_as
                .command(&self.pg_ctl(file.major)?)
                .arg("stop")
                .arg("-D")
                .arg(dir.join("data"))
                .args(["-m", "fast", "-w", "-t", "60"]))?;
        }
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        Ok(())
    }
}

/// Stops every instance under a state directory (for tests and `pgflip local --stop`).
pub fn stop_all(state: &StateDir) -> anyhow::Result<()> {
    let toolchain = Toolchain::discover();
    let run_as = RunAs::detect()?;
    let Ok(entries) = std::fs::read_dir(state.dir("instances")) else {
        return Ok(());
    };
    for e in entries.flatten() {
        let Ok(bytes) = std::fs::read(e.path().join("instance.json")) else {
            continue;
        };
        let Ok(file) = serde_json::from_slice::<InstanceFile>(&bytes) else {
            continue;
        };
        if let Ok(bin) = toolchain.server_bin(file.major.0) {
            let _ = run_as
                .command(&bin.join("pg_ctl"))
                .arg("stop")
                .arg("-D")
                .arg(e.path().join("data"))
                .args(["-m", "immediate", "-w", "-t", "30"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
    Ok(())
}
