//! One benchmark environment: a throw-away Git repository and state directory, a blue
//! instance at the starting major with pgbench's TPC-B-like data, and the PgBouncer
//! endpoint, all made by `pgflip local` itself (run as a child process, so its memory can
//! be read and it can be stopped while the servers go on).

use anyhow::{Context, bail};
use pgflip_core::plan::{Color, Record};
use pgflip_core::spec::{self, Major};
use pgflip_engine::adapters::git_source::testing as git;
use pgflip_engine::pg::connect;
use pgflip_engine::ports::{Addr, Credentials};
use pgflip_engine::run_as::free_port;
use pgflip_engine::state::StateDir;
use pgflip_engine::toolchain::Toolchain;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const DATABASE: &str = "app";
const DOCUMENT: &str = "database.yaml";

pub struct Env {
    pub dir: PathBuf,
    pub repo: PathBuf,
    pub state: StateDir,
    pub endpoint: Addr,
    pub admin: Credentials,
    /// Found once, when the run starts (finding it may run `pg_config`).
    pub toolchain: Toolchain,
    /// The document's `spec.copy`.
    copy: String,
    controller: Option<Child>,
}

impl Env {
    /// Bootstraps blue at `major` through `pgflip local` and loads pgbench data at `scale`.
    pub async fn create(dir: &Path, major: Major, scale: u32, copy: &str) -> anyhow::Result<Env> {
        if dir.exists() {
            std::fs::remove_dir_all(dir)?;
        }
        std::fs::create_dir_all(dir)?;
        let repo = dir.join("repo");
        std::fs::create_dir_all(&repo)?;
        git::init_repo(&repo);
        let state = StateDir::open(dir.join("state"))?;
        let port = free_port()?;
        let mut env = Env {
            dir: dir.to_path_buf(),
            repo,
            admin: state.admin_credentials()?,
            toolchain: Toolchain::discover().await,
            copy: copy.to_string(),
            state,
            endpoint: Addr {
                host: "127.0.0.1".into(),
                port,
            },
            controller: None,
        };
        env.commit(major, "bootstrap");
        env.start_controller()?;
        env.wait("bootstrap", Duration::from_secs(120), |r| {
            r.serving.is_some()
        })
        .await?;
        env.init_data(scale).await?;
        Ok(env)
    }

    fn document(&self, major: Major) -> String {
        spec::render(
            "bench",
            major,
            &format!(
                "databases: [{DATABASE}]\nendpoint:\n  port: {}\nretainPrevious: 1h\ncopy: {}\nswitchover:\n  pauseTimeout: 2s\n  catchUpTimeout: 60m",
                self.endpoint.port, self.copy
            ),
        )
    }

    pub fn commit(&self, major: Major, message: &str) -> String {
        git::commit_file(&self.repo, DOCUMENT, &self.document(major), message)
    }

    pub fn revert(&self, sha: &str) -> String {
        git::revert(&self.repo, sha)
    }

    /// Starts `pgflip local` on the environment's repository (the binary running now).
    pub fn start_controller(&mut self) -> anyhow::Result<()> {
        let log = std::fs::File::create(self.dir.join("pgflip.log"))?;
        let child = Command::new(std::env::current_exe()?)
            .args(["local", "--repo"])
            .arg(&self.repo)
            .arg("--state-dir")
            .arg(&self.state.root)
            .args(["--file", DOCUMENT, "--poll", "100ms"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting pgflip local")?;
        self.controller = Some(child);
        Ok(())
    }

    /// Peak resident memory of the controller so far (VmHWM), in MiB.
    pub fn controller_peak_rss_mib(&self) -> Option<f64> {
        let pid = self.controller.as_ref()?.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kib / 1024.0)
    }

    /// Stops the controller; the servers and the endpoint go on (they are not its children).
    pub fn stop_controller(&mut self) {
        if let Some(mut c) = self.controller.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn record(&self) -> anyhow::Result<Record> {
        self.state.load()
    }

    /// Waits until `done` holds on the record; a failure note on the way is an error.
    pub async fn wait(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&Record) -> bool,
    ) -> anyhow::Result<Record> {
        let started = Instant::now();
        loop {
            let r = self.state.load_async().await?;
            if done(&r) {
                return Ok(r);
            }
            if let Some(reason) = &r.failed_reason {
                bail!("{what} failed: {reason}");
            }
            if started.elapsed() > timeout {
                bail!(
                    "{what} did not finish within {timeout:?}; see {}",
                    self.dir.join("pgflip.log").display()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Where an instance of the pair listens.
    pub fn instance_addr(&self, color: Color) -> anyhow::Result<Addr> {
        let path = self
            .state
            .dir("instances")
            .join(color.as_str())
            .join("instance.json");
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let v: serde_json::Value = serde_json::from_slice(&bytes)?;
        Ok(Addr {
            host: "127.0.0.1".into(),
            port: v["port"].as_u64().context("instance.json has no port")? as u16,
        })
    }

    /// pgbench's tables at `scale` (about 15 MB each), straight on blue, and the ledger.
    async fn init_data(&self, scale: u32) -> anyhow::Result<()> {
        let blue = self.instance_addr(Color::Blue)?;
        let out = self
            .pgbench(&blue)?
            .args(["-i", "-q", "-s", &scale.to_string(), DATABASE])
            .output()
            .context("running pgbench -i")?;
        if !out.status.success() {
            bail!(
                "pgbench -i failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        pgflip_engine::load::prepare(&blue, &self.admin, DATABASE).await?;
        // A database in service has no gigabyte of just-loaded data waiting in the page
        // cache: written back by the kernel ~30 s later, it stalls whatever phase of the
        // measured switch runs then (1.6 s, once in preflight). Made durable here instead.
        connect(&blue, &self.admin, DATABASE)
            .await?
            .batch_execute("CHECKPOINT")
            .await?;
        tokio::task::spawn_blocking(nix::unistd::sync).await?;
        Ok(())
    }

    /// A pgbench command connecting to `addr` as pgflip's admin (password in the environment).
    pub fn pgbench(&self, addr: &Addr) -> anyhow::Result<Command> {
        let bin = self.toolchain.pgbench()?;
        let mut cmd = Command::new(&bin);
        cmd.args(["-h", &addr.host, "-p", &addr.port.to_string()])
            .env("PGUSER", &self.admin.user)
            .env("PGPASSWORD", &self.admin.password)
            .stdin(Stdio::null());
        if let Some(lib) = pgflip_engine::toolchain::lib_dir(bin.parent().unwrap_or(Path::new("/")))
        {
            cmd.env("LD_LIBRARY_PATH", lib);
        }
        // A shell without job control starts background jobs with SIGINT ignored, and an
        // ignored signal survives exec: pgbench, stopped with SIGINT, would run on forever.
        use std::os::unix::process::CommandExt;
        // SAFETY: only sigaction, which is async-signal-safe, runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                use nix::sys::signal::{SigHandler, Signal, signal};
                signal(Signal::SIGINT, SigHandler::SigDfl)
                    .map(|_| ())
                    .map_err(std::io::Error::from)
            });
        }
        Ok(cmd)
    }

    /// Bytes of table data (heap and TOAST, no indexes) in the database: what replication
    /// copies and verification reads.
    pub async fn table_bytes(&self, addr: &Addr) -> anyhow::Result<u64> {
        let c = connect(addr, &self.admin, DATABASE).await?;
        let row = c
            .query_one(
                "SELECT coalesce(sum(pg_table_size(c.oid)), 0)::int8 FROM pg_class c
                 JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE c.relkind = 'r' AND n.nspname = 'public'",
                &[],
            )
            .await?;
        Ok(row.get::<_, i64>(0) as u64)
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.stop_controller();
        let state = self.state.clone();
        // `pgflip stop` stops the endpoint and every instance of the state directory.
        let _ = pgflip_engine::adapters::pgbouncer::stop_endpoint(&state);
        let _ = pgflip_engine::adapters::local_instances::stop_all(&state);
    }
}
