//! Replicate: a publication on the source and a subscription on the target per database,
//! copying every table's rows, then streaming what the source commits. After a physical
//! copy the slots exist already and nothing is copied: each subscription streams from the
//! copy's cut.

use super::Ctx;
use crate::error::EngineResult;
use crate::ports::{Instances, Router};
use crate::replication as repl;
use crate::steps::{Learned, Stepped};
use anyhow::Context;

pub(super) async fn run<I: Instances, R: Router>(cx: &Ctx<'_, I, R>) -> EngineResult<Stepped> {
    let target = cx.target().await?;
    let source_peer = cx.peer(&cx.attempt.from, &cx.source).await?;
    for db in &cx.desired.databases {
        let name = cx.forward(db);
        let src = cx.connect(&cx.source, db).await?;
        let tgt = cx.connect(&target, db).await?;
        repl::ensure_publication(&src, &name).await?;
        let start = if cx.copies_physically() {
            let cut = cx.attempt.copy.as_ref().and_then(|c| c.cut_lsn.clone());
            repl::Start::FromLsn(cut.context("the physical copy's cut was not recorded")?)
        } else {
            repl::Start::CopyAll
        };
        repl::ensure_subscription(&tgt, &name, &source_peer, cx.admin(), db, start).await?;
    }
    Ok(Stepped::Done(Learned::Nothing))
}
