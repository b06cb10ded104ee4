//! The proxy's Prometheus metrics. Labels are bounded: app and proc come from the route
//! table (known apps only, empty for requests without a route), and status is a class.
//!
//! Looking up a labelled counter (`with_label_values`) takes the vector's read lock, so the
//! request path never does it: the counters of every (app, proc) are resolved into a
//! [`ClassCounters`] when a route table is compiled, and a request only increments an atomic.

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// Requests answered, by app, proc and status class (`2xx`..`5xx`, `err` when no status).
pub const REQUESTS: &str = "lain_proxy_requests_total";
/// Time from the request's arrival to the end of the response.
pub const REQUEST_SECONDS: &str = "lain_proxy_request_duration_seconds";
/// Time from sending the request upstream to the end of the upstream response.
pub const UPSTREAM_SECONDS: &str = "lain_proxy_upstream_duration_seconds";
/// Failed connection attempts to upstream endpoints.
pub const CONNECT_ERRORS: &str = "lain_proxy_upstream_connect_errors_total";
/// Endpoints passively ejected after consecutive failures.
pub const EJECTIONS: &str = "lain_proxy_upstream_ejections_total";
/// Client connections open now.
pub const ACTIVE_CONNECTIONS: &str = "lain_proxy_active_connections";
/// Client connections open now, by the worker thread they are assigned to (label `worker`, one
/// value per configured thread).
pub const WORKER_CONNECTIONS: &str = "lain_proxy_worker_connections";
/// The version of the route table serving requests.
pub const TABLE_VERSION: &str = "lain_proxy_route_table_version";
/// Routes in the table serving requests.
pub const TABLE_ROUTES: &str = "lain_proxy_route_table_routes";
/// Route tables compiled and published.
pub const TABLE_SWAPS: &str = "lain_proxy_route_table_swaps_total";
/// Route claims rejected because an older claim holds the same host and path, in the current
/// table.
pub const REJECTED_CLAIMS: &str = "lain_proxy_route_rejected_claims";
/// Access-log lines dropped because the writer fell behind.
pub const ACCESS_LOG_DROPPED: &str = "lain_proxy_access_log_dropped_total";
/// Active health-check transitions, by direction (`down`, `up`).
pub const HEALTH_TRANSITIONS: &str = "lain_proxy_health_transitions_total";
/// Server names (exact and wildcard) a TLS certificate is served for now.
pub const CERT_NAMES: &str = "lain_proxy_tls_certificate_names";
/// Certificates that did not load, by where they came from (`etcd`, `file`); the names they
/// claimed keep the certificate they had.
pub const CERT_ERRORS: &str = "lain_proxy_tls_certificate_errors_total";
/// Requests finished, by the code that served them: `h1` (lain's own HTTP/1.1 path) or
/// `pingora` (everything else).
pub const SERVED_BY: &str = "lain_proxy_served_total";

/// The proxy's metrics.
#[derive(Debug, Clone)]
pub struct ProxyMetrics {
    /// See [`REQUESTS`].
    pub requests: IntCounterVec,
    /// See [`REQUEST_SECONDS`].
    pub request_seconds: Histogram,
    /// See [`UPSTREAM_SECONDS`].
    pub upstream_seconds: Histogram,
    /// See [`CONNECT_ERRORS`].
    pub connect_errors: IntCounter,
    /// See [`EJECTIONS`].
    pub ejections: IntCounter,
    /// See [`ACTIVE_CONNECTIONS`].
    pub active_connections: IntGauge,
    /// See [`WORKER_CONNECTIONS`].
    pub worker_connections: IntGaugeVec,
    /// See [`TABLE_VERSION`].
    pub table_version: IntGauge,
    /// See [`TABLE_ROUTES`].
    pub table_routes: IntGauge,
    /// See [`TABLE_SWAPS`].
    pub table_swaps: IntCounter,
    /// See [`REJECTED_CLAIMS`].
    pub rejected_claims: IntGauge,
    /// See [`ACCESS_LOG_DROPPED`].
    pub access_log_dropped: IntCounter,
    /// See [`HEALTH_TRANSITIONS`].
    pub health_transitions: IntCounterVec,
    /// See [`CERT_NAMES`].
    pub cert_names: IntGauge,
    /// [`CERT_ERRORS`] `etcd`, resolved once.
    pub cert_errors_etcd: IntCounter,
    /// [`CERT_ERRORS`] `file`, resolved once.
    pub cert_errors_file: IntCounter,
    cert_errors: IntCounterVec,
    /// [`REQUESTS`] for requests that matched no route, resolved once.
    pub unrouted: ClassCounters,
    /// [`SERVED_BY`] `h1`, resolved once.
    pub served_by_h1: IntCounter,
    /// [`SERVED_BY`] `pingora`, resolved once.
    pub served_by_pingora: IntCounter,
    served_by: IntCounterVec,
}

/// The status classes counted, in [`status_class_index`] order.
pub const STATUS_CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "err"];

/// The [`REQUESTS`] counters of one (app, proc), one per status class, resolved ahead of
/// the requests that increment them.
#[derive(Debug, Clone)]
pub struct ClassCounters([IntCounter; 6]);

impl ClassCounters {
    /// Resolves the counters of `app` and `proc_name` (this takes the vector's lock).
    pub fn resolve(requests: &IntCounterVec, app: &str, proc_name: &str) -> ClassCounters {
        ClassCounters(STATUS_CLASSES.map(|c| requests.with_label_values(&[app, proc_name, c])))
    }

    /// Counts one request answered with `status`: a single atomic increment.
    pub fn inc(&self, status: u16) {
        self.0[status_class_index(status)].inc();
    }
}

const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

impl ProxyMetrics {
    /// Creates the metrics and registers them.
    pub fn register(r: &Registry) -> Result<ProxyMetrics, prometheus::Error> {
        let requests = IntCounterVec::new(
            Opts::new(REQUESTS, "requests answered"),
            &["app", "proc", "class"],
        )?;
        let served_by = IntCounterVec::new(
            Opts::new(SERVED_BY, "requests finished, by the code that served them"),
            &["path"],
        )?;
        let cert_errors = IntCounterVec::new(
            Opts::new(CERT_ERRORS, "certificates that did not load"),
            &["source"],
        )?;
        let m = ProxyMetrics {
            cert_names: IntGauge::new(CERT_NAMES, "server names with a certificate")?,
            cert_errors_etcd: cert_errors.with_label_values(&["etcd"]),
            cert_errors_file: cert_errors.with_label_values(&["file"]),
            cert_errors,
            unrouted: ClassCounters::resolve(&requests, "", ""),
            served_by_h1: served_by.with_label_values(&["h1"]),
            served_by_pingora: served_by.with_label_values(&["pingora"]),
            served_by,
            requests,
            request_seconds: Histogram::with_opts(
                HistogramOpts::new(REQUEST_SECONDS, "request duration").buckets(BUCKETS.to_vec()),
            )?,
            upstream_seconds: Histogram::with_opts(
                HistogramOpts::new(UPSTREAM_SECONDS, "upstream response duration")
                    .buckets(BUCKETS.to_vec()),
            )?,
            connect_errors: IntCounter::new(CONNECT_ERRORS, "failed upstream connects")?,
            ejections: IntCounter::new(EJECTIONS, "endpoints passively ejected")?,
            active_connections: IntGauge::new(ACTIVE_CONNECTIONS, "client connections open")?,
            worker_connections: IntGaugeVec::new(
                Opts::new(WORKER_CONNECTIONS, "client connections open, by worker"),
                &["worker"],
            )?,
            table_version: IntGauge::new(TABLE_VERSION, "route table version")?,
            table_routes: IntGauge::new(TABLE_ROUTES, "routes in the table")?,
            table_swaps: IntCounter::new(TABLE_SWAPS, "route tables published")?,
            rejected_claims: IntGauge::new(
                REJECTED_CLAIMS,
                "route claims rejected as conflicting",
            )?,
            access_log_dropped: IntCounter::new(ACCESS_LOG_DROPPED, "access-log lines dropped")?,
            health_transitions: IntCounterVec::new(
                Opts::new(HEALTH_TRANSITIONS, "active health-check transitions"),
                &["direction"],
            )?,
        };
        r.register(Box::new(m.requests.clone()))?;
        r.register(Box::new(m.request_seconds.clone()))?;
        r.register(Box::new(m.upstream_seconds.clone()))?;
        r.register(Box::new(m.connect_errors.clone()))?;
        r.register(Box::new(m.ejections.clone()))?;
        r.register(Box::new(m.active_connections.clone()))?;
        r.register(Box::new(m.worker_connections.clone()))?;
        r.register(Box::new(m.table_version.clone()))?;
        r.register(Box::new(m.table_routes.clone()))?;
        r.register(Box::new(m.table_swaps.clone()))?;
        r.register(Box::new(m.rejected_claims.clone()))?;
        r.register(Box::new(m.access_log_dropped.clone()))?;
        r.register(Box::new(m.health_transitions.clone()))?;
        r.register(Box::new(m.served_by.clone()))?;
        r.register(Box::new(m.cert_names.clone()))?;
        r.register(Box::new(m.cert_errors.clone()))?;
        Ok(m)
    }

    /// Metrics registered nowhere, for tests and benchmarks.
    pub fn unregistered() -> ProxyMetrics {
        ProxyMetrics::register(&Registry::new()).unwrap_or_else(|e| unreachable!("{e}"))
    }
}

/// The index in [`STATUS_CLASSES`] of a status code; `err` when no response was sent.
pub fn status_class_index(status: u16) -> usize {
    match status {
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=499 => 3,
        500..=599 => 4,
        _ => 5,
    }
}

/// The status class label of a status code; `err` when no response was sent.
pub fn status_class(status: u16) -> &'static str {
    STATUS_CLASSES[status_class_index(status)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_counters_count_by_class() {
        let m = ProxyMetrics::unregistered();
        let c = ClassCounters::resolve(&m.requests, "hello", "web");
        c.inc(200);
        c.inc(204);
        c.inc(503);
        c.inc(0);
        m.unrouted.inc(404);
        let get = |app: &str, class: &str| m.requests.with_label_values(&[app, "web", class]).get();
        assert_eq!(get("hello", "2xx"), 2);
        assert_eq!(get("hello", "5xx"), 1);
        assert_eq!(get("hello", "err"), 1);
        assert_eq!(get("hello", "4xx"), 0);
        assert_eq!(m.requests.with_label_values(&["", "", "4xx"]).get(), 1);
        assert_eq!(status_class(301), "3xx");
        assert_eq!(status_class(99), "err");
    }
}
