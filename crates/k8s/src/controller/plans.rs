//! Plans on pull requests, in Kubernetes mode ([`pgflip_engine::pull_requests`]): an object
//! Flux applied from a Git branch gets, on the head of each open pull request into that
//! branch that changes its document, a `pgflip/plan/<namespace>/<name>` commit status.
//! The plan is computed here, in the cluster, where the database's credentials already
//! are: CI needs none. The heads are read from the repository the Kustomization's
//! `GitRepository` names (over HTTP(S), with the `username`/`password` of its Secret), the
//! document found by name under the Kustomization's path.
//!
//! Only between attempts: reading a repository never delays a switch's steps.

use super::{KubeRunner, Shared};
use crate::crd::BlueGreenDatabase;
use crate::flux::{GitRepositorySource, KustomizationSource, NAME_LABEL, NAMESPACE_LABEL};
use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use pgflip_engine::adapters::forge_status::ForgeStatus;
use pgflip_engine::adapters::git_remote;
use pgflip_engine::adapters::git_source::GitSource;
use pgflip_engine::ports::StatusSink;
use pgflip_engine::pull_requests::{plan_update, proposals};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// When each object's pull requests were last looked at, and the heads planned.
pub(super) struct PullRequestPlans {
    every: Duration,
    /// Where the repositories are cloned (bare), under the pod's writable /tmp.
    cache: PathBuf,
    looked: std::sync::Mutex<HashMap<(String, String), Looked>>,
}

#[derive(Default)]
struct Looked {
    at: Option<Instant>,
    planned: HashSet<String>,
}

impl PullRequestPlans {
    pub(super) fn new(every: Duration) -> PullRequestPlans {
        PullRequestPlans {
            every,
            cache: std::env::temp_dir().join("pgflip-plans"),
            looked: Default::default(),
        }
    }

    /// Plans the object's open pull requests not planned yet, at most every `every`, and
    /// only while no attempt is under way. A failure is logged and counted; the next look
    /// tries again.
    pub(super) async fn look(
        &self,
        shared: &Shared,
        forge: &ForgeStatus,
        object: &BlueGreenDatabase,
        runner: &KubeRunner,
    ) {
        if self.every.is_zero() || runner.record().attempt.is_some() {
            return;
        }
        let key = (object.namespace().unwrap_or_default(), object.name_any());
        let mut planned = {
            let mut looked = self.looked.lock().expect("not poisoned");
            let entry = looked.entry(key.clone()).or_default();
            if entry.at.is_some_and(|at| at.elapsed() < self.every) {
                return;
            }
            entry.at = Some(Instant::now());
            std::mem::take(&mut entry.planned)
        };
        if let Err(e) = self.plan(shared, forge, object, runner, &mut planned).await {
            shared.metrics.error("plan");
            tracing::warn!(namespace = %key.0, name = %key.1, error = %format!("{e:#}"), "could not plan the pull requests");
        }
        if let Some(entry) = self.looked.lock().expect("not poisoned").get_mut(&key) {
            entry.planned.extend(planned);
        }
    }

    /// Forgets a deleted object.
    pub(super) fn forget(&self, namespace: &str, name: &str) {
        self.looked
            .lock()
            .expect("not poisoned")
            .remove(&(namespace.to_string(), name.to_string()));
    }

    async fn plan(
        &self,
        shared: &Shared,
        forge: &ForgeStatus,
        object: &BlueGreenDatabase,
        runner: &KubeRunner,
        planned: &mut HashSet<String>,
    ) -> anyhow::Result<()> {
        let Some((source, path)) = repository_of(&shared.client, object).await? else {
            return Ok(()); // not applied by Flux: no pull requests
        };
        let (namespace, name) = (object.namespace().unwrap_or_default(), object.name_any());
        let url = match &source.secret {
            None => source.url.clone(),
            Some(secret) => {
                let namespace = &path.repository_namespace;
                credentials_url(&shared.client, namespace, secret, &source.url).await?
            }
        };
        let git = GitSource::open_async(url, source.branch.clone(), None, self.cache.clone())
            .await?
            .named(&path.path, &name);
        let current = object.desired().map_err(|e| e.to_string());
        let proposed = proposals(forge, &git, &source.branch, &current, planned).await?;
        let context = forge.with_context(format!("pgflip/plan/{namespace}/{name}"));
        for proposal in proposed {
            let observed = &proposal.observed;
            let steps = runner.driver().steps();
            let update = plan_update(steps, runner.record(), observed)
                .await
                .with_context(|| format!("planning pull request {}", proposal.number))?;
            tracing::info!(%namespace, %name, pull = proposal.number, head = %observed.revision.short(), state = update.state.as_str(), "plan: {}", update.message);
            context.publish(&observed.revision, &update).await?;
            planned.insert(observed.revision.to_string());
        }
        Ok(())
    }
}

/// The GitRepository (and the Kustomization's part of it) the object was applied from;
/// `None` for an object no Kustomization manages.
async fn repository_of(
    client: &kube::Client,
    object: &BlueGreenDatabase,
) -> anyhow::Result<Option<(GitRepositorySource, KustomizationSource)>> {
    let labels = object.labels();
    let (Some(name), Some(namespace)) = (labels.get(NAME_LABEL), labels.get(NAMESPACE_LABEL))
    else {
        return Ok(None);
    };
    let spec = flux_spec(
        client,
        "kustomize.toolkit.fluxcd.io",
        "Kustomization",
        namespace,
        name,
    );
    let path = KustomizationSource::of(&spec.await?, namespace)
        .map_err(|e| anyhow::anyhow!("Kustomization {namespace}/{name}: {e}"))?;
    let (repo_namespace, repo_name) = (&path.repository_namespace, &path.repository_name);
    let spec = flux_spec(
        client,
        "source.toolkit.fluxcd.io",
        "GitRepository",
        repo_namespace,
        repo_name,
    );
    let source = GitRepositorySource::of(&spec.await?)
        .map_err(|e| anyhow::anyhow!("GitRepository {repo_namespace}/{repo_name}: {e}"))?;
    Ok(Some((source, path)))
}

/// The `spec` of the Flux object `kind` (API version v1) `namespace/name`.
async fn flux_spec(
    client: &kube::Client,
    group: &str,
    kind: &str,
    namespace: &str,
    name: &str,
) -> anyhow::Result<serde_json::Value> {
    let gvk = GroupVersionKind::gvk(group, "v1", kind);
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), namespace, &ApiResource::from_gvk(&gvk));
    let object = api
        .get(name)
        .await
        .with_context(|| format!("reading {kind} {namespace}/{name}"))?;
    Ok(object.data["spec"].clone())
}

/// `url` with the `username` and `password` of the GitRepository's Secret: what Flux
/// itself authenticates with over HTTP(S). Kept in memory only.
async fn credentials_url(
    client: &kube::Client,
    namespace: &str,
    secret: &str,
    url: &str,
) -> anyhow::Result<String> {
    let data = Api::<Secret>::namespaced(client.clone(), namespace)
        .get(secret)
        .await
        .with_context(|| format!("reading the GitRepository's Secret {namespace}/{secret}"))?
        .data
        .unwrap_or_default();
    let field = |key: &str| {
        data.get(key)
            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
    };
    match (field("username"), field("password")) {
        (Some(user), Some(password)) => Ok(git_remote::with_credentials(url, &user, &password)),
        _ => bail!(
            "the GitRepository's Secret {namespace}/{secret} holds no username and password: plans read over HTTP(S) with basic auth only"
        ),
    }
}
