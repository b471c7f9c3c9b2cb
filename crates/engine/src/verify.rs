//! Comparing green's data with blue's before the switch, table by table, at one
//! consistent cut (the caller holds a REPEATABLE READ transaction on each side, opened
//! at the same replication position).
//!
//! The content checksum streams each table as COPY text and hashes every row line with
//! SHA-256; the row digests are added up modulo 2^256, so the result does not depend on
//! row order (blue and green store rows in different physical orders). Addition of
//! digests is a multiset hash: fine for catching accidental differences, not meant to
//! resist someone crafting rows that collide.
//!
//! Columns are taken by name, sorted, because logical replication matches columns by
//! name and their positions can differ (a column dropped on blue leaves a gap the copy
//! does not have). The text form of values is pinned by the session settings that shape
//! it (time zone, date and interval styles, float digits, bytea format, money locale), so
//! both sides print the same value the same way whatever their defaults; with those
//! pinned the text output of the usual types is the same on PostgreSQL 15 to 18.

use crate::catalog::{USER_NAMESPACES, display_name};
use crate::pg::{connect, ident, literal, qualified};
use crate::ports::{Addr, Credentials};
use crate::preflight::QualifiedName;
use crate::replication as repl;
use anyhow::{Context, bail};
use futures_util::StreamExt;
use pgflip_core::spec::Verification;
use sha2::{Digest, Sha256};
use std::time::Duration;
use tokio_postgres::{Client, SimpleQueryMessage};

/// One table's size and content digest at the snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableSum {
    pub rows: u64,
    /// Order-independent content digest (all zero unless the level is `Full`).
    pub sha256: [u8; 32],
    /// Bytes of COPY text hashed (zero unless the level is `Full`).
    pub bytes: u64,
}

/// The outcome of comparing every table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub tables: u64,
    /// Rows on blue, summed over the tables.
    pub rows: u64,
    /// COPY text bytes on blue, summed over the tables.
    pub bytes: u64,
    /// One line per table that differs, naming it.
    pub mismatches: Vec<String>,
}

/// The user tables to verify: ordinary tables that are not partitions, and partition
/// roots (which cover their partitions; checking those too would count rows twice).
pub async fn list_tables(client: &Client) -> anyhow::Result<Vec<QualifiedName>> {
    Ok(crate::catalog::user_tables_where(client, "NOT c.relispartition").await?)
}

/// What the verification compares, and what it leaves alone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    /// Tables to compare: as [`list_tables`], except that a partitioned table with an
    /// unlogged partition left behind is compared partition by partition (its logged ones).
    pub compared: Vec<QualifiedName>,
    /// Unlogged tables (partitions included): not replicated, left behind on purpose.
    pub left_behind: Vec<QualifiedName>,
}

/// The tables to verify. With `leave_unlogged` (preflight let unlogged tables through,
/// under `unsupported: warn`), unlogged tables are not compared — logical replication
/// does not carry them, so green has them empty — but listed as left behind; without it,
/// every table is compared, as [`list_tables`].
pub async fn tables_to_verify(client: &Client, leave_unlogged: bool) -> anyhow::Result<Listing> {
    if !leave_unlogged {
        return Ok(Listing {
            compared: list_tables(client).await?,
            left_behind: Vec::new(),
        });
    }
    let rows = client
        .query(
            &format!(
                "WITH ns AS ({USER_NAMESPACES}) \
                 SELECT ns.nspname::text, c.relname::text, c.oid::int8, c.relkind::text, \
                        c.relpersistence = 'u', c.relispartition, \
                        coalesce(pg_catalog.pg_partition_root(c.oid), c.oid)::int8 \
                 FROM pg_catalog.pg_class c JOIN ns ON ns.oid = c.relnamespace \
                 WHERE c.relkind IN ('r', 'p') ORDER BY 1, 2"
            ),
            &[],
        )
        .await?;
    struct Rel {
        name: QualifiedName,
        oid: i64,
        leaf: bool,
        unlogged: bool,
        partition: bool,
        root: i64,
    }
    let rels: Vec<Rel> = rows
        .iter()
        .map(|r| Rel {
            name: (r.get(0), r.get(1)),
            oid: r.get(2),
            leaf: r.get::<_, String>(3) == "r",
            unlogged: r.get(4),
            partition: r.get(5),
            root: r.get(6),
        })
        .collect();
    // Partition trees with an unlogged partition: their root would count its rows.
    let mixed: std::collections::BTreeSet<i64> = rels
        .iter()
        .filter(|r| r.unlogged && r.partition)
        .map(|r| r.root)
        .collect();
    let mut listing = Listing::default();
    for rel in &rels {
        if rel.unlogged {
            listing.left_behind.push(rel.name.clone());
        } else if rel.partition {
            if rel.leaf && mixed.contains(&rel.root) {
                listing.compared.push(rel.name.clone());
            }
        } else if !mixed.contains(&rel.oid) {
            listing.compared.push(rel.name.clone());
        }
    }
    Ok(listing)
}

/// Counts (and with `Full`, checksums) one table. `client` must be inside the caller's
/// REPEATABLE READ transaction: this neither commits nor rolls back, and the settings it
/// pins (`SET LOCAL`) end with that transaction.
pub async fn table_checksum(
    client: &Client,
    schema: &str,
    table: &str,
    level: Verification,
) -> anyhow::Result<TableSum> {
    let zero = TableSum {
        rows: 0,
        sha256: [0; 32],
        bytes: 0,
    };
    if level == Verification::None {
        return Ok(zero);
    }
    let name = display_name(schema, table);
    let shape = table_shape(client, schema, table)
        .await
        .with_context(|| format!("reading the columns of {name}"))?;
    // An ordinary table may have inheritance children, verified on their own: ONLY this one.
    // A partitioned table has no rows of its own: all of its partitions.
    let from = if shape.partitioned {
        qualified(schema, table)
    } else {
        format!("ONLY {}", qualified(schema, table))
    };
    if level == Verification::Count {
        let row = client
            .query_one(&format!("SELECT count(*) FROM {from}"), &[])
            .await
            .with_context(|| format!("counting {name}"))?;
        return Ok(TableSum {
            rows: row.get::<_, i64>(0) as u64,
            ..zero
        });
    }
    let columns: Vec<String> = shape.columns.iter().map(|c| ident(c)).collect();
    let copy = format!("COPY (SELECT {} FROM {from}) TO STDOUT", columns.join(", "));
    let stream = client
        .copy_out(&copy)
        .await
        .with_context(|| format!("reading {name}"))?;
    let mut stream = std::pin::pin!(stream);
    // Hashing runs on a thread of its own, so the two sides (and the network reads) keep
    // more than one core busy.
    let (chunks, mut received) = tokio::sync::mpsc::channel::<bytes::Bytes>(64);
    let hasher = tokio::task::spawn_blocking(move || {
        let mut sum = RowSetDigest::default();
        while let Some(chunk) = received.blocking_recv() {
            sum.update(&chunk);
        }
        sum.finish()
    });
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.with_context(|| format!("reading {name}"))?;
        if chunks.send(chunk).await.is_err() {
            break;
        }
    }
    drop(chunks);
    hasher.await.context("the hashing thread failed")
}

/// Compares every table of `tables` on blue and green, both sides of a table at once.
/// Compares `tables` one after another; `compared(i)` is told when the i-th is done.
pub async fn compare(
    blue: &Client,
    green: &Client,
    tables: &[QualifiedName],
    level: Verification,
    compared: &mut (dyn FnMut(usize) + Send),
) -> anyhow::Result<Report> {
    let mut report = Report::default();
    if level == Verification::None {
        return Ok(report);
    }
    for (i, (schema, table)) in tables.iter().enumerate() {
        let name = display_name(schema, table);
        let (b, g) = tokio::join!(
            table_checksum(blue, schema, table, level),
            table_checksum(green, schema, table, level)
        );
        let b = b.with_context(|| format!("verifying {name} on blue"))?;
        let g = g.with_context(|| format!("verifying {name} on green"))?;
        report.tables += 1;
        report.rows += b.rows;
        report.bytes += b.bytes;
        if b.rows != g.rows {
            report.mismatches.push(format!(
                "{name}: {} rows on blue, {} on green",
                b.rows, g.rows
            ));
        } else if b.sha256 != g.sha256 {
            report.mismatches.push(format!(
                "{name}: same {} rows, different content (SHA-256 {} on blue, {} on green)",
                b.rows,
                hex::encode(&b.sha256[..6]),
                hex::encode(&g.sha256[..6])
            ));
        }
        compared(i);
    }
    Ok(report)
}

struct TableShape {
    partitioned: bool,
    /// Column names, sorted.
    columns: Vec<String>,
}

/// The size of each table on disk (a partitioned table's leaves summed), in `tables`'
/// order: what the verification's progress counts in.
pub async fn table_sizes(client: &Client, tables: &[QualifiedName]) -> anyhow::Result<Vec<u64>> {
    let mut sizes = Vec::with_capacity(tables.len());
    for (schema, table) in tables {
        let size: i64 = client
            .query_one(
                "SELECT (CASE WHEN c.relkind = 'p'
                     THEN (SELECT coalesce(sum(pg_table_size(t.relid)), 0) FROM pg_partition_tree(c.oid) t)
                     ELSE pg_table_size(c.oid) END)::bigint
                   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE n.nspname = $1 AND c.relname = $2",
                &[schema, table],
            )
            .await?
            .get(0);
        sizes.push(size.max(0) as u64);
    }
    Ok(sizes)
}

/// Pins the settings that shape values' text and reads the table's kind and columns, in
/// one round trip.
async fn table_shape(client: &Client, schema: &str, table: &str) -> anyhow::Result<TableShape> {
    let sql = format!(
        "SET LOCAL TimeZone = 'UTC'; SET LOCAL DateStyle = 'ISO, YMD'; SET LOCAL IntervalStyle = 'postgres'; \
         SET LOCAL extra_float_digits = 1; SET LOCAL bytea_output = 'hex'; SET LOCAL lc_monetary = 'C'; \
         SELECT c.relkind::text, a.attname::text \
         FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
         LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
         WHERE n.nspname = {} AND c.relname = {}",
        literal(schema),
        literal(table)
    );
    let mut kind = None;
    let mut columns = Vec::new();
    for message in client.simple_query(&sql).await? {
        if let SimpleQueryMessage::Row(row) = message {
            kind = row.get(0).map(str::to_string);
            columns.extend(row.get(1).map(str::to_string));
        }
    }
    let partitioned = match kind.as_deref() {
        Some("r") => false,
        Some("p") => true,
        Some(other) => bail!(
            "{} is not a table (relkind {other})",
            display_name(schema, table)
        ),
        None => bail!("table {} does not exist", display_name(schema, table)),
    };
    columns.sort();
    Ok(TableShape {
        partitioned,
        columns,
    })
}

/// Order-independent digest of a stream of COPY text: the sum modulo 2^256 of the
/// SHA-256 of each row line. Lines may straddle the chunks the stream arrives in.
#[derive(Default)]
struct RowSetDigest {
    /// Big-endian 256-bit sum.
    sum: [u8; 32],
    rows: u64,
    bytes: u64,
    /// The start of a row whose end has not arrived yet.
    partial: Vec<u8>,
}

impl RowSetDigest {
    fn update(&mut self, chunk: &[u8]) {
        self.bytes += chunk.len() as u64;
        let mut rest = chunk;
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            if self.partial.is_empty() {
                self.add_row(&rest[..i]);
            } else {
                let mut line = std::mem::take(&mut self.partial);
                line.extend_from_slice(&rest[..i]);
                self.add_row(&line);
            }
            rest = &rest[i + 1..];
        }
        self.partial.extend_from_slice(rest);
    }

    fn add_row(&mut self, line: &[u8]) {
        let digest = Sha256::digest(line);
        let mut carry = 0u16;
        for i in (0..32).rev() {
            let s = self.sum[i] as u16 + digest[i] as u16 + carry;
            self.sum[i] = s as u8;
            carry = s >> 8;
        }
        self.rows += 1;
    }

    fn finish(mut self) -> TableSum {
        // COPY ends every row with a newline; anything left is a final row without one.
        if !self.partial.is_empty() {
            let line = std::mem::take(&mut self.partial);
            self.add_row(&line);
        }
        TableSum {
            rows: self.rows,
            sha256: self.sum,
            bytes: self.bytes,
        }
    }
}

/// Opens a transaction on `locker` holding `LOCK TABLE … IN EXCLUSIVE MODE` on `tables`,
/// waiting at most `bound` for it.
///
/// The lock conflicts with autovacuum, and PostgreSQL cancels an autovacuum worker that
/// blocks a lock request only after `deadlock_timeout` (1 s by default) — with every writer
/// queued behind the request meanwhile: the 5 GB benchmark's rollback, verifying against a
/// server still vacuuming its freshly copied tables, stalled writes for 1,018 ms this way.
/// So the autovacuum workers on these tables are cancelled just before the lock is asked
/// for (one that starts after it is granted skips a table it cannot lock at once). Short
/// tries with cancellations between them were tried first: on a loaded machine a try could
/// time out behind ordinary transactions and each one stalled the writers again.
pub async fn hold_writes(
    locker: &Client,
    tables: &[(String, String)],
    bound: Duration,
) -> anyhow::Result<()> {
    let names: Vec<String> = tables.iter().map(|(s, n)| qualified(s, n)).collect();
    cancel_autovacuum(locker, &names).await;
    let lock = format!(
        "BEGIN; SET LOCAL lock_timeout = '{}ms'; LOCK TABLE {} IN EXCLUSIVE MODE",
        bound.as_millis(),
        names.join(", ")
    );
    locker
        .batch_execute(&lock)
        .await
        .map_err(|e| anyhow::anyhow!(super::replication::db_error_text(&e)))
}

/// Cancels the autovacuum workers holding a lock on one of `tables` (qualified names),
/// except anti-wraparound ones (PostgreSQL never cancels those either). Best effort:
/// without the right to signal them, the lock still gets PostgreSQL's own cancellation
/// after `deadlock_timeout`.
async fn cancel_autovacuum(client: &Client, tables: &[String]) {
    const SQL: &str = "SELECT a.pid, pg_cancel_backend(a.pid) FROM pg_stat_activity a \
        WHERE a.backend_type = 'autovacuum worker' \
          AND a.query NOT LIKE '%(to prevent wraparound)%' \
          AND EXISTS (SELECT 1 FROM pg_locks l WHERE l.pid = a.pid \
                      AND l.relation = ANY (SELECT t::regclass FROM unnest($1::text[]) t))";
    match client.query(SQL, &[&tables]).await {
        Ok(rows) if !rows.is_empty() => {
            tracing::info!(
                workers = rows.len(),
                "cancelled autovacuum on the verified tables so that the write hold stays short"
            );
        }
        Ok(_) => {}
        Err(e) => {
            tracing::debug!(error = %super::replication::db_error_text(&e), "could not cancel autovacuum")
        }
    }
}

/// Where [`consistent_cut`] opens its own sessions: one database on both sides.
pub struct CutAt<'a> {
    pub source: &'a Addr,
    pub target: &'a Addr,
    pub admin: &'a Credentials,
    pub db: &'a str,
}

/// Puts both clients in REPEATABLE READ snapshots holding exactly the same transactions.
///
/// On the source, writes to the compared tables are held (EXCLUSIVE lock: readers go on)
/// only while its snapshot is taken and a marker committed: every write in the snapshot
/// then commits before the marker, every write after it after the marker. On the target,
/// the apply is stopped right before the marker (it waits on an advisory lock this holds,
/// see [`repl::ENSURE_OWN_SCHEMA`]): everything before it is applied, nothing after; the
/// snapshot is taken there and the apply let go. Writers never wait for the target.
/// The caller compares, then ends both transactions.
pub async fn consistent_cut(
    at: &CutAt<'_>,
    src: &Client,
    tgt: &Client,
    tables: &[QualifiedName],
    bound: Duration,
) -> anyhow::Result<()> {
    const SNAPSHOT: &str = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SELECT 1";
    if tables.is_empty() {
        src.batch_execute(SNAPSHOT).await?;
        tgt.batch_execute(SNAPSHOT).await?;
        return Ok(());
    }
    let locker = connect(at.source, at.admin, at.db).await?;
    let marker = connect(at.source, at.admin, at.db).await?;
    let stopper = connect(at.target, at.admin, at.db).await?;
    // A target made by an older pgflip may lack the marker's trigger.
    repl::ensure_own_schema(&stopper).await?;
    // Catch up first: the stop then waits only for what is committed meanwhile.
    repl::catch_up(
        &[(&marker, tgt)],
        "verify-ahead",
        bound.max(Duration::from_secs(60)),
    )
    .await?;
    stopper
        .query(
            "SELECT pg_catalog.pg_advisory_lock($1)",
            &[&repl::VERIFY_CUT_LOCK],
        )
        .await?;
    hold_writes(&locker, tables, bound)
        .await
        .context("holding writes for the verification snapshot")?;
    src.batch_execute(SNAPSHOT).await?;
    let token = repl::marker_token("cut");
    repl::write_marker(&marker, &token).await?;
    locker.batch_execute("COMMIT").await?;
    wait_apply_stopped(&stopper, bound.max(Duration::from_secs(5))).await?;
    tgt.batch_execute(SNAPSHOT).await?;
    stopper
        .query(
            "SELECT pg_catalog.pg_advisory_unlock($1)",
            &[&repl::VERIFY_CUT_LOCK],
        )
        .await?;
    Ok(())
}

/// Waits until the target's apply worker waits on the verification marker's lock (the
/// `stopper` holds it, in the same database).
async fn wait_apply_stopped(stopper: &Client, timeout: Duration) -> anyhow::Result<()> {
    let started = tokio::time::Instant::now();
    loop {
        let waiting: bool = stopper
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_locks \
                  WHERE locktype = 'advisory' AND NOT granted AND classid = 0 \
                    AND objid = $1::int8::oid AND objsubid = 1 \
                    AND database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database()))",
                &[&repl::VERIFY_CUT_LOCK],
            )
            .await?
            .get(0);
        if waiting {
            return Ok(());
        }
        if started.elapsed() > timeout {
            anyhow::bail!("the target did not reach the verification marker within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest_of(chunks: &[&[u8]]) -> TableSum {
        let mut d = RowSetDigest::default();
        for c in chunks {
            d.update(c);
        }
        d.finish()
    }

    #[test]
    fn row_order_and_chunking_do_not_matter() {
        let a = digest_of(&[b"1\tx\n2\ty\n3\tz\n"]);
        let b = digest_of(&[b"3\tz\n2\t", b"y", b"\n1\tx\n"]);
        assert_eq!(a, b);
        assert_eq!(a.rows, 3);
        assert_eq!(a.bytes, 12);
        assert_ne!(a.sha256, digest_of(&[b"1\tx\n2\ty\n3\tZ\n"]).sha256);
        // A duplicated row is not the same as a single one.
        assert_ne!(digest_of(&[b"1\n1\n"]).sha256, digest_of(&[b"1\n"]).sha256);
    }
}
