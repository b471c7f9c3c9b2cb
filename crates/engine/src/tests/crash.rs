//! A kill right after every recorded step: the restarted driver finishes the attempt,
//! running again only the step that was recorded and not finished.

use super::fakes::Scripted;
use super::{FULL_ORDER, Harness, SWITCH_BACK_ORDER, assert_switched, member};
use pgflip_core::plan::{AttemptKind, Color, Phase, Record, SwitchStep};
use pgflip_core::revision::Revision;

/// Runs `h` until the first save that recorded `at` and kills it right there, then
/// restarts a driver on the same servers from the journal and lets it settle. Returns it,
/// with how many calls the servers had seen before the restart.
async fn killed_and_restarted(
    h: Harness,
    at: impl Fn(&Record) -> bool + Send + 'static,
) -> (Harness, usize) {
    let (steps, journal) = (h.steps.clone(), h.journal.clone());
    *journal.crash_when.lock().unwrap() = Some(Box::new(at));
    let crashed = tokio::spawn(async move {
        let mut h = h;
        h.settle().await;
    })
    .await;
    assert!(crashed.is_err(), "the driver was killed at the step");
    let before = steps.world.lock().unwrap().calls.len();
    let mut restarted = Harness::resume(steps, journal.last().unwrap());
    restarted.settle().await;
    (restarted, before)
}

/// Kills the driver right after the first save that recorded `at`, restarts it on the
/// same servers from the journal, and checks that it finishes the attempt, running again
/// only the step that was recorded and not finished.
async fn crash_resumes(
    kind: AttemptKind,
    at: impl Fn(&Record) -> bool + Send + 'static,
    rerun: &[&str],
) {
    let (h, to, from, switches) = match kind {
        AttemptKind::Full => (
            Harness::serving_15_wanting(16).await,
            member(Color::Green, 16),
            member(Color::Blue, 15),
            1,
        ),
        AttemptKind::SwitchBack => {
            let mut h = Harness::serving_15_wanting(16).await;
            h.settle().await;
            h.want(15, 3);
            (h, member(Color::Blue, 15), member(Color::Green, 16), 2)
        }
    };
    let (restarted, before) = killed_and_restarted(h, at).await;
    assert_switched(&restarted, to, from);
    assert_eq!(
        restarted.runs_since(before),
        rerun,
        "steps run after the restart"
    );
    assert_eq!(restarted.record.history.len(), switches);
}

fn in_phase(phase: Phase) -> impl Fn(&Record) -> bool + Send + 'static {
    move |r| {
        r.attempt
            .as_ref()
            .is_some_and(|a| a.phase == phase && a.switch_step.is_none())
    }
}

macro_rules! crash_tests {
    ($($name:ident: $kind:expr, $at:expr, $rerun:expr;)*) => {$(
        #[tokio::test]
        async fn $name() {
            crash_resumes($kind, $at, &$rerun).await;
        }
    )*};
}

crash_tests! {
    crash_after_recording_preflight: AttemptKind::Full, in_phase(Phase::Preflight), FULL_ORDER;
    crash_after_recording_provision: AttemptKind::Full, in_phase(Phase::Provision), FULL_ORDER[1..];
    crash_after_recording_copy_schema: AttemptKind::Full, in_phase(Phase::CopySchema), FULL_ORDER[2..];
    crash_after_recording_replicate: AttemptKind::Full, in_phase(Phase::Replicate), FULL_ORDER[3..];
    crash_after_recording_initial_sync: AttemptKind::Full, in_phase(Phase::InitialSync), FULL_ORDER[4..];
    crash_after_recording_catch_up: AttemptKind::Full, in_phase(Phase::CatchUp), FULL_ORDER[5..];
    crash_after_recording_verify: AttemptKind::Full, in_phase(Phase::Verify), FULL_ORDER[6..];
    crash_after_recording_switchover: AttemptKind::Full, in_phase(Phase::Switchover), FULL_ORDER[7..];
    crash_after_recording_reverse_sync: AttemptKind::Full, in_phase(Phase::ReverseSync), FULL_ORDER[8..];
    crash_after_recording_done: AttemptKind::Full, in_phase(Phase::Done), [] as [&str; 0];
    crash_back_after_recording_preflight: AttemptKind::SwitchBack, in_phase(Phase::Preflight), SWITCH_BACK_ORDER;
    crash_back_after_recording_catch_up: AttemptKind::SwitchBack, in_phase(Phase::CatchUp), SWITCH_BACK_ORDER[1..];
    crash_back_after_recording_verify: AttemptKind::SwitchBack, in_phase(Phase::Verify), SWITCH_BACK_ORDER[2..];
    crash_back_after_recording_switchover: AttemptKind::SwitchBack, in_phase(Phase::Switchover), SWITCH_BACK_ORDER[3..];
    crash_back_after_recording_reverse_sync: AttemptKind::SwitchBack, in_phase(Phase::ReverseSync), SWITCH_BACK_ORDER[4..];
    crash_back_after_recording_done: AttemptKind::SwitchBack, in_phase(Phase::Done), [] as [&str; 0];
    crash_inside_the_pause_before_the_commit_point: AttemptKind::Full, in_switch_step(SwitchStep::Pausing), FULL_ORDER[7..];
    crash_inside_the_pause_after_the_commit_point: AttemptKind::Full, in_switch_step(SwitchStep::Repointing), FULL_ORDER[7..];
}

fn in_switch_step(step: SwitchStep) -> impl Fn(&Record) -> bool + Send + 'static {
    move |r| {
        r.attempt
            .as_ref()
            .is_some_and(|a| a.switch_step == Some(step))
    }
}

#[tokio::test]
async fn crash_after_the_switch_before_the_standby_is_recorded() {
    // The switch itself recorded (serving is green), the phase not yet completed.
    crash_resumes(
        AttemptKind::Full,
        |r: &Record| {
            r.serving == Some(member(Color::Green, 16))
                && r.attempt
                    .as_ref()
                    .is_some_and(|a| a.phase == Phase::Switchover)
        },
        &FULL_ORDER[7..],
    )
    .await;
}

#[tokio::test]
async fn crash_after_beginning_before_any_phase_ran() {
    crash_resumes(
        AttemptKind::Full,
        |r: &Record| r.attempt.as_ref().is_some_and(|a| a.timings_ms.is_empty()),
        &FULL_ORDER,
    )
    .await;
}

#[tokio::test]
async fn crash_after_recording_a_failure_finishes_the_cleanup() {
    let h = Harness::serving_15_wanting(16).await;
    h.steps.script(Phase::Verify, &[Scripted::Refused]);
    let (restarted, before) = killed_and_restarted(h, |r: &Record| {
        r.attempt.as_ref().is_some_and(|a| a.failure.is_some())
    })
    .await;
    assert_eq!(restarted.calls()[before..], ["clean_up"]);
    assert_eq!(restarted.record.serving, Some(member(Color::Blue, 15)));
    assert_eq!(
        restarted.record.failed_revision,
        Some(Revision::Generation(2))
    );
    assert!(restarted.record.attempt.is_none());
    let w = restarted.steps.world.lock().unwrap();
    assert_eq!(w.instances, [member(Color::Blue, 15)].into_iter().collect());
    assert!(w.links.is_empty());
}
