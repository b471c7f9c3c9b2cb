//! Kubernetes mode's instances: one StatefulSet (one pod, one volume claim) and one
//! headless Service per color, built by [`super::objects`]. The engine reaches a server at
//! its pod's IP; the pod is found by its StatefulSet's name (`<db>-<color>-0`).
//!
//! An existing StatefulSet is never moved to another major: changing the image under
//! existing data would start the wrong server on it. The engine removes a color before it
//! creates it again at another major, and removing deletes the data (the claim) too.

use super::api::{apply, wait_pod_ready};
use super::crd::BlueGreenDatabase;
use super::objects::{self, PORT, VERSION_LABEL, instance_name};
use anyhow::bail;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Service};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams};
use pgflip_core::plan::Member;
use pgflip_core::spec::Desired;
use pgflip_engine::ports::{Addr, Credentials};
use pgflip_engine::ports::{Instances, Result};
use std::time::Duration;

/// How long a new server may take to become Ready (image pull, initdb).
const READY_TIMEOUT: Duration = Duration::from_secs(300);

pub struct KubeInstances {
    client: kube::Client,
    namespace: String,
    /// The object, for the owner references of the instances' objects.
    owner: BlueGreenDatabase,
    admin: Credentials,
}

impl KubeInstances {
    pub fn new(
        client: kube::Client,
        namespace: &str,
        owner: BlueGreenDatabase,
        admin: Credentials,
    ) -> KubeInstances {
        KubeInstances {
            client,
            namespace: namespace.to_string(),
            owner,
            admin,
        }
    }

    fn name(&self, member: &Member) -> String {
        instance_name(&self.owner.name_any(), member.color)
    }

    fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// The existing StatefulSet of this color, refused if it runs another major.
    async fn existing(&self, member: &Member) -> anyhow::Result<Option<StatefulSet>> {
        let Some(sts) = self
            .api::<StatefulSet>()
            .get_opt(&self.name(member))
            .await?
        else {
            return Ok(None);
        };
        let runs = sts
            .spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.labels.as_ref())
            .and_then(|l| l.get(VERSION_LABEL).cloned())
            .unwrap_or_default();
        if runs != member.major.to_string() {
            bail!(
                "StatefulSet {} already runs PostgreSQL {runs:?}, not {}: remove it first",
                self.name(member),
                member.major
            );
        }
        Ok(Some(sts))
    }

    async fn ready_addr(&self, member: &Member) -> anyhow::Result<Addr> {
        let pod = format!("{}-0", self.name(member));
        let ip = wait_pod_ready(&self.api::<Pod>(), &pod, READY_TIMEOUT).await?;
        let addr = Addr {
            host: ip,
            port: PORT as u16,
        };
        pgflip_engine::pg::wait_ready(&addr, &self.admin).await?;
        Ok(addr)
    }
}

impl Instances for KubeInstances {
    async fn ensure(&self, member: &Member, desired: &Desired) -> Result<Addr> {
        self.existing(member).await?;
        let service = objects::headless_service(&self.owner, desired, member.color);
        let sts = objects::statefulset(&self.owner, desired, member);
        apply(&self.api::<Service>(), &service).await?;
        apply(&self.api::<StatefulSet>(), &sts).await?;
        self.ready_addr(member).await
    }

    async fn addr(&self, member: &Member, _desired: &Desired) -> Result<Option<Addr>> {
        match self.existing(member).await? {
            None => Ok(None),
            Some(_) => Ok(Some(self.ready_addr(member).await?)),
        }
    }

    async fn remove(&self, member: &Member, _desired: &Desired) -> Result<()> {
        let name = self.name(member);
        let gone = |r: kube::Result<_>| match r {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(e) => Err(e),
        };
        gone(
            self.api::<StatefulSet>()
                .delete(&name, &DeleteParams::foreground())
                .await
                .map(|_| ()),
        )?;
        gone(
            self.api::<Service>()
                .delete(&name, &DeleteParams::default())
                .await
                .map(|_| ()),
        )?;
        // The pod must be gone before its claim: a claim in use is only marked for deletion.
        let pods = self.api::<Pod>();
        let pod = format!("{name}-0");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while pods.get_opt(&pod).await?.is_some() {
            if tokio::time::Instant::now() > deadline {
                bail!("pod {pod} did not go away within 120 s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // And the claim must be gone before this color is created again: a new pod bound
        // to a claim still terminating would find the old data or none.
        let claims = self.api::<PersistentVolumeClaim>();
        let claim = format!("data-{pod}");
        gone(
            claims
                .delete(&claim, &DeleteParams::default())
                .await
                .map(|_| ()),
        )?;
        while claims.get_opt(&claim).await?.is_some() {
            if tokio::time::Instant::now() > deadline {
                bail!("volume claim {claim} did not go away within 120 s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(())
    }
}
