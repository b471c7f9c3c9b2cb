//! Kubernetes mode: the same engine local mode runs, with the cluster behind its ports.
//!
//! - Pure, tested from fixtures: the `BlueGreenDatabase` custom resource ([`crd`]), Flux's
//!   source revisions and Kustomization status ([`flux`]), the object's status
//!   ([`status`]) and the objects pgflip owns ([`objects`]).
//! - The controller ([`controller`]): a kube-runtime controller that runs one
//!   [`Runner`](pgflip_engine::runner::Runner) per object, leader-elected ([`leader`]),
//!   with its metrics ([`metrics`]).
//! - The adapters: StatefulSets as instances ([`instances`]), a PgBouncer Deployment as
//!   the endpoint ([`endpoint`], also the endpoint pod's own process), a ConfigMap as the
//!   journal ([`journal`]); server-side apply helpers in [`api`].

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
pub mod secrets;
pub mod status;
