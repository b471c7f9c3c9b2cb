//! Kubernetes mode end to end, against a real kube-apiserver, kube-controller-manager and
//! etcd (tests/common/kube.rs) and a real node (tests/common/real_node.rs: kubelet,
//! containerd, kube-proxy, CoreDNS, the PostgreSQL images and pgflip's image built from the
//! Dockerfile). The controller runs on the machine, as its ServiceAccount, and reaches pods
//! at their IPs; the servers reach each other by their Services' DNS names. The Flux test
//! plays Flux: it applies the object as kustomize-controller would, then reports the
//! revision on the Kustomization's status.

mod common;

use common::database::{
    admin, condition, endpoint, endpoint_service, first_value, is_ready_at, other_console_sessions,
    server_version,
};
use common::kube::Cluster;
use common::real_node::{NodeNetwork, PGFLIP_IMAGE, RealNode, node_with_pgflip};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Namespace, PersistentVolumeClaim, Pod, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams,
};
use pgflip_engine::load::{self, LoadConfig};
use pgflip_k8s::crd::BlueGreenDatabase;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const NS: &str = "shop";
const DB: &str = "orders";

fn sha(seed: u8) -> String {
    format!("{:02x}", seed).repeat(20)
}

fn document(version: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "pgflip.dev/v1alpha1",
        "kind": "BlueGreenDatabase",
        "metadata": {
            "name": DB,
            "namespace": NS,
            "labels": {
                "kustomize.toolkit.fluxcd.io/name": "databases",
                "kustomize.toolkit.fluxcd.io/namespace": "flux-system",
            },
        },
        "spec": {
            "version": version,
            "databases": ["app"],
            "verification": "full",
            "retainPrevious": "1h",
        },
    })
}

struct Flux {
    kustomizations: Api<DynamicObject>,
    objects: Api<BlueGreenDatabase>,
}

impl Flux {
    async fn new(client: &kube::Client) -> Flux {
        let namespaces: Api<Namespace> = Api::all(client.clone());
        for ns in ["flux-system", "pgflip-system"] {
            let body: Namespace =
                serde_json::from_value(serde_json::json!({"metadata": {"name": ns}})).unwrap();
            let _ = namespaces.create(&PostParams::default(), &body).await;
        }
        let gvk = GroupVersionKind::gvk("kustomize.toolkit.fluxcd.io", "v1", "Kustomization");
        let resource = ApiResource::from_gvk(&gvk);
        let kustomizations = Api::namespaced_with(client.clone(), "flux-system", &resource);
        let body: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "kustomize.toolkit.fluxcd.io/v1",
            "kind": "Kustomization",
            "metadata": {"name": "databases", "namespace": "flux-system"},
            "spec": {
                "interval": "1m",
                "path": "./databases",
                "prune": true,
                "wait": true,
                "sourceRef": {"kind": "GitRepository", "name": "flux-system"},
            },
        }))
        .unwrap();
        kustomizations
            .create(&PostParams::default(), &body)
            .await
            .unwrap();
        Flux {
            kustomizations,
            objects: Api::namespaced(client.clone(), NS),
        }
    }

    /// What kustomize-controller does for a commit: apply the object, then report the
    /// revision (with `wait: true`: "running health checks" until the object is Ready).
    async fn apply(&self, version: &str, commit: &str) {
        let params = PatchParams::apply("kustomize-controller").force();
        self.objects
            .patch(DB, &params, &Patch::Apply(&document(version)))
            .await
            .unwrap();
        let revision = format!("main@sha1:{commit}");
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let status = serde_json::json!({
            "apiVersion": "kustomize.toolkit.fluxcd.io/v1",
            "kind": "Kustomization",
            "status": {
                "lastAttemptedRevision": revision,
                "conditions": [
                    {"type": "Ready", "status": "Unknown", "reason": "Progressing",
                     "message": format!("Running health checks for revision {revision} with a timeout of 10m0s"),
                     "lastTransitionTime": now},
                    {"type": "Healthy", "status": "Unknown", "reason": "Progressing",
                     "message": format!("Running health checks for revision {revision} with a timeout of 10m0s"),
                     "lastTransitionTime": now},
                ],
            },
        });
        self.kustomizations
            .patch_status(
                "databases",
                &PatchParams::apply("kustomize-controller").force(),
                &Patch::Apply(&status),
            )
            .await
            .unwrap();
    }
}

struct Controller {
    child: Child,
    metrics_port: u16,
}

impl Controller {
    fn start(cluster: &Cluster, name: &str, failpoint: Option<&str>) -> Controller {
        Controller::start_with(cluster, name, failpoint, &[])
    }

    fn start_with(
        cluster: &Cluster,
        name: &str,
        failpoint: Option<&str>,
        extra: &[&str],
    ) -> Controller {
        let log = cluster.dir().join(format!("controller-{name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let port = pgflip_engine::run_as::free_port().unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgflip"));
        cmd.args(["controller", "--lease-namespace", "pgflip-system"])
            .args(["--identity", name, "--lease-duration", "4s"])
            .arg("--metrics-addr")
            .arg(format!("127.0.0.1:{port}"))
            // As its ServiceAccount: manifests/rbac.yaml must allow all it does.
            .env("KUBECONFIG", cluster.controller_kubeconfig())
            .env("RUST_LOG", "info,pgflip=debug,kube=warn")
            .env("RUST_BACKTRACE", "0")
            .args(["--endpoint-image", PGFLIP_IMAGE])
            .args(extra)
            .env("PGFLIP_FORGE_TOKEN", "forge-t0ken")
            .env_remove("PGFLIP_FAILPOINT")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file);
        if let Some(f) = failpoint {
            cmd.env("PGFLIP_FAILPOINT", f);
        }
        Controller {
            child: cmd.spawn().unwrap(),
            metrics_port: port,
        }
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Applies `doc` as a person with kubectl would: server-side, without the labels Flux sets.
async fn apply_by_hand(objects: &Api<BlueGreenDatabase>, mut doc: serde_json::Value) {
    doc["metadata"].as_object_mut().unwrap().remove("labels");
    objects
        .patch(
            DB,
            &PatchParams::apply("kubectl").force(),
            &Patch::Apply(&doc),
        )
        .await
        .unwrap();
}

/// A control plane and one real node running pgflip's image, with the test's namespace
/// and the controller's RBAC. The node is dropped before the cluster (bound in this order).
async fn cluster_with_a_node() -> (Cluster, RealNode) {
    let network = NodeNetwork::create();
    let cluster = Cluster::start_for(&network).await;
    cluster.create_namespace(NS).await;
    cluster.install_controller_rbac().await;
    let node = node_with_pgflip(&cluster, network).await;
    (cluster, node)
}

/// Waits until the object is Ready with `version` serving, and returns it.
async fn wait_ready_at(
    objects: &Api<BlueGreenDatabase>,
    version: &str,
    what: &str,
    timeout: Duration,
    logs: &dyn Fn() -> String,
) -> BlueGreenDatabase {
    wait_for(what, timeout, logs, async || {
        let o = objects.get(DB).await.ok()?;
        is_ready_at(&o, version).then_some(o)
    })
    .await
}

async fn wait_for<T>(
    what: &str,
    timeout: Duration,
    logs: &dyn Fn() -> String,
    mut probe: impl AsyncFnMut() -> Option<T>,
) -> T {
    let started = Instant::now();
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        if started.elapsed() > timeout {
            panic!(
                "timed out waiting for {what}\n--- controller log ---\n{}",
                logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flux_driven_switch_revert_takeover_and_bad_spec() {
    let network = NodeNetwork::create();
    let cluster = Cluster::start_for(&network).await;
    let client = cluster.client();
    cluster.create_namespace(NS).await;
    let node = node_with_pgflip(&cluster, network).await;
    let flux = Flux::new(&client).await;
    cluster.install_controller_rbac().await;
    let objects: Api<BlueGreenDatabase> = Api::namespaced(client.clone(), NS);

    // Commit statuses go to a stand-in GitHub API on loopback.
    let forge = common::forge::FakeForge::start().await;
    let forge_args = forge.github_args();
    let forge_args: Vec<&str> = forge_args.iter().map(String::as_str).collect();
    // Two replicas: the first leads; the second waits on the lease.
    let mut first = Controller::start_with(
        &cluster,
        "first",
        Some("switchover:before-pause"),
        &forge_args,
    );
    let logs = || first_log(&cluster);

    // Bootstrap at 15 (revision A).
    flux.apply("15", &sha(0xa1)).await;
    let object = wait_ready_at(
        &objects,
        "15",
        "bootstrap at 15",
        Duration::from_secs(180),
        &logs,
    )
    .await;
    let status = object.status.clone().unwrap();
    assert_eq!(status.revision.as_deref(), Some(sha(0xa1).as_str()));
    assert_eq!(status.phase.as_deref(), Some("idle"));
    let annotations = object.metadata.annotations.clone().unwrap_or_default();
    assert_eq!(
        annotations["pgflip.dev/active-color"],
        status.active_color.clone().unwrap()
    );
    assert_eq!(annotations["pgflip.dev/revision"], sha(0xa1));
    assert_eq!(annotations["pgflip.dev/phase"], "idle");
    // The controller ran as its ServiceAccount under manifests/rbac.yaml, which is
    // enforced: it may not, say, delete the admin Secret.
    let as_controller = Cluster::connect(&cluster.controller_kubeconfig()).await;
    let denied = Api::<Secret>::namespaced(as_controller, NS)
        .delete("orders-pgflip-admin", &Default::default())
        .await;
    assert!(
        matches!(&denied, Err(kube::Error::Api(e)) if e.code == 403),
        "{denied:?}"
    );
    let creds = admin(&client, NS, DB).await;
    let addr = endpoint(&client, NS)
        .await
        .expect("the endpoint pod is Ready");
    load::prepare(&addr, &creds, "app").await.unwrap();

    // Change to 16 (revision B) under a write load; the first controller kills itself
    // just before the pause, and the second takes the lease over and finishes the switch.
    let second = Controller::start_with(&cluster, "second", None, &forge_args);
    // The standby is Ready while the first holds the lease (a NotReady standby would keep
    // the Deployment from being Available), and says it does not lead.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let base = format!("http://127.0.0.1:{}", second.metrics_port);
        if let Ok(r) = reqwest::get(format!("{base}/readyz")).await
            && r.status() == 200
        {
            let metrics = reqwest::get(format!("{base}/metrics"))
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            assert!(metrics.contains("pgflip_leader 0"), "{metrics}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the standby replica is not Ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let writes = load::start(LoadConfig {
        endpoint: addr.clone(),
        creds: creds.clone(),
        database: "app".into(),
        clients: 4,
        rate_per_sec: Some(200),
    });
    flux.apply("16", &sha(0xb2)).await;
    let waited = first.child.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        waited.signal(),
        Some(9),
        "the first controller died at its failpoint"
    );
    let object = wait_ready_at(
        &objects,
        "16",
        "the switch to 16",
        Duration::from_secs(240),
        &logs,
    )
    .await;
    let report = writes.stop().await;
    eprintln!(
        "switch 15 → 16 with a takeover: {} commits, {} failed, pause {:?} ms, events {:?}",
        report.committed,
        report.failed,
        object
            .status
            .as_ref()
            .and_then(|s| s.last_switch.as_ref())
            .map(|l| l.pause_ms),
        object.status.as_ref().map(|s| s
            .conditions
            .iter()
            .map(|c| (c.type_.clone(), c.reason.clone()))
            .collect::<Vec<_>>())
    );
    assert_eq!(report.failed, 0, "failed transactions: {:?}", report.errors);
    assert!(report.committed > 100, "the load ran: {report:?}");
    let now_serving = endpoint(&client, NS).await.unwrap();
    assert_eq!(
        load::lost_commits(&report, &now_serving, &creds, "app")
            .await
            .unwrap(),
        0,
        "every acknowledged commit is on the new primary"
    );
    let status = object.status.clone().unwrap();
    assert_eq!(status.revision.as_deref(), Some(sha(0xb2).as_str()));
    let last = status.last_switch.clone().expect("the switch is recorded");
    assert_eq!(
        (last.from_version.as_str(), last.to_version.as_str()),
        ("15", "16")
    );
    assert_eq!(last.revision, sha(0xb2));
    assert!(last.pause_ms > 0.0 && last.pause_ms < 5000.0, "{last:?}");
    let green = status.active_color.clone().unwrap();
    let version_label = |sts: &StatefulSet| {
        sts.spec
            .as_ref()
            .unwrap()
            .template
            .metadata
            .as_ref()
            .unwrap()
            .labels
            .as_ref()
            .unwrap()["pgflip.dev/version"]
            .clone()
    };
    let statefulsets: Api<StatefulSet> = Api::namespaced(client.clone(), NS);
    let serving = statefulsets.get(&format!("{DB}-{green}")).await.unwrap();
    assert_eq!(version_label(&serving), "16");
    let events: Api<Event> = Api::namespaced(client.clone(), NS);
    let reasons: Vec<String> = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(DB))
        .filter_map(|e| e.reason)
        .collect();
    for reason in ["Preflight", "Verify", "Switched"] {
        assert!(
            reasons.iter().any(|r| r == reason),
            "no {reason} event in {reasons:?}"
        );
    }
    // The new leader's metrics count the switch it finished.
    let metrics = reqwest::get(format!("http://127.0.0.1:{}/metrics", second.metrics_port))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "pgflip_leader 1",
        r#"pgflip_switches_total{namespace="shop",name="orders",direction="upgrade"} 1"#,
        "pgflip_switch_pause_seconds_count 1",
        r#"pgflip_phase{namespace="shop",name="orders",phase="idle"} 1"#,
        r#"pgflip_replication_lag_bytes{namespace="shop",name="orders"}"#,
    ] {
        assert!(metrics.contains(line), "{line} missing in\n{metrics}");
    }

    // A restarted endpoint pod comes back pointing at the active color (its stored
    // configuration), not at the color it started with.
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let endpoint_pod = pods
        .list(&ListParams::default().labels("app.kubernetes.io/component=endpoint"))
        .await
        .unwrap()
        .items
        .remove(0);
    pods.delete(&endpoint_pod.metadata.name.unwrap(), &Default::default())
        .await
        .unwrap();
    let now_serving = wait_for(
        "a new endpoint pod",
        Duration::from_secs(60),
        &logs,
        async || endpoint(&client, NS).await.filter(|a| *a != now_serving),
    )
    .await;
    let version = server_version(&now_serving, &creds, "app").await;
    assert!(
        version.starts_with("16"),
        "the restarted endpoint serves {version}"
    );

    // Revert (revision C): back to 15 under load, nothing lost.
    let writes = load::start(LoadConfig {
        endpoint: now_serving.clone(),
        creds: creds.clone(),
        database: "app".into(),
        clients: 4,
        rate_per_sec: Some(200),
    });
    flux.apply("15", &sha(0xc3)).await;
    let object = wait_ready_at(
        &objects,
        "15",
        "the switch back to 15",
        Duration::from_secs(240),
        &logs,
    )
    .await;
    let report = writes.stop().await;
    assert_eq!(report.failed, 0, "failed transactions: {:?}", report.errors);
    let serving_addr = endpoint(&client, NS).await.unwrap();
    assert_eq!(
        load::lost_commits(&report, &serving_addr, &creds, "app")
            .await
            .unwrap(),
        0
    );
    assert_eq!(object.status.clone().unwrap().revision, Some(sha(0xc3)));
    // The endpoint sends clients to 15 again (the ledger alone would also pass on 16).
    let version = server_version(&serving_addr, &creds, "app").await;
    assert!(
        version.starts_with("15"),
        "after the revert the endpoint serves {version}"
    );

    // A bad spec (revision D): Stalled with the reason; nothing is touched.
    let before: Vec<_> = statefulsets
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|s| (s.metadata.name.clone(), s.metadata.generation))
        .collect();
    flux.apply("13", &sha(0xd4)).await;
    let object = wait_for(
        "Stalled on a bad spec",
        Duration::from_secs(60),
        &logs,
        async || {
            let o = objects.get(DB).await.ok()?;
            condition(&o, "Stalled")
                .is_some_and(|c| c.status == "True")
                .then_some(o)
        },
    )
    .await;
    let stalled = condition(&object, "Stalled").unwrap();
    assert_eq!(stalled.reason, "InvalidSpec");
    assert!(stalled.message.contains("13"), "{}", stalled.message);
    assert_eq!(condition(&object, "Ready").unwrap().status, "False");
    let status = object.status.clone().unwrap();
    assert_eq!(status.active_version.as_deref(), Some("15"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after: Vec<_> = statefulsets
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|s| (s.metadata.name.clone(), s.metadata.generation))
        .collect();
    assert_eq!(before, after, "a bad spec changes no StatefulSet");
    let still = pgflip_engine::pg::connect(&serving_addr, &creds, "app")
        .await
        .expect("blue keeps serving");
    still.simple_query("SELECT 1").await.unwrap();

    // Every commit got its story on the forge, under one context, and the token is
    // never logged.
    let statuses: Vec<(String, String)> = forge
        .requests()
        .iter()
        .map(|r| {
            assert_eq!(r.method, "POST");
            assert_eq!(r.headers["authorization"], "Bearer forge-t0ken");
            assert_eq!(r.body["context"], "pgflip/shop/orders");
            let sha = r.path.rsplit('/').next().unwrap().to_string();
            assert!(r.path.starts_with("/repos/shop/db/statuses/"), "{}", r.path);
            (sha, r.body["state"].as_str().unwrap().to_string())
        })
        .collect();
    let on = |sha: &str| -> Vec<&str> {
        statuses
            .iter()
            .filter(|s| s.0 == sha)
            .map(|s| s.1.as_str())
            .collect()
    };
    for commit in [sha(0xb2), sha(0xc3)] {
        let states = on(&commit);
        assert_eq!(states.first(), Some(&"pending"), "{commit}: {statuses:?}");
        assert_eq!(states.last(), Some(&"success"), "{commit}: {statuses:?}");
    }
    assert_eq!(
        on(&sha(0xd4)),
        ["failure"],
        "the bad spec's commit: {statuses:?}"
    );
    let logs: String = ["first", "second"]
        .iter()
        .map(|n| {
            std::fs::read_to_string(cluster.dir().join(format!("controller-{n}.log"))).unwrap()
        })
        .collect();
    assert!(logs.contains("leading"), "the logs were read");
    assert!(!logs.contains("forge-t0ken"), "the token is not logged");
    assert!(
        !logs.contains(&creds.password),
        "the admin password is not logged"
    );
    // Nor anywhere else people read: every log the cluster wrote (the controllers, the
    // endpoint pods, the PostgreSQL servers), the object (annotations, status), the
    // state ConfigMap, the events and the forge's statuses.
    let mut readable = String::new();
    let mut logs_read = 0;
    let mut dirs = vec![cluster.dir().to_path_buf(), node.pod_logs()];
    while let Some(dir) = dirs.pop() {
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = e.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|x| x == "log") {
                readable.push_str(&String::from_utf8_lossy(&std::fs::read(&path).unwrap()));
                logs_read += 1;
            }
        }
    }
    assert!(logs_read > 2, "only {logs_read} logs found");
    let object = Api::<BlueGreenDatabase>::namespaced(client.clone(), NS)
        .get(DB)
        .await
        .unwrap();
    readable.push_str(&serde_json::to_string(&object).unwrap());
    let configmaps = Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(client.clone(), NS)
        .list(&Default::default())
        .await
        .unwrap();
    readable.push_str(&serde_json::to_string(&configmaps).unwrap());
    let events = Api::<Event>::namespaced(client.clone(), NS)
        .list(&Default::default())
        .await
        .unwrap();
    assert!(!events.items.is_empty(), "the events were read");
    readable.push_str(&serde_json::to_string(&events).unwrap());
    for r in forge.requests() {
        readable.push_str(&r.body.to_string());
    }
    for secret in ["forge-t0ken", creds.password.as_str()] {
        assert!(!readable.contains(secret), "a credential is readable");
    }
}

fn first_log(cluster: &Cluster) -> String {
    ["first", "second"]
        .iter()
        .map(|n| {
            let log = common::tail(&cluster.dir().join(format!("controller-{n}.log")), 30);
            format!("[{n}]\n{log}")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// An object no Kustomization manages: every generation is its own revision, and the
/// status names none. On a real node: the servers run from the PostgreSQL images, the
/// endpoint from pgflip's image.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_without_flux_switches_on_each_generation() {
    let (cluster, _node) = cluster_with_a_node().await;
    let client = cluster.client();
    let _controller = Controller::start(&cluster, "first", None);
    let logs = || first_log(&cluster);
    let objects: Api<BlueGreenDatabase> = Api::namespaced(client.clone(), NS);
    let apply = async |version: &str| apply_by_hand(&objects, document(version)).await;
    apply("16").await;
    wait_ready_at(
        &objects,
        "16",
        "bootstrap at 16",
        Duration::from_secs(180),
        &logs,
    )
    .await;
    // A table for the row that shows the database outlives its object (below). Made
    // before the switch: DDL is not replicated, so a table made on green afterwards would
    // not be on blue, which takes the reverse stream.
    {
        let addr = endpoint(&client, NS)
            .await
            .expect("the endpoint pod is Ready");
        let c = pgflip_engine::pg::connect(&addr, &admin(&client, NS, DB).await, "app")
            .await
            .unwrap();
        c.batch_execute("CREATE TABLE outlives (v text PRIMARY KEY)")
            .await
            .unwrap();
    }
    apply("17").await;
    let object = wait_ready_at(
        &objects,
        "17",
        "the switch to 17",
        Duration::from_secs(240),
        &logs,
    )
    .await;
    let old_uid = object.metadata.uid.clone().unwrap();
    let status = object.status.unwrap();
    assert_eq!(status.revision, None, "no Git revision to report");
    let last = status.last_switch.unwrap();
    assert_eq!(
        (last.from_version.as_str(), last.to_version.as_str()),
        ("16", "17")
    );

    // The controller keeps the endpoint's console session open between reconciles (and
    // the endpoint process one of its own, for its RELOADs).
    let endpoint_addr = endpoint(&client, NS)
        .await
        .expect("the endpoint pod is Ready");
    let creds = admin(&client, NS, DB).await;
    let sessions = other_console_sessions(&endpoint_addr, &creds).await;
    assert!(
        sessions >= 2,
        "the controller and the endpoint hold console sessions\n{}",
        logs()
    );

    // Deleted and created again: the database outlives the object (it owns nothing but
    // Services) and is taken up again; from then on everything refers to the new object.
    // What shows it is the same database, not a fresh bootstrap: a row, and the volume
    // claims (same UIDs).
    {
        let c = pgflip_engine::pg::connect(&endpoint_addr, &creds, "app")
            .await
            .unwrap();
        c.batch_execute("INSERT INTO outlives VALUES ('kept')")
            .await
            .unwrap();
    }
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), NS);
    let claim_uids = async || {
        let mut uids: Vec<(String, String)> = claims
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .map(|c| (c.metadata.name.unwrap(), c.metadata.uid.unwrap()))
            .collect();
        uids.sort();
        uids
    };
    let claims_before = claim_uids().await;
    assert!(!claims_before.is_empty());
    objects.delete(DB, &Default::default()).await.unwrap();
    wait_for(
        "the object gone",
        Duration::from_secs(30),
        &logs,
        async || matches!(objects.get_opt(DB).await, Ok(None)).then_some(()),
    )
    .await;
    // A deleted object is forgotten: its engine dropped, and with it the console session
    // (the endpoint itself keeps serving: it outlives the object like the data).
    wait_for(
        "the deleted object's console session closed",
        Duration::from_secs(30),
        &logs,
        async || (other_console_sessions(&endpoint_addr, &creds).await < sessions).then_some(()),
    )
    .await;
    let whole_log =
        std::fs::read_to_string(cluster.dir().join("controller-first.log")).unwrap_or_default();
    assert!(
        whole_log.contains("forgot its database"),
        "the controller says it forgot the object\n{}",
        logs()
    );
    apply("17").await;
    let again = wait_ready_at(
        &objects,
        "17",
        "the new object Ready at 17",
        Duration::from_secs(120),
        &logs,
    )
    .await;
    let new_uid = again.metadata.uid.clone().unwrap();
    assert_ne!(old_uid, new_uid);
    assert_eq!(
        claim_uids().await,
        claims_before,
        "the volume claims were made anew"
    );
    let served = endpoint(&client, NS)
        .await
        .expect("the endpoint pod is Ready");
    let c = pgflip_engine::pg::connect(&served, &creds, "app")
        .await
        .unwrap();
    let rows = c.simple_query("SELECT v FROM outlives").await.unwrap();
    assert!(
        rows.iter().any(|m| matches!(m,
            tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("kept"))),
        "the row written before the object was deleted is gone"
    );
    drop(c);
    apply("16").await;
    wait_ready_at(
        &objects,
        "16",
        "the new object's switch to 16",
        Duration::from_secs(240),
        &logs,
    )
    .await;
    let events: Api<Event> = Api::namespaced(client.clone(), NS);
    let switched_about: Vec<String> = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("Switched"))
        .filter_map(|e| e.regarding.and_then(|r| r.uid))
        .collect();
    assert!(
        switched_about.contains(&new_uid),
        "the new object's switch is an event about it: {switched_about:?} (new {new_uid})"
    );
}

/// Pods come back with new IPs and nothing is lost: with the switch to 17 stopped right
/// before its pause (the controller killed there, as a node failure would), blue's pod and
/// the endpoint's pod are deleted; the forward link, which names blue by its Service,
/// resumes; a second controller completes the switch. Then, in reverse sync, the serving
/// pod (green) is deleted: the endpoint finds it again by name, the reverse link resumes,
/// and the switch back to 16 carries every acknowledged commit. Clients use the endpoint's
/// Service, as in a cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_deleted_mid_switch_and_in_reverse_sync_come_back_by_name() {
    let (cluster, node) = cluster_with_a_node().await;
    let client = cluster.client();
    let mut first = Controller::start(&cluster, "first", Some("switchover:before-pause"));
    let logs = || {
        ["first", "second"]
            .iter()
            .map(|n| {
                let path = cluster.dir().join(format!("controller-{n}.log"));
                let log = std::fs::read_to_string(path).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                format!(
                    "--- {n} ---\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let objects: Api<BlueGreenDatabase> = Api::namespaced(client.clone(), NS);
    let apply = async |version: &str| apply_by_hand(&objects, document(version)).await;
    apply("16").await;
    let object = wait_ready_at(
        &objects,
        "16",
        "bootstrap at 16",
        Duration::from_secs(180),
        &logs,
    )
    .await;
    let blue = object.status.unwrap().active_color.unwrap();
    let green = if blue == "blue" { "green" } else { "blue" };
    let creds = admin(&client, NS, DB).await;
    let service = endpoint_service(&client, NS, DB)
        .await
        .expect("the endpoint's Service");
    // kube-proxy programs a new Service's rules within a second or so.
    wait_for(
        "the endpoint's Service answering",
        Duration::from_secs(30),
        &logs,
        async || {
            pgflip_engine::pg::connect(&service, &creds, "app")
                .await
                .ok()
        },
    )
    .await;
    load::prepare(&service, &creds, "app").await.unwrap();
    let writes = load::start(LoadConfig {
        endpoint: service.clone(),
        creds: creds.clone(),
        database: "app".into(),
        clients: 2,
        rate_per_sec: Some(100),
    });

    apply("17").await;
    let waited = tokio::task::spawn_blocking(move || first.child.wait())
        .await
        .unwrap()
        .unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        waited.signal(),
        Some(9),
        "the controller died before the pause"
    );
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let ready_ip = async |name: &str| -> Option<String> {
        pgflip_k8s::api::ready_pod_ip(&pods.get(name).await.ok()?)
    };
    // The forward link names blue by its Service, not by its pod's address.
    let green_pod = format!("{DB}-{green}-0");
    let green_ip = ready_ip(&green_pod).await.expect("green runs");
    let green_addr = pgflip_engine::ports::Addr {
        host: green_ip.clone(),
        port: 5432,
    };
    let link = first_value(
        &green_addr,
        &creds,
        "app",
        "SELECT subconninfo FROM pg_subscription",
    )
    .await;
    assert!(
        link.contains(&format!("host='{DB}-{blue}.{NS}.svc'")),
        "the forward link does not name blue's Service: {}",
        link.split("password").next().unwrap()
    );
    let endpoint_pod = pods
        .list(&ListParams::default().labels("app.kubernetes.io/component=endpoint"))
        .await
        .unwrap()
        .items
        .remove(0)
        .metadata
        .name
        .unwrap();
    let blue_pod = format!("{DB}-{blue}-0");
    let blue_ip = ready_ip(&blue_pod).await.expect("blue runs");
    for pod in [&blue_pod, &endpoint_pod] {
        pods.delete(pod, &Default::default()).await.unwrap();
    }
    let new_blue_ip = wait_for(
        "blue's pod back on a new address",
        Duration::from_secs(120),
        &logs,
        async || ready_ip(&blue_pod).await.filter(|ip| *ip != blue_ip),
    )
    .await;
    eprintln!("blue's pod: {blue_ip} → {new_blue_ip}");
    let _second = Controller::start(&cluster, "second", None);
    wait_ready_at(
        &objects,
        "17",
        "the switch to 17 after the pods came back",
        Duration::from_secs(240),
        &logs,
    )
    .await;

    // In reverse sync: the serving pod goes.
    pods.delete(&green_pod, &Default::default()).await.unwrap();
    let new_green_ip = wait_for(
        "green's pod back on a new address",
        Duration::from_secs(120),
        &logs,
        async || ready_ip(&green_pod).await.filter(|ip| *ip != green_ip),
    )
    .await;
    eprintln!("green's pod: {green_ip} → {new_green_ip}");
    // Clients get through the endpoint to the serving server at its new address.
    wait_for(
        "clients served by green again",
        Duration::from_secs(60),
        &logs,
        async || {
            let c = pgflip_engine::pg::connect(&service, &creds, "app")
                .await
                .ok()?;
            let row = c
                .query_one("SELECT host(inet_server_addr())", &[])
                .await
                .ok()?;
            (row.get::<_, String>(0) == new_green_ip).then_some(())
        },
    )
    .await;
    // And a client in the cluster reaches the endpoint by its Service's name.
    let (code, log) = node
        .run_pod(
            &client,
            NS,
            serde_json::json!({
                "metadata": {"name": "a-client"},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{
                        "name": "psql",
                        // 16's image is a server only; 17's has the client tools.
                        "image": "postgres:17",
                        "command": ["sh", "-c", format!(
                            "getent hosts {DB}.{NS}.svc && psql -h {DB}.{NS}.svc -p {} -U pgflip -d app -Atc 'SELECT host(inet_server_addr())'",
                            service.port
                        )],
                        "env": [{"name": "PGPASSWORD", "valueFrom": {"secretKeyRef": {
                            "name": format!("{DB}-pgflip-admin"), "key": "password"}}}],
                    }],
                },
            }),
        )
        .await;
    assert_eq!(code, 0, "{log}");
    assert!(
        log.contains(&service.host) && log.contains(&new_green_ip),
        "the client did not resolve {DB}.{NS}.svc to {} and reach green at {new_green_ip}:\n{log}",
        service.host
    );
    apply("16").await;
    wait_ready_at(
        &objects,
        "16",
        "the switch back to 16",
        Duration::from_secs(240),
        &logs,
    )
    .await;
    let report = writes.stop().await;
    eprintln!(
        "{} commits, {} failed while pods were deleted",
        report.committed, report.failed
    );
    assert!(report.committed > 100, "the load ran: {report:?}");
    assert_eq!(
        load::lost_commits(&report, &service, &creds, "app")
            .await
            .unwrap(),
        0,
        "every acknowledged commit is on 16 after the round trip"
    );
    let version = server_version(&service, &creds, "app").await;
    assert!(version.starts_with("16"), "the endpoint serves {version}");
}

/// A StatefulSet of PostgreSQL `major` that the test deploys itself, as a team would (an
/// operator's cluster, say): not pgflip's, its superuser password in the Secret `user-pg`.
fn user_statefulset(major: u32) -> serde_json::Value {
    let name = format!("user-pg-{major}");
    serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "serviceName": name,
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{
                    "name": "postgres",
                    "image": format!("postgres:{major}"),
                    "args": ["-c", "wal_level=logical"],
                    "env": [{"name": "POSTGRES_PASSWORD",
                             "valueFrom": {"secretKeyRef": {"name": "user-pg", "key": "password"}}}],
                    "volumeMounts": [{"name": "data", "mountPath": "/var/lib/postgresql/data"}],
                }]},
            },
            "volumeClaimTemplates": [{
                "metadata": {"name": "data"},
                "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
            }],
        },
    })
}

/// PostgreSQL the test deploys itself (its own StatefulSets, not pgflip's), adopted with
/// the superuser password read from its Secret, switched under load onto the second one,
/// and back. The servers are named by pod address: the controller runs on the machine,
/// outside the cluster's DNS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_the_team_runs_are_adopted_switched_and_reverted() {
    let (cluster, _node) = cluster_with_a_node().await;
    let client = cluster.client();
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let password = pgflip_engine::random::token(16);
    cluster
        .create_password_secret(NS, "user-pg", &password)
        .await;
    let statefulsets: Api<StatefulSet> = Api::namespaced(client.clone(), NS);
    for major in [15, 17] {
        let body: StatefulSet = serde_json::from_value(user_statefulset(major)).unwrap();
        statefulsets
            .create(&PostParams::default(), &body)
            .await
            .unwrap();
    }
    let no_logs = || String::new();
    let superuser = pgflip_engine::ports::Credentials {
        user: "postgres".into(),
        password: password.clone(),
    };
    let mut addrs = Vec::new();
    for major in [15, 17] {
        let pod = format!("user-pg-{major}-0");
        let addr = wait_for(
            &format!("{pod} answering"),
            Duration::from_secs(120),
            &no_logs,
            async || {
                let host = pods.get(&pod).await.ok()?.status?.pod_ip?;
                let addr = pgflip_engine::ports::Addr { host, port: 5432 };
                pgflip_engine::pg::connect(&addr, &superuser, "postgres")
                    .await
                    .ok()?;
                Some(addr)
            },
        )
        .await;
        addrs.push(addr);
    }
    let (old, new) = (addrs[0].clone(), addrs[1].clone());
    // The team's data, on 15.
    let postgres = pgflip_engine::pg::connect(&old, &superuser, "postgres")
        .await
        .unwrap();
    postgres.batch_execute("CREATE DATABASE app").await.unwrap();
    let app = pgflip_engine::ports::Credentials {
        user: "app".into(),
        password: pgflip_engine::random::token(12),
    };
    let c = pgflip_engine::pg::connect(&old, &superuser, "app")
        .await
        .unwrap();
    c.batch_execute(&format!(
        "CREATE TABLE accounts (id serial PRIMARY KEY, balance int NOT NULL);
         INSERT INTO accounts (balance) SELECT g FROM generate_series(1, 500) g;
         CREATE ROLE app LOGIN PASSWORD '{}';",
        app.password
    ))
    .await
    .unwrap();
    load::prepare(&old, &superuser, "app").await.unwrap();
    c.batch_execute("GRANT ALL ON ALL TABLES IN SCHEMA public TO app; GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO app")
        .await
        .unwrap();
    drop((c, postgres));

    let _controller = Controller::start(&cluster, "first", None);
    let logs = || first_log(&cluster);
    let objects: Api<BlueGreenDatabase> = Api::namespaced(client.clone(), NS);
    let apply = async |version: &str| {
        let mut doc = document(version);
        doc["spec"]["adopt"] = serde_json::json!([
            {"host": old.host, "user": "postgres", "secretRef": {"name": "user-pg"}},
            {"host": new.host, "user": "postgres", "secretRef": {"name": "user-pg", "key": "password"}},
        ]);
        apply_by_hand(&objects, doc).await
    };
    apply("15").await;
    wait_ready_at(
        &objects,
        "15",
        "adopted at 15",
        Duration::from_secs(180),
        &logs,
    )
    .await;
    let endpoint_addr = wait_for("the endpoint", Duration::from_secs(60), &logs, async || {
        endpoint(&client, NS).await
    })
    .await;
    let behind = async |creds: &pgflip_engine::ports::Credentials| -> String {
        first_value(
            &endpoint_addr,
            creds,
            "app",
            "SELECT host(inet_server_addr())",
        )
        .await
    };
    assert_eq!(
        behind(&app).await,
        old.host,
        "the endpoint starts in front of the team's 15"
    );
    let traffic = load::start(LoadConfig {
        endpoint: endpoint_addr.clone(),
        creds: app.clone(),
        database: "app".into(),
        clients: 2,
        rate_per_sec: Some(100),
    });

    apply("17").await;
    wait_ready_at(
        &objects,
        "17",
        "the switch onto the team's 17",
        Duration::from_secs(240),
        &logs,
    )
    .await;
    assert_eq!(behind(&app).await, new.host, "clients are on the team's 17");
    assert!(
        server_version(&endpoint_addr, &app, "app")
            .await
            .starts_with("17")
    );
    assert!(
        statefulsets
            .get_opt(&format!("{DB}-green"))
            .await
            .unwrap()
            .is_none()
            && statefulsets
                .get_opt(&format!("{DB}-blue"))
                .await
                .unwrap()
                .is_none(),
        "pgflip ran no server of its own"
    );

    apply("15").await;
    wait_ready_at(
        &objects,
        "15",
        "back onto the team's 15",
        Duration::from_secs(240),
        &logs,
    )
    .await;
    assert_eq!(behind(&app).await, old.host);
    assert!(
        server_version(&endpoint_addr, &app, "app")
            .await
            .starts_with("15")
    );
    let report = traffic.stop().await;
    assert!(report.committed > 0);
    assert_eq!(report.failed, 0, "{:?}", report.errors);
    assert_eq!(
        load::lost_commits(&report, &old, &superuser, "app")
            .await
            .unwrap(),
        0
    );
    // The password is read where it is needed, and shown nowhere.
    let object = objects.get(DB).await.unwrap();
    assert!(!serde_json::to_string(&object).unwrap().contains(&password));
    let events: Api<Event> = Api::namespaced(client.clone(), NS);
    for e in events.list(&ListParams::default()).await.unwrap().items {
        assert!(!e.note.unwrap_or_default().contains(&password));
    }
    let whole_log =
        std::fs::read_to_string(cluster.dir().join("controller-first.log")).unwrap_or_default();
    assert!(!whole_log.is_empty() && !whole_log.contains(&password));
}

/// An upgrade made by a physical copy in green's pod (`copy: physical`, 15 → 17) under a
/// write load: init containers take blue's base backup, wait for the cut, replay to it with
/// 15's binaries (copied in from blue's image) and `pg_upgrade --link` to 17; logical
/// replication then streams from the cut. Every acknowledged commit is on green, none
/// twice (the ledger's key would stop the stream), and a table without a key has its rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_physical_copy_in_green_s_pod_upgrades_15_to_17_under_writes() {
    let (cluster, _node) = cluster_with_a_node().await;
    let client = cluster.client();
    let _controller = Controller::start(&cluster, "first", None);
    let logs = || first_log(&cluster);
    let objects: Api<BlueGreenDatabase> = Api::namespaced(client.clone(), NS);
    let physical = |version: &str| {
        let mut doc = document(version);
        doc["spec"]["copy"] = "physical".into();
        doc
    };
    apply_by_hand(&objects, physical("15")).await;
    wait_ready_at(
        &objects,
        "15",
        "bootstrap at 15",
        Duration::from_secs(180),
        &logs,
    )
    .await;
    let creds = admin(&client, NS, DB).await;
    let addr = endpoint(&client, NS)
        .await
        .expect("the endpoint pod is Ready");
    load::prepare(&addr, &creds, "app").await.unwrap();
    pgflip_engine::pg::connect(&addr, &creds, "app")
        .await
        .unwrap()
        .batch_execute(
            "CREATE TABLE notes (body text);
             INSERT INTO notes SELECT 'note ' || g FROM generate_series(1, 1000) g",
        )
        .await
        .unwrap();
    let writes = load::start(LoadConfig {
        endpoint: addr.clone(),
        creds: creds.clone(),
        database: "app".into(),
        clients: 2,
        rate_per_sec: Some(100),
    });
    apply_by_hand(&objects, physical("17")).await;
    let object = wait_ready_at(
        &objects,
        "17",
        "the switch to 17 by a physical copy",
        Duration::from_secs(420),
        &logs,
    )
    .await;
    let report = writes.stop().await;
    assert_eq!(report.failed, 0, "failed transactions: {:?}", report.errors);
    assert!(report.committed > 50, "the load ran: {report:?}");
    let serving = endpoint(&client, NS).await.unwrap();
    assert_eq!(
        load::lost_commits(&report, &serving, &creds, "app")
            .await
            .unwrap(),
        0,
        "every acknowledged commit is on green"
    );
    assert!(
        server_version(&serving, &creds, "app")
            .await
            .starts_with("17")
    );
    assert_eq!(
        first_value(&serving, &creds, "app", "SELECT count(*) FROM notes").await,
        "1000"
    );

    // Green was made by the copy: its StatefulSet names the cut, its pod ran the upgrade.
    let green = object.status.unwrap().active_color.unwrap();
    let statefulsets: Api<StatefulSet> = Api::namespaced(client.clone(), NS);
    let sts = statefulsets.get(&format!("{DB}-{green}")).await.unwrap();
    let stage = &sts.metadata.annotations.unwrap()["pgflip.dev/physical-copy"];
    let cut = stage.strip_prefix("upgraded ").unwrap_or_default();
    assert!(
        cut.contains('/'),
        "the copy is upgraded at its cut, an LSN: {stage}"
    );
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let pod = pods.get(&format!("{DB}-{green}-0")).await.unwrap();
    let upgraded = pod
        .status
        .unwrap()
        .init_container_statuses
        .unwrap()
        .into_iter()
        .find(|s| s.name == "upgrade")
        .and_then(|s| s.state?.terminated)
        .map(|t| t.exit_code);
    assert_eq!(upgraded, Some(0), "the upgrade step ran to its end");
    eprintln!(
        "physical copy in green's pod: cut {cut}, {} commits meanwhile",
        report.committed
    );
}
