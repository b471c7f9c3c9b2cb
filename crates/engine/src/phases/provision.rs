//! Provision: the target instance exists and runs (created empty at the target major) —
//! or, for a physical copy, a base backup of the source is taken for it (it becomes the
//! target in the schema copy's place, [`super::copy_schema`]).

use super::Ctx;
use crate::error::EngineResult;
use crate::ports::{Instances, Router};
use crate::replication as repl;
use crate::steps::{Learned, Stepped};
use pgflip_core::progress::Measured;
use std::convert::Infallible;
use std::time::Duration;

pub(super) async fn run<I: Instances, R: Router>(cx: &Ctx<'_, I, R>) -> EngineResult<Stepped> {
    if cx.copies_physically() {
        let (from, to) = (&cx.attempt.from, &cx.attempt.to);
        let slot = repl::base_slot_name(to.color);
        let backup = async {
            let taking = cx
                .parts
                .instances
                .base_backup(from, to, &cx.source, &slot, cx.desired);
            tokio::select! {
                taken = taking => Ok(taken?),
                never = watch_base_backup(cx) => match never {},
            }
        };
        cx.within_retained_wal(std::slice::from_ref(&slot), backup)
            .await?;
    } else {
        cx.target().await?;
    }
    Ok(Stepped::Done(Learned::Nothing))
}

/// Reports the base backup's progress while it runs: the bytes the source has streamed
/// (`pg_stat_progress_basebackup`, pgflip's own backup) of its databases' size. Runs until
/// dropped; a failed look is skipped (the backup's own errors are what matter).
async fn watch_base_backup<I: Instances, R: Router>(cx: &Ctx<'_, I, R>) -> Infallible {
    let mut client = None;
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if client.is_none() {
            client = cx.connect(&cx.source, "postgres").await.ok();
        }
        let Some(c) = &client else { continue };
        let row = c
            .query_opt(
                "SELECT p.backup_streamed, (SELECT sum(pg_database_size(oid)) FROM pg_database)::bigint
                   FROM pg_stat_progress_basebackup p JOIN pg_stat_activity a USING (pid)
                  WHERE a.usename = current_user ORDER BY a.backend_start DESC LIMIT 1",
                &[],
            )
            .await;
        match row {
            Ok(Some(row)) => {
                let (streamed, size): (i64, i64) = (row.get(0), row.get(1));
                let done = streamed.max(0) as u64;
                cx.parts.set_live(Some((
                    format!("base backup of {}", cx.attempt.from),
                    Measured::Done {
                        done,
                        total: done.max(size.max(0) as u64),
                    },
                )));
            }
            Ok(None) => {}
            Err(_) => client = None,
        }
    }
}
