//! Plans on pull requests, in local mode ([`pgflip_engine::pull_requests`]): each head
//! whose document differs from the branch's gets a `pgflip/plan/<name>` commit status
//! (failure when the switch would be refused) and its report in the head's git note.
//! CI never needs a credential for it.

use crate::local::LocalSteps;
use pgflip_core::plan::Record;
use pgflip_engine::adapters::forge_status::{ForgeStatus, Sinks};
use pgflip_engine::adapters::git_notes::GitNotes;
use pgflip_engine::adapters::git_source::GitSource;
use pgflip_engine::ports::{Observed, StatusSink};
use pgflip_engine::pull_requests::{plan_update, proposals};
use std::collections::HashSet;
use std::time::{Duration, Instant};

pub struct PullRequestPlans {
    forge: ForgeStatus,
    notes: GitNotes,
    every: Duration,
    last: Option<Instant>,
    /// Heads planned already (a new push is a new head, planned again).
    planned: HashSet<String>,
}

impl PullRequestPlans {
    pub fn new(forge: ForgeStatus, notes: GitNotes, every: Duration) -> PullRequestPlans {
        PullRequestPlans {
            forge,
            notes,
            every,
            last: None,
            planned: HashSet::new(),
        }
    }

    /// Plans every open pull request into `branch` not planned yet, at most every
    /// `every`. `current` is the branch head's observation: a head whose document is the
    /// same changes nothing and gets no plan.
    pub async fn look(
        &mut self,
        source: &GitSource,
        branch: &str,
        current: &Observed,
        steps: &LocalSteps,
        record: &Record,
    ) {
        if self.every.is_zero() || self.last.is_some_and(|at| at.elapsed() < self.every) {
            return;
        }
        self.last = Some(Instant::now());
        let proposed = proposals(
            &self.forge,
            source,
            branch,
            &current.desired,
            &mut self.planned,
        )
        .await;
        let proposed = match proposed {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "could not list the pull requests");
                return;
            }
        };
        for proposal in proposed {
            let observed = &proposal.observed;
            let update = match plan_update(steps, record, observed).await {
                Ok(u) => u,
                Err(e) => {
                    // Blue unreachable, say: no verdict now, tried again next time.
                    tracing::warn!(pull = proposal.number, error = %format!("{e:#}"), "could not plan the pull request");
                    continue;
                }
            };
            let sinks = Sinks {
                first: self.notes.clone(),
                second: Some(self.forge.with_context(plan_context(observed))),
            };
            let head = observed.revision.to_string();
            tracing::info!(pull = proposal.number, head = %observed.revision.short(), state = update.state.as_str(), "plan: {}", update.message);
            match sinks.publish(&observed.revision, &update).await {
                Ok(()) => {
                    self.planned.insert(head);
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "could not post the plan")
                }
            }
        }
    }
}

/// The commit-status context of a plan: `pgflip/plan/<metadata.name>`.
pub fn plan_context(observed: &Observed) -> String {
    format!(
        "pgflip/plan/{}",
        observed.name.as_deref().unwrap_or("document")
    )
}
