//! Running server processes as an unprivileged OS user. PostgreSQL (and PgBouncer) refuse
//! to run as root; when pgflip runs as root it starts them as `$PGFLIP_OS_USER` (default
//! `pgflip`, created by the setup script), otherwise as the current user.

use anyhow::{Context, bail};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

#[derive(Debug, Clone, Copy)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
    drop: bool,
}

impl RunAs {
    pub fn detect() -> anyhow::Result<RunAs> {
        let me = nix::unistd::geteuid();
        if !me.is_root() {
            return Ok(RunAs {
                uid: me.as_raw(),
                gid: nix::unistd::getegid().as_raw(),
                drop: false,
            });
        }
        let name = std::env::var("PGFLIP_OS_USER").unwrap_or_else(|_| "pgflip".into());
        let user = nix::unistd::User::from_name(&name)?
            .with_context(|| format!("OS user {name:?} does not exist: PostgreSQL cannot run as root; run `make setup` or create the user (useradd --system {name})"))?;
        if user.uid.is_root() {
            bail!("PGFLIP_OS_USER must not be root");
        }
        Ok(RunAs {
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
            drop: true,
        })
    }

    /// A command that runs as the unprivileged user, in its own process group (so signals
    /// meant for pgflip never reach the servers: they are not its children).
    pub fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new(program);
        if self.drop {
            cmd.uid(self.uid).gid(self.gid);
        }
        cmd.process_group(0)
            .stdin(Stdio::null())
            .env_remove("PGPASSWORD")
            .env("LC_ALL", "C");
        if let Some(lib) = crate::toolchain::lib_dir(program.parent().unwrap_or(Path::new("/"))) {
            cmd.env("LD_LIBRARY_PATH", lib);
        }
        cmd
    }

    /// The servers run as the unprivileged user, so every directory above their data must
    /// be searchable by it (a state directory under `/root` is not).
    pub fn check_reachable(&self, dir: &Path) -> anyhow::Result<()> {
        use std::os::unix::fs::MetadataExt;
        if !self.drop {
            return Ok(());
        }
        for anc in dir.ancestors().skip(1) {
            let meta =
                std::fs::metadata(anc).with_context(|| format!("reading {}", anc.display()))?;
            let searchable = meta.mode() & 0o001 != 0
                || (meta.uid() == self.uid && meta.mode() & 0o100 != 0)
                || (meta.gid() == self.gid && meta.mode() & 0o010 != 0);
            if !searchable {
                bail!(
                    "{} is not reachable by the unprivileged user that runs PostgreSQL ({} is not searchable by uid {}): choose a --state-dir elsewhere (e.g. under /var/lib or /tmp)",
                    dir.display(),
                    anc.display(),
                    self.uid
                );
            }
        }
        Ok(())
    }

    /// Gives a file or directory to the unprivileged user.
    pub fn own(&self, path: &Path) -> anyhow::Result<()> {
        if self.drop {
            nix::unistd::chown(path, Some(self.uid.into()), Some(self.gid.into()))
                .with_context(|| format!("chown {}", path.display()))?;
        }
        Ok(())
    }
}

/// Runs a command to completion; on failure the error carries its output.
pub fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("running {}", describe(cmd)))?;
    outcome(cmd, out)
}

/// The output of a finished command (stdout, then stderr), or its failure with that output.
fn outcome(cmd: &Command, out: std::process::Output) -> anyhow::Result<String> {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!(
            "{:?} failed ({}): {}",
            cmd.get_program(),
            out.status,
            text.trim()
        );
    }
    Ok(text)
}

/// [`run`] for async code: the process is spawned and waited for through
/// `tokio::process`, so the runtime's worker thread is free while it runs (`pg_ctl start
/// -w`, `initdb` take seconds). Everything set on `cmd` (the user, process group,
/// environment) is kept. Not killed if the future is dropped, as [`run`] could not be
/// interrupted either: a server start half-done is finished rather than torn.
pub async fn run_async(cmd: Command) -> anyhow::Result<String> {
    let mut cmd = tokio::process::Command::from(cmd);
    let out = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .await
        .with_context(|| format!("running {}", describe(cmd.as_std())))?;
    outcome(cmd.as_std(), out)
}

/// [`run_async`] for a long step of a copy: killed if the future is dropped (a copy past its
/// bound is abandoned), and its pid kept in `pidfile` while it runs. A pgflip killed
/// meanwhile leaves the process running (it is in a process group of its own); the
/// restarted one finds it with [`still_running`] and waits instead of starting another.
pub async fn run_tracked(cmd: Command, pidfile: &Path) -> anyhow::Result<String> {
    let mut cmd = tokio::process::Command::from(cmd);
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("running {}", describe(cmd.as_std())))?;
    if let Some(pid) = child.id() {
        tokio::fs::write(pidfile, pid.to_string()).await?;
    }
    // A crash while it runs: the process outlives pgflip.
    if let Some(name) = cmd.as_std().get_program().to_str() {
        let program = Path::new(name).file_name().and_then(|n| n.to_str());
        crate::failpoint::hit(&format!("running:{}", program.unwrap_or(name)));
    }
    let out = child.wait_with_output().await;
    let _ = tokio::fs::remove_file(pidfile).await;
    outcome(cmd.as_std(), out?)
}

/// The pid in `pidfile` ([`run_tracked`]) if that process still runs `program`.
pub async fn still_running(pidfile: &Path, program: &str) -> Option<i32> {
    let pid: i32 = tokio::fs::read_to_string(pidfile)
        .await
        .ok()?
        .trim()
        .parse()
        .ok()?;
    // The pid may have been reused since: the command line must still be the program's.
    let cmdline = tokio::fs::read(format!("/proc/{pid}/cmdline")).await.ok()?;
    String::from_utf8_lossy(&cmdline)
        .contains(program)
        .then_some(pid)
}

/// Whether a command exits successfully (its output discarded), waited for without
/// blocking the runtime.
pub async fn succeeds(cmd: Command) -> anyhow::Result<bool> {
    let mut cmd = tokio::process::Command::from(cmd);
    let status = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .with_context(|| format!("running {}", describe(cmd.as_std())))?;
    Ok(status.success())
}

/// Asks the OS for a free TCP port on loopback.
pub fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// The program and its arguments, never its environment (which may hold a password).
fn describe(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    parts.join(" ")
}

/// Whether `pid` has exited and waits to be reaped (Linux: state `Z` in `/proc/<pid>/stat`,
/// after the command name in parentheses).
pub async fn is_zombie(pid: i32) -> bool {
    let Ok(stat) = tokio::fs::read_to_string(format!("/proc/{pid}/stat")).await else {
        return false;
    };
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        == Some("Z")
}
