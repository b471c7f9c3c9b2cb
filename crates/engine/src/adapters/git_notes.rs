//! Progress written on the commit itself, as git notes (`refs/notes/pgflip`): each update
//! appends its [`Update::note_entry`] (a human line, then the JSON) to the commit's note,
//! so `git log --notes=pgflip` shows how the change went.
//!
//! For a remote repository the notes ref is pushed after every update. Someone else (a
//! second controller, a person) may have pushed notes meanwhile; the push is then
//! rejected, and the remote notes are merged in (for a commit noted on both sides, the
//! remote's note followed by our entries it lacks) before pushing again.

use super::git_remote::{self, redact_in, redact_url};
use crate::ports::StatusSink;
use anyhow::{Context, anyhow, bail};
use git2::{Oid, Repository, Signature};
use pgflip_core::report::{Update, parse_note};
use pgflip_core::revision::Revision;
use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const NOTES_REF: &str = "refs/notes/pgflip";

/// Where the remote's notes are fetched for merging. Outside `refs/notes/` so that
/// `git log --notes='*'` does not show them twice.
const REMOTE_NOTES_REF: &str = "refs/pgflip/remote-notes";

/// Scratch ref the merged notes are built on.
const MERGE_NOTES_REF: &str = "refs/pgflip/merge-notes";

/// Pushes tried before giving up; each rejected one fetches and merges first.
const PUSH_ATTEMPTS: u32 = 5;

#[derive(Clone)]
pub struct GitNotes {
    repo_dir: PathBuf,
    /// A remote name configured in the repository, or a URL (possibly with credentials:
    /// never shown unredacted).
    push_remote: Option<String>,
    /// One publish at a time: each reads the note, appends and moves the notes ref.
    lock: Arc<Mutex<()>>,
    /// Whether notes were written that the remote has not taken yet (it was unreachable):
    /// [`GitNotes::push_pending`] tries again.
    unpushed: Arc<AtomicBool>,
}

impl GitNotes {
    /// Notes written in `repo_dir`, and pushed to `push_remote` if given: a remote name,
    /// or a URL. A clone made by `GitSource` has an `origin` without credentials (they
    /// are never written to its configuration); pass `GitSource::remote_url()` when the
    /// remote needs them.
    pub fn new(repo_dir: PathBuf, push_remote: Option<String>) -> GitNotes {
        GitNotes {
            repo_dir,
            push_remote,
            lock: Arc::new(Mutex::new(())),
            unpushed: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The updates noted on `revision`, oldest first (none if it has no note).
    pub fn read(repo_dir: &Path, revision: &str) -> anyhow::Result<Vec<Update>> {
        Ok(parse_note(&GitNotes::read_text(repo_dir, revision)?))
    }

    /// The note on `revision` as text ("" if it has none).
    pub fn read_text(repo_dir: &Path, revision: &str) -> anyhow::Result<String> {
        let repo = open(repo_dir)?;
        let oid = parse_revision(revision)?;
        Ok(note_text(&repo, NOTES_REF, oid).unwrap_or_default())
    }
}

impl GitNotes {
    /// Pushes notes written while the remote was unreachable (nothing to do otherwise):
    /// a switch that ended then still gets its final notes to the remote.
    pub async fn push_pending(&self) -> anyhow::Result<()> {
        if !self.unpushed.load(Ordering::SeqCst) {
            return Ok(());
        }
        let (repo_dir, push_remote) = (self.repo_dir.clone(), self.push_remote.clone());
        let (lock, unpushed) = (self.lock.clone(), self.unpushed.clone());
        tokio::task::spawn_blocking(move || {
            let _guard = lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            push_recorded(&open(&repo_dir)?, push_remote.as_deref(), &unpushed)
        })
        .await
        .context("the Git worker thread failed")?
    }
}

impl StatusSink for GitNotes {
    fn publish(
        &self,
        revision: &Revision,
        update: &Update,
    ) -> impl Future<Output = anyhow::Result<()>> + Send {
        let repo_dir = self.repo_dir.clone();
        let push_remote = self.push_remote.clone();
        let lock = self.lock.clone();
        let unpushed = self.unpushed.clone();
        let commit = revision.as_commit().map(str::to_string);
        let entry = update.note_entry();
        async move {
            let revision = commit.context("git notes go on commits only")?;
            tokio::task::spawn_blocking(move || {
                // A panic in an earlier publish leaves nothing half-done that matters
                // (refs move atomically), so a poisoned lock is still usable.
                let _guard = lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                let repo = open(&repo_dir)?;
                let oid = parse_revision(&revision)?;
                append(&repo, oid, &entry)
                    .with_context(|| format!("writing the note on {revision}"))?;
                push_recorded(&repo, push_remote.as_deref(), &unpushed)
            })
            .await
            .context("the Git worker thread failed")?
        }
    }
}

/// Pushes the notes ref, if there is a remote, remembering whether the remote has it.
fn push_recorded(
    repo: &Repository,
    push_remote: Option<&str>,
    unpushed: &AtomicBool,
) -> anyhow::Result<()> {
    let Some(remote) = push_remote else {
        return Ok(());
    };
    let pushed = push_with_merge(repo, remote);
    unpushed.store(pushed.is_err(), Ordering::SeqCst);
    pushed
}

fn open(repo_dir: &Path) -> anyhow::Result<Repository> {
    Repository::open(repo_dir).map_err(|e| {
        anyhow!(
            "cannot open Git repository {}: {}",
            repo_dir.display(),
            e.message()
        )
    })
}

fn parse_revision(revision: &str) -> anyhow::Result<Oid> {
    Oid::from_str(revision).map_err(|_| anyhow!("{revision:?} is not a commit id"))
}

/// Fixed, so notes do not depend on the host's Git configuration.
fn signature() -> anyhow::Result<Signature<'static>> {
    Ok(Signature::now("pgflip", "pgflip@localhost")?)
}

fn note_text(repo: &Repository, notes_ref: &str, oid: Oid) -> Option<String> {
    let note = repo.find_note(Some(notes_ref), oid).ok()?;
    Some(String::from_utf8_lossy(note.message_bytes()).into_owned())
}

/// Appends `entry` to the note on `oid`, creating the note (and the notes ref) if needed.
fn append(repo: &Repository, oid: Oid, entry: &str) -> anyhow::Result<()> {
    let mut text = note_text(repo, NOTES_REF, oid).unwrap_or_default();
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(entry);
    let sig = signature()?;
    repo.note(&sig, &sig, Some(NOTES_REF), oid, &text, true)?;
    Ok(())
}

/// Pushes the notes ref; on a rejection merges the remote's notes and tries again.
fn push_with_merge(repo: &Repository, remote: &str) -> anyhow::Result<()> {
    let shown = redact_url(remote);
    let mut last_error = None;
    for attempt in 1..=PUSH_ATTEMPTS {
        match push(repo, remote) {
            Ok(()) => return Ok(()),
            Err(e) => last_error = Some(e),
        }
        // Most likely a non-fast-forward: take what the remote has and merge it. If even
        // the fetch fails, the remote is unreachable; retrying soon may still help.
        if let Ok(Some(theirs)) = fetch_remote_notes(repo, remote) {
            merge_notes(repo, theirs).context("merging the remote's notes")?;
        }
        if attempt < PUSH_ATTEMPTS {
            std::thread::sleep(Duration::from_millis(100 * u64::from(attempt)));
        }
    }
    let e = last_error.expect("at least one attempt");
    Err(e.context(format!(
        "pushing {NOTES_REF} to {shown} failed {PUSH_ATTEMPTS} times"
    )))
}

fn push(repo: &Repository, remote: &str) -> anyhow::Result<()> {
    let (mut handle, url) = git_remote::find_remote(repo, remote)?;
    let url = url.unwrap_or_default();
    let mut rejected: Option<String> = None;
    let mut callbacks = git_remote::callbacks(Some(&url));
    callbacks.push_update_reference(|refname, status| {
        if let Some(status) = status {
            rejected = Some(format!("{refname}: {status}"));
        }
        Ok(())
    });
    let refspec = format!("{NOTES_REF}:{NOTES_REF}");
    let pushed = handle.push(
        &[refspec.as_str()],
        Some(&mut git_remote::push_options(callbacks)),
    );
    pushed.map_err(|e| anyhow!("{}", redact_in(e.message(), &url)))?;
    if let Some(why) = rejected {
        bail!("the remote rejected {}", redact_in(&why, &url));
    }
    Ok(())
}

/// Fetches the remote's notes ref into [`REMOTE_NOTES_REF`]; `None` if it has none.
fn fetch_remote_notes(repo: &Repository, remote: &str) -> anyhow::Result<Option<Oid>> {
    // A stale copy from an earlier fetch must not pass for the remote's current notes.
    if let Ok(mut stale) = repo.find_reference(REMOTE_NOTES_REF) {
        stale.delete()?;
    }
    let (mut handle, url) = git_remote::find_remote(repo, remote)?;
    let refspec = format!("+{NOTES_REF}:{REMOTE_NOTES_REF}");
    handle
        .fetch(
            &[refspec.as_str()],
            Some(&mut git_remote::fetch_options(url.as_deref())),
            None,
        )
        .map_err(|e| {
            anyhow!(
                "fetching notes: {}",
                redact_in(e.message(), url.as_deref().unwrap_or(""))
            )
        })?;
    Ok(repo.refname_to_id(REMOTE_NOTES_REF).ok())
}

/// Makes [`NOTES_REF`] a merge of ours and `theirs`: every commit keeps the remote's note,
/// followed by the entries only we have. Nothing written on either side is lost, and the
/// result descends from `theirs`, so the next push fast-forwards.
fn merge_notes(repo: &Repository, theirs: Oid) -> anyhow::Result<()> {
    let ours = repo.refname_to_id(NOTES_REF)?;
    if ours == theirs || repo.graph_descendant_of(ours, theirs)? {
        return Ok(());
    }
    if repo.graph_descendant_of(theirs, ours)? {
        repo.reference(
            NOTES_REF,
            theirs,
            true,
            "pgflip: fast-forward to the remote's notes",
        )?;
        return Ok(());
    }
    let our_notes = all_notes(repo, NOTES_REF)?;
    let their_notes = all_notes(repo, REMOTE_NOTES_REF)?;
    // Build the merged tree by writing the changed notes on top of theirs.
    repo.reference(MERGE_NOTES_REF, theirs, true, "pgflip: merging notes")?;
    let sig = signature()?;
    for (annotated, our_text) in &our_notes {
        let merged = match their_notes.get(annotated) {
            Some(their_text) => union(their_text, our_text),
            None => our_text.clone(),
        };
        if their_notes.get(annotated) != Some(&merged) {
            repo.note(&sig, &sig, Some(MERGE_NOTES_REF), *annotated, &merged, true)?;
        }
    }
    let tree = repo.find_reference(MERGE_NOTES_REF)?.peel_to_tree()?;
    let parents = [&repo.find_commit(ours)?, &repo.find_commit(theirs)?];
    let merge = repo.commit(None, &sig, &sig, "Notes merged by pgflip", &tree, &parents)?;
    repo.reference(NOTES_REF, merge, true, "pgflip: merged the remote's notes")?;
    repo.find_reference(MERGE_NOTES_REF)?.delete()?;
    Ok(())
}

/// Every note under `notes_ref`, by the object it annotates.
fn all_notes(repo: &Repository, notes_ref: &str) -> anyhow::Result<BTreeMap<Oid, String>> {
    let mut notes = BTreeMap::new();
    for pair in repo.notes(Some(notes_ref))? {
        let (note_id, annotated) = pair?;
        let blob = repo.find_blob(note_id)?;
        notes.insert(
            annotated,
            String::from_utf8_lossy(blob.content()).into_owned(),
        );
    }
    Ok(notes)
}

/// `theirs`, then the entries of `ours` it does not have, in our order. An entry is the
/// lines up to and including a JSON line (see [`Update::note_entry`]); each carries its
/// own time, so equal entries are the same update.
fn union(theirs: &str, ours: &str) -> String {
    let their_entries = entries(theirs);
    let mut out = theirs.to_string();
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    for entry in entries(ours) {
        if !their_entries.contains(&entry) {
            out.push_str(&entry);
        }
    }
    out
}

fn entries(note: &str) -> Vec<String> {
    let mut entries = Vec::new();
    let mut current = String::new();
    for line in note.lines() {
        current.push_str(line);
        current.push('\n');
        if line.starts_with('{') {
            entries.push(std::mem::take(&mut current));
        }
    }
    if !current.is_empty() {
        entries.push(current);
    }
    entries
}

#[cfg(test)]
mod tests;
