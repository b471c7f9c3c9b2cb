//! A node agent standing in for the kubelet in the Kubernetes-mode tests. For each pod of
//! its namespace it binds the pod to its Node (there is no scheduler), starts the real
//! process the pod's container stands for, on the pod's own loopback address, and reports
//! the pod's status; it restarts a process that exits, and on a pod's deletion stops the
//! process and removes the pod as the kubelet does.
//!
//! Containers it knows:
//! - `…/postgres:<major>…`: PostgreSQL of that major from the toolchain; its data lives
//!   per volume claim (by the claim's UID, so a recreated claim starts empty), initialised
//!   like the official image does from `POSTGRES_USER` / `POSTGRES_PASSWORD`.
//! - command `pgflip …`: this crate's binary (the endpoint pod), with the container's
//!   environment resolved (values, Secret and ConfigMap keys, the pod's IP and name).
//!
//! Each pod gets a random 127.X.Y.Z, so parallel tests never collide on a port. Not
//! emulated: images, probes (Ready = the container port accepts TCP), resource limits,
//! volumes other than claims, init containers, networking across pods (loopback).

use k8s_openapi::api::core::v1::{ConfigMap, Container, Node, PersistentVolumeClaim, Pod, Secret};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use pgflip::adapters::run_as::RunAs;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const POLL: Duration = Duration::from_millis(150);

struct Running {
    uid: String,
    ip: String,
    child: Child,
    /// SIGINT for PostgreSQL (fast shutdown), SIGTERM otherwise.
    stop_signal: nix::sys::signal::Signal,
    ports: Vec<u16>,
    restarts: i32,
    ready: bool,
    started_at: String,
    image: String,
    container: String,
}

#[derive(Default)]
struct Pods {
    running: HashMap<String, Running>,
}

pub struct NodeAgent {
    stop: Arc<AtomicBool>,
    pods: Arc<Mutex<Pods>>,
    task: Option<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

struct Agent {
    client: kube::Client,
    namespace: String,
    node: String,
    dir: PathBuf,
    run_as: RunAs,
    pods: Arc<Mutex<Pods>>,
}

impl NodeAgent {
    pub async fn start(cluster: &super::kube::Cluster, namespace: &str) -> NodeAgent {
        let client = cluster.client();
        let node = format!("node-{}", pgflip::state::random_token(6).to_lowercase());
        let nodes: Api<Node> = Api::all(client.clone());
        let body: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": node},
        }))
        .unwrap();
        nodes.create(&PostParams::default(), &body).await.unwrap();
        let dir = tempfile::Builder::new()
            .prefix("pgflip-node-")
            .tempdir()
            .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let run_as = RunAs::detect().unwrap();
        run_as.check_reachable(dir.path()).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let pods = Arc::new(Mutex::new(Pods::default()));
        let agent = Agent {
            client,
            namespace: namespace.to_string(),
            node,
            dir: dir.path().to_path_buf(),
            run_as,
            pods: pods.clone(),
        };
        let stopping = stop.clone();
        let task = tokio::spawn(async move {
            while !stopping.load(Ordering::Relaxed) {
                if let Err(e) = agent.sync().await {
                    eprintln!("node agent: {e:#}");
                }
                tokio::time::sleep(POLL).await;
            }
        });
        NodeAgent {
            stop,
            pods,
            task: Some(task),
            _dir: dir,
        }
    }

    /// The pod's address while its process runs.
    pub fn pod_ip(&self, pod: &str) -> Option<String> {
        self.pods
            .lock()
            .unwrap()
            .running
            .get(pod)
            .map(|r| r.ip.clone())
    }

    /// Kills a pod's process abruptly (SIGKILL); the agent restarts it, like a crashed container.
    pub fn kill_process(&self, pod: &str) {
        if let Some(r) = self.pods.lock().unwrap().running.get_mut(pod) {
            let _ = r.child.kill();
        }
    }
}

impl Drop for NodeAgent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.task.take() {
            t.abort();
        }
        let mut pods = self.pods.lock().unwrap();
        for (_, mut r) in pods.running.drain() {
            stop_process(&mut r, Duration::from_secs(5));
        }
    }
}

fn stop_process(r: &mut Running, grace: Duration) {
    let pid = nix::unistd::Pid::from_raw(r.child.id() as i32);
    let _ = nix::sys::signal::kill(pid, r.stop_signal);
    let deadline = std::time::Instant::now() + grace;
    while matches!(r.child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = r.child.kill();
    let _ = r.child.wait();
}

/// A loopback address no other pod (of any test) listens on.
fn fresh_ip() -> String {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    loop {
        let ip = format!(
            "127.{}.{}.{}",
            rng.gen_range(64..=127),
            rng.gen_range(1..=254),
            rng.gen_range(1..=254)
        );
        let free = [5432u16, 8432]
            .iter()
            .all(|p| std::net::TcpListener::bind((ip.as_str(), *p)).is_ok());
        if free {
            return ip;
        }
    }
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}

impl Agent {
    async fn sync(&self) -> anyhow::Result<()> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let list = api.list(&ListParams::default()).await?;
        let mut seen = Vec::new();
        for pod in list.items {
            let name = pod.metadata.name.clone().unwrap_or_default();
            let uid = pod.metadata.uid.clone().unwrap_or_default();
            seen.push(name.clone());
            if pod.metadata.deletion_timestamp.is_some() {
                let taken = self.pods.lock().unwrap().running.remove(&name);
                if let Some(mut r) = taken {
                    let grace = Duration::from_secs(
                        pod.spec
                            .as_ref()
                            .and_then(|s| s.termination_grace_period_seconds)
                            .unwrap_or(30)
                            .clamp(0, 30) as u64,
                    );
                    tokio::task::spawn_blocking(move || stop_process(&mut r, grace)).await?;
                }
                let _ = api
                    .delete(
                        &name,
                        &DeleteParams {
                            grace_period_seconds: Some(0),
                            ..Default::default()
                        },
                    )
                    .await;
                continue;
            }
            if pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.as_ref())
                .is_none()
            {
                let binding = serde_json::json!({
                    "apiVersion": "v1", "kind": "Binding",
                    "metadata": {"name": name},
                    "target": {"apiVersion": "v1", "kind": "Node", "name": self.node},
                });
                api.create_subresource::<_, serde_json::Value>(
                    "binding",
                    &name,
                    &PostParams::default(),
                    &binding,
                )
                .await?;
                continue;
            }
            let known = {
                let pods = self.pods.lock().unwrap();
                pods.running.get(&name).map(|r| r.uid == uid)
            };
            match known {
                Some(true) => self.check(&api, &pod).await?,
                Some(false) | None => {
                    // A pod of the same name but a new UID: its predecessor's process goes.
                    let stale = self.pods.lock().unwrap().running.remove(&name);
                    if let Some(mut r) = stale {
                        tokio::task::spawn_blocking(move || {
                            stop_process(&mut r, Duration::from_secs(10))
                        })
                        .await?;
                    }
                    match self.start(&pod, None, 0).await {
                        Ok(r) => {
                            self.pods.lock().unwrap().running.insert(name.clone(), r);
                            self.report(&api, &name).await?;
                        }
                        Err(e) => eprintln!("node agent: cannot run pod {name}: {e:#}"),
                    }
                }
            }
        }
        let gone: Vec<Running> = {
            let mut pods = self.pods.lock().unwrap();
            let names: Vec<String> = pods
                .running
                .keys()
                .filter(|n| !seen.contains(n))
                .cloned()
                .collect();
            names
                .iter()
                .filter_map(|n| pods.running.remove(n))
                .collect()
        };
        for mut r in gone {
            tokio::task::spawn_blocking(move || stop_process(&mut r, Duration::from_secs(10)))
                .await?;
        }
        Ok(())
    }

    /// Restarts an exited process; reports a change of readiness.
    async fn check(&self, api: &Api<Pod>, pod: &Pod) -> anyhow::Result<()> {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let (exited, ip, restarts) = {
            let mut pods = self.pods.lock().unwrap();
            let r = pods.running.get_mut(&name).unwrap();
            (
                !matches!(r.child.try_wait(), Ok(None)),
                r.ip.clone(),
                r.restarts,
            )
        };
        if exited {
            let r = self.start(pod, Some(ip), restarts + 1).await?;
            self.pods.lock().unwrap().running.insert(name.clone(), r);
            return self.report(api, &name).await;
        }
        let (ip, ports, was) = {
            let pods = self.pods.lock().unwrap();
            let r = &pods.running[&name];
            (r.ip.clone(), r.ports.clone(), r.ready)
        };
        let mut ready = true;
        for port in ports {
            let connect = tokio::net::TcpStream::connect((ip.as_str(), port));
            ready &= matches!(
                tokio::time::timeout(Duration::from_millis(200), connect).await,
                Ok(Ok(_))
            );
        }
        if ready != was {
            if let Some(r) = self.pods.lock().unwrap().running.get_mut(&name) {
                r.ready = ready;
            }
            self.report(api, &name).await?;
        }
        Ok(())
    }

    async fn report(&self, api: &Api<Pod>, name: &str) -> anyhow::Result<()> {
        let status = {
            let pods = self.pods.lock().unwrap();
            let Some(r) = pods.running.get(name) else {
                return Ok(());
            };
            let flag = |b: bool| if b { "True" } else { "False" };
            let t = now();
            serde_json::json!({
                "status": {
                    "phase": "Running",
                    "hostIP": "127.0.0.1",
                    "podIP": r.ip,
                    "podIPs": [{"ip": r.ip}],
                    "startTime": r.started_at,
                    "conditions": [
                        {"type": "PodScheduled", "status": "True", "lastTransitionTime": t},
                        {"type": "Initialized", "status": "True", "lastTransitionTime": t},
                        {"type": "ContainersReady", "status": flag(r.ready), "lastTransitionTime": t},
                        {"type": "Ready", "status": flag(r.ready), "lastTransitionTime": t},
                    ],
                    "containerStatuses": [{
                        "name": r.container,
                        "image": r.image,
                        "imageID": "",
                        "ready": r.ready,
                        "started": true,
                        "restartCount": r.restarts,
                        "state": {"running": {"startedAt": r.started_at}},
                    }],
                }
            })
        };
        api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await?;
        Ok(())
    }

    async fn start(&self, pod: &Pod, ip: Option<String>, restarts: i32) -> anyhow::Result<Running> {
        let spec = pod.spec.as_ref().unwrap();
        let container = &spec.containers[0];
        let name = pod.metadata.name.clone().unwrap();
        let ip = ip.unwrap_or_else(fresh_ip);
        let pod_dir = self.dir.join("pods").join(&name);
        std::fs::create_dir_all(&pod_dir)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&pod_dir, std::fs::Permissions::from_mode(0o700))?;
        self.run_as.own(&pod_dir)?;
        let env = self.environment(pod, container, &ip).await?;
        let image = container.image.clone().unwrap_or_default();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(pod_dir.join("container.log"))?;
        let ports: Vec<u16> = container
            .ports
            .iter()
            .flatten()
            .map(|p| p.container_port as u16)
            .collect();
        let (mut cmd, stop_signal) = if let Some(major) = postgres_major(&image) {
            (
                self.postgres(pod, container, &env, &ip, major, &pod_dir)
                    .await?,
                nix::sys::signal::Signal::SIGINT,
            )
        } else if container
            .command
            .as_ref()
            .and_then(|c| c.first())
            .map(String::as_str)
            == Some("pgflip")
        {
            let mut cmd = self.run_as.command(Path::new(env!("CARGO_BIN_EXE_pgflip")));
            cmd.args(&container.command.as_ref().unwrap()[1..])
                .args(container.args.iter().flatten())
                .envs(env.iter().map(|(k, v)| (k, v)))
                .env(
                    "PGFLIP_TOOLCHAIN",
                    Path::new(env!("CARGO_MANIFEST_DIR")).join(".toolchain"),
                )
                .env("TMPDIR", &pod_dir)
                .env(
                    "RUST_LOG",
                    std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
                );
            (cmd, nix::sys::signal::Signal::SIGTERM)
        } else {
            anyhow::bail!("no way to run image {image:?}");
        };
        let child = cmd.stdout(log.try_clone()?).stderr(log).spawn()?;
        Ok(Running {
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            ip,
            child,
            stop_signal,
            ports,
            restarts,
            ready: false,
            started_at: now(),
            image,
            container: container.name.clone(),
        })
    }

    /// The container's environment, resolved as the kubelet does.
    async fn environment(
        &self,
        pod: &Pod,
        container: &Container,
        ip: &str,
    ) -> anyhow::Result<Vec<(String, String)>> {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
        let maps: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.namespace);
        let mut out = Vec::new();
        for e in container.env.iter().flatten() {
            let value = if let Some(v) = &e.value {
                v.clone()
            } else if let Some(from) = &e.value_from {
                if let Some(s) = &from.secret_key_ref {
                    let secret = secrets.get(&s.name).await?;
                    let bytes = secret
                        .data
                        .as_ref()
                        .and_then(|d| d.get(&s.key))
                        .ok_or_else(|| anyhow::anyhow!("secret {} has no {}", s.name, s.key))?;
                    String::from_utf8(bytes.0.clone())?
                } else if let Some(c) = &from.config_map_key_ref {
                    let map = maps.get(&c.name).await?;
                    map.data
                        .as_ref()
                        .and_then(|d| d.get(&c.key))
                        .cloned()
                        .ok_or_else(|| anyhow::anyhow!("configmap {} has no {}", c.name, c.key))?
                } else if let Some(f) = &from.field_ref {
                    match f.field_path.as_str() {
                        "status.podIP" => ip.to_string(),
                        "metadata.name" => pod.metadata.name.clone().unwrap_or_default(),
                        "metadata.namespace" => self.namespace.clone(),
                        other => anyhow::bail!("fieldRef {other} is not emulated"),
                    }
                } else {
                    anyhow::bail!("env {} has a source the agent does not emulate", e.name);
                }
            } else {
                String::new()
            };
            out.push((e.name.clone(), value));
        }
        Ok(out)
    }

    /// PostgreSQL as the official image runs it, data on the pod's volume claim.
    async fn postgres(
        &self,
        pod: &Pod,
        container: &Container,
        env: &[(String, String)],
        ip: &str,
        major: u32,
        pod_dir: &Path,
    ) -> anyhow::Result<Command> {
        let claims: Api<PersistentVolumeClaim> =
            Api::namespaced(self.client.clone(), &self.namespace);
        let claim = pod
            .spec
            .as_ref()
            .unwrap()
            .volumes
            .iter()
            .flatten()
            .find_map(|v| v.persistent_volume_claim.as_ref())
            .ok_or_else(|| anyhow::anyhow!("a PostgreSQL pod without a volume claim"))?;
        let claim_uid = claims
            .get(&claim.claim_name)
            .await?
            .metadata
            .uid
            .unwrap_or_default();
        let volume = self.dir.join("volumes").join(claim_uid);
        let data = volume.join("pgdata");
        let bin = pgflip::toolchain::Toolchain::discover().server_bin(major)?;
        let get = |k: &str| {
            env.iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        if !data.join("PG_VERSION").is_file() {
            std::fs::create_dir_all(&volume)?;
            self.run_as.own(&volume)?;
            let pwfile = volume.join("pwfile");
            std::fs::write(&pwfile, get("POSTGRES_PASSWORD"))?;
            self.run_as.own(&pwfile)?;
            let user = match get("POSTGRES_USER") {
                u if u.is_empty() => "postgres".to_string(),
                u => u,
            };
            pgflip::adapters::run_as::run(
                self.run_as
                    .command(&bin.join("initdb"))
                    .arg("-D")
                    .arg(&data)
                    .arg("-U")
                    .arg(&user)
                    .arg(format!("--pwfile={}", pwfile.display()))
                    .args(["-A", "scram-sha-256", "--auth-local=trust", "-E", "UTF8"])
                    .args(["--no-locale", "--no-sync"]),
            )?;
            let _ = std::fs::remove_file(&pwfile);
            std::fs::write(
                data.join("pg_hba.conf"),
                "local all all trust\nhost all all 127.0.0.0/8 scram-sha-256\nhost replication all 127.0.0.0/8 scram-sha-256\n",
            )?;
        }
        let mut cmd = self.run_as.command(&bin.join("postgres"));
        cmd.arg("-D")
            .arg(&data)
            .args(container.args.iter().flatten())
            .arg("-c")
            .arg(format!("listen_addresses={ip}"))
            .args(["-c", "port=5432"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", pod_dir.display()));
        Ok(cmd)
    }
}

/// `postgres:16`, `registry.example/postgres:16-alpine` → 16.
fn postgres_major(image: &str) -> Option<u32> {
    let last = image.rsplit('/').next()?;
    let tag = last.strip_prefix("postgres:")?;
    let digits: String = tag.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}
