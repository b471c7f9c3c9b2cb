//! Dumping the source with the PostgreSQL client tools.
//!
//! The tools must be at least the source's major (an older pg_dump refuses a newer
//! server); the lowest such installed version is used, because its output is the least
//! likely to use syntax an older target (a downgrade) does not know.
//!
//! The password reaches the child through `PGPASSWORD` in its environment only: never on
//! the command line (visible to every user in `ps`), and never in an error message (which
//! is why no `std::process::Command` is ever formatted here: its Debug output lists the
//! environment it sets).

use crate::catalog::PGFLIP_SCHEMA;
use crate::ports::{Addr, Credentials};
use crate::run_as::RunAs;
use crate::toolchain::Toolchain;
use anyhow::{Context, anyhow, bail};
use pgflip_core::spec::Major;

/// The user schema of database `db` as SQL: `pg_dump --schema-only`.
///
/// - Owners and privileges are kept: the roles are copied first ([`dump_roles`]), and
///   applications logging in to green need the same ownership and grants they had on blue.
/// - Publications and subscriptions are left out: they belong to the blue side's own
///   replication; pgflip makes green's.
/// - pgflip's own schema is left out: green gets its own.
/// - Tablespaces are left out: they are the storage layout of blue's host, and green's
///   instance has none of them; everything lands in green's default tablespace.
/// - The dump is UTF-8 whatever the database encoding, so it is a Rust string.
/// - Locks are awaited at most 30 s: a long-running ALTER on blue fails the dump with a
///   clear error instead of hanging it.
pub async fn dump_schema(
    toolchain: &Toolchain,
    source: &Addr,
    creds: &Credentials,
    db: &str,
    source_major: Major,
) -> anyhow::Result<String> {
    let (tool_major, dir) = toolchain.client_bin(source_major.0)?;
    let args = vec![
        "--schema-only".to_string(),
        "--no-publications".into(),
        "--no-subscriptions".into(),
        "--no-tablespaces".into(),
        format!("--exclude-schema={PGFLIP_SCHEMA}"),
        "--encoding=UTF8".into(),
        "--lock-wait-timeout=30s".into(),
        format!(
            "--dbname={}",
            crate::pg::conninfo_without_password(source, &creds.user, db)
        ),
    ];
    run_tool(&dir.join("pg_dump"), &args, creds)
        .await
        .map_err(|e| anyhow!("pg_dump {tool_major} of database {db} on {source}: {e:#}"))
}

/// Every role of the source cluster as SQL: `pg_dumpall --roles-only`, with the password
/// verifiers (SCRAM verifiers are portable between servers), so that clients log in to
/// green exactly as they did to blue.
pub async fn dump_roles(
    toolchain: &Toolchain,
    source: &Addr,
    creds: &Credentials,
    source_major: Major,
) -> anyhow::Result<String> {
    let (tool_major, dir) = toolchain.client_bin(source_major.0)?;
    let args = vec![
        "--roles-only".to_string(),
        format!(
            "--dbname={}",
            crate::pg::conninfo_without_password(source, &creds.user, "postgres")
        ),
    ];
    run_tool(&dir.join("pg_dumpall"), &args, creds)
        .await
        .map_err(|e| anyhow!("pg_dumpall {tool_major} --roles-only on {source}: {e:#}"))
}

async fn run_tool(
    program: &std::path::Path,
    args: &[String],
    creds: &Credentials,
) -> anyhow::Result<String> {
    let mut cmd = RunAs::detect()?.command(program);
    cmd.args(args)
        // Session defaults from the caller's environment must not change the dump.
        .env_remove("PGOPTIONS")
        .env_remove("PGSERVICE")
        .env("PGPASSWORD", &creds.password);
    let output = tokio::process::Command::from(cmd)
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("running {}", program.display()))?;
    if !output.status.success() {
        bail!(
            "{} failed ({}): {}",
            program.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    String::from_utf8(output.stdout).context("the dump is not valid UTF-8")
}
