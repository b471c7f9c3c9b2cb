//! The driver's decisions, against in-memory fakes ([`fakes`]): no PostgreSQL, no clock
//! but the fake one, milliseconds per test. [`driver`]: retries, abandoning, superseding,
//! failing; [`crash`]: a kill after every recorded step; [`runner`]: taking revisions and
//! adopting.

mod crash;
mod driver;
mod fakes;
mod reports;
mod runner;

use super::driver::{Driver, Progress};
use fakes::{FakeSteps, MemoryJournal, RecordingSink, Scripted};
use pgflip_core::plan::{Color, Member, Phase, Record, Wanted};
use pgflip_core::revision::Revision;
use pgflip_core::spec::{self, Desired, Major};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

pub(super) type FakeDriver = Driver<FakeSteps, MemoryJournal, RecordingSink>;

pub(super) struct Harness {
    pub(super) driver: FakeDriver,
    pub(super) steps: FakeSteps,
    pub(super) journal: MemoryJournal,
    pub(super) sink: RecordingSink,
    pub(super) clock: Arc<AtomicU64>,
    pub(super) record: Record,
}

pub(super) fn desired(major: u32) -> Desired {
    spec::parse(&spec::render("orders", Major(major), "retainPrevious: 1h")).unwrap()
}

pub(super) fn member(color: Color, major: u32) -> Member {
    Member {
        color,
        major: Major(major),
    }
}

impl Harness {
    pub(super) fn new() -> Harness {
        Harness::resume(FakeSteps::default(), Record::default())
    }

    /// A driver over `record`, as a restarted pgflip would read it, on the same servers.
    pub(super) fn resume(steps: FakeSteps, record: Record) -> Harness {
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

    /// What the next first sights (bootstraps) of the fake servers answer, in order.
    pub(super) fn script_bootstrap(&self, answers: impl IntoIterator<Item = Scripted>) {
        self.steps
            .world
            .lock()
            .unwrap()
            .bootstrap_script
            .extend(answers);
    }

    pub(super) fn want(&mut self, major: u32, revision: i64) {
        self.record.wanted = Some(Wanted {
            revision: Revision::Generation(revision),
            desired: desired(major),
        });
    }

    pub(super) async fn step(&mut self) -> Progress {
        self.driver.step(&mut self.record).await.unwrap()
    }

    /// Steps until idle (at most `limit` steps), moving the clock a second per step.
    pub(super) async fn settle(&mut self) -> usize {
        for n in 0..500 {
            self.clock.fetch_add(1_000, Ordering::SeqCst);
            if self.step().await == Progress::Idle {
                return n;
            }
        }
        panic!("the driver did not settle: {:?}", self.record);
    }

    /// Steps until `done` holds for the record (at most 100 steps).
    pub(super) async fn step_until(&mut self, done: impl Fn(&Record) -> bool) {
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
    pub(super) async fn serving_15_wanting(to: u32) -> Harness {
        let mut h = Harness::new();
        h.want(15, 1);
        h.settle().await;
        h.want(to, 2);
        h
    }

    pub(super) fn calls(&self) -> Vec<String> {
        self.steps.world.lock().unwrap().calls.clone()
    }

    pub(super) fn runs(&self) -> Vec<String> {
        self.runs_since(0)
    }

    /// The phases run since the servers had seen `calls` calls.
    pub(super) fn runs_since(&self, calls: usize) -> Vec<String> {
        self.calls()[calls..]
            .iter()
            .filter_map(|c| c.strip_prefix("run:").map(str::to_string))
            .collect()
    }

    /// Steps until the attempt is in `phase`.
    pub(super) async fn step_until_phase(&mut self, phase: Phase) {
        self.step_until(|r| r.attempt.as_ref().is_some_and(|a| a.phase == phase))
            .await
    }
}

pub(super) const FULL_ORDER: [&str; 9] = [
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
pub(super) const SWITCH_BACK_ORDER: [&str; 5] = [
    "preflight",
    "catch-up",
    "verify",
    "switchover",
    "reverse-sync",
];

pub(super) fn assert_switched(h: &Harness, to: Member, from: Member) {
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
