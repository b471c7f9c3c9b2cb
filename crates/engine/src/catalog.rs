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

/// A schema-qualified object name as users write it in messages: `schema.name`.
pub fn display_name(schema: &str, name: &str) -> String {
    format!("{schema}.{name}")
}
