//! Writing the object's status and the annotations that mirror it (computed by
//! [`crate::status`]) with server-side apply, when they changed.

use crate::api::apply_params;
use crate::crd::BlueGreenDatabase;
use crate::status;
use anyhow::Context;
use kube::api::{Api, Patch};
use kube::{Resource, ResourceExt};
use pgflip_core::plan::Record;
use pgflip_core::revision::Revision;

/// Writes the status (and the annotations mirroring it) when it changed.
pub(super) async fn publish_status(
    api: &Api<BlueGreenDatabase>,
    object: &BlueGreenDatabase,
    record: &Record,
    waiting_for_flux: bool,
) -> anyhow::Result<()> {
    let live = object.desired();
    let previous = object.status.clone().unwrap_or_default();
    let invalid = live.as_ref().err().map(|e| e.to_string());
    let revision = record
        .wanted
        .as_ref()
        .map(|w| &w.revision)
        .filter(|r| !matches!(r, Revision::Generation(_)))
        .map(Revision::to_string);
    let observed = status::Observed {
        generation: object.metadata.generation,
        desired: match (&live, &invalid) {
            (Ok(d), _) => Ok(d),
            (Err(_), Some(why)) => Err(why.as_str()),
            (Err(_), None) => unreachable!("an invalid spec has a reason"),
        },
        record,
        revision: revision.as_deref(),
        waiting_for_flux,
    };
    let next = status::compute(&observed, &previous, k8s_openapi::jiff::Timestamp::now());
    // The annotations first: whoever sees the new status finds them already there.
    let annotations: serde_json::Map<String, serde_json::Value> = status::annotations(&next)
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.into()))
        .collect();
    let current = object.annotations();
    if annotations
        .iter()
        .any(|(k, v)| current.get(k).map(String::as_str) != v.as_str())
    {
        let body = serde_json::json!({
            "apiVersion": BlueGreenDatabase::api_version(&()),
            "kind": BlueGreenDatabase::kind(&()),
            "metadata": { "name": object.name_any(), "annotations": annotations },
        });
        api.patch(&object.name_any(), &apply_params(), &Patch::Apply(&body))
            .await
            .context("writing the annotations")?;
    }
    if next != previous {
        let body = serde_json::json!({
            "apiVersion": BlueGreenDatabase::api_version(&()),
            "kind": BlueGreenDatabase::kind(&()),
            "status": next,
        });
        api.patch_status(&object.name_any(), &apply_params(), &Patch::Apply(&body))
            .await
            .context("writing the status")?;
    }
    Ok(())
}
