//! The PgBouncer endpoint against real PostgreSQL servers and a real PgBouncer: a switch
//! under write load loses and fails nothing, and a pause that cannot complete gives up
//! within its timeout and leaves the endpoint serving.

use pgflip_core::plan::{Color, Member};
use pgflip_core::spec::{self, Desired, Major};
use pgflip_engine::adapters::local_instances::{LocalInstances, stop_all};
use pgflip_engine::adapters::pgbouncer::{PgBouncer, stop_endpoint};
use pgflip_engine::load::{self, LoadConfig};
use pgflip_engine::pg;
use pgflip_engine::ports::{Addr, Credentials};
use pgflip_engine::ports::{Instances, Router};
use pgflip_engine::run_as::free_port;
use pgflip_engine::state::StateDir;
use pgflip_engine::toolchain::Toolchain;
use std::time::{Duration, Instant};

const DB: &str = "app";

/// The desired state the endpoint serves: database `app` (the default).
fn desired() -> Desired {
    spec::parse(&spec::render("router", Major(15), "")).unwrap()
}

/// Stops PgBouncer and the instances, then removes the state directory, whatever the
/// test's outcome (fields drop after `drop`, so the directory goes last).
struct Cleanup {
    state: StateDir,
    _dir: tempfile::TempDir,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = stop_endpoint(&self.state);
        let _ = stop_all(&self.state);
    }
}

struct Setup {
    cleanup: Cleanup,
    admin: Credentials,
    servers: Vec<Addr>,
}

/// Real instances (one per major, blue then green), each with database `app` and the ledger.
async fn setup(majors: &[u32]) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let state = StateDir::open(dir.path()).unwrap();
    let cleanup = Cleanup {
        state: state.clone(),
        _dir: dir,
    };
    let admin = state.admin_credentials().unwrap();
    let instances =
        LocalInstances::new(state.clone(), Toolchain::discover().await, admin.clone()).unwrap();
    let mut servers = Vec::new();
    for (major, color) in majors.iter().zip([Color::Blue, Color::Green]) {
        let addr = instances
            .ensure(
                &Member {
                    color,
                    major: Major(*major),
                },
                &desired(),
            )
            .await
            .unwrap();
        let c = pg::connect(&addr, &admin, "postgres").await.unwrap();
        c.simple_query(&format!("CREATE DATABASE {}", pg::ident(DB)))
            .await
            .unwrap();
        load::prepare(&addr, &admin, DB).await.unwrap();
        servers.push(addr);
    }
    Setup {
        cleanup,
        admin,
        servers,
    }
}

async fn router(s: &Setup) -> PgBouncer {
    PgBouncer::new(
        s.cleanup.state.clone(),
        Toolchain::discover().await,
        s.admin.clone(),
        free_port().unwrap(),
    )
    .unwrap()
}

/// The port of the server a fresh client reaches through the endpoint.
async fn served_port(endpoint: &Addr, admin: &Credentials) -> u16 {
    port_of(&pg::connect(endpoint, admin, DB).await.unwrap()).await
}

/// The port of the server a client's next statement runs on.
async fn port_of(c: &tokio_postgres::Client) -> u16 {
    let rows = c
        .simple_query("SELECT current_setting('port')")
        .await
        .unwrap();
    rows.iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(|v| v.parse().unwrap()),
            _ => None,
        })
        .unwrap()
}

async fn ledger_rows(addr: &Addr, admin: &Credentials) -> u64 {
    let c = pg::connect(addr, admin, DB).await.unwrap();
    let row = c
        .query_one("SELECT count(*) FROM pgflip_ledger", &[])
        .await
        .unwrap();
    row.get::<_, i64>(0) as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switch_under_load_fails_and_loses_nothing() {
    let s = setup(&[15, 16]).await;
    let (blue, green) = (s.servers[0].clone(), s.servers[1].clone());
    let bouncer = router(&s).await;
    bouncer.ensure(&desired(), &blue).await.unwrap();
    assert_eq!(bouncer.target().await.unwrap(), Some(blue.clone()));
    assert_eq!(served_port(&bouncer.addr(), &s.admin).await, blue.port);

    let load_started = Instant::now();
    let load = load::start(LoadConfig {
        endpoint: bouncer.addr(),
        creds: s.admin.clone(),
        database: DB.into(),
        clients: 4,
        rate_per_sec: Some(400),
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let begun = Instant::now();
    let switch_at = begun - load_started;
    bouncer.pause(Duration::from_secs(2)).await.unwrap();
    let paused = begun.elapsed();
    bouncer.repoint(&desired(), &green).await.unwrap();
    bouncer.resume().await.unwrap();
    let switched = begun.elapsed();
    eprintln!("pause took {paused:?}; pause + repoint + resume took {switched:?}");

    tokio::time::sleep(Duration::from_millis(1500)).await;
    let report = load.stop().await;
    eprintln!(
        "committed {}, failed {}, max latency {:.1} ms, p99 {:.1} ms, longest gap {:.1} ms, errors {:?}",
        report.committed,
        report.failed,
        report.max_latency_ms,
        report.p99_latency_ms,
        report.longest_gap_ms,
        report.errors
    );

    let mut slowest = report.latencies.clone();
    slowest.sort_by(|a, b| b.latency_ms.total_cmp(&a.latency_ms));
    eprintln!(
        "switch at {switch_at:?} of the load; slowest transactions: {:?}",
        &slowest[..slowest.len().min(4)]
    );
    let switch_ms = switch_at.as_secs_f64() * 1000.0;
    let around_switch = report
        .latencies
        .iter()
        .filter(|s| s.at_ms >= switch_ms && s.at_ms < switch_ms + 1000.0);
    eprintln!(
        "slowest transaction completed within 1 s of the switch: {:.1} ms",
        around_switch.map(|s| s.latency_ms).fold(0.0, f64::max)
    );
    assert_eq!(report.failed, 0, "errors: {:?}", report.errors);
    assert!(paused < Duration::from_secs(1), "pause took {paused:?}");
    // Bounded by the pause timeout (2 s), with room for a machine busy with other work.
    assert!(
        report.max_latency_ms < 3000.0,
        "a transaction waited {} ms",
        report.max_latency_ms
    );
    assert_eq!(bouncer.target().await.unwrap(), Some(green.clone()));
    assert_eq!(served_port(&bouncer.addr(), &s.admin).await, green.port);

    // Every acknowledged commit is on exactly one server, and nothing else is.
    let (on_blue, on_green) = (
        ledger_rows(&blue, &s.admin).await,
        ledger_rows(&green, &s.admin).await,
    );
    assert!(
        on_blue > 0 && on_green > 0,
        "blue {on_blue}, green {on_green}"
    );
    assert_eq!(on_blue + on_green, report.committed);
    let missing_on_blue = load::lost_commits(&report, &blue, &s.admin, DB)
        .await
        .unwrap();
    let missing_on_green = load::lost_commits(&report, &green, &s.admin, DB)
        .await
        .unwrap();
    assert_eq!(missing_on_blue, on_green);
    assert_eq!(missing_on_green, on_blue);

    // Repointing without a pause: the open transaction finishes where it began (its server
    // connection is closed when released), and the client's next transaction goes to blue.
    let client = pg::connect(&bouncer.addr(), &s.admin, DB).await.unwrap();
    client.simple_query("BEGIN").await.unwrap();
    assert_eq!(port_of(&client).await, green.port);
    bouncer.repoint(&desired(), &blue).await.unwrap();
    assert_eq!(port_of(&client).await, green.port);
    client.simple_query("COMMIT").await.unwrap();
    assert_eq!(port_of(&client).await, blue.port);

    bouncer.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_blocked_by_an_open_transaction_times_out_and_resumes() {
    let s = setup(&[15]).await;
    let blue = s.servers[0].clone();
    let bouncer = router(&s).await;
    bouncer.ensure(&desired(), &blue).await.unwrap();
    let endpoint = bouncer.addr();

    // A second router over the same state adopts the running PgBouncer and keeps its target.
    let adopter = PgBouncer::new(
        s.cleanup.state.clone(),
        Toolchain::discover().await,
        s.admin.clone(),
        endpoint.port,
    )
    .unwrap();
    let elsewhere = Addr {
        host: "127.0.0.1".into(),
        port: free_port().unwrap(),
    };
    adopter.ensure(&desired(), &elsewhere).await.unwrap();
    assert_eq!(adopter.target().await.unwrap(), Some(blue.clone()));

    let holder = pg::connect(&endpoint, &s.admin, DB).await.unwrap();
    holder
        .simple_query("BEGIN; INSERT INTO pgflip_ledger (client, seq) VALUES (-1, 1)")
        .await
        .unwrap();
    // Open until the checks below are done (a timer here once ran out first on a loaded
    // machine): the transaction is open throughout by construction.
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let commit = tokio::spawn(async move {
        let _ = released.await;
        holder.simple_query("COMMIT").await.map(|_| ())
    });

    let timeout = Duration::from_millis(300);
    let begun = Instant::now();
    let paused = bouncer.pause(timeout).await;
    let gave_up = begun.elapsed();
    eprintln!("blocked pause gave up after {gave_up:?}: {paused:?}");
    assert!(
        paused.is_err(),
        "PAUSE cannot complete while a transaction is open"
    );
    assert!(
        gave_up < timeout + Duration::from_millis(500),
        "gave up after {gave_up:?}"
    );

    // Resumed: a new client is served at once, while the transaction is still open.
    let probe = Instant::now();
    let port = tokio::time::timeout(Duration::from_secs(1), served_port(&endpoint, &s.admin))
        .await
        .expect("endpoint still paused");
    assert_eq!(port, blue.port);
    eprintln!(
        "new client served {:?} after the failed pause",
        probe.elapsed()
    );
    release.send(()).unwrap();
    commit.await.unwrap().unwrap();

    // The router recovers: a pause now succeeds, and RESUME is idempotent.
    let begun = Instant::now();
    bouncer.pause(Duration::from_secs(2)).await.unwrap();
    eprintln!("idle pause took {:?}", begun.elapsed());
    bouncer.resume().await.unwrap();
    bouncer.resume().await.unwrap();
    assert_eq!(served_port(&endpoint, &s.admin).await, blue.port);

    bouncer.stop().await.unwrap();
}
