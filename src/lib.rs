//! pgflip: GitOps-driven blue-green major-version upgrades (and downgrades) of PostgreSQL.
//!
//! - [`core`]: pure model and decisions (the document, the phase machine, reports).
//! - [`engine`]: the PostgreSQL work; [`engine::switchover`] is the switchover sequence.
//! - [`adapters`]: instances, the PgBouncer endpoint, Git source and notes.
//! - [`k8s`]: Kubernetes mode's pure parts (the CRD, Flux revisions, status, objects).
//! - [`bench`]: pgflip against dump/restore and pg_upgrade, under load, per size.
//! - [`local`]: local mode's run loop; [`demo`]: the end-to-end demo; [`load`]: the
//!   client write load with its ledger of committed transactions.

pub mod adapters;
pub mod bench;
pub mod core;
pub mod demo;
pub mod engine;
pub mod failpoint;
pub mod k8s;
pub mod load;
pub mod local;
pub mod ports;
pub mod state;
pub mod toolchain;
