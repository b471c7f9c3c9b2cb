//! Small helpers for talking to the API server: server-side apply under pgflip's own
//! field manager, reads that treat "not found" as absence, and whether a pod is Ready
//! (checked once: what is not there yet is [`NotReady`], never waited for).

use anyhow::Context;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use pgflip_engine::ports::NotReady;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt::Debug;

/// Every write pgflip makes is a server-side apply under this manager, so it owns only
/// the fields it sets and never the ones that come from Git (Flux applies those as
/// `kustomize-controller`).
pub const FIELD_MANAGER: &str = "pgflip";

pub fn apply_params() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

/// Server-side applies `object` (it must carry its name; apiVersion and kind are set by
/// its type's serializer).
pub async fn apply<K>(api: &Api<K>, object: &K) -> anyhow::Result<K>
where
    K: Resource + Clone + Debug + Serialize + DeserializeOwned,
    K::DynamicType: Default,
{
    let name = object.name_any();
    api.patch(&name, &apply_params(), &Patch::Apply(object))
        .await
        .with_context(|| format!("applying {} {name}", K::kind(&Default::default())))
}

/// Whether the pod runs, is Ready and has an address: its IP.
pub fn ready_pod_ip(pod: &Pod) -> Option<String> {
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let status = pod.status.as_ref()?;
    let ready = status
        .conditions
        .as_ref()?
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    ready.then(|| status.pod_ip.clone()).flatten()
}

/// What an adapter waits for is not there yet: [`NotReady`], so the caller requeues
/// instead of waiting inside a reconcile.
pub fn not_ready(what: impl Into<String>) -> anyhow::Error {
    NotReady(what.into()).into()
}

/// The named pod's IP if it is Ready now; [`NotReady`] if it is not (or does not exist
/// yet). Never waits: a pod may take minutes (image pull, initdb), and a reconcile must
/// not hold on to the controller that long.
pub async fn ready_pod(pods: &Api<Pod>, name: &str) -> anyhow::Result<String> {
    let pod = pods
        .get_opt(name)
        .await
        .with_context(|| format!("reading pod {name}"))?;
    match pod {
        None => Err(not_ready(format!("pod {name} does not exist yet"))),
        Some(pod) => {
            ready_pod_ip(&pod).ok_or_else(|| not_ready(format!("pod {name} is not Ready yet")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodCondition, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn pod(ready: &str, ip: Option<&str>) -> Pod {
        Pod {
            status: Some(PodStatus {
                pod_ip: ip.map(str::to_string),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: ready.into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn only_a_ready_pod_with_an_address_and_no_deletion_has_an_ip() {
        assert_eq!(
            ready_pod_ip(&pod("True", Some("10.0.0.7"))).as_deref(),
            Some("10.0.0.7")
        );
        assert_eq!(ready_pod_ip(&pod("False", Some("10.0.0.7"))), None);
        assert_eq!(ready_pod_ip(&pod("True", None)), None);
        assert_eq!(ready_pod_ip(&Pod::default()), None);
        let mut deleting = pod("True", Some("10.0.0.7"));
        deleting.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
        assert_eq!(ready_pod_ip(&deleting), None);
    }

    #[test]
    fn not_ready_is_found_under_context() {
        use pgflip_engine::ports::is_not_ready;
        let waiting = not_ready("pod orders-green-0 is not Ready yet")
            .context("ensuring orders-green")
            .context("provision");
        assert!(is_not_ready(&waiting));
        assert_eq!(
            format!("{waiting:#}"),
            "provision: ensuring orders-green: pod orders-green-0 is not Ready yet"
        );
        assert!(!is_not_ready(&anyhow::anyhow!("connection refused")));
        let io = anyhow::Error::from(std::io::Error::other("x")).context("pod y is not Ready yet");
        assert!(!is_not_ready(&io), "only the type counts, not the words");
    }
}
