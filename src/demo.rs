//! `pgflip demo`: the main job, end to end, on throw-away local instances. A Git repo with
//! a `BlueGreenDatabase` at one major, sample data, a write load through the endpoint with
//! a ledger of committed transactions; a commit to the next major, the switch, then
//! `git revert` and the switch back. Ends with a table (and optional JSON) of what the
//! clients saw.

use anyhow::{Context, bail};
use pgflip_core::plan::Record;
use pgflip_core::report::Update;
use pgflip_core::spec::{self, Major};
use pgflip_engine::adapters::git_notes::GitNotes;
use pgflip_engine::adapters::git_source::testing as git;
use pgflip_engine::load::{self, LoadConfig};
use pgflip_engine::pg::connect;
use pgflip_engine::ports::{Addr, Credentials};
use pgflip_engine::state::StateDir;
use pgflip_engine::state::blocking;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, clap::Args)]
pub struct DemoOptions {
    /// The major to start at.
    #[arg(long, default_value_t = 15)]
    pub from: u32,
    /// The major to upgrade to (and roll back from).
    #[arg(long, default_value_t = 16)]
    pub to: u32,
    /// Client connections writing through the endpoint.
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
    /// Total write rate (transactions per second) of the load.
    #[arg(long, default_value_t = 400)]
    pub rate: u32,
    /// Also write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Keep the work directory (repo, instances) instead of removing it.
    #[arg(long)]
    pub keep: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct SwitchResult {
    pub from: String,
    pub to: String,
    pub pause_ms: f64,
    pub failed_transactions: u64,
    pub lost_commits: u64,
    pub verified_tables: u64,
    /// How green got its first copy, and why (none for a switch back onto the standby).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub copy: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DemoResult {
    pub upgrade: SwitchResult,
    pub rollback: SwitchResult,
}

pub async fn run(opts: DemoOptions) -> anyhow::Result<()> {
    let work = tempfile::Builder::new().prefix("pgflip-demo-").tempdir()?;
    let root = work.path().to_path_buf();
    let keep = opts.keep;
    let result = run_in(&root, &opts).await;
    let state = StateDir::open(root.join("state"))?;
    if let Err(e) = stop(&state).await {
        eprintln!("cleanup: {e:#}");
    }
    if keep {
        let kept = work.keep();
        println!("kept {}", kept.display());
    }
    let result = result?;
    print_table(&result);
    if let Some(path) = &opts.json {
        tokio::fs::write(path, serde_json::to_string_pretty(&result)?).await?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

async fn run_in(root: &std::path::Path, opts: &DemoOptions) -> anyhow::Result<DemoResult> {
    let (from, to) = (
        Major::parse(&opts.from.to_string())?,
        Major::parse(&opts.to.to_string())?,
    );
    let repo = root.join("repo");
    tokio::fs::create_dir_all(&repo).await?;
    {
        let repo = repo.clone();
        blocking(move || {
            git::init_repo(&repo);
            Ok(())
        })
        .await?;
    }
    let port = pgflip_engine::run_as::free_port()?;
    let extra = format!(
        "databases: [app]\nendpoint:\n  port: {port}\nretainPrevious: 1h\nswitchover:\n  pauseTimeout: 2s"
    );
    let doc = |m: Major| spec::render("demo", m, &extra);
    step(&format!(
        "commit: BlueGreenDatabase demo at PostgreSQL {from}"
    ));
    commit(
        &repo,
        doc(from),
        format!("demo database at PostgreSQL {from}"),
    )
    .await?;

    let state = StateDir::open(root.join("state"))?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let local = tokio::spawn(crate::local::run(
        crate::local::LocalOptions {
            repo: repo.display().to_string(),
            branch: "main".into(),
            file: None,
            state_dir: state.root.clone(),
            poll: Duration::from_millis(300),
            forge: None,
            plan_every: Duration::from_secs(30),
        },
        stop_rx,
    ));
    let outcome = async {
        wait_for(&state, "bootstrap", Duration::from_secs(120), |r| r.serving.is_some(), None).await?;
        let endpoint = Addr { host: "127.0.0.1".into(), port };
        let admin = state.admin_credentials()?;
        let app = Credentials { user: "app".into(), password: pgflip_engine::random::token(16) };
        step("loading sample data (types, partitions, sequences, trigger, views, materialized view)");
        load_sample(&endpoint, &admin, &app).await?;
        load::prepare(&endpoint, &admin, "app").await?;
        grant(&endpoint, &admin, &app).await?;

        step(&format!("write load: {} clients, {} tx/s through the endpoint on port {port}", opts.clients, opts.rate));
        let watchdog = Watchdog::start();
        let handle = load::start(LoadConfig {
            endpoint: endpoint.clone(),
            creds: app.clone(),
            database: "app".into(),
            clients: opts.clients,
            rate_per_sec: Some(opts.rate),
        });
        tokio::time::sleep(Duration::from_secs(2)).await;

        step(&format!("commit: spec.version \"{from}\" → \"{to}\""));
        let upgrade_rev = commit(&repo, doc(to), format!("upgrade demo to PostgreSQL {to}")).await?;
        let r = wait_for(&state, "upgrade", Duration::from_secs(600), |r| r.history.len() == 1 && r.attempt.is_none(), Some((&repo, &upgrade_rev))).await?;
        let failed_up = handle.failed_so_far();
        let lost_up = handle.lost_commits(&endpoint, &admin, "app").await?;
        check_sequences(&endpoint, &app).await?;
        let up = switch_result(&r, 0, failed_up, lost_up);
        tokio::time::sleep(Duration::from_secs(2)).await;

        step(&format!("git revert {}", &upgrade_rev[..12]));
        let revert_rev = {
            let (repo, rev) = (repo.clone(), upgrade_rev.clone());
            blocking(move || Ok(git::revert(&repo, &rev))).await?
        };
        let r = wait_for(&state, "rollback", Duration::from_secs(600), |r| r.history.len() == 2 && r.attempt.is_none(), Some((&repo, &revert_rev))).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let report = handle.stop().await;
        let late = watchdog.stop();
        let lost_down = load::lost_commits(&report, &endpoint, &admin, "app").await?;
        check_sequences(&endpoint, &app).await?;
        let down = switch_result(&r, 1, report.failed - failed_up, lost_down);
        println!(
            "load: {} committed, {} failed, max latency {:.1} ms, longest gap without a commit {:.1} ms",
            report.committed, report.failed, report.max_latency_ms, report.longest_gap_ms
        );
        println!(
            "runtime: a task sleeping {} ms at a time woke at most {:.1} ms late ({:.1} s into the load); the longest gap ended {:.1} s into it",
            WATCHDOG_STEP.as_millis(),
            late.late_ms,
            late.at_ms / 1000.0,
            report.longest_gap_end_ms / 1000.0
        );
        println!("{}", gap_check(&report, opts));
        Ok(DemoResult { upgrade: up, rollback: down })
    }
    .await;
    let _ = stop_tx.send(true);
    let _ = local.await;
    outcome
}

fn switch_result(r: &Record, i: usize, failed: u64, lost: u64) -> SwitchResult {
    let h = &r.history[i];
    SwitchResult {
        from: h.from.major.to_string(),
        to: h.to.major.to_string(),
        pause_ms: (h.pause_ms * 10.0).round() / 10.0,
        failed_transactions: failed,
        lost_commits: lost,
        verified_tables: h.verified_tables,
        copy: h.copy.as_ref().map(|c| c.to_string()),
    }
}

/// Waits for a condition on the record, printing phase changes and progress as they come.
async fn wait_for(
    state: &StateDir,
    what: &str,
    timeout: Duration,
    done: impl Fn(&Record) -> bool,
    notes_of: Option<(&std::path::Path, &str)>,
) -> anyhow::Result<Record> {
    let started = Instant::now();
    let mut watch = crate::watch::Watch::default();
    loop {
        let r = state.load_async().await?;
        if done(&r) {
            return Ok(r);
        }
        let mut detail = None;
        if let Some((repo, rev)) = notes_of
            && let Some(u) = read_notes(repo, rev)
                .await
                .ok()
                .and_then(|v| v.into_iter().last())
        {
            if u.state == pgflip_core::report::State::Failure {
                bail!("{what} failed: {}", u.message);
            }
            detail = Some(u.message);
        }
        watch.show(&r, detail.as_deref());
        if started.elapsed() > timeout {
            bail!("{what} did not finish within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Commits the document (git2, on the blocking pool: the load runs meanwhile).
async fn commit(repo: &Path, document: String, message: String) -> anyhow::Result<String> {
    let repo = repo.to_path_buf();
    blocking(move || {
        Ok(git::commit_file(
            &repo,
            "database.yaml",
            &document,
            &message,
        ))
    })
    .await
}

/// The updates noted on a commit (git2, on the blocking pool).
async fn read_notes(repo: &Path, revision: &str) -> anyhow::Result<Vec<Update>> {
    let (repo, revision) = (repo.to_path_buf(), revision.to_string());
    blocking(move || GitNotes::read(&repo, &revision)).await
}

/// Stops the endpoint and the instances, off the runtime's worker threads.
async fn stop(state: &StateDir) -> anyhow::Result<()> {
    pgflip_engine::adapters::pgbouncer::stop_endpoint_async(state).await?;
    pgflip_engine::adapters::local_instances::stop_all_async(state).await
}

/// How often each watchdog task wakes.
const WATCHDOG_STEP: Duration = Duration::from_millis(5);
/// Watchdog tasks: more than the runtime's worker threads, so that one of them is likely
/// queued behind whatever stalls a worker.
const WATCHDOGS: usize = 4;

/// Tasks that sleep in short steps and note how late they wake: a runtime worker thread
/// stuck in blocking work (or a machine too busy to run the process) shows as a late
/// wake-up, at a time that can be matched with the demo's phases.
struct Watchdog {
    worst: std::sync::Arc<std::sync::Mutex<Late>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Late {
    late_ms: f64,
    /// Since the watchdog started.
    at_ms: f64,
}

impl Watchdog {
    fn start() -> Watchdog {
        let worst = std::sync::Arc::new(std::sync::Mutex::new(Late::default()));
        let started = tokio::time::Instant::now();
        let tasks = (0..WATCHDOGS)
            .map(|_| {
                let worst = worst.clone();
                tokio::spawn(async move {
                    loop {
                        let asleep = tokio::time::Instant::now();
                        tokio::time::sleep(WATCHDOG_STEP).await;
                        let late = asleep.elapsed().saturating_sub(WATCHDOG_STEP);
                        let late_ms = late.as_secs_f64() * 1000.0;
                        let mut w = worst.lock().unwrap();
                        if late_ms > w.late_ms {
                            *w = Late {
                                late_ms,
                                at_ms: started.elapsed().as_secs_f64() * 1000.0,
                            };
                        }
                    }
                })
            })
            .collect();
        Watchdog { worst, tasks }
    }

    fn stop(self) -> Late {
        for t in &self.tasks {
            t.abort();
        }
        *self.worst.lock().unwrap()
    }
}

/// Whether the clients' longest stretch without a commit is explained by their own
/// transactions: while any transaction is in flight the clients wait on the database
/// (a switchover's pause shows as one slow transaction), so a gap longer than the
/// slowest transaction plus one client's tick means no client was even running: the
/// runtime was blocked. A failed transaction (a reconnect) can also explain a gap.
fn gap_check(report: &load::LoadReport, opts: &DemoOptions) -> String {
    let tick_ms = if opts.rate > 0 {
        1000.0 * opts.clients as f64 / f64::from(opts.rate)
    } else {
        0.0
    };
    // Timer granularity and waking a task: a few ms on a busy machine.
    let slack_ms = tick_ms + 10.0;
    let excess = report.longest_gap_ms - report.max_latency_ms;
    if excess <= slack_ms {
        format!(
            "runtime check: ok, the longest gap ({:.1} ms) is within the slowest transaction ({:.1} ms) plus {slack_ms:.0} ms of scheduling",
            report.longest_gap_ms, report.max_latency_ms
        )
    } else if report.failed > 0 {
        format!(
            "runtime check: the longest gap is {excess:.1} ms longer than the slowest transaction; {} failed transactions (reconnects) may explain it",
            report.failed
        )
    } else {
        format!(
            "runtime check: WARNING: the longest gap is {excess:.1} ms longer than the slowest transaction: something blocked the runtime"
        )
    }
}

async fn load_sample(
    endpoint: &Addr,
    admin: &Credentials,
    app: &Credentials,
) -> anyhow::Result<()> {
    let c = connect(endpoint, admin, "app").await?;
    c.batch_execute(include_str!("../demo/sample.sql"))
        .await
        .context("loading demo/sample.sql")?;
    c.batch_execute(&format!(
        "CREATE ROLE {} LOGIN PASSWORD {}",
        pgflip_engine::pg::ident(&app.user),
        pgflip_engine::pg::literal(&app.password)
    ))
    .await?;
    Ok(())
}

async fn grant(endpoint: &Addr, admin: &Credentials, app: &Credentials) -> anyhow::Result<()> {
    let c = connect(endpoint, admin, "app").await?;
    let u = pgflip_engine::pg::ident(&app.user);
    c.batch_execute(&format!(
        "GRANT USAGE ON SCHEMA public TO {u}; GRANT ALL ON ALL TABLES IN SCHEMA public TO {u}; GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {u};"
    ))
    .await?;
    Ok(())
}

/// New rows after a switch take fresh sequence values (no duplicate keys).
async fn check_sequences(endpoint: &Addr, app: &Credentials) -> anyhow::Result<()> {
    let c = connect(endpoint, app, "app").await?;
    c.simple_query("INSERT INTO orders (customer_id, amount) VALUES (1, 10); INSERT INTO audit_log (what) VALUES ('after switch')")
        .await
        .context("inserting after the switch (sequence collision?)")?;
    Ok(())
}

fn step(s: &str) {
    println!("==> {s}");
}

fn print_table(r: &DemoResult) {
    println!();
    println!(
        "| switch   | from → to | pause (ms) | failed transactions | lost commits | tables verified |"
    );
    println!(
        "|----------|-----------|-----------:|--------------------:|-------------:|----------------:|"
    );
    for (name, s) in [("upgrade", &r.upgrade), ("rollback", &r.rollback)] {
        println!(
            "| {name:<8} | {:>2} → {:<2}   | {:>10.1} | {:>19} | {:>12} | {:>15} |",
            s.from, s.to, s.pause_ms, s.failed_transactions, s.lost_commits, s.verified_tables
        );
    }
    if let Some(copy) = &r.upgrade.copy {
        println!("upgrade: {copy}");
    }
}
