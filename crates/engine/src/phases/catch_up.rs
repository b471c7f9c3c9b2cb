//! Catch up, the lag gate: every database's link within `maxLagBytes` of the source, or
//! the attempt gives up after `catchUpTimeout`.

use super::Ctx;
use crate::error::{EngineError, EngineResult};
use crate::ports::{Instances, Router};
use crate::replication as repl;
use crate::steps::{Learned, Stepped};
use anyhow::Context;
use std::time::Duration;

/// How long a catch-up may take before pgflip looks at why (a failing apply).
const SLOW_CATCH_UP: Duration = Duration::from_secs(5);

pub(super) async fn run<I: Instances, R: Router>(cx: &Ctx<'_, I, R>) -> EngineResult<Stepped> {
    cx.ensure_room().await?;
    // A pause rolled back while the target did not answer may have left the forward
    // subscription disabled: nothing would catch up.
    if cx.attempt.pause_failures > 0 {
        let target = cx.target().await?;
        for db in &cx.desired.databases {
            let tgt = cx.connect(&target, db).await?;
            repl::set_subscription_enabled(&tgt, &cx.forward(db), true).await?;
        }
    }
    let mut worst = 0i64;
    for db in &cx.desired.databases {
        let src = cx.connect(&cx.source, db).await?;
        let lag = repl::lag_bytes(&src, &cx.forward(db))
            .await?
            .context("the replication slot is missing")?;
        worst = worst.max(lag);
    }
    let switchover = &cx.desired.switchover;
    if worst as u64 <= switchover.max_lag_bytes {
        return Ok(Stepped::Done(Learned::Nothing));
    }
    let waited = crate::clock::now_ms().saturating_sub(cx.attempt.phase_started_ms);
    // A link whose apply fails does not catch up. The usual cause is DDL on the source
    // (a table the target lacks): say so then rather than at the timeout. Looked at only
    // once the catch-up is slow, so a quick one never opens connections to the target,
    // and the schema is read only when the apply has failed.
    if Duration::from_millis(waited) > SLOW_CATCH_UP {
        let target = cx.target().await?;
        for db in &cx.desired.databases {
            let tgt = cx.connect(&target, db).await?;
            if repl::apply_errors(&tgt, &cx.forward(db)).await? > 0 {
                cx.check_schema_unchanged().await?;
            }
        }
    }
    if Duration::from_millis(waited) > switchover.catch_up_timeout {
        return Err(EngineError::CatchUpTimeout {
            target: cx.attempt.to,
            timeout: switchover.catch_up_timeout,
            behind_bytes: worst,
        });
    }
    Ok(Stepped::Waiting {
        message: format!(
            "catching up: {} behind",
            pgflip_core::progress::bytes(worst.max(0) as u64)
        ),
        measured: Some(pgflip_core::progress::Measured::Behind(worst.max(0) as u64)),
        recheck: Duration::from_millis(200),
    })
}
