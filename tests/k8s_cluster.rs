//! The Kubernetes test harness itself, proven on a real scenario: a real control plane
//! (tests/common/kube.rs: etcd, kube-apiserver, kube-controller-manager, kube-scheduler) and
//! a real node (tests/common/real_node.rs: containerd, runc, the CNI bridge and a kubelet,
//! in a network namespace of its own). A StatefulSet of the official `postgres:16` image
//! shape is run by the real StatefulSet controller from the image scripts/setup-node.sh
//! builds; the scheduler places its pod, the kubelet runs PostgreSQL 16 in a container with
//! the Secret's password at a bridge IP, the readiness probe calls it Ready, a crashed
//! container is restarted in the same pod, and a deleted pod is recreated on a new IP with
//! the same volume's data.

mod common;

use common::kube::Cluster;
use common::real_node::{NODE_NAME, NodeNetwork, RealNode};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ContainerStatus, Node, PersistentVolumeClaim, Pod, Service};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use pgflip_engine::pg::connect;
use pgflip_engine::ports::{Addr, Credentials};
use std::time::{Duration, Instant};

const NS: &str = "harness";
const STS: &str = "pg";
const POD: &str = "pg-0";
const USER: &str = "app";

fn statefulset(name: &str, args: &[&str]) -> StatefulSet {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "replicas": 1,
            "serviceName": name,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "terminationGracePeriodSeconds": 10,
                    "containers": [{
                        "name": "postgres",
                        "image": "postgres:16",
                        "args": args,
                        "env": [
                            {"name": "POSTGRES_USER", "value": USER},
                            {"name": "POSTGRES_PASSWORD", "valueFrom": {
                                "secretKeyRef": {"name": "pg-auth", "key": "password"}}},
                        ],
                        "ports": [{"name": "postgres", "containerPort": 5432}],
                        // The image has none (like the official one); the kubelet runs it.
                        "readinessProbe": {
                            "exec": {"command": ["pg_isready", "-h", "127.0.0.1", "-U", USER, "-d", USER]},
                            "periodSeconds": 1,
                        },
                        "volumeMounts": [{"name": "data", "mountPath": "/var/lib/postgresql/data"}],
                    }],
                },
            },
            "volumeClaimTemplates": [{
                "metadata": {"name": "data"},
                "spec": {
                    "accessModes": ["ReadWriteOnce"],
                    "resources": {"requests": {"storage": "1Gi"}},
                },
            }],
        },
    }))
    .unwrap()
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Waits until the pod named `POD` is Ready and is not the one with UID `not_uid`.
async fn ready_pod(pods: &Api<Pod>, not_uid: Option<&str>, what: &str) -> Pod {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(pod) = pods.get_opt(POD).await.unwrap()
            && pod.metadata.uid.as_deref() != not_uid
            && pod.metadata.deletion_timestamp.is_none()
            && is_ready(&pod)
        {
            return pod;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: pod {POD} not Ready: {:?}",
            pods.get_opt(POD).await.unwrap().and_then(|p| p.status)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn pod_ip(pod: &Pod) -> String {
    pod.status.as_ref().unwrap().pod_ip.clone().unwrap()
}

/// The status of the pod's (only) container.
fn container(pod: &Pod) -> &ContainerStatus {
    &pod.status
        .as_ref()
        .unwrap()
        .container_statuses
        .as_ref()
        .unwrap()[0]
}

fn container_id(pod: &Pod) -> String {
    container(pod).container_id.clone().unwrap()
}

fn restart_count(pod: &Pod) -> i32 {
    container(pod).restart_count
}

/// `sql`'s answer from `addr` once it serves (a Service's rules follow its endpoints within
/// a second or so).
async fn served_through(addr: &Addr, creds: &Credentials, sql: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let attempt = tokio::time::timeout(Duration::from_secs(3), connect(addr, creds, USER));
        if let Ok(Ok(client)) = attempt.await
            && let Ok(rows) = client.simple_query(sql).await
            && let Some(tokio_postgres::SimpleQueryMessage::Row(r)) = rows
                .into_iter()
                .find(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
        {
            return r.get(0).unwrap_or_default().to_string();
        }
        assert!(Instant::now() < deadline, "{addr:?} does not serve");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn query_one(addr: &Addr, creds: &Credentials, sql: &str) -> String {
    let client = connect(addr, creds, USER).await.unwrap();
    let rows = client.simple_query(sql).await.unwrap();
    rows.iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{sql}: no row"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statefulset_postgres_runs_crashes_moves_and_keeps_its_data() {
    // What the machine's kernel says before a kubelet runs on it.
    let kernel = || {
        [
            "kernel/panic",
            "kernel/panic_on_oops",
            "vm/overcommit_memory",
            "net/ipv4/ip_forward",
        ]
        .map(|k| std::fs::read_to_string(format!("/proc/sys/{k}")).unwrap())
    };
    // Read while no kubelet starts (a parallel test's node changes them meanwhile).
    let settled = || {
        let _lock = common::real_node::kubelet_start_lock();
        kernel()
    };
    let kernel_before = settled();
    let t0 = Instant::now();
    let network = NodeNetwork::create();
    let cluster = Cluster::start_for(&network).await;
    let cluster_up = t0.elapsed();
    let client = cluster.client();

    // The CRDs: ours and Flux's, Established.
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for name in [
        "kustomizations.kustomize.toolkit.fluxcd.io",
        "gitrepositories.source.toolkit.fluxcd.io",
        "bluegreendatabases.pgflip.dev",
    ] {
        assert!(
            common::kube::is_established(&crds.get(name).await.unwrap()),
            "CRD {name} is not Established"
        );
    }

    // The kubeconfig (and the CA it names) can be read by the unprivileged user that runs
    // the pods' processes (pgflip pods get it as KUBECONFIG).
    let run_as = pgflip_engine::run_as::RunAs::detect().unwrap();
    let out = pgflip_engine::run_as::run(
        run_as
            .command(std::path::Path::new("/bin/cat"))
            .arg(cluster.kubeconfig())
            .arg(cluster.dir().join("ca.crt")),
    )
    .unwrap_or_else(|e| panic!("the unprivileged user cannot read the kubeconfig: {e:#}"));
    assert!(out.contains("current-context") && out.contains("BEGIN CERTIFICATE"));

    cluster.create_namespace(NS).await;
    let real_node = RealNode::start(&cluster, network).await;
    let pod_network = real_node.network();
    assert_eq!(
        settled(),
        kernel_before,
        "the kubelet's kernel settings were not given back"
    );

    // The kubelet registered its Node, with its address, and it is Ready; the
    // node-lifecycle controller lifted the not-ready taint.
    let nodes: Api<Node> = Api::all(client.clone());
    let node_list = nodes.list(&Default::default()).await.unwrap();
    assert_eq!(node_list.items.len(), 1);
    let node = &node_list.items[0];
    assert_eq!(node.metadata.name.as_deref(), Some(NODE_NAME));
    assert!(common::kube::is_node_ready(node), "{:?}", node.status);
    let status = node.status.as_ref().unwrap();
    let info = status.node_info.as_ref().unwrap();
    assert!(
        real_node.versions().contains(&info.kubelet_version)
            && info.container_runtime_version.starts_with("containerd://"),
        "{info:?}"
    );
    assert!(
        status
            .addresses
            .as_ref()
            .unwrap()
            .iter()
            .any(|a| a.type_ == "InternalIP" && a.address == pod_network.node_ip().to_string()),
        "{:?}",
        status.addresses
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while nodes
        .get(NODE_NAME)
        .await
        .unwrap()
        .spec
        .and_then(|s| s.taints)
        .is_some_and(|t| !t.is_empty())
    {
        assert!(Instant::now() < deadline, "the node's taints stay");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let password = pgflip_engine::random::token(24);
    cluster
        .create_password_secret(NS, "pg-auth", &password)
        .await;

    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), NS);
    sets.patch(
        STS,
        &PatchParams::apply("k8s-cluster-test").force(),
        &Patch::Apply(&statefulset(
            STS,
            &["-c", "wal_level=logical", "-c", "max_connections=40"],
        )),
    )
    .await
    .unwrap();

    let t1 = Instant::now();
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let pod = ready_pod(&pods, None, "first start").await;
    let pod_ready = t1.elapsed();
    eprintln!(
        "timings: cluster up {:.1}s, pod Ready {:.1}s after the StatefulSet was applied",
        cluster_up.as_secs_f64(),
        pod_ready.as_secs_f64()
    );

    // The StatefulSet controller made it, the scheduler placed it on the node, its claim
    // is bound to a volume.
    let owner = &pod.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("StatefulSet", STS)
    );
    assert_eq!(
        pod.spec.as_ref().unwrap().node_name.as_deref(),
        node.metadata.name.as_deref()
    );
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), NS);
    let claim = claims.get("data-pg-0").await.unwrap();
    assert_eq!(
        claim.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Bound")
    );
    let status = pod.status.clone().unwrap();
    assert_eq!(status.phase.as_deref(), Some("Running"));
    let ip = pod_ip(&pod);
    assert!(pod_network.is_pod_ip(&ip), "pod IP {ip}");
    assert_eq!(
        status.pod_ips.as_ref().unwrap()[0].ip,
        ip,
        "podIPs disagrees with podIP"
    );
    let cs = &status.container_statuses.as_ref().unwrap()[0];
    assert!(cs.ready && cs.started == Some(true) && cs.restart_count == 0);
    assert!(cs.state.as_ref().unwrap().running.is_some());

    // A real PostgreSQL 16 on the pod's address, with the Secret's password, the args applied.
    let addr = Addr {
        host: ip.clone(),
        port: 5432,
    };
    let creds = Credentials {
        user: USER.into(),
        password: password.clone(),
    };
    assert_eq!(query_one(&addr, &creds, "SHOW wal_level").await, "logical");
    assert_eq!(query_one(&addr, &creds, "SHOW max_connections").await, "40");
    let version = query_one(&addr, &creds, "SHOW server_version").await;
    assert!(version.starts_with("16"), "server_version {version}");
    let wrong = Credentials {
        user: USER.into(),
        password: "not-the-password".into(),
    };
    assert!(
        connect(&addr, &wrong, USER).await.is_err(),
        "a wrong password was accepted"
    );
    {
        let c = connect(&addr, &creds, USER).await.unwrap();
        c.batch_execute("CREATE TABLE kept (v text); INSERT INTO kept VALUES ('before-crash')")
            .await
            .unwrap();
    }

    // A Service: kube-proxy sends its ClusterIP (routed from the machine to the node, like
    // the pods) to the pod.
    let services: Api<Service> = Api::namespaced(client.clone(), NS);
    let service: Service = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "pg-service"},
        "spec": {"selector": {"app": STS}, "ports": [{"port": 5432, "targetPort": 5432}]},
    }))
    .unwrap();
    let cluster_ip = services
        .create(&PostParams::default(), &service)
        .await
        .unwrap()
        .spec
        .and_then(|s| s.cluster_ip)
        .unwrap();
    let service_addr = Addr {
        host: cluster_ip.clone(),
        port: 5432,
    };
    assert_eq!(
        served_through(&service_addr, &creds, "SELECT string_agg(v, ',') FROM kept").await,
        "before-crash",
        "through the Service at {cluster_ip}"
    );

    // A crash: the kubelet restarts the container in the same pod, same address, count
    // bumped.
    let pod_uid = pod.metadata.uid.clone().unwrap();
    real_node.kill_container(&container_id(&pod));
    let deadline = Instant::now() + Duration::from_secs(60);
    let restarted = loop {
        let p = pods.get(POD).await.unwrap();
        if restart_count(&p) == 1 && is_ready(&p) {
            break p;
        }
        assert!(Instant::now() < deadline, "not restarted: {:?}", p.status);
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(restarted.metadata.uid.as_deref(), Some(pod_uid.as_str()));
    assert_eq!(pod_ip(&restarted), ip);
    assert_eq!(
        query_one(&addr, &creds, "SELECT string_agg(v, ',') FROM kept").await,
        "before-crash"
    );
    {
        let c = connect(&addr, &creds, USER).await.unwrap();
        c.batch_execute("INSERT INTO kept VALUES ('before-delete')")
            .await
            .unwrap();
    }

    // Deleted: the kubelet stops the server and removes the pod; the StatefulSet controller
    // makes a new one, which gets a new address and the same volume claim's data.
    let t2 = Instant::now();
    pods.delete(POD, &DeleteParams::default()).await.unwrap();
    let again = ready_pod(&pods, Some(&pod_uid), "after delete").await;
    eprintln!(
        "timings: pod recreated and Ready {:.1}s after its deletion",
        t2.elapsed().as_secs_f64()
    );
    let new_ip = pod_ip(&again);
    assert_ne!(new_ip, ip, "the recreated pod kept its address");
    assert_eq!(restart_count(&again), 0);
    assert!(pod_network.is_pod_ip(&new_ip), "pod IP {new_ip}");
    let old = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect((ip.as_str(), 5432)),
    )
    .await;
    assert!(
        !matches!(old, Ok(Ok(_))),
        "the old pod's server still listens"
    );
    let new_addr = Addr {
        host: new_ip,
        port: 5432,
    };
    assert_eq!(
        query_one(
            &new_addr,
            &creds,
            "SELECT string_agg(v, ',' ORDER BY v) FROM kept"
        )
        .await,
        "before-crash,before-delete"
    );
    // The Service's address did not change: it reaches the new pod.
    assert_eq!(
        served_through(&service_addr, &creds, "SELECT inet_server_addr()::text").await,
        format!("{}/32", new_addr.host),
        "through the Service at {cluster_ip}"
    );

    // By its name, from a pod: the cluster's DNS gives the Service's ClusterIP, and
    // through it the server answers.
    let (code, log) = real_node
        .run_pod(
            &client,
            NS,
            serde_json::json!({
                "metadata": {"name": "by-name"},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{
                        "name": "client",
                        "image": "postgres:16",
                        "command": ["sh", "-c", format!(
                            "getent hosts pg-service.{NS}.svc && pg_isready -h pg-service.{NS}.svc -p 5432"
                        )],
                    }],
                },
            }),
        )
        .await;
    assert_eq!(code, 0, "{log}");
    assert!(
        log.contains(&cluster_ip) && log.contains("accepting connections"),
        "pg-service.{NS}.svc did not resolve to {cluster_ip} and answer:\n{log}"
    );

    // The StatefulSet controller sees the replica Ready.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = sets.get(STS).await.unwrap();
        if s.status.as_ref().and_then(|s| s.ready_replicas) == Some(1) {
            break;
        }
        assert!(Instant::now() < deadline, "readyReplicas: {:?}", s.status);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // An image the node does not have cannot be pulled (nothing leaves the node's
    // namespace): the pod is placed and stays Pending, waiting on the pull.
    let other: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "unknown"},
        "spec": {"containers": [{"name": "c", "image": "busybox:1", "command": ["sleep", "1d"]}]},
    }))
    .unwrap();
    pods.create(&PostParams::default(), &other).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let p = pods.get("unknown").await.unwrap();
        let waiting = p
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|cs| cs[0].state.as_ref())
            .and_then(|s| s.waiting.as_ref())
            .and_then(|w| w.reason.clone());
        if matches!(
            waiting.as_deref(),
            Some("ErrImagePull" | "ImagePullBackOff")
        ) {
            assert_eq!(
                p.spec.as_ref().unwrap().node_name.as_deref(),
                Some(NODE_NAME)
            );
            assert_eq!(
                p.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Pending")
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "pod unknown not waiting on its image: {:?}",
            p.status
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A server that cannot start (a bad setting) crash-loops: restarted with a back-off,
    // never Ready, its exit code reported.
    sets.patch(
        "broken",
        &PatchParams::apply("k8s-cluster-test").force(),
        &Patch::Apply(&statefulset("broken", &["-c", "no_such_setting=1"])),
    )
    .await
    .unwrap();
    // The kubelet's back-off: 10 s, then 20 s.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(p) = pods.get_opt("broken-0").await.unwrap()
            && p.status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .is_some()
        {
            assert!(!is_ready(&p), "a server with a bad setting is Ready");
            let cs = &p
                .status
                .as_ref()
                .unwrap()
                .container_statuses
                .as_ref()
                .unwrap()[0];
            if cs.restart_count >= 2 {
                let exit = cs.last_state.as_ref().and_then(|s| s.terminated.as_ref());
                assert_eq!(exit.map(|t| t.exit_code), Some(1), "{cs:?}");
                break;
            }
        }
        assert!(Instant::now() < deadline, "broken-0 not crash-looping");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Every container of the node, and the node's namespace, are gone with it.
    let processes = real_node.processes();
    assert!(
        !processes.is_empty(),
        "no container process found on the node"
    );
    let netns = real_node.network().netns();
    drop(real_node);
    let left: Vec<_> = processes
        .iter()
        .filter(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists())
        .collect();
    assert!(left.is_empty(), "processes left by the node: {left:?}");
    let namespaces = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&namespaces.stdout)
            .lines()
            .any(|l| l.split_whitespace().next() == Some(netns.as_str())),
        "the node's namespace {netns} is left"
    );
}

/// pgflip's image, built by buildah from the repository's Dockerfile offline, runs on the
/// node: pgflip, PgBouncer and pg_dump answer in a pod as the image's unprivileged user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgflip_image_builds_from_the_dockerfile_and_runs_on_the_node() {
    let network = NodeNetwork::create();
    let cluster = Cluster::start_for(&network).await;
    cluster.create_namespace(NS).await;
    let real_node = RealNode::start(&cluster, network).await;
    let out = cluster.dir().to_path_buf();
    let archive = tokio::task::spawn_blocking(move || {
        common::real_node::build_pgflip_image(
            std::path::Path::new(env!("CARGO_BIN_EXE_pgflip")),
            &out,
        )
    })
    .await
    .unwrap();
    real_node.import_image(&archive);

    // What the container prints goes to its termination message, which the API shows.
    let pods: Api<Pod> = Api::namespaced(cluster.client(), NS);
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "tools"},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{
                "name": "tools",
                "image": common::real_node::PGFLIP_IMAGE,
                "imagePullPolicy": "Never",
                "command": ["sh", "-c",
                    "{ id -u; pgflip --version; pgbouncer --version | head -1; \
                      /usr/lib/postgresql/17/bin/pg_dump --version; } > /dev/termination-log 2>&1"],
            }],
        },
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    let terminated = loop {
        let status = pods.get("tools").await.unwrap().status.unwrap_or_default();
        if let Some(t) = status
            .container_statuses
            .as_ref()
            .and_then(|cs| cs[0].state.as_ref())
            .and_then(|s| s.terminated.clone())
        {
            break t;
        }
        assert!(
            Instant::now() < deadline,
            "the tools pod did not finish: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let printed = terminated.message.clone().unwrap_or_default();
    assert_eq!(terminated.exit_code, 0, "{printed}");
    let lines: Vec<&str> = printed.lines().collect();
    assert_eq!(lines.first(), Some(&"65532"), "{printed}");
    assert!(lines.iter().any(|l| l.starts_with("pgflip ")), "{printed}");
    assert!(
        lines.iter().any(|l| l.contains("PgBouncer 1.")),
        "{printed}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("pg_dump (PostgreSQL) 17")),
        "{printed}"
    );
}
