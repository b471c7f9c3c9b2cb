//! `pgflip controller`: Kubernetes mode. A kube-runtime controller over
//! `BlueGreenDatabase` objects that runs, for each, the same engine as local mode, with
//! StatefulSets as instances ([`super::instances`]), a PgBouncer Deployment as the endpoint
//! ([`super::endpoint`]), a ConfigMap as the journal ([`super::journal`]) and the Flux
//! Kustomization that applied the object as the source of the revision ([`super::flux`]).
//!
//! One reconcile: read the Kustomization, then the object (in that order: Flux applies
//! before it reports, so an object read after a revision is at least that revision's) →
//! take a new revision's spec (a bad one: Stalled, a failure on the commit, nothing
//! touched) → run engine steps for up to a couple of seconds → write status, annotations.
//! Nothing waits inside a reconcile: a pod not Ready yet, a claim not gone yet is
//! [`NotReady`](pgflip_engine::ports::NotReady), and the object is looked at again shortly.
//! A deleted object is forgotten (its engine and the endpoint's console session dropped);
//! its data is not touched.
//! Only the lease holder reconciles; a controller that loses its lease stops at once,
//! which the engine survives like a kill.

use super::crd::BlueGreenDatabase;
use super::endpoint::KubeEndpoint;
use super::instances::KubeInstances;
use super::journal::ConfigMapJournal;
use super::leader::LeaderElection;
use super::metrics::Metrics;
use super::secrets::SecretPasswords;
use anyhow::Context;
use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Service;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::Reporter;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use pgflip_core::plan::Record;
use pgflip_engine::adapters::adopted::Adopting;
use pgflip_engine::adapters::forge_status::{ForgeArgs, ForgeStatus};
use pgflip_engine::driver::Progress;
use pgflip_engine::error::EngineError;
use pgflip_engine::phases::Phases;
use pgflip_engine::ports::Observed;
use pgflip_engine::runner::Runner;
use pgflip_engine::toolchain::Toolchain;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod database;
mod origin;
mod plans;
mod publish;
mod sinks;

use origin::{origin, waiting_for_flux};
use plans::PullRequestPlans;
use publish::publish_status;
pub use sinks::{KubeEvents, KubeSinks};

#[derive(Debug, Clone, clap::Args)]
pub struct ControllerOptions {
    /// The endpoint pods' image: pgflip's own, which carries PgBouncer.
    #[arg(
        long,
        env = "PGFLIP_ENDPOINT_IMAGE",
        default_value = "ghcr.io/pgflip/pgflip:0.1.0"
    )]
    pub endpoint_image: String,
    /// Where /metrics, /healthz and /readyz are served. An IPv6 address may come without
    /// brackets (`fd00::7:8080`), as `$(POD_IP):8080` expands to in an IPv6 cluster.
    #[arg(long, default_value = "0.0.0.0:8080", value_parser = parse_listen_addr)]
    pub metrics_addr: SocketAddr,
    /// The namespace of the leader-election Lease (the controller's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "pgflip-system")]
    pub lease_namespace: String,
    /// This replica's name in the Lease.
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// How long a lease lasts unrenewed: how soon a replica takes over from a dead leader.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    pub lease_duration: Duration,
    /// Commit statuses on a forge (context `pgflip/<namespace>/<name>`), for objects
    /// applied by Flux from a Git commit.
    #[command(flatten)]
    pub forge: ForgeArgs,
    /// With --forge: how often to look at each object's open pull requests (into the
    /// branch its Flux GitRepository follows); a head that changes the object's document
    /// gets a `pgflip/plan/<namespace>/<name>` status. 0s: never.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub plan_every: Duration,
}

/// How long one reconcile runs engine steps before it lets go (other objects, status).
const STEPS_PER_RECONCILE: Duration = Duration::from_secs(2);
/// When to look again with nothing to do: lag metrics, standby retention.
const IDLE_REQUEUE: Duration = Duration::from_secs(10);

/// Servers the user lists in `spec.adopt`, else the colors' StatefulSets.
type KubeServers = Adopting<KubeInstances, SecretPasswords>;
type KubeSteps = Phases<KubeServers, KubeEndpoint>;
type KubeRunner = Runner<KubeSteps, ConfigMapJournal, KubeSinks>;

/// One database's runner, kept between reconciles: the endpoint's console session stays
/// open, so a pause costs one round trip.
struct Database {
    /// The object it was made for: one deleted and created again under its name is new.
    uid: Option<String>,
    runner: tokio::sync::Mutex<KubeRunner>,
}

/// What every reconcile shares: the client, options, metrics, and the databases seen.
struct Shared {
    client: kube::Client,
    options: ControllerOptions,
    reporter: Reporter,
    metrics: Metrics,
    toolchain: Toolchain,
    forge: Option<ForgeStatus>,
    plans: PullRequestPlans,
    databases: tokio::sync::Mutex<HashMap<(String, String), Arc<Database>>>,
}

/// How a reconcile went wrong; the error policy answers each kind differently.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// The spec is invalid and nothing valid was ever taken: the status says why, and
    /// nothing happens until the object changes.
    #[error("invalid spec, waiting for a new generation: {0}")]
    InvalidSpec(String),
    /// Reading or writing objects through the API server.
    #[error("Kubernetes API: {0:#}")]
    Kube(anyhow::Error),
    /// An engine step the driver could not handle itself (the record not saved, say).
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl ControllerError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            ControllerError::InvalidSpec(_) => "invalid_spec",
            ControllerError::Kube(_) => "kube",
            ControllerError::Engine(e) => e.metric_label(),
        }
    }
}

fn kube_error(e: impl Into<anyhow::Error>) -> ControllerError {
    ControllerError::Kube(e.into())
}

pub async fn run(
    options: ControllerOptions,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let forge = options.forge.clone().sink()?;
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    let identity = options.identity.clone().unwrap_or_else(|| {
        format!(
            "{}-{}",
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "pgflip".into()),
            pgflip_engine::random::token(6)
        )
    });
    let metrics = Metrics::default();
    let (ready_tx, ready_rx) = tokio::sync::watch::channel(false);
    let server_stop = {
        let mut stop = stop.clone();
        async move {
            let _ = stop.wait_for(|s| *s).await;
        }
    };
    let server = tokio::spawn(super::metrics::serve(
        options.metrics_addr,
        metrics.clone(),
        ready_rx,
        server_stop,
    ));

    let election = LeaderElection::new(
        client.clone(),
        &options.lease_namespace,
        "pgflip-controller",
        &identity,
        options.lease_duration,
    );
    // Ready once the API server answers: leading or standing by for the lease (see
    // metrics.rs for why a standby is Ready).
    client
        .apiserver_version()
        .await
        .context("reaching the Kubernetes API")?;
    let _ = ready_tx.send(true);
    tracing::info!(%identity, "waiting for the leader lease");
    let leader = tokio::select! {
        l = election.acquire() => l?,
        _ = stop.wait_for(|s| *s) => return Ok(()),
    };
    tracing::info!(%identity, "leading");
    metrics.set_leader(true);

    let plan_every = options.plan_every;
    let context = Arc::new(Shared {
        client: client.clone(),
        reporter: Reporter {
            controller: "pgflip".into(),
            instance: Some(identity.clone()),
        },
        options,
        metrics: metrics.clone(),
        toolchain: Toolchain::discover().await,
        plans: PullRequestPlans::new(plan_every),
        forge,
        databases: Default::default(),
    });
    let objects: Api<BlueGreenDatabase> = Api::all(client.clone());
    let managed = watcher::Config::default().labels("app.kubernetes.io/managed-by=pgflip");
    let mut shutdown = stop.clone();
    let controller = Controller::new(objects, watcher::Config::default());
    let store = controller.store();
    let forgetting = context.clone();
    let controller = controller
        .owns(Api::<Service>::all(client.clone()), managed.clone())
        // StatefulSets carry no owner reference (data outlives the object): found by label.
        .watches(Api::<StatefulSet>::all(client.clone()), managed, |sts| {
            let instance = sts.labels().get("app.kubernetes.io/instance")?.clone();
            Some(ObjectRef::new(&instance).within(&sts.namespace()?))
        })
        .graceful_shutdown_on(async move {
            let _ = shutdown.wait_for(|s| *s).await;
        })
        .run(reconcile, error_policy, context)
        .for_each(|result| {
            let (store, shared) = (store.clone(), forgetting.clone());
            async move {
                let Err(e) = result else { return };
                // A deleted object is never reconciled again (kube-runtime finds it gone
                // from its store): its requeue or a watched object's change says so here.
                if let Some((namespace, name)) = deleted_object(&e)
                    && store
                        .get(&ObjectRef::new(&name).within(&namespace))
                        .is_none()
                {
                    shared.forget(&namespace, &name).await;
                } else {
                    tracing::debug!(error = %e, "reconcile");
                }
            }
        });
    let outcome = tokio::select! {
        () = controller => Ok(()),
        () = leader.lost() => Err(anyhow::anyhow!("lost the leader lease; stopping")),
    };
    metrics.set_leader(false);
    if outcome.is_ok() {
        leader.release().await;
    }
    server.abort();
    outcome
}

fn error_policy(
    object: Arc<BlueGreenDatabase>,
    error: &ControllerError,
    context: Arc<Shared>,
) -> Action {
    context.metrics.error(error.metric_label());
    match error {
        ControllerError::InvalidSpec(_) => {
            tracing::info!(object = %object.name_any(), %error, "not reconciled");
            Action::await_change()
        }
        _ => {
            tracing::warn!(object = %object.name_any(), kind = error.metric_label(), %error, "reconcile failed; retrying");
            Action::requeue(Duration::from_secs(2))
        }
    }
}

async fn reconcile(
    object: Arc<BlueGreenDatabase>,
    context: Arc<Shared>,
) -> Result<Action, ControllerError> {
    let namespace = object
        .namespace()
        .ok_or_else(|| kube_error(anyhow::anyhow!("the object has no namespace")))?;
    let name = object.name_any();
    let api: Api<BlueGreenDatabase> = Api::namespaced(context.client.clone(), &namespace);
    // The Kustomization first, then the object (see the module comment).
    let origin = origin(&context.client, &object).await.map_err(kube_error)?;
    let Some(object) = api.get_opt(&name).await.map_err(kube_error)? else {
        context.forget(&namespace, &name).await;
        return Ok(Action::await_change());
    };
    let live = object.desired();
    let Some(database) = context.database(&object, live.as_ref().ok()).await? else {
        // Invalid before anything was ever created: only the status says why.
        publish_status(&api, &object, &Record::default(), false)
            .await
            .map_err(kube_error)?;
        let why = live.err().map(|e| e.to_string()).unwrap_or_default();
        return Err(ControllerError::InvalidSpec(why));
    };
    let mut runner = database.runner.lock().await;
    if let Some(revision) = origin.revision(object.metadata.generation) {
        let observed = Observed {
            revision,
            name: Some(name.clone()),
            desired: live.clone().map_err(|e| e.to_string()),
        };
        runner.take(&observed).await?;
    }
    let waiting_for_flux = waiting_for_flux(&origin, live.as_ref().ok(), runner.record());

    let started = Instant::now();
    let mut next = IDLE_REQUEUE;
    while runner.record().wanted.is_some() {
        // Something not there yet (a pod starting) comes back as a wait, not an error.
        let progress = runner.step().await?;
        publish_status(&api, &object, runner.record(), waiting_for_flux)
            .await
            .map_err(kube_error)?;
        let phase = runner
            .record()
            .attempt
            .as_ref()
            .map_or("idle", |a| a.phase.as_str());
        context.metrics.set_phase(&namespace, &name, phase);
        context.metrics.set_progress(
            &namespace,
            &name,
            phase,
            runner.record().attempt.as_ref().and_then(|a| a.progress),
        );
        match pace(
            progress,
            STEPS_PER_RECONCILE.saturating_sub(started.elapsed()),
        ) {
            Pace::Continue => {}
            Pace::Sleep(d) => tokio::time::sleep(d).await,
            Pace::Requeue(d) => {
                next = d;
                break;
            }
        }
    }
    if let Some(wanted) = &runner.record().wanted
        && let Some(lag) = runner
            .driver()
            .steps()
            .replication_lag(runner.record(), &wanted.desired)
            .await
    {
        context.metrics.set_lag(&namespace, &name, lag);
    }
    publish_status(&api, &object, runner.record(), waiting_for_flux)
        .await
        .map_err(kube_error)?;
    if let Some(forge) = &context.forge {
        context.plans.look(&context, forge, &object, &runner).await;
    }
    if waiting_for_flux {
        next = next.min(Duration::from_secs(1));
    }
    Ok(Action::requeue(next))
}

/// What a reconcile does after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pace {
    /// Step again now.
    Continue,
    /// A short wait, taken here (the lag gate polls every few hundred ms).
    Sleep(Duration),
    /// Return, and reconcile the object again after this long: other objects are
    /// reconciled meanwhile, and nothing waits long inside a reconcile.
    Requeue(Duration),
}

/// Waits up to this long are taken inside a reconcile; longer ones requeue.
const INLINE_WAIT: Duration = Duration::from_millis(300);

fn pace(progress: Progress, left: Duration) -> Pace {
    match progress {
        Progress::Idle => Pace::Requeue(IDLE_REQUEUE),
        Progress::Busy if left.is_zero() => Pace::Requeue(Duration::from_millis(10)),
        Progress::Busy => Pace::Continue,
        Progress::After(d) if d <= INLINE_WAIT && d < left => Pace::Sleep(d),
        Progress::After(d) => Pace::Requeue(d),
    }
}

/// The object a scheduled reconcile found deleted: (namespace, name).
fn deleted_object<R, Q>(
    error: &kube::runtime::controller::Error<R, Q>,
) -> Option<(String, String)> {
    match error {
        kube::runtime::controller::Error::ObjectNotFound(r) => {
            Some((r.namespace.clone()?, r.name.clone()))
        }
        _ => None,
    }
}

/// `host:port`, the host an IP address; an IPv6 one with or without brackets (the port is
/// whatever follows the last colon).
fn parse_listen_addr(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    let bad = || format!("{text:?} is not an address and port such as 0.0.0.0:8080");
    let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
    let ip: std::net::IpAddr = host.parse().map_err(|_| bad())?;
    Ok(SocketAddr::new(ip, port.parse().map_err(|_| bad())?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_waits_are_taken_long_ones_requeue() {
        let second = Duration::from_secs(1);
        assert_eq!(pace(Progress::Busy, second), Pace::Continue);
        assert_eq!(
            pace(Progress::Busy, Duration::ZERO),
            Pace::Requeue(Duration::from_millis(10))
        );
        let lag_gate = Duration::from_millis(200);
        assert_eq!(
            pace(Progress::After(lag_gate), second),
            Pace::Sleep(lag_gate)
        );
        assert_eq!(
            pace(Progress::After(lag_gate), Duration::from_millis(100)),
            Pace::Requeue(lag_gate)
        );
        // A pod not Ready yet: looked at again in a second, not waited for.
        assert_eq!(
            pace(Progress::After(second), second * 2),
            Pace::Requeue(second)
        );
        assert_eq!(pace(Progress::Idle, second), Pace::Requeue(IDLE_REQUEUE));
    }

    #[test]
    fn a_reconcile_of_a_gone_object_names_it() {
        type E = kube::runtime::controller::Error<ControllerError, std::io::Error>;
        let gone = ObjectRef::<BlueGreenDatabase>::new("orders").within("shop");
        let e = E::ObjectNotFound(Box::new(gone.clone().erase()));
        assert_eq!(
            deleted_object(&e),
            Some(("shop".to_string(), "orders".to_string()))
        );
        let failed = E::ReconcilerFailed(
            ControllerError::Kube(anyhow::anyhow!("boom")),
            Box::new(gone.erase()),
        );
        assert_eq!(deleted_object(&failed), None);
    }

    #[test]
    fn listen_addresses_with_bare_ipv6() {
        assert_eq!(
            parse_listen_addr("10.1.2.3:8080").unwrap().to_string(),
            "10.1.2.3:8080"
        );
        assert_eq!(
            parse_listen_addr("fd00::7:8080").unwrap().to_string(),
            "[fd00::7]:8080"
        );
        assert_eq!(
            parse_listen_addr("[fd00::7]:8080").unwrap().to_string(),
            "[fd00::7]:8080"
        );
        assert!(parse_listen_addr("pod:8080").is_err());
        assert!(parse_listen_addr("10.1.2.3").is_err());
    }
}
