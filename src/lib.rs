//! pgflip's front: the binary's subcommands, local mode's run loop ([`local`]), plans on pull requests ([`plans`]),
//! progress in the terminal ([`watch`]) and the
//! end-to-end demo ([`demo`]). The rest lives in the workspace's crates:
//!
//! - `pgflip-core`: the pure model and decisions (the document, the phase machine, reports).
//! - `pgflip-engine`: the ports, the driver and phases over PostgreSQL, local adapters.
//! - `pgflip-k8s`: Kubernetes mode (the CRD, the controller, its adapters).
//! - `pgflip-bench`: pgflip against dump/restore and pg_upgrade, under load, per size.

pub mod demo;
pub mod local;
pub mod plans;
pub mod watch;
