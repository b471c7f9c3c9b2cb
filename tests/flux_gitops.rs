//! The whole GitOps loop with real Flux: a Git repository holding this checkout's
//! `manifests/` and `gitops/` is served over Git's smart HTTP on loopback;
//! source-controller fetches it, kustomize-controller installs pgflip from `manifests/` and
//! applies `gitops/databases/`. Everything pgflip runs runs on a real node
//! (tests/common/real_node.rs): its controller Deployment — two pods of pgflip's image,
//! built from the Dockerfile, as its ServiceAccount (a projected token, in-cluster
//! configuration), Ready by their probes — and the database's servers and endpoint. The
//! Flux objects are `gitops/flux/*.yaml` exactly, with only the Git and forge URLs
//! replaced. Then, as a user would: push a version bump, a `git revert`, a bad commit and
//! a good one, and watch the database, the Kustomization and the commit statuses on a
//! stand-in GitHub API (the one third-party part), which the controller's pods reach at the
//! machine's side of the node's link.

mod common;

use common::database::{admin, endpoint, is_ready_at, server_version};
use common::flux::{self, Flux};
use common::forge::FakeForge;
use common::git_http::{GitHttp, git};
use common::kube::Cluster;
use common::real_node::{NodeNetwork, PGFLIP_IMAGE, RealNode, node_with_pgflip};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams,
};
use pgflip_engine::load::{self, LoadConfig};
use pgflip_k8s::crd::BlueGreenDatabase;
use pgflip_k8s::flux::KustomizationStatus;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What `gitops/` names: the database, its namespace, the forge repository.
const NS: &str = "shop";
const DB: &str = "orders";
const FORGE_REPOSITORY: &str = "your-org/your-repo";
const PLACEHOLDER_GIT_URL: &str = "https://github.com/your-org/your-repo.git";
const PLACEHOLDER_FORGE_API: &str = "https://api.github.com";
const FORGE_TOKEN: &str = "forge-t0ken";
/// The image `manifests/deployment.yaml` names (and the controller gives endpoint pods).
const RELEASE_IMAGE: &str = "ghcr.io/pgflip/pgflip:0.1.0";

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &target);
        } else {
            std::fs::copy(&path, &target).unwrap();
        }
    }
}

/// The user's repository: a working copy, and the bare repository the server serves.
struct Repo {
    work: PathBuf,
    served: PathBuf,
}

impl Repo {
    fn new(root: &Path) -> Repo {
        let here = Path::new(env!("CARGO_MANIFEST_DIR"));
        let served = root.join("served");
        std::fs::create_dir_all(&served).unwrap();
        git(&served, &["init", "--bare", "-q", "app.git"]);
        let work = root.join("work");
        copy_dir(&here.join("manifests"), &work.join("manifests"));
        copy_dir(&here.join("gitops"), &work.join("gitops"));
        git(&work, &["init", "-q"]);
        let repo = Repo {
            work,
            served: served.clone(),
        };
        repo.commit("pgflip and the orders database at PostgreSQL 15");
        repo
    }

    fn database_file(&self) -> PathBuf {
        self.work.join("gitops/databases/orders.yaml")
    }

    fn set_version(&self, version: &str) {
        let text = std::fs::read_to_string(self.database_file()).unwrap();
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with("version:"))
            .unwrap();
        let text = text.replace(line, &format!("  version: \"{version}\""));
        std::fs::write(self.database_file(), text).unwrap();
    }

    /// Commits everything and pushes to the served repository; the new commit.
    fn commit(&self, message: &str) -> String {
        self.commit_unpushed(message);
        self.push()
    }

    fn commit_unpushed(&self, message: &str) -> String {
        git(&self.work, &["add", "-A"]);
        git(&self.work, &["commit", "-q", "-m", message]);
        git(&self.work, &["rev-parse", "HEAD"])
    }

    fn push(&self) -> String {
        self.push_to("refs/heads/main")
    }

    /// Pushes HEAD to `git_ref` of the served repository (`refs/pull/1/head` is where
    /// a forge keeps a pull request's head); the commit pushed.
    fn push_to(&self, git_ref: &str) -> String {
        let remote = self.served.join("app.git");
        git(
            &self.work,
            &[
                "push",
                "-q",
                "-f",
                remote.to_str().unwrap(),
                &format!("HEAD:{git_ref}"),
            ],
        );
        git(&self.work, &["rev-parse", "HEAD"])
    }
}

fn dynamic_api(
    client: &kube::Client,
    group: &str,
    version: &str,
    kind: &str,
) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk(group, version, kind);
    let resource = ApiResource::from_gvk(&gvk);
    Api::namespaced_with(client.clone(), flux::NAMESPACE, &resource)
}

/// Applies one of `gitops/flux/*.yaml` as a person would with kubectl, URLs replaced.
async fn apply_flux_object(cluster: &Cluster, file: &str, git_url: &str, forge_api: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("gitops/flux")
        .join(file);
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace(PLACEHOLDER_GIT_URL, git_url)
        .replace(PLACEHOLDER_FORGE_API, forge_api);
    cluster.apply_yaml(&text, "kubectl").await;
}

/// What `flux reconcile source git pgflip` does: ask for a fetch now, not at the interval.
async fn request_fetch(client: &kube::Client) {
    let api = dynamic_api(client, "source.toolkit.fluxcd.io", "v1", "GitRepository");
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    api.patch(
        "pgflip",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({
            "metadata": {"annotations": {"reconcile.fluxcd.io/requestedAt": now}}
        })),
    )
    .await
    .unwrap();
}

async fn kustomization(client: &kube::Client, name: &str) -> Option<KustomizationStatus> {
    let api = dynamic_api(client, "kustomize.toolkit.fluxcd.io", "v1", "Kustomization");
    let object = api.get(name).await.ok()?;
    serde_json::from_value(object.data.get("status")?.clone()).ok()
}

fn ready_at(status: &KustomizationStatus, commit: &str) -> bool {
    status.is_ready()
        && status.last_applied_revision.as_deref() == Some(&format!("main@sha1:{commit}"))
}

/// Ready at `version`, switched for `commit`.
fn is_ready_for(object: &BlueGreenDatabase, version: &str, commit: &str) -> bool {
    is_ready_at(object, version)
        && object.status.as_ref().and_then(|s| s.revision.as_deref()) == Some(commit)
}

/// The commit statuses posted for `commit`: (state, description), in order.
fn statuses_on(forge: &FakeForge, commit: &str) -> Vec<(String, String)> {
    statuses_in(forge, commit, &format!("pgflip/{NS}/{DB}"))
}

/// The plans posted on a pull request's head `commit`: (state, description), in order.
fn plans_on(forge: &FakeForge, commit: &str) -> Vec<(String, String)> {
    statuses_in(forge, commit, &format!("pgflip/plan/{NS}/{DB}"))
}

fn statuses_in(forge: &FakeForge, commit: &str, context: &str) -> Vec<(String, String)> {
    forge
        .requests()
        .into_iter()
        .filter(|r| r.path == format!("/repos/{FORGE_REPOSITORY}/statuses/{commit}"))
        .filter(|r| r.body["context"] == context)
        .map(|r| {
            assert_eq!(r.method, "POST");
            assert_eq!(r.headers["authorization"], format!("Bearer {FORGE_TOKEN}"));
            (
                r.body["state"].as_str().unwrap().to_string(),
                r.body["description"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect()
}

/// Dropped in field order: the node and its pods first, then Flux, the API server last.
struct World {
    node: RealNode,
    flux: Flux,
    forge: FakeForge,
    cluster: Cluster,
}

impl World {
    /// Everything a failing wait shows: Flux's and pgflip's logs, the Kustomizations.
    async fn diagnostics(&self) -> String {
        let client = self.cluster.client();
        format!(
            "--- Kustomization pgflip ---\n{:#?}\n--- Kustomization databases ---\n{:#?}\n\
             --- kustomize-controller ---\n{}\n--- source-controller ---\n{}\n\
             --- controller pods ---\n{}\n--- database pods ---\n{}\n--- forge ---\n{:#?}",
            kustomization(&client, "pgflip").await,
            kustomization(&client, "databases").await,
            self.flux.log_tail("kustomize-controller", 30),
            self.flux.log_tail("source-controller", 15),
            self.node
                .container_logs("pgflip-system", "pgflip-controller", 60),
            self.node.container_logs(NS, "", 10),
            self.forge
                .requests()
                .iter()
                .map(|r| (r.path.clone(), r.body.clone()))
                .collect::<Vec<_>>(),
        )
    }

    async fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut probe: impl AsyncFnMut() -> Option<T>,
    ) -> T {
        let started = Instant::now();
        loop {
            if let Some(v) = probe().await {
                eprintln!("{what}: after {:.1}s", started.elapsed().as_secs_f64());
                return v;
            }
            if started.elapsed() > timeout {
                panic!("timed out waiting for {what}\n{}", self.diagnostics().await);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until Flux reports `commit` Ready on the databases Kustomization, checking at
    /// each look that Flux never calls it Ready before the object has switched to
    /// `version` for that very commit.
    async fn wait_switched(&self, version: &str, commit: &str) -> BlueGreenDatabase {
        let client = self.cluster.client();
        let objects: Api<BlueGreenDatabase> = Api::namespaced(client.clone(), NS);
        let mut saw_progressing = false;
        self.wait_for(
            &format!("Flux Ready at {version} ({commit})"),
            Duration::from_secs(300),
            async || {
                let status = kustomization(&client, "databases").await?;
                // Read after Flux's status: the object cannot be older than what Flux saw.
                let object = objects.get(DB).await.ok()?;
                if ready_at(&status, commit) {
                    assert!(
                        is_ready_for(&object, version, commit),
                        "Flux turned Ready at {commit} before the switch: {:?}",
                        object.status
                    );
                    assert!(saw_progressing, "Flux was never seen checking {commit}");
                    return Some(object);
                }
                saw_progressing |= status.last_attempted_revision.as_deref()
                    == Some(&format!("main@sha1:{commit}"))
                    && !status.is_ready();
                None
            },
        )
        .await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_bump_revert_and_bad_commit_through_real_flux() {
    let network = NodeNetwork::create();
    let cluster = Cluster::start_for(&network).await;
    let client = cluster.client();
    let flux = Flux::start(&cluster).await;
    let node = node_with_pgflip(&cluster, network).await;
    // The release the manifests name, as built from this checkout.
    node.tag_image(PGFLIP_IMAGE, RELEASE_IMAGE);
    // Reached from the controller's pods: on the machine's side of the node's link.
    let forge = FakeForge::start_on(node.network().host_ip().into()).await;
    let dir = tempfile::tempdir().unwrap();
    let repo = Repo::new(dir.path());
    let first = git(&repo.work, &["rev-parse", "HEAD"]);
    // Fetched by Flux, and by the controller's pods for the pull requests' heads.
    let git_server = GitHttp::start_on(&repo.served, node.network().host_ip().into()).await;
    let git_url = format!("{}/app.git", git_server.url);

    // What a person does by hand, once, besides `flux install`: the forge token Secret.
    cluster.create_namespace("pgflip-system").await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "pgflip-system");
    let token: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "pgflip-forge"},
        "stringData": {"token": FORGE_TOKEN},
    }))
    .unwrap();
    secrets
        .create(&PostParams::default(), &token)
        .await
        .unwrap();

    // The controller's pods run as its ServiceAccount: Flux's copy of manifests/rbac.yaml
    // is all they may do.
    let world = World {
        cluster,
        flux,
        node,
        forge,
    };
    for file in ["source.yaml", "pgflip.yaml", "databases.yaml"] {
        apply_flux_object(&world.cluster, file, &git_url, &world.forge.url).await;
    }

    // Bootstrap: Flux installs pgflip, then the database at 15.
    world.wait_switched("15", &first).await;
    let deployment: Api<k8s_openapi::api::apps::v1::Deployment> =
        Api::namespaced(client.clone(), "pgflip-system");
    let controller = deployment.get("pgflip-controller").await.unwrap();
    assert_eq!(
        controller.status.and_then(|s| s.available_replicas),
        Some(2),
        "both controller replicas run"
    );
    // The leader is one of those pods, on the node, and holds the Lease as its pod.
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), "pgflip-system");
    // The identity the leader holds it by is its pod's name.
    let lease_holder = async || {
        leases
            .get("pgflip-controller")
            .await
            .unwrap()
            .spec
            .and_then(|s| s.holder_identity)
            .unwrap_or_default()
    };
    let holder = lease_holder().await;
    let pods: Api<k8s_openapi::api::core::v1::Pod> =
        Api::namespaced(client.clone(), "pgflip-system");
    let leader = pods
        .get(&holder)
        .await
        .unwrap_or_else(|e| panic!("the Lease holder {holder:?} is not a controller pod: {e}"));
    let leader_spec = leader.spec.unwrap();
    assert_eq!(
        leader_spec.node_name.as_deref(),
        Some(common::real_node::NODE_NAME)
    );
    assert_eq!(
        leader_spec.service_account_name.as_deref(),
        Some("pgflip-controller")
    );
    let states = statuses_on(&world.forge, &first);
    assert_eq!(
        states.last().map(|s| s.0.as_str()),
        Some("success"),
        "{states:?}"
    );
    let creds = admin(&client, NS, DB).await;
    let addr = endpoint(&client, NS)
        .await
        .expect("the endpoint pod is Ready");
    load::prepare(&addr, &creds, "app").await.unwrap();

    // A pull request bumps the version; it merges; Flux fetches and applies; pgflip
    // switches under a write load.
    let switch_under_load = async |version: &str, commit: &str| {
        let addr = endpoint(&client, NS).await.unwrap();
        let writes = load::start(LoadConfig {
            endpoint: addr.clone(),
            creds: creds.clone(),
            database: "app".into(),
            clients: 4,
            rate_per_sec: Some(200),
        });
        request_fetch(&client).await;
        let object = world.wait_switched(version, commit).await;
        let report = writes.stop().await;
        eprintln!(
            "switch to {version} through Flux: {} commits, {} failed, last switch {:?}",
            report.committed,
            report.failed,
            object.status.as_ref().and_then(|s| s.last_switch.clone())
        );
        assert_eq!(report.failed, 0, "failed transactions: {:?}", report.errors);
        assert!(report.committed > 100, "the load ran: {report:?}");
        let serving = endpoint(&client, NS).await.unwrap();
        assert_eq!(
            load::lost_commits(&report, &serving, &creds, "app")
                .await
                .unwrap(),
            0,
            "every acknowledged commit is on the new primary"
        );
        assert!(
            server_version(&serving, &creds, "app")
                .await
                .starts_with(version)
        );
        let states = statuses_on(&world.forge, commit);
        eprintln!("commit statuses on {commit}: {states:#?}");
        assert_eq!(
            states.first().map(|s| s.0.as_str()),
            Some("pending"),
            "{states:?}"
        );
        assert_eq!(
            states.last().map(|s| s.0.as_str()),
            Some("success"),
            "{states:?}"
        );
        assert!(
            states
                .iter()
                .any(|(_, d)| d.contains(&format!("→ {version}"))),
            "the pending statuses say where it is going: {states:?}"
        );
        object
    };
    let statefulsets: Api<StatefulSet> = Api::namespaced(client.clone(), NS);
    let generations = async || -> Vec<_> {
        let mut list: Vec<_> = statefulsets
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .map(|s| (s.metadata.name, s.metadata.generation))
            .collect();
        list.sort();
        list
    };
    // Before it merges, the pull request gets a plan from the controller in the cluster
    // (Flux follows main; the forge keeps the head under refs/pull/N/head): a success
    // for the bump; a failure for a second one asking for a version pgflip refuses. The
    // plans change nothing.
    let before_plans = generations().await;
    repo.set_version("13");
    let unsupported = repo.commit_unpushed("orders: PostgreSQL 13");
    repo.push_to("refs/pull/2/head");
    git(&repo.work, &["reset", "-q", "--hard", "HEAD~1"]);
    repo.set_version("16");
    let bump = repo.commit_unpushed("orders: PostgreSQL 16");
    repo.push_to("refs/pull/1/head");
    let pulls = format!("/repos/{FORGE_REPOSITORY}/pulls?state=open&per_page=100");
    let pull = |number: u64, head: &str| serde_json::json!({"number": number, "head": {"sha": head, "ref": "bump"}, "base": {"ref": "main"}});
    world.forge.list(
        &pulls,
        serde_json::json!([pull(1, &bump), pull(2, &unsupported)]),
    );
    let plan_of = async |head: &str| {
        world
            .wait_for(
                "a plan on the pull request",
                Duration::from_secs(120),
                async || plans_on(&world.forge, head).pop(),
            )
            .await
    };
    let (state, description) = plan_of(&bump).await;
    eprintln!("plan on the bump: {state}: {description}");
    assert_eq!(state, "success", "{description}");
    assert!(description.contains("upgrade 15 → 16"), "{description}");
    let (state, description) = plan_of(&unsupported).await;
    assert_eq!(state, "failure", "{description}");
    assert!(
        description.contains("PostgreSQL 13 is not supported"),
        "{description}"
    );
    assert_eq!(
        generations().await,
        before_plans,
        "a plan changes no StatefulSet"
    );
    assert!(
        statuses_on(&world.forge, &bump).is_empty(),
        "not switched yet"
    );
    world.forge.list(&pulls, serde_json::json!([]));

    // It merges (fast-forward: the head planned is the commit switched).
    repo.push();
    let object = switch_under_load("16", &bump).await;
    let last = object.status.unwrap().last_switch.unwrap();
    assert_eq!(
        (last.from_version.as_str(), last.to_version.as_str()),
        ("15", "16")
    );

    // `git revert` of the bump: back to 15, nothing lost.
    git(&repo.work, &["revert", "--no-edit", "HEAD"]);
    let revert = repo.push();
    switch_under_load("15", &revert).await;

    // A commit pgflip refuses: a failure status on it saying why, Flux's health check
    // fails, nothing changes, blue keeps serving.
    let before = generations().await;
    repo.set_version("13");
    let bad = repo.commit("orders: PostgreSQL 13");
    request_fetch(&client).await;
    let failure = world
        .wait_for(
            "a failure status on the bad commit",
            Duration::from_secs(120),
            async || {
                statuses_on(&world.forge, &bad)
                    .into_iter()
                    .find(|(state, _)| state == "failure")
            },
        )
        .await;
    eprintln!("commit status on the refused commit: {failure:?}");
    assert!(
        failure.1.contains("13"),
        "the failure says why: {failure:?}"
    );
    world
        .wait_for(
            "Flux's health check to fail",
            Duration::from_secs(60),
            async || {
                let status = kustomization(&client, "databases").await?;
                let failed = status.last_attempted_revision.as_deref()
                    == Some(&format!("main@sha1:{bad}"))
                    && !status.is_ready()
                    && status
                        .conditions
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.reason == "HealthCheckFailed");
                failed.then_some(())
            },
        )
        .await;
    assert_eq!(
        generations().await,
        before,
        "a refused commit changes no StatefulSet"
    );
    let serving = endpoint(&client, NS).await.unwrap();
    assert!(
        server_version(&serving, &creds, "app")
            .await
            .starts_with("15")
    );

    // The next good commit proceeds, and the leader is killed mid-switch (SIGKILL to its
    // container: no chance to give the Lease back). Once the Lease expires, a replica —
    // the other one, or the killed one restarted by the kubelet — takes it over and
    // finishes the switch, clients untouched.
    repo.set_version("16");
    let fixed = repo.commit("orders: PostgreSQL 16, again");
    let objects: Api<BlueGreenDatabase> = Api::namespaced(client.clone(), NS);
    let kill_leader = async {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let phase = objects
                .get(DB)
                .await
                .ok()
                .and_then(|o| o.status?.phase)
                .unwrap_or_default();
            let copying = [
                "provision",
                "copy-schema",
                "replicate",
                "initial-sync",
                "catch-up",
                "verify",
            ];
            if copying.contains(&phase.as_str()) {
                let holder = lease_holder().await;
                let container = pods
                    .get(&holder)
                    .await
                    .unwrap()
                    .status
                    .and_then(|s| s.container_statuses?.first()?.container_id.clone())
                    .expect("the leader's container");
                world.node.kill_container(&container);
                return (holder, phase, Instant::now());
            }
            assert!(
                Instant::now() < deadline,
                "the switch was never seen before its pause (phase {phase:?})"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let (_, (killed, phase, at)) = tokio::join!(switch_under_load("16", &fixed), kill_leader);
    eprintln!(
        "the leader {killed} was killed during {phase}; {} leads now, the switch was done {:.1}s after the kill",
        lease_holder().await,
        at.elapsed().as_secs_f64()
    );

    // The forge token never reaches a log.
    let logs = world
        .node
        .container_logs("pgflip-system", "pgflip-controller", 100_000);
    assert!(logs.contains("pgflip"), "the controller logged");
    assert!(!logs.contains(FORGE_TOKEN), "the forge token is in a log");
    drop(git_server);
}
