//! Building and running the proxy: the state watcher, the table compiler, the admin listener
//! and the accept loop that hands client connections to pingora's HTTP proxy.
//!
//! Listeners are bound here (so port 0 works and the real address is announced) and each
//! accepted connection is given to pingora's `HttpProxy` as a pingora stream.
//!
//! Client connections are served by `threads` workers, each an OS thread with a
//! single-threaded tokio runtime that accepts from its own duplicate of every listener.
//! Each connection is assigned to a worker when it is accepted (the accepting one, unless
//! another serves clearly fewer; see [`Spread`]) and stays there for its whole life. Nothing
//! moves a request between cores: a work-stealing runtime did, and on a machine whose cores
//! the load generator and the upstreams also use, the moves cost more CPU per request than
//! they saved. The watcher, the table compiler, health checks, TCP routes and the admin listener
//! run on a separate single-threaded control runtime on the calling thread.

use std::collections::HashSet;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use arc_swap::ArcSwap;
use lain_common::admin::Admin;
use lain_common::{RunError, Shutdown, announce_listener};
use lain_state::{EtcdConfig, Snapshot, Source, StateHandle, StateMetrics, Watcher};
use pingora_core::apps::{HttpServerOptions, ServerApp};
use pingora_core::listeners::tls::Acceptor;
use pingora_core::protocols::Stream;
use pingora_core::protocols::l4::stream::Stream as L4Stream;
use pingora_core::protocols::{ALPN, GetSocketDigest, SocketDigest, Ssl};
use pingora_core::server::configuration::ServerConf;
use pingora_rustls::ServerConfig;
use prometheus::{IntGauge, Registry};
use std::net::SocketAddr;

use crate::access_log::AccessLog;
use crate::config::{Cidr, Config};
use crate::h1::{H1, Served};
use crate::header_guard::{GuardedStream, HeaderLimits, Transport};
use crate::health;
use crate::metrics::ProxyMetrics;
use crate::service::LainProxy;
use crate::stream::{StreamMetrics, StreamSettings};
use crate::table::RouteTable;
use crate::tls::{CertStore, FileCert};
use crate::upgrade::{Handover, Listeners, Sockets};

/// How long start-up waits for the first snapshot before serving with an empty table.
const FIRST_SNAPSHOT_WAIT: Duration = Duration::from_secs(5);

/// Runs the proxy until SIGTERM/SIGINT (or until a successor serves), then drains.
/// With `upgrade`, it first takes over the listeners of the proxy running at
/// `listen.upgrade_socket_path`. `files` are the certificates of `config.tls.certs`,
/// already loaded by [`crate::tls::load_files`].
pub fn run(config: Config, files: Vec<FileCert>, upgrade: bool) -> Result<(), RunError> {
    let handover = match (&config.listen.upgrade_socket_path, upgrade) {
        (Some(path), true) => {
            Some(crate::upgrade::receive(path).map_err(|e| RunError::Failed(e.to_string()))?)
        }
        _ => None,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| RunError::Failed(format!("cannot start the runtime: {e}")))?;
    let result = rt.block_on(serve(config, files, handover));
    // Tasks still parked on sockets (the watcher, health checks) must not hold up the exit
    // once draining is over.
    rt.shutdown_timeout(Duration::from_millis(500));
    result
}

/// One listener as every worker accepts from it.
struct Accept {
    listener: std::net::TcpListener,
    tls: Option<Arc<TlsAcceptor>>,
}

/// The worker threads that serve client connections.
struct Workers {
    threads: Vec<std::thread::JoinHandle<()>>,
    stop: Shutdown,
}

impl Workers {
    /// Starts one worker per entry of `conns` (each with its own proxy), each accepting
    /// from a duplicate of every listener in `accepts` until the shutdown, and serving what
    /// it accepted until [`Workers::stop`].
    fn start(
        conns: Vec<Conns>,
        inboxes: Vec<tokio::sync::mpsc::UnboundedReceiver<Handoff>>,
        accepts: &[Accept],
        event_interval: u32,
    ) -> Result<Workers, RunError> {
        let stop = Shutdown::new();
        let mut threads = Vec::with_capacity(conns.len());
        for (i, (conns, inbox)) in conns.into_iter().zip(inboxes).enumerate() {
            let mut mine = Vec::with_capacity(accepts.len());
            for a in accepts {
                let listener = a.listener.try_clone().map_err(|e| {
                    RunError::Failed(format!("duplicating a listener for worker {i}: {e}"))
                })?;
                mine.push((listener, a.tls.clone()));
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .event_interval(event_interval)
                .enable_all()
                .build()
                .map_err(|e| RunError::Failed(format!("cannot start worker {i}: {e}")))?;
            let stop = stop.clone();
            let thread = std::thread::Builder::new()
                .name(format!("lain-proxy-{i}"))
                .spawn(move || {
                    rt.block_on(async move {
                        tokio::spawn(conns.clone().take_handoffs(inbox));
                        for (listener, tls) in mine {
                            match tokio::net::TcpListener::from_std(listener) {
                                Ok(l) => {
                                    tokio::spawn(conns.clone().accept_loop(l, tls));
                                }
                                Err(e) => {
                                    tracing::error!(worker = i, error = %e, "cannot register a listener; this worker does not accept from it");
                                }
                            }
                        }
                        // Idle upstream connections of lain's HTTP/1.1 path are closed when
                        // they expire or their upstream closes them.
                        if let Some(idle) = conns.h1.as_ref().map(|h| h.proxy.keepalive_idle) {
                            tokio::spawn(async move {
                                loop {
                                    tokio::time::sleep(Duration::from_secs(1)).await;
                                    crate::h1::sweep_pool(idle);
                                }
                            });
                        }
                        drop(conns);
                        stop.wait().await;
                        crate::h1::clear_pool();
                    });
                    // Connections still open after the drain period are closed here.
                    rt.shutdown_timeout(Duration::from_millis(500));
                })
                .map_err(|e| RunError::Failed(format!("cannot start worker {i}: {e}")))?;
            threads.push(thread);
        }
        Ok(Workers { threads, stop })
    }

    /// Stops every worker, closing what it still serves, and waits for the threads.
    fn stop(self) {
        self.stop.trigger();
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Keeps the published route table in step with the published snapshot.
pub struct TableCompiler {
    cell: Arc<ArcSwap<RouteTable>>,
    metrics: ProxyMetrics,
    last: Option<Arc<Snapshot>>,
    rejected: HashSet<String>,
}

impl TableCompiler {
    /// A compiler publishing into `cell`.
    pub fn new(cell: Arc<ArcSwap<RouteTable>>, metrics: ProxyMetrics) -> TableCompiler {
        TableCompiler {
            cell,
            metrics,
            last: None,
            rejected: HashSet::new(),
        }
    }

    /// Compiles and publishes a table for `snap`, unless its routes and endpoints are the
    /// very tables the last compile used.
    pub fn update(&mut self, snap: Arc<Snapshot>) {
        if let Some(last) = &self.last
            && Arc::ptr_eq(&last.routes, &snap.routes)
            && Arc::ptr_eq(&last.endpoints, &snap.endpoints)
        {
            return;
        }
        let previous = self.cell.load();
        let table = RouteTable::compile(&snap, &previous, previous.version + 1);
        // Resolve the labelled counters here, off the request path.
        for g in table.groups() {
            g.bind_counters(&self.metrics);
        }
        let mut now = HashSet::new();
        for r in table.rejected() {
            if !self.rejected.contains(&r.key) {
                tracing::warn!(key = %r.key, route = %r.route, kept = %r.kept,
                    "route claim rejected: an older claim holds this host and path");
            }
            now.insert(r.key.clone());
        }
        self.rejected = now;
        self.metrics.table_version.set(table.version as i64);
        self.metrics.table_routes.set(table.len() as i64);
        self.metrics
            .rejected_claims
            .set(table.rejected().len() as i64);
        self.metrics.table_swaps.inc();
        tracing::debug!(
            version = table.version,
            routes = table.len(),
            revision = table.revision,
            "route table published"
        );
        self.cell.store(Arc::new(table));
        self.last = Some(snap);
    }

    /// Follows `handle` until shutdown; compiles off the request path.
    pub async fn follow(mut self, handle: StateHandle, shutdown: Shutdown) {
        let mut rx = handle.subscribe();
        loop {
            if *rx.borrow_and_update() > 0 {
                self.update(handle.load());
            }
            tokio::select! {
                _ = shutdown.wait() => return,
                r = rx.changed() => if r.is_err() { return },
            }
        }
    }
}

async fn serve(
    config: Config,
    files: Vec<FileCert>,
    handover: Option<Handover>,
) -> Result<(), RunError> {
    let shutdown = Shutdown::on_signals();
    let sockets = Sockets {
        listeners: Listeners::default(),
        inherited: handover.as_ref().map(|h| h.inherited.clone()),
    };
    let registry = Registry::new();
    let fail = |what: &str, e: &dyn std::fmt::Display| RunError::Failed(format!("{what}: {e}"));
    let state_metrics =
        StateMetrics::register(&registry).map_err(|e| fail("registering metrics", &e))?;
    let metrics = ProxyMetrics::register(&registry).map_err(|e| fail("registering metrics", &e))?;

    let source = match &config.state.routes_file {
        Some(path) => Source::File(path.clone()),
        None => Source::Etcd(EtcdConfig::new(
            config.state.etcd_endpoints.clone(),
            &config.state.prefix,
        )),
    };
    let watcher = Watcher::new(source, state_metrics);
    let handle = watcher.handle();
    tokio::spawn(watcher.run(shutdown.wait_owned()));

    let cell: Arc<ArcSwap<RouteTable>> = Arc::new(ArcSwap::from_pointee(RouteTable::default()));
    tokio::spawn(
        TableCompiler::new(cell.clone(), metrics.clone()).follow(handle.clone(), shutdown.clone()),
    );
    tokio::spawn(health::run(cell.clone(), metrics.clone(), shutdown.clone()));
    let stream_metrics =
        StreamMetrics::register(&registry).map_err(|e| fail("registering metrics", &e))?;
    tokio::spawn(crate::stream::run(
        handle.clone(),
        StreamSettings {
            listen_ip: config.stream.listen_ip,
            port_min: config.stream.port_min,
            port_max: config.stream.port_max,
            connect_timeout: Duration::from_secs(config.stream.connect_timeout_secs),
            idle_timeout: Duration::from_secs(config.stream.idle_timeout_secs),
        },
        stream_metrics,
        sockets.clone(),
        shutdown.clone(),
    ));

    let access_log = AccessLog::open(
        &config.access_log.path,
        config.access_log.buffer_lines,
        metrics.access_log_dropped.clone(),
    )
    .map_err(|e| {
        fail(
            &format!("opening access log {}", config.access_log.path),
            &e,
        )
    })?;

    let trusted = config
        .trusted_proxies
        .iter()
        .filter_map(|c| Cidr::parse(c).ok())
        .collect();
    let conf = ServerConf {
        upstream_keepalive_pool_size: config.upstream.keepalive_pool_size,
        max_retries: config.upstream.max_retries + 1,
        ..ServerConf::default()
    };
    let conf = Arc::new(conf);
    let service = LainProxy {
        table: cell.clone(),
        metrics: metrics.clone(),
        access_log,
        trusted,
        max_retries: config.upstream.max_retries,
        keepalive_idle: Duration::from_secs(config.upstream.keepalive_idle_secs),
        eject_after_failures: config.upstream.eject_after_failures,
        eject_ms: config.upstream.eject_ms,
        max_header_bytes: config.max_header_bytes,
    };
    let threads = match config.threads {
        0 => std::thread::available_parallelism().map_or(1, usize::from),
        n => n,
    };
    // One pingora proxy per worker, so each worker keeps its own pool of upstream
    // connections, as each nginx worker does: a pooled connection is watched by a task of
    // the worker that returned it, and a worker taking it from another one races that task
    // (pingora then logs "failed to acquire reusable stream" and connects afresh).
    let proxies: Vec<_> = (0..threads)
        .map(|_| {
            let mut proxy = pingora_proxy::http_proxy(&conf, service.clone());
            if config.listen.h2c {
                // HTTP/2 with prior knowledge on the plain listener; pingora tells it from
                // HTTP/1 by the connection preface and never applies it to TLS connections.
                let mut options = HttpServerOptions::default();
                options.h2c = true;
                proxy.server_options = Some(options);
            }
            Arc::new(proxy)
        })
        .collect();

    if !handle.wait_ready(FIRST_SNAPSHOT_WAIT).await {
        tracing::warn!("no cluster state yet; serving with an empty route table until it arrives");
    }
    // Give the compiler a moment to publish the first table before traffic arrives.
    for _ in 0..50 {
        if handle.generation() == 0 || cell.load().version > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let admin_listener = sockets
        .bind("admin", config.listen.admin)
        .await
        .map_err(|e| {
            fail(
                &format!("binding admin listener {}", config.listen.admin),
                &e,
            )
        })?;
    let admin_table = cell.clone();
    let ready = handle.clone();
    let admin_addr = Admin::new(registry)
        .page(
            "/routes",
            Arc::new(move || {
                (
                    http::StatusCode::OK,
                    "application/json",
                    admin_table.load().to_json().to_string(),
                )
            }),
        )
        .health(Arc::new(move || {
            if ready.generation() > 0 {
                Ok(())
            } else {
                Err("no cluster state received yet".into())
            }
        }))
        .serve_on(admin_listener, shutdown.clone())
        .map_err(|e| fail("serving the admin listener", &e))?;
    announce_listener("admin", admin_addr);

    let (pingora_tx, pingora_rx) = tokio::sync::watch::channel(false);
    let tracker = Arc::new(());
    let header_limits = HeaderLimits {
        timeout: Duration::from_secs(config.header_timeout_secs),
        max_bytes: config.max_header_bytes,
    };
    let (spread, inboxes) = Spread::new(proxies.len(), &metrics);
    let conns: Vec<Conns> = proxies
        .iter()
        .enumerate()
        .map(|(me, proxy)| Conns {
            proxy: proxy.clone(),
            shutdown_rx: pingora_rx.clone(),
            metrics: metrics.clone(),
            tracker: tracker.clone(),
            shutdown: shutdown.clone(),
            header_limits,
            h1: config.h1_fast_path.then(|| H1 {
                proxy: service.clone(),
                pool_size: config.upstream.keepalive_pool_size,
            }),
            me,
            spread: spread.clone(),
        })
        .collect();
    let mut accepts = Vec::new();
    let tcp = bind(&sockets, config.listen.http, "http").await?;
    accepts.push(Accept {
        listener: into_std(tcp, "http")?,
        tls: None,
    });
    if let Some(addr) = config.listen.https {
        let store = Arc::new(CertStore::new(
            files,
            Duration::from_secs(config.tls.files_check_secs),
            metrics.clone(),
        ));
        store.update(&handle.load());
        tokio::spawn(store.clone().follow(handle.clone(), shutdown.clone()));
        pingora_rustls::install_default_crypto_provider();
        let mut tls = ServerConfig::builder_with_protocol_versions(&[
            &pingora_rustls::version::TLS12,
            &pingora_rustls::version::TLS13,
        ])
        .with_no_client_auth()
        .with_cert_resolver(store);
        // Stateless session tickets, which nginx also issues by default: a returning client
        // resumes its session, skipping the certificate signature that is the costliest part
        // of a handshake, however many other clients came in between. Without a ticketer,
        // resumption rests on a cache of 256 sessions, which a busy edge overwrites in
        // moments. rustls makes a new ticket key every six hours.
        tls.ticketer = rustls::crypto::ring::Ticketer::new()
            .map_err(|e| fail("creating the session ticket key", &e))?;
        tls.alpn_protocols = if config.tls.h2 {
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        } else {
            vec![b"http/1.1".to_vec()]
        };
        let acceptor = Arc::new(TlsAcceptor {
            acceptor: Acceptor::from_server_config(Arc::new(tls)),
            timeout: Duration::from_secs(config.tls.handshake_timeout_secs),
        });
        let tcp = bind(&sockets, addr, "https").await?;
        accepts.push(Accept {
            listener: into_std(tcp, "https")?,
            tls: Some(acceptor),
        });
    }
    if let Some(path) = &config.listen.upgrade_socket_path {
        let listener = crate::upgrade::bind(path)
            .map_err(|e| fail(&format!("binding upgrade socket {}", path.display()), &e))?;
        tokio::spawn(crate::upgrade::serve(
            listener,
            sockets.listeners.clone(),
            shutdown.clone(),
        ));
    }
    let workers = Workers::start(conns, inboxes, &accepts, config.event_interval)?;
    drop(accepts);
    tracing::info!(admin = %admin_addr, threads = proxies.len(), "lain proxy serving");
    if let Some(handover) = handover {
        // Inherited listeners this configuration has no use for are closed; stream ports
        // are the stream task's to take or close.
        handover
            .inherited
            .close_where(|name| !name.starts_with("stream:"));
        if let Err(e) = handover.ready() {
            tracing::warn!(error = %e, "could not tell the previous proxy to drain; both serve");
        }
    }
    // The workers' accept loops end with the shutdown.
    shutdown.wait().await;

    // Drain: stop taking connections, tell keep-alive connections to close after their
    // current request, and wait for requests in flight up to the grace period.
    tracing::info!("draining connections");
    let _ = pingora_tx.send(true);
    for proxy in &proxies {
        proxy.cleanup().await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(config.drain_secs);
    while Arc::strong_count(&tracker) > 1 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let remaining = Arc::strong_count(&tracker) - 1;
    workers.stop();
    tracing::info!(remaining, "lain proxy stopped");
    Ok(())
}

/// The listener as a plain socket, for the workers to duplicate and register with their
/// own runtimes.
fn into_std(tcp: tokio::net::TcpListener, name: &str) -> Result<std::net::TcpListener, RunError> {
    tcp.into_std().map_err(|e| {
        RunError::Failed(format!(
            "preparing the {name} listener for the workers: {e}"
        ))
    })
}

async fn bind(
    sockets: &Sockets,
    addr: SocketAddr,
    name: &str,
) -> Result<tokio::net::TcpListener, RunError> {
    let tcp = sockets
        .bind(name, addr)
        .await
        .map_err(|e| RunError::Failed(format!("binding {name} listener {addr}: {e}")))?;
    let local = tcp
        .local_addr()
        .map_err(|e| RunError::Failed(format!("reading the {name} listener address: {e}")))?;
    announce_listener(name, local);
    Ok(tcp)
}

struct TlsAcceptor {
    acceptor: Acceptor,
    timeout: Duration,
}

/// What every client connection needs, shared by the accept loops.
#[derive(Clone)]
struct Conns {
    proxy: Arc<pingora_proxy::HttpProxy<LainProxy>>,
    shutdown_rx: tokio::sync::watch::Receiver<bool>,
    metrics: ProxyMetrics,
    /// Each connection task holds a clone, so the strong count tells how many are open.
    tracker: Arc<()>,
    shutdown: Shutdown,
    header_limits: HeaderLimits,
    /// lain's HTTP/1.1 path, unless it is turned off.
    h1: Option<H1>,
    /// This worker's index in `spread`.
    me: usize,
    /// How many connections each worker serves, and how to hand one to it.
    spread: Arc<Spread>,
}

/// Keeps the workers' shares of client connections even. All workers accept from the same
/// listening socket, and the kernel wakes whichever is idle first: a burst of new
/// connections can land mostly on one worker, which then queues requests while the other
/// waits (at 64 connections and two workers, splits of 3:1 were seen, with p99 latency half
/// as high again as with an even split). A worker that accepts a connection while another
/// serves fewer hands it over, once, at accept time; requests never move.
struct Spread {
    /// Open client connections per worker, counted from the moment one is assigned: each
    /// worker's series of `lain_proxy_worker_connections`.
    open: Vec<IntGauge>,
    /// Each worker's inbox of connections other workers accepted for it.
    inbox: Vec<tokio::sync::mpsc::UnboundedSender<Handoff>>,
}

/// A connection accepted by one worker for another.
struct Handoff {
    tcp: std::net::TcpStream,
    peer: SocketAddr,
    tls: Option<Arc<TlsAcceptor>>,
}

impl Spread {
    /// A spread over `n` workers, with the receiving end of each worker's inbox.
    fn new(
        n: usize,
        metrics: &ProxyMetrics,
    ) -> (
        Arc<Spread>,
        Vec<tokio::sync::mpsc::UnboundedReceiver<Handoff>>,
    ) {
        let (inbox, rx) = (0..n)
            .map(|_| tokio::sync::mpsc::unbounded_channel())
            .unzip();
        let open = (0..n)
            .map(|i| {
                metrics
                    .worker_connections
                    .with_label_values(&[i.to_string()])
            })
            .collect();
        (Arc::new(Spread { open, inbox }), rx)
    }

    /// The worker a connection accepted by `me` should go to, counted as assigned to it:
    /// `me` unless another worker serves at least two fewer.
    fn assign(&self, me: usize) -> usize {
        let load = |i: usize| self.open[i].get();
        let least = (0..self.open.len()).min_by_key(|&i| load(i)).unwrap_or(me);
        let to = if load(least) + 1 < load(me) {
            least
        } else {
            me
        };
        self.open[to].inc();
        to
    }
}

impl Conns {
    async fn accept_loop(self, tcp: tokio::net::TcpListener, tls: Option<Arc<TlsAcceptor>>) {
        loop {
            let accepted = tokio::select! {
                _ = self.shutdown.wait() => return,
                a = tcp.accept() => a,
            };
            let (sock, peer) = match accepted {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    if e.raw_os_error() == Some(24) {
                        // Out of file descriptors: accept would fail again at once.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    continue;
                }
            };
            let _ = sock.set_nodelay(true);
            let to = self.spread.assign(self.me);
            if to == self.me {
                self.clone().serve(sock, peer, tls.clone());
                continue;
            }
            // Leaving this worker's reactor keeps the socket as it is (non-blocking, open).
            let tcp = match sock.into_std() {
                Ok(t) => t,
                Err(e) => {
                    self.spread.open[to].dec();
                    tracing::warn!(error = %e, "cannot hand a connection to another worker");
                    continue;
                }
            };
            let handoff = Handoff {
                tcp,
                peer,
                tls: tls.clone(),
            };
            if let Err(back) = self.spread.inbox[to].send(handoff) {
                // That worker has stopped: this one serves the connection after all.
                self.spread.open[to].dec();
                self.spread.open[self.me].inc();
                self.take(back.0);
            }
        }
    }

    /// Serves the connections other workers hand to this one, until the shutdown; those
    /// already handed over by then are served too.
    async fn take_handoffs(self, mut inbox: tokio::sync::mpsc::UnboundedReceiver<Handoff>) {
        loop {
            tokio::select! {
                _ = self.shutdown.wait() => break,
                h = inbox.recv() => match h {
                    Some(h) => self.take(h),
                    None => return,
                },
            }
        }
        while let Ok(h) = inbox.try_recv() {
            self.take(h);
        }
    }

    /// Serves a connection handed over by another worker.
    fn take(&self, h: Handoff) {
        match tokio::net::TcpStream::from_std(h.tcp) {
            Ok(sock) => self.clone().serve(sock, h.peer, h.tls),
            Err(e) => {
                self.spread.open[self.me].dec();
                tracing::warn!(error = %e, "cannot take a connection from another worker");
            }
        }
    }

    /// Serves a connection on lain's HTTP/1.1 path until it closes or a request for pingora
    /// arrives; then the guarded stream for pingora (the transport made pingora's stream by
    /// `into_stream`) and the guard's next-request flag.
    async fn on_h1<S: Transport>(
        &self,
        h1: &H1,
        transport: S,
        peer: SocketAddr,
        tls: bool,
        into_stream: impl FnOnce(S) -> Stream,
    ) -> Option<(GuardedStream<Stream>, Arc<AtomicBool>)> {
        let (guarded, next_request) = GuardedStream::new(transport, self.header_limits);
        match h1
            .serve(guarded, peer, tls, &next_request, &self.shutdown_rx)
            .await
        {
            Served::Closed => None,
            Served::Pingora(g) => Some((g.map_inner(into_stream), next_request)),
        }
    }

    /// Serves one client connection on this worker, for its whole life.
    fn serve(self, sock: tokio::net::TcpStream, peer: SocketAddr, tls: Option<Arc<TlsAcceptor>>) {
        let conns = self;
        tokio::spawn(async move {
            let _guard = conns.tracker.clone();
            conns.metrics.active_connections.inc();
            // Every request's header arrives through the guard; pingora hands the stream
            // back after each HTTP/1 request it can reuse.
            let first = match (tls, &conns.h1) {
                // Plain connections start on lain's HTTP/1.1 path, on the bare socket, and
                // go to pingora at the first request that path does not serve.
                (None, Some(h1)) => {
                    let wrap = |sock| Box::new(pingora_stream(sock, peer)) as Stream;
                    conns.on_h1(h1, sock, peer, false, wrap).await
                }
                (None, None) => Some(GuardedStream::new(
                    Box::new(pingora_stream(sock, peer)) as Stream,
                    conns.header_limits,
                )),
                (Some(tls), _) => {
                    let stream = pingora_stream(sock, peer);
                    match tokio::time::timeout(tls.timeout, tls.acceptor.tls_handshake(stream))
                        .await
                    {
                        Ok(Ok(s)) => {
                            // HTTP/1.1 over TLS is served by lain's path as a plain
                            // connection is; HTTP/2, chosen by ALPN, goes to pingora.
                            let h2 = matches!(s.selected_alpn_proto(), Some(ALPN::H2));
                            let stream = Box::new(s) as Stream;
                            match &conns.h1 {
                                Some(h1) if !h2 => conns.on_h1(h1, stream, peer, true, |s| s).await,
                                _ => Some(GuardedStream::new(stream, conns.header_limits)),
                            }
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, "TLS handshake failed");
                            None
                        }
                        Err(_) => {
                            tracing::debug!("TLS handshake timed out");
                            None
                        }
                    }
                }
            };
            if let Some((guarded, next_request)) = first {
                let mut next: Option<Stream> = Some(Box::new(guarded));
                while let Some(s) = next {
                    next = conns.proxy.process_new(s, &conns.shutdown_rx).await;
                    next_request.store(true, std::sync::atomic::Ordering::Relaxed);
                }
            }
            conns.metrics.active_connections.dec();
            conns.spread.open[conns.me].dec();
        });
    }
}

/// The stream pingora's own listener would make of an accepted socket, with the client's
/// address.
fn pingora_stream(sock: tokio::net::TcpStream, peer: SocketAddr) -> L4Stream {
    let mut stream = L4Stream::from(sock);
    let digest = SocketDigest::from_raw_fd(stream.as_raw_fd());
    let _ = digest.peer_addr.set(Some(peer.into()));
    stream.set_socket_digest(digest);
    stream
}
