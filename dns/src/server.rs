//! Building and running `lain dns`: binds UDP and TCP on one port (several UDP sockets with
//! SO_REUSEPORT so every core receives), starts the state watcher, recompiles the zone on
//! every published snapshot, and drains on shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hickory_server::Server;
use lain_common::Shutdown;
use lain_common::admin::Admin;
use lain_state::{EtcdConfig, Snapshot, Source, StateHandle, StateMetrics, Watcher};
use prometheus::Registry;
use socket2::{Domain, Protocol, Socket, Type};

use crate::config::Config;
use crate::forward::Forwarder;
use crate::handler::{DnsHandler, HandlerOptions};
use crate::metrics::DnsMetrics;
use crate::zone::{SkipReason, Zone, ZoneSettings, compile};

/// Why `lain dns` could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A listener could not be bound.
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Metrics could not be registered.
    #[error("cannot register metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The zone settings are inconsistent (caught by validation first).
    #[error("{0}")]
    Settings(String),
    /// The forwarder could not be built.
    #[error(transparent)]
    Forward(#[from] crate::forward::ForwardError),
}

/// The sockets DNS is served on.
#[derive(Debug)]
pub struct Listeners {
    /// UDP sockets sharing one port.
    pub udp: Vec<std::net::UdpSocket>,
    /// The TCP listener on the same port.
    pub tcp: std::net::TcpListener,
    /// The bound address.
    pub addr: SocketAddr,
}

fn udp_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    // A larger receive buffer absorbs bursts; the kernel caps it, and failure is harmless.
    let _ = s.set_recv_buffer_size(4 << 20);
    s.bind(&addr.into())?;
    Ok(s.into())
}

fn tcp_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s.into())
}

/// Binds `count` UDP sockets and one TCP listener on the same port. With port 0, the port
/// the first UDP socket gets is tried for TCP, and another is picked if TCP holds it.
pub fn bind(addr: SocketAddr, count: usize) -> Result<Listeners, ServeError> {
    let err = |what, source| ServeError::Bind { what, addr, source };
    let mut attempt = 0;
    loop {
        attempt += 1;
        let first = udp_socket(addr).map_err(|e| err("udp", e))?;
        let bound = first.local_addr().map_err(|e| err("udp", e))?;
        let tcp = match tcp_listener(bound) {
            Ok(t) => t,
            Err(e) if addr.port() == 0 && attempt < 20 => {
                tracing::debug!(port = bound.port(), error = %e, "TCP port taken; picking another");
                continue;
            }
            Err(e) => return Err(err("tcp", e)),
        };
        let mut udp = vec![first];
        for _ in 1..count.max(1) {
            udp.push(udp_socket(bound).map_err(|e| err("udp", e))?);
        }
        return Ok(Listeners {
            udp,
            tcp,
            addr: bound,
        });
    }
}

/// Compiles zones from published snapshots and swaps them in until shut down.
async fn follow_state(
    state: StateHandle,
    zone: Arc<ArcSwap<Zone>>,
    settings: ZoneSettings,
    metrics: DnsMetrics,
    shutdown: Shutdown,
) {
    let mut rx = state.subscribe();
    let mut last: Option<Arc<Snapshot>> = None;
    let mut built: u32 = 0;
    loop {
        let generation = *rx.borrow_and_update();
        if generation > 0 {
            let snap = state.load();
            let unchanged = last.as_ref().is_some_and(|l| same_inputs(l, &snap));
            if !unchanged {
                built = built.wrapping_add(1);
                let serial = if snap.revision > 0 {
                    snap.revision as u32
                } else {
                    built
                };
                let started = Instant::now();
                let z = compile(&snap, &settings, serial);
                metrics.zone_build.observe(started.elapsed().as_secs_f64());
                publish(&zone, z, &metrics);
            }
            last = Some(snap);
        }
        tokio::select! {
            _ = shutdown.wait() => return,
            changed = rx.changed() => if changed.is_err() { return },
        }
    }
}

/// Whether two snapshots hold the same tables the zone is built from.
fn same_inputs(a: &Snapshot, b: &Snapshot) -> bool {
    Arc::ptr_eq(&a.apps, &b.apps)
        && Arc::ptr_eq(&a.endpoints, &b.endpoints)
        && Arc::ptr_eq(&a.services, &b.services)
        && Arc::ptr_eq(&a.ingress, &b.ingress)
        && Arc::ptr_eq(&a.dns, &b.dns)
}

fn publish(cell: &ArcSwap<Zone>, z: Zone, metrics: &DnsMetrics) {
    metrics.zone_records.set(z.record_count() as i64);
    metrics.zone_revision.set(z.revision());
    for reason in SkipReason::ALL {
        let n = z.skipped().iter().filter(|s| s.reason == reason).count();
        metrics
            .zone_skipped
            .with_label_values(&[reason.label()])
            .set(n as i64);
    }
    for s in z.skipped() {
        tracing::debug!(what = %s.what, reason = s.reason.label(), detail = %s.detail, "left out of the zone");
    }
    tracing::debug!(
        records = z.record_count(),
        revision = z.revision(),
        "zone swapped in"
    );
    cell.store(Arc::new(z));
    metrics.zone_swaps.inc();
}

/// Serves one UDP socket on the calling thread until `shutdown`, then drains for at most
/// `drain`. A socket that cannot be served stops the whole server rather than leaving it
/// running with one core's share of queries unanswered.
fn serve_udp(
    socket: std::net::UdpSocket,
    handler: DnsHandler,
    metrics: DnsMetrics,
    cache_entries: usize,
    shutdown: Shutdown,
    drain: Duration,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot start a UDP serving thread; shutting down");
            shutdown.trigger();
            return;
        }
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let socket = match tokio::net::UdpSocket::from_std(socket) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot serve a UDP socket; shutting down");
                shutdown.trigger();
                return;
            }
        };
        crate::udp::serve(socket, handler, metrics, cache_entries, shutdown, drain).await;
    });
}

/// Runs `lain dns` with a validated configuration until `shutdown` is triggered.
pub async fn serve(cfg: Config, shutdown: Shutdown) -> Result<(), ServeError> {
    let registry = Registry::new();
    let metrics = DnsMetrics::register(&registry)?;
    let state_metrics = StateMetrics::register(&registry)?;
    let settings = ZoneSettings::from_config(&cfg.zone).map_err(ServeError::Settings)?;

    let source = match &cfg.state.file {
        Some(path) => Source::File(path.clone()),
        None => Source::Etcd(EtcdConfig::new(
            cfg.state.etcd_endpoints.clone(),
            &cfg.state.prefix,
        )),
    };
    let watcher = Watcher::new(source, state_metrics);
    let state = watcher.handle();
    let watcher_task = tokio::spawn(watcher.run(shutdown.wait_owned()));

    let zone = Arc::new(ArcSwap::from_pointee(Zone::default()));
    let follower = tokio::spawn(follow_state(
        state.clone(),
        zone.clone(),
        settings,
        metrics.clone(),
        shutdown.clone(),
    ));

    let forwarder = if cfg.forward.upstreams.is_empty() {
        None
    } else {
        Some(Arc::new(Forwarder::new(
            &cfg.forward.upstreams,
            Duration::from_millis(cfg.forward.timeout_ms),
            usize::try_from(cfg.forward.cache_entries).unwrap_or(usize::MAX),
            cfg.forward.max_in_flight,
            metrics.clone(),
        )?))
    };
    let options = HandlerOptions {
        views: cfg.views.enabled,
        max_udp_payload: cfg.max_udp_payload_bytes,
        allowed_networks: cfg.forward.allowed_networks.clone(),
    };
    let handler = || {
        DnsHandler::new(
            zone.clone(),
            forwarder.clone(),
            options.clone(),
            metrics.clone(),
        )
    };

    let sockets = if cfg.udp_sockets == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        cfg.udp_sockets
    };
    let listeners = bind(cfg.listen, sockets)?;
    let drain = Duration::from_millis(cfg.drain_ms);
    // Each UDP socket is served on a thread of its own by a single-threaded runtime, so its
    // loop, its cache of encoded answers and the tasks answering first-time questions share
    // one core without locks and are never woken on, or stolen by, another.
    let mut udp_threads = Vec::new();
    for (i, socket) in listeners.udp.into_iter().enumerate() {
        let handler = handler();
        let shutdown = shutdown.clone();
        let metrics = metrics.clone();
        let cache_entries = cfg.answer_cache_entries;
        let thread = std::thread::Builder::new()
            .name(format!("lain-dns-udp-{i}"))
            .spawn(move || serve_udp(socket, handler, metrics, cache_entries, shutdown, drain))
            .map_err(|e| ServeError::Bind {
                what: "udp",
                addr: listeners.addr,
                source: e,
            })?;
        udp_threads.push(thread);
    }
    let mut server = Server::new(handler());
    let tcp = tokio::net::TcpListener::from_std(listeners.tcp).map_err(|e| ServeError::Bind {
        what: "tcp",
        addr: listeners.addr,
        source: e,
    })?;
    server.register_listener(tcp, Duration::from_millis(cfg.tcp_idle_ms), 64);

    let zone_page = zone.clone();
    let ready = state.clone();
    let admin_addr = Admin::new(registry)
        .page(
            "/zone",
            Arc::new(move || {
                (
                    http::StatusCode::OK,
                    "text/plain; charset=utf-8",
                    zone_page.load().dump(),
                )
            }),
        )
        .health(Arc::new(move || {
            if ready.generation() > 0 {
                Ok(())
            } else {
                Err("no cluster state loaded yet".into())
            }
        }))
        .serve(cfg.admin_listen, shutdown.clone())
        .await
        .map_err(|e| ServeError::Bind {
            what: "admin",
            addr: cfg.admin_listen,
            source: e,
        })?;
    lain_common::announce_listener("dns", listeners.addr);
    lain_common::announce_listener("admin", admin_addr);
    tracing::info!(dns = %listeners.addr, admin = %admin_addr, udp_sockets = sockets, "serving DNS");

    shutdown.wait().await;
    tracing::info!("draining");
    let stopped = lain_common::shutdown::with_grace(drain, server.shutdown_gracefully()).await;
    if stopped.is_none() {
        tracing::warn!(?drain, "in-flight TCP queries did not finish in time");
    }
    // The UDP threads drain on the same signal, each within the same grace period.
    let _ = tokio::task::spawn_blocking(move || {
        for t in udp_threads {
            let _ = t.join();
        }
    })
    .await;
    let _ = lain_common::shutdown::with_grace(drain, async {
        let _ = watcher_task.await;
        let _ = follower.await;
    })
    .await;
    Ok(())
}
