//! Local mode's adapters, and the ones both modes use: each implements a port of
//! [`crate::ports`].
//!
//! - [`local_instances`]: PostgreSQL servers as processes on this machine ([`Instances`](crate::ports::Instances)).
//! - [`adopted`]: servers the user runs, in front of either mode's own instances ([`Instances`](crate::ports::Instances)).
//! - [`local_passwords`]: local mode's passwords of those servers ([`Passwords`](crate::ports::Passwords)).
//! - [`pgbouncer`] (over [`pgbouncer_console`]): the client endpoint ([`Router`](crate::ports::Router)).
//! - [`git_source`] (over [`git_remote`]): the desired state from a Git branch ([`Source`](crate::ports::Source)).
//! - [`git_notes`], [`forge_status`]: progress on the commit ([`StatusSink`](crate::ports::StatusSink)).

pub mod adopted;
pub mod forge_status;
pub mod git_notes;
pub mod git_remote;
pub mod git_source;
pub mod local_instances;
pub mod local_passwords;
pub mod pgbouncer;
pub mod pgbouncer_console;
