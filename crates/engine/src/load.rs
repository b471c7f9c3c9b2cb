//! A client write load with a ledger of its committed transactions: the evidence behind
//! "0 failed transactions, 0 lost commits" in the demo, the tests and the benchmark.
//!
//! Each client holds one connection through the endpoint and inserts `(client, seq)` rows
//! into `pgflip_ledger`, one autocommit transaction each, remembering every seq whose
//! commit was acknowledged. [`lost_commits`] later checks those rows on a server. Only the
//! simple query protocol is used: PgBouncer 1.18 cannot carry named prepared statements
//! in transaction pooling.

use crate::pg;
use crate::ports::{Addr, Credentials};
use serde::Serialize;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_postgres::SimpleQueryMessage;

pub const LEDGER_TABLE: &str = "pgflip_ledger";
/// How many error messages a report keeps (the count is always exact).
const KEPT_ERRORS: usize = 10;
/// Pause before a client reconnects after an error.
const RECONNECT_DELAY: Duration = Duration::from_millis(100);
/// How long [`LoadHandle::stop`] lets in-flight transactions finish before abandoning
/// them (each then counts as failed: a client would still be waiting).
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Ledger rows checked per query by [`lost_commits`].
const CHECK_BATCH: usize = 20_000;

#[derive(Debug, Clone)]
pub struct LoadConfig {
    pub endpoint: Addr,
    pub creds: Credentials,
    pub database: String,
    pub clients: usize,
    /// Transactions per second across all clients; `None`: each client as fast as it can.
    pub rate_per_sec: Option<u32>,
}

/// One transaction attempt (or failed connection attempt).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Sample {
    /// When it completed, in ms since the load started.
    pub at_ms: f64,
    pub latency_ms: f64,
    pub ok: bool,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct LoadReport {
    pub committed: u64,
    /// Attempts that returned an error to the client, connection errors included.
    pub failed: u64,
    /// The first few errors, each with its client and time.
    pub errors: Vec<String>,
    pub duration_ms: f64,
    /// Over all attempts, failed ones included.
    pub max_latency_ms: f64,
    pub p99_latency_ms: f64,
    /// The longest window without a committed transaction, between the first and the last.
    pub longest_gap_ms: f64,
    /// When that window ended (the commit after it), in ms since the load started.
    pub longest_gap_end_ms: f64,
    pub latencies: Vec<Sample>,
    /// `(client, seq)` of every acknowledged commit.
    #[serde(skip)]
    pub ledger: Vec<(i32, i64)>,
}

/// Creates the ledger table if missing (directly on a server, or through the endpoint).
pub async fn prepare(addr: &Addr, creds: &Credentials, database: &str) -> anyhow::Result<()> {
    let client = pg::connect(addr, creds, database).await?;
    client
        .simple_query(&format!(
            "CREATE TABLE IF NOT EXISTS {LEDGER_TABLE} (client int NOT NULL, seq bigint NOT NULL, \
             at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (client, seq))"
        ))
        .await?;
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    /// Finish the transaction in flight, then stop.
    Stopping,
    /// Give up on the transaction in flight.
    Abandon,
}

pub struct LoadHandle {
    live: Arc<Mutex<Live>>,
    phase: watch::Sender<Phase>,
    clients: Vec<JoinHandle<ClientOutcome>>,
    started: Instant,
}

/// What the clients have done so far, readable while the load runs.
#[derive(Default)]
struct Live {
    committed: Vec<(i32, i64)>,
    failed: u64,
}

#[derive(Default)]
struct ClientOutcome {
    committed: Vec<i64>,
    failed: u64,
    errors: Vec<String>,
    samples: Vec<Sample>,
}

/// Starts the load: `cfg.clients` tasks, each with its own connection through the endpoint.
pub fn start(cfg: LoadConfig) -> LoadHandle {
    let (phase, _) = watch::channel(Phase::Running);
    let live = Arc::new(Mutex::new(Live::default()));
    let started = Instant::now();
    // Runs against one table never collide: seqs start at the start time (ms) × 10⁶.
    let seq_base = crate::clock::now_ms() as i64 * 1_000_000;
    let period = cfg
        .rate_per_sec
        .filter(|r| *r > 0)
        .map(|r| Duration::from_secs_f64(cfg.clients as f64 / f64::from(r)));
    let cfg = Arc::new(cfg);
    let clients = (0..cfg.clients)
        .map(|i| {
            let client = Client {
                id: i as i32,
                cfg: cfg.clone(),
                live: live.clone(),
                started,
                phase: phase.subscribe(),
            };
            tokio::spawn(client.run(seq_base, period))
        })
        .collect();
    LoadHandle {
        live,
        phase,
        clients,
        started,
    }
}

impl LoadHandle {
    /// Failed transactions so far.
    pub fn failed_so_far(&self) -> u64 {
        self.live.lock().unwrap().failed
    }

    /// Commits acknowledged so far that are missing on the server at `addr`.
    pub async fn lost_commits(
        &self,
        addr: &Addr,
        creds: &Credentials,
        database: &str,
    ) -> anyhow::Result<u64> {
        let ledger = self.live.lock().unwrap().committed.clone();
        missing(&ledger, addr, creds, database).await
    }

    /// Stops every client after its transaction in flight and reports.
    pub async fn stop(self) -> LoadReport {
        self.phase.send_replace(Phase::Stopping);
        let deadline = Instant::now() + STOP_GRACE;
        let mut report = LoadReport::default();
        for (id, mut task) in self.clients.into_iter().enumerate() {
            let joined = match tokio::time::timeout_at(deadline, &mut task).await {
                Ok(joined) => joined,
                Err(_) => {
                    self.phase.send_replace(Phase::Abandon);
                    task.await
                }
            };
            let outcome = joined.unwrap_or_else(|e| ClientOutcome {
                failed: 1,
                errors: vec![format!("client {id}: task failed: {e}")],
                ..Default::default()
            });
            report.committed += outcome.committed.len() as u64;
            report.failed += outcome.failed;
            report.errors.extend(outcome.errors);
            report.latencies.extend(outcome.samples);
            report
                .ledger
                .extend(outcome.committed.into_iter().map(|seq| (id as i32, seq)));
        }
        report.duration_ms = ms(self.started.elapsed());
        report.errors.truncate(KEPT_ERRORS);
        report.latencies.sort_by(|a, b| a.at_ms.total_cmp(&b.at_ms));
        summarize(&mut report);
        report
    }
}

fn summarize(report: &mut LoadReport) {
    let mut latencies: Vec<f64> = report.latencies.iter().map(|s| s.latency_ms).collect();
    latencies.sort_by(f64::total_cmp);
    report.max_latency_ms = latencies.last().copied().unwrap_or(0.0);
    report.p99_latency_ms = percentile(&latencies, 0.99);
    // Between the first and the last commit: connecting at the start and stopping at the
    // end are not outages.
    let mut commits = report.latencies.iter().filter(|s| s.ok).map(|s| s.at_ms);
    let (mut gap, mut gap_end) = (0.0f64, 0.0f64);
    if let Some(mut last) = commits.next() {
        for at in commits {
            if at - last > gap {
                (gap, gap_end) = (at - last, at);
            }
            last = at;
        }
    }
    report.longest_gap_ms = gap;
    report.longest_gap_end_ms = gap_end;
}

/// The `q` quantile of sorted values (nearest rank).
fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

struct Client {
    id: i32,
    cfg: Arc<LoadConfig>,
    live: Arc<Mutex<Live>>,
    started: Instant,
    phase: watch::Receiver<Phase>,
}

impl Client {
    async fn run(mut self, seq_base: i64, period: Option<Duration>) -> ClientOutcome {
        let mut out = ClientOutcome::default();
        let mut ticker = period.map(|p| {
            let mut t = tokio::time::interval(p);
            t.set_missed_tick_behavior(MissedTickBehavior::Delay);
            t
        });
        let mut connection: Option<tokio_postgres::Client> = None;
        let mut seq = seq_base;
        while *self.phase.borrow() == Phase::Running {
            if let Some(t) = ticker.as_mut() {
                tokio::select! {
                    _ = t.tick() => {}
                    _ = self.phase.wait_for(|p| *p != Phase::Running) => break,
                }
            }
            let begun = Instant::now();
            let client = match connection.take() {
                Some(c) if !c.is_closed() => c,
                _ => match pg::connect(&self.cfg.endpoint, &self.cfg.creds, &self.cfg.database)
                    .await
                {
                    Ok(c) => c,
                    Err(e) => {
                        self.record_failure(&mut out, begun, format!("{e:#}"));
                        self.sleep_unless_stopped(RECONNECT_DELAY).await;
                        continue;
                    }
                },
            };
            seq += 1;
            let sql = format!(
                "INSERT INTO {LEDGER_TABLE} (client, seq) VALUES ({}, {seq})",
                self.id
            );
            let sent = Instant::now();
            let result = tokio::select! {
                r = client.simple_query(&sql) => r.map_err(|e| e.to_string()),
                _ = self.phase.wait_for(|p| *p == Phase::Abandon) => Err("still waiting when the load stopped".into()),
            };
            match result {
                Ok(_) => {
                    out.samples.push(Sample {
                        at_ms: ms(self.started.elapsed()),
                        latency_ms: ms(sent.elapsed()),
                        ok: true,
                    });
                    out.committed.push(seq);
                    self.live.lock().unwrap().committed.push((self.id, seq));
                    connection = Some(client);
                }
                Err(e) => {
                    self.record_failure(&mut out, sent, e);
                    self.sleep_unless_stopped(RECONNECT_DELAY).await;
                }
            }
        }
        out
    }

    fn record_failure(&self, out: &mut ClientOutcome, since: Instant, error: String) {
        let at_ms = ms(self.started.elapsed());
        out.failed += 1;
        self.live.lock().unwrap().failed += 1;
        out.samples.push(Sample {
            at_ms,
            latency_ms: ms(since.elapsed()),
            ok: false,
        });
        if out.errors.len() < KEPT_ERRORS {
            out.errors
                .push(format!("client {} at {at_ms:.0} ms: {error}", self.id));
        }
    }

    async fn sleep_unless_stopped(&mut self, d: Duration) {
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = self.phase.wait_for(|p| *p != Phase::Running) => {}
        }
    }
}

/// How many commits acknowledged to the load's clients are missing from the ledger table
/// on the server at `addr` (connect to the server itself, not only the endpoint).
pub async fn lost_commits(
    report: &LoadReport,
    addr: &Addr,
    creds: &Credentials,
    database: &str,
) -> anyhow::Result<u64> {
    missing(&report.ledger, addr, creds, database).await
}

async fn missing(
    ledger: &[(i32, i64)],
    addr: &Addr,
    creds: &Credentials,
    database: &str,
) -> anyhow::Result<u64> {
    let client = pg::connect(addr, creds, database).await?;
    let mut lost = 0;
    for batch in ledger.chunks(CHECK_BATCH) {
        let ids: Vec<String> = batch.iter().map(|(c, _)| c.to_string()).collect();
        let seqs: Vec<String> = batch.iter().map(|(_, s)| s.to_string()).collect();
        let sql = format!(
            "SELECT count(*) FROM unnest('{{{}}}'::int[], '{{{}}}'::bigint[]) AS c(client, seq) \
             WHERE NOT EXISTS (SELECT 1 FROM {LEDGER_TABLE} l WHERE l.client = c.client AND l.seq = c.seq)",
            ids.join(","),
            seqs.join(",")
        );
        let rows = client.simple_query(&sql).await?;
        let count = rows
            .iter()
            .find_map(|m| match m {
                SimpleQueryMessage::Row(r) => r.get(0).and_then(|v| v.parse::<u64>().ok()),
                _ => None,
            })
            .ok_or_else(|| anyhow::anyhow!("no count from the ledger check"))?;
        lost += count;
    }
    Ok(lost)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at_ms: f64, latency_ms: f64, ok: bool) -> Sample {
        Sample {
            at_ms,
            latency_ms,
            ok,
        }
    }

    #[test]
    fn summary_finds_the_longest_gap_and_tail_latency() {
        let mut r = LoadReport {
            duration_ms: 1000.0,
            latencies: vec![
                sample(10.0, 1.0, true),
                sample(20.0, 2.0, true),
                sample(300.0, 250.0, false),
                sample(400.0, 3.0, true),
                sample(990.0, 4.0, true),
                sample(995.0, 4.0, true),
            ],
            ..Default::default()
        };
        summarize(&mut r);
        assert_eq!(r.max_latency_ms, 250.0);
        assert_eq!(r.p99_latency_ms, 250.0);
        // 400 → 990: the failure at 300 is no commit.
        assert_eq!(r.longest_gap_ms, 590.0);
        assert_eq!(r.longest_gap_end_ms, 990.0);
    }

    #[test]
    fn percentile_is_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 1.0), 100.0);
        assert_eq!(percentile(&[], 0.99), 0.0);
    }
}
