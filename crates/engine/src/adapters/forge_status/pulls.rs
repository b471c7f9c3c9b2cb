//! The open pull requests (GitLab: merge requests) into the watched branch, from the same
//! forge the statuses go to: their heads are what a plan is posted on.

use super::{ForgeStatus, Provider, path_segment, truncate};
use anyhow::{Context, bail};
use serde_json::Value;

/// One open pull request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullRequest {
    pub number: u64,
    /// The head commit, where the plan's status goes.
    pub head: String,
    /// The ref the forge keeps the head under in the base repository (also for a pull
    /// request from a fork): `refs/pull/N/head`, GitLab `refs/merge-requests/N/head`.
    pub git_ref: String,
}

impl ForgeStatus {
    /// The URL listing open pull requests (the first 100: a plan is for the changes under
    /// review, not an archive).
    pub fn pulls_url(&self) -> String {
        let c = &self.config;
        let api = c.api.trim_end_matches('/');
        match c.provider {
            Provider::Github => {
                format!("{api}/repos/{}/pulls?state=open&per_page=100", c.repository)
            }
            Provider::Gitea => format!("{api}/repos/{}/pulls?state=open&limit=50", c.repository),
            Provider::Gitlab => format!(
                "{api}/projects/{}/merge_requests?state=opened&per_page=100",
                path_segment(&c.repository)
            ),
        }
    }

    /// The open pull requests whose base is `branch`.
    pub async fn open_pull_requests(&self, branch: &str) -> anyhow::Result<Vec<PullRequest>> {
        let (name, value) = self.auth();
        let builder = self.http.get(self.pulls_url()).header(name, value);
        let response = self
            .api_version(builder)
            .send()
            .await
            .context("listing open pull requests")?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            bail!(
                "the forge refused to list pull requests ({status}: {})",
                truncate(body.trim(), 300)
            );
        }
        let body: Value = response.json().await.context("reading the pull requests")?;
        parse_pulls(self.config.provider, &body, branch)
    }
}

/// The pull requests into `branch` in a forge's answer.
pub fn parse_pulls(
    provider: Provider,
    body: &Value,
    branch: &str,
) -> anyhow::Result<Vec<PullRequest>> {
    let items = body
        .as_array()
        .context("the forge's answer is not a list")?;
    let mut out = Vec::new();
    for item in items {
        let (number, head, base) = match provider {
            Provider::Github | Provider::Gitea => (
                item["number"].as_u64(),
                item["head"]["sha"].as_str(),
                item["base"]["ref"].as_str(),
            ),
            Provider::Gitlab => (
                item["iid"].as_u64(),
                item["sha"].as_str(),
                item["target_branch"].as_str(),
            ),
        };
        let (Some(number), Some(head)) = (number, head) else {
            bail!("a pull request without a number or a head commit: {item}");
        };
        if base != Some(branch) {
            continue;
        }
        let git_ref = match provider {
            Provider::Gitlab => format!("refs/merge-requests/{number}/head"),
            _ => format!("refs/pull/{number}/head"),
        };
        out.push(PullRequest {
            number,
            head: head.to_string(),
            git_ref,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn each_forge_lists_its_own_way() {
        let github = json!([
            {"number": 7, "head": {"sha": "abc", "ref": "bump"}, "base": {"ref": "main"}},
            {"number": 8, "head": {"sha": "def", "ref": "other"}, "base": {"ref": "release"}}
        ]);
        assert_eq!(
            parse_pulls(Provider::Github, &github, "main").unwrap(),
            vec![PullRequest {
                number: 7,
                head: "abc".into(),
                git_ref: "refs/pull/7/head".into()
            }]
        );
        let gitlab = json!([{"iid": 3, "sha": "fed", "target_branch": "main"}]);
        assert_eq!(
            parse_pulls(Provider::Gitlab, &gitlab, "main").unwrap()[0].git_ref,
            "refs/merge-requests/3/head"
        );
        assert!(parse_pulls(Provider::Gitea, &json!({"message": "no"}), "main").is_err());
        assert!(parse_pulls(Provider::Github, &json!([{"number": 1}]), "main").is_err());
    }
}
