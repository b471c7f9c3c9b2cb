//! The Kubernetes test harness itself, proven on a real scenario: a real control plane
//! (tests/common/kube.rs: etcd, kube-apiserver, kube-controller-manager) and the node agent
//! standing in for the kubelet (tests/common/node_agent.rs). A StatefulSet of the official
//! `postgres:16` image shape is run by the real StatefulSet controller; the agent binds its
//! pod, runs a real PostgreSQL 16 on the pod's own loopback address with the Secret's
//! password, reports it Ready, restarts it when it crashes and, when the pod is deleted,
//! stops it so the StatefulSet recreates it — on a new address, with the same data.

mod common;

use common::kube::Cluster;
use common::node_agent::NodeAgent;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Node, PersistentVolumeClaim, Pod};
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

fn restart_count(pod: &Pod) -> i32 {
    pod.status
        .as_ref()
        .unwrap()
        .container_statuses
        .as_ref()
        .unwrap()[0]
        .restart_count
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
    let t0 = Instant::now();
    let cluster = Cluster::start().await;
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
    let agent = NodeAgent::start(&cluster, NS).await;

    // The agent's Node is registered and Ready.
    let nodes: Api<Node> = Api::all(client.clone());
    let node_list = nodes.list(&Default::default()).await.unwrap();
    assert_eq!(node_list.items.len(), 1);
    let node = &node_list.items[0];
    assert!(
        node.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True")),
        "node not Ready: {:?}",
        node.status
    );

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

    // The StatefulSet controller made it, the agent bound it to its node.
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
    assert!(claims.get_opt("data-pg-0").await.unwrap().is_some());
    let status = pod.status.clone().unwrap();
    assert_eq!(status.phase.as_deref(), Some("Running"));
    let ip = pod_ip(&pod);
    let octets: Vec<u8> = ip.split('.').map(|o| o.parse().unwrap()).collect();
    assert!(
        octets.len() == 4 && octets[0] == 127 && (64..=127).contains(&octets[1]),
        "pod IP {ip}"
    );
    assert_eq!(
        status.pod_ips.as_ref().unwrap()[0].ip,
        ip,
        "podIPs disagrees with podIP"
    );
    assert_eq!(agent.pod_ip(POD).as_deref(), Some(ip.as_str()));
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

    // A crash: the agent restarts the process in the same pod, same address, count bumped.
    let pod_uid = pod.metadata.uid.clone().unwrap();
    agent.kill_process(POD);
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

    // Deleted: the agent stops the server and removes the pod; the StatefulSet controller
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
    assert_eq!(agent.pod_ip(POD).as_deref(), Some(new_ip.as_str()));
    assert!(
        tokio::net::TcpStream::connect((ip.as_str(), 5432))
            .await
            .is_err(),
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

    // A container the agent cannot run is bound but left Pending.
    let other: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "unknown"},
        "spec": {"containers": [{"name": "c", "image": "busybox:1", "command": ["sleep", "1d"]}]},
    }))
    .unwrap();
    pods.create(&PostParams::default(), &other).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let p = pods.get("unknown").await.unwrap();
        if p.spec.as_ref().unwrap().node_name.is_some() {
            tokio::time::sleep(Duration::from_millis(600)).await;
            let p = pods.get("unknown").await.unwrap();
            assert_eq!(
                p.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Pending")
            );
            assert!(agent.pod_ip("unknown").is_none());
            break;
        }
        assert!(Instant::now() < deadline, "pod unknown never bound");
        tokio::time::sleep(Duration::from_millis(50)).await;
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
    let deadline = Instant::now() + Duration::from_secs(60);
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

    drop(agent);
    // Every server of the agent is gone with it.
    assert!(
        tokio::net::TcpStream::connect((new_addr.host.as_str(), 5432))
            .await
            .is_err(),
        "the agent left its server running"
    );
}

#[test]
fn container_args_expand_like_the_kubelet() {
    use common::node_agent::expand;
    let env = vec![
        ("POD_IP".to_string(), "127.64.1.2".to_string()),
        ("EMPTY".to_string(), String::new()),
    ];
    assert_eq!(
        expand("--metrics-addr=$(POD_IP):8080", &env),
        "--metrics-addr=127.64.1.2:8080"
    );
    assert_eq!(expand("$(EMPTY)x", &env), "x");
    // Undefined references and escapes stay as the kubelet leaves them.
    assert_eq!(
        expand("$(NOPE) $$(POD_IP) $5", &env),
        "$(NOPE) $(POD_IP) $5"
    );
}
