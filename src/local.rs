//! Local mode: watch a Git branch and reconcile this machine to its `BlueGreenDatabase`.
//! Instances are local PostgreSQL processes, the endpoint a local PgBouncer, progress
//! goes to git notes on the commit (and to the forge's commit status when configured).
//! A thin loop around the shared [`Runner`]: look at the branch, take what it carries,
//! step.

use crate::plans::{PullRequestPlans, plan_context};
use pgflip_core::plan::{Member, Record};
use pgflip_core::report::Update;
use pgflip_core::spec::Desired;
use pgflip_engine::adapters::adopted::Adopting;
use pgflip_engine::adapters::forge_status::{ForgeStatus, Sinks};
use pgflip_engine::adapters::git_notes::GitNotes;
use pgflip_engine::adapters::git_source::GitSource;
use pgflip_engine::adapters::local_instances::LocalInstances;
use pgflip_engine::adapters::local_passwords::LocalPasswords;
use pgflip_engine::adapters::pgbouncer::PgBouncer;
use pgflip_engine::driver::{Driver, Progress, system_clock};
use pgflip_engine::intake;
use pgflip_engine::phases::Phases;
use pgflip_engine::ports::{Instances, Source, StatusSink};
use pgflip_engine::pull_requests::plan_update;
use pgflip_engine::runner::Runner;
use pgflip_engine::state::StateDir;
use pgflip_engine::toolchain::Toolchain;
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::watch;

#[derive(Debug, Clone)]
pub struct LocalOptions {
    /// A path to a Git repository, or a URL.
    pub repo: String,
    pub branch: String,
    /// The document's path in the repository; found by its kind when not given.
    pub file: Option<String>,
    pub state_dir: PathBuf,
    pub poll: Duration,
    /// Also post commit statuses here (context `pgflip/<metadata.name>`), and plans on
    /// the open pull requests into the branch (`pgflip/plan/<metadata.name>`).
    pub forge: Option<ForgeStatus>,
    /// How often to look at the open pull requests.
    pub plan_every: Duration,
}

pub type LocalSinks = Sinks<GitNotes, ForgeStatus>;

/// How often notes the remote did not take are pushed again (each try can take a second
/// when the remote is unreachable).
const PUSH_RETRY_EVERY: Duration = Duration::from_secs(5);
/// Servers the user lists in `spec.adopt`, else pgflip's own processes.
pub type LocalServers = Adopting<LocalInstances, LocalPasswords>;
pub type LocalSteps = Phases<LocalServers, PgBouncer>;
pub type LocalRunner = Runner<LocalSteps, StateDir, LocalSinks>;

/// Runs until `stop` turns true. Every pass: observe the branch, take a new revision (a
/// bad one gets a failure note and changes nothing), and take one step.
pub async fn run(opts: LocalOptions, mut stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    let state = StateDir::open(&opts.state_dir)?;
    let repo_cache = state.dir("repo");
    let (repo, branch, file) = (opts.repo.clone(), opts.branch.clone(), opts.file.clone());
    let mut source = tokio::task::spawn_blocking(move || {
        GitSource::open(&repo, &branch, file.as_deref(), &repo_cache)
    })
    .await??;
    let notes = GitNotes::new(source.repo_dir(), source.remote_url().map(Into::into));
    // The status context names the database; it cannot change on a running database.
    let sinks_for = |name: &str| Sinks {
        first: notes.clone(),
        second: opts
            .forge
            .as_ref()
            .map(|f| f.with_context(format!("pgflip/{name}"))),
    };
    let mut plans = opts
        .forge
        .as_ref()
        .map(|forge| PullRequestPlans::new(forge.clone(), notes.clone(), opts.plan_every));
    // Until a first valid desired state there is no runner: bad revisions are only reported.
    let mut unstarted = Some(state.load_async().await?);
    let mut runner: Option<LocalRunner> = None;
    let mut last_push_retry = std::time::Instant::now();
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        // An unreachable repository stops only the taking of new revisions: a switch
        // under way goes on (its notes are pushed once the remote is back).
        let observed = match source.observe().await {
            Ok(o) => Some(o),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "could not read the repository");
                None
            }
        };
        if last_push_retry.elapsed() >= PUSH_RETRY_EVERY {
            last_push_retry = std::time::Instant::now();
            if let Err(e) = notes.push_pending().await {
                tracing::debug!(error = %format!("{e:#}"), "the notes are not pushed yet");
            }
        }
        if runner.is_none()
            && let Some(record) = unstarted.as_mut()
            && let Some(observed) = &observed
        {
            let sinks = sinks_for(&intake::subject_name(observed, record));
            if let Err(e) = intake::take_revision(observed, record, &state, &sinks).await {
                tracing::warn!(error = %e, "could not take the revision");
            }
            if let Some(wanted) = &record.wanted {
                let desired = wanted.desired.clone();
                let record = unstarted.take().expect("checked above");
                runner = Some(Runner::new(
                    build_driver(&state, &desired, sinks_for(&desired.name)).await?,
                    record,
                ));
            }
        }
        let progress = match runner.as_mut() {
            None => Progress::Idle,
            Some(runner) => {
                let taken = match &observed {
                    Some(observed) => runner.take(observed).await,
                    None => Ok(()),
                };
                let result = match taken {
                    Ok(()) => runner.step().await,
                    Err(e) => Err(e),
                };
                result.unwrap_or_else(|e| {
                    tracing::warn!(kind = e.metric_label(), error = %e, "step failed; retrying");
                    Progress::After(opts.poll)
                })
            }
        };
        if let (Some(plans), Some(runner), Some(observed)) =
            (plans.as_mut(), runner.as_ref(), observed.as_ref())
        {
            let steps = runner.driver().steps();
            plans
                .look(&source, &opts.branch, observed, steps, runner.record())
                .await;
        }
        match progress {
            Progress::Busy => {}
            Progress::After(d) => wait(d.min(opts.poll), &mut stop).await,
            Progress::Idle => wait(opts.poll, &mut stop).await,
        }
    }
}

async fn wait(d: Duration, stop: &mut watch::Receiver<bool>) {
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = stop.changed() => {}
    }
}

async fn build_driver(
    state: &StateDir,
    desired: &Desired,
    sinks: LocalSinks,
) -> anyhow::Result<Driver<LocalSteps, StateDir, LocalSinks>> {
    Ok(Driver::new(
        build_steps(state, desired).await?,
        state.clone(),
        sinks,
        system_clock(),
    ))
}

/// The phases over this machine's instances (or the servers the document adopts) and
/// its PgBouncer endpoint.
async fn build_steps(state: &StateDir, desired: &Desired) -> anyhow::Result<LocalSteps> {
    let toolchain = Toolchain::discover().await;
    let admin = state.admin_credentials()?;
    let own = LocalInstances::new(state.clone(), toolchain.clone(), admin.clone())?;
    let instances = Adopting::new(own, LocalPasswords, admin.clone());
    let router = PgBouncer::new(
        state.clone(),
        toolchain.clone(),
        admin.clone(),
        desired.endpoint_port,
    )?;
    Ok(Phases::new(instances, router, toolchain, admin))
}

/// The plan of the document at `git_ref` of `repo` against what the state directory
/// runs (`pgflip plan`, for a CI job on the host where pgflip runs): the update it
/// makes, posted to the forge when one is given.
pub async fn plan(
    state_dir: PathBuf,
    repo: String,
    git_ref: String,
    file: Option<String>,
    forge: Option<ForgeStatus>,
) -> anyhow::Result<Update> {
    let state = StateDir::open(&state_dir)?;
    let record = state.load_async().await?;
    let Some(wanted) = &record.wanted else {
        anyhow::bail!(
            "{} runs nothing yet: nothing to plan against",
            state_dir.display()
        );
    };
    // Opened on a branch it never reads: only `git_ref` is.
    let source = GitSource::open_async(repo, "main".into(), file, state.dir("repo")).await?;
    let observed = source.read_ref(&git_ref).await?.observed()?;
    let steps = build_steps(&state, &wanted.desired).await?;
    let update = plan_update(&steps, &record, &observed).await?;
    if let Some(forge) = forge {
        forge
            .with_context(plan_context(&observed))
            .publish(&observed.revision, &update)
            .await?;
    }
    Ok(update)
}

/// What runs each member the record names, for `pgflip status`: a server the user runs
/// (`spec.adopt`), or one of pgflip's own instances and the binaries it runs from.
pub async fn describe_members(
    state: &StateDir,
    record: &Record,
) -> anyhow::Result<Vec<(Member, String)>> {
    let Some(wanted) = &record.wanted else {
        return Ok(Vec::new());
    };
    let desired = &wanted.desired;
    let toolchain = Toolchain::discover().await;
    let admin = state.admin_credentials()?;
    let servers = Adopting::new(
        LocalInstances::new(state.clone(), toolchain.clone(), admin.clone())?,
        LocalPasswords,
        admin,
    );
    let members = record
        .serving
        .into_iter()
        .chain(record.standby.as_ref().map(|s| s.member))
        .chain(record.attempt.as_ref().map(|a| a.to));
    let mut out = Vec::new();
    for member in members {
        let what = match servers.server_of(&member, desired).await {
            Ok(Some(server)) => format!("a server you run: {server} (as {})", server.user),
            Ok(None) => match servers.inner().addr(&member, desired).await? {
                Some(addr) => format!(
                    "pgflip's instance on {addr}, binaries {}",
                    toolchain
                        .server_bin(member.major.0)
                        .map_or_else(|e| format!("missing ({e})"), |p| p.display().to_string())
                ),
                None => "pgflip's instance, not created yet".to_string(),
            },
            Err(e) => format!("unknown ({e:#})"),
        };
        out.push((member, what));
    }
    Ok(out)
}

/// Stops the endpoint and every instance of a state directory.
pub async fn stop(state: &StateDir) -> anyhow::Result<()> {
    pgflip_engine::adapters::pgbouncer::stop_endpoint_async(state).await?;
    pgflip_engine::adapters::local_instances::stop_all_async(state).await
}
