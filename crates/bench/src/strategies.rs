//! The three ways to move the same database to a new major, each run on its own
//! environment with the same data and the same clients:
//!
//! - **pgflip**: commit the new version, let `pgflip local` switch, then `git revert`.
//! - **conventional**: stop traffic (PgBouncer `PAUSE`), `pg_dump | psql` into a server of
//!   the new major, compare row counts, point the endpoint at it, resume.
//! - **in-place**: stop traffic, stop the server, `pg_upgrade --link`, start the new
//!   server, point the endpoint at it, resume (what Kubernetes operators do offline).
//!
//! For the two offline strategies the new server is created (initdb) before traffic
//! stops, which is as generous to them as it can be: their downtime is only the work that
//! cannot happen while the old server takes writes.

use super::env::{DATABASE, Env};
use super::timeline::{PhaseMark, PhaseWatch, Stall, phase_at};
use super::traffic::{Traffic, Window};
use anyhow::{Context, bail};
use pgflip_core::plan::{Color, Member, SwitchMeasurement};
use pgflip_core::spec::{Desired, Major};
use pgflip_engine::adapters::local_instances::LocalInstances;
use pgflip_engine::adapters::pgbouncer::PgBouncer;
use pgflip_engine::pg::connect;
use pgflip_engine::ports::Addr;
use pgflip_engine::ports::Instances;
use pgflip_engine::ports::Router;
use pgflip_engine::run_as::{RunAs, run_async};
use pgflip_engine::toolchain::Toolchain;
use serde::Serialize;
use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// Clients run this long before the change and after it, inside the measured window.
const SETTLE: Duration = Duration::from_secs(3);
/// The window measured around a switch starts this long before it and ends this long after.
const MARGIN_MS: f64 = 1000.0;
/// A switch (and the offline strategies' downtime) may take this long at most.
const SWITCH_TIMEOUT: Duration = Duration::from_secs(3 * 3600);

#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub rate: u32,
    pub clients: u32,
}

/// What one strategy measured at one size.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Measured {
    /// The longest a client transaction waited around the change: the downtime clients saw.
    pub downtime_ms: f64,
    /// Over the whole run (for pgflip: the upgrade and the rollback).
    pub failed_transactions: u64,
    pub lost_commits: u64,
    pub clients: Window,
    /// Offline strategies: from stopping traffic to resuming it, measured server-side.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_to_resume_ms: Option<f64>,
    #[serde(flatten)]
    pub pgflip: Option<PgflipDetail>,
    /// Latency around the change, per 20 ms: (ms from its start, the bucket's max latency).
    pub series: Vec<(f64, f64)>,
    /// Conventional: MB/s of the dump and restore, and its seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dump_restore_mb_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dump_restore_s: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct PgflipDetail {
    pub pause_ms: f64,
    pub rollback_pause_ms: f64,
    pub rollback_downtime_ms: f64,
    /// The clients from the commit to the end of the switch, copy and verification included.
    pub whole_attempt: Window,
    /// The same from the revert on (preflight, catch-up, verification, the switch back).
    pub rollback_whole_attempt: Window,
    /// The slowest transaction of each attempt and the phase it waited in.
    pub worst_stall: Stall,
    pub rollback_worst_stall: Stall,
    pub pause_breakdown: SwitchMeasurement,
    pub rollback_pause_breakdown: SwitchMeasurement,
    pub timings_ms: BTreeMap<String, u64>,
    pub rollback_timings_ms: BTreeMap<String, u64>,
    /// When each phase began, in ms from the upgrade's commit (polled from the record).
    pub phase_timeline: Vec<PhaseMark>,
    /// How green got its first copy: `logical` or `physical`.
    pub copy_method: String,
    /// From the start of Provision until every table streams (the base backup, replay and
    /// pg_upgrade of a physical copy; the schema load and table copy of a logical one).
    pub initial_sync_s: f64,
    pub initial_sync_mb_s: f64,
    /// The slowest client transaction from the upgrade's commit to the end of its switch.
    pub attempt_max_latency_ms: f64,
    /// Client p99 in the 60 s before the pause began, and after the switch until the revert
    /// (at most 60 s).
    pub p99_before_ms: f64,
    pub p99_after_ms: f64,
    pub verify_s: f64,
    pub verify_mb_s: f64,
    /// A plain sequential read of the same tables under the same load (`COPY t TO STDOUT`,
    /// discarded).
    pub sequential_scan_mb_s: f64,
    pub controller_peak_rss_mib: Option<f64>,
    /// Conventional's and in-place's downtime over pgflip's, at the same size.
    pub ratio_vs_conventional: Option<f64>,
    pub ratio_vs_in_place: Option<f64>,
}

/// pgflip: the upgrade by commit, then the rollback by revert, under the same clients.
pub async fn pgflip(env: &mut Env, to: Major, load: Load) -> anyhow::Result<Measured> {
    let blue = env.instance_addr(Color::Blue)?;
    let bytes = env.table_bytes(&blue).await? as f64;
    let traffic = Traffic::start(env, load.rate, load.clients)?;
    Traffic::settle(SETTLE).await;
    // The baseline for verification, read under the same client load.
    let scan_mb_s = sequential_scan_mb_s(env, &blue).await?;

    let watch = PhaseWatch::start(env.state.clone());
    let committed = pgflip_engine::clock::now_ms() as f64;
    let upgrade = env.commit(to, "upgrade");
    let (up_from, up_to) = switch_window(env, 1).await?;
    Traffic::settle(SETTLE).await;
    let reverted = pgflip_engine::clock::now_ms() as f64;
    env.revert(&upgrade);
    let (down_from, down_to) = switch_window(env, 2).await?;
    let phases = watch.stop().await;
    Traffic::settle(SETTLE).await;
    let rss = env.controller_peak_rss_mib();
    let outcome = traffic.stop(env).await?;
    let record = env.record()?;
    let (up, down) = (&record.history[0], &record.history[1]);

    let up_window = outcome.window(up_from - MARGIN_MS, up_to + MARGIN_MS);
    let down_window = outcome.window(down_from - MARGIN_MS, down_to + MARGIN_MS);
    // From the commit on: the copy and the verification compete with the clients for the
    // machine, and the verification's snapshot holds writes for a moment.
    let attempt = outcome.window(committed, up_to + MARGIN_MS);
    let rollback_attempt = outcome.window(reverted, down_to + MARGIN_MS);
    let stall = |w: &Window, since: f64| {
        let midway = w.max_latency_at_ms - w.max_latency_ms / 2.0;
        Stall {
            latency_ms: w.max_latency_ms,
            completed_after_commit_ms: w.max_latency_at_ms - since,
            phase: phase_at(&phases, midway),
        }
    };
    let phase_s = |p: &str| up.timings_ms.get(p).copied().unwrap_or(0) as f64 / 1000.0;
    let sync_s = ["provision", "copy-schema", "replicate", "initial-sync"]
        .into_iter()
        .map(phase_s)
        .sum::<f64>();
    let verify_s = phase_s("verify");
    Ok(Measured {
        downtime_ms: up_window.max_latency_ms,
        failed_transactions: outcome.failed(),
        lost_commits: outcome.lost_commits(env, &blue).await?,
        series: outcome.latency_series(up_from, up_from - 5000.0, up_to + 5000.0, 20.0),
        clients: up_window,
        stop_to_resume_ms: None,
        dump_restore_mb_s: None,
        dump_restore_s: None,
        pgflip: Some(PgflipDetail {
            pause_ms: up.pause_ms,
            rollback_pause_ms: down.pause_ms,
            rollback_downtime_ms: down_window.max_latency_ms,
            attempt_max_latency_ms: attempt.max_latency_ms,
            p99_before_ms: outcome.window(up_from - 60_000.0, up_from).p99_latency_ms,
            p99_after_ms: outcome
                .window(up_to, reverted.min(up_to + 60_000.0))
                .p99_latency_ms,
            copy_method: up
                .copy
                .as_ref()
                .map_or("logical", |c| c.method.as_str())
                .to_string(),
            worst_stall: stall(&attempt, committed),
            rollback_worst_stall: stall(&rollback_attempt, reverted),
            whole_attempt: attempt,
            rollback_whole_attempt: rollback_attempt,
            pause_breakdown: up.pause_breakdown.clone(),
            rollback_pause_breakdown: down.pause_breakdown.clone(),
            timings_ms: up.timings_ms.clone(),
            rollback_timings_ms: down.timings_ms.clone(),
            phase_timeline: phases
                .iter()
                .map(|m| PhaseMark {
                    at_ms: m.at_ms - committed,
                    phase: m.phase.clone(),
                })
                .collect(),
            initial_sync_s: sync_s,
            initial_sync_mb_s: mb(bytes) / sync_s.max(0.001),
            verify_s,
            verify_mb_s: mb(bytes) / verify_s.max(0.001),
            sequential_scan_mb_s: scan_mb_s,
            controller_peak_rss_mib: rss,
            ratio_vs_conventional: None,
            ratio_vs_in_place: None,
        }),
    })
}

/// Waits for switch number `n` to finish; returns when its switchover phase began and
/// when the switch was done (Unix ms), as seen by polling the record. The downtime is
/// measured around this, as the offline strategies' is around their stop and resume.
async fn switch_window(env: &Env, n: usize) -> anyhow::Result<(f64, f64)> {
    let r = env
        .wait("the switch to begin", SWITCH_TIMEOUT, |r| {
            r.history.len() >= n
                || r.attempt
                    .as_ref()
                    .is_some_and(|a| a.phase >= pgflip_core::plan::Phase::Switchover)
        })
        .await?;
    let begun = pgflip_engine::clock::now_ms() as f64;
    let r = if r.history.len() >= n {
        r
    } else {
        env.wait("the switch", SWITCH_TIMEOUT, |r| r.history.len() >= n)
            .await?
    };
    let done = r.history[n - 1].finished_ms as f64;
    Ok((begun.min(done), done))
}

/// The desired state pgflip last took (the offline strategies act on the same database).
fn wanted_state(env: &Env) -> anyhow::Result<Desired> {
    Ok(env
        .record()?
        .wanted
        .context("pgflip has taken no desired state yet")?
        .desired)
}

/// The conventional offline upgrade: dump and restore while clients wait.
pub async fn conventional(env: &mut Env, to: Major, load: Load) -> anyhow::Result<Measured> {
    let (instances, router, toolchain) = offline_parts(env)?;
    let blue = env.instance_addr(Color::Blue)?;
    let bytes = env.table_bytes(&blue).await? as f64;
    let desired = wanted_state(env)?;
    let green = instances
        .ensure(
            &Member {
                color: Color::Green,
                major: to,
            },
            &desired,
        )
        .await?;
    let mut copy_s = 0.0;
    let mut m = offline(env, &router, &desired, &green, load, async |env: &Env| {
        let copy = Instant::now();
        dump_and_restore(env, &toolchain, &blue, &green).await?;
        copy_s = copy.elapsed().as_secs_f64();
        compare_counts(env, &blue, &green).await
    })
    .await?;
    m.dump_restore_mb_s = Some(mb(bytes) / f64::max(copy_s, 0.001));
    m.dump_restore_s = Some(copy_s);
    Ok(m)
}

/// The in-place offline upgrade: `pg_upgrade --link` while clients wait.
pub async fn in_place(env: &mut Env, to: Major, load: Load) -> anyhow::Result<Measured> {
    let (instances, router, toolchain) = offline_parts(env)?;
    let from = env.record()?.serving.context("nothing serves")?;
    // The new cluster, made and stopped beforehand: pg_upgrade fills it.
    let new = Member {
        color: Color::Green,
        major: to,
    };
    let desired = wanted_state(env)?;
    let green = instances.ensure(&new, &desired).await?;
    let run_as = RunAs::detect()?;
    let instance_dir = |c: Color| env.state.dir("instances").join(c.as_str());
    // Through tokio::process: the ledger clients run on this runtime meanwhile.
    let pg_ctl = |major: Major, color: Color, verb: &str| -> anyhow::Result<_> {
        let mut cmd = run_as.command(&toolchain.server_bin(major.0)?.join("pg_ctl"));
        cmd.arg(verb)
            .arg("-D")
            .arg(instance_dir(color).join("data"))
            .arg("-l")
            .arg(instance_dir(color).join("server.log"))
            .args(["-m", "fast", "-w", "-t", "300"]);
        Ok(run_async(cmd))
    };
    pg_ctl(to, Color::Green, "stop")?.await?;
    let mut upgrade = run_as.command(&toolchain.upgrade_bin(to.0)?.join("pg_upgrade"));
    upgrade
        .current_dir(instance_dir(Color::Green))
        .arg("-b")
        .arg(toolchain.server_bin(from.major.0)?)
        .arg("-B")
        .arg(toolchain.upgrade_bin(to.0)?)
        .arg("-d")
        .arg(instance_dir(Color::Blue).join("data"))
        .arg("-D")
        .arg(instance_dir(Color::Green).join("data"))
        .args(["--link", "-U", &env.admin.user]);
    offline(env, &router, &desired, &green, load, async |_: &Env| {
        pg_ctl(from.major, Color::Blue, "stop")?.await?;
        run_async(upgrade).await.context("pg_upgrade --link")?;
        pg_ctl(to, Color::Green, "start")?.await?;
        Ok(())
    })
    .await
}

/// Runs clients, stops them at the endpoint, does `downtime_work`, points the endpoint
/// at `new_server` and resumes; measures what the clients saw.
async fn offline(
    env: &Env,
    router: &PgBouncer,
    desired: &Desired,
    new_server: &Addr,
    load: Load,
    downtime_work: impl AsyncFnOnce(&Env) -> anyhow::Result<()>,
) -> anyhow::Result<Measured> {
    let traffic = Traffic::start(env, load.rate, load.clients)?;
    Traffic::settle(SETTLE).await;
    let stop_ms = pgflip_engine::clock::now_ms() as f64;
    let started = Instant::now();
    router.pause(SWITCH_TIMEOUT).await?;
    downtime_work(env).await?;
    router.repoint(desired, new_server).await?;
    router.resume().await?;
    let stop_to_resume_ms = started.elapsed().as_secs_f64() * 1000.0;
    let resumed_ms = pgflip_engine::clock::now_ms() as f64;
    Traffic::settle(SETTLE).await;
    let outcome = traffic.stop(env).await?;
    let window = outcome.window(stop_ms - MARGIN_MS, resumed_ms + MARGIN_MS);
    Ok(Measured {
        // Clients send throughout, so one waits the whole stop — unless PgBouncer gave up
        // on it first (`query_wait_timeout`, 120 s by default: a 5 GB dump and restore
        // takes longer) and it failed: then the latencies of those that succeeded miss
        // the outage, and the stop itself is what clients saw.
        downtime_ms: window.max_latency_ms.max(stop_to_resume_ms),
        failed_transactions: outcome.failed(),
        lost_commits: outcome.lost_commits(env, new_server).await?,
        series: outcome.latency_series(stop_ms, stop_ms - 5000.0, resumed_ms + 5000.0, 20.0),
        clients: window,
        stop_to_resume_ms: Some(stop_to_resume_ms),
        pgflip: None,
        dump_restore_mb_s: None,
        dump_restore_s: None,
    })
}

/// The adapters the offline strategies drive by hand, once pgflip's controller is gone
/// (it bootstrapped blue and the endpoint; they outlive it).
fn offline_parts(env: &mut Env) -> anyhow::Result<(LocalInstances, PgBouncer, Toolchain)> {
    env.stop_controller();
    let toolchain = env.toolchain.clone();
    let instances = LocalInstances::new(env.state.clone(), toolchain.clone(), env.admin.clone())?;
    let router = PgBouncer::new(
        env.state.clone(),
        toolchain.clone(),
        env.admin.clone(),
        env.endpoint.port,
    )?;
    Ok((instances, router, toolchain))
}

/// Roles, then the database: `pg_dumpall --roles-only | psql` and `pg_dump | psql`, with
/// the client tools of the newer major.
async fn dump_and_restore(
    env: &Env,
    toolchain: &Toolchain,
    from: &Addr,
    to: &Addr,
) -> anyhow::Result<()> {
    let (_, bin) = toolchain.client_bin(17)?;
    let admin = connect(to, &env.admin, "postgres").await?;
    admin
        .batch_execute(&format!(
            "CREATE DATABASE {}",
            pgflip_engine::pg::ident(DATABASE)
        ))
        .await?;
    let pipe = |dump: Vec<String>, db: &str| -> anyhow::Result<()> {
        let tool = |name: &str, addr: &Addr| {
            let mut c = std::process::Command::new(bin.join(name));
            c.args([
                "-h",
                &addr.host,
                "-p",
                &addr.port.to_string(),
                "-U",
                &env.admin.user,
            ])
            .env("PGPASSWORD", &env.admin.password);
            if let Some(lib) = pgflip_engine::toolchain::lib_dir(&bin) {
                c.env("LD_LIBRARY_PATH", lib);
            }
            c
        };
        let mut dumper = tool(&dump[0], from)
            .args(&dump[1..])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let restore = tool("psql", to)
            .args(["-q", "-v", "ON_ERROR_STOP=0", "-d", db])
            .stdin(dumper.stdout.take().context("dump output")?)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?;
        let dumped = dumper.wait_with_output()?;
        if !dumped.status.success() || !restore.success() {
            bail!(
                "{} | psql failed: {}",
                dump[0],
                String::from_utf8_lossy(&dumped.stderr).trim()
            );
        }
        Ok(())
    };
    tokio::task::block_in_place(|| {
        pipe(vec!["pg_dumpall".into(), "--roles-only".into()], "postgres")?;
        pipe(
            vec![
                "pg_dump".into(),
                "--no-publications".into(),
                "-d".into(),
                DATABASE.into(),
            ],
            DATABASE,
        )
    })
}

/// The conventional strategy's verification: every table's row count on both sides.
async fn compare_counts(env: &Env, a: &Addr, b: &Addr) -> anyhow::Result<()> {
    let tables = [
        "pgbench_accounts",
        "pgbench_branches",
        "pgbench_tellers",
        "pgbench_history",
        pgflip_engine::load::LEDGER_TABLE,
    ];
    let (ca, cb) = (
        connect(a, &env.admin, DATABASE).await?,
        connect(b, &env.admin, DATABASE).await?,
    );
    for t in tables {
        let sql = format!("SELECT count(*) FROM {}", pgflip_engine::pg::ident(t));
        let (x, y): (i64, i64) = (
            ca.query_one(&sql, &[]).await?.get(0),
            cb.query_one(&sql, &[]).await?.get(0),
        );
        if x != y {
            bail!("{t}: {x} rows before, {y} after the restore");
        }
    }
    Ok(())
}

/// Reads every table once as COPY text and throws it away: the speed verification is
/// compared with. (pgbench's tables are ordinary tables; a partitioned one would need a
/// query.)
async fn sequential_scan_mb_s(env: &Env, addr: &Addr) -> anyhow::Result<f64> {
    use futures_util::StreamExt;
    let c = connect(addr, &env.admin, DATABASE).await?;
    let bytes = env.table_bytes(addr).await? as f64;
    let started = Instant::now();
    for t in pgflip_engine::verify::list_tables(&c).await? {
        let copy = format!(
            "COPY {} TO STDOUT",
            pgflip_engine::pg::qualified(&t.0, &t.1)
        );
        let stream = c.copy_out(&copy).await?;
        let mut stream = std::pin::pin!(stream);
        while let Some(chunk) = stream.next().await {
            chunk?;
        }
    }
    Ok(mb(bytes) / started.elapsed().as_secs_f64().max(0.001))
}

fn mb(bytes: f64) -> f64 {
    bytes / 1_000_000.0
}
