//! Signals to the processes a test's pgflip runs: a server's postmaster (and, to freeze a
//! whole server, every process it started), the endpoint's PgBouncer.

use super::Harness;
use nix::sys::signal::Signal;
use nix::unistd::Pid;

impl Harness {
    /// The postmaster of `color`'s instance, if it has one running (or had: a pidfile).
    pub fn postmaster(&self, color: &str) -> Option<Pid> {
        let file = self
            .state
            .dir("instances")
            .join(color)
            .join("data/postmaster.pid");
        let text = std::fs::read_to_string(file).ok()?;
        Some(Pid::from_raw(text.lines().next()?.trim().parse().ok()?))
    }

    /// The endpoint's PgBouncer, from its pidfile.
    pub fn pgbouncer(&self) -> Option<Pid> {
        let file = self.state.dir("endpoint").join("pgbouncer.pid");
        let text = std::fs::read_to_string(file).ok()?;
        Some(Pid::from_raw(text.trim().parse().ok()?))
    }

    /// SIGKILL to `color`'s postmaster (a server that crashes).
    pub fn kill_server(&self, color: &str) {
        if let Some(pid) = self.postmaster(color) {
            let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
        }
    }

    /// `signal` to `color`'s postmaster and every process it started (backends, the
    /// replication workers): SIGSTOP freezes the whole server, as a hung machine would.
    pub fn signal_server(&self, color: &str, signal: Signal) {
        let Some(parent) = self.postmaster(color) else {
            return;
        };
        let _ = nix::sys::signal::kill(parent, signal);
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            // After the command name in parentheses: the state, then the parent's pid.
            let ppid = std::fs::read_to_string(entry.path().join("stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(')')
                        .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                        .and_then(|p| p.parse::<i32>().ok())
                });
            if ppid == Some(parent.as_raw()) {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), signal);
            }
        }
    }
}
