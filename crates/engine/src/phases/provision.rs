//! Provision: the target instance exists and runs (created empty at the target major).

use super::Ctx;
use crate::error::EngineResult;
use crate::ports::{Instances, Router};
use crate::steps::{Learned, Stepped};

pub(super) async fn run<I: Instances, R: Router>(cx: &Ctx<'_, I, R>) -> EngineResult<Stepped> {
    cx.target().await?;
    Ok(Stepped::Done(Learned::Nothing))
}
