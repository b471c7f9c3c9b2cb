//! Reverse sync: the old source subscribes to the reverse slot from the cut recorded inside
//! the pause, and the forward link is dropped, so a revert switches back without losing a
//! write.

use super::Ctx;
use crate::error::EngineResult;
use crate::ports::{Instances, Router};
use crate::steps::{Learned, Stepped};
use crate::switchover;

pub(super) async fn run<I: Instances, R: Router>(cx: &Ctx<'_, I, R>) -> EngineResult<Stepped> {
    let target = cx.target().await?;
    let target_peer = cx.peer(&cx.attempt.to, &target).await?;
    let cut = cx.attempt.reverse_from_lsn.as_deref();
    switchover::start_reverse_replication(&cx.sides(&target, &target_peer), cut).await?;
    Ok(Stepped::Done(Learned::Nothing))
}
