//! Making and changing repositories, for tests and the demo. Panics on any Git error:
//! these are fixtures, not product paths.

use git2::{Commit, Repository, RepositoryInitOptions, Signature};
use std::path::Path;

pub const BRANCH: &str = "main";

fn signature() -> Signature<'static> {
    Signature::now("pgflip test", "test@pgflip.localhost").expect("signature")
}

/// Creates a non-bare repository in `dir` whose HEAD is `main`.
pub fn init_repo(dir: &Path) -> Repository {
    let mut opts = RepositoryInitOptions::new();
    opts.initial_head(BRANCH);
    Repository::init_opts(dir, &opts).expect("git init")
}

/// Writes `text` to `path` in the work tree and commits it on HEAD; returns the sha.
pub fn commit_file(repo_dir: &Path, path: &str, text: &str, message: &str) -> String {
    let repo = Repository::open(repo_dir).expect("open repository");
    let full = repo_dir.join(path);
    if let Some(parent) = full.parent() {
        std::fs::create_dir_all(parent).expect("create directories");
    }
    std::fs::write(&full, text).expect("write file");
    let mut index = repo.index().expect("index");
    index.add_path(Path::new(path)).expect("git add");
    index.write().expect("write index");
    let tree_id = index.write_tree().expect("write tree");
    commit_tree(&repo, tree_id, message)
}

/// Commits the revert of `sha` on HEAD (like `git revert --no-edit`) and updates the
/// work tree; returns the new sha.
pub fn revert(repo_dir: &Path, sha: &str) -> String {
    let repo = Repository::open(repo_dir).expect("open repository");
    let reverted = repo
        .find_commit(git2::Oid::from_str(sha).expect("sha"))
        .expect("commit to revert");
    let head = repo
        .head()
        .and_then(|h| h.peel_to_commit())
        .expect("HEAD commit");
    let mut index = repo
        .revert_commit(&reverted, &head, 0, None)
        .expect("revert");
    assert!(!index.has_conflicts(), "reverting {sha} conflicts");
    let tree_id = index.write_tree_to(&repo).expect("write tree");
    let message = format!(
        "Revert \"{}\"\n\nThis reverts commit {sha}.\n",
        reverted.summary().unwrap_or("")
    );
    let new = commit_tree(&repo, tree_id, &message);
    // Keep index and work tree on the new HEAD, or the next commit_file would commit
    // the reverted content back.
    repo.checkout_head(Some(git2::build::CheckoutBuilder::new().force()))
        .expect("checkout");
    new
}

/// Pushes the `main` branch of `repo_dir` to the repository at `remote_dir` (what a
/// person's `git push --force` does).
pub fn push(repo_dir: &Path, remote_dir: &Path) {
    let repo = Repository::open(repo_dir).expect("open repository");
    let mut remote = repo
        .remote_anonymous(&format!("file://{}", remote_dir.display()))
        .expect("remote");
    let refspec = format!("+refs/heads/{BRANCH}:refs/heads/{BRANCH}");
    remote.push(&[refspec.as_str()], None).expect("push");
}

fn commit_tree(repo: &Repository, tree_id: git2::Oid, message: &str) -> String {
    let tree = repo.find_tree(tree_id).expect("tree");
    let parent: Option<Commit<'_>> = repo.head().ok().and_then(|h| h.peel_to_commit().ok());
    let parents: Vec<&Commit<'_>> = parent.iter().collect();
    let sig = signature();
    repo.commit(Some("HEAD"), &sig, &sig, message, &tree, &parents)
        .expect("commit")
        .to_string()
}
