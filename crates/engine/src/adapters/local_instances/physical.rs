//! A local instance made by a physical copy: a base backup of the serving instance,
//! replayed as a standby up to the cut and promoted there, then upgraded with
//! `pg_upgrade --link` and started in the instance's place.
//!
//! Layout: `<state>/instances/<color>.physical/` beside the instance's own directory, with
//! `backup/` (the old major's copy), `new/` (the new major's cluster until it moves to
//! `<color>/data`), and markers for what is complete (`backup.done`, `upgraded`). The
//! instance's `instance.json` is written last: until then `ensure` and `addr` do not see it.

use super::{InstanceFile, LocalInstances, configure, make_instance_dir};
use crate::pg;
use crate::ports::NotReady;
use crate::ports::{Addr, Result};
use crate::replication as repl;
use crate::run_as::{free_port, run_async, run_tracked, still_running, succeeds};
use crate::state::{blocking, write_atomic};
use anyhow::{Context, bail};
use pgflip_core::plan::Member;
use std::path::{Path, PathBuf};
use std::time::Duration;

const BACKUP_DONE: &str = "backup.done";
const UPGRADED: &str = "upgraded";
/// How long the copy may take to replay the WAL written during its backup, up to the cut.
const REPLAY_BOUND: Duration = Duration::from_secs(1800);

/// What `initdb` of the new major must match in the old cluster for `pg_upgrade`.
pub(super) struct ClusterFacts {
    pub(super) install_user: String,
    checksums: bool,
    encoding: String,
    collate: String,
    ctype: String,
}

impl LocalInstances {
    pub(super) fn staging(&self, member: &Member) -> PathBuf {
        self.state
            .dir("instances")
            .join(format!("{}.physical", member.color.as_str()))
    }

    pub(super) async fn take_base_backup(
        &self,
        from: &Member,
        to: &Member,
        source: &Addr,
        slot: &str,
    ) -> Result<()> {
        let staging = self.staging(to);
        if tokio::fs::try_exists(staging.join(BACKUP_DONE)).await? {
            return Ok(());
        }
        let (_, new_bin) = self.bins(from, to)?;
        let pidfile = staging.join("pg_basebackup.pid");
        if let Some(pid) = still_running(&pidfile, "pg_basebackup").await {
            return Err(NotReady(format!(
                "the base backup for {to} started before pgflip restarted is still running (pid {pid})"
            ))
            .into());
        }
        self.stop_copy(&staging).await?;
        {
            let (staging, run_as) = (staging.clone(), self.run_as);
            blocking(move || make_instance_dir(&staging, run_as)).await?;
        }
        // A slot left by an interrupted backup: the new backup makes its own.
        let postgres = pg::connect(source, &self.admin, "postgres").await?;
        repl::drop_slot(&postgres, slot).await?;
        let mut backup = self.run_as.command(&new_bin.join("pg_basebackup"));
        backup
            .args(["-h", &source.host, "-p", &source.port.to_string()])
            .args(["-U", &self.admin.user, "-w", "-D"])
            .arg(staging.join("backup"))
            .args(["-X", "stream", "-c", "fast", "-C", "-S", slot])
            // Its own sync would flush the whole copy at once; see flush_gently.
            .arg("--no-sync")
            .env("PGPASSWORD", &self.admin.password);
        run_tracked(backup, &pidfile)
            .await
            .context("pg_basebackup")?;
        let copy = staging.join("backup");
        blocking(move || flush_gently(&copy)).await?;
        tokio::fs::write(staging.join(BACKUP_DONE), b"").await?;
        crate::failpoint::hit("physical:backup-taken");
        Ok(())
    }

    pub(super) async fn upgrade_copy(
        &self,
        from: &Member,
        to: &Member,
        source: &Addr,
        slot: &str,
        stop_before: &str,
    ) -> Result<()> {
        let staging = self.staging(to);
        let (old_bin, new_bin) = self.bins(from, to)?;
        if let Some(pid) = still_running(&staging.join("pg_upgrade.pid"), "pg_upgrade").await {
            return Err(NotReady(format!(
                "pg_upgrade for {to} started before pgflip restarted is still running (pid {pid})"
            ))
            .into());
        }
        let backup = staging.join("backup");
        // pg_upgrade --link disables the old cluster (pg_control.old) before it links its
        // files, and removes its output directory from the new one when it succeeds.
        let disabled = tokio::fs::try_exists(backup.join("global/pg_control.old")).await?;
        let finished = disabled
            && tokio::fs::try_exists(staging.join("new/PG_VERSION")).await?
            && !tokio::fs::try_exists(staging.join("new/pg_upgrade_output.d")).await?;
        if finished {
            // It finished after the pgflip that started it was killed.
            tokio::fs::write(staging.join(UPGRADED), b"").await?;
        }
        if !tokio::fs::try_exists(staging.join(UPGRADED)).await? {
            if disabled {
                bail!(
                    "pg_upgrade --link of {to}'s copy stopped after it had disabled the copy and did not finish: the copy cannot be used again; the attempt fails and its cleanup removes it (push a new commit to try again)"
                );
            }
            let facts = self
                .replay_to(&backup, &old_bin, source, slot, stop_before)
                .await?;
            self.pg_upgrade(&staging, &old_bin, &new_bin, to, &facts)
                .await?;
            tokio::fs::write(staging.join(UPGRADED), b"").await?;
            crate::failpoint::hit("physical:upgraded");
        }
        let dir = self.dir(to);
        let file = InstanceFile {
            major: to.major,
            port: free_port()?,
        };
        let run_as = self.run_as;
        blocking(move || {
            let new = staging.join("new");
            if new.exists() {
                make_instance_dir(&dir, run_as)?;
                std::fs::rename(&new, dir.join("data"))?;
            }
            configure(&dir, &file)?;
            // The old copy's files are hard links into the new cluster: unlinking them
            // frees nothing the new cluster uses.
            std::fs::remove_dir_all(&staging)
                .with_context(|| format!("removing {}", staging.display()))
        })
        .await
    }

    pub(super) fn bins(&self, from: &Member, to: &Member) -> anyhow::Result<(PathBuf, PathBuf)> {
        self.toolchain
            .physical_upgrade_bins(from.major.0, to.major.0)
            .map_err(anyhow::Error::msg)
    }

    /// Starts the backup as a standby of the source that stops right before `stop_before`
    /// and promotes there; reads what `pg_upgrade` needs; stops it. Again after a crash:
    /// a copy promoted already just starts and stops.
    async fn replay_to(
        &self,
        backup: &Path,
        old_bin: &Path,
        source: &Addr,
        slot: &str,
        stop_before: &str,
    ) -> anyhow::Result<ClusterFacts> {
        let staging = backup.parent().context("backup without a parent")?;
        // Left running by a pgflip killed meanwhile, on a port this pass does not know:
        // stopped, and started again below (a standby resumes its replay).
        self.stop_copy(staging).await?;
        let port = free_port()?;
        let passfile = staging.join("pgpass");
        let escape = |s: &str| s.replace('\\', "\\\\").replace(':', "\\:");
        let pgpass = format!(
            "{}:{}:*:{}:{}\n",
            escape(&source.host),
            source.port,
            escape(&self.admin.user),
            escape(&self.admin.password)
        );
        let primary = format!(
            "{} passfile={}",
            pg::conninfo_without_password(source, &self.admin.user, "postgres"),
            pg::conninfo_value(&passfile.to_string_lossy())
        );
        // Appended last, so they win over the source's own settings copied with the data
        // (its port and socket directory among them). recovery_target_inclusive = false:
        // the record at the cut is not replayed; if it is a commit, the slots send it.
        let settings = [
            ("port", port.to_string()),
            ("listen_addresses", conf_literal("127.0.0.1")),
            (
                "unix_socket_directories",
                conf_literal(&staging.to_string_lossy()),
            ),
            ("logging_collector", "off".into()),
            ("archive_mode", "off".into()),
            ("hot_standby", "on".into()),
            ("primary_conninfo", conf_literal(&primary)),
            ("primary_slot_name", conf_literal(slot)),
            ("recovery_target_lsn", conf_literal(stop_before)),
            ("recovery_target_inclusive", "off".into()),
            ("recovery_target_action", conf_literal("promote")),
        ];
        {
            let (backup, run_as, passfile) = (backup.to_path_buf(), self.run_as, passfile.clone());
            blocking(move || {
                write_atomic(&passfile, pgpass.as_bytes(), 0o600)?;
                run_as.own(&passfile)?;
                let auto = backup.join("postgresql.auto.conf");
                let mut conf = std::fs::read_to_string(&auto).unwrap_or_default();
                conf.push_str("\n# pgflip: the physical copy's replay\n");
                for (k, v) in settings {
                    conf.push_str(&format!("{k} = {v}\n"));
                }
                std::fs::write(&auto, conf)?;
                std::fs::write(backup.join("pg_hba.conf"), super::HBA)?;
                Ok(())
            })
            .await?;
        }
        // Never started yet (recovery renames backup_label): a standby. Started before, it
        // is one still (standby.signal is there) or promoted already (it must not be one).
        if tokio::fs::try_exists(backup.join("backup_label")).await? {
            tokio::fs::write(backup.join("standby.signal"), b"").await?;
        }
        let mut start = self.run_as.command(&old_bin.join("pg_ctl"));
        start
            .arg("start")
            .arg("-D")
            .arg(backup)
            .arg("-l")
            .arg(staging.join("replay.log"))
            .args(["-w", "-t", "600"]);
        run_async(start).await.with_context(|| {
            format!(
                "starting the copy to replay it; see {}",
                staging.join("replay.log").display()
            )
        })?;
        let addr = Addr {
            host: "127.0.0.1".into(),
            port,
        };
        let deadline = tokio::time::Instant::now() + REPLAY_BOUND;
        let client = loop {
            if let Ok(c) = pg::connect(&addr, &self.admin, "postgres").await
                && let Ok(row) = c.query_one("SELECT pg_is_in_recovery()", &[]).await
                && !row.get::<_, bool>(0)
            {
                break c;
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "the copy did not reach the cut {stop_before} within {REPLAY_BOUND:?}; see {}",
                    staging.join("replay.log").display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let facts = cluster_facts(&client).await?;
        drop(client);
        crate::failpoint::hit("physical:promoted");
        self.stop_copy(staging).await?;
        Ok(facts)
    }

    /// `initdb` of the new major matching the old cluster, then `pg_upgrade --link`.
    async fn pg_upgrade(
        &self,
        staging: &Path,
        old_bin: &Path,
        new_bin: &Path,
        to: &Member,
        facts: &ClusterFacts,
    ) -> anyhow::Result<()> {
        let new = staging.join("new");
        if tokio::fs::try_exists(&new).await? {
            tokio::fs::remove_dir_all(&new).await?;
        }
        self.initdb_like(new_bin, &new, to, facts).await?;
        let mut upgrade = self.run_as.command(&new_bin.join("pg_upgrade"));
        upgrade
            // It writes its logs and scripts to the working directory, and puts its
            // servers' sockets there.
            .current_dir(staging)
            .arg("-b")
            .arg(old_bin)
            .arg("-B")
            .arg(new_bin)
            .arg("-d")
            .arg(staging.join("backup"))
            .arg("-D")
            .arg(&new)
            .args(["--link", "-U", &facts.install_user])
            .args([
                "-p",
                &free_port()?.to_string(),
                "-P",
                &free_port()?.to_string(),
            ]);
        run_tracked(upgrade, &staging.join("pg_upgrade.pid"))
            .await
            .context("pg_upgrade --link")?;
        Ok(())
    }

    /// `initdb` of the new major with what `pg_upgrade` needs to match in the old cluster.
    pub(super) async fn initdb_like(
        &self,
        new_bin: &Path,
        new: &Path,
        to: &Member,
        facts: &ClusterFacts,
    ) -> anyhow::Result<()> {
        let mut initdb = self.run_as.command(&new_bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(new)
            .args(["-U", &facts.install_user, "-E", &facts.encoding])
            .args([
                "--locale-provider=libc",
                "--auth-local=trust",
                "--auth-host=reject",
            ])
            .arg(format!("--lc-collate={}", facts.collate))
            .arg(format!("--lc-ctype={}", facts.ctype))
            .arg("--no-sync");
        if facts.checksums {
            initdb.arg("--data-checksums");
        } else if to.major.0 >= 18 {
            // PostgreSQL 18's initdb turns checksums on unless told not to.
            initdb.arg("--no-data-checksums");
        }
        run_async(initdb).await.context("initdb of the new major")?;
        Ok(())
    }

    async fn copy_running(&self, data: &Path, bin: &Path) -> anyhow::Result<bool> {
        let mut status = self.run_as.command(&bin.join("pg_ctl"));
        status.arg("status").arg("-D").arg(data);
        succeeds(status).await
    }

    /// Stops a copy's servers if they run: the old major's replaying, or either of the
    /// two `pg_upgrade` runs (left by a crash, or by a copy abandoned mid-way).
    pub(super) async fn stop_copy(&self, staging: &Path) -> anyhow::Result<()> {
        for data in [staging.join("backup"), staging.join("new")] {
            let Ok(version) = tokio::fs::read_to_string(data.join("PG_VERSION")).await else {
                continue;
            };
            let Ok(major) = version.trim().parse::<u32>() else {
                continue;
            };
            let bin = self.toolchain.server_bin(major)?;
            if self.copy_running(&data, &bin).await? {
                let mut stop = self.run_as.command(&bin.join("pg_ctl"));
                stop.arg("stop")
                    .arg("-D")
                    .arg(&data)
                    .args(["-m", "fast", "-w", "-t", "120"]);
                run_async(stop).await.context("stopping the copy")?;
            }
        }
        Ok(())
    }
}

pub(super) async fn cluster_facts(client: &tokio_postgres::Client) -> anyhow::Result<ClusterFacts> {
    let row = client
        .query_one(
            "SELECT (SELECT rolname::text FROM pg_authid WHERE oid = 10),
                    current_setting('data_checksums') = 'on',
                    pg_encoding_to_char(encoding)::text, datcollate::text, datctype::text,
                    datlocprovider::text
               FROM pg_database WHERE datname = 'template0'",
            &[],
        )
        .await?;
    let provider: String = row.get(5);
    if provider != "c" {
        bail!(
            "template0 of the source uses a collation provider other than libc ({provider}): copied logically only"
        );
    }
    Ok(ClusterFacts {
        install_user: row.get(0),
        checksums: row.get(1),
        encoding: row.get(2),
        collate: row.get(3),
        ctype: row.get(4),
    })
}

/// How much of a file is written out at a time by [`flush_gently`].
const FLUSH_CHUNK: i64 = 8 << 20;

/// Makes a directory's files durable a few megabytes at a time. The copy is written into
/// the page cache and, on a machine with memory to spare, stays there dirty until synced;
/// one `fsync` (or `syncfs`) of the whole copy then puts a gigabyte in the disk's queue at
/// once, and every commit of the serving server — which waits on its own WAL flush, on the
/// same disk where they share one — waits behind it: all clients stalled for 2.7 s at 1 GB
/// (`pgflip bench`). Written out chunk by chunk, waiting for each, a commit waits behind
/// one chunk at most. The final `fsync` of each file and directory then has nothing left
/// but metadata. It must run before the copy is started: a server recovering from a base
/// backup syncs its whole data directory first (PostgreSQL's `recovery_init_sync_method`).
fn flush_gently(dir: &Path) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd;
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let path = entry.path();
        let kind = entry.file_type()?;
        if kind.is_dir() {
            flush_gently(&path)?;
        } else if kind.is_file() {
            let file = std::fs::File::open(&path)?;
            let len = i64::try_from(file.metadata()?.len())?;
            let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
                | libc::SYNC_FILE_RANGE_WRITE
                | libc::SYNC_FILE_RANGE_WAIT_AFTER;
            for offset in (0..len).step_by(FLUSH_CHUNK as usize) {
                // SAFETY: a plain system call on a descriptor `file` owns for the call.
                let rc =
                    unsafe { libc::sync_file_range(file.as_raw_fd(), offset, FLUSH_CHUNK, flags) };
                if rc != 0 {
                    return Err(std::io::Error::last_os_error())
                        .with_context(|| format!("writing out {}", path.display()));
                }
            }
            file.sync_all()
                .with_context(|| format!("syncing {}", path.display()))?;
        }
    }
    std::fs::File::open(dir)?
        .sync_all()
        .with_context(|| format!("syncing {}", dir.display()))
}

/// A string as a postgresql.conf value.
fn conf_literal(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}
