//! Metric names and the internal events of the state watcher, each of which logs and counts.

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

use crate::keys::Kind;

/// The etcd revision of the snapshot readers see.
pub const REVISION: &str = "lain_state_revision";
/// Snapshots published to readers.
pub const SNAPSHOT_SWAPS: &str = "lain_state_snapshot_swaps_total";
/// Records skipped because their key or value was malformed, by kind (`unknown` when the key
/// named none).
pub const INVALID_RECORDS: &str = "lain_state_invalid_records_total";
/// Records in the current snapshot, by kind.
pub const RECORDS: &str = "lain_state_records";
/// Times the watcher lost its etcd stream and started again.
pub const RECONNECTS: &str = "lain_state_watch_reconnects_total";
/// Full re-lists, after a start or a compaction.
pub const RELISTS: &str = "lain_state_relists_total";
/// 1 while a watch stream is established.
pub const CONNECTED: &str = "lain_state_watch_connected";

/// The watcher's metrics, registered once per registry.
#[derive(Clone, Debug)]
pub struct StateMetrics {
    pub(crate) revision: IntGauge,
    pub(crate) swaps: IntCounter,
    pub(crate) invalid: IntCounterVec,
    pub(crate) records: IntGaugeVec,
    pub(crate) reconnects: IntCounter,
    /// Full re-lists so far.
    pub relists: IntCounter,
    pub(crate) connected: IntGauge,
}

impl StateMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &Registry) -> Result<StateMetrics, prometheus::Error> {
        let m = StateMetrics {
            revision: IntGauge::new(REVISION, "etcd revision of the published snapshot")?,
            swaps: IntCounter::new(SNAPSHOT_SWAPS, "snapshots published to readers")?,
            invalid: IntCounterVec::new(
                Opts::new(
                    INVALID_RECORDS,
                    "records skipped because they were malformed",
                ),
                &["kind"],
            )?,
            records: IntGaugeVec::new(
                Opts::new(RECORDS, "records in the published snapshot"),
                &["kind"],
            )?,
            reconnects: IntCounter::new(RECONNECTS, "etcd watch streams lost and started again")?,
            relists: IntCounter::new(RELISTS, "full re-lists of the cluster state")?,
            connected: IntGauge::new(CONNECTED, "1 while an etcd watch stream is established")?,
        };
        registry.register(Box::new(m.revision.clone()))?;
        registry.register(Box::new(m.swaps.clone()))?;
        registry.register(Box::new(m.invalid.clone()))?;
        registry.register(Box::new(m.records.clone()))?;
        registry.register(Box::new(m.reconnects.clone()))?;
        registry.register(Box::new(m.relists.clone()))?;
        registry.register(Box::new(m.connected.clone()))?;
        Ok(m)
    }

    /// Metrics registered nowhere, for callers that do not export them.
    pub fn unregistered() -> StateMetrics {
        // Registration into a throwaway registry cannot collide, so this cannot fail.
        StateMetrics::register(&Registry::new()).unwrap_or_else(|e| unreachable!("{e}"))
    }

    /// Watch streams lost and started again so far.
    pub fn reconnect_count(&self) -> u64 {
        self.reconnects.get()
    }

    /// The number of invalid records seen for a kind label (`unknown` for none).
    pub fn invalid_count(&self, kind: Option<Kind>) -> u64 {
        self.invalid
            .with_label_values(&[kind.map_or("unknown", Kind::segment)])
            .get()
    }
}

/// A record was skipped: logged with its key and reason, and counted by kind.
pub(crate) struct InvalidRecord<'a> {
    pub(crate) rejected: &'a crate::snapshot::Rejected,
}

impl InvalidRecord<'_> {
    pub(crate) fn emit(&self, m: &StateMetrics) {
        let kind = self.rejected.kind.map_or("unknown", Kind::segment);
        tracing::warn!(key = %self.rejected.key, kind, reason = %self.rejected.reason, "skipped malformed cluster-state record");
        m.invalid.with_label_values(&[kind]).inc();
    }
}

/// The watch stream was lost: logged with the cause and counted.
pub(crate) struct WatchLost<'a> {
    pub(crate) error: &'a str,
    pub(crate) resume_from: Option<i64>,
}

impl WatchLost<'_> {
    pub(crate) fn emit(&self, m: &StateMetrics) {
        tracing::warn!(error = self.error, resume_from = ?self.resume_from, "etcd watch lost; reconnecting");
        m.reconnects.inc();
        m.connected.set(0);
    }
}
