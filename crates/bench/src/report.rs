//! The benchmark's files: the JSON with every figure, a Markdown summary and the plots.

use super::BenchResult;
use super::strategies::Measured;
use std::fmt::Write;
use std::path::{Path, PathBuf};

/// Writes `<out>/<date>-<host>.json`, `.md` and the PNG plots; returns their paths.
pub fn write(result: &BenchResult, out: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(out)?;
    let stem = format!("{}-{}", &result.date[..10], result.host);
    let json = out.join(format!("{stem}.json"));
    std::fs::write(&json, serde_json::to_string_pretty(result)?)?;
    let md = out.join(format!("{stem}.md"));
    std::fs::write(&md, markdown(result))?;
    let mut written = vec![json, md];
    written.extend(super::plot::draw(result, out, &stem)?);
    Ok(written)
}

pub fn markdown(r: &BenchResult) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "PostgreSQL {} → {}, pgbench (TPC-B-like) at {} tx/s with {} clients through PgBouncer, on {} ({}).\n",
        r.from, r.to, r.rate_tps, r.clients, r.host, r.date
    );
    // pgbench's own schema, unchanged: pgflip's preflight decides what to do with it.
    let _ = writeln!(
        s,
        "pgbench_history has no primary key and only receives INSERTs: pgflip carries it with \
         REPLICA IDENTITY FULL (a preflight warning), the data is pgbench's own, unchanged.\n"
    );
    let _ = writeln!(
        s,
        "| size | strategy | downtime seen by clients (ms) | p99 around it (ms) | longest gap without a commit (ms) | failed transactions | lost commits |"
    );
    let _ = writeln!(s, "|---:|---|---:|---:|---:|---:|---:|");
    for size in &r.sizes {
        for (name, m) in [
            ("pgflip", &size.pgflip),
            ("conventional (dump/restore)", &size.conventional),
            ("in-place (pg_upgrade --link)", &size.in_place),
        ] {
            let _ = writeln!(
                s,
                "| {} MB | {name} | {:.1} | {:.1} | {:.1} | {} | {} |",
                size.size_mb,
                m.downtime_ms,
                m.clients.p99_latency_ms,
                m.clients.longest_gap_ms,
                m.failed_transactions,
                m.lost_commits
            );
        }
    }
    let _ = writeln!(
        s,
        "\n| size | pause / rollback pause (ms) | rollback seen by clients (ms) | whole attempt: max latency · longest gap (ms) | drain · fence · catch-up · sequences · reverse slot · repoint (ms) | × conventional | × in-place | initial sync (MB/s) vs dump\\|restore | verify (MB/s) vs plain scan | controller peak RSS (MiB, VmHWM of `pgflip local`) |"
    );
    let _ = writeln!(s, "|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|");
    for size in &r.sizes {
        let Some(p) = &size.pgflip.pgflip else {
            continue;
        };
        let b = &p.pause_breakdown;
        let _ = writeln!(
            s,
            "| {} MB | {:.1} / {:.1} | {:.1} | {:.0} · {:.0} | {:.1} · {:.1} · {:.1} · {:.1} · {:.1} · {:.1} | {:.0}× | {:.0}× | {:.1} vs {} | {:.1} vs {:.1} | {} |",
            size.size_mb,
            p.pause_ms,
            p.rollback_pause_ms,
            p.rollback_downtime_ms,
            p.whole_attempt.max_latency_ms,
            p.whole_attempt.longest_gap_ms,
            b.drain_ms,
            b.fence_ms,
            b.catch_up_ms,
            b.sequences_ms,
            b.reverse_setup_ms,
            b.repoint_resume_ms,
            p.ratio_vs_conventional.unwrap_or(0.0),
            p.ratio_vs_in_place.unwrap_or(0.0),
            p.initial_sync_mb_s,
            rate(&size.conventional),
            p.verify_mb_s,
            p.sequential_scan_mb_s,
            p.controller_peak_rss_mib
                .map_or("n/a".to_string(), |m| format!("{m:.1}")),
        );
    }
    let _ = writeln!(
        s,
        "\n| size | pgflip's slowest transaction, upgrade (ms, in phase) | and rollback (ms, in phase) |"
    );
    let _ = writeln!(s, "|---:|---|---|");
    for size in &r.sizes {
        let Some(p) = &size.pgflip.pgflip else {
            continue;
        };
        let _ = writeln!(
            s,
            "| {} MB | {:.1} in {} | {:.1} in {} |",
            size.size_mb,
            p.worst_stall.latency_ms,
            p.worst_stall.phase,
            p.rollback_worst_stall.latency_ms,
            p.rollback_worst_stall.phase
        );
    }
    let _ = writeln!(
        s,
        "\n| size | initial copy: {} · dump\\|restore (s, MB/s) |",
        copy_methods(r).join(" · ")
    );
    let _ = writeln!(s, "|---:|---|");
    for size in &r.sizes {
        let mut cells: Vec<String> = size
            .pgflip_runs()
            .filter_map(|m| m.pgflip.as_ref())
            .map(|p| format!("{:.1} s, {:.1} MB/s", p.initial_sync_s, p.initial_sync_mb_s))
            .collect();
        cells.push(
            match (
                size.conventional.dump_restore_s,
                size.conventional.dump_restore_mb_s,
            ) {
                (Some(secs), Some(rate)) => format!("{secs:.1} s, {rate:.1} MB/s"),
                _ => "n/a".into(),
            },
        );
        let _ = writeln!(s, "| {} MB | {} |", size.size_mb, cells.join(" · "));
    }
    s
}

/// The copy methods pgflip ran with, headline first (`auto` resolved to what it chose).
pub fn copy_methods(r: &BenchResult) -> Vec<String> {
    r.sizes
        .first()
        .map(|size| {
            size.pgflip_runs()
                .filter_map(|m| m.pgflip.as_ref())
                .map(|p| p.copy_method.clone())
                .collect()
        })
        .unwrap_or_default()
}

fn rate(m: &Measured) -> String {
    m.dump_restore_mb_s
        .map_or("n/a".into(), |r| format!("{r:.1}"))
}
