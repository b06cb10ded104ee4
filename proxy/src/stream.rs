//! TCP routes (LAIN's streamrouter): each `state/streams/{listen_port}` record opens a
//! listening port whose connections are forwarded, round robin, to the healthy endpoints of
//! the record's proc.
//!
//! A manager follows the cluster state. It compiles the records into an immutable
//! [`StreamTable`] published with `arc-swap` (so an accepted connection reads its targets
//! without a lock), opens a listener for every new port and closes the listeners of ports
//! that went away; connections already forwarded stay open until either side closes, or
//! until nothing has passed either way for the idle timeout (nginx's `proxy_timeout`), so
//! that a client that vanished without a word (behind a NAT that forgot it) does not hold
//! two sockets and a task for good. A port
//! outside the configured range, or one that cannot be bound, is skipped, logged and
//! counted, and everything else is applied.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use lain_common::Shutdown;
use lain_state::{Snapshot, StateHandle};
use prometheus::{IntCounter, IntGauge, Registry};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::upgrade::Sockets;
use crate::upstream::now_ms;

/// TCP connections accepted on stream ports.
pub const STREAM_CONNECTIONS: &str = "lain_proxy_stream_connections_total";
/// TCP connections closed because no endpoint could be reached.
pub const STREAM_CONNECT_ERRORS: &str = "lain_proxy_stream_connect_errors_total";
/// TCP connections being forwarded now.
pub const STREAM_ACTIVE: &str = "lain_proxy_stream_active_connections";
/// Stream ports listening now.
pub const STREAM_LISTENERS: &str = "lain_proxy_stream_listeners";
/// Stream records skipped: port outside the range, or the port could not be bound.
pub const STREAM_REJECTED: &str = "lain_proxy_stream_rejected_total";

/// The stream metrics.
#[derive(Debug, Clone)]
pub struct StreamMetrics {
    /// See [`STREAM_CONNECTIONS`].
    pub connections: IntCounter,
    /// See [`STREAM_CONNECT_ERRORS`].
    pub connect_errors: IntCounter,
    /// See [`STREAM_ACTIVE`].
    pub active: IntGauge,
    /// See [`STREAM_LISTENERS`].
    pub listeners: IntGauge,
    /// See [`STREAM_REJECTED`].
    pub rejected: IntCounter,
}

impl StreamMetrics {
    /// Creates the metrics and registers them.
    pub fn register(r: &Registry) -> Result<StreamMetrics, prometheus::Error> {
        let m = StreamMetrics {
            connections: IntCounter::new(STREAM_CONNECTIONS, "stream connections accepted")?,
            connect_errors: IntCounter::new(
                STREAM_CONNECT_ERRORS,
                "stream connections with no reachable endpoint",
            )?,
            active: IntGauge::new(STREAM_ACTIVE, "stream connections being forwarded")?,
            listeners: IntGauge::new(STREAM_LISTENERS, "stream ports listening")?,
            rejected: IntCounter::new(STREAM_REJECTED, "stream records skipped")?,
        };
        r.register(Box::new(m.connections.clone()))?;
        r.register(Box::new(m.connect_errors.clone()))?;
        r.register(Box::new(m.active.clone()))?;
        r.register(Box::new(m.listeners.clone()))?;
        r.register(Box::new(m.rejected.clone()))?;
        Ok(m)
    }
}

/// How stream ports are opened.
#[derive(Debug, Clone)]
pub struct StreamSettings {
    /// The address stream ports listen on.
    pub listen_ip: IpAddr,
    /// The lowest port a record may claim.
    pub port_min: u16,
    /// The highest port a record may claim.
    pub port_max: u16,
    /// How long connecting to one endpoint may take before the next is tried.
    pub connect_timeout: Duration,
    /// How long a forwarded connection may carry nothing either way before it is closed.
    pub idle_timeout: Duration,
}

/// One TCP route: where a port's connections go.
#[derive(Debug)]
pub struct StreamRoute {
    /// The app.
    pub app: String,
    /// The proc.
    pub proc_name: String,
    /// The healthy endpoints, sorted.
    pub targets: Vec<SocketAddr>,
    rr: AtomicUsize,
}

impl StreamRoute {
    /// The targets in the order this connection tries them: round robin start, then the rest.
    fn order(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        let n = self.targets.len();
        let start = if n == 0 {
            0
        } else {
            self.rr.fetch_add(1, Ordering::Relaxed) % n
        };
        (0..n).map(move |i| self.targets[(start + i) % n])
    }
}

/// The compiled TCP routes by listening port.
#[derive(Debug, Default)]
pub struct StreamTable {
    routes: HashMap<u16, Arc<StreamRoute>>,
}

impl StreamTable {
    /// Compiles the stream records of `snap`. Records outside `port_min..=port_max` are
    /// returned as rejected keys with the reason.
    pub fn compile(snap: &Snapshot, settings: &StreamSettings) -> (StreamTable, Vec<String>) {
        // Healthy endpoints by (app, proc).
        let mut endpoints: HashMap<(&str, &str), Vec<(IpAddr, u16)>> = HashMap::new();
        for item in snap.endpoints.values() {
            let e = &item.value;
            if e.healthy {
                endpoints
                    .entry((e.app.as_str(), e.proc_name.as_str()))
                    .or_default()
                    .push((e.address, e.port));
            }
        }
        let mut routes = HashMap::new();
        let mut rejected = Vec::new();
        for item in snap.streams.values() {
            let r = &item.value;
            if !(settings.port_min..=settings.port_max).contains(&r.listen_port) {
                rejected.push(format!(
                    "{}: listen_port {} is outside {}..={}",
                    item.key, r.listen_port, settings.port_min, settings.port_max
                ));
                continue;
            }
            let mut targets: Vec<SocketAddr> = endpoints
                .get(&(r.app.as_str(), r.proc_name.as_str()))
                .map(|eps| {
                    eps.iter()
                        .map(|(ip, port)| SocketAddr::new(*ip, r.upstream_port.unwrap_or(*port)))
                        .collect()
                })
                .unwrap_or_default();
            targets.sort();
            targets.dedup();
            routes.insert(
                r.listen_port,
                Arc::new(StreamRoute {
                    app: r.app.clone(),
                    proc_name: r.proc_name.clone(),
                    targets,
                    rr: AtomicUsize::new(0),
                }),
            );
        }
        (StreamTable { routes }, rejected)
    }

    /// The route of `port`, if any.
    pub fn get(&self, port: u16) -> Option<&Arc<StreamRoute>> {
        self.routes.get(&port)
    }
}

/// The prefix of stream listeners' names in a binary upgrade's hand-over.
const STREAM_PREFIX: &str = "stream:";

fn stream_name(port: u16) -> String {
    format!("{STREAM_PREFIX}{port}")
}

/// Follows the cluster state and keeps one listener per stream port. Returns at shutdown.
pub async fn run(
    handle: StateHandle,
    settings: StreamSettings,
    metrics: StreamMetrics,
    sockets: Sockets,
    shutdown: Shutdown,
) {
    let table: Arc<ArcSwap<StreamTable>> = Arc::default();
    let mut listeners: BTreeMap<u16, JoinHandle<()>> = BTreeMap::new();
    let mut rx = handle.subscribe();
    let mut last: Option<Arc<Snapshot>> = None;
    let mut reported: Vec<String> = Vec::new();
    loop {
        if *rx.borrow_and_update() > 0 {
            let snap = handle.load();
            let changed = last.as_ref().is_none_or(|l| {
                !Arc::ptr_eq(&l.streams, &snap.streams)
                    || !Arc::ptr_eq(&l.endpoints, &snap.endpoints)
            });
            if changed {
                let (compiled, rejected) = StreamTable::compile(&snap, &settings);
                for r in &rejected {
                    if !reported.contains(r) {
                        tracing::warn!(record = %r, "stream record skipped");
                        metrics.rejected.inc();
                    }
                }
                reported = rejected;
                let wanted: Vec<u16> = compiled.routes.keys().copied().collect();
                table.store(Arc::new(compiled));
                // Close the ports that went away; their open connections carry on.
                listeners.retain(|port, task| {
                    let keep = wanted.contains(port) && !task.is_finished();
                    if !keep {
                        task.abort();
                        sockets.listeners.unregister(&stream_name(*port));
                    }
                    keep
                });
                for port in wanted {
                    if listeners.contains_key(&port) {
                        continue;
                    }
                    let addr = SocketAddr::new(settings.listen_ip, port);
                    match sockets.bind(&stream_name(port), addr).await {
                        Ok(l) => {
                            tracing::info!(%addr, "stream port listening");
                            let task = tokio::spawn(accept_loop(
                                l,
                                port,
                                table.clone(),
                                settings.connect_timeout,
                                settings.idle_timeout,
                                metrics.clone(),
                            ));
                            listeners.insert(port, task);
                        }
                        Err(e) => {
                            // Tried again on the next change of cluster state.
                            tracing::warn!(%addr, error = %e, "cannot open stream port");
                            metrics.rejected.inc();
                        }
                    }
                }
                metrics.listeners.set(listeners.len() as i64);
                // Stream ports a predecessor had but this state no longer routes are closed,
                // so their clients are refused instead of queued on a socket nobody accepts.
                if let Some(inherited) = &sockets.inherited {
                    inherited.close_where(|name| name.starts_with(STREAM_PREFIX));
                }
                last = Some(snap);
            }
        }
        tokio::select! {
            _ = shutdown.wait() => break,
            r = rx.changed() => if r.is_err() { break },
        }
    }
    for (port, task) in listeners {
        task.abort();
        sockets.listeners.unregister(&stream_name(port));
    }
    metrics.listeners.set(0);
}

async fn accept_loop(
    listener: TcpListener,
    port: u16,
    table: Arc<ArcSwap<StreamTable>>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    metrics: StreamMetrics,
) {
    loop {
        let client = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(port, error = %e, "stream accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        metrics.connections.inc();
        let Some(route) = table.load().get(port).cloned() else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _ = client.set_nodelay(true);
            let mut upstream = None;
            for target in route.order() {
                match tokio::time::timeout(connect_timeout, TcpStream::connect(target)).await {
                    Ok(Ok(s)) => {
                        upstream = Some(s);
                        break;
                    }
                    Ok(Err(e)) => tracing::debug!(%target, error = %e, "stream connect failed"),
                    Err(_) => tracing::debug!(%target, "stream connect timed out"),
                }
            }
            let Some(mut upstream) = upstream else {
                metrics.connect_errors.inc();
                tracing::warn!(port, app = %route.app, proc = %route.proc_name,
                    "no endpoint reachable for a stream connection");
                return;
            };
            let _ = upstream.set_nodelay(true);
            metrics.active.inc();
            let mut client = client;
            relay(&mut client, &mut upstream, idle_timeout).await;
            metrics.active.dec();
        });
    }
}

/// Copies both ways until either side closes (and the other has been told), or until
/// nothing has moved either way for `idle`.
async fn relay(client: &mut TcpStream, upstream: &mut TcpStream, idle: Duration) {
    let last = AtomicU64::new(now_ms());
    let mut a = Stamped {
        inner: client,
        last: &last,
    };
    let mut b = Stamped {
        inner: upstream,
        last: &last,
    };
    let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
    tokio::pin!(copy);
    loop {
        let quiet = Duration::from_millis(now_ms().saturating_sub(last.load(Ordering::Relaxed)));
        // A timeout too far away to be a point in time is no timeout.
        let Some(due) = Instant::now().checked_add(idle.saturating_sub(quiet)) else {
            let _ = copy.await;
            return;
        };
        tokio::select! {
            _ = &mut copy => return,
            _ = tokio::time::sleep_until(due.into()) => {
                // Traffic since the timer was set moves the deadline instead.
                let quiet = now_ms().saturating_sub(last.load(Ordering::Relaxed));
                if Duration::from_millis(quiet) >= idle {
                    tracing::debug!("stream connection idle, closed");
                    return;
                }
            }
        }
    }
}

/// A socket that notes when it last read something: the idle clock of a relay, kept
/// without a timer reset per read.
struct Stamped<'a> {
    inner: &'a mut TcpStream,
    /// [`now_ms`] of the last read that brought bytes.
    last: &'a AtomicU64,
}

impl AsyncRead for Stamped<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut *this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.last.store(now_ms(), Ordering::Relaxed);
        }
        r
    }
}

impl AsyncWrite for Stamped<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lain_state::{Keyspace, StateDocument};

    #[test]
    fn compile_targets_ports_and_range() {
        let doc: StateDocument = serde_json::from_value(serde_json::json!({
            "streams": [
                {"listen_port": 9501, "app": "redis", "proc": "redis"},
                {"listen_port": 9502, "app": "redis", "proc": "redis", "upstream_port": 7000},
                {"listen_port": 80, "app": "redis", "proc": "redis"},
            ],
            "endpoints": [
                {"app": "redis", "proc": "redis", "proc_type": "worker", "instance": 1,
                 "node": "n1", "address": "10.0.0.2", "port": 6379, "healthy": true,
                 "version": "1"},
                {"app": "redis", "proc": "redis", "proc_type": "worker", "instance": 2,
                 "node": "n1", "address": "10.0.0.1", "port": 6379, "healthy": true,
                 "version": "1"},
                {"app": "redis", "proc": "redis", "proc_type": "worker", "instance": 3,
                 "node": "n1", "address": "10.0.0.3", "port": 6379, "healthy": false,
                 "version": "1"},
            ],
        }))
        .unwrap();
        let (snap, bad) = Snapshot::from_document(&Keyspace::default(), &doc);
        assert!(bad.is_empty(), "{bad:?}");
        let settings = StreamSettings {
            listen_ip: "127.0.0.1".parse().unwrap(),
            port_min: 9500,
            port_max: 10000,
            connect_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(600),
        };
        let (t, rejected) = StreamTable::compile(&snap, &settings);
        assert_eq!(rejected.len(), 1, "{rejected:?}");
        assert!(rejected[0].contains("outside 9500..=10000"));
        let r = t.get(9501).unwrap();
        let want: Vec<SocketAddr> = vec![
            "10.0.0.1:6379".parse().unwrap(),
            "10.0.0.2:6379".parse().unwrap(),
        ];
        assert_eq!(r.targets, want);
        // Round robin: consecutive connections start at different endpoints.
        let a: Vec<_> = r.order().collect();
        let b: Vec<_> = r.order().collect();
        assert_ne!(a[0], b[0]);
        assert_eq!(a.len(), 2);
        assert_eq!(t.get(9502).unwrap().targets[0].port(), 7000);
        assert!(t.get(80).is_none());
    }
}
