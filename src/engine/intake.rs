//! Taking a new revision of the desired state, in both run modes: a valid document
//! becomes what the engine works towards; a bad one is reported on its commit once and
//! changes nothing (the previous valid document stays the target).

use crate::adapters::{Journal, Observed, StatusSink};
use crate::core::plan::Record;
use crate::core::spec;

/// Which database a report is about: the document's own name if it has a readable one,
/// else the running database's.
pub fn subject_name(observed: &Observed, record: &Record) -> String {
    observed
        .document
        .as_deref()
        .ok()
        .and_then(spec::peek_name)
        .or_else(|| {
            record
                .desired
                .as_ref()
                .and_then(|d| spec::peek_name(&d.document))
        })
        .unwrap_or_else(|| "database".to_string())
}

/// A new revision: keep its document if valid, report it if not. Either way it is
/// remembered, so the same bad commit is reported once.
pub async fn take_revision(
    observed: &Observed,
    record: &mut Record,
    journal: &impl Journal,
    sinks: &impl StatusSink,
) -> anyhow::Result<()> {
    if record.observed_revision.as_deref() == Some(observed.revision.as_str()) {
        return Ok(());
    }
    let parsed = observed.document.clone().and_then(|text| {
        spec::parse(&text)
            .map(|d| (text, d))
            .map_err(|e| e.to_string())
    });
    match parsed {
        Ok((text, desired)) => {
            if let Some(prev) = &record.desired {
                let prev = spec::parse(&prev.document).expect("a stored document was valid");
                if prev.name != desired.name
                    || prev.databases != desired.databases
                    || prev.endpoint_port != desired.endpoint_port
                {
                    let reason = "metadata.name, spec.databases and spec.endpoint cannot change on a running database";
                    report_bad(sinks, &observed.revision, reason).await;
                    record.observed_revision = Some(observed.revision.clone());
                    return journal.save(record).await;
                }
            }
            tracing::info!(revision = crate::core::plan::short(&observed.revision), version = %desired.major, "new revision");
            record.desired = Some(crate::core::plan::DesiredDocument {
                revision: observed.revision.clone(),
                document: text,
            });
        }
        Err(reason) => {
            tracing::warn!(revision = crate::core::plan::short(&observed.revision), %reason, "bad document; nothing changes");
            report_bad(sinks, &observed.revision, &reason).await;
        }
    }
    record.observed_revision = Some(observed.revision.clone());
    journal.save(record).await
}

async fn report_bad(sinks: &impl StatusSink, revision: &str, reason: &str) {
    let u =
        crate::core::report::Update::failure("document", format!("{reason}; nothing was changed"));
    if let Err(e) = sinks.publish(revision, &u).await {
        tracing::warn!(error = %format!("{e:#}"), "could not publish the status");
    }
}
