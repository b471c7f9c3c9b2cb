//! The one binary: `local`, `plan`, `demo`, `bench`, `status`, `stop`, `crd`.

use clap::{Parser, Subcommand};
use pgflip_core::plan::Record;
use pgflip_engine::adapters::forge_status::ForgeArgs;
use pgflip_engine::state::StateDir;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "pgflip",
    version,
    about = "Blue-green PostgreSQL major-version switches driven by Git"
)]
struct Cli {
    /// Log as JSON lines instead of text.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Watch a Git branch and reconcile local PostgreSQL instances and a PgBouncer endpoint to it.
    Local {
        /// A path to a Git repository, or its URL.
        #[arg(long)]
        repo: String,
        #[arg(long, default_value = "main")]
        branch: String,
        /// The document's path in the repository (found by `kind: BlueGreenDatabase` if omitted).
        #[arg(long)]
        file: Option<String>,
        /// Where pgflip keeps its record, secrets, instances and endpoint.
        #[arg(long, default_value = ".pgflip")]
        state_dir: PathBuf,
        /// How often to look at the branch.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        poll: Duration,
        #[command(flatten)]
        forge: ForgeArgs,
        /// With --forge: how often to look at the open pull requests into the branch (each
        /// new head that changes the document gets a `pgflip/plan/<name>` status); 0s: never.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        plan_every: Duration,
    },
    /// What merging a document would do, against what runs now, read-only: for a CI job on
    /// the host where pgflip runs. Exits non-zero when the switch would be refused.
    Plan {
        /// A path to the Git repository, or its URL.
        #[arg(long)]
        repo: String,
        /// The ref to plan: `refs/pull/7/head`, `refs/heads/bump-to-17`.
        #[arg(long = "ref")]
        git_ref: String,
        /// The document's path (found by `kind: BlueGreenDatabase` if omitted).
        #[arg(long)]
        file: Option<String>,
        #[arg(long, default_value = ".pgflip")]
        state_dir: PathBuf,
        /// Also post the plan as a commit status (`pgflip/plan/<name>`).
        #[command(flatten)]
        forge: ForgeArgs,
    },
    /// Show the active color and version, the phase and the history of switches.
    Status {
        #[arg(long, default_value = ".pgflip")]
        state_dir: PathBuf,
        /// Print the full record as JSON.
        #[arg(long)]
        json: bool,
        /// Follow an attempt live (phases, bytes copied, rate, time left) until it ends.
        #[arg(long, conflicts_with = "json")]
        watch: bool,
    },
    /// Stop the instances and the endpoint of a state directory (they outlive `pgflip local`).
    Stop {
        #[arg(long, default_value = ".pgflip")]
        state_dir: PathBuf,
    },
    /// A real upgrade and rollback on throw-away local instances, under a write load.
    Demo(pgflip::demo::DemoOptions),
    /// Measure a switch under load against dump/restore and pg_upgrade, per database size.
    #[cfg(feature = "bench")]
    Bench(pgflip_bench::BenchOptions),
    /// Print the BlueGreenDatabase CustomResourceDefinition (as in manifests/crd.yaml).
    Crd,
    /// Kubernetes mode: reconcile every BlueGreenDatabase in the cluster (leader-elected).
    Controller(pgflip_k8s::controller::ControllerOptions),
    /// The process of a database's endpoint pod: runs PgBouncer and takes new targets
    /// from the controller (started by the endpoint Deployment, not by hand).
    Endpoint,
}

/// Turns true on Ctrl-C or SIGTERM (what Kubernetes sends a pod it stops).
fn stop_signal() -> tokio::sync::watch::Receiver<bool> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
        let _ = tx.send(true);
    });
    rx
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The demo and the benchmark print their own progress; logs would drown it.
    let default_level = match cli.command {
        Command::Demo(_) => "warn",
        #[cfg(feature = "bench")]
        Command::Bench(_) => "warn",
        _ => "info",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| default_level.into());
    if cli.log_json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    } else {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    }
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        match cli.command {
            Command::Local {
                repo,
                branch,
                file,
                state_dir,
                poll,
                forge,
                plan_every,
            } => {
                let forge = forge.sink()?;
                let rx = stop_signal();
                pgflip::local::run(
                    pgflip::local::LocalOptions {
                        repo,
                        branch,
                        file,
                        state_dir,
                        poll,
                        forge,
                        plan_every,
                    },
                    rx,
                )
                .await
            }
            Command::Plan {
                repo,
                git_ref,
                file,
                state_dir,
                forge,
            } => {
                let update =
                    pgflip::local::plan(state_dir, repo, git_ref, file, forge.sink()?).await?;
                print!("{}", update.report.as_deref().unwrap_or(""));
                match update.state {
                    pgflip_core::report::State::Failure => anyhow::bail!("{}", update.message),
                    _ => Ok(()),
                }
            }
            Command::Status {
                state_dir,
                json,
                watch,
            } => {
                let state = StateDir::open(state_dir)?;
                if watch {
                    watch_attempt(&state).await?;
                }
                let record = state.load_async().await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&record)?);
                } else {
                    print!("{}", render_status(&record));
                    for (member, what) in pgflip::local::describe_members(&state, &record).await? {
                        println!("{}: {what}", member.color);
                    }
                }
                Ok(())
            }
            Command::Stop { state_dir } => pgflip::local::stop(&StateDir::open(state_dir)?).await,
            Command::Demo(opts) => pgflip::demo::run(opts).await,
            #[cfg(feature = "bench")]
            Command::Bench(opts) => pgflip_bench::run(opts).await,
            Command::Crd => {
                print!("{}", pgflip_k8s::crd::crd_yaml());
                Ok(())
            }
            Command::Controller(opts) => pgflip_k8s::controller::run(opts, stop_signal()).await,
            Command::Endpoint => pgflip_k8s::endpoint::run_pod(stop_signal()).await,
        }
    })
}

/// Shows the attempt under way until it ends (nothing when none is).
async fn watch_attempt(state: &StateDir) -> anyhow::Result<()> {
    let mut watch = pgflip::watch::Watch::default();
    loop {
        let record = state.load_async().await?;
        if record.attempt.is_none() {
            return Ok(());
        }
        watch.show(&record, None);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn render_status(r: &Record) -> String {
    let mut out = String::new();
    match r.serving {
        Some(m) => out.push_str(&format!("serving:  {} (PostgreSQL {})\n", m.color, m.major)),
        None => out.push_str("serving:  nothing yet\n"),
    }
    if let Some(s) = &r.standby {
        let left = s
            .retain_until_ms
            .saturating_sub(pgflip_engine::clock::now_ms())
            / 1000;
        out.push_str(&format!(
            "standby:  {} (PostgreSQL {}) in reverse sync, retained {left}s more\n",
            s.member.color, s.member.major
        ));
    }
    match &r.attempt {
        Some(a) => out.push_str(&format!(
            "phase:    {} ({} → {}, revision {})\n",
            a.phase,
            a.from.major,
            a.to.major,
            a.revision.short()
        )),
        None => out.push_str("phase:    idle\n"),
    }
    if let Some(copy) = r.attempt.as_ref().and_then(|a| a.copy.as_ref()) {
        out.push_str(&format!("copy:     {copy}\n"));
    }
    if let Some(p) = r.attempt.as_ref().and_then(|a| a.progress) {
        out.push_str(&format!("progress: {p}\n"));
    }
    if let Some(rev) = &r.failed_revision {
        out.push_str(&format!(
            "failed:   revision {} (not retried until a new commit): {}\n",
            rev.short(),
            r.failed_reason
                .as_deref()
                .unwrap_or("see the commit's notes")
        ));
    }
    out.push_str("history:\n");
    if r.history.is_empty() {
        out.push_str("  (no switches yet)\n");
    }
    for h in &r.history {
        out.push_str(&format!(
            "  {} {} → {}  pause {:.1} ms  total {:.1} s  {} tables verified  revision {}\n",
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + Duration::from_millis(h.finished_ms)
            ),
            h.from,
            h.to,
            h.pause_ms,
            h.total_ms as f64 / 1000.0,
            h.verified_tables,
            h.revision.short()
        ));
        if let Some(copy) = &h.copy {
            out.push_str(&format!("    {copy}\n"));
        }
    }
    out
}
