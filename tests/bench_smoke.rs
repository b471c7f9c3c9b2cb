//! A tiny run of the benchmark harness (smallest data, low rate), to keep it working: every
//! strategy runs for real, and the files it writes hold the figures the README quotes.
//! The numbers themselves are measured by `make bench`, not asserted here.

use std::process::Command;

#[test]
fn quick_bench_writes_every_figure() {
    let dir = tempfile::Builder::new()
        .prefix("pgflip-bench-")
        .tempdir()
        .unwrap();
    let json = dir.path().join("quick.json");
    let out = Command::new(env!("CARGO_BIN_EXE_pgflip"))
        .args([
            "bench",
            "--quick",
            "--sizes",
            "15MB,1GB",
            "--rate",
            "100",
            "--clients",
            "2",
            "--copy",
            "physical,logical",
        ])
        .arg("--out")
        .arg(dir.path().join("results"))
        .arg("--work")
        .arg(dir.path().join("work"))
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(
        v["sizes"].as_array().unwrap().len(),
        1,
        "--quick runs the smallest size only"
    );
    for strategy in ["pgflip", "conventional", "in_place"] {
        let s = &v[strategy];
        assert!(s["downtime_ms"].as_f64().unwrap() > 0.0, "{strategy}: {s}");
        assert_eq!(s["lost_commits"], 0, "{strategy}: {s}");
        assert!(
            s["clients"]["transactions"].as_u64().unwrap() > 0,
            "{strategy}: {s}"
        );
    }
    let p = &v["pgflip"];
    assert_eq!(p["failed_transactions"], 0, "{p}");
    for key in [
        "pause_ms",
        "rollback_pause_ms",
        "initial_sync_mb_s",
        "verify_mb_s",
        "sequential_scan_mb_s",
        "ratio_vs_conventional",
        "ratio_vs_in_place",
        "controller_peak_rss_mib",
    ] {
        assert!(p[key].as_f64().unwrap() > 0.0, "{key}: {p}");
    }
    assert!(v["conventional"]["stop_to_resume_ms"].as_f64().unwrap() > 0.0);
    // Two copy methods: the headline is the first, the other beside it, both timed.
    assert_eq!(p["copy_method"], "physical", "{p}");
    let others = v["sizes"][0]["pgflip_other_copies"].as_array().unwrap();
    assert_eq!(others.len(), 1, "{others:?}");
    assert_eq!(others[0]["copy_method"], "logical", "{others:?}");
    for run in [p, &others[0]] {
        assert!(run["initial_sync_s"].as_f64().unwrap() > 0.0, "{run}");
        assert_eq!(run["lost_commits"], 0, "{run}");
    }
    assert!(
        v["sizes"][0]["conventional"]["dump_restore_s"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    // Each slow transaction is put down to the phase it waited in, from the phase timeline.
    let timeline = p["phase_timeline"].as_array().unwrap();
    assert!(
        timeline.iter().any(|m| m["phase"] == "switchover"),
        "{timeline:?}"
    );
    for stall in ["worst_stall", "rollback_worst_stall"] {
        assert!(
            p[stall]["phase"].as_str().is_some_and(|s| !s.is_empty()),
            "{stall}: {p}"
        );
    }
    assert!(p["rollback_timings_ms"]["verify"].as_u64().is_some(), "{p}");
    let results: Vec<_> = std::fs::read_dir(dir.path().join("results"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    for ext in ["json", "md", "png"] {
        assert!(
            results
                .iter()
                .any(|p| p.extension().is_some_and(|e| e == ext)),
            "no .{ext} in {results:?}"
        );
    }
    for png in results
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
    {
        assert!(
            std::fs::read(png).unwrap().starts_with(b"\x89PNG"),
            "{}",
            png.display()
        );
    }
    assert!(
        results
            .iter()
            .any(|p| p.to_string_lossy().ends_with("-initial-copy.png")),
        "no initial copy plot in {results:?}"
    );
    for run in [
        "pgflip-physical",
        "pgflip-logical",
        "conventional",
        "in-place",
    ] {
        assert!(
            !dir.path().join(format!("work/{run}-15mb")).exists(),
            "each environment is removed after its run: {run}"
        );
    }
}
