//! The pure core: the document, the phase machine and the shape of progress reports.
//! Nothing here performs I/O or knows about tokio, PostgreSQL, Git or Kubernetes.

pub mod plan;
pub mod report;
pub mod revision;
pub mod spec;
