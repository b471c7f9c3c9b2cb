//! The ports: the small traits the engine drives and the types both sides of them share,
//! so that local mode and Kubernetes mode run one engine, and the engine's driver can be
//! tested against in-memory fakes. The engine imports these; the adapters implement them;
//! neither imports the other.
//!
//! - [`Instances`]: where PostgreSQL servers live (local processes | StatefulSets).
//! - [`Router`]: the one stable client endpoint (PgBouncer, via its admin console).
//! - [`Source`]: where the desired state comes from (a Git branch | a Flux-applied object).
//! - [`Journal`]: where the record is persisted before every step (a file | a ConfigMap).
//! - [`StatusSink`]: where progress goes (git notes | forge commit statuses | Events).
//!
//! Adapters report failures as `anyhow::Error` with context for people; one kind is told
//! apart: [`NotReady`], something the adapter waits for that is not there yet.

use pgflip_core::plan::{Member, Record};
use pgflip_core::report::Update;
use pgflip_core::revision::Revision;
use pgflip_core::spec::{AdoptedServer, Desired, Major};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::future::Future;
use std::time::Duration;

pub type Result<T> = anyhow::Result<T>;

/// Where a server (or the endpoint) listens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Addr {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// The superuser pgflip creates on every instance it runs and uses for its own work.
pub const ADMIN_USER: &str = "pgflip";

/// A login. The password never appears in Debug output, logs, notes or statuses.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Credentials {{ user: {:?}, password: <redacted> }}",
            self.user
        )
    }
}

/// What an adapter waits for is not there yet (a pod starting, a claim going away): not a
/// failure. Returned inside an `anyhow::Error`; the engine reports it as waiting and the
/// caller comes back later instead of blocking.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NotReady(pub String);

/// Whether an adapter's error is a [`NotReady`].
pub fn is_not_ready(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<NotReady>().is_some())
}

/// A server the user runs cannot be used as it is (a setting, a privilege, objects in the
/// way): a refusal on the commit, nothing touched. Returned inside an `anyhow::Error`.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.join("; "))]
pub struct Unusable(pub Vec<String>);

pub trait Instances: Send + Sync {
    /// On first sight of a document that lists servers the user runs: the major of the
    /// one serving today (the first listed). None when pgflip runs every instance.
    fn serving_today(
        &self,
        _desired: &Desired,
    ) -> impl Future<Output = Result<Option<Major>>> + Send {
        async { Ok(None) }
    }
    /// Whether an instance of `major` runs from this machine's PostgreSQL server binaries
    /// (local mode's own instances do; a pod, or a server the user runs, brings its own).
    fn runs_here(
        &self,
        _major: Major,
        _desired: &Desired,
    ) -> impl Future<Output = Result<bool>> + Send {
        async { Ok(true) }
    }
    /// Creates the instance if it does not exist, starts it if it is stopped, adopts it if
    /// it runs; returns where it listens. Idempotent.
    fn ensure(
        &self,
        member: &Member,
        desired: &Desired,
    ) -> impl Future<Output = Result<Addr>> + Send;
    /// Where the other servers and the endpoint reach `member`, which pgflip reaches at
    /// `addr`: the host in a subscription's connection string and in the endpoint's
    /// configuration. A name that outlives the server's restarts where there is one (a
    /// Kubernetes Service: a pod comes back with a new IP, and a link or an endpoint
    /// pointed at the old one would never reconnect), else `addr` itself.
    fn peer_addr(
        &self,
        _member: &Member,
        _desired: &Desired,
        addr: &Addr,
    ) -> impl Future<Output = Result<Addr>> + Send {
        let addr = addr.clone();
        async move { Ok(addr) }
    }
    /// Where an existing instance listens, without creating or starting anything.
    fn addr(
        &self,
        member: &Member,
        desired: &Desired,
    ) -> impl Future<Output = Result<Option<Addr>>> + Send;
    /// Removes an instance that never served (an abandoned or failed attempt's target):
    /// stops it and deletes its data. Idempotent.
    fn remove(&self, member: &Member, desired: &Desired)
    -> impl Future<Output = Result<()>> + Send;
    /// Retires an instance that served before and is no longer retained. pgflip's own are
    /// removed; a server the user runs is released: pgflip's objects go, its data and the
    /// server stay. Idempotent.
    fn retire(
        &self,
        member: &Member,
        desired: &Desired,
    ) -> impl Future<Output = Result<()>> + Send {
        self.remove(member, desired)
    }

    /// Whether `member`'s server process still runs, as far as pgflip looks after it
    /// (false: [`Instances::ensure`] starts it again). A server someone else runs (a pod,
    /// the user's own) is theirs to restart: always true.
    fn is_up(
        &self,
        _member: &Member,
        _desired: &Desired,
    ) -> impl Future<Output = Result<bool>> + Send {
        async { Ok(true) }
    }

    /// Bytes free for `member`'s data where it is (or will be) kept, or None when pgflip
    /// cannot see that file system (a pod's volume, a server the user runs).
    fn free_space(
        &self,
        _member: &Member,
        _desired: &Desired,
    ) -> impl Future<Output = Result<Option<u64>>> + Send {
        async { Ok(None) }
    }

    /// Why `to` cannot be made here from a physical copy of `from` (a base backup upgraded
    /// with `pg_upgrade`), or None when it can.
    fn physical_copy_blocker(
        &self,
        _from: &Member,
        _to: &Member,
        _desired: &Desired,
    ) -> impl Future<Output = Result<Option<String>>> + Send {
        async {
            Ok(Some(
                "these instances are filled logically only".to_string(),
            ))
        }
    }
    /// Takes a base backup of `source` (the serving `from`) for `to`, its WAL held on the
    /// source by the physical replication slot `slot` until the copy is upgraded.
    /// Idempotent: a complete backup is kept, a partial one taken again.
    fn base_backup(
        &self,
        _from: &Member,
        _to: &Member,
        _source: &Addr,
        _slot: &str,
        _desired: &Desired,
    ) -> impl Future<Output = Result<()>> + Send {
        async { anyhow::bail!("these instances cannot be made from a base backup") }
    }
    /// Makes `to` from its base backup: replayed from `source` through `slot` up to, and
    /// not including, the WAL record at `stop_before` (an LSN), promoted, upgraded from `from`'s major with `pg_upgrade
    /// --link`, and started. Idempotent.
    fn upgrade_backup(
        &self,
        _from: &Member,
        _to: &Member,
        _source: &Addr,
        _slot: &str,
        _stop_before: &str,
        _desired: &Desired,
    ) -> impl Future<Output = Result<Addr>> + Send {
        async { anyhow::bail!("these instances cannot be made from a base backup") }
    }
}

/// Where the passwords of servers the user runs come from (local mode: a file or an
/// environment variable; Kubernetes mode: a Secret). Never stored by pgflip.
pub trait Passwords: Send + Sync {
    /// The password for `server`, or None to log in without one.
    fn password(
        &self,
        server: &AdoptedServer,
    ) -> impl Future<Output = Result<Option<String>>> + Send;
}

pub trait Router: Send + Sync {
    /// Starts (or adopts) the endpoint for `desired.databases`. A new endpoint points at
    /// `initial`; an existing one keeps its target.
    fn ensure(&self, desired: &Desired, initial: &Addr) -> impl Future<Output = Result<()>> + Send;
    /// Where the endpoint sends clients now (its stored configuration).
    fn target(&self) -> impl Future<Output = Result<Option<Addr>>> + Send;
    /// Whether the endpoint's process still runs (false: start it again with
    /// [`Router::ensure`]). Where something else restarts it (a pod), always true.
    fn is_up(&self) -> impl Future<Output = Result<bool>> + Send {
        async { Ok(true) }
    }
    /// Holds new transactions once in-flight ones finish. On `timeout` it resumes and fails,
    /// so clients are never left hanging.
    fn pause(&self, timeout: Duration) -> impl Future<Output = Result<()>> + Send;
    /// Points the endpoint at `target` (stored configuration first, then reloaded).
    fn repoint(&self, desired: &Desired, target: &Addr) -> impl Future<Output = Result<()>> + Send;
    fn resume(&self) -> impl Future<Output = Result<()>> + Send;
    /// The local address and port of each of the endpoint's connections to its server, as
    /// the server sees them as client address and port: sessions that came through the
    /// endpoint, told apart from clients connected to the server directly.
    fn server_sockets(&self) -> impl Future<Output = Result<Vec<(String, u16)>>> + Send;
}

/// One observation of the desired state.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    pub revision: Revision,
    /// `metadata.name` when it can be read, even from an invalid document: whom a report
    /// about this revision concerns.
    pub name: Option<String>,
    /// The validated desired state, or why the revision carries none.
    pub desired: std::result::Result<Desired, String>,
}

pub trait Source: Send {
    fn observe(&mut self) -> impl Future<Output = Result<Observed>> + Send;
}

/// Where the [`Record`] is persisted before every step (local mode: a file written
/// atomically; Kubernetes mode: a ConfigMap beside the object).
pub trait Journal: Send + Sync {
    fn save(&self, record: &Record) -> impl Future<Output = Result<()>> + Send;
}

pub trait StatusSink: Send + Sync {
    fn publish(
        &self,
        revision: &Revision,
        update: &Update,
    ) -> impl Future<Output = Result<()>> + Send;
}
