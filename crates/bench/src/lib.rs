//! `pgflip bench`: the downtime of a major-version change seen by clients, pgflip against
//! the conventional dump/restore and the in-place `pg_upgrade --link`, on identical data
//! under the same client load, for each database size; plus what pgflip's own steps cost.
//! Writes `<out>/<date>-<host>.{json,md}` and PNG plots, all from this program.

mod env;
mod plot;
mod report;
mod strategies;
mod timeline;
mod traffic;

use anyhow::{Context, bail};
use env::Env;
use pgflip_core::spec::Major;
use serde::Serialize;
use std::path::PathBuf;
use strategies::{Load, Measured};

#[derive(Debug, Clone, clap::Args)]
pub struct BenchOptions {
    /// Database sizes (pgbench data), e.g. 100MB,1GB,5GB.
    #[arg(long, default_value = "100MB,1GB", value_delimiter = ',', value_parser = parse_size_mb)]
    pub sizes: Vec<u64>,
    /// Only the smallest size.
    #[arg(long)]
    pub quick: bool,
    /// pgbench's transactions per second through the endpoint.
    #[arg(long, default_value_t = 1000)]
    pub rate: u32,
    /// pgbench clients.
    #[arg(long, default_value_t = 8)]
    pub clients: u32,
    #[arg(long, default_value_t = 15)]
    pub from: u32,
    /// The in-place strategy needs `pg_upgrade` of this major (17: the full PyPI build).
    #[arg(long, default_value_t = 17)]
    pub to: u32,
    /// pgflip's `spec.copy`: auto (physical for upgrades where it can be done), logical or
    /// physical. Several (`physical,logical`): pgflip runs once per method at each size,
    /// the first is the headline, and the initial copies are compared side by side.
    #[arg(long, default_value = "auto", value_delimiter = ',', value_parser = ["auto", "logical", "physical"])]
    pub copy: Vec<String>,
    /// Where the results go.
    #[arg(long, default_value = "bench/results")]
    pub out: PathBuf,
    /// Where the instances live while they run (removed afterwards).
    #[arg(long, default_value = "bench/work")]
    pub work: PathBuf,
    /// Also write the JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// `100MB`, `1GB`, `512` (MB).
fn parse_size_mb(text: &str) -> Result<u64, String> {
    let t = text.trim().to_ascii_uppercase();
    let (number, factor) = if let Some(n) = t.strip_suffix("GB") {
        (n, 1000)
    } else if let Some(n) = t.strip_suffix("MB") {
        (n, 1)
    } else {
        (t.as_str(), 1)
    };
    match number.trim().parse::<u64>() {
        Ok(n) if n > 0 => Ok(n * factor),
        _ => Err(format!("{text:?} is not a size such as 100MB or 1GB")),
    }
}

/// pgbench's data is about 15 MB per unit of scale (tables and indexes).
const MB_PER_SCALE: u64 = 15;

#[derive(Debug, Clone, Serialize)]
pub struct SizeResult {
    pub size_mb: u64,
    pub pgbench_scale: u32,
    pub pgflip: Measured,
    pub conventional: Measured,
    pub in_place: Measured,
    /// pgflip again with each further `--copy` method.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pgflip_other_copies: Vec<Measured>,
}

impl SizeResult {
    /// Every pgflip run at this size, the headline first.
    pub fn pgflip_runs(&self) -> impl Iterator<Item = &Measured> {
        std::iter::once(&self.pgflip).chain(&self.pgflip_other_copies)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub date: String,
    pub host: String,
    pub from: String,
    pub to: String,
    pub rate_tps: u32,
    pub clients: u32,
    pub sizes: Vec<SizeResult>,
    /// The smallest size's results again, at the top (what `--quick` is read for).
    pub pgflip: Measured,
    pub conventional: Measured,
    pub in_place: Measured,
}

pub async fn run(opts: BenchOptions) -> anyhow::Result<()> {
    let (from, to) = (
        Major::parse(&opts.from.to_string())?,
        Major::parse(&opts.to.to_string())?,
    );
    let mut sizes = opts.sizes.clone();
    sizes.sort_unstable();
    sizes.dedup();
    if opts.quick {
        sizes.truncate(1);
    }
    if sizes.is_empty() {
        bail!("no sizes to run");
    }
    let mut copies = opts.copy.clone();
    copies.dedup();
    if copies.is_empty() {
        bail!("no copy method to run");
    }
    std::fs::create_dir_all(&opts.work)?;
    let work = opts.work.canonicalize()?;
    let load = Load {
        rate: opts.rate,
        clients: opts.clients,
    };
    let mut results = Vec::new();
    for &size_mb in &sizes {
        let scale = (size_mb / MB_PER_SCALE).max(1) as u32;
        println!(
            "== {size_mb} MB (pgbench scale {scale}), {} tx/s, {} clients",
            load.rate, load.clients
        );
        let run_one = async |name: &str, copy: &str| -> anyhow::Result<Measured> {
            let (name, dir) = match name {
                "pgflip" if copies.len() > 1 => {
                    (format!("pgflip ({copy} copy)"), format!("pgflip-{copy}"))
                }
                _ => (name.to_string(), name.to_string()),
            };
            let dir = work.join(format!("{dir}-{size_mb}mb"));
            println!("   {name}: preparing");
            let mut env = Env::create(&dir, from, scale, copy).await?;
            println!("   {name}: running");
            let m = match name.as_str() {
                n if n.starts_with("pgflip") => strategies::pgflip(&mut env, to, load).await,
                "conventional" => strategies::conventional(&mut env, to, load).await,
                _ => strategies::in_place(&mut env, to, load).await,
            }
            .with_context(|| format!("{name} at {size_mb} MB (files in {})", env.dir.display()))?;
            println!(
                "   {name}: downtime {:.1} ms, {} failed, {} lost",
                m.downtime_ms, m.failed_transactions, m.lost_commits
            );
            drop(env);
            let _ = std::fs::remove_dir_all(&dir);
            Ok(m)
        };
        let mut pgflip = Vec::new();
        for copy in &copies {
            pgflip.push(run_one("pgflip", copy).await?);
        }
        let conventional = run_one("conventional", &copies[0]).await?;
        let in_place = run_one("in-place", &copies[0]).await?;
        for run in &mut pgflip {
            let base = run.downtime_ms.max(0.001);
            if let Some(d) = run.pgflip.as_mut() {
                d.ratio_vs_conventional = Some(conventional.downtime_ms / base);
                d.ratio_vs_in_place = Some(in_place.downtime_ms / base);
            }
        }
        let mut pgflip = pgflip.into_iter();
        results.push(SizeResult {
            size_mb,
            pgbench_scale: scale,
            pgflip: pgflip.next().context("no pgflip run")?,
            conventional,
            in_place,
            pgflip_other_copies: pgflip.collect(),
        });
    }
    let first = &results[0];
    let result = BenchResult {
        date: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        host: hostname(),
        from: from.to_string(),
        to: to.to_string(),
        rate_tps: load.rate,
        clients: load.clients,
        pgflip: first.pgflip.clone(),
        conventional: first.conventional.clone(),
        in_place: first.in_place.clone(),
        sizes: results,
    };
    let written = report::write(&result, &opts.out)?;
    if let Some(path) = &opts.json {
        std::fs::write(path, serde_json::to_string_pretty(&result)?)?;
        println!("wrote {}", path.display());
    }
    println!("\n{}", report::markdown(&result));
    for p in written {
        println!("wrote {}", p.display());
    }
    Ok(())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size_mb("100MB"), Ok(100));
        assert_eq!(parse_size_mb("1gb"), Ok(1000));
        assert_eq!(parse_size_mb("64"), Ok(64));
        assert!(parse_size_mb("0MB").is_err());
        assert!(parse_size_mb("lots").is_err());
    }
}
