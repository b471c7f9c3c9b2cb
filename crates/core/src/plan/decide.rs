//! The decision: from the record alone (what runs, what is under way, what is wanted), the
//! next step. Each decision carries what it acts on, so the driver never looks it up again.

use super::{Attempt, AttemptKind, Color, Member, Record, Standby};
use crate::revision::Revision;

/// What to do next.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Nothing serves yet: create the first instance at the wanted major.
    Bootstrap { member: Member, revision: Revision },
    /// Start a new attempt (record it, then run its first phase).
    Begin(Attempt),
    /// Run the attempt's current phase.
    Run(Attempt),
    /// Drop the attempt (nothing was switched yet) and clean up after it.
    Abandon { attempt: Attempt, reason: String },
    /// The attempt failed for good: clean up after it, and record the failure.
    Fail { attempt: Attempt, reason: String },
    /// The standby's time is up, or it is in the way of a new attempt: remove it.
    Decommission {
        serving: Member,
        standby: Standby,
        reason: String,
    },
    /// Nothing wanted yet, or everything is as wanted.
    Idle,
}

pub fn decide(record: &Record, now_ms: u64) -> Decision {
    let Some(wanted) = &record.wanted else {
        return Decision::Idle;
    };
    let target = wanted.desired.major;
    let Some(serving) = record.serving else {
        if record.failed_revision.as_ref() == Some(&wanted.revision) {
            return Decision::Idle;
        }
        return Decision::Bootstrap {
            member: Member {
                color: Color::Blue,
                major: target,
            },
            revision: wanted.revision.clone(),
        };
    };
    if let Some(attempt) = &record.attempt {
        if let Some(reason) = &attempt.failure {
            return Decision::Fail {
                attempt: attempt.clone(),
                reason: reason.clone(),
            };
        }
        if attempt.to.major != target && !attempt.is_committed(record.serving) {
            return Decision::Abandon {
                attempt: attempt.clone(),
                reason: format!(
                    "superseded by revision {}: the target is now PostgreSQL {target}",
                    wanted.revision.short()
                ),
            };
        }
        return Decision::Run(attempt.clone());
    }
    if target == serving.major {
        return match &record.standby {
            Some(s) if now_ms >= s.retain_until_ms => Decision::Decommission {
                serving,
                standby: s.clone(),
                reason: format!("retention of {} is over", s.member),
            },
            _ => Decision::Idle,
        };
    }
    if record.failed_revision.as_ref() == Some(&wanted.revision) {
        return Decision::Idle;
    }
    match &record.standby {
        Some(s) if s.member.major == target => Decision::Begin(Attempt::new(
            wanted.revision.clone(),
            AttemptKind::SwitchBack,
            serving,
            s.member,
            now_ms,
            Some(s.serving_fingerprint.clone()),
        )),
        Some(s) => Decision::Decommission {
            serving,
            standby: s.clone(),
            reason: format!("{} must make room for PostgreSQL {target}", s.member),
        },
        None => Decision::Begin(Attempt::new(
            wanted.revision.clone(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{Phase, Wanted};
    use crate::spec::{self, Major};

    fn member(color: Color, major: u32) -> Member {
        Member {
            color,
            major: Major(major),
        }
    }

    fn rev(n: i64) -> Revision {
        Revision::Generation(n)
    }

    /// `record` wanting PostgreSQL `major` at revision `n`.
    fn wanting(record: &Record, major: u32, n: i64) -> Record {
        let mut r = record.clone();
        r.wanted = Some(Wanted {
            revision: rev(n),
            desired: spec::parse(&spec::render("db", Major(major), "")).unwrap(),
        });
        r
    }

    #[test]
    fn decisions() {
        let serving15 = Record {
            serving: Some(member(Color::Blue, 15)),
            ..Default::default()
        };
        let mut with_attempt = serving15.clone();
        with_attempt.attempt = Some(Attempt::new(
            rev(1),
            AttemptKind::Full,
            member(Color::Blue, 15),
            member(Color::Green, 16),
            0,
            None,
        ));
        let mut before_pause = with_attempt.clone();
        before_pause.attempt.as_mut().unwrap().phase = Phase::Switchover;
        let mut switching = before_pause.clone();
        switching.attempt.as_mut().unwrap().switch_step = Some(super::super::SwitchStep::Pausing);
        let mut switched = before_pause.clone();
        switched.serving = Some(member(Color::Green, 16));
        let mut after = Record {
            serving: Some(member(Color::Green, 16)),
            ..Default::default()
        };
        after.standby = Some(Standby {
            member: member(Color::Blue, 15),
            retain_until_ms: 1000,
            serving_fingerprint: "f".into(),
        });
        let mut failing = with_attempt.clone();
        failing.attempt.as_mut().unwrap().failure = Some("preflight refused".into());
        let mut failed = serving15.clone();
        failed.failed_revision = Some(rev(1));

        type Check = dyn Fn(&Decision) -> bool;
        let cases: [(&str, Record, u64, &Check); 18] = [
            (
                "a failing attempt is cleaned up, whatever is wanted now",
                wanting(&failing, 17, 3),
                0,
                &|d| matches!(d, Decision::Fail { reason, .. } if reason == "preflight refused"),
            ),
            (
                "a failing attempt under the same target too",
                wanting(&failing, 16, 1),
                0,
                &|d| matches!(d, Decision::Fail { .. }),
            ),
            ("nothing wanted idles", Record::default(), 0, &|d| {
                *d == Decision::Idle
            }),
            (
                "empty bootstraps blue",
                wanting(&Record::default(), 15, 0),
                0,
                &|d| {
                    *d == Decision::Bootstrap {
                        member: member(Color::Blue, 15),
                        revision: rev(0),
                    }
                },
            ),
            ("same version idles", wanting(&serving15, 15, 0), 0, &|d| {
                *d == Decision::Idle
            }),
            (
                "new version begins a full attempt on the other color",
                wanting(&serving15, 16, 1),
                5,
                &|d| matches!(d, Decision::Begin(a) if a.kind == AttemptKind::Full && a.to == member(Color::Green, 16) && a.phase == Phase::Preflight && a.revision == rev(1) && a.started_ms == 5),
            ),
            (
                "attempt continues",
                wanting(&with_attempt, 16, 1),
                0,
                &|d| matches!(d, Decision::Run(a) if a.phase == Phase::Preflight && a.to.major == Major(16)),
            ),
            (
                "new target supersedes an uncommitted attempt",
                wanting(&with_attempt, 17, 2),
                0,
                &|d| matches!(d, Decision::Abandon { attempt, reason } if reason.contains("superseded") && reason.contains("17") && attempt.to.major == Major(16)),
            ),
            (
                "revert before the switch abandons",
                wanting(&with_attempt, 15, 2),
                0,
                &|d| matches!(d, Decision::Abandon { .. }),
            ),
            (
                "a switchover in progress is never abandoned",
                wanting(&switching, 17, 2),
                0,
                &|d| matches!(d, Decision::Run(a) if a.phase == Phase::Switchover),
            ),
            (
                "a switch that moved clients is never abandoned",
                wanting(&switched, 15, 2),
                0,
                &|d| matches!(d, Decision::Run(a) if a.phase == Phase::Switchover),
            ),
            (
                "a switchover that has not begun its pause is abandoned",
                wanting(&before_pause, 15, 2),
                0,
                &|d| matches!(d, Decision::Abandon { .. }),
            ),
            (
                "revert during retention switches back",
                wanting(&after, 15, 3),
                10,
                &|d| matches!(d, Decision::Begin(a) if a.kind == AttemptKind::SwitchBack && a.to == member(Color::Blue, 15) && a.source_fingerprint.as_deref() == Some("f")),
            ),
            (
                "retention over decommissions",
                wanting(&after, 16, 1),
                1000,
                &|d| matches!(d, Decision::Decommission { serving, standby, .. } if *serving == member(Color::Green, 16) && standby.member == member(Color::Blue, 15)),
            ),
            (
                "retention not over idles",
                wanting(&after, 16, 1),
                999,
                &|d| *d == Decision::Idle,
            ),
            (
                "a third major first removes the standby",
                wanting(&after, 17, 4),
                10,
                &|d| matches!(d, Decision::Decommission { reason, .. } if reason.contains("room")),
            ),
            (
                "a failed revision is not retried",
                wanting(&failed, 16, 1),
                0,
                &|d| *d == Decision::Idle,
            ),
            ("a new revision retries", wanting(&failed, 16, 9), 0, &|d| {
                matches!(d, Decision::Begin(_))
            }),
        ];
        for (name, record, now, expect) in cases {
            let d = decide(&record, now);
            assert!(expect(&d), "{name}: got {d:?}");
        }
    }
}
