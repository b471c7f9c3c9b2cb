//! Test-only crash points. With `PGFLIP_FAILPOINT=<name>` set, the process kills itself
//! with SIGKILL (exactly like `kill -9`) when it reaches that point, so tests can prove a
//! restarted pgflip resumes from any phase boundary. Unset, a failpoint costs one lookup.
//!
//! Where a step can fail or hang on its own ([`inject`], inside the pause),
//! `error:<name>` makes it fail there and `stall:<name>` makes it hang there, so tests
//! reach the paths that handle those (the pause's rollback) without a crash.

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

/// [`hit`], and at the same point an injected error (`error:<name>`) or a hang that only
/// the caller's own bound ends (`stall:<name>`).
pub async fn inject(name: &str) -> anyhow::Result<()> {
    hit(name);
    let Some(armed) = armed() else {
        return Ok(());
    };
    if armed.strip_prefix("error:") == Some(name) {
        anyhow::bail!("failpoint {name}: injected error");
    }
    if armed.strip_prefix("stall:") == Some(name) {
        std::future::pending::<()>().await;
    }
    Ok(())
}
