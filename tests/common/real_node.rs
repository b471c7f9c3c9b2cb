//! A real Kubernetes node for the Kubernetes-mode tests: Debian's containerd and runc with
//! the CNI bridge, a real kubelet and kube-proxy (v1.34, the newest that runs on these
//! machines' cgroup v1) and CoreDNS as a Deployment, built by `scripts/setup-node.sh` with
//! the images the node runs (PostgreSQL 15–18 on a Debian root, CoreDNS, the pause image),
//! imported into the node's own containerd; pgflip's image is built from the Dockerfile by
//! [`build_pgflip_image`].
//!
//! The node lives in a network namespace of its own ([`NodeNetwork`]): a veth pair joins it
//! to the machine (10.250.N.1 here, 10.250.N.2 there) and the machine routes the node's pod
//! CIDR (10.244.N.0/24) to it, so the tests reach pods at their IPs while nothing the node
//! does (bridges, iptables, forwarding) touches the machine's own network and no packet
//! leaves it: the namespace has no other route. N is free on this machine (the namespace's
//! name is the lock), so tests run side by side. The API server listens on 10.250.N.1
//! ([`super::kube::Cluster::start_for`]) with the scheduler and the controllers a node
//! needs; a small provisioner here gives every volume claim a hostPath volume under the
//! node's directory (the role of a storage class's provisioner).
//!
//! Everything is undone on Drop: containers, shims, containerd, kubelet, mounts, cgroups,
//! the namespace, the route, and the kernel settings the kubelet changes for the whole
//! machine (restored as soon as the node is Ready, and again at the end).

use super::kube::{Cluster, cache_dir as kube_cache_dir};
use super::tail;
use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::{Api, PostParams};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The node's name: the kubelet's `--hostname-override`, and the user `system:node:<name>`
/// its token authenticates as (so the Node authorizer and NodeRestriction apply to it).
pub const NODE_NAME: &str = "pgflip-node";

/// Kernel settings the kubelet sets for the whole machine (`protectKernelDefaults: false`;
/// with `true` it refuses to start on values it does not like).
const KUBELET_SYSCTLS: [&str; 3] = [
    "kernel/panic",
    "kernel/panic_on_oops",
    "vm/overcommit_memory",
];

/// The cgroup v1 hierarchies the kubelet's `cgroupRoot` must exist in (and `unified`,
/// where runc also makes it).
const CGROUP_CONTROLLERS: [&str; 10] = [
    "cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "blkio", "pids", "systemd",
    "unified",
];

/// Held from a kubelet's start until the kernel settings it changes are given back, so
/// that what one node saves as the machine's own values is never another's (nodes of
/// parallel tests start one kubelet at a time; the rest of their start overlaps).
pub fn kubelet_start_lock() -> std::fs::File {
    let lock =
        std::fs::File::create(std::env::temp_dir().join("pgflip-kubelet-start.lock")).unwrap();
    lock.lock().unwrap();
    lock
}

/// The images scripts/setup-node.sh builds, imported into every node.
const IMAGES: [&str; 3] = ["pause.tar", "coredns.tar", "postgres.tar"];

/// Where scripts/setup-node.sh puts what it builds.
pub fn node_cache_dir() -> PathBuf {
    std::env::var("PGFLIP_NODE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| kube_cache_dir().with_file_name("node"))
}

fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("{:?}: {e}", cmd.get_program()))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{:?} {:?}: {}{}",
            cmd.get_program(),
            cmd.get_args().collect::<Vec<_>>(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn ip(args: &[&str]) -> Result<String, String> {
    run(Command::new("ip").args(args))
}

/// The node's network namespace and its link to the machine.
pub struct NodeNetwork {
    index: u8,
}

impl NodeNetwork {
    /// Takes a free index N and makes the namespace `pgflip-node-N`, the veth pair and the
    /// route to the pod CIDR.
    pub fn create() -> NodeNetwork {
        let start: u8 = rand::Rng::gen_range(&mut rand::thread_rng(), 1..=250);
        for i in 0..250u16 {
            let index = ((start as u16 - 1 + i) % 250 + 1) as u8;
            let network = NodeNetwork { index };
            // `ip netns add` fails when the name exists: the namespace is the lock.
            if ip(&["netns", "add", &network.netns()]).is_err() {
                continue;
            }
            network
                .link()
                .unwrap_or_else(|e| panic!("node network {index}: {e}"));
            return network;
        }
        panic!("no free node network index (250 pgflip-node-* namespaces exist)");
    }

    fn link(&self) -> Result<(), String> {
        let (ns, host, node) = (
            self.netns(),
            self.host_link(),
            format!("pgfn{}", self.index),
        );
        ip(&[
            "link", "add", &host, "type", "veth", "peer", "name", &node, "netns", &ns,
        ])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/30", self.host_ip()),
            "dev",
            &host,
        ])?;
        ip(&["link", "set", &host, "up"])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{}/30", self.node_ip()),
            "dev",
            &node,
        ])?;
        ip(&["-n", &ns, "link", "set", &node, "up"])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        for cidr in [self.pod_cidr(), self.service_cidr()] {
            ip(&[
                "route",
                "add",
                &cidr,
                "via",
                &self.node_ip().to_string(),
                "dev",
                &host,
            ])?;
        }
        // Forwarding between the veth and the pods' bridge, in the node's namespace only.
        self.in_netns(Command::new("sh").args(["-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"]))?;
        Ok(())
    }

    pub fn netns(&self) -> String {
        format!("pgflip-node-{}", self.index)
    }

    fn host_link(&self) -> String {
        format!("pgfh{}", self.index)
    }

    /// The machine's side of the veth: where the API server listens.
    pub fn host_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 250, self.index, 1)
    }

    /// The node's address (its InternalIP).
    pub fn node_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 250, self.index, 2)
    }

    pub fn pod_cidr(&self) -> String {
        format!("10.244.{}.0/24", self.index)
    }

    /// The cluster's Service range (ClusterIPs), routed to the node like the pods'.
    pub fn service_cidr(&self) -> String {
        format!("10.96.{}.0/24", self.index)
    }

    /// The `kubernetes` Service's ClusterIP (the first of the range).
    pub fn api_service_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 96, self.index, 1)
    }

    /// The cluster DNS Service's ClusterIP (`kube-dns`, where kubeadm places it).
    pub fn dns_service_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 96, self.index, 10)
    }

    /// Whether `ip` is one of this node's pod addresses.
    pub fn is_pod_ip(&self, ip: &str) -> bool {
        ip.parse::<Ipv4Addr>()
            .is_ok_and(|a| a.octets()[..3] == [10, 244, self.index])
    }

    /// `cmd` run in the node's network namespace. `nsenter --net`, not `ip netns exec`,
    /// which remounts /sys and would hide the cgroup hierarchies from the kubelet.
    fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/var/run/netns/{}", self.netns()))
            .arg("--")
            .arg(program);
        cmd
    }

    fn in_netns(&self, cmd: &mut Command) -> Result<String, String> {
        let mut wrapped = self.command(Path::new(cmd.get_program()));
        wrapped.args(cmd.get_args());
        run(&mut wrapped)
    }
}

impl Drop for NodeNetwork {
    fn drop(&mut self) {
        let _ = ip(&["route", "del", &self.pod_cidr()]);
        let _ = ip(&["route", "del", &self.service_cidr()]);
        let _ = ip(&["link", "del", &self.host_link()]);
        // Takes the node's end of the veth, the bridge, the pods' veths and every iptables
        // and nft rule made inside.
        if let Err(e) = ip(&["netns", "del", &self.netns()]) {
            eprintln!("removing the node's namespace: {e}");
        }
    }
}

/// One running node: containerd and a kubelet registered with the cluster.
pub struct RealNode {
    dir: tempfile::TempDir,
    containerd: Option<Child>,
    kubelet: Option<Child>,
    kube_proxy: Option<Child>,
    provisioner: tokio::task::JoinHandle<()>,
    kernel_settings: Vec<(PathBuf, String)>,
    versions: String,
    // Last: the namespace goes after everything that runs in it.
    network: NodeNetwork,
}

impl RealNode {
    /// Starts the node on `network` (the one `cluster` was started for) and returns once
    /// its Node is Ready, with the images imported.
    pub async fn start(cluster: &Cluster, network: NodeNetwork) -> RealNode {
        let started = Instant::now();
        let cache = node_cache_dir();
        // The node cache holds coredns-<version>/; the kubelet and kube-proxy are built with
        // the control plane, in its cache (scripts/setup-kube.sh).
        let built = |what: &str, pick: &dyn Fn(&std::fs::DirEntry) -> Option<PathBuf>| {
            std::fs::read_dir(&cache)
                .into_iter()
                .flatten()
                .flatten()
                .find_map(|e| pick(&e))
                .unwrap_or_else(|| {
                    panic!(
                        "no {what} under {}: run scripts/setup-node.sh",
                        cache.display()
                    )
                })
        };
        let kubelet_bin = kube_cache_dir().join("bin/kubelet");
        assert!(
            kubelet_bin.is_file(),
            "{} is missing: run scripts/setup-node.sh",
            kubelet_bin.display()
        );
        let coredns_version = built("CoreDNS", &|e| {
            e.file_name()
                .to_str()?
                .strip_prefix("coredns-")
                .map(PathBuf::from)
        })
        .display()
        .to_string();
        let images = cache.join("images");
        for image in IMAGES {
            assert!(
                images.join(image).is_file(),
                "{} is missing: run scripts/setup-node.sh",
                images.join(image).display()
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("pgflip-node-")
            .tempdir()
            .unwrap();
        let mut node = RealNode {
            dir,
            containerd: None,
            kubelet: None,
            kube_proxy: None,
            provisioner: tokio::spawn(async {}),
            kernel_settings: Vec::new(),
            versions: String::new(),
            network,
        };
        let kubeconfig = cluster.node_kubeconfig();
        let proxy_kubeconfig = cluster.kube_proxy_kubeconfig();
        let (mut node, kubelet_starting) = tokio::task::spawn_blocking(move || {
            node.start_containerd(&images);
            let lock = kubelet_start_lock();
            node.start_kubelet(&kubelet_bin, &kubeconfig);
            node.start_kube_proxy(&kubelet_bin.with_file_name("kube-proxy"), &proxy_kubeconfig);
            (node, lock)
        })
        .await
        .unwrap();
        node.wait_ready(cluster).await;
        // The kubelet has set its kernel settings by now: give the machine its own back.
        node.restore_kernel_settings();
        drop(kubelet_starting);
        node.start_cluster_dns(cluster, &coredns_version).await;
        node.provisioner = tokio::spawn(provision_volumes(
            cluster.client(),
            node.dir.path().join("volumes"),
        ));
        eprintln!(
            "node: {} (Ready in {:.1}s, pods in {}, at {})",
            node.versions,
            started.elapsed().as_secs_f64(),
            node.network.pod_cidr(),
            node.dir.path().display()
        );
        node
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn cgroup_root(&self) -> String {
        self.network.netns()
    }

    fn socket(&self) -> PathBuf {
        self.path("containerd/containerd.sock")
    }

    fn ctr(&self) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("-a").arg(self.socket()).args(["-n", "k8s.io"]);
        cmd
    }

    fn spawn(&self, name: &str, mut cmd: Command) -> Child {
        let log = std::fs::File::create(self.path(&format!("{name}.log"))).unwrap();
        use std::os::unix::process::CommandExt;
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"))
    }

    fn start_containerd(&mut self, images: &Path) {
        let d = self.dir.path().display().to_string();
        for sub in [
            "containerd",
            "cni/net.d",
            "cni/ipam",
            "volumes",
            "pod-logs",
            "kubelet",
        ] {
            std::fs::create_dir_all(self.path(sub)).unwrap();
        }
        std::fs::write(
            self.path("containerd/config.toml"),
            format!(
                r#"version = 2
root = "{d}/containerd/root"
state = "{d}/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs"]
[grpc]
  address = "{d}/containerd/containerd.sock"
[ttrpc]
  address = "{d}/containerd/containerd-ttrpc.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:3.9"
  disable_apparmor = true
  # root here lacks CAP_SYS_RESOURCE: without this every pod start fails in runc.
  restrict_oom_score_adj = true
  enable_selinux = false
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        BinaryName = "/usr/sbin/runc"
        Root = "{d}/containerd/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{d}/cni/net.d"
"#
            ),
        )
        .unwrap();
        std::fs::write(
            self.path("cni/net.d/10-pgflip.conflist"),
            serde_json::to_string_pretty(&serde_json::json!({
                "cniVersion": "0.4.0",
                "name": "pgflip-pods",
                "plugins": [
                    {
                        "type": "bridge",
                        "bridge": "cni0",
                        "isGateway": true,
                        "ipMasq": false,
                        "hairpinMode": true,
                        "ipam": {
                            "type": "host-local",
                            "ranges": [[{"subnet": self.network.pod_cidr()}]],
                            "routes": [{"dst": "0.0.0.0/0"}],
                            "dataDir": format!("{d}/cni/ipam"),
                        },
                    },
                    {"type": "portmap", "capabilities": {"portMappings": true}},
                ],
            }))
            .unwrap(),
        )
        .unwrap();

        let mut cmd = self.network.command(Path::new("/usr/bin/containerd"));
        cmd.arg("--config").arg(self.path("containerd/config.toml"));
        self.containerd = Some(self.spawn("containerd", cmd));
        let deadline = Instant::now() + Duration::from_secs(30);
        while run(self.ctr().arg("version")).is_err() {
            if let Some(Ok(Some(status))) = self.containerd.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "containerd exited ({status}):\n{}",
                    tail(&self.path("containerd.log"), 25)
                );
            }
            assert!(Instant::now() < deadline, "containerd did not answer");
            std::thread::sleep(Duration::from_millis(100));
        }
        let t = Instant::now();
        for image in IMAGES {
            run(self
                .ctr()
                .args(["images", "import", "--no-unpack"])
                .arg(images.join(image)))
            .unwrap_or_else(|e| panic!("importing {image}: {e}"));
        }
        let containerd_version = run(Command::new("containerd").arg("--version")).unwrap();
        self.versions = format!(
            "containerd {}",
            containerd_version.split_whitespace().nth(2).unwrap_or("?")
        );
        eprintln!("node: images imported in {:.1}s", t.elapsed().as_secs_f64());
    }

    fn start_kubelet(&mut self, kubelet: &Path, kubeconfig: &Path) {
        let d = self.dir.path().display().to_string();
        let root = self.cgroup_root();
        for controller in CGROUP_CONTROLLERS {
            let base = Path::new("/sys/fs/cgroup").join(controller);
            if base.is_dir() {
                std::fs::create_dir_all(base.join(&root)).unwrap();
            }
        }
        let cpuset = Path::new("/sys/fs/cgroup/cpuset");
        for file in ["cpuset.cpus", "cpuset.mems"] {
            let value = std::fs::read_to_string(cpuset.join(file)).unwrap();
            std::fs::write(cpuset.join(&root).join(file), value.trim()).unwrap();
        }
        std::fs::write(self.path("resolv.conf"), "nameserver 127.0.0.1\n").unwrap();
        std::fs::write(
            self.path("kubelet-config.yaml"),
            format!(
                r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
containerRuntimeEndpoint: unix://{d}/containerd/containerd.sock
imageServiceEndpoint: unix://{d}/containerd/containerd.sock
cgroupDriver: cgroupfs
cgroupsPerQOS: true
cgroupRoot: /{root}
failSwapOn: false
# No CAP_SYS_RESOURCE: a negative score cannot be set.
oomScoreAdj: 0
protectKernelDefaults: false
resolvConf: {d}/resolv.conf
podLogsDir: {d}/pod-logs
volumePluginDir: {d}/kubelet/volume-plugins
address: {node_ip}
healthzBindAddress: 127.0.0.1
readOnlyPort: 0
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: false
authorization:
  mode: AlwaysAllow
podCIDR: {pod_cidr}
clusterDomain: cluster.local
clusterDNS: [{dns}]
syncFrequency: 10s
fileCheckFrequency: 5s
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: 100Mi
  nodefs.available: 1%
  imagefs.available: 1%
  nodefs.inodesFree: 1%
"#,
                node_ip = self.network.node_ip(),
                pod_cidr = self.network.pod_cidr(),
                dns = self.network.dns_service_ip(),
            ),
        )
        .unwrap();
        let version = run(Command::new(kubelet).arg("--version")).unwrap();
        let runc = run(Command::new("runc").arg("--version")).unwrap();
        self.versions = format!(
            "kubelet {}, {}, runc {}",
            version.split_whitespace().nth(1).unwrap_or("?"),
            self.versions,
            runc.split_whitespace().nth(2).unwrap_or("?")
        );

        // What the kubelet is about to change for the whole machine, to give it back.
        self.kernel_settings = KUBELET_SYSCTLS
            .iter()
            .map(|k| {
                let path = Path::new("/proc/sys").join(k);
                let value = std::fs::read_to_string(&path).unwrap();
                (path, value.trim().to_string())
            })
            .collect();
        let mut cmd = self.network.command(kubelet);
        cmd.arg(format!(
            "--config={}",
            self.path("kubelet-config.yaml").display()
        ))
        .arg(format!("--kubeconfig={}", kubeconfig.display()))
        .arg(format!("--root-dir={d}/kubelet"))
        .arg(format!("--cert-dir={d}/kubelet/pki"))
        .arg(format!("--hostname-override={NODE_NAME}"))
        .arg(format!("--node-ip={}", self.network.node_ip()))
        .arg("--v=1");
        self.kubelet = Some(self.spawn("kubelet", cmd));
    }

    /// kube-proxy in iptables mode (Debian's iptables is its nf_tables form), in the node's
    /// namespace: its rules there send a Service's ClusterIP to its pods, for the pods and
    /// for the machine (which routes the Service range to the node). It leaves the
    /// machine-wide conntrack settings alone.
    fn start_kube_proxy(&mut self, kube_proxy: &Path, kubeconfig: &Path) {
        std::fs::write(
            self.path("kube-proxy.yaml"),
            format!(
                r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: {kubeconfig}
hostnameOverride: {NODE_NAME}
bindAddress: {node_ip}
clusterCIDR: {pod_cidr}
mode: iptables
oomScoreAdj: 0
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
metricsBindAddress: 127.0.0.1:10249
healthzBindAddress: 127.0.0.1:10256
"#,
                kubeconfig = kubeconfig.display(),
                node_ip = self.network.node_ip(),
                pod_cidr = self.network.pod_cidr(),
            ),
        )
        .unwrap();
        let version = run(Command::new(kube_proxy).arg("--version")).unwrap();
        self.versions = format!(
            "{}, kube-proxy {}",
            self.versions,
            version.split_whitespace().nth(1).unwrap_or("?")
        );
        let mut cmd = self.network.command(kube_proxy);
        cmd.arg(format!(
            "--config={}",
            self.path("kube-proxy.yaml").display()
        ))
        .arg("--v=1");
        self.kube_proxy = Some(self.spawn("kube-proxy", cmd));
    }

    /// CoreDNS as clusters run it: a Deployment in kube-system behind the `kube-dns`
    /// Service at the address the kubelet gives pods as their nameserver, answering for
    /// `cluster.local` from the API (no upstream: nothing leaves the node). Returns once
    /// it is Ready.
    async fn start_cluster_dns(&mut self, cluster: &Cluster, version: &str) {
        let image = format!("registry.k8s.io/coredns/coredns:{version}");
        let dns_ip = self.network.dns_service_ip();
        cluster
            .apply_yaml(
                &format!(
                    r#"apiVersion: v1
kind: ServiceAccount
metadata: {{name: coredns, namespace: kube-system}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {{name: "system:coredns"}}
rules:
- apiGroups: [""]
  resources: [endpoints, services, pods, namespaces]
  verbs: [list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {{name: "system:coredns"}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:coredns"}}
subjects: [{{kind: ServiceAccount, name: coredns, namespace: kube-system}}]
---
apiVersion: v1
kind: ConfigMap
metadata: {{name: coredns, namespace: kube-system}}
data:
  Corefile: |
    .:53 {{
        errors
        ready :8181
        kubernetes cluster.local in-addr.arpa ip6.arpa {{
            pods insecure
        }}
        cache 5
    }}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: coredns, namespace: kube-system, labels: {{k8s-app: kube-dns}}}}
spec:
  replicas: 1
  selector: {{matchLabels: {{k8s-app: kube-dns}}}}
  template:
    metadata: {{labels: {{k8s-app: kube-dns}}}}
    spec:
      serviceAccountName: coredns
      dnsPolicy: Default
      containers:
      - name: coredns
        image: {image}
        imagePullPolicy: Never
        args: [-conf, /etc/coredns/Corefile]
        ports:
        - {{name: dns, containerPort: 53, protocol: UDP}}
        - {{name: dns-tcp, containerPort: 53, protocol: TCP}}
        readinessProbe:
          httpGet: {{path: /ready, port: 8181}}
          periodSeconds: 1
        volumeMounts: [{{name: config, mountPath: /etc/coredns, readOnly: true}}]
      volumes: [{{name: config, configMap: {{name: coredns}}}}]
---
apiVersion: v1
kind: Service
metadata: {{name: kube-dns, namespace: kube-system, labels: {{k8s-app: kube-dns}}}}
spec:
  clusterIP: {dns_ip}
  selector: {{k8s-app: kube-dns}}
  ports:
  - {{name: dns, port: 53, protocol: UDP}}
  - {{name: dns-tcp, port: 53, protocol: TCP}}
"#
                ),
                "pgflip-test-node",
            )
            .await;
        let deployments: Api<k8s_openapi::api::apps::v1::Deployment> =
            Api::namespaced(cluster.client(), "kube-system");
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let ready = deployments
                .get("coredns")
                .await
                .ok()
                .and_then(|d| d.status)
                .and_then(|s| s.ready_replicas);
            if ready == Some(1) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "CoreDNS not Ready:\n{}",
                tail(&self.path("kubelet.log"), 20)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.versions = format!("{}, CoreDNS {version}", self.versions);
    }

    async fn wait_ready(&mut self, cluster: &Cluster) {
        let nodes: Api<Node> = Api::all(cluster.client());
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(Some(node)) = nodes.get_opt(NODE_NAME).await
                && super::kube::is_node_ready(&node)
            {
                return;
            }
            if let Some(Ok(Some(status))) = self.kubelet.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "kubelet exited ({status}):\n{}",
                    tail(&self.path("kubelet.log"), 30)
                );
            }
            assert!(
                Instant::now() < deadline,
                "node {NODE_NAME} not Ready:\n{}",
                tail(&self.path("kubelet.log"), 30)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn restore_kernel_settings(&self) {
        for (path, value) in &self.kernel_settings {
            if std::fs::read_to_string(path).is_ok_and(|v| v.trim() != value) {
                let _ = std::fs::write(path, value);
            }
        }
    }

    /// What runs on the node, as the harness prints it.
    pub fn versions(&self) -> &str {
        &self.versions
    }

    pub fn network(&self) -> &NodeNetwork {
        &self.network
    }

    /// Where the kubelet writes the containers' logs.
    pub fn pod_logs(&self) -> PathBuf {
        self.path("pod-logs")
    }

    /// The logs of the containers of pods in `namespace` whose names start with
    /// `pod_prefix`, each file's last `lines` lines.
    pub fn container_logs(&self, namespace: &str, pod_prefix: &str, lines: usize) -> String {
        // pod-logs/<namespace>_<pod>_<uid>/<container>/<n>.log
        let prefix = format!("{namespace}_{pod_prefix}");
        let mut out = String::new();
        for pod in std::fs::read_dir(self.pod_logs())
            .into_iter()
            .flatten()
            .flatten()
        {
            if !pod.file_name().to_string_lossy().starts_with(&prefix) {
                continue;
            }
            for dir in walk(&pod.path()) {
                for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                    if e.path().extension().is_some_and(|x| x == "log") {
                        out.push_str(&format!(
                            "--- {} ---\n{}\n",
                            e.path().display(),
                            tail(&e.path(), lines)
                        ));
                    }
                }
            }
        }
        out
    }

    /// Runs `pod` (one container, `restartPolicy: Never`) in `namespace` until its
    /// container ends, deletes it, and returns the container's exit code and log: a
    /// client inside the cluster, with the cluster's DNS.
    pub async fn run_pod(
        &self,
        client: &kube::Client,
        namespace: &str,
        pod: serde_json::Value,
    ) -> (i32, String) {
        let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
        let pod: Pod = serde_json::from_value(pod).unwrap();
        let name = pod.metadata.name.clone().unwrap();
        pods.create(&PostParams::default(), &pod).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let status = pods.get(&name).await.unwrap().status;
            let ended = status.as_ref().and_then(|s| {
                s.container_statuses
                    .as_ref()?
                    .first()?
                    .state
                    .clone()?
                    .terminated
            });
            if let Some(ended) = ended {
                let log = self.container_logs(namespace, &name, 50);
                let _ = pods.delete(&name, &Default::default()).await;
                return (ended.exit_code, log);
            }
            assert!(
                Instant::now() < deadline,
                "pod {name} did not run to its end: {status:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Loads an OCI archive (e.g. [`build_pgflip_image`]'s) into the node's containerd.
    pub fn import_image(&self, archive: &Path) {
        run(self
            .ctr()
            .args(["images", "import", "--no-unpack"])
            .arg(archive))
        .unwrap_or_else(|e| panic!("importing {}: {e}", archive.display()));
    }

    /// Gives an image on the node a second name, as a registry would serve one image
    /// under two tags.
    pub fn tag_image(&self, image: &str, also: &str) {
        run(self.ctr().args(["images", "tag", "--force", image, also]))
            .unwrap_or_else(|e| panic!("tagging {image} as {also}: {e}"));
    }

    /// SIGKILLs the main process of a container (`containerID` of its status, with or
    /// without the `containerd://` prefix), as a crash would.
    pub fn kill_container(&self, container_id: &str) {
        let id = container_id.trim_start_matches("containerd://");
        run(self
            .ctr()
            .args(["tasks", "kill", "--signal", "SIGKILL", id]))
        .unwrap_or_else(|e| panic!("killing container {id}: {e}"));
    }

    /// Processes in the node's cgroups (the pods' containers).
    pub fn processes(&self) -> Vec<u32> {
        walk(&Path::new("/sys/fs/cgroup/memory").join(self.cgroup_root()))
            .iter()
            .filter_map(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
            .flat_map(|text| {
                text.lines()
                    .filter_map(|l| l.parse::<u32>().ok())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    fn stop(&mut self) {
        self.provisioner.abort();
        for child in [self.kube_proxy.take(), self.kubelet.take()]
            .into_iter()
            .flatten()
        {
            stop_child(child, Duration::from_secs(5));
        }
        // Every container (the pods' and their sandboxes'), then the shims that ran them.
        if let Ok(tasks) = run(self.ctr().args(["tasks", "ls", "-q"])) {
            for id in tasks.lines() {
                let _ = run(self
                    .ctr()
                    .args(["tasks", "kill", "--signal", "SIGKILL", id]));
            }
            std::thread::sleep(Duration::from_millis(300));
            for id in tasks.lines() {
                let _ = run(self.ctr().args(["tasks", "delete", "--force", id]));
            }
        }
        let socket = self.socket().display().to_string();
        for pid in processes_whose_command_has(&socket) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        for pid in self.processes() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if let Some(containerd) = self.containerd.take() {
            stop_child(containerd, Duration::from_secs(5));
        }
        // The kubelet bind-mounts its root dir onto itself, containerd its snapshots and
        // the pods' namespaces: deepest first.
        let prefix = self.dir.path().display().to_string();
        let mut mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
            .filter(|m| m.starts_with(&prefix))
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            if run(Command::new("umount").arg(&m)).is_err() {
                let _ = run(Command::new("umount").arg("-l").arg(&m));
            }
        }
        self.restore_kernel_settings();
        let root = self.cgroup_root();
        for controller in CGROUP_CONTROLLERS {
            let dir = Path::new("/sys/fs/cgroup").join(controller).join(&root);
            if !dir.is_dir() {
                continue;
            }
            let mut dirs = walk(&dir);
            dirs.sort_by_key(|d| std::cmp::Reverse(d.as_os_str().len()));
            for d in dirs {
                let _ = std::fs::remove_dir(&d);
            }
        }
        // The kubelet's links to our pods' logs.
        if let Ok(entries) = std::fs::read_dir("/var/log/containers") {
            for e in entries.flatten() {
                if std::fs::read_link(e.path()).is_ok_and(|t| t.starts_with(self.dir.path())) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        // Paths the kubelet and the shims use whatever their settings say, shared by every
        // node on the machine: removed by the last one, and only when nothing else is in them.
        let others = ip(&["netns", "list"]).unwrap_or_default();
        let ours = self.network.netns();
        if !others
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .any(|n| n.starts_with("pgflip-node-") && n != ours)
        {
            let socket = Path::new("/var/lib/kubelet/device-plugins/kubelet.sock");
            use std::os::unix::fs::FileTypeExt;
            if std::fs::symlink_metadata(socket).is_ok_and(|m| m.file_type().is_socket()) {
                let _ = std::fs::remove_file(socket);
            }
            for dir in [
                "/var/lib/kubelet/device-plugins",
                "/var/lib/kubelet",
                "/var/log/containers",
                "/run/containerd/s",
                "/run/containerd",
            ] {
                let _ = std::fs::remove_dir(dir);
            }
        }
    }
}

impl Drop for RealNode {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for name in ["kubelet", "kube-proxy", "containerd"] {
                eprintln!(
                    "--- {name} ---\n{}",
                    tail(&self.path(&format!("{name}.log")), 30)
                );
            }
            // The containers' own logs: pod-logs/<namespace>_<pod>_<uid>/<container>/<n>.log
            for dir in walk(&self.path("pod-logs")) {
                for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                    if e.path().extension().is_some_and(|x| x == "log") {
                        eprintln!("--- {} ---\n{}", e.path().display(), tail(&e.path(), 15));
                    }
                }
            }
        }
        self.stop();
    }
}

/// A directory and every directory below it.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        if let Ok(entries) = std::fs::read_dir(&out[i]) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    out.push(e.path());
                }
            }
        }
        i += 1;
    }
    out
}

fn processes_whose_command_has(needle: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if std::fs::read(e.path().join("cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
        {
            pids.push(pid);
        }
    }
    pids
}

fn stop_child(mut child: Child, grace: Duration) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Gives every unbound volume claim a hostPath volume of its own under `root`, bound to
/// it in advance (the persistent-volume controller completes the binding).
async fn provision_volumes(client: kube::Client, root: PathBuf) {
    let claims: Api<PersistentVolumeClaim> = Api::all(client.clone());
    let volumes: Api<PersistentVolume> = Api::all(client);
    loop {
        if let Ok(list) = claims.list(&Default::default()).await {
            for claim in list {
                let spec = claim.spec.clone().unwrap_or_default();
                if spec.volume_name.is_some() || claim.metadata.deletion_timestamp.is_some() {
                    continue;
                }
                let uid = claim.metadata.uid.clone().unwrap_or_default();
                let request = spec
                    .resources
                    .as_ref()
                    .and_then(|r| r.requests.as_ref())
                    .and_then(|r| r.get("storage").cloned());
                let volume: PersistentVolume = serde_json::from_value(serde_json::json!({
                    "metadata": {"name": format!("pvc-{uid}")},
                    "spec": {
                        "capacity": {"storage": request.map(|q| q.0).unwrap_or("1Gi".into())},
                        "accessModes": spec.access_modes.clone().unwrap_or_default(),
                        "persistentVolumeReclaimPolicy": "Retain",
                        "storageClassName": spec.storage_class_name.clone().unwrap_or_default(),
                        "hostPath": {
                            "path": root.join(&uid).display().to_string(),
                            "type": "DirectoryOrCreate",
                        },
                        "claimRef": {
                            "namespace": claim.metadata.namespace,
                            "name": claim.metadata.name,
                            "uid": uid,
                        },
                    },
                }))
                .unwrap();
                match volumes.create(&PostParams::default(), &volume).await {
                    Err(kube::Error::Api(e)) if e.code == 409 => {}
                    Err(e) => eprintln!("provisioning a volume for claim {uid}: {e}"),
                    Ok(_) => {}
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The real node for `cluster`, with pgflip's image (built from the Dockerfile) on it.
pub async fn node_with_pgflip(cluster: &Cluster, network: NodeNetwork) -> RealNode {
    let node = RealNode::start(cluster, network).await;
    let out = cluster.dir().to_path_buf();
    let image = tokio::task::spawn_blocking(move || {
        build_pgflip_image(std::path::Path::new(env!("CARGO_BIN_EXE_pgflip")), &out)
    })
    .await
    .unwrap();
    node.import_image(&image);
    node
}

/// The name the tests give pgflip's image on the node.
pub const PGFLIP_IMAGE: &str = "ghcr.io/pgflip/pgflip:test";

/// pgflip's image, built as a user builds it — by buildah from the repository's
/// `Dockerfile` — but offline: on the local `debian:bookworm-slim` (scripts/setup-node.sh),
/// with Debian's packages, the `pgflip` binary given (stripped of its debug information)
/// and the toolchain's PostgreSQL 17 client tools as the build context. Written to
/// `out` as an OCI archive for [`RealNode::import_image`]. Builds of parallel tests take
/// turns (buildah's store is shared, under the node cache, and keeps the layers that do
/// not change).
pub fn build_pgflip_image(pgflip: &Path, out: &Path) -> PathBuf {
    let cache = node_cache_dir();
    let store = cache.join("buildah");
    std::fs::create_dir_all(&store).unwrap();
    let lock = std::fs::File::create(store.join("lock")).unwrap();
    lock.lock().unwrap();
    let buildah = || {
        let mut cmd = Command::new("buildah");
        cmd.arg("--root")
            .arg(store.join("root"))
            .arg("--runroot")
            .arg(store.join("run"));
        cmd
    };
    let has_base = run(buildah().args(["images", "-q", "docker.io/library/debian:bookworm-slim"]))
        .is_ok_and(|ids| !ids.trim().is_empty());
    if !has_base {
        let base = cache.join("images/debian.tar");
        assert!(
            base.is_file(),
            "{} is missing: run scripts/setup-node.sh",
            base.display()
        );
        run(buildah()
            .arg("pull")
            .arg(format!("oci-archive:{}", base.display())))
        .unwrap_or_else(|e| panic!("loading the Debian base into buildah: {e}"));
    }
    let context = tempfile::Builder::new()
        .prefix("pgflip-image-")
        .tempdir()
        .unwrap();
    run(Command::new("objcopy")
        .arg("--strip-debug")
        .arg(pgflip)
        .arg(context.path().join("pgflip")))
    .unwrap();
    let (_, bin) = pgflip_engine::toolchain::Toolchain::discover_blocking()
        .client_bin(17)
        .expect("PostgreSQL 17's client tools in the toolchain (make setup)");
    let install = std::fs::canonicalize(bin).unwrap();
    run(Command::new("cp")
        .arg("-a")
        .arg(install.parent().unwrap())
        .arg(context.path().join("postgresql")))
    .unwrap();
    let dockerfile = Path::new(env!("CARGO_MANIFEST_DIR")).join("Dockerfile");
    let t = Instant::now();
    run(buildah()
        .args(["bud", "--layers", "--pull-never", "--isolation", "chroot"])
        .args(["--network", "host", "--quiet"])
        .args(["--build-arg", "PGFLIP_FROM=context"])
        .args(["--build-arg", "POSTGRES_CLIENT=context"])
        .args([
            "--build-arg",
            "BASE_IMAGE=docker.io/library/debian:bookworm-slim",
        ])
        .arg("-f")
        .arg(&dockerfile)
        .args(["-t", PGFLIP_IMAGE])
        .arg(context.path()))
    .unwrap_or_else(|e| panic!("buildah bud of {}: {e}", dockerfile.display()));
    let archive = out.join("pgflip-image.tar");
    run(buildah()
        .arg("push")
        .arg(PGFLIP_IMAGE)
        .arg(format!("oci-archive:{}:{PGFLIP_IMAGE}", archive.display())))
    .unwrap_or_else(|e| panic!("exporting pgflip's image: {e}"));
    // Earlier builds' images, untagged by this one.
    let _ = run(buildah().args(["rmi", "--prune"]));
    eprintln!(
        "pgflip's image built from the Dockerfile in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    archive
}
