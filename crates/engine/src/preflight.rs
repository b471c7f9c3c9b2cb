//! Preflight: what logical replication cannot carry, found on blue before anything is
//! touched. Run per carried database.
//!
//! Each rule answers one pitfall of the design:
//! - wal_level must be `logical`, or blue cannot publish at all.
//! - Unlogged tables are not written to WAL, so they are not replicated: green would
//!   have them empty.
//! - Large objects live in `pg_largeobject`, a catalog, which is not replicated.
//! - A table without a replica identity (no primary key, identity DEFAULT or NOTHING)
//!   cannot publish UPDATE or DELETE: once it is in a publication they fail *on blue*
//!   ("cannot update table … because it does not have a replica identity"). REPLICA
//!   IDENTITY FULL makes them work, but green then finds each changed row by comparing
//!   whole rows, possibly scanning the table per change, so a table that receives many
//!   updates can make green fall behind for good. Hence: an insert-only table simply gets
//!   FULL; one that has seen UPDATE/DELETE is refused unless the policy says warn.
//!   Partitioned tables are judged as a whole, under their root's name: they are
//!   published through the root, yet every leaf checks its own identity.
//! - Extensions must be installable on the target major (a few are dropped between
//!   majors: adminpack and old_snapshot are gone in 17).
//! - Materialized views are not replicated; they are refreshed on green before the switch.
//! - The tools of both directions must be installed ([`missing_tools`]): a switch that
//!   could not be taken back is not started.

use crate::catalog::{USER_NAMESPACES, display_name};
use crate::pg::qualified;
use crate::sql_script::describe_error;
use crate::toolchain::Toolchain;
use pgflip_core::plan::AttemptKind;
use pgflip_core::spec::{Major, UnsupportedPolicy};
use tokio_postgres::Client;

/// A schema-qualified object name: `(schema, name)`.
pub type QualifiedName = (String, String);

/// What preflight found in one database.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Findings {
    /// Reasons not to start; each names the objects.
    pub refusals: Vec<String>,
    /// Things that will be handled or lost, said loudly.
    pub warnings: Vec<String>,
    /// What `unsupported: warn` lets through that is not carried over (unlogged tables'
    /// rows, large objects), one line each: not compared by the verification, and named
    /// in the final status.
    pub left_behind: Vec<String>,
    /// Things that will simply be handled (materialized views are refreshed).
    pub notes: Vec<String>,
    /// Tables (partition roots for partitioned ones) to set REPLICA IDENTITY FULL on
    /// before they are published; see [`ensure_replica_identity_full`].
    pub needs_replica_identity_full: Vec<QualifiedName>,
    /// Materialized views to refresh on green before the switch.
    pub materialized_views: Vec<QualifiedName>,
    /// The tables to publish: ordinary tables that are not partitions, and partition roots.
    pub tables: Vec<QualifiedName>,
}

impl Findings {
    /// The refusals as one error (for the commit's failure status), if there are any.
    pub fn refusal(&self, db: &str) -> Option<anyhow::Error> {
        (!self.refusals.is_empty()).then(|| {
            anyhow::anyhow!(
                "database {db} cannot be carried over: {}",
                self.refusals.join("; ")
            )
        })
    }
}

/// The tools a switch from `from` to `to` needs in either direction that are not installed,
/// one line each naming the tool and what needs it (empty when all are there).
///
/// - The way there: the target's server runs on this machine; a full switch copies the
///   source's schema with `pg_dump`/`pg_dumpall` of at least the source's major.
/// - The way back: the source's server, to run that major again (the retained standby, or
///   a new instance once the retention is over); and, for a full switch, `pg_dump`/
///   `pg_dumpall` of at least the *target's* major, to copy the target's schema on a full
///   switch back (no retention, or after it): going back from 18 needs `pg_dump` 18.
///
/// A switch back to the retained standby copies no schema (the standby is in sync), so
/// only the servers count for it.
///
/// Only the majors `runs_here` says pgflip runs on this machine itself need their server
/// here: a server the user runs, or a pod, brings its own.
pub fn missing_tools(
    toolchain: &Toolchain,
    kind: AttemptKind,
    from: Major,
    to: Major,
    runs_here: &dyn Fn(Major) -> bool,
) -> Vec<String> {
    let server = |major: Major, why: &str| {
        if !runs_here(major) {
            return None;
        }
        toolchain
            .server_bin(major.0)
            .err()
            .map(|_| format!("the PostgreSQL {major} server (postgres, initdb, pg_ctl), {why}"))
    };
    let client = |major: Major, why: &str| {
        toolchain
            .client_bin(major.0)
            .err()
            .map(|_| format!("pg_dump and pg_dumpall of PostgreSQL {major} or newer, {why}"))
    };
    let full = kind == AttemptKind::Full;
    let mut missing = vec![server(
        to,
        &format!("to run the target (the way there, {from} → {to})"),
    )];
    if full {
        missing.push(client(
            from,
            &format!("to copy the schema of PostgreSQL {from} (the way there, {from} → {to})"),
        ));
    }
    if from != to {
        missing.push(server(
            from,
            &format!("to run PostgreSQL {from} again (the way back, {to} → {from})"),
        ));
        if full {
            missing.push(client(
                to,
                &format!("to copy the schema of PostgreSQL {to} (the way back, {to} → {from})"),
            ));
        }
    }
    missing.into_iter().flatten().collect()
}

/// Checks one database of the source (blue) for what cannot be carried to `target_major`.
pub async fn check(
    source: &Client,
    db: &str,
    target_major: Major,
    policy: UnsupportedPolicy,
    toolchain: &Toolchain,
) -> anyhow::Result<Findings> {
    let mut findings = Findings::default();
    check_wal_level(source, &mut findings).await?;
    check_unlogged_tables(source, policy, &mut findings).await?;
    check_large_objects(source, db, policy, &mut findings).await?;
    check_replica_identity(source, policy, &mut findings).await?;
    check_extensions(source, target_major, toolchain, &mut findings).await?;
    list_materialized_views(source, &mut findings).await?;
    Ok(findings)
}

async fn check_wal_level(source: &Client, findings: &mut Findings) -> anyhow::Result<()> {
    let level: String = source
        .query_one("SELECT current_setting('wal_level')", &[])
        .await?
        .get(0);
    if level != "logical" {
        findings.refusals.push(format!(
            "wal_level is {level} on the source, logical replication needs wal_level = logical \
             (changing it requires a restart of the source)"
        ));
    }
    Ok(())
}

async fn check_unlogged_tables(
    source: &Client,
    policy: UnsupportedPolicy,
    findings: &mut Findings,
) -> anyhow::Result<()> {
    let tables = unlogged_tables(source).await?;
    if tables.is_empty() {
        return Ok(());
    }
    let names = join_names(tables.iter().cloned());
    match policy {
        UnsupportedPolicy::Refuse => findings.refusals.push(format!(
            "unlogged tables are not replicated: {names} (make them logged with ALTER TABLE … SET LOGGED, \
             or set spec.unsupported: warn to go ahead with them empty on green)"
        )),
        UnsupportedPolicy::Warn => {
            findings.warnings.push(format!("unlogged tables are not replicated and will be EMPTY on green: {names}"));
            findings.left_behind.extend(tables.iter().map(|(s, n)| {
                format!("unlogged table {} (its rows are not carried over)", display_name(s, n))
            }));
        }
    }
    Ok(())
}

/// Unlogged tables (partitions included): their changes are not written to WAL, so
/// logical replication does not carry them. The verification leaves out the same ones
/// ([`crate::verify::tables_to_verify`]).
pub async fn unlogged_tables(source: &Client) -> anyhow::Result<Vec<QualifiedName>> {
    Ok(crate::catalog::user_tables_where(source, "c.relpersistence = 'u'").await?)
}

async fn check_large_objects(
    source: &Client,
    db: &str,
    policy: UnsupportedPolicy,
    findings: &mut Findings,
) -> anyhow::Result<()> {
    const SHOWN: usize = 5;
    let rows = source
        .query(
            "SELECT oid::int8 FROM pg_catalog.pg_largeobject_metadata ORDER BY oid LIMIT $1",
            &[&(SHOWN as i64 + 1)],
        )
        .await?;
    if rows.is_empty() {
        return Ok(());
    }
    let count: i64 = source
        .query_one(
            "SELECT count(*) FROM pg_catalog.pg_largeobject_metadata",
            &[],
        )
        .await?
        .get(0);
    let mut oids: Vec<String> = rows
        .iter()
        .take(SHOWN)
        .map(|r| r.get::<_, i64>(0).to_string())
        .collect();
    if count as usize > SHOWN {
        oids.push("…".into());
    }
    let what = format!(
        "{count} large object(s) in database {db} (OIDs {})",
        oids.join(", ")
    );
    match policy {
        UnsupportedPolicy::Refuse => findings.refusals.push(format!(
            "large objects are not replicated: {what} (store them in bytea columns, \
             or set spec.unsupported: warn to go ahead without them on green)"
        )),
        UnsupportedPolicy::Warn => {
            findings.warnings.push(format!(
                "large objects are not replicated and will be MISSING on green: {what}"
            ));
            findings
                .left_behind
                .push(format!("{what}: missing on green"));
        }
    }
    Ok(())
}

async fn check_replica_identity(
    source: &Client,
    policy: UnsupportedPolicy,
    findings: &mut Findings,
) -> anyhow::Result<()> {
    // One row per table to publish. A partition tree counts as one (its root); it has an
    // identity when the root and every leaf have one. pg_partition_tree() returns nothing
    // for an ordinary table, hence the UNION with the table itself.
    let sql = format!(
        "WITH ns AS ({USER_NAMESPACES}),
         roots AS (
             SELECT c.oid, ns.nspname, c.relname FROM pg_catalog.pg_class c JOIN ns ON ns.oid = c.relnamespace
             WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
         )
         SELECT r.nspname::text, r.relname::text,
             (SELECT bool_and(
                     m.relreplident = 'f'
                     OR (m.relreplident = 'i' AND EXISTS (SELECT FROM pg_catalog.pg_index i
                                                          WHERE i.indrelid = m.oid AND i.indisreplident))
                     OR (m.relreplident = 'd' AND EXISTS (SELECT FROM pg_catalog.pg_index i
                                                          WHERE i.indrelid = m.oid AND i.indisprimary)))
              FROM (SELECT relid, isleaf, level FROM pg_catalog.pg_partition_tree(r.oid)
                    UNION SELECT r.oid, true, 0) t
              JOIN pg_catalog.pg_class m ON m.oid = t.relid
              WHERE t.isleaf OR t.level = 0) AS has_identity,
             (SELECT coalesce(sum(s.n_tup_upd + s.n_tup_del), 0)::int8
              FROM (SELECT relid FROM pg_catalog.pg_partition_tree(r.oid) UNION SELECT r.oid) t
              JOIN pg_catalog.pg_stat_user_tables s ON s.relid = t.relid) AS changes
         FROM roots r ORDER BY 1, 2"
    );
    let mut refused = Vec::new();
    let mut made_full = Vec::new();
    for row in source.query(&sql, &[]).await? {
        let name: QualifiedName = (row.get(0), row.get(1));
        let has_identity: bool = row.get(2);
        let changes: i64 = row.get(3);
        findings.tables.push(name.clone());
        if has_identity {
            continue;
        }
        if changes > 0 && policy == UnsupportedPolicy::Refuse {
            refused.push(format!(
                "{} ({changes} rows updated or deleted)",
                display_name(&name.0, &name.1)
            ));
        } else {
            made_full.push(display_name(&name.0, &name.1));
            findings.needs_replica_identity_full.push(name);
        }
    }
    if !refused.is_empty() {
        findings.refusals.push(format!(
            "tables without a primary key or replica identity receive UPDATE/DELETE, which logical \
             replication cannot apply: {} (add a primary key, or set REPLICA IDENTITY USING INDEX or FULL, \
             or set spec.unsupported: warn to have pgflip set FULL)",
            refused.join(", ")
        ));
    }
    if !made_full.is_empty() {
        findings.warnings.push(format!(
            "tables without a primary key or replica identity get REPLICA IDENTITY FULL \
             (green finds changed rows by comparing whole rows): {}",
            made_full.join(", ")
        ));
    }
    Ok(())
}

async fn check_extensions(
    source: &Client,
    target_major: Major,
    toolchain: &Toolchain,
    findings: &mut Findings,
) -> anyhow::Result<()> {
    let rows = source
        .query("SELECT extname::text FROM pg_catalog.pg_extension WHERE extname <> 'plpgsql' ORDER BY 1", &[])
        .await?;
    if rows.is_empty() {
        return Ok(());
    }
    let Some(dir) = toolchain.extension_dir(target_major.0) else {
        findings.refusals.push(format!(
            "cannot check the extensions for PostgreSQL {target_major}: its extension directory is not installed"
        ));
        return Ok(());
    };
    for row in rows {
        let name: String = row.get(0);
        if !dir.join(format!("{name}.control")).is_file() {
            findings.refusals.push(format!(
                "extension {name} is not available for PostgreSQL {target_major}"
            ));
        }
    }
    Ok(())
}

async fn list_materialized_views(source: &Client, findings: &mut Findings) -> anyhow::Result<()> {
    let rows = source
        .query(
            &format!(
                "WITH ns AS ({USER_NAMESPACES}) \
                 SELECT ns.nspname::text, c.relname::text FROM pg_catalog.pg_class c JOIN ns ON ns.oid = c.relnamespace \
                 WHERE c.relkind = 'm' ORDER BY 1, 2"
            ),
            &[],
        )
        .await?;
    findings.materialized_views = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    if !findings.materialized_views.is_empty() {
        let names = join_names(findings.materialized_views.iter().cloned());
        findings.notes.push(format!(
            "materialized views are not replicated, they are refreshed on green before the switch: {names}"
        ));
    }
    Ok(())
}

/// Sets REPLICA IDENTITY FULL on the given tables and, for partition roots, on every
/// partition (each leaf checks its own identity when it is updated). Tables that already
/// have it are left alone, so this is idempotent and takes no lock the second time.
///
/// All in one transaction with a short lock timeout, tried again a while: ALTER TABLE
/// waits for every transaction using the table, and queues every new one behind it, so
/// each try stalls blue's clients for at most [`IDENTITY_LOCK_TIMEOUT`] (a 10 s timeout
/// stalled every pgbench client for ~0.5 s under load: `pgflip bench`). A table kept busy
/// by a long transaction through every try fails the step, which is retried.
pub async fn ensure_replica_identity_full(
    client: &Client,
    tables: &[QualifiedName],
) -> anyhow::Result<()> {
    if tables.is_empty() {
        return Ok(());
    }
    let schemas: Vec<&str> = tables.iter().map(|t| t.0.as_str()).collect();
    let names: Vec<&str> = tables.iter().map(|t| t.1.as_str()).collect();
    let rows = client
        .query(
            "WITH wanted AS (
                 SELECT c.oid FROM unnest($1::text[], $2::text[]) AS w(schema, name)
                 JOIN pg_catalog.pg_namespace n ON n.nspname = w.schema
                 JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = w.name
             ),
             members AS (
                 SELECT oid FROM wanted
                 UNION SELECT t.relid FROM wanted, pg_catalog.pg_partition_tree(wanted.oid) t
             )
             SELECT n.nspname::text, c.relname::text
             FROM members m JOIN pg_catalog.pg_class c ON c.oid = m.oid
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relreplident <> 'f' AND c.relkind IN ('r', 'p')
             ORDER BY 1, 2",
            &[&schemas, &names],
        )
        .await?;
    if rows.is_empty() {
        return Ok(());
    }
    let mut batch = format!(
        "BEGIN; SET LOCAL lock_timeout = '{}ms';\n",
        IDENTITY_LOCK_TIMEOUT.as_millis()
    );
    for row in &rows {
        let (schema, name): (String, String) = (row.get(0), row.get(1));
        batch.push_str(&format!(
            "ALTER TABLE {} REPLICA IDENTITY FULL;\n",
            qualified(&schema, &name)
        ));
    }
    batch.push_str("COMMIT;");
    let mut tries = 1;
    loop {
        let Err(e) = client.batch_execute(&batch).await else {
            return Ok(());
        };
        let _ = client.batch_execute("ROLLBACK").await;
        let timed_out = e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE);
        if !timed_out || tries == IDENTITY_LOCK_TRIES {
            let names = join_names(rows.iter().map(|r| (r.get(0), r.get(1))));
            let after = if timed_out {
                format!(" ({tries} tries of {IDENTITY_LOCK_TIMEOUT:?})")
            } else {
                String::new()
            };
            anyhow::bail!(
                "setting REPLICA IDENTITY FULL on {names}{after}: {}",
                describe_error(&e)
            );
        }
        tries += 1;
        // Clients queued behind the try run meanwhile.
        tokio::time::sleep(IDENTITY_LOCK_TIMEOUT * 2).await;
    }
}

/// How long one try of [`ensure_replica_identity_full`] may wait for its locks.
const IDENTITY_LOCK_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(50);
const IDENTITY_LOCK_TRIES: u32 = 100;

fn join_names(names: impl Iterator<Item = QualifiedName>) -> String {
    names
        .map(|(s, n)| display_name(&s, &n))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// A toolchain root holding empty files where the tools would be.
    fn fake_toolchain(root: &Path, dirs: &[(&str, &[&str])]) -> Toolchain {
        for (dir, tools) in dirs {
            let bin = root.join(dir).join("bin");
            std::fs::create_dir_all(&bin).unwrap();
            for tool in *tools {
                std::fs::write(bin.join(tool), b"").unwrap();
            }
        }
        Toolchain::from_roots(vec![root.to_path_buf()])
    }

    const SERVER: &[&str] = &["postgres", "initdb", "pg_ctl"];
    const FULL: &[&str] = &[
        "postgres",
        "initdb",
        "pg_ctl",
        "pg_dump",
        "pg_dumpall",
        "psql",
    ];

    /// `make setup` before PostgreSQL 18's full tools were added: 16 and 18 as servers only,
    /// 17 full. 16 → 18 could be taken (pg_dump 17 dumps 16), its way back could not.
    #[test]
    fn the_way_back_from_18_needs_pg_dump_18() {
        let dir = tempfile::tempdir().unwrap();
        let tc = fake_toolchain(
            dir.path(),
            &[("pg16", SERVER), ("pg17full", FULL), ("pg18", SERVER)],
        );
        let missing = missing_tools(&tc, AttemptKind::Full, Major(16), Major(18), &|_| true);
        assert_eq!(
            missing,
            [
                "pg_dump and pg_dumpall of PostgreSQL 18 or newer, to copy the schema of \
              PostgreSQL 18 (the way back, 18 → 16)"
            ],
        );
        // The same gap refuses the full switch 18 → 16 itself (its way there).
        let down = missing_tools(&tc, AttemptKind::Full, Major(18), Major(16), &|_| true);
        assert_eq!(down.len(), 1, "{down:?}");
        assert!(down[0].contains("the way there, 18 → 16"), "{down:?}");
        // A switch back to a retained standby copies no schema: the servers are enough.
        assert!(
            missing_tools(&tc, AttemptKind::SwitchBack, Major(18), Major(16), &|_| {
                true
            })
            .is_empty()
        );
        // 16 ↔ 17 is complete both ways.
        assert!(missing_tools(&tc, AttemptKind::Full, Major(16), Major(17), &|_| true).is_empty());

        // With the 18 wheel installed (`pg18full`), both directions are complete.
        let tc = fake_toolchain(dir.path(), &[("pg18full", FULL)]);
        assert!(missing_tools(&tc, AttemptKind::Full, Major(16), Major(18), &|_| true).is_empty());
        assert!(missing_tools(&tc, AttemptKind::Full, Major(18), Major(16), &|_| true).is_empty());
    }

    #[test]
    fn every_missing_tool_is_named_with_its_direction() {
        let dir = tempfile::tempdir().unwrap();
        let tc = fake_toolchain(dir.path(), &[("pg15", SERVER)]);
        let missing = missing_tools(&tc, AttemptKind::Full, Major(15), Major(17), &|_| true);
        assert_eq!(
            missing,
            [
                "the PostgreSQL 17 server (postgres, initdb, pg_ctl), to run the target (the way there, 15 → 17)",
                "pg_dump and pg_dumpall of PostgreSQL 15 or newer, to copy the schema of PostgreSQL 15 (the way there, 15 → 17)",
                "pg_dump and pg_dumpall of PostgreSQL 17 or newer, to copy the schema of PostgreSQL 17 (the way back, 17 → 15)",
            ]
        );
        let back = missing_tools(&tc, AttemptKind::SwitchBack, Major(17), Major(15), &|_| {
            true
        });
        assert_eq!(
            back,
            [
                "the PostgreSQL 17 server (postgres, initdb, pg_ctl), to run PostgreSQL 17 again (the way back, 15 → 17)"
            ]
        );
        // A server the user runs (or a pod) brings its own server binaries.
        let onto_theirs = missing_tools(&tc, AttemptKind::Full, Major(15), Major(17), &|m| {
            m != Major(17)
        });
        assert_eq!(onto_theirs.len(), 2, "{onto_theirs:?}");
        assert!(onto_theirs.iter().all(|m| m.starts_with("pg_dump")));
        let error = crate::error::EngineError::ToolMissing(missing);
        assert!(error.is_final());
        assert_eq!(error.metric_label(), "tool_missing");
        let text = error.to_string();
        assert!(
            text.starts_with("tools missing, nothing was touched: the PostgreSQL 17 server")
                && text.contains("run `make setup`"),
            "{text}"
        );
    }
}
