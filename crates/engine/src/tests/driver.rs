//! Retries, abandoning, superseding, failing, retention: the driver's decisions.

use super::fakes::Scripted;
use super::{FULL_ORDER, Harness, SWITCH_BACK_ORDER, assert_switched, member};
use crate::driver::{MAX_PAUSE_FAILURES, MAX_RETRIES, Progress};
use pgflip_core::plan::{AttemptKind, Color, Phase, SwitchStep};
use pgflip_core::report::State;
use pgflip_core::revision::Revision;
use pgflip_core::spec::Major;
use std::sync::atomic::Ordering;

#[tokio::test]
async fn nothing_wanted_is_idle() {
    let mut h = Harness::new();
    assert_eq!(h.step().await, Progress::Idle);
    assert!(h.journal.saved.lock().unwrap().is_empty());
}

#[tokio::test]
async fn bootstrap_creates_blue_and_reports_success() {
    let mut h = Harness::new();
    h.want(15, 1);
    assert_eq!(h.step().await, Progress::Busy);
    assert_eq!(h.record.serving, Some(member(Color::Blue, 15)));
    assert_eq!(h.journal.last().unwrap().serving, h.record.serving);
    assert_eq!(h.sink.states(), vec!["success bootstrap"]);
    assert_eq!(h.step().await, Progress::Idle);
}

#[tokio::test]
async fn an_upgrade_runs_every_phase_in_order_once() {
    let mut h = Harness::serving_15_wanting(16).await;
    h.settle().await;
    assert_eq!(h.runs(), FULL_ORDER);
    assert_switched(&h, member(Color::Green, 16), member(Color::Blue, 15));
    assert_eq!(h.record.history.len(), 1);
    assert_eq!(h.record.history[0].verified_tables, 3);
    assert_eq!(h.record.history[0].revision, Revision::Generation(2));
    let states = h.sink.states();
    assert_eq!(states.last().unwrap(), "success done");
    assert!(!states.iter().any(|s| s.starts_with("failure")));
}

#[tokio::test]
async fn every_recorded_phase_has_a_timing() {
    let mut h = Harness::serving_15_wanting(16).await;
    h.settle().await;
    let timings = &h.record.history[0].timings_ms;
    for phase in FULL_ORDER {
        assert!(
            timings.get(phase).is_some_and(|ms| *ms > 0),
            "{phase}: {timings:?}"
        );
    }
}

#[tokio::test]
async fn a_revert_within_retention_switches_back_without_a_copy() {
    let mut h = Harness::serving_15_wanting(16).await;
    h.settle().await;
    h.want(15, 3);
    let before = h.runs().len();
    h.settle().await;
    assert_eq!(h.runs()[before..], SWITCH_BACK_ORDER);
    assert_switched(&h, member(Color::Blue, 15), member(Color::Green, 16));
    assert_eq!(h.record.history[1].kind, AttemptKind::SwitchBack);
}

#[tokio::test]
async fn a_downgrade_is_a_full_attempt_too() {
    let mut h = Harness::new();
    h.want(17, 1);
    h.settle().await;
    h.want(16, 2);
    h.settle().await;
    assert_eq!(h.runs(), FULL_ORDER);
    assert_switched(&h, member(Color::Green, 16), member(Color::Blue, 17));
    let first = &h.sink.updates.lock().unwrap()[1].1;
    assert!(first.message.starts_with("downgrade"), "{}", first.message);
}

#[tokio::test]
async fn transient_failures_are_retried_with_growing_backoff() {
    let mut h = Harness::serving_15_wanting(16).await;
    h.steps.script(
        Phase::InitialSync,
        &[Scripted::Transient, Scripted::Transient],
    );
    let mut waits = Vec::new();
    for _ in 0..200 {
        match h.step().await {
            Progress::After(d) => waits.push(d.as_millis()),
            Progress::Idle => break,
            Progress::Busy => {}
        }
    }
    assert_eq!(waits, vec![500, 1000]);
    assert_switched(&h, member(Color::Green, 16), member(Color::Blue, 15));
    assert_eq!(h.runs().iter().filter(|r| *r == "initial-sync").count(), 3);
}

#[tokio::test]
async fn a_phase_failing_every_time_fails_the_attempt() {
    let mut h = Harness::serving_15_wanting(16).await;
    h.steps.script(
        Phase::Replicate,
        &[Scripted::Transient; MAX_RETRIES as usize],
    );
    h.settle().await;
    assert_eq!(h.record.serving, Some(member(Color::Blue, 15)));
    assert_eq!(h.record.failed_revision, Some(Revision::Generation(2)));
    let reason = h.record.failed_reason.clone().unwrap();
    assert!(reason.contains("replicate failed 5 times"), "{reason}");
    assert!(h.calls().contains(&"clean_up".to_string()));
    let w = h.steps.world.lock().unwrap();
    assert!(w.links.is_empty(), "{:?}", w.links);
    assert_eq!(w.instances, [member(Color::Blue, 15)].into_iter().collect());
    assert_eq!(w.endpoint, Some(member(Color::Blue, 15)));
}

#[tokio::test]
async fn retries_are_counted_per_phase_not_per_attempt() {
    let mut h = Harness::serving_15_wanting(16).await;
    let four = [Scripted::Transient; MAX_RETRIES as usize - 1];
    h.steps.script(Phase::Provision, &four);
    h.steps.script(Phase::Replicate, &four);
    h.steps.script(Phase::Verify, &four);
    h.settle().await;
    assert_switched(&h, member(Color::Green, 16), member(Color::Blue, 15));
}

#[tokio::test]
async fn a_final_error_fails_at_once_and_cleans_up() {
    let mut h = Harness::serving_15_wanting(16).await;
    h.steps.script(Phase::Preflight, &[Scripted::Refused]);
    h.settle().await;
    assert_eq!(h.runs(), vec!["preflight"]);
    assert_eq!(h.calls().last().unwrap(), "clean_up");
    let last = h.sink.updates.lock().unwrap().last().unwrap().1.clone();
    assert_eq!(last.state, State::Failure);
    assert!(
        last.message
            .contains("preflight refused: app: unlogged table")
    );
    assert_eq!(h.record.serving, Some(member(Color::Blue, 15)));
}

#[tokio::test]
async fn a_failed_revision_is_not_retried_but_a_new_one_is() {
    let mut h = Harness::serving_15_wanting(16).await;
    h.steps.script(Phase::Preflight, &[Scripted::Refused]);
    h.settle().await;
    let saved = h.journal.saved.lock().unwrap().len();
    assert_eq!(h.step().await, Progress::Idle);
    assert_eq!(
        h.journal.saved.lock().unwrap().len(),
        saved,
        "nothing recorded"
    );
    h.want(16, 3);
    h.settle().await;
    assert_switched(&h, member(Color::Green, 16), member(Color::Blue, 15));
    assert_eq!(
        h.record.failed_revision, None,
        "a success clears the failure"
    );
}

#[tokio::test]
async fn a_new_target_supersedes_an_attempt_before_the_switch() {
    let mut h = Harness::serving_15_wanting(16).await;
    h.steps
        .script(Phase::InitialSync, &[Scripted::Waiting(40.0)]);
    h.step_until_phase(Phase::InitialSync).await;
    h.want(17, 3);
    h.settle().await;
    let updates = h.sink.updates.lock().unwrap().clone();
    assert!(updates.iter().any(|(r, u)| *r == Revision::Generation(2)
        && u.state == State::Failure
        && u.message.contains("superseded by revision generation 3")));
    assert_switched(&h, member(Color::Green, 17), member(Color::Blue, 15));
    assert_eq!(h.record.history.len(), 1);
    assert_eq!(h.record.history[0].to.major, Major(17));
}

#[tokio::test]
async fn a_revert_before_the_switch_abandons_and_leaves_blue_alone() {
    let mut h = Harness::serving_15_wanting(16).await;
    h.step_until_phase(Phase::CatchUp).await;
    h.want(15, 3);
    h.settle().await;
    assert_eq!(h.record.serving, Some(member(Color::Blue, 15)));
    assert!(h.record.attempt.is_none() && h.record.standby.is_none());
    let w = h.steps.world.lock().unwrap();
    assert_eq!(w.instances, [member(Color::Blue, 15)].into_iter().collect());
    assert!(w.links.is_empty());
}

#[tokio::test]
async fn a_switchover_under_way_is_finished_even_when_superseded() {
    let mut h = Harness::serving_15_wanting(16).await;
    h.step_until_phase(Phase::Switchover).await;
    // As a pgflip killed right after recording the start of the pause leaves it.
    h.record.attempt.as_mut().unwrap().switch_step = Some(SwitchStep::Pausing);
    h.want(17, 3);
    h.step().await;
    assert_eq!(h.record.serving, Some(member(Color::Green, 16)));
    h.settle().await;
    // 16 finished, then 15 (the standby, not 17) made room, then 16 → 17.
    assert!(
        h.calls()
            .contains(&"decommission:blue (PostgreSQL 15)".to_string())
    );
    assert_switched(&h, member(Color::Blue, 17), member(Color::Green, 16));
    assert_eq!(h.record.history.len(), 2);
}

#[tokio::test]
async fn a_switchover_waiting_before_its_pause_is_superseded() {
    let mut h = Harness::serving_15_wanting(16).await;
    // Waiting for clients connected to blue directly to go: nothing moved yet.
    h.steps
        .script(Phase::Switchover, &[Scripted::Waiting(0.0); 3]);
    h.step_until_phase(Phase::Switchover).await;
    h.step().await;
    assert_eq!(h.record.serving, Some(member(Color::Blue, 15)));
    h.want(15, 3);
    h.settle().await;
    assert!(
        h.calls().contains(&"clean_up".to_string()),
        "{:?}",
        h.calls()
    );
    assert_eq!(h.record.serving, Some(member(Color::Blue, 15)));
    assert!(h.record.attempt.is_none());
    let w = h.steps.world.lock().unwrap();
    assert_eq!(w.instances, [member(Color::Blue, 15)].into_iter().collect());
    assert!(w.links.is_empty());
}

#[tokio::test]
async fn a_refused_first_sight_fails_its_revision_once_and_touches_nothing() {
    let mut h = Harness::new();
    h.script_bootstrap([Scripted::Refused]);
    h.want(15, 1);
    assert_eq!(h.step().await, Progress::Idle);
    assert_eq!(h.record.serving, None);
    assert_eq!(h.record.failed_revision, Some(Revision::Generation(1)));
    assert!(
        h.sink.states() == vec!["failure bootstrap"],
        "{:?}",
        h.sink.states()
    );
    assert!(
        h.sink.updates.lock().unwrap()[0]
            .1
            .message
            .contains("wal_level")
    );
    // Not tried again for the same revision; a new one is.
    assert_eq!(h.step().await, Progress::Idle);
    assert_eq!(h.calls().len(), 1);
    h.want(15, 2);
    h.settle().await;
    assert_eq!(h.record.serving, Some(member(Color::Blue, 15)));
    assert_eq!(h.record.failed_revision, None);
}

#[tokio::test]
async fn a_server_not_answering_on_first_sight_is_waited_for_with_a_status() {
    let mut h = Harness::new();
    h.script_bootstrap([Scripted::NotReady, Scripted::NotReady]);
    h.want(15, 1);
    assert!(matches!(h.step().await, Progress::After(_)));
    assert_eq!(h.sink.states(), vec!["pending bootstrap"]);
    assert!(
        h.sink.updates.lock().unwrap()[0]
            .1
            .message
            .contains("does not answer yet")
    );
    h.settle().await;
    assert_eq!(h.record.serving, Some(member(Color::Blue, 15)));
}

#[tokio::test]
async fn the_server_serving_today_is_taken_at_its_own_major() {
    let mut h = Harness::new();
    h.steps.world.lock().unwrap().serving_today = Some(Major(15));
    h.want(17, 1);
    h.settle().await;
    // Served as it is first, then moved to 17.
    assert!(h.calls()[0].starts_with("bootstrap:"));
    assert_switched(&h, member(Color::Green, 17), member(Color::Blue, 15));
}

#[tokio::test]
async fn a_rolled_back_pause_goes_back_to_the_lag_gate() {
    let mut h = Harness::serving_15_wanting(16).await;
    h.steps.script(Phase::Switchover, &[Scripted::PauseAborted]);
    let mut after = None;
    for _ in 0..100 {
        if h.record
            .attempt
            .as_ref()
            .is_some_and(|a| a.pause_failures > 0)
        {
            break;
        }
        if let Progress::After(d) = h.step().await {
            after = Some(d);
        }
    }
    assert_eq!(h.record.attempt.as_ref().unwrap().phase, Phase::CatchUp);
    assert_eq!(after.unwrap().as_secs(), 1);
    let last = h.sink.updates.lock().unwrap().last().unwrap().1.clone();
    assert!(last.message.contains("clients resumed on blue") && last.message.ends_with("retrying"));
    h.settle().await;
    assert_switched(&h, member(Color::Green, 16), member(Color::Blue, 15));
}

#[tokio::test]
async fn pauses_rolled_back_too_often_fail_the_attempt() {
    let mut h = Harness::serving_15_wanting(16).await;
    h.steps.script(
        Phase::Switchover,
        &[Scripted::PauseAborted; MAX_PAUSE_FAILURES as usize],
    );
    h.settle().await;
    assert_eq!(h.record.serving, Some(member(Color::Blue, 15)));
    let reason = h.record.failed_reason.clone().unwrap();
    assert!(reason.ends_with("(3 times; giving up)"), "{reason}");
    assert!(h.steps.world.lock().unwrap().links.is_empty());
}

#[tokio::test]
async fn not_ready_is_a_wait_not_a_failure() {
    let mut h = Harness::serving_15_wanting(16).await;
    h.steps.script(
        Phase::Provision,
        &[Scripted::NotReady; 3 * MAX_RETRIES as usize],
    );
    h.settle().await;
    assert_switched(&h, member(Color::Green, 16), member(Color::Blue, 15));
    assert!(h.sink.states().iter().all(|s| !s.starts_with("failure")));
}

#[tokio::test]
async fn retention_ends_with_the_standby_removed() {
    let mut h = Harness::serving_15_wanting(16).await;
    h.settle().await;
    // The fake switchover retains forever: give it an hour from now.
    h.record.standby.as_mut().unwrap().retain_until_ms = h.driver.now_ms() + 3_600_000;
    assert_eq!(h.step().await, Progress::Idle);
    h.clock.fetch_add(3_600_000, Ordering::SeqCst);
    assert_eq!(h.step().await, Progress::Busy);
    assert!(h.record.standby.is_none());
    let w = h.steps.world.lock().unwrap();
    assert_eq!(
        w.instances,
        [member(Color::Green, 16)].into_iter().collect()
    );
    assert!(w.links.is_empty());
}

#[tokio::test]
async fn a_third_major_first_removes_the_standby() {
    let mut h = Harness::serving_15_wanting(16).await;
    h.settle().await;
    h.want(18, 3);
    h.settle().await;
    let calls = h.calls();
    let decommission = calls
        .iter()
        .position(|c| c.starts_with("decommission"))
        .unwrap();
    let begin = calls.iter().rposition(|c| c == "run:preflight").unwrap();
    assert!(decommission < begin);
    assert_switched(&h, member(Color::Blue, 18), member(Color::Green, 16));
}

#[tokio::test]
async fn nothing_happens_when_the_journal_cannot_be_written() {
    let mut h = Harness::serving_15_wanting(16).await;
    *h.journal.fail.lock().unwrap() = true;
    let err = h.driver.step(&mut h.record).await.unwrap_err();
    assert_eq!(err.metric_label(), "other");
    assert!(h.record.attempt.is_none(), "not begun unless recorded");
    assert!(h.runs().is_empty());
    *h.journal.fail.lock().unwrap() = false;
    h.settle().await;
    assert_switched(&h, member(Color::Green, 16), member(Color::Blue, 15));
}

#[tokio::test]
async fn each_step_is_recorded_before_the_next_acts_on_it() {
    let mut h = Harness::serving_15_wanting(16).await;
    h.settle().await;
    let saved = h.journal.saved.lock().unwrap().clone();
    let phases: Vec<_> = saved
        .iter()
        .filter_map(|r| r.attempt.as_ref().map(|a| a.phase.as_str()))
        .collect();
    for (i, phase) in FULL_ORDER.iter().enumerate() {
        let first = phases.iter().position(|p| p == phase).unwrap();
        if i > 0 {
            let before = phases.iter().position(|p| *p == FULL_ORDER[i - 1]).unwrap();
            assert!(
                before < first,
                "{phase} recorded before {}",
                FULL_ORDER[i - 1]
            );
        }
    }
    assert_eq!(saved.last().unwrap(), &h.record);
}

#[tokio::test]
async fn an_interrupted_cleanup_resumes_as_a_cleanup() {
    let mut h = Harness::serving_15_wanting(16).await;
    h.steps.script(Phase::Provision, &[Scripted::Refused]);
    h.steps.world.lock().unwrap().clean_ups_not_ready = 2;
    h.settle().await;
    assert_eq!(
        h.runs(),
        vec!["preflight", "provision"],
        "the failed phase is not rerun"
    );
    let clean_ups = h.calls().iter().filter(|c| *c == "clean_up").count();
    assert_eq!(clean_ups, 3);
    assert_eq!(h.record.failed_revision, Some(Revision::Generation(2)));
    assert!(h.steps.world.lock().unwrap().instances.len() == 1);
}

#[tokio::test]
async fn a_pause_with_no_endpoint_to_pause_is_a_wait() {
    let mut h = Harness::serving_15_wanting(16).await;
    h.steps.script(
        Phase::Switchover,
        &[Scripted::NotReady; MAX_PAUSE_FAILURES as usize + 1],
    );
    h.settle().await;
    assert_switched(&h, member(Color::Green, 16), member(Color::Blue, 15));
    assert_eq!(h.record.history[0].pause_breakdown.pause_ms, 0.0);
}
