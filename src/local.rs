//! Local mode: watch a Git branch and reconcile this machine to its `BlueGreenDatabase`.
//! Instances are local PostgreSQL processes, the endpoint a local PgBouncer, progress
//! goes to git notes on the commit (and to the forge's commit status when configured).

use crate::adapters::Source;
use crate::adapters::forge_status::{ForgeStatus, Sinks};
use crate::adapters::git_notes::GitNotes;
use crate::adapters::git_source::GitSource;
use crate::adapters::local_instances::LocalInstances;
use crate::adapters::pgbouncer::PgBouncer;
use crate::core::plan::Wanted;
use crate::core::spec::{self, Desired};
use crate::engine::intake;
use crate::engine::reconcile::{Engine, Progress};
use crate::state::StateDir;
use crate::toolchain::Toolchain;
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
    /// Also post commit statuses here (context `pgflip/<metadata.name>`).
    pub forge: Option<ForgeStatus>,
}

pub type LocalSinks = Sinks<GitNotes, ForgeStatus>;
pub type LocalEngine = Engine<LocalInstances, PgBouncer, LocalSinks, StateDir>;

/// Runs until `stop` turns true. Every pass: observe the branch, take a new revision's
/// document if it is valid (a bad one gets a failure note and changes nothing), and run
/// steps until there is nothing to do.
pub async fn run(opts: LocalOptions, mut stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    let state = StateDir::open(&opts.state_dir)?;
    let mut source = GitSource::open(
        &opts.repo,
        &opts.branch,
        opts.file.as_deref(),
        &state.dir("repo"),
    )?;
    let notes = GitNotes::new(source.repo_dir(), source.remote_url().map(Into::into));
    // The status context names the database; it cannot change on a running database.
    let sinks_for = |name: &str| Sinks {
        first: notes.clone(),
        second: opts
            .forge
            .as_ref()
            .map(|f| f.with_context(format!("pgflip/{name}"))),
    };
    let mut record = state.load()?;
    let mut engine: Option<LocalEngine> = None;
    let mut adopted = false;
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        let busy = match source.observe().await {
            Ok(observed) => {
                let sinks = sinks_for(&intake::subject_name(&observed, &record));
                intake::take_revision(&observed, &mut record, &state, &sinks).await?;
                match record.desired.clone() {
                    Some(d) => {
                        let desired =
                            spec::parse(&d.document).expect("a stored document was valid");
                        let engine = match &engine {
                            Some(e) => e,
                            None => engine.insert(build_engine(
                                &state,
                                &desired,
                                sinks_for(&desired.name),
                            )?),
                        };
                        if !adopted {
                            // Instances and the endpoint outlive pgflip: start or adopt them.
                            match engine.adopt(&record, &desired).await {
                                Ok(()) => adopted = true,
                                Err(e) => {
                                    tracing::warn!(error = %format!("{e:#}"), "could not adopt the instances; retrying")
                                }
                            }
                        }
                        let wanted = Wanted {
                            revision: &d.revision,
                            desired: &desired,
                        };
                        match engine.reconcile(&mut record, &wanted).await {
                            Ok(p) => p == Progress::Busy,
                            Err(e) => {
                                tracing::warn!(error = %format!("{e:#}"), "reconcile failed; retrying");
                                false
                            }
                        }
                    }
                    None => false,
                }
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "could not read the repository");
                false
            }
        };
        if !busy {
            tokio::select! {
                _ = tokio::time::sleep(opts.poll) => {}
                _ = stop.changed() => {}
            }
        }
    }
}

fn build_engine(
    state: &StateDir,
    desired: &Desired,
    sinks: LocalSinks,
) -> anyhow::Result<LocalEngine> {
    let toolchain = Toolchain::discover();
    let admin = state.admin_credentials()?;
    let instances = LocalInstances::new(state.clone(), toolchain.clone(), admin.clone())?;
    let router = PgBouncer::new(
        state.clone(),
        toolchain.clone(),
        admin.clone(),
        desired.endpoint_port,
    )?;
    Ok(Engine::new(
        instances,
        router,
        sinks,
        state.clone(),
        toolchain,
        admin,
    ))
}

/// Stops the endpoint and every instance of a state directory.
pub async fn stop(state: &StateDir) -> anyhow::Result<()> {
    crate::adapters::pgbouncer::stop_endpoint(state)?;
    crate::adapters::local_instances::stop_all(state)
}
