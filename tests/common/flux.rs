//! Real Flux on the test control plane: source-controller and kustomize-controller, built
//! from their Go modules by `scripts/setup-flux.sh`, run as processes against the
//! cluster's API server (as `flux install` would run them as pods), with all of Flux's
//! source and kustomize CRDs installed. source-controller serves the artifacts it builds on
//! a loopback port and advertises that address, so kustomize-controller downloads them as
//! it would in a cluster. Every port comes from the OS; logs live in a temp dir and are
//! printed when a test fails.

use super::kube::{Cluster, cache_dir};
use pgflip_engine::run_as::free_port;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const NAMESPACE: &str = "flux-system";

pub struct Flux {
    dir: tempfile::TempDir,
    processes: Vec<Process>,
}

struct Process {
    name: &'static str,
    health_port: u16,
    child: Child,
}

impl Flux {
    pub async fn start(cluster: &Cluster) -> Flux {
        let cache = cache_dir();
        let (bin, crds) = (cache.join("bin"), cache.join("flux-crds"));
        for path in [
            bin.join("source-controller"),
            bin.join("kustomize-controller"),
            crds.join("source.toolkit.fluxcd.io_gitrepositories.yaml"),
        ] {
            assert!(
                path.exists(),
                "{} is missing: run scripts/setup-flux.sh",
                path.display()
            );
        }
        cluster.install_crds(&crds).await;
        cluster.create_namespace(NAMESPACE).await;
        let dir = tempfile::Builder::new()
            .prefix("pgflip-flux-")
            .tempdir()
            .unwrap();
        let storage = format!("127.0.0.1:{}", free_port().unwrap());
        let mut flux = Flux {
            dir,
            processes: Vec::new(),
        };
        let storage_path = flux.dir.path().join("storage");
        std::fs::create_dir(&storage_path).unwrap();
        flux.spawn(
            cluster,
            &bin,
            "source-controller",
            &[
                format!("--storage-path={}", storage_path.display()),
                format!("--storage-addr={storage}"),
                format!("--storage-adv-addr={storage}"),
            ],
        );
        flux.spawn(
            cluster,
            &bin,
            "kustomize-controller",
            &["--no-remote-bases=true".to_string()],
        );
        flux.await_ready().await;
        flux
    }

    fn spawn(&mut self, cluster: &Cluster, bin: &Path, name: &'static str, extra: &[String]) {
        let health_port = free_port().unwrap();
        let log = std::fs::File::create(self.log_path(name)).unwrap();
        let child = Command::new(bin.join(name))
            .args(extra)
            .arg(format!("--metrics-addr=127.0.0.1:{}", free_port().unwrap()))
            .arg(format!("--health-addr=127.0.0.1:{health_port}"))
            // Without the default 30 s, a Kustomization whose dependency just turned
            // Ready follows within seconds.
            .arg("--requeue-dependency=2s")
            .env("KUBECONFIG", cluster.kubeconfig())
            .env("RUNTIME_NAMESPACE", NAMESPACE)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        self.processes.push(Process {
            name,
            health_port,
            child,
        });
    }

    /// Until every controller's health endpoint answers /readyz.
    async fn await_ready(&mut self) {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        for i in 0..self.processes.len() {
            let name = self.processes[i].name;
            let url = format!("http://127.0.0.1:{}/readyz", self.processes[i].health_port);
            loop {
                let ready = http
                    .get(&url)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                if ready {
                    break;
                }
                if let Ok(Some(status)) = self.processes[i].child.try_wait() {
                    panic!("{name} exited ({status}):\n{}", self.log_tail(name, 40));
                }
                assert!(
                    Instant::now() < deadline,
                    "{name} not ready:\n{}",
                    self.log_tail(name, 40)
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    /// The last `lines` lines of a controller's log.
    pub fn log_tail(&self, name: &str, lines: usize) -> String {
        super::tail(&self.log_path(name), lines)
    }
}

impl Drop for Flux {
    fn drop(&mut self) {
        for p in &self.processes {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p.child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let mut processes = std::mem::take(&mut self.processes);
        for p in &mut processes {
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(p.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = p.child.kill();
            let _ = p.child.wait();
            if std::thread::panicking() {
                eprintln!("--- {} ---\n{}", p.name, self.log_tail(p.name, 60));
            }
        }
    }
}
