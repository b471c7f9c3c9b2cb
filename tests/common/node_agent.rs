//! A node agent standing in for the kubelet in the Kubernetes-mode tests. It registers a
//! Ready Node, binds every unscheduled pod of its namespace to it (there is no scheduler),
//! starts the real process the pod's container stands for, on the pod's own loopback
//! address, and reports the pod's status (phase, IPs, conditions, container status); it
//! restarts a process that exits (restartPolicy Always: same pod, same address, restart
//! count bumped), and on a pod's deletion stops the process (the pod's grace period, then
//! SIGKILL) and removes the pod as the kubelet does.
//!
//! Containers it knows (the pod's first container):
//! - image `…/postgres:<major>…`: PostgreSQL of that major from the toolchain, run as the
//!   unprivileged user. Its data lives per volume claim (by the claim's UID: a restarted pod
//!   of a StatefulSet keeps it, a recreated claim starts empty), initialised like the official
//!   image does from `POSTGRES_USER` / `POSTGRES_PASSWORD` / `POSTGRES_DB`; the container's
//!   `args` (`-c key=value`) are passed on. Ready once it accepts connections on 5432
//!   (as `pg_isready` decides: not while starting up or recovering).
//! - command `pgflip …` (the endpoint pod), or image `…/pgflip:<tag>` with `args` (its
//!   entrypoint is pgflip: the controller pods): this crate's binary, run as the
//!   unprivileged user, with the container's environment resolved (values, Secret and
//!   ConfigMap keys, the pod's IP, name and namespace) and `$(VAR)` references in command
//!   and args expanded as the kubelet does, plus `KUBECONFIG` (standing in for the service
//!   account mount), `PGFLIP_TOOLCHAIN` (the image's filesystem), `TMPDIR`, `RUST_LOG`.
//!   Ready once every declared container port accepts TCP.
//!
//! Anything else stays Pending (said once on stderr).
//!
//! Each pod gets a random 127.X.Y.Z (X in 64..=127), checked free, so parallel tests never
//! collide on a port. A pod's process runs in its own process group, and the group is what
//! dies (like a container's PID namespace) on a crash, a kill or a stop.
//!
//! Not emulated: images, probes other than the above, resource limits, volumes other than
//! claims (no mounts: Secrets and ConfigMaps reach a container through its env only), init
//! and sidecar containers, more than one container, networking across pods (loopback),
//! Services (no kube-proxy), crash-loop back-off, node heartbeats.

use k8s_openapi::api::core::v1::{ConfigMap, Container, Node, PersistentVolumeClaim, Pod, Secret};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use pgflip_engine::run_as::RunAs;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const POLL: Duration = Duration::from_millis(150);
/// How often a Ready container is probed again (a not-Ready one: every poll).
const PROBE_READY: Duration = Duration::from_secs(1);
const POSTGRES_PORT: u16 = 5432;

/// How the agent runs what it runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// The binary for containers whose command is `pgflip`: `$PGFLIP_BIN`, else the test
    /// crate's own build of it.
    pub pgflip_bin: PathBuf,
    /// The kubeconfig pgflip processes get, standing in for their ServiceAccount's token
    /// (e.g. [`super::kube::Cluster::controller_kubeconfig`]); by default the admin's.
    pub kubeconfig: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            pgflip_bin: std::env::var_os("PGFLIP_BIN")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_pgflip"))),
            kubeconfig: None,
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Postgres,
    Pgflip,
}

struct Running {
    uid: String,
    ip: String,
    child: Child,
    kind: Kind,
    /// PostgreSQL's superuser (for the readiness check's startup packet).
    user: String,
    ports: Vec<u16>,
    restarts: i32,
    ready: bool,
    probed: Option<Instant>,
    started_at: String,
    /// Exit code and time of the previous run, for `lastState`.
    last_exit: Option<(i32, String)>,
    /// Stopping for the pod's deletion: SIGKILL at this instant.
    kill_at: Option<Instant>,
    /// When this run started, to tell a crash loop.
    since: Instant,
    /// The process has exited (and its group is gone): restart at this instant.
    restart_at: Option<Instant>,
    image: String,
    container: String,
}

impl Running {
    /// Signals the main process while it runs (once reaped, its PID may be anyone's).
    fn signal(&mut self, signal: Signal) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = kill(Pid::from_raw(self.child.id() as i32), signal);
        }
    }

    fn stop_signal(&self) -> Signal {
        // PostgreSQL: SIGINT is the fast shutdown (SIGTERM would wait for clients).
        match self.kind {
            Kind::Postgres => Signal::SIGINT,
            Kind::Pgflip => Signal::SIGTERM,
        }
    }
}

#[derive(Default)]
struct Pods {
    running: HashMap<String, Running>,
    /// Why a pod cannot run, by pod UID, so it is said once.
    complaints: HashMap<String, String>,
}

pub struct NodeAgent {
    node: String,
    stop: Arc<AtomicBool>,
    pods: Arc<Mutex<Pods>>,
    task: Option<tokio::task::JoinHandle<()>>,
    dir: tempfile::TempDir,
}

struct Agent {
    client: kube::Client,
    namespace: String,
    node: String,
    dir: PathBuf,
    run_as: RunAs,
    options: Options,
    kubeconfig: PathBuf,
    pods: Arc<Mutex<Pods>>,
}

impl NodeAgent {
    /// An agent for the pods of `namespace`, with [`Options::default`].
    pub async fn start(cluster: &super::kube::Cluster, namespace: &str) -> NodeAgent {
        NodeAgent::start_with(cluster, namespace, Options::default()).await
    }

    pub async fn start_with(
        cluster: &super::kube::Cluster,
        namespace: &str,
        options: Options,
    ) -> NodeAgent {
        let client = cluster.client();
        let node = format!("node-{}", pgflip_engine::random::token(6).to_lowercase());
        register_node(&client, &node).await;
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
        let kubeconfig = options
            .kubeconfig
            .clone()
            .unwrap_or_else(|| cluster.kubeconfig().to_path_buf());
        let agent = Agent {
            client,
            namespace: namespace.to_string(),
            node: node.clone(),
            dir: dir.path().to_path_buf(),
            run_as,
            options,
            kubeconfig,
            pods: pods.clone(),
        };
        let stopping = stop.clone();
        let task = tokio::spawn(async move {
            while !stopping.load(Ordering::Relaxed) {
                if let Err(e) = agent.sync().await {
                    eprintln!("node agent {}: {e:#}", agent.node);
                }
                tokio::time::sleep(POLL).await;
            }
        });
        NodeAgent {
            node,
            stop,
            pods,
            task: Some(task),
            dir,
        }
    }

    /// The name of the agent's Node.
    pub fn node_name(&self) -> &str {
        &self.node
    }

    /// The pod's address while the agent runs its process.
    pub fn pod_ip(&self, pod: &str) -> Option<String> {
        self.pods
            .lock()
            .unwrap()
            .running
            .get(pod)
            .map(|r| r.ip.clone())
    }

    /// The last `lines` lines of each container log this agent has written (pods that are
    /// gone included), for a failing test to show.
    pub fn logs(&self, lines: usize) -> String {
        let mut out = String::new();
        let Ok(entries) = std::fs::read_dir(self.dir.path().join("pods")) else {
            return out;
        };
        let mut dirs: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        dirs.sort();
        for dir in dirs {
            let name = dir.file_name().unwrap_or_default().to_string_lossy();
            let log = super::tail(&dir.join("container.log"), lines);
            out.push_str(&format!("--- pod {name} ---\n{log}\n"));
        }
        out
    }

    /// Kills a pod's processes abruptly (SIGKILL to the whole group), like a crashed
    /// container; the agent restarts it in the same pod, on the same address.
    pub fn kill_process(&self, pod: &str) {
        if let Some(r) = self.pods.lock().unwrap().running.get_mut(pod)
            && matches!(r.child.try_wait(), Ok(None))
        {
            let pid = r.child.id();
            let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
            // Reaped by the agent's next poll, which restarts it; the group is gone first,
            // so the restarted server finds no leftover of the old one.
            wait_group_gone(pid, Duration::from_secs(5));
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

async fn register_node(client: &kube::Client, node: &str) {
    let nodes: Api<Node> = Api::all(client.clone());
    let body: Node = serde_json::from_value(serde_json::json!({
        "metadata": {"name": node, "labels": {"kubernetes.io/hostname": node}},
    }))
    .unwrap();
    nodes.create(&PostParams::default(), &body).await.unwrap();
    let t = now();
    let status = serde_json::json!({"status": {
        "conditions": [{
            "type": "Ready", "status": "True", "reason": "KubeletReady",
            "message": "pgflip test node agent", "lastHeartbeatTime": t, "lastTransitionTime": t,
        }],
        "addresses": [
            {"type": "InternalIP", "address": "127.0.0.1"},
            {"type": "Hostname", "address": node},
        ],
        "capacity": {"cpu": "2", "memory": "4Gi", "pods": "110"},
        "allocatable": {"cpu": "2", "memory": "4Gi", "pods": "110"},
    }});
    nodes
        .patch_status(node, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
}

/// Stops a process as the kubelet stops a container: its stop signal, up to `grace`, then
/// SIGKILL to the whole group. Blocking.
fn stop_process(r: &mut Running, grace: Duration) {
    r.signal(r.stop_signal());
    let deadline = Instant::now() + grace;
    while matches!(r.child.try_wait(), Ok(None)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    finish(r);
}

/// The main process has exited or must go now: SIGKILL to its group, reap it, and wait
/// until nothing of the group is left. Returns the exit code (128 + signal if killed).
fn finish(r: &mut Running) -> i32 {
    if matches!(r.child.try_wait(), Ok(None)) {
        let _ = killpg(Pid::from_raw(r.child.id() as i32), Signal::SIGKILL);
    }
    let status = r.child.wait().ok();
    wait_group_gone(r.child.id(), Duration::from_secs(5));
    status.map_or(-1, |s| {
        use std::os::unix::process::ExitStatusExt;
        s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0))
    })
}

/// Waits until no live (non-zombie) process is in process group `pgid`, killing what is
/// left. (A process group's ID is not reused while the group has members, so this never
/// signals a stranger.)
fn wait_group_gone(pgid: u32, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while group_alive(pgid) && Instant::now() < deadline {
        let _ = killpg(Pid::from_raw(pgid as i32), Signal::SIGKILL);
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn group_alive(pgid: u32) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries.flatten().any(|e| {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            return false;
        };
        // pid (comm) state ppid pgrp …; comm may hold spaces and parentheses.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            return false;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        fields.len() > 2 && fields[0] != "Z" && fields[2] == pgid.to_string()
    })
}

/// A loopback address on which every port in `ports` is free.
fn fresh_ip(ports: &[u16]) -> String {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    loop {
        let ip = format!(
            "127.{}.{}.{}",
            rng.gen_range(64..=127),
            rng.gen_range(1..=254),
            rng.gen_range(1..=254)
        );
        if ports
            .iter()
            .all(|p| std::net::TcpListener::bind((ip.as_str(), *p)).is_ok())
        {
            return ip;
        }
    }
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}

fn container_kind(container: &Container) -> Option<(Kind, Option<u32>)> {
    let image = container.image.as_deref().unwrap_or_default();
    if let Some(major) = postgres_major(image) {
        return Some((Kind::Postgres, Some(major)));
    }
    pgflip_argv(container).map(|_| (Kind::Pgflip, None))
}

/// The arguments of a pgflip container: after `pgflip` in its command, or its args alone
/// when it has no command and runs pgflip's image (whose entrypoint is pgflip).
fn pgflip_argv(container: &Container) -> Option<Vec<String>> {
    let args = container.args.iter().flatten().cloned();
    match container.command.as_deref() {
        Some([first, rest @ ..]) if first == "pgflip" => {
            Some(rest.iter().cloned().chain(args).collect())
        }
        None if image_name(container.image.as_deref().unwrap_or_default()) == "pgflip" => {
            Some(args.collect())
        }
        _ => None,
    }
}

/// `ghcr.io/pgflip/pgflip:0.1.0` → `pgflip`.
fn image_name(image: &str) -> &str {
    let last = image.rsplit('/').next().unwrap_or(image);
    last.split([':', '@']).next().unwrap_or(last)
}

/// `$(NAME)` replaced by the variable's value when it is defined, `$$` by `$`, as the
/// kubelet expands a container's command and args.
pub fn expand(text: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        if let Some(after) = rest.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some((name, after)) = rest.strip_prefix("$(").and_then(|r| r.split_once(')'))
            && let Some((_, value)) = env.iter().rev().find(|(n, _)| n == name)
        {
            out.push_str(value);
            rest = after;
        } else {
            out.push('$');
            rest = &rest[1..];
        }
    }
    out.push_str(rest);
    out
}

impl Agent {
    async fn sync(&self) -> anyhow::Result<()> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let list = api.list(&ListParams::default()).await?;
        let mut seen = Vec::new();
        for pod in list.items {
            let name = pod.metadata.name.clone().unwrap_or_default();
            let node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
            if node.is_some_and(|n| n != self.node) {
                continue; // another node's
            }
            seen.push(name.clone());
            let result = if pod.metadata.deletion_timestamp.is_some() {
                self.terminate(&api, &pod).await
            } else if node.is_none() {
                self.bind(&api, &name).await
            } else {
                self.run(&api, &pod).await
            };
            if let Err(e) = result {
                eprintln!("node agent {}: pod {name}: {e:#}", self.node);
            }
        }
        // Pods gone without the agent seeing their deletion (deleted with grace 0).
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

    async fn bind(&self, api: &Api<Pod>, name: &str) -> anyhow::Result<()> {
        let binding = serde_json::json!({
            "apiVersion": "v1", "kind": "Binding",
            "metadata": {"name": name},
            "target": {"apiVersion": "v1", "kind": "Node", "name": self.node},
        });
        api.create_subresource::<_, serde_json::Value>(
            "binding",
            name,
            &PostParams::default(),
            &binding,
        )
        .await?;
        Ok(())
    }

    /// A pod being deleted: its stop signal once, SIGKILL after the grace period, and
    /// once the process is gone the pod itself (grace 0, this very pod only).
    async fn terminate(&self, api: &Api<Pod>, pod: &Pod) -> anyhow::Result<()> {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let taken = {
            let mut pods = self.pods.lock().unwrap();
            pods.complaints.remove(&uid);
            match pods.running.get_mut(&name) {
                Some(r) if r.uid == uid => {
                    if r.kill_at.is_none() {
                        let grace = pod
                            .metadata
                            .deletion_grace_period_seconds
                            .or(pod
                                .spec
                                .as_ref()
                                .and_then(|s| s.termination_grace_period_seconds))
                            .unwrap_or(30)
                            .clamp(0, 60) as u64;
                        r.signal(r.stop_signal());
                        r.kill_at = Some(Instant::now() + Duration::from_secs(grace));
                    }
                    let exited = !matches!(r.child.try_wait(), Ok(None));
                    if !exited && Instant::now() < r.kill_at.unwrap() {
                        return Ok(()); // still stopping
                    }
                    pods.running.remove(&name)
                }
                // A predecessor of the same name: not this pod's process.
                Some(_) => pods.running.remove(&name),
                None => None,
            }
        };
        if let Some(mut r) = taken {
            tokio::task::spawn_blocking(move || finish(&mut r)).await?;
        }
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(uid),
                resource_version: None,
            }),
            ..Default::default()
        };
        match api.delete(&name, &params).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// A pod bound to this node: start its process, or watch the one running.
    async fn run(&self, api: &Api<Pod>, pod: &Pod) -> anyhow::Result<()> {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let known = {
            let pods = self.pods.lock().unwrap();
            pods.running.get(&name).map(|r| r.uid == uid)
        };
        if known == Some(true) {
            return self.check(api, pod).await;
        }
        // A pod of the same name but a new UID: its predecessor's process goes first.
        let stale = self.pods.lock().unwrap().running.remove(&name);
        if let Some(mut r) = stale {
            tokio::task::spawn_blocking(move || stop_process(&mut r, Duration::from_secs(10)))
                .await?;
        }
        match self.start(pod, None, 0, None).await {
            Ok(r) => {
                let mut pods = self.pods.lock().unwrap();
                pods.complaints.remove(&uid);
                pods.running.insert(name.clone(), r);
            }
            Err(e) => {
                let message = format!("{e:#}");
                let mut pods = self.pods.lock().unwrap();
                if pods.complaints.get(&uid) != Some(&message) {
                    eprintln!(
                        "node agent {}: pod {name} stays Pending: {message}",
                        self.node
                    );
                    pods.complaints.insert(uid, message);
                }
                return Ok(());
            }
        }
        self.report(api, &name).await
    }

    /// Restarts an exited process; probes readiness and reports a change.
    async fn check(&self, api: &Api<Pod>, pod: &Pod) -> anyhow::Result<()> {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let (exited, restart_at) = {
            let mut pods = self.pods.lock().unwrap();
            let r = pods.running.get_mut(&name).unwrap();
            (!matches!(r.child.try_wait(), Ok(None)), r.restart_at)
        };
        if let Some(at) = restart_at {
            if Instant::now() < at {
                return Ok(()); // backing off
            }
            let old = self.pods.lock().unwrap().running.remove(&name).unwrap();
            let r = self
                .start(
                    pod,
                    Some(old.ip.clone()),
                    old.restarts + 1,
                    old.last_exit.clone(),
                )
                .await;
            let r = match r {
                Ok(r) => r,
                Err(e) => {
                    // Tried again on a later poll, on the same address.
                    self.pods.lock().unwrap().running.insert(name.clone(), old);
                    return Err(e);
                }
            };
            self.pods.lock().unwrap().running.insert(name.clone(), r);
            return self.report(api, &name).await;
        }
        if exited {
            // The container died: all of it goes; a restart follows at once the first
            // time, after a doubling back-off (up to 5 s) while it keeps dying quickly.
            let old = self.pods.lock().unwrap().running.remove(&name).unwrap();
            let (mut old, code) = tokio::task::spawn_blocking(move || {
                let mut old = old;
                let code = finish(&mut old);
                (old, code)
            })
            .await?;
            let quick = old.since.elapsed() < Duration::from_secs(5);
            let delay = match (quick, old.restarts) {
                (true, n) if n > 0 => Duration::from_millis(500 << (n - 1).min(4)),
                _ => Duration::ZERO,
            }
            .min(Duration::from_secs(5));
            eprintln!(
                "node agent {}: pod {name}: container exited ({code}), restarting in {delay:?}",
                self.node
            );
            old.last_exit = Some((code, now()));
            old.ready = false;
            old.restart_at = Some(Instant::now() + delay);
            self.pods.lock().unwrap().running.insert(name.clone(), old);
            if delay.is_zero() {
                return Ok(()); // restarted on the next poll
            }
            return self.report(api, &name).await;
        }
        let probe = {
            let pods = self.pods.lock().unwrap();
            let r = &pods.running[&name];
            let due = !r.ready || r.probed.is_none_or(|t| t.elapsed() >= PROBE_READY);
            due.then(|| {
                (
                    r.ip.clone(),
                    r.ports.clone(),
                    r.kind,
                    r.user.clone(),
                    r.ready,
                )
            })
        };
        let Some((ip, ports, kind, user, was)) = probe else {
            return Ok(());
        };
        let mut ready = true;
        for port in ports {
            ready &= if kind == Kind::Postgres && port == POSTGRES_PORT {
                postgres_accepts(&ip, port, &user).await
            } else {
                tcp_accepts(&ip, port).await
            };
        }
        let changed = {
            let mut pods = self.pods.lock().unwrap();
            match pods.running.get_mut(&name) {
                Some(r) => {
                    r.probed = Some(Instant::now());
                    r.ready = ready;
                    ready != was
                }
                None => false,
            }
        };
        if changed {
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
            let mut container = serde_json::json!({
                "name": r.container,
                "image": r.image,
                "imageID": "",
                "containerID": format!("pgflip-node://{}", r.child.id()),
                "ready": r.ready,
                "started": true,
                "restartCount": r.restarts,
                "state": {"running": {"startedAt": r.started_at}},
            });
            if r.restart_at.is_some() {
                container["state"] = serde_json::json!({"waiting": {
                    "reason": "CrashLoopBackOff",
                    "message": "back-off restarting the failed container",
                }});
            }
            if let Some((code, at)) = &r.last_exit {
                container["lastState"] = serde_json::json!({"terminated": {
                    "exitCode": code, "reason": "Error", "finishedAt": at,
                }});
            }
            serde_json::json!({
                "status": {
                    "phase": "Running",
                    "hostIP": "127.0.0.1",
                    "hostIPs": [{"ip": "127.0.0.1"}],
                    "podIP": r.ip,
                    "podIPs": [{"ip": r.ip}],
                    "startTime": r.started_at,
                    "conditions": [
                        {"type": "PodScheduled", "status": "True", "lastTransitionTime": t},
                        {"type": "Initialized", "status": "True", "lastTransitionTime": t},
                        {"type": "ContainersReady", "status": flag(r.ready), "lastTransitionTime": t},
                        {"type": "Ready", "status": flag(r.ready), "lastTransitionTime": t},
                    ],
                    "containerStatuses": [container],
                }
            })
        };
        api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await?;
        Ok(())
    }

    async fn start(
        &self,
        pod: &Pod,
        ip: Option<String>,
        restarts: i32,
        last_exit: Option<(i32, String)>,
    ) -> anyhow::Result<Running> {
        let spec = pod.spec.as_ref().unwrap();
        let container = &spec.containers[0];
        let name = pod.metadata.name.clone().unwrap();
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let image = container.image.clone().unwrap_or_default();
        let Some((kind, major)) = container_kind(container) else {
            anyhow::bail!(
                "the node agent runs only postgres:<major> images and pgflip commands, not {image:?}"
            );
        };
        let mut ports: Vec<u16> = container
            .ports
            .iter()
            .flatten()
            .map(|p| p.container_port as u16)
            .collect();
        if kind == Kind::Postgres && !ports.contains(&POSTGRES_PORT) {
            ports.push(POSTGRES_PORT);
        }
        let ip = ip.unwrap_or_else(|| {
            let mut probe = ports.clone();
            probe.push(POSTGRES_PORT);
            fresh_ip(&probe)
        });
        // One directory per pod object: its socket, TMPDIR and log.
        let pod_dir = self
            .dir
            .join("pods")
            .join(format!("{name}-{}", &uid[..uid.len().min(8)]));
        std::fs::create_dir_all(&pod_dir)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&pod_dir, std::fs::Permissions::from_mode(0o700))?;
        self.run_as.own(&pod_dir)?;
        let env = self.environment(pod, container, &ip).await?;
        let get = |k: &str| {
            env.iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.clone())
                .filter(|v| !v.is_empty())
        };
        let user = get("POSTGRES_USER").unwrap_or_else(|| "postgres".into());
        let mut cmd = match kind {
            Kind::Postgres => {
                self.postgres(pod, container, &env, &ip, major.unwrap(), &pod_dir)
                    .await?
            }
            Kind::Pgflip => {
                let mut cmd = self.run_as.command(&self.options.pgflip_bin);
                cmd.args(
                    pgflip_argv(container)
                        .unwrap()
                        .iter()
                        .map(|a| expand(a, &env)),
                )
                .envs(env.iter().map(|(k, v)| (k, v)))
                .env("KUBECONFIG", &self.kubeconfig)
                .env(
                    "PGFLIP_TOOLCHAIN",
                    Path::new(env!("CARGO_MANIFEST_DIR")).join(".toolchain"),
                )
                .env("TMPDIR", &pod_dir)
                .env(
                    "RUST_LOG",
                    std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
                );
                cmd
            }
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(pod_dir.join("container.log"))?;
        let child = cmd.stdout(log.try_clone()?).stderr(log).spawn()?;
        Ok(Running {
            uid,
            ip,
            child,
            kind,
            user,
            ports,
            restarts,
            ready: false,
            probed: None,
            started_at: now(),
            last_exit,
            kill_at: None,
            since: Instant::now(),
            restart_at: None,
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
                        "status.hostIP" => "127.0.0.1".to_string(),
                        "metadata.name" => pod.metadata.name.clone().unwrap_or_default(),
                        "metadata.namespace" => self.namespace.clone(),
                        "metadata.uid" => pod.metadata.uid.clone().unwrap_or_default(),
                        "spec.nodeName" => self.node.clone(),
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
        let bin = pgflip_engine::toolchain::Toolchain::discover()
            .await
            .server_bin(major)?;
        if !data.join("PG_VERSION").is_file() {
            // initdb takes a second or so: off the runtime's threads.
            let (run_as, bin, volume, env) = (self.run_as, bin.clone(), volume, env.to_vec());
            tokio::task::spawn_blocking(move || initdb(run_as, &bin, &volume, &env)).await??;
        }
        let mut cmd = self.run_as.command(&bin.join("postgres"));
        cmd.arg("-D")
            .arg(&data)
            .args(container.args.iter().flatten())
            .arg("-c")
            .arg(format!("listen_addresses={ip}"))
            .arg("-c")
            .arg(format!("port={POSTGRES_PORT}"))
            .arg("-c")
            .arg(format!("unix_socket_directories={}", pod_dir.display()));
        Ok(cmd)
    }
}

/// What the official image's entrypoint does on an empty volume: initdb with the
/// superuser and password from the environment, password logins from anywhere (here:
/// loopback), and the database `POSTGRES_DB` (default: the user's name).
fn initdb(
    run_as: RunAs,
    bin: &Path,
    volume: &Path,
    env: &[(String, String)],
) -> anyhow::Result<()> {
    use anyhow::Context;
    let get = |k: &str| {
        env.iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .filter(|v| !v.is_empty())
    };
    let password = get("POSTGRES_PASSWORD")
        .context("POSTGRES_PASSWORD is not set (the official image refuses to start)")?;
    let user = get("POSTGRES_USER").unwrap_or_else(|| "postgres".into());
    let db = get("POSTGRES_DB").unwrap_or_else(|| user.clone());
    // A half-made volume from an interrupted init is made again.
    if volume.exists() {
        std::fs::remove_dir_all(volume)?;
    }
    std::fs::create_dir_all(volume)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(volume, std::fs::Permissions::from_mode(0o700))?;
    run_as.own(volume)?;
    let data = volume.join("pgdata");
    let pwfile = volume.join("pwfile");
    pgflip_engine::state::write_atomic(&pwfile, password.as_bytes(), 0o600)?;
    run_as.own(&pwfile)?;
    let result = pgflip_engine::run_as::run(
        run_as
            .command(&bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .arg("-U")
            .arg(&user)
            .arg(format!("--pwfile={}", pwfile.display()))
            .args(["--auth=scram-sha-256", "--auth-local=trust", "-E", "UTF8"])
            .args(["--no-locale", "--no-sync"]),
    );
    let _ = std::fs::remove_file(&pwfile);
    result.context("initdb")?;
    std::fs::write(
        data.join("pg_hba.conf"),
        "local all all trust\n\
         host all all 127.0.0.0/8 scram-sha-256\n\
         host replication all 127.0.0.0/8 scram-sha-256\n",
    )?;
    if db != "postgres" {
        // Single-user mode: no server, no port.
        let mut child = run_as
            .command(&bin.join("postgres"))
            .arg("--single")
            .arg("-D")
            .arg(&data)
            .arg("postgres")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().unwrap();
            writeln!(stdin, "CREATE DATABASE {}", pgflip_engine::pg::ident(&db))?;
        }
        let out = child.wait_with_output()?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        anyhow::ensure!(
            out.status.success() && !text.contains("ERROR"),
            "creating database {db}: {text}"
        );
    }
    Ok(())
}

async fn tcp_accepts(ip: &str, port: u16) -> bool {
    let connect = tokio::net::TcpStream::connect((ip, port));
    matches!(
        tokio::time::timeout(Duration::from_millis(300), connect).await,
        Ok(Ok(_))
    )
}

/// What `pg_isready` decides: the server answers a startup packet with an authentication
/// request (or any error but "the database system is starting up / shutting down / in
/// recovery", SQLSTATE 57P03).
async fn postgres_accepts(ip: &str, port: u16, user: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect((ip, port)).await?;
        let mut body = Vec::new();
        body.extend_from_slice(&196608u32.to_be_bytes()); // protocol 3.0
        for (k, v) in [("user", user), ("database", "postgres")] {
            body.extend_from_slice(k.as_bytes());
            body.push(0);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut packet = ((body.len() + 4) as u32).to_be_bytes().to_vec();
        packet.extend_from_slice(&body);
        stream.write_all(&packet).await?;
        let mut head = [0u8; 5];
        stream.read_exact(&mut head).await?;
        let len = u32::from_be_bytes(head[1..5].try_into().unwrap()) as usize;
        let mut payload = vec![0u8; len.saturating_sub(4).min(8192)];
        stream.read_exact(&mut payload).await?;
        Ok::<bool, std::io::Error>(match head[0] {
            b'R' => true,
            b'E' => !payload.split(|b| *b == 0).any(|field| field == b"C57P03"),
            _ => false,
        })
    };
    matches!(
        tokio::time::timeout(Duration::from_millis(500), attempt).await,
        Ok(Ok(true))
    )
}

/// `postgres:16`, `registry.example/postgres:16-alpine` → 16.
fn postgres_major(image: &str) -> Option<u32> {
    let last = image.rsplit('/').next()?;
    let tag = last.strip_prefix("postgres:")?;
    let digits: String = tag.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}
