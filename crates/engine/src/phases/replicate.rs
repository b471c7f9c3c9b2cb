//! Replicate: a publication on the source and a subscription on the target per database,
//! copying every table's rows, then streaming what the source commits.

use super::Ctx;
use crate::error::EngineResult;
use crate::ports::{Instances, Router};
use crate::replication as repl;
use crate::steps::{Learned, Stepped};

pub(super) async fn run<I: Instances, R: Router>(cx: &Ctx<'_, I, R>) -> EngineResult<Stepped> {
    let target = cx.target().await?;
    for db in &cx.desired.databases {
        let name = cx.forward(db);
        let src = cx.connect(&cx.source, db).await?;
        let tgt = cx.connect(&target, db).await?;
        repl::ensure_publication(&src, &name).await?;
        repl::ensure_subscription(
            &tgt,
            &name,
            &cx.source,
            cx.admin(),
            db,
            repl::Start::CopyAll,
        )
        .await?;
    }
    Ok(Stepped::Done(Learned::Nothing))
}
