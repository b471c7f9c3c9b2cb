//! The pure core: the document and its validation ([`spec`]), the record, the phases and
//! the decision of the next step ([`plan`]), the plan of a proposed
//! document ([`forecast`]), revisions ([`revision`]), the shape of
//! progress reports ([`report`]) and of progress in bytes and time ([`progress`]). Nothing
//! here performs I/O, reads a clock or knows about tokio, PostgreSQL, Git or Kubernetes —
//! the crate's dependencies say so.

pub mod forecast;
pub mod plan;
pub mod progress;
pub mod report;
pub mod revision;
pub mod spec;
