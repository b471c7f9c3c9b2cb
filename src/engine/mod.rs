//! The PostgreSQL work of a blue-green switch, over tokio-postgres.

pub mod catalog;
pub mod pg;
pub mod preflight;
pub mod schema;
pub mod sequences;
pub mod sql_script;
pub mod verify;
