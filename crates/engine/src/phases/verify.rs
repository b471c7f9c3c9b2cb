//! Verify: the schema still as copied, then every table compared at one consistent cut
//! ([`crate::verify`]); materialized views (not replicated) refreshed on the target, and
//! its planner statistics gathered, so that green does not take clients with whatever
//! autovacuum happened to analyze (a copied table has none: plans would be guesses).

use super::Ctx;
use crate::catalog::display_name;
use crate::error::{EngineError, EngineResult};
use crate::pg::qualified;
use crate::ports::{Instances, Router};
use crate::steps::{Learned, Stepped};
use crate::verify;
use pgflip_core::progress::Measured;
use pgflip_core::spec::{UnsupportedPolicy, Verification};

pub(super) async fn run<I: Instances, R: Router>(cx: &Ctx<'_, I, R>) -> EngineResult<Stepped> {
    cx.check_schema_unchanged().await?;
    let target = cx.target().await?;
    let mut tables = 0;
    if cx.desired.verification != Verification::None {
        // Every database's list and sizes first, so progress counts bytes of the whole.
        let mut listed = Vec::new();
        for db in &cx.desired.databases {
            let src = cx.connect(&cx.source, db).await?;
            // What preflight let through under `warn` is not carried, hence not compared;
            // it is reported as left behind (preflight listed it for the final status).
            let listing =
                verify::tables_to_verify(&src, cx.desired.unsupported == UnsupportedPolicy::Warn)
                    .await?;
            if !listing.left_behind.is_empty() {
                let names: Vec<String> = listing
                    .left_behind
                    .iter()
                    .map(|(s, n)| display_name(s, n))
                    .collect();
                tracing::warn!(
                    database = %db,
                    "not compared, left behind under unsupported: warn (unlogged): {}",
                    names.join(", ")
                );
            }
            let sizes = verify::table_sizes(&src, &listing.compared).await?;
            listed.push((db, src, listing.compared, sizes));
        }
        let total: u64 = listed.iter().flat_map(|(.., sizes)| sizes).sum();
        let count: usize = listed.iter().map(|(_, _, list, _)| list.len()).sum();
        let (mut done, mut done_tables) = (0u64, 0usize);
        for (db, src, list, sizes) in listed {
            let tgt = cx.connect(&target, db).await?;
            let at = verify::CutAt {
                source: &cx.source,
                target: &target,
                admin: cx.admin(),
                db,
            };
            verify::consistent_cut(&at, &src, &tgt, &list, cx.desired.switchover.pause_timeout)
                .await?;
            let mut compared = |i: usize| {
                crate::failpoint::hit("verify:compared-a-table");
                done += sizes[i];
                done_tables += 1;
                cx.parts.set_live(Some((
                    format!("verifying ({done_tables}/{count} tables)"),
                    Measured::Done { done, total },
                )));
            };
            let report =
                verify::compare(&src, &tgt, &list, cx.desired.verification, &mut compared).await?;
            let _ = tokio::join!(src.batch_execute("COMMIT"), tgt.batch_execute("COMMIT"));
            if !report.mismatches.is_empty() {
                return Err(EngineError::VerificationMismatch {
                    database: db.clone(),
                    mismatches: report.mismatches,
                });
            }
            tables += report.tables;
        }
    }
    for db in &cx.desired.databases {
        let tgt = cx.connect(&target, db).await?;
        let views = tgt
            .query(
                "SELECT schemaname, matviewname FROM pg_matviews WHERE schemaname <> '_pgflip'",
                &[],
            )
            .await?;
        for row in views {
            let (s, n): (String, String) = (row.get(0), row.get(1));
            tgt.batch_execute(&format!("REFRESH MATERIALIZED VIEW {}", qualified(&s, &n)))
                .await?;
        }
        // The whole database, after the views: statistics of what clients will query.
        tgt.batch_execute("ANALYZE").await?;
    }
    Ok(Stepped::Done(Learned::Verified { tables }))
}
