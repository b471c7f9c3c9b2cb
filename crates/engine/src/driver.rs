//! The driver: decide → record → act, one step per call. It owns what is the same for
//! every step — recording before acting, retrying a transient failure, ending an attempt
//! that failed for good, throttling progress reports — and leaves what a step does to the
//! databases to [`Steps`] ([`super::phases::Phases`] over PostgreSQL; an in-memory fake in
//! the tests). Every step is idempotent and the record is saved before it is taken, so a
//! killed pgflip resumes where it stopped.

use super::error::{EngineError, EngineResult};
use super::steps::{Stepped, Steps, learn};
use crate::failpoint;
use crate::ports::{Journal, StatusSink};
use pgflip_core::plan::{Attempt, Decision, Phase, Record, SwitchRecord, decide};
use pgflip_core::progress::ProgressTracker;
use pgflip_core::report::{State, Update};
use pgflip_core::revision::Revision;
use pgflip_core::spec::Desired;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod reports;

/// Consecutive transient failures of one phase after which the attempt fails for good.
pub const MAX_RETRIES: u32 = 5;
/// Pauses that hit their bound after which the attempt fails for good.
pub const MAX_PAUSE_FAILURES: u32 = 3;
/// Pending reports of one phase are published at most this often.
const REPORT_EVERY: Duration = Duration::from_secs(2);
/// How soon to look again at something not ready yet (a pod starting).
const NOT_READY_RECHECK: Duration = Duration::from_secs(1);

/// Whether the caller should call again, and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Call again right away.
    Busy,
    /// Something is under way: call again after this long.
    After(Duration),
    /// Nothing to do until something changes.
    Idle,
}

/// Milliseconds since the Unix epoch. The driver's only clock, so tests can move time.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

pub fn system_clock() -> Clock {
    Arc::new(crate::clock::now_ms)
}

pub struct Driver<S, J, K> {
    steps: S,
    journal: J,
    sink: K,
    clock: Clock,
    /// Consecutive transient failures of the current phase.
    retries: Mutex<u32>,
    /// The last pending report published: (revision, phase), when, and whether it said
    /// 100%.
    last_report: Mutex<Option<(Revision, String, Instant, bool)>>,
    /// The progress of the phase under way: (revision, phase) and what it measured so far.
    tracker: Mutex<Option<(Revision, Phase, ProgressTracker)>>,
}

impl<S: Steps, J: Journal, K: StatusSink> Driver<S, J, K> {
    pub fn new(steps: S, journal: J, sink: K, clock: Clock) -> Self {
        Driver {
            steps,
            journal,
            sink,
            clock,
            retries: Mutex::new(0),
            last_report: Mutex::new(None),
            tracker: Mutex::new(None),
        }
    }

    pub fn steps(&self) -> &S {
        &self.steps
    }
    pub fn journal(&self) -> &J {
        &self.journal
    }
    pub fn sink(&self) -> &K {
        &self.sink
    }
    pub fn now_ms(&self) -> u64 {
        (self.clock)()
    }

    /// Runs one step towards what `record` wants. Something not there yet (a pod starting
    /// during a cleanup, say) is a wait; an error is one the driver could not handle itself
    /// (the record could not be saved, a cleanup failed): the caller tries again later.
    pub async fn step(&self, record: &mut Record) -> EngineResult<Progress> {
        match self.decide_and_act(record).await {
            Err(e) if e.is_waiting() => {
                tracing::debug!("{e}");
                Ok(Progress::After(NOT_READY_RECHECK))
            }
            other => other,
        }
    }

    async fn decide_and_act(&self, record: &mut Record) -> EngineResult<Progress> {
        let Some(wanted) = record.wanted.clone() else {
            return Ok(Progress::Idle);
        };
        let desired = &wanted.desired;
        match decide(record, self.now_ms()) {
            Decision::Idle => Ok(Progress::Idle),
            Decision::Bootstrap { member, revision } => {
                tracing::info!(%member, "bootstrapping");
                let member = match self.steps.bootstrap(member, desired).await {
                    Ok(member) => member,
                    Err(e) if e.is_final() => {
                        // Nothing was touched; the revision is not tried again.
                        let reason = e.to_string();
                        tracing::error!(revision = %revision.short(), kind = e.metric_label(), %reason, "bootstrap refused");
                        self.record(record, |r| {
                            r.failed_revision = Some(revision.clone());
                            r.failed_reason = Some(reason.clone());
                        })
                        .await?;
                        self.report(&revision, Update::failure("bootstrap", &reason))
                            .await;
                        return Ok(Progress::Idle);
                    }
                    Err(e) => {
                        if e.is_waiting() {
                            let update = Update::new(State::Pending, "bootstrap", e.to_string());
                            self.report(&revision, update).await;
                        }
                        return Err(e);
                    }
                };
                self.record(record, |r| {
                    r.serving = Some(member);
                    r.failed_revision = None;
                    r.failed_reason = None;
                })
                .await?;
                self.report(
                    &revision,
                    Update::new(
                        State::Success,
                        "bootstrap",
                        format!("{member} serves on port {}", desired.endpoint_port),
                    ),
                )
                .await;
                Ok(Progress::Busy)
            }
            Decision::Begin(attempt) => {
                tracing::info!(revision = %attempt.revision.short(), from = %attempt.from, to = %attempt.to, kind = ?attempt.kind, "starting");
                let update = Update::new(
                    State::Pending,
                    Phase::Preflight.as_str(),
                    format!(
                        "{} {} → {} started",
                        attempt.direction(),
                        attempt.from,
                        attempt.to
                    ),
                )
                .between(attempt.from.major, attempt.to.major);
                let revision = attempt.revision.clone();
                *self.retries.lock().unwrap() = 0;
                self.record(record, |r| r.attempt = Some(attempt)).await?;
                self.report(&revision, update).await;
                Ok(Progress::Busy)
            }
            Decision::Abandon { attempt, reason } => {
                self.abandon(record, &attempt, desired, &reason).await?;
                Ok(Progress::Busy)
            }
            Decision::Fail { attempt, reason } => {
                self.finish_failure(record, &attempt, desired, reason)
                    .await?;
                Ok(Progress::Busy)
            }
            Decision::Decommission {
                serving,
                standby,
                reason,
            } => {
                tracing::info!(%reason, "decommissioning {}", standby.member);
                self.steps
                    .decommission(serving, &standby.member, desired)
                    .await?;
                self.record(record, |r| r.standby = None).await?;
                Ok(Progress::Busy)
            }
            Decision::Run(attempt) => {
                failpoint::hit(&format!("before:{}", attempt.phase));
                if attempt.phase == Phase::Done {
                    self.finish(record, &attempt).await?;
                    return Ok(Progress::Busy);
                }
                let run = self.steps.run(&attempt, desired, record, &self.journal);
                let result = self.reporting_live(&attempt, run).await;
                self.after_phase(record, &attempt, desired, result).await
            }
        }
    }

    async fn after_phase(
        &self,
        record: &mut Record,
        ran: &Attempt,
        desired: &Desired,
        result: EngineResult<Stepped>,
    ) -> EngineResult<Progress> {
        let phase = ran.phase;
        if record.attempt.is_none() {
            return Ok(Progress::Busy);
        }
        let between = |u: Update| u.between(ran.from.major, ran.to.major);
        match result {
            Ok(Stepped::Done(learned)) => {
                *self.retries.lock().unwrap() = 0;
                let now = self.now_ms();
                let next = phase.next(ran.kind);
                self.record(record, |r| {
                    learn(r, learned);
                    if let Some(attempt) = r.attempt.as_mut() {
                        attempt.enter(next, now);
                    }
                })
                .await?;
                tracing::info!(phase = %next, "phase");
                if let Some(done) = self.finish_tracking(&ran.revision, phase) {
                    let message = format!("{} done", phase.as_str().replace('-', " "));
                    let update = Update::new(State::Pending, phase.as_str(), message);
                    // Once per phase: not throttled.
                    self.publish(&ran.revision, between(update).with_progress(Some(done)))
                        .await;
                }
                if next != Phase::Done {
                    let message = next.as_str().replace('-', " ");
                    self.report(
                        &ran.revision,
                        between(Update::new(State::Pending, next.as_str(), message)),
                    )
                    .await;
                }
                Ok(Progress::Busy)
            }
            Ok(Stepped::Waiting {
                message,
                measured,
                recheck,
            }) => {
                let progress = measured.map(|m| self.track(&ran.revision, phase, m));
                let update = between(Update::new(State::Pending, phase.as_str(), message))
                    .with_progress(progress);
                if self.due(&ran.revision, &update) {
                    // Kept in the record too (throttled like the report): `pgflip status`,
                    // the object's status and the metrics read it there.
                    if progress.is_some() {
                        self.record(record, |r| {
                            if let Some(a) = r.attempt.as_mut() {
                                a.progress = progress;
                            }
                        })
                        .await?;
                    }
                    self.publish(&ran.revision, update).await;
                }
                Ok(Progress::After(recheck))
            }
            Err(e) if e.is_waiting() => {
                self.report(
                    &ran.revision,
                    between(Update::new(State::Pending, phase.as_str(), e.to_string())),
                )
                .await;
                Ok(Progress::After(NOT_READY_RECHECK))
            }
            Err(aborted @ EngineError::PauseAborted { .. }) => {
                let now = self.now_ms();
                let n = ran.pause_failures + 1;
                self.record(record, |r| {
                    if let Some(attempt) = r.attempt.as_mut() {
                        attempt.pause_failures = n;
                        attempt.enter(Phase::CatchUp, now);
                    }
                })
                .await?;
                if n >= MAX_PAUSE_FAILURES {
                    let gave_up = EngineError::PauseGaveUp {
                        last: Box::new(aborted),
                        times: n,
                    };
                    self.fail(record, desired, gave_up).await?;
                    return Ok(Progress::Busy);
                }
                self.report(
                    &ran.revision,
                    between(Update::failure(
                        Phase::Switchover.as_str(),
                        format!("{aborted}; retrying"),
                    )),
                )
                .await;
                Ok(Progress::After(Duration::from_secs(u64::from(n))))
            }
            Err(e) if e.is_final() => {
                self.fail(record, desired, e).await?;
                Ok(Progress::Busy)
            }
            Err(e) => {
                let n = {
                    let mut r = self.retries.lock().unwrap();
                    *r += 1;
                    *r
                };
                tracing::warn!(phase = %phase, attempt = n, kind = e.metric_label(), error = %e, "step failed, retrying");
                // Said on the commit at once (not throttled): a fault is news.
                let retrying = Update::new(
                    State::Pending,
                    phase.as_str(),
                    format!("{e}; retrying ({n}/{MAX_RETRIES})"),
                );
                self.publish(&ran.revision, between(retrying)).await;
                if n >= MAX_RETRIES {
                    *self.retries.lock().unwrap() = 0;
                    let exhausted = EngineError::RetriesExhausted {
                        phase,
                        times: n,
                        last: Box::new(e),
                    };
                    self.fail(record, desired, exhausted).await?;
                    return Ok(Progress::Busy);
                }
                Ok(Progress::After(Duration::from_millis(500 * u64::from(n))))
            }
        }
    }

    /// The attempt failed for good: recorded as failing first (so an interrupted cleanup
    /// resumes as a cleanup), then cleaned up ([`Self::finish_failure`]).
    async fn fail(
        &self,
        record: &mut Record,
        desired: &Desired,
        error: EngineError,
    ) -> EngineResult<()> {
        let Some(attempt) = record.attempt.clone() else {
            return Ok(());
        };
        let reason = error.to_string();
        tracing::error!(revision = %attempt.revision.short(), kind = error.metric_label(), %reason, "attempt failed");
        self.record(record, |r| {
            if let Some(a) = r.attempt.as_mut() {
                a.failure = Some(reason.clone());
            }
        })
        .await?;
        self.finish_failure(record, &attempt, desired, reason).await
    }

    /// Cleans up after a failed attempt, keeps the source serving, tells the revision.
    async fn finish_failure(
        &self,
        record: &mut Record,
        attempt: &Attempt,
        desired: &Desired,
        reason: String,
    ) -> EngineResult<()> {
        if !attempt.is_committed(record.serving) || record.serving == Some(attempt.from) {
            self.steps.clean_up(attempt, desired).await?;
        }
        self.record(record, |r| {
            r.attempt = None;
            r.failed_revision = Some(attempt.revision.clone());
            r.failed_reason = Some(reason.clone());
        })
        .await?;
        self.report_failure(attempt, &reason).await;
        Ok(())
    }

    /// What wanted all this is gone (the object deleted): an attempt that has not switched
    /// is abandoned — its slots, publications and green removed, blue serving untouched —
    /// so nothing is left holding WAL. One that switched is left to a new owner.
    pub async fn release(&self, record: &mut Record, reason: &str) -> EngineResult<()> {
        let (Some(attempt), Some(wanted)) = (record.attempt.clone(), record.wanted.clone()) else {
            return Ok(());
        };
        if attempt.is_committed(record.serving) {
            return Ok(());
        }
        self.abandon(record, &attempt, &wanted.desired, reason)
            .await
    }

    /// Drops an attempt that has not switched: cleaned up, forgotten, the revision told why.
    async fn abandon(
        &self,
        record: &mut Record,
        attempt: &Attempt,
        desired: &Desired,
        reason: &str,
    ) -> EngineResult<()> {
        tracing::info!(%reason, "abandoning attempt");
        self.steps.clean_up(attempt, desired).await?;
        self.record(record, |r| r.attempt = None).await?;
        self.report_failure(attempt, reason).await;
        Ok(())
    }

    async fn report_failure(&self, attempt: &Attempt, reason: &str) {
        let update = Update::failure(attempt.phase.as_str(), reason)
            .between(attempt.from.major, attempt.to.major);
        self.report(&attempt.revision, update).await;
    }

    /// The attempt reached Done: into the history, and success on its revision.
    async fn finish(&self, record: &mut Record, attempt: &Attempt) -> EngineResult<()> {
        let m = attempt.switch.clone().unwrap_or_default();
        let tables = attempt.verified_tables.unwrap_or(0);
        let finished = SwitchRecord {
            revision: attempt.revision.clone(),
            from: attempt.from,
            to: attempt.to,
            kind: attempt.kind,
            finished_ms: self.now_ms(),
            total_ms: attempt.timings_ms.values().sum(),
            pause_ms: m.pause_ms,
            verified_tables: tables,
            pause_breakdown: m.clone(),
            timings_ms: attempt.timings_ms.clone(),
            copy: attempt.copy.clone(),
            carried_bytes: attempt.carried_bytes,
        };
        self.record(record, |r| {
            r.history.push(finished);
            r.attempt = None;
            r.failed_revision = None;
            r.failed_reason = None;
        })
        .await?;
        let plural = if tables == 1 { "" } else { "s" };
        let mut message = format!(
            "{} now serves; pause {:.1} ms; {tables} table{plural} verified",
            attempt.to, m.pause_ms,
        );
        if let Some(copy) = &attempt.copy {
            message.push_str(&format!("; {copy}"));
        }
        if !attempt.left_behind.is_empty() {
            message.push_str(&format!(
                "; left behind (unsupported: warn): {}",
                attempt.left_behind.join("; ")
            ));
        }
        let mut u = Update::new(State::Success, Phase::Done.as_str(), message)
            .between(attempt.from.major, attempt.to.major);
        u.pause_ms = Some(m.pause_ms);
        u.verified_tables = attempt.verified_tables;
        u.left_behind = attempt.left_behind.clone();
        u.timings_ms = attempt.timings_ms.clone();
        self.report(&attempt.revision, u).await;
        Ok(())
    }

    /// Records a change: saved first, then made in memory, so that what the next step
    /// acts on is always what the journal holds.
    async fn record(
        &self,
        record: &mut Record,
        change: impl FnOnce(&mut Record),
    ) -> EngineResult<()> {
        let mut next = record.clone();
        change(&mut next);
        self.journal.save(&next).await.map_err(EngineError::from)?;
        *record = next;
        Ok(())
    }
}
