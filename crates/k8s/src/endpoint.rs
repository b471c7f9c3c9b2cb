//! Kubernetes mode's endpoint, both halves.
//!
//! - [`KubeEndpoint`], the controller's [`Router`]: a PgBouncer Deployment and Service named
//!   after the database, its stored configuration in a ConfigMap. The switchover drives
//!   PgBouncer's admin console at the pod's IP (`PAUSE`/`RESUME`) and repoints by writing
//!   the ConfigMap (for a restarted pod) and then pushing the target to the pod.
//! - [`run_pod`], `pgflip endpoint`, the process in that pod: renders `pgbouncer.ini`,
//!   runs PgBouncer as its child and, on the control port, takes a new target, rewrites
//!   the ini and `RELOAD`s.
//!
//! Why a push and not the ConfigMap alone: the kubelet refreshes a mounted ConfigMap a
//! minute or so after it changes, and a repoint happens inside the pause, in milliseconds.

use super::api::{apply, not_ready, ready_pod_ip};
use super::crd::BlueGreenDatabase;
use super::objects::{
    self, CONTROL_PORT, ENDPOINT_CONFIG_KEY, PORT, endpoint_config_name, endpoint_labels,
};
use anyhow::{Context, bail};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use pgflip_core::spec::Desired;
use pgflip_engine::adapters::pgbouncer::{
    AdminConsole, EndpointConfig, render_ini, userlist_field,
};
use pgflip_engine::ports::ADMIN_USER;
use pgflip_engine::ports::{Addr, Credentials};
use pgflip_engine::ports::{Result, Router};
use pgflip_engine::state::write_atomic;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// How long a Ready endpoint pod's admin console may take to answer.
const CONSOLE_TIMEOUT: Duration = Duration::from_secs(5);

pub struct KubeEndpoint {
    client: kube::Client,
    namespace: String,
    /// The object, for the owner references of the endpoint's objects.
    owner: BlueGreenDatabase,
    image: String,
    admin: Credentials,
    console: AdminConsole,
    http: reqwest::Client,
}

impl KubeEndpoint {
    pub fn new(
        client: kube::Client,
        namespace: &str,
        owner: BlueGreenDatabase,
        image: &str,
        admin: Credentials,
    ) -> anyhow::Result<KubeEndpoint> {
        let console = AdminConsole::new(
            Addr {
                host: "0.0.0.0".into(),
                port: PORT as u16,
            },
            admin.clone(),
        )?;
        Ok(KubeEndpoint {
            client,
            namespace: namespace.to_string(),
            owner,
            image: image.to_string(),
            admin,
            console,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()?,
        })
    }

    fn database(&self) -> String {
        self.owner.name_any()
    }

    fn config_maps(&self) -> Api<ConfigMap> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    async fn stored(&self) -> anyhow::Result<Option<EndpointConfig>> {
        let name = endpoint_config_name(&self.database());
        let Some(cm) = self.config_maps().get_opt(&name).await? else {
            return Ok(None);
        };
        let json = cm
            .data
            .as_ref()
            .and_then(|d| d.get(ENDPOINT_CONFIG_KEY))
            .with_context(|| format!("ConfigMap {name} has no {ENDPOINT_CONFIG_KEY}"))?;
        Ok(Some(serde_json::from_str(json).with_context(|| {
            format!("reading {ENDPOINT_CONFIG_KEY} of {name}")
        })?))
    }

    async fn store(&self, desired: &Desired, config: &EndpointConfig) -> anyhow::Result<()> {
        let cm = objects::endpoint_config(&self.owner, desired, serde_json::to_string(config)?);
        apply(&self.config_maps(), &cm).await?;
        Ok(())
    }

    /// The Ready endpoint pod's IP, checked once; [`NotReady`](pgflip_engine::ports::NotReady)
    /// if there is none yet. There is at most one (`Recreate`).
    async fn pod_ip(&self) -> anyhow::Result<String> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let database = self.database();
        let selector = endpoint_labels(&database)
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        let list = pods
            .list(&ListParams::default().labels(&selector))
            .await
            .context("listing the endpoint's pods")?;
        list.items
            .iter()
            .find_map(ready_pod_ip)
            .ok_or_else(|| not_ready(format!("no endpoint pod of {database} is Ready yet")))
    }

    /// Finds the Ready endpoint pod and opens its console (a Ready pod's PgBouncer
    /// listens: the wait is for a login, bounded by [`CONSOLE_TIMEOUT`]).
    async fn locate(&self) -> anyhow::Result<()> {
        let ip = self.pod_ip().await?;
        self.console.set_addr(Addr {
            host: ip,
            port: PORT as u16,
        });
        self.console.wait_ready(CONSOLE_TIMEOUT).await
    }

    /// Tells the pod its new target; it answers once PgBouncer has reloaded.
    async fn push(&self, target: &Addr) -> anyhow::Result<()> {
        let url = format!("http://{}:{CONTROL_PORT}/target", self.console.addr().host);
        let response = self
            .http
            .put(&url)
            .bearer_auth(&self.admin.password)
            .json(target)
            .send()
            .await
            .with_context(|| format!("telling the endpoint its new target at {url}"))?;
        if !response.status().is_success() {
            bail!(
                "the endpoint refused its new target: {} {}",
                response.status(),
                response.text().await.unwrap_or_default()
            );
        }
        Ok(())
    }
}

impl Router for KubeEndpoint {
    async fn ensure(&self, desired: &Desired, initial: &Addr) -> Result<()> {
        let mut databases = desired.databases.clone();
        databases.sort();
        databases.dedup();
        let target = self
            .stored()
            .await?
            .map_or_else(|| initial.clone(), |c| c.target);
        let config = EndpointConfig {
            listen_port: PORT as u16,
            target: target.clone(),
            databases,
        };
        self.store(desired, &config).await?;
        let service = objects::endpoint_service(&self.owner, desired);
        let deployment = objects::endpoint_deployment(&self.owner, desired, &self.image);
        let services: Api<Service> = Api::namespaced(self.client.clone(), &self.namespace);
        let deployments: Api<Deployment> = Api::namespaced(self.client.clone(), &self.namespace);
        apply(&services, &service).await?;
        apply(&deployments, &deployment).await?;
        self.locate().await?;
        // Always: a controller killed between storing a target and pushing it left the
        // pod on the older one. Pushing the same target again changes nothing.
        self.push(&target).await
    }

    async fn target(&self) -> Result<Option<Addr>> {
        Ok(self.stored().await?.map(|c| c.target))
    }

    async fn pause(&self, timeout: Duration) -> Result<()> {
        // A restarted endpoint pod has a new address (and closed the cached session). One
        // not Ready yet is NotReady: nothing was paused, clients were never held.
        if !self.console.is_connected().await {
            self.locate().await?;
        }
        self.console.pause(timeout).await
    }

    async fn repoint(&self, desired: &Desired, target: &Addr) -> Result<()> {
        let mut config = self
            .stored()
            .await?
            .context("the endpoint has no configuration yet: ensure it first")?;
        config.target = target.clone();
        self.store(desired, &config).await?;
        self.push(target).await
    }

    async fn resume(&self) -> Result<()> {
        self.console.resume().await
    }
    async fn server_sockets(&self) -> Result<Vec<(String, u16)>> {
        self.console.server_sockets().await
    }
}

/// `pgflip endpoint`: the process of the endpoint pod. Its configuration comes from the
/// environment the Deployment gives it: `PGFLIP_ENDPOINT_CONFIG` (the ConfigMap's JSON),
/// `PGFLIP_ADMIN_PASSWORD` (the admin Secret) and `POD_IP`.
pub async fn run_pod(mut stop: tokio::sync::watch::Receiver<bool>) -> anyhow::Result<()> {
    let env = |name: &str| std::env::var(name).with_context(|| format!("{name} is not set"));
    let config: EndpointConfig = serde_json::from_str(&env("PGFLIP_ENDPOINT_CONFIG")?)
        .context("reading PGFLIP_ENDPOINT_CONFIG")?;
    let admin = Credentials {
        user: std::env::var("PGFLIP_ADMIN_USER").unwrap_or_else(|_| ADMIN_USER.to_string()),
        password: env("PGFLIP_ADMIN_PASSWORD")?,
    };
    let pod_ip = env("POD_IP")?;
    let dir = tempfile::Builder::new()
        .prefix("pgflip-endpoint-")
        .tempdir()?;
    std::fs::create_dir_all(dir.path().join("socket"))?;
    let userlist = format!(
        "{} {}\n",
        userlist_field(&admin.user),
        userlist_field(&admin.password)
    );
    write_atomic(&dir.path().join("userlist.txt"), userlist.as_bytes(), 0o600)?;
    let ini = dir.path().join("pgbouncer.ini");
    write_ini(&ini, &config, &pod_ip, dir.path(), &admin.user)?;

    let bin = pgflip_engine::toolchain::Toolchain::discover()
        .await
        .pgbouncer()?;
    let mut pgbouncer = tokio::process::Command::new(bin)
        .arg(&ini)
        .kill_on_drop(true)
        .spawn()
        .context("starting PgBouncer")?;
    let console = AdminConsole::new(
        Addr {
            host: pod_ip.clone(),
            port: config.listen_port,
        },
        admin.clone(),
    )?;
    console.wait_ready(Duration::from_secs(30)).await?;
    tracing::info!(target = %config.target, "PgBouncer serves");

    let state = Arc::new(PodState {
        config: tokio::sync::Mutex::new(config),
        console,
        ini,
        dir: dir.path().to_path_buf(),
        pod_ip: pod_ip.clone(),
        admin,
    });
    let app = axum::Router::new()
        .route("/target", axum::routing::put(put_target).get(get_target))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind((pod_ip.as_str(), CONTROL_PORT as u16))
        .await
        .context("binding the control port")?;
    let mut server_stop = stop.clone();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        let _ = server_stop.wait_for(|s| *s).await;
    });
    tokio::select! {
        r = server => r.context("the control server stopped")?,
        status = pgbouncer.wait() => bail!("PgBouncer exited: {}", status?),
        _ = stop.wait_for(|s| *s) => {}
    }
    // SIGINT: PgBouncer's safe shutdown, which lets transactions finish.
    if let Some(pid) = pgbouncer.id() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGINT,
        );
    }
    let _ = tokio::time::timeout(Duration::from_secs(20), pgbouncer.wait()).await;
    Ok(())
}

struct PodState {
    config: tokio::sync::Mutex<EndpointConfig>,
    console: AdminConsole,
    ini: std::path::PathBuf,
    dir: std::path::PathBuf,
    pod_ip: String,
    admin: Credentials,
}

fn write_ini(
    path: &Path,
    config: &EndpointConfig,
    listen_addr: &str,
    dir: &Path,
    admin_user: &str,
) -> anyhow::Result<()> {
    let text = render_ini(config, listen_addr, dir, admin_user)?;
    write_atomic(path, text.as_bytes(), 0o600)
}

fn authorized(state: &PodState, headers: &axum::http::HeaderMap) -> bool {
    use sha2::{Digest, Sha256};
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    // Compared as digests, so the time taken says nothing about the password.
    Sha256::digest(given.as_bytes()) == Sha256::digest(state.admin.password.as_bytes())
}

type Reply = (axum::http::StatusCode, String);

async fn put_target(
    axum::extract::State(state): axum::extract::State<Arc<PodState>>,
    headers: axum::http::HeaderMap,
    axum::Json(target): axum::Json<Addr>,
) -> Reply {
    use axum::http::StatusCode;
    if !authorized(&state, &headers) {
        return (StatusCode::UNAUTHORIZED, "bad token".into());
    }
    let mut config = state.config.lock().await;
    let mut next = config.clone();
    next.target = target;
    let result = async {
        write_ini(
            &state.ini,
            &next,
            &state.pod_ip,
            &state.dir,
            &state.admin.user,
        )?;
        state.console.command("RELOAD").await
    }
    .await;
    match result {
        Ok(()) => {
            tracing::info!(target = %next.target, "repointed");
            *config = next;
            (
                StatusCode::OK,
                serde_json::to_string(&*config).unwrap_or_default(),
            )
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
    }
}

async fn get_target(
    axum::extract::State(state): axum::extract::State<Arc<PodState>>,
    headers: axum::http::HeaderMap,
) -> Reply {
    if !authorized(&state, &headers) {
        return (axum::http::StatusCode::UNAUTHORIZED, "bad token".into());
    }
    let config = state.config.lock().await;
    (
        axum::http::StatusCode::OK,
        serde_json::to_string(&*config).unwrap_or_default(),
    )
}
