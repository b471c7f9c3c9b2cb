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
//! [`NotReady`](crate::adapters::NotReady), and the object is looked at again shortly.
//! A deleted object is forgotten (its engine and the endpoint's console session dropped);
//! its data is not touched.
//! Only the lease holder reconciles; a controller that loses its lease stops at once,
//! which the engine survives like a kill.

use super::api::{FIELD_MANAGER, apply_params, is_not_ready};
use super::crd::BlueGreenDatabase;
use super::endpoint::KubeEndpoint;
use super::flux::{KustomizationStatus, NAME_LABEL, NAMESPACE_LABEL, Revision};
use super::instances::{Current, KubeInstances};
use super::journal::ConfigMapJournal;
use super::leader::LeaderElection;
use super::metrics::Metrics;
use super::objects::{self, PASSWORD_KEY, admin_secret_name};
use super::status;
use crate::adapters::forge_status::{ForgeArgs, ForgeStatus};
use crate::adapters::{Instances, Observed, StatusSink};
use crate::core::plan::{Record, Wanted};
use crate::core::report::{State, Update};
use crate::core::spec::{self, Desired};
use crate::engine::intake;
use crate::engine::pg::Credentials;
use crate::engine::reconcile::{Engine, Progress};
use crate::state::ADMIN_USER;
use crate::toolchain::Toolchain;
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
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
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
/// When to look again at what is not there yet (a pod starting, a claim going away).
const WAITING_REQUEUE: Duration = Duration::from_millis(1500);

type KubeEngine = Engine<KubeInstances, KubeEndpoint, KubeSinks, ConfigMapJournal>;

/// One database's engine and record, kept between reconciles: the endpoint's console
/// session stays open, so a pause costs one round trip.
struct Database {
    engine: KubeEngine,
    current: Current,
    record: tokio::sync::Mutex<Record>,
    adopted: AtomicBool,
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

#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct ReconcileError(#[from] anyhow::Error);

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
            crate::state::random_token(6)
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
    error: &ReconcileError,
    context: Arc<Shared>,
) -> Action {
    tracing::warn!(object = %object.name_any(), error = %format!("{:#}", error.0), "reconcile failed; retrying");
    context.metrics.error("reconcile");
    Action::requeue(Duration::from_secs(2))
}

/// Where the object's current spec came from.
#[derive(Debug, Clone, PartialEq)]
enum Origin {
    /// No Kustomization manages it: every generation is a revision of its own.
    Unmanaged,
    /// Flux applied it at this revision (its commit, when the revision is a Git one).
    Applied {
        revision: String,
        commit: Option<String>,
    },
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
            Some(r) => Origin::Applied {
                revision: r.to_string(),
                commit: Revision::parse(r)
                    .ok()
                    .and_then(|r| r.commit().map(str::to_string)),
            },
        }
    }

    /// The revision the object's current spec stands for, if one is known yet. A Git
    /// revision is named by its commit: that is where progress is reported.
    fn observe(&self, generation: Option<i64>, document: &str) -> Option<Observed> {
        let revision = match self {
            Origin::Unmanaged => format!("generation-{}", generation.unwrap_or(0)),
            Origin::Applied { revision, commit } => {
                commit.clone().unwrap_or_else(|| revision.clone())
            }
            Origin::NotYetApplied => return None,
        };
        Some(Observed {
            revision,
            document: Ok(document.to_string()),
        })
    }
}

/// Whether the object holds a (valid) spec that Flux has not reported applied yet: the
/// revision it reports was taken already, with another document.
fn waiting_for_flux(origin: &Origin, spec_valid: bool, record: &Record, document: &str) -> bool {
    match origin {
        Origin::NotYetApplied => true,
        Origin::Unmanaged => false,
        Origin::Applied { .. } => {
            spec_valid
                && record
                    .desired
                    .as_ref()
                    .is_some_and(|d| d.document != document)
                && record.observed_revision == origin.observe(None, document).map(|o| o.revision)
        }
    }
}

/// The object as the document local mode would read from Git.
fn document_text(object: &BlueGreenDatabase) -> String {
    let doc = serde_json::json!({
        "apiVersion": spec::API_VERSION,
        "kind": spec::KIND,
        "metadata": { "name": object.name_any() },
        "spec": object.spec.document,
    });
    serde_yaml::to_string(&doc).expect("a document serializes")
}

async fn reconcile(
    object: Arc<BlueGreenDatabase>,
    context: Arc<Shared>,
) -> Result<Action, ReconcileError> {
    let namespace = object.namespace().context("the object has no namespace")?;
    let name = object.name_any();
    let api: Api<BlueGreenDatabase> = Api::namespaced(context.client.clone(), &namespace);
    // The Kustomization first, then the object (see the module comment).
    let origin = origin(&context.client, &object).await?;
    let Some(object) = api.get_opt(&name).await.map_err(anyhow::Error::from)? else {
        context.forget(&namespace, &name).await;
        return Ok(Action::await_change());
    };
    let live = object.desired();
    let database = match context.database(&object, live.as_ref().ok()).await? {
        Some(d) => d,
        None => {
            // Invalid before anything was ever created: only the status says why.
            let record = Record::default();
            publish_status(&api, &object, &record, false).await?;
            return Ok(Action::await_change());
        }
    };
    let mut record = database.record.lock().await;
    let document = document_text(&object);
    let observed = origin.observe(object.metadata.generation, &document);
    if let Some(observed) = &observed {
        intake::take_revision(
            observed,
            &mut record,
            &database.engine.journal,
            &database.engine.sink,
        )
        .await?;
    }
    let waiting_for_flux = waiting_for_flux(&origin, live.is_ok(), &record, &document);

    let mut busy = false;
    // What the engine waits for, not there yet: not a failure, looked at again soon.
    let mut waiting: Option<anyhow::Error> = None;
    if let Some(taken) = record.desired.clone() {
        let desired = spec::parse(&taken.document).context("a stored document was valid")?;
        *database.current.write().unwrap() = (object.clone(), desired.clone());
        if !database.adopted.load(Ordering::Relaxed) {
            match database.engine.adopt(&record, &desired).await {
                Ok(()) => database.adopted.store(true, Ordering::Relaxed),
                Err(e) if is_not_ready(&e) => waiting = Some(e),
                Err(e) => return Err(e.into()),
            }
        }
        let wanted = Wanted {
            revision: &taken.revision,
            desired: &desired,
        };
        let started = Instant::now();
        while waiting.is_none() && started.elapsed() < STEPS_PER_RECONCILE {
            let progress = database.engine.reconcile(&mut record, &wanted).await;
            publish_status(&api, &object, &record, waiting_for_flux).await?;
            let phase = record.attempt.as_ref().map_or("idle", |a| a.phase.as_str());
            context.metrics.set_phase(&namespace, &name, phase);
            match progress {
                Ok(Progress::Busy) => busy = true,
                Ok(Progress::Idle) => {
                    busy = false;
                    break;
                }
                Err(e) if is_not_ready(&e) => waiting = Some(e),
                Err(e) => {
                    context.metrics.error("step");
                    return Err(e.into());
                }
            }
        }
    }
    if let Some(why) = &waiting {
        tracing::debug!(object = %name, "waiting: {why:#}");
    }
    let taken = record
        .desired
        .as_ref()
        .and_then(|d| spec::parse(&d.document).ok());
    if let Some(desired) = &taken
        && let Some(lag) = replication_lag(&database, &record, desired).await
    {
        context.metrics.set_lag(&namespace, &name, lag);
    }
    publish_status(&api, &object, &record, waiting_for_flux).await?;
    Ok(next_reconcile(busy, waiting.is_some(), waiting_for_flux))
}

/// When to reconcile again: at once while steps remain, soon while something is not
/// there yet or Flux has not reported the revision, else at a steady pace (lag, standby
/// retention).
fn next_reconcile(busy: bool, waiting: bool, waiting_for_flux: bool) -> Action {
    if waiting {
        Action::requeue(WAITING_REQUEUE)
    } else if busy {
        Action::requeue(Duration::from_millis(10))
    } else if waiting_for_flux {
        Action::requeue(Duration::from_secs(1))
    } else {
        Action::requeue(Duration::from_secs(10))
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

/// The replication lag that matters now: the running attempt's link once data flows,
/// else the reverse link that keeps the standby ready for a revert.
async fn replication_lag(database: &Database, record: &Record, desired: &Desired) -> Option<i64> {
    use crate::core::plan::Phase;
    let serving = record.serving?;
    let (from, to) = match (&record.attempt, &record.standby) {
        (Some(a), _)
            if Phase::ALL.iter().position(|p| *p == a.phase)
                >= Phase::ALL.iter().position(|p| *p == Phase::InitialSync)
                && a.phase != Phase::Done =>
        {
            (a.from, a.to)
        }
        (None, Some(s)) => (serving, s.member),
        _ => return None,
    };
    let engine = &database.engine;
    let source = engine.instances.addr(&from).await.ok()??;
    let mut worst = None;
    for db in &desired.databases {
        let client = crate::engine::pg::connect(&source, &engine.admin, db)
            .await
            .ok()?;
        let slot = crate::engine::replication::link_name(from.color, to.color, db);
        let lag = crate::engine::replication::lag_bytes(&client, &slot)
            .await
            .ok()??;
        worst = Some(worst.unwrap_or(0).max(lag));
    }
    worst
}

/// Writes the status (and the annotations mirroring it) when it changed.
async fn publish_status(
    api: &Api<BlueGreenDatabase>,
    object: &BlueGreenDatabase,
    record: &Record,
    waiting_for_flux: bool,
) -> anyhow::Result<()> {
    let live = object.desired();
    let invalid = live.as_ref().err().map(|e| e.to_string());
    let live_desired = live.as_ref().ok();
    let previous = object.status.clone().unwrap_or_default();
    let revision = record
        .desired
        .as_ref()
        .and_then(|d| (!d.revision.starts_with("generation-")).then_some(d.revision.as_str()));
    let observed = status::Observed {
        generation: object.metadata.generation,
        desired: match (&invalid, live_desired) {
            (Some(why), _) => Err(why.as_str()),
            (None, Some(d)) => Ok(d),
            (None, None) => unreachable!("either valid or not"),
        },
        record,
        revision,
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
    /// Drops a deleted object's engine, and with it the endpoint's console session. Its
    /// data, endpoint and journal stay: an object created again under the name takes them up.
    async fn forget(&self, namespace: &str, name: &str) {
        let key = (namespace.to_string(), name.to_string());
        if self.databases.lock().await.remove(&key).is_some() {
            tracing::info!(%namespace, %name, "the object is gone: forgot its database");
        }
    }

    /// The database's engine, made on first sight (its admin Secret created if absent).
    /// None while the object has never been valid: nothing is created for it.
    async fn database(
        &self,
        object: &BlueGreenDatabase,
        live: Option<&Desired>,
    ) -> anyhow::Result<Option<Arc<Database>>> {
        let namespace = object.namespace().context("the object has no namespace")?;
        let name = object.name_any();
        let key = (namespace.clone(), name.clone());
        let mut databases = self.databases.lock().await;
        if let Some(d) = databases.get(&key) {
            // An object deleted and created again under its name is new: its parts are
            // rebuilt (its record read back from the journal) so that nothing, events
            // included, still refers to the old one.
            if d.current.read().unwrap().0.metadata.uid == object.metadata.uid {
                return Ok(Some(d.clone()));
            }
        }
        let journal = ConfigMapJournal::new(self.client.clone(), &namespace, &name);
        let record = journal.load().await?;
        let desired = match (live, &record.desired) {
            (Some(d), _) => d.clone(),
            (None, Some(taken)) => spec::parse(&taken.document)?,
            (None, None) => return Ok(None),
        };
        let admin = self.admin_credentials(object, &desired).await?;
        let current: Current = Arc::new(RwLock::new((object.clone(), desired)));
        let instances = KubeInstances::new(
            self.client.clone(),
            &namespace,
            current.clone(),
            admin.clone(),
        );
        let endpoint = KubeEndpoint::new(
            self.client.clone(),
            &namespace,
            current.clone(),
            &self.options.endpoint_image,
            admin.clone(),
        )?;
        let events = KubeSinks {
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
        let database = Arc::new(Database {
            engine: Engine::new(
                instances,
                endpoint,
                events,
                journal,
                self.toolchain.clone(),
                admin,
            ),
            current,
            record: tokio::sync::Mutex::new(record),
            adopted: AtomicBool::new(false),
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
            let secret = objects::admin_secret(object, desired, &crate::state::random_token(32));
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
    async fn publish(&self, revision: &str, update: &Update) -> anyhow::Result<()> {
        let events = self.events.publish(revision, update).await;
        let is_commit = revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit());
        if let Some(forge) = self.forge.as_ref().filter(|_| is_commit) {
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
    async fn publish(&self, _revision: &str, update: &Update) -> anyhow::Result<()> {
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
    use crate::core::plan::DesiredDocument;

    const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

    fn flux(revision: &str) -> KustomizationStatus {
        serde_json::from_value(serde_json::json!({
            "lastAppliedRevision": revision,
            "conditions": [{"type": "Ready", "status": "True", "reason": "ReconciliationSucceeded", "message": ""}],
        }))
        .unwrap()
    }

    #[test]
    fn waiting_requeues_soon_and_wins_over_busy() {
        assert_eq!(
            next_reconcile(true, true, false),
            Action::requeue(WAITING_REQUEUE)
        );
        assert_eq!(
            next_reconcile(false, true, true),
            Action::requeue(WAITING_REQUEUE)
        );
        assert_eq!(
            next_reconcile(true, false, false),
            Action::requeue(Duration::from_millis(10))
        );
        assert_eq!(
            next_reconcile(false, false, true),
            Action::requeue(Duration::from_secs(1))
        );
        assert_eq!(
            next_reconcile(false, false, false),
            Action::requeue(Duration::from_secs(10))
        );
    }

    #[test]
    fn a_reconcile_of_a_gone_object_names_it() {
        type E = kube::runtime::controller::Error<ReconcileError, std::io::Error>;
        let gone = ObjectRef::<BlueGreenDatabase>::new("orders").within("shop");
        let e = E::ObjectNotFound(Box::new(gone.clone().erase()));
        assert_eq!(
            deleted_object(&e),
            Some(("shop".to_string(), "orders".to_string()))
        );
        let failed = E::ReconcilerFailed(
            ReconcileError(anyhow::anyhow!("boom")),
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
        let observed = origin.observe(Some(4), "doc").unwrap();
        assert_eq!(observed.revision, SHA);
        assert_eq!(observed.document.as_deref(), Ok("doc"));
        assert_eq!(
            Origin::from_status(&KustomizationStatus::default()),
            Origin::NotYetApplied
        );
        assert!(Origin::NotYetApplied.observe(Some(4), "doc").is_none());
        assert_eq!(
            Origin::Unmanaged.observe(Some(4), "doc").unwrap().revision,
            "generation-4"
        );
    }

    #[test]
    fn a_spec_ahead_of_flux_waits_for_its_revision() {
        let origin = Origin::from_status(&flux(&format!("main@sha1:{SHA}")));
        let taken = Record {
            observed_revision: Some(SHA.into()),
            desired: Some(DesiredDocument {
                revision: SHA.into(),
                document: "version 15".into(),
            }),
            ..Default::default()
        };
        // Flux applied the object at a new commit but still reports the old one.
        assert!(waiting_for_flux(&origin, true, &taken, "version 16"));
        // The object is what that revision carried.
        assert!(!waiting_for_flux(&origin, true, &taken, "version 15"));
        // An invalid spec is Stalled, not waiting.
        assert!(!waiting_for_flux(&origin, false, &taken, "version 13"));
        assert!(waiting_for_flux(&Origin::NotYetApplied, true, &taken, "x"));
        assert!(!waiting_for_flux(&Origin::Unmanaged, true, &taken, "x"));
    }
}
