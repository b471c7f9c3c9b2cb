//! What a step is: the [`Steps`] the driver drives (the phases over PostgreSQL, or a fake
//! in the tests), what one pass of a phase achieved ([`Stepped`]) and what a completed
//! phase learned ([`Learned`]), kept in the record.

use crate::error::EngineResult;
use crate::ports::Journal;
use pgflip_core::plan::{Attempt, CopyChoice, Member, Record, Standby, SwitchMeasurement};
use pgflip_core::progress::Measured;
use pgflip_core::spec::Desired;
use std::future::Future;
use std::time::Duration;

/// What each step does to the databases.
pub trait Steps: Send + Sync {
    /// Starts or adopts what runs after a restart: the serving and standby instances, the
    /// target of an attempt under way, and the endpoint.
    fn adopt(
        &self,
        record: &Record,
        desired: &Desired,
    ) -> impl Future<Output = EngineResult<()>> + Send;
    /// Creates the first instance (or takes the server the user runs) and the endpoint in
    /// front of it; returns the member that serves (`member`, or the user's server's major).
    fn bootstrap(
        &self,
        member: Member,
        desired: &Desired,
    ) -> impl Future<Output = EngineResult<Member>> + Send;
    /// Runs one pass of `attempt`'s current phase. The switchover records its sub-steps
    /// (and the switch itself) in `record` through `journal` as it goes.
    fn run<J: Journal>(
        &self,
        attempt: &Attempt,
        desired: &Desired,
        record: &mut Record,
        journal: &J,
    ) -> impl Future<Output = EngineResult<Stepped>> + Send;
    /// Drops what an attempt that never switched created; the source keeps serving.
    fn clean_up(
        &self,
        attempt: &Attempt,
        desired: &Desired,
    ) -> impl Future<Output = EngineResult<()>> + Send;
    /// What the step under way has measured so far (a message and bytes), while it runs:
    /// for steps that take long in one go.
    fn live_progress(&self) -> Option<(String, Measured)> {
        None
    }
    /// Whether what [`Steps::adopt`] started still runs: the serving and standby
    /// instances and the endpoint (any may have died; adopting again restarts them).
    fn still_up(
        &self,
        _record: &Record,
        _desired: &Desired,
    ) -> impl Future<Output = EngineResult<bool>> + Send {
        async { Ok(true) }
    }
    /// Ends reverse replication to the standby and removes it.
    fn decommission(
        &self,
        serving: Member,
        standby: &Member,
        desired: &Desired,
    ) -> impl Future<Output = EngineResult<()>> + Send;
}

/// What one pass of a phase achieved.
#[derive(Debug, Clone, PartialEq)]
pub enum Stepped {
    /// The phase is complete; what it learned goes into the attempt.
    Done(Learned),
    /// Still under way (initial sync, the lag gate): look again after `recheck`. What
    /// was measured, if anything, becomes progress in bytes, rate and time left.
    Waiting {
        message: String,
        measured: Option<Measured>,
        recheck: Duration,
    },
}

/// What a completed phase learned, kept in the attempt (or the record) for later phases.
#[derive(Debug, Clone, PartialEq)]
pub enum Learned {
    Nothing,
    /// Preflight passed with these warnings (what is handled or not carried over, said
    /// loudly) and, under `unsupported: warn`, what is left behind (for the final status).
    Preflight {
        warnings: Vec<String>,
        left_behind: Vec<String>,
        /// How green gets its first copy (None: nothing is copied, as for a switch back).
        copy: Option<CopyChoice>,
        /// The size of what is carried (tables, TOAST, indexes) in all databases.
        carried_bytes: u64,
    },
    /// The schema was copied from a source with this fingerprint (a later change blocks
    /// the switch); a physical copy also stopped right before `cut_lsn`.
    SchemaCopied {
        source_fingerprint: String,
        cut_lsn: Option<String>,
    },
    /// Green matched blue at one consistent cut.
    Verified {
        tables: u64,
    },
    /// Clients were moved; the old source is now the standby in reverse sync.
    Switched {
        measurement: Option<SwitchMeasurement>,
        standby: Standby,
    },
}

/// Keeps what a completed phase learned.
pub(crate) fn learn(record: &mut Record, learned: Learned) {
    let Some(attempt) = record.attempt.as_mut() else {
        return;
    };
    match learned {
        Learned::Nothing => {}
        Learned::Preflight {
            warnings,
            left_behind,
            copy,
            carried_bytes,
        } => {
            attempt.warnings = warnings;
            attempt.left_behind = left_behind;
            attempt.copy = copy;
            attempt.carried_bytes = Some(carried_bytes);
        }
        Learned::SchemaCopied {
            source_fingerprint,
            cut_lsn,
        } => {
            attempt.source_fingerprint = Some(source_fingerprint);
            if let Some(copy) = attempt.copy.as_mut() {
                copy.cut_lsn = cut_lsn;
            }
        }
        Learned::Verified { tables } => attempt.verified_tables = Some(tables),
        Learned::Switched {
            measurement,
            standby,
        } => {
            if measurement.is_some() {
                attempt.switch = measurement;
            }
            record.standby = Some(standby);
        }
    }
}
