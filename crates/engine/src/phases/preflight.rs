//! Preflight: everything the switch needs, checked on the source before anything is
//! touched (see [`crate::preflight`] for the rules): the [`survey`], which a plan shares.
//! Only when every check passes is the source prepared: replica identities set, pgflip's
//! own schema created.

use super::Ctx;
use crate::catalog::USER_NAMESPACES;
use crate::error::{EngineError, EngineResult, MIN_FREE_BYTES};
use crate::ports::{Instances, Router};
use crate::preflight;
use crate::replication as repl;
use crate::steps::{Learned, Stepped};
use pgflip_core::forecast::DatabaseSize;
use pgflip_core::plan::{AttemptKind, CopyChoice, choose_copy};
use pgflip_core::progress::bytes;
use pgflip_core::spec::CopyPreference;
use tokio_postgres::Client;

/// What preflight finds, read-only: the run below acts on it, and a plan
/// ([`super::Phases::forecast`]) reports it.
pub(super) struct Survey {
    /// Tools of either direction that are not installed (refused before anything else).
    pub missing_tools: Vec<String>,
    pub refusals: Vec<String>,
    pub warnings: Vec<String>,
    pub left_behind: Vec<String>,
    /// Per database: a connection to the source and what was found there.
    pub findings: Vec<(Client, preflight::Findings)>,
    pub sizes: Vec<DatabaseSize>,
    /// How green would get its first copy (a full switch whose method can be chosen).
    pub copy: Option<CopyChoice>,
}

/// Everything the switch needs, checked on the source; changes nothing anywhere.
pub(super) async fn survey<I: Instances, R: Router>(cx: &Ctx<'_, I, R>) -> EngineResult<Survey> {
    let attempt = cx.attempt;
    let toolchain = &cx.parts.toolchain;
    // Both directions: a switch whose way back cannot be taken is not started.
    let instances = &cx.parts.instances;
    let from_here = instances.runs_here(attempt.from.major, cx.desired).await?;
    let to_here = instances.runs_here(attempt.to.major, cx.desired).await?;
    let missing_tools = preflight::missing_tools(
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
    let mut survey = Survey {
        missing_tools,
        refusals: Vec::new(),
        warnings: Vec::new(),
        left_behind: Vec::new(),
        findings: Vec::new(),
        sizes: Vec::new(),
        copy: None,
    };
    for db in &cx.desired.databases {
        let client = cx.connect(&cx.source, db).await?;
        let (tables, bytes) = crate::catalog::user_data_size(&client).await?;
        survey.sizes.push(DatabaseSize {
            name: db.clone(),
            tables,
            bytes,
        });
        let f = preflight::check(
            &client,
            db,
            attempt.to.major,
            cx.desired.unsupported,
            toolchain,
        )
        .await?;
        let prefixed = |lines: &[String]| {
            lines
                .iter()
                .map(|l| format!("{db}: {l}"))
                .collect::<Vec<_>>()
        };
        survey.refusals.extend(prefixed(&f.refusals));
        survey.warnings.extend(prefixed(&f.warnings));
        survey.left_behind.extend(prefixed(&f.left_behind));
        survey.findings.push((client, f));
    }
    if attempt.kind == AttemptKind::SwitchBack {
        let fp = cx.fingerprint(&cx.source).await?;
        if Some(&fp) != attempt.source_fingerprint.as_ref() {
            survey.refusals.push(format!("the schema on {} changed after the switch (DDL is not replicated); the retained {} cannot take over", attempt.from, attempt.to));
        }
    }
    if attempt.kind == AttemptKind::Full {
        let carried: u64 = survey.sizes.iter().map(|d| d.bytes).sum();
        if let Some(free) = instances.free_space(&attempt.to, cx.desired).await?
            && free < carried + MIN_FREE_BYTES
        {
            survey.refusals.push(format!(
                "{} would not fit: its file system has {} free, the copy needs at least {} (the data) and {} to run in",
                attempt.to,
                bytes(free),
                bytes(carried),
                bytes(MIN_FREE_BYTES)
            ));
        }
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
            Ok(choice) => survey.copy = Some(choice),
            Err(refusal) => survey.refusals.push(refusal),
        }
    }
    Ok(survey)
}

pub(super) async fn run<I: Instances, R: Router>(cx: &Ctx<'_, I, R>) -> EngineResult<Stepped> {
    let mut survey = survey(cx).await?;
    if !survey.missing_tools.is_empty() {
        return Err(EngineError::ToolMissing(survey.missing_tools));
    }
    if cx.attempt.kind == AttemptKind::Full {
        survey.refusals.extend(target_in_the_way(cx).await?);
    }
    if !survey.refusals.is_empty() {
        return Err(EngineError::Refused(survey.refusals));
    }
    // Passed: now (and only now) prepare the source.
    for (client, f) in &survey.findings {
        preflight::ensure_replica_identity_full(client, &f.needs_replica_identity_full).await?;
        repl::ensure_own_schema(client).await?;
    }
    for w in &survey.warnings {
        tracing::warn!("{w}");
    }
    Ok(Stepped::Done(Learned::Preflight {
        warnings: survey.warnings,
        left_behind: survey.left_behind,
        copy: survey.copy,
        carried_bytes: survey.sizes.iter().map(|d| d.bytes).sum(),
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
