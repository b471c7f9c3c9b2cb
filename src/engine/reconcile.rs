//! The reconciler: observe → decide (pure, [`crate::core::plan::decide`]) → record → act.
//! One call runs at most one step; the caller loops. Every step is idempotent and the
//! record is saved before it is taken, so a killed pgflip resumes where it stopped.

use super::pg::{Addr, Credentials, connect, ident};
use super::replication::{self as repl, link_name};
use super::switchover::{self, Sides};
use super::{fence, preflight, schema, verify};
use crate::adapters::{Instances, Journal, Router, StatusSink};
use crate::core::plan::{
    Attempt, AttemptKind, Decision, Member, Phase, Record, Standby, SwitchRecord, Wanted, decide,
    short,
};
use crate::core::report::{State, Update};
use crate::core::spec::{Desired, Verification};
use crate::failpoint;
use crate::state::now_ms;
use crate::toolchain::Toolchain;
use anyhow::Context;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio_postgres::Client;

/// How a step went wrong.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// The attempt cannot go on (preflight refusal, schema that does not load, verification
    /// mismatch, schema changed after the copy…): it is cleaned up, blue keeps serving, and
    /// the revision is not retried.
    #[error("{0}")]
    Final(String),
    /// Anything else (a connection dropped, a server restarting): retried.
    #[error(transparent)]
    Retry(#[from] anyhow::Error),
}

fn final_err(msg: impl Into<String>) -> StepError {
    StepError::Final(msg.into())
}

/// What a step achieved.
enum Stepped {
    /// The phase is complete.
    Done,
    /// Still under way (initial sync, lag gate): message and optional percentage.
    Waiting(String, Option<f64>),
}

/// Whether the caller should call again right away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    Busy,
    Idle,
}

/// Consecutive transient failures of one phase after which the attempt fails for good.
const MAX_RETRIES: u32 = 5;
/// Pauses that hit their bound after which the attempt fails for good.
const MAX_PAUSE_FAILURES: u32 = 3;

pub struct Engine<I, R, S, J> {
    pub instances: I,
    pub router: R,
    pub sink: S,
    pub journal: J,
    pub toolchain: Toolchain,
    pub admin: Credentials,
    last_report: Mutex<Option<(String, Instant)>>,
    retries: Mutex<u32>,
}

impl<I: Instances, R: Router, S: StatusSink, J: Journal> Engine<I, R, S, J> {
    pub fn new(
        instances: I,
        router: R,
        sink: S,
        journal: J,
        toolchain: Toolchain,
        admin: Credentials,
    ) -> Self {
        Engine {
            instances,
            router,
            sink,
            journal,
            toolchain,
            admin,
            last_report: Mutex::new(None),
            retries: Mutex::new(0),
        }
    }

    /// Adopts what runs after a restart: the serving and standby instances and the endpoint.
    pub async fn adopt(&self, record: &Record, desired: &Desired) -> anyhow::Result<()> {
        let Some(serving) = record.serving else {
            return Ok(());
        };
        let addr = self.instances.ensure(&serving).await?;
        if let Some(s) = &record.standby {
            self.instances.ensure(&s.member).await?;
        }
        if let Some(a) = &record.attempt
            && self.instances.addr(&a.to).await?.is_some()
        {
            self.instances.ensure(&a.to).await?;
        }
        self.router.ensure(&desired.databases, &addr).await
    }

    /// Runs one step towards `wanted`.
    pub async fn reconcile(
        &self,
        record: &mut Record,
        wanted: &Wanted<'_>,
    ) -> anyhow::Result<Progress> {
        let desired = wanted.desired;
        match decide(record, wanted, now_ms()) {
            Decision::Idle => Ok(Progress::Idle),
            Decision::Bootstrap(member) => {
                self.bootstrap(record, member, desired, wanted.revision)
                    .await?;
                Ok(Progress::Busy)
            }
            Decision::Begin(attempt) => {
                tracing::info!(revision = short(&attempt.revision), from = %attempt.from, to = %attempt.to, kind = ?attempt.kind, "starting");
                let update = Update::new(
                    State::Pending,
                    Phase::Preflight.as_str(),
                    format!(
                        "{} {} → {} started",
                        attempt.direction(),
                        attempt.from,
                        attempt.to
                    ),
                )
                .between(attempt.from.major, attempt.to.major);
                let revision = attempt.revision.clone();
                record.attempt = Some(attempt);
                self.journal.save(record).await?;
                self.report(&revision, update).await;
                Ok(Progress::Busy)
            }
            Decision::Abandon { reason } => {
                let attempt = record.attempt.clone().expect("abandon has an attempt");
                tracing::info!(%reason, "abandoning attempt");
                self.clean_up_attempt(&attempt, desired).await?;
                record.attempt = None;
                self.journal.save(record).await?;
                self.report(
                    &attempt.revision,
                    Update::failure(attempt.phase.as_str(), reason)
                        .between(attempt.from.major, attempt.to.major),
                )
                .await;
                Ok(Progress::Busy)
            }
            Decision::Decommission { reason } => {
                let standby = record.standby.clone().expect("decommission has a standby");
                let serving = record
                    .serving
                    .expect("a standby implies a serving instance");
                tracing::info!(%reason, "decommissioning {}", standby.member);
                self.decommission(serving, &standby.member, desired).await?;
                record.standby = None;
                self.journal.save(record).await?;
                Ok(Progress::Busy)
            }
            Decision::Run(phase) => {
                failpoint::hit(&format!("before:{phase}"));
                let started = Instant::now();
                let result = self.run_phase(record, desired, phase).await;
                self.after_phase(record, desired, phase, started, result)
                    .await
            }
        }
    }

    async fn after_phase(
        &self,
        record: &mut Record,
        desired: &Desired,
        phase: Phase,
        started: Instant,
        result: Result<Stepped, StepError>,
    ) -> anyhow::Result<Progress> {
        let Some(attempt) = record.attempt.as_mut() else {
            // The Done phase completed the attempt and cleared it.
            return Ok(Progress::Busy);
        };
        *attempt
            .timings_ms
            .entry(phase.as_str().to_string())
            .or_default() += started.elapsed().as_millis() as u64;
        let (from, to, revision) = (
            attempt.from.major,
            attempt.to.major,
            attempt.revision.clone(),
        );
        match result {
            Ok(Stepped::Done) => {
                *self.retries.lock().unwrap() = 0;
                let next = phase.next(attempt.kind);
                attempt.phase = next;
                self.journal.save(record).await?;
                tracing::info!(phase = %next, "phase");
                if next != Phase::Done {
                    self.report(
                        &revision,
                        Update::new(
                            State::Pending,
                            next.as_str(),
                            next.as_str().replace('-', " "),
                        )
                        .between(from, to),
                    )
                    .await;
                }
                Ok(Progress::Busy)
            }
            Ok(Stepped::Waiting(message, percent)) => {
                let mut u = Update::new(State::Pending, phase.as_str(), message).between(from, to);
                u.progress_percent = percent;
                self.report(&revision, u).await;
                Ok(Progress::Busy)
            }
            Err(StepError::Final(reason)) => {
                self.fail(record, desired, reason).await?;
                Ok(Progress::Busy)
            }
            Err(StepError::Retry(e)) => {
                let n = {
                    let mut r = self.retries.lock().unwrap();
                    *r += 1;
                    *r
                };
                tracing::warn!(phase = %phase, attempt = n, error = %format!("{e:#}"), "step failed, retrying");
                if n >= MAX_RETRIES {
                    *self.retries.lock().unwrap() = 0;
                    self.fail(record, desired, format!("{phase} failed {n} times: {e:#}"))
                        .await?;
                } else {
                    tokio::time::sleep(Duration::from_millis(500 * u64::from(n))).await;
                }
                Ok(Progress::Busy)
            }
        }
    }

    /// The attempt failed for good: clean up, keep the source serving, tell the commit.
    async fn fail(
        &self,
        record: &mut Record,
        desired: &Desired,
        reason: String,
    ) -> anyhow::Result<()> {
        let attempt = record.attempt.clone().expect("failing an attempt");
        tracing::error!(revision = short(&attempt.revision), %reason, "attempt failed");
        if !attempt.phase.is_committed() || record.serving == Some(attempt.from) {
            self.clean_up_attempt(&attempt, desired).await?;
        }
        record.attempt = None;
        record.failed_revision = Some(attempt.revision.clone());
        record.failed_reason = Some(reason.clone());
        self.journal.save(record).await?;
        self.report(
            &attempt.revision,
            Update::failure(attempt.phase.as_str(), reason)
                .between(attempt.from.major, attempt.to.major),
        )
        .await;
        Ok(())
    }

    async fn run_phase(
        &self,
        record: &mut Record,
        desired: &Desired,
        phase: Phase,
    ) -> Result<Stepped, StepError> {
        let attempt = record.attempt.clone().expect("running an attempt");
        let source = self.instances.ensure(&attempt.from).await?;
        match phase {
            Phase::Preflight => self.preflight(record, desired, &source).await,
            Phase::Provision => {
                self.instances.ensure(&attempt.to).await?;
                Ok(Stepped::Done)
            }
            Phase::CopySchema => {
                let target = self.instances.ensure(&attempt.to).await?;
                let fp = self
                    .copy_schema(&attempt, desired, &source, &target)
                    .await?;
                record.attempt.as_mut().unwrap().source_fingerprint = Some(fp);
                Ok(Stepped::Done)
            }
            Phase::Replicate => {
                let target = self.instances.ensure(&attempt.to).await?;
                for db in &desired.databases {
                    let name = link_name(attempt.from.color, attempt.to.color, db);
                    let src = connect(&source, &self.admin, db).await?;
                    let tgt = connect(&target, &self.admin, db).await?;
                    repl::ensure_publication(&src, &name).await?;
                    repl::ensure_subscription(
                        &tgt,
                        &name,
                        &source,
                        &self.admin,
                        db,
                        repl::Start::CopyAll,
                    )
                    .await?;
                }
                Ok(Stepped::Done)
            }
            Phase::InitialSync => self.initial_sync(&attempt, desired).await,
            Phase::CatchUp => self.catch_up(&attempt, desired, &source).await,
            Phase::Verify => self.verify(record, desired, &source).await,
            Phase::Switchover => self.switchover(record, desired, &source).await,
            Phase::ReverseSync => {
                let target = self.instances.ensure(&attempt.to).await?;
                switchover::finish(&self.sides(&attempt, desired, &source, &target)).await?;
                Ok(Stepped::Done)
            }
            Phase::Done => {
                let m = attempt.switch.clone().unwrap_or_default();
                let total: u64 = attempt.timings_ms.values().sum();
                record.history.push(SwitchRecord {
                    revision: attempt.revision.clone(),
                    from: attempt.from,
                    to: attempt.to,
                    kind: attempt.kind,
                    finished_ms: now_ms(),
                    total_ms: total,
                    pause_ms: m.pause_ms,
                    verified_tables: attempt.verified_tables.unwrap_or(0),
                    pause_breakdown: m.clone(),
                    timings_ms: attempt.timings_ms.clone(),
                });
                record.attempt = None;
                record.failed_revision = None;
                record.failed_reason = None;
                self.journal.save(record).await.map_err(StepError::Retry)?;
                let tables = attempt.verified_tables.unwrap_or(0);
                let plural = if tables == 1 { "" } else { "s" };
                let mut u = Update::new(
                    State::Success,
                    Phase::Done.as_str(),
                    format!(
                        "{} now serves; pause {:.1} ms; {tables} table{plural} verified",
                        attempt.to, m.pause_ms,
                    ),
                )
                .between(attempt.from.major, attempt.to.major);
                u.pause_ms = Some(m.pause_ms);
                u.verified_tables = attempt.verified_tables;
                u.timings_ms = attempt.timings_ms.clone();
                self.report(&attempt.revision, u).await;
                Ok(Stepped::Done)
            }
        }
    }

    async fn bootstrap(
        &self,
        record: &mut Record,
        member: Member,
        desired: &Desired,
        revision: &str,
    ) -> anyhow::Result<()> {
        tracing::info!(%member, "bootstrapping");
        let addr = self.instances.ensure(&member).await?;
        let admin = connect(&addr, &self.admin, "postgres").await?;
        for db in &desired.databases {
            if admin
                .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[db])
                .await?
                .is_none()
            {
                admin
                    .batch_execute(&format!("CREATE DATABASE {}", ident(db)))
                    .await?;
            }
            repl::ensure_own_schema(&connect(&addr, &self.admin, db).await?).await?;
        }
        self.router.ensure(&desired.databases, &addr).await?;
        record.serving = Some(member);
        self.journal.save(record).await?;
        self.report(
            revision,
            Update::new(
                State::Success,
                "bootstrap",
                format!("{member} serves on port {}", desired.endpoint_port),
            ),
        )
        .await;
        Ok(())
    }

    async fn preflight(
        &self,
        record: &mut Record,
        desired: &Desired,
        source: &Addr,
    ) -> Result<Stepped, StepError> {
        let attempt = record.attempt.clone().unwrap();
        if let Err(e) = self.toolchain.server_bin(attempt.to.major.0) {
            return Err(final_err(format!("{e:#}")));
        }
        if attempt.kind == AttemptKind::Full
            && let Err(e) = self.toolchain.client_bin(attempt.from.major.0)
        {
            return Err(final_err(format!("{e:#}")));
        }
        let mut refusals = Vec::new();
        let mut warnings = Vec::new();
        let mut findings = Vec::new();
        for db in &desired.databases {
            let client = connect(source, &self.admin, db).await?;
            let f = preflight::check(
                &client,
                db,
                attempt.to.major,
                desired.unsupported,
                &self.toolchain,
            )
            .await?;
            refusals.extend(f.refusals.iter().map(|r| format!("{db}: {r}")));
            warnings.extend(f.warnings.iter().map(|w| format!("{db}: {w}")));
            findings.push((client, f));
        }
        if attempt.kind == AttemptKind::SwitchBack {
            let fp = self.fingerprint(source, desired).await?;
            if Some(&fp) != attempt.source_fingerprint.as_ref() {
                refusals.push(format!("the schema on {} changed after the switch (DDL is not replicated); the retained {} cannot take over", attempt.from, attempt.to));
            }
        }
        if !refusals.is_empty() {
            return Err(final_err(format!(
                "preflight refused: {}",
                refusals.join("; ")
            )));
        }
        // Passed: now (and only now) prepare the source.
        for (client, f) in &findings {
            preflight::ensure_replica_identity_full(client, &f.needs_replica_identity_full).await?;
            repl::ensure_own_schema(client).await?;
        }
        for w in &warnings {
            tracing::warn!("{w}");
        }
        record.attempt.as_mut().unwrap().warnings = warnings;
        Ok(Stepped::Done)
    }

    /// Roles, then each database's schema, in one transaction per database. Returns the
    /// source's schema fingerprints taken before the dump (a later change blocks the switch).
    async fn copy_schema(
        &self,
        attempt: &Attempt,
        desired: &Desired,
        source: &Addr,
        target: &Addr,
    ) -> Result<String, StepError> {
        let tgt_admin = connect(target, &self.admin, "postgres").await?;
        self.copy_roles(attempt, source, &tgt_admin)
            .await
            .map_err(|e| {
                final_err(format!(
                    "the roles of {} do not load on PostgreSQL {}: {e:#}",
                    attempt.from, attempt.to.major
                ))
            })?;
        let mut fingerprints = Vec::new();
        for db in &desired.databases {
            if tgt_admin
                .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[db])
                .await
                .map_err(anyhow::Error::from)?
                .is_none()
            {
                tgt_admin
                    .batch_execute(&format!("CREATE DATABASE {}", ident(db)))
                    .await
                    .map_err(anyhow::Error::from)?;
            }
            let fp = schema::fingerprint(&connect(source, &self.admin, db).await?).await?;
            let sql =
                schema::dump_schema(&self.toolchain, source, &self.admin, db, attempt.from.major)
                    .await?;
            let sql = schema::prepare_for_target(&sql, attempt.to.major);
            let tgt = connect(target, &self.admin, db).await?;
            schema::load_once(&tgt, &sql, &fp)
                .await
                .map_err(|e| final_err(format!("database {db}: {e:#}")))?;
            repl::ensure_own_schema(&tgt).await?;
            fingerprints.push(format!("{db}={fp}"));
        }
        Ok(fingerprints.join(";"))
    }

    /// Every role of the source, with its password, onto the target (idempotent).
    async fn copy_roles(
        &self,
        attempt: &Attempt,
        source: &Addr,
        target_admin: &Client,
    ) -> anyhow::Result<()> {
        let roles =
            schema::dump_roles(&self.toolchain, source, &self.admin, attempt.from.major).await?;
        schema::load_roles(
            target_admin,
            &schema::prepare_for_target(&roles, attempt.to.major),
        )
        .await
    }

    async fn initial_sync(
        &self,
        attempt: &Attempt,
        desired: &Desired,
    ) -> Result<Stepped, StepError> {
        let target = self.instances.ensure(&attempt.to).await?;
        let (mut ready, mut total) = (0, 0);
        for db in &desired.databases {
            let tgt = connect(&target, &self.admin, db).await?;
            let (r, t) =
                repl::sync_progress(&tgt, &link_name(attempt.from.color, attempt.to.color, db))
                    .await?;
            ready += r;
            total += t;
        }
        if ready == total {
            return Ok(Stepped::Done);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        let pct = if total == 0 {
            100.0
        } else {
            100.0 * ready as f64 / total as f64
        };
        Ok(Stepped::Waiting(
            format!("initial sync {pct:.0}% ({ready}/{total} tables)"),
            Some(pct),
        ))
    }

    /// The lag gate: every database's link within `maxLagBytes`.
    async fn catch_up(
        &self,
        attempt: &Attempt,
        desired: &Desired,
        source: &Addr,
    ) -> Result<Stepped, StepError> {
        let mut worst = 0i64;
        for db in &desired.databases {
            let src = connect(source, &self.admin, db).await?;
            let lag = repl::lag_bytes(&src, &link_name(attempt.from.color, attempt.to.color, db))
                .await?
                .context("the replication slot is missing")?;
            worst = worst.max(lag);
        }
        if worst as u64 <= desired.switchover.max_lag_bytes {
            return Ok(Stepped::Done);
        }
        let waited = attempt
            .timings_ms
            .get(Phase::CatchUp.as_str())
            .copied()
            .unwrap_or(0);
        if Duration::from_millis(waited) > desired.switchover.catch_up_timeout {
            return Err(final_err(format!(
                "{} did not catch up within {:?} (still {worst} bytes behind)",
                attempt.to, desired.switchover.catch_up_timeout
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok(Stepped::Waiting(
            format!("catching up: {worst} bytes behind"),
            None,
        ))
    }

    async fn verify(
        &self,
        record: &mut Record,
        desired: &Desired,
        source: &Addr,
    ) -> Result<Stepped, StepError> {
        let attempt = record.attempt.clone().unwrap();
        self.check_schema_unchanged(&attempt, desired, source)
            .await?;
        let target = self.instances.ensure(&attempt.to).await?;
        let mut tables = 0;
        if desired.verification != Verification::None {
            for db in &desired.databases {
                let src = connect(source, &self.admin, db).await?;
                let tgt = connect(&target, &self.admin, db).await?;
                let list = verify::list_tables(&src).await?;
                consistent_cut(
                    source,
                    &self.admin,
                    db,
                    &src,
                    &tgt,
                    &list,
                    desired.switchover.pause_timeout,
                )
                .await?;
                let report = verify::compare(&src, &tgt, &list, desired.verification).await?;
                let _ = tokio::join!(src.batch_execute("COMMIT"), tgt.batch_execute("COMMIT"));
                if !report.mismatches.is_empty() {
                    return Err(final_err(format!(
                        "verification failed in database {db}: {}",
                        report.mismatches.join("; ")
                    )));
                }
                tables += report.tables;
            }
        }
        // Materialized views are not replicated: refresh them on the target before it serves.
        for db in &desired.databases {
            let tgt = connect(&target, &self.admin, db).await?;
            for row in tgt
                .query(
                    "SELECT schemaname, matviewname FROM pg_matviews WHERE schemaname <> '_pgflip'",
                    &[],
                )
                .await
                .map_err(anyhow::Error::from)?
            {
                let (s, n): (String, String) = (row.get(0), row.get(1));
                tgt.batch_execute(&format!(
                    "REFRESH MATERIALIZED VIEW {}",
                    super::pg::qualified(&s, &n)
                ))
                .await
                .map_err(anyhow::Error::from)?;
            }
        }
        record.attempt.as_mut().unwrap().verified_tables = Some(tables);
        Ok(Stepped::Done)
    }

    async fn switchover(
        &self,
        record: &mut Record,
        desired: &Desired,
        source: &Addr,
    ) -> Result<Stepped, StepError> {
        let attempt = record.attempt.clone().unwrap();
        let target = self.instances.ensure(&attempt.to).await?;
        let sides = self.sides(&attempt, desired, source, &target);
        let moved = switchover::recover(&self.router, &self.journal, record, &sides).await?;
        if !moved {
            self.check_schema_unchanged(&attempt, desired, source)
                .await?;
            // Roles created on the source since the copy must exist on the target.
            self.copy_roles(
                &attempt,
                source,
                &connect(&target, &self.admin, "postgres").await?,
            )
            .await?;
            match switchover::run(&self.router, &self.journal, record, &sides).await? {
                Ok(m) => {
                    tracing::info!(
                        pause_ms = m.pause_ms,
                        drain_ms = m.drain_ms,
                        catch_up_ms = m.catch_up_ms,
                        sequences_ms = m.sequences_ms,
                        "switched"
                    );
                    record.attempt.as_mut().unwrap().switch = Some(m);
                }
                Err(aborted) => {
                    let a = record.attempt.as_mut().unwrap();
                    a.pause_failures += 1;
                    a.phase = Phase::CatchUp;
                    let n = a.pause_failures;
                    self.journal.save(record).await?;
                    if n >= MAX_PAUSE_FAILURES {
                        return Err(final_err(format!("{aborted} ({n} times; giving up)")));
                    }
                    self.report(
                        &attempt.revision,
                        Update::failure(Phase::Switchover.as_str(), format!("{aborted}; retrying"))
                            .between(attempt.from.major, attempt.to.major),
                    )
                    .await;
                    tokio::time::sleep(Duration::from_secs(u64::from(n))).await;
                    return Ok(Stepped::Waiting("retrying the switchover".into(), None));
                }
            }
        }
        // The old source is now the standby, kept in reverse sync for the retention time.
        let fp = self.fingerprint(&target, desired).await?;
        record.standby = Some(Standby {
            member: attempt.from,
            retain_until_ms: now_ms() + desired.retain_previous.as_millis() as u64,
            serving_fingerprint: fp,
        });
        Ok(Stepped::Done)
    }

    async fn check_schema_unchanged(
        &self,
        attempt: &Attempt,
        desired: &Desired,
        source: &Addr,
    ) -> Result<(), StepError> {
        let now = self.fingerprint(source, desired).await?;
        if attempt.source_fingerprint.as_deref() != Some(now.as_str()) {
            return Err(final_err(format!(
                "the schema on {} changed after it was copied (DDL is not replicated): the switch is blocked and {} keeps serving; push a new commit to start over",
                attempt.from, attempt.from
            )));
        }
        Ok(())
    }

    async fn fingerprint(&self, addr: &Addr, desired: &Desired) -> anyhow::Result<String> {
        let mut parts = Vec::new();
        for db in &desired.databases {
            let c = connect(addr, &self.admin, db).await?;
            parts.push(format!("{db}={}", schema::fingerprint(&c).await?));
        }
        Ok(parts.join(";"))
    }

    fn sides<'a>(
        &'a self,
        attempt: &Attempt,
        desired: &'a Desired,
        source: &'a Addr,
        target: &'a Addr,
    ) -> Sides<'a> {
        Sides {
            from: attempt.from,
            to: attempt.to,
            source,
            target,
            admin: &self.admin,
            databases: &desired.databases,
            pause_timeout: desired.switchover.pause_timeout,
        }
    }

    /// Drops what an attempt that never switched created. Blue keeps serving untouched.
    async fn clean_up_attempt(&self, attempt: &Attempt, desired: &Desired) -> anyhow::Result<()> {
        let source = self.instances.ensure(&attempt.from).await?;
        let target = self.instances.addr(&attempt.to).await?;
        if target.is_some() {
            // Make sure it runs, so its subscriptions can be dropped cleanly.
            self.instances.ensure(&attempt.to).await.ok();
        }
        for db in &desired.databases {
            let forward = link_name(attempt.from.color, attempt.to.color, db);
            let reverse = link_name(attempt.to.color, attempt.from.color, db);
            if let Some(t) = &target
                && let Ok(tgt) = connect(t, &self.admin, db).await
            {
                repl::drop_subscription(&tgt, &forward).await?;
                repl::drop_slot(&tgt, &reverse).await?;
                repl::drop_publication(&tgt, &reverse).await?;
            }
            let src = connect(&source, &self.admin, db).await?;
            repl::drop_slot(&src, &forward).await?;
            repl::drop_publication(&src, &forward).await?;
        }
        match attempt.kind {
            AttemptKind::Full => self.instances.remove(&attempt.to).await?,
            AttemptKind::SwitchBack => {
                // The standby stays in reverse sync, fenced, as before the attempt.
                if let Some(t) = &target {
                    fence::fence(&connect(t, &self.admin, "postgres").await?).await?;
                    for db in &desired.databases {
                        let tgt = connect(t, &self.admin, db).await?;
                        let back = link_name(attempt.from.color, attempt.to.color, db);
                        repl::set_subscription_enabled(&tgt, &back, true).await?;
                    }
                }
            }
        }
        Ok(())
    }

    async fn decommission(
        &self,
        serving: Member,
        standby: &Member,
        desired: &Desired,
    ) -> anyhow::Result<()> {
        let serving_addr = self.instances.ensure(&serving).await?;
        let standby_addr = self.instances.addr(standby).await?;
        for db in &desired.databases {
            let link = link_name(serving.color, standby.color, db);
            if let Some(a) = &standby_addr
                && let Ok(c) = connect(a, &self.admin, db).await
            {
                repl::drop_subscription(&c, &link).await?;
            }
            let src = connect(&serving_addr, &self.admin, db).await?;
            repl::drop_slot(&src, &link).await?;
            repl::drop_publication(&src, &link).await?;
            repl::drop_publication(&src, &link_name(standby.color, serving.color, db)).await?;
        }
        self.instances.remove(standby).await
    }

    /// Publishes an update; pending updates of one phase at most every 2 s. A sink failure
    /// is logged, never fatal: the databases matter more than the report.
    async fn report(&self, revision: &str, update: Update) {
        if update.state == State::Pending {
            let key = format!("{revision}/{}", update.phase);
            let mut last = self.last_report.lock().unwrap();
            if let Some((k, at)) = last.as_ref()
                && *k == key
                && at.elapsed() < Duration::from_secs(2)
                && update.progress_percent != Some(100.0)
            {
                return;
            }
            *last = Some((key, Instant::now()));
        }
        tracing::info!(revision = short(revision), state = update.state.as_str(), phase = %update.phase, "{}", update.message);
        if let Err(e) = self.sink.publish(revision, &update).await {
            tracing::warn!(error = %format!("{e:#}"), "could not publish the status");
        }
    }
}

/// Puts both clients in REPEATABLE READ snapshots holding exactly the same transactions:
/// writes to the compared tables are held for a moment (EXCLUSIVE lock: readers go on)
/// while the source's snapshot is taken and a marker proves the target has applied
/// everything committed before it. The caller compares, then ends both transactions.
async fn consistent_cut(
    source: &Addr,
    admin: &Credentials,
    db: &str,
    src: &Client,
    tgt: &Client,
    tables: &[(String, String)],
    bound: Duration,
) -> anyhow::Result<()> {
    const SNAPSHOT: &str = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SELECT 1";
    if tables.is_empty() {
        src.batch_execute(SNAPSHOT).await?;
        tgt.batch_execute(SNAPSHOT).await?;
        return Ok(());
    }
    let locker = connect(source, admin, db).await?;
    let marker = connect(source, admin, db).await?;
    // Catch up first, holding nothing: the wait under the lock then covers only what is
    // committed while it is being taken, not the lag the lag gate let through.
    repl::catch_up(
        &[(&marker, tgt)],
        "verify-ahead",
        bound.max(Duration::from_secs(60)),
    )
    .await?;
    verify::hold_writes(&locker, tables, bound)
        .await
        .context("holding writes for the verification snapshot")?;
    src.batch_execute(SNAPSHOT).await?;
    let token = format!("verify-{}-{}", now_ms(), crate::state::random_token(8));
    repl::write_marker(&marker, &token).await?;
    repl::wait_marker(tgt, &token, bound.max(Duration::from_secs(5))).await?;
    tgt.batch_execute(SNAPSHOT).await?;
    locker.batch_execute("COMMIT").await?;
    Ok(())
}
