//! Initial sync: waits until every subscribed table has been copied and is streaming,
//! measuring the bytes copied of the tables' size on the way.

use super::Ctx;
use crate::error::EngineResult;
use crate::ports::{Instances, Router};
use crate::replication as repl;
use crate::steps::{Learned, Stepped};
use pgflip_core::progress::Measured;
use std::time::Duration;

pub(super) async fn run<I: Instances, R: Router>(cx: &Ctx<'_, I, R>) -> EngineResult<Stepped> {
    cx.ensure_room().await?;
    let target = cx.target().await?;
    let (mut ready, mut total) = (0, 0);
    let (mut copied, mut size) = (0, 0);
    for db in &cx.desired.databases {
        let tgt = cx.connect(&target, db).await?;
        let (r, t) = repl::sync_progress(&tgt, &cx.forward(db)).await?;
        ready += r;
        total += t;
        let src = cx.connect(&cx.source, db).await?;
        let (c, s) = repl::copy_bytes(&src, &tgt, &cx.forward(db)).await?;
        copied += c;
        size += s;
    }
    if ready == total {
        return Ok(Stepped::Done(Learned::Nothing));
    }
    if copied > 0 {
        crate::failpoint::hit("initial-sync:copying");
    }
    Ok(Stepped::Waiting {
        message: format!("initial sync ({ready}/{total} tables)"),
        measured: Some(Measured::Done {
            done: copied,
            total: size,
        }),
        recheck: Duration::from_millis(250),
    })
}
