//! The desired state read from a Git branch (local mode's [`Source`]).
//!
//! The repository is either a path on disk, read in place, or a URL, mirrored into a bare
//! clone under the cache directory and fetched on every observation. Each observation is
//! the branch head and the `BlueGreenDatabase` document in that commit: the one named with
//! `--file`, or the only YAML file declaring `kind: BlueGreenDatabase`, or (Kubernetes
//! mode's plans) the one of a given name under a Flux Kustomization's path.
//!
//! A commit whose document cannot be found is an observation (the commit gets a failure
//! status), not an error; only a repository that cannot be read is an error.

use super::git_remote::{self, redact_in, redact_url};
use crate::ports::{Observed, Source};
use anyhow::{Context, anyhow, bail};
use git2::Repository;
use pgflip_core::revision::Revision;
use pgflip_core::spec;
use sha2::{Digest, Sha256};
use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};

/// Where the clone of a remote repository keeps the fetched branch.
const TRACKING_PREFIX: &str = "refs/remotes/origin/";

pub struct GitSource {
    location: Location,
    /// Short branch name, e.g. "main".
    branch: String,
    document: DocumentAt,
}

#[derive(Clone)]
enum Location {
    /// A repository on disk, read in place.
    Path(PathBuf),
    /// A remote repository and the bare clone it is fetched into. The URL may hold
    /// credentials: it is kept in memory only and shown redacted.
    Url { url: String, clone: PathBuf },
}

impl fmt::Debug for GitSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let repo = match &self.location {
            Location::Path(p) => p.display().to_string(),
            Location::Url { url, .. } => redact_url(url),
        };
        f.debug_struct("GitSource")
            .field("repo", &repo)
            .field("branch", &self.branch)
            .field("document", &self.document)
            .finish()
    }
}

impl GitSource {
    /// Opens `repo` (a path, or a URL containing "://") to follow `branch`. A URL is
    /// cloned (bare) under `cache_dir`, reusing a clone made earlier; nothing is fetched
    /// until the first [`observe`](Source::observe).
    pub fn open(
        repo: &str,
        branch: &str,
        file: Option<&str>,
        cache_dir: &Path,
    ) -> anyhow::Result<GitSource> {
        let branch = branch
            .strip_prefix("refs/heads/")
            .unwrap_or(branch)
            .to_string();
        // The name goes into refspecs: a ':' or '*' in it would change what is fetched.
        if !git2::Reference::is_valid_name(&format!("refs/heads/{branch}")) || branch.contains('*')
        {
            bail!("{branch:?} is not a valid branch name");
        }
        let document = match file {
            Some(f) => DocumentAt::File(f.trim_start_matches("./").to_string()),
            None => DocumentAt::Only,
        };
        let location = if git_remote::is_url(repo) {
            let clone = cache_dir.join(clone_dir_name(repo));
            prepare_clone(&clone, repo)?;
            Location::Url {
                url: repo.to_string(),
                clone,
            }
        } else {
            let path = PathBuf::from(repo);
            Repository::open(&path).map_err(|e| {
                anyhow!(
                    "cannot open Git repository {}: {}",
                    path.display(),
                    e.message()
                )
            })?;
            Location::Path(path)
        };
        Ok(GitSource {
            location,
            branch,
            document,
        })
    }

    /// Reads the document named `name` in a YAML file under the directory `under`
    /// (`./gitops/databases`, as a Flux Kustomization's `spec.path` says) instead.
    pub fn named(mut self, under: &str, name: &str) -> GitSource {
        let under = under.trim_start_matches("./").trim_matches('/');
        self.document = DocumentAt::Named {
            under: if under == "." {
                String::new()
            } else {
                under.to_string()
            },
            name: name.to_string(),
        };
        self
    }

    /// [`GitSource::open`] for async code: opening a repository, and creating or reusing
    /// the clone of a URL, is git2 and file work, done on the blocking pool.
    pub async fn open_async(
        repo: String,
        branch: String,
        file: Option<String>,
        cache_dir: PathBuf,
    ) -> anyhow::Result<GitSource> {
        tokio::task::spawn_blocking(move || {
            GitSource::open(&repo, &branch, file.as_deref(), &cache_dir)
        })
        .await
        .context("the Git worker thread failed")?
    }

    /// The repository on disk actually read: the path given, or the clone of the URL.
    pub fn repo_dir(&self) -> PathBuf {
        match &self.location {
            Location::Path(p) => p.clone(),
            Location::Url { clone, .. } => clone.clone(),
        }
    }

    pub fn is_remote(&self) -> bool {
        matches!(self.location, Location::Url { .. })
    }

    /// The URL to push status to (with its credentials: pass it on, never print it), or
    /// `None` for a repository read in place.
    pub fn remote_url(&self) -> Option<&str> {
        match &self.location {
            Location::Path(_) => None,
            Location::Url { url, .. } => Some(url),
        }
    }

    /// The repository as shown to people (a URL redacted).
    pub fn display_repo(&self) -> String {
        format!("{self:?}")
    }
}

/// The branch head and the document text found in it (or why none was found).
#[derive(Debug, Clone, PartialEq)]
pub struct Head {
    pub commit: String,
    pub document: Result<String, String>,
}

impl Head {
    /// The observation: the commit as a revision, the document validated.
    pub fn observed(self) -> anyhow::Result<Observed> {
        let revision = Revision::commit(&self.commit)
            .with_context(|| format!("{:?} is not a commit id", self.commit))?;
        let name = self.document.as_deref().ok().and_then(spec::peek_name);
        let desired = self
            .document
            .and_then(|text| spec::parse(&text).map_err(|e| e.to_string()));
        Ok(Observed {
            revision,
            name,
            desired,
        })
    }
}

impl GitSource {
    /// Reads the branch head (fetching it first from a URL) and the document in it.
    pub async fn read_head(&self) -> anyhow::Result<Head> {
        let location = self.location.clone();
        let branch = self.branch.clone();
        let document = self.document.clone();
        tokio::task::spawn_blocking(move || read_head_blocking(&location, &branch, &document))
            .await
            .context("the Git worker thread failed")?
    }
}

impl GitSource {
    /// The document at another ref than the followed branch — a pull request's head as
    /// the forge keeps it (`refs/pull/7/head`), a branch — fetched first from a URL. Only
    /// read, for a plan.
    pub async fn read_ref(&self, git_ref: &str) -> anyhow::Result<Head> {
        let Some(name) = git_ref.strip_prefix("refs/") else {
            bail!("{git_ref:?} is not a full ref name (refs/…)");
        };
        if !git2::Reference::is_valid_name(git_ref) || git_ref.contains('*') {
            bail!("{git_ref:?} is not a valid ref name");
        }
        let wanted = RefToRead {
            remote: git_ref.to_string(),
            tracking: format!("refs/pgflip/read/{name}"),
            shown: git_ref.to_string(),
        };
        let location = self.location.clone();
        let document = self.document.clone();
        tokio::task::spawn_blocking(move || read_ref_blocking(&location, &wanted, &document))
            .await
            .context("the Git worker thread failed")?
    }
}

impl Source for GitSource {
    fn observe(&mut self) -> impl Future<Output = anyhow::Result<Observed>> + Send {
        let head = self.read_head();
        async move { head.await?.observed() }
    }
}

/// A readable, collision-free directory name for the clone of `url`: the repository's
/// name and a hash of its credential-free URL (so a rotated token reuses the clone).
fn clone_dir_name(url: &str) -> String {
    let plain = git_remote::strip_credentials(url);
    let name: String = plain
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or("")
        .trim_end_matches(".git")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    let hash = hex::encode(&Sha256::digest(plain.as_bytes())[..6]);
    format!(
        "{}-{hash}.git",
        if name.is_empty() { "repo" } else { &name }
    )
}

/// Creates the bare clone (or reuses it), with `origin` set to the credential-free URL so
/// that a person can inspect it with plain `git`.
fn prepare_clone(clone: &Path, url: &str) -> anyhow::Result<()> {
    let plain = git_remote::strip_credentials(url);
    let repo = if clone.exists() {
        Repository::open_bare(clone).map_err(|e| {
            anyhow!(
                "cannot open the clone {} of {}: {}",
                clone.display(),
                redact_url(url),
                e.message()
            )
        })?
    } else {
        std::fs::create_dir_all(clone).with_context(|| format!("creating {}", clone.display()))?;
        Repository::init_bare(clone)
            .map_err(|e| anyhow!("cannot create {}: {}", clone.display(), e.message()))?
    };
    match repo.find_remote("origin") {
        Ok(remote) if remote.url() == Some(plain.as_str()) => {}
        Ok(_) => repo.remote_set_url("origin", &plain)?,
        Err(_) => {
            repo.remote("origin", &plain)?;
        }
    }
    Ok(())
}

fn read_head_blocking(
    location: &Location,
    branch: &str,
    document: &DocumentAt,
) -> anyhow::Result<Head> {
    let wanted = RefToRead {
        remote: format!("refs/heads/{branch}"),
        tracking: format!("{TRACKING_PREFIX}{branch}"),
        shown: format!("branch {branch:?}"),
    };
    read_ref_blocking(location, &wanted, document)
}

/// A ref to read: its name in the repository, where a clone keeps it, how it is named.
struct RefToRead {
    remote: String,
    tracking: String,
    shown: String,
}

fn read_ref_blocking(
    location: &Location,
    wanted: &RefToRead,
    document: &DocumentAt,
) -> anyhow::Result<Head> {
    let (repo, local_ref) = match location {
        Location::Path(path) => {
            let repo = Repository::open(path).map_err(|e| {
                anyhow!(
                    "cannot open Git repository {}: {}",
                    path.display(),
                    e.message()
                )
            })?;
            (repo, wanted.remote.as_str())
        }
        Location::Url { url, clone } => {
            let repo = Repository::open_bare(clone).map_err(|e| {
                anyhow!("cannot open the clone {}: {}", clone.display(), e.message())
            })?;
            fetch_ref(&repo, url, wanted)?;
            (repo, wanted.tracking.as_str())
        }
    };
    let commit = repo
        .find_reference(local_ref)
        .and_then(|r| r.peel_to_commit())
        .map_err(|e| anyhow!("{} not found: {}", wanted.shown, e.message()))?;
    let revision = commit.id().to_string();
    let short = &revision[..7];
    let tree = commit.tree()?;
    let document = documents::find(&repo, &tree, document, short);
    Ok(Head {
        commit: revision,
        document,
    })
}

/// Fetches a ref from `url` into the clone's tracking ref. A ref that is gone from the
/// remote is an error: pruning drops its stale tracking ref, so that its last known head
/// is not mistaken for the current one.
fn fetch_ref(repo: &Repository, url: &str, wanted: &RefToRead) -> anyhow::Result<()> {
    let shown = redact_url(url);
    let fail = |e: git2::Error| {
        anyhow!(
            "fetching {} from {shown}: {}",
            wanted.shown,
            redact_in(e.message(), url)
        )
    };
    // Anonymous: the URL with its credentials is used for this connection only.
    let mut remote = repo.remote_anonymous(url).map_err(fail)?;
    let refspec = format!("+{}:{}", wanted.remote, wanted.tracking);
    let mut opts = git_remote::fetch_options(Some(url));
    opts.prune(git2::FetchPrune::On);
    remote
        .fetch(&[refspec.as_str()], Some(&mut opts), None)
        .map_err(fail)?;
    // (Not `remote.list()`: git2 0.20 builds a slice from a null pointer when the remote
    // advertises no refs at all, which aborts debug builds.)
    if repo.find_reference(&wanted.tracking).is_err() {
        bail!("{} not found at {shown}", wanted.shown);
    }
    Ok(())
}

/// Making and changing repositories, for tests and the demo. Panics on any Git error:
/// these are fixtures, not product paths.
mod documents;

use documents::DocumentAt;
pub use documents::MAX_SCANNED_BLOB;

pub mod testing;

#[cfg(test)]
mod tests;
