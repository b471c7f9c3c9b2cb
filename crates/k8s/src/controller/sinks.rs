//! Where progress goes in Kubernetes mode: Events on the object (counted in the metrics),
//! and the commit's status on the forge when the revision is a Git commit.

use crate::metrics::Metrics;
use anyhow::Context;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder};
use pgflip_core::report::{State, Update};
use pgflip_core::revision::Revision;
use pgflip_engine::adapters::forge_status::ForgeStatus;
use pgflip_engine::ports::StatusSink;
use std::time::Duration;

/// Where progress goes: Events on the object, and the commit's status on the forge when
/// the revision is a Git commit (an object no Kustomization manages has none).
pub struct KubeSinks {
    pub(super) events: KubeEvents,
    pub(super) forge: Option<ForgeStatus>,
}

impl StatusSink for KubeSinks {
    async fn publish(&self, revision: &Revision, update: &Update) -> anyhow::Result<()> {
        let events = self.events.publish(revision, update).await;
        if let Some(forge) = self
            .forge
            .as_ref()
            .filter(|_| revision.as_commit().is_some())
        {
            forge.publish(revision, update).await?;
        }
        events
    }
}

/// Progress as Kubernetes Events on the object (and counted in the metrics).
pub struct KubeEvents {
    pub(super) recorder: Recorder,
    pub(super) reference: ObjectReference,
    pub(super) metrics: Metrics,
    pub(super) namespace: String,
    pub(super) name: String,
}

impl StatusSink for KubeEvents {
    async fn publish(&self, _revision: &Revision, update: &Update) -> anyhow::Result<()> {
        let reason: String = update
            .phase
            .split('-')
            .map(|w| {
                let mut c = w.chars();
                c.next()
                    .map(|f| f.to_uppercase().chain(c).collect::<String>())
                    .unwrap_or_default()
            })
            .collect();
        let (type_, reason) = match update.state {
            State::Failure => (EventType::Warning, format!("{reason}Failed")),
            State::Success => (EventType::Normal, "Switched".to_string()),
            State::Pending => (EventType::Normal, reason),
        };
        if update.state == State::Success
            && let Some(pause) = update.pause_ms
        {
            let direction = match (&update.from, &update.to) {
                (Some(f), Some(t)) if t.parse::<u32>().ok() < f.parse::<u32>().ok() => "downgrade",
                _ => "upgrade",
            };
            self.metrics.switch_done(
                &self.namespace,
                &self.name,
                direction,
                Duration::from_secs_f64(pause / 1000.0),
            );
            self.metrics.phases_took(&update.timings_ms);
        }
        let mut note = update.message.clone();
        note.truncate(1000);
        self.recorder
            .publish(
                &Event {
                    type_,
                    reason,
                    note: Some(note),
                    action: "Reconcile".into(),
                    secondary: None,
                },
                &self.reference,
            )
            .await
            .context("publishing an event")
    }
}
