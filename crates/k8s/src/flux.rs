//! Flux as the source of the revision: which Git commit the object's current spec came
//! from. A `BlueGreenDatabase` applied by Flux carries the labels
//! `kustomize.toolkit.fluxcd.io/name` and `/namespace` naming its Kustomization, whose
//! status says which source revision it applied. Pure: the caller reads the objects.
//!
//! The subtle part is `wait: true`. kustomize-controller sets `lastAppliedRevision` only
//! after the health checks pass, and with `wait: true` the health checks include this
//! very object, which turns Ready only once pgflip has switched. Waiting for
//! `lastAppliedRevision` would deadlock. But Flux applies the objects *before* it checks
//! their health, and while it checks it reports `Healthy=Unknown` (reason `Progressing`,
//! "Running health checks for revision <rev> …") with `lastAttemptedRevision = <rev>`; a
//! failed check leaves `Ready=False` with reason `HealthCheckFailed`. In both states the
//! attempted revision has been applied, so it is the one the spec came from.
//!
//! Before its health checks, a reconciliation (`Reconciling=True`: fetching, building,
//! detecting drift, applying) names no revision the objects can be said to come from: they
//! may be half applied, and those not yet touched may come from the last applied revision
//! or from a failed attempt since (the real-Flux end-to-end caught a commit following a
//! refused one being credited to the revision before both). pgflip then waits.

use serde::Deserialize;

pub const NAME_LABEL: &str = "kustomize.toolkit.fluxcd.io/name";
pub const NAMESPACE_LABEL: &str = "kustomize.toolkit.fluxcd.io/namespace";

/// A source revision as Flux writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceRevision {
    /// The branch or tag, as given (`main`, `refs/heads/main`, `v1.2.0`), if any.
    pub reference: Option<String>,
    /// `sha1` for a Git commit (`sha256` for Git's SHA-256 object format or OCI digests).
    pub algorithm: String,
    pub digest: String,
}

impl SourceRevision {
    /// Parses `main@sha1:<sha>`, `refs/heads/main@sha1:<sha>`, `sha1:<sha>` and the legacy
    /// `main/<sha>` (Flux before v2.0).
    pub fn parse(text: &str) -> Result<SourceRevision, String> {
        let bad = || format!("{text:?} is not a Flux source revision");
        let (reference, digest_part) = match text.rsplit_once('@') {
            Some((r, d)) => (Some(r), d),
            None if text.contains(':') => (None, text),
            None => {
                // Legacy `<branch>/<sha>`.
                let (r, sha) = text.rsplit_once('/').ok_or_else(bad)?;
                return SourceRevision::checked(Some(r), "sha1", sha).ok_or_else(bad);
            }
        };
        let (algorithm, digest) = digest_part.split_once(':').ok_or_else(bad)?;
        SourceRevision::checked(reference, algorithm, digest).ok_or_else(bad)
    }

    fn checked(reference: Option<&str>, algorithm: &str, digest: &str) -> Option<SourceRevision> {
        let length = match algorithm {
            "sha1" => 40,
            "sha256" => 64,
            _ => return None,
        };
        let hex = digest.len() == length && digest.bytes().all(|b| b.is_ascii_hexdigit());
        let reference = reference.filter(|r| !r.is_empty());
        hex.then(|| SourceRevision {
            reference: reference.map(str::to_string),
            algorithm: algorithm.to_string(),
            digest: digest.to_ascii_lowercase(),
        })
    }

    /// The Git commit, when this is one: what commit statuses and notes are attached to.
    pub fn commit(&self) -> Option<&str> {
        (self.algorithm == "sha1").then_some(self.digest.as_str())
    }
}

/// The part of a Flux `Kustomization` (kustomize.toolkit.fluxcd.io/v1) pgflip reads.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KustomizationStatus {
    #[serde(default)]
    pub last_applied_revision: Option<String>,
    #[serde(default)]
    pub last_attempted_revision: Option<String>,
    #[serde(default)]
    pub conditions: Vec<FluxCondition>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct FluxCondition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub message: String,
}

impl KustomizationStatus {
    fn condition(&self, type_: &str) -> Option<&FluxCondition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }

    /// The revision whose objects Flux has applied to the cluster, if that can be told
    /// (see the module comment for why this is not simply `lastAppliedRevision`).
    pub fn applied_revision(&self) -> Option<&str> {
        let attempted = self.last_attempted_revision.as_deref();
        let checks_attempted = |c: &FluxCondition| {
            attempted.is_some_and(|a| {
                c.message
                    .starts_with(&format!("Running health checks for revision {a} "))
            })
        };
        if let Some(reconciling) = self.condition("Reconciling").filter(|c| c.status == "True") {
            // Under way, or failed and to be retried: once at its health checks, the
            // attempted revision is applied; before, its objects may be half applied, and
            // the others may be the last applied revision's or a failed attempt's since.
            return if checks_attempted(reconciling) {
                attempted
            } else {
                None
            };
        }
        let checking = self
            .condition("Healthy")
            .is_some_and(|c| c.status == "Unknown" && checks_attempted(c));
        let check_failed = self
            .condition("Ready")
            .is_some_and(|c| c.status == "False" && c.reason == "HealthCheckFailed");
        if checking || check_failed {
            return attempted;
        }
        self.last_applied_revision.as_deref()
    }

    /// Whether Flux considers the Kustomization done and healthy.
    pub fn is_ready(&self) -> bool {
        self.condition("Ready").is_some_and(|c| c.status == "True")
    }
}

/// Where a Kustomization's files come from, for plans on pull requests: the
/// `GitRepository` it applies from and the directory in it (`spec.sourceRef`, `spec.path`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KustomizationSource {
    pub repository_namespace: String,
    pub repository_name: String,
    /// Relative to the repository's root, as written (`./gitops/databases`).
    pub path: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct KustomizationSpecPart {
    source_ref: SourceRef,
    #[serde(default)]
    path: Option<String>,
}

#[derive(Deserialize)]
struct SourceRef {
    kind: String,
    name: String,
    #[serde(default)]
    namespace: Option<String>,
}

impl KustomizationSource {
    /// From the Kustomization's `spec` (a Kustomization in `namespace`). Only a
    /// `GitRepository` source has pull requests.
    pub fn of(spec: &serde_json::Value, namespace: &str) -> Result<KustomizationSource, String> {
        let spec: KustomizationSpecPart = serde_json::from_value(spec.clone())
            .map_err(|e| format!("the Kustomization's spec: {e}"))?;
        if spec.source_ref.kind != "GitRepository" {
            return Err(format!(
                "its source is a {}, not a GitRepository: no pull requests to plan",
                spec.source_ref.kind
            ));
        }
        Ok(KustomizationSource {
            repository_namespace: spec.source_ref.namespace.unwrap_or(namespace.to_string()),
            repository_name: spec.source_ref.name,
            path: spec.path.unwrap_or_else(|| "./".into()),
        })
    }
}

/// The part of a Flux `GitRepository` (source.toolkit.fluxcd.io/v1) plans read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitRepositorySource {
    pub url: String,
    /// The branch Flux follows: pull requests into it are planned.
    pub branch: String,
    /// The Secret (in the GitRepository's namespace) holding its credentials.
    pub secret: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GitRepositorySpecPart {
    url: String,
    #[serde(default, rename = "ref")]
    reference: Option<GitRef>,
    #[serde(default)]
    secret_ref: Option<LocalRef>,
}

#[derive(Deserialize)]
struct GitRef {
    #[serde(default)]
    branch: Option<String>,
    #[serde(default)]
    name: Option<String>,
}

#[derive(Deserialize)]
struct LocalRef {
    name: String,
}

impl GitRepositorySource {
    /// From the GitRepository's `spec`. Flux follows `master` when no ref is given; a
    /// repository pinned to a tag, a semver range or a commit has no branch to merge into.
    pub fn of(spec: &serde_json::Value) -> Result<GitRepositorySource, String> {
        let spec: GitRepositorySpecPart = serde_json::from_value(spec.clone())
            .map_err(|e| format!("the GitRepository's spec: {e}"))?;
        let branch = match spec.reference {
            None => "master".to_string(),
            Some(GitRef {
                branch: Some(b), ..
            }) => b,
            Some(GitRef {
                name: Some(n),
                branch: None,
            }) if n.starts_with("refs/heads/") => n["refs/heads/".len()..].to_string(),
            Some(_) => {
                return Err(
                    "it follows a tag, a version range or a commit, not a branch: no pull requests to plan"
                        .into(),
                );
            }
        };
        if !spec.url.starts_with("http://") && !spec.url.starts_with("https://") {
            return Err(format!(
                "its URL is not HTTP(S) ({}): plans read pull requests over HTTP(S) only",
                spec.url.split("://").next().unwrap_or("?")
            ));
        }
        Ok(GitRepositorySource {
            url: spec.url,
            branch,
            secret: spec.secret_ref.map(|s| s.name),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

    #[test]
    fn a_kustomization_names_its_git_repository_and_path() {
        let spec = serde_json::json!({
            "path": "./gitops/databases",
            "sourceRef": {"kind": "GitRepository", "name": "pgflip"},
            "interval": "10m",
        });
        assert_eq!(
            KustomizationSource::of(&spec, "flux-system"),
            Ok(KustomizationSource {
                repository_namespace: "flux-system".into(),
                repository_name: "pgflip".into(),
                path: "./gitops/databases".into(),
            })
        );
        let elsewhere = serde_json::json!({
            "sourceRef": {"kind": "GitRepository", "name": "infra", "namespace": "git"},
        });
        let source = KustomizationSource::of(&elsewhere, "flux-system").unwrap();
        assert_eq!(source.repository_namespace, "git");
        assert_eq!(source.path, "./");
        let oci = serde_json::json!({"sourceRef": {"kind": "OCIRepository", "name": "x"}});
        assert!(
            KustomizationSource::of(&oci, "flux-system")
                .unwrap_err()
                .contains("OCIRepository, not a GitRepository")
        );
    }

    #[test]
    fn a_git_repository_gives_its_url_branch_and_secret() {
        let spec = serde_json::json!({
            "url": "https://git.example/shop.git",
            "ref": {"branch": "main"},
            "secretRef": {"name": "git-auth"},
        });
        assert_eq!(
            GitRepositorySource::of(&spec),
            Ok(GitRepositorySource {
                url: "https://git.example/shop.git".into(),
                branch: "main".into(),
                secret: Some("git-auth".into()),
            })
        );
        let default_branch = serde_json::json!({"url": "https://git.example/shop.git"});
        assert_eq!(
            GitRepositorySource::of(&default_branch).unwrap().branch,
            "master"
        );
        let by_name =
            serde_json::json!({"url": "http://git/x", "ref": {"name": "refs/heads/prod"}});
        assert_eq!(GitRepositorySource::of(&by_name).unwrap().branch, "prod");
        let tag = serde_json::json!({"url": "https://git/x", "ref": {"tag": "v1"}});
        assert!(
            GitRepositorySource::of(&tag)
                .unwrap_err()
                .contains("not a branch")
        );
        let ssh = serde_json::json!({"url": "ssh://git@git/x", "ref": {"branch": "main"}});
        assert!(GitRepositorySource::of(&ssh).unwrap_err().contains("(ssh)"));
    }

    #[test]
    fn revisions_in_every_format_flux_writes() {
        let cases = [
            (format!("main@sha1:{SHA}"), Some("main")),
            (
                format!("refs/heads/main@sha1:{SHA}"),
                Some("refs/heads/main"),
            ),
            (format!("main/{SHA}"), Some("main")),
            (format!("sha1:{SHA}"), None),
            (
                format!("v1.2.0@sha1:{}", SHA.to_uppercase()),
                Some("v1.2.0"),
            ),
        ];
        for (text, reference) in cases {
            let r = SourceRevision::parse(&text).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(r.reference.as_deref(), reference, "{text}");
            assert_eq!(r.commit(), Some(SHA), "{text}");
        }
        let oci = SourceRevision::parse(&format!("latest@sha256:{}", "a".repeat(64))).unwrap();
        assert_eq!(oci.commit(), None);
        for bad in [
            "",
            "main",
            "main@sha1:xyz",
            "main@md5:0123",
            &format!("main/{}", &SHA[..39]),
            &format!("main@sha1:{SHA}0"),
        ] {
            assert!(SourceRevision::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    fn status(yaml: &str) -> KustomizationStatus {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn the_applied_revision_through_a_kustomization_lifecycle() {
        let done = status(
            "lastAppliedRevision: main@sha1:aaa\nlastAttemptedRevision: main@sha1:aaa\nconditions:\n- {type: Ready, status: 'True', reason: ReconciliationSucceeded, message: 'Applied revision: main@sha1:aaa'}\n",
        );
        assert_eq!(done.applied_revision(), Some("main@sha1:aaa"));
        assert!(done.is_ready());

        // Fetching, building, applying the new revision: the objects may be either
        // revision's until the health checks start. Nothing can be named.
        for stage in [
            "Fetching manifests for",
            "Building manifests for",
            "Detecting drift for",
        ] {
            let under_way = status(&format!(
                "lastAppliedRevision: main@sha1:aaa\nlastAttemptedRevision: main@sha1:bbb\nconditions:\n- {{type: Ready, status: Unknown, reason: Progressing, message: Reconciliation in progress}}\n- {{type: Reconciling, status: 'True', reason: Progressing, message: '{stage} revision main@sha1:bbb with a timeout of 5m0s'}}\n- {{type: Healthy, status: 'True', reason: Succeeded, message: Health check passed}}\n",
            ));
            assert_eq!(under_way.applied_revision(), None, "{stage}");
            assert!(!under_way.is_ready());
        }

        // Applied, waiting for health (our object among them): act on it.
        let checking = status(
            "lastAppliedRevision: main@sha1:aaa\nlastAttemptedRevision: main@sha1:bbb\nconditions:\n- {type: Ready, status: Unknown, reason: Progressing, message: Reconciliation in progress}\n- {type: Reconciling, status: 'True', reason: Progressing, message: 'Running health checks for revision main@sha1:bbb with a timeout of 5m0s'}\n- {type: Healthy, status: Unknown, reason: Progressing, message: 'Running health checks for revision main@sha1:bbb with a timeout of 5m0s'}\n",
        );
        assert_eq!(checking.applied_revision(), Some("main@sha1:bbb"));

        // A failed health check, to be retried (as Flux leaves it): still applied.
        let retrying = status(
            "lastAppliedRevision: main@sha1:aaa\nlastAttemptedRevision: main@sha1:bbb\nconditions:\n- {type: Ready, status: 'False', reason: HealthCheckFailed, message: 'BlueGreenDatabase/shop/orders status: Failed'}\n- {type: Reconciling, status: 'True', reason: ProgressingWithRetry, message: 'Running health checks for revision main@sha1:bbb with a timeout of 5m0s'}\n- {type: Healthy, status: 'False', reason: HealthCheckFailed, message: 'BlueGreenDatabase/shop/orders status: Failed'}\n",
        );
        assert_eq!(retrying.applied_revision(), Some("main@sha1:bbb"));

        // The next commit after that failure, being fetched: the objects are still the
        // failed commit's, not the last applied one's. Nothing can be named yet.
        let after_failure = status(
            "lastAppliedRevision: main@sha1:aaa\nlastAttemptedRevision: main@sha1:bbb\nconditions:\n- {type: Ready, status: Unknown, reason: Progressing, message: Reconciliation in progress}\n- {type: Reconciling, status: 'True', reason: Progressing, message: 'Fetching manifests for revision main@sha1:ccc with a timeout of 5m0s'}\n- {type: Healthy, status: 'False', reason: HealthCheckFailed, message: 'BlueGreenDatabase/shop/orders status: Failed'}\n",
        );
        assert_eq!(after_failure.applied_revision(), None);

        // A stale health-check message from an earlier revision does not count.
        let stale = status(
            "lastAppliedRevision: main@sha1:aaa\nlastAttemptedRevision: main@sha1:ccc\nconditions:\n- {type: Healthy, status: Unknown, reason: Progressing, message: 'Running health checks for revision main@sha1:bbb with a timeout of 5m0s'}\n",
        );
        assert_eq!(stale.applied_revision(), Some("main@sha1:aaa"));

        // The health check timed out (the switch took longer): still applied.
        let failed = status(
            "lastAppliedRevision: main@sha1:aaa\nlastAttemptedRevision: main@sha1:bbb\nconditions:\n- {type: Ready, status: 'False', reason: HealthCheckFailed, message: timeout waiting for BlueGreenDatabase/shop/orders}\n",
        );
        assert_eq!(failed.applied_revision(), Some("main@sha1:bbb"));

        // The build failed: the objects are from the last applied revision.
        let build_failed = status(
            "lastAppliedRevision: main@sha1:aaa\nlastAttemptedRevision: main@sha1:bbb\nconditions:\n- {type: Ready, status: 'False', reason: BuildFailed, message: kustomize build failed}\n",
        );
        assert_eq!(build_failed.applied_revision(), Some("main@sha1:aaa"));

        assert_eq!(KustomizationStatus::default().applied_revision(), None);
    }

    mod hostile {
        use super::super::SourceRevision;
        use proptest::prelude::*;

        proptest! {
            /// Whatever a Kustomization's status holds: a revision or an error naming it.
            #[test]
            fn any_text_is_a_revision_or_an_error(text in ".{0,120}") {
                if let Err(e) = SourceRevision::parse(&text) {
                    prop_assert!(e.contains("is not a Flux source revision"));
                }
            }

            /// Every form Flux writes reads back as its branch and commit, whatever the
            /// branch is called (it may hold '@', '/' and ':').
            #[test]
            fn written_revisions_read_back(
                branch in "[a-zA-Z0-9/@:._-]{1,40}",
                sha in "[0-9a-fA-F]{40}",
            ) {
                let r = SourceRevision::parse(&format!("{branch}@sha1:{sha}")).unwrap();
                prop_assert_eq!(r.reference.as_deref(), Some(branch.as_str()));
                let lower = sha.to_ascii_lowercase();
                prop_assert_eq!(r.commit(), Some(lower.as_str()));
                let bare = SourceRevision::parse(&format!("sha1:{sha}")).unwrap();
                prop_assert_eq!(bare.commit(), r.commit());
            }
        }
    }
}
