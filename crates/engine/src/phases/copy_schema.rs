//! Copy schema: the source's roles, then each database's schema, onto the target, in one
//! transaction per database. Remembers the source's fingerprint taken before the dump: a
//! later change there blocks the switch.
//!
//! A physical copy carries roles, schema and data at once instead ([`copy_physically`]).

use super::Ctx;
use crate::error::{EngineError, EngineResult};
use crate::pg::ensure_database;
use crate::ports::{Instances, Router};
use crate::replication as repl;
use crate::schema;
use crate::steps::{Learned, Stepped};
use anyhow::Context;
use tokio_postgres::Client;

pub(super) async fn run<I: Instances, R: Router>(cx: &Ctx<'_, I, R>) -> EngineResult<Stepped> {
    if cx.copies_physically() {
        return copy_physically(cx).await;
    }
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
        cut_lsn: None,
    }))
}

/// The physical copy's cut, and the target made from the base backup taken in Provision.
///
/// The forward link's publication and logical slot are made on the source now, after the
/// backup, one database after another; the cut L is the latest slot's start. The backup is
/// replayed up to L and not including the record there (a commit record at L is sent by
/// the slots, so replaying it too would apply it twice), then upgraded; each subscription
/// then starts at L ([`repl::Start::FromLsn`]): every commit before L is in the copy, every
/// one from L on comes through the slots, none twice.
///
/// Runs again after a crash: the publications and slots exist and nothing has consumed the
/// slots yet (the subscriptions come in Replicate), so L is found again unchanged.
async fn copy_physically<I: Instances, R: Router>(cx: &Ctx<'_, I, R>) -> EngineResult<Stepped> {
    let (from, to) = (&cx.attempt.from, &cx.attempt.to);
    let mut fingerprints = Vec::new();
    let mut cut: Option<(u64, String)> = None;
    for db in &cx.desired.databases {
        let src = cx.connect(&cx.source, db).await?;
        fingerprints.push(format!("{db}={}", schema::fingerprint(&src).await?));
        let name = cx.forward(db);
        // The publication before the slot: the slot decodes with the catalog as of each
        // change, and a publication made after it would not cover what came before.
        repl::ensure_publication(&src, &name).await?;
        repl::ensure_slot(&src, &name).await?;
        let start = repl::slot_start(&src, &name).await?;
        let at = repl::parse_lsn(&start)?;
        if cut.as_ref().is_none_or(|(latest, _)| at > *latest) {
            cut = Some((at, start));
        }
    }
    let (_, cut) = cut.context("no database to copy")?;
    crate::failpoint::hit("physical:slots-made");
    let base_slot = repl::base_slot_name(to.color);
    let mut slots: Vec<String> = cx
        .desired
        .databases
        .iter()
        .map(|db| cx.forward(db))
        .collect();
    slots.push(base_slot.clone());
    let upgrade = async {
        Ok(cx
            .parts
            .instances
            .upgrade_backup(from, to, &cx.source, &base_slot, &cut, cx.desired)
            .await?)
    };
    let target = cx.within_retained_wal(&slots, upgrade).await?;
    let source_admin = cx.connect(&cx.source, "postgres").await?;
    repl::drop_slot(&source_admin, &base_slot).await?;
    // The copy holds the source's replication objects as of L (the forward publication
    // among them): none of them is the target's.
    for db in &cx.desired.databases {
        let tgt = cx.connect(&target, db).await?;
        repl::drop_copied_links(&tgt).await?;
        repl::ensure_own_schema(&tgt).await?;
        for updated in schema::update_extensions(&tgt).await? {
            tracing::info!(database = %db, "extension updated after pg_upgrade: {updated}");
        }
    }
    Ok(Stepped::Done(Learned::SchemaCopied {
        source_fingerprint: fingerprints.join(";"),
        cut_lsn: Some(cut),
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
