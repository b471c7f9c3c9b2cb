//! Copying the schema (and the roles it refers to) from blue to green, and telling when
//! blue's schema changed afterwards (logical replication does not carry DDL).
//!
//! - [`dump`]: `pg_dump --schema-only` / `pg_dumpall --roles-only` of the source.
//! - [`prepare`]: make a dump load on the target major through a plain simple-query batch.
//! - [`load`]: load it in one transaction, once.
//! - [`fingerprint`]: a digest of the user schema, to detect DDL after the copy.

pub mod dump;
pub mod fingerprint;
pub mod load;
pub mod prepare;

pub use dump::{dump_roles, dump_schema};
pub use fingerprint::{SchemaDescription, describe, fingerprint, portable_fingerprint};
pub use load::{SchemaLoad, copied_fingerprint, load, load_once, load_roles};
pub use prepare::{prepare_for_target, prepare_roles_for_target};
