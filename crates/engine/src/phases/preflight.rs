//! Preflight: everything the switch needs, checked on the source before anything is
//! touched (see [`crate::preflight`] for the rules). Only when every check passes
//! is the source prepared: replica identities set, pgflip's own schema created.

use super::Ctx;
use crate::error::{EngineError, EngineResult};
use crate::ports::{Instances, Router};
use crate::preflight;
use crate::replication as repl;
use crate::steps::{Learned, Stepped};
use pgflip_core::plan::AttemptKind;

pub(super) async fn run<I: Instances, R: Router>(cx: &Ctx<'_, I, R>) -> EngineResult<Stepped> {
    let attempt = cx.attempt;
    let toolchain = &cx.parts.toolchain;
    // Both directions: a switch whose way back cannot be taken is not started.
    let missing = preflight::missing_tools(
        toolchain,
        attempt.kind,
        attempt.from.major,
        attempt.to.major,
    );
    if !missing.is_empty() {
        return Err(EngineError::ToolMissing(missing));
    }
    let mut refusals = Vec::new();
    let mut warnings = Vec::new();
    let mut left_behind = Vec::new();
    let mut findings = Vec::new();
    for db in &cx.desired.databases {
        let client = cx.connect(&cx.source, db).await?;
        let f = preflight::check(
            &client,
            db,
            attempt.to.major,
            cx.desired.unsupported,
            toolchain,
        )
        .await?;
        refusals.extend(f.refusals.iter().map(|r| format!("{db}: {r}")));
        warnings.extend(f.warnings.iter().map(|w| format!("{db}: {w}")));
        left_behind.extend(f.left_behind.iter().map(|w| format!("{db}: {w}")));
        findings.push((client, f));
    }
    if attempt.kind == AttemptKind::SwitchBack {
        let fp = cx.fingerprint(&cx.source).await?;
        if Some(&fp) != attempt.source_fingerprint.as_ref() {
            refusals.push(format!("the schema on {} changed after the switch (DDL is not replicated); the retained {} cannot take over", attempt.from, attempt.to));
        }
    }
    if !refusals.is_empty() {
        return Err(EngineError::Refused(refusals));
    }
    // Passed: now (and only now) prepare the source.
    for (client, f) in &findings {
        preflight::ensure_replica_identity_full(client, &f.needs_replica_identity_full).await?;
        repl::ensure_own_schema(client).await?;
    }
    for w in &warnings {
        tracing::warn!("{w}");
    }
    Ok(Stepped::Done(Learned::Preflight {
        warnings,
        left_behind,
    }))
}
