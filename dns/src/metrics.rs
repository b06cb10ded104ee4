//! Metric names and the Prometheus collectors of `lain dns`. Every label set is bounded:
//! query types outside a fixed list count as `other`, response codes are the few DNS defines.

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use std::sync::{Arc, OnceLock};

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

/// Queries answered, by query type and response code.
pub const QUERIES: &str = "lain_dns_queries_total";
/// Time from a decoded request to its answer being handed to the socket, by source.
pub const QUERY_SECONDS: &str = "lain_dns_query_duration_seconds";
/// UDP answers that did not fit the client's size and were sent with TC set.
pub const TRUNCATED: &str = "lain_dns_truncated_total";
/// Forwarded queries that failed (timeout, upstream error), answered SERVFAIL.
pub const FORWARD_ERRORS: &str = "lain_dns_forward_errors_total";
/// Forwarded queries, by whether the cache answered them.
pub const FORWARD_QUERIES: &str = "lain_dns_forward_queries_total";
/// UDP queries answered from the cache of encoded answers.
pub const ANSWER_CACHE_HITS: &str = "lain_dns_answer_cache_hits_total";
/// Cacheable UDP queries the cache of encoded answers did not hold yet.
pub const ANSWER_CACHE_MISSES: &str = "lain_dns_answer_cache_misses_total";
/// Records in the compiled zone.
pub const ZONE_RECORDS: &str = "lain_dns_zone_records";
/// Cluster-state records left out of the current zone, by reason.
pub const ZONE_SKIPPED: &str = "lain_dns_zone_skipped";
/// Zones compiled and swapped in.
pub const ZONE_SWAPS: &str = "lain_dns_zone_swaps_total";
/// Time to compile a zone from a snapshot.
pub const ZONE_BUILD_SECONDS: &str = "lain_dns_zone_build_seconds";
/// The cluster-state revision of the zone being served.
pub const ZONE_REVISION: &str = "lain_dns_zone_revision";

/// Query-type labels; everything else is `other`.
const QTYPES: [(RecordType, &str); 12] = [
    (RecordType::A, "A"),
    (RecordType::AAAA, "AAAA"),
    (RecordType::SRV, "SRV"),
    (RecordType::PTR, "PTR"),
    (RecordType::CNAME, "CNAME"),
    (RecordType::TXT, "TXT"),
    (RecordType::MX, "MX"),
    (RecordType::SOA, "SOA"),
    (RecordType::NS, "NS"),
    (RecordType::ANY, "ANY"),
    (RecordType::HTTPS, "HTTPS"),
    (RecordType::AXFR, "AXFR"),
];

/// Query-type label slots: the listed types, then `other`, then `none` (no question).
const QTYPE_SLOTS: usize = QTYPES.len() + 2;

/// The label slot of a request's query type (`None`: the request had no question).
fn qtype_slot(t: Option<RecordType>) -> (usize, &'static str) {
    match t {
        None => (QTYPES.len() + 1, "none"),
        Some(t) => QTYPES
            .iter()
            .position(|(q, _)| *q == t)
            .map_or((QTYPES.len(), "other"), |i| (i, QTYPES[i].1)),
    }
}

/// Response-code labels; everything else is `other`.
const RCODES: [(ResponseCode, &str); 7] = [
    (ResponseCode::NoError, "NOERROR"),
    (ResponseCode::FormErr, "FORMERR"),
    (ResponseCode::ServFail, "SERVFAIL"),
    (ResponseCode::NXDomain, "NXDOMAIN"),
    (ResponseCode::NotImp, "NOTIMP"),
    (ResponseCode::Refused, "REFUSED"),
    (ResponseCode::BADVERS, "BADVERS"),
];

/// Response-code label slots: the listed codes, then `other`.
const RCODE_SLOTS: usize = RCODES.len() + 1;

/// The label slot of a response code.
fn rcode_slot(r: ResponseCode) -> (usize, &'static str) {
    RCODES
        .iter()
        .position(|(c, _)| *c == r)
        .map_or((RCODES.len(), "other"), |i| (i, RCODES[i].1))
}

/// Which part of the server answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The compiled cluster zone.
    Zone = 0,
    /// An upstream resolver (or its cache).
    Forward,
    /// An error answer without lookup (FORMERR, NOTIMP, REFUSED).
    Error,
}

impl Source {
    fn label(self) -> &'static str {
        match self {
            Source::Zone => "zone",
            Source::Forward => "forward",
            Source::Error => "error",
        }
    }
}

/// The collectors, registered once.
#[derive(Debug, Clone)]
pub struct DnsMetrics {
    queries: IntCounterVec,
    /// The children of `queries`, one slot per (query type, response code), each resolved
    /// the first time it is counted: afterwards a query is counted without hashing labels
    /// or taking the vector's lock.
    query_children: Arc<[OnceLock<IntCounter>]>,
    seconds: HistogramVec,
    /// The children of `seconds`, by [`Source`].
    seconds_children: [Histogram; 3],
    pub(crate) truncated: IntCounter,
    pub(crate) answer_cache_hits: IntCounter,
    pub(crate) answer_cache_misses: IntCounter,
    pub(crate) forward_errors: IntCounter,
    pub(crate) forward_queries: IntCounterVec,
    pub(crate) zone_records: IntGauge,
    pub(crate) zone_skipped: IntGaugeVec,
    pub(crate) zone_swaps: IntCounter,
    pub(crate) zone_build: Histogram,
    pub(crate) zone_revision: IntGauge,
}

impl DnsMetrics {
    /// Creates the collectors and registers them in `registry`.
    pub fn register(registry: &Registry) -> Result<DnsMetrics, prometheus::Error> {
        let seconds = HistogramVec::new(
            HistogramOpts::new(QUERY_SECONDS, "time to answer a query").buckets(vec![
                0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.005, 0.025,
                0.1, 0.5, 2.0,
            ]),
            &["source"],
        )?;
        let m = DnsMetrics {
            queries: IntCounterVec::new(
                Opts::new(QUERIES, "queries answered, by type and response code"),
                &["qtype", "rcode"],
            )?,
            query_children: (0..QTYPE_SLOTS * RCODE_SLOTS)
                .map(|_| OnceLock::new())
                .collect(),
            seconds_children: [Source::Zone, Source::Forward, Source::Error]
                .map(|s| seconds.with_label_values(&[s.label()])),
            seconds,
            truncated: IntCounter::new(TRUNCATED, "UDP answers sent truncated")?,
            answer_cache_hits: IntCounter::new(
                ANSWER_CACHE_HITS,
                "UDP queries answered from cached encoded answers",
            )?,
            answer_cache_misses: IntCounter::new(
                ANSWER_CACHE_MISSES,
                "cacheable UDP queries not in the answer cache yet",
            )?,
            forward_errors: IntCounter::new(FORWARD_ERRORS, "forwarded queries that failed")?,
            forward_queries: IntCounterVec::new(
                Opts::new(
                    FORWARD_QUERIES,
                    "forwarded queries, by cache result (hit, miss, or busy: refused with \
                     SERVFAIL as forward.max_in_flight queries were already waiting)",
                ),
                &["cache"],
            )?,
            zone_records: IntGauge::new(ZONE_RECORDS, "records in the compiled zone")?,
            zone_skipped: IntGaugeVec::new(
                Opts::new(
                    ZONE_SKIPPED,
                    "state records left out of the zone, by reason",
                ),
                &["reason"],
            )?,
            zone_swaps: IntCounter::new(ZONE_SWAPS, "zones compiled and swapped in")?,
            zone_build: Histogram::with_opts(
                HistogramOpts::new(ZONE_BUILD_SECONDS, "time to compile a zone")
                    .buckets(vec![0.000_1, 0.001, 0.005, 0.025, 0.1, 0.5, 2.0]),
            )?,
            zone_revision: IntGauge::new(ZONE_REVISION, "state revision of the served zone")?,
        };
        registry.register(Box::new(m.queries.clone()))?;
        registry.register(Box::new(m.seconds.clone()))?;
        registry.register(Box::new(m.truncated.clone()))?;
        registry.register(Box::new(m.answer_cache_hits.clone()))?;
        registry.register(Box::new(m.answer_cache_misses.clone()))?;
        registry.register(Box::new(m.forward_errors.clone()))?;
        registry.register(Box::new(m.forward_queries.clone()))?;
        registry.register(Box::new(m.zone_records.clone()))?;
        registry.register(Box::new(m.zone_skipped.clone()))?;
        registry.register(Box::new(m.zone_swaps.clone()))?;
        registry.register(Box::new(m.zone_build.clone()))?;
        registry.register(Box::new(m.zone_revision.clone()))?;
        Ok(m)
    }

    /// Collectors registered nowhere, for tests and the fuzz target.
    pub fn unregistered() -> DnsMetrics {
        // A fresh registry has no names to collide with, so this cannot fail.
        DnsMetrics::register(&Registry::new()).unwrap_or_else(|e| unreachable!("{e}"))
    }

    /// Counts one answered query.
    pub(crate) fn query(
        &self,
        qtype: Option<RecordType>,
        rcode: ResponseCode,
        source: Source,
        secs: f64,
    ) {
        let (q, q_label) = qtype_slot(qtype);
        let (r, r_label) = rcode_slot(rcode);
        self.query_children[q * RCODE_SLOTS + r]
            .get_or_init(|| self.queries.with_label_values(&[q_label, r_label]))
            .inc();
        self.seconds_children[source as usize].observe(secs);
    }

    /// UDP queries answered from the cache of encoded answers so far.
    pub fn answer_cache_hits(&self) -> u64 {
        self.answer_cache_hits.get()
    }

    /// The number of queries counted for a type and response code label.
    pub fn query_count(&self, qtype: &str, rcode: &str) -> u64 {
        self.queries.with_label_values(&[qtype, rcode]).get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_counted_under_their_bounded_labels() {
        let m = DnsMetrics::unregistered();
        m.query(
            Some(RecordType::A),
            ResponseCode::NXDomain,
            Source::Zone,
            0.0,
        );
        m.query(
            Some(RecordType::A),
            ResponseCode::NXDomain,
            Source::Zone,
            0.0,
        );
        m.query(
            Some(RecordType::AAAA),
            ResponseCode::NoError,
            Source::Zone,
            0.0,
        );
        m.query(
            Some(RecordType::CAA),
            ResponseCode::Refused,
            Source::Error,
            0.0,
        );
        m.query(None, ResponseCode::FormErr, Source::Error, 0.0);
        m.query(
            Some(RecordType::A),
            ResponseCode::YXDomain,
            Source::Forward,
            0.0,
        );
        assert_eq!(m.query_count("A", "NXDOMAIN"), 2);
        assert_eq!(m.query_count("AAAA", "NOERROR"), 1);
        assert_eq!(m.query_count("A", "NOERROR"), 0);
        assert_eq!(m.query_count("other", "REFUSED"), 1);
        assert_eq!(m.query_count("none", "FORMERR"), 1);
        assert_eq!(m.query_count("A", "other"), 1);
        assert_eq!(m.seconds.with_label_values(&["zone"]).get_sample_count(), 3);
        assert_eq!(
            m.seconds.with_label_values(&["error"]).get_sample_count(),
            2
        );
        assert_eq!(
            m.seconds.with_label_values(&["forward"]).get_sample_count(),
            1
        );
    }
}
