//! The plan of a proposed document (a pull request's): what a switch to it would do,
//! computed before it merges, against the running database, changing nothing. Pure: the
//! engine gathers the facts ([`Forecast`]); this module says what they mean — the state
//! of the `pgflip/plan/<name>` status, its one line, the report, and the time estimate
//! from the rates earlier switches measured.

use crate::plan::{AttemptKind, CopyChoice, CopyMethod, Member, SwitchRecord};
use crate::progress::{bytes, duration};
use crate::report::{State, Update};
use crate::spec::Major;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Copy rates assumed before any switch of this database was measured (bytes/s), and
/// the time around the copy (catch-up, verification, the pause, setting up). Low on
/// purpose: this VM's benchmark measured 12–40 MB/s logical, 6–260 MB/s physical.
const ASSUMED_LOGICAL_RATE: f64 = 10e6;
const ASSUMED_PHYSICAL_RATE: f64 = 40e6;
const ASSUMED_FIXED_S: f64 = 30.0;
/// The phases whose time is the copy's (the rest is counted as fixed).
const COPY_PHASES: [&str; 4] = ["provision", "copy-schema", "replicate", "initial-sync"];

/// What one carried database holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatabaseSize {
    pub name: String,
    pub tables: u64,
    /// Tables, their TOAST and indexes.
    pub bytes: u64,
}

/// What the switch to a proposed document would be.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum Switch {
    /// The document asks for the version that serves: no switch.
    None,
    /// Nothing serves yet: the first instance is created at this major.
    Bootstrap,
    /// Back to the standby kept in reverse replication: no copy.
    Back,
    /// A new green, copied from blue.
    Full {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        copy: Option<CopyChoice>,
    },
}

/// Time to switch, and what the figure rests on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    pub seconds: f64,
    pub basis: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Forecast {
    /// The database's name (`metadata.name`).
    pub name: String,
    /// What serves now (None: nothing yet).
    pub from: Option<Member>,
    pub to: Major,
    pub switch: Switch,
    pub databases: Vec<DatabaseSize>,
    /// Why the switch would be refused: each names the objects.
    pub refusals: Vec<String>,
    pub warnings: Vec<String>,
    /// What would not be carried over (allowed by `unsupported: warn`).
    pub left_behind: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimate: Option<Estimate>,
    /// Whether and how `git revert` would switch back.
    pub way_back: String,
}

impl Forecast {
    /// `failure` when the switch would be refused (a branch protection rule can require
    /// the status), else `success`.
    pub fn state(&self) -> State {
        if self.refusals.is_empty() {
            State::Success
        } else {
            State::Failure
        }
    }

    pub fn total_bytes(&self) -> u64 {
        self.databases.iter().map(|d| d.bytes).sum()
    }

    fn direction(&self) -> String {
        match self.from {
            None => format!("bootstrap PostgreSQL {}", self.to),
            Some(from) if from.major < self.to => format!("upgrade {} → {}", from.major, self.to),
            Some(from) if from.major > self.to => {
                format!("downgrade {} → {}", from.major, self.to)
            }
            Some(from) => format!("stays on PostgreSQL {}", from.major),
        }
    }

    /// The plan as a status update (`phase` "plan"): its verdict, its line, what it
    /// refuses and leaves behind, and the readable report.
    pub fn update(&self) -> Update {
        let mut u = Update::new(self.state(), "plan", self.summary());
        if let Some(from) = self.from {
            u = u.between(from.major, self.to);
        }
        if !self.refusals.is_empty() {
            u.reason = Some(self.refusals.join("; "));
        }
        u.left_behind = self.left_behind.clone();
        u.report = Some(self.report());
        u
    }

    /// One line, for the commit status: the refusals, or what would happen.
    pub fn summary(&self) -> String {
        if !self.refusals.is_empty() {
            return format!("would be refused: {}", self.refusals.join("; "));
        }
        let mut parts = vec![self.direction()];
        match &self.switch {
            Switch::None | Switch::Bootstrap => return parts.remove(0),
            Switch::Back => parts.push("back to the standby in reverse sync, no copy".into()),
            Switch::Full { copy } => {
                if let Some(c) = copy {
                    parts.push(format!("{} copy", c.method.as_str()));
                }
                let tables: u64 = self.databases.iter().map(|d| d.tables).sum();
                parts.push(format!("{} tables, {}", tables, bytes(self.total_bytes())));
            }
        }
        if let Some(e) = &self.estimate {
            parts.push(format!("about {}", duration(e.seconds)));
        }
        if !self.left_behind.is_empty() {
            parts.push(format!("{} left behind", self.left_behind.len()));
        }
        parts.join(", ")
    }

    /// The readable report: every figure and finding, one per line.
    pub fn report(&self) -> String {
        let mut out = format!("pgflip plan for {}: {}\n", self.name, self.direction());
        let verdict = match self.state() {
            State::Failure => "REFUSED — blue would keep serving, nothing would change",
            _ => "would go ahead",
        };
        out.push_str(&format!("verdict: {verdict}\n"));
        match &self.switch {
            Switch::None => out.push_str("switch: none (the version that serves)\n"),
            Switch::Bootstrap => out.push_str("switch: none, the first instance is created\n"),
            Switch::Back => {
                out.push_str("switch: back to the standby kept in reverse replication (no copy)\n")
            }
            Switch::Full { copy } => match copy {
                Some(c) => out.push_str(&format!(
                    "switch: a new green, {} copy ({})\n",
                    c.method.as_str(),
                    c.why
                )),
                None => out.push_str("switch: a new green (no copy method: refused)\n"),
            },
        }
        for d in &self.databases {
            out.push_str(&format!(
                "database {}: {} tables, {}\n",
                d.name,
                d.tables,
                bytes(d.bytes)
            ));
        }
        if let Some(e) = &self.estimate {
            out.push_str(&format!(
                "estimate: about {} ({})\n",
                duration(e.seconds),
                e.basis
            ));
        }
        for r in &self.refusals {
            out.push_str(&format!("refused: {r}\n"));
        }
        for w in &self.warnings {
            out.push_str(&format!("warning: {w}\n"));
        }
        for l in &self.left_behind {
            out.push_str(&format!("left behind: {l}\n"));
        }
        out.push_str(&format!("way back: {}\n", self.way_back));
        out
    }
}

/// How long a full switch of `bytes` copied by `method` would take: at the rate the
/// newest measured switch of the same method copied (its copy phases' time against the
/// bytes it carried), plus the rest of that switch's time; without one, at assumed rates.
pub fn estimate(bytes_to_copy: u64, method: CopyMethod, history: &[SwitchRecord]) -> Estimate {
    let measured = history.iter().rev().find_map(|h| {
        let carried = h.carried_bytes?;
        if h.kind != AttemptKind::Full || h.copy.as_ref()?.method != method || carried == 0 {
            return None;
        }
        let copy_ms: u64 = COPY_PHASES
            .iter()
            .filter_map(|p| h.timings_ms.get(*p))
            .sum();
        (copy_ms > 0).then_some((h, carried, copy_ms))
    });
    match measured {
        Some((h, carried, copy_ms)) => {
            let rate = carried as f64 * 1000.0 / copy_ms as f64;
            let rest = h.total_ms.saturating_sub(copy_ms) as f64 / 1000.0;
            Estimate {
                seconds: bytes_to_copy as f64 / rate + rest,
                basis: format!(
                    "copy at {}/s as measured by the switch of revision {}, plus {} around it",
                    self::bytes(rate as u64),
                    h.revision.short(),
                    duration(rest)
                ),
            }
        }
        None => {
            let rate = match method {
                CopyMethod::Logical => ASSUMED_LOGICAL_RATE,
                CopyMethod::Physical => ASSUMED_PHYSICAL_RATE,
            };
            Estimate {
                seconds: bytes_to_copy as f64 / rate + ASSUMED_FIXED_S,
                basis: format!(
                    "no {} copy measured here yet: assumed {}/s plus {}",
                    method.as_str(),
                    self::bytes(rate as u64),
                    duration(ASSUMED_FIXED_S)
                ),
            }
        }
    }
}

/// What `git revert` would do after the switch.
pub fn way_back(from: Major, retain: Duration) -> String {
    if retain.is_zero() {
        format!(
            "git revert would copy back onto a new PostgreSQL {from} (retainPrevious is 0s: no standby is kept)"
        )
    } else {
        format!(
            "git revert within {} switches back to PostgreSQL {from}, kept in reverse replication, without losing a write",
            duration(retain.as_secs_f64())
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Color;
    use crate::revision::Revision;

    fn switched(method: CopyMethod, carried: u64, copy_ms: u64, total_ms: u64) -> SwitchRecord {
        SwitchRecord {
            revision: Revision::commit("0123456789abcdef0123456789abcdef01234567").unwrap(),
            from: Member {
                color: Color::Blue,
                major: Major(15),
            },
            to: Member {
                color: Color::Green,
                major: Major(17),
            },
            kind: AttemptKind::Full,
            finished_ms: 0,
            total_ms,
            pause_ms: 50.0,
            verified_tables: 3,
            pause_breakdown: Default::default(),
            timings_ms: [("initial-sync".to_string(), copy_ms)].into(),
            copy: Some(CopyChoice {
                method,
                why: "test".into(),
                cut_lsn: None,
            }),
            carried_bytes: Some(carried),
        }
    }

    #[test]
    fn the_estimate_uses_the_newest_measured_switch_of_the_same_method() {
        let history = [
            switched(CopyMethod::Logical, 100_000_000, 10_000, 15_000),
            switched(CopyMethod::Physical, 100_000_000, 2_000, 9_000),
        ];
        // 10 MB/s logical: 300 MB in 30 s, plus the 5 s around it.
        let e = estimate(300_000_000, CopyMethod::Logical, &history);
        assert_eq!(e.seconds, 35.0);
        assert!(e.basis.contains("10.0 MB/s"), "{}", e.basis);
        assert!(e.basis.contains("0123456"), "{}", e.basis);
        let e = estimate(300_000_000, CopyMethod::Physical, &history);
        assert_eq!(e.seconds, 13.0);
        // Nothing measured: assumed, and said so.
        let e = estimate(100_000_000, CopyMethod::Logical, &[]);
        assert_eq!(e.seconds, 10.0 + ASSUMED_FIXED_S);
        assert!(
            e.basis.starts_with("no logical copy measured"),
            "{}",
            e.basis
        );
    }

    fn forecast() -> Forecast {
        Forecast {
            name: "orders".into(),
            from: Some(Member {
                color: Color::Blue,
                major: Major(15),
            }),
            to: Major(17),
            switch: Switch::Full {
                copy: Some(CopyChoice {
                    method: CopyMethod::Logical,
                    why: "asked for".into(),
                    cut_lsn: None,
                }),
            },
            databases: vec![DatabaseSize {
                name: "app".into(),
                tables: 4,
                bytes: 12_000_000,
            }],
            refusals: vec![],
            warnings: vec![],
            left_behind: vec![],
            estimate: Some(Estimate {
                seconds: 31.2,
                basis: "assumed".into(),
            }),
            way_back: way_back(Major(15), Duration::from_secs(3600)),
        }
    }

    #[test]
    fn a_plan_says_what_would_happen_or_why_not() {
        let mut f = forecast();
        assert_eq!(f.state(), State::Success);
        assert_eq!(
            f.summary(),
            "upgrade 15 → 17, logical copy, 4 tables, 12.0 MB, about 31s"
        );
        let report = f.report();
        assert!(
            report.contains("database app: 4 tables, 12.0 MB"),
            "{report}"
        );
        assert!(
            report.contains("way back: git revert within 1h 00m"),
            "{report}"
        );
        f.refusals
            .push("app: unlogged tables are not replicated: public.cache".into());
        assert_eq!(f.state(), State::Failure);
        assert!(f.summary().contains("public.cache"), "{}", f.summary());
        assert!(f.report().contains("verdict: REFUSED"));
    }
}
