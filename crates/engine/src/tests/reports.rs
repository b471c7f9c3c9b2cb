//! What the driver reports: progress of a waiting phase (throttled, with bytes, kept in
//! the record) and the time each report carries.

use super::Harness;
use super::fakes::Scripted;
use crate::driver::Progress;
use pgflip_core::plan::Phase;
use std::sync::atomic::Ordering;

#[tokio::test]
async fn waiting_phases_ask_to_be_called_back_and_report_progress() {
    let mut h = Harness::serving_15_wanting(16).await;
    h.steps.script(
        Phase::InitialSync,
        &[Scripted::Waiting(20.0), Scripted::Waiting(100.0)],
    );
    let mut afters = 0;
    for _ in 0..100 {
        if h.record
            .attempt
            .as_ref()
            .is_some_and(|a| a.phase == Phase::CatchUp)
        {
            break;
        }
        if let Progress::After(d) = h.step().await {
            assert_eq!(d.as_millis(), 250);
            afters += 1;
        }
    }
    assert_eq!(afters, 2);
    let updates = h.sink.updates.lock().unwrap().clone();
    let progress: Vec<_> = updates
        .iter()
        .filter_map(|(_, u)| u.progress_percent)
        .collect();
    // 20% came within the throttle window of the phase's first report: not published;
    // 100% always is, with its bytes, and into the record as well; then the phase's
    // end, all done.
    assert_eq!(progress, vec![100.0, 100.0]);
    let (_, done) = updates
        .iter()
        .find(|(_, u)| u.progress_percent.is_some())
        .unwrap();
    let bytes = done.progress.expect("bytes reported");
    assert_eq!((bytes.done_bytes, bytes.total_bytes), (100, 100));
    assert!(
        done.message.contains("100 B of 100 B (100%)"),
        "{}",
        done.message
    );
    let saved = h.journal.saved.lock().unwrap().clone();
    assert!(
        saved.iter().any(|r| r
            .attempt
            .as_ref()
            .and_then(|a| a.progress)
            .is_some_and(|p| p.done_bytes == 100)),
        "the progress was not kept in the record"
    );
    // A new phase starts without it.
    assert_eq!(h.record.attempt.as_ref().unwrap().progress, None);
}

#[tokio::test]
async fn reports_carry_the_time_of_the_clock() {
    let mut h = Harness::new();
    h.clock.store(1_764_000_000_000, Ordering::SeqCst);
    h.want(15, 1);
    h.step().await;
    let at = h.sink.updates.lock().unwrap()[0].1.at.clone();
    assert_eq!(at, "2025-11-24T16:00:00.000Z");
}
