//! The PostgreSQL work of a blue-green switch, over tokio-postgres.
//! [`switchover`] holds the switchover sequence; [`reconcile`] runs the phases.

pub mod catalog;
pub mod fence;
pub mod intake;
pub mod pg;
pub mod preflight;
pub mod reconcile;
pub mod replication;
pub mod schema;
pub mod sequences;
pub mod sql_script;
pub mod switchover;
pub mod verify;
