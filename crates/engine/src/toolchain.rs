//! Finds the PostgreSQL and PgBouncer binaries: in the project-local `.toolchain/` that
//! `scripts/setup-toolchain.sh` fills, in `$PGFLIP_TOOLCHAIN`, or in the usual system places.

use anyhow::{Context, bail};
use std::path::{Path, PathBuf};

/// How to install what is missing.
const SETUP_HINT: &str = "run `make setup` (scripts/setup-toolchain.sh) to install it";
/// The same, for several tools.
pub const SETUP_HINT_ALL: &str = "run `make setup` (scripts/setup-toolchain.sh) to install them";

#[derive(Debug, Clone)]
pub struct Toolchain {
    roots: Vec<PathBuf>,
    /// Whether `$PGFLIP_PG<major>_BIN` and the distributions' directories count too.
    system: bool,
    /// The major and bin directory of the `pg_config` on PATH (a source build, Homebrew,
    /// a distribution's default), asked once at discovery.
    pg_config: Option<(u32, PathBuf)>,
}

impl Toolchain {
    /// Looks where the tools may be, off the async runtime: asking `pg_config` runs a process.
    pub async fn discover() -> Toolchain {
        match tokio::task::spawn_blocking(Toolchain::discover_blocking).await {
            Ok(toolchain) => toolchain,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }

    /// The same, for a thread that may block (a `spawn_blocking` closure, a synchronous tool).
    pub fn discover_blocking() -> Toolchain {
        let mut roots = Vec::new();
        if let Ok(p) = std::env::var("PGFLIP_TOOLCHAIN") {
            roots.push(PathBuf::from(p));
        }
        if let Ok(exe) = std::env::current_exe() {
            // target/{debug,release}/pgflip (or …/deps/test-binary) → repository root
            for anc in exe.ancestors().skip(1).take(4) {
                roots.push(anc.join(".toolchain"));
            }
        }
        if let Ok(cwd) = std::env::current_dir() {
            for anc in cwd.ancestors().take(4) {
                roots.push(anc.join(".toolchain"));
            }
        }
        roots.retain(|r| r.is_dir());
        roots.dedup();
        Toolchain {
            roots,
            system: true,
            pg_config: pg_config_on_path(),
        }
    }

    /// Only what these roots hold (laid out like `.toolchain/`: `pg<major>/bin`,
    /// `pg<major>full/bin`), neither the environment nor the system's directories.
    pub fn from_roots(roots: Vec<PathBuf>) -> Toolchain {
        Toolchain {
            roots,
            system: false,
            pg_config: None,
        }
    }

    /// Directory with `postgres`, `initdb` and `pg_ctl` of this major.
    pub fn server_bin(&self, major: u32) -> anyhow::Result<PathBuf> {
        for dir in self.candidates(major) {
            if ["postgres", "initdb", "pg_ctl"]
                .iter()
                .all(|b| dir.join(b).is_file())
            {
                return Ok(dir);
            }
        }
        bail!("PostgreSQL {major} is not installed: {SETUP_HINT}")
    }

    /// `pg_dump` / `pg_dumpall` / `psql` able to read a server of `source_major` (they must be
    /// at least that major): the lowest such major installed.
    pub fn client_bin(&self, source_major: u32) -> anyhow::Result<(u32, PathBuf)> {
        for major in source_major..=30 {
            for dir in self.candidates(major) {
                if dir.join("pg_dump").is_file() && dir.join("pg_dumpall").is_file() {
                    return Ok((major, dir));
                }
            }
        }
        bail!(
            "no pg_dump of version {source_major} or newer is installed (it must be at least the source server's major): {SETUP_HINT}"
        )
    }

    /// A full install of this major with `pg_upgrade` beside its server (the in-place
    /// baseline of the benchmark).
    pub fn upgrade_bin(&self, major: u32) -> anyhow::Result<PathBuf> {
        self.candidates(major)
            .into_iter()
            .find(|dir| {
                ["pg_upgrade", "postgres", "pg_ctl"]
                    .iter()
                    .all(|b| dir.join(b).is_file())
            })
            .with_context(|| {
                format!("pg_upgrade of PostgreSQL {major} is not installed: {SETUP_HINT}")
            })
    }

    /// What a physical copy from `from` upgraded to `to` runs: the old major's server with
    /// `pg_controldata` (pg_upgrade reads the old cluster with them), and the new major's
    /// `initdb`, `pg_upgrade` and `pg_basebackup`. Err: what is missing, in one line.
    pub fn physical_upgrade_bins(&self, from: u32, to: u32) -> Result<(PathBuf, PathBuf), String> {
        let find = |major: u32, tools: &[&str]| {
            self.candidates(major)
                .into_iter()
                .find(|dir| tools.iter().all(|b| dir.join(b).is_file()))
        };
        let old = find(from, &["postgres", "pg_ctl", "pg_controldata"]);
        let new = find(
            to,
            &[
                "postgres",
                "pg_ctl",
                "initdb",
                "pg_upgrade",
                "pg_basebackup",
            ],
        );
        match (old, new) {
            (Some(old), Some(new)) => Ok((old, new)),
            (None, _) => Err(format!(
                "no install of PostgreSQL {from} with pg_controldata beside its server here"
            )),
            (_, None) => Err(format!(
                "no install of PostgreSQL {to} with pg_upgrade and pg_basebackup here"
            )),
        }
    }

    /// Extension control files shipped with this major's server.
    pub fn extension_dir(&self, major: u32) -> Option<PathBuf> {
        let bin = self.server_bin(major).ok()?;
        let share = bin.parent()?.join("share");
        [
            share.join("postgresql/extension"),
            share.join("extension"),
            PathBuf::from(format!("/usr/share/postgresql/{major}/extension")),
        ]
        .into_iter()
        .find(|p| p.is_dir())
    }

    pub fn pgbouncer(&self) -> anyhow::Result<PathBuf> {
        find_in_path("pgbouncer")
            .or_else(|| Some(PathBuf::from("/usr/sbin/pgbouncer")).filter(|p| p.is_file()))
            .with_context(|| format!("PgBouncer is not installed: {SETUP_HINT}"))
    }

    /// `pgbench` of any major (the TPC-B-like load generator).
    pub fn pgbench(&self) -> anyhow::Result<PathBuf> {
        for major in [15, 17, 16, 18] {
            for dir in self.candidates(major) {
                if dir.join("pgbench").is_file() {
                    return Ok(dir.join("pgbench"));
                }
            }
        }
        bail!("pgbench is not installed: {SETUP_HINT}")
    }

    fn candidates(&self, major: u32) -> Vec<PathBuf> {
        let mut out = Vec::new();
        if self.system
            && let Ok(p) = std::env::var(format!("PGFLIP_PG{major}_BIN"))
        {
            out.push(PathBuf::from(p));
        }
        for root in &self.roots {
            // The npm builds (server only) and the PyPI wheels (full: `pg<major>full` links
            // to the wheel's `pginstall/`, whose `bin/` holds the tools).
            out.push(root.join(format!("pg{major}/bin")));
            out.push(root.join(format!("pg{major}full/bin")));
        }
        if self.system {
            // Debian and Ubuntu (apt.postgresql.org too), then RHEL and its kin (PGDG).
            out.push(PathBuf::from(format!("/usr/lib/postgresql/{major}/bin")));
            out.push(PathBuf::from(format!("/usr/pgsql-{major}/bin")));
            if let Some((m, bin)) = &self.pg_config
                && *m == major
            {
                out.push(bin.clone());
            }
        }
        out
    }
}

/// `pg_config --version` and `--bindir` of the `pg_config` on PATH, if there is one.
fn pg_config_on_path() -> Option<(u32, PathBuf)> {
    let pg_config = find_in_path("pg_config")?;
    let ask = |flag: &str| {
        let out = std::process::Command::new(&pg_config)
            .arg(flag)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    // "PostgreSQL 16.4 (Debian 16.4-1)"
    let version = ask("--version")?;
    let major = version
        .split_whitespace()
        .nth(1)?
        .split('.')
        .next()?
        .parse()
        .ok()?;
    Some((major, PathBuf::from(ask("--bindir")?)))
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Library directory next to a bin directory (the npm and PyPI builds keep theirs there).
pub fn lib_dir(bin: &Path) -> Option<PathBuf> {
    bin.parent().map(|p| p.join("lib")).filter(|p| p.is_dir())
}
