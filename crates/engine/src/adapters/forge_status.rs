//! Progress as a commit status on the forge that hosts the repository: GitHub, GitLab or
//! Gitea (and Forgejo, which speaks Gitea's API). The status shows next to the commit and
//! the pull request that merged it: pending with the phase and progress, then success,
//! or failure with the reason.
//!
//! One context per database (`pgflip/<name>`, `pgflip/<namespace>/<name>` on
//! Kubernetes), so each update replaces the previous one. A transient failure (network,
//! 5xx, 429) is retried with backoff; a refusal (401, 404, 422) is not. The token is
//! sent in a header and never appears in a log, an error or a status.

mod pulls;

pub use pulls::{PullRequest, parse_pulls};

use crate::ports::StatusSink;
use anyhow::{Context, bail};
use pgflip_core::report::{State, Update};
use pgflip_core::revision::Revision;
use serde_json::json;
use std::future::Future;
use std::time::Duration;

/// Attempts per update; between them 250 ms, 500 ms, 1 s.
const ATTEMPTS: u32 = 4;
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// GitHub refuses longer descriptions (GitLab and Gitea take more; one limit for all).
const DESCRIPTION_LIMIT: usize = 140;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Provider {
    Github,
    Gitlab,
    Gitea,
}

impl Provider {
    /// The public API root, where there is one.
    pub fn default_api(self) -> Option<&'static str> {
        match self {
            Provider::Github => Some("https://api.github.com"),
            Provider::Gitlab => Some("https://gitlab.com/api/v4"),
            Provider::Gitea => None,
        }
    }
}

/// Where and as whom statuses are posted.
#[derive(Clone)]
pub struct ForgeConfig {
    pub provider: Provider,
    /// The API root: `https://api.github.com`, `https://gitlab.example/api/v4`,
    /// `https://gitea.example/api/v1`.
    pub api: String,
    /// `owner/name` (GitLab: the project's full path or numeric id).
    pub repository: String,
    pub token: String,
    /// The status context, e.g. `pgflip/orders`.
    pub context: String,
}

/// The token stays out of every `{:?}`.
impl std::fmt::Debug for ForgeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForgeConfig")
            .field("provider", &self.provider)
            .field("api", &self.api)
            .field("repository", &self.repository)
            .field("token", &"***")
            .field("context", &self.context)
            .finish()
    }
}

#[derive(Clone, Debug)]
pub struct ForgeStatus {
    config: ForgeConfig,
    http: reqwest::Client,
}

/// One request, fully determined by the update: what the provider's API expects.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusRequest {
    pub url: String,
    /// The authentication header (name, value).
    pub auth: (&'static str, String),
    pub body: serde_json::Value,
}

impl ForgeStatus {
    pub fn new(config: ForgeConfig) -> anyhow::Result<ForgeStatus> {
        if config.token.trim().is_empty() {
            bail!("the forge token is empty");
        }
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("pgflip/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("building the HTTP client")?;
        Ok(ForgeStatus { config, http })
    }

    /// The same forge and repository, reporting under another context.
    pub fn with_context(&self, context: String) -> ForgeStatus {
        let mut s = self.clone();
        s.config.context = context;
        s
    }

    /// The request that reports `update` on `commit`.
    pub fn request(&self, commit: &str, update: &Update) -> StatusRequest {
        let c = &self.config;
        let api = c.api.trim_end_matches('/');
        let description = truncate(&update.human_line(), DESCRIPTION_LIMIT);
        match c.provider {
            Provider::Github | Provider::Gitea => {
                let state = match update.state {
                    State::Pending => "pending",
                    State::Success => "success",
                    State::Failure => "failure",
                };
                StatusRequest {
                    url: format!("{api}/repos/{}/statuses/{commit}", c.repository),
                    auth: self.auth(),
                    body: json!({
                        "state": state,
                        "context": c.context,
                        "description": description,
                    }),
                }
            }
            Provider::Gitlab => {
                // GitLab's "pending" means queued; a switch under way is "running".
                let state = match update.state {
                    State::Pending => "running",
                    State::Success => "success",
                    State::Failure => "failed",
                };
                StatusRequest {
                    url: format!(
                        "{api}/projects/{}/statuses/{commit}",
                        path_segment(&c.repository)
                    ),
                    auth: self.auth(),
                    body: json!({
                        "state": state,
                        "name": c.context,
                        "description": description,
                    }),
                }
            }
        }
    }

    /// The authentication header (name, value) the provider expects.
    fn auth(&self) -> (&'static str, String) {
        let token = &self.config.token;
        match self.config.provider {
            Provider::Github => ("Authorization", format!("Bearer {token}")),
            Provider::Gitea => ("Authorization", format!("token {token}")),
            Provider::Gitlab => ("PRIVATE-TOKEN", token.clone()),
        }
    }

    /// GitHub's API wants its media type and version named.
    fn api_version(&self, builder: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match self.config.provider {
            Provider::Github => builder
                .header("Accept", "application/vnd.github+json")
                .header("X-GitHub-Api-Version", "2022-11-28"),
            _ => builder,
        }
    }

    async fn send(&self, request: &StatusRequest) -> anyhow::Result<()> {
        let mut backoff = FIRST_BACKOFF;
        let mut last_error = String::new();
        for attempt in 1..=ATTEMPTS {
            let builder = self
                .http
                .post(&request.url)
                .header(request.auth.0, &request.auth.1)
                .json(&request.body);
            match self.api_version(builder).send().await {
                Ok(response) if response.status().is_success() => return Ok(()),
                Ok(response) => {
                    let status = response.status();
                    // The body is the forge's explanation; it does not echo the token.
                    let body = response.text().await.unwrap_or_default();
                    let body = truncate(body.trim(), 300);
                    last_error = format!("{status}: {body}");
                    let transient = status.is_server_error() || status.as_u16() == 429;
                    if !transient {
                        bail!("the forge refused the commit status ({last_error})");
                    }
                }
                // reqwest's error names the URL, which holds no credential.
                Err(e) => last_error = format!("{e}"),
            }
            if attempt < ATTEMPTS {
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
        }
        bail!("posting the commit status failed {ATTEMPTS} times, last: {last_error}")
    }
}

impl StatusSink for ForgeStatus {
    fn publish(
        &self,
        revision: &Revision,
        update: &Update,
    ) -> impl Future<Output = anyhow::Result<()>> + Send {
        let request = revision
            .as_commit()
            .map(|commit| self.request(commit, update))
            .context("forge statuses go on commits only");
        async move { self.send(&request?).await }
    }
}

/// Commit statuses on the forge, besides git notes.
#[derive(Debug, Clone, clap::Args)]
pub struct ForgeArgs {
    /// Also post a commit status for every update to this forge.
    #[arg(long, value_enum, requires = "forge_repository")]
    pub forge: Option<Provider>,
    /// The forge's API root (defaults: https://api.github.com, https://gitlab.com/api/v4;
    /// Gitea: required, e.g. https://gitea.example/api/v1).
    #[arg(long)]
    pub forge_api: Option<String>,
    /// The repository: owner/name (GitLab: the project's path or id).
    #[arg(long)]
    pub forge_repository: Option<String>,
    /// A file holding the API token; without it, $PGFLIP_FORGE_TOKEN.
    #[arg(long)]
    pub forge_token_file: Option<std::path::PathBuf>,
}

impl ForgeArgs {
    /// The configured forge, if any (its token read now, from the file or the environment).
    pub fn sink(self) -> anyhow::Result<Option<ForgeStatus>> {
        let Some(provider) = self.forge else {
            return Ok(None);
        };
        let api = match self.forge_api.or(provider.default_api().map(String::from)) {
            Some(api) => api,
            None => anyhow::bail!("--forge-api is required for {provider:?}"),
        };
        let token = match &self.forge_token_file {
            Some(path) => std::fs::read_to_string(path)
                .with_context(|| format!("reading the forge token from {}", path.display()))?,
            None => std::env::var("PGFLIP_FORGE_TOKEN").map_err(|_| {
                anyhow::anyhow!(
                    "give the forge token with --forge-token-file or $PGFLIP_FORGE_TOKEN"
                )
            })?,
        };
        ForgeStatus::new(ForgeConfig {
            provider,
            api,
            repository: self.forge_repository.unwrap_or_default(),
            token: token.trim().to_string(),
            context: "pgflip".into(),
        })
        .map(Some)
    }
}

/// The git-notes sink, and the forge's when one is configured: each update goes to every
/// sink; one failing does not keep it from the others.
#[derive(Clone)]
pub struct Sinks<A, B> {
    pub first: A,
    pub second: Option<B>,
}

impl<A: StatusSink, B: StatusSink> StatusSink for Sinks<A, B> {
    async fn publish(&self, revision: &Revision, update: &Update) -> anyhow::Result<()> {
        let first = self.first.publish(revision, update).await;
        if let Some(second) = &self.second {
            second.publish(revision, update).await?;
        }
        first
    }
}

/// At most `limit` characters, with an ellipsis when cut.
fn truncate(text: &str, limit: usize) -> String {
    if text.chars().count() <= limit {
        return text.to_string();
    }
    let mut out: String = text.chars().take(limit - 1).collect();
    out.push('…');
    out
}

/// A GitLab project path as one URL path segment (`group/app` → `group%2Fapp`).
fn path_segment(text: &str) -> String {
    super::git_remote::percent_encode(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sink(provider: Provider) -> ForgeStatus {
        ForgeStatus::new(ForgeConfig {
            provider,
            api: "https://forge.example/api/".into(),
            repository: "shop/orders-db".into(),
            token: "t0ken".into(),
            context: "pgflip/orders".into(),
        })
        .unwrap()
    }

    #[test]
    fn requests_per_provider() {
        let u = Update::new(State::Pending, "initial-sync", "initial sync 40%").between(15, 16);
        let gh = sink(Provider::Github).request("abc123", &u);
        assert_eq!(
            gh.url,
            "https://forge.example/api/repos/shop/orders-db/statuses/abc123"
        );
        assert_eq!(gh.auth, ("Authorization", "Bearer t0ken".to_string()));
        assert_eq!(
            gh.body,
            json!({"state": "pending", "context": "pgflip/orders",
                   "description": "pgflip: pending [initial-sync] 15 → 16: initial sync 40%"})
        );
        let gitea = sink(Provider::Gitea).request("abc123", &Update::failure("preflight", "no"));
        assert_eq!(gitea.auth.1, "token t0ken");
        assert_eq!(gitea.body["state"], "failure");
        let gl = sink(Provider::Gitlab).request("abc123", &u);
        assert_eq!(
            gl.url,
            "https://forge.example/api/projects/shop%2Forders-db/statuses/abc123"
        );
        assert_eq!(gl.auth, ("PRIVATE-TOKEN", "t0ken".to_string()));
        assert_eq!(gl.body["state"], "running");
        assert_eq!(gl.body["name"], "pgflip/orders");
    }

    #[test]
    fn long_descriptions_are_cut_and_the_token_is_not_shown() {
        let u = Update::failure("verify", "x".repeat(500));
        let r = sink(Provider::Github).request("abc", &u);
        let d = r.body["description"].as_str().unwrap();
        assert_eq!(d.chars().count(), DESCRIPTION_LIMIT);
        assert!(d.ends_with('…'));
        let shown = format!("{:?}", sink(Provider::Github));
        assert!(!shown.contains("t0ken"), "{shown}");
    }
}
