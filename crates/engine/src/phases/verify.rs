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
use crate::{prewarm, verify};
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
        warm(cx, db, &tgt).await?;
    }
    Ok(Stepped::Done(Learned::Verified { tables }))
}

/// Reads what is hot on the source into the target's cache ([`crate::prewarm`]), each
/// database its share of three quarters of the target's shared buffers. Never fails the
/// switch: a cold green is slower for a moment, not wrong.
async fn warm<I: Instances, R: Router>(
    cx: &Ctx<'_, I, R>,
    db: &str,
    tgt: &tokio_postgres::Client,
) -> EngineResult<()> {
    let src = cx.connect(&cx.source, db).await?;
    let shared: i64 = tgt
        .query_one(
            "SELECT pg_size_bytes(current_setting('shared_buffers'))",
            &[],
        )
        .await?
        .get(0);
    let budget = shared.max(0) as u64 * 3 / 4 / cx.desired.databases.len().max(1) as u64;
    match prewarm::warm(&src, tgt, budget).await {
        Ok(Some(w)) => tracing::info!(
            database = %db,
            relations = w.relations,
            "warmed {} of {}'s cache",
            pgflip_core::progress::bytes(w.bytes),
            cx.attempt.to
        ),
        Ok(None) => {
            tracing::info!(database = %db, "pg_prewarm is not installed for {}: not warmed", cx.attempt.to)
        }
        Err(e) => {
            tracing::warn!(database = %db, error = %format!("{e:#}"), "could not warm {}'s cache", cx.attempt.to)
        }
    }
    Ok(())
}
