//! Preflight: everything the switch needs, checked on the source before anything is
//! touched (see [`crate::preflight`] for the rules). Only when every check passes
//! is the source prepared: replica identities set, pgflip's own schema created.

use super::Ctx;
use crate::catalog::USER_NAMESPACES;
use crate::error::{EngineError, EngineResult};
use crate::ports::{Instances, Router};
use crate::preflight;
use crate::replication as repl;
use crate::steps::{Learned, Stepped};
use pgflip_core::plan::{AttemptKind, choose_copy};
use pgflip_core::spec::CopyPreference;

pub(super) async fn run<I: Instances, R: Router>(cx: &Ctx<'_, I, R>) -> EngineResult<Stepped> {
    let attempt = cx.attempt;
    let toolchain = &cx.parts.toolchain;
    // Both directions: a switch whose way back cannot be taken is not started.
    let instances = &cx.parts.instances;
    let from_here = instances.runs_here(attempt.from.major, cx.desired).await?;
    let to_here = instances.runs_here(attempt.to.major, cx.desired).await?;
    let missing = preflight::missing_tools(
        toolchain,
        attempt.kind,
        attempt.from.major,
        attempt.to.major,
        &|major| {
            if major == attempt.from.major {
                from_here
            } else {
                to_here
            }
        },
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
    let mut copy = None;
    if attempt.kind == AttemptKind::Full {
        refusals.extend(target_in_the_way(cx).await?);
        // Asked only where it can change the choice: it runs `pg_upgrade --check`.
        let blocker = if cx.desired.copy == CopyPreference::Logical
            || attempt.to.major <= attempt.from.major
        {
            None
        } else {
            instances
                .physical_copy_blocker(&attempt.from, &attempt.to, cx.desired)
                .await?
        };
        match choose_copy(
            cx.desired.copy,
            attempt.from.major,
            attempt.to.major,
            blocker.as_deref(),
        ) {
            Ok(choice) => copy = Some(choice),
            Err(refusal) => refusals.push(refusal),
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
        copy,
    }))
}

/// A target that exists already (a server the user runs) must hold nothing in the
/// carried databases but what an earlier pass of this copy put there. Its own checks run
/// first (`ensure`: a server the user runs is checked before pgflip adds anything).
async fn target_in_the_way<I: Instances, R: Router>(
    cx: &Ctx<'_, I, R>,
) -> EngineResult<Vec<String>> {
    let instances = &cx.parts.instances;
    if instances.addr(&cx.attempt.to, cx.desired).await?.is_none() {
        return Ok(Vec::new());
    }
    let target = instances.ensure(&cx.attempt.to, cx.desired).await?;
    let postgres = cx.connect(&target, "postgres").await?;
    let mut refusals = Vec::new();
    for db in &cx.desired.databases {
        let exists = postgres
            .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[db])
            .await?
            .is_some();
        if !exists {
            continue;
        }
        let client = cx.connect(&target, db).await?;
        if crate::schema::copied_fingerprint(&client).await?.is_some() {
            continue;
        }
        let objects = user_objects(&client).await?;
        if !objects.is_empty() {
            let mut named: Vec<String> = objects.iter().take(5).cloned().collect();
            if objects.len() > 5 {
                named.push(format!("and {} more", objects.len() - 5));
            }
            refusals.push(format!(
                "database {db} on {target} ({}) is not empty: {} — pgflip copies only onto a server without user objects in the carried databases",
                cx.attempt.to,
                named.join(", ")
            ));
        }
    }
    Ok(refusals)
}

async fn user_objects(client: &tokio_postgres::Client) -> EngineResult<Vec<String>> {
    let rows = client
        .query(
            &format!(
                "WITH ns AS ({USER_NAMESPACES}) \
                 SELECT ns.nspname || '.' || c.relname FROM pg_catalog.pg_class c JOIN ns ON ns.oid = c.relnamespace \
                  WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f') \
                 UNION ALL \
                 SELECT ns.nspname || '.' || p.proname || '()' FROM pg_catalog.pg_proc p JOIN ns ON ns.oid = p.pronamespace \
                 ORDER BY 1"
            ),
            &[],
        )
        .await?;
    Ok(rows.into_iter().map(|r| r.get(0)).collect())
}
