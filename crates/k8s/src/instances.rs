//! Kubernetes mode's instances: one StatefulSet (one pod, one volume claim) and one
//! headless Service per color, built by [`super::objects`]. The engine reaches a server at
//! its pod's IP (the pod is found by its StatefulSet's name, `<db>-<color>-0`), looked up
//! afresh at every step; the servers reach each other by the Service's DNS name
//! (`<db>-<color>.<namespace>.svc`), so a replication link outlives a pod that comes back
//! with a new IP.
//!
//! An upgrade may make green by a physical copy ([`objects::physical_copy`]): its
//! StatefulSet then carries init containers that take blue's base backup and upgrade it,
//! and is left as it is once the server runs on the result.
//!
//! An existing StatefulSet is never moved to another major: changing the image under
//! existing data would start the wrong server on it. The engine removes a color before it
//! creates it again at another major, and removing deletes the data (the claim) too.

use super::api::{apply, not_ready, ready_pod};
use super::crd::BlueGreenDatabase;
use super::objects::physical_copy::{self, CopySource, CopyStage, PodStage};
use super::objects::{self, PORT, VERSION_LABEL, instance_name};
use anyhow::bail;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Service};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams};
use pgflip_core::plan::Member;
use pgflip_core::spec::{CopyPreference, Desired, Major};
use pgflip_engine::ports::{Addr, Credentials};
use pgflip_engine::ports::{Instances, Result};
use std::time::Duration;
use tokio_postgres::error::SqlState;

/// How long one login probe of a Ready pod's server may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

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

    /// The StatefulSet of this color as it is now; one of another major is refused.
    async fn existing(&self, member: &Member) -> anyhow::Result<Found> {
        let Some(sts) = self
            .api::<StatefulSet>()
            .get_opt(&self.name(member))
            .await?
        else {
            return Ok(Found::Absent);
        };
        // Being removed (foreground deletion waits for its pod): neither serving nor to be
        // applied over, whatever major it ran.
        if sts.metadata.deletion_timestamp.is_some() {
            return Ok(Found::Terminating);
        }
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
        Ok(match physical_copy::stage(&sts) {
            Some(stage) => Found::Copy(stage),
            None => Found::Present,
        })
    }

    fn pod_name(&self, member: &Member) -> String {
        format!("{}-0", self.name(member))
    }

    /// Applies green's StatefulSet at a stage of the physical copy from `from`.
    async fn apply_copy(
        &self,
        from: &Member,
        to: &Member,
        slot: &str,
        stage: &CopyStage,
        desired: &Desired,
    ) -> anyhow::Result<()> {
        // Blue's Service, as green's pod resolves it.
        let host = format!("{}.{}.svc", self.name(from), self.namespace);
        let source = CopySource {
            from,
            host: &host,
            port: PORT as u16,
            slot,
        };
        let service = objects::headless_service(&self.owner, desired, to.color);
        let sts = physical_copy::copy_statefulset(&self.owner, desired, to, &source, stage);
        apply(&self.api::<Service>(), &service).await?;
        apply(&self.api::<StatefulSet>(), &sts).await?;
        Ok(())
    }

    /// The copy's pod at stage `cut` (None: the backup): its stage, or an error naming the
    /// step that failed and its last words.
    async fn copy_pod_stage(&self, to: &Member, cut: Option<&str>) -> anyhow::Result<PodStage> {
        let pod_name = self.pod_name(to);
        let Some(pod) = self.api::<Pod>().get_opt(&pod_name).await? else {
            return Ok(PodStage::Pending);
        };
        match physical_copy::pod_stage(&pod, cut) {
            PodStage::Failed { step, message } => {
                bail!("the physical copy's step {step} failed twice in pod {pod_name}: {message}")
            }
            stage => Ok(stage),
        }
    }

    /// The server's address if its pod is Ready and it accepts a login now; else
    /// [`NotReady`](pgflip_engine::ports::NotReady). Checked once, never waited for.
    async fn ready_addr(&self, member: &Member) -> anyhow::Result<Addr> {
        let pod = self.pod_name(member);
        let ip = ready_pod(&self.api::<Pod>(), &pod).await?;
        let addr = Addr {
            host: ip,
            port: PORT as u16,
        };
        accepts_login(&addr, &self.admin)
            .await
            .map_err(|e| match e {
                Probe::NotYet(why) => not_ready(format!(
                    "PostgreSQL in pod {pod} does not accept logins yet: {why}"
                )),
                Probe::Refused(e) => e.context(format!("logging in to PostgreSQL in pod {pod}")),
            })?;
        Ok(addr)
    }
}

/// What there is of a color's StatefulSet.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Found {
    Absent,
    /// Made by a physical copy, at this stage.
    Copy(CopyStage),
    /// Deleted, waiting for its pod to go.
    Terminating,
    /// There, at the member's major.
    Present,
}

/// Why a login probe did not succeed.
enum Probe {
    /// The server is not up yet (nothing listens, still starting, no answer in time).
    NotYet(String),
    /// It answered and refused (a wrong password, say): waiting would not help.
    Refused(anyhow::Error),
}

/// One login and `SELECT 1`, bounded by [`PROBE_TIMEOUT`].
async fn accepts_login(addr: &Addr, admin: &Credentials) -> std::result::Result<(), Probe> {
    let mut config = pgflip_engine::pg::config(addr, admin, "postgres");
    config.connect_timeout(PROBE_TIMEOUT);
    let probe = async {
        let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
        let connection = tokio::spawn(connection);
        let answer = client.simple_query("SELECT 1").await.map(|_| ());
        drop(client);
        connection.abort();
        answer
    };
    match tokio::time::timeout(PROBE_TIMEOUT, probe).await {
        Err(_) => Err(Probe::NotYet(format!("no answer within {PROBE_TIMEOUT:?}"))),
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) if still_starting(e.as_db_error().map(|d| d.code())) => {
            Err(Probe::NotYet(e.to_string()))
        }
        Ok(Err(e)) => Err(Probe::Refused(e.into())),
    }
}

/// Whether a failed login means "come back later": no answer from the server at all
/// (refused, reset, timed out: no SQLSTATE), or the server saying it is starting up or
/// shutting down.
fn still_starting(code: Option<&SqlState>) -> bool {
    code.is_none_or(|c| *c == SqlState::CANNOT_CONNECT_NOW)
}

impl Instances for KubeInstances {
    /// The server binaries come with the image, not with the controller's.
    async fn runs_here(&self, _major: Major, _desired: &Desired) -> Result<bool> {
        Ok(false)
    }

    /// Only when asked for: whether green's and blue's images carry what `pg_upgrade`
    /// needs (both majors' binaries, at the official images' paths) cannot be seen from
    /// here, and under `auto` a copy that fails for want of them would fail the attempt.
    async fn physical_copy_blocker(
        &self,
        _from: &Member,
        _to: &Member,
        desired: &Desired,
    ) -> Result<Option<String>> {
        Ok((desired.copy != CopyPreference::Physical).then(|| {
            "Kubernetes mode copies physically only under spec.copy: physical (pgflip cannot see whether the images carry pg_upgrade and the old major's binaries)".into()
        }))
    }

    async fn ensure(&self, member: &Member, desired: &Desired) -> Result<Addr> {
        match self.existing(member).await? {
            Found::Terminating => {
                return Err(not_ready(format!(
                    "StatefulSet {} is still being deleted",
                    self.name(member)
                )));
            }
            // Made by a physical copy: its init containers stay (they do nothing once the
            // copy is in place), so the pod is not replaced for the server form.
            Found::Copy(_) => {}
            Found::Absent | Found::Present => {
                let service = objects::headless_service(&self.owner, desired, member.color);
                let sts = objects::statefulset(&self.owner, desired, member);
                apply(&self.api::<Service>(), &service).await?;
                apply(&self.api::<StatefulSet>(), &sts).await?;
            }
        }
        self.ready_addr(member).await
    }

    /// Starts the copy's StatefulSet at its backup stage and reports, once, whether the
    /// backup is taken (the pod then waits for the cut).
    async fn base_backup(
        &self,
        from: &Member,
        to: &Member,
        _source: &Addr,
        slot: &str,
        desired: &Desired,
    ) -> Result<()> {
        match self.existing(to).await? {
            Found::Terminating => {
                return Err(not_ready(format!(
                    "StatefulSet {} is still being deleted",
                    self.name(to)
                )));
            }
            Found::Present => bail!(
                "StatefulSet {} exists and was not made by a physical copy",
                self.name(to)
            ),
            Found::Absent => {
                self.apply_copy(from, to, slot, &CopyStage::AwaitingCut, desired)
                    .await?
            }
            Found::Copy(CopyStage::AwaitingCut) => {}
            Found::Copy(_) => return Ok(()),
        }
        match self.copy_pod_stage(to, None).await? {
            PodStage::BackedUp => Ok(()),
            _ => Err(not_ready(format!(
                "the base backup of {from} runs in pod {}",
                self.pod_name(to)
            ))),
        }
    }

    /// Moves the copy's StatefulSet to its upgrade stage at the cut (its pod is replaced)
    /// and reports, once, whether the upgraded server is Ready.
    async fn upgrade_backup(
        &self,
        from: &Member,
        to: &Member,
        _source: &Addr,
        slot: &str,
        stop_before: &str,
        desired: &Desired,
    ) -> Result<Addr> {
        let upgrading = CopyStage::Upgrading(stop_before.to_string());
        match self.existing(to).await? {
            Found::Copy(CopyStage::Upgraded(_)) => return self.ready_addr(to).await,
            Found::Copy(stage) if stage == upgrading => {}
            Found::Copy(_) => self.apply_copy(from, to, slot, &upgrading, desired).await?,
            other => bail!(
                "StatefulSet {} is not a physical copy awaiting its upgrade ({other:?})",
                self.name(to)
            ),
        }
        match self.copy_pod_stage(to, Some(stop_before)).await? {
            PodStage::Pending => Err(not_ready(format!(
                "pod {} is being replaced to upgrade the copy",
                self.pod_name(to)
            ))),
            _ => {
                let addr = self.ready_addr(to).await.map_err(|e| {
                    if pgflip_engine::ports::is_not_ready(&e) {
                        not_ready(format!(
                            "the copy of {from} is replayed to {stop_before} and upgraded in pod {}",
                            self.pod_name(to)
                        ))
                    } else {
                        e
                    }
                })?;
                let upgraded = CopyStage::Upgraded(stop_before.to_string());
                self.apply_copy(from, to, slot, &upgraded, desired).await?;
                Ok(addr)
            }
        }
    }

    async fn peer_addr(&self, member: &Member, _desired: &Desired, _addr: &Addr) -> Result<Addr> {
        // Resolved in the other server's pod, through the cluster's DNS search path (so
        // whatever the cluster domain is).
        Ok(Addr {
            host: format!("{}.{}.svc", self.name(member), self.namespace),
            port: PORT as u16,
        })
    }

    async fn addr(&self, member: &Member, _desired: &Desired) -> Result<Option<Addr>> {
        match self.existing(member).await? {
            // A copy not upgraded yet has no server to reach (its pod may never be Ready:
            // a failed copy is removed without one).
            Found::Absent
            | Found::Terminating
            | Found::Copy(CopyStage::AwaitingCut)
            | Found::Copy(CopyStage::Upgrading(_)) => Ok(None),
            Found::Present | Found::Copy(CopyStage::Upgraded(_)) => {
                Ok(Some(self.ready_addr(member).await?))
            }
        }
    }

    /// Issues the deletions that are due and checks, once, whether they are done; called
    /// again after [`NotReady`](pgflip_engine::ports::NotReady), it issues them again
    /// (deleting what is already going or gone changes nothing) and checks again.
    async fn remove(&self, member: &Member, _desired: &Desired) -> Result<()> {
        let name = self.name(member);
        let pod = format!("{name}-0");
        let claim = format!("data-{pod}");
        delete_if_present(
            &self.api::<StatefulSet>(),
            &name,
            &DeleteParams::foreground(),
        )
        .await?;
        delete_if_present(&self.api::<Service>(), &name, &DeleteParams::default()).await?;
        // The pod must be gone before its claim is deleted: a claim in use is only marked
        // for deletion. The StatefulSet too, or it would make the pod again.
        if self.api::<StatefulSet>().get_opt(&name).await?.is_some() {
            return Err(not_ready(format!("StatefulSet {name} is not gone yet")));
        }
        if self.api::<Pod>().get_opt(&pod).await?.is_some() {
            return Err(not_ready(format!("pod {pod} is not gone yet")));
        }
        // And the claim must be gone before this color is created again: a new pod bound
        // to a claim still terminating would find the old data or none.
        let claims = self.api::<PersistentVolumeClaim>();
        delete_if_present(&claims, &claim, &DeleteParams::default()).await?;
        if claims.get_opt(&claim).await?.is_some() {
            return Err(not_ready(format!("volume claim {claim} is not gone yet")));
        }
        Ok(())
    }
}

/// Deletes the object; one that is gone already is fine.
async fn delete_if_present<K>(api: &Api<K>, name: &str, params: &DeleteParams) -> kube::Result<()>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, params).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_not_up_yet_is_waited_for_a_refusal_is_not() {
        assert!(still_starting(None), "nothing listens yet");
        assert!(still_starting(Some(&SqlState::CANNOT_CONNECT_NOW)));
        assert!(!still_starting(Some(&SqlState::INVALID_PASSWORD)));
        assert!(!still_starting(Some(
            &SqlState::INVALID_AUTHORIZATION_SPECIFICATION
        )));
    }
}
