//! Test-only crash points. With `PGFLIP_FAILPOINT=<name>` set, the process kills itself
//! with SIGKILL (exactly like `kill -9`) when it reaches that point, so tests can prove a
//! restarted pgflip resumes from any phase boundary. Unset, a failpoint costs one lookup.

use std::sync::OnceLock;

fn armed() -> Option<&'static str> {
    static ARMED: OnceLock<Option<String>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            std::env::var("PGFLIP_FAILPOINT")
                .ok()
                .filter(|s| !s.is_empty())
        })
        .as_deref()
}

pub fn hit(name: &str) {
    if armed() == Some(name) {
        eprintln!("pgflip: failpoint {name}: killing this process");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}
