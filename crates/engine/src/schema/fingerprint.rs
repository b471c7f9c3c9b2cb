//! A digest of the user schema. Logical replication does not carry DDL, so a schema change
//! on blue after the copy would leave green behind (a missing column breaks apply, a
//! replaced view silently serves old results after the switch): the switch compares
//! blue's fingerprint now with the one the copy was made from.
//!
//! The schema is described as sorted text lines, one per object or column, read from the
//! catalogs with `search_path = pg_catalog` so every user name comes out schema-qualified.
//! Objects that belong to an extension are described by the extension's name only.
//!
//! Stable on one server over time. Across majors (blue 15, green 16 after the copy) most
//! lines are equal too, except deparsed query text: PostgreSQL 16 stopped qualifying
//! column names in single-table view queries (`orders.amount` became `amount`), so view
//! and materialized view definitions and SQL-standard function bodies are *not portable*.
//! [`portable_fingerprint`] leaves them out (the columns of views still count); use it only
//! to compare servers of different majors. Also left out everywhere, because they differ
//! between majors by design and do not affect replication: extension versions, the
//! not-null constraints PostgreSQL 18 catalogues (`attnotnull` says the same), and the
//! identity marker PostgreSQL 17 copies onto partitions.

use crate::catalog::USER_NAMESPACES;
use anyhow::Context;
use sha2::{Digest, Sha256};
use tokio_postgres::{Client, SimpleQueryMessage};

/// The user schema as canonical text lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaDescription {
    /// Sorted; each line with whether it is the same on every major.
    lines: Vec<(String, bool)>,
}

impl SchemaDescription {
    /// SHA-256 (hex) of every line: for comparing one server with itself over time.
    pub fn fingerprint(&self) -> String {
        digest(self.lines.iter().map(|(l, _)| l))
    }

    /// SHA-256 (hex) of the lines that read the same on every major: for comparing
    /// blue with green across majors.
    pub fn portable_fingerprint(&self) -> String {
        digest(self.lines.iter().filter(|(_, p)| *p).map(|(l, _)| l))
    }

    /// What differs from `newer`: lines only here (`- …`) and only there (`+ …`).
    pub fn differences(&self, newer: &SchemaDescription, portable_only: bool) -> Vec<String> {
        let pick = |d: &SchemaDescription| -> std::collections::BTreeSet<String> {
            d.lines
                .iter()
                .filter(|(_, p)| *p || !portable_only)
                .map(|(l, _)| l.clone())
                .collect()
        };
        let (old, new) = (pick(self), pick(newer));
        let removed = old.difference(&new).map(|l| format!("- {l}"));
        let added = new.difference(&old).map(|l| format!("+ {l}"));
        removed.chain(added).collect()
    }

    pub fn lines(&self) -> impl Iterator<Item = &str> {
        self.lines.iter().map(|(l, _)| l.as_str())
    }
}

/// Reads the description of the user schema of the connected database.
///
/// Runs as one multi-statement query whose `SET LOCAL search_path` ends with it; called
/// inside the caller's transaction, the setting lasts until that transaction ends.
pub async fn describe(client: &Client) -> anyhow::Result<SchemaDescription> {
    let sql = format!(
        "SET LOCAL search_path = pg_catalog, pg_temp;\n{}",
        DESCRIBE_SQL.replace("{USER_NAMESPACES}", USER_NAMESPACES)
    );
    let messages = client
        .simple_query(&sql)
        .await
        .context("reading the schema from the catalogs")?;
    let mut lines: Vec<(String, bool)> = messages
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some((
                row.get(0).unwrap_or("").to_string(),
                row.get(1) == Some("t"),
            )),
            _ => None,
        })
        .collect();
    lines.sort();
    Ok(SchemaDescription { lines })
}

/// SHA-256 (hex) of the user schema: stable on one server while its schema is unchanged.
pub async fn fingerprint(client: &Client) -> anyhow::Result<String> {
    Ok(describe(client).await?.fingerprint())
}

/// SHA-256 (hex) of the parts of the user schema that read the same on every major.
pub async fn portable_fingerprint(client: &Client) -> anyhow::Result<String> {
    Ok(describe(client).await?.portable_fingerprint())
}

fn digest<'a>(lines: impl Iterator<Item = &'a String>) -> String {
    let mut h = Sha256::new();
    for line in lines {
        h.update(line.as_bytes());
        h.update(b"\n");
    }
    hex::encode(h.finalize())
}

/// `(line, portable)` for every object of the user schema; `{USER_NAMESPACES}` is
/// replaced by the shared rule of what is the user's.
const DESCRIBE_SQL: &str = r#"
WITH ns AS ({USER_NAMESPACES}),
ext AS (SELECT classid, objid FROM pg_depend WHERE deptype = 'e'),
rel AS (
    SELECT c.oid, c.relkind, c.relpersistence, c.relispartition, c.relpartbound,
           quote_ident(ns.nspname) || '.' || quote_ident(c.relname) AS name
    FROM pg_class c JOIN ns ON ns.oid = c.relnamespace
    WHERE NOT EXISTS (SELECT FROM ext WHERE ext.classid = 'pg_class'::regclass AND ext.objid = c.oid)
)
SELECT 'schema ' || quote_ident(nspname), true FROM ns
UNION ALL
SELECT concat_ws(' ', 'relation', name, relkind::text, relpersistence::text, pg_get_partkeydef(oid),
                 CASE WHEN relispartition THEN
                     'partition of ' || (SELECT i.inhparent::regclass::text FROM pg_inherits i WHERE i.inhrelid = rel.oid)
                     || ' ' || pg_get_expr(relpartbound, oid)
                 END,
                 (SELECT 'inherits ' || string_agg(i.inhparent::regclass::text, ',' ORDER BY i.inhseqno)
                  FROM pg_inherits i WHERE i.inhrelid = rel.oid AND NOT rel.relispartition)), true
FROM rel WHERE relkind IN ('r', 'p', 'v', 'm', 'f', 'c')
UNION ALL
SELECT concat_ws(' ', 'column', rel.name,
                 row_number() OVER (PARTITION BY a.attrelid ORDER BY a.attnum),
                 quote_ident(a.attname), format_type(a.atttypid, a.atttypmod),
                 CASE WHEN a.attnotnull THEN 'not null' END,
                 CASE WHEN a.attidentity <> '' AND NOT rel.relispartition THEN 'identity ' || a.attidentity::text END,
                 CASE WHEN a.attgenerated <> '' THEN 'generated ' || a.attgenerated::text END,
                 'default ' || pg_get_expr(d.adbin, d.adrelid),
                 CASE WHEN a.attcollation <> t.typcollation THEN 'collate ' || a.attcollation::regcollation::text END), true
FROM rel
JOIN pg_attribute a ON a.attrelid = rel.oid AND a.attnum > 0 AND NOT a.attisdropped
JOIN pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE rel.relkind IN ('r', 'p', 'v', 'm', 'f', 'c')
UNION ALL
SELECT concat_ws(' ', 'constraint', coalesce(rel.name, con.contypid::regtype::text), quote_ident(con.conname),
                 pg_get_constraintdef(con.oid)), true
FROM pg_constraint con JOIN ns ON ns.oid = con.connamespace LEFT JOIN rel ON rel.oid = con.conrelid
WHERE con.contype <> 'n'
UNION ALL
SELECT 'index ' || pg_get_indexdef(i.indexrelid), true
FROM pg_index i JOIN rel ON rel.oid = i.indrelid
UNION ALL
SELECT concat_ws(' ', 'view', name, pg_get_viewdef(oid)), false
FROM rel WHERE relkind IN ('v', 'm')
UNION ALL
SELECT concat_ws(' ', 'sequence', rel.name, format_type(s.seqtypid, NULL), s.seqstart, s.seqincrement,
                 s.seqmin, s.seqmax, s.seqcache, s.seqcycle), true
FROM rel JOIN pg_sequence s ON s.seqrelid = rel.oid
UNION ALL
SELECT concat_ws(' ', 'type', t.oid::regtype::text, t.typtype::text,
                 CASE t.typtype
                     WHEN 'e' THEN (SELECT string_agg(quote_literal(e.enumlabel), ',' ORDER BY e.enumsortorder)
                                    FROM pg_enum e WHERE e.enumtypid = t.oid)
                     WHEN 'd' THEN format_type(t.typbasetype, t.typtypmod)
                                   || CASE WHEN t.typnotnull THEN ' not null' ELSE '' END
                                   || coalesce(' default ' || t.typdefault, '')
                     WHEN 'r' THEN (SELECT format_type(r.rngsubtype, NULL) FROM pg_range r WHERE r.rngtypid = t.oid)
                 END), true
FROM pg_type t JOIN ns ON ns.oid = t.typnamespace
WHERE t.typtype IN ('e', 'd', 'r')
  AND NOT EXISTS (SELECT FROM ext WHERE ext.classid = 'pg_type'::regclass AND ext.objid = t.oid)
UNION ALL
SELECT concat_ws(' ', 'function', p.oid::regprocedure::text, 'returns', pg_get_function_result(p.oid),
                 p.prokind::text, l.lanname, p.provolatile::text, p.proisstrict, p.prosecdef, p.proconfig::text,
                 'source', md5(p.prosrc)), true
FROM pg_proc p JOIN ns ON ns.oid = p.pronamespace JOIN pg_language l ON l.oid = p.prolang
WHERE NOT EXISTS (SELECT FROM ext WHERE ext.classid = 'pg_proc'::regclass AND ext.objid = p.oid)
UNION ALL
SELECT concat_ws(' ', 'function body', p.oid::regprocedure::text, md5(pg_get_function_sqlbody(p.oid))), false
FROM pg_proc p JOIN ns ON ns.oid = p.pronamespace
WHERE p.prosqlbody IS NOT NULL
  AND NOT EXISTS (SELECT FROM ext WHERE ext.classid = 'pg_proc'::regclass AND ext.objid = p.oid)
UNION ALL
SELECT 'trigger ' || pg_get_triggerdef(tg.oid), true
FROM pg_trigger tg JOIN rel ON rel.oid = tg.tgrelid
WHERE NOT tg.tgisinternal
UNION ALL
SELECT concat_ws(' ', 'extension', quote_ident(x.extname), 'in', quote_ident(n.nspname)), true
FROM pg_extension x JOIN pg_namespace n ON n.oid = x.extnamespace
WHERE x.extname <> 'plpgsql'
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_and_differences() {
        let a = SchemaDescription {
            lines: vec![
                ("column t 1 x int".into(), true),
                ("view v SELECT 1".into(), false),
            ],
        };
        let mut b = a.clone();
        b.lines[1].0 = "view v SELECT 2".into();
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.portable_fingerprint(), b.portable_fingerprint());
        assert_eq!(
            a.differences(&b, false),
            vec!["- view v SELECT 1", "+ view v SELECT 2"]
        );
        assert!(a.differences(&b, true).is_empty());
    }
}
