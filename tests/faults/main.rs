//! Faults, reached directly rather than through a crash: the pause's rollback after an
//! error inside the pause, and after the pause's bound expires once blue is fenced; the
//! Git remote gone mid-switch; the branch force-pushed under a switch. The servers'
//! own faults (killed, frozen, out of disk) are in [`servers`].

#[path = "../common/mod.rs"]
mod common;
mod servers;

use common::{Harness, MINUTE};
use pgflip_core::plan::Color;
use pgflip_engine::pg::connect;
use pgflip_engine::replication::link_name;
use std::time::Duration;

/// Switches 15 → 16 under load with `failpoint` armed inside the pause; after the first
/// pause is rolled back, pgflip is stopped and the servers are read as the rollback left
/// them: blue takes writes again, the forward subscription is enabled, the reverse slot is
/// gone, and clients run on blue within the bound. Then pgflip runs again, unarmed, and
/// switches; the load lost nothing.
async fn rolled_back_inside_the_pause(failpoint: &str, extra_spec: &str, cause: &str) {
    let (mut h, app, load) = Harness::serving_15_under_load(extra_spec, 2, 100).await;
    h.start(Some(failpoint));
    let up = h.commit_version(16);
    h.wait("the first pause rolled back", 3 * MINUTE, |r| {
        r.attempt.as_ref().is_some_and(|a| a.pause_failures >= 1)
    })
    .await;
    // The status follows the record (a moment later, on a loaded machine).
    let names_it = |u: &pgflip_core::report::Update| {
        u.message.contains("switchover aborted") && u.message.contains(cause)
    };
    let noted = std::time::Instant::now();
    while !h.notes(&up).iter().any(names_it) {
        assert!(
            noted.elapsed() < Duration::from_secs(10),
            "no status names the rollback ({cause}): {:#?}",
            h.notes(&up)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Frozen before the next pause (the retry waits a second, then catches up and
    // verifies again).
    h.kill();

    let admin = h.admin();
    let blue = h.instance_addr("blue").unwrap();
    let green = h.instance_addr("green").unwrap();
    let blue_postgres = connect(&blue, &admin, "postgres").await.unwrap();
    assert!(
        !pgflip_engine::fence::is_fenced(&blue_postgres)
            .await
            .unwrap(),
        "blue takes writes again"
    );
    let green_app = connect(&green, &admin, "app").await.unwrap();
    let forward = link_name(Color::Blue, Color::Green, "app");
    let enabled: bool = green_app
        .query_one(
            "SELECT subenabled FROM pg_subscription WHERE subname = $1",
            &[&forward],
        )
        .await
        .unwrap()
        .get(0);
    assert!(enabled, "the forward subscription is enabled again");
    let reverse = link_name(Color::Green, Color::Blue, "app");
    let reverse_slots: i64 = green_app
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
            &[&reverse],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(reverse_slots, 0, "the reverse slot is gone");
    let port = tokio::time::timeout(Duration::from_secs(2), h.serving_port(&app))
        .await
        .expect("clients are not held: the endpoint answers within the bound");
    assert_eq!(port, blue.port, "clients run on blue");

    h.start(None);
    h.wait_switched("the switch after the rollback", 1, &up, (Color::Green, 16))
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    h.stop_load_checked(load).await;
}

/// An error inside the pause after the reverse slot is made and sequences are carried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_inside_the_pause_rolls_back_onto_blue() {
    rolled_back_inside_the_pause("error:switchover:sequences-synced", "", "injected error").await;
}

/// The pause's bound expiring once blue is fenced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pause_bound_expiring_after_the_fence_rolls_back_onto_blue() {
    rolled_back_inside_the_pause(
        "stall:switchover:fenced",
        "switchover:\n  pauseTimeout: 500ms",
        "the pause reached its bound",
    )
    .await;
}

/// The Git remote goes away in the middle of a switch: the switch is not held up by it
/// (the revision was taken already) and completes under load; its notes reach the remote
/// once the remote is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_git_remote_does_not_hold_a_switch() {
    let mut h = Harness::with_remote("databases: [app]\nretainPrevious: 1h");
    h.commit_version(15);
    h.start(None);
    h.wait("bootstrap", MINUTE, |r| r.serving.is_some()).await;
    let app = h.load_sample().await;
    let load = h.load(&app, 2, 100);
    let up = h.commit_version(16);
    h.wait("the switch began", MINUTE, |r| {
        r.attempt
            .as_ref()
            .is_some_and(|a| a.phase >= pgflip_core::plan::Phase::CopySchema)
    })
    .await;
    let remote = h.remote.clone().unwrap();
    let away = remote.with_extension("away");
    std::fs::rename(&remote, &away).unwrap();
    assert!(
        h.record().attempt.is_some(),
        "the switch was still under way when the remote went"
    );
    let r = h
        .wait("the switch, remote gone", 3 * MINUTE, |r| {
            r.history.len() == 1 && r.attempt.is_none()
        })
        .await;
    assert_eq!(
        r.serving.map(|m| (m.color, m.major.0)),
        Some((Color::Green, 16))
    );
    assert!(
        h.log_tail().contains("could not read the repository"),
        "the remote was gone: {}",
        h.log_tail()
    );
    std::fs::rename(&away, &remote).unwrap();
    // The notes written meanwhile are pushed once it is back.
    h.wait_switched(
        "the notes after the remote came back",
        1,
        &up,
        (Color::Green, 16),
    )
    .await;
    h.stop_load_checked(load).await;
}

/// The branch is force-pushed during a switch so that the commit being switched to is no
/// longer on it, and the new head asks for the version that serves: pgflip follows the
/// branch, as for any new commit — the attempt is superseded, its green removed, blue
/// keeps serving, nothing is lost and nothing is left on blue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_force_push_that_drops_the_commit_supersedes_the_switch() {
    let (mut h, _app, load) = Harness::serving_15_under_load("", 2, 100).await;
    h.start(None);
    let base = git2::Repository::open(&h.repo)
        .unwrap()
        .head()
        .unwrap()
        .peel_to_commit()
        .unwrap()
        .id();
    let up = h.commit_version(16);
    h.wait("the switch began", MINUTE, |r| {
        r.attempt
            .as_ref()
            .is_some_and(|a| a.phase >= pgflip_core::plan::Phase::InitialSync)
    })
    .await;
    // A commit on <base> replaces the branch in one ref update, as `git push --force`
    // does: the branch never shows <base> itself in between.
    let text = h
        .document(15)
        .replace("retainPrevious: 1h", "retainPrevious: 2h");
    let head = common::commit_onto(&h.repo, "refs/heads/main", &base.to_string(), &text);
    let r = h
        .wait("the attempt superseded", 2 * MINUTE, |r| {
            r.attempt.is_none()
        })
        .await;
    assert_eq!(
        r.serving.map(|m| (m.color, m.major.0)),
        Some((Color::Blue, 15))
    );
    assert!(r.history.is_empty(), "nothing was switched");
    let dropped = h.wait_final_note(&up, MINUTE).await;
    assert!(
        dropped.message.contains("superseded") && dropped.message.contains(&head[..7]),
        "{dropped:?}"
    );
    assert!(!h.instance_exists("green"), "green is removed");
    assert_eq!(
        h.replication_objects("blue", "app").await,
        Vec::<String>::new()
    );
    assert_eq!(h.endpoint_behind().await, ["blue"]);
    h.stop_load_checked(load).await;
}
