//! Loading a prepared dump into the target: all of it in one transaction, once.
//!
//! All or nothing, because a dump that does not load (typically a downgrade: the newer
//! server's schema uses syntax the older one lacks) must leave nothing behind that a
//! retry would trip over or that could be mistaken for a copy.
//!
//! Once, because the copy is a step of a resumable plan: a copy that committed is
//! recorded in the same transaction, in `_pgflip.schema_copied`, with the fingerprint of
//! blue's schema it was taken from. A later pass finds the marker and leaves the database
//! alone; a marker with another fingerprint means blue's schema changed after the copy.

use crate::catalog::USER_NAMESPACES;
use crate::pg::{self, literal};
use crate::sql_script::run_in_transaction;
use anyhow::{Context, anyhow, bail};
use tokio_postgres::Client;

/// What [`load_once`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchemaLoad {
    Loaded,
    /// The marker says this schema (same fingerprint) was loaded before: nothing was done.
    AlreadyLoaded,
}

/// Loads a prepared schema dump into the database `target` is connected to, in one
/// transaction. On failure nothing is left behind and the error names the failing
/// statement: "the schema does not load on PostgreSQL 15: …".
pub async fn load(target: &Client, sql: &str) -> anyhow::Result<()> {
    run_script(target, sql, "the schema does not load").await
}

/// Loads a prepared roles dump (cluster-wide; any database of the target will do), in one
/// transaction.
pub async fn load_roles(target: &Client, sql: &str) -> anyhow::Result<()> {
    run_script(target, sql, "the roles do not load").await
}

/// The fingerprint of blue's schema that the target's copy was made from, if a copy was
/// committed into this database.
pub async fn copied_fingerprint(target: &Client) -> anyhow::Result<Option<String>> {
    let exists = target
        .query_one(
            "SELECT to_regclass('_pgflip.schema_copied') IS NOT NULL",
            &[],
        )
        .await?
        .get::<_, bool>(0);
    if !exists {
        return Ok(None);
    }
    let row = target
        .query_opt("SELECT fingerprint FROM _pgflip.schema_copied", &[])
        .await?;
    Ok(row.map(|r| r.get(0)))
}

/// Loads the schema unless this database already holds a copy of it.
///
/// `source_fingerprint` is blue's [`super::fingerprint`], taken *before* the dump: a DDL
/// that slips in between then shows up later as a changed fingerprint (a false alarm at
/// worst, never a missed change).
///
/// Refuses a database that holds user objects without a marker (someone else's data), and
/// one whose marker carries another fingerprint (blue's schema changed since the copy).
pub async fn load_once(
    target: &Client,
    sql: &str,
    source_fingerprint: &str,
) -> anyhow::Result<SchemaLoad> {
    let db: String = target
        .query_one("SELECT current_database()", &[])
        .await?
        .get(0);
    match copied_fingerprint(target).await? {
        Some(fp) if fp == source_fingerprint => return Ok(SchemaLoad::AlreadyLoaded),
        Some(fp) => bail!(
            "database {db} on the target already holds a copy of an earlier schema \
             (fingerprint {}, blue's is now {}): blue's schema changed after it was copied",
            short(&fp),
            short(source_fingerprint)
        ),
        None => {}
    }
    let user_objects: i64 = target
        .query_one(
            &format!(
                "WITH ns AS ({USER_NAMESPACES}) \
                 SELECT (SELECT count(*) FROM pg_catalog.pg_class c JOIN ns ON ns.oid = c.relnamespace) \
                      + (SELECT count(*) FROM pg_catalog.pg_proc p JOIN ns ON ns.oid = p.pronamespace)"
            ),
            &[],
        )
        .await?
        .get(0);
    if user_objects > 0 {
        bail!(
            "database {db} on the target is not empty ({user_objects} objects) and was not made by pgflip"
        );
    }
    // The marker commits with the schema, or neither does.
    let script = format!(
        "{sql}\n;\nCREATE SCHEMA IF NOT EXISTS _pgflip;\n\
         CREATE TABLE IF NOT EXISTS _pgflip.schema_copied (\n\
             fingerprint text NOT NULL,\n\
             copied_at timestamptz NOT NULL DEFAULT now()\n\
         );\n\
         DELETE FROM _pgflip.schema_copied;\n\
         INSERT INTO _pgflip.schema_copied (fingerprint) VALUES ({});\n",
        literal(source_fingerprint)
    );
    load(target, &script).await?;
    Ok(SchemaLoad::Loaded)
}

async fn run_script(target: &Client, sql: &str, what: &str) -> anyhow::Result<()> {
    let major = pg::server_major(target)
        .await
        .context("reading the target's version")?;
    // The cause goes into the message itself: it is what users read on the commit.
    run_in_transaction(target, sql).await.map_err(|e| {
        anyhow!("{what} on PostgreSQL {major}: {e} (nothing was changed on the target)")
    })
}

fn short(fingerprint: &str) -> &str {
    &fingerprint[..fingerprint.len().min(12)]
}
