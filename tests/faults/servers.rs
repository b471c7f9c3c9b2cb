//! The servers fail under a switch: PostgreSQL killed or frozen, green's disk full, the
//! endpoint's PgBouncer killed during the pause. Each under a writing ledger: the fault is
//! noticed within seconds, blue keeps serving or the switch completes, nothing is lost.

use super::common::{self, Harness, MINUTE};
use nix::sys::signal::Signal;
use pgflip_core::plan::{Color, Phase, SwitchStep};
use pgflip_engine::load::LoadHandle;
use pgflip_engine::pg::connect;
use pgflip_engine::ports::{Addr, Credentials};
use std::time::{Duration, Instant};

/// Blue at 15 under a light write load (the app's login and the load returned), with a
/// table big enough for a copy of some seconds, and the switch to 16 (its commit
/// returned) in its initial copy.
async fn copying_16_under_load() -> (Harness, Credentials, LoadHandle, String) {
    let (mut h, app, load) = Harness::serving_15_under_load("copy: logical", 2, 100).await;
    let blue = connect(&h.instance_addr("blue").unwrap(), &h.admin(), "app")
        .await
        .unwrap();
    common::add_big_table(&blue, 150000).await;
    h.start(None);
    let up = h.commit_version(16);
    h.wait("the copy", 2 * MINUTE, |r| {
        r.attempt
            .as_ref()
            .is_some_and(|a| a.phase == Phase::InitialSync)
    })
    .await;
    (h, app, load, up)
}

/// Green's PostgreSQL is SIGKILLed during the initial copy: noticed within seconds (it
/// used to take a minute: the killed postmaster, a zombie until reaped, passed for a live
/// server), green restarted, the copy resumed, and the switch completes under load with
/// nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn green_killed_during_the_copy_is_noticed_and_the_switch_completes() {
    let (h, _app, load, up) = copying_16_under_load().await;
    let killed = Instant::now();
    h.kill_server("green");
    // Noticed within seconds: a step that failed on it says so on the commit, or (when
    // the next look finds it first) the log names the dead server as it is restarted.
    loop {
        let status = h
            .notes(&up)
            .into_iter()
            .find(|u| u.phase == "initial-sync" && u.message.contains("; retrying (1/"));
        if let Some(status) = status {
            eprintln!("the status: {}", status.message);
            break;
        }
        if h.log_tail().contains("the postmaster is dead") {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(15),
            "the fault was not noticed: {:#?}\n{}",
            h.notes(&up),
            h.log_tail(),
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("noticed after {:?}", killed.elapsed());
    // Where each table's copy stands, every 20 s until the copy is over: when it stalls
    // the log says which table, in which state, and what the servers say about it.
    let began = Instant::now();
    while h
        .record()
        .attempt
        .is_some_and(|a| a.phase == Phase::InitialSync)
    {
        if began.elapsed().as_secs() % 20 == 19 {
            eprintln!("{}", copy_diagnostics(&h).await);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    h.wait_switched(
        "the switch after green was killed",
        1,
        &up,
        (Color::Green, 16),
    )
    .await;
    eprintln!("switched after {:?}", killed.elapsed());
    h.stop_load_checked(load).await;
}

/// The state a kill of green can leave behind at one unlucky moment (the one the test
/// above hits now and then), made on purpose: a table whose copy is recorded as finished
/// (`f`) while its table-sync slot on blue is gone. PostgreSQL's sync worker then fails on
/// the missing slot for ever; pgflip finds the table, starts the copy over (said on the
/// commit, naming the table) and the switch completes with nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_copy_lost_with_its_sync_slot_is_started_over() {
    let (h, _app, load, up) = copying_16_under_load().await;
    let admin = h.admin();
    let green = connect(&h.instance_addr("green").unwrap(), &admin, "app")
        .await
        .unwrap();
    let sub = pgflip_engine::replication::link_name(Color::Blue, Color::Green, "app");
    // A small table done while the big one still copies; the copy is held (the
    // subscription disabled, its workers gone) while its state is rewritten.
    let table = loop {
        let done: Option<String> = green
            .query_opt(
                "SELECT srrelid::regclass::text FROM pg_subscription_rel
                  WHERE srsubstate IN ('r', 's') AND srrelid <> 'big'::regclass
                    AND EXISTS (SELECT 1 FROM pg_subscription_rel WHERE srsubstate NOT IN ('r', 's'))
                  LIMIT 1",
                &[],
            )
            .await
            .unwrap()
            .map(|r| r.get(0));
        if let Some(table) = done {
            break table;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    green
        .batch_execute(&format!("ALTER SUBSCRIPTION \"{sub}\" DISABLE"))
        .await
        .unwrap();
    while green
        .query_one(
            "SELECT count(*) FROM pg_stat_subscription WHERE pid IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
        > 0
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        h.record()
            .attempt
            .is_some_and(|a| a.phase == Phase::InitialSync),
        "the copy ended before the subscription was held"
    );
    green
        .execute(
            "UPDATE pg_subscription_rel SET srsubstate = 'f', srsublsn = NULL WHERE srrelid = $1::text::regclass",
            &[&table],
        )
        .await
        .unwrap();
    green
        .batch_execute(&format!("ALTER SUBSCRIPTION \"{sub}\" ENABLE"))
        .await
        .unwrap();
    eprintln!("{table} marked finished without its sync slot");
    let marked = Instant::now();
    let started_over = loop {
        let note = h
            .notes(&up)
            .into_iter()
            .find(|u| u.phase == "initial-sync" && u.message.contains("started over"));
        if let Some(note) = note {
            break note.message;
        }
        assert!(
            h.record()
                .attempt
                .is_some_and(|a| a.phase == Phase::InitialSync),
            "the copy ended without starting over: {:#?}",
            h.notes(&up)
        );
        assert!(
            marked.elapsed() < MINUTE,
            "the lost copy was not started over: {:#?}\n{}",
            h.notes(&up),
            copy_diagnostics(&h).await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!("the status: {started_over}");
    assert!(
        started_over.contains(&table) && started_over.contains("lost"),
        "the status does not name {table}: {started_over}"
    );
    h.wait_switched(
        "the switch after the copy started over",
        1,
        &up,
        (Color::Green, 16),
    )
    .await;
    h.stop_load_checked(load).await;
}

/// Each table's sync state and the subscription's error counts on green, the slots and
/// walsenders on blue, and the end of green's server log.
async fn copy_diagnostics(h: &Harness) -> String {
    let admin = h.admin();
    let mut out = String::new();
    for (color, sql) in [
        (
            "green",
            "SELECT srrelid::regclass::text || ' ' || srsubstate FROM pg_subscription_rel",
        ),
        (
            "green",
            "SELECT format('%s sync_errors=%s apply_errors=%s', subname, sync_error_count, apply_error_count) FROM pg_stat_subscription_stats",
        ),
        (
            "green",
            "SELECT format('worker pid=%s rel=%s', pid, relid::regclass) FROM pg_stat_subscription",
        ),
        (
            "blue",
            "SELECT format('slot %s active=%s pid=%s', slot_name, active, active_pid) FROM pg_replication_slots",
        ),
    ] {
        let Some(addr) = h.instance_addr(color) else {
            continue;
        };
        let Ok(client) = connect(&addr, &admin, "app").await else {
            out.push_str(&format!("{color}: not answering\n"));
            continue;
        };
        match client.query(sql, &[]).await {
            Ok(rows) => {
                for row in rows {
                    out.push_str(&format!("{color}: {}\n", row.get::<_, String>(0)));
                }
            }
            Err(e) => out.push_str(&format!("{color}: {e}\n")),
        }
    }
    let log = h.state.dir("instances").join("green/server.log");
    out.push_str(&common::tail(&log, 30));
    out
}

/// Bytes free on the file system at `path`.
fn free_bytes(path: &std::path::Path) -> u64 {
    let fs = nix::sys::statvfs::statvfs(path).unwrap();
    fs.blocks_available() * fs.fragment_size()
}

/// Green's data lives on a file system of its own (a 200 MB tmpfs) that the initial copy
/// fills: the copy is stopped while PostgreSQL can still write, within seconds of the room
/// running out; the attempt ends with a status that says so, green is removed (the room
/// given back), blue serves throughout, nothing is left on blue, nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn green_running_out_of_disk_during_the_copy_ends_the_attempt_and_blue_serves() {
    let (mut h, _app, load) = Harness::serving_15_under_load("copy: logical", 2, 100).await;
    let blue = connect(&h.instance_addr("blue").unwrap(), &h.admin(), "app")
        .await
        .unwrap();
    // About 90 MB: it fits the empty file system (preflight passes), but not with green's
    // own files and the WAL the copy writes.
    common::add_big_table(&blue, 85000).await;
    let green_dir = h.mount_instance_dir("green", "200m");
    h.start(None);
    let up = h.commit_version(16);
    let mut room_ran_out = None;
    let failure = loop {
        if room_ran_out.is_none() && free_bytes(&green_dir) < 64 << 20 {
            room_ran_out = Some(Instant::now());
        }
        if let Some(u) = h
            .notes(&up)
            .into_iter()
            .find(|u| u.state == pgflip_core::report::State::Failure)
        {
            break u;
        }
        if let Some(at) = room_ran_out {
            assert!(
                at.elapsed() < Duration::from_secs(15),
                "the full disk was not noticed: {:#?}\n{}",
                h.notes(&up),
                h.log_tail()
            );
        }
        assert!(
            h.record().history.is_empty(),
            "switched onto a full disk: {:#?}",
            h.notes(&up)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("the status: {}", failure.message);
    assert!(
        failure.message.contains("out of disk space") && failure.message.contains("green"),
        "{}",
        failure.message
    );
    let r = h
        .wait("the attempt ended", MINUTE, |r| r.attempt.is_none())
        .await;
    assert!(r.history.is_empty());
    assert_eq!(
        r.serving.map(|m| (m.color, m.major.0)),
        Some((Color::Blue, 15))
    );
    assert_eq!(h.endpoint_behind().await, ["blue"]);
    assert_eq!(
        h.replication_objects("blue", "app").await,
        Vec::<String>::new(),
        "nothing of the attempt is left on blue"
    );
    assert_eq!(
        std::fs::read_dir(&green_dir).unwrap().count(),
        0,
        "green is removed, its file system emptied"
    );
    h.stop_load_checked(load).await;
}

/// Green stops answering (SIGSTOP) inside the pause, its reverse slot made before it: the
/// pause's bound ends it, clients are back on
/// blue (unfenced) within it although green cannot be told anything. Once green answers
/// again, the next switch first undoes what that rollback could not (the subscription
/// applies again, the stale reverse slot is dropped, so reverse replication starts at the
/// new switch point, not the old one) and completes: nothing lost, and blue takes the
/// reverse stream without an apply error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn green_frozen_inside_the_pause_rolls_back_onto_blue_and_the_switch_completes_later() {
    let (mut h, app, load, up) = stalled_in_the_pause("sequences-synced").await;
    h.signal_server("green", Signal::SIGSTOP);
    let frozen = Instant::now();
    let blue = h.instance_addr("blue").unwrap();
    // Clients run on blue again once the bound has passed, without waiting on green.
    h.served_again(
        &app,
        Some(blue.port),
        frozen,
        Duration::from_millis(500),
        Duration::from_secs(8),
    )
    .await;
    assert_takes_writes(&h, &blue).await;
    stop_after_the_rollback(&mut h).await;
    h.signal_server("green", Signal::SIGCONT);

    h.start(None);
    h.wait_switched("the switch once green answers", 1, &up, (Color::Green, 16))
        .await;
    let report = h.stop_load_checked(load).await;
    eprintln!("{} commits, 0 lost", report.committed);
    // Blue now applies green's writes through the reverse link: from the new switch point
    // (a stream from the earlier pause would repeat rows blue has, and fail on them).
    let blue_app = connect(&blue, &h.admin(), "app").await.unwrap();
    let green_app = connect(&h.instance_addr("green").unwrap(), &h.admin(), "app")
        .await
        .unwrap();
    let count = format!("SELECT count(*) FROM {}", pgflip_engine::load::LEDGER_TABLE);
    let on_green: i64 = green_app.query_one(&count, &[]).await.unwrap().get(0);
    let began = Instant::now();
    loop {
        let on_blue: i64 = blue_app.query_one(&count, &[]).await.unwrap().get(0);
        if on_blue == on_green {
            break;
        }
        assert!(
            began.elapsed() < MINUTE,
            "blue has {on_blue} ledger rows, green {on_green}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let errors: i64 = blue_app
        .query_one(
            "SELECT coalesce(sum(apply_error_count), 0)::bigint FROM pg_stat_subscription_stats",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(errors, 0, "the reverse link applied without errors");
}

/// The endpoint's PgBouncer is killed (SIGKILL) inside the pause, blue fenced: the pause
/// is rolled back (blue unfenced), PgBouncer is started again within seconds pointing at
/// blue (the stored target: the commit point was not reached), and once pgflip runs
/// unarmed the switch completes. Clients connected through the killed PgBouncer see their
/// connections drop (the fault, not pgflip); no acknowledged commit is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbouncer_killed_inside_the_pause_comes_back_on_blue_and_the_switch_completes() {
    let (mut h, app, load, up) = stalled_in_the_pause("fenced").await;
    nix::sys::signal::kill(h.pgbouncer().unwrap(), Signal::SIGKILL).unwrap();
    let killed = Instant::now();
    let blue = h.instance_addr("blue").unwrap();
    let port = h
        .served_again(&app, None, killed, Duration::ZERO, Duration::from_secs(20))
        .await;
    assert_eq!(port, blue.port, "the endpoint points at blue");
    assert_takes_writes(&h, &blue).await;
    let named = h
        .notes(&up)
        .into_iter()
        .find(|u| u.phase == "switchover" && u.message.contains("PgBouncer"));
    assert!(
        named.is_some(),
        "no status names the endpoint: {:#?}",
        h.notes(&up)
    );
    h.kill();

    h.start(None);
    h.wait_switched(
        "the switch after the endpoint came back",
        1,
        &up,
        (Color::Green, 16),
    )
    .await;
    h.stop_load_lossless(load).await;
}

/// Blue's PostgreSQL is SIGKILLed during the initial copy: pgflip notices within seconds,
/// starts blue again (crash recovery keeps every acknowledged commit), the copy resumes
/// from the slots that survived the crash, and the switch completes. Clients see errors
/// while blue is down (the fault); no acknowledged commit is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blue_killed_during_the_copy_is_restarted_and_the_switch_completes() {
    let (h, app, load, up) = copying_16_under_load().await;
    h.kill_server("blue");
    let killed = Instant::now();
    // Served again within seconds: pgflip starts blue again.
    h.served_again(
        &app,
        None,
        killed,
        Duration::from_millis(200),
        Duration::from_secs(20),
    )
    .await;
    h.wait_switched(
        "the switch after blue was killed",
        1,
        &up,
        (Color::Green, 16),
    )
    .await;
    h.stop_load_lossless(load).await;
    let reverse = pgflip_engine::replication::link_name(Color::Green, Color::Blue, "app");
    assert_eq!(
        h.replication_objects("green", "app").await,
        [format!("publication {reverse}"), format!("slot {reverse}")],
        "only the reverse link is left"
    );
}

/// Serving 15 under load, pgflip armed to stall at `switchover:<point>` inside the pause
/// (bound: 2 s), a switch to 16 committed, and the pause begun.
async fn stalled_in_the_pause(point: &str) -> (Harness, Credentials, LoadHandle, String) {
    let (mut h, app, load) =
        Harness::serving_15_under_load("switchover:\n  pauseTimeout: 2s", 2, 100).await;
    h.start(Some(&format!("stall:switchover:{point}")));
    let up = h.commit_version(16);
    h.wait("the pause", 3 * MINUTE, |r| {
        r.attempt
            .as_ref()
            .is_some_and(|a| a.switch_step == Some(SwitchStep::Pausing))
    })
    .await;
    (h, app, load, up)
}

async fn assert_takes_writes(h: &Harness, addr: &Addr) {
    let postgres = connect(addr, &h.admin(), "postgres").await.unwrap();
    assert!(
        !pgflip_engine::fence::is_fenced(&postgres).await.unwrap(),
        "{addr} takes writes again"
    );
}

/// Blue stops answering (SIGSTOP) inside the pause, for longer than the pause's bound: the
/// rollback waits for blue (it must be unfenced before clients are let through, or they
/// would hit a read-only server), so clients are held by the endpoint — not failed — and
/// run on blue again once it answers; then the switch completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blue_frozen_inside_the_pause_holds_clients_then_they_run_on_blue_again() {
    let (mut h, app, load, up) = stalled_in_the_pause("fenced").await;
    h.signal_server("blue", Signal::SIGSTOP);
    tokio::time::sleep(Duration::from_secs(5)).await;
    h.signal_server("blue", Signal::SIGCONT);
    let thawed = Instant::now();
    let blue = h.instance_addr("blue").unwrap();
    h.served_again(
        &app,
        Some(blue.port),
        thawed,
        Duration::ZERO,
        Duration::from_secs(10),
    )
    .await;
    assert_takes_writes(&h, &blue).await;
    stop_after_the_rollback(&mut h).await;
    h.start(None);
    h.wait_switched("the switch after blue froze", 1, &up, (Color::Green, 16))
        .await;
    h.stop_load_checked(load).await;
}

/// Waits until the record counts the rolled-back pause, then stops pgflip (still armed).
async fn stop_after_the_rollback(h: &mut Harness) {
    h.wait("the rollback recorded", MINUTE, |r| {
        r.attempt.as_ref().is_some_and(|a| a.pause_failures >= 1)
    })
    .await;
    h.kill();
}
