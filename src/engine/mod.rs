//! The engine: the PostgreSQL work of a blue-green switch, over tokio-postgres, and the
//! driver that runs it step by step.
//!
//! - [`runner`] → [`driver`] → [`phases`]: take a revision, decide, record, act.
//! - [`switchover`]: the switchover sequence (the pause), in one file.
//! - [`error`]: how a step goes wrong, final or not.
//! - The SQL work the phases use: [`preflight`], [`schema`], [`replication`], [`verify`],
//!   [`sequences`], [`fence`], over [`pg`] (connections, quoting) and [`catalog`].

pub mod catalog;
pub mod driver;
pub mod error;
pub mod fence;
pub mod intake;
pub mod pg;
pub mod phases;
pub mod preflight;
pub mod replication;
pub mod runner;
pub mod schema;
pub mod sequences;
pub mod sql_script;
pub mod switchover;
#[cfg(test)]
mod tests;
pub mod verify;
