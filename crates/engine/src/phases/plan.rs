//! The plan of a proposed document: the attempt the driver would begin for it, surveyed as
//! preflight would ([`super::preflight::survey`]), sized and timed — read-only. Nothing is
//! started, created or prepared: no slot, no publication, no green.

use super::{Ctx, Phases, preflight};
use crate::error::EngineResult;
use crate::ports::{Instances, Router};
use pgflip_core::forecast::{self, Forecast, Switch};
use pgflip_core::plan::{AttemptKind, Decision, Record, Wanted, decide};
use pgflip_core::revision::Revision;
use pgflip_core::spec::Desired;

impl<I: Instances, R: Router> Phases<I, R> {
    /// What a switch to `proposed` (the document at `revision`, not merged) would do, from
    /// what runs as `record` says. Refusals are part of the plan; an error is a plan that
    /// could not be made (blue unreachable, say).
    pub async fn forecast(
        &self,
        record: &Record,
        revision: &Revision,
        proposed: &Desired,
        now_ms: u64,
    ) -> EngineResult<Forecast> {
        let mut plan = Forecast {
            name: proposed.name.clone(),
            from: record.serving,
            to: proposed.major,
            switch: Switch::None,
            databases: Vec::new(),
            refusals: Vec::new(),
            warnings: Vec::new(),
            left_behind: Vec::new(),
            estimate: None,
            way_back: String::new(),
        };
        let Some(serving) = record.serving else {
            plan.switch = Switch::Bootstrap;
            plan.way_back = "nothing serves yet: nothing to go back to".into();
            return Ok(plan);
        };
        plan.way_back = forecast::way_back(serving.major, proposed.retain_previous);
        // The attempt the driver would begin once the proposal is what is wanted (an
        // attempt under way would be superseded; a standby in the way removed first).
        let mut wanting = Record {
            attempt: None,
            failed_revision: None,
            wanted: Some(Wanted {
                revision: revision.clone(),
                desired: proposed.clone(),
            }),
            ..record.clone()
        };
        let attempt = loop {
            match decide(&wanting, now_ms) {
                Decision::Begin(attempt) => break attempt,
                Decision::Decommission { .. } if wanting.standby.is_some() => {
                    wanting.standby = None;
                }
                _ => return Ok(plan),
            }
        };
        // Servers are found where the running document says; the checks follow the
        // proposed one (its policy, its databases, its copy preference).
        let running = record.wanted.as_ref().map_or(proposed, |w| &w.desired);
        let Some(source) = self.instances.addr(&serving, running).await? else {
            plan.refusals.push(format!(
                "{serving} serves but is not running: nothing to plan against"
            ));
            return Ok(plan);
        };
        let cx = Ctx {
            parts: self,
            attempt: &attempt,
            desired: proposed,
            source,
        };
        let survey = preflight::survey(&cx).await?;
        plan.refusals = survey.missing_tools;
        plan.refusals.extend(survey.refusals);
        plan.warnings = survey.warnings;
        plan.left_behind = survey.left_behind;
        plan.databases = survey.sizes;
        plan.switch = match attempt.kind {
            AttemptKind::SwitchBack => Switch::Back,
            AttemptKind::Full => {
                plan.estimate = survey
                    .copy
                    .as_ref()
                    .map(|c| forecast::estimate(plan.total_bytes(), c.method, &record.history));
                Switch::Full { copy: survey.copy }
            }
        };
        Ok(plan)
    }
}
