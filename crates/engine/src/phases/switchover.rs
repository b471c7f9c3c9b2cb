//! The Switchover phase: the checks right before the sequence ([`crate::switchover`],
//! where the pause itself is) and what follows it. A switchover interrupted by a crash is
//! first brought to a safe end (rolled back, or completed if clients were already moved).

use super::Ctx;
use super::copy_schema::copy_roles;
use crate::error::EngineResult;
use crate::ports::{Instances, Journal, Router};
use crate::steps::{Learned, Stepped};
use crate::{direct_clients, switchover};
use pgflip_core::plan::{Record, Standby};
use pgflip_core::spec::DirectClients;
use std::time::Duration;

/// How often a switch that waits for direct clients to go looks again.
const DIRECT_CLIENTS_RECHECK: Duration = Duration::from_secs(2);

pub(super) async fn run<I: Instances, R: Router, J: Journal>(
    cx: &Ctx<'_, I, R>,
    record: &mut Record,
    journal: &J,
) -> EngineResult<Stepped> {
    let target = cx.target().await?;
    let target_peer = cx.peer(&cx.attempt.to, &target).await?;
    let sides = cx.sides(&target, &target_peer);
    let router = &cx.parts.router;
    let moved = switchover::recover(router, journal, record, &sides).await?;
    let mut measurement = None;
    if !moved {
        cx.check_schema_unchanged().await?;
        if cx.desired.switchover.direct_clients == DirectClients::Wait {
            let source = cx.connect(&cx.source, "postgres").await?;
            let sessions = direct_clients::find(&source, router).await?;
            if !sessions.is_empty() {
                return Ok(Stepped::Waiting {
                    message: direct_clients::describe(&sessions, &cx.source.to_string()),
                    measured: None,
                    recheck: DIRECT_CLIENTS_RECHECK,
                });
            }
        }
        // Roles created on the source since the copy must exist on the target.
        copy_roles(cx, &cx.connect(&target, "postgres").await?).await?;
        let m = switchover::run(router, journal, record, &sides).await?;
        tracing::info!(
            pause_ms = m.pause_ms,
            drain_ms = m.drain_ms,
            catch_up_ms = m.catch_up_ms,
            sequences_ms = m.sequences_ms,
            "switched"
        );
        measurement = Some(m);
    }
    // The old source is now the standby, kept in reverse sync for the retention time.
    let fingerprint = cx.fingerprint(&target).await?;
    Ok(Stepped::Done(Learned::Switched {
        measurement,
        standby: Standby {
            member: cx.attempt.from,
            retain_until_ms: crate::clock::now_ms() + cx.desired.retain_previous.as_millis() as u64,
            serving_fingerprint: fingerprint,
        },
    }))
}
