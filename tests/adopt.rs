//! Bringing your own servers (`spec.adopt`), local mode, end to end: PostgreSQL servers the
//! test starts itself, outside pgflip (their own data directory, port and superuser
//! password), adopted, switched under load, reverted and released.

mod common;

use common::user_server::UserServer;
use common::{Harness, MINUTE};
use pgflip_core::plan::{Color, Record};
use pgflip_core::report::State;
use pgflip_engine::ports::Credentials;
use std::time::Duration;

fn serving(r: &Record) -> Option<(Color, u32)> {
    r.serving.map(|m| (m.color, m.major.0))
}

fn adopting(servers: &[&UserServer], more: &str) -> String {
    let mut spec = format!("databases: [app]\n{more}adopt:\n");
    for s in servers {
        spec.push_str(&s.adopt_entry());
    }
    spec
}

/// The user's data before pgflip: a table with rows, the app role, the ledger table the
/// load writes, all made as the server's own superuser.
async fn seed(server: &UserServer) -> Credentials {
    let postgres = server.connect("postgres").await;
    postgres.batch_execute("CREATE DATABASE app").await.unwrap();
    let app = Credentials {
        user: "app".into(),
        password: pgflip_engine::random::token(12),
    };
    let c = server.connect("app").await;
    c.batch_execute(&format!(
        "CREATE TABLE accounts (id serial PRIMARY KEY, owner text NOT NULL, balance int NOT NULL);
         INSERT INTO accounts (owner, balance) SELECT 'owner ' || g, g FROM generate_series(1, 1000) g;
         CREATE ROLE app LOGIN PASSWORD '{}';
         GRANT ALL ON SCHEMA public TO app;
         GRANT ALL ON ALL TABLES IN SCHEMA public TO app;
         GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO app;",
        app.password
    ))
    .await
    .unwrap();
    pgflip_engine::load::prepare(&server.addr(), &server.superuser, "app")
        .await
        .unwrap();
    c.batch_execute("GRANT ALL ON ALL TABLES IN SCHEMA public TO app; GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO app")
        .await
        .unwrap();
    app
}

/// A client of the user's that writes to the server directly, not through the endpoint.
fn direct_writer(server: &UserServer, app: &Credentials) -> tokio::task::JoinHandle<u64> {
    let mut config = pgflip_engine::pg::config(&server.addr(), app, "app");
    config.application_name("billing-cron");
    tokio::spawn(async move {
        let (client, conn) = config.connect(tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        let mut writes = 0;
        loop {
            if client
                .simple_query("INSERT INTO accounts (owner, balance) VALUES ('direct', 1)")
                .await
                .is_err()
            {
                return writes;
            }
            writes += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

async fn wait_for_note(h: &Harness, revision: &str, needle: &str) -> String {
    let started = std::time::Instant::now();
    loop {
        if let Some(u) = h
            .notes(revision)
            .into_iter()
            .find(|u| u.message.contains(needle))
        {
            return u.message;
        }
        assert!(
            started.elapsed() < 3 * MINUTE,
            "no note saying {needle:?} on {revision}: {:#?}\n{}",
            h.notes(revision),
            h.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// PostgreSQL 15 that the test runs, with data and a client writing to it directly:
/// adopted; the switch waits for the direct client and names it; the client moves to the
/// endpoint; 15 → 17 onto a pgflip instance under load, then `git revert` back onto the
/// user's server, nothing lost; when it is no longer retained it is released: still
/// running, with its data, and nothing of pgflip's left on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adopts_a_server_moves_it_to_its_own_instance_back_and_releases_it() {
    let user = UserServer::logical(15);
    let app = seed(&user).await;
    let direct = direct_writer(&user, &app);

    let mut h = Harness::new(&adopting(&[&user], "retainPrevious: 1h\n"));
    let first = h.commit_version(15);
    h.start(None);
    let r = h.wait("adopted", MINUTE, |r| r.serving.is_some()).await;
    assert_eq!(serving(&r), Some((Color::Blue, 15)));
    assert_eq!(
        h.wait_final_note(&first, MINUTE).await.state,
        State::Success
    );
    assert_eq!(
        h.serving_port(&app).await,
        user.port,
        "the endpoint starts in front of the user's server"
    );
    let load = h.load(&app, 2, 100);

    let up = h.commit_version(17);
    let waiting = wait_for_note(&h, &up, "directly").await;
    assert!(
        waiting.contains("app (billing-cron) from 127.0.0.1:"),
        "{waiting}"
    );
    assert_eq!(serving(&h.record()), Some((Color::Blue, 15)));
    // The client's owner moves it to the endpoint.
    direct.abort();
    let _ = direct.await;
    h.wait_switched("upgrade", 1, &up, (Color::Green, 17)).await;
    assert_eq!(
        h.serving_port(&app).await,
        h.instance_addr("green").unwrap().port
    );
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_pgflip"))
        .args(["status", "--state-dir"])
        .arg(&h.state.root)
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.contains(&format!(
            "blue: a server you run: 127.0.0.1:{} (as postgres)",
            user.port
        )) && status.contains("green: pgflip's instance on 127.0.0.1:"),
        "{status}"
    );
    assert!(!status.contains(&user.superuser.password));
    // The adopted server's password, and pgflip's own, nowhere they do not belong.
    h.assert_no_credentials(&[&user.superuser.password, &h.admin().password]);
    assert_eq!(load.failed_so_far(), 0);
    assert_eq!(
        load.lost_commits(&h.endpoint(), &h.admin(), "app")
            .await
            .unwrap(),
        0
    );

    let back = h.revert(&up);
    h.wait_switched("revert", 2, &back, (Color::Blue, 15)).await;
    assert_eq!(
        h.serving_port(&app).await,
        user.port,
        "back on the user's server"
    );
    let report = load.stop().await;
    assert!(report.committed > 0);
    assert_eq!(report.failed, 0, "{:?}", report.errors);
    assert_eq!(
        pgflip_engine::load::lost_commits(&report, &user.addr(), &user.superuser, "app")
            .await
            .unwrap(),
        0,
        "every commit is on the user's server"
    );

    // Forward again, and the user's server is no longer retained: released.
    let again = h.commit_text(
        &pgflip_core::spec::render(
            "testdb",
            pgflip_core::spec::Major(17),
            &format!(
                "endpoint:\n  port: {}\n{}",
                h.port,
                adopting(&[&user], "retainPrevious: 0s\n")
            ),
        ),
        "PostgreSQL 17, nothing retained",
    );
    h.wait("switched and released", 5 * MINUTE, |r| {
        r.history.len() == 3 && r.attempt.is_none() && r.standby.is_none()
    })
    .await;
    assert_eq!(
        h.wait_final_note(&again, MINUTE).await.state,
        State::Success
    );
    assert!(
        user.is_running().await,
        "pgflip never stops the user's server"
    );
    assert_eq!(
        user.pgflip_leftovers(&["app"]).await,
        Vec::<String>::new(),
        "nothing of pgflip's is left on the released server"
    );
    let rows: i64 = user
        .connect("app")
        .await
        .query_one("SELECT count(*) FROM accounts", &[])
        .await
        .unwrap()
        .get(0);
    assert!(rows >= 1000, "the user's data stays: {rows}");
    // The user's own superuser can write there again.
    user.connect("app")
        .await
        .batch_execute("CREATE TABLE after_release (x int)")
        .await
        .unwrap();
}

/// Two servers the test runs, 15 with data and an empty 17: a target with something in
/// the carried database is refused, naming it; once it is empty, 15 → 17 onto the user's
/// 17 under load, and back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moves_onto_a_server_the_user_runs_and_back() {
    let old = UserServer::logical(15);
    let new = UserServer::logical(17);
    let app = seed(&old).await;
    new.connect("postgres")
        .await
        .batch_execute("CREATE DATABASE app")
        .await
        .unwrap();
    new.connect("app")
        .await
        .batch_execute("CREATE TABLE leftover (x int)")
        .await
        .unwrap();

    let mut h = Harness::new(&adopting(&[&old, &new], "retainPrevious: 1h\n"));
    h.commit_version(15);
    h.start(None);
    h.wait("adopted", MINUTE, |r| r.serving.is_some()).await;
    let load = h.load(&app, 2, 100);

    let refused = h.commit_version(17);
    let note = h.wait_final_note(&refused, 2 * MINUTE).await;
    assert_eq!(note.state, State::Failure, "{note:?}");
    assert!(note.message.contains("public.leftover"), "{note:?}");
    assert_eq!(serving(&h.record()), Some((Color::Blue, 15)));
    assert_eq!(h.serving_port(&app).await, old.port);
    assert_eq!(
        old.pgflip_leftovers(&["app"]).await,
        vec!["role pgflip", "app: schema _pgflip"],
        "only pgflip's role and schema on the serving server after a refusal"
    );

    new.connect("app")
        .await
        .batch_execute("DROP TABLE leftover")
        .await
        .unwrap();
    let up = h.commit_text(&h.document(17), "PostgreSQL 17, the target emptied");
    h.wait_switched("upgrade onto the user's 17", 1, &up, (Color::Green, 17))
        .await;
    assert_eq!(
        h.serving_port(&app).await,
        new.port,
        "clients are on the user's 17"
    );
    assert!(!h.instance_exists("green"), "no pgflip instance was made");

    // (Not `git revert`: the commit before `up` asked for 17 too.)
    let back = h.commit_version(15);
    h.wait_switched("back to 15", 2, &back, (Color::Blue, 15))
        .await;
    assert_eq!(h.serving_port(&app).await, old.port);
    let report = load.stop().await;
    assert!(report.committed > 0);
    assert_eq!(report.failed, 0, "{:?}", report.errors);
    for server in [&old, &new] {
        assert_eq!(
            pgflip_engine::load::lost_commits(&report, &server.addr(), &server.superuser, "app")
                .await
                .unwrap(),
            0,
            "every commit on PostgreSQL {}",
            server.major
        );
    }
}

/// A server without logical WAL: a failure naming the setting; nothing touched (no role,
/// no endpoint).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_logical_wal_is_refused_untouched() {
    let user = UserServer::start(15, &[("wal_level", "replica")]);
    seed(&user).await;
    let mut h = Harness::new(&adopting(&[&user], ""));
    let rev = h.commit_version(15);
    h.start(None);
    let note = h.wait_final_note(&rev, MINUTE).await;
    assert_eq!(note.state, State::Failure, "{note:?}");
    assert!(
        note.message.contains("wal_level is replica") && note.message.contains("restart"),
        "{note:?}"
    );
    assert!(!note.message.contains(&user.superuser.password));
    assert_eq!(h.record().serving, None);
    assert_eq!(user.pgflip_leftovers(&["app"]).await, Vec::<String>::new());
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", h.port))
            .await
            .is_err(),
        "no endpoint was started"
    );
}
