//! lain's own HTTP/1.1 path: kept-alive requests, plain or over TLS, proxied without
//! pingora's pipeline.
//!
//! pingora's HTTP/1 proxy path costs about twice nginx's CPU per request on the benchmark
//! machine (a future per request phase, a channel between the two halves of a request,
//! header maps, an idle-watcher task for every pooled upstream connection). Most of an edge
//! proxy's traffic is the simplest kind of request: HTTP/1.1 on a kept-alive connection, a
//! route match, no body or a `Content-Length` body, and a response framed by a length or by
//! chunks. This module serves exactly those itself. It parses the header in place
//! (httparse), loads the route table once, picks an endpoint with the route's balancer,
//! writes the rewritten header and the body to an upstream connection from the worker's
//! pool, relays the response as it arrives, and counts and logs the request as pingora's
//! path does, with the same forwarding headers, request ids, retries and ejections. A body
//! still arriving from the client is sent upstream while the response is relayed, so an app
//! that answers an upload as it reads it never waits on the proxy.
//!
//! It serves plain connections on the bare socket, and TLS connections whose handshake chose
//! HTTP/1.1 on pingora's TLS stream; HTTP/2 over TLS goes to pingora from the handshake.
//! Anything else is handed to pingora, with the bytes already read handed back to the
//! stream, and pingora then serves the connection to its end: HTTP/2 (h2c), upgrades,
//! `Expect`, chunked request bodies, HTTP/1.0, absolute-form targets, `Connection` options
//! other than `close` and `keep-alive`, and every request lain answers itself (no route,
//! the redirect to HTTPS, 413, no healthy endpoint), so that those answers have one
//! implementation.
//!
//! The upstream pool belongs to the worker thread (a thread-local; each worker runs a
//! single-threaded runtime), so taking and returning a connection takes no lock and never
//! crosses threads. Before a pooled connection is reused, the readiness the runtime already
//! tracks for it tells, without a system call, whether the upstream closed it meanwhile; an
//! idempotent request whose reused connection still breaks before any byte of the response
//! arrives goes to a new connection, as nginx does.

use std::cell::RefCell;
use std::mem::MaybeUninit;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::header_guard::{CLOSE_FLUSH, GuardedStream, LINGER, LINGER_BYTES, Transport};
use crate::service::{Finished, LainProxy, forwarded, hash_key_in, request_id};
use crate::table::Route;
use crate::upstream::EndpointStats;

/// A client connection on this path: the guarded bare socket, or the guarded TLS stream.
type ClientConn<S> = GuardedStream<S>;

/// The most request or response headers parsed at first; a request with more goes to
/// pingora, a response with more is parsed again (see [`MAX_RESPONSE_HEADERS`]). The
/// header arrays are left uninitialised: httparse fills what it parses, and clearing 2 KiB
/// twice per request is measurable.
const MAX_HEADERS: usize = 64;
/// How long a kept-alive client connection may stay idle between requests (pingora's).
const KEEPALIVE: Duration = Duration::from_secs(60);
/// The largest upstream response header accepted.
pub(crate) const MAX_RESPONSE_HEAD: usize = 64 << 10;
/// The most headers an upstream response may have, as on pingora's path. A response with
/// more than [`MAX_HEADERS`] (an app setting many cookies) is parsed again with room for
/// this many, so that only the rare response pays for the larger array.
const MAX_RESPONSE_HEADERS: usize = 256;
/// The most interim (1xx) responses relayed before a final one. A few 103 Early Hints are
/// normal; an app that keeps sending them would hold the client without ever answering,
/// each one arriving well within the read timeout, so past this many the request fails.
pub(crate) const MAX_INTERIM_RESPONSES: u32 = 16;
/// The most bytes moved by one read of a body.
const CHUNK: usize = 16 << 10;

/// How a connection left this path.
pub enum Served<S> {
    /// The connection is finished: closed by either side, or failed.
    Closed,
    /// A request this path does not serve arrived. Its bytes were handed back to the
    /// stream, which goes to pingora.
    Pingora(ClientConn<S>),
}

/// The lain HTTP/1.1 path of one worker.
#[derive(Clone)]
pub struct H1 {
    /// The proxy whose routes, metrics and access log requests use.
    pub proxy: LainProxy,
    /// The most idle upstream connections the worker keeps.
    pub pool_size: usize,
}

/// What this path needs from a request's header; everything borrows the read buffer.
struct Req<'a> {
    method: &'a str,
    target: &'a str,
    path: &'a str,
    query: Option<&'a str>,
    host: &'a str,
    length: u64,
    close: bool,
    idempotent: bool,
    request_id: Option<&'a str>,
    xff: Option<&'a str>,
    xfp: Option<&'a str>,
    xfh: Option<&'a str>,
    user_agent: &'a str,
}

/// A header value as `http` would give it (`HeaderValue::to_str`): visible ASCII and tabs.
fn text(v: &[u8]) -> Option<&str> {
    v.iter()
        .all(|b| *b == b'\t' || (0x20..0x7f).contains(b))
        .then(|| std::str::from_utf8(v).ok())
        .flatten()
}

/// Whether a request target is an origin-form path (and query) made only of characters a
/// URI allows unescaped; anything else goes to pingora, which validates it fully.
fn plain_target(t: &str) -> bool {
    t.starts_with('/')
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?%".contains(&b))
}

/// Request headers that are not forwarded: hop-by-hop headers, and those lain sets itself.
fn not_forwarded(name: &str) -> bool {
    [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-real-ip",
        "x-original-uri",
        "x-request-id",
    ]
    .iter()
    .any(|h| name.eq_ignore_ascii_case(h))
}

/// Reads what this path needs from a parsed request header; `None` when the request is
/// one for pingora.
fn facts<'a>(
    method: &'a str,
    target: &'a str,
    version: u8,
    headers: &[httparse::Header<'a>],
) -> Option<Req<'a>> {
    if version != 1 || method == "CONNECT" || !plain_target(target) {
        return None;
    }
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let mut req = Req {
        method,
        target,
        path,
        query,
        host: "",
        length: 0,
        close: false,
        idempotent: matches!(
            method,
            "GET" | "HEAD" | "PUT" | "DELETE" | "OPTIONS" | "TRACE"
        ),
        request_id: None,
        xff: None,
        xfp: None,
        xfh: None,
        user_agent: "",
    };
    let (mut host, mut length) = (None, None);
    for h in headers {
        let name = h.name;
        let is = |n: &str| name.eq_ignore_ascii_case(n);
        if is("host") {
            if host.is_some() {
                return None;
            }
            host = Some(text(h.value)?);
        } else if is("content-length") {
            let v = text(h.value)?;
            if length.is_some() || v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            length = Some(v.parse::<u64>().ok()?);
        } else if is("transfer-encoding") || is("upgrade") || is("expect") {
            return None;
        } else if is("connection") {
            for token in text(h.value)?.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    req.close = true;
                } else if !(token.is_empty() || token.eq_ignore_ascii_case("keep-alive")) {
                    return None;
                }
            }
        } else if is("x-request-id") {
            req.request_id = req.request_id.or(text(h.value));
        } else if is("x-forwarded-for") {
            // Several lines (a proxy that adds its own) are one list, read in order; pingora's
            // path joins them.
            if req.xff.is_some() {
                return None;
            }
            req.xff = text(h.value);
        } else if is("x-forwarded-proto") {
            req.xfp = req.xfp.or(text(h.value));
        } else if is("x-forwarded-host") {
            req.xfh = req.xfh.or(text(h.value));
        } else if is("user-agent") && req.user_agent.is_empty() {
            req.user_agent = text(h.value).unwrap_or("");
        }
    }
    req.host = host?;
    req.length = length.unwrap_or(0);
    Some(req)
}

/// How the body of an upstream response ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body.
    Empty,
    /// This many bytes.
    Length(u64),
    /// Chunked; the relay watches for the last chunk.
    Chunked,
    /// Whatever comes until the upstream closes.
    Close,
}

/// Where a chunked body passing through is, so that its end is found without changing a
/// byte of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum ChunkState {
    /// Reading a chunk-size line's hex digits (`digits` of them so far).
    #[default]
    Size,
    /// Skipping a chunk extension.
    Extension,
    /// After the size line's `\r`.
    SizeLf,
    /// Inside a chunk's data.
    Data,
    /// After a chunk's data, before `\r\n`.
    DataCr,
    /// After a chunk's data and `\r`.
    DataLf,
    /// At the start of a trailer line (or of the final empty line).
    TrailerStart,
    /// Inside a trailer line.
    Trailer,
    /// After the final empty line's `\r`.
    EndLf,
    /// The body is complete.
    Done,
}

/// Tracks a chunked body through any split into reads.
#[derive(Debug, Default)]
struct Chunks {
    state: ChunkState,
    size: u64,
    digits: u32,
}

impl Chunks {
    /// Follows `bytes`; returns how many of them belong to the body when it ends among them.
    fn feed(&mut self, bytes: &[u8]) -> Result<Option<usize>, &'static str> {
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            match self.state {
                ChunkState::Size => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        if self.digits >= 15 {
                            return Err("chunk size too large");
                        }
                        let d = (b as char).to_digit(16).unwrap_or(0);
                        self.size = self.size * 16 + u64::from(d);
                        self.digits += 1;
                    }
                    _ if self.digits == 0 => return Err("chunk size missing"),
                    b';' | b' ' | b'\t' => self.state = ChunkState::Extension,
                    b'\r' => self.state = ChunkState::SizeLf,
                    b'\n' => self.end_of_size(),
                    _ => return Err("bad chunk size"),
                },
                ChunkState::Extension => match b {
                    b'\r' => self.state = ChunkState::SizeLf,
                    b'\n' => self.end_of_size(),
                    _ => {}
                },
                ChunkState::SizeLf => {
                    if b != b'\n' {
                        return Err("bad chunk size line");
                    }
                    self.end_of_size();
                }
                ChunkState::Data => {
                    let n = (bytes.len() - i).min(usize::try_from(self.size).unwrap_or(usize::MAX));
                    self.size -= n as u64;
                    i += n;
                    if self.size == 0 {
                        self.state = ChunkState::DataCr;
                    }
                    continue;
                }
                ChunkState::DataCr => match b {
                    b'\r' => self.state = ChunkState::DataLf,
                    b'\n' => self.state = ChunkState::Size,
                    _ => return Err("chunk data longer than its size"),
                },
                ChunkState::DataLf => {
                    if b != b'\n' {
                        return Err("chunk data longer than its size");
                    }
                    self.state = ChunkState::Size;
                }
                ChunkState::TrailerStart => match b {
                    b'\r' => self.state = ChunkState::EndLf,
                    b'\n' => self.state = ChunkState::Done,
                    _ => self.state = ChunkState::Trailer,
                },
                ChunkState::Trailer => {
                    if b == b'\n' {
                        self.state = ChunkState::TrailerStart;
                    }
                }
                ChunkState::EndLf => {
                    if b != b'\n' {
                        return Err("bad end of chunked body");
                    }
                    self.state = ChunkState::Done;
                }
                ChunkState::Done => return Ok(Some(i)),
            }
            i += 1;
            if self.state == ChunkState::Done {
                return Ok(Some(i));
            }
        }
        Ok((self.state == ChunkState::Done).then_some(i))
    }

    fn end_of_size(&mut self) {
        self.state = if self.size == 0 {
            ChunkState::TrailerStart
        } else {
            ChunkState::Data
        };
        self.digits = 0;
    }
}

/// An idle upstream connection.
struct Idle {
    conn: TcpStream,
    since: Instant,
}

/// The worker's idle upstream connections, by endpoint. Endpoint addresses come from the
/// cluster state, not from clients, so a fast hash without flooding resistance serves.
#[derive(Default)]
struct Pool {
    idle: foldhash::HashMap<SocketAddr, Vec<Idle>>,
    count: usize,
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool::default());
}

/// Whether an idle connection is still usable: the runtime has seen nothing arrive on it
/// (an upstream that closes or sends out of turn makes it readable).
fn quiet(conn: &TcpStream) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    conn.poll_read_ready(&mut cx).is_pending()
}

/// Takes the most recently used idle connection to `addr` that is still usable at `now`.
fn take(addr: SocketAddr, max_idle: Duration, now: Instant) -> Option<TcpStream> {
    POOL.with_borrow_mut(|Pool { idle, count }| {
        let list = idle.get_mut(&addr)?;
        while let Some(i) = list.pop() {
            *count -= 1;
            if now.saturating_duration_since(i.since) < max_idle && quiet(&i.conn) {
                return Some(i.conn);
            }
        }
        None
    })
}

/// Keeps a connection whose last exchange ended cleanly at `now`, if the pool has room.
fn put(addr: SocketAddr, conn: TcpStream, limit: usize, now: Instant) {
    POOL.with_borrow_mut(|Pool { idle, count }| {
        if *count < limit {
            *count += 1;
            idle.entry(addr)
                .or_default()
                .push(Idle { conn, since: now });
        }
    });
}

/// Closes the worker's idle connections that expired or that their upstream closed.
pub fn sweep_pool(max_idle: Duration) {
    POOL.with_borrow_mut(|Pool { idle, count }| {
        for list in idle.values_mut() {
            list.retain(|i| i.since.elapsed() < max_idle && quiet(&i.conn));
        }
        idle.retain(|_, l| !l.is_empty());
        *count = idle.values().map(Vec::len).sum();
    });
}

/// After the write side of a client connection was shut, reads and throws away what the
/// client still sends, for a bounded time and number of bytes, before the connection
/// closes (RFC 9112, section 9.6). Closing a socket with unread input makes the kernel
/// reset the connection, which can destroy the answer before the client has read it: a
/// 413 or 502 to an upload whose body is still arriving.
async fn linger<S: Transport>(stream: &mut ClientConn<S>) {
    let until = Instant::now() + LINGER;
    let mut scratch = [0u8; 8192];
    let mut discarded = 0;
    while discarded < LINGER_BYTES {
        let left = until.saturating_duration_since(Instant::now());
        match within(left, stream.read(&mut scratch)).await {
            Some(Ok(n)) if n > 0 => discarded += n,
            _ => break,
        }
    }
}

/// Closes every idle connection of the worker (at shutdown, while its runtime still runs).
pub fn clear_pool() {
    POOL.with_borrow_mut(|p| *p = Pool::default());
}

/// Runs `fut` for at most `limit`; `None` when the time ran out. The timer is armed only
/// when the first poll finds `fut` waiting: most writes, and reads of bytes that already
/// arrived, complete at once, and every timer costs a clock read and an insertion into and
/// a removal from the runtime's timer wheel.
async fn within<F: Future>(limit: Duration, fut: F) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    let mut timer = std::pin::pin!(None::<tokio::time::Sleep>);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(out) = fut.as_mut().poll(cx) {
            return Poll::Ready(Some(out));
        }
        if timer.is_none() {
            timer.set(Some(tokio::time::sleep(limit)));
        }
        match timer.as_mut().as_pin_mut() {
            Some(t) => t.poll(cx).map(|()| None),
            None => Poll::Pending,
        }
    })
    .await
}

/// [`within`] for I/O: running out of time is a `TimedOut` error.
async fn within_io<T>(
    limit: Duration,
    fut: impl Future<Output = std::io::Result<T>>,
) -> std::io::Result<T> {
    within(limit, fut)
        .await
        .unwrap_or_else(|| Err(std::io::ErrorKind::TimedOut.into()))
}

/// Writes all of `bytes`, failing after `limit`.
async fn send(
    w: &mut (impl AsyncWrite + Unpin),
    bytes: &[u8],
    limit: Duration,
) -> std::io::Result<()> {
    within_io(limit, async {
        w.write_all(bytes).await?;
        w.flush().await
    })
    .await
}

/// Reads into the spare room of `buf` (at most `max` bytes), failing after `limit`.
async fn receive(
    r: &mut (impl AsyncRead + Unpin),
    buf: &mut Vec<u8>,
    max: usize,
    limit: Duration,
) -> std::io::Result<usize> {
    within_io(limit, read_into(r, buf, max)).await
}

/// Reads into the spare room of `buf` (at most `max` bytes), with no time limit of its own.
async fn read_into(
    r: &mut (impl AsyncRead + Unpin),
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<usize> {
    buf.reserve(max);
    let room = max.min(buf.capacity() - buf.len());
    (&mut *r).take(room as u64).read_buf(buf).await
}

/// The failure of an exchange with an upstream that never answered: 504 when it timed out,
/// 502 otherwise.
fn upstream_failure(doing: &str, addr: SocketAddr, e: &std::io::Error) -> Failure {
    let status = if e.kind() == std::io::ErrorKind::TimedOut {
        504
    } else {
        502
    };
    Failure::Upstream(status, format!("{doing} {addr}: {e}"))
}

/// Why a request failed, for its status, its access-log line and what happens next.
#[derive(Debug)]
enum Failure {
    /// The client went away or broke off; nobody is left to answer.
    Client(String),
    /// Nothing usable came from upstream before the response started: answered with this
    /// status.
    Upstream(u16, String),
    /// The upstream failed after the response started: the client connection is cut.
    Midway(String),
}

/// What the end of one request leaves for the connection.
enum Outcome {
    /// The request is for pingora; nothing was read past its header or written.
    Pingora,
    /// The request is done: `consumed` bytes of the read buffer were its own.
    /// `unread_body` says part of its body may still be on its way from the client.
    Done {
        consumed: usize,
        keep_alive: bool,
        unread_body: bool,
    },
}

/// Reusable buffers of one client connection.
struct Buffers {
    /// What is written next, to the upstream or to the client.
    out: Vec<u8>,
    /// What was read from the upstream (or a piece of the request body).
    rbuf: Vec<u8>,
    /// What the client sent while its request waited for the upstream: the start of its
    /// next request.
    early: Vec<u8>,
    /// The endpoints a request was sent to, in order.
    tried: Vec<SocketAddr>,
}

/// The client side of a connection, fixed for its lifetime.
struct Client {
    peer: Option<IpAddr>,
    peer_text: String,
    trusted: bool,
    /// The connection came over TLS.
    tls: bool,
}

impl H1 {
    /// Serves requests on an HTTP/1 connection, plain or TLS (`tls`), until it closes or a
    /// request for pingora arrives. `peer` is the client's address as the listener accepted it;
    /// `next_request` is the guard's flag announcing each new request.
    pub async fn serve<S: Transport>(
        &self,
        mut stream: ClientConn<S>,
        peer: SocketAddr,
        tls: bool,
        next_request: &AtomicBool,
        shutdown: &watch::Receiver<bool>,
    ) -> Served<S> {
        let peer = Some(peer.ip());
        let client = Client {
            peer,
            peer_text: peer.map(|ip| ip.to_string()).unwrap_or_default(),
            trusted: peer.is_some_and(|ip| self.proxy.is_trusted(ip)),
            tls,
        };
        let mut buf: Vec<u8> = Vec::with_capacity(4096);
        let mut bufs = Buffers {
            out: Vec::with_capacity(4096),
            rbuf: Vec::with_capacity(CHUNK),
            early: Vec::new(),
            tried: Vec::with_capacity(4),
        };
        let mut first = true;
        // Idle kept-alive connections are closed as soon as shutdown begins, as pingora's
        // path does, so that draining waits only for requests in flight.
        let mut stop = shutdown.clone();
        loop {
            // Whether httparse saw the whole header; a parse error can come before its end.
            let mut complete = true;
            let outcome = if buf.is_empty() {
                None
            } else {
                let mut headers = [const { MaybeUninit::uninit() }; MAX_HEADERS];
                let mut req = httparse::Request::new(&mut []);
                match req.parse_with_uninit_headers(&buf, &mut headers) {
                    Ok(httparse::Status::Complete(head)) => {
                        let found = match (req.method, req.path, req.version) {
                            (Some(m), Some(t), Some(v)) => facts(m, t, v, req.headers),
                            _ => None,
                        };
                        let shutting_down = *shutdown.borrow();
                        Some(match found {
                            None => Outcome::Pingora,
                            Some(facts) => {
                                self.request(
                                    &mut stream,
                                    &client,
                                    &facts,
                                    req.headers,
                                    head,
                                    &buf[head..],
                                    &mut bufs,
                                    shutting_down,
                                )
                                .await
                            }
                        })
                    }
                    Ok(httparse::Status::Partial) => None,
                    Err(_) => {
                        complete = false;
                        Some(Outcome::Pingora)
                    }
                }
            };
            match outcome {
                Some(Outcome::Pingora) => {
                    stream.unread(&buf, complete);
                    return Served::Pingora(stream);
                }
                Some(Outcome::Done {
                    consumed,
                    keep_alive,
                    unread_body,
                }) => {
                    buf.drain(..consumed);
                    buf.append(&mut bufs.early);
                    if !keep_alive {
                        let _ = within(CLOSE_FLUSH, stream.shutdown()).await;
                        if unread_body || !buf.is_empty() {
                            linger(&mut stream).await;
                        }
                        return Served::Closed;
                    }
                    if buf.is_empty() {
                        next_request.store(true, Ordering::Relaxed);
                    } else if !stream.begin_header(&buf) {
                        // The client already sent part of its next request: its header
                        // clock starts now, as nothing more may ever come. A header
                        // already too large is answered 431 by the guard as it is read.
                        let mut scratch = [0u8; 1];
                        let _ = stream.read(&mut scratch).await;
                        return Served::Closed;
                    }
                    first = false;
                    if buf.capacity() > 64 << 10 && buf.is_empty() {
                        buf = Vec::with_capacity(4096);
                    }
                }
                None => {
                    // More of the header is needed. The guard bounds its size and the time
                    // it takes to arrive; an idle kept-alive connection has `KEEPALIVE`.
                    let read = if buf.is_empty() && !first {
                        tokio::select! {
                            biased;
                            r = within(KEEPALIVE, stream.read_buf(&mut buf)) => r,
                            _ = stop.wait_for(|down| *down) => return Served::Closed,
                        }
                    } else {
                        buf.reserve(4096);
                        Some(stream.read_buf(&mut buf).await)
                    };
                    match read {
                        Some(Ok(n)) if n > 0 => {}
                        _ => return Served::Closed,
                    }
                }
            }
        }
    }

    /// Proxies one request whose header ends at `head` in the read buffer, of which `after`
    /// is the rest.
    #[allow(clippy::too_many_arguments)]
    async fn request<S: Transport>(
        &self,
        stream: &mut ClientConn<S>,
        client: &Client,
        req: &Req<'_>,
        headers: &[httparse::Header<'_>],
        head: usize,
        after: &[u8],
        bufs: &mut Buffers,
        shutting_down: bool,
    ) -> Outcome {
        let start = Instant::now();
        let proxy = &self.proxy;
        let table = proxy.table.load();
        // A path that climbs above the root is pingora's path's to answer (400).
        let Ok(path) = crate::table::clean_request_path(req.path) else {
            return Outcome::Pingora;
        };
        let Some(m) = table.lookup(req.host, &path) else {
            return Outcome::Pingora;
        };
        let route = m.route.clone();
        if (route.https_only && !client.tls)
            || route.max_body_bytes.is_some_and(|max| req.length > max)
            || !route.upstream.any_admitted()
        {
            return Outcome::Pingora;
        }
        // The target is rewritten only when the route stripped a prefix or the path was
        // cleaned.
        let cleaned = matches!(path, std::borrow::Cow::Owned(_));
        let stripped = (cleaned || m.upstream_path.len() != path.len()).then_some(m.upstream_path);

        let id = request_id(req.request_id);
        let client_ip = proxy.real_client(client.peer, client.trusted, req.xff);
        let fwd = forwarded(
            client.trusted,
            client.tls,
            req.host,
            req.xff,
            req.xfp,
            req.xfh,
        );
        let out = &mut bufs.out;
        out.clear();
        out.extend_from_slice(req.method.as_bytes());
        out.push(b' ');
        match stripped {
            Some(p) => {
                out.extend_from_slice(p.as_bytes());
                if let Some(q) = req.query {
                    out.push(b'?');
                    out.extend_from_slice(q.as_bytes());
                }
            }
            None => out.extend_from_slice(req.target.as_bytes()),
        }
        drop(table);
        out.extend_from_slice(b" HTTP/1.1\r\n");
        for h in headers {
            if !not_forwarded(h.name) {
                put_header(out, h.name, h.value);
            }
        }
        out.extend_from_slice(b"x-forwarded-for: ");
        if let Some(prev) = fwd.xff_prev {
            out.extend_from_slice(prev.as_bytes());
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(client.peer_text.as_bytes());
        out.extend_from_slice(b"\r\n");
        put_header(out, "x-forwarded-proto", fwd.proto.as_bytes());
        put_header(out, "x-forwarded-host", fwd.host.as_bytes());
        match client_ip {
            Some(ip) if client_ip != client.peer => {
                put_header(out, "x-real-ip", ip.to_string().as_bytes())
            }
            _ => put_header(out, "x-real-ip", client.peer_text.as_bytes()),
        }
        put_header(out, "x-original-uri", req.target.as_bytes());
        put_header(out, "x-request-id", id.as_bytes());
        out.extend_from_slice(b"\r\n");
        let in_buf = after
            .len()
            .min(usize::try_from(req.length).unwrap_or(usize::MAX));
        let rest = req.length - in_buf as u64;
        out.extend_from_slice(&after[..in_buf]);

        let mut record = Record {
            status: 0,
            endpoint: None,
            upstream_start: None,
            end: None,
            upstream_elapsed: None,
            bytes_out: 0,
            error: None,
        };
        let result = self
            .exchange(
                stream,
                Exchange {
                    req,
                    headers,
                    route: &route,
                    id: &id,
                    rest,
                    ahead: after.len() - in_buf,
                    shutting_down,
                    start,
                },
                bufs,
                &mut record,
            )
            .await;
        let keep_alive = match &result {
            Ok(keep) => *keep,
            Err(Failure::Upstream(status, why)) => {
                record.status = *status;
                record.error = Some(why.clone());
                // The whole request was read, so the connection can carry the next one.
                let close = rest > 0 || req.close || shutting_down;
                error_response(&mut bufs.out, *status, &id, close);
                let sent = send(stream, &bufs.out, KEEPALIVE).await.is_ok();
                sent && !close
            }
            Err(Failure::Client(why) | Failure::Midway(why)) => {
                record.error = Some(why.clone());
                false
            }
        };
        proxy.metrics.served_by_h1.inc();
        proxy.finish(Finished {
            route: Some(&route),
            status: record.status,
            elapsed: record.end.unwrap_or_else(Instant::now) - start,
            upstream_elapsed: record
                .upstream_elapsed
                .or_else(|| record.upstream_start.map(|s| s.elapsed())),
            client_ip,
            method: req.method,
            host: req.host,
            path: req.target,
            bytes_in: usize::try_from(req.length).unwrap_or(usize::MAX),
            bytes_out: record.bytes_out,
            endpoint: record.endpoint,
            request_id: &id,
            user_agent: req.user_agent,
            error: record.error,
        });
        Outcome::Done {
            consumed: head + in_buf,
            keep_alive,
            unread_body: rest > 0 && !keep_alive,
        }
    }

    /// Sends the request (its header and the body in `bufs.out`, `rest` more body bytes to
    /// come from the client) to an endpoint and relays the response. Returns whether the
    /// client connection stays open.
    async fn exchange<S: Transport>(
        &self,
        stream: &mut ClientConn<S>,
        x: Exchange<'_>,
        bufs: &mut Buffers,
        record: &mut Record,
    ) -> Result<bool, Failure> {
        let Exchange {
            req,
            headers,
            route,
            id,
            rest,
            ahead,
            shutting_down,
            start,
        } = x;
        let proxy = &self.proxy;
        let t = route.timeouts;
        let (connect_t, read_t, write_t) = (
            Duration::from_millis(t.connect_ms),
            Duration::from_millis(t.read_ms),
            Duration::from_millis(t.write_ms),
        );
        let key = hash_key_in(headers.iter().map(|h| (h.name, h.value)), &route.balance);
        // A request is sent again only when nothing of it can have been acted on twice.
        let replayable = req.idempotent && rest == 0;
        let tried = &mut bufs.tried;
        tried.clear();
        // The request's own start stands for the first attempt's: one clock read fewer, and
        // nothing but building the upstream header happened in between.
        let mut first_attempt = Some(start);
        // Once a pooled connection turned out stale, the request goes only over new
        // connections: one replay that costs the endpoint nothing, not one per idle
        // connection, since an app that dies on a request would otherwise take it again
        // from every connection in the pool.
        let mut pooled = true;
        let (mut up, addr, stats) = loop {
            let Some(ep) = route.upstream.select(&route.balance, key, tried) else {
                return Err(Failure::Upstream(503, "no healthy endpoint".into()));
            };
            let (addr, stats) = (ep.addr, InFlight::new(ep.stats.clone()));
            tried.push(addr);
            record.endpoint = Some(addr);
            let now = first_attempt.take().unwrap_or_else(Instant::now);
            record.upstream_start = Some(now);
            let reuse = if pooled {
                take(addr, proxy.keepalive_idle, now)
            } else {
                None
            };
            let (mut up, reused) = match reuse {
                Some(c) => (c, true),
                None => match connect(addr, connect_t).await {
                    Ok(c) => (c, false),
                    Err(e) => {
                        proxy.metrics.connect_errors.inc();
                        self.blame(&stats, addr);
                        if tried.len() <= proxy.max_retries {
                            continue;
                        }
                        return Err(upstream_failure("connecting to", addr, &e));
                    }
                },
            };
            let sent = send(&mut up, &bufs.out, write_t).await;
            let stale = |e: &std::io::Error| {
                reused && replayable && e.kind() != std::io::ErrorKind::TimedOut
            };
            // An endpoint that dies after taking a request but before answering it (a
            // killed instance behind a port forwarder that still accepts) fails a request
            // this way. As the pingora path and nginx's `proxy_next_upstream error` do, a
            // replayable request then goes to another endpoint; a timeout is not retried,
            // since sending more work to a slow endpoint's peers only spreads the slowness.
            let elsewhere = |e: &std::io::Error, tried: &[SocketAddr]| {
                replayable
                    && e.kind() != std::io::ErrorKind::TimedOut
                    && tried.len() <= proxy.max_retries
            };
            if let Err(e) = sent {
                if stale(&e) {
                    // A pooled connection the upstream had closed: not the endpoint's fault.
                    tried.pop();
                    pooled = false;
                    continue;
                }
                self.blame(&stats, addr);
                if elsewhere(&e, tried) {
                    continue;
                }
                return Err(Failure::Upstream(502, format!("sending to {addr}: {e}")));
            }
            if rest > 0 {
                // The rest of the body and the response travel at the same time (below).
                break (up, addr, stats);
            }
            bufs.rbuf.clear();
            let waited = first_bytes(
                stream,
                &mut up,
                &mut bufs.rbuf,
                &mut bufs.early,
                ahead,
                read_t,
            );
            match waited.await {
                Ok(()) => break (up, addr, stats),
                Err(Waited::ClientGone) => {
                    return Err(Failure::Client(
                        "the client closed its connection before the response".into(),
                    ));
                }
                Err(Waited::Upstream(e)) if bufs.rbuf.is_empty() && stale(&e) => {
                    tried.pop();
                    pooled = false;
                    continue;
                }
                Err(Waited::Upstream(e)) => {
                    self.blame(&stats, addr);
                    if bufs.rbuf.is_empty() && elsewhere(&e, tried) {
                        continue;
                    }
                    return Err(upstream_failure("reading from", addr, &e));
                }
            }
        };

        let answer = Answer {
            req,
            id,
            addr,
            stats: &stats,
            close: req.close || shutting_down,
            read_t,
            write_t,
        };
        let end = if rest == 0 {
            self.relay(
                stream,
                &mut up,
                &answer,
                bufs,
                record,
                &AtomicBool::new(false),
            )
            .await?
        } else {
            self.duplex(stream, &mut up, rest, &answer, bufs, record)
                .await?
        };
        if end.reusable && quiet(&up) {
            put(addr, up, self.pool_size, end.at);
        }
        drop(stats);
        Ok(!end.close)
    }

    /// Relays the response whose first bytes are in `bufs.rbuf` from `up` to `client`.
    /// `body_pending` is true while the request's body is still being sent upstream.
    async fn relay(
        &self,
        client: &mut (impl AsyncWrite + Unpin),
        up: &mut (impl AsyncRead + Unpin),
        a: &Answer<'_>,
        bufs: &mut Buffers,
        record: &mut Record,
        body_pending: &AtomicBool,
    ) -> Result<RelayEnd, Failure> {
        let Answer {
            req,
            id,
            addr,
            stats,
            read_t,
            write_t,
            ..
        } = *a;
        // Interim responses (103 Early Hints and the like) go to the client as they are.
        let mut interim = 0u32;
        let (head, resp_status, framing, upstream_keep, close) = loop {
            let mut headers = [const { MaybeUninit::uninit() }; MAX_HEADERS];
            let mut more = Vec::new();
            let mut resp = httparse::Response::new(&mut []);
            let mut parsed = response_parser().parse_response_with_uninit_headers(
                &mut resp,
                &bufs.rbuf,
                &mut headers,
            );
            if parsed == Err(httparse::Error::TooManyHeaders) {
                more.resize_with(MAX_RESPONSE_HEADERS, MaybeUninit::uninit);
                resp = httparse::Response::new(&mut []);
                parsed = response_parser()
                    .parse_response_with_uninit_headers(&mut resp, &bufs.rbuf, &mut more);
            }
            let head = match parsed {
                Ok(httparse::Status::Complete(n)) => n,
                Ok(httparse::Status::Partial) => {
                    read_head(up, &mut bufs.rbuf, read_t).await.map_err(|e| {
                        self.blame(stats, addr);
                        Failure::Upstream(502, format!("reading from {addr}: {e}"))
                    })?;
                    continue;
                }
                Err(e) => {
                    self.blame(stats, addr);
                    return Err(Failure::Upstream(
                        502,
                        format!("bad response from {addr}: {e}"),
                    ));
                }
            };
            let code = resp.code.unwrap_or(0);
            if code == 101 {
                self.blame(stats, addr);
                return Err(Failure::Upstream(
                    502,
                    format!("{addr} switched protocols unasked"),
                ));
            }
            if (100..200).contains(&code) {
                interim += 1;
                if interim > MAX_INTERIM_RESPONSES {
                    self.blame(stats, addr);
                    return Err(Failure::Upstream(
                        502,
                        format!("{addr} sent more than {MAX_INTERIM_RESPONSES} interim responses"),
                    ));
                }
                // Without its hop-by-hop fields, as a final response; interim ones are
                // rare enough that every field is checked against their `Connection`.
                write_response_head(&mut bufs.out, &resp, false, false, true, None);
                send(client, &bufs.out, write_t)
                    .await
                    .map_err(|e| Failure::Client(format!("writing to the client: {e}")))?;
                bufs.rbuf.drain(..head);
                continue;
            }
            let shape = response_shape(req, &resp).map_err(|why| {
                self.blame(stats, addr);
                Failure::Upstream(502, format!("bad response from {addr}: {why}"))
            })?;
            // The response header is complete: from here on the client sees what happens. An
            // answer that begins before the request's body has all gone upstream (a 413 from
            // an app that checks the length, a refused login) ends the client's connection,
            // since the rest of that body is still on its way.
            let close =
                a.close || body_pending.load(Ordering::Relaxed) || shape.framing == Framing::Close;
            write_response_head(
                &mut bufs.out,
                &resp,
                close,
                shape.coded,
                shape.nominates,
                Some(id),
            );
            break (head, code, shape.framing, shape.keep_alive, close);
        };
        record.status = resp_status;
        if (500..600).contains(&resp_status) {
            self.blame(stats, addr);
        } else {
            stats.stats.record_success();
        }

        // The first part of the body came with the header; it leaves with the header.
        let mut chunks = Chunks::default();
        let mut remaining = match framing {
            Framing::Length(n) => n,
            _ => 0,
        };
        let mut done = framing == Framing::Empty;
        let mut clean = true;
        let first = &bufs.rbuf[head..];
        // Nothing has reached the client yet, so a body that is broken from its first bytes
        // (a chunk size that is no number) can still be answered with a 502.
        let take =
            body_part(framing, first, &mut remaining, &mut chunks, &mut done).map_err(|why| {
                self.blame(stats, addr);
                Failure::Upstream(502, format!("bad body from {addr}: {why}"))
            })?;
        if take < first.len() {
            // Bytes after the end of the response: the connection is out of step.
            clean = false;
        }
        bufs.out.extend_from_slice(&first[..take]);
        record.bytes_out += take;
        send(client, &bufs.out, write_t)
            .await
            .map_err(|e| Failure::Client(format!("writing to the client: {e}")))?;
        while !done {
            bufs.rbuf.clear();
            let n = receive(up, &mut bufs.rbuf, CHUNK, read_t)
                .await
                .map_err(|e| Failure::Midway(format!("reading the body from {addr}: {e}")))?;
            if n == 0 {
                if framing == Framing::Close {
                    clean = false;
                    break;
                }
                return Err(Failure::Midway(format!(
                    "{addr} closed before the body ended"
                )));
            }
            let got = &bufs.rbuf[..n];
            let take = body_part(framing, got, &mut remaining, &mut chunks, &mut done)
                .map_err(|why| Failure::Midway(format!("bad body from {addr}: {why}")))?;
            if take < got.len() {
                clean = false;
            }
            send(client, &got[..take], write_t)
                .await
                .map_err(|e| Failure::Client(format!("writing to the client: {e}")))?;
            record.bytes_out += take;
        }
        let end = Instant::now();
        record.end = Some(end);
        record.upstream_elapsed = record.upstream_start.map(|s| end - s);
        Ok(RelayEnd {
            close,
            reusable: clean && upstream_keep && !body_pending.load(Ordering::Relaxed),
            at: end,
        })
    }

    /// Sends the `rest` of a request's body upstream while relaying the response, as it
    /// comes, to the client. An app that streams its answer to an upload (an echo or a
    /// transcoding service) reads on only as fast as its answer is taken, so sending the
    /// whole body before reading any of the answer would stall both until a timeout; and
    /// an app that answers early (a 413, a refused login) is answered at once.
    async fn duplex<S: Transport>(
        &self,
        stream: &mut ClientConn<S>,
        up: &mut TcpStream,
        rest: u64,
        a: &Answer<'_>,
        bufs: &mut Buffers,
        record: &mut Record,
    ) -> Result<RelayEnd, Failure> {
        let (mut client_r, mut client_w) = stream.split_passing();
        let (mut up_r, mut up_w) = up.split();
        // Flags shared by the two halves below, which run in this one task; atomics only
        // because the connection's future must be `Send`.
        let body_pending = AtomicBool::new(true);
        // Whether the upstream has begun its answer; until then, once the body is all
        // sent, the wait for it is bounded by the route's read timeout.
        let answering = AtomicBool::new(false);
        let mut piece = Vec::new();
        let body = forward_body(&mut client_r, &mut up_w, rest, &mut piece, a.write_t);
        let response = async {
            bufs.rbuf.clear();
            if let Err(e) = read_more(&mut up_r, &mut bufs.rbuf).await {
                self.blame(a.stats, a.addr);
                return Err(upstream_failure("reading from", a.addr, &e));
            }
            answering.store(true, Ordering::Relaxed);
            self.relay(&mut client_w, &mut up_r, a, bufs, record, &body_pending)
                .await
        };
        let mut body = std::pin::pin!(body);
        let mut response = std::pin::pin!(response);
        let mut body_sent = false;
        let mut timer = std::pin::pin!(None::<tokio::time::Sleep>);
        std::future::poll_fn(|cx| {
            if !body_sent && let Poll::Ready(r) = body.as_mut().poll(cx) {
                body_sent = true;
                match r {
                    Ok(()) => body_pending.store(false, Ordering::Relaxed),
                    // Nobody is left to answer.
                    Err(Failure::Client(why)) => return Poll::Ready(Err(Failure::Client(why))),
                    // The upstream stopped taking the body (it answered early and closed,
                    // or failed): what it answered, if anything, is still relayed.
                    Err(_) => {}
                }
            }
            if let Poll::Ready(r) = response.as_mut().poll(cx) {
                return Poll::Ready(r);
            }
            if body_sent && !answering.load(Ordering::Relaxed) {
                if timer.is_none() {
                    timer.set(Some(tokio::time::sleep(a.read_t)));
                }
                if let Some(t) = timer.as_mut().as_pin_mut()
                    && t.poll(cx).is_ready()
                {
                    self.blame(a.stats, a.addr);
                    let e = std::io::Error::from(std::io::ErrorKind::TimedOut);
                    return Poll::Ready(Err(upstream_failure("reading from", a.addr, &e)));
                }
            }
            Poll::Pending
        })
        .await
    }

    /// Counts a failure against an endpoint, ejecting it after enough in a row.
    fn blame(&self, stats: &InFlight, addr: SocketAddr) {
        let p = &self.proxy;
        if stats
            .stats
            .record_failure(p.eject_after_failures, p.eject_ms)
        {
            p.metrics.ejections.inc();
            tracing::warn!(endpoint = %addr, "endpoint ejected after consecutive failures");
        }
    }
}

/// One request as the exchange with its upstream sees it.
struct Exchange<'a> {
    req: &'a Req<'a>,
    headers: &'a [httparse::Header<'a>],
    route: &'a Arc<Route>,
    id: &'a str,
    /// Request body bytes still to come from the client.
    rest: u64,
    /// Bytes the client already sent behind this request (pipelined), counted against
    /// [`MAX_EARLY`] with what it sends while the request waits.
    ahead: usize,
    shutting_down: bool,
    /// When the request's header had arrived.
    start: Instant,
}

/// Copies `rest` more request body bytes from the client to the upstream, a piece at a
/// time through `piece`.
async fn forward_body(
    client: &mut (impl AsyncRead + Unpin),
    up: &mut (impl AsyncWrite + Unpin),
    mut rest: u64,
    piece: &mut Vec<u8>,
    write_t: Duration,
) -> Result<(), Failure> {
    while rest > 0 {
        piece.clear();
        let want = usize::try_from(rest).unwrap_or(usize::MAX).min(CHUNK);
        let n = receive(client, piece, want, KEEPALIVE)
            .await
            .map_err(|e| Failure::Client(format!("reading the request body: {e}")))?;
        if n == 0 {
            return Err(Failure::Client(
                "the client closed before its body ended".into(),
            ));
        }
        send(up, &piece[..n], write_t)
            .await
            .map_err(|e| Failure::Upstream(502, format!("sending the body: {e}")))?;
        rest -= n as u64;
    }
    Ok(())
}

/// What relaying a response needs to know about its request and endpoint.
struct Answer<'a> {
    req: &'a Req<'a>,
    id: &'a str,
    addr: SocketAddr,
    stats: &'a InFlight,
    /// The client's connection closes after this response whatever the upstream says.
    close: bool,
    read_t: Duration,
    write_t: Duration,
}

/// How a relayed response ended.
struct RelayEnd {
    /// The client's connection closes.
    close: bool,
    /// The upstream connection is at a response boundary and may serve another request.
    reusable: bool,
    /// When the last byte was relayed.
    at: Instant,
}

/// A request counted in flight at an endpoint (for least-connections) until dropped.
struct InFlight {
    stats: Arc<EndpointStats>,
}

impl InFlight {
    fn new(stats: Arc<EndpointStats>) -> InFlight {
        stats.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight { stats }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a request's access-log line and metrics need from its exchange.
struct Record {
    status: u16,
    endpoint: Option<SocketAddr>,
    upstream_start: Option<Instant>,
    upstream_elapsed: Option<Duration>,
    /// When the response had been relayed whole, if it was.
    end: Option<Instant>,
    bytes_out: usize,
    error: Option<String>,
}

async fn connect(addr: SocketAddr, limit: Duration) -> std::io::Result<TcpStream> {
    let conn = match tokio::time::timeout(limit, TcpStream::connect(addr)).await {
        Ok(r) => r?,
        Err(_) => return Err(std::io::ErrorKind::TimedOut.into()),
    };
    conn.set_nodelay(true)?;
    Ok(conn)
}

/// How waiting for the first bytes of a response ended, when it did not end with them.
enum Waited {
    /// The upstream failed or timed out.
    Upstream(std::io::Error),
    /// The client closed its connection: nobody is left to answer.
    ClientGone,
}

/// The most bytes a client may have sent ahead (pipelined requests) while its request waits
/// for the upstream, counting those already read with the request; past this the client is
/// no longer read until the answer, so that TCP's flow control holds it back instead of the
/// proxy buffering without end.
const MAX_EARLY: usize = 64 << 10;

/// Waits for the upstream's first response bytes into `buf`. Meanwhile the client is
/// watched, as nginx and pingora do: one that closes its connection abandons its request
/// (the upstream connection is then dropped), and what it sends ahead is kept in `early`
/// for its next request; `ahead` bytes of it were already read. Watching costs no system
/// call while the client is quiet: the runtime's readiness for its socket is clear after the
/// request was read.
async fn first_bytes<S: Transport>(
    client: &mut ClientConn<S>,
    up: &mut TcpStream,
    buf: &mut Vec<u8>,
    early: &mut Vec<u8>,
    ahead: usize,
    limit: Duration,
) -> Result<(), Waited> {
    let cap = MAX_EARLY.saturating_sub(ahead);
    let waited = within(limit, async {
        loop {
            tokio::select! {
                biased;
                r = read_more(up, buf) => return r.map_err(Waited::Upstream),
                r = async {
                    early.reserve(4096);
                    let room = (early.capacity() - early.len()).min(cap - early.len());
                    (&mut *client).take(room as u64).read_buf(early).await
                }, if early.len() < cap => match r {
                    Ok(n) if n > 0 => {}
                    _ => return Err(Waited::ClientGone),
                },
            }
        }
    });
    waited
        .await
        .unwrap_or_else(|| Err(Waited::Upstream(std::io::ErrorKind::TimedOut.into())))
}

/// Reads from the upstream until `buf` holds more than before, within `limit`; a closed
/// connection is an error, since a response header is still due.
async fn read_head(
    up: &mut (impl AsyncRead + Unpin),
    buf: &mut Vec<u8>,
    limit: Duration,
) -> std::io::Result<()> {
    within_io(limit, read_more(up, buf)).await
}

/// Reads more of a response header from the upstream into `buf`, with no time limit of its
/// own; a closed connection is an error, since the header is still due.
async fn read_more(up: &mut (impl AsyncRead + Unpin), buf: &mut Vec<u8>) -> std::io::Result<()> {
    if buf.len() >= MAX_RESPONSE_HEAD {
        return Err(std::io::Error::other("response header too large"));
    }
    let n = read_into(up, buf, CHUNK.min(MAX_RESPONSE_HEAD - buf.len())).await?;
    if n == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// How upstream response headers are read: as pingora reads them, whitespace between a
/// field name and its colon is taken off the name (RFC 9112, section 5.1: a proxy must remove
/// it before forwarding), where httparse alone would refuse the response. A field folded over
/// several lines is still refused, with a 502 (section 5.2 allows either).
fn response_parser() -> httparse::ParserConfig {
    let mut config = httparse::ParserConfig::default();
    config.allow_spaces_after_header_name_in_responses(true);
    config
}

/// How a response is framed and whether its connection can be reused.
struct Shape {
    framing: Framing,
    keep_alive: bool,
    /// Framed by Transfer-Encoding; a Content-Length beside it is not relayed.
    coded: bool,
    /// Its `Connection` field names further hop-by-hop fields.
    nominates: bool,
}

/// Reads the framing of a response to `req` (RFC 9112, section 6.3).
fn response_shape(req: &Req<'_>, resp: &httparse::Response<'_, '_>) -> Result<Shape, String> {
    let code = resp.code.unwrap_or(0);
    // httparse takes any three digits; a status below 100 is no status (RFC 9110, section
    // 15), would be written back as a status line no client reads, and pingora's path
    // answers 502 for it too.
    if code < 100 {
        return Err(format!("invalid status code {code:03}"));
    }
    let mut keep_alive = resp.version == Some(1);
    let (mut length, mut chunked, mut coded) = (None::<u64>, false, false);
    let mut nominates = false;
    for h in resp.headers.iter() {
        let is = |n: &str| h.name.eq_ignore_ascii_case(n);
        if is("content-length") {
            let v = text(h.value)
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or("invalid content-length")?;
            if length.is_some_and(|l| l != v) {
                return Err("conflicting content-length".into());
            }
            length = Some(v);
        } else if is("transfer-encoding") {
            coded = true;
            // Empty list elements do not count (RFC 9110, section 5.6.1): `chunked,` is
            // chunked.
            let last =
                text(h.value).and_then(|v| v.rsplit(',').map(str::trim).find(|c| !c.is_empty()));
            chunked = last.is_some_and(|l| l.eq_ignore_ascii_case("chunked"));
        } else if is("connection") {
            for option in text(h.value).unwrap_or("").split(',').map(str::trim) {
                if option.eq_ignore_ascii_case("close") {
                    keep_alive = false;
                } else if !connection_only(option) {
                    nominates = true;
                }
            }
        }
    }
    let framing = if req.method == "HEAD" || code == 204 || code == 304 {
        Framing::Empty
    } else if coded {
        if chunked {
            Framing::Chunked
        } else {
            Framing::Close
        }
    } else {
        match length {
            Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
            None => Framing::Close,
        }
    };
    // A body ended by closing, or a response framed two ways (RFC 9112, section 6.3: the
    // connection is closed after it), leaves the connection unusable.
    if framing == Framing::Close || (coded && length.is_some()) {
        keep_alive = false;
    }
    // A 204 that announces a body (RFC 9110, section 15.3.5, forbids one) may be followed
    // by one all the same, which would then be read as the answer to the next request.
    if code == 204 && (coded || length.is_some_and(|l| l > 0)) {
        keep_alive = false;
    }
    Ok(Shape {
        framing,
        keep_alive,
        coded,
        nominates,
    })
}

/// Response fields that concern only the connection they came on (RFC 9110, section 7.6.1),
/// which neither request path relays: the upstream's connection management, the codings it
/// would accept, and the protocols it offers to switch to. Apache, for one, offers
/// `Upgrade: h2,h2c` on its responses; relayed, the offer would reach clients from the proxy,
/// which never made it, and over HTTP/2 any of these fields makes a response malformed (RFC
/// 9113, section 8.2.2).
pub(crate) const HOP_BY_HOP: [&str; 5] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "upgrade",
];

/// Whether a response field is hop-by-hop by its name alone.
fn hop_by_hop(name: &str) -> bool {
    HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
}

/// Whether a field of a response with status `code` is relayed although it is hop-by-hop: a
/// 426 keeps its `Upgrade`, which names the protocol the app requires (RFC 9110, section
/// 15.5.22). (A 101 keeps its `Connection` and `Upgrade` too, on pingora's path; lain's
/// path never relays one.)
pub(crate) fn kept_hop_by_hop(name: &str, code: u16) -> bool {
    code == 426 && name.eq_ignore_ascii_case("upgrade")
}

/// Whether a field frames the body, and so is never taken away as hop-by-hop even when a
/// `Connection` field names it: the body is relayed as it is framed.
pub(crate) fn framing_field(name: &str) -> bool {
    name.eq_ignore_ascii_case("content-length") || name.eq_ignore_ascii_case("transfer-encoding")
}

/// Whether responses with status `code` are never framed (RFC 9110, section 8.6, and RFC
/// 9112, section 6.1: a server must not send `Content-Length` or `Transfer-Encoding` in a 1xx
/// or a 204). An app's framing fields on them are not relayed, as nginx and Envoy do not: a
/// client that believed a `Transfer-Encoding: chunked` on a kept-alive 204 would wait for a
/// body that never comes. A 304 keeps its length, which describes the representation.
pub(crate) fn bodiless_status(code: u16) -> bool {
    (100..200).contains(&code) || code == 204
}

/// Whether a connection option only manages the connection (`close`, `keep-alive`, or
/// none), rather than naming a hop-by-hop field.
fn connection_only(option: &str) -> bool {
    option.is_empty()
        || option.eq_ignore_ascii_case("close")
        || option.eq_ignore_ascii_case("keep-alive")
}

/// Whether `name` is among the connection options of `connection` (the values of a
/// response's `Connection` fields), which name further hop-by-hop fields (RFC 9110, section
/// 7.6.1), and not a framing field.
fn nominated<'a>(mut connection: impl Iterator<Item = &'a str>, name: &str) -> bool {
    !framing_field(name)
        && connection.any(|v| {
            v.split(',')
                .any(|option| option.trim().eq_ignore_ascii_case(name))
        })
}

/// The values of the `Connection` fields among `headers`.
fn connection_values<'a>(
    headers: &'a [httparse::Header<'a>],
) -> impl Iterator<Item = &'a str> + 'a {
    headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        .filter_map(|h| text(h.value))
}

fn put_header(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Writes the response header the client gets, without the hop-by-hop fields (and those
/// its `Connection` names, when `nominates`). A response framed by Transfer-Encoding
/// (`coded`) loses a Content-Length it also has (RFC 9112, section 6.3: an intermediary must
/// remove it; a client or cache behind that trusted it would lose track of where the
/// response ends), and a length given more than once (the same each time, or the response
/// was refused) is sent once: many clients refuse a repeated one, and an HTTP/2 client
/// always does. `id` is added as `x-request-id` unless the response keeps one of its own.
fn write_response_head(
    out: &mut Vec<u8>,
    resp: &httparse::Response<'_, '_>,
    close: bool,
    coded: bool,
    nominates: bool,
    id: Option<&str>,
) {
    out.clear();
    let code = resp.code.unwrap_or(0);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(code.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(resp.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let (mut length_sent, mut id_sent) = (false, false);
    let bodiless = bodiless_status(code);
    for h in resp.headers.iter() {
        let length = h.name.eq_ignore_ascii_case("content-length");
        let dropped = (length && (coded || length_sent))
            || (bodiless && framing_field(h.name))
            || ((hop_by_hop(h.name)
                || (nominates && nominated(connection_values(resp.headers), h.name)))
                && !kept_hop_by_hop(h.name, code));
        if !dropped {
            put_header(out, h.name, h.value);
            length_sent |= length;
            id_sent |= h.name.eq_ignore_ascii_case("x-request-id");
        }
    }
    if let Some(id) = id.filter(|_| !id_sent) {
        put_header(out, "x-request-id", id.as_bytes());
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// How many of `bytes` (the next body bytes from upstream) belong to the body; sets `done`
/// when the body ended among them.
fn body_part(
    framing: Framing,
    bytes: &[u8],
    remaining: &mut u64,
    chunks: &mut Chunks,
    done: &mut bool,
) -> Result<usize, &'static str> {
    match framing {
        Framing::Empty => Ok(0),
        Framing::Close => Ok(bytes.len()),
        Framing::Length(_) => {
            let n = bytes
                .len()
                .min(usize::try_from(*remaining).unwrap_or(usize::MAX));
            *remaining -= n as u64;
            *done = *remaining == 0;
            Ok(n)
        }
        Framing::Chunked => match chunks.feed(bytes)? {
            Some(n) => {
                *done = true;
                Ok(n)
            }
            None => Ok(bytes.len()),
        },
    }
}

/// Writes the answer to a request whose upstream failed before its response began.
fn error_response(out: &mut Vec<u8>, status: u16, id: &str, close: bool) {
    let (reason, body): (&str, &[u8]) = match status {
        503 => ("Service Unavailable", b"no healthy endpoint\n"),
        504 => ("Gateway Timeout", b"upstream timed out\n"),
        _ => ("Bad Gateway", b"bad gateway\n"),
    };
    out.clear();
    out.extend_from_slice(format!("HTTP/1.1 {status} {reason}\r\n").as_bytes());
    put_header(out, "content-type", b"text/plain; charset=utf-8");
    put_header(out, "content-length", body.len().to_string().as_bytes());
    put_header(out, "x-request-id", id.as_bytes());
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
}

#[cfg(test)]
mod tests {
    use super::*;
    use lain_test_support::Rng;

    #[tokio::test(start_paused = true)]
    async fn within_times_out_only_what_waits_past_its_limit() {
        let limit = Duration::from_secs(5);
        assert_eq!(within(limit, async { 7 }).await, Some(7));
        let late = tokio::time::sleep(Duration::from_secs(6));
        assert_eq!(within(limit, late).await, None);
        let t0 = tokio::time::Instant::now();
        let in_time = tokio::time::sleep(Duration::from_secs(4));
        assert_eq!(within(limit, in_time).await, Some(()));
        assert_eq!(t0.elapsed(), Duration::from_secs(4));
        // A future that waits, then finishes after being woken, is not cut short.
        let (tx, rx) = tokio::sync::oneshot::channel::<u8>();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let _ = tx.send(3);
        });
        assert_eq!(within(limit, rx).await.map(Result::ok), Some(Some(3)));
    }

    /// Feeds `body` to a tracker in pieces of `step` bytes; returns where it says the body
    /// ends.
    fn end_of(body: &[u8], step: usize) -> Result<Option<usize>, &'static str> {
        let mut c = Chunks::default();
        let mut at = 0;
        for piece in body.chunks(step) {
            if let Some(n) = c.feed(piece)? {
                return Ok(Some(at + n));
            }
            at += piece.len();
        }
        Ok(None)
    }

    #[test]
    fn chunked_bodies_end_where_they_end_however_they_are_split() {
        let bodies: [&[u8]; 5] = [
            b"5\r\nhello\r\n0\r\n\r\n",
            b"5;name=value\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
            b"A\r\n0123456789\r\n0\r\nX-Trailer: t\r\nY: u\r\n\r\n",
            b"3\nabc\n0\n\n",
            b"0\r\n\r\n",
        ];
        for body in bodies {
            let mut with_next = body.to_vec();
            with_next.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
            for step in 1..=with_next.len() {
                assert_eq!(
                    end_of(&with_next, step),
                    Ok(Some(body.len())),
                    "{:?} in pieces of {step}",
                    String::from_utf8_lossy(body)
                );
            }
        }
        assert_eq!(end_of(b"5\r\nhel", 2), Ok(None));
        assert_eq!(end_of(b"5\r\nhello\r\n0\r\nX: y\r\n", 3), Ok(None));
    }

    #[test]
    fn broken_chunked_bodies_are_errors() {
        for bad in [
            &b"\r\n"[..],
            b"zz\r\n",
            b"5\r\nhello!\r\n",
            b"5\rx",
            b"1234567890abcdef0\r\n",
            b"0\r\n\rx",
        ] {
            assert!(
                end_of(bad, 1).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    fn parse<T>(raw: &[u8], f: impl FnOnce(Option<Req<'_>>) -> T) -> T {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        assert!(matches!(req.parse(raw), Ok(httparse::Status::Complete(_))));
        f(facts(
            req.method.unwrap(),
            req.path.unwrap(),
            req.version.unwrap(),
            req.headers,
        ))
    }

    #[test]
    fn only_plain_requests_stay_on_this_path() {
        let ok = |raw: &[u8]| parse(raw, |r| r.is_some());
        assert!(ok(b"GET /a?b=c HTTP/1.1\r\nHost: h\r\n\r\n"));
        assert!(ok(
            b"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\n"
        ));
        assert!(ok(
            b"GET / HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, close\r\n\r\n"
        ));
        for pingora in [
            &b"GET / HTTP/1.0\r\nHost: h\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            b"GET http://h/ HTTP/1.1\r\nHost: h\r\n\r\n",
            b"GET /a\"b HTTP/1.1\r\nHost: h\r\n\r\n",
            b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n",
            b"CONNECT h:443 HTTP/1.1\r\nHost: h\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: +3\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: h\r\nConnection: x-secret\r\n\r\n",
        ] {
            assert!(!ok(pingora), "{}", String::from_utf8_lossy(pingora));
        }
    }

    #[test]
    fn request_facts() {
        parse(
            b"PUT /p?q HTTP/1.1\r\nhost: H.example\r\ncontent-length: 12\r\nConnection: close\r\n\
              X-Request-Id: one\r\nx-request-id: two\r\nUser-Agent: ua\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n",
            |r| {
                let r = r.unwrap();
                assert_eq!((r.method, r.path, r.query), ("PUT", "/p", Some("q")));
                assert_eq!((r.host, r.length, r.close, r.idempotent), ("H.example", 12, true, true));
                assert_eq!((r.request_id, r.user_agent, r.xff), (Some("one"), "ua", Some("1.2.3.4")));
            },
        );
        parse(b"POST / HTTP/1.1\r\nHost: h\r\n\r\n", |r| {
            let r = r.unwrap();
            assert!(!r.idempotent && !r.close);
            assert_eq!(r.length, 0);
        });
    }

    fn shape(method: &str, raw: &[u8]) -> Result<(Framing, bool), String> {
        let req_raw = format!("{method} / HTTP/1.1\r\nHost: h\r\n\r\n");
        parse(req_raw.as_bytes(), |req| {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut resp = httparse::Response::new(&mut headers);
            assert!(matches!(resp.parse(raw), Ok(httparse::Status::Complete(_))));
            response_shape(&req.unwrap(), &resp).map(|s| (s.framing, s.keep_alive))
        })
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        use Framing::{Chunked, Close, Empty, Length};
        let table: [(&str, &[u8], Framing, bool); 11] = [
            (
                "GET",
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
                Length(5),
                true,
            ),
            (
                "GET",
                b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
                Empty,
                true,
            ),
            (
                "HEAD",
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
                Empty,
                true,
            ),
            ("GET", b"HTTP/1.1 204 No Content\r\n\r\n", Empty, true),
            (
                "GET",
                b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
                Empty,
                true,
            ),
            // Framed two ways: chunked wins, and the connection is not reused.
            (
                "GET",
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 3\r\n\r\n",
                Chunked,
                false,
            ),
            (
                "GET",
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
                Close,
                false,
            ),
            ("GET", b"HTTP/1.1 200 OK\r\n\r\n", Close, false),
            (
                "GET",
                b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n",
                Length(1),
                false,
            ),
            (
                "GET",
                b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n",
                Length(1),
                false,
            ),
            (
                "GET",
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n",
                Length(2),
                true,
            ),
        ];
        for (method, raw, framing, keep_alive) in table {
            assert_eq!(
                shape(method, raw),
                Ok((framing, keep_alive)),
                "{method} {}",
                String::from_utf8_lossy(raw)
            );
        }
        for bad in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: -2\r\n\r\n",
        ] {
            assert!(shape("GET", bad).is_err());
        }
    }

    /// Fragments that make heads and bodies malformed, ambiguous or merely unusual.
    const PIECES: [&[u8]; 18] = [
        b"\r\nContent-Length: 5",
        b"\r\ncontent-length: 0",
        b"\r\nContent-Length: 18446744073709551616",
        b"\r\nTransfer-Encoding: chunked",
        b"\r\nTransfer-Encoding: gzip",
        b", chunked",
        b"\r\nConnection: close",
        b"\r\nConnection: keep-alive, x-a, content-length",
        b"\r\nConnection: transfer-encoding, upgrade",
        b"\r\nx-a: 1",
        b"\r\nUpgrade: h2c",
        b"\r\nKeep-Alive: timeout=5",
        b"\r\nHost: other",
        b"\r\nX-Request-Id: given",
        b"\r\n\r\n",
        b"0\r\n\r\n",
        b"ffffffffffffffff\r\n",
        b";ext=\"v\"\r\n",
    ];

    /// `raw` with a few random edits: bytes replaced, fragments inserted, ranges removed.
    fn mutate(rng: &mut Rng, raw: &[u8]) -> Vec<u8> {
        const BYTES: &[u8] = b"\r\n:; ,\t0123456789aAfFxX-/?#%\x00\x7f\x80\xff";
        let mut out = raw.to_vec();
        for _ in 0..1 + rng.index(4) {
            let at = rng.index(out.len() + 1);
            match rng.index(3) {
                0 if !out.is_empty() => {
                    let at = at.min(out.len() - 1);
                    out[at] = rng.pick(BYTES);
                }
                1 => {
                    let piece = rng.pick(&PIECES);
                    out.splice(at..at, piece.iter().copied());
                }
                _ => {
                    let end = (at + 1 + rng.index(8)).min(out.len());
                    out.drain(at.min(end)..end);
                }
            }
        }
        out
    }

    #[test]
    fn mutated_chunked_bodies_end_at_the_same_byte_however_they_are_split() {
        let bodies: [&[u8]; 3] = [
            b"5\r\nhello\r\n6;x=y\r\n world\r\n0\r\nX-T: t\r\n\r\nHTTP/1.1 200 OK\r\n",
            b"3\nabc\n0\n\nnext",
            b"A\r\n0123456789\r\n0\r\n\r\n",
        ];
        let mut rng = Rng(0x5eed_c4a7);
        for round in 0..20_000 {
            let body = mutate(&mut rng, bodies[round % bodies.len()]);
            let whole = end_of(&body, body.len().max(1));
            let step = 1 + rng.index(body.len().max(1));
            let split = end_of(&body, step);
            // Either both find the same end, or both fail, or neither has seen the end yet.
            assert_eq!(
                whole.map_err(|_| ()),
                split.map_err(|_| ()),
                "round {round}, pieces of {step}: {:?}",
                String::from_utf8_lossy(&body)
            );
            if let Ok(Some(n)) = whole {
                assert!(n <= body.len(), "round {round}");
            }
        }
    }

    #[test]
    fn mutated_response_heads_are_relayed_framed_as_they_were_read() {
        let heads: [&[u8]; 5] = [
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-B: 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n",
            b"HTTP/1.0 404 Not Found\r\nConnection: x-a\r\nx-a: 1\r\n\r\n",
            b"HTTP/1.1 304 Not Modified\r\nETag: \"e\"\r\nContent-Length: 9\r\n\r\n",
            b"HTTP/1.1 426 Upgrade Required\r\nUpgrade: TLS/1.2\r\nContent-Length: 0\r\n\r\n",
        ];
        let mut rng = Rng(0x0dd_f00d);
        let (mut relayed, mut refused) = (0, 0);
        for round in 0..20_000 {
            let raw = mutate(&mut rng, heads[round % heads.len()]);
            let method = if rng.index(8) == 0 { "HEAD" } else { "GET" };
            let req_raw = format!("{method} / HTTP/1.1\r\nHost: h\r\n\r\n");
            parse(req_raw.as_bytes(), |req| {
                let req = req.unwrap();
                let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let mut resp = httparse::Response::new(&mut headers);
                let Ok(httparse::Status::Complete(_)) = resp.parse(&raw) else {
                    return;
                };
                let code = resp.code.unwrap_or(0);
                let Ok(read) = response_shape(&req, &resp) else {
                    refused += 1;
                    return;
                };
                if (100..200).contains(&code) {
                    return;
                }
                relayed += 1;
                let close = !read.keep_alive || rng.index(2) == 0;
                let mut out = Vec::new();
                write_response_head(
                    &mut out,
                    &resp,
                    close,
                    read.coded,
                    read.nominates,
                    Some("id"),
                );
                let shown = String::from_utf8_lossy(&raw);
                // The client reads the relayed head as a whole response head, with the same
                // status and the same framing the proxy relays the body by.
                let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS + 2];
                let mut again = httparse::Response::new(&mut headers);
                assert!(
                    matches!(again.parse(&out), Ok(httparse::Status::Complete(n)) if n == out.len()),
                    "round {round}: {shown:?} relayed as {:?}",
                    String::from_utf8_lossy(&out)
                );
                assert_eq!(again.code, Some(code), "round {round}: {shown:?}");
                let seen = response_shape(&req, &again)
                    .unwrap_or_else(|e| panic!("round {round}: {shown:?} relayed unreadable: {e}"));
                assert_eq!(seen.framing, read.framing, "round {round}: {shown:?}");
                assert!(!seen.keep_alive || !close, "round {round}: {shown:?}");
                let lengths = again
                    .headers
                    .iter()
                    .filter(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .count();
                assert!(
                    lengths <= usize::from(!read.coded),
                    "round {round}: {shown:?}"
                );
                for h in again.headers.iter() {
                    let ours = h.name.eq_ignore_ascii_case("connection") && h.value == b"close";
                    assert!(
                        ours || !hop_by_hop(h.name) || kept_hop_by_hop(h.name, code),
                        "round {round}: {shown:?} relayed {}",
                        h.name
                    );
                }
                let ids = again
                    .headers
                    .iter()
                    .filter(|h| h.name.eq_ignore_ascii_case("x-request-id"))
                    .count();
                assert!(ids >= 1, "round {round}: {shown:?}");
            });
        }
        // The edits leave both kinds common enough for the rounds to mean something.
        assert!(
            relayed > 2_000 && refused > 200,
            "{relayed} relayed, {refused} refused"
        );
    }

    #[test]
    fn mutated_request_heads_are_served_here_only_when_plain() {
        let heads: [&[u8]; 3] = [
            b"GET /a/b?c=d HTTP/1.1\r\nHost: h.test\r\nUser-Agent: u\r\n\r\n",
            b"POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 1.2.3.4\r\nX-Request-Id: r\r\n\r\n",
        ];
        let mut rng = Rng(0xfeed_beef);
        let (mut here, mut elsewhere) = (0, 0);
        for round in 0..20_000 {
            let raw = mutate(&mut rng, heads[round % heads.len()]);
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut req = httparse::Request::new(&mut headers);
            let Ok(httparse::Status::Complete(_)) = req.parse(&raw) else {
                continue;
            };
            let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version)
            else {
                continue;
            };
            let shown = String::from_utf8_lossy(&raw);
            let Some(facts) = facts(method, target, version, req.headers) else {
                elsewhere += 1;
                continue;
            };
            here += 1;
            // Only an unambiguous request stays on this path: one host, at most one length,
            // no other framing, nothing that changes the exchange.
            assert!(plain_target(facts.target), "round {round}: {shown:?}");
            let count = |name: &str| {
                req.headers
                    .iter()
                    .filter(|h| h.name.eq_ignore_ascii_case(name))
                    .count()
            };
            assert_eq!(count("host"), 1, "round {round}: {shown:?}");
            assert!(count("content-length") <= 1, "round {round}: {shown:?}");
            for name in ["transfer-encoding", "upgrade", "expect"] {
                assert_eq!(count(name), 0, "round {round}: {shown:?}");
            }
            assert!(
                version == 1 && method != "CONNECT",
                "round {round}: {shown:?}"
            );
        }
        assert!(
            here > 2_000 && elsewhere > 1_000,
            "{here} here, {elsewhere} elsewhere"
        );
    }

    /// The header lain's path writes to the client for the upstream response `raw` to a GET.
    fn relayed_head(raw: &[u8], close: bool, add_id: Option<&str>) -> String {
        parse(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n", |req| {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut resp = httparse::Response::new(&mut headers);
            assert!(matches!(resp.parse(raw), Ok(httparse::Status::Complete(_))));
            let shape = response_shape(&req.unwrap(), &resp).unwrap();
            let mut out = Vec::new();
            write_response_head(&mut out, &resp, close, shape.coded, shape.nominates, add_id);
            String::from_utf8(out).unwrap()
        })
    }

    #[test]
    fn response_heads_drop_hop_by_hop_headers_and_add_what_is_missing() {
        assert_eq!(
            relayed_head(
                b"HTTP/1.1 201 Created\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\
                  X-A: 1\r\nContent-Length: 0\r\n\r\n",
                true,
                Some("id-1")
            ),
            "HTTP/1.1 201 Created\r\nX-A: 1\r\nContent-Length: 0\r\nx-request-id: id-1\r\n\
             connection: close\r\n\r\n"
        );
        // Framed both ways: the chunked framing is what counts, and the length goes.
        assert_eq!(
            relayed_head(
                b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
                true,
                None
            ),
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nconnection: close\r\n\r\n"
        );
        // Apache's offer to upgrade, the fields its Connection names (in any case, over
        // several lines), and the rest of the hop-by-hop fields stay behind; the framing
        // fields are never taken, even when named.
        assert_eq!(
            relayed_head(
                b"HTTP/1.1 200 OK\r\nUpgrade: h2,h2c\r\nConnection: Upgrade, x-hop\r\n\
                  Connection: X-Other, content-length\r\nX-Hop: 1\r\nTE: trailers\r\n\
                  Proxy-Connection: keep-alive\r\nX-HOP: 2\r\nx-other: 3\r\nX-Hopper: 4\r\n\
                  Content-Length: 2\r\n\r\n",
                false,
                None
            ),
            "HTTP/1.1 200 OK\r\nX-Hopper: 4\r\nContent-Length: 2\r\n\r\n"
        );
        // A length given twice, the same both times, is sent once; two lengths that differ
        // are no response at all.
        assert_eq!(
            relayed_head(
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: 1\r\nContent-Length: 2\r\n\r\n",
                false,
                None
            ),
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: 1\r\n\r\n"
        );
        assert!(
            shape(
                "GET",
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n"
            )
            .is_err()
        );
        // The upstream's own request id goes when its Connection names it; lain's comes instead.
        assert_eq!(
            relayed_head(
                b"HTTP/1.1 200 OK\r\nConnection: X-Request-Id\r\nX-Request-Id: theirs\r\n\
                  Content-Length: 0\r\n\r\n",
                false,
                Some("ours")
            ),
            "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nx-request-id: ours\r\n\r\n"
        );
        // A 204 is never framed, so an app's framing fields on one stay behind; a 304 keeps
        // its length, which describes the representation.
        assert_eq!(
            relayed_head(
                b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\nX-A: 1\r\n\
                  Transfer-Encoding: chunked\r\n\r\n",
                false,
                None
            ),
            "HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n"
        );
        assert_eq!(
            relayed_head(
                b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
                false,
                None
            ),
            "HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n"
        );
        // A 426 keeps the Upgrade that says which protocol the app requires.
        assert_eq!(
            relayed_head(
                b"HTTP/1.1 426 Upgrade Required\r\nUpgrade: TLS/1.2\r\nConnection: Upgrade\r\n\
                  Content-Length: 0\r\n\r\n",
                false,
                None
            ),
            "HTTP/1.1 426 Upgrade Required\r\nUpgrade: TLS/1.2\r\nContent-Length: 0\r\n\r\n"
        );
    }
}
