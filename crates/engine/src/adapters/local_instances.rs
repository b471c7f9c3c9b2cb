//! Local mode's instances: real PostgreSQL processes under the state directory, one per
//! color, started detached (they outlive pgflip, and a restarted pgflip adopts them).
//!
//! Layout: `<state>/instances/<color>/{data/, instance.json, server.log}`; the socket
//! directory is the instance directory itself (mode 0700, owned by the server user).

use crate::ports::{Addr, Credentials, NotReady};
use crate::ports::{Instances, Result};
use crate::replication::SERVER_SETTINGS;
use crate::run_as::{RunAs, free_port, is_zombie, run_async, succeeds};
use crate::state::{StateDir, blocking, write_atomic};
use crate::toolchain::Toolchain;
use anyhow::{Context, bail};
use pgflip_core::plan::Member;
use pgflip_core::spec::Desired;
use pgflip_core::spec::Major;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

mod physical;
mod upgrade_check;

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

    async fn read_file(&self, member: &Member) -> Option<InstanceFile> {
        let bytes = tokio::fs::read(self.dir(member).join("instance.json"))
            .await
            .ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    fn pg_ctl(&self, major: Major) -> anyhow::Result<PathBuf> {
        Ok(self.toolchain.server_bin(major.0)?.join("pg_ctl"))
    }

    async fn running(&self, member: &Member, major: Major) -> anyhow::Result<bool> {
        let data = self.dir(member).join("data");
        // A postmaster killed outright can linger as a zombie until its parent (often
        // init, which may reap late) collects it: `pg_ctl status` and PostgreSQL's own
        // lock-file check both take it for a live server, so it would neither be reported
        // down nor be restarted. Its lock file is stale; the shared-memory interlock still
        // keeps a new postmaster out while any of its children live.
        if let Some(pid) = postmaster_pid(&data).await
            && is_zombie(pid).await
        {
            tracing::warn!(%member, pid, "the postmaster is dead (a zombie): removing its lock files to restart it");
            remove_lock_files(&self.dir(member)).await;
            return Ok(false);
        }
        let mut cmd = self.run_as.command(&self.pg_ctl(major)?);
        cmd.arg("status").arg("-D").arg(&data);
        succeeds(cmd).await
    }

    async fn init(&self, member: &Member) -> anyhow::Result<InstanceFile> {
        let bin = self.toolchain.server_bin(member.major.0)?;
        let dir = self.dir(member);
        let run_as = self.run_as;
        let pwfile = dir.join("pwfile");
        {
            let (dir, pwfile) = (dir.clone(), pwfile.clone());
            let password = self.admin.password.clone();
            blocking(move || {
                make_instance_dir(&dir, run_as)?;
                write_atomic(&pwfile, password.as_bytes(), 0o600)?;
                run_as.own(&pwfile)
            })
            .await?;
        }
        let data = dir.join("data");
        let mut initdb = run_as.command(&bin.join("initdb"));
        initdb
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
            ]);
        let result = run_async(initdb).await;
        let _ = tokio::fs::remove_file(&pwfile).await;
        result.context("initdb")?;
        let file = InstanceFile {
            major: member.major,
            port: free_port()?,
        };
        let written = file.clone();
        blocking(move || configure(&dir, &written)).await?;
        Ok(file)
    }

    async fn start(&self, member: &Member, file: &InstanceFile) -> anyhow::Result<()> {
        let dir = self.dir(member);
        // Another process may have taken the port while the server was down: move it.
        let mut file = file.clone();
        if std::net::TcpListener::bind(("127.0.0.1", file.port)).is_err() {
            file.port = free_port()?;
            let (dir, file) = (dir.clone(), file.clone());
            blocking(move || move_port(&dir, &file)).await?;
        }
        let mut pg_ctl = self.run_as.command(&self.pg_ctl(file.major)?);
        pg_ctl
            .arg("start")
            .arg("-D")
            .arg(dir.join("data"))
            .arg("-l")
            .arg(dir.join("server.log"))
            .args(["-w", "-t", "120"]);
        if let Err(e) = run_async(pg_ctl).await {
            let log = tokio::fs::read_to_string(dir.join("server.log"))
                .await
                .unwrap_or_default();
            // After the postmaster was killed, its children may run on for a while (one
            // busy copying notices the death only at its next wait); PostgreSQL refuses
            // to start beside them. That passes by itself: a wait, not a failure.
            let last_start = log.rsplit("starting PostgreSQL").next().unwrap_or("");
            if last_start.contains("pre-existing shared memory block") {
                return Err(NotReady(format!(
                    "{member}: the processes of its stopped server are still exiting; starting it again shortly"
                ))
                .into());
            }
            let why = last_start
                .lines()
                .rfind(|l| l.contains("FATAL") || l.contains("PANIC"))
                .map(|l| format!(" ({})", l.trim()))
                .unwrap_or_default();
            return Err(e.context(format!(
                "starting {member}{why}; see {}",
                dir.join("server.log").display()
            )));
        }
        Ok(())
    }
}

/// A fresh instance directory (mode 0700, owned by the server user). A half-made one from
/// an interrupted init is discarded first.
fn make_instance_dir(dir: &Path, run_as: RunAs) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    remove_dir(dir)?;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    run_as.own(dir)
}

/// Removes `dir` and everything in it; when it is a mount point (a volume of its own for an
/// instance's data), it is emptied and stays.
fn remove_dir(dir: &Path) -> anyhow::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() && !path.is_symlink() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        }
        .with_context(|| format!("removing {}", path.display()))?;
    }
    match std::fs::remove_dir(dir) {
        Err(e) if e.raw_os_error() == Some(nix::libc::EBUSY) => Ok(()),
        other => other.with_context(|| format!("removing {}", dir.display())),
    }
}

/// Bytes free to an unprivileged writer on the file system that holds `path` (or would:
/// its nearest existing ancestor).
fn free_bytes(path: &Path) -> anyhow::Result<u64> {
    let existing = path
        .ancestors()
        .find(|p| p.exists())
        .context("no existing ancestor")?;
    let fs = nix::sys::statvfs::statvfs(existing)
        .with_context(|| format!("statvfs {}", existing.display()))?;
    Ok(fs.blocks_available() * fs.fragment_size())
}

/// Who may log in, and how: the server user over the socket (its directory is private),
/// everyone else over loopback TCP with a password.
const HBA: &str = "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\nhost replication all 127.0.0.1/32 scram-sha-256\n";

/// After initdb: pgflip's settings, the access rules and `instance.json`.
fn configure(dir: &Path, file: &InstanceFile) -> anyhow::Result<()> {
    let data = dir.join("data");
    let mut conf = format!(
        "\n# pgflip\nport = {}\nunix_socket_directories = '{}'\n",
        file.port,
        dir.display()
    );
    for (k, v) in SERVER_SETTINGS.iter().chain(LOCAL_SETTINGS) {
        conf.push_str(&format!("{k} = {v}\n"));
    }
    let conf_path = data.join("postgresql.conf");
    let mut existing = std::fs::read_to_string(&conf_path)?;
    existing.push_str(&conf);
    std::fs::write(&conf_path, existing)?;
    std::fs::write(data.join("pg_hba.conf"), HBA)?;
    write_atomic(
        &dir.join("instance.json"),
        &serde_json::to_vec(file)?,
        0o644,
    )
}

/// Moves a stopped instance to `file.port` (its own was taken meanwhile).
fn move_port(dir: &Path, file: &InstanceFile) -> anyhow::Result<()> {
    let conf_path = dir.join("data/postgresql.conf");
    let mut conf = std::fs::read_to_string(&conf_path)?;
    conf.push_str(&format!("port = {}\n", file.port));
    std::fs::write(&conf_path, conf)?;
    write_atomic(
        &dir.join("instance.json"),
        &serde_json::to_vec(file)?,
        0o644,
    )
}

/// How long a server may take to accept logins after a start (crash recovery included).
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long to try logging in before looking whether the server still runs.
const READY_LOOK: Duration = Duration::from_secs(1);

/// The pid in a data directory's `postmaster.pid`, if there is one.
async fn postmaster_pid(data: &Path) -> Option<i32> {
    let text = tokio::fs::read_to_string(data.join("postmaster.pid"))
        .await
        .ok()?;
    text.lines().next()?.trim().parse().ok()
}

/// Removes a dead postmaster's lock files in an instance directory: the data directory's
/// `postmaster.pid` and its Unix socket's `.s.PGSQL.<port>.lock` (both name it).
async fn remove_lock_files(dir: &Path) {
    tokio::fs::remove_file(dir.join("data/postmaster.pid"))
        .await
        .ok();
    let Ok(mut entries) = tokio::fs::read_dir(dir).await else {
        return;
    };
    while let Ok(Some(e)) = entries.next_entry().await {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(".s.PGSQL.") && name.ends_with(".lock") {
            tokio::fs::remove_file(e.path()).await.ok();
        }
    }
}

impl Instances for LocalInstances {
    async fn ensure(&self, member: &Member, _desired: &Desired) -> Result<Addr> {
        let member = *member;
        let file = match self.read_file(&member).await {
            Some(f) if f.major == member.major => f,
            Some(f) => bail!(
                "{} already holds PostgreSQL {}, not {}: remove it first",
                member.color,
                f.major,
                member.major
            ),
            None => self.init(&member).await?,
        };
        if !self.running(&member, file.major).await? {
            self.start(&member, &file).await?;
        }
        let file = self
            .read_file(&member)
            .await
            .context("instance.json vanished")?;
        let addr = Addr {
            host: "127.0.0.1".into(),
            port: file.port,
        };
        // Up to a minute for a server starting (crash recovery), but one that is gone
        // meanwhile (killed right after the look above) is an error at once: the retry
        // starts it again.
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            match crate::pg::wait_ready(&addr, &self.admin, READY_LOOK).await {
                Ok(()) => return Ok(addr),
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                Err(e) if !self.running(&member, file.major).await? => {
                    return Err(e.context(format!("{member} is not running")));
                }
                Err(_) => {}
            }
        }
    }

    async fn addr(&self, member: &Member, _desired: &Desired) -> Result<Option<Addr>> {
        Ok(self
            .read_file(member)
            .await
            .filter(|f| f.major == member.major)
            .map(|f| Addr {
                host: "127.0.0.1".into(),
                port: f.port,
            }))
    }

    async fn is_up(&self, member: &Member, _desired: &Desired) -> Result<bool> {
        let Some(pid) = postmaster_pid(&self.dir(member).join("data")).await else {
            return Ok(false);
        };
        let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
        Ok(alive && !is_zombie(pid).await)
    }

    async fn free_space(&self, member: &Member, _desired: &Desired) -> Result<Option<u64>> {
        let data = self.dir(member).join("data");
        Ok(Some(blocking(move || free_bytes(&data)).await?))
    }

    async fn physical_copy_blocker(
        &self,
        from: &Member,
        to: &Member,
        _desired: &Desired,
    ) -> Result<Option<String>> {
        self.physical_blocker(from, to).await
    }

    async fn base_backup(
        &self,
        from: &Member,
        to: &Member,
        source: &Addr,
        slot: &str,
        _desired: &Desired,
    ) -> Result<()> {
        self.take_base_backup(from, to, source, slot).await
    }

    async fn upgrade_backup(
        &self,
        from: &Member,
        to: &Member,
        source: &Addr,
        slot: &str,
        stop_before: &str,
        desired: &Desired,
    ) -> Result<Addr> {
        if self.addr(to, desired).await?.is_none() {
            self.upgrade_copy(from, to, source, slot, stop_before)
                .await?;
        }
        self.ensure(to, desired).await
    }

    async fn remove(&self, member: &Member, _desired: &Desired) -> Result<()> {
        let staging = self.staging(member);
        self.stop_copy(&staging).await?;
        let dir = self.dir(member);
        if let Some(file) = self.read_file(member).await
            && self.running(member, file.major).await?
        {
            let mut pg_ctl = self.run_as.command(&self.pg_ctl(file.major)?);
            pg_ctl
                .arg("stop")
                .arg("-D")
                .arg(dir.join("data"))
                .args(["-m", "fast", "-w", "-t", "60"]);
            run_async(pg_ctl).await?;
        }
        // A data directory of many gigabytes takes a while to unlink.
        blocking(move || {
            remove_dir(&dir)?;
            remove_dir(&staging)
        })
        .await
    }
}

/// [`stop_all`] for async code (`pgflip stop`, the demo's cleanup): on the blocking pool.
pub async fn stop_all_async(state: &StateDir) -> anyhow::Result<()> {
    let state = state.clone();
    blocking(move || stop_all(&state)).await
}

/// Stops every instance under a state directory (for tests and `pgflip local --stop`).
pub fn stop_all(state: &StateDir) -> anyhow::Result<()> {
    let toolchain = Toolchain::discover_blocking();
    let run_as = RunAs::detect()?;
    let Ok(entries) = std::fs::read_dir(state.dir("instances")) else {
        return Ok(());
    };
    for e in entries.flatten() {
        // An instance's server (`data`), or a physical copy's, replaying (`backup`) or
        // upgrading (`new`, see `physical`): each data directory names its major.
        for data in ["data", "backup", "new"].map(|d| e.path().join(d)) {
            if let Ok(version) = std::fs::read_to_string(data.join("PG_VERSION"))
                && let Ok(major) = version.trim().parse::<u32>()
                && let Ok(bin) = toolchain.server_bin(major)
            {
                let _ = run_as
                    .command(&bin.join("pg_ctl"))
                    .arg("stop")
                    .arg("-D")
                    .arg(&data)
                    .args(["-m", "immediate", "-w", "-t", "30"])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .status();
            }
        }
    }
    Ok(())
}
