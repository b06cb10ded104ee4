//! Prometheus metrics of `lain logship`. Label values are bounded: `source` is a configured
//! source name, `sink` is one of `file`, `kafka`, `elasticsearch`.

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

/// Lines read, per source.
pub const LINES_IN: &str = "lain_logship_lines_in_total";
/// Bytes read, per source.
pub const BYTES_IN: &str = "lain_logship_bytes_in_total";
/// Events acknowledged by a sink.
pub const LINES_OUT: &str = "lain_logship_lines_out_total";
/// Bytes of rendered events acknowledged by a sink.
pub const BYTES_OUT: &str = "lain_logship_bytes_out_total";
/// Bytes written to a source's files but not yet acknowledged by every sink.
pub const LAG_BYTES: &str = "lain_logship_lag_bytes";
/// Events read but not yet acknowledged by every sink (the in-memory buffer).
pub const BUFFER_EVENTS: &str = "lain_logship_buffer_events";
/// Retries of a delivery, per sink.
pub const RETRIES: &str = "lain_logship_retries_total";
/// Events a sink refused for good and wrote to its dead-letter file.
pub const DEAD_LETTERS: &str = "lain_logship_dead_letters_total";
/// Events dropped. lain logship never drops an event; this stays 0 and exists to prove it.
pub const DROPPED: &str = "lain_logship_dropped_total";
/// Checkpoint files written.
pub const CHECKPOINTS: &str = "lain_logship_checkpoints_written_total";
/// Files open for reading.
pub const FILES_OPEN: &str = "lain_logship_files_open";
/// Bytes in a sink's disk buffer.
pub const DISK_BUFFER_BYTES: &str = "lain_logship_disk_buffer_bytes";
/// Events in a sink's disk buffer not yet handed to the sink.
pub const DISK_BUFFER_EVENTS: &str = "lain_logship_disk_buffer_events";
/// Events written to a sink's disk buffer.
pub const DISK_BUFFER_SPILLED: &str = "lain_logship_disk_buffer_spilled_total";
/// Kafka producers replaced after a fatal error made them unusable.
pub const KAFKA_PRODUCER_REPLACED: &str = "lain_logship_kafka_producers_replaced_total";

/// The metric handles, registered in one registry.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// See [`LINES_IN`].
    pub lines_in: IntCounterVec,
    /// See [`BYTES_IN`].
    pub bytes_in: IntCounterVec,
    /// See [`LINES_OUT`].
    pub lines_out: IntCounterVec,
    /// See [`BYTES_OUT`].
    pub bytes_out: IntCounterVec,
    /// See [`LAG_BYTES`].
    pub lag_bytes: IntGaugeVec,
    /// See [`BUFFER_EVENTS`].
    pub buffer_events: IntGauge,
    /// See [`RETRIES`].
    pub retries: IntCounterVec,
    /// See [`DEAD_LETTERS`].
    pub dead_letters: IntCounterVec,
    /// See [`DROPPED`].
    pub dropped: IntCounter,
    /// See [`CHECKPOINTS`].
    pub checkpoints: IntCounter,
    /// See [`FILES_OPEN`].
    pub files_open: IntGauge,
    /// See [`DISK_BUFFER_BYTES`].
    pub disk_buffer_bytes: IntGaugeVec,
    /// See [`DISK_BUFFER_EVENTS`].
    pub disk_buffer_events: IntGaugeVec,
    /// See [`DISK_BUFFER_SPILLED`].
    pub disk_buffer_spilled: IntCounterVec,
    /// See [`KAFKA_PRODUCER_REPLACED`].
    pub kafka_producer_replaced: IntCounter,
}

impl Metrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn new(registry: &Registry) -> Metrics {
        let cv = |name: &str, help: &str, label: &str| {
            let c = IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric");
            let _ = registry.register(Box::new(c.clone()));
            c
        };
        let g = |name: &str, help: &str| {
            let c = IntGauge::new(name, help).expect("valid metric");
            let _ = registry.register(Box::new(c.clone()));
            c
        };
        let c = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            let _ = registry.register(Box::new(c.clone()));
            c
        };
        let gv = |name: &str, help: &str, label: &str| {
            let c = IntGaugeVec::new(Opts::new(name, help), &[label]).expect("valid metric");
            let _ = registry.register(Box::new(c.clone()));
            c
        };
        let lag = gv(
            LAG_BYTES,
            "Bytes not yet acknowledged by every sink",
            "source",
        );
        Metrics {
            lines_in: cv(LINES_IN, "Lines read", "source"),
            bytes_in: cv(BYTES_IN, "Bytes read", "source"),
            lines_out: cv(LINES_OUT, "Events acknowledged by a sink", "sink"),
            bytes_out: cv(BYTES_OUT, "Bytes acknowledged by a sink", "sink"),
            lag_bytes: lag,
            buffer_events: g(BUFFER_EVENTS, "Events read and not yet acknowledged"),
            retries: cv(RETRIES, "Delivery retries", "sink"),
            dead_letters: cv(DEAD_LETTERS, "Events written to a dead-letter file", "sink"),
            dropped: c(DROPPED, "Events dropped (always 0)"),
            checkpoints: c(CHECKPOINTS, "Checkpoint files written"),
            files_open: g(FILES_OPEN, "Files open for reading"),
            disk_buffer_bytes: gv(DISK_BUFFER_BYTES, "Bytes in a sink's disk buffer", "sink"),
            disk_buffer_events: gv(
                DISK_BUFFER_EVENTS,
                "Events in a sink's disk buffer not yet handed to the sink",
                "sink",
            ),
            disk_buffer_spilled: cv(
                DISK_BUFFER_SPILLED,
                "Events written to a sink's disk buffer",
                "sink",
            ),
            kafka_producer_replaced: c(
                KAFKA_PRODUCER_REPLACED,
                "Kafka producers replaced after a fatal error",
            ),
        }
    }
}
