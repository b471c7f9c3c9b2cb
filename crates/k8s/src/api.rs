//! Small helpers for talking to the API server: server-side apply under pgflip's own
//! field manager, reads that treat "not found" as absence, and waiting for a pod.

use anyhow::Context;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt::Debug;
use std::time::Duration;

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

/// Waits until the named pod is Ready, returning its IP.
pub async fn wait_pod_ready(
    pods: &Api<Pod>,
    name: &str,
    timeout: Duration,
) -> anyhow::Result<String> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(ip) = pods.get_opt(name).await?.as_ref().and_then(ready_pod_ip) {
            return Ok(ip);
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("pod {name} was not Ready within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
