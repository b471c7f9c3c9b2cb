//! pgflip's engine: the PostgreSQL work of a blue-green switch, over tokio-postgres, the
//! driver that runs it step by step, the ports it drives and local mode's adapters.
//!
//! - [`ports`]: the traits the engine drives and the adapters implement.
//! - [`runner`] → [`driver`] → [`phases`]: take a revision, decide, record, act; [`steps`]:
//!   what the driver asks of the phases.
//! - [`switchover`]: the switchover sequence (the pause), in one file.
//! - [`error`]: how a step goes wrong, final or not.
//! - The SQL work the phases use: [`preflight`], [`schema`], [`replication`], [`verify`],
//!   [`sequences`], [`fence`], over [`pg`] (connections, quoting) and [`catalog`].
//! - [`adapters`]: local processes, PgBouncer, Git, forge statuses.
//! - [`state`] (the state directory and its record), [`toolchain`] (the PostgreSQL
//!   binaries), [`run_as`] (processes as the unprivileged user), [`load`] (a client write load with its ledger), [`failpoint`] (test crashes).

pub mod adapters;
pub mod catalog;
pub mod clock;
pub mod direct_clients;
pub mod driver;
pub mod error;
pub mod failpoint;
pub mod fence;
pub mod intake;
pub mod load;
pub mod pg;
pub mod phases;
pub mod ports;
pub mod preflight;
pub mod prewarm;
pub mod pull_requests;
pub mod random;
pub mod replication;
pub mod run_as;
pub mod runner;
pub mod schema;
pub mod sequences;
pub mod sql_script;
pub mod state;
pub mod steps;
pub mod switchover;
#[cfg(test)]
mod tests;
pub mod toolchain;
pub mod verify;
