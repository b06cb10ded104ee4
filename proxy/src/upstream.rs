//! A proc's endpoints and how one is chosen for a request: round robin, least connections, or
//! consistent hashing on a header or cookie, skipping endpoints that are unhealthy.
//!
//! An endpoint is healthy when the control plane says so, the active health check has not
//! taken it out, and it is not passively ejected after consecutive failures. Per-endpoint
//! state lives in [`EndpointStats`], shared by every table that contains the endpoint, so a
//! table swap keeps in-flight counts and health.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use lain_state::{Balance, HealthCheck};

use crate::metrics::{ClassCounters, ProxyMetrics};

/// Points per endpoint on the consistent-hash ring; enough to spread keys evenly.
const RING_POINTS: usize = 100;

/// Milliseconds since the process started; monotonic and cheap to compare atomically.
pub fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// Wall-clock milliseconds, for logs.
pub fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Mutable per-endpoint state, shared across table versions.
#[derive(Debug, Default)]
pub struct EndpointStats {
    /// Requests currently sent to the endpoint (for least-connections).
    pub in_flight: AtomicU64,
    /// Consecutive failed requests (connect errors or 5xx answers).
    pub consecutive_failures: AtomicU32,
    /// Passively ejected until this `now_ms()`; 0 when not ejected.
    pub ejected_until_ms: AtomicU64,
    /// Taken out by the active health check.
    pub active_down: AtomicBool,
    /// Consecutive active check results in the current direction, for rise/fall.
    pub check_streak: AtomicU32,
    /// `now_ms()` of the last active check started.
    pub last_check_ms: AtomicU64,
    /// Set while an active check is in flight, so checks never pile up.
    pub checking: AtomicBool,
}

impl EndpointStats {
    /// Records a failure; ejects the endpoint for `eject_ms` when `threshold` consecutive
    /// failures are reached. Returns `true` when this failure ejected it.
    pub fn record_failure(&self, threshold: u32, eject_ms: u64) -> bool {
        let n = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if threshold > 0 && n >= threshold {
            self.consecutive_failures.store(0, Ordering::Relaxed);
            self.ejected_until_ms
                .store(now_ms() + eject_ms, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// Records a success, which resets the failure count.
    pub fn record_success(&self) {
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
    }

    /// Whether passive ejection currently keeps the endpoint out.
    pub fn ejected(&self) -> bool {
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        until != 0 && now_ms() < until
    }
}

/// One instance of a proc.
#[derive(Debug)]
pub struct Endpoint {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The instance number.
    pub instance: u32,
    /// What the control plane says about its health.
    pub declared_healthy: bool,
    /// Shared mutable state.
    pub stats: Arc<EndpointStats>,
}

impl Endpoint {
    /// Whether requests may go to this endpoint now.
    pub fn is_healthy(&self) -> bool {
        self.is_admitted() && !self.stats.ejected()
    }

    /// Whether the control plane and the active health check let requests go to this
    /// endpoint, passive ejection aside.
    pub fn is_admitted(&self) -> bool {
        self.declared_healthy && !self.stats.active_down.load(Ordering::Relaxed)
    }
}

/// The endpoints of one proc and the balancing state over them.
#[derive(Debug)]
pub struct UpstreamGroup {
    /// The app.
    pub app: Box<str>,
    /// The proc.
    pub proc_name: Box<str>,
    /// The endpoints, by instance number.
    pub endpoints: Vec<Endpoint>,
    rr: AtomicUsize,
    /// Sorted (hash, endpoint index) points of the consistent-hash ring.
    ring: Vec<(u64, usize)>,
    /// The proc's active health check and the host of the route that declared it.
    healthcheck: OnceLock<(HealthCheck, Box<str>)>,
    counters: OnceLock<ClassCounters>,
}

/// A hash that is part of lain's behaviour, not of the Rust release it was built with: every
/// proxy of a fleet, whatever its version (during a rolling upgrade, say), sends a key to the
/// same endpoint. `std`'s `DefaultHasher` makes no such promise. FNV-1a over the bytes,
/// then MurmurHash3's 64-bit finaliser, since FNV alone spreads short, similar keys (ring
/// points `addr#0`, `addr#1`, ...) poorly over the ring.
fn stable_hash(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in *part {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The ring point `p` of the endpoint at `addr`: its address as text, `#`, and `p`.
fn point_of(addr: SocketAddr, p: usize) -> u64 {
    stable_hash(&[addr.to_string().as_bytes(), b"#", p.to_string().as_bytes()])
}

impl UpstreamGroup {
    /// A group over `endpoints`.
    pub fn new(app: &str, proc_name: &str, mut endpoints: Vec<Endpoint>) -> UpstreamGroup {
        endpoints.sort_by_key(|e| (e.instance, e.addr));
        let mut ring = Vec::with_capacity(endpoints.len() * RING_POINTS);
        for (i, e) in endpoints.iter().enumerate() {
            for p in 0..RING_POINTS {
                ring.push((point_of(e.addr, p), i));
            }
        }
        ring.sort_unstable();
        UpstreamGroup {
            app: app.into(),
            proc_name: proc_name.into(),
            endpoints,
            rr: AtomicUsize::new(0),
            ring,
            healthcheck: OnceLock::new(),
            counters: OnceLock::new(),
        }
    }

    /// Sets the active health check of the proc, declared by a route of `host` (the first
    /// route that declares one wins).
    pub fn set_healthcheck(&self, hc: HealthCheck, host: &str) {
        let _ = self.healthcheck.set((hc, host.into()));
    }

    /// The active health check, if a route of the proc declares one.
    pub fn healthcheck(&self) -> Option<&HealthCheck> {
        self.healthcheck.get().map(|(hc, _)| hc)
    }

    /// The host the health check asks for: that of the route that declared it, since apps
    /// that check the `Host` of each request (Django's `ALLOWED_HOSTS`, name-based virtual
    /// hosts) answer an address with a 400.
    pub fn healthcheck_host(&self) -> Option<&str> {
        self.healthcheck.get().map(|(_, host)| &**host)
    }

    /// Resolves the proc's request counters; called when the table is compiled, so that
    /// requests never look a labelled counter up.
    pub fn bind_counters(&self, metrics: &ProxyMetrics) {
        let _ = self
            .counters
            .get_or_init(|| ClassCounters::resolve(&metrics.requests, &self.app, &self.proc_name));
    }

    /// The proc's request counters, once bound.
    pub fn counters(&self) -> Option<&ClassCounters> {
        self.counters.get()
    }

    /// Whether any endpoint is healthy now.
    pub fn any_healthy(&self) -> bool {
        self.endpoints.iter().any(Endpoint::is_healthy)
    }

    /// Whether a request has anywhere to go: some endpoint the control plane and the active
    /// health check both admit. Passive ejection alone never leaves a proc without an
    /// endpoint (see [`UpstreamGroup::select`]).
    pub fn any_admitted(&self) -> bool {
        self.endpoints.iter().any(Endpoint::is_admitted)
    }

    /// Carries the round-robin position over from the group this one replaces, so that a
    /// table swap does not send the next request of every proc to its first endpoint.
    pub fn continue_from(&self, previous: &UpstreamGroup) {
        self.rr
            .store(previous.rr.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    /// Chooses an endpoint for a request, skipping unhealthy ones and those in `exclude`
    /// (endpoints already tried by this request). `hash_key` is the value of the header or
    /// cookie a hashing policy names. When every healthy endpoint was already tried, tried
    /// ones are allowed again, so a retry still has somewhere to go.
    ///
    /// When passive ejection has taken out every endpoint the health checks admit, it is
    /// ignored, as Envoy's panic threshold and nginx's single-server upstreams do: ejection
    /// is meant to move traffic to healthier peers, and with none left the app's own
    /// answers (a 500 a client provokes on purpose, say) are better than the proxy's 503
    /// for every request to the proc.
    pub fn select(
        &self,
        balance: &Balance,
        hash_key: Option<&[u8]>,
        exclude: &[SocketAddr],
    ) -> Option<&Endpoint> {
        self.pick(balance, hash_key, |e| {
            e.is_healthy() && !exclude.contains(&e.addr)
        })
        .or_else(|| self.pick(balance, hash_key, Endpoint::is_healthy))
        .or_else(|| self.pick(balance, hash_key, Endpoint::is_admitted))
    }

    fn pick(
        &self,
        balance: &Balance,
        hash_key: Option<&[u8]>,
        ok: impl Fn(&Endpoint) -> bool,
    ) -> Option<&Endpoint> {
        let n = self.endpoints.len();
        if n == 0 {
            return None;
        }
        match (balance, hash_key) {
            (Balance::LeastConn, _) => {
                // Ties are broken round robin so idle endpoints share the load.
                let start = self.rr.fetch_add(1, Ordering::Relaxed);
                (0..n)
                    .map(|i| &self.endpoints[(start + i) % n])
                    .filter(|e| ok(e))
                    .min_by_key(|e| e.stats.in_flight.load(Ordering::Relaxed))
            }
            (Balance::HashHeader { .. } | Balance::HashCookie { .. }, Some(key)) => {
                let h = stable_hash(&[key]);
                let start = self.ring.partition_point(|(p, _)| *p < h);
                let len = self.ring.len();
                (0..len)
                    .map(|i| &self.endpoints[self.ring[(start + i) % len].1])
                    .find(|e| ok(e))
            }
            _ => {
                let start = self.rr.fetch_add(1, Ordering::Relaxed);
                (0..n)
                    .map(|i| &self.endpoints[(start + i) % n])
                    .find(|e| ok(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(n: u16) -> UpstreamGroup {
        let eps = (1..=n)
            .map(|i| Endpoint {
                addr: SocketAddr::from(([127, 0, 0, 1], 8000 + i)),
                instance: u32::from(i),
                declared_healthy: true,
                stats: Arc::default(),
            })
            .collect();
        UpstreamGroup::new("a", "web", eps)
    }

    #[test]
    fn round_robin_cycles_and_skips_unhealthy() {
        let g = group(3);
        let ports: Vec<_> = (0..6)
            .map(|_| {
                g.select(&Balance::RoundRobin, None, &[])
                    .unwrap()
                    .addr
                    .port()
            })
            .collect();
        assert_eq!(ports, [8001, 8002, 8003, 8001, 8002, 8003]);
        g.endpoints[1]
            .stats
            .active_down
            .store(true, Ordering::Relaxed);
        for _ in 0..6 {
            assert_ne!(
                g.select(&Balance::RoundRobin, None, &[])
                    .unwrap()
                    .addr
                    .port(),
                8002
            );
        }
        for e in &g.endpoints {
            e.stats.active_down.store(true, Ordering::Relaxed);
        }
        assert!(g.select(&Balance::RoundRobin, None, &[]).is_none());
        assert!(!g.any_healthy());
    }

    #[test]
    fn ejection_never_leaves_a_proc_without_an_endpoint() {
        let g = group(2);
        let (a, b) = (&g.endpoints[0], &g.endpoints[1]);
        assert!(a.stats.record_failure(1, 60_000));
        for _ in 0..4 {
            assert_eq!(
                g.select(&Balance::RoundRobin, None, &[]).unwrap().addr,
                b.addr
            );
        }
        // Both ejected: both serve again, in turn, rather than neither.
        assert!(b.stats.record_failure(1, 60_000));
        assert!(!g.any_healthy());
        assert!(g.any_admitted());
        let picked: std::collections::HashSet<_> = (0..4)
            .map(|_| g.select(&Balance::RoundRobin, None, &[]).unwrap().addr)
            .collect();
        assert_eq!(picked.len(), 2);
        // An endpoint the health check took out stays out, ejected peers or not.
        a.stats.active_down.store(true, Ordering::Relaxed);
        for _ in 0..4 {
            assert_eq!(
                g.select(&Balance::RoundRobin, None, &[]).unwrap().addr,
                b.addr
            );
        }
        b.stats.active_down.store(true, Ordering::Relaxed);
        assert!(g.select(&Balance::RoundRobin, None, &[]).is_none());
        assert!(!g.any_admitted());
    }

    #[test]
    fn exclusion_prefers_untried_then_allows_tried() {
        let g = group(2);
        let a = g.endpoints[0].addr;
        for _ in 0..4 {
            assert_ne!(g.select(&Balance::RoundRobin, None, &[a]).unwrap().addr, a);
        }
        let both = [g.endpoints[0].addr, g.endpoints[1].addr];
        assert!(g.select(&Balance::RoundRobin, None, &both).is_some());
    }

    #[test]
    fn least_conn_picks_fewest_in_flight() {
        let g = group(3);
        g.endpoints[0].stats.in_flight.store(5, Ordering::Relaxed);
        g.endpoints[1].stats.in_flight.store(1, Ordering::Relaxed);
        g.endpoints[2].stats.in_flight.store(3, Ordering::Relaxed);
        for _ in 0..5 {
            assert_eq!(
                g.select(&Balance::LeastConn, None, &[])
                    .unwrap()
                    .addr
                    .port(),
                8002
            );
        }
    }

    #[test]
    fn consistent_hash_is_sticky_and_moves_only_when_needed() {
        let g = group(4);
        let policy = Balance::HashHeader {
            name: "x-user".into(),
        };
        let mut spread = std::collections::HashSet::new();
        for user in 0..200 {
            let key = format!("user-{user}");
            let first = g.select(&policy, Some(key.as_bytes()), &[]).unwrap().addr;
            let again = g.select(&policy, Some(key.as_bytes()), &[]).unwrap().addr;
            assert_eq!(first, again);
            spread.insert(first);
        }
        assert_eq!(spread.len(), 4, "keys spread over every endpoint");
        // Taking one endpoint out moves only the keys that were on it.
        g.endpoints[0]
            .stats
            .active_down
            .store(true, Ordering::Relaxed);
        let out = g.endpoints[0].addr;
        for user in 0..200 {
            let key = format!("user-{user}");
            let now = g.select(&policy, Some(key.as_bytes()), &[]).unwrap().addr;
            assert_ne!(now, out);
        }
        // Without a key, hashing falls back to round robin.
        assert!(g.select(&policy, None, &[]).is_some());
    }

    #[test]
    fn the_ring_is_the_same_in_every_build() {
        // Proxies of different versions must agree on where a key goes: these values are
        // part of the behaviour, and a change to them moves every user's sessions. (Worked
        // out independently of this code, from the FNV-1a and MurmurHash3 definitions.)
        assert_eq!(stable_hash(&[b""]), 0xefd0_1f60_ba99_2926);
        assert_eq!(stable_hash(&[b"user-1"]), stable_hash(&[b"user", b"-1"]));
        assert_eq!(stable_hash(&[b"user-1"]), 0x41a2_fca5_c684_01c5);
        assert_eq!(
            point_of(SocketAddr::from(([10, 0, 0, 1], 8080)), 7),
            0x0e8d_4637_8270_bdef
        );
    }

    #[test]
    fn ring_points_spread_keys_evenly() {
        let g = group(4);
        let policy = Balance::HashHeader {
            name: "x-user".into(),
        };
        let mut per = std::collections::HashMap::new();
        for user in 0..20_000 {
            let key = format!("session-{user}");
            let e = g.select(&policy, Some(key.as_bytes()), &[]).unwrap().addr;
            *per.entry(e).or_insert(0u32) += 1;
        }
        // 5,000 each if perfectly even; 100 points per endpoint keep every share within
        // a quarter of that.
        for (e, n) in &per {
            assert!(
                (3_750..=6_250).contains(n),
                "{e} got {n} of 20,000: {per:?}"
            );
        }
    }

    #[test]
    fn passive_ejection_after_threshold_and_readmission() {
        let s = EndpointStats::default();
        assert!(!s.record_failure(3, 60_000));
        assert!(!s.record_failure(3, 60_000));
        s.record_success();
        assert!(!s.record_failure(3, 60_000));
        assert!(!s.record_failure(3, 60_000));
        assert!(s.record_failure(3, 60_000));
        assert!(s.ejected());
        let quick = EndpointStats::default();
        assert!(quick.record_failure(1, 0));
        assert!(!quick.ejected(), "an ejection of 0 ms is over at once");
    }
}
