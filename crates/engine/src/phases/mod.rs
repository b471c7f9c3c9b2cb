//! The phases over PostgreSQL: what each step of an attempt does to the two servers, one
//! file per phase, all sharing one [`Ctx`]. The driver ([`super::driver`]) decides which
//! runs and records the outcome; the switchover sequence itself is [`super::switchover`].

mod bootstrap;
mod catch_up;
mod cleanup;
mod copy_schema;
mod initial_sync;
mod plan;
mod preflight;
mod provision;
mod replicate;
mod reverse_sync;
mod switchover;
mod verify;

use super::error::{EngineError, EngineResult, MIN_FREE_BYTES};
use super::pg::connect;
use super::replication::{self as repl, link_name};
use super::schema;
use super::steps::{Stepped, Steps};
use super::switchover::Sides;
use crate::ports::{Addr, Credentials, Instances, Journal, Router};
use crate::toolchain::Toolchain;
use pgflip_core::plan::{Attempt, AttemptKind, CopyMethod, Member, Phase, Record};
use pgflip_core::progress::Measured;
use pgflip_core::spec::Desired;
use tokio_postgres::Client;

/// The parts the phases work with: where the servers are, the endpoint, the tools and
/// pgflip's own login.
pub struct Phases<I, R> {
    instances: I,
    router: R,
    toolchain: Toolchain,
    admin: Credentials,
    /// What the step under way has measured so far, for a step that runs long in one go
    /// (a base backup, the verification): the driver reports it while it waits.
    live: std::sync::Mutex<Option<(String, Measured)>>,
}

impl<I: Instances, R: Router> Phases<I, R> {
    pub fn new(instances: I, router: R, toolchain: Toolchain, admin: Credentials) -> Self {
        Phases {
            instances,
            router,
            toolchain,
            admin,
            live: std::sync::Mutex::new(None),
        }
    }

    /// Sets (or, with None, clears) what the step under way has measured so far.
    fn set_live(&self, now: Option<(String, Measured)>) {
        *self.live.lock().unwrap() = now;
    }

    pub fn instances(&self) -> &I {
        &self.instances
    }
    pub fn router(&self) -> &R {
        &self.router
    }

    /// The replication lag that matters now, in bytes: the attempt's link once data flows,
    /// else the reverse link that keeps the standby ready for a revert. None when there is
    /// no link or it cannot be read.
    pub async fn replication_lag(&self, record: &Record, desired: &Desired) -> Option<i64> {
        let serving = record.serving?;
        let (from, to) = match (&record.attempt, &record.standby) {
            (Some(a), _) if a.phase >= Phase::InitialSync && a.phase != Phase::Done => {
                (a.from, a.to)
            }
            (None, Some(s)) => (serving, s.member),
            _ => return None,
        };
        let source = self.instances.addr(&from, desired).await.ok()??;
        let mut worst = None;
        for db in &desired.databases {
            let client = connect(&source, &self.admin, db).await.ok()?;
            let lag = repl::lag_bytes(&client, &link_name(from.color, to.color, db))
                .await
                .ok()??;
            worst = Some(worst.unwrap_or(0).max(lag));
        }
        worst
    }
}

/// What one pass of a phase works with.
struct Ctx<'a, I, R> {
    parts: &'a Phases<I, R>,
    attempt: &'a Attempt,
    desired: &'a Desired,
    /// Where the source (the serving side) listens.
    source: Addr,
}

impl<I: Instances, R: Router> Ctx<'_, I, R> {
    fn admin(&self) -> &Credentials {
        &self.parts.admin
    }

    /// The target, created or started if need be.
    async fn target(&self) -> EngineResult<Addr> {
        Ok(self
            .parts
            .instances
            .ensure(&self.attempt.to, self.desired)
            .await?)
    }

    /// Ends the attempt when the target's file system is (nearly) full: checked before the
    /// target is touched, since a server out of room may not even start.
    async fn ensure_room(&self) -> EngineResult<()> {
        let instances = &self.parts.instances;
        match instances.free_space(&self.attempt.to, self.desired).await? {
            Some(free) if free < MIN_FREE_BYTES => Err(EngineError::OutOfSpace {
                target: self.attempt.to,
                phase: self.attempt.phase,
                free_bytes: free,
            }),
            _ => Ok(()),
        }
    }

    /// Where the other servers and the endpoint reach `member`, which pgflip reaches at
    /// `addr`.
    async fn peer(&self, member: &Member, addr: &Addr) -> EngineResult<Addr> {
        Ok(self
            .parts
            .instances
            .peer_addr(member, self.desired, addr)
            .await?)
    }

    async fn connect(&self, addr: &Addr, db: &str) -> EngineResult<Client> {
        Ok(connect(addr, self.admin(), db).await?)
    }

    /// The two sides, as the switchover sequence takes them.
    fn sides<'a>(&'a self, target: &'a Addr, target_peer: &'a Addr) -> Sides<'a> {
        Sides {
            from: self.attempt.from,
            to: self.attempt.to,
            source: &self.source,
            target,
            target_peer,
            admin: self.admin(),
            desired: self.desired,
        }
    }

    /// Whether this attempt copies physically (preflight decided; see [`copy_schema`]).
    fn copies_physically(&self) -> bool {
        self.attempt
            .copy
            .as_ref()
            .is_some_and(|c| c.method == CopyMethod::Physical)
    }

    /// Runs `work` (a step of the physical copy) while watching how much WAL the source's
    /// slots for it hold; past `switchover.maxRetainedWalBytes` the work is dropped (its
    /// processes killed) and the attempt fails for good, so its cleanup drops the slots.
    async fn within_retained_wal<T>(
        &self,
        slots: &[String],
        work: impl std::future::Future<Output = EngineResult<T>>,
    ) -> EngineResult<T> {
        let bound = self.desired.switchover.max_retained_wal_bytes;
        let watch = async {
            let mut client = None;
            loop {
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                // A read that fails (the source restarting, say) is not a reason to stop
                // the copy: the next one, on a new connection, decides.
                if client.is_none() {
                    client = self.connect(&self.source, "postgres").await.ok();
                }
                let Some(c) = &client else { continue };
                match repl::retained_wal(c, slots).await {
                    Ok(Some(held)) if held as u64 > bound => {
                        return EngineError::RetainedWalBound {
                            source_member: self.attempt.from,
                            held_bytes: held,
                            bound_bytes: bound,
                        };
                    }
                    Ok(_) => {}
                    Err(_) => client = None,
                }
            }
        };
        tokio::select! {
            done = work => done,
            exceeded = watch => Err(exceeded),
        }
    }

    /// The forward link's name (publication, slot and subscription) for `db`.
    fn forward(&self, db: &str) -> String {
        link_name(self.attempt.from.color, self.attempt.to.color, db)
    }

    /// Every carried database's schema fingerprint on `addr`, as one string.
    async fn fingerprint(&self, addr: &Addr) -> EngineResult<String> {
        fingerprint(&self.parts.admin, addr, self.desired).await
    }

    /// Refuses to go on when the source's schema changed since it was copied.
    async fn check_schema_unchanged(&self) -> EngineResult<()> {
        let now = self.fingerprint(&self.source).await?;
        if self.attempt.source_fingerprint.as_deref() != Some(now.as_str()) {
            return Err(EngineError::SchemaChanged {
                source_member: self.attempt.from,
                switch_back: self.attempt.kind == AttemptKind::SwitchBack,
            });
        }
        Ok(())
    }
}

async fn fingerprint(admin: &Credentials, addr: &Addr, desired: &Desired) -> EngineResult<String> {
    let mut parts = Vec::new();
    for db in &desired.databases {
        let c = connect(addr, admin, db).await?;
        parts.push(format!("{db}={}", schema::fingerprint(&c).await?));
    }
    Ok(parts.join(";"))
}

impl<I: Instances, R: Router> Steps for Phases<I, R> {
    async fn adopt(&self, record: &Record, desired: &Desired) -> EngineResult<()> {
        let Some(serving) = record.serving else {
            return Ok(());
        };
        let addr = self.instances.ensure(&serving, desired).await?;
        let endpoint_target = self.instances.peer_addr(&serving, desired, &addr).await?;
        if let Some(s) = &record.standby {
            self.instances.ensure(&s.member, desired).await?;
        }
        if let Some(a) = &record.attempt
            && self.instances.addr(&a.to, desired).await?.is_some()
        {
            self.instances.ensure(&a.to, desired).await?;
        }
        Ok(self.router.ensure(desired, &endpoint_target).await?)
    }

    fn live_progress(&self) -> Option<(String, Measured)> {
        self.live.lock().unwrap().clone()
    }

    async fn still_up(&self, record: &Record, desired: &Desired) -> EngineResult<bool> {
        let members = record
            .serving
            .into_iter()
            .chain(record.standby.as_ref().map(|s| s.member));
        for member in members {
            if !self.instances.is_up(&member, desired).await? {
                tracing::warn!(%member, "not running: starting it again");
                return Ok(false);
            }
        }
        if !self.router.is_up().await? {
            tracing::warn!("the endpoint is not running: starting it again where it pointed");
            return Ok(false);
        }
        Ok(true)
    }

    async fn bootstrap(&self, member: Member, desired: &Desired) -> EngineResult<Member> {
        bootstrap::run(self, member, desired).await
    }

    async fn run<J: Journal>(
        &self,
        attempt: &Attempt,
        desired: &Desired,
        record: &mut Record,
        journal: &J,
    ) -> EngineResult<Stepped> {
        self.set_live(None);
        let source = self.instances.ensure(&attempt.from, desired).await?;
        let cx = Ctx {
            parts: self,
            attempt,
            desired,
            source,
        };
        match attempt.phase {
            Phase::Preflight => preflight::run(&cx).await,
            Phase::Provision => provision::run(&cx).await,
            Phase::CopySchema => copy_schema::run(&cx).await,
            Phase::Replicate => replicate::run(&cx).await,
            Phase::InitialSync => initial_sync::run(&cx).await,
            Phase::CatchUp => catch_up::run(&cx).await,
            Phase::Verify => verify::run(&cx).await,
            Phase::Switchover => switchover::run(&cx, record, journal).await,
            Phase::ReverseSync => reverse_sync::run(&cx).await,
            // The driver completes an attempt itself: nothing to do on the servers.
            Phase::Done => Ok(Stepped::Done(super::steps::Learned::Nothing)),
        }
    }

    async fn clean_up(&self, attempt: &Attempt, desired: &Desired) -> EngineResult<()> {
        cleanup::attempt(self, attempt, desired).await
    }

    async fn decommission(
        &self,
        serving: Member,
        standby: &Member,
        desired: &Desired,
    ) -> EngineResult<()> {
        cleanup::decommission(self, serving, standby, desired).await
    }
}
