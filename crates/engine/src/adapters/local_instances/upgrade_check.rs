//! `pg_upgrade --check` before a physical copy: run against the running source and a scratch
//! `initdb` of the new major (`<state>/instances/<color>.check`, removed afterwards), so
//! what would stop `pg_upgrade` is found before anything is touched, naming the objects.

use super::physical::cluster_facts;
use super::{LocalInstances, make_instance_dir};
use crate::pg;
use crate::ports::Addr;
use crate::run_as::{free_port, run_async};
use crate::state::blocking;
use pgflip_core::plan::Member;
use std::path::{Path, PathBuf};

impl LocalInstances {
    /// Why `to` cannot be made from a physical copy of `from`: the tools missing, or what
    /// `pg_upgrade --check` finds in the running source (against a scratch `initdb` of the
    /// new major, removed afterwards; nothing of the source's is changed).
    pub(super) async fn physical_blocker(
        &self,
        from: &Member,
        to: &Member,
    ) -> anyhow::Result<Option<String>> {
        let (old_bin, new_bin) = match self.bins(from, to) {
            Ok(bins) => bins,
            Err(missing) => return Ok(Some(missing.to_string())),
        };
        let Some(file) = self.read_file(from).await else {
            return Ok(Some(format!(
                "{from} is not one of pgflip's instances here"
            )));
        };
        let source = Addr {
            host: "127.0.0.1".into(),
            port: file.port,
        };
        let facts = cluster_facts(&pg::connect(&source, &self.admin, "postgres").await?).await;
        let facts = match facts {
            Ok(facts) => facts,
            Err(e) => return Ok(Some(format!("{e:#}"))),
        };
        let scratch = self
            .state
            .dir("instances")
            .join(format!("{}.check", to.color.as_str()));
        {
            let (scratch, run_as) = (scratch.clone(), self.run_as);
            blocking(move || make_instance_dir(&scratch, run_as)).await?;
        }
        let new = scratch.join("new");
        self.initdb_like(&new_bin, &new, to, &facts).await?;
        let mut check = self.run_as.command(&new_bin.join("pg_upgrade"));
        check
            .current_dir(&scratch)
            .arg("--check")
            .arg("-b")
            .arg(&old_bin)
            .arg("-B")
            .arg(&new_bin)
            .arg("-d")
            .arg(self.dir(from).join("data"))
            .arg("-D")
            .arg(&new)
            .args(["-U", &facts.install_user])
            .args([
                "-p",
                &file.port.to_string(),
                "-P",
                &free_port()?.to_string(),
            ]);
        let outcome = run_async(check).await;
        let findings = match outcome {
            Ok(_) => None,
            Err(e) => Some(check_findings(&new, &e.to_string()).await),
        };
        tokio::fs::remove_dir_all(&scratch).await?;
        Ok(findings.map(|f| format!("pg_upgrade --check: {f}")))
    }
}

/// What `pg_upgrade --check` found, in a line or a few: the lines of its output that say
/// what failed, and the first lines of the reports it wrote (they name the objects).
async fn check_findings(new: &Path, output: &str) -> String {
    let mut found: Vec<String> = output
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.ends_with("ok") && !l.starts_with("Performing"))
        .filter(|l| !l.starts_with(['"', '-']) && !l.starts_with("Checking"))
        .take(3)
        .map(str::to_string)
        .collect();
    let reports = blocking({
        let root = new.join("pg_upgrade_output.d");
        move || {
            let mut lines = Vec::new();
            for entry in walk(&root) {
                if entry.extension().is_some_and(|e| e == "txt") {
                    let text = std::fs::read_to_string(&entry).unwrap_or_default();
                    lines.extend(text.lines().take(5).map(|l| l.trim().to_string()));
                }
            }
            Ok(lines)
        }
    })
    .await
    .unwrap_or_default();
    found.extend(reports);
    found.join(" | ")
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let path = e.path();
            if path.is_dir() {
                out.extend(walk(&path));
            } else {
                out.push(path);
            }
        }
    }
    out
}
