//! Logical replication between the two colors: publications, subscriptions, slots, the
//! switch marker, progress and lag. One *link* per direction and database:
//! the publication and the slot live on the source, the subscription on the target, and
//! all three share one name, so every object can be found and dropped on every path.

use super::pg::{conninfo, ident, literal};
use crate::ports::{Addr, Credentials};
use anyhow::Context;
use pgflip_core::plan::Color;
use sha2::{Digest, Sha256};
use std::time::Duration;
use tokio_postgres::Client;

mod initial_copy;

pub use initial_copy::{
    TableCopy, copied_of, copy_bytes, lost_table_copies, restart_copy, sync_progress,
};

/// Server settings every instance starts with, in both run modes: logical replication
/// from the first start, so the serving color never needs a restart for a switch.
pub const SERVER_SETTINGS: &[(&str, &str)] = &[
    ("wal_level", "logical"),
    ("max_wal_senders", "20"),
    ("max_replication_slots", "20"),
    ("max_logical_replication_workers", "8"),
    ("max_sync_workers_per_subscription", "4"),
    ("max_worker_processes", "16"),
    ("max_connections", "200"),
    ("shared_buffers", "128MB"),
    ("wal_sender_timeout", "60s"),
    // The initial copy writes a whole database's worth of WAL on the new color: fewer
    // checkpoints during it (and fewer full-page images after each) make it faster.
    ("max_wal_size", "'4GB'"),
    ("password_encryption", "'scram-sha-256'"),
];

/// The name of the link `from → to` for database `db`: a valid slot name (lowercase,
/// digits, underscore, < 64 bytes) whatever the database is called.
pub fn link_name(from: Color, to: Color, db: &str) -> String {
    let h = hex::encode(&Sha256::digest(db.as_bytes())[..4]);
    format!("pgflip_{}_to_{}_{h}", from.as_str(), to.as_str())
}

/// The physical slot that holds the source's WAL for `to`'s base backup until the copy
/// has been replayed to its cut.
pub fn base_slot_name(to: Color) -> String {
    format!("pgflip_base_{}", to.as_str())
}

/// An LSN as PostgreSQL writes it (`16/B374D848`), as a number, to compare.
pub fn parse_lsn(text: &str) -> anyhow::Result<u64> {
    let (hi, lo) = text
        .split_once('/')
        .with_context(|| format!("{text:?} is not an LSN"))?;
    let hi = u64::from_str_radix(hi, 16).with_context(|| format!("{text:?} is not an LSN"))?;
    let lo = u64::from_str_radix(lo, 16).with_context(|| format!("{text:?} is not an LSN"))?;
    Ok((hi << 32) | lo)
}

/// Where a logical slot that nothing has consumed yet starts: the first commit it sends is
/// the first whose record starts at or after this LSN.
pub async fn slot_start(client: &Client, name: &str) -> anyhow::Result<String> {
    client
        .query_opt(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&name],
        )
        .await?
        .and_then(|r| r.get::<_, Option<String>>(0))
        .with_context(|| format!("replication slot {name} is missing"))
}

/// The most WAL any of these slots holds on the server (bytes from its restart point to
/// the current WAL position); None when none of them exists.
pub async fn retained_wal(client: &Client, slots: &[String]) -> anyhow::Result<Option<i64>> {
    Ok(client
        .query_one(
            "SELECT max(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn))::bigint
               FROM pg_replication_slots WHERE slot_name = ANY($1)",
            &[&slots],
        )
        .await?
        .get(0))
}

/// pgflip's own objects in every carried database, on both colors (every table of a
/// `FOR ALL TABLES` publication must exist on the subscriber). The marker table is
/// replicated like any table: a row written on the source and seen on the target proves
/// that everything committed before it on the source has been applied on the target
/// (apply is in commit order). `schema_copied` is written by the schema copy.
///
/// A verification cut's marker (`cut-…`) takes the advisory lock [`VERIFY_CUT_LOCK`] as it is
/// inserted, on either side and by the apply worker too (`ENABLE ALWAYS`): while the
/// verification holds that lock on the target, the apply stops exactly before the marker,
/// so the target's snapshot can be taken there without holding the source's writers.
pub const ENSURE_OWN_SCHEMA: &str = "CREATE SCHEMA IF NOT EXISTS _pgflip; \
    CREATE TABLE IF NOT EXISTS _pgflip.switch_marker (token text PRIMARY KEY, at timestamptz NOT NULL DEFAULT now()); \
    CREATE TABLE IF NOT EXISTS _pgflip.schema_copied (fingerprint text NOT NULL, copied_at timestamptz NOT NULL DEFAULT now()); \
    CREATE OR REPLACE FUNCTION _pgflip.stop_at_verify_marker() RETURNS trigger LANGUAGE plpgsql AS $f$ \
      BEGIN IF NEW.token LIKE 'cut-%' THEN PERFORM pg_catalog.pg_advisory_xact_lock(1885758054); END IF; RETURN NEW; END $f$; \
    CREATE OR REPLACE TRIGGER stop_at_verify_marker BEFORE INSERT ON _pgflip.switch_marker \
      FOR EACH ROW EXECUTE FUNCTION _pgflip.stop_at_verify_marker(); \
    ALTER TABLE _pgflip.switch_marker ENABLE ALWAYS TRIGGER stop_at_verify_marker";

/// The advisory lock a verification marker takes on insert (see [`ENSURE_OWN_SCHEMA`]):
/// "pgfl" as a 32-bit number, so it shows in `pg_locks` as `objid` with `classid` 0.
pub const VERIFY_CUT_LOCK: i64 = 1885758054;

pub async fn ensure_own_schema(client: &Client) -> anyhow::Result<()> {
    client
        .batch_execute(ENSURE_OWN_SCHEMA)
        .await
        .context("creating schema pgflip")
}

pub async fn publication_exists(client: &Client, name: &str) -> anyhow::Result<bool> {
    Ok(client
        .query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&name])
        .await?
        .is_some())
}

/// `FOR ALL TABLES` with `publish_via_partition_root`, so partitioned tables replicate
/// through their root (partitions may be laid out differently on the other side).
pub async fn ensure_publication(source: &Client, name: &str) -> anyhow::Result<()> {
    if !publication_exists(source, name).await? {
        source
            .batch_execute(&format!(
                "CREATE PUBLICATION {} FOR ALL TABLES WITH (publish_via_partition_root = true)",
                ident(name)
            ))
            .await
            .with_context(|| format!("creating publication {name}"))?;
    }
    Ok(())
}

pub async fn drop_publication(source: &Client, name: &str) -> anyhow::Result<()> {
    source
        .batch_execute(&format!("DROP PUBLICATION IF EXISTS {}", ident(name)))
        .await?;
    Ok(())
}

pub async fn subscription_exists(target: &Client, name: &str) -> anyhow::Result<bool> {
    Ok(target
        .query_opt(
            "SELECT 1 FROM pg_subscription WHERE subname = $1 AND subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[&name],
        )
        .await?
        .is_some())
}

/// How a new subscription starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// Create the slot now and copy every table first (initial sync).
    CopyAll,
    /// Stream from an existing slot, no copy: the slot was created at exactly the switch
    /// point, so the target receives precisely what was written after it — or before it,
    /// and then only the source's own writes are taken (`local_changes_only`: `origin =
    /// none`, PostgreSQL 16 and later), which begin at the switch.
    FromExistingSlot { local_changes_only: bool },
    /// Stream from an existing slot, no copy, beginning with the first commit whose
    /// record starts at or after this LSN: the target already holds everything before it
    /// (a physical copy stopped right there). The slot may start earlier (one slot per
    /// database, made one after another): the subscription's replication origin is
    /// advanced to the LSN before it is enabled, so the slot skips what came before.
    FromLsn(String),
}

pub async fn ensure_subscription(
    target: &Client,
    name: &str,
    source: &Addr,
    creds: &Credentials,
    db: &str,
    start: Start,
) -> anyhow::Result<()> {
    if !subscription_exists(target, name).await? {
        let options = match &start {
            Start::CopyAll => "copy_data = true, create_slot = true".to_string(),
            Start::FromExistingSlot { local_changes_only } => format!(
                "copy_data = false, create_slot = false, slot_name = {}{}",
                literal(name),
                if *local_changes_only {
                    ", origin = none"
                } else {
                    ""
                }
            ),
            // Enabled once its origin is where the target's copy ends (below).
            Start::FromLsn(_) => format!(
                "copy_data = false, create_slot = false, enabled = false, slot_name = {}",
                literal(name)
            ),
        };
        // The connection string holds the password: it goes to the server's catalog
        // (readable by superusers only), never to logs or errors.
        let sql = format!(
            "CREATE SUBSCRIPTION {} CONNECTION {} PUBLICATION {} WITH ({options})",
            ident(name),
            literal(&conninfo(source, creds, db)),
            ident(name)
        );
        target.batch_execute(&sql).await.map_err(|e| {
            anyhow::anyhow!(
                "creating subscription {name} on the target: {}",
                db_error_text(&e)
            )
        })?;
    }
    if let Start::FromLsn(lsn) = &start {
        // Still disabled (created above, or by a pass that stopped before enabling it):
        // nothing has been applied, so the origin can be set. Once enabled, never again.
        let enabled: bool = target
            .query_one(
                "SELECT subenabled FROM pg_subscription WHERE subname = $1 AND subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())",
                &[&name],
            )
            .await?
            .get(0);
        if !enabled {
            target
                .query(
                    "SELECT pg_replication_origin_advance('pg_' || oid, $2::text::pg_lsn) FROM pg_subscription WHERE subname = $1 AND subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())",
                    &[&name, lsn],
                )
                .await?;
            target
                .batch_execute(&format!("ALTER SUBSCRIPTION {} ENABLE", ident(name)))
                .await?;
        }
    }
    Ok(())
}

/// Enables or disables the subscription if it exists and is not so already.
pub async fn set_subscription_enabled(
    target: &Client,
    name: &str,
    enabled: bool,
) -> anyhow::Result<()> {
    let now: Option<bool> = target
        .query_opt(
            "SELECT subenabled FROM pg_subscription WHERE subname = $1 AND subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[&name],
        )
        .await?
        .map(|r| r.get(0));
    if now.is_some_and(|now| now != enabled) {
        let verb = if enabled { "ENABLE" } else { "DISABLE" };
        target
            .batch_execute(&format!("ALTER SUBSCRIPTION {} {verb}", ident(name)))
            .await?;
    }
    Ok(())
}

/// Drops the subscription without touching the remote slot (the source may be gone);
/// callers drop the slot on the source with [`drop_slot`].
pub async fn drop_subscription(target: &Client, name: &str) -> anyhow::Result<()> {
    if subscription_exists(target, name).await? {
        let n = ident(name);
        target
            .batch_execute(&format!("ALTER SUBSCRIPTION {n} DISABLE"))
            .await?;
        target
            .batch_execute(&format!("ALTER SUBSCRIPTION {n} SET (slot_name = NONE)"))
            .await?;
        target
            .batch_execute(&format!("DROP SUBSCRIPTION {n}"))
            .await?;
    }
    Ok(())
}

/// Drops every subscription and every pgflip publication in the current database of a
/// server made as a physical copy of another (they are that other server's).
pub async fn drop_copied_links(client: &Client) -> anyhow::Result<()> {
    let subscriptions = client
        .query(
            "SELECT subname::text FROM pg_subscription WHERE subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[],
        )
        .await?;
    for row in subscriptions {
        drop_subscription(client, row.get(0)).await?;
    }
    let publications = client
        .query(
            "SELECT pubname::text FROM pg_publication WHERE pubname LIKE 'pgflip\\_%'",
            &[],
        )
        .await?;
    for row in publications {
        drop_publication(client, row.get(0)).await?;
    }
    Ok(())
}

/// Drops a replication slot, ending the walsender that holds it first. A slot left behind
/// keeps WAL on the source forever, so this runs on every path.
pub async fn drop_slot(source: &Client, name: &str) -> anyhow::Result<()> {
    for _ in 0..50 {
        let row = source
            .query_opt(
                "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
                &[&name],
            )
            .await?;
        let Some(row) = row else { return Ok(()) };
        let pid: Option<i32> = row.get(0);
        if let Some(pid) = pid {
            source
                .query("SELECT pg_terminate_backend($1)", &[&pid])
                .await?;
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        match source
            .query("SELECT pg_drop_replication_slot($1)", &[&name])
            .await
        {
            Ok(_) => return Ok(()),
            Err(e) if e.to_string().contains("is active") => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) if e.to_string().contains("does not exist") => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
    anyhow::bail!("replication slot {name} stayed active")
}

pub async fn slot_exists(client: &Client, name: &str) -> anyhow::Result<bool> {
    Ok(client
        .query_opt(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
            &[&name],
        )
        .await?
        .is_some())
}

/// Creates a logical slot on the (future) source for reverse replication, in the current
/// database. Runs inside the pause: the slot's start is the switch point.
pub async fn ensure_slot(client: &Client, name: &str) -> anyhow::Result<()> {
    if !slot_exists(client, name).await? {
        client
            .query(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&name],
            )
            .await
            .with_context(|| format!("creating replication slot {name}"))?;
    }
    Ok(())
}

/// The instance's WAL insert position (`pg_lsn` text): every record inserted so far ends
/// at or before it, flushed or not.
pub async fn wal_insert_position(client: &Client) -> anyhow::Result<String> {
    Ok(client
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await?
        .get(0))
}

/// How many times the subscription's apply has failed since it was made (PostgreSQL 15+,
/// every major pgflip runs).
pub async fn apply_errors(target: &Client, name: &str) -> anyhow::Result<i64> {
    Ok(target
        .query_opt(
            "SELECT apply_error_count FROM pg_stat_subscription_stats WHERE subname = $1",
            &[&name],
        )
        .await?
        .map_or(0, |r| r.get(0)))
}

/// Bytes of WAL the target still has to confirm, measured on the source.
pub async fn lag_bytes(source: &Client, slot: &str) -> anyhow::Result<Option<i64>> {
    let row = source
        .query_opt(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(row.and_then(|r| r.get::<_, Option<i64>>(0)))
}

/// A marker token no other marker has: `<purpose>-<unix ms>-<random>`.
pub fn marker_token(purpose: &str) -> String {
    format!(
        "{purpose}-{}-{}",
        crate::clock::now_ms(),
        crate::random::token(8)
    )
}

/// Writes a marker on the source (autocommit).
pub async fn write_marker(source: &Client, token: &str) -> anyhow::Result<()> {
    source
        .simple_query(&format!(
            "INSERT INTO _pgflip.switch_marker (token) VALUES ({})",
            literal(token)
        ))
        .await?;
    Ok(())
}

/// Polls the target until the marker has been applied, i.e. until everything committed
/// on the source before it is visible on the target.
pub async fn wait_marker(
    target: &Client,
    token: &str,
    timeout: Duration,
) -> anyhow::Result<Duration> {
    let started = tokio::time::Instant::now();
    let sql = format!(
        "SELECT 1 FROM _pgflip.switch_marker WHERE token = {}",
        literal(token)
    );
    loop {
        let rows = target.simple_query(&sql).await?;
        if rows
            .iter()
            .any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
        {
            return Ok(started.elapsed());
        }
        if started.elapsed() > timeout {
            anyhow::bail!("the target did not apply the switch marker within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
}

/// A marker round that the target applies within this is "caught up": what is left
/// behind is about one round's worth of commits.
const CAUGHT_UP_ROUND: Duration = Duration::from_millis(50);

/// Writes markers on each source and waits for its target, round after round, until a
/// round trip is short: one round only proves the target has applied what was committed
/// before it, and a target far behind (after a long verification, say) takes seconds
/// for that round, during which the source commits seconds more. Whatever is left is
/// then small, so the hold that follows (a lock, a pause) waits only for it.
pub async fn catch_up(
    links: &[(&Client, &Client)],
    label: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let started = tokio::time::Instant::now();
    const MAX_ROUNDS: u32 = 20;
    let mut round = 0;
    loop {
        round += 1;
        let token = marker_token(label);
        let round_started = tokio::time::Instant::now();
        for (source, _) in links {
            write_marker(source, &token).await?;
        }
        let left = timeout.saturating_sub(started.elapsed());
        for (_, target) in links {
            wait_marker(target, &token, left).await?;
        }
        if round_started.elapsed() <= CAUGHT_UP_ROUND || round == MAX_ROUNDS {
            return Ok(());
        }
    }
}

/// The server's own message for a database error (tokio-postgres' Display says only "db error").
pub fn db_error_text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => match db.detail() {
            Some(d) => format!("{}: {}", db.message(), d),
            None => db.message().to_string(),
        },
        None => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_names_are_valid_slot_names() {
        let n = link_name(Color::Blue, Color::Green, "Weird \"DB\" name ünïcode");
        assert!(n.len() < 64);
        assert!(
            n.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        );
        assert_ne!(n, link_name(Color::Blue, Color::Green, "other"));
        assert_ne!(
            n,
            link_name(Color::Green, Color::Blue, "Weird \"DB\" name ünïcode")
        );
    }
}
