//! The runner both modes loop around: take what the source observed, adopt what runs
//! (once), then step. Local mode calls it after every look at the branch; the Kubernetes
//! controller from each reconcile of the object.

use super::driver::{Driver, Progress};
use super::error::EngineResult;
use super::intake;
use super::steps::Steps;
use crate::ports::{Journal, Observed, StatusSink};
use pgflip_core::plan::Record;
use std::time::Duration;

/// How soon to try adopting again what is not there yet.
const ADOPT_RECHECK: Duration = Duration::from_secs(1);

pub struct Runner<S, J, K> {
    driver: Driver<S, J, K>,
    record: Record,
    /// Whether what runs (instances, endpoint) has been started or adopted since start-up.
    adopted: bool,
}

impl<S: Steps, J: Journal, K: StatusSink> Runner<S, J, K> {
    /// A runner over `record`, as last saved in the journal.
    pub fn new(driver: Driver<S, J, K>, mut record: Record) -> Self {
        // A record of pgflip 0.1 has no phase start: the attempt's start stands in.
        if let Some(a) = record.attempt.as_mut()
            && a.phase_started_ms == 0
        {
            a.phase_started_ms = a.started_ms;
        }
        Runner {
            driver,
            record,
            adopted: false,
        }
    }

    pub fn record(&self) -> &Record {
        &self.record
    }
    pub fn driver(&self) -> &Driver<S, J, K> {
        &self.driver
    }

    /// Takes a revision: its desired state becomes the target if valid (a bad one is
    /// reported once and changes nothing).
    pub async fn take(&mut self, observed: &Observed) -> EngineResult<()> {
        intake::take_revision(
            observed,
            &mut self.record,
            self.driver.journal(),
            self.driver.sink(),
        )
        .await
    }

    /// One step towards the target; first, once, starts or adopts what runs (instances
    /// and the endpoint outlive pgflip), and again whenever one of them has died.
    pub async fn step(&mut self) -> EngineResult<Progress> {
        if self.adopted
            && let Some(wanted) = &self.record.wanted
            && !self
                .driver
                .steps()
                .still_up(&self.record, &wanted.desired)
                .await?
        {
            self.adopted = false;
        }
        if !self.adopted
            && let Some(wanted) = &self.record.wanted
        {
            match self
                .driver
                .steps()
                .adopt(&self.record, &wanted.desired)
                .await
            {
                Ok(()) => self.adopted = true,
                // A pod still starting: adopted on a later step.
                Err(e) if e.is_waiting() => return Ok(Progress::After(ADOPT_RECHECK)),
                Err(e) => return Err(e),
            }
        }
        self.driver.step(&mut self.record).await
    }

    /// The owner is gone: abandons an attempt that has not switched (see
    /// [`Driver::release`]).
    pub async fn release(&mut self, reason: &str) -> EngineResult<()> {
        self.driver.release(&mut self.record, reason).await
    }
}
