//! The state directory of one managed database: the persisted [`Record`], secrets and the
//! files of the local instances and endpoint. The record is written atomically (temp file,
//! fsync, rename) so a crash leaves either the old or the new one, never half of each.

use crate::ports::{ADMIN_USER, Credentials};
use anyhow::Context;
use pgflip_core::plan::Record;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct StateDir {
    pub root: PathBuf,
}

impl StateDir {
    pub fn open(root: impl Into<PathBuf>) -> anyhow::Result<StateDir> {
        let root = root.into();
        std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        let root = root.canonicalize()?;
        // Other users must be able to reach the instance directories below (servers run
        // unprivileged), but not read secrets or the record.
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o711))?;
        Ok(StateDir { root })
    }

    pub fn record_path(&self) -> PathBuf {
        self.root.join("record.json")
    }

    pub fn load(&self) -> anyhow::Result<Record> {
        match std::fs::read(self.record_path()) {
            Ok(bytes) => serde_json::from_slice(&bytes).context("reading record.json"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Record::default()),
            Err(e) => Err(e).context("reading record.json"),
        }
    }

    pub fn save(&self, record: &Record) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec_pretty(record)?;
        write_atomic(&self.record_path(), &bytes, 0o600)
    }

    /// [`StateDir::load`] for async code: the read runs on the blocking pool.
    pub async fn load_async(&self) -> anyhow::Result<Record> {
        let state = self.clone();
        blocking(move || state.load()).await
    }

    /// [`StateDir::save`] for async code: the record is serialized here, then written and
    /// fsynced (file and directory) on the blocking pool, not on a runtime worker, where
    /// a slow fsync would stall every other task (clients' connections among them).
    pub async fn save_async(&self, record: &Record) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec_pretty(record)?;
        let path = self.record_path();
        blocking(move || write_atomic(&path, &bytes, 0o600)).await
    }

    /// The admin credentials: `$PGFLIP_ADMIN_PASSWORD`, else `secrets/admin-password`
    /// (generated on first use, mode 0600).
    pub fn admin_credentials(&self) -> anyhow::Result<Credentials> {
        if let Ok(p) = std::env::var("PGFLIP_ADMIN_PASSWORD")
            && !p.is_empty()
        {
            return Ok(Credentials {
                user: ADMIN_USER.into(),
                password: p,
            });
        }
        let path = self.root.join("secrets/admin-password");
        let password = match std::fs::read_to_string(&path) {
            Ok(p) => p.trim().to_string(),
            Err(_) => {
                std::fs::create_dir_all(path.parent().unwrap())?;
                std::fs::set_permissions(
                    path.parent().unwrap(),
                    std::fs::Permissions::from_mode(0o700),
                )?;
                let p = crate::random::token(32);
                write_atomic(&path, p.as_bytes(), 0o600)?;
                p
            }
        };
        Ok(Credentials {
            user: ADMIN_USER.into(),
            password,
        })
    }

    pub fn dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
}

pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    if let Some(dir) = path.parent()
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Runs blocking work (file writes with fsync, directory trees, git2) on tokio's blocking
/// pool, so that async code never stalls the runtime's worker threads.
pub async fn blocking<T, F>(work: F) -> anyhow::Result<T>
where
    F: FnOnce() -> anyhow::Result<T> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(work)
        .await
        .context("a blocking worker thread failed")?
}

/// [`write_atomic`] for async code (on the blocking pool).
pub async fn write_atomic_async(path: PathBuf, bytes: Vec<u8>, mode: u32) -> anyhow::Result<()> {
    blocking(move || write_atomic(&path, &bytes, mode)).await
}

impl crate::ports::Journal for StateDir {
    async fn save(&self, record: &Record) -> anyhow::Result<()> {
        self.save_async(record).await
    }
}
