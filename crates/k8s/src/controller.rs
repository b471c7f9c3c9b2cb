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

use super::api::{FIELD_MANAGER, apply_params};
use super::crd::BlueGreenDatabase;
use super::endpoint::KubeEndpoint;
use super::flux::{KustomizationStatus, NAME_LABEL, NAMESPACE_LABEL, SourceRevision};
use super::instances::KubeInstances;
use super::journal::ConfigMapJournal;
use super::leader::LeaderElection;
use super::metrics::Metrics;
use super::objects::{self, PASSWORD_KEY, admin_secret_name};
use super::status;
use anyhow::Context;
use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ObjectReference, Secret, Service};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use pgflip_core::plan::Record;
use pgflip_core::report::{State, Update};
use pgflip_core::revision::Revision;
use pgflip_core::spec::Desired;
use pgflip_engine::adapters::forge_status::{ForgeArgs, ForgeStatus};
use pgflip_engine::driver::{Driver, Progress, system_clock};
use pgflip_engine::error::EngineError;
use pgflip_engine::phases::Phases;
use pgflip_engine::ports::Credentials;
use pgflip_engine::ports::{Observed, StatusSink};
use pgflip_engine::runner::Runner;
use pgflip_engine::state::ADMIN_USER;
use pgflip_engine::toolchain::Toolchain;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

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
}

/// How long one reconcile runs engine steps before it lets go (other objects, status).
const STEPS_PER_RECONCILE: Duration = Duration::from_secs(2);
/// When to look again with nothing to do: lag metrics, standby retention.
const IDLE_REQUEUE: Duration = Duration::from_secs(10);

type KubeSteps = Phases<KubeInstances, KubeEndpoint>;
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
            pgflip_engine::state::random_token(6)
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
    tracing::info!(%identity, "waiting for the leader lease");
    let leader = tokio::select! {
        l = election.acquire() => l?,
        _ = stop.wait_for(|s| *s) => return Ok(()),
    };
    tracing::info!(%identity, "leading");
    metrics.set_leader(true);
    let _ = ready_tx.send(true);

    let context = Arc::new(Shared {
        client: client.clone(),
        reporter: Reporter {
            controller: "pgflip".into(),
            instance: Some(identity.clone()),
        },
        options,
        metrics: metrics.clone(),
        toolchain: Toolchain::discover(),
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

/// Where the object's current spec came from.
#[derive(Debug, Clone, PartialEq)]
enum Origin {
    /// No Kustomization manages it: every generation is a revision of its own.
    Unmanaged,
    /// Flux applied it at this source revision.
    Applied(Revision),
    /// Its Kustomization has not reported any revision applied yet.
    NotYetApplied,
}

async fn origin(client: &kube::Client, object: &BlueGreenDatabase) -> anyhow::Result<Origin> {
    let labels = object.labels();
    let (Some(name), Some(namespace)) = (labels.get(NAME_LABEL), labels.get(NAMESPACE_LABEL))
    else {
        return Ok(Origin::Unmanaged);
    };
    let gvk = GroupVersionKind::gvk("kustomize.toolkit.fluxcd.io", "v1", "Kustomization");
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), namespace, &ApiResource::from_gvk(&gvk));
    let Some(kustomization) = api
        .get_opt(name)
        .await
        .with_context(|| format!("reading Kustomization {namespace}/{name}"))?
    else {
        return Ok(Origin::NotYetApplied);
    };
    let status: KustomizationStatus = kustomization
        .data
        .get("status")
        .cloned()
        .map(serde_json::from_value)
        .transpose()
        .context("reading the Kustomization's status")?
        .unwrap_or_default();
    Ok(Origin::from_status(&status))
}

impl Origin {
    fn from_status(status: &KustomizationStatus) -> Origin {
        match status.applied_revision() {
            None => Origin::NotYetApplied,
            Some(r) => Origin::Applied(
                SourceRevision::parse(r)
                    .ok()
                    .and_then(|parsed| parsed.commit().and_then(Revision::commit))
                    .unwrap_or_else(|| Revision::Flux(r.to_string())),
            ),
        }
    }

    /// The revision the object's current spec stands for, if one is known yet. A Git
    /// revision is named by its commit: that is where progress is reported.
    fn revision(&self, generation: Option<i64>) -> Option<Revision> {
        match self {
            Origin::Unmanaged => Some(Revision::Generation(generation.unwrap_or(0))),
            Origin::Applied(revision) => Some(revision.clone()),
            Origin::NotYetApplied => None,
        }
    }
}

/// Whether the object holds a (valid) spec that Flux has not reported applied yet: the
/// revision it reports was taken already, with another desired state.
fn waiting_for_flux(origin: &Origin, live: Option<&Desired>, record: &Record) -> bool {
    match origin {
        Origin::NotYetApplied => true,
        Origin::Unmanaged => false,
        Origin::Applied(revision) => {
            live.is_some_and(|live| record.wanted.as_ref().is_some_and(|w| w.desired != *live))
                && record.observed_revision.as_ref() == Some(revision)
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

/// Writes the status (and the annotations mirroring it) when it changed.
async fn publish_status(
    api: &Api<BlueGreenDatabase>,
    object: &BlueGreenDatabase,
    record: &Record,
    waiting_for_flux: bool,
) -> anyhow::Result<()> {
    let live = object.desired();
    let previous = object.status.clone().unwrap_or_default();
    let invalid = live.as_ref().err().map(|e| e.to_string());
    let revision = record
        .wanted
        .as_ref()
        .map(|w| &w.revision)
        .filter(|r| !matches!(r, Revision::Generation(_)))
        .map(Revision::to_string);
    let observed = status::Observed {
        generation: object.metadata.generation,
        desired: match (&live, &invalid) {
            (Ok(d), _) => Ok(d),
            (Err(_), Some(why)) => Err(why.as_str()),
            (Err(_), None) => unreachable!("an invalid spec has a reason"),
        },
        record,
        revision: revision.as_deref(),
        waiting_for_flux,
    };
    let next = status::compute(&observed, &previous, k8s_openapi::jiff::Timestamp::now());
    // The annotations first: whoever sees the new status finds them already there.
    let annotations: serde_json::Map<String, serde_json::Value> = status::annotations(&next)
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.into()))
        .collect();
    let current = object.annotations();
    if annotations
        .iter()
        .any(|(k, v)| current.get(k).map(String::as_str) != v.as_str())
    {
        let body = serde_json::json!({
            "apiVersion": BlueGreenDatabase::api_version(&()),
            "kind": BlueGreenDatabase::kind(&()),
            "metadata": { "name": object.name_any(), "annotations": annotations },
        });
        api.patch(&object.name_any(), &apply_params(), &Patch::Apply(&body))
            .await
            .context("writing the annotations")?;
    }
    if next != previous {
        let body = serde_json::json!({
            "apiVersion": BlueGreenDatabase::api_version(&()),
            "kind": BlueGreenDatabase::kind(&()),
            "status": next,
        });
        api.patch_status(&object.name_any(), &apply_params(), &Patch::Apply(&body))
            .await
            .context("writing the status")?;
    }
    Ok(())
}

impl Shared {
    /// Drops a deleted object's runner, and with it the endpoint's console session. Its
    /// data, endpoint and journal stay: an object created again under the name takes them up.
    /// An attempt that has not switched is abandoned first: its slots would otherwise
    /// hold blue's WAL with no one left to drop them.
    async fn forget(&self, namespace: &str, name: &str) {
        let key = (namespace.to_string(), name.to_string());
        let Some(database) = self.databases.lock().await.remove(&key) else {
            return;
        };
        let mut runner = database.runner.lock().await;
        if let Err(e) = runner
            .release("the BlueGreenDatabase was deleted: the attempt is abandoned")
            .await
        {
            tracing::warn!(%namespace, %name, kind = e.metric_label(), error = %e, "could not clean up after the deleted object's attempt");
        }
        tracing::info!(%namespace, %name, "the object is gone: forgot its database");
    }

    /// The database's runner, made on first sight (its admin Secret created if absent).
    /// None while the object has never been valid: nothing is created for it.
    async fn database(
        &self,
        object: &BlueGreenDatabase,
        live: Option<&Desired>,
    ) -> Result<Option<Arc<Database>>, ControllerError> {
        let namespace = object.namespace().unwrap_or_default();
        let name = object.name_any();
        let key = (namespace.clone(), name.clone());
        let mut databases = self.databases.lock().await;
        if let Some(d) = databases.get(&key)
            && d.uid == object.metadata.uid
        {
            return Ok(Some(d.clone()));
        }
        // New, or deleted and created again under its name: its parts are (re)built, its
        // record read back from the journal, so that nothing, events included, still
        // refers to an old object.
        let journal = ConfigMapJournal::new(self.client.clone(), &namespace, &name);
        let record = journal.load().await.map_err(kube_error)?;
        let desired = match (live, &record.wanted) {
            (Some(d), _) => d.clone(),
            (None, Some(wanted)) => wanted.desired.clone(),
            (None, None) => return Ok(None),
        };
        let admin = self
            .admin_credentials(object, &desired)
            .await
            .map_err(kube_error)?;
        let instances = KubeInstances::new(
            self.client.clone(),
            &namespace,
            object.clone(),
            admin.clone(),
        );
        let endpoint = KubeEndpoint::new(
            self.client.clone(),
            &namespace,
            object.clone(),
            &self.options.endpoint_image,
            admin.clone(),
        )
        .map_err(kube_error)?;
        let sinks = KubeSinks {
            events: KubeEvents {
                recorder: Recorder::new(self.client.clone(), self.reporter.clone()),
                reference: object.object_ref(&()),
                metrics: self.metrics.clone(),
                namespace: namespace.clone(),
                name: name.clone(),
            },
            forge: self
                .forge
                .as_ref()
                .map(|f| f.with_context(format!("pgflip/{namespace}/{name}"))),
        };
        let driver = Driver::new(
            Phases::new(instances, endpoint, self.toolchain.clone(), admin),
            journal,
            sinks,
            system_clock(),
        );
        let database = Arc::new(Database {
            uid: object.metadata.uid.clone(),
            runner: tokio::sync::Mutex::new(Runner::new(driver, record)),
        });
        databases.insert(key, database.clone());
        Ok(Some(database))
    }

    /// pgflip's admin login for the database's servers: from its Secret, which is created
    /// with a random password if absent and never overwritten.
    async fn admin_credentials(
        &self,
        object: &BlueGreenDatabase,
        desired: &Desired,
    ) -> anyhow::Result<Credentials> {
        let namespace = object.namespace().context("the object has no namespace")?;
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &namespace);
        let name = admin_secret_name(&desired.name);
        if secrets.get_opt(&name).await?.is_none() {
            let secret =
                objects::admin_secret(object, desired, &pgflip_engine::state::random_token(32));
            let params = PostParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..Default::default()
            };
            match secrets.create(&params, &secret).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => return Err(e).context("creating the admin Secret"),
            }
        }
        let secret = secrets.get(&name).await?;
        let password = secret
            .data
            .as_ref()
            .and_then(|d| d.get(PASSWORD_KEY))
            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
            .with_context(|| format!("Secret {name} has no {PASSWORD_KEY}"))?;
        Ok(Credentials {
            user: ADMIN_USER.into(),
            password,
        })
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

/// Where progress goes: Events on the object, and the commit's status on the forge when
/// the revision is a Git commit (an object no Kustomization manages has none).
pub struct KubeSinks {
    events: KubeEvents,
    forge: Option<ForgeStatus>,
}

impl StatusSink for KubeSinks {
    async fn publish(&self, revision: &Revision, update: &Update) -> anyhow::Result<()> {
        let events = self.events.publish(revision, update).await;
        if let Some(forge) = self
            .forge
            .as_ref()
            .filter(|_| revision.as_commit().is_some())
        {
            forge.publish(revision, update).await?;
        }
        events
    }
}

/// Progress as Kubernetes Events on the object (and counted in the metrics).
pub struct KubeEvents {
    recorder: Recorder,
    reference: ObjectReference,
    metrics: Metrics,
    namespace: String,
    name: String,
}

impl StatusSink for KubeEvents {
    async fn publish(&self, _revision: &Revision, update: &Update) -> anyhow::Result<()> {
        let reason: String = update
            .phase
            .split('-')
            .map(|w| {
                let mut c = w.chars();
                c.next()
                    .map(|f| f.to_uppercase().chain(c).collect::<String>())
                    .unwrap_or_default()
            })
            .collect();
        let (type_, reason) = match update.state {
            State::Failure => (EventType::Warning, format!("{reason}Failed")),
            State::Success => (EventType::Normal, "Switched".to_string()),
            State::Pending => (EventType::Normal, reason),
        };
        if update.state == State::Success
            && let Some(pause) = update.pause_ms
        {
            let direction = match (&update.from, &update.to) {
                (Some(f), Some(t)) if t.parse::<u32>().ok() < f.parse::<u32>().ok() => "downgrade",
                _ => "upgrade",
            };
            self.metrics.switch_done(
                &self.namespace,
                &self.name,
                direction,
                Duration::from_secs_f64(pause / 1000.0),
            );
        }
        let mut note = update.message.clone();
        note.truncate(1000);
        self.recorder
            .publish(
                &Event {
                    type_,
                    reason,
                    note: Some(note),
                    action: "Reconcile".into(),
                    secondary: None,
                },
                &self.reference,
            )
            .await
            .context("publishing an event")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

    fn flux(revision: &str) -> KustomizationStatus {
        serde_json::from_value(serde_json::json!({
            "lastAppliedRevision": revision,
            "conditions": [{"type": "Ready", "status": "True", "reason": "ReconciliationSucceeded", "message": ""}],
        }))
        .unwrap()
    }

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

    #[test]
    fn a_flux_revision_is_named_by_its_commit() {
        let origin = Origin::from_status(&flux(&format!("main@sha1:{SHA}")));
        assert_eq!(origin.revision(Some(4)), Some(Revision::Commit(SHA.into())));
        let oci = Origin::from_status(&flux(&format!("latest@sha256:{SHA}{}", &SHA[..24])));
        assert!(
            matches!(oci.revision(None), Some(Revision::Flux(r)) if r.starts_with("latest@sha256:"))
        );
        assert_eq!(
            Origin::from_status(&KustomizationStatus::default()),
            Origin::NotYetApplied
        );
        assert_eq!(Origin::NotYetApplied.revision(Some(4)), None);
        assert_eq!(
            Origin::Unmanaged.revision(Some(4)),
            Some(Revision::Generation(4))
        );
    }

    fn desired(major: u32) -> Desired {
        pgflip_core::spec::parse(&pgflip_core::spec::render(
            "db",
            pgflip_core::spec::Major(major),
            "",
        ))
        .unwrap()
    }

    #[test]
    fn a_spec_ahead_of_flux_waits_for_its_revision() {
        let origin = Origin::from_status(&flux(&format!("main@sha1:{SHA}")));
        let revision = Revision::Commit(SHA.into());
        let taken = Record {
            observed_revision: Some(revision.clone()),
            wanted: Some(pgflip_core::plan::Wanted {
                revision,
                desired: desired(15),
            }),
            ..Default::default()
        };
        // Flux applied the object at a new commit but still reports the old one.
        assert!(waiting_for_flux(&origin, Some(&desired(16)), &taken));
        // The object is what that revision carried.
        assert!(!waiting_for_flux(&origin, Some(&desired(15)), &taken));
        // An invalid spec is Stalled, not waiting.
        assert!(!waiting_for_flux(&origin, None, &taken));
        assert!(waiting_for_flux(
            &Origin::NotYetApplied,
            Some(&desired(16)),
            &taken
        ));
        assert!(!waiting_for_flux(
            &Origin::Unmanaged,
            Some(&desired(16)),
            &taken
        ));
    }
}
