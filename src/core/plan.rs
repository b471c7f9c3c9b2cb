//! The phase machine: from what is recorded and what Git wants, decide the next step.
//! Pure: the engine observes, calls [`decide`], acts, and records the new [`Record`]
//! *before* taking the step, so a killed controller resumes exactly where it was.

use super::spec::{Desired, Major};
use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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

    /// Once clients may have been moved, an attempt must run to its end, never be abandoned.
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
    /// The commit that asked for this attempt (progress is reported on it).
    pub revision: String,
    pub kind: AttemptKind,
    pub from: Member,
    pub to: Member,
    pub phase: Phase,
    pub started_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switch_step: Option<SwitchStep>,
    /// Source schema fingerprint the target's schema was built from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_fingerprint: Option<String>,
    /// Pause attempts that hit the timeout (resumed on the source each time).
    #[serde(default)]
    pub pause_failures: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// Per phase: milliseconds spent, for the report.
    #[serde(default)]
    pub timings_ms: std::collections::BTreeMap<String, u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switch: Option<SwitchMeasurement>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified_tables: Option<u64>,
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
    pub sequences_synced: u64,
}

/// One finished switch, kept for `pgflip status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SwitchRecord {
    pub revision: String,
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
    pub failed_revision: Option<String>,
    /// Why that revision's attempt failed (for `pgflip status` and Kubernetes' `Stalled`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_reason: Option<String>,
    #[serde(default)]
    pub history: Vec<SwitchRecord>,
    /// The last revision read from the source, valid or not (each is reported once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_revision: Option<String>,
    /// The last valid document and its revision: what pgflip works towards, also while
    /// newer commits carry bad documents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired: Option<DesiredDocument>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DesiredDocument {
    pub revision: String,
    pub document: String,
}

/// What to do next.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Nothing serves yet: create the first instance at the desired major.
    Bootstrap(Member),
    /// Start a new attempt (record it, then run its first phase).
    Begin(Attempt),
    /// Run the current attempt's phase.
    Run(Phase),
    /// Drop the current attempt (nothing was switched yet) and clean up after it.
    Abandon {
        reason: String,
    },
    /// The standby's time is up, or it is in the way of a new attempt: remove it.
    Decommission {
        reason: String,
    },
    Idle,
}

/// The desired state, tagged with the revision it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Wanted<'a> {
    pub revision: &'a str,
    pub desired: &'a Desired,
}

pub fn decide(record: &Record, wanted: &Wanted<'_>, now_ms: u64) -> Decision {
    let target = wanted.desired.major;
    let Some(serving) = record.serving else {
        return Decision::Bootstrap(Member {
            color: Color::Blue,
            major: target,
        });
    };
    if let Some(attempt) = &record.attempt {
        if attempt.to.major != target && !attempt.phase.is_committed() {
            return Decision::Abandon {
                reason: format!(
                    "superseded by revision {}: the target is now PostgreSQL {target}",
                    short(wanted.revision)
                ),
            };
        }
        return Decision::Run(attempt.phase);
    }
    if target == serving.major {
        return match &record.standby {
            Some(s) if now_ms >= s.retain_until_ms => Decision::Decommission {
                reason: format!("retention of {} is over", s.member),
            },
            _ => Decision::Idle,
        };
    }
    if record.failed_revision.as_deref() == Some(wanted.revision) {
        return Decision::Idle;
    }
    match &record.standby {
        Some(s) if s.member.major == target => Decision::Begin(Attempt::new(
            wanted.revision,
            AttemptKind::SwitchBack,
            serving,
            s.member,
            now_ms,
            Some(s.serving_fingerprint.clone()),
        )),
        Some(s) => Decision::Decommission {
            reason: format!("{} must make room for PostgreSQL {target}", s.member),
        },
        None => Decision::Begin(Attempt::new(
            wanted.revision,
            AttemptKind::Full,
            serving,
            Member {
                color: serving.color.other(),
                major: target,
            },
            now_ms,
            None,
        )),
    }
}

impl Attempt {
    pub fn new(
        revision: &str,
        kind: AttemptKind,
        from: Member,
        to: Member,
        now_ms: u64,
        source_fingerprint: Option<String>,
    ) -> Attempt {
        Attempt {
            revision: revision.to_string(),
            kind,
            from,
            to,
            phase: Phase::Preflight,
            started_ms: now_ms,
            switch_step: None,
            source_fingerprint,
            pause_failures: 0,
            warnings: Vec::new(),
            timings_ms: Default::default(),
            switch: None,
            verified_tables: None,
        }
    }

    pub fn direction(&self) -> &'static str {
        match self.to.major.cmp(&self.from.major) {
            std::cmp::Ordering::Greater => "upgrade",
            std::cmp::Ordering::Less => "downgrade",
            std::cmp::Ordering::Equal => "switch",
        }
    }
}

pub fn short(revision: &str) -> &str {
    &revision[..revision.len().min(12)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::spec;

    fn desired(major: u32) -> Desired {
        spec::parse(&spec::render("db", Major(major), "")).unwrap()
    }
    fn member(color: Color, major: u32) -> Member {
        Member {
            color,
            major: Major(major),
        }
    }

    #[test]
    fn decisions() {
        let serving15 = Record {
            serving: Some(member(Color::Blue, 15)),
            ..Default::default()
        };
        let mut with_attempt = serving15.clone();
        with_attempt.attempt = Some(Attempt::new(
            "r1",
            AttemptKind::Full,
            member(Color::Blue, 15),
            member(Color::Green, 16),
            0,
            None,
        ));
        let mut switching = with_attempt.clone();
        switching.attempt.as_mut().unwrap().phase = Phase::Switchover;
        let mut after = Record {
            serving: Some(member(Color::Green, 16)),
            ..Default::default()
        };
        after.standby = Some(Standby {
            member: member(Color::Blue, 15),
            retain_until_ms: 1000,
            serving_fingerprint: "f".into(),
        });
        let mut failed = serving15.clone();
        failed.failed_revision = Some("r1".into());

        struct Case<'a> {
            name: &'a str,
            record: &'a Record,
            major: u32,
            revision: &'a str,
            now: u64,
            expect: &'a dyn Fn(&Decision) -> bool,
        }
        let cases = [
            Case {
                name: "empty bootstraps blue",
                record: &Record::default(),
                major: 15,
                revision: "r0",
                now: 0,
                expect: &|d| *d == Decision::Bootstrap(member(Color::Blue, 15)),
            },
            Case {
                name: "same version idles",
                record: &serving15,
                major: 15,
                revision: "r0",
                now: 0,
                expect: &|d| *d == Decision::Idle,
            },
            Case {
                name: "new version begins a full attempt on the other color",
                record: &serving15,
                major: 16,
                revision: "r1",
                now: 5,
                expect: &|d| matches!(d, Decision::Begin(a) if a.kind == AttemptKind::Full && a.to == member(Color::Green, 16) && a.phase == Phase::Preflight && a.revision == "r1"),
            },
            Case {
                name: "attempt continues",
                record: &with_attempt,
                major: 16,
                revision: "r1",
                now: 0,
                expect: &|d| *d == Decision::Run(Phase::Preflight),
            },
            Case {
                name: "new target supersedes an uncommitted attempt",
                record: &with_attempt,
                major: 17,
                revision: "r2",
                now: 0,
                expect: &|d| matches!(d, Decision::Abandon { reason } if reason.contains("superseded") && reason.contains("17")),
            },
            Case {
                name: "revert before the switch abandons",
                record: &with_attempt,
                major: 15,
                revision: "r2",
                now: 0,
                expect: &|d| matches!(d, Decision::Abandon { .. }),
            },
            Case {
                name: "a switchover in progress is never abandoned",
                record: &switching,
                major: 17,
                revision: "r2",
                now: 0,
                expect: &|d| *d == Decision::Run(Phase::Switchover),
            },
            Case {
                name: "revert during retention switches back",
                record: &after,
                major: 15,
                revision: "r3",
                now: 10,
                expect: &|d| matches!(d, Decision::Begin(a) if a.kind == AttemptKind::SwitchBack && a.to == member(Color::Blue, 15) && a.source_fingerprint.as_deref() == Some("f")),
            },
            Case {
                name: "retention over decommissions",
                record: &after,
                major: 16,
                revision: "r1",
                now: 1000,
                expect: &|d| matches!(d, Decision::Decommission { .. }),
            },
            Case {
                name: "retention not over idles",
                record: &after,
                major: 16,
                revision: "r1",
                now: 999,
                expect: &|d| *d == Decision::Idle,
            },
            Case {
                name: "a third major first removes the standby",
                record: &after,
                major: 17,
                revision: "r4",
                now: 10,
                expect: &|d| matches!(d, Decision::Decommission { reason } if reason.contains("room")),
            },
            Case {
                name: "a failed revision is not retried",
                record: &failed,
                major: 16,
                revision: "r1",
                now: 0,
                expect: &|d| *d == Decision::Idle,
            },
            Case {
                name: "a new revision retries",
                record: &failed,
                major: 16,
                revision: "r9",
                now: 0,
                expect: &|d| matches!(d, Decision::Begin(_)),
            },
        ];
        for c in cases {
            let des = desired(c.major);
            let d = decide(
                c.record,
                &Wanted {
                    revision: c.revision,
                    desired: &des,
                },
                c.now,
            );
            assert!((c.expect)(&d), "{}: got {d:?}", c.name);
        }
    }

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
}
