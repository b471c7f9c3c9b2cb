//! The controller's Prometheus metrics and its probes: `/metrics` (OpenMetrics text),
//! `/healthz` (the process serves) and `/readyz` (it has reached the API server and leads or
//! stands by for the lease). A standby replica is Ready: it is doing its job (ready to take
//! the lease over), and a Deployment with a NotReady replica never becomes Available, so
//! Flux's health check (`wait: true`) would never call pgflip's Kustomization Ready and
//! whatever depends on it would never be applied. Which replica leads is the Lease's holder
//! and the `pgflip_leader` gauge.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Database {
    namespace: String,
    name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Switch {
    namespace: String,
    name: String,
    direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    namespace: String,
    name: String,
    phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseName {
    phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorKind {
    kind: String,
}

struct Inner {
    registry: Registry,
    switches: Family<Switch, Counter>,
    pause: Histogram,
    phase: Family<PhaseLabels, Gauge>,
    lag: Family<Database, Gauge>,
    progress_done: Family<PhaseLabels, Gauge>,
    progress_total: Family<PhaseLabels, Gauge>,
    phase_seconds: Family<PhaseName, Histogram, fn() -> Histogram>,
    errors: Family<ErrorKind, Counter>,
    leader: Gauge,
}

/// 0.25 s … ~2.3 h: a phase of a switch, from a quick verification to a long copy.
fn phase_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.25, 2.0, 16))
}

#[derive(Clone)]
pub struct Metrics(Arc<Inner>);

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("pgflip");
        let switches = Family::<Switch, Counter>::default();
        registry.register("switches", "Completed switches", switches.clone());
        // 1 ms … ~16 s.
        let pause = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        registry.register(
            "switch_pause_seconds",
            "How long clients were paused at a switch",
            pause.clone(),
        );
        let phase = Family::<PhaseLabels, Gauge>::default();
        registry.register(
            "phase",
            "1 for the phase each database is in (idle when no switch runs)",
            phase.clone(),
        );
        let lag = Family::<Database, Gauge>::default();
        registry.register(
            "replication_lag_bytes",
            "Bytes the replication target is behind its source",
            lag.clone(),
        );
        let progress_done = Family::<PhaseLabels, Gauge>::default();
        registry.register(
            "progress_done_bytes",
            "Bytes done in the phase under way (the initial copy, catch-up)",
            progress_done.clone(),
        );
        let progress_total = Family::<PhaseLabels, Gauge>::default();
        registry.register(
            "progress_total_bytes",
            "Bytes the phase under way has to do in all",
            progress_total.clone(),
        );
        let phase_seconds = Family::<PhaseName, Histogram, fn() -> Histogram>::new_with_constructor(
            phase_histogram,
        );
        registry.register(
            "phase_duration_seconds",
            "How long each phase of a completed switch took",
            phase_seconds.clone(),
        );
        let errors = Family::<ErrorKind, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Failed reconciles and steps",
            errors.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica holds the lease",
            leader.clone(),
        );
        Metrics(Arc::new(Inner {
            registry,
            switches,
            pause,
            phase,
            lag,
            progress_done,
            progress_total,
            phase_seconds,
            errors,
            leader,
        }))
    }
}

fn phase_labels(namespace: &str, name: &str, phase: &str) -> PhaseLabels {
    PhaseLabels {
        namespace: namespace.into(),
        name: name.into(),
        phase: phase.into(),
    }
}

impl Metrics {
    /// A completed switch's phases, each as long as it took.
    pub fn phases_took(&self, timings_ms: &std::collections::BTreeMap<String, u64>) {
        for (phase, ms) in timings_ms {
            self.0
                .phase_seconds
                .get_or_create(&PhaseName {
                    phase: phase.clone(),
                })
                .observe(*ms as f64 / 1000.0);
        }
    }

    /// The bytes done and to do of the phase under way (none: its series removed).
    pub fn set_progress(
        &self,
        namespace: &str,
        name: &str,
        phase: &str,
        progress: Option<pgflip_core::progress::Progress>,
    ) {
        self.remove_progress(namespace, name);
        if let Some(p) = progress {
            let labels = phase_labels(namespace, name, phase);
            self.0
                .progress_done
                .get_or_create(&labels)
                .set(p.done_bytes as i64);
            self.0
                .progress_total
                .get_or_create(&labels)
                .set(p.total_bytes as i64);
        }
    }

    fn remove_progress(&self, namespace: &str, name: &str) {
        for p in pgflip_core::plan::Phase::ALL.iter().map(|p| p.as_str()) {
            let labels = phase_labels(namespace, name, p);
            self.0.progress_done.remove(&labels);
            self.0.progress_total.remove(&labels);
        }
    }

    pub fn switch_done(&self, namespace: &str, name: &str, direction: &str, pause: Duration) {
        self.0
            .switches
            .get_or_create(&Switch {
                namespace: namespace.into(),
                name: name.into(),
                direction: direction.into(),
            })
            .inc();
        self.0.pause.observe(pause.as_secs_f64());
    }

    /// Sets the database's phase: its gauge 1, the one before it removed.
    pub fn set_phase(&self, namespace: &str, name: &str, phase: &str) {
        let labels = phase_labels(namespace, name, phase);
        if self.0.phase.get(&labels).is_some() {
            return;
        }
        self.remove_phases(namespace, name);
        self.0.phase.get_or_create(&labels).set(1);
    }

    /// Removes a deleted database's phase and lag series (its switch counts stay: they
    /// are counters of what happened).
    pub fn forget(&self, namespace: &str, name: &str) {
        self.remove_phases(namespace, name);
        self.remove_progress(namespace, name);
        self.0.lag.remove(&Database {
            namespace: namespace.into(),
            name: name.into(),
        });
    }

    /// Only this database's series: found by trying the phases it can be in.
    fn remove_phases(&self, namespace: &str, name: &str) {
        for p in pgflip_core::plan::Phase::ALL
            .iter()
            .map(|p| p.as_str())
            .chain(["idle"])
        {
            self.0.phase.remove(&phase_labels(namespace, name, p));
        }
    }

    pub fn set_lag(&self, namespace: &str, name: &str, bytes: i64) {
        self.0
            .lag
            .get_or_create(&Database {
                namespace: namespace.into(),
                name: name.into(),
            })
            .set(bytes);
    }

    pub fn error(&self, kind: &str) {
        self.0
            .errors
            .get_or_create(&ErrorKind { kind: kind.into() })
            .inc();
    }

    pub fn set_leader(&self, leading: bool) {
        self.0.leader.set(i64::from(leading));
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.0.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` until `shutdown` resolves.
pub async fn serve(
    addr: SocketAddr,
    metrics: Metrics,
    ready: tokio::sync::watch::Receiver<bool>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    use axum::http::{StatusCode, header};
    use axum::routing::get;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let body = metrics.encode();
                async move {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        body,
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let ready = *ready.borrow();
                async move {
                    if ready {
                        (StatusCode::OK, "ready")
                    } else {
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "the Kubernetes API is not reached yet",
                        )
                    }
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_encoded_with_their_labels() {
        let m = Metrics::default();
        m.switch_done("shop", "orders", "upgrade", Duration::from_millis(42));
        m.set_phase("shop", "orders", "verify");
        m.set_phase("shop", "orders", "switchover");
        m.set_lag("shop", "orders", 1234);
        m.error("step");
        m.set_leader(true);
        let text = m.encode();
        for line in [
            r#"pgflip_switches_total{namespace="shop",name="orders",direction="upgrade"} 1"#,
            r#"pgflip_switch_pause_seconds_count 1"#,
            r#"pgflip_phase{namespace="shop",name="orders",phase="switchover"} 1"#,
            r#"pgflip_replication_lag_bytes{namespace="shop",name="orders"} 1234"#,
            r#"pgflip_reconcile_errors_total{kind="step"} 1"#,
            "pgflip_leader 1",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
        assert!(
            !text.contains(r#"phase="verify""#),
            "the old phase is gone:\n{text}"
        );
    }

    #[test]
    fn a_forgotten_database_leaves_no_phase_or_lag_series() {
        let m = Metrics::default();
        for name in ["orders", "billing"] {
            m.set_phase("shop", name, "catch-up");
            m.set_lag("shop", name, 7);
        }
        m.switch_done("shop", "orders", "upgrade", Duration::from_millis(42));
        m.forget("shop", "orders");
        let text = m.encode();
        assert!(!text.contains(r#"name="orders",phase"#), "{text}");
        assert!(
            !text.contains(r#"pgflip_replication_lag_bytes{namespace="shop",name="orders"}"#),
            "{text}"
        );
        assert!(
            text.contains(r#"pgflip_phase{namespace="shop",name="billing",phase="catch-up"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"pgflip_switches_total{namespace="shop",name="orders",direction="upgrade"} 1"#
            ),
            "{text}"
        );
    }

    fn progress() -> pgflip_core::progress::Progress {
        pgflip_core::progress::Progress {
            done_bytes: 40,
            total_bytes: 100,
            bytes_per_second: None,
            seconds_left: None,
        }
    }

    #[test]
    fn progress_follows_the_phase_and_phases_are_timed() {
        let m = Metrics::default();
        m.set_progress("shop", "orders", "initial-sync", Some(progress()));
        let text = m.encode();
        assert!(text.contains(r#"pgflip_progress_done_bytes{namespace="shop",name="orders",phase="initial-sync"} 40"#), "{text}");
        assert!(text.contains(r#"pgflip_progress_total_bytes{namespace="shop",name="orders",phase="initial-sync"} 100"#), "{text}");
        m.set_progress("shop", "orders", "verify", None);
        assert!(
            !m.encode().contains("pgflip_progress_done_bytes{"),
            "{}",
            m.encode()
        );
        m.phases_took(
            &[
                ("verify".to_string(), 3000),
                ("initial-sync".to_string(), 100),
            ]
            .into(),
        );
        let text = m.encode();
        assert!(
            text.contains(r#"pgflip_phase_duration_seconds_count{phase="verify"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"pgflip_phase_duration_seconds_sum{phase="verify"} 3.0"#),
            "{text}"
        );
    }

    /// Every `expr` of `dashboards/pgflip.json`, and every metric name in them.
    fn dashboard_queries() -> (Vec<String>, Vec<String>) {
        let dashboard: serde_json::Value =
            serde_json::from_str(include_str!("../../../dashboards/pgflip.json")).unwrap();
        fn collect(v: &serde_json::Value, out: &mut Vec<String>) {
            match v {
                serde_json::Value::Object(map) => {
                    for (k, v) in map {
                        match (k.as_str(), v.as_str()) {
                            ("expr" | "query", Some(e)) => out.push(e.to_string()),
                            _ => collect(v, out),
                        }
                    }
                }
                serde_json::Value::Array(items) => items.iter().for_each(|v| collect(v, out)),
                _ => {}
            }
        }
        let mut exprs = Vec::new();
        collect(&dashboard, &mut exprs);
        let mut names: Vec<String> = exprs
            .iter()
            .flat_map(|e| {
                e.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .filter(|w| w.starts_with("pgflip_"))
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .collect();
        names.sort();
        names.dedup();
        (exprs, names)
    }

    #[test]
    fn the_dashboard_queries_only_what_the_controller_exports() {
        let (exprs, names) = dashboard_queries();
        assert!(exprs.len() >= 6, "{exprs:?}");
        let m = Metrics::default();
        m.switch_done("shop", "orders", "upgrade", Duration::from_millis(42));
        m.set_phase("shop", "orders", "verify");
        m.set_lag("shop", "orders", 1);
        m.set_progress("shop", "orders", "initial-sync", Some(progress()));
        m.phases_took(&[("initial-sync".to_string(), 1500)].into());
        m.error("postgres");
        let text = m.encode();
        // The dashboard asks only for series the controller exports, and has a panel for
        // each family it exports.
        let exported: std::collections::BTreeSet<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split(['{', ' ']).next())
            .collect();
        for name in &names {
            assert!(
                exported.contains(name.as_str()),
                "the dashboard queries {name}, which the controller does not export:\n{text}"
            );
        }
        for family in [
            "pgflip_switches_total",
            "pgflip_switch_pause_seconds",
            "pgflip_phase",
            "pgflip_replication_lag_bytes",
            "pgflip_progress_done_bytes",
            "pgflip_progress_total_bytes",
            "pgflip_phase_duration_seconds",
            "pgflip_reconcile_errors_total",
            "pgflip_leader",
        ] {
            assert!(
                names.iter().any(|n| n.starts_with(family)),
                "the dashboard has no panel for {family}"
            );
        }
    }

    #[tokio::test]
    async fn probes_answer_and_readiness_follows_its_signal() {
        let port = pgflip_engine::run_as::free_port().unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let (ready_tx, ready) = tokio::sync::watch::channel(false);
        let (stop_tx, mut stop) = tokio::sync::watch::channel(false);
        let metrics = Metrics::default();
        metrics.set_leader(false);
        let server = tokio::spawn(serve(addr, metrics, ready, async move {
            let _ = stop.wait_for(|s| *s).await;
        }));
        let http = reqwest::Client::new();
        let get = |path: &str| http.get(format!("http://{addr}{path}")).send();
        let mut healthz = None;
        for _ in 0..50 {
            if let Ok(r) = get("/healthz").await {
                healthz = Some(r.status());
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(healthz, Some(reqwest::StatusCode::OK));
        assert_eq!(get("/readyz").await.unwrap().status(), 503);
        ready_tx.send(true).unwrap();
        assert_eq!(get("/readyz").await.unwrap().status(), 200);
        let metrics = get("/metrics").await.unwrap();
        assert!(
            metrics.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/openmetrics-text")
        );
        assert!(metrics.text().await.unwrap().contains("pgflip_leader 0"));
        stop_tx.send(true).unwrap();
        server.await.unwrap().unwrap();
    }
}
