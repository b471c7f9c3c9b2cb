//! The phase machine's state: the [`Record`] pgflip persists before every step, the
//! [`Attempt`] under way and its [`Phase`]s, and ([`decide`]) what to do next. Pure: the
//! engine's driver observes, decides, records the new record *before* taking the step, and
//! acts, so a killed controller resumes exactly where it was.

mod decide;

pub use decide::{Decision, decide};

mod copy;
pub use copy::{CopyChoice, CopyMethod, choose_copy};

use super::revision::Revision;
use super::spec::{Desired, Major};
use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Color {
    Blue,
    Green,
}

impl Color {
    pub fn other(self) -> Color {
        match self {
            Color::Blue => Color::Green,
            Color::Green => Color::Blue,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Color::Blue => "blue",
            Color::Green => "green",
        }
    }
}

impl fmt::Display for Color {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One PostgreSQL instance of the pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Member {
    pub color: Color,
    pub major: Major,
}

impl fmt::Display for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (PostgreSQL {})", self.color, self.major)
    }
}

/// The previous color, kept in reverse replication after a switch so a revert is lossless.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Standby {
    pub member: Member,
    /// Unix milliseconds after which the standby is decommissioned.
    pub retain_until_ms: u64,
    /// Schema fingerprint of the serving side when reverse replication started (per database).
    pub serving_fingerprint: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AttemptKind {
    /// Build the target from nothing: provision, copy schema, replicate, switch.
    Full,
    /// The target is the retained standby, already in sync: just switch.
    SwitchBack,
}

/// Steps of an attempt, in order. Each is idempotent: running it again after a crash is safe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Phase {
    Preflight,
    Provision,
    CopySchema,
    Replicate,
    InitialSync,
    CatchUp,
    Verify,
    Switchover,
    ReverseSync,
    Done,
}

impl Phase {
    pub const ALL: [Phase; 10] = [
        Phase::Preflight,
        Phase::Provision,
        Phase::CopySchema,
        Phase::Replicate,
        Phase::InitialSync,
        Phase::CatchUp,
        Phase::Verify,
        Phase::Switchover,
        Phase::ReverseSync,
        Phase::Done,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Preflight => "preflight",
            Phase::Provision => "provision",
            Phase::CopySchema => "copy-schema",
            Phase::Replicate => "replicate",
            Phase::InitialSync => "initial-sync",
            Phase::CatchUp => "catch-up",
            Phase::Verify => "verify",
            Phase::Switchover => "switchover",
            Phase::ReverseSync => "reverse-sync",
            Phase::Done => "done",
        }
    }

    pub fn parse(s: &str) -> Option<Phase> {
        Phase::ALL.into_iter().find(|p| p.as_str() == s)
    }

    /// The phase after this one for an attempt of `kind`.
    pub fn next(self, kind: AttemptKind) -> Phase {
        let order: &[Phase] = match kind {
            AttemptKind::Full => &Phase::ALL,
            AttemptKind::SwitchBack => &[
                Phase::Preflight,
                Phase::CatchUp,
                Phase::Verify,
                Phase::Switchover,
                Phase::ReverseSync,
                Phase::Done,
            ],
        };
        let i = order
            .iter()
            .position(|p| *p == self)
            .unwrap_or(order.len() - 1);
        order[(i + 1).min(order.len() - 1)]
    }

    /// From this phase on clients may have been moved (see [`Attempt::is_committed`]).
    pub fn is_committed(self) -> bool {
        self >= Phase::Switchover
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where the switchover itself is: recorded before each sub-step so that recovery knows
/// whether clients were already moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum SwitchStep {
    /// PgBouncer is (being) paused; the source is (being) fenced; nothing moved yet.
    Pausing,
    /// The endpoint was (being) repointed at the target: clients belong to the target now.
    Repointing,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    /// The revision that asked for this attempt (progress is reported on it).
    pub revision: Revision,
    pub kind: AttemptKind,
    pub from: Member,
    pub to: Member,
    pub phase: Phase,
    pub started_ms: u64,
    /// When the current phase began (Unix ms): its wall time, waits and retries included,
    /// goes into `timings_ms` when it completes, and bounds the lag gate. (Absent from a
    /// record of pgflip 0.1: the attempt's start stands in.)
    #[serde(default)]
    pub phase_started_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switch_step: Option<SwitchStep>,
    /// Where reverse replication begins: the target's WAL insert position read inside the
    /// pause, after the last commit the forward link applied there and before the first
    /// client's. Recorded with [`SwitchStep::Repointing`]. (Absent from a record of a
    /// pgflip that made the reverse slot inside the pause: the slot starts at the switch.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reverse_from_lsn: Option<String>,
    /// Source schema fingerprint the target's schema was built from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_fingerprint: Option<String>,
    /// Pause attempts that hit the timeout (resumed on the source each time).
    #[serde(default)]
    pub pause_failures: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// What preflight let through under `unsupported: warn` that is not carried over
    /// (unlogged tables' rows, large objects), one line each, prefixed with the database:
    /// not verified, and named in the final status.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub left_behind: Vec<String>,
    /// Per phase: milliseconds spent, for the report.
    #[serde(default)]
    pub timings_ms: std::collections::BTreeMap<String, u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switch: Option<SwitchMeasurement>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified_tables: Option<u64>,
    /// How green gets its first copy, decided by preflight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy: Option<CopyChoice>,
    /// Why the attempt failed for good, recorded before its cleanup: a cleanup that is
    /// interrupted (a crash, a pod not there yet) is resumed, not the failed phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// The size of what is carried (tables, TOAST, indexes), as preflight measured it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub carried_bytes: Option<u64>,
    /// The current phase's progress in bytes, as last reported (the initial copy,
    /// catch-up); cleared when the phase changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<crate::progress::Progress>,
}

/// What one switchover measured (milliseconds).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SwitchMeasurement {
    pub pause_ms: f64,
    pub drain_ms: f64,
    pub fence_ms: f64,
    pub catch_up_ms: f64,
    pub sequences_ms: f64,
    pub reverse_setup_ms: f64,
    pub repoint_resume_ms: f64,
    /// Sequences carried inside the pause: those that moved after every sequence was
    /// copied right before it.
    pub sequences_synced: u64,
}

/// One finished switch, kept for `pgflip status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SwitchRecord {
    pub revision: Revision,
    pub from: Member,
    pub to: Member,
    pub kind: AttemptKind,
    pub finished_ms: u64,
    pub total_ms: u64,
    pub pause_ms: f64,
    pub verified_tables: u64,
    /// Where the pause went (drain, fence, catch-up, sequences, reverse setup, repoint).
    #[serde(default)]
    pub pause_breakdown: SwitchMeasurement,
    /// Milliseconds spent per phase.
    #[serde(default)]
    pub timings_ms: std::collections::BTreeMap<String, u64>,
    /// How green got its first copy (absent before pgflip 0.3, and for switch-backs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy: Option<CopyChoice>,
    /// The size of what was carried (tables, TOAST, indexes), as preflight measured it:
    /// with the copy phases' time, the rate a plan's estimate uses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub carried_bytes: Option<u64>,
}

/// Everything pgflip remembers, persisted atomically before every step.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Record {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving: Option<Member>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standby: Option<Standby>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<Attempt>,
    /// A revision whose attempt failed for good: not retried until a new revision arrives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_revision: Option<Revision>,
    /// Why that revision's attempt failed (for `pgflip status` and Kubernetes' `Stalled`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_reason: Option<String>,
    #[serde(default)]
    pub history: Vec<SwitchRecord>,
    /// The last revision read from the source, valid or not (each is reported once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_revision: Option<Revision>,
    /// What pgflip works towards: the last valid desired state, also while newer revisions
    /// carry bad documents. (`desired`: as pgflip 0.1 wrote it.)
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "desired")]
    pub wanted: Option<Wanted>,
}

/// A validated desired state and the revision it came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "StoredWanted")]
pub struct Wanted {
    pub revision: Revision,
    pub desired: Desired,
}

/// How [`Wanted`] is read back: as written now, or as pgflip 0.1 wrote it (the document's
/// text, validated again on the way in).
#[derive(Deserialize)]
#[serde(untagged)]
enum StoredWanted {
    Validated {
        revision: Revision,
        desired: Desired,
    },
    Document {
        revision: Revision,
        document: String,
    },
}

impl TryFrom<StoredWanted> for Wanted {
    type Error = super::spec::SpecError;

    fn try_from(stored: StoredWanted) -> Result<Wanted, Self::Error> {
        Ok(match stored {
            StoredWanted::Validated { revision, desired } => Wanted { revision, desired },
            StoredWanted::Document { revision, document } => Wanted {
                revision,
                desired: super::spec::parse(&document)?,
            },
        })
    }
}

impl Attempt {
    /// Once clients may have been moved, an attempt must run to its end, never be
    /// abandoned: from the first recorded step of the pause on (`serving` is the record's).
    /// A switchover that has not begun its pause (waiting for clients that bypass the
    /// endpoint, say) moved nothing.
    pub fn is_committed(&self, serving: Option<Member>) -> bool {
        match self.phase {
            Phase::Switchover => self.switch_step.is_some() || serving == Some(self.to),
            phase => phase.is_committed(),
        }
    }

    pub fn new(
        revision: Revision,
        kind: AttemptKind,
        from: Member,
        to: Member,
        now_ms: u64,
        source_fingerprint: Option<String>,
    ) -> Attempt {
        Attempt {
            revision,
            kind,
            from,
            to,
            phase: Phase::Preflight,
            started_ms: now_ms,
            phase_started_ms: now_ms,
            switch_step: None,
            reverse_from_lsn: None,
            source_fingerprint,
            pause_failures: 0,
            warnings: Vec::new(),
            left_behind: Vec::new(),
            timings_ms: Default::default(),
            switch: None,
            verified_tables: None,
            copy: None,
            failure: None,
            carried_bytes: None,
            progress: None,
        }
    }

    /// Moves on to `phase` at `now_ms`, adding the current phase's wall time to the timings.
    pub fn enter(&mut self, phase: Phase, now_ms: u64) {
        *self
            .timings_ms
            .entry(self.phase.as_str().to_string())
            .or_default() += now_ms.saturating_sub(self.phase_started_ms);
        self.phase = phase;
        self.phase_started_ms = now_ms;
        self.progress = None;
    }

    pub fn direction(&self) -> &'static str {
        match self.to.major.cmp(&self.from.major) {
            std::cmp::Ordering::Greater => "upgrade",
            std::cmp::Ordering::Less => "downgrade",
            std::cmp::Ordering::Equal => "switch",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phase_orders() {
        let mut p = Phase::Preflight;
        let mut full = vec![p];
        while p != Phase::Done {
            p = p.next(AttemptKind::Full);
            full.push(p);
        }
        assert_eq!(full, Phase::ALL.to_vec());
        assert_eq!(
            Phase::Preflight.next(AttemptKind::SwitchBack),
            Phase::CatchUp
        );
        assert_eq!(
            Phase::Switchover.next(AttemptKind::SwitchBack),
            Phase::ReverseSync
        );
        assert_eq!(Phase::Done.next(AttemptKind::SwitchBack), Phase::Done);
        for p in Phase::ALL {
            assert_eq!(Phase::parse(p.as_str()), Some(p));
        }
        assert!(!Phase::Verify.is_committed());
        assert!(Phase::Switchover.is_committed());
    }

    /// A record as pgflip 0.1 wrote it (revisions as text, the document as text): an
    /// upgraded pgflip resumes from it.
    #[test]
    fn a_record_of_pgflip_0_1_is_read() {
        const SHA: &str = "0123456789abcdef0123456789abcdef01234567";
        let document = crate::spec::render("orders", Major(16), "");
        let old = serde_json::json!({
            "serving": {"color": "blue", "major": 15},
            "attempt": {
                "revision": SHA, "kind": "full",
                "from": {"color": "blue", "major": 15}, "to": {"color": "green", "major": 16},
                "phase": "catchUp", "started_ms": 1000, "pause_failures": 0, "timings_ms": {}
            },
            "history": [],
            "observed_revision": SHA,
            "desired": {"revision": SHA, "document": document},
        });
        let r: Record = serde_json::from_value(old).unwrap();
        let commit = Revision::Commit(SHA.into());
        let wanted = r.wanted.unwrap();
        assert_eq!(wanted.revision, commit);
        assert_eq!(wanted.desired.major, Major(16));
        let attempt = r.attempt.unwrap();
        assert_eq!(
            (attempt.phase, attempt.phase_started_ms),
            (Phase::CatchUp, 0)
        );
        assert_eq!(r.observed_revision, Some(commit));
    }
}
