//! Kubernetes mode, its pure parts: the `BlueGreenDatabase` custom resource ([`crd`]),
//! Flux as the source of the revision ([`flux`]), the object's status ([`status`]) and
//! the objects pgflip owns ([`objects`]). They take values and return values; the
//! controller that reads and writes them through the API server is an adapter around
//! the same engine local mode runs.

pub mod api;
pub mod controller;
pub mod crd;
pub mod endpoint;
pub mod flux;
pub mod instances;
pub mod journal;
pub mod leader;
pub mod metrics;
pub mod objects;
pub mod status;
