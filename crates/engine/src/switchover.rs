//! The switchover: moving clients from the source color to the target color in one short,
//! bounded pause, with nothing lost and no write landing on the wrong side.
//!
//! Before the pause (clients unaffected): the target is unfenced, has the publication and
//! the slot for the reverse link ready, and has caught up with a marker written just now.
//! The reverse slot made here also decodes what the forward link applies on the target
//! until the switch; reverse replication skips that by starting at the cut read inside the
//! pause (step 4), so making the slot costs the pause nothing, whatever the majors.
//!
//! The pause (what clients feel), bounded by `pauseTimeout`:
//! 1. `PAUSE` PgBouncer: in-flight transactions finish, new ones wait.
//! 2. Fence the source against writes that bypass PgBouncer: its statements ran during
//!    step 1 in a transaction of their own, committed here.
//! 3. Write a marker row on the source and wait until the target has applied it: the
//!    target now holds every transaction the source committed.
//! 4. Read the target's WAL insert position: the cut. Every commit the forward link
//!    applied lies before it, every client's commit on the target after it.
//! 5. Copy to the target the state of every sequence that moved since all of them were
//!    copied just before the pause (logical replication does not carry sequences).
//! 6. Record "repointing" and the cut (the commit point), point PgBouncer at the target,
//!    `RESUME`.
//!
//! If anything in 1–5 fails or the bound expires, the source is unfenced, the reverse slot
//! dropped and PgBouncer resumed on the source:
//! clients never hang and never see an error from pgflip's side.
//!
//! Crash safety: the sub-step is recorded before it is taken. On restart, [`recover`]
//! rolls a half-done pause back (step `Pausing`) or completes it (step `Repointing`).
//! The endpoint's stored target is the single source of truth for which color serves.
//! After the pause, [`start_reverse_replication`] subscribes the source to the reverse
//! slot from the cut and drops the forward link.

use super::error::{EngineError, EngineResult, PauseAbortCause};
use super::pg::connect;
use super::replication::{self as repl, link_name};
use super::{fence, sequences};
use crate::failpoint;
use crate::ports::{Addr, Credentials, Journal, Router};
use anyhow::Context;
use pgflip_core::plan::{Member, Record, SwitchMeasurement, SwitchStep};
use pgflip_core::spec::Desired;
use std::time::{Duration, Instant};
use tokio_postgres::Client;

/// How long the target may take to catch up before the pause (the lag gate has passed,
/// so this is seconds at most; beyond it the step fails and is retried).
const CATCH_UP_BEFORE_PAUSE: Duration = Duration::from_secs(60);

/// How long undoing a rolled-back pause may wait on the target (clients are back on the
/// source by then; this only bounds how long pgflip itself waits).
const TARGET_ROLLBACK_BOUND: Duration = Duration::from_secs(10);

/// Everything the switchover needs to know about the two sides.
pub struct Sides<'a> {
    pub from: Member,
    pub to: Member,
    pub source: &'a Addr,
    pub target: &'a Addr,
    /// Where the endpoint and the source reach the target ([`Instances::peer_addr`]).
    ///
    /// [`Instances::peer_addr`]: crate::ports::Instances::peer_addr
    pub target_peer: &'a Addr,
    pub admin: &'a Credentials,
    /// The carried databases, the pause's bound, the endpoint's configuration.
    pub desired: &'a Desired,
}

impl Sides<'_> {
    fn pause_timeout(&self) -> Duration {
        self.desired.switchover.pause_timeout
    }
}

/// Connections to one database on both sides, opened before the pause so that the pause
/// itself spawns nothing and only sends statements on warm connections.
struct DbPair {
    db: String,
    source: Client,
    target: Client,
}

async fn open_pairs(s: &Sides<'_>) -> anyhow::Result<Vec<DbPair>> {
    let mut out = Vec::new();
    for db in &s.desired.databases {
        out.push(DbPair {
            db: db.clone(),
            source: connect(s.source, s.admin, db).await?,
            target: connect(s.target, s.admin, db).await?,
        });
    }
    Ok(out)
}

/// Runs the switchover. On success the endpoint points at the target and the record's
/// `serving` is the target; reverse replication is started later by
/// [`start_reverse_replication`]. [`EngineError::PauseAborted`] means clients are back on
/// the source, nothing moved.
pub async fn run<R: Router, J: Journal>(
    router: &R,
    journal: &J,
    record: &mut Record,
    s: &Sides<'_>,
) -> EngineResult<SwitchMeasurement> {
    // Before the pause: ready the target to serve and to be the reverse link's source.
    let pairs = open_pairs(s).await?;
    let target_admin = connect(s.target, s.admin, "postgres").await?;
    let source_admin = connect(s.source, s.admin, "postgres").await?;
    let fencer = connect(s.source, s.admin, "postgres").await?;
    fence::unfence(&target_admin).await?;
    let reverse: Vec<String> = pairs
        .iter()
        .map(|p| link_name(s.to.color, s.from.color, &p.db))
        .collect();
    ready_target_links(&pairs, &reverse, s).await?;
    for (p, name) in pairs.iter().zip(&reverse) {
        repl::ensure_publication(&p.target, name).await?;
        repl::ensure_slot(&p.target, name).await?;
    }
    // Warm the statements used inside the pause, and let the target catch up with what
    // the source committed during the verification, so the wait inside the pause covers
    // only the transactions the pause drains.
    let links: Vec<_> = pairs.iter().map(|p| (&p.source, &p.target)).collect();
    repl::catch_up(&links, "switch-ahead", CATCH_UP_BEFORE_PAUSE).await?;
    // Every sequence now, while clients run: inside the pause only those that move
    // meanwhile are carried, so the pause does not grow with the number of sequences.
    let mut sequences_ahead = Vec::with_capacity(pairs.len());
    for p in &pairs {
        let states = sequences::read_all(&p.source).await?;
        sequences::apply_all(&p.target, &states).await?;
        sequences_ahead.push(states);
    }

    set_step(journal, record, Some(SwitchStep::Pausing)).await?;
    failpoint::hit("switchover:before-pause");
    let mut m = SwitchMeasurement::default();
    let started = Instant::now();
    // The fence's statements run while PgBouncer drains, within the same bound; only its
    // commit is in the pause proper.
    let staging = tokio::time::timeout(s.pause_timeout(), fence::stage(&fencer));
    let (paused, staged) = tokio::join!(router.pause(s.pause_timeout()), staging);
    if let Err(e) = paused {
        fence::abandon(fencer).await;
        set_step(journal, record, None).await?;
        if crate::ports::is_not_ready(&e) {
            // No endpoint to pause yet (its pod restarting): nothing paused, nothing to
            // count against the attempt; the switch is tried again shortly.
            return Err(EngineError::NotReady(e));
        }
        return Err(EngineError::PauseAborted {
            source_member: s.from,
            cause: PauseAbortCause::EndpointDidNotPause {
                bound: s.pause_timeout(),
                detail: format!("{e:#}"),
            },
        });
    }
    m.drain_ms = ms(started.elapsed());
    failpoint::hit("switchover:paused");

    let remaining = s.pause_timeout().saturating_sub(started.elapsed());
    let inside = async {
        staged
            .context("the source's roles were not made read-only within the bound")?
            .context("making the source's roles read-only")?;
        inside_pause(&fencer, &target_admin, &pairs, &sequences_ahead, &mut m, s).await
    };
    let inside = tokio::time::timeout(remaining, inside).await;
    let failure = match inside {
        Ok(Ok(cut)) => {
            if let Some(a) = record.attempt.as_mut() {
                a.reverse_from_lsn = Some(cut);
            }
            None
        }
        Ok(Err(e)) => Some(PauseAbortCause::Failed(format!("{e:#}"))),
        Err(_) => Some(PauseAbortCause::BoundReached(s.pause_timeout())),
    };
    if let Some(cause) = failure {
        fence::abandon(fencer).await;
        roll_back_pause(router, &source_admin, &pairs, &reverse, s).await?;
        set_step(journal, record, None).await?;
        return Err(EngineError::PauseAborted {
            source_member: s.from,
            cause,
        });
    }

    // The commit point: from here on, clients belong to the target.
    let t = Instant::now();
    set_step(journal, record, Some(SwitchStep::Repointing)).await?;
    failpoint::hit("switchover:repointing");
    router.repoint(s.desired, s.target_peer).await?;
    router.resume().await?;
    m.repoint_resume_ms = ms(t.elapsed());
    m.pause_ms = ms(started.elapsed());
    record.serving = Some(s.to);
    set_step(journal, record, None).await?;
    Ok(m)
}

/// Steps 2–5 of the pause; returns the cut where reverse replication begins.
async fn inside_pause(
    fencer: &Client,
    target_admin: &Client,
    pairs: &[DbPair],
    sequences_ahead: &[Vec<sequences::SequenceState>],
    m: &mut SwitchMeasurement,
    s: &Sides<'_>,
) -> anyhow::Result<String> {
    let t = Instant::now();
    fence::commit_staged(fencer)
        .await
        .context("fencing the source")?;
    m.fence_ms = ms(t.elapsed());
    failpoint::inject("switchover:fenced").await?;

    let t = Instant::now();
    let token = repl::marker_token("switch");
    for p in pairs {
        repl::write_marker(&p.source, &token).await?;
    }
    failpoint::hit("switchover:marker-written");
    for p in pairs {
        repl::wait_marker(&p.target, &token, s.pause_timeout()).await?;
    }
    m.catch_up_ms = ms(t.elapsed());

    // The marker was applied, so every forward commit record is inserted (the apply
    // worker commits asynchronously: the insert position, not the flushed one, covers it).
    // Nothing more comes forward: the source is fenced and paused. The forward link is
    // dropped before reverse replication starts, out of the pause.
    let t = Instant::now();
    let cut = repl::wal_insert_position(target_admin).await?;
    failpoint::hit("switchover:reverse-cut-read");
    m.reverse_setup_ms = ms(t.elapsed());

    let t = Instant::now();
    for (p, ahead) in pairs.iter().zip(sequences_ahead) {
        let moved = sequences::read_moved(&p.source, ahead).await?;
        m.sequences_synced += sequences::apply_all(&p.target, &moved).await?;
    }
    m.sequences_ms = ms(t.elapsed());
    failpoint::inject("switchover:sequences-synced").await?;
    Ok(cut)
}

/// Undoes a pause that did not reach the commit point: clients go back to the source
/// first; then the target's side is undone, within a bound, since the target may be what
/// stopped answering (what is left undone there is redone before the next pause:
/// [`ready_target_links`]).
async fn roll_back_pause<R: Router>(
    router: &R,
    source_admin: &Client,
    pairs: &[DbPair],
    reverse: &[String],
    s: &Sides<'_>,
) -> anyhow::Result<()> {
    fence::unfence(source_admin).await?;
    router.resume().await?;
    let target_side = async {
        for (p, rev) in pairs.iter().zip(reverse) {
            let forward = link_name(s.from.color, s.to.color, &p.db);
            repl::set_subscription_enabled(&p.target, &forward, true).await?;
            repl::drop_slot(&p.target, rev).await?;
        }
        anyhow::Ok(())
    };
    match tokio::time::timeout(TARGET_ROLLBACK_BOUND, target_side).await {
        Ok(done) => done,
        Err(_) => {
            tracing::warn!(target = %s.to, "the target did not answer while the pause was rolled back; its links are readied before the next pause");
            Ok(())
        }
    }
}

/// Before a pause: the forward subscription applying and no reverse slot on the target.
/// A slot left by a pause whose rollback could not reach the target would start at that
/// earlier pause, and send back to the source writes it already has.
async fn ready_target_links(
    pairs: &[DbPair],
    reverse: &[String],
    s: &Sides<'_>,
) -> anyhow::Result<()> {
    for (p, rev) in pairs.iter().zip(reverse) {
        let forward = link_name(s.from.color, s.to.color, &p.db);
        repl::set_subscription_enabled(&p.target, &forward, true).await?;
        repl::drop_slot(&p.target, rev).await?;
    }
    Ok(())
}

/// Brings a switchover interrupted by a crash to a safe end. Returns whether clients were
/// moved to the target.
pub async fn recover<R: Router, J: Journal>(
    router: &R,
    journal: &J,
    record: &mut Record,
    s: &Sides<'_>,
) -> anyhow::Result<bool> {
    let step = record.attempt.as_ref().and_then(|a| a.switch_step);
    match step {
        None => Ok(record.serving == Some(s.to)),
        Some(SwitchStep::Pausing) => {
            let source_admin = connect(s.source, s.admin, "postgres").await?;
            let pairs = open_pairs(s).await?;
            let reverse: Vec<String> = pairs
                .iter()
                .map(|p| link_name(s.to.color, s.from.color, &p.db))
                .collect();
            roll_back_pause(router, &source_admin, &pairs, &reverse, s).await?;
            set_step(journal, record, None).await?;
            Ok(false)
        }
        Some(SwitchStep::Repointing) => {
            // Sequences were synced and the source fenced before this step was recorded.
            router.repoint(s.desired, s.target_peer).await?;
            router.resume().await?;
            record.serving = Some(s.to);
            set_step(journal, record, None).await?;
            Ok(true)
        }
    }
}

/// After the switch, outside the pause: the source (now the standby) subscribes to the
/// reverse slot from the cut recorded inside the pause, and the forward link is dropped on
/// both sides.
pub async fn start_reverse_replication(s: &Sides<'_>, cut: Option<&str>) -> anyhow::Result<()> {
    let pairs = open_pairs(s).await?;
    for p in &pairs {
        let forward = link_name(s.from.color, s.to.color, &p.db);
        let reverse = link_name(s.to.color, s.from.color, &p.db);
        repl::drop_subscription(&p.target, &forward).await?;
        repl::drop_slot(&p.source, &forward).await?;
        repl::drop_publication(&p.source, &forward).await?;
        repl::ensure_subscription(
            &p.source,
            &reverse,
            s.target_peer,
            s.admin,
            &p.db,
            match cut {
                Some(lsn) => repl::Start::FromLsn(lsn.to_string()),
                // A record of an earlier pgflip: the slot was made inside the pause (or,
                // where both majors filter by origin, before it, taking local writes only).
                None => repl::Start::FromExistingSlot {
                    local_changes_only: s.from.major.0 >= 16 && s.to.major.0 >= 16,
                },
            },
        )
        .await?;
    }
    Ok(())
}

async fn set_step<J: Journal>(
    journal: &J,
    record: &mut Record,
    step: Option<SwitchStep>,
) -> anyhow::Result<()> {
    if let Some(a) = record.attempt.as_mut() {
        a.switch_step = step;
    }
    journal.save(record).await
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
