use super::*;
use crate::adapters::git_source::GitSource;
use crate::adapters::git_source::testing::{commit_file, init_repo, push as push_branch};
use pgflip_core::report::State;

fn commit(sha: &str) -> Revision {
    Revision::commit(sha).unwrap()
}

fn update(state: State, phase: &str, message: &str) -> Update {
    Update::new(state, phase, message).between(15, 16)
}

/// A work repository with one commit, pushed to a bare "remote"; returns the sha.
fn remote_with_commit(dir: &Path) -> (PathBuf, PathBuf, String) {
    let work = dir.join("work");
    let remote = dir.join("remote.git");
    init_repo(&work);
    Repository::init_bare(&remote).unwrap();
    let sha = commit_file(&work, "db.yaml", "kind: BlueGreenDatabase\n", "db");
    push_branch(&work, &remote);
    (work, remote, sha)
}

/// The clone pgflip makes of `remote` (through GitSource, as local mode does).
async fn clone_of(remote: &Path, cache: &Path) -> PathBuf {
    let url = format!("file://{}", remote.display());
    let src = GitSource::open(&url, "main", None, cache).unwrap();
    src.read_head().await.unwrap();
    src.repo_dir()
}

#[tokio::test]
async fn entries_append_in_order_with_the_human_line_first() {
    let dir = tempfile::tempdir().unwrap();
    init_repo(dir.path());
    let sha = commit_file(dir.path(), "db.yaml", "x", "one");
    let other = commit_file(dir.path(), "db.yaml", "y", "two");
    let sink = GitNotes::new(dir.path().to_path_buf(), None);
    assert_eq!(GitNotes::read(dir.path(), &sha).unwrap(), vec![]);
    let first = update(State::Pending, "preflight", "checking");
    let second = update(State::Success, "done", "switched in 12 ms");
    sink.publish(&commit(&sha), &first).await.unwrap();
    sink.publish(&commit(&sha), &second).await.unwrap();
    assert_eq!(
        GitNotes::read(dir.path(), &sha).unwrap(),
        vec![first.clone(), second.clone()]
    );
    assert_eq!(GitNotes::read(dir.path(), &other).unwrap(), vec![]);
    let text = GitNotes::read_text(dir.path(), &sha).unwrap();
    assert!(
        text.starts_with("pgflip: pending [preflight] 15 → 16: checking\n{"),
        "{text}"
    );
    assert_eq!(
        text,
        format!("{}{}", first.note_entry(), second.note_entry())
    );

    // Plain git sees them under the pgflip notes ref, written by pgflip.
    let repo = Repository::open(dir.path()).unwrap();
    let tip = repo
        .find_reference(NOTES_REF)
        .unwrap()
        .peel_to_commit()
        .unwrap();
    assert_eq!(tip.author().email(), Some("pgflip@localhost"));
    assert_eq!(tip.parent_count(), 1);
}

#[tokio::test]
async fn concurrent_publishes_are_all_kept() {
    let dir = tempfile::tempdir().unwrap();
    init_repo(dir.path());
    let sha = commit_file(dir.path(), "db.yaml", "x", "one");
    let sink = Arc::new(GitNotes::new(dir.path().to_path_buf(), None));
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let sink = sink.clone();
            let sha = sha.clone();
            tokio::spawn(async move {
                sink.publish(
                    &commit(&sha),
                    &update(State::Pending, "initial-sync", &format!("step {i}")),
                )
                .await
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let mut messages: Vec<String> = GitNotes::read(dir.path(), &sha)
        .unwrap()
        .into_iter()
        .map(|u| u.message)
        .collect();
    messages.sort();
    assert_eq!(
        messages,
        (0..8).map(|i| format!("step {i}")).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn notes_are_pushed_to_the_remote() {
    let dir = tempfile::tempdir().unwrap();
    let (_work, remote, sha) = remote_with_commit(dir.path());
    let clone = clone_of(&remote, &dir.path().join("cache")).await;
    let sink = GitNotes::new(clone.clone(), Some("origin".into()));
    let first = update(State::Pending, "provision", "starting green");
    sink.publish(&commit(&sha), &first).await.unwrap();
    assert_eq!(GitNotes::read(&remote, &sha).unwrap(), vec![first.clone()]);
    // By URL too (how credentials reach the push).
    let by_url = GitNotes::new(clone.clone(), Some(format!("file://{}", remote.display())));
    let second = update(State::Success, "done", "done");
    by_url.publish(&commit(&sha), &second).await.unwrap();
    assert_eq!(GitNotes::read(&remote, &sha).unwrap(), vec![first, second]);
    let remote_repo = Repository::open_bare(&remote).unwrap();
    assert_eq!(
        remote_repo.refname_to_id(NOTES_REF).unwrap(),
        Repository::open(&clone)
            .unwrap()
            .refname_to_id(NOTES_REF)
            .unwrap()
    );
}

#[tokio::test]
async fn rejected_push_is_merged_and_retried() {
    let dir = tempfile::tempdir().unwrap();
    let (work, remote, sha) = remote_with_commit(dir.path());
    let later = commit_file(&work, "db.yaml", "kind: BlueGreenDatabase\n# 2\n", "db 2");
    push_branch(&work, &remote);
    let ours = clone_of(&remote, &dir.path().join("ours")).await;
    let theirs = clone_of(&remote, &dir.path().join("theirs")).await;
    let our_sink = GitNotes::new(ours.clone(), Some("origin".into()));
    let their_sink = GitNotes::new(theirs.clone(), Some("origin".into()));

    let a = update(State::Pending, "preflight", "a (ours)");
    our_sink.publish(&commit(&sha), &a).await.unwrap();
    // They never saw our notes: their push is rejected, then merged.
    let b = update(State::Pending, "preflight", "b (theirs)");
    let only_theirs = update(State::Failure, "document", "other commit");
    their_sink
        .publish(&commit(&later), &only_theirs)
        .await
        .unwrap();
    their_sink.publish(&commit(&sha), &b).await.unwrap();
    assert_eq!(
        GitNotes::read(&remote, &sha).unwrap(),
        vec![a.clone(), b.clone()]
    );
    // Now ours is behind: rejected, merged, pushed.
    let c = update(State::Success, "done", "c (ours)");
    our_sink.publish(&commit(&sha), &c).await.unwrap();
    assert_eq!(
        GitNotes::read(&remote, &sha).unwrap(),
        vec![a.clone(), b.clone(), c.clone()]
    );
    assert_eq!(
        GitNotes::read(&remote, &later).unwrap(),
        vec![only_theirs.clone()]
    );
    assert_eq!(GitNotes::read(&ours, &later).unwrap(), vec![only_theirs]);
    assert_eq!(GitNotes::read(&ours, &sha).unwrap(), vec![a, b, c]);
    // The remote's history was extended, never rewritten.
    let remote_repo = Repository::open_bare(&remote).unwrap();
    let tip = remote_repo
        .find_reference(NOTES_REF)
        .unwrap()
        .peel_to_commit()
        .unwrap();
    let their_tip = Repository::open_bare(&theirs)
        .unwrap()
        .refname_to_id(NOTES_REF)
        .unwrap();
    assert!(
        remote_repo
            .graph_descendant_of(tip.id(), their_tip)
            .unwrap()
    );
    assert_eq!(tip.parent_count(), 2);
}

#[tokio::test]
async fn unreachable_remote_fails_after_retries_without_losing_the_note() {
    let dir = tempfile::tempdir().unwrap();
    init_repo(dir.path());
    let sha = commit_file(dir.path(), "db.yaml", "x", "one");
    let url = "http://bob:s3cret@127.0.0.1:9/repo.git";
    let sink = GitNotes::new(dir.path().to_path_buf(), Some(url.into()));
    let u = update(State::Pending, "preflight", "checking");
    let err = format!("{:#}", sink.publish(&commit(&sha), &u).await.unwrap_err());
    assert!(err.contains("http://***@127.0.0.1:9/repo.git"), "{err}");
    assert!(
        err.contains(&format!("failed {PUSH_ATTEMPTS} times")),
        "{err}"
    );
    assert!(!err.contains("s3cret"), "{err}");
    // Kept locally; the next successful push carries it.
    assert_eq!(GitNotes::read(dir.path(), &sha).unwrap(), vec![u]);
}

#[test]
fn union_keeps_both_sides_once() {
    let e: Vec<String> = (0..4)
        .map(|i| update(State::Pending, "p", &i.to_string()).note_entry())
        .collect();
    let theirs = format!("{}{}", e[1], e[2]);
    let ours = format!("{}{}", e[1], e[3]);
    assert_eq!(union(&theirs, &ours), format!("{}{}{}", e[1], e[2], e[3]));
    assert_eq!(union(&theirs, &theirs), theirs);
    assert_eq!(
        union("hand-written", &e[1]),
        format!("hand-written\n{}", e[1])
    );
}
