//! How an attempt copies the data onto green: logically (replication copies every table)
//! or physically (a base backup upgraded with `pg_upgrade`, then logical catch-up), and
//! the rule that picks one.

use crate::spec::{CopyPreference, Major};
use serde::{Deserialize, Serialize};
use std::fmt;

/// How an attempt copies the data onto green, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyChoice {
    pub method: CopyMethod,
    /// One line: why this method (for the status, the notes and `pgflip status`).
    pub why: String,
    /// Physical: the LSN the copy stops right before and the replication slots stream
    /// from (recorded once the slots exist).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cut_lsn: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CopyMethod {
    Logical,
    Physical,
}

impl CopyMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            CopyMethod::Logical => "logical",
            CopyMethod::Physical => "physical",
        }
    }
}

impl fmt::Display for CopyChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "copied {} ({})", self.method.as_str(), self.why)
    }
}

/// Picks the method for an attempt from `from` to `to`. `physical_unavailable` says why a
/// physical copy cannot be made here (None: it can). Err: `physical` was asked for and
/// cannot be done (the refusal, naming why).
pub fn choose_copy(
    preference: CopyPreference,
    from: Major,
    to: Major,
    physical_unavailable: Option<&str>,
) -> Result<CopyChoice, String> {
    let logical = |why: String| {
        Ok(CopyChoice {
            method: CopyMethod::Logical,
            why,
            cut_lsn: None,
        })
    };
    let physical_blocker = if to <= from {
        Some(format!(
            "pg_upgrade only goes up, and {from} to {to} is not an upgrade"
        ))
    } else {
        physical_unavailable.map(str::to_string)
    };
    match (preference, physical_blocker) {
        (CopyPreference::Logical, _) => logical("spec.copy: logical".into()),
        (CopyPreference::Auto, Some(blocker)) => logical(format!("auto: {blocker}")),
        (CopyPreference::Physical, Some(blocker)) => Err(format!(
            "spec.copy: physical cannot be done: {blocker} (spec.copy: auto or logical copies logically)"
        )),
        (preference, None) => Ok(CopyChoice {
            method: CopyMethod::Physical,
            why: match preference {
                CopyPreference::Physical => "spec.copy: physical".into(),
                _ => format!("auto: an upgrade from {from} to {to}"),
            },
            cut_lsn: None,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_copies_upgrades_physically_where_it_can_and_says_why_not_elsewhere() {
        let up = choose_copy(CopyPreference::Auto, Major(15), Major(17), None).unwrap();
        assert_eq!(up.method, CopyMethod::Physical);
        let down = choose_copy(CopyPreference::Auto, Major(17), Major(15), None).unwrap();
        assert_eq!(down.method, CopyMethod::Logical);
        assert!(down.why.contains("not an upgrade"), "{}", down.why);
        let no_tools = choose_copy(
            CopyPreference::Auto,
            Major(16),
            Major(17),
            Some("PostgreSQL 16 has no pg_controldata here"),
        )
        .unwrap();
        assert_eq!(no_tools.method, CopyMethod::Logical);
        assert!(no_tools.why.contains("pg_controldata"));
    }

    #[test]
    fn an_explicit_choice_is_kept_or_refused_naming_why() {
        let logical = choose_copy(CopyPreference::Logical, Major(15), Major(17), None).unwrap();
        assert_eq!(logical.method, CopyMethod::Logical);
        let physical = choose_copy(CopyPreference::Physical, Major(15), Major(17), None).unwrap();
        assert_eq!(physical.method, CopyMethod::Physical);
        let refused =
            choose_copy(CopyPreference::Physical, Major(17), Major(16), None).unwrap_err();
        assert!(refused.contains("not an upgrade"), "{refused}");
        let refused = choose_copy(
            CopyPreference::Physical,
            Major(15),
            Major(17),
            Some("green is a server you run"),
        )
        .unwrap_err();
        assert!(refused.contains("green is a server you run"), "{refused}");
    }
}
