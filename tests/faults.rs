//! Faults, reached directly rather than through a crash: the pause's rollback after an
//! error inside the pause, and after the pause's bound expires once blue is fenced.

mod common;

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
    // Frozen before the next pause (the retry waits a second, then catches up and
    // verifies again).
    h.kill();
    let notes = h.notes(&up);
    assert!(
        notes
            .iter()
            .any(|u| u.message.contains("switchover aborted") && u.message.contains(cause)),
        "no status names the rollback ({cause}): {notes:#?}"
    );

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
