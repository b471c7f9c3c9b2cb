//! Cleaning up: after an attempt that never switched (abandoned, failed), and when a
//! standby's retention ends. Every replication object pgflip made goes, so no slot is left
//! holding WAL; blue keeps serving untouched.

use super::Phases;
use crate::error::EngineResult;
use crate::fence;
use crate::pg::connect;
use crate::ports::{Instances, Router};
use crate::replication::{self as repl, link_name};
use pgflip_core::plan::{Attempt, AttemptKind, Member};
use pgflip_core::spec::Desired;

pub(super) async fn attempt<I: Instances, R: Router>(
    parts: &Phases<I, R>,
    attempt: &Attempt,
    desired: &Desired,
) -> EngineResult<()> {
    let admin = &parts.admin;
    let source = parts.instances.ensure(&attempt.from, desired).await?;
    let target = parts.instances.addr(&attempt.to, desired).await?;
    if target.is_some() {
        // Make sure it runs, so its subscriptions can be dropped cleanly.
        parts.instances.ensure(&attempt.to, desired).await.ok();
    }
    for db in &desired.databases {
        let forward = link_name(attempt.from.color, attempt.to.color, db);
        let reverse = link_name(attempt.to.color, attempt.from.color, db);
        if let Some(t) = &target
            && let Ok(tgt) = connect(t, admin, db).await
        {
            repl::drop_subscription(&tgt, &forward).await?;
            repl::drop_slot(&tgt, &reverse).await?;
            repl::drop_publication(&tgt, &reverse).await?;
        }
        let src = connect(&source, admin, db).await?;
        repl::drop_slot(&src, &forward).await?;
        repl::drop_publication(&src, &forward).await?;
    }
    match attempt.kind {
        AttemptKind::Full => {
            // A physical copy's base backup may still hold the source's WAL.
            let postgres = connect(&source, admin, "postgres").await?;
            repl::drop_slot(&postgres, &repl::base_slot_name(attempt.to.color)).await?;
            parts.instances.remove(&attempt.to, desired).await?
        }
        AttemptKind::SwitchBack => {
            // The standby stays in reverse sync, fenced, as before the attempt.
            if let Some(t) = &target {
                fence::fence(&connect(t, admin, "postgres").await?).await?;
                for db in &desired.databases {
                    let tgt = connect(t, admin, db).await?;
                    let back = link_name(attempt.from.color, attempt.to.color, db);
                    repl::set_subscription_enabled(&tgt, &back, true).await?;
                }
            }
        }
    }
    Ok(())
}

pub(super) async fn decommission<I: Instances, R: Router>(
    parts: &Phases<I, R>,
    serving: Member,
    standby: &Member,
    desired: &Desired,
) -> EngineResult<()> {
    let admin = &parts.admin;
    let serving_addr = parts.instances.ensure(&serving, desired).await?;
    let standby_addr = parts.instances.addr(standby, desired).await?;
    for db in &desired.databases {
        let link = link_name(serving.color, standby.color, db);
        if let Some(a) = &standby_addr
            && let Ok(c) = connect(a, admin, db).await
        {
            repl::drop_subscription(&c, &link).await?;
        }
        let src = connect(&serving_addr, admin, db).await?;
        repl::drop_slot(&src, &link).await?;
        repl::drop_publication(&src, &link).await?;
        repl::drop_publication(&src, &link_name(standby.color, serving.color, db)).await?;
    }
    Ok(parts.instances.retire(standby, desired).await?)
}
