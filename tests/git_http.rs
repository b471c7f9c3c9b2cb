//! The loopback Git server the Flux end-to-end fetches from: a real `git clone` and
//! `git fetch` over smart HTTP see every commit pushed to the served repository.

mod common;

use common::git_http::git;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_clones_and_fetches_over_smart_http() {
    let dir = tempfile::tempdir().unwrap();
    let served = dir.path().join("served");
    std::fs::create_dir_all(&served).unwrap();
    git(&served, &["init", "--bare", "-q", "db.git"]);
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    git(&work, &["init", "-q"]);
    std::fs::write(work.join("database.yaml"), "version: \"15\"\n").unwrap();
    git(&work, &["add", "."]);
    git(&work, &["commit", "-q", "-m", "first"]);
    let remote = served.join("db.git");
    git(
        &work,
        &[
            "push",
            "-q",
            remote.to_str().unwrap(),
            "HEAD:refs/heads/main",
        ],
    );

    let server = common::git_http::GitHttp::start(&served).await;
    let url = format!("{}/db.git", server.url);
    let clone = dir.path().join("clone");
    let d = dir.path().to_path_buf();
    let u = url.clone();
    tokio::task::spawn_blocking(move || git(&d, &["clone", "-q", &u, "clone"]))
        .await
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(clone.join("database.yaml")).unwrap(),
        "version: \"15\"\n"
    );

    std::fs::write(work.join("database.yaml"), "version: \"16\"\n").unwrap();
    git(&work, &["commit", "-q", "-am", "bump"]);
    git(
        &work,
        &[
            "push",
            "-q",
            remote.to_str().unwrap(),
            "HEAD:refs/heads/main",
        ],
    );
    let head = git(&work, &["rev-parse", "HEAD"]);
    let c = clone.clone();
    let fetched = tokio::task::spawn_blocking(move || {
        git(&c, &["fetch", "-q", "origin"]);
        git(&c, &["rev-parse", "origin/main"])
    })
    .await
    .unwrap();
    assert_eq!(fetched, head, "the fetch sees the pushed commit");
    let advertised =
        tokio::task::spawn_blocking(move || git(&std::env::temp_dir(), &["ls-remote", &url]))
            .await
            .unwrap();
    assert!(
        advertised.contains(&format!("{head}\trefs/heads/main")),
        "{advertised}"
    );
}
