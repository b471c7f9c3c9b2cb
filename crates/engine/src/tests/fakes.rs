//! In-memory stand-ins for the ports and the steps, so the driver's decisions (retries,
//! abandoning, superseding, failing, resuming after a crash) are tested in milliseconds
//! without PostgreSQL. What PostgreSQL, PgBouncer and Git do is tested on the real ones
//! (`tests/`); these fakes only keep the state the driver's decisions are judged by.

use crate::error::{EngineError, EngineResult, PauseAbortCause};
use crate::ports::{Addr, Instances, Journal, NotReady, Router, StatusSink};
use crate::steps::{Learned, Stepped, Steps};
use pgflip_core::plan::{Attempt, AttemptKind, Member, Phase, Record, Standby, SwitchStep};
use pgflip_core::report::Update;
use pgflip_core::revision::Revision;
use pgflip_core::spec::Desired;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the fake servers hold: it outlives a "crashed" driver, as real servers do.
#[derive(Debug, Default)]
pub struct World {
    /// Instances that exist.
    pub instances: BTreeSet<Member>,
    /// Replication links that exist, as `from→to`.
    pub links: BTreeSet<String>,
    /// Where the endpoint sends clients.
    pub endpoint: Option<Member>,
    /// Every call the driver made, in order (`run:<phase>`, `clean_up`, …).
    pub calls: Vec<String>,
    /// What the next passes of a phase return instead of completing (front first).
    pub script: BTreeMap<Phase, VecDeque<Scripted>>,
    /// Whether the endpoint and instances were (re)adopted.
    pub adopted: u32,
    /// Cleanups that find something not there yet before one goes through.
    pub clean_ups_not_ready: u32,
    /// The major of a server the user runs, taken on first sight instead of the wanted one.
    pub serving_today: Option<pgflip_core::spec::Major>,
    /// What the next bootstraps return instead of completing (front first).
    pub bootstrap_script: VecDeque<Scripted>,
}

/// A scripted outcome of one pass of a phase.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scripted {
    /// A transient failure (a dropped connection).
    Transient,
    /// A final failure (a preflight refusal).
    Refused,
    /// Not ready yet (a pod starting).
    NotReady,
    /// Still under way, at this percentage.
    Waiting(f64),
    /// The pause was rolled back (only meaningful for the switchover).
    PauseAborted,
}

fn link(from: Member, to: Member) -> String {
    format!("{}{}→{}{}", from.color, from.major, to.color, to.major)
}

/// The steps over a [`World`].
#[derive(Clone, Default)]
pub struct FakeSteps {
    pub world: Arc<Mutex<World>>,
}

impl FakeSteps {
    pub fn script(&self, phase: Phase, outcomes: &[Scripted]) {
        self.world
            .lock()
            .unwrap()
            .script
            .entry(phase)
            .or_default()
            .extend(outcomes);
    }

    fn call(&self, what: String) {
        self.world.lock().unwrap().calls.push(what);
    }
}

impl Steps for FakeSteps {
    async fn adopt(&self, _record: &Record, _desired: &Desired) -> EngineResult<()> {
        self.world.lock().unwrap().adopted += 1;
        Ok(())
    }

    async fn bootstrap(&self, member: Member, _desired: &Desired) -> EngineResult<Member> {
        self.call(format!("bootstrap:{member}"));
        let mut w = self.world.lock().unwrap();
        match w.bootstrap_script.pop_front() {
            None => {}
            Some(Scripted::Refused) => {
                return Err(EngineError::Refused(vec![
                    "db.example:5432: wal_level is replica".into(),
                ]));
            }
            Some(Scripted::NotReady) => {
                return Err(anyhow::Error::from(NotReady(
                    "db.example:5432 does not answer yet".into(),
                ))
                .into());
            }
            Some(_) => return Err(anyhow::anyhow!("connection reset by peer").into()),
        }
        let member = Member {
            major: w.serving_today.unwrap_or(member.major),
            ..member
        };
        w.instances.insert(member);
        w.endpoint = Some(member);
        Ok(member)
    }

    async fn run<J: Journal>(
        &self,
        attempt: &Attempt,
        desired: &Desired,
        record: &mut Record,
        journal: &J,
    ) -> EngineResult<Stepped> {
        let phase = attempt.phase;
        self.call(format!("run:{phase}"));
        let scripted = self
            .world
            .lock()
            .unwrap()
            .script
            .get_mut(&phase)
            .and_then(VecDeque::pop_front);
        match scripted {
            None => {}
            Some(Scripted::Transient) => {
                return Err(anyhow::anyhow!("connection reset by peer").into());
            }
            Some(Scripted::Refused) => {
                return Err(EngineError::Refused(vec![
                    "app: unlogged table public.cache".into(),
                ]));
            }
            Some(Scripted::NotReady) => {
                return Err(anyhow::Error::from(NotReady("pod is starting".into())).into());
            }
            Some(Scripted::Waiting(percent)) => {
                return Ok(Stepped::Waiting {
                    message: "initial sync".into(),
                    measured: Some(pgflip_core::progress::Measured::Done {
                        done: percent as u64,
                        total: 100,
                    }),
                    recheck: Duration::from_millis(250),
                });
            }
            Some(Scripted::PauseAborted) => {
                return Err(EngineError::PauseAborted {
                    source_member: attempt.from,
                    cause: PauseAbortCause::BoundReached(desired.switchover.pause_timeout),
                });
            }
        }
        let (from, to) = (attempt.from, attempt.to);
        let learned = match phase {
            Phase::Preflight => Learned::Preflight {
                warnings: vec![],
                left_behind: vec![],
                copy: None,
                carried_bytes: 1000,
            },
            Phase::Provision => {
                self.world.lock().unwrap().instances.insert(to);
                Learned::Nothing
            }
            Phase::CopySchema => Learned::SchemaCopied {
                source_fingerprint: "fp".into(),
                cut_lsn: None,
            },
            Phase::Replicate => {
                self.world.lock().unwrap().links.insert(link(from, to));
                Learned::Nothing
            }
            Phase::Verify => Learned::Verified { tables: 3 },
            Phase::Switchover => {
                // As the real sequence: each sub-step recorded before it is taken; a
                // recorded repoint is completed on a rerun, a recorded pause undone.
                let step = record.attempt.as_ref().and_then(|a| a.switch_step);
                if step != Some(SwitchStep::Repointing) && record.serving != Some(to) {
                    set_step(record, journal, Some(SwitchStep::Pausing)).await?;
                    set_step(record, journal, Some(SwitchStep::Repointing)).await?;
                }
                self.world.lock().unwrap().endpoint = Some(to);
                record.serving = Some(to);
                set_step(record, journal, None).await?;
                Learned::Switched {
                    measurement: None,
                    standby: Standby {
                        member: from,
                        // Retained until the test moves it.
                        retain_until_ms: u64::MAX,
                        serving_fingerprint: "fp".into(),
                    },
                }
            }
            Phase::ReverseSync => {
                let mut w = self.world.lock().unwrap();
                w.links.remove(&link(from, to));
                w.links.insert(link(to, from));
                Learned::Nothing
            }
            Phase::InitialSync | Phase::CatchUp | Phase::Done => Learned::Nothing,
        };
        Ok(Stepped::Done(learned))
    }

    async fn clean_up(&self, attempt: &Attempt, _desired: &Desired) -> EngineResult<()> {
        self.call("clean_up".into());
        let mut w = self.world.lock().unwrap();
        if w.clean_ups_not_ready > 0 {
            w.clean_ups_not_ready -= 1;
            return Err(anyhow::Error::from(NotReady("green's pod is going away".into())).into());
        }
        w.links.remove(&link(attempt.from, attempt.to));
        if attempt.kind == AttemptKind::Full {
            w.instances.remove(&attempt.to);
        }
        Ok(())
    }

    async fn decommission(
        &self,
        serving: Member,
        standby: &Member,
        _desired: &Desired,
    ) -> EngineResult<()> {
        self.call(format!("decommission:{standby}"));
        let mut w = self.world.lock().unwrap();
        w.links.remove(&link(serving, *standby));
        w.instances.remove(standby);
        Ok(())
    }
}

async fn set_step<J: Journal>(
    record: &mut Record,
    journal: &J,
    step: Option<SwitchStep>,
) -> EngineResult<()> {
    if let Some(a) = record.attempt.as_mut() {
        a.switch_step = step;
    }
    journal.save(record).await.map_err(EngineError::from)
}

/// Decides, from a record just saved, whether the process dies right there.
pub type CrashWhen = Box<dyn Fn(&Record) -> bool + Send>;

/// Every record saved, in order; `fail` makes saves fail (a journal that cannot be
/// written); `crash_when` kills the task saving (a panic) right after the save it matches.
#[derive(Clone, Default)]
pub struct MemoryJournal {
    pub saved: Arc<Mutex<Vec<Record>>>,
    pub fail: Arc<Mutex<bool>>,
    pub crash_when: Arc<Mutex<Option<CrashWhen>>>,
}

impl MemoryJournal {
    pub fn last(&self) -> Option<Record> {
        self.saved.lock().unwrap().last().cloned()
    }
}

impl Journal for MemoryJournal {
    async fn save(&self, record: &Record) -> anyhow::Result<()> {
        if *self.fail.lock().unwrap() {
            anyhow::bail!("the journal cannot be written");
        }
        self.saved.lock().unwrap().push(record.clone());
        let crash = {
            let mut when = self.crash_when.lock().unwrap();
            let hit = when.as_ref().is_some_and(|f| f(record));
            if hit {
                *when = None;
            }
            hit
        };
        if crash {
            panic!("simulated crash right after saving the record");
        }
        Ok(())
    }
}

/// Every update published, with its revision.
#[derive(Clone, Default)]
pub struct RecordingSink {
    pub updates: Arc<Mutex<Vec<(Revision, Update)>>>,
}

impl RecordingSink {
    pub fn states(&self) -> Vec<String> {
        self.updates
            .lock()
            .unwrap()
            .iter()
            .map(|(_, u)| format!("{} {}", u.state.as_str(), u.phase))
            .collect()
    }
}

impl StatusSink for RecordingSink {
    async fn publish(&self, revision: &Revision, update: &Update) -> anyhow::Result<()> {
        self.updates
            .lock()
            .unwrap()
            .push((revision.clone(), update.clone()));
        Ok(())
    }
}

/// Instances as a set of members, each at a made-up port; `starting` members answer
/// [`NotReady`] (a pod not Ready yet).
#[derive(Default)]
pub struct FakeInstances {
    pub running: Mutex<BTreeSet<Member>>,
    pub starting: Mutex<BTreeSet<Member>>,
}

fn port_of(member: &Member) -> u16 {
    10_000 + member.major.0 as u16 * 10 + (member.color as u16)
}

impl Instances for FakeInstances {
    async fn ensure(&self, member: &Member, _desired: &Desired) -> anyhow::Result<Addr> {
        if self.starting.lock().unwrap().contains(member) {
            return Err(NotReady(format!("{member} is starting")).into());
        }
        self.running.lock().unwrap().insert(*member);
        Ok(Addr {
            host: "127.0.0.1".into(),
            port: port_of(member),
        })
    }

    async fn addr(&self, member: &Member, _desired: &Desired) -> anyhow::Result<Option<Addr>> {
        Ok(self.running.lock().unwrap().contains(member).then(|| Addr {
            host: "127.0.0.1".into(),
            port: port_of(member),
        }))
    }

    async fn remove(&self, member: &Member, _desired: &Desired) -> anyhow::Result<()> {
        self.running.lock().unwrap().remove(member);
        Ok(())
    }
}

/// An endpoint as its target and whether it is paused.
#[derive(Default)]
pub struct FakeRouter {
    pub target: Mutex<Option<Addr>>,
    pub paused: Mutex<bool>,
}

impl Router for FakeRouter {
    async fn ensure(&self, _desired: &Desired, initial: &Addr) -> anyhow::Result<()> {
        let mut t = self.target.lock().unwrap();
        if t.is_none() {
            *t = Some(initial.clone());
        }
        Ok(())
    }
    async fn target(&self) -> anyhow::Result<Option<Addr>> {
        Ok(self.target.lock().unwrap().clone())
    }
    async fn pause(&self, _timeout: Duration) -> anyhow::Result<()> {
        *self.paused.lock().unwrap() = true;
        Ok(())
    }
    async fn repoint(&self, _desired: &Desired, target: &Addr) -> anyhow::Result<()> {
        *self.target.lock().unwrap() = Some(target.clone());
        Ok(())
    }
    async fn resume(&self) -> anyhow::Result<()> {
        *self.paused.lock().unwrap() = false;
        Ok(())
    }
    async fn server_sockets(&self) -> anyhow::Result<Vec<(String, u16)>> {
        Ok(Vec::new())
    }
}
