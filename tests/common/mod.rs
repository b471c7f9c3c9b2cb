//! Test harness for local mode: a throw-away Git repository and state directory, the real
//! `pgflip` binary run as a child process (so tests can kill -9 it), and clean-up of every
//! server it started, whatever the outcome.
#![allow(dead_code)]

pub mod database;
pub mod flux;
pub mod forge;
pub mod git_http;
pub mod kube;
pub mod real_node;
pub mod signals;
pub mod user_server;

use pgflip_core::plan::Record;
use pgflip_core::report::{State, Update};
use pgflip_core::spec::{self, Major};
use pgflip_engine::adapters::git_notes::GitNotes;
use pgflip_engine::adapters::git_source::testing as git;
use pgflip_engine::pg::connect;
use pgflip_engine::ports::{Addr, Credentials};
use pgflip_engine::state::StateDir;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A temporary state directory whose servers are stopped when it is dropped, however the
/// test ends. Made before the servers start, so a failure while starting the second one
/// still stops the first.
pub struct TempState {
    pub state: StateDir,
    _dir: tempfile::TempDir,
}

impl TempState {
    pub fn new() -> TempState {
        let dir = tempfile::tempdir().unwrap();
        TempState {
            state: StateDir::open(dir.path()).unwrap(),
            _dir: dir,
        }
    }
}

impl Drop for TempState {
    fn drop(&mut self) {
        let _ = pgflip_engine::adapters::local_instances::stop_all(&self.state);
    }
}

/// The last `lines` lines of a log file (empty if it cannot be read), for a failing test.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub repo: PathBuf,
    pub state: StateDir,
    pub port: u16,
    pub extra_spec: String,
    /// A bare repository pgflip reads by `file://` URL (commits are pushed to it).
    pub remote: Option<PathBuf>,
    /// More arguments for `pgflip local` (forge flags, say).
    pub extra_args: Vec<String>,
    /// More environment for `pgflip local`.
    pub extra_env: Vec<(String, String)>,
    child: Option<Child>,
    runs: u32,
    /// File systems mounted for this test, unmounted once everything is stopped.
    mounts: Vec<Tmpfs>,
}

/// A tmpfs of a fixed size mounted for a test (a disk that fills up); unmounted when
/// dropped. Mounting needs root, as the tests run (PostgreSQL itself drops to its user).
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    pub fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .unwrap();
        assert!(
            status.success(),
            "mounting a {size} tmpfs at {} (needs root)",
            at.display()
        );
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

impl Harness {
    pub fn new(extra_spec: &str) -> Harness {
        let dir = tempfile::Builder::new()
            .prefix("pgflip-test-")
            .tempdir()
            .unwrap();
        let repo = dir.path().join("repo");
        std::fs::create_dir_all(&repo).unwrap();
        git::init_repo(&repo);
        let state = StateDir::open(dir.path().join("state")).unwrap();
        let port = pgflip_engine::run_as::free_port().unwrap();
        let extra_spec = format!("endpoint:\n  port: {port}\n{extra_spec}");
        Harness {
            dir,
            repo,
            state,
            port,
            extra_spec,
            remote: None,
            extra_args: Vec::new(),
            extra_env: Vec::new(),
            child: None,
            runs: 0,
            mounts: Vec::new(),
        }
    }

    /// Like [`Harness::new`], but pgflip reads a bare "forge" repository by URL.
    pub fn with_remote(extra_spec: &str) -> Harness {
        let mut h = Harness::new(extra_spec);
        let remote = h.dir.path().join("remote.git");
        git2::Repository::init_bare(&remote).unwrap();
        h.remote = Some(remote);
        h
    }

    pub fn document(&self, major: u32) -> String {
        spec::render("testdb", Major(major), &self.extra_spec)
    }

    /// Commits the document at `major`; returns the commit.
    pub fn commit_version(&self, major: u32) -> String {
        self.commit_text(&self.document(major), &format!("PostgreSQL {major}"))
    }

    pub fn commit_text(&self, text: &str, message: &str) -> String {
        let sha = git::commit_file(&self.repo, "db/database.yaml", text, message);
        self.push();
        sha
    }

    pub fn revert(&self, sha: &str) -> String {
        let sha = git::revert(&self.repo, sha);
        self.push();
        sha
    }

    fn push(&self) {
        if let Some(remote) = &self.remote {
            git::push(&self.repo, remote);
        }
    }

    /// What pgflip is told to read: the work tree's path, or the remote's URL.
    fn repo_arg(&self) -> String {
        match &self.remote {
            Some(r) => format!("file://{}", r.display()),
            None => self.repo.display().to_string(),
        }
    }

    /// `pgflip local` will post statuses to `forge` (a stand-in GitHub API) for the
    /// repository `shop/db`, with `token`.
    pub fn report_to_github(&mut self, forge: &forge::FakeForge, token: &str) {
        self.extra_args.extend(forge.github_args());
        self.extra_env
            .push(("PGFLIP_FORGE_TOKEN".into(), token.into()));
    }

    /// None of `secrets` appears anywhere a person or a tool reads: every log (pgflip's,
    /// PgBouncer's, each PostgreSQL server's), the record and every other file of the
    /// state directory, and the git notes of every commit. Left out: where credentials
    /// belong (`secrets/`, PgBouncer's `userlist.txt`) and PostgreSQL's data files (a
    /// subscription's connection string is in its catalog, where PostgreSQL keeps it).
    pub fn assert_no_credentials(&self, secrets: &[&str]) {
        const DATA_FILES: [&str; 16] = [
            "base",
            "global",
            "pg_wal",
            "pg_xact",
            "pg_multixact",
            "pg_logical",
            "pg_replslot",
            "pg_subtrans",
            "pg_stat",
            "pg_stat_tmp",
            "pg_snapshots",
            "pg_twophase",
            "pg_notify",
            "pg_serial",
            "pg_commit_ts",
            "pg_dynshmem",
        ];
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            let Ok(entries) = std::fs::read_dir(dir) else {
                return;
            };
            for e in entries.flatten() {
                let path = e.path();
                let name = e.file_name().to_string_lossy().into_owned();
                if path.is_dir() {
                    if name != "secrets" && name != ".git" && !DATA_FILES.contains(&name.as_str()) {
                        walk(&path, out);
                    }
                } else if name != "userlist.txt" {
                    out.push(path);
                }
            }
        }
        let mut files = Vec::new();
        walk(self.dir.path(), &mut files);
        assert!(
            files
                .iter()
                .any(|f| f.extension().is_some_and(|e| e == "log")),
            "no log was read: {files:?}"
        );
        for file in &files {
            let Ok(bytes) = std::fs::read(file) else {
                continue;
            };
            for secret in secrets {
                assert!(
                    !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                    "a credential is in {}",
                    file.display()
                );
            }
        }
        let repo = git2::Repository::open(&self.repo).unwrap();
        let notes = repo.notes(Some(pgflip_engine::adapters::git_notes::NOTES_REF));
        for note in notes.into_iter().flatten().flatten() {
            let text = GitNotes::read_text(&self.repo, &note.1.to_string()).unwrap();
            for secret in secrets {
                assert!(
                    !text.contains(secret),
                    "a credential is in the note of {}",
                    note.1
                );
            }
        }
    }

    /// Starts `pgflip local` (optionally armed to kill itself at a failpoint).
    pub fn start(&mut self, failpoint: Option<&str>) {
        self.runs += 1;
        let log = std::fs::File::create(self.dir.path().join(format!("pgflip-{}.log", self.runs)))
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgflip"));
        cmd.args(["local", "--repo"])
            .arg(self.repo_arg())
            .arg("--state-dir")
            .arg(&self.state.root)
            .args(["--file", "db/database.yaml", "--poll", "200ms"])
            .args(&self.extra_args)
            .envs(self.extra_env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "info,pgflip=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        match failpoint {
            Some(f) => cmd.env("PGFLIP_FAILPOINT", f),
            None => cmd.env_remove("PGFLIP_FAILPOINT"),
        };
        self.child = Some(cmd.spawn().unwrap());
    }

    /// Waits for the child to die (it was armed with a failpoint). Returns whether it died by SIGKILL.
    pub fn wait_killed(&mut self, timeout: Duration) -> bool {
        let started = Instant::now();
        let child = self.child.as_mut().expect("running");
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                use std::os::unix::process::ExitStatusExt;
                self.child = None;
                return status.signal() == Some(9);
            }
            if started.elapsed() > timeout {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn record(&self) -> Record {
        self.state.load().unwrap()
    }

    /// Waits until `cond` holds on the record; panics with the log on timeout.
    pub async fn wait(
        &self,
        what: &str,
        timeout: Duration,
        cond: impl Fn(&Record) -> bool,
    ) -> Record {
        let started = Instant::now();
        loop {
            let r = self.record();
            if cond(&r) {
                return r;
            }
            if started.elapsed() > timeout {
                panic!(
                    "timed out waiting for {what}; record: {r:#?}\nlog:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits for a note on `revision` in a final state (success or failure).
    /// Waits for a note of this state on the commit (one that already has an earlier
    /// final note, say a failure before a retry that succeeds).
    pub async fn wait_note(&self, revision: &str, state: State, timeout: Duration) -> Update {
        let started = Instant::now();
        loop {
            if let Some(u) = self.notes(revision).into_iter().find(|u| u.state == state) {
                return u;
            }
            if started.elapsed() > timeout {
                panic!(
                    "no {state:?} note on {revision}; notes: {:#?}\nlog:\n{}",
                    self.notes(revision),
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn wait_final_note(&self, revision: &str, timeout: Duration) -> Update {
        let started = Instant::now();
        loop {
            if let Some(u) = self
                .notes(revision)
                .into_iter()
                .rev()
                .find(|u| u.state != State::Pending)
            {
                return u;
            }
            if started.elapsed() > timeout {
                panic!(
                    "no final note on {revision}; notes: {:#?}\nlog:\n{}",
                    self.notes(revision),
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The notes on a commit, read where pgflip writes them (pushed to the remote in URL mode).
    pub fn notes(&self, revision: &str) -> Vec<Update> {
        GitNotes::read(self.remote.as_ref().unwrap_or(&self.repo), revision).unwrap_or_default()
    }

    pub fn log_tail(&self) -> String {
        let mut out = String::new();
        for i in 1..=self.runs {
            let log = tail(&self.dir.path().join(format!("pgflip-{i}.log")), 60);
            out.push_str(&format!("--- run {i} ---\n{log}\n"));
        }
        out
    }

    pub fn admin(&self) -> Credentials {
        self.state.admin_credentials().unwrap()
    }

    pub fn endpoint(&self) -> Addr {
        Addr {
            host: "127.0.0.1".into(),
            port: self.port,
        }
    }

    /// Where an instance of the pair listens (from its instance file).
    pub fn instance_addr(&self, color: &str) -> Option<Addr> {
        let bytes = std::fs::read(
            self.state
                .dir("instances")
                .join(color)
                .join("instance.json"),
        )
        .ok()?;
        let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
        Some(Addr {
            host: "127.0.0.1".into(),
            port: v["port"].as_u64()? as u16,
        })
    }

    /// Whether anything of pgflip's instance of `color` is on disk: its directory, or a
    /// physical copy's (`<color>.physical`). A state directory that cannot be read fails
    /// the test, so "nothing there" never stands for "could not look".
    pub fn instance_exists(&self, color: &str) -> bool {
        let root = &self.state.root;
        std::fs::read_dir(root).unwrap_or_else(|e| panic!("reading {}: {e}", root.display()));
        let Ok(entries) = std::fs::read_dir(self.state.dir("instances")) else {
            return false;
        };
        entries
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .any(|name| name == color || name.starts_with(&format!("{color}.")))
    }

    /// Gives `color`'s instance (made later by pgflip) a file system of its own of `size`.
    pub fn mount_instance_dir(&mut self, color: &str, size: &str) -> PathBuf {
        let at = self.state.dir("instances").join(color);
        self.mounts.push(Tmpfs::mount(&at, size));
        at
    }

    /// Publications, replication slots and subscriptions made by pgflip on an instance.
    pub async fn replication_objects(&self, color: &str, db: &str) -> Vec<String> {
        let addr = self.instance_addr(color).expect("instance exists");
        let c = connect(&addr, &self.admin(), db).await.unwrap();
        let rows = c
            .query(
                "SELECT 'publication ' || pubname FROM pg_publication
                 UNION ALL SELECT 'slot ' || slot_name FROM pg_replication_slots
                 UNION ALL SELECT 'subscription ' || subname FROM pg_subscription
                 ORDER BY 1",
                &[],
            )
            .await
            .unwrap();
        rows.iter().map(|r| r.get::<_, String>(0)).collect()
    }

    /// Creates the app role and the sample schema through the endpoint; returns the app login.
    pub async fn load_sample(&self) -> Credentials {
        let admin = self.admin();
        let c = connect(&self.endpoint(), &admin, "app").await.unwrap();
        c.batch_execute(include_str!("../../demo/sample.sql"))
            .await
            .unwrap();
        let app = Credentials {
            user: "app".into(),
            password: pgflip_engine::random::token(12),
        };
        c.batch_execute(&format!(
            "CREATE ROLE app LOGIN PASSWORD '{}'; GRANT USAGE ON SCHEMA public TO app;
             GRANT ALL ON ALL TABLES IN SCHEMA public TO app; GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO app;",
            app.password
        ))
        .await
        .unwrap();
        pgflip_engine::load::prepare(&self.endpoint(), &admin, "app")
            .await
            .unwrap();
        c.batch_execute("GRANT ALL ON ALL TABLES IN SCHEMA public TO app")
            .await
            .unwrap();
        app
    }

    pub fn load(
        &self,
        app: &Credentials,
        clients: usize,
        rate: u32,
    ) -> pgflip_engine::load::LoadHandle {
        pgflip_engine::load::start(pgflip_engine::load::LoadConfig {
            endpoint: self.endpoint(),
            creds: app.clone(),
            database: "app".into(),
            clients,
            rate_per_sec: Some(rate),
        })
    }

    /// A database at 15 bootstrapped by pgflip with the sample schema, a load of `clients`
    /// at `rate` tx/s through the endpoint, and pgflip stopped again (so a test starts it
    /// with the failpoint it needs). Returns the harness, the app login and the load.
    pub async fn serving_15_under_load(
        extra_spec: &str,
        clients: usize,
        rate: u32,
    ) -> (Harness, Credentials, pgflip_engine::load::LoadHandle) {
        let mut h = Harness::new(&format!(
            "databases: [app]\nretainPrevious: 1h\n{extra_spec}"
        ));
        h.commit_version(15);
        h.start(None);
        h.wait("bootstrap", MINUTE, |r| r.serving.is_some()).await;
        let app = h.load_sample().await;
        let load = h.load(&app, clients, rate);
        h.kill();
        (h, app, load)
    }

    /// The colors whose instance the endpoint sends clients to (exactly one, always).
    pub async fn endpoint_behind(&self) -> Vec<&'static str> {
        let port = self.serving_port_direct().await;
        ["blue", "green"]
            .into_iter()
            .filter(|c| self.instance_addr(c).is_some_and(|a| a.port == port))
            .collect()
    }

    /// Waits until `switches` switches are done and none is under way; then `serving_now`
    /// (color, major) serves and `revision` has its success status. Returns the record.
    pub async fn wait_switched(
        &self,
        what: &str,
        switches: usize,
        revision: &str,
        serving_now: (pgflip_core::plan::Color, u32),
    ) -> Record {
        let r = self
            .wait(what, 5 * MINUTE, |r| {
                r.history.len() == switches && r.attempt.is_none()
            })
            .await;
        assert_eq!(
            r.serving.map(|m| (m.color, m.major.0)),
            Some(serving_now),
            "{what}"
        );
        // The status follows the record: an attempt that was retried (a pause rolled back,
        // say) carries a failure note until the success note lands.
        let started = Instant::now();
        while self.wait_final_note(revision, MINUTE).await.state != State::Success {
            assert!(
                started.elapsed() < MINUTE,
                "{what}: no success status on {revision}: {:#?}",
                self.notes(revision)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        r
    }

    /// Stops the load and checks what it saw: it committed, nothing failed, and every
    /// acknowledged commit is there behind the endpoint.
    pub async fn stop_load_checked(
        &self,
        load: pgflip_engine::load::LoadHandle,
    ) -> pgflip_engine::load::LoadReport {
        let report = self.stop_load_lossless(load).await;
        assert_eq!(report.failed, 0, "failed transactions: {:?}", report.errors);
        report
    }

    /// Stops the load when a fault cut clients off (their errors are the fault's): it
    /// committed, and every acknowledged commit is there behind the endpoint.
    pub async fn stop_load_lossless(
        &self,
        load: pgflip_engine::load::LoadHandle,
    ) -> pgflip_engine::load::LoadReport {
        let report = load.stop().await;
        eprintln!("{} committed, {} failed", report.committed, report.failed);
        assert!(report.committed > 100, "the load ran: {}", report.committed);
        let lost =
            pgflip_engine::load::lost_commits(&report, &self.endpoint(), &self.admin(), "app")
                .await
                .unwrap();
        assert_eq!(lost, 0, "acknowledged commits lost");
        report
    }

    /// Waits until the endpoint serves again — on `port`, if given — no sooner than
    /// `not_before` after `since` and within `within` of it; returns the port it serves on.
    pub async fn served_again(
        &self,
        app: &Credentials,
        port: Option<u16>,
        since: Instant,
        not_before: Duration,
        within: Duration,
    ) -> u16 {
        loop {
            let answered =
                tokio::time::timeout(Duration::from_millis(500), self.try_serving_port(app)).await;
            if let Ok(Ok(serving)) = answered
                && port.is_none_or(|p| p == serving)
                && since.elapsed() > not_before
            {
                eprintln!("served again on {serving} after {:?}", since.elapsed());
                return serving;
            }
            assert!(
                since.elapsed() < within,
                "not served again{} within {within:?}: {answered:?}\n{}",
                port.map(|p| format!(" on {p}")).unwrap_or_default(),
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The port the endpoint currently sends clients to.
    pub async fn serving_port(&self, app: &Credentials) -> u16 {
        self.try_serving_port(app).await.unwrap()
    }

    /// [`Harness::serving_port`], or why the endpoint did not answer.
    pub async fn try_serving_port(&self, app: &Credentials) -> anyhow::Result<u16> {
        let c = connect(&self.endpoint(), app, "app").await?;
        let rows = c.simple_query("SELECT current_setting('port')").await?;
        for m in rows {
            if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
                return Ok(r.get(0).unwrap_or_default().parse()?);
            }
        }
        anyhow::bail!("no row")
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.kill();
        let _ = Command::new(env!("CARGO_BIN_EXE_pgflip"))
            .args(["stop", "--state-dir"])
            .arg(&self.state.root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        // Only now that nothing runs from them.
        self.mounts.clear();
    }
}

pub const MINUTE: Duration = Duration::from_secs(60);

impl Harness {
    /// The port in the endpoint's stored configuration (readable while PgBouncer is paused).
    pub async fn serving_port_direct(&self) -> u16 {
        let ini =
            std::fs::read_to_string(self.state.dir("endpoint").join("pgbouncer.ini")).unwrap();
        let line = ini
            .lines()
            .find(|l| l.starts_with("app =") || l.starts_with("app="))
            .expect("app entry");
        let port = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("port="))
            .expect("port");
        port.parse().unwrap()
    }
}

/// Commits `text` as `db/database.yaml` on top of `parent` straight into `git_ref` (a
/// pull request's head where a forge keeps it, or a branch rewritten as by a force-push),
/// in one ref update; the work tree is left alone.
pub fn commit_onto(repo: &Path, git_ref: &str, parent: &str, text: &str) -> String {
    let repo = git2::Repository::open(repo).unwrap();
    let parent = repo
        .find_commit(git2::Oid::from_str(parent).unwrap())
        .unwrap();
    let blob = repo.blob(text.as_bytes()).unwrap();
    let db = parent.tree().unwrap().get_path(Path::new("db")).unwrap();
    let mut db_tree = repo
        .treebuilder(Some(&repo.find_tree(db.id()).unwrap()))
        .unwrap();
    db_tree.insert("database.yaml", blob, 0o100644).unwrap();
    let db_id = db_tree.write().unwrap();
    let mut root = repo.treebuilder(Some(&parent.tree().unwrap())).unwrap();
    root.insert("db", db_id, 0o040000).unwrap();
    let tree = repo.find_tree(root.write().unwrap()).unwrap();
    let sig = git2::Signature::now("dev", "dev@example.com").unwrap();
    let id = repo
        .commit(None, &sig, &sig, "bump", &tree, &[&parent])
        .unwrap();
    // Forced: the ref may point anywhere before (a rewritten branch).
    repo.reference(git_ref, id, true, "pgflip test: force")
        .unwrap();
    id.to_string()
}

/// Adds table `big` of `rows` rows of about 1 kB each (uncompressed text) in the database
/// `client` is connected to: a copy that takes seconds.
pub async fn add_big_table(client: &tokio_postgres::Client, rows: u32) {
    client
        .batch_execute(&format!(
            "CREATE TABLE big (id int PRIMARY KEY, payload text NOT NULL);
             INSERT INTO big SELECT g, repeat(md5(g::text), 30) FROM generate_series(1, {rows}) g;"
        ))
        .await
        .unwrap();
}
