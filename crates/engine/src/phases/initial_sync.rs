//! Initial sync: waits until every subscribed table has been copied and is streaming.

use super::Ctx;
use crate::error::EngineResult;
use crate::ports::{Instances, Router};
use crate::replication as repl;
use crate::steps::{Learned, Stepped};
use std::time::Duration;

pub(super) async fn run<I: Instances, R: Router>(cx: &Ctx<'_, I, R>) -> EngineResult<Stepped> {
    let target = cx.target().await?;
    let (mut ready, mut total) = (0, 0);
    for db in &cx.desired.databases {
        let tgt = cx.connect(&target, db).await?;
        let (r, t) = repl::sync_progress(&tgt, &cx.forward(db)).await?;
        ready += r;
        total += t;
    }
    if ready == total {
        return Ok(Stepped::Done(Learned::Nothing));
    }
    let percent = if total == 0 {
        100.0
    } else {
        100.0 * ready as f64 / total as f64
    };
    Ok(Stepped::Waiting {
        message: format!("initial sync {percent:.0}% ({ready}/{total} tables)"),
        percent: Some(percent),
        recheck: Duration::from_millis(250),
    })
}
