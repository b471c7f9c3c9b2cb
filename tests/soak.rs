//! The soak: switches and reverts one after another under a writing ledger, each with a
//! fault drawn by a seeded generator (pgflip killed, the endpoint killed, a server killed or
//! frozen, or none), at a random moment of the switch. At the end: nothing lost, no client
//! failure outside a fault that cuts clients off, no replication slot but the reverse link's.
//!
//! `make test` runs 3 switches; `make soak` runs `SWITCHES` (default 20) and writes the
//! figures to `SOAK_JSON` (default `soak.json`). The seed is printed; `SEED=<n>` replays it.

mod common;

use common::{Harness, MINUTE};
use nix::sys::signal::Signal;
use pgflip_core::plan::Color;
use pgflip_engine::load::{LoadReport, lost_commits};
use pgflip_engine::pg::connect;
use pgflip_engine::replication::link_name;
use std::time::{Duration, Instant};

/// After a fault that cuts clients off (their connections go with the process), errors
/// within this window are the fault's, not pgflip's.
const CUT_OFF_WINDOW: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    None,
    PgflipKilled,
    EndpointKilled,
    ServingKilled,
    OtherKilled,
    OtherFrozen,
}

const FAULTS: [Fault; 6] = [
    Fault::None,
    Fault::PgflipKilled,
    Fault::EndpointKilled,
    Fault::ServingKilled,
    Fault::OtherKilled,
    Fault::OtherFrozen,
];

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::None => "none",
            Fault::PgflipKilled => "pgflip-killed",
            Fault::EndpointKilled => "endpoint-killed",
            Fault::ServingKilled => "serving-postgres-killed",
            Fault::OtherKilled => "other-postgres-killed",
            Fault::OtherFrozen => "other-postgres-frozen-3s",
        }
    }

    /// Whether clients lose their connections to it (the serving server, the endpoint;
    /// a kill of the other side may land just as it starts serving).
    fn cuts_clients_off(self) -> bool {
        matches!(
            self,
            Fault::EndpointKilled | Fault::ServingKilled | Fault::OtherKilled
        )
    }
}

/// splitmix64: a small, well-known generator, so a seed replays the same run anywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn inject(h: &mut Harness, fault: Fault) {
    let serving = h.record().serving.map(|m| m.color).unwrap_or(Color::Blue);
    let other = match serving {
        Color::Blue => "green",
        Color::Green => "blue",
    };
    match fault {
        Fault::None => {}
        Fault::PgflipKilled => {
            h.kill();
            h.start(None);
        }
        Fault::EndpointKilled => {
            if let Some(pid) = h.pgbouncer() {
                let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
            }
        }
        Fault::ServingKilled => h.kill_server(serving.as_str()),
        Fault::OtherKilled => h.kill_server(other),
        Fault::OtherFrozen => {
            h.signal_server(other, Signal::SIGSTOP);
            tokio::time::sleep(Duration::from_secs(3)).await;
            h.signal_server(other, Signal::SIGCONT);
        }
    }
}

/// Client errors not explained by a fault that cut clients off.
fn failed_by_pgflip(report: &LoadReport, cuts: &[Duration]) -> Vec<f64> {
    report
        .latencies
        .iter()
        .filter(|s| !s.ok)
        .map(|s| s.at_ms)
        .filter(|at| {
            !cuts.iter().any(|cut| {
                let from = cut.as_secs_f64() * 1000.0 - 100.0;
                *at >= from && *at <= from + CUT_OFF_WINDOW.as_secs_f64() * 1000.0
            })
        })
        .collect()
}

/// Waits until pgflip's instance of `color`, if there is one, accepts connections again.
async fn instance_answers(h: &Harness, color: &str, within: Duration) {
    let since = Instant::now();
    while let Some(addr) = h.instance_addr(color) {
        let Err(refused) = connect(&addr, &h.admin(), "postgres").await else {
            return;
        };
        assert!(
            since.elapsed() < within,
            "{color} not running again within {within:?}: {refused:#}\n{}",
            h.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Replication slots on either server other than the reverse link's on the serving one.
async fn slots_left(h: &Harness) -> Vec<String> {
    let r = h.record();
    let expected = match (r.serving, &r.standby) {
        (Some(s), Some(standby)) => Some(link_name(s.color, standby.member.color, "app")),
        _ => None,
    };
    let mut left = Vec::new();
    for color in ["blue", "green"] {
        let Some(addr) = h.instance_addr(color) else {
            continue;
        };
        let client = connect(&addr, &h.admin(), "postgres").await.unwrap();
        for row in client
            .query("SELECT slot_name::text FROM pg_replication_slots", &[])
            .await
            .unwrap()
        {
            let slot: String = row.get(0);
            let serving = r.serving.is_some_and(|m| m.color.as_str() == color);
            if !(serving && Some(&slot) == expected.as_ref()) {
                left.push(format!("{color}: {slot}"));
            }
        }
    }
    left
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_switches_and_reverts_under_faults_lose_nothing() {
    let switches: usize = env_or("SOAK_SWITCHES", 3);
    let seed: u64 = env_or(
        "SOAK_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    );
    eprintln!("soak seed: {seed} (SEED={seed} replays it), {switches} switches");
    let mut rng = Rng(seed);
    let (mut h, _app, load) = Harness::serving_15_under_load("", 2, 100).await;
    let load_started = Instant::now();
    h.start(None);
    let mut faults = Vec::new();
    let mut cuts = Vec::new();
    let mut up = String::new();
    for n in 1..=switches {
        let fault = FAULTS[rng.below(FAULTS.len() as u64) as usize];
        let after = Duration::from_millis(rng.below(3000));
        let (revision, serving_now) = if n % 2 == 1 {
            up = h.commit_version(16);
            (up.clone(), (Color::Green, 16))
        } else {
            (h.revert(&up), (Color::Blue, 15))
        };
        tokio::time::sleep(after).await;
        let at = load_started.elapsed();
        inject(&mut h, fault).await;
        if fault.cuts_clients_off() {
            cuts.push(at);
        }
        eprintln!("switch {n}: {} after {after:?}", fault.name());
        faults.push(serde_json::json!({
            "switch": n,
            "fault": fault.name(),
            "after_ms": after.as_millis() as u64,
        }));
        h.wait_switched(&format!("switch {n}"), n, &revision, serving_now)
            .await;
    }
    // Everything the faults started again has settled: the endpoint answers where it should.
    h.wait("settled", MINUTE, |r| r.attempt.is_none()).await;
    // pgflip restarts a killed endpoint at its next look, which may come after the switch.
    h.served_again(&h.admin(), None, Instant::now(), Duration::ZERO, MINUTE)
        .await;
    // So does a killed standby: the fault may land just after the switch, on the old color.
    for color in ["blue", "green"] {
        instance_answers(&h, color, MINUTE).await;
    }
    let report = load.stop().await;
    let lost = lost_commits(&report, &h.endpoint(), &h.admin(), "app")
        .await
        .unwrap();
    let by_pgflip = failed_by_pgflip(&report, &cuts);
    let left = slots_left(&h).await;
    let max_pause_ms = h
        .record()
        .history
        .iter()
        .map(|s| s.pause_ms)
        .fold(0.0, f64::max);
    let figures = serde_json::json!({
        "seed": seed,
        "switches": switches,
        "faults": faults,
        "committed": report.committed,
        "failed_by_pgflip": by_pgflip.len(),
        "lost": lost,
        "slots_left": left.len(),
        "max_pause_ms": max_pause_ms,
    });
    eprintln!("{}", serde_json::to_string_pretty(&figures).unwrap());
    if let Ok(path) = std::env::var("SOAK_JSON") {
        std::fs::write(&path, serde_json::to_string_pretty(&figures).unwrap()).unwrap();
    }
    assert!(
        report.committed > 100,
        "the ledger wrote: {}",
        report.committed
    );
    assert_eq!(lost, 0, "acknowledged commits lost (seed {seed})");
    assert!(
        by_pgflip.is_empty(),
        "client errors outside any fault (seed {seed}): at {by_pgflip:?} ms; {:?}",
        report.errors
    );
    assert!(
        left.is_empty(),
        "replication slots left (seed {seed}): {left:?}"
    );
}
