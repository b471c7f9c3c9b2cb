//! Which version of the desired state a piece of work stands for. Progress is reported on
//! it (a commit gets notes and forge statuses), and an attempt that failed is not retried
//! until a new one arrives. Pure.

use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", from = "Stored")]
pub enum Revision {
    /// A Git commit, by its full hexadecimal id (local mode's branch head, or the commit a
    /// Flux source revision names).
    Commit(String),
    /// A Flux source revision that names no commit (an OCI digest, a bucket checksum).
    Flux(String),
    /// Kubernetes mode, an object no Kustomization manages: its `metadata.generation`.
    Generation(i64),
}

/// How a revision is read back: as written now, or as pgflip 0.1 wrote it (a string: a
/// commit id, `generation-N`, or a Flux revision), so an upgraded pgflip resumes.
#[derive(Deserialize)]
#[serde(untagged)]
enum Stored {
    Tagged(Tagged),
    Text(String),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
enum Tagged {
    Commit(String),
    Flux(String),
    Generation(i64),
}

impl From<Stored> for Revision {
    fn from(stored: Stored) -> Revision {
        match stored {
            Stored::Tagged(Tagged::Commit(id)) => Revision::Commit(id),
            Stored::Tagged(Tagged::Flux(r)) => Revision::Flux(r),
            Stored::Tagged(Tagged::Generation(g)) => Revision::Generation(g),
            Stored::Text(text) => text
                .strip_prefix("generation-")
                .and_then(|g| g.parse().ok())
                .map(Revision::Generation)
                .or_else(|| Revision::commit(&text))
                .unwrap_or(Revision::Flux(text)),
        }
    }
}

impl Revision {
    /// A commit id: 40 (SHA-1) or 64 (SHA-256) hexadecimal digits.
    pub fn commit(id: &str) -> Option<Revision> {
        let hex = id.bytes().all(|b| b.is_ascii_hexdigit());
        (hex && (id.len() == 40 || id.len() == 64)).then(|| Revision::Commit(id.to_lowercase()))
    }

    /// The commit this revision is, if it is one: where notes and forge statuses go.
    pub fn as_commit(&self) -> Option<&str> {
        match self {
            Revision::Commit(id) => Some(id),
            _ => None,
        }
    }

    /// Twelve characters of a commit, the whole of anything else: for logs and messages.
    pub fn short(&self) -> String {
        match self {
            Revision::Commit(id) => id[..id.len().min(12)].to_string(),
            other => other.to_string(),
        }
    }
}

impl fmt::Display for Revision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Revision::Commit(id) | Revision::Flux(id) => f.write_str(id),
            Revision::Generation(g) => write!(f, "generation {g}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

    #[test]
    fn commits_are_recognised_by_their_shape() {
        assert_eq!(Revision::commit(SHA), Some(Revision::Commit(SHA.into())));
        assert_eq!(
            Revision::commit(&SHA.to_uppercase()).unwrap().as_commit(),
            Some(SHA)
        );
        assert!(Revision::commit(&format!("{SHA}{}", &SHA[..24])).is_some());
        assert_eq!(Revision::commit(&SHA[..39]), None);
        assert_eq!(Revision::commit(&SHA.replace('a', "g")), None);
        assert_eq!(Revision::commit(""), None);
    }

    #[test]
    fn display_and_short() {
        let c = Revision::Commit(SHA.into());
        assert_eq!(c.short(), "0123456789ab");
        assert_eq!(c.to_string(), SHA);
        assert_eq!(Revision::Generation(4).to_string(), "generation 4");
        assert_eq!(Revision::Generation(4).as_commit(), None);
        assert_eq!(
            Revision::Flux("latest@sha256:ab".into()).short(),
            "latest@sha256:ab"
        );
    }

    #[test]
    fn serialised_with_its_kind() {
        let json = serde_json::to_string(&Revision::Generation(3)).unwrap();
        assert_eq!(json, r#"{"generation":3}"#);
        let back: Revision = serde_json::from_str(&format!(r#"{{"commit":"{SHA}"}}"#)).unwrap();
        assert_eq!(back, Revision::Commit(SHA.into()));
    }

    #[test]
    fn revisions_written_as_text_by_an_older_pgflip_are_read() {
        let read = |text: &str| serde_json::from_str::<Revision>(&format!("{text:?}")).unwrap();
        assert_eq!(read(SHA), Revision::Commit(SHA.into()));
        assert_eq!(read("generation-7"), Revision::Generation(7));
        assert_eq!(
            read("latest@sha256:ab"),
            Revision::Flux("latest@sha256:ab".into())
        );
    }
}
