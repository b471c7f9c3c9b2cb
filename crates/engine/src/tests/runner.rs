//! The runner (taking revisions, adopting once) and adopting over fake instances and endpoint.

use super::fakes::{FakeInstances, FakeRouter, FakeSteps, MemoryJournal, RecordingSink};
use super::{Harness, desired, member};
use crate::phases::Phases;
use crate::ports::{Credentials, Observed};
use crate::runner::Runner;
use crate::steps::Steps;
use crate::toolchain::Toolchain;
use pgflip_core::plan::{Color, Phase, Record, Standby};
use pgflip_core::revision::Revision;
use pgflip_core::spec::{Desired, Major};

fn observed(revision: i64, desired: Result<Desired, String>) -> Observed {
    Observed {
        revision: Revision::Generation(revision),
        name: Some("orders".into()),
        desired,
    }
}

fn runner() -> (
    Runner<FakeSteps, MemoryJournal, RecordingSink>,
    FakeSteps,
    RecordingSink,
) {
    let h = Harness::new();
    (Runner::new(h.driver, Record::default()), h.steps, h.sink)
}

#[tokio::test]
async fn the_runner_adopts_once_then_steps() {
    let (mut runner, steps, _) = runner();
    runner.take(&observed(1, Ok(desired(15)))).await.unwrap();
    for _ in 0..3 {
        runner.step().await.unwrap();
    }
    assert_eq!(steps.world.lock().unwrap().adopted, 1);
    assert_eq!(runner.record().serving, Some(member(Color::Blue, 15)));
}

#[tokio::test]
async fn a_bad_revision_is_reported_once_and_changes_nothing() {
    let (mut runner, _, sink) = runner();
    runner.take(&observed(1, Ok(desired(15)))).await.unwrap();
    let bad = observed(
        2,
        Err("spec.version \"9\": PostgreSQL 9 is not supported".into()),
    );
    runner.take(&bad).await.unwrap();
    runner.take(&bad).await.unwrap();
    let updates = sink.updates.lock().unwrap().clone();
    assert_eq!(updates.len(), 1);
    assert_eq!(updates[0].0, Revision::Generation(2));
    assert!(updates[0].1.message.ends_with("; nothing was changed"));
    assert_eq!(
        runner.record().wanted.as_ref().unwrap().revision,
        Revision::Generation(1)
    );
    assert_eq!(
        runner.record().observed_revision,
        Some(Revision::Generation(2))
    );
}

#[tokio::test]
async fn the_database_and_endpoint_cannot_change_on_a_running_database() {
    let (mut runner, _, sink) = runner();
    runner.take(&observed(1, Ok(desired(15)))).await.unwrap();
    let mut moved = desired(16);
    moved.databases = vec!["other".into()];
    runner.take(&observed(2, Ok(moved))).await.unwrap();
    assert_eq!(
        runner.record().wanted.as_ref().unwrap().desired.major,
        Major(15)
    );
    let updates = sink.updates.lock().unwrap().clone();
    assert!(
        updates[0]
            .1
            .message
            .contains("cannot change on a running database")
    );
}

#[tokio::test]
async fn the_desired_state_is_recorded_as_is_not_as_text() {
    let (mut runner, _, _) = runner();
    let d = desired(17);
    runner.take(&observed(4, Ok(d.clone()))).await.unwrap();
    let json = serde_json::to_string(runner.record()).unwrap();
    let back: Record = serde_json::from_str(&json).unwrap();
    assert_eq!(back.wanted.unwrap().desired, d);
}

async fn phases_over_fakes() -> Phases<FakeInstances, FakeRouter> {
    Phases::new(
        FakeInstances::default(),
        FakeRouter::default(),
        Toolchain::discover().await,
        Credentials {
            user: "pgflip".into(),
            password: "secret".into(),
        },
    )
}

#[tokio::test]
async fn adopting_starts_what_the_record_says_runs_and_the_endpoint_before_it() {
    let phases = phases_over_fakes().await;
    let record = Record {
        serving: Some(member(Color::Green, 16)),
        standby: Some(Standby {
            member: member(Color::Blue, 15),
            retain_until_ms: 0,
            serving_fingerprint: String::new(),
        }),
        ..Default::default()
    };
    phases.adopt(&record, &desired(16)).await.unwrap();
    let running = phases.instances().running.lock().unwrap().clone();
    assert_eq!(
        running,
        [member(Color::Green, 16), member(Color::Blue, 15)]
            .into_iter()
            .collect()
    );
    let target = phases.router().target.lock().unwrap().clone().unwrap();
    assert_eq!(
        target.port, 10_161,
        "the endpoint sends clients to the serving green 16"
    );
}

#[tokio::test]
async fn adopting_a_starting_instance_waits() {
    let phases = phases_over_fakes().await;
    phases
        .instances()
        .starting
        .lock()
        .unwrap()
        .insert(member(Color::Blue, 15));
    let record = Record {
        serving: Some(member(Color::Blue, 15)),
        ..Default::default()
    };
    let err = phases.adopt(&record, &desired(15)).await.unwrap_err();
    assert!(err.is_waiting() && !err.is_final(), "{err}");
    assert!(phases.router().target.lock().unwrap().is_none());
}

#[tokio::test]
async fn a_released_runner_abandons_an_attempt_that_has_not_switched() {
    let (mut runner, steps, sink) = runner();
    runner.take(&observed(1, Ok(desired(15)))).await.unwrap();
    runner.step().await.unwrap();
    runner.take(&observed(2, Ok(desired(16)))).await.unwrap();
    while runner
        .record()
        .attempt
        .as_ref()
        .is_none_or(|a| a.phase < Phase::InitialSync)
    {
        runner.step().await.unwrap();
    }
    runner.release("the object was deleted").await.unwrap();
    assert!(runner.record().attempt.is_none());
    let w = steps.world.lock().unwrap();
    assert!(w.links.is_empty(), "no slot left holding WAL");
    assert_eq!(w.instances, [member(Color::Blue, 15)].into_iter().collect());
    let last = sink.updates.lock().unwrap().last().unwrap().1.clone();
    assert_eq!(last.message, "the object was deleted");
}
