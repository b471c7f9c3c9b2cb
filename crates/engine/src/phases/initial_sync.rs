//! Initial sync: waits until every subscribed table has been copied and is streaming,
//! measuring the bytes copied of the tables' size on the way. A copy PostgreSQL cannot
//! finish by itself (a table's sync state lost when the target was killed) is started
//! over here, and said on the commit as a retry.

use super::Ctx;
use crate::error::{EngineError, EngineResult};
use crate::ports::{Instances, Router};
use crate::replication as repl;
use crate::steps::{Learned, Stepped};
use pgflip_core::progress::Measured;
use std::time::Duration;
use tokio_postgres::Client;

/// How long a table's copy must look lost before it is started over (see
/// [`repl::lost_table_copies`]).
const LOST_COPY_SETTLE: Duration = Duration::from_secs(2);

pub(super) async fn run<I: Instances, R: Router>(cx: &Ctx<'_, I, R>) -> EngineResult<Stepped> {
    cx.ensure_room().await?;
    let target = cx.target().await?;
    let (mut ready, mut total) = (0, 0);
    let (mut copied, mut size) = (0, 0);
    for db in &cx.desired.databases {
        let name = cx.forward(db);
        let tgt = cx.connect(&target, db).await?;
        let src = cx.connect(&cx.source, db).await?;
        if let Some(why) = why_start_over(cx, &src, &tgt, &name).await? {
            let source_peer = cx.peer(&cx.attempt.from, &cx.source).await?;
            repl::restart_copy(&src, &tgt, &name, &source_peer, cx.admin(), db).await?;
            return Err(EngineError::CopyStartedOver {
                target: cx.attempt.to,
                database: db.clone(),
                why,
            });
        }
        let (r, t) = repl::sync_progress(&tgt, &name).await?;
        ready += r;
        total += t;
        let (c, s) = repl::copy_bytes(&src, &tgt, &name).await?;
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

/// Why the link's copy has to start over, if it has to.
async fn why_start_over<I: Instances, R: Router>(
    cx: &Ctx<'_, I, R>,
    src: &Client,
    tgt: &Client,
    name: &str,
) -> EngineResult<Option<String>> {
    if !repl::subscription_exists(tgt, name).await? {
        // Only a start-over that stopped between dropping the subscription and making it
        // again leaves none (a physical copy's link is made by the step before, no copy).
        return Ok((!cx.copies_physically())
            .then(|| "its subscription was missing (a start-over had stopped midway)".into()));
    }
    let lost = repl::lost_table_copies(src, tgt, name, LOST_COPY_SETTLE).await?;
    Ok((!lost.is_empty()).then(|| {
        format!(
            "the copy of {} was lost when {} stopped (its table-sync slot on {} was dropped, its state never recorded)",
            lost.join(", "),
            cx.attempt.to,
            cx.attempt.from
        )
    }))
}
