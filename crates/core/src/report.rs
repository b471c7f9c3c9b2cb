//! Progress updates written back to the commit (git notes, forge statuses) and logs.
//! Pure: how an update looks; the sinks decide where it goes. Never holds a credential.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Pending,
    Success,
    Failure,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Success => "success",
            State::Failure => "failure",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Update {
    pub state: State,
    /// The phase the attempt is in ("preflight" … "done"), or "document" / "bootstrap".
    pub phase: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// One line for humans, e.g. "initial sync 45% (3/7 tables)".
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress_percent: Option<f64>,
    /// Bytes done of the total, rate and time left, for phases that measure them.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub progress: Option<crate::progress::Progress>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub timings_ms: BTreeMap<String, u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pause_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verified_tables: Option<u64>,
    /// What the switch did not carry over, allowed by `unsupported: warn` (one line each,
    /// prefixed with the database): unlogged tables' rows, large objects.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub left_behind: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// A plan's readable report, several lines (see [`crate::forecast::Forecast::report`]).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub report: Option<String>,
    /// RFC 3339 time of the update, stamped by whoever publishes it (the core has no clock).
    #[serde(default)]
    pub at: String,
}

impl Update {
    pub fn new(state: State, phase: impl Into<String>, message: impl Into<String>) -> Update {
        Update {
            state,
            phase: phase.into(),
            from: None,
            to: None,
            message: message.into(),
            progress_percent: None,
            progress: None,
            timings_ms: BTreeMap::new(),
            pause_ms: None,
            verified_tables: None,
            left_behind: Vec::new(),
            reason: None,
            report: None,
            at: String::new(),
        }
    }

    pub fn failure(phase: impl Into<String>, reason: impl Into<String>) -> Update {
        let reason = reason.into();
        let mut u = Update::new(State::Failure, phase, reason.clone());
        u.reason = Some(reason);
        u
    }

    pub fn between(mut self, from: impl ToString, to: impl ToString) -> Update {
        self.from = Some(from.to_string());
        self.to = Some(to.to_string());
        self
    }

    /// With progress in bytes: the percentage follows it, and the figures end the message.
    pub fn with_progress(mut self, progress: Option<crate::progress::Progress>) -> Update {
        if let Some(p) = progress {
            self.message = format!("{}: {p}", self.message);
            self.progress_percent = Some(p.percent());
            self.progress = Some(p);
        }
        self
    }

    /// The line a person reads first: `pgflip: pending [initial-sync] 15 → 16: initial sync 45%`.
    /// One line whatever the message holds (an error can quote a name with a newline):
    /// a line break in it would start a line that [`parse_note`] could take for an entry.
    pub fn human_line(&self) -> String {
        let dir = match (&self.from, &self.to) {
            (Some(f), Some(t)) => format!(" {f} → {t}"),
            _ => String::new(),
        };
        one_line(&format!(
            "pgflip: {} [{}]{dir}: {}",
            self.state.as_str(),
            self.phase,
            self.message
        ))
    }

    /// A note body entry: the human line, a report's lines indented, then the JSON on one
    /// line (the only line of an entry that starts with `{`).
    pub fn note_entry(&self) -> String {
        let report: String = self
            .report
            .iter()
            .flat_map(|r| r.lines())
            .map(|l| format!("    {l}\n"))
            .collect();
        format!(
            "{}\n{report}{}\n",
            self.human_line(),
            serde_json::to_string(self).expect("update serializes")
        )
    }
}

/// `text` with line breaks (and other control characters) shown as spaces.
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// Reads the JSON lines back out of a note (the newest last).
pub fn parse_note(note: &str) -> Vec<Update> {
    note.lines()
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn note_round_trip() {
        let mut u = Update::new(State::Pending, "initial-sync", "initial sync 45%").between(15, 16);
        u.progress_percent = Some(45.0);
        let f = Update::failure(
            "preflight",
            "unlogged table public.cache cannot be carried over",
        );
        let mut plan = Update::new(State::Success, "plan", "upgrade 15 → 16");
        plan.report = Some("{ looks like JSON\nsecond line".into());
        let note = format!("{}{}{}", u.note_entry(), f.note_entry(), plan.note_entry());
        assert!(
            note.contains("\n    { looks like JSON\n    second line\n"),
            "{note}"
        );
        assert!(note.starts_with("pgflip: pending [initial-sync] 15 → 16: initial sync 45%\n"));
        let back = parse_note(&note);
        assert_eq!(back, vec![u, f.clone(), plan]);
        assert_eq!(back[1].state, State::Failure);
        assert_eq!(
            back[1].reason.as_deref(),
            Some("unlogged table public.cache cannot be carried over")
        );
    }
}

#[cfg(test)]
mod hostile {
    use super::*;
    use proptest::prelude::*;

    /// Text as hostile as a name or an error message can make it: quotes, backslashes,
    /// line breaks, braces (a line that looks like an entry), unicode, sometimes long.
    pub fn hostile_text() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z'\"\\\\ \n\r{}:;#=é€😀\t]{0,40}",
            ".{0,300}",
            Just(
                "x\n{\"state\":\"success\",\"phase\":\"done\",\"message\":\"forged\"}".to_string()
            ),
        ]
    }

    proptest! {
        /// Whatever a message holds, a note entry reads back as exactly that update: one
        /// entry, nothing forged.
        #[test]
        fn a_note_entry_reads_back_as_itself(
            phase in hostile_text(),
            message in hostile_text(),
            reason in proptest::option::of(hostile_text()),
            report in proptest::option::of(hostile_text()),
        ) {
            let mut u = Update::new(State::Failure, phase, message);
            u.reason = reason;
            u.report = report;
            let entry = u.note_entry();
            prop_assert_eq!(parse_note(&entry), vec![u.clone()]);
            // Two entries in a row stay two.
            prop_assert_eq!(parse_note(&format!("{entry}{entry}")).len(), 2);
        }

        /// Any note text at all (notes are shared, people edit them): no panic.
        #[test]
        fn any_note_text_parses_without_panic(text in ".{0,400}") {
            let _ = parse_note(&text);
        }
    }
}
