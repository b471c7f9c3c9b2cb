//! Plans on pull requests, shared by both modes: the open pull requests into the followed
//! branch are listed through the forge's API, each head not planned yet is read from the
//! Git repository, and one whose document differs from what runs gets a plan — computed
//! where pgflip already holds the database credentials, read-only. The caller posts it
//! (local mode: the head's git note and a commit status; Kubernetes mode: a commit status).

use crate::adapters::forge_status::ForgeStatus;
use crate::adapters::git_source::GitSource;
use crate::phases::Phases;
use crate::ports::{Instances, Observed, Router};
use pgflip_core::plan::Record;
use pgflip_core::report::Update;
use pgflip_core::spec::Desired;
use std::collections::HashSet;

/// A pull request's head to plan: its number and what its document asks for.
pub struct Proposal {
    pub number: u64,
    pub observed: Observed,
}

/// What the pull requests into `branch` propose, heads in `planned` left out. A head whose
/// document asks for `current` changes nothing: it is added to `planned` and not returned.
/// A pull request whose head cannot be read now is skipped (logged), to be read next time.
pub async fn proposals(
    forge: &ForgeStatus,
    source: &GitSource,
    branch: &str,
    current: &Result<Desired, String>,
    planned: &mut HashSet<String>,
) -> anyhow::Result<Vec<Proposal>> {
    let mut out = Vec::new();
    for pull in forge.open_pull_requests(branch).await? {
        if planned.contains(&pull.head) {
            continue;
        }
        let observed = match source.read_ref(&pull.git_ref).await {
            Ok(head) if head.commit != pull.head => continue, // pushed to meanwhile
            Ok(head) => head.observed(),
            Err(e) => Err(e),
        };
        match observed {
            Ok(o) if o.desired == *current => {
                planned.insert(pull.head);
            }
            Ok(observed) => out.push(Proposal {
                number: pull.number,
                observed,
            }),
            Err(e) => {
                tracing::warn!(pull = pull.number, error = %format!("{e:#}"), "could not read the pull request")
            }
        }
    }
    Ok(out)
}

/// The plan of one observed revision as an update, stamped now: its verdict, its line
/// and its report (an invalid document is a failure saying why).
pub async fn plan_update<I: Instances, R: Router>(
    steps: &Phases<I, R>,
    record: &Record,
    observed: &Observed,
) -> anyhow::Result<Update> {
    let now = crate::clock::now_ms();
    let mut update = match &observed.desired {
        Ok(proposed) => steps
            .forecast(record, &observed.revision, proposed, now)
            .await?
            .update(),
        Err(why) => Update::failure("plan", format!("the document is invalid: {why}")),
    };
    update.at = crate::clock::rfc3339_ms(now);
    Ok(update)
}
