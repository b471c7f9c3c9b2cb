//! How far the initial copy of a link has got: tables ready, and bytes copied of the
//! published tables' size.

use super::{Start, drop_slot, drop_subscription, ensure_subscription};
use crate::pg::ident;
use crate::ports::{Addr, Credentials};
use std::time::Duration;
use tokio_postgres::Client;

/// Initial-sync progress on the target: (tables ready, tables in the subscription).
pub async fn sync_progress(target: &Client, name: &str) -> anyhow::Result<(i64, i64)> {
    let row = target
        .query_one(
            "SELECT count(*) FILTER (WHERE r.srsubstate IN ('r', 's')), count(*)
               FROM pg_subscription_rel r JOIN pg_subscription s ON s.oid = r.srsubid
              WHERE s.subname = $1",
            &[&name],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}

/// Bytes of the initial copy of the link `name`: (copied, total). The total is the size of
/// the published tables on the source (a partitioned table's leaves summed); a table
/// whose copy is done counts whole, one being copied as much as has reached the target's
/// files so far (at most its source's size).
pub async fn copy_bytes(
    source: &Client,
    target: &Client,
    name: &str,
) -> anyhow::Result<(u64, u64)> {
    const TREE_SIZE: &str = "(CASE WHEN c.relkind = 'p' \
         THEN (SELECT coalesce(sum(pg_table_size(t.relid)), 0) FROM pg_partition_tree(c.oid) t) \
         ELSE pg_table_size(c.oid) END)::bigint";
    let sizes = source
        .query(
            &format!(
                "SELECT format('%I.%I', p.schemaname, p.tablename), {TREE_SIZE}
                   FROM pg_publication_tables p
                   JOIN pg_namespace n ON n.nspname = p.schemaname
                   JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = p.tablename
                  WHERE p.pubname = $1"
            ),
            &[&name],
        )
        .await?;
    let copying = target
        .query(
            &format!(
                "SELECT format('%I.%I', n.nspname, c.relname), r.srsubstate::text, {TREE_SIZE}
                   FROM pg_subscription_rel r JOIN pg_subscription s ON s.oid = r.srsubid
                   JOIN pg_class c ON c.oid = r.srrelid
                   JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE s.subname = $1"
            ),
            &[&name],
        )
        .await?;
    let sizes: Vec<(String, i64)> = sizes.iter().map(|r| (r.get(0), r.get(1))).collect();
    let copying: Vec<TableCopy> = copying
        .iter()
        .map(|r| TableCopy {
            table: r.get(0),
            done: matches!(r.get::<_, String>(1).as_str(), "r" | "s"),
            bytes: r.get(2),
        })
        .collect();
    Ok(copied_of(&sizes, &copying))
}

/// Tables of the link `name` whose copy PostgreSQL can no longer finish: the table-sync
/// worker recorded the copy as finished (`f`), then dropped its slot on the source and
/// was killed before it recorded the next state (the subscription commits
/// asynchronously, and the slot is dropped before that commit). Restarted, the worker
/// looks for the slot and fails every few seconds for ever. The sync worker drops the
/// slot and commits right after, so a table seen this way once may be passing through:
/// it counts as lost only when it is seen so on two looks `settle` apart.
pub async fn lost_table_copies(
    source: &Client,
    target: &Client,
    name: &str,
    settle: Duration,
) -> anyhow::Result<Vec<String>> {
    let mut lost = finished_without_slot(source, target, name).await?;
    if !lost.is_empty() {
        tracing::info!(tables = ?lost, "a table's copy looks lost (finished, no sync slot): looking again");
        tokio::time::sleep(settle).await;
        let again = finished_without_slot(source, target, name).await?;
        lost.retain(|table| again.contains(table));
    }
    Ok(lost)
}

async fn finished_without_slot(
    source: &Client,
    target: &Client,
    name: &str,
) -> anyhow::Result<Vec<String>> {
    let mut lost = Vec::new();
    for (table, prefix) in finished(target, name).await? {
        let has_slot: bool = source
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE starts_with(slot_name::text, $1))",
                &[&prefix],
            )
            .await?
            .get(0);
        if !has_slot {
            lost.push(table);
        }
    }
    if lost.is_empty() {
        return Ok(lost);
    }
    // Read again after the slots: a worker that dropped its slot between the two reads
    // has committed the table's next state by now (it commits right after the drop).
    let still: Vec<String> = finished(target, name)
        .await?
        .into_iter()
        .map(|(t, _)| t)
        .collect();
    lost.retain(|t| still.contains(t));
    Ok(lost)
}

/// The link's tables whose copy is recorded as finished (`f`), each with the prefix of
/// its table-sync slot's name: `pg_<subscription>_sync_<table>_<subscriber's system id>`
/// (PostgreSQL's ReplicationSlotNameForTablesync; the prefix spares reading the system
/// id, which needs more than the replication privileges).
async fn finished(target: &Client, name: &str) -> anyhow::Result<Vec<(String, String)>> {
    Ok(target
        .query(
            "SELECT format('%I.%I', n.nspname, c.relname), 'pg_' || s.oid || '_sync_' || r.srrelid || '_'
               FROM pg_subscription_rel r JOIN pg_subscription s ON s.oid = r.srsubid
               JOIN pg_class c ON c.oid = r.srrelid
               JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE s.subname = $1 AND r.srsubstate = 'f'
                AND s.subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[&name],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// Starts the initial copy of the link `name` over: the subscription disabled, the
/// target's copies of the published tables emptied, the subscription and its slot on the
/// source dropped, and a new subscription made that copies everything again. Safe to
/// repeat from any point it stopped at: the tables are emptied before any new copy.
pub async fn restart_copy(
    source: &Client,
    target: &Client,
    name: &str,
    source_addr: &Addr,
    creds: &Credentials,
    db: &str,
) -> anyhow::Result<()> {
    super::set_subscription_enabled(target, name, false).await?;
    let published = source
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1",
            &[&name],
        )
        .await?;
    if !published.is_empty() {
        let tables: Vec<String> = published
            .iter()
            .map(|r| format!("{}.{}", ident(r.get(0)), ident(r.get(1))))
            .collect();
        // CASCADE: a table the target holds only as a copy may be referenced by one
        // left behind (an unlogged table), which is empty there anyway.
        target
            .batch_execute(&format!("TRUNCATE {} CASCADE", tables.join(", ")))
            .await?;
    }
    drop_subscription(target, name).await?;
    drop_slot(source, name).await?;
    ensure_subscription(target, name, source_addr, creds, db, Start::CopyAll).await
}

/// One table of a subscription as the target sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct TableCopy {
    pub table: String,
    /// Copied and streaming (or synchronised).
    pub done: bool,
    /// Its size on the target so far.
    pub bytes: i64,
}

/// (copied, total) from the source's table sizes and the target's view of each copy.
pub fn copied_of(source_sizes: &[(String, i64)], target: &[TableCopy]) -> (u64, u64) {
    let mut total = 0u64;
    let mut done = 0u64;
    for (table, size) in source_sizes {
        let size = (*size).max(0) as u64;
        total += size;
        done += match target.iter().find(|t| &t.table == table) {
            Some(t) if t.done => size,
            Some(t) => (t.bytes.max(0) as u64).min(size),
            None => 0,
        };
    }
    (done, total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copied_bytes_count_done_tables_whole_and_others_as_far_as_they_got() {
        let sizes = [
            ("public.a".to_string(), 1000),
            ("public.b".to_string(), 500),
            ("public.c".to_string(), 300),
        ];
        let target = [
            TableCopy {
                table: "public.a".into(),
                done: true,
                bytes: 800,
            },
            TableCopy {
                table: "public.b".into(),
                done: false,
                bytes: 900,
            },
        ];
        // a: whole (its copy may be smaller than a bloated source); b: capped at its
        // source's size; c: not started.
        assert_eq!(copied_of(&sizes, &target), (1500, 1800));
        assert_eq!(copied_of(&[], &target), (0, 0));
    }
}
