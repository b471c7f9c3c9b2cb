//! Leader election with a `coordination.k8s.io/v1` Lease: of the controller's replicas,
//! only the holder reconciles. The holder renews every `lease_duration / 3`; another
//! replica takes the lease over only once `renewTime + leaseDurationSeconds` has passed.
//! A holder that cannot confirm a renewal for `lease_duration - margin` gives up first,
//! so two replicas never act at once (clocks assumed roughly in step, as Kubernetes does).

use anyhow::Context;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, PostParams};
use std::time::Duration;
use tokio::sync::watch;

/// What to do with the lease as it is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Free or expired: take it.
    Acquire,
    /// Ours: renew it.
    Renew,
    /// Someone else's and still valid.
    Wait,
}

/// Pure: the decision for `me` about a lease, at `now`.
pub fn decide(lease: Option<&LeaseSpec>, me: &str, now: Timestamp) -> Decision {
    let Some(spec) = lease else {
        return Decision::Acquire;
    };
    match spec.holder_identity.as_deref() {
        None | Some("") => Decision::Acquire,
        Some(holder) if holder == me => Decision::Renew,
        Some(_) => {
            let duration =
                SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(15)));
            match &spec.renew_time {
                Some(MicroTime(renewed)) if *renewed + duration > now => Decision::Wait,
                _ => Decision::Acquire,
            }
        }
    }
}

pub struct LeaderElection {
    api: Api<Lease>,
    name: String,
    identity: String,
    lease_duration: Duration,
}

impl LeaderElection {
    pub fn new(
        client: kube::Client,
        namespace: &str,
        name: &str,
        identity: &str,
        lease_duration: Duration,
    ) -> LeaderElection {
        LeaderElection {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
            identity: identity.to_string(),
            lease_duration,
        }
    }

    fn spec(&self, now: Timestamp, acquired: Option<MicroTime>, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.lease_duration.as_secs().max(1) as i32),
            acquire_time: acquired.or(Some(MicroTime(now))),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// One round: whether this replica holds the lease afterwards. A conflicting write
    /// (another replica got there first) is a plain "no".
    async fn try_hold(&self) -> anyhow::Result<bool> {
        let now = Timestamp::now();
        let current = self.api.get_opt(&self.name).await?;
        let Some(mut lease) = current else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(self.spec(now, None, 0)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e).context("creating the lease"),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let next = match decide(Some(&spec), &self.identity, now) {
            Decision::Wait => return Ok(false),
            Decision::Renew => self.spec(
                now,
                spec.acquire_time.clone(),
                spec.lease_transitions.unwrap_or(0),
            ),
            Decision::Acquire => self.spec(now, None, spec.lease_transitions.unwrap_or(0) + 1),
        };
        lease.spec = Some(next);
        // `replace` carries the resourceVersion read above: a concurrent write conflicts.
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e).context("updating the lease"),
        }
    }

    /// Waits until this replica holds the lease, then keeps renewing it.
    pub async fn acquire(self) -> anyhow::Result<LeaderGuard> {
        let retry = (self.lease_duration / 4).max(Duration::from_millis(250));
        // When the successful write began: the renewTime it wrote is no earlier.
        let mut confirmed;
        loop {
            confirmed = tokio::time::Instant::now();
            match self.try_hold().await {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "leader election"),
            }
            tokio::time::sleep(retry).await;
        }
        let (lost_tx, lost) = watch::channel(false);
        let election = std::sync::Arc::new(self);
        let renewing = election.clone();
        let renewal = tokio::spawn(async move {
            let every = renewing.lease_duration / 3;
            // Give up before anyone else may take over.
            let give_up = renewing.lease_duration.saturating_sub(every);
            loop {
                tokio::time::sleep(every).await;
                let started = tokio::time::Instant::now();
                // A request to an API server that hangs must not keep a stale leader
                // acting: the renewal is bounded by what is left before giving up.
                let left = give_up.saturating_sub(confirmed.elapsed());
                match tokio::time::timeout(left, renewing.try_hold()).await {
                    Ok(Ok(true)) => confirmed = started,
                    Ok(Ok(false)) => break,
                    Ok(Err(e)) => {
                        tracing::warn!(error = %format!("{e:#}"), "renewing the lease");
                        if confirmed.elapsed() >= give_up {
                            break;
                        }
                    }
                    Err(_) => {
                        tracing::warn!("renewing the lease timed out");
                        break;
                    }
                }
            }
            let _ = lost_tx.send(true);
        });
        Ok(LeaderGuard {
            election,
            renewal,
            lost,
        })
    }
}

/// Held while this replica leads.
pub struct LeaderGuard {
    election: std::sync::Arc<LeaderElection>,
    renewal: tokio::task::JoinHandle<()>,
    lost: watch::Receiver<bool>,
}

impl LeaderGuard {
    /// Resolves when the lease is lost: stop acting at once.
    pub async fn lost(&self) {
        let mut lost = self.lost.clone();
        let _ = lost.wait_for(|l| *l).await;
    }

    /// Gives the lease up (graceful shutdown), so a successor need not wait it out.
    pub async fn release(self) {
        self.renewal.abort();
        let e = &self.election;
        if let Ok(Some(mut lease)) = e.api.get_opt(&e.name).await
            && let Some(spec) = lease.spec.as_mut()
            && spec.holder_identity.as_deref() == Some(e.identity.as_str())
        {
            spec.holder_identity = None;
            if let Err(err) = e.api.replace(&e.name, &PostParams::default(), &lease).await {
                tracing::warn!(error = %err, "releasing the lease");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held_by(holder: &str, renewed: Timestamp) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(renewed)),
            ..Default::default()
        }
    }

    #[test]
    fn a_valid_lease_of_another_is_waited_out_then_taken() {
        let t0: Timestamp = "2026-11-24T10:00:00Z".parse().unwrap();
        let secs = |s: i64| t0 + SignedDuration::from_secs(s);
        assert_eq!(decide(None, "a", t0), Decision::Acquire);
        assert_eq!(decide(Some(&held_by("", t0)), "a", t0), Decision::Acquire);
        assert_eq!(
            decide(Some(&held_by("a", t0)), "a", secs(60)),
            Decision::Renew
        );
        assert_eq!(
            decide(Some(&held_by("b", t0)), "a", secs(14)),
            Decision::Wait
        );
        assert_eq!(
            decide(Some(&held_by("b", t0)), "a", secs(16)),
            Decision::Acquire
        );
        let never_renewed = LeaseSpec {
            holder_identity: Some("b".into()),
            ..Default::default()
        };
        assert_eq!(decide(Some(&never_renewed), "a", t0), Decision::Acquire);
    }
}
