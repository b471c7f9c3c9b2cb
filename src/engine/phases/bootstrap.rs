//! The first instance: created at the wanted major, its databases created empty, the
//! endpoint started in front of it.

use super::Phases;
use crate::core::plan::Member;
use crate::core::spec::Desired;
use crate::engine::error::EngineResult;
use crate::engine::pg::{connect, ensure_database};
use crate::engine::replication as repl;
use crate::ports::{Instances, Router};

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
