//! The driver's reports: throttled pending updates, progress tracked per phase, and
//! publishing (a sink's failure is never the switch's).

use super::{Driver, REPORT_EVERY};
use crate::ports::{Journal, StatusSink};
use crate::steps::Steps;
use pgflip_core::plan::{Attempt, Phase};
use pgflip_core::progress::{Measured, Progress as ProgressReport, ProgressTracker};
use pgflip_core::report::{State, Update};
use pgflip_core::revision::Revision;
use std::time::{Duration, Instant};

/// How often a long step's measured progress is looked at.
const LIVE_LOOK_EVERY: Duration = Duration::from_millis(250);

impl<S: Steps, J: Journal, K: StatusSink> Driver<S, J, K> {
    /// Publishes an update; pending updates of one phase at most every [`REPORT_EVERY`].
    pub async fn report(&self, revision: &Revision, update: Update) {
        if self.due(revision, &update) {
            self.publish(revision, update).await;
        }
    }

    /// Whether `update` is to be published now: always a final one or a phase's first or
    /// last (100%), a pending one of the same phase at most every [`REPORT_EVERY`].
    pub(super) fn due(&self, revision: &Revision, update: &Update) -> bool {
        if update.state != State::Pending {
            return true;
        }
        let complete = update.progress_percent == Some(100.0);
        let mut last = self.last_report.lock().unwrap();
        // A phase's first 100% always goes out; the same 100% again (tables copied but not
        // all streaming yet) waits its turn like any other figure.
        if let Some((r, phase, at, was_complete)) = last.as_ref()
            && r == revision
            && *phase == update.phase
            && at.elapsed() < REPORT_EVERY
            && (!complete || *was_complete)
        {
            return false;
        }
        *last = Some((
            revision.clone(),
            update.phase.clone(),
            Instant::now(),
            complete,
        ));
        true
    }

    /// Awaits a step, reporting what it has measured so far ([`Steps::live_progress`])
    /// while it runs, at most every [`REPORT_EVERY`] (a base backup, a verification: one pass that
    /// takes long).
    pub(super) async fn reporting_live<T>(
        &self,
        attempt: &Attempt,
        run: impl std::future::Future<Output = T>,
    ) -> T {
        let mut run = std::pin::pin!(run);
        // Looked at often (a lock), published as throttled as any pending update.
        let mut tick = tokio::time::interval(LIVE_LOOK_EVERY);
        tick.tick().await;
        loop {
            tokio::select! {
                done = &mut run => return done,
                _ = tick.tick() => {
                    let Some((message, measured)) = self.steps.live_progress() else {
                        continue;
                    };
                    let progress = self.track(&attempt.revision, attempt.phase, measured);
                    let update = Update::new(State::Pending, attempt.phase.as_str(), message)
                        .between(attempt.from.major, attempt.to.major)
                        .with_progress(Some(progress));
                    self.report(&attempt.revision, update).await;
                }
            }
        }
    }

    /// The phase's progress from what it measured now (a new tracker for a new phase).
    pub(super) fn track(
        &self,
        revision: &Revision,
        phase: Phase,
        measured: Measured,
    ) -> ProgressReport {
        let mut tracker = self.tracker.lock().unwrap();
        let same = matches!(tracker.as_ref(), Some((r, p, _)) if r == revision && *p == phase);
        if !same {
            *tracker = Some((revision.clone(), phase, ProgressTracker::default()));
        }
        let (_, _, t) = tracker.as_mut().expect("set above");
        t.observe(self.now_ms(), measured)
    }

    /// A measured phase that completed: its last figures, all done.
    pub(super) fn finish_tracking(
        &self,
        revision: &Revision,
        phase: Phase,
    ) -> Option<ProgressReport> {
        let mut tracker = self.tracker.lock().unwrap();
        match tracker.take() {
            Some((r, p, mut t)) if &r == revision && p == phase => Some(t.finish(self.now_ms())),
            other => {
                *tracker = other;
                None
            }
        }
    }

    /// Publishes an update. A sink failure is logged, never fatal: the databases matter
    /// more than the report.
    pub(super) async fn publish(&self, revision: &Revision, mut update: Update) {
        update.at = crate::clock::rfc3339_ms(self.now_ms());
        tracing::info!(revision = %revision.short(), state = update.state.as_str(), phase = %update.phase, "{}", update.message);
        if let Err(e) = self.sink.publish(revision, &update).await {
            tracing::warn!(error = %format!("{e:#}"), "could not publish the status");
        }
    }
}
