//! The first instance: created at the wanted major, its databases created empty, the
//! endpoint started in front of it.

use super::Phases;
use crate::error::EngineResult;
use crate::pg::{connect, ensure_database};
use crate::ports::{Instances, Router};
use crate::replication as repl;
use pgflip_core::plan::Member;
use pgflip_core::spec::Desired;

pub(super) async fn run<I: Instances, R: Router>(
    parts: &Phases<I, R>,
    member: Member,
    desired: &Desired,
) -> EngineResult<()> {
    let addr = parts.instances.ensure(&member, desired).await?;
    let admin = connect(&addr, &parts.admin, "postgres").await?;
    for db in &desired.databases {
        ensure_database(&admin, db).await?;
        repl::ensure_own_schema(&connect(&addr, &parts.admin, db).await?).await?;
    }
    Ok(parts.router.ensure(desired, &addr).await?)
}
