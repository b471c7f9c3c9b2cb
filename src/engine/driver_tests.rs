//! The driver's decisions, against in-memory fakes ([`super::fakes`]): no PostgreSQL, no
//! clock but the fake one, milliseconds per test.

use super::driver::{Driver, MAX_PAUSE_FAILURES, MAX_RETRIES, Progress};
use super::fakes::{FakeInstances, FakeRouter, FakeSteps, MemoryJournal, RecordingSink, Scripted};
use super::phases::Phases;
use super::runner::Runner;
use crate::core::plan::{AttemptKind, Color, Member, Phase, Record, SwitchStep, Wanted};
use crate::core::report::State;
use crate::core::revision::Revision;
use crate::core::spec::{self, Desired, Major};
use crate::ports::{Credentials, Observed};
use crate::toolchain::Toolchain;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

type FakeDriver = Driver<FakeSteps, MemoryJournal, RecordingSink>;

struct Harness {
    driver: FakeDriver,
    steps: FakeSteps,
    journal: MemoryJournal,
    sink: RecordingSink,
    clock: Arc<AtomicU64>,
    record: Record,
}

fn desired(major: u32) -> Desired {
    spec::parse(&spec::render("orders", Major(major), "retainPrevious: 1h")).unwrap()
}

fn member(color: Color, major: u32) -> Member {
    Member {
        color,
        major: Major(major),
    }
}

impl Harness {
    fn new() -> Harness {
        Harness::resume(FakeSteps::default(), Record::default())
    }

    /// A driver over `record`, as a restarted pgflip would read it, on the same servers.
    fn resume(steps: FakeSteps, record: Record) -> Harness {
        let journal = MemoryJournal::default();
        let sink = RecordingSink::default();
        let clock = Arc::new(AtomicU64::new(1_000));
        let now = clock.clone();
        let driver = Driver::new(
            steps.clone(),
            journal.clone(),
            sink.clone(),
            Arc::new(move || now.load(Ordering::SeqCst)),
        );
        Harness {
            driver,
            steps,
            journal,
            sink,
            clock,
            record,
        }
    }

    fn want(&mut self, major: u32, revision: i64) {
        self.record.wanted = Some(Wanted {
            revision: Revision::Generation(revision),
            desired: desired(major),
        });
    }

    async fn step(&mut self) -> Progress {
        self.driver.step(&mut self.record).await.unwrap()
    }

    /// Steps until idle (at most `limit` steps), moving the clock a second per step.
    async fn settle(&mut self) -> usize {
        for n in 0..500 {
            self.clock.fetch_add(1_000, Ordering::SeqCst);
            if self.step().await == Progress::Idle {
                return n;
            }
        }
        panic!("the driver did not settle: {:?}", self.record);
    }

    /// Steps until `done` holds for the record (at most 100 steps).
    async fn step_until(&mut self, done: impl Fn(&Record) -> bool) {
        for _ in 0..100 {
            if done(&self.record) {
                return;
            }
            self.clock.fetch_add(1_000, Ordering::SeqCst);
            self.step().await;
        }
        panic!("not reached: {:?}", self.record);
    }

    /// Bootstrapped at 15, then wanting `to`.
    async fn serving_15_wanting(to: u32) -> Harness {
        let mut h = Harness::new();
        h.want(15, 1);
        h.settle().await;
        h.want(to, 2);
        h
    }

    fn calls(&self) -> Vec<String> {
        self.steps.world.lock().unwrap().calls.clone()
    }

    fn runs(&self) -> Vec<String> {
        self.calls()
            .into_iter()
            .filter_map(|c| c.strip_prefix("run:").map(str::to_string))
            .collect()
    }
}

const FULL_ORDER: [&str; 9] = [
    "preflight",
    "provision",
    "copy-schema",
    "replicate",
    "initial-sync",
    "catch-up",
    "verify",
    "switchover",
    "reverse-sync",
];
const SWITCH_BACK_ORDER: [&str; 5] = [
    "preflight",
    "catch-up",
    "verify",
    "switchover",
    "reverse-sync",
];

fn assert_switched(h: &Harness, to: Member, from: Member) {
    assert_eq!(h.record.serving, Some(to));
    assert_eq!(h.record.standby.as_ref().map(|s| s.member), Some(from));
    assert!(h.record.attempt.is_none());
    let w = h.steps.world.lock().unwrap();
    assert_eq!(w.endpoint, Some(to));
    assert_eq!(w.instances, [from, to].into_iter().collect());
    assert_eq!(
        w.links.iter().cloned().collect::<Vec<_>>(),
        vec![format!(
            "{}{}→{}{}",
            to.color, to.major, from.color, from.major
        )],
        "only the reverse link is left"
    );
}

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
    h.step_until(|r| {
        r.attempt
            .as_ref()
            .is_some_and(|a| a.phase == Phase::InitialSync)
    })
    .await;
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
    h.step_until(|r| {
        r.attempt
            .as_ref()
            .is_some_and(|a| a.phase == Phase::CatchUp)
    })
    .await;
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
    h.step_until(|r| {
        r.attempt
            .as_ref()
            .is_some_and(|a| a.phase == Phase::Switchover)
    })
    .await;
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
async fn waiting_phases_ask_to_be_called_back_and_report_progress() {
    let mut h = Harness::serving_15_wanting(16).await;
    h.steps.script(
        Phase::InitialSync,
        &[Scripted::Waiting(20.0), Scripted::Waiting(100.0)],
    );
    let mut afters = 0;
    for _ in 0..100 {
        if h.record
            .attempt
            .as_ref()
            .is_some_and(|a| a.phase == Phase::CatchUp)
        {
            break;
        }
        if let Progress::After(d) = h.step().await {
            assert_eq!(d.as_millis(), 250);
            afters += 1;
        }
    }
    assert_eq!(afters, 2);
    let updates = h.sink.updates.lock().unwrap().clone();
    let progress: Vec<_> = updates
        .iter()
        .filter_map(|(_, u)| u.progress_percent)
        .collect();
    // 20% came within the throttle window of the phase's first report: not published;
    // 100% always is.
    assert_eq!(progress, vec![100.0]);
}

#[tokio::test]
async fn reports_carry_the_time_of_the_clock() {
    let mut h = Harness::new();
    h.clock.store(1_764_000_000_000, Ordering::SeqCst);
    h.want(15, 1);
    h.step().await;
    let at = h.sink.updates.lock().unwrap()[0].1.at.clone();
    assert_eq!(at, "2025-11-24T16:00:00.000Z");
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
    let (steps, journal) = (h.steps.clone(), h.journal.clone());
    *journal.crash_when.lock().unwrap() = Some(Box::new(at));
    let crashed = tokio::spawn(async move {
        let mut h = h;
        h.settle().await;
    })
    .await;
    assert!(crashed.is_err(), "the driver was killed at the step");
    let record = journal.last().unwrap();
    let before = steps.world.lock().unwrap().calls.len();
    let mut restarted = Harness::resume(steps, record);
    restarted.settle().await;
    assert_switched(&restarted, to, from);
    let runs: Vec<_> = restarted.calls()[before..]
        .iter()
        .filter_map(|c| c.strip_prefix("run:").map(str::to_string))
        .collect();
    assert_eq!(runs, rerun, "steps run after the restart");
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
    ($($name:ident: $kind:expr, $phase:expr, $rerun:expr;)*) => {$(
        #[tokio::test]
        async fn $name() {
            crash_resumes($kind, in_phase($phase), &$rerun).await;
        }
    )*};
}

crash_tests! {
    crash_after_recording_preflight: AttemptKind::Full, Phase::Preflight, FULL_ORDER;
    crash_after_recording_provision: AttemptKind::Full, Phase::Provision, FULL_ORDER[1..];
    crash_after_recording_copy_schema: AttemptKind::Full, Phase::CopySchema, FULL_ORDER[2..];
    crash_after_recording_replicate: AttemptKind::Full, Phase::Replicate, FULL_ORDER[3..];
    crash_after_recording_initial_sync: AttemptKind::Full, Phase::InitialSync, FULL_ORDER[4..];
    crash_after_recording_catch_up: AttemptKind::Full, Phase::CatchUp, FULL_ORDER[5..];
    crash_after_recording_verify: AttemptKind::Full, Phase::Verify, FULL_ORDER[6..];
    crash_after_recording_switchover: AttemptKind::Full, Phase::Switchover, FULL_ORDER[7..];
    crash_after_recording_reverse_sync: AttemptKind::Full, Phase::ReverseSync, FULL_ORDER[8..];
    crash_after_recording_done: AttemptKind::Full, Phase::Done, [] as [&str; 0];
    crash_back_after_recording_preflight: AttemptKind::SwitchBack, Phase::Preflight, SWITCH_BACK_ORDER;
    crash_back_after_recording_catch_up: AttemptKind::SwitchBack, Phase::CatchUp, SWITCH_BACK_ORDER[1..];
    crash_back_after_recording_verify: AttemptKind::SwitchBack, Phase::Verify, SWITCH_BACK_ORDER[2..];
    crash_back_after_recording_switchover: AttemptKind::SwitchBack, Phase::Switchover, SWITCH_BACK_ORDER[3..];
    crash_back_after_recording_reverse_sync: AttemptKind::SwitchBack, Phase::ReverseSync, SWITCH_BACK_ORDER[4..];
    crash_back_after_recording_done: AttemptKind::SwitchBack, Phase::Done, [] as [&str; 0];
}

fn in_switch_step(step: SwitchStep) -> impl Fn(&Record) -> bool + Send + 'static {
    move |r| {
        r.attempt
            .as_ref()
            .is_some_and(|a| a.switch_step == Some(step))
    }
}

#[tokio::test]
async fn crash_inside_the_pause_before_the_commit_point() {
    crash_resumes(
        AttemptKind::Full,
        in_switch_step(SwitchStep::Pausing),
        &FULL_ORDER[7..],
    )
    .await;
}

#[tokio::test]
async fn crash_inside_the_pause_after_the_commit_point() {
    crash_resumes(
        AttemptKind::Full,
        in_switch_step(SwitchStep::Repointing),
        &FULL_ORDER[7..],
    )
    .await;
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

fn observed(revision: i64, desired: Result<Desired, String>) -> Observed {
    Observed {
        revision: Revision::Generation(revision),
        name: Some("orders".into()),
        desired,
    }
}

fn runner() -> (
    Runner<FakeSteps, MemoryJournal, RecordingSink>,
    FakeSteps,
    RecordingSink,
) {
    let h = Harness::new();
    (Runner::new(h.driver, Record::default()), h.steps, h.sink)
}

#[tokio::test]
async fn the_runner_adopts_once_then_steps() {
    let (mut runner, steps, _) = runner();
    runner.take(&observed(1, Ok(desired(15)))).await.unwrap();
    for _ in 0..3 {
        runner.step().await.unwrap();
    }
    assert_eq!(steps.world.lock().unwrap().adopted, 1);
    assert_eq!(runner.record().serving, Some(member(Color::Blue, 15)));
}

#[tokio::test]
async fn a_bad_revision_is_reported_once_and_changes_nothing() {
    let (mut runner, _, sink) = runner();
    runner.take(&observed(1, Ok(desired(15)))).await.unwrap();
    let bad = observed(
        2,
        Err("spec.version \"9\": PostgreSQL 9 is not supported".into()),
    );
    runner.take(&bad).await.unwrap();
    runner.take(&bad).await.unwrap();
    let updates = sink.updates.lock().unwrap().clone();
    assert_eq!(updates.len(), 1);
    assert_eq!(updates[0].0, Revision::Generation(2));
    assert!(updates[0].1.message.ends_with("; nothing was changed"));
    assert_eq!(
        runner.record().wanted.as_ref().unwrap().revision,
        Revision::Generation(1)
    );
    assert_eq!(
        runner.record().observed_revision,
        Some(Revision::Generation(2))
    );
}

#[tokio::test]
async fn the_database_and_endpoint_cannot_change_on_a_running_database() {
    let (mut runner, _, sink) = runner();
    runner.take(&observed(1, Ok(desired(15)))).await.unwrap();
    let mut moved = desired(16);
    moved.databases = vec!["other".into()];
    runner.take(&observed(2, Ok(moved))).await.unwrap();
    assert_eq!(
        runner.record().wanted.as_ref().unwrap().desired.major,
        Major(15)
    );
    let updates = sink.updates.lock().unwrap().clone();
    assert!(
        updates[0]
            .1
            .message
            .contains("cannot change on a running database")
    );
}

#[tokio::test]
async fn the_desired_state_is_recorded_as_is_not_as_text() {
    let (mut runner, _, _) = runner();
    let d = desired(17);
    runner.take(&observed(4, Ok(d.clone()))).await.unwrap();
    let json = serde_json::to_string(runner.record()).unwrap();
    let back: Record = serde_json::from_str(&json).unwrap();
    assert_eq!(back.wanted.unwrap().desired, d);
}

fn phases_over_fakes() -> Phases<FakeInstances, FakeRouter> {
    Phases::new(
        FakeInstances::default(),
        FakeRouter::default(),
        Toolchain::discover(),
        Credentials {
            user: "pgflip".into(),
            password: "secret".into(),
        },
    )
}

#[tokio::test]
async fn adopting_starts_what_the_record_says_runs_and_the_endpoint_before_it() {
    use super::driver::Steps;
    use crate::core::plan::Standby;
    let phases = phases_over_fakes();
    let record = Record {
        serving: Some(member(Color::Green, 16)),
        standby: Some(Standby {
            member: member(Color::Blue, 15),
            retain_until_ms: 0,
            serving_fingerprint: String::new(),
        }),
        ..Default::default()
    };
    phases.adopt(&record, &desired(16)).await.unwrap();
    let running = phases.instances().running.lock().unwrap().clone();
    assert_eq!(
        running,
        [member(Color::Green, 16), member(Color::Blue, 15)]
            .into_iter()
            .collect()
    );
    let target = phases.router().target.lock().unwrap().clone().unwrap();
    assert_eq!(
        target.port, 10_161,
        "the endpoint sends clients to the serving green 16"
    );
}

#[tokio::test]
async fn adopting_a_starting_instance_waits() {
    use super::driver::Steps;
    let phases = phases_over_fakes();
    phases
        .instances()
        .starting
        .lock()
        .unwrap()
        .insert(member(Color::Blue, 15));
    let record = Record {
        serving: Some(member(Color::Blue, 15)),
        ..Default::default()
    };
    let err = phases.adopt(&record, &desired(15)).await.unwrap_err();
    assert!(err.is_waiting() && !err.is_final(), "{err}");
    assert!(phases.router().target.lock().unwrap().is_none());
}
