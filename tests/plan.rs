//! Plans on pull requests and progress in bytes: `pgflip local` with a forge lists the
//! open pull requests (a stand-in API on loopback), plans each head against the running
//! database without touching it, and posts `pgflip/plan/<name>`; a copy reports bytes,
//! rate and time left that hold up.

mod common;

use common::forge::FakeForge;
use common::{Harness, MINUTE};
use pgflip_core::report::{State, Update};
use pgflip_engine::adapters::forge_status::{ForgeConfig, ForgeStatus, Provider};
use pgflip_engine::pg::connect;
use serde_json::json;
use std::time::Duration;

const PULLS: &str = "/repos/shop/db/pulls?state=open&per_page=100";

/// The plan statuses posted on `sha`: (state, description).
fn plan_statuses(forge: &FakeForge, sha: &str) -> Vec<(String, String)> {
    forge
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path == format!("/repos/shop/db/statuses/{sha}"))
        .filter(|r| r.body["context"] == "pgflip/plan/testdb")
        .map(|r| {
            (
                r.body["state"].as_str().unwrap().to_string(),
                r.body["description"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

async fn wait_plan(h: &Harness, forge: &FakeForge, sha: &str) -> ((String, String), Update) {
    let started = std::time::Instant::now();
    loop {
        if let Some(status) = plan_statuses(forge, sha).pop() {
            let note = h
                .notes(sha)
                .into_iter()
                .rfind(|u| u.phase == "plan")
                .expect("the plan is noted on the head too");
            return (status, note);
        }
        assert!(
            started.elapsed() < 2 * MINUTE,
            "no plan on {sha}:\n{}",
            h.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What would show that the plan touched blue: replication objects, pgflip's schema, a
/// green instance, an attempt.
async fn assert_untouched(h: &Harness) {
    assert_eq!(
        h.replication_objects("blue", "app").await,
        Vec::<String>::new()
    );
    assert!(!h.instance_exists("green"), "a plan created green");
    let r = h.record();
    assert!(
        r.attempt.is_none(),
        "a plan started an attempt: {:?}",
        r.attempt
    );
    assert_eq!(r.serving.unwrap().major.0, 15);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_request_gets_a_plan_that_refuses_then_passes_and_touches_nothing() {
    let forge = FakeForge::start().await;
    let mut h = Harness::new("databases: [app]");
    h.report_to_github(&forge, "forge-t0ken");
    h.extra_args
        .extend(["--plan-every", "300ms"].map(String::from));
    forge.list(PULLS, json!([]));
    let main = h.commit_version(15);
    h.start(None);
    h.wait("bootstrap", MINUTE, |r| r.serving.is_some()).await;
    let admin = h.admin();
    let app = connect(&h.endpoint(), &admin, "app").await.unwrap();
    app.batch_execute(
        "CREATE TABLE orders (id bigserial PRIMARY KEY, item text NOT NULL);
         INSERT INTO orders (item) SELECT 'item ' || g FROM generate_series(1, 20000) g;
         CREATE UNLOGGED TABLE cache (k int PRIMARY KEY, v text);",
    )
    .await
    .unwrap();

    // A pull request into main that bumps the version: refused, naming the table.
    let bump = common::commit_onto(&h.repo, "refs/pull/1/head", &main, &h.document(17));
    let pull = |head: &str| json!([{"number": 1, "head": {"sha": head, "ref": "bump"}, "base": {"ref": "main"}}]);
    forge.list(PULLS, pull(&bump));
    let ((state, description), note) = wait_plan(&h, &forge, &bump).await;
    assert_eq!(state, "failure", "{description}");
    assert!(description.contains("public.cache"), "{description}");
    assert_eq!(note.state, State::Failure);
    let report = note.report.expect("a readable report");
    assert!(report.contains("verdict: REFUSED"), "{report}");
    assert!(report.contains("refused: app: unlogged tables"), "{report}");
    assert!(report.contains("upgrade 15 → 17"), "{report}");
    assert_untouched(&h).await;

    // Fixed on the database, pushed again: a new head, planned again, now a success
    // with the sizes and an estimate.
    app.batch_execute("ALTER TABLE cache SET LOGGED")
        .await
        .unwrap();
    let fixed = common::commit_onto(&h.repo, "refs/pull/1/head", &bump, &h.document(17));
    forge.list(PULLS, pull(&fixed));
    let ((state, description), note) = wait_plan(&h, &forge, &fixed).await;
    assert_eq!(state, "success", "{description}");
    assert!(
        description.contains(": upgrade 15 → 17, physical copy, 2 tables, "),
        "{description}"
    );
    assert!(description.contains("2 tables"), "{description}");
    assert!(description.contains("about "), "{description}");
    let report = note.report.expect("a readable report");
    assert!(report.contains("verdict: would go ahead"), "{report}");
    assert!(report.contains("database app: 2 tables, "), "{report}");
    assert!(report.contains("estimate: about "), "{report}");
    assert!(report.contains("way back: git revert within"), "{report}");
    assert_untouched(&h).await;
    // Each head is planned once, and the branch's own head (nothing to change) not at all.
    assert_eq!(plan_statuses(&forge, &fixed).len(), 1);
    assert_eq!(plan_statuses(&forge, &main).len(), 0);
    let log = h.log_tail();
    assert!(!log.contains("forge-t0ken"), "the token is not logged");

    // `pgflip plan`, for a CI job on this host: the same verdict, its exit code says it.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgflip"))
        .args(["plan", "--repo"])
        .arg(&h.repo)
        .args([
            "--ref",
            "refs/pull/1/head",
            "--file",
            "db/database.yaml",
            "--state-dir",
        ])
        .arg(&h.state.root)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("database app: 2 tables"), "{stdout}");
    assert_untouched(&h).await;
}

/// Listing pull requests as each forge has it, through the same client as the statuses.
#[tokio::test]
async fn each_forge_is_asked_for_its_open_pull_requests() {
    let forge = FakeForge::start().await;
    let sink = |provider, api: &str| {
        ForgeStatus::new(ForgeConfig {
            provider,
            api: format!("{}{api}", forge.url),
            repository: "shop/db".into(),
            token: "t0ken".into(),
            context: "pgflip/testdb".into(),
        })
        .unwrap()
    };
    forge.list(
        PULLS,
        json!([{"number": 4, "head": {"sha": "aaa"}, "base": {"ref": "main"}}]),
    );
    forge.list(
        "/api/v1/repos/shop/db/pulls?state=open&limit=50",
        json!([{"number": 5, "head": {"sha": "bbb"}, "base": {"ref": "main"}}]),
    );
    forge.list(
        "/api/v4/projects/shop%2Fdb/merge_requests?state=opened&per_page=100",
        json!([{"iid": 6, "sha": "ccc", "target_branch": "main"},
               {"iid": 7, "sha": "ddd", "target_branch": "other"}]),
    );
    let github = sink(Provider::Github, "")
        .open_pull_requests("main")
        .await
        .unwrap();
    let gitea = sink(Provider::Gitea, "/api/v1")
        .open_pull_requests("main")
        .await
        .unwrap();
    let gitlab = sink(Provider::Gitlab, "/api/v4")
        .open_pull_requests("main")
        .await
        .unwrap();
    assert_eq!((github[0].number, github[0].head.as_str()), (4, "aaa"));
    assert_eq!(github[0].git_ref, "refs/pull/4/head");
    assert_eq!((gitea[0].number, gitea[0].head.as_str()), (5, "bbb"));
    assert_eq!(gitlab.len(), 1);
    assert_eq!(gitlab[0].git_ref, "refs/merge-requests/6/head");
    let auth: Vec<(String, Option<String>, Option<String>)> = forge
        .requests()
        .into_iter()
        .map(|r| {
            (
                r.path,
                r.headers.get("authorization").cloned(),
                r.headers.get("private-token").cloned(),
            )
        })
        .collect();
    assert_eq!(auth[0].1.as_deref(), Some("Bearer t0ken"));
    assert_eq!(auth[1].1.as_deref(), Some("token t0ken"));
    assert_eq!(auth[2].2.as_deref(), Some("t0ken"));
    // A forge that refuses is an error that says so, not an empty list.
    forge.answer_with(&[404]);
    let refusing = sink(Provider::Github, "/nowhere");
    let err = refusing.open_pull_requests("main").await.unwrap_err();
    assert!(format!("{err:#}").contains("refused to list"), "{err:#}");
}

/// A logical copy of a few hundred MB: the figures in the notes (and so the statuses) only
/// grow, end at the total, and the time left they gave landed within a factor of two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_reports_bytes_that_grow_to_the_total_and_a_time_left_that_holds() {
    let mut h = Harness::new("databases: [app]\ncopy: logical");
    h.commit_version(15);
    h.start(None);
    h.wait("bootstrap", MINUTE, |r| r.serving.is_some()).await;
    let app = connect(&h.endpoint(), &h.admin(), "app").await.unwrap();
    // ~620 MB: a copy of several seconds at this machine's 110–130 MB/s, so that reports
    // (every 2 s) fall while most of it is still ahead.
    common::add_big_table(&app, 600000).await;
    let up = h.commit_version(17);
    h.wait("the attempt", MINUTE, |r| r.attempt.is_some()).await;
    // Someone watching from another terminal (here a pipe: lines, not a bar).
    let watching = std::process::Command::new(env!("CARGO_BIN_EXE_pgflip"))
        .args(["status", "--watch", "--state-dir"])
        .arg(&h.state.root)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    h.wait_switched("upgrade", 1, &up, (pgflip_core::plan::Color::Green, 17))
        .await;
    let watched = watching.wait_with_output().unwrap();
    let watched = String::from_utf8_lossy(&watched.stdout);
    assert!(
        watched.contains(": initial-sync: ") && watched.contains(" MB of "),
        "the watch showed no bytes:\n{watched}"
    );
    assert!(
        watched.contains("serving:  green (PostgreSQL 17)"),
        "it ends with the status:\n{watched}"
    );
    let at = |u: &Update| humantime::parse_rfc3339(&u.at).unwrap();
    let copy: Vec<Update> = h
        .notes(&up)
        .into_iter()
        .filter(|u| u.phase == "initial-sync" && u.progress.is_some())
        .collect();
    let figures: Vec<_> = copy.iter().map(|u| u.progress.unwrap()).collect();
    let shown: Vec<String> = copy
        .iter()
        .map(|u| format!("{} {}", u.at, u.message))
        .collect();
    assert!(figures.len() >= 2, "too few progress reports: {shown:#?}");
    let total = figures.last().unwrap().total_bytes;
    assert!(total > 200_000_000, "the table's size: {total}");
    assert_eq!(figures.last().unwrap().done_bytes, total, "{shown:#?}");
    assert!(
        figures
            .windows(2)
            .all(|w| w[0].done_bytes <= w[1].done_bytes),
        "bytes done went back: {shown:#?}"
    );
    // The time left said while the copy was under way, against what it took.
    let ended = at(copy.last().unwrap());
    let (said, when) = copy
        .iter()
        .find_map(|u| {
            let p = u.progress.unwrap();
            // Any figure said while most of the copy was still ahead (reports come every
            // 2 s, and this copy takes several).
            (p.percent() > 2.0 && p.percent() < 95.0)
                .then_some(p.seconds_left)
                .flatten()
                .map(|s| (s, at(u)))
        })
        .unwrap_or_else(|| panic!("no time left said mid-copy: {shown:#?}"));
    let took = ended.duration_since(when).unwrap().as_secs_f64();
    // Within a factor of two, give or take half a second (the passes that see the copy
    // end come every 250 ms, so a second or less left cannot be timed finer).
    assert!(
        took <= 2.0 * said + 0.5 && said <= 2.0 * took + 0.5,
        "said {said:.1}s left, took {took:.1}s: {shown:#?}"
    );
    // The verification (one long pass over every table) reports its bytes as it goes, and
    // ends with all of them: the tables' size on blue, the big one included.
    let verified: Vec<_> = h
        .notes(&up)
        .into_iter()
        .filter(|u| u.phase == "verify")
        .filter_map(|u| u.progress.map(|p| (u.message, p)))
        .collect();
    let (last_message, last) = verified
        .last()
        .unwrap_or_else(|| panic!("the verification reported no bytes: {:#?}", h.notes(&up)));
    assert!(
        last.total_bytes > 200_000_000 && last.done_bytes == last.total_bytes,
        "{last_message}: {last:?}"
    );
    assert!(
        verified
            .windows(2)
            .all(|w| w[0].1.done_bytes <= w[1].1.done_bytes),
        "verified bytes went back: {verified:#?}"
    );
}
