//! Taking a new revision of the desired state, in both run modes: a valid one becomes
//! what the engine works towards; a bad one is reported on its revision once and changes
//! nothing (the previous valid desired state stays the target).

use super::error::{EngineError, EngineResult};
use crate::ports::{Journal, Observed, StatusSink};
use pgflip_core::plan::{Record, Wanted};
use pgflip_core::report::Update;
use pgflip_core::revision::Revision;

/// Which database a report is about: the observed document's own name if it has a
/// readable one, else the wanted database's.
pub fn subject_name(observed: &Observed, record: &Record) -> String {
    observed
        .name
        .clone()
        .or_else(|| record.wanted.as_ref().map(|w| w.desired.name.clone()))
        .unwrap_or_else(|| "database".to_string())
}

/// A new revision: keep its desired state if valid, report it if not. Either way it is
/// remembered, so the same bad revision is reported once.
pub async fn take_revision(
    observed: &Observed,
    record: &mut Record,
    journal: &impl Journal,
    sink: &impl StatusSink,
) -> EngineResult<()> {
    if record.observed_revision.as_ref() == Some(&observed.revision) {
        return Ok(());
    }
    match &observed.desired {
        Ok(desired) => match &record.wanted {
            Some(prev)
                if prev.desired.name != desired.name
                    || prev.desired.databases != desired.databases
                    || prev.desired.endpoint_port != desired.endpoint_port =>
            {
                let reason = "metadata.name, spec.databases and spec.endpoint cannot change on a running database";
                report_bad(sink, &observed.revision, reason).await;
            }
            _ => {
                tracing::info!(revision = %observed.revision.short(), version = %desired.major, "new revision");
                record.wanted = Some(Wanted {
                    revision: observed.revision.clone(),
                    desired: desired.clone(),
                });
            }
        },
        Err(reason) => {
            tracing::warn!(revision = %observed.revision.short(), %reason, "bad document; nothing changes");
            report_bad(sink, &observed.revision, reason).await;
        }
    }
    record.observed_revision = Some(observed.revision.clone());
    journal.save(record).await.map_err(EngineError::from)
}

async fn report_bad(sink: &impl StatusSink, revision: &Revision, reason: &str) {
    let mut u = Update::failure("document", format!("{reason}; nothing was changed"));
    u.at = crate::clock::rfc3339_ms(crate::clock::now_ms());
    if let Err(e) = sink.publish(revision, &u).await {
        tracing::warn!(error = %format!("{e:#}"), "could not publish the status");
    }
}
