//! The pure core: the document and its validation ([`spec`]), the record, the phases and
//! the decision of the next step ([`plan`]), revisions ([`revision`]) and the shape of
//! progress reports ([`report`]). Nothing here performs I/O, reads a clock or knows about
//! tokio, PostgreSQL, Git or Kubernetes — the crate's dependencies say so.

pub mod plan;
pub mod report;
pub mod revision;
pub mod spec;
