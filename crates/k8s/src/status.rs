//! The object's status, computed from the engine's record: kstatus conditions (`Ready`,
//! `Reconciling`, `Stalled`) and the fields a person looks at. Pure: the caller applies
//! the result with server-side apply under pgflip's field manager.
//!
//! kstatus reads an object as Current when `observedGeneration` equals
//! `metadata.generation` and `Ready` is True; as InProgress while `Reconciling` is True;
//! as Failed while `Stalled` is True. Flux's `wait: true` and health checks go by that.

use super::crd::{BlueGreenDatabaseStatus, LastSwitch};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use pgflip_core::plan::Record;
use pgflip_core::spec::Desired;

pub const READY: &str = "Ready";
pub const RECONCILING: &str = "Reconciling";
pub const STALLED: &str = "Stalled";

/// What the status is computed from.
pub struct Observed<'a> {
    /// `metadata.generation` of the object whose spec was evaluated.
    pub generation: Option<i64>,
    /// The validated spec, or why it is invalid.
    pub desired: Result<&'a Desired, &'a str>,
    pub record: &'a Record,
    /// The Flux revision the spec was applied from (None: not managed by Flux).
    pub revision: Option<&'a str>,
    /// The spec changed but Flux has not reported its revision applied yet.
    pub waiting_for_flux: bool,
}

/// One condition's state, before times and generations are attached.
struct State {
    type_: &'static str,
    status: bool,
    reason: &'static str,
    message: String,
}

pub fn compute(
    o: &Observed<'_>,
    previous: &BlueGreenDatabaseStatus,
    now: Timestamp,
) -> BlueGreenDatabaseStatus {
    let r = o.record;
    let states = match o.desired {
        Err(why) => stalled(
            "InvalidSpec",
            format!("the spec is invalid, nothing was changed: {why}"),
        ),
        Ok(desired) => {
            let failed_here = r.failed_revision.is_some()
                && r.failed_revision.as_ref() == r.wanted.as_ref().map(|w| &w.revision);
            match (&r.attempt, r.serving) {
                (Some(a), _) => {
                    progressing("Switching", format!("{} → {}: {}", a.from, a.to, a.phase))
                }
                (None, None) => progressing(
                    "Bootstrapping",
                    format!("creating PostgreSQL {}", desired.major),
                ),
                (None, Some(s)) if s.major == desired.major => ready(format!(
                    "PostgreSQL {} serves on the {} color",
                    s.major, s.color
                )),
                (None, Some(_)) if failed_here => stalled(
                    "SwitchFailed",
                    r.failed_reason
                        .clone()
                        .unwrap_or_else(|| "the switch failed".into()),
                ),
                (None, Some(s)) if o.waiting_for_flux => progressing(
                    "WaitingForFlux",
                    format!(
                        "PostgreSQL {} serves; waiting for Flux to report the new revision applied",
                        s.major
                    ),
                ),
                (None, Some(s)) => progressing(
                    "Switching",
                    format!("PostgreSQL {} → {}: starting", s.major, desired.major),
                ),
            }
        }
    };
    BlueGreenDatabaseStatus {
        observed_generation: o.generation,
        conditions: states
            .into_iter()
            .map(|s| condition(s, o.generation, previous, now))
            .collect(),
        phase: Some(
            r.attempt
                .as_ref()
                .map_or("idle".to_string(), |a| a.phase.to_string()),
        ),
        active_color: r.serving.map(|s| s.color.to_string()),
        active_version: r.serving.map(|s| s.major.to_string()),
        target_version: o.desired.ok().map(|d| d.major.to_string()),
        revision: o.revision.map(str::to_string),
        progress: r.attempt.as_ref().and_then(|a| a.progress),
        last_switch: r.history.last().map(|h| LastSwitch {
            revision: h.revision.to_string(),
            from_version: h.from.major.to_string(),
            to_version: h.to.major.to_string(),
            pause_ms: (h.pause_ms * 10.0).round() / 10.0,
            finished_at: Timestamp::from_millisecond(h.finished_ms as i64)
                .map(|t| t.to_string())
                .unwrap_or_default(),
        }),
    }
}

fn ready(message: String) -> Vec<State> {
    vec![State {
        type_: READY,
        status: true,
        reason: "Succeeded",
        message,
    }]
}

/// Under way: not Ready, and Reconciling says why.
fn progressing(reason: &'static str, message: String) -> Vec<State> {
    not_ready(RECONCILING, reason, message)
}

/// Stuck until something changes (the spec, a new commit): not Ready, and Stalled says why.
fn stalled(reason: &'static str, message: String) -> Vec<State> {
    not_ready(STALLED, reason, message)
}

fn not_ready(condition: &'static str, reason: &'static str, message: String) -> Vec<State> {
    vec![
        State {
            type_: READY,
            status: false,
            reason,
            message: message.clone(),
        },
        State {
            type_: condition,
            status: true,
            reason,
            message,
        },
    ]
}

/// A condition keeps its `lastTransitionTime` while its status stays the same.
fn condition(
    s: State,
    generation: Option<i64>,
    previous: &BlueGreenDatabaseStatus,
    now: Timestamp,
) -> Condition {
    let status = if s.status { "True" } else { "False" }.to_string();
    let since = previous
        .conditions
        .iter()
        .find(|c| c.type_ == s.type_ && c.status == status)
        .map_or(Time(now), |c| c.last_transition_time.clone());
    Condition {
        type_: s.type_.to_string(),
        status,
        reason: s.reason.to_string(),
        message: s.message,
        observed_generation: generation,
        last_transition_time: since,
    }
}

/// The annotations pgflip keeps on the object (for `kubectl get -o yaml` and tooling).
pub fn annotations(status: &BlueGreenDatabaseStatus) -> Vec<(&'static str, String)> {
    let mut out = vec![("pgflip.dev/phase", status.phase.clone().unwrap_or_default())];
    if let Some(c) = &status.active_color {
        out.push(("pgflip.dev/active-color", c.clone()));
    }
    if let Some(r) = &status.revision {
        out.push(("pgflip.dev/revision", r.clone()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgflip_core::plan::{Attempt, AttemptKind, Color, Member, Phase, SwitchRecord, Wanted};
    use pgflip_core::revision::Revision;
    use pgflip_core::spec::{self, Major};

    fn desired(major: u32) -> Desired {
        spec::parse(&spec::render("orders", Major(major), "")).unwrap()
    }
    fn member(color: Color, major: u32) -> Member {
        Member {
            color,
            major: Major(major),
        }
    }
    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(seconds).unwrap()
    }
    fn find<'a>(s: &'a BlueGreenDatabaseStatus, t: &str) -> Option<&'a Condition> {
        s.conditions.iter().find(|c| c.type_ == t)
    }
    fn observed<'a>(record: &'a Record, d: Result<&'a Desired, &'a str>) -> Observed<'a> {
        Observed {
            generation: Some(4),
            desired: d,
            record,
            revision: Some("main@sha1:0123456789abcdef0123456789abcdef01234567"),
            waiting_for_flux: false,
        }
    }

    #[test]
    fn serving_the_desired_major_is_ready() {
        let record = Record {
            serving: Some(member(Color::Green, 16)),
            history: vec![SwitchRecord {
                revision: Revision::Generation(3),
                from: member(Color::Blue, 15),
                to: member(Color::Green, 16),
                kind: AttemptKind::Full,
                finished_ms: 1_700_000_000_000,
                total_ms: 5000,
                pause_ms: 31.26,
                verified_tables: 4,
                pause_breakdown: Default::default(),
                timings_ms: Default::default(),
                copy: None,
                carried_bytes: None,
            }],
            ..Default::default()
        };
        let d = desired(16);
        let s = compute(&observed(&record, Ok(&d)), &Default::default(), at(100));
        assert_eq!(s.observed_generation, Some(4));
        let ready = find(&s, READY).unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("True", "Succeeded")
        );
        assert_eq!(ready.observed_generation, Some(4));
        assert!(find(&s, RECONCILING).is_none() && find(&s, STALLED).is_none());
        assert_eq!(s.active_color.as_deref(), Some("green"));
        assert_eq!(s.active_version.as_deref(), Some("16"));
        assert_eq!(s.phase.as_deref(), Some("idle"));
        let last = s.last_switch.as_ref().unwrap();
        assert_eq!((last.pause_ms, last.to_version.as_str()), (31.3, "16"));
        assert_eq!(last.finished_at, "2023-11-14T22:13:20Z");
        let ann = annotations(&s);
        assert!(ann.contains(&("pgflip.dev/active-color", "green".into())));
        assert!(ann.contains(&("pgflip.dev/phase", "idle".into())));
    }

    #[test]
    fn a_running_attempt_is_reconciling_and_not_ready() {
        let mut a = Attempt::new(
            Revision::Generation(2),
            AttemptKind::Full,
            member(Color::Blue, 15),
            member(Color::Green, 16),
            0,
            None,
        );
        a.phase = Phase::InitialSync;
        let record = Record {
            serving: Some(member(Color::Blue, 15)),
            attempt: Some(a),
            ..Default::default()
        };
        let d = desired(16);
        let s = compute(&observed(&record, Ok(&d)), &Default::default(), at(100));
        assert_eq!(find(&s, READY).unwrap().status, "False");
        let rec = find(&s, RECONCILING).unwrap();
        assert_eq!(rec.status, "True");
        assert!(rec.message.contains("initial-sync"), "{}", rec.message);
        assert_eq!(s.phase.as_deref(), Some("initial-sync"));
        assert_eq!(s.target_version.as_deref(), Some("16"));
    }

    #[test]
    fn invalid_spec_and_failed_switch_are_stalled_with_the_reason() {
        let record = Record {
            serving: Some(member(Color::Blue, 15)),
            ..Default::default()
        };
        let s = compute(
            &observed(
                &record,
                Err("spec.version \"13\": PostgreSQL 13 is not supported"),
            ),
            &Default::default(),
            at(100),
        );
        let stalled = find(&s, STALLED).unwrap();
        assert_eq!(
            (stalled.status.as_str(), stalled.reason.as_str()),
            ("True", "InvalidSpec")
        );
        assert!(stalled.message.contains("not supported"));
        assert_eq!(find(&s, READY).unwrap().status, "False");

        let failed = Record {
            serving: Some(member(Color::Blue, 15)),
            wanted: Some(Wanted {
                revision: Revision::Generation(7),
                desired: desired(16),
            }),
            failed_revision: Some(Revision::Generation(7)),
            failed_reason: Some("preflight refused: unlogged tables".into()),
            ..Default::default()
        };
        let d = desired(16);
        let s = compute(&observed(&failed, Ok(&d)), &Default::default(), at(100));
        let stalled = find(&s, STALLED).unwrap();
        assert_eq!(stalled.reason, "SwitchFailed");
        assert!(stalled.message.contains("unlogged"));
    }

    #[test]
    fn waiting_for_flux_and_transition_times() {
        let record = Record {
            serving: Some(member(Color::Blue, 15)),
            ..Default::default()
        };
        let d = desired(16);
        let mut o = observed(&record, Ok(&d));
        o.waiting_for_flux = true;
        let first = compute(&o, &Default::default(), at(100));
        assert_eq!(find(&first, RECONCILING).unwrap().reason, "WaitingForFlux");
        // Same status later: the transition time stays; a change takes the new time.
        let again = compute(&o, &first, at(200));
        assert_eq!(
            find(&again, READY).unwrap().last_transition_time,
            Time(at(100))
        );
        let d15 = desired(15);
        let back = compute(&observed(&record, Ok(&d15)), &again, at(300));
        assert_eq!(
            find(&back, READY).unwrap().last_transition_time,
            Time(at(300))
        );
    }
}
