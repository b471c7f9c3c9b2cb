//! The clients during a benchmark run: pgbench's TPC-B-like transactions through the
//! endpoint at a fixed rate, and beside it pgflip's ledger load (whose acknowledged
//! commits are checked afterwards, for lost commits).
//!
//! pgbench logs every transaction (`-l`): client, number, latency (µs), script,
//! completion time and, at a fixed rate, the schedule lag: how late it could start. The
//! latency here is counted from when the transaction was sent (latency minus lag): a
//! transaction held in a paused endpoint has the whole hold in it, while the backlog of a
//! machine too busy to keep the rate (2 cores copying a database beside 1000 tx/s) is
//! not counted as downtime; the longest gap between completions shows any stop as well.
//! pgbench has no way to stop early and still write its summary, so it
//! runs with a long `-T` and is killed after the measured window plus a cool-down; what
//! its buffered log loses at the very end is outside the window. Errors come on stderr
//! as they happen, one line per aborted client or failed transaction.

use super::env::{DATABASE, Env};
use anyhow::Context;
use pgflip_engine::load::{self, LoadConfig, LoadHandle, LoadReport};
use pgflip_engine::ports::Addr;
use serde::Serialize;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::Duration;

pub struct Traffic {
    pgbench: Child,
    log_dir: PathBuf,
    /// Taken by [`Traffic::stop`].
    ledger: Option<LoadHandle>,
}

/// One finished transaction, as pgbench logged it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tx {
    /// Completion, Unix ms.
    pub at_ms: f64,
    pub latency_ms: f64,
}

/// What the clients saw during one window of time.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Window {
    pub transactions: u64,
    pub max_latency_ms: f64,
    pub p99_latency_ms: f64,
    /// When the slowest transaction completed (Unix ms): what it waited for is found by
    /// the time.
    pub max_latency_at_ms: f64,
    /// The longest stretch with no completed transaction.
    pub longest_gap_ms: f64,
}

/// Everything the clients did over a whole run.
pub struct Outcome {
    pub txs: Vec<Tx>,
    pub pgbench_errors: Vec<String>,
    pub ledger: LoadReport,
}

impl Traffic {
    pub fn start(env: &Env, rate: u32, clients: u32) -> anyhow::Result<Traffic> {
        let log_dir = env.dir.join("pgbench-log");
        std::fs::create_dir_all(&log_dir)?;
        let stderr = std::fs::File::create(env.dir.join("pgbench.err"))?;
        let pgbench = env
            .pgbench(&env.endpoint)?
            .args(["-n", "-M", "simple", "-l"])
            .arg(format!("--log-prefix={}", log_dir.join("tx").display()))
            .args(["-c", &clients.to_string(), "-j", "2"])
            .args(["-R", &rate.to_string(), "-T", "86400", DATABASE])
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .context("starting pgbench")?;
        let ledger = load::start(LoadConfig {
            endpoint: env.endpoint.clone(),
            creds: env.admin.clone(),
            database: DATABASE.into(),
            clients: 2,
            rate_per_sec: Some(50),
        });
        Ok(Traffic {
            pgbench,
            log_dir,
            ledger: Some(ledger),
        })
    }

    /// Stops both loads and reads what pgbench logged.
    pub async fn stop(mut self, env: &Env) -> anyhow::Result<Outcome> {
        let ledger = match self.ledger.take() {
            Some(l) => l.stop().await,
            None => LoadReport::default(),
        };
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pgbench.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        tokio::task::block_in_place(|| self.pgbench.wait())?;
        let mut txs = Vec::new();
        for entry in std::fs::read_dir(&self.log_dir)? {
            let text = std::fs::read_to_string(entry?.path())?;
            txs.extend(text.lines().filter_map(parse_log_line));
        }
        txs.sort_by(|a, b| a.at_ms.total_cmp(&b.at_ms));
        let errors = std::fs::read_to_string(env.dir.join("pgbench.err")).unwrap_or_default();
        let pgbench_errors = errors
            .lines()
            .filter(|l| l.contains("aborted") || l.contains("ERROR") || l.contains("error"))
            .map(str::to_string)
            .collect();
        Ok(Outcome {
            txs,
            pgbench_errors,
            ledger,
        })
    }

    /// Lets the clients run for a while (before and after the moment measured).
    pub async fn settle(d: Duration) {
        tokio::time::sleep(d).await;
    }
}

/// A run that ends early (an error) does not leave pgbench behind.
impl Drop for Traffic {
    fn drop(&mut self) {
        let _ = self.pgbench.kill();
        let _ = self.pgbench.wait();
    }
}

impl Outcome {
    /// The clients' view of `[from_ms, to_ms]` (Unix ms).
    pub fn window(&self, from_ms: f64, to_ms: f64) -> Window {
        let inside: Vec<&Tx> = self
            .txs
            .iter()
            .filter(|t| t.at_ms >= from_ms && t.at_ms <= to_ms)
            .collect();
        let mut latencies: Vec<f64> = inside.iter().map(|t| t.latency_ms).collect();
        latencies.sort_by(f64::total_cmp);
        let p99 = latencies
            .get(((latencies.len() as f64 * 0.99).ceil() as usize).saturating_sub(1))
            .copied()
            .unwrap_or(0.0);
        let slowest = inside
            .iter()
            .max_by(|a, b| a.latency_ms.total_cmp(&b.latency_ms));
        let gap = inside
            .windows(2)
            .map(|w| w[1].at_ms - w[0].at_ms)
            .fold(0.0, f64::max);
        Window {
            transactions: inside.len() as u64,
            max_latency_ms: latencies.last().copied().unwrap_or(0.0),
            p99_latency_ms: p99,
            max_latency_at_ms: slowest.map_or(0.0, |t| t.at_ms),
            longest_gap_ms: gap,
        }
    }

    /// Failed transactions: pgbench's errors and the ledger clients' failures.
    pub fn failed(&self) -> u64 {
        self.pgbench_errors.len() as u64 + self.ledger.failed
    }

    /// Acknowledged ledger commits missing on the server that serves at the end.
    pub async fn lost_commits(&self, env: &Env, serving: &Addr) -> anyhow::Result<u64> {
        load::lost_commits(&self.ledger, serving, &env.admin, DATABASE).await
    }

    /// Per-bucket maximum latency over `[from_ms, to_ms]`, relative to `zero_ms`: what the
    /// plot of latency around the switch draws.
    pub fn latency_series(
        &self,
        zero_ms: f64,
        from_ms: f64,
        to_ms: f64,
        bucket_ms: f64,
    ) -> Vec<(f64, f64)> {
        let buckets = ((to_ms - from_ms) / bucket_ms).ceil().max(1.0) as usize;
        let mut max = vec![0.0f64; buckets];
        for t in self
            .txs
            .iter()
            .filter(|t| t.at_ms >= from_ms && t.at_ms < to_ms)
        {
            let i = (((t.at_ms - from_ms) / bucket_ms) as usize).min(buckets - 1);
            max[i] = max[i].max(t.latency_ms);
        }
        max.into_iter()
            .enumerate()
            .map(|(i, m)| (from_ms + i as f64 * bucket_ms - zero_ms, m))
            .collect()
    }
}

/// `client_id transaction_no time script_no time_epoch time_us [schedule_lag]`.
fn parse_log_line(line: &str) -> Option<Tx> {
    let f: Vec<&str> = line.split_whitespace().collect();
    let latency_us: f64 = f.get(2)?.parse().ok()?;
    let epoch_s: f64 = f.get(4)?.parse().ok()?;
    let us: f64 = f.get(5)?.parse().ok()?;
    let lag_us: f64 = f.get(6).and_then(|l| l.parse().ok()).unwrap_or(0.0);
    Some(Tx {
        at_ms: epoch_s * 1000.0 + us / 1000.0,
        latency_ms: (latency_us - lag_us).max(0.0) / 1000.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pgbench_log_lines_and_windows() {
        let tx = parse_log_line("3 118 2530 0 1700000000 250000 130").unwrap();
        assert_eq!(tx.at_ms, 1_700_000_000_250.0);
        assert_eq!(tx.latency_ms, 2.4, "the schedule lag is not latency");
        let unthrottled = parse_log_line("3 118 2530 0 1700000000 250000").unwrap();
        assert_eq!(unthrottled.latency_ms, 2.53);
        assert!(parse_log_line("garbage").is_none());
        let at = |ms: f64, lat: f64| Tx {
            at_ms: ms,
            latency_ms: lat,
        };
        let o = Outcome {
            txs: vec![
                at(0.0, 1.0),
                at(10.0, 2.0),
                at(400.0, 390.0),
                at(410.0, 1.0),
            ],
            pgbench_errors: vec![],
            ledger: Default::default(),
        };
        let w = o.window(5.0, 1000.0);
        assert_eq!(w.transactions, 3);
        assert_eq!(w.max_latency_ms, 390.0);
        assert_eq!(w.max_latency_at_ms, 400.0);
        assert_eq!(w.longest_gap_ms, 390.0);
        let series = o.latency_series(0.0, 0.0, 500.0, 100.0);
        assert_eq!(series.len(), 5);
        assert_eq!(series[0], (0.0, 2.0));
        assert_eq!(series[4], (400.0, 390.0));
    }
}
