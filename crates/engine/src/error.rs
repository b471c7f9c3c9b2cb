//! How an engine step goes wrong. [`EngineError::is_final`] tells the driver whether the
//! attempt ends (cleaned up, blue keeps serving, the revision not retried) or the step is
//! tried again; [`EngineError::metric_label`] names the kind in the error metrics.

use crate::ports::{Unusable, is_not_ready};
use pgflip_core::plan::{Member, Phase};
use pgflip_core::spec::Major;
use std::time::Duration;

/// Below this many bytes free on the target's file system, a copy stops: PostgreSQL needs
/// room for a WAL segment and a checkpoint to keep running at all, and a server that hits
/// "no space left" mid-copy fails its table copies over and over (or stops).
pub const MIN_FREE_BYTES: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Preflight found what cannot be carried over (or a switch back that cannot be taken).
    #[error("preflight refused: {}", .0.join("; "))]
    Refused(Vec<String>),
    /// Tools the switch needs (in either direction) are not installed: one line each,
    /// naming the tool and what needs it. Found by preflight, so nothing was touched.
    #[error(
        "tools missing, nothing was touched: {}; {}, then push a new commit to try again",
        .0.join("; "),
        crate::toolchain::SETUP_HINT_ALL
    )]
    ToolMissing(Vec<String>),
    /// The schema (or the roles) of the source does not load on the target's major.
    #[error("{what} of {from} do not load on PostgreSQL {to}: {detail}")]
    SchemaDoesNotLoad {
        what: &'static str,
        from: Member,
        to: Major,
        detail: String,
    },
    /// DDL ran on the source after its schema was copied (or, for a switch back, after
    /// the switch onto it): the switch is blocked.
    #[error(
        "the schema on {source_member} changed after {} (DDL is not replicated): the switch is blocked and {source_member} keeps serving; {}",
        if *.switch_back { "the switch onto it" } else { "it was copied" },
        if *.switch_back {
            "the way back now needs a new copy, which a new commit starts once the previous version is no longer retained (retainPrevious)"
        } else {
            "push a new commit to start over"
        }
    )]
    SchemaChanged {
        source_member: Member,
        switch_back: bool,
    },
    /// The target did not get within `maxLagBytes` in time.
    #[error("{target} did not catch up within {timeout:?} (still {behind_bytes} bytes behind)")]
    CatchUpTimeout {
        target: Member,
        timeout: Duration,
        behind_bytes: i64,
    },
    /// The target's file system is (nearly) full during the copy: the attempt ends and
    /// its target is removed, which gives the room back.
    #[error(
        "{target} is out of disk space during {phase}: {} free, less than the {} it needs to go on; the attempt is abandoned and {target} removed, the source keeps serving (make room, then push a new commit)",
        pgflip_core::progress::bytes(*.free_bytes),
        pgflip_core::progress::bytes(crate::error::MIN_FREE_BYTES)
    )]
    OutOfSpace {
        target: Member,
        phase: Phase,
        free_bytes: u64,
    },
    /// The consistent comparison found differences.
    #[error(
        "the physical copy held {held_bytes} bytes of WAL on {source_member}, more than switchover.maxRetainedWalBytes ({bound_bytes}): abandoned and its replication slots dropped; {source_member} keeps serving (raise the bound, or set copy: logical)"
    )]
    RetainedWalBound {
        source_member: Member,
        held_bytes: i64,
        bound_bytes: u64,
    },
    #[error("verification failed in database {database}: {}", .mismatches.join("; "))]
    VerificationMismatch {
        database: String,
        mismatches: Vec<String>,
    },
    /// The pause did not reach its commit point; clients were resumed on the source.
    #[error("switchover aborted, clients resumed on {source_member}: {cause}")]
    PauseAborted {
        source_member: Member,
        cause: PauseAbortCause,
    },
    /// The pause was aborted too often: the attempt gives up.
    #[error("{last} ({times} times; giving up)")]
    PauseGaveUp { last: Box<EngineError>, times: u32 },
    /// A transient failure repeated until the attempt gave up on it.
    #[error("{phase} failed {times} times: {last}")]
    RetriesExhausted {
        phase: Phase,
        times: u32,
        last: Box<EngineError>,
    },
    /// A link's initial copy could not finish by itself and was started over (a retry).
    #[error("the initial copy of database {database} on {target} started over: {why}")]
    CopyStartedOver {
        target: Member,
        database: String,
        why: String,
    },
    /// An adapter waits for something that is not there yet (a pod starting): no failure.
    #[error("waiting: {0:#}")]
    NotReady(anyhow::Error),
    /// PostgreSQL refused or dropped a statement or connection.
    #[error("PostgreSQL: {0:#}")]
    Postgres(anyhow::Error),
    /// Anything else from an adapter or the machine (a file, a process, the API server).
    #[error("{0:#}")]
    Other(anyhow::Error),
}

/// Why a pause was rolled back.
#[derive(Debug, thiserror::Error)]
pub enum PauseAbortCause {
    #[error("could not pause the endpoint within {bound:?}: {detail}")]
    EndpointDidNotPause { bound: Duration, detail: String },
    #[error("the pause reached its bound of {0:?}")]
    BoundReached(Duration),
    #[error("{0}")]
    Failed(String),
}

impl EngineError {
    /// Whether the attempt ends here rather than the step being tried again.
    pub fn is_final(&self) -> bool {
        match self {
            EngineError::Refused(_)
            | EngineError::ToolMissing(_)
            | EngineError::SchemaDoesNotLoad { .. }
            | EngineError::SchemaChanged { .. }
            | EngineError::CatchUpTimeout { .. }
            | EngineError::RetainedWalBound { .. }
            | EngineError::OutOfSpace { .. }
            | EngineError::VerificationMismatch { .. }
            | EngineError::PauseGaveUp { .. }
            | EngineError::RetriesExhausted { .. } => true,
            EngineError::PauseAborted { .. }
            | EngineError::CopyStartedOver { .. }
            | EngineError::NotReady(_)
            | EngineError::Postgres(_)
            | EngineError::Other(_) => false,
        }
    }

    /// Whether this is a wait, not a failure (no retry is counted, nothing is logged loudly).
    pub fn is_waiting(&self) -> bool {
        matches!(self, EngineError::NotReady(_))
    }

    /// The `kind` label of the error metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            EngineError::Refused(_) => "refused",
            EngineError::ToolMissing(_) => "tool_missing",
            EngineError::SchemaDoesNotLoad { .. } => "schema_does_not_load",
            EngineError::SchemaChanged { .. } => "schema_changed",
            EngineError::CatchUpTimeout { .. } => "catch_up_timeout",
            EngineError::RetainedWalBound { .. } => "retained_wal_bound",
            EngineError::OutOfSpace { .. } => "out_of_space",
            EngineError::VerificationMismatch { .. } => "verification_mismatch",
            EngineError::PauseAborted { .. } => "pause_aborted",
            EngineError::PauseGaveUp { .. } => "pause_gave_up",
            EngineError::RetriesExhausted { .. } => "retries_exhausted",
            EngineError::CopyStartedOver { .. } => "copy_started_over",
            EngineError::NotReady(_) => "not_ready",
            EngineError::Postgres(_) => "postgres",
            EngineError::Other(_) => "other",
        }
    }
}

impl From<anyhow::Error> for EngineError {
    /// Sorts an adapter's or a helper's error by what it carries.
    fn from(e: anyhow::Error) -> Self {
        if is_not_ready(&e) {
            EngineError::NotReady(e)
        } else if let Some(Unusable(reasons)) = e.chain().find_map(|c| c.downcast_ref::<Unusable>())
        {
            EngineError::Refused(reasons.clone())
        } else if e
            .chain()
            .any(|c| c.downcast_ref::<tokio_postgres::Error>().is_some())
        {
            EngineError::Postgres(e)
        } else {
            EngineError::Other(e)
        }
    }
}

impl From<tokio_postgres::Error> for EngineError {
    fn from(e: tokio_postgres::Error) -> Self {
        EngineError::Postgres(e.into())
    }
}

pub type EngineResult<T> = Result<T, EngineError>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::NotReady;
    use pgflip_core::plan::Color;

    #[test]
    fn adapter_errors_are_sorted_by_what_they_carry() {
        let waiting: EngineError =
            anyhow::Error::from(NotReady("pod db-green-0 is not Ready".into()))
                .context("ensuring green")
                .into();
        assert!(waiting.is_waiting() && !waiting.is_final());
        assert_eq!(waiting.metric_label(), "not_ready");
        let other: EngineError = anyhow::anyhow!("disk full").into();
        assert_eq!(other.metric_label(), "other");
        assert!(!other.is_final());
    }

    #[test]
    fn final_errors_say_why() {
        let m = Member {
            color: Color::Blue,
            major: Major(15),
        };
        let refused = EngineError::Refused(vec!["app: unlogged table public.t".into()]);
        assert!(refused.is_final());
        assert_eq!(
            refused.to_string(),
            "preflight refused: app: unlogged table public.t"
        );
        let aborted = EngineError::PauseAborted {
            source_member: m,
            cause: PauseAbortCause::BoundReached(Duration::from_millis(500)),
        };
        assert!(!aborted.is_final());
        assert!(
            aborted
                .to_string()
                .contains("clients resumed on blue (PostgreSQL 15)")
        );
        let gave_up = EngineError::PauseGaveUp {
            last: Box::new(aborted),
            times: 3,
        };
        assert!(gave_up.is_final());
        assert!(gave_up.to_string().ends_with("(3 times; giving up)"));
        let forward = EngineError::SchemaChanged {
            source_member: m,
            switch_back: false,
        }
        .to_string();
        assert!(forward.contains("after it was copied (DDL is not replicated)"));
        assert!(forward.ends_with("push a new commit to start over"));
        let back = EngineError::SchemaChanged {
            source_member: m,
            switch_back: true,
        }
        .to_string();
        assert!(back.contains("after the switch onto it"), "{back}");
        assert!(back.contains("needs a new copy"), "{back}");
    }
}
