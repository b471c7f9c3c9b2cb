use super::documents::declares_kind;
use super::testing::*;
use super::*;
use pgflip_core::spec::{self, Major};

fn doc(name: &str, major: u32) -> String {
    spec::render(name, Major(major), "")
}

fn source(repo: &Path, file: Option<&str>, cache: &Path) -> GitSource {
    GitSource::open(repo.to_str().unwrap(), BRANCH, file, cache).unwrap()
}

#[tokio::test]
async fn finds_the_only_document() {
    let dir = tempfile::tempdir().unwrap();
    init_repo(dir.path());
    commit_file(
        dir.path(),
        "README.md",
        "kind: BlueGreenDatabase\n",
        "readme",
    );
    commit_file(
        dir.path(),
        "deploy/other.yaml",
        "kind: ConfigMap\nmetadata: {}\n",
        "other",
    );
    let sha = commit_file(dir.path(), "deploy/db.yml", &doc("orders", 15), "db");
    let src = source(dir.path(), None, dir.path());
    assert!(!src.is_remote());
    assert_eq!(src.repo_dir(), dir.path());
    let seen = src.read_head().await.unwrap();
    assert_eq!(seen.commit, sha);
    assert_eq!(seen.document, Ok(doc("orders", 15)));
}

#[tokio::test]
async fn no_document_is_a_failed_observation() {
    let dir = tempfile::tempdir().unwrap();
    init_repo(dir.path());
    let sha = commit_file(
        dir.path(),
        "app.yaml",
        "kind: Deployment\n  kind: BlueGreenDatabase\n",
        "app",
    );
    let seen = source(dir.path(), None, dir.path())
        .read_head()
        .await
        .unwrap();
    assert_eq!(seen.commit, sha);
    let reason = seen.document.unwrap_err();
    assert!(
        reason.starts_with("no BlueGreenDatabase document found"),
        "{reason}"
    );
    assert!(reason.contains(&sha[..7]), "{reason}");
}

#[tokio::test]
async fn several_documents_ask_for_file() {
    let dir = tempfile::tempdir().unwrap();
    init_repo(dir.path());
    commit_file(dir.path(), "a.yaml", &doc("a", 15), "a");
    commit_file(
        dir.path(),
        "sub/b.yml",
        &doc("b", 16).replace("kind: BlueGreenDatabase", "kind: \"BlueGreenDatabase\""),
        "b",
    );
    let seen = source(dir.path(), None, dir.path())
        .read_head()
        .await
        .unwrap();
    let reason = seen.document.unwrap_err();
    assert!(
        reason.contains("a.yaml") && reason.contains("sub/b.yml"),
        "{reason}"
    );
    assert!(reason.contains("--file"), "{reason}");

    let chosen = source(dir.path(), Some("sub/b.yml"), dir.path())
        .read_head()
        .await
        .unwrap();
    assert!(chosen.document.unwrap().contains("name: b\n"));
}

#[tokio::test]
async fn explicit_file_missing_or_not_a_file() {
    let dir = tempfile::tempdir().unwrap();
    init_repo(dir.path());
    let sha = commit_file(dir.path(), "db/db.yaml", &doc("orders", 15), "db");
    let seen = source(dir.path(), Some("db.yaml"), dir.path())
        .read_head()
        .await
        .unwrap();
    assert_eq!(
        seen.document,
        Err(format!("no file db.yaml in commit {}", &sha[..7]))
    );
    let seen = source(dir.path(), Some("db"), dir.path())
        .read_head()
        .await
        .unwrap();
    assert!(seen.document.unwrap_err().contains("is not a file"));
    let seen = source(dir.path(), Some("./db/db.yaml"), dir.path())
        .read_head()
        .await
        .unwrap();
    assert_eq!(seen.document, Ok(doc("orders", 15)));
}

#[tokio::test]
async fn large_yaml_is_not_scanned() {
    let dir = tempfile::tempdir().unwrap();
    init_repo(dir.path());
    let big = format!("{}# {}\n", doc("big", 15), "x".repeat(MAX_SCANNED_BLOB));
    commit_file(dir.path(), "big.yaml", &big, "big");
    commit_file(dir.path(), "db.yaml", &doc("orders", 16), "db");
    let seen = source(dir.path(), None, dir.path())
        .read_head()
        .await
        .unwrap();
    assert_eq!(seen.document, Ok(doc("orders", 16)));
}

#[tokio::test]
async fn new_commit_and_revert_are_observed() {
    let dir = tempfile::tempdir().unwrap();
    init_repo(dir.path());
    let first = commit_file(dir.path(), "db.yaml", &doc("orders", 15), "15");
    let src = source(dir.path(), None, dir.path());
    assert_eq!(src.read_head().await.unwrap().commit, first);
    let second = commit_file(dir.path(), "db.yaml", &doc("orders", 16), "16");
    let seen = src.read_head().await.unwrap();
    assert_ne!(second, first);
    assert_eq!(
        seen,
        Head {
            commit: second.clone(),
            document: Ok(doc("orders", 16))
        }
    );
    let third = revert(dir.path(), &second);
    let seen = src.read_head().await.unwrap();
    assert_eq!(
        seen,
        Head {
            commit: third.clone(),
            document: Ok(doc("orders", 15))
        }
    );
    // The work tree follows the revert, so later commits build on it.
    let fourth = commit_file(dir.path(), "notes.txt", "x", "unrelated");
    let seen = src.read_head().await.unwrap();
    assert_eq!(
        seen,
        Head {
            commit: fourth,
            document: Ok(doc("orders", 15))
        }
    );
}

#[tokio::test]
async fn bare_repository_path_is_read_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    init_repo(&work);
    let sha = commit_file(&work, "db.yaml", &doc("orders", 15), "15");
    let bare2 = dir.path().join("bare2.git");
    git2::build::RepoBuilder::new()
        .bare(true)
        .clone(&format!("file://{}", work.display()), &bare2)
        .unwrap();
    let seen = source(&bare2, None, dir.path()).read_head().await.unwrap();
    assert_eq!(seen.commit, sha);
    assert_eq!(seen.document, Ok(doc("orders", 15)));
}

#[tokio::test]
async fn repository_errors_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let err = GitSource::open(
        dir.path().join("nope").to_str().unwrap(),
        BRANCH,
        None,
        dir.path(),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("cannot open Git repository"),
        "{err}"
    );
    assert!(GitSource::open(dir.path().to_str().unwrap(), "a:b", None, dir.path()).is_err());

    let work = dir.path().join("work");
    init_repo(&work);
    commit_file(&work, "db.yaml", &doc("orders", 15), "15");
    let src = GitSource::open(work.to_str().unwrap(), "release", None, dir.path()).unwrap();
    let err = src.read_head().await.unwrap_err();
    assert!(
        err.to_string().contains("branch \"release\" not found"),
        "{err}"
    );
}

#[tokio::test]
async fn url_is_cloned_and_fetched_on_every_observation() {
    let dir = tempfile::tempdir().unwrap();
    let remote = dir.path().join("remote.git");
    Repository::init_bare(&remote).unwrap();
    let work = dir.path().join("work");
    init_repo(&work);
    let first = commit_file(&work, "db.yaml", &doc("orders", 15), "15");
    push(&work, &remote);

    let url = format!("file://{}", remote.display());
    let cache = dir.path().join("cache");
    let src = GitSource::open(&url, BRANCH, None, &cache).unwrap();
    assert!(src.is_remote());
    assert!(src.repo_dir().starts_with(&cache));
    assert!(
        src.repo_dir()
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("remote-")
    );
    assert_eq!(src.remote_url(), Some(url.as_str()));
    assert_eq!(
        src.read_head().await.unwrap(),
        Head {
            commit: first.clone(),
            document: Ok(doc("orders", 15))
        }
    );

    let second = commit_file(&work, "db.yaml", &doc("orders", 16), "16");
    // Not pushed yet: the remote, not the work tree, is what is observed.
    assert_eq!(src.read_head().await.unwrap().commit, first);
    push(&work, &remote);
    assert_eq!(
        src.read_head().await.unwrap(),
        Head {
            commit: second.clone(),
            document: Ok(doc("orders", 16))
        }
    );

    // A second source on the same cache reuses the clone.
    let again = GitSource::open(&url, BRANCH, None, &cache).unwrap();
    assert_eq!(again.repo_dir(), src.repo_dir());
    assert_eq!(again.read_head().await.unwrap().commit, second);
    let origin = Repository::open_bare(src.repo_dir())
        .unwrap()
        .find_remote("origin")
        .unwrap()
        .url()
        .map(str::to_string);
    assert_eq!(origin.as_deref(), Some(url.as_str()));

    // A branch deleted on the remote is an error, not its last known head.
    Repository::open_bare(&remote)
        .unwrap()
        .find_reference("refs/heads/main")
        .unwrap()
        .delete()
        .unwrap();
    let err = src.read_head().await.unwrap_err();
    assert!(
        err.to_string().contains("branch \"main\" not found"),
        "{err}"
    );
}

#[tokio::test]
async fn unreachable_url_is_an_error_without_credentials() {
    let dir = tempfile::tempdir().unwrap();
    // Port 9 (discard) on localhost: nothing listens, the connection is refused.
    let url = "http://bob:s3cret@127.0.0.1:9/repo.git";
    let src = GitSource::open(url, BRANCH, None, dir.path()).unwrap();
    let err = format!("{:#}", src.read_head().await.unwrap_err());
    assert!(err.contains("http://***@127.0.0.1:9/repo.git"), "{err}");
    assert!(!err.contains("s3cret") && !err.contains("bob"), "{err}");
    assert!(!format!("{src:?}").contains("s3cret"));
    let config = std::fs::read_to_string(src.repo_dir().join("config")).unwrap();
    assert!(
        config.contains("http://127.0.0.1:9/repo.git") && !config.contains("s3cret"),
        "{config}"
    );
}

#[test]
fn kind_line_forms() {
    assert!(declares_kind("a: 1\nkind: BlueGreenDatabase\n"));
    assert!(declares_kind("kind: 'BlueGreenDatabase'  # ours\r\n"));
    assert!(!declares_kind("  kind: BlueGreenDatabase\n"));
    assert!(!declares_kind("kind: BlueGreenDatabases\n"));
}

#[tokio::test]
async fn finds_a_document_by_name_under_a_kustomization_path() {
    let dir = tempfile::tempdir().unwrap();
    init_repo(dir.path());
    let namespace = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n";
    commit_file(
        dir.path(),
        "gitops/databases/orders.yaml",
        &format!("{namespace}---\n{}", doc("orders", 15)),
        "orders",
    );
    commit_file(
        dir.path(),
        "gitops/databases/users.yaml",
        &doc("users", 16),
        "users",
    );
    // The same name outside the path is not the Kustomization's.
    let sha = commit_file(dir.path(), "elsewhere/users.yaml", &doc("users", 17), "x");
    let under = |name: &str| source(dir.path(), None, dir.path()).named("./gitops/databases", name);
    let users = under("users")
        .read_ref(&format!("refs/heads/{BRANCH}"))
        .await
        .unwrap();
    assert_eq!(users.commit, sha);
    assert_eq!(users.document, Ok(doc("users", 16)));
    // A document among others in a multi-document file.
    let orders = under("orders").read_head().await.unwrap();
    assert_eq!(orders.document, Ok(doc("orders", 15)));
    let missing = under("billing").read_head().await.unwrap();
    assert_eq!(
        missing.document,
        Err(format!(
            "no BlueGreenDatabase named \"billing\" under gitops/databases in commit {}",
            &sha[..7]
        ))
    );
    // The whole repository: both `users` are found, which is an error.
    let both = source(dir.path(), None, dir.path())
        .named(".", "users")
        .read_head()
        .await
        .unwrap();
    let reason = both.document.unwrap_err();
    assert!(
        reason.starts_with("several BlueGreenDatabase documents named \"users\" under . in"),
        "{reason}"
    );
    assert!(reason.contains("elsewhere/users.yaml"), "{reason}");
}
