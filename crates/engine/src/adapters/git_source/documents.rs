//! Finding the `BlueGreenDatabase` document in a commit's tree: a named file, the only
//! YAML file declaring the kind, or the document of a given name under a directory.

use git2::{ObjectType, Repository, Tree, TreeWalkMode, TreeWalkResult};
use pgflip_core::spec::{self, KIND};
use std::path::Path;

/// YAML files larger than this are not looked into when searching for the document: a
/// `BlueGreenDatabase` is a few hundred bytes, and big blobs cost memory for nothing.
pub const MAX_SCANNED_BLOB: usize = 1 << 20;

/// Which `BlueGreenDatabase` document of a commit is read.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum DocumentAt {
    /// The only YAML file declaring the kind.
    Only,
    /// This file.
    File(String),
    /// The document of this `metadata.name` in a YAML file under this directory: a Flux
    /// Kustomization's path, where several databases may sit side by side and a file may
    /// hold several documents.
    Named { under: String, name: String },
}

/// The document `document` names in `tree` (of the commit `short`), or why there is none.
pub(super) fn find(
    repo: &Repository,
    tree: &Tree<'_>,
    document: &DocumentAt,
    short: &str,
) -> Result<String, String> {
    match document {
        DocumentAt::File(path) => read_named(repo, tree, path, short),
        DocumentAt::Only => discover(repo, tree, short),
        DocumentAt::Named { under, name } => find_by_name(repo, tree, under, name, short),
    }
}

fn read_named(
    repo: &Repository,
    tree: &Tree<'_>,
    path: &str,
    short: &str,
) -> Result<String, String> {
    let entry = tree
        .get_path(Path::new(path))
        .map_err(|_| format!("no file {path} in commit {short}"))?;
    let blob = entry
        .to_object(repo)
        .ok()
        .and_then(|o| o.into_blob().ok())
        .ok_or_else(|| format!("{path} in commit {short} is not a file"))?;
    String::from_utf8(blob.content().to_vec())
        .map_err(|_| format!("{path} in commit {short} is not UTF-8 text"))
}

/// The YAML files of `tree` under the directory `under` ("" for all), small enough to be
/// a document, as (path, text).
fn yaml_files(
    repo: &Repository,
    tree: &Tree<'_>,
    under: &str,
    short: &str,
) -> Result<Vec<(String, String)>, String> {
    let prefix = if under.is_empty() {
        String::new()
    } else {
        format!("{under}/")
    };
    // The walk's callback cannot fail usefully, so it only lists candidates; they are
    // read afterwards.
    let mut candidates = Vec::new();
    let walked = tree.walk(TreeWalkMode::PreOrder, |dir, entry| {
        let is_regular_blob =
            entry.kind() == Some(ObjectType::Blob) && entry.filemode() != 0o120000;
        if let Some(name) = entry.name()
            && is_regular_blob
            && (name.ends_with(".yaml") || name.ends_with(".yml"))
            && format!("{dir}{name}").starts_with(&prefix)
        {
            candidates.push((format!("{dir}{name}"), entry.id()));
        }
        TreeWalkResult::Ok
    });
    walked.map_err(|e| format!("cannot list the files of commit {short}: {}", e.message()))?;
    let odb = repo.odb().map_err(|e| e.message().to_string())?;
    let mut files = Vec::new();
    for (path, id) in candidates {
        match odb.read_header(id) {
            Ok((size, _)) if size <= MAX_SCANNED_BLOB => {}
            _ => continue,
        }
        let Ok(blob) = repo.find_blob(id) else {
            continue;
        };
        if let Ok(text) = std::str::from_utf8(blob.content()) {
            files.push((path, text.to_string()));
        }
    }
    Ok(files)
}

/// Finds the one YAML file in `tree` declaring `kind: BlueGreenDatabase`.
fn discover(repo: &Repository, tree: &Tree<'_>, short: &str) -> Result<String, String> {
    let found = yaml_files(repo, tree, "", short)?
        .into_iter()
        .filter(|(_, text)| declares_kind(text))
        .collect();
    only_one(
        found,
        || {
            format!(
                "no {KIND} document found in commit {short} (no *.yaml or *.yml file has a line `kind: {KIND}`)"
            )
        },
        |paths| {
            format!(
                "several {KIND} documents in commit {short}: {paths}; pass --file to choose one"
            )
        },
    )
}

/// Finds the `BlueGreenDatabase` document named `name` under the directory `under`: in a
/// file of its own or among the documents of a multi-document file.
fn find_by_name(
    repo: &Repository,
    tree: &Tree<'_>,
    under: &str,
    name: &str,
    short: &str,
) -> Result<String, String> {
    let mut found: Vec<(String, String)> = Vec::new();
    for (path, text) in yaml_files(repo, tree, under, short)? {
        for document in yaml_documents(&text) {
            if declares_kind(document) && spec::peek_name(document).as_deref() == Some(name) {
                found.push((path.clone(), document.to_string()));
            }
        }
    }
    let shown_under = if under.is_empty() { "." } else { under };
    only_one(
        found,
        || format!("no {KIND} named {name:?} under {shown_under} in commit {short}"),
        |paths| {
            format!(
                "several {KIND} documents named {name:?} under {shown_under} in commit {short}: {paths}"
            )
        },
    )
}

/// The text of the one document `found` as (path, text), or why not: `none()`, or
/// `several` given the paths found.
fn only_one(
    mut found: Vec<(String, String)>,
    none: impl FnOnce() -> String,
    several: impl FnOnce(&str) -> String,
) -> Result<String, String> {
    match found.len() {
        1 => Ok(found.pop().expect("one").1),
        0 => Err(none()),
        _ => {
            let paths: Vec<&str> = found.iter().map(|(p, _)| p.as_str()).collect();
            Err(several(&paths.join(", ")))
        }
    }
}

/// The documents of a YAML stream: the text between `---` separator lines.
fn yaml_documents(text: &str) -> Vec<&str> {
    let mut documents = Vec::new();
    let mut start = 0;
    let mut at = 0;
    for line in text.split_inclusive('\n') {
        if line.starts_with("---") && line[3..].trim().is_empty() {
            documents.push(&text[start..at]);
            start = at + line.len();
        }
        at += line.len();
    }
    documents.push(&text[start..]);
    documents
}

/// Whether `text` has a top-level line `kind: BlueGreenDatabase` (quoted or not, with or
/// without a trailing comment).
pub(super) fn declares_kind(text: &str) -> bool {
    text.lines().any(|line| {
        let Some(value) = line.strip_prefix("kind:") else {
            return false;
        };
        let value = value.split(" #").next().unwrap_or("").trim();
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .or_else(|| value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
            .unwrap_or(value);
        value == KIND
    })
}
