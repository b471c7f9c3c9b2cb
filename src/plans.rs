//! Plans on pull requests, in local mode: the open pull requests into the watched branch
//! are listed through the forge's API; each head whose document differs from the
//! branch's gets a `pgflip/plan/<name>` commit status (failure when the switch would be
//! refused) and its report in the head's git note — computed here, where pgflip already
//! holds the database credentials, read-only. CI never needs a credential for it.

use crate::local::LocalSteps;
use pgflip_core::forecast::Forecast;
use pgflip_core::plan::Record;
use pgflip_core::report::Update;
use pgflip_engine::adapters::forge_status::{ForgeStatus, Sinks};
use pgflip_engine::adapters::git_notes::GitNotes;
use pgflip_engine::adapters::git_source::GitSource;
use pgflip_engine::ports::{Observed, StatusSink};
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
        let pulls = match self.forge.open_pull_requests(branch).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "could not list the pull requests");
                return;
            }
        };
        for pull in pulls {
            if self.planned.contains(&pull.head) {
                continue;
            }
            let observed = match source.read_ref(&pull.git_ref).await {
                Ok(head) if head.commit != pull.head => continue, // pushed to meanwhile
                Ok(head) => head.observed(),
                Err(e) => Err(e),
            };
            let observed = match observed {
                Ok(o) => o,
                Err(e) => {
                    tracing::warn!(pull = pull.number, error = %format!("{e:#}"), "could not read the pull request");
                    continue;
                }
            };
            if observed.desired == current.desired {
                self.planned.insert(pull.head);
                continue;
            }
            let update = match plan_update(steps, record, &observed).await {
                Ok(u) => u,
                Err(e) => {
                    // Blue unreachable, say: no verdict now, tried again next time.
                    tracing::warn!(pull = pull.number, error = %format!("{e:#}"), "could not plan the pull request");
                    continue;
                }
            };
            let sinks = Sinks {
                first: self.notes.clone(),
                second: Some(self.forge.with_context(plan_context(&observed))),
            };
            tracing::info!(pull = pull.number, head = %&pull.head[..pull.head.len().min(7)], state = update.state.as_str(), "plan: {}", update.message);
            match sinks.publish(&observed.revision, &update).await {
                Ok(()) => {
                    self.planned.insert(pull.head);
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "could not post the plan")
                }
            }
        }
    }
}

/// The plan of one observed revision as an update, stamped now: its verdict, its line
/// and its report (an invalid document is a failure saying why).
pub async fn plan_update(
    steps: &LocalSteps,
    record: &Record,
    observed: &Observed,
) -> anyhow::Result<Update> {
    let now = pgflip_engine::clock::now_ms();
    let mut update = match &observed.desired {
        Ok(proposed) => update_of(
            &steps
                .forecast(record, &observed.revision, proposed, now)
                .await?,
        ),
        Err(why) => Update::failure("plan", format!("the document is invalid: {why}")),
    };
    update.at = pgflip_engine::clock::rfc3339_ms(now);
    Ok(update)
}

/// The commit-status context of a plan: `pgflip/plan/<metadata.name>`.
pub fn plan_context(observed: &Observed) -> String {
    format!(
        "pgflip/plan/{}",
        observed.name.as_deref().unwrap_or("document")
    )
}

fn update_of(forecast: &Forecast) -> Update {
    let mut u = Update::new(forecast.state(), "plan", forecast.summary());
    if let Some(from) = forecast.from {
        u = u.between(from.major, forecast.to);
    }
    if !forecast.refusals.is_empty() {
        u.reason = Some(forecast.refusals.join("; "));
    }
    u.left_behind = forecast.left_behind.clone();
    u.report = Some(forecast.report());
    u
}
