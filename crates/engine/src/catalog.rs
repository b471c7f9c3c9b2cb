//! Which objects are the user's. Checks, fingerprints, schema copies and verification all
//! look at the same set, so the rule lives in one place.
//!
//! Left out: pgflip's own schema (its marker tables differ between blue and green by
//! design), the system catalogs, and TOAST and temporary schemas (they belong to their
//! tables or sessions, never to the schema a user wrote).

/// The schema pgflip keeps its own objects in, in every carried database. Not `pgflip`:
/// that is the admin role's name, and `"$user"` comes first on the default search_path,
/// so the admin's own `CREATE TABLE t` would land in it.
pub const PGFLIP_SCHEMA: &str = "_pgflip";

/// A query yielding `(oid, nspname)` of every user schema; use it as a CTE or subquery.
pub const USER_NAMESPACES: &str = "SELECT oid, nspname FROM pg_catalog.pg_namespace \
     WHERE nspname NOT IN ('_pgflip', 'pg_catalog', 'information_schema') \
       AND nspname NOT LIKE 'pg\\_toast%' \
       AND nspname NOT LIKE 'pg\\_temp\\_%'";

/// `(schema, name)` of the user's tables and partitioned tables for which `condition` (on
/// `pg_catalog.pg_class c`) holds, in name order.
pub async fn user_tables_where(
    client: &tokio_postgres::Client,
    condition: &str,
) -> Result<Vec<(String, String)>, tokio_postgres::Error> {
    let rows = client
        .query(
            &format!(
                "WITH ns AS ({USER_NAMESPACES}) \
                 SELECT ns.nspname::text, c.relname::text FROM pg_catalog.pg_class c JOIN ns ON ns.oid = c.relnamespace \
                 WHERE c.relkind IN ('r', 'p') AND ({condition}) ORDER BY 1, 2"
            ),
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// A schema-qualified object name as users write it in messages: `schema.name`.
pub fn display_name(schema: &str, name: &str) -> String {
    format!("{schema}.{name}")
}

/// The user's tables in the database `client` is connected to: how many (a partitioned
/// table counts once) and their size with TOAST and indexes (materialized views included).
pub async fn user_data_size(
    client: &tokio_postgres::Client,
) -> Result<(u64, u64), tokio_postgres::Error> {
    let row = client
        .query_one(
            &format!(
                "WITH ns AS ({USER_NAMESPACES}) \
                 SELECT count(*) FILTER (WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition), \
                        coalesce(sum(pg_total_relation_size(c.oid)) FILTER (WHERE c.relkind IN ('r', 'm')), 0)::bigint \
                   FROM pg_catalog.pg_class c JOIN ns ON ns.oid = c.relnamespace"
            ),
            &[],
        )
        .await?;
    Ok((row.get::<_, i64>(0) as u64, row.get::<_, i64>(1) as u64))
}
