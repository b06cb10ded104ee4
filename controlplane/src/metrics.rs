//! Metrics of the control plane; every name is `lain_controlplane_*` with bounded labels.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// Reconcile passes, by `result` (`ok`, `error`).
pub const PASSES: &str = "lain_controlplane_reconcile_passes_total";
/// Duration of one reconcile pass.
pub const PASS_SECONDS: &str = "lain_controlplane_reconcile_pass_seconds";
/// App events recorded, by `kind` (the closed set of [`EVENT_KINDS`]).
pub const EVENTS: &str = "lain_controlplane_app_events_total";
/// State keys written or deleted, by `op` (`put`, `delete`).
pub const PUBLISHED: &str = "lain_controlplane_published_keys_total";
/// Instances replaced after crashing.
pub const RESTARTS: &str = "lain_controlplane_instance_restarts_total";
/// Instances currently published as endpoints.
pub const SERVING: &str = "lain_controlplane_serving_instances";

/// The event kinds used as label values; anything else is counted as `other`.
pub const EVENT_KINDS: [&str; 17] = [
    "registered",
    "deployed",
    "deploy-succeeded",
    "deploy-failed",
    "rolled-back",
    "scaled",
    "started",
    "restarted",
    "healthy",
    "crashed",
    "oom-killed",
    "removed",
    "rescheduled",
    "stranded",
    "pending",
    "start-failed",
    "other",
];

/// The label value for an event kind.
pub fn event_label(kind: &str) -> &'static str {
    EVENT_KINDS
        .iter()
        .find(|k| **k == kind)
        .copied()
        .unwrap_or("other")
}

/// The control plane's metrics, registered in one registry.
#[derive(Clone, Debug)]
pub struct Metrics {
    /// See [`PASSES`].
    pub passes: IntCounterVec,
    /// See [`PASS_SECONDS`].
    pub pass_seconds: Histogram,
    /// See [`EVENTS`].
    pub events: IntCounterVec,
    /// See [`PUBLISHED`].
    pub published: IntCounterVec,
    /// See [`RESTARTS`].
    pub restarts: IntCounter,
    /// See [`SERVING`].
    pub serving: IntGauge,
}

impl Metrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn new(registry: &Registry) -> Metrics {
        let m = Metrics {
            passes: IntCounterVec::new(Opts::new(PASSES, "Reconcile passes."), &["result"])
                .expect("valid metric"),
            pass_seconds: Histogram::with_opts(HistogramOpts::new(
                PASS_SECONDS,
                "Duration of one reconcile pass.",
            ))
            .expect("valid metric"),
            events: IntCounterVec::new(Opts::new(EVENTS, "App events recorded."), &["kind"])
                .expect("valid metric"),
            published: IntCounterVec::new(Opts::new(PUBLISHED, "State keys written."), &["op"])
                .expect("valid metric"),
            restarts: IntCounter::new(RESTARTS, "Instances replaced after crashing.")
                .expect("valid metric"),
            serving: IntGauge::new(SERVING, "Instances published as endpoints.")
                .expect("valid metric"),
        };
        let _ = registry.register(Box::new(m.passes.clone()));
        let _ = registry.register(Box::new(m.pass_seconds.clone()));
        let _ = registry.register(Box::new(m.events.clone()));
        let _ = registry.register(Box::new(m.published.clone()));
        let _ = registry.register(Box::new(m.restarts.clone()));
        let _ = registry.register(Box::new(m.serving.clone()));
        m
    }
}
