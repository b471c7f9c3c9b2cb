//! Copying the schema (and the roles it refers to) from blue to green, and telling when
//! blue's schema changed afterwards (logical replication does not carry DDL).
//!
//! - [`dump`]: `pg_dump --schema-only` / `pg_dumpall --roles-only` of the source.
//! - [`prepare`]: make a dump load on the target major through a plain simple-query batch.
//! - [`load`]: load it in one transaction, once.
//! - [`fingerprint`]: a digest of the user schema, to detect DDL after the copy.
//! - [`update_extensions`]: after a physical copy, extensions brought to the versions the
//!   target major installs (what `pg_upgrade`'s `update_extensions.sql` asks for).

pub mod dump;
pub mod fingerprint;
pub mod load;
pub mod prepare;

pub use dump::{dump_roles, dump_schema};
pub use fingerprint::{SchemaDescription, describe, fingerprint, portable_fingerprint};
pub use load::{SchemaLoad, copied_fingerprint, load, load_once, load_roles};
pub use prepare::{prepare_for_target, prepare_roles_for_target};

/// Updates every extension of the current database whose installed version is not the
/// default of this server's major — as `pg_upgrade` leaves them (it carries the old
/// major's extension objects over as they were, and writes `update_extensions.sql` for a
/// person to run). Returns `name from → to` for each one updated. Idempotent.
pub async fn update_extensions(client: &tokio_postgres::Client) -> anyhow::Result<Vec<String>> {
    let stale = client
        .query(
            "SELECT e.extname::text, e.extversion, a.default_version
               FROM pg_extension e JOIN pg_available_extensions a ON a.name = e.extname
              WHERE a.default_version IS NOT NULL AND e.extversion <> a.default_version
              ORDER BY 1",
            &[],
        )
        .await?;
    let mut updated = Vec::new();
    for row in stale {
        let (name, from, to): (String, String, String) = (row.get(0), row.get(1), row.get(2));
        client
            .batch_execute(&format!(
                "ALTER EXTENSION {} UPDATE",
                crate::pg::ident(&name)
            ))
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "updating extension {name} from {from} to {to}: {}",
                    crate::replication::db_error_text(&e)
                )
            })?;
        updated.push(format!("{name} {from} → {to}"));
    }
    Ok(updated)
}
