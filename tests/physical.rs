//! The physical copy (`spec.copy: physical`, and `auto` for upgrades): a base backup of
//! blue replayed to the replication slots' start L, upgraded with `pg_upgrade --link`, and
//! logical replication from L on. Real servers of two majors, real tools, a writing load.

mod common;

use common::{Harness, MINUTE, TempState};
use pgflip_core::plan::{Color, CopyMethod, Member};
use pgflip_core::report::State;
use pgflip_core::spec::{self, Desired, Major};
use pgflip_engine::adapters::local_instances::LocalInstances;
use pgflip_engine::pg::connect;
use pgflip_engine::ports::{Addr, Credentials, Instances};
use pgflip_engine::replication as repl;
use pgflip_engine::run_as::{RunAs, run_async};
use pgflip_engine::toolchain::Toolchain;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio_postgres::Client;

/// pgflip's local instances in a temporary state directory, with blue (15) running: the
/// parts a physical copy 15 → 17 is made of, driven by hand.
struct Blue15 {
    temp: TempState,
    admin: Credentials,
    toolchain: Toolchain,
    instances: LocalInstances,
    desired: Desired,
    from: Member,
    to: Member,
    blue: Addr,
}

impl Blue15 {
    async fn start() -> Blue15 {
        let temp = TempState::new();
        let admin = temp.state.admin_credentials().unwrap();
        let toolchain = Toolchain::discover().await;
        let instances =
            LocalInstances::new(temp.state.clone(), toolchain.clone(), admin.clone()).unwrap();
        let desired = spec::parse(&spec::render("parts", Major(15), "")).unwrap();
        let from = Member {
            color: Color::Blue,
            major: Major(15),
        };
        let to = Member {
            color: Color::Green,
            major: Major(17),
        };
        let blue = instances.ensure(&from, &desired).await.unwrap();
        Blue15 {
            temp,
            admin,
            toolchain,
            instances,
            desired,
            from,
            to,
            blue,
        }
    }

    async fn physical_copy_blocker(&self) -> Option<String> {
        self.instances
            .physical_copy_blocker(&self.from, &self.to, &self.desired)
            .await
            .unwrap()
    }
}

/// Clients that hold their transaction open for 20 ms around the commit, each row a
/// number of its own in a table without a key: a commit record lands right where a slot
/// starts often, and a row applied twice shows as a duplicate. Returns the numbers whose
/// commit was acknowledged.
fn slow_committers(
    addr: &Addr,
    creds: &Credentials,
    clients: u64,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Vec<i64>>> {
    (0..clients)
        .map(|client| {
            let (addr, creds, stop) = (addr.clone(), creds.clone(), stop.clone());
            tokio::spawn(async move {
                let c = connect(&addr, &creds, "app").await.unwrap();
                let mut acked = Vec::new();
                let mut n = client as i64;
                while !stop.load(Ordering::SeqCst) {
                    let sql = format!(
                        "BEGIN; INSERT INTO keyless (n) VALUES ({n}); SELECT pg_sleep(0.02); COMMIT"
                    );
                    if c.batch_execute(&sql).await.is_ok() {
                        acked.push(n);
                    } else if c.is_closed() {
                        // The server went (a failed test stopping it): a closed client
                        // fails at once, and a loop that never waits would never end.
                        break;
                    }
                    n += clients as i64;
                }
                acked
            })
        })
        .collect()
}

async fn numbers(c: &Client) -> Vec<i64> {
    c.query("SELECT n FROM keyless ORDER BY n", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Whether the first WAL record at `lsn` in blue's `pg_wal` is a commit (pg_waldump).
async fn commit_record_at(toolchain: &Toolchain, wal: &std::path::Path, lsn: &str) -> bool {
    let bin = toolchain.server_bin(15).unwrap();
    for _ in 0..50 {
        let mut dump = RunAs::detect().unwrap().command(&bin.join("pg_waldump"));
        dump.arg("-p").arg(wal).args(["-s", lsn, "-n", "1"]);
        if let Ok(out) = run_async(dump).await {
            return out.contains("desc: COMMIT");
        }
        // The record is not flushed yet.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("pg_waldump could not read the record at {lsn}");
}

/// The cut where it is hardest: the logical slot is made again and again under slow
/// committers until the first WAL record at its start L is a commit. The copy replays up
/// to L and not that record; the subscription streams from L; every acknowledged row is on
/// green exactly once, and green has what blue has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_record_at_the_cut_is_applied_once() {
    let parts = Blue15::start().await;
    if let Some(blocker) = parts.physical_copy_blocker().await {
        panic!("a physical copy 15 → 17 cannot be made here: {blocker}");
    }
    let Blue15 {
        temp,
        admin,
        toolchain,
        instances,
        desired,
        from,
        to,
        blue,
    } = &parts;
    let state = &temp.state;
    connect(blue, admin, "postgres")
        .await
        .unwrap()
        .batch_execute("CREATE DATABASE app")
        .await
        .unwrap();
    let blue_app = connect(blue, admin, "app").await.unwrap();
    blue_app
        .batch_execute(
            "CREATE TABLE keyless (n bigint NOT NULL); ALTER TABLE keyless REPLICA IDENTITY FULL;
             INSERT INTO keyless SELECT -g FROM generate_series(1, 10000) g",
        )
        .await
        .unwrap();
    repl::ensure_own_schema(&blue_app).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writers = slow_committers(blue, admin, 6, stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;

    let slot = repl::base_slot_name(to.color);
    instances
        .base_backup(from, to, blue, &slot, desired)
        .await
        .unwrap();
    let link = repl::link_name(from.color, to.color, "app");
    repl::ensure_publication(&blue_app, &link).await.unwrap();
    let wal = state.dir("instances").join("blue/data/pg_wal");
    let mut cut = None;
    for _ in 0..300 {
        repl::ensure_slot(&blue_app, &link).await.unwrap();
        let lsn = repl::slot_start(&blue_app, &link).await.unwrap();
        if commit_record_at(toolchain, &wal, &lsn).await {
            cut = Some(lsn);
            break;
        }
        repl::drop_slot(&blue_app, &link).await.unwrap();
        tokio::time::sleep(Duration::from_millis(10 + rand_ms())).await;
    }
    let cut = cut.expect("no slot started at a commit record in 300 tries");

    let green = instances
        .upgrade_backup(from, to, blue, &slot, &cut, desired)
        .await
        .unwrap();
    let blue_postgres = connect(blue, admin, "postgres").await.unwrap();
    repl::drop_slot(&blue_postgres, &slot).await.unwrap();
    let green_app = connect(&green, admin, "app").await.unwrap();
    let version: String = green_app
        .query_one("SHOW server_version_num", &[])
        .await
        .unwrap()
        .get(0);
    assert!(version.starts_with("17"), "green runs {version}");
    repl::drop_copied_links(&green_app).await.unwrap();
    repl::ensure_subscription(
        &green_app,
        &link,
        blue,
        admin,
        "app",
        repl::Start::FromLsn(cut.clone()),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::SeqCst);
    let mut acked = Vec::new();
    for w in writers {
        acked.extend(w.await.unwrap());
    }
    assert!(acked.len() > 50, "the load ran: {} commits", acked.len());
    repl::catch_up(&[(&blue_app, &green_app)], "test", Duration::from_secs(60))
        .await
        .unwrap();
    let (on_blue, on_green) = (numbers(&blue_app).await, numbers(&green_app).await);
    let mut unique = on_green.clone();
    unique.dedup();
    assert_eq!(
        on_green.len(),
        unique.len(),
        "rows applied twice at the cut {cut}"
    );
    assert_eq!(on_green, on_blue, "green holds what blue holds");
    for n in &acked {
        assert!(on_green.binary_search(n).is_ok(), "acknowledged {n} lost");
    }
    repl::drop_subscription(&green_app, &link).await.unwrap();
    repl::drop_slot(&blue_app, &link).await.unwrap();
    assert!(
        !state.dir("instances").join("green.physical").exists(),
        "the copy's staging directory is gone"
    );
}

/// What `pg_upgrade --check` refuses is found before anything is touched, and named: a
/// column of type `aclitem` (its format changed in 16) keeps a 15 → 17 upgrade off the
/// physical path; without it the path is open. The scratch cluster is gone either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_upgrade_check_findings_keep_the_copy_logical_and_are_named() {
    let parts = Blue15::start().await;
    let c = connect(&parts.blue, &parts.admin, "postgres")
        .await
        .unwrap();
    c.batch_execute("CREATE TABLE grants_kept (who aclitem)")
        .await
        .unwrap();
    let blocker = parts
        .physical_copy_blocker()
        .await
        .expect("pg_upgrade --check refuses an aclitem column");
    assert!(
        blocker.contains("pg_upgrade --check") && blocker.contains("grants_kept"),
        "{blocker}"
    );
    c.batch_execute("DROP TABLE grants_kept").await.unwrap();
    assert_eq!(parts.physical_copy_blocker().await, None);
    assert!(
        !parts
            .temp
            .state
            .dir("instances")
            .join("green.check")
            .exists()
    );
}

/// Waits until the first switch is done: green's 17 serves, the history says the copy was
/// physical and where it was cut, and `revision` has its success status (returned).
async fn switched_physically_to_17(
    h: &Harness,
    what: &str,
    revision: &str,
) -> pgflip_core::report::Update {
    let r = h.wait_switched(what, 1, revision, (Color::Green, 17)).await;
    let copy = r.history[0]
        .copy
        .clone()
        .expect("the copy method is recorded");
    assert_eq!(copy.method, CopyMethod::Physical, "{copy:?}");
    assert!(copy.cut_lsn.is_some(), "{copy:?}");
    h.wait_final_note(revision, MINUTE).await
}

/// A few milliseconds of jitter, so slot creations do not fall into step with the clients.
fn rand_ms() -> u64 {
    pgflip_engine::random::token(2)
        .bytes()
        .map(u64::from)
        .sum::<u64>()
        % 80
}

/// `auto` copies an upgrade physically, end to end: two databases (one slot each, made
/// one after another, one cut), a ledger through the endpoint and slow committers; the
/// status and the record say how it was copied; nothing lost; then `git revert`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_upgrades_physically_and_reverts() {
    let mut h = Harness::new("databases: [app, reports]\nretainPrevious: 1h");
    h.commit_version(15);
    h.start(None);
    h.wait("bootstrap", MINUTE, |r| r.serving.is_some()).await;
    let app = h.load_sample().await;
    let admin = h.admin();
    let endpoint = h.endpoint();
    let reports = connect(&endpoint, &admin, "reports").await.unwrap();
    reports
        .batch_execute(
            "CREATE TABLE daily (day int PRIMARY KEY, total bigint);
             INSERT INTO daily SELECT g, g * 10 FROM generate_series(1, 365) g",
        )
        .await
        .unwrap();
    let c = connect(&endpoint, &admin, "app").await.unwrap();
    // An extension whose version differs between the majors (1.10 on 15, 1.11 on 17):
    // pg_upgrade carries 1.10 over as it was.
    c.batch_execute(
        "CREATE TABLE keyless (n bigint NOT NULL); GRANT ALL ON keyless TO app;
         INSERT INTO keyless SELECT -g FROM generate_series(1, 1000) g;
         CREATE EXTENSION pg_stat_statements;
         CREATE TABLE items (id int PRIMARY KEY, v text NOT NULL);
         INSERT INTO items SELECT g, md5(g::text) FROM generate_series(1, 20000) g",
    )
    .await
    .unwrap();
    let extension = "SELECT e.extversion, a.default_version FROM pg_extension e
                       JOIN pg_available_extensions a ON a.name = e.extname
                      WHERE e.extname = 'pg_stat_statements'";
    let on_15: String = c.query_one(extension, &[]).await.unwrap().get(0);
    let load = h.load(&app, 3, 200);
    let stop = Arc::new(AtomicBool::new(false));
    let writers = slow_committers(&endpoint, &app, 4, stop.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;

    let up = h.commit_version(17);
    let note = switched_physically_to_17(&h, "upgrade", &up).await;
    assert!(note.message.contains("copied physical"), "{}", note.message);
    assert_eq!(
        connect(&endpoint, &admin, "reports")
            .await
            .unwrap()
            .query_one("SELECT count(*) FROM daily", &[])
            .await
            .unwrap()
            .get::<_, i64>(0),
        365,
        "the second database came over"
    );
    assert!(
        !h.replication_objects("green", "app")
            .await
            .iter()
            .any(|o| o.contains("blue_to_green")),
        "nothing of the forward link is left on green"
    );
    let row = connect(&endpoint, &admin, "app")
        .await
        .unwrap()
        .query_one(extension, &[])
        .await
        .unwrap();
    let (on_17, default_17): (String, String) = (row.get(0), row.get(1));
    assert_ne!(on_15, default_17, "the test needs versions that differ");
    assert_eq!(
        on_17, default_17,
        "the extension was updated after pg_upgrade"
    );
    // Green started cold (upgraded, then restarted); the verification read the tables but
    // no index: an index scan finds every block in the cache all the same — prewarmed.
    let green_app = connect(&h.instance_addr("green").unwrap(), &admin, "app")
        .await
        .unwrap();
    green_app
        .batch_execute("SET enable_seqscan = off; SET enable_bitmapscan = off")
        .await
        .unwrap();
    let explained = green_app
        .simple_query(
            "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) SELECT v FROM items WHERE id BETWEEN 1 AND 20000",
        )
        .await
        .unwrap();
    let plan: serde_json::Value = explained
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(serde_json::from_str),
            _ => None,
        })
        .expect("a plan")
        .unwrap();
    let top = &plan[0]["Plan"];
    assert!(
        top["Node Type"].as_str().unwrap_or("").contains("Index"),
        "{plan:#}"
    );
    assert!(top["Shared Hit Blocks"].as_u64().unwrap() > 0, "{plan:#}");
    assert_eq!(
        top["Shared Read Blocks"].as_u64(),
        Some(0),
        "read from disk: {plan:#}"
    );

    let back = h.revert(&up);
    h.wait_switched("revert", 2, &back, (Color::Blue, 15)).await;
    stop.store(true, Ordering::SeqCst);
    let mut acked = Vec::new();
    for w in writers {
        acked.extend(w.await.unwrap());
    }
    h.stop_load_checked(load).await;
    let on_blue = numbers(&connect(&endpoint, &admin, "app").await.unwrap()).await;
    let mut unique = on_blue.clone();
    unique.dedup();
    assert_eq!(on_blue.len(), unique.len(), "a row twice");
    for n in &acked {
        assert!(on_blue.binary_search(n).is_ok(), "acknowledged {n} lost");
    }
}

/// The WAL the copy holds on blue is bounded (`switchover.maxRetainedWalBytes`): past it
/// the attempt is abandoned with a status naming the bound, blue serves on, and no slot,
/// publication or copy of green is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_past_its_wal_bound_is_abandoned_and_cleaned_up() {
    let mut h = Harness::new("databases: [app]\nswitchover:\n  maxRetainedWalBytes: 1");
    h.commit_version(15);
    h.start(None);
    h.wait("bootstrap", MINUTE, |r| r.serving.is_some()).await;
    let app = h.load_sample().await;
    let load = h.load(&app, 2, 100);
    let up = h.commit_version(17);
    let note = h.wait_final_note(&up, 3 * MINUTE).await;
    assert_eq!(note.state, State::Failure, "{note:?}");
    assert!(
        note.message.contains("maxRetainedWalBytes"),
        "{}",
        note.message
    );
    let r = h.wait("the cleanup", MINUTE, |r| r.attempt.is_none()).await;
    assert_eq!(
        r.serving.map(|m| (m.color, m.major.0)),
        Some((Color::Blue, 15))
    );
    assert!(h.replication_objects("blue", "app").await.is_empty());
    assert!(!h.instance_exists("green"), "green's copy is left");
    let report = load.stop().await;
    assert_eq!(report.failed, 0, "failed transactions: {:?}", report.errors);
}

/// pgflip killed (SIGKILL) at every step of a physical copy, and while `pg_basebackup` and
/// `pg_upgrade` run (they outlive it: a restarted pgflip waits for them and takes what they
/// made): each restart goes on from what is recorded and on disk, the endpoint always
/// names one server, and the switch completes with nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_inside_the_copy_resumes_and_loses_nothing() {
    let (mut h, _app, load) = Harness::serving_15_under_load("", 2, 100).await;
    let points = [
        "running:pg_basebackup",
        "physical:backup-taken",
        "physical:slots-made",
        "physical:promoted",
        "running:pg_upgrade",
        "physical:upgraded",
    ];
    let mut up = None;
    for point in points {
        h.start(Some(point));
        if up.is_none() {
            up = Some(h.commit_version(17));
        }
        assert!(
            h.wait_killed(3 * MINUTE),
            "pgflip did not reach {point}\n{}",
            h.log_tail()
        );
        assert_eq!(
            h.endpoint_behind().await,
            ["blue"],
            "{point}: the endpoint names blue only"
        );
    }
    h.start(None);
    switched_physically_to_17(&h, "the switch after the crashes", up.as_ref().unwrap()).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    h.stop_load_checked(load).await;
    assert!(
        !h.state.dir("instances").join("green.physical").exists(),
        "the copy's staging directory is gone"
    );
}
