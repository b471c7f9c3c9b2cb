//! pgflip: GitOps-driven blue-green major-version upgrades (and downgrades) of PostgreSQL.
//!
//! - [`core`]: pure model and decisions (the document, the phase machine, reports).
//! - [`engine`]: the PostgreSQL work; [`engine::switchover`] is the switchover sequence.
//! - [`adapters`]: instances, the PgBouncer endpoint, Git source and notes.
//! - [`load`]: a client write load with a ledger of its commits (demo, tests, benchmark).
//! - [`local`]: local mode's run loop; [`demo`]: the end-to-end demo.

pub mod adapters;
pub mod core;
pub mod engine;
pub mod load;
pub mod state;
pub mod toolchain;
