//! A real Kubernetes control plane for the Kubernetes-mode tests, serving one real node
//! (super::real_node) on the machine's side of the node's link: etcd, kube-apiserver,
//! kube-scheduler and kube-controller-manager (the controllers a node and its workloads
//! need), built by `scripts/setup-kube.sh` from the Go module proxy. Certificates and
//! tokens are generated per cluster; every port comes from the OS; the whole cluster lives
//! in one temp dir and dies on Drop. Our CRD and Flux's CRDs are installed and Established
//! before `start_for` returns.

use super::real_node::NODE_NAME;
use super::tail;
use k8s_openapi::api::core::v1::{Namespace, Node, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams, PostParams};
use pgflip_engine::run_as::free_port;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The user name of the controller's ServiceAccount `pgflip-system/pgflip-controller`.
const CONTROLLER_USER: &str = "system:serviceaccount:pgflip-system:pgflip-controller";

pub struct Cluster {
    dir: tempfile::TempDir,
    processes: Vec<(String, Child)>,
    kubeconfig: PathBuf,
    client: kube::Client,
}

/// Where scripts/setup-kube.sh and scripts/setup-flux.sh put what they build.
pub fn cache_dir() -> PathBuf {
    std::env::var("PGFLIP_KUBE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/pgflip/kube")
        })
}

fn bin_dir() -> PathBuf {
    let bin = cache_dir().join("bin");
    for b in ["etcd", "kube-apiserver", "kube-controller-manager"] {
        assert!(
            bin.join(b).is_file(),
            "{} is missing: run scripts/setup-kube.sh",
            bin.join(b).display()
        );
    }
    bin
}

/// Flux's CRDs (Kustomization, GitRepository): `$PGFLIP_FLUX_CRDS`; else those
/// scripts/setup-flux.sh took from the Flux modules it built (so they match the
/// controllers); else `../shared/flux-crds` beside the repository (a checkout elsewhere,
/// as on a fresh machine, has none there).
fn flux_crd_dir() -> PathBuf {
    let flux = std::env::var_os("PGFLIP_FLUX_CRDS")
        .map(PathBuf::from)
        .or_else(|| Some(cache_dir().join("flux-crds")).filter(|d| d.is_dir()))
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/flux-crds"));
    assert!(
        flux.is_dir(),
        "Flux's CRDs are not at {}: run scripts/setup-flux.sh, or put Flux's CRD YAML files \
         (kustomize-controller's Kustomization, source-controller's GitRepository) there or \
         set PGFLIP_FLUX_CRDS",
        flux.display()
    );
    flux
}

/// Whether the API server serves the CRD's kind.
pub fn is_established(crd: &CustomResourceDefinition) -> bool {
    crd.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| {
            c.iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
        })
}

/// Whether the Node's Ready condition is True.
pub fn is_node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

impl Cluster {
    /// A control plane for a real node on `network` ([`super::real_node`]): the API
    /// server listens on the machine's side of the node's veth (the node reaches nothing
    /// else), authorizes the kubelet as a node (Node authorizer, NodeRestriction), and the
    /// scheduler and the controllers a node needs run too (node lifecycle, which lifts the
    /// not-ready taint; the kube-root-ca.crt publisher, without which pods with a
    /// service-account token never start; the volume binder; EndpointSlices for
    /// kube-proxy).
    pub async fn start_for(node: &super::real_node::NodeNetwork) -> Cluster {
        let started = Instant::now();
        let bin = bin_dir();
        let address = node.host_ip().to_string();
        let flux = flux_crd_dir();
        let dir = tempfile::Builder::new()
            .prefix("pgflip-kube-")
            .tempdir()
            .unwrap();
        let path = |name: &str| dir.path().join(name);

        // A CA, the API server's serving certificate, the service-account signing key.
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "pgflip-test-ca");
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
        let serving_key = rcgen::KeyPair::generate().unwrap();
        let serving = rcgen::CertificateParams::new(vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            address.clone(),
            // What pods reach it at: the `kubernetes` Service.
            node.api_service_ip().to_string(),
            "kubernetes.default.svc".to_string(),
        ])
        .unwrap()
        .signed_by(&serving_key, &ca)
        .unwrap();
        let sa_key = rcgen::KeyPair::generate().unwrap();
        // The kubeconfig and the CA may be read by processes of another user: the
        // directory is searchable, they are readable; the keys and tokens are the owner's
        // only.
        use std::os::unix::fs::PermissionsExt;
        let write = |name: &str, text: &str, mode: u32| {
            std::fs::write(path(name), text).unwrap();
            std::fs::set_permissions(path(name), std::fs::Permissions::from_mode(mode)).unwrap();
        };
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        write("ca.crt", &ca.pem(), 0o644);
        write("apiserver.crt", &serving.pem(), 0o644);
        write("apiserver.key", &serving_key.serialize_pem(), 0o600);
        write("sa.key", &sa_key.serialize_pem(), 0o600);
        write("sa.pub", &sa_key.public_key_pem(), 0o644);
        let token = pgflip_engine::random::token(32);
        // The controller's own identity: the user name a token of its ServiceAccount
        // carries, so manifests/rbac.yaml is what authorizes it in the tests.
        let controller_token = pgflip_engine::random::token(32);
        // The kubelet's: a node's user, in the nodes' group; kube-proxy's: the user the
        // bootstrap role system:node-proxier is bound to.
        let node_token = pgflip_engine::random::token(32);
        let proxy_token = pgflip_engine::random::token(32);
        write(
            "tokens.csv",
            &format!(
                "{token},admin,admin-uid,\"system:masters\"\n{controller_token},{CONTROLLER_USER},controller-uid\n\
                 {node_token},system:node:{NODE_NAME},node-uid,\"system:nodes\"\n\
                 {proxy_token},system:kube-proxy,kube-proxy-uid\n"
            ),
            0o600,
        );

        let mut cluster_processes: Vec<(String, Child)> = Vec::new();
        let spawn = |name: &str, cmd: &mut Command| -> (String, Child) {
            let log = std::fs::File::create(path(&format!("{name}.log"))).unwrap();
            let child = cmd
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("starting {name}: {e}"));
            (name.to_string(), child)
        };

        let (client_port, peer_port) = (free_port().unwrap(), free_port().unwrap());
        let etcd_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        cluster_processes.push(spawn(
            "etcd",
            Command::new(bin.join("etcd"))
                .arg("--data-dir")
                .arg(path("etcd"))
                .args(["--name", "default"])
                .args(["--listen-client-urls", &etcd_url])
                .args(["--advertise-client-urls", &etcd_url])
                .args(["--listen-peer-urls", &peer_url])
                .args(["--initial-advertise-peer-urls", &peer_url])
                .arg(format!("--initial-cluster=default={peer_url}"))
                .args(["--unsafe-no-fsync", "--log-level", "warn"]),
        ));

        let api_port = free_port().unwrap();
        cluster_processes.push(spawn(
            "kube-apiserver",
            Command::new(bin.join("kube-apiserver"))
                .arg(format!("--etcd-servers={etcd_url}"))
                .arg(format!("--bind-address={address}"))
                .arg(format!("--advertise-address={address}"))
                .arg(format!("--secure-port={api_port}"))
                .arg(format!("--cert-dir={}", path("certs").display()))
                .arg(format!(
                    "--tls-cert-file={}",
                    path("apiserver.crt").display()
                ))
                .arg(format!(
                    "--tls-private-key-file={}",
                    path("apiserver.key").display()
                ))
                .arg(format!("--client-ca-file={}", path("ca.crt").display()))
                .arg(format!(
                    "--token-auth-file={}",
                    path("tokens.csv").display()
                ))
                .args([
                    "--authorization-mode=Node,RBAC",
                    "--enable-admission-plugins=NodeRestriction",
                    "--kubelet-preferred-address-types=InternalIP",
                ])
                .arg("--service-account-issuer=https://kubernetes.default.svc")
                .arg(format!(
                    "--service-account-key-file={}",
                    path("sa.pub").display()
                ))
                .arg(format!(
                    "--service-account-signing-key-file={}",
                    path("sa.key").display()
                ))
                // A Service range of the node's own, routed to it (kube-proxy's rules are
                // in the node's namespace), and the `kubernetes` Service's endpoint is
                // this server (the lease reconciler), so pods reach the API.
                .arg(format!(
                    "--service-cluster-ip-range={}",
                    node.service_cidr()
                ))
                .arg("--endpoint-reconciler-type=lease")
                .arg("--enable-priority-and-fairness=false")
                .arg("--profiling=false")
                .arg("--v=1"),
        ));

        let kubeconfig_for = |token: &str| {
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: https://{address}:{api_port}\n    certificate-authority: {ca}\nusers:\n- name: admin\n  user:\n    token: {token}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: admin\ncurrent-context: test\n",
                ca = path("ca.crt").display()
            )
        };
        let kubeconfig = path("kubeconfig");
        write("kubeconfig", &kubeconfig_for(&token), 0o644);
        write(
            "controller.kubeconfig",
            &kubeconfig_for(&controller_token),
            0o644,
        );
        write("node.kubeconfig", &kubeconfig_for(&node_token), 0o600);
        write(
            "kube-proxy.kubeconfig",
            &kubeconfig_for(&proxy_token),
            0o600,
        );

        let mut cluster = Cluster {
            processes: cluster_processes,
            kubeconfig: kubeconfig.clone(),
            client: Cluster::connect(&kubeconfig).await,
            dir,
        };
        cluster
            .wait_ready(&address, api_port, &token, ca.pem().as_bytes())
            .await;
        let api_ready = started.elapsed();

        let processes = &mut cluster.processes;
        let dir_path = cluster.dir.path().to_path_buf();
        let log = std::fs::File::create(dir_path.join("kube-controller-manager.log")).unwrap();
        let controllers = "statefulset,deployment,replicaset,garbagecollector,serviceaccount,serviceaccount-token,pvc-protection,\
             node-lifecycle-controller,root-ca-certificate-publisher-controller,persistentvolume-binder-controller,endpointslice-controller";
        let kcm = Command::new(bin.join("kube-controller-manager"))
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg(format!("--controllers={controllers}"))
            .arg(format!(
                "--service-account-private-key-file={}",
                dir_path.join("sa.key").display()
            ))
            .arg(format!(
                "--root-ca-file={}",
                dir_path.join("ca.crt").display()
            ))
            .args([
                "--leader-elect=false",
                "--secure-port=0",
                "--bind-address=127.0.0.1",
            ])
            .arg("--use-service-account-credentials=false")
            .arg("--v=1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting kube-controller-manager");
        processes.push(("kube-controller-manager".into(), kcm));
        let log = std::fs::File::create(dir_path.join("kube-scheduler.log")).unwrap();
        let scheduler = Command::new(bin.join("kube-scheduler"))
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .args(["--leader-elect=false", "--secure-port=0", "--v=1"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting kube-scheduler (run scripts/setup-kube.sh)");
        processes.push(("kube-scheduler".into(), scheduler));

        cluster.install_crds(&flux).await;
        eprintln!(
            "cluster up in {:.1}s (API server ready after {:.1}s) at {}",
            started.elapsed().as_secs_f64(),
            api_ready.as_secs_f64(),
            cluster.dir.path().display()
        );
        cluster
    }

    /// A client as whoever `kubeconfig` names.
    pub async fn connect(kubeconfig: &Path) -> kube::Client {
        let config = kube::config::Kubeconfig::read_from(kubeconfig).unwrap();
        let config = kube::Config::from_custom_kubeconfig(
            config,
            &kube::config::KubeConfigOptions::default(),
        )
        .await
        .unwrap();
        kube::Client::try_from(config).unwrap()
    }

    async fn wait_ready(&mut self, address: &str, port: u16, token: &str, ca: &[u8]) {
        let deadline = Instant::now() + Duration::from_secs(90);
        let http = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(ca).unwrap())
            .timeout(Duration::from_secs(2))
            .build()
            .unwrap();
        let readyz = format!("https://{address}:{port}/readyz");
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        loop {
            // Ready once /readyz says so (etcd, every post-start hook: RBAC bootstrap
            // roles, CRD informers...) and its bootstrap has made the default namespace.
            let ready = match http.get(&readyz).bearer_auth(token).send().await {
                Ok(r) => r.status().is_success(),
                Err(_) => false,
            };
            if ready && matches!(namespaces.get_opt("default").await, Ok(Some(_))) {
                return;
            }
            for (name, child) in &mut self.processes {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "{name} exited ({status}):\n{}",
                        tail(&self.dir.path().join(format!("{name}.log")), 25)
                    );
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "kube-apiserver on port {port} not ready:\n{}",
                    tail(&self.dir.path().join("kube-apiserver.log"), 25)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Installs (server-side applies) our CRD and every CRD in the YAML files of `dir`,
    /// and waits until they are Established.
    pub async fn install_crds(&self, dir: &Path) {
        let mut files = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests/crd.yaml")];
        for entry in std::fs::read_dir(dir).unwrap() {
            let p = entry.unwrap().path();
            if p.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                files.push(p);
            }
        }
        let api: Api<CustomResourceDefinition> = Api::all(self.client.clone());
        let mut names = Vec::new();
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            for doc in serde_yaml::Deserializer::from_str(&text) {
                let value = <serde_yaml::Value as serde::Deserialize>::deserialize(doc).unwrap();
                if value.get("kind").and_then(|k| k.as_str()) != Some("CustomResourceDefinition") {
                    continue;
                }
                let crd: CustomResourceDefinition = serde_yaml::from_value(value).unwrap();
                let name = crd.metadata.name.clone().unwrap();
                api.patch(
                    &name,
                    &PatchParams::apply("pgflip-test").force(),
                    &Patch::Apply(&crd),
                )
                .await
                .unwrap_or_else(|e| panic!("installing {name}: {e}"));
                names.push(name);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for name in names {
            loop {
                if is_established(&api.get(&name).await.unwrap()) {
                    break;
                }
                assert!(Instant::now() < deadline, "CRD {name} not Established");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// A kubeconfig that authenticates as the controller's ServiceAccount: it may do only
    /// what [`Cluster::install_controller_rbac`] grants.
    pub fn controller_kubeconfig(&self) -> PathBuf {
        self.dir.path().join("controller.kubeconfig")
    }

    /// A kubeconfig that authenticates as the kubelet of [`NODE_NAME`].
    pub fn node_kubeconfig(&self) -> PathBuf {
        self.dir.path().join("node.kubeconfig")
    }

    /// A kubeconfig that authenticates as kube-proxy (`system:kube-proxy`).
    pub fn kube_proxy_kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kube-proxy.kubeconfig")
    }

    /// Applies `manifests/serviceaccount.yaml` and `manifests/rbac.yaml` as they are.
    pub async fn install_controller_rbac(&self) {
        self.create_namespace("pgflip-system").await;
        for file in ["serviceaccount.yaml", "rbac.yaml"] {
            let text = std::fs::read_to_string(
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("manifests")
                    .join(file),
            )
            .unwrap();
            self.apply_yaml(&text, "pgflip-test").await;
        }
    }

    /// Server-side applies every document of `text` (kubectl's `apply --server-side`),
    /// as the field manager `manager`.
    pub async fn apply_yaml(&self, text: &str, manager: &str) {
        for doc in serde_yaml::Deserializer::from_str(text) {
            let value = <serde_yaml::Value as serde::Deserialize>::deserialize(doc).unwrap();
            let object: kube::api::DynamicObject = serde_yaml::from_value(value).unwrap();
            let types = object.types.clone().unwrap();
            let (group, version) = types
                .api_version
                .split_once('/')
                .unwrap_or(("", types.api_version.as_str()));
            let gvk = kube::api::GroupVersionKind::gvk(group, version, &types.kind);
            let (resource, caps) = kube::discovery::pinned_kind(&self.client, &gvk)
                .await
                .unwrap();
            let api: Api<kube::api::DynamicObject> =
                match (caps.scope, object.metadata.namespace.as_deref()) {
                    (kube::discovery::Scope::Namespaced, Some(ns)) => {
                        Api::namespaced_with(self.client.clone(), ns, &resource)
                    }
                    _ => Api::all_with(self.client.clone(), &resource),
                };
            let name = object.metadata.name.clone().unwrap();
            api.patch(
                &name,
                &PatchParams::apply(manager).force(),
                &Patch::Apply(&object),
            )
            .await
            .unwrap_or_else(|e| panic!("applying {} {name}: {e}", types.kind));
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub async fn create_namespace(&self, name: &str) {
        let api: Api<Namespace> = Api::all(self.client.clone());
        let ns: Namespace =
            serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).unwrap();
        match api.create(&PostParams::default(), &ns).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => panic!("creating namespace {name}: {e}"),
        }
    }

    /// A Secret `name` in `namespace` whose key `password` holds `password`.
    pub async fn create_password_secret(&self, namespace: &str, name: &str, password: &str) {
        let secret: Secret = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "stringData": {"password": password},
        }))
        .unwrap();
        Api::<Secret>::namespaced(self.client.clone(), namespace)
            .create(&PostParams::default(), &secret)
            .await
            .unwrap();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        // The controller manager first, etcd last.
        for (_, child) in self.processes.iter_mut().rev() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            for name in [
                "etcd",
                "kube-apiserver",
                "kube-controller-manager",
                "kube-scheduler",
            ] {
                eprintln!(
                    "--- {name} ---\n{}",
                    tail(&self.dir.path().join(format!("{name}.log")), 25)
                );
            }
        }
    }
}
