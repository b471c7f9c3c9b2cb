//! Copy schema: the source's roles, then each database's schema, onto the target, in one
//! transaction per database. Remembers the source's fingerprint taken before the dump: a
//! later change there blocks the switch.

use super::Ctx;
use crate::error::{EngineError, EngineResult};
use crate::pg::ensure_database;
use crate::ports::{Instances, Router};
use crate::replication as repl;
use crate::schema;
use crate::steps::{Learned, Stepped};
use tokio_postgres::Client;

pub(super) async fn run<I: Instances, R: Router>(cx: &Ctx<'_, I, R>) -> EngineResult<Stepped> {
    let attempt = cx.attempt;
    let target = cx.target().await?;
    let target_admin = cx.connect(&target, "postgres").await?;
    copy_roles(cx, &target_admin)
        .await
        .map_err(|e| does_not_load(cx, "the roles", e))?;
    let mut fingerprints = Vec::new();
    for db in &cx.desired.databases {
        ensure_database(&target_admin, db).await?;
        let fp = schema::fingerprint(&cx.connect(&cx.source, db).await?).await?;
        let sql = schema::dump_schema(
            &cx.parts.toolchain,
            &cx.source,
            cx.admin(),
            db,
            attempt.from.major,
        )
        .await?;
        let sql = schema::prepare_for_target(&sql, attempt.to.major);
        let tgt = cx.connect(&target, db).await?;
        schema::load_once(&tgt, &sql, &fp)
            .await
            .map_err(|e| does_not_load(cx, "the schema", e.context(format!("database {db}"))))?;
        repl::ensure_own_schema(&tgt).await?;
        fingerprints.push(format!("{db}={fp}"));
    }
    Ok(Stepped::Done(Learned::SchemaCopied {
        source_fingerprint: fingerprints.join(";"),
    }))
}

/// Every role of the source, with its password, onto the target (idempotent). Also run
/// right before the switchover: roles created on the source since the copy must exist.
pub(super) async fn copy_roles<I: Instances, R: Router>(
    cx: &Ctx<'_, I, R>,
    target_admin: &Client,
) -> anyhow::Result<()> {
    let roles = schema::dump_roles(
        &cx.parts.toolchain,
        &cx.source,
        cx.admin(),
        cx.attempt.from.major,
    )
    .await?;
    // The target's install superuser stays as it is: on a server the user runs, it is
    // the user's own login (on pgflip's instances it is pgflip's, left alone anyway).
    let install_superuser: String = target_admin
        .query_one("SELECT rolname::text FROM pg_roles WHERE oid = 10", &[])
        .await?
        .get(0);
    schema::load_roles(
        target_admin,
        &schema::prepare_roles_for_target(&roles, cx.attempt.to.major, &[install_superuser]),
    )
    .await
}

fn does_not_load<I, R>(cx: &Ctx<'_, I, R>, what: &'static str, e: anyhow::Error) -> EngineError {
    EngineError::SchemaDoesNotLoad {
        what,
        from: cx.attempt.from,
        to: cx.attempt.to.major,
        detail: format!("{e:#}"),
    }
}
