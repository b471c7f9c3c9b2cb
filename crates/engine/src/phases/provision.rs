//! Provision: the target instance exists and runs (created empty at the target major) —
//! or, for a physical copy, a base backup of the source is taken for it (it becomes the
//! target in the schema copy's place, [`super::copy_schema`]).

use super::Ctx;
use crate::error::EngineResult;
use crate::ports::{Instances, Router};
use crate::replication as repl;
use crate::steps::{Learned, Stepped};

pub(super) async fn run<I: Instances, R: Router>(cx: &Ctx<'_, I, R>) -> EngineResult<Stepped> {
    if cx.copies_physically() {
        let (from, to) = (&cx.attempt.from, &cx.attempt.to);
        let slot = repl::base_slot_name(to.color);
        let backup = async {
            Ok(cx
                .parts
                .instances
                .base_backup(from, to, &cx.source, &slot, cx.desired)
                .await?)
        };
        cx.within_retained_wal(std::slice::from_ref(&slot), backup)
            .await?;
    } else {
        cx.target().await?;
    }
    Ok(Stepped::Done(Learned::Nothing))
}
