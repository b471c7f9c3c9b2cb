//! When each phase of pgflip's attempts ran, as seen by polling the record (written before
//! every step), so that a stall the clients saw can be put down to the phase that caused
//! it: the pause itself, or a hold outside it (the verification's consistent cut, a
//! preflight ALTER TABLE). The phase durations in the record say how long each took, not
//! when; this says when, to within the polling interval.

use pgflip_engine::state::StateDir;
use serde::Serialize;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

const POLL: Duration = Duration::from_millis(5);

/// From `at_ms` (Unix ms) on, `phase` ran (`idle` when no attempt was under way).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PhaseMark {
    pub at_ms: f64,
    pub phase: String,
}

/// The worst wait a client had in some window, and what pgflip was doing meanwhile.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stall {
    pub latency_ms: f64,
    /// When the transaction completed, in ms from the commit that started the attempt.
    pub completed_after_commit_ms: f64,
    /// The phase running halfway through the wait.
    pub phase: String,
}

pub struct PhaseWatch {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<PhaseMark>>,
}

impl PhaseWatch {
    pub fn start(state: StateDir) -> PhaseWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let mut marks: Vec<PhaseMark> = Vec::new();
            while !stopped.load(Ordering::Relaxed) {
                // A record caught mid-write is skipped: the next poll reads it.
                if let Ok(record) = state.load() {
                    let phase = match &record.attempt {
                        None => "idle".to_string(),
                        Some(a) => match a.switch_step {
                            Some(step) => format!("{}/{step:?}", a.phase.as_str()),
                            None => a.phase.as_str().to_string(),
                        },
                    };
                    if marks.last().is_none_or(|m| m.phase != phase) {
                        marks.push(PhaseMark {
                            at_ms: pgflip_engine::clock::now_ms() as f64,
                            phase,
                        });
                    }
                }
                tokio::time::sleep(POLL).await;
            }
            marks
        });
        PhaseWatch { stop, task }
    }

    pub async fn stop(mut self) -> Vec<PhaseMark> {
        self.stop.store(true, Ordering::Relaxed);
        (&mut self.task).await.unwrap_or_default()
    }
}

/// A run that ends early (an error) does not leave the watch polling.
impl Drop for PhaseWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The phase in effect at `at_ms`.
pub fn phase_at(marks: &[PhaseMark], at_ms: f64) -> String {
    marks
        .iter()
        .take_while(|m| m.at_ms <= at_ms)
        .last()
        .map_or_else(|| "idle".to_string(), |m| m.phase.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_phase_in_effect_is_the_last_one_begun() {
        let mark = |at_ms: f64, phase: &str| PhaseMark {
            at_ms,
            phase: phase.into(),
        };
        let marks = [mark(10.0, "verify"), mark(20.0, "switchover/Pausing")];
        assert_eq!(phase_at(&marks, 5.0), "idle");
        assert_eq!(phase_at(&marks, 10.0), "verify");
        assert_eq!(phase_at(&marks, 25.0), "switchover/Pausing");
    }
}
