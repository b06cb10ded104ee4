//! Forwarding of names outside the cluster zones to upstream resolvers (hickory-resolver),
//! with a bounded answer cache in front so repeated lookups never leave the process.
//!
//! The cache is ours rather than the resolver's so that hits can be counted and its size
//! bounded in entries; the resolver's own cache is turned off.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{LowerName, Name, Record, RecordType};
use hickory_resolver::Resolver;
use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};

use crate::handler::Reply;
use crate::metrics::DnsMetrics;

/// The shortest time a negative or empty answer is cached.
const MIN_NEGATIVE_CACHE: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
struct Entry {
    expires: Instant,
    rcode: ResponseCode,
    answers: Arc<[Record]>,
    authorities: Arc<[Record]>,
}

/// Forwards queries to the configured upstreams.
pub struct Forwarder {
    resolver: Resolver<TokioRuntimeProvider>,
    cache: Mutex<Cache>,
    max_entries: usize,
    /// Permits for queries waiting for an upstream.
    in_flight: tokio::sync::Semaphore,
    metrics: DnsMetrics,
}

#[derive(Default)]
struct Cache {
    entries: HashMap<(LowerName, RecordType), Entry>,
    /// When expired entries were last swept out of a full cache.
    swept: Option<Instant>,
}

/// A full cache is swept of expired entries at most this often; in between, a new entry
/// takes the place of an arbitrary one. A sweep on every insert into a cache full of live
/// entries would scan all of it under the lock each time.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder")
            .field("max_entries", &self.max_entries)
            .finish()
    }
}

/// Why the forwarder could not be built.
#[derive(Debug, thiserror::Error)]
#[error("cannot build the forwarding resolver: {0}")]
pub struct ForwardError(String);

impl Forwarder {
    /// A forwarder to `upstreams`, each tried over UDP and then TCP, with a cache of
    /// `max_entries` answers and at most `max_in_flight` queries waiting for an upstream.
    pub fn new(
        upstreams: &[SocketAddr],
        timeout: Duration,
        max_entries: usize,
        max_in_flight: usize,
        metrics: DnsMetrics,
    ) -> Result<Forwarder, ForwardError> {
        let servers = upstreams
            .iter()
            .map(|u| {
                let mut udp = ConnectionConfig::udp();
                udp.port = u.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = u.port();
                NameServerConfig::new(u.ip(), true, vec![udp, tcp])
            })
            .collect();
        let config = ResolverConfig::from_name_servers(servers);
        let mut opts = ResolverOpts::default();
        opts.timeout = timeout;
        opts.attempts = 1;
        opts.ndots = 0;
        opts.cache_size = 0;
        opts.use_hosts_file = ResolveHosts::Never;
        opts.preserve_intermediates = true;
        opts.recursion_desired = true;
        let resolver = Resolver::builder_with_config(config, TokioRuntimeProvider::default())
            .with_options(opts)
            .build()
            .map_err(|e| ForwardError(e.to_string()))?;
        Ok(Forwarder {
            resolver,
            cache: Mutex::new(Cache::default()),
            max_entries: max_entries.max(1),
            in_flight: tokio::sync::Semaphore::new(max_in_flight.max(1)),
            metrics,
        })
    }

    /// Answers one question from the cache or the upstreams.
    pub async fn forward(&self, name: Name, qtype: RecordType) -> Reply<'static> {
        let key = (LowerName::from(&name), qtype);
        let now = Instant::now();
        if let Some(hit) = self.cached(&key, now) {
            self.metrics
                .forward_queries
                .with_label_values(&["hit"])
                .inc();
            return hit;
        }
        let Ok(_permit) = self.in_flight.try_acquire() else {
            self.metrics
                .forward_queries
                .with_label_values(&["busy"])
                .inc();
            return Reply {
                rcode: ResponseCode::ServFail,
                ..Reply::default()
            };
        };
        self.metrics
            .forward_queries
            .with_label_values(&["miss"])
            .inc();
        let entry = match self.resolver.lookup(name, qtype).await {
            Ok(lookup) => {
                let ttl = lookup.answers().iter().map(|r| r.ttl).min().unwrap_or(0);
                Entry {
                    expires: now + Duration::from_secs(u64::from(ttl)),
                    rcode: ResponseCode::NoError,
                    answers: lookup.answers().into(),
                    authorities: Arc::from([]),
                }
            }
            Err(NetError::Dns(DnsError::NoRecordsFound(no))) => {
                let soa: Vec<Record> = no
                    .soa
                    .map(|s| s.into_record_of_rdata())
                    .into_iter()
                    .collect();
                let ttl = no.negative_ttl.unwrap_or(0);
                Entry {
                    expires: now + Duration::from_secs(u64::from(ttl)).max(MIN_NEGATIVE_CACHE),
                    rcode: no.response_code,
                    answers: Arc::from([]),
                    authorities: soa.into(),
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "forwarded query failed");
                self.metrics.forward_errors.inc();
                return Reply {
                    rcode: ResponseCode::ServFail,
                    ..Reply::default()
                };
            }
        };
        let reply = to_reply(&entry, now);
        self.store(key, entry, now);
        reply
    }

    fn cached(&self, key: &(LowerName, RecordType), now: Instant) -> Option<Reply<'static>> {
        let cache = self.cache.lock().ok()?;
        let entry = cache.entries.get(key)?;
        if entry.expires <= now {
            return None;
        }
        Some(to_reply(entry, now))
    }

    fn store(&self, key: (LowerName, RecordType), entry: Entry, now: Instant) {
        if entry.expires <= now {
            return;
        }
        let Ok(mut cache) = self.cache.lock() else {
            return;
        };
        let cache = &mut *cache;
        if cache.entries.len() >= self.max_entries && !cache.entries.contains_key(&key) {
            if cache.swept.is_none_or(|t| now >= t + SWEEP_INTERVAL) {
                cache.entries.retain(|_, e| e.expires > now);
                cache.swept = Some(now);
            }
            // Still full of live entries: drop one; any will do for a bounded cache.
            if cache.entries.len() >= self.max_entries
                && let Some(k) = cache.entries.keys().next().cloned()
            {
                cache.entries.remove(&k);
            }
        }
        cache.entries.insert(key, entry);
    }
}

fn to_reply(entry: &Entry, now: Instant) -> Reply<'static> {
    let left = entry.expires.saturating_duration_since(now).as_secs() as u32;
    let age = |rs: &[Record]| -> Vec<Cow<'static, Record>> {
        rs.iter()
            .map(|r| {
                let mut r = r.clone();
                r.ttl = r.ttl.min(left);
                Cow::Owned(r)
            })
            .collect()
    };
    Reply {
        rcode: entry.rcode,
        authoritative: false,
        recursion_available: true,
        answers: age(&entry.answers),
        authorities: age(&entry.authorities),
        additionals: Vec::new(),
    }
}
