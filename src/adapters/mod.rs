//! The edges: small traits the engine drives, so local mode and Kubernetes mode share it.
//!
//! - [`Instances`]: where PostgreSQL servers live (local processes | StatefulSets).
//! - [`Router`]: the one stable client endpoint (PgBouncer, via its admin console).
//! - [`Source`]: where the desired state comes from (a Git branch | a Flux-applied CR).
//! - [`StatusSink`]: where progress goes (git notes | forge commit statuses | Kubernetes status).

pub mod forge_status;
pub mod git_notes;
pub mod git_remote;
pub mod git_source;
pub mod local_instances;
pub mod pgbouncer;
pub mod pgbouncer_console;
pub mod run_as;

use crate::core::plan::Member;
use crate::core::report::Update;
use crate::engine::pg::Addr;
use std::future::Future;
use std::time::Duration;

pub type Result<T> = anyhow::Result<T>;

/// What an adapter waits for is not there yet (a pod starting, a claim going away): not a
/// failure. Returned inside an `anyhow::Error`; the engine reports it as waiting and the
/// caller comes back later instead of blocking.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NotReady(pub String);

pub trait Instances: Send + Sync {
    /// Creates the instance if it does not exist, starts it if it is stopped, adopts it if
    /// it runs; returns where it listens. Idempotent.
    fn ensure(&self, member: &Member) -> impl Future<Output = Result<Addr>> + Send;
    /// Where an existing instance listens, without creating or starting anything.
    fn addr(&self, member: &Member) -> impl Future<Output = Result<Option<Addr>>> + Send;
    /// Stops the instance and deletes its data. Idempotent.
    fn remove(&self, member: &Member) -> impl Future<Output = Result<()>> + Send;
}

pub trait Router: Send + Sync {
    /// Starts (or adopts) the endpoint for `databases`. A new endpoint points at `initial`;
    /// an existing one keeps its target.
    fn ensure(
        &self,
        databases: &[String],
        initial: &Addr,
    ) -> impl Future<Output = Result<()>> + Send;
    /// Where the endpoint sends clients now (its stored configuration).
    fn target(&self) -> impl Future<Output = Result<Option<Addr>>> + Send;
    /// Holds new transactions once in-flight ones finish. On `timeout` it resumes and fails,
    /// so clients are never left hanging.
    fn pause(&self, timeout: Duration) -> impl Future<Output = Result<()>> + Send;
    /// Points the endpoint at `target` (stored configuration first, then reloaded).
    fn repoint(&self, target: &Addr) -> impl Future<Output = Result<()>> + Send;
    fn resume(&self) -> impl Future<Output = Result<()>> + Send;
}

/// One observation of the desired state.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    /// The commit (or Flux revision) the document was read at.
    pub revision: String,
    /// The document's text, or why it could not be read.
    pub document: std::result::Result<String, String>,
}

pub trait Source: Send {
    fn observe(&mut self) -> impl Future<Output = Result<Observed>> + Send;
}

/// Where the [`Record`](crate::core::plan::Record) is persisted before every step
/// (local mode: a file written atomically; Kubernetes mode: a ConfigMap beside the object).
pub trait Journal: Send + Sync {
    fn save(&self, record: &crate::core::plan::Record) -> impl Future<Output = Result<()>> + Send;
}

impl Journal for crate::state::StateDir {
    async fn save(&self, record: &crate::core::plan::Record) -> Result<()> {
        crate::state::StateDir::save(self, record)
    }
}

pub trait StatusSink: Send + Sync {
    fn publish(&self, revision: &str, update: &Update) -> impl Future<Output = Result<()>> + Send;
}
