//! Which revision the object's current spec stands for: the Flux Kustomization that
//! applied it (its commit), or the object's own generation when no Kustomization manages it.

use crate::crd::BlueGreenDatabase;
use crate::flux::{KustomizationStatus, NAME_LABEL, NAMESPACE_LABEL, SourceRevision};
use anyhow::Context;
use kube::ResourceExt;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use pgflip_core::plan::Record;
use pgflip_core::revision::Revision;
use pgflip_core::spec::Desired;

/// Where the object's current spec came from.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Origin {
    /// No Kustomization manages it: every generation is a revision of its own.
    Unmanaged,
    /// Flux applied it at this source revision.
    Applied(Revision),
    /// Its Kustomization has not reported any revision applied yet.
    NotYetApplied,
}

pub(super) async fn origin(
    client: &kube::Client,
    object: &BlueGreenDatabase,
) -> anyhow::Result<Origin> {
    let labels = object.labels();
    let (Some(name), Some(namespace)) = (labels.get(NAME_LABEL), labels.get(NAMESPACE_LABEL))
    else {
        return Ok(Origin::Unmanaged);
    };
    let gvk = GroupVersionKind::gvk("kustomize.toolkit.fluxcd.io", "v1", "Kustomization");
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), namespace, &ApiResource::from_gvk(&gvk));
    let Some(kustomization) = api
        .get_opt(name)
        .await
        .with_context(|| format!("reading Kustomization {namespace}/{name}"))?
    else {
        return Ok(Origin::NotYetApplied);
    };
    let status: KustomizationStatus = kustomization
        .data
        .get("status")
        .cloned()
        .map(serde_json::from_value)
        .transpose()
        .context("reading the Kustomization's status")?
        .unwrap_or_default();
    Ok(Origin::from_status(&status))
}

impl Origin {
    pub(super) fn from_status(status: &KustomizationStatus) -> Origin {
        match status.applied_revision() {
            None => Origin::NotYetApplied,
            Some(r) => Origin::Applied(
                SourceRevision::parse(r)
                    .ok()
                    .and_then(|parsed| parsed.commit().and_then(Revision::commit))
                    .unwrap_or_else(|| Revision::Flux(r.to_string())),
            ),
        }
    }

    /// The revision the object's current spec stands for, if one is known yet. A Git
    /// revision is named by its commit: that is where progress is reported.
    pub(super) fn revision(&self, generation: Option<i64>) -> Option<Revision> {
        match self {
            Origin::Unmanaged => Some(Revision::Generation(generation.unwrap_or(0))),
            Origin::Applied(revision) => Some(revision.clone()),
            Origin::NotYetApplied => None,
        }
    }
}

/// Whether the object holds a (valid) spec that Flux has not reported applied yet: the
/// revision it reports was taken already, with another desired state.
pub(super) fn waiting_for_flux(origin: &Origin, live: Option<&Desired>, record: &Record) -> bool {
    match origin {
        Origin::NotYetApplied => true,
        Origin::Unmanaged => false,
        Origin::Applied(revision) => {
            live.is_some_and(|live| record.wanted.as_ref().is_some_and(|w| w.desired != *live))
                && record.observed_revision.as_ref() == Some(revision)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

    fn flux(revision: &str) -> KustomizationStatus {
        serde_json::from_value(serde_json::json!({
            "lastAppliedRevision": revision,
            "conditions": [{"type": "Ready", "status": "True", "reason": "ReconciliationSucceeded", "message": ""}],
        }))
        .unwrap()
    }

    #[test]
    fn a_flux_revision_is_named_by_its_commit() {
        let origin = Origin::from_status(&flux(&format!("main@sha1:{SHA}")));
        assert_eq!(origin.revision(Some(4)), Some(Revision::Commit(SHA.into())));
        let oci = Origin::from_status(&flux(&format!("latest@sha256:{SHA}{}", &SHA[..24])));
        assert!(
            matches!(oci.revision(None), Some(Revision::Flux(r)) if r.starts_with("latest@sha256:"))
        );
        assert_eq!(
            Origin::from_status(&KustomizationStatus::default()),
            Origin::NotYetApplied
        );
        assert_eq!(Origin::NotYetApplied.revision(Some(4)), None);
        assert_eq!(
            Origin::Unmanaged.revision(Some(4)),
            Some(Revision::Generation(4))
        );
    }

    fn desired(major: u32) -> Desired {
        pgflip_core::spec::parse(&pgflip_core::spec::render(
            "db",
            pgflip_core::spec::Major(major),
            "",
        ))
        .unwrap()
    }

    #[test]
    fn a_spec_ahead_of_flux_waits_for_its_revision() {
        let origin = Origin::from_status(&flux(&format!("main@sha1:{SHA}")));
        let revision = Revision::Commit(SHA.into());
        let taken = Record {
            observed_revision: Some(revision.clone()),
            wanted: Some(pgflip_core::plan::Wanted {
                revision,
                desired: desired(15),
            }),
            ..Default::default()
        };
        // Flux applied the object at a new commit but still reports the old one.
        assert!(waiting_for_flux(&origin, Some(&desired(16)), &taken));
        // The object is what that revision carried.
        assert!(!waiting_for_flux(&origin, Some(&desired(15)), &taken));
        // An invalid spec is Stalled, not waiting.
        assert!(!waiting_for_flux(&origin, None, &taken));
        assert!(waiting_for_flux(
            &Origin::NotYetApplied,
            Some(&desired(16)),
            &taken
        ));
        assert!(!waiting_for_flux(
            &Origin::Unmanaged,
            Some(&desired(16)),
            &taken
        ));
    }
}
