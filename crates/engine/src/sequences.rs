//! Sequence state, carried from blue to green during the switch pause: logical
//! replication does not replicate sequences, so without this green would hand out ids
//! blue already used.
//!
//! Every sequence counts, not only those owned by a column (serial, identity): a
//! standalone sequence used through `DEFAULT nextval('…')` or by the application is just
//! as much a source of keys.
//!
//! The work per sequence happens before the pause: every sequence is read and set on the
//! target ([`read_all`], [`apply_all`]) while clients still run. Inside the pause only the
//! sequences that moved since are carried ([`read_moved`]): one cheap statement tells
//! which, so the pause stays flat in the number of sequences.
//!
//! Reading and writing each take one round trip:
//! - Reading a sequence's own `last_value, is_called` needs one query per sequence
//!   (`pg_sequences.last_value` is NULL both for a never-used sequence and after
//!   `setval(…, n, false)` / `ALTER SEQUENCE … RESTART`, which loses `n`). A single
//!   statement runs them all through `query_to_xml(format('SELECT … FROM %I.%I'))`,
//!   core SQL's only way to run dynamic SQL from a query; the tiny XML is read here.
//! - Writing is one `SELECT setval(…)` over a VALUES list: one statement, so all or none.

use crate::catalog::{USER_NAMESPACES, display_name};
use crate::pg::{literal, qualified};
use anyhow::{Context, bail};
use tokio_postgres::Client;

/// One sequence's position: the next `nextval` returns `last_value + increment` when
/// `is_called`, else `last_value` itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SequenceState {
    pub schema: String,
    pub name: String,
    pub last_value: i64,
    pub is_called: bool,
}

/// Reads every user sequence of the connected database, in one round trip.
pub async fn read_all(source: &Client) -> anyhow::Result<Vec<SequenceState>> {
    read_exactly(source, None).await
}

/// Reads the sequences named (schema, name), or all, in one round trip.
async fn read_exactly(
    source: &Client,
    only: Option<&[(String, String)]>,
) -> anyhow::Result<Vec<SequenceState>> {
    let filter = if only.is_some() {
        "AND (ns.nspname::text, c.relname::text) IN (SELECT * FROM unnest($1::text[], $2::text[]))"
    } else {
        ""
    };
    let sql = format!(
        "WITH ns AS ({USER_NAMESPACES}) \
         SELECT ns.nspname::text, c.relname::text, \
                pg_catalog.query_to_xml(pg_catalog.format('SELECT last_value, is_called FROM %I.%I', \
                                                          ns.nspname, c.relname), false, true, '')::text \
         FROM pg_catalog.pg_class c JOIN ns ON ns.oid = c.relnamespace \
         WHERE c.relkind = 'S' {filter} ORDER BY 1, 2"
    );
    let rows = match only {
        None => source.query_typed(&sql, &[]).await,
        Some(names) => {
            let schemas: Vec<&str> = names.iter().map(|(s, _)| s.as_str()).collect();
            let relnames: Vec<&str> = names.iter().map(|(_, n)| n.as_str()).collect();
            let text_array = tokio_postgres::types::Type::TEXT_ARRAY;
            source
                .query_typed(
                    &sql,
                    &[(&schemas, text_array.clone()), (&relnames, text_array)],
                )
                .await
        }
    }
    .context("reading sequences")?;
    rows.iter()
        .map(|row| {
            let (schema, name, xml): (String, String, String) =
                (row.get(0), row.get(1), row.get(2));
            let parse = || -> Option<(i64, bool)> {
                let last_value = xml_field(&xml, "last_value")?.parse().ok()?;
                let is_called = xml_field(&xml, "is_called")? == "true";
                Some((last_value, is_called))
            };
            let Some((last_value, is_called)) = parse() else {
                bail!(
                    "unexpected state of sequence {}: {xml}",
                    display_name(&schema, &name)
                );
            };
            Ok(SequenceState {
                schema,
                name,
                last_value,
                is_called,
            })
        })
        .collect()
}

/// The sequences whose state differs from `before` (taken earlier on the same server), in
/// their state now. One statement reads `pg_sequence_last_value` of every sequence — a
/// function call each, no SQL parsed per sequence; it is NULL both for a sequence not called
/// yet and after `setval(…, n, false)`, so only those few are read exactly ([`read_all`]'s
/// way). A non-NULL value means `is_called`.
pub async fn read_moved(
    source: &Client,
    before: &[SequenceState],
) -> anyhow::Result<Vec<SequenceState>> {
    let sql = format!(
        "WITH ns AS ({USER_NAMESPACES}) \
         SELECT ns.nspname::text, c.relname::text, pg_catalog.pg_sequence_last_value(c.oid) \
         FROM pg_catalog.pg_class c JOIN ns ON ns.oid = c.relnamespace \
         WHERE c.relkind = 'S' ORDER BY 1, 2"
    );
    let rows = source
        .query_typed(&sql, &[])
        .await
        .context("reading sequences")?;
    let known: std::collections::HashMap<(&str, &str), &SequenceState> = before
        .iter()
        .map(|s| ((s.schema.as_str(), s.name.as_str()), s))
        .collect();
    let mut moved = Vec::new();
    let mut not_called = Vec::new();
    for row in &rows {
        let (schema, name): (String, String) = (row.get(0), row.get(1));
        let last_value: Option<i64> = row.get(2);
        let was = known.get(&(schema.as_str(), name.as_str()));
        match last_value {
            Some(v) if was.is_some_and(|w| w.is_called && w.last_value == v) => {}
            Some(v) => moved.push(SequenceState {
                schema,
                name,
                last_value: v,
                is_called: true,
            }),
            None => not_called.push((schema, name)),
        }
    }
    if !not_called.is_empty() {
        for s in read_exactly(source, Some(&not_called)).await? {
            if known.get(&(s.schema.as_str(), s.name.as_str())) != Some(&&s) {
                moved.push(s);
            }
        }
        moved.sort_by(|a, b| (&a.schema, &a.name).cmp(&(&b.schema, &b.name)));
    }
    Ok(moved)
}

/// Sets every sequence on the target to the given state, in one round trip and one
/// statement (all or none). Returns how many were set.
pub async fn apply_all(target: &Client, states: &[SequenceState]) -> anyhow::Result<u64> {
    if states.is_empty() {
        return Ok(0);
    }
    let values: Vec<String> = states
        .iter()
        .map(|s| {
            format!(
                "({}, {}::int8, {})",
                literal(&qualified(&s.schema, &s.name)),
                s.last_value,
                s.is_called
            )
        })
        .collect();
    let sql = format!(
        "SELECT count(pg_catalog.setval(v.seq::regclass, v.last_value, v.is_called)) \
         FROM (VALUES {}) AS v(seq, last_value, is_called)",
        values.join(", ")
    );
    let row = target
        .query_typed_one(&sql, &[])
        .await
        .context("setting sequences on the target")?;
    Ok(row.get::<_, i64>(0) as u64)
}

/// The text of `<field>…</field>` in query_to_xml's output for one row.
fn xml_field<'a>(xml: &'a str, field: &str) -> Option<&'a str> {
    let open = format!("<{field}>");
    let start = xml.find(&open)? + open.len();
    let end = start + xml[start..].find('<')?;
    Some(&xml[start..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_query_to_xml_output() {
        let xml = "<row xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\">\n  <last_value>-42</last_value>\n  <is_called>false</is_called>\n</row>\n";
        assert_eq!(xml_field(xml, "last_value"), Some("-42"));
        assert_eq!(xml_field(xml, "is_called"), Some("false"));
        assert_eq!(xml_field(xml, "missing"), None);
    }
}
