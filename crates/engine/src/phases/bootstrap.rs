//! The first sight: either the first instance, created at the wanted major with its
//! databases created empty, or the server the user runs today (the first one the document
//! lists), whose databases must all be there. Then the endpoint, started in front of it.

use super::Phases;
use crate::error::{EngineError, EngineResult};
use crate::pg::{connect, ensure_database};
use crate::ports::{Instances, Router};
use crate::replication as repl;
use pgflip_core::plan::Member;
use pgflip_core::spec::Desired;

pub(super) async fn run<I: Instances, R: Router>(
    parts: &Phases<I, R>,
    member: Member,
    desired: &Desired,
) -> EngineResult<Member> {
    let serving_today = parts.instances.serving_today(desired).await?;
    let member = Member {
        major: serving_today.unwrap_or(member.major),
        ..member
    };
    let addr = parts.instances.ensure(&member, desired).await?;
    let admin = connect(&addr, &parts.admin, "postgres").await?;
    if serving_today.is_some() {
        let mut missing = Vec::new();
        for db in &desired.databases {
            if admin
                .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[db])
                .await?
                .is_none()
            {
                missing.push(format!(
                    "database {db} is not on {addr} (spec.databases lists the databases to carry)"
                ));
            }
        }
        if !missing.is_empty() {
            return Err(EngineError::Refused(missing));
        }
    }
    for db in &desired.databases {
        ensure_database(&admin, db).await?;
        repl::ensure_own_schema(&connect(&addr, &parts.admin, db).await?).await?;
    }
    let endpoint_target = parts.instances.peer_addr(&member, desired, &addr).await?;
    parts.router.ensure(desired, &endpoint_target).await?;
    Ok(member)
}
