//! Warming green before it takes clients: a copied server's cache holds what the copy
//! happened to touch (a physical copy, upgraded and restarted, holds nothing), so the first
//! queries after the switch would read from disk. Before the switch, the relations that
//! are hot on the source — ranked by the buffer hits it counted (`pg_statio_user_tables`,
//! no extension needed there) — are read into the target's shared buffers with
//! `pg_prewarm`, tables with their indexes, up to most of `shared_buffers`.
//!
//! An optimisation only: where `pg_prewarm` is not installed for the target's major, or
//! cannot be created, nothing is warmed and the switch goes on. The extension is created in
//! pgflip's own schema for the occasion and dropped after, unless the database had it.

use crate::catalog::PGFLIP_SCHEMA;
use crate::pg::ident;
use tokio_postgres::Client;

/// What was read into the target's cache.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Warmed {
    pub relations: u64,
    pub bytes: u64,
}

/// Warms `target`'s cache for the current database with what is hot on `source`, using
/// at most `budget_bytes`. None when `pg_prewarm` is not available on the target.
pub async fn warm(
    source: &Client,
    target: &Client,
    budget_bytes: u64,
) -> anyhow::Result<Option<Warmed>> {
    let available = target
        .query_opt(
            "SELECT 1 FROM pg_available_extensions WHERE name = 'pg_prewarm'",
            &[],
        )
        .await?
        .is_some();
    if !available {
        return Ok(None);
    }
    // Hottest first: the buffer hits of the table, its indexes and its TOAST.
    let hot = source
        .query(
            "SELECT schemaname::text, relname::text
               FROM pg_statio_user_tables
              WHERE schemaname <> $1
              ORDER BY coalesce(heap_blks_hit, 0) + coalesce(idx_blks_hit, 0)
                     + coalesce(toast_blks_hit, 0) + coalesce(tidx_blks_hit, 0) DESC,
                       schemaname, relname",
            &[&PGFLIP_SCHEMA],
        )
        .await?;
    let installed_in: Option<String> = target
        .query_opt(
            "SELECT n.nspname::text FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
              WHERE e.extname = 'pg_prewarm'",
            &[],
        )
        .await?
        .map(|r| r.get(0));
    let schema = match &installed_in {
        Some(s) => s.clone(),
        None => {
            target
                .batch_execute(&format!(
                    "CREATE EXTENSION pg_prewarm SCHEMA {}",
                    ident(PGFLIP_SCHEMA)
                ))
                .await?;
            PGFLIP_SCHEMA.to_string()
        }
    };
    let warmed = read_in(target, &schema, &hot, budget_bytes).await;
    if installed_in.is_none() {
        target
            .batch_execute("DROP EXTENSION IF EXISTS pg_prewarm")
            .await?;
    }
    Ok(Some(warmed?))
}

/// Reads each table (and its indexes and TOAST) of `hot` into the cache while the budget
/// lasts; a table that does not fit whole is skipped for a smaller one after it.
async fn read_in(
    target: &Client,
    schema: &str,
    hot: &[tokio_postgres::Row],
    budget_bytes: u64,
) -> anyhow::Result<Warmed> {
    let mut warmed = Warmed::default();
    let prewarm = format!("SELECT {}.pg_prewarm($1::text::regclass)", ident(schema));
    for row in hot {
        let (nsp, rel): (String, String) = (row.get(0), row.get(1));
        // The table on the target, with its indexes and TOAST (and the TOAST's index).
        let parts = target
            .query(
                "WITH t AS (SELECT c.oid, c.reltoastrelid FROM pg_class c
                              JOIN pg_namespace n ON n.oid = c.relnamespace
                             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind = 'r')
                 SELECT oid::regclass::text, pg_relation_size(oid) FROM (
                   SELECT oid FROM t
                   UNION ALL SELECT indexrelid FROM pg_index WHERE indrelid IN (SELECT oid FROM t)
                   UNION ALL SELECT reltoastrelid FROM t WHERE reltoastrelid <> 0
                   UNION ALL SELECT indexrelid FROM pg_index
                              WHERE indrelid IN (SELECT reltoastrelid FROM t)) r",
                &[&nsp, &rel],
            )
            .await?;
        let size: i64 = parts.iter().map(|p| p.get::<_, i64>(1)).sum();
        let size = size.max(0) as u64;
        if size == 0 || warmed.bytes + size > budget_bytes {
            continue;
        }
        for part in &parts {
            let name: String = part.get(0);
            target.query(&prewarm, &[&name]).await?;
            warmed.relations += 1;
        }
        warmed.bytes += size;
    }
    Ok(warmed)
}
