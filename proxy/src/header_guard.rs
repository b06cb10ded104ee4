//! A guard around every HTTP/1 client connection that bounds how a request header arrives:
//! a header block larger than `max_header_bytes` is answered 431 before pingora parses it,
//! and a client that has not sent its whole header within `header_timeout_secs` is cut off.
//!
//! pingora cannot do either itself. It refuses header blocks over 1 MiB (or with more than
//! 256 headers) with a 400, and its read timeouts apply to each read, so a client that sends
//! one byte a second keeps a connection forever. The guard watches the bytes pingora reads:
//! while a header is arriving it counts them and looks for the blank line that ends it;
//! once the header is complete the guard passes everything through untouched until the
//! accept loop announces the next request on the connection. The header clock of the first
//! request starts when the connection is accepted (or its TLS handshake completes); that of
//! a later request on a kept-alive connection starts with its first byte, so idle keep-alive
//! connections are governed by pingora's keep-alive timeout instead.
//!
//! Nothing here takes a lock or allocates on the common path: a request whose header
//! arrives in one read never arms a timer.
//!
//! The guard also buffers what pingora writes, as pingora's own listeners do (pingora's
//! HTTP/1 code writes the response header and the body separately and flushes when a
//! response is complete or must reach the client at once). Streams built outside pingora's
//! listeners have no write buffer, and without one every response costs the header and the
//! body a system call and a TCP segment each.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::protocols::Ssl;
use pingora_core::protocols::tls::{SslDigest, TlsRef};
use pingora_core::protocols::{
    ALPN, GetProxyDigest, GetSocketDigest, GetTimingDigest, IO, Peek, Shutdown, SocketDigest,
    Stream, TimingDigest, UniqueID, UniqueIDType, raw_connect::ProxyDigest,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The answer to an oversized header block. The connection is closed after it.
const RESPONSE_431: &[u8] = b"HTTP/1.1 431 Request Header Fields Too Large\r\n\
content-type: text/plain; charset=utf-8\r\ncontent-length: 32\r\nconnection: close\r\n\r\n\
request header fields too large\n";

/// After a 431, how long the rest of the client's header is read and thrown away before the
/// connection closes; closing with unread data would reset the connection and could destroy
/// the 431 before the client reads it.
pub(crate) const LINGER: Duration = Duration::from_secs(2);
/// The most bytes thrown away while lingering.
pub(crate) const LINGER_BYTES: usize = 8 << 20;

/// The write buffer's size: a response header and a small body, about one TCP segment, as
/// pingora's own L4 write buffer.
const WRITE_BUFFER: usize = 1460;

/// How long closing a connection waits for what is still buffered to reach the client. A
/// client that stopped reading (the reason a write may have just timed out) would
/// otherwise hold the connection, and its task, for good.
pub const CLOSE_FLUSH: Duration = Duration::from_secs(5);

/// How long a peek for the next request on a kept-alive connection may wait; pingora's own
/// keep-alive timeout, which its peek (done when h2c is enabled) does not apply.
const IDLE_PEEK: Duration = Duration::from_secs(60);

/// The limits a guard enforces.
#[derive(Debug, Clone, Copy)]
pub struct HeaderLimits {
    /// How long a client has to send a complete request header.
    pub timeout: Duration,
    /// The largest header block (request line, headers, blank line) accepted.
    pub max_bytes: usize,
}

#[derive(Debug)]
enum Phase {
    /// Between requests; the header clock starts with the next byte.
    Idle,
    /// A header is arriving.
    Header {
        deadline: Instant,
        seen: usize,
        /// Where the scan for the blank line stands.
        scan: Scan,
    },
    /// The header is complete; everything passes through until the next request.
    Passing,
    /// Answering 431: `written` bytes of the answer are out.
    Rejecting { written: usize },
    /// The 431 is out and the write side shut; the rest of the header is discarded.
    Lingering { until: Instant, discarded: usize },
}

/// A client stream with the header guard in front of pingora. `S` is pingora's stream
/// once pingora serves the connection; lain's HTTP/1.1 path guards the bare socket, which
/// spares every read and write pingora's layers (its buffered stream, and two clock reads
/// per request for its read-timing digest), and wraps it for pingora only if it hands the
/// connection over ([`GuardedStream::map_inner`]).
#[derive(Debug)]
pub struct GuardedStream<S = Stream> {
    inner: S,
    limits: HeaderLimits,
    phase: Phase,
    next_request: Arc<AtomicBool>,
    sleep: Option<Pin<Box<Sleep>>>,
    /// Written bytes not yet handed to `inner`; `wpos` of them already were.
    wbuf: Vec<u8>,
    wpos: usize,
    /// Bytes read by lain's HTTP/1 path and handed back for pingora to read again, from
    /// `rpos` on.
    rbuf: Vec<u8>,
    rpos: usize,
}

impl<S: AsyncRead + AsyncWrite + Unpin> GuardedStream<S> {
    /// Guards `inner`; the first request's header clock starts now. Store `true` in the
    /// returned flag before handing the stream to pingora for each later request.
    pub fn new(inner: S, limits: HeaderLimits) -> (GuardedStream<S>, Arc<AtomicBool>) {
        let next_request = Arc::new(AtomicBool::new(false));
        let guard = GuardedStream {
            inner,
            limits,
            phase: Phase::Header {
                deadline: Instant::now() + limits.timeout,
                seen: 0,
                scan: Scan::Start,
            },
            next_request: next_request.clone(),
            sleep: None,
            wbuf: Vec::new(),
            wpos: 0,
            rbuf: Vec::new(),
            rpos: 0,
        };
        (guard, next_request)
    }

    /// Hands back bytes already read (a request header lain's HTTP/1 path leaves to
    /// pingora): the next reads return them before anything new from the client. The guard
    /// has seen them, so they pass through as they are. `complete` says the header ends
    /// among them; otherwise (a parse error before its end) the guard goes on bounding the
    /// rest of the header as pingora reads it.
    pub fn unread(&mut self, bytes: &[u8], complete: bool) {
        self.next_request.store(false, Ordering::Relaxed);
        if complete {
            // What pingora reads after these bytes (the request's body) is not a header.
            self.phase = Phase::Passing;
        }
        self.rbuf.drain(..self.rpos);
        self.rpos = 0;
        let mut joined = bytes.to_vec();
        joined.extend_from_slice(&self.rbuf);
        self.rbuf = joined;
    }

    /// The next request began in bytes already read (`already`, sent behind the previous
    /// request): its header clock starts now and counts them. Without this a client that
    /// stops after the first bytes of a pipelined request would hold the connection, as the
    /// clock otherwise starts only with a new read. Returns `false` when the header is
    /// already larger than the limit: the next read then answers 431 and fails, as it does
    /// for a header that grows too large as it arrives.
    pub fn begin_header(&mut self, already: &[u8]) -> bool {
        self.next_request.store(false, Ordering::Relaxed);
        let mut state = Scan::Start;
        let (phase, fits) = match scan(already, &mut state) {
            Some(n) if n <= self.limits.max_bytes => (Phase::Passing, true),
            None if already.len() <= self.limits.max_bytes => (
                Phase::Header {
                    deadline: Instant::now() + self.limits.timeout,
                    seen: already.len(),
                    scan: state,
                },
                true,
            ),
            _ => (Phase::Rejecting { written: 0 }, false),
        };
        self.phase = phase;
        fits
    }

    /// The same guard, in the same state, around `f(inner)`.
    pub fn map_inner<T>(self, f: impl FnOnce(S) -> T) -> GuardedStream<T> {
        GuardedStream {
            inner: f(self.inner),
            limits: self.limits,
            phase: self.phase,
            next_request: self.next_request,
            sleep: self.sleep,
            wbuf: self.wbuf,
            wpos: self.wpos,
            rbuf: self.rbuf,
            rpos: self.rpos,
        }
    }

    /// Copies handed-back bytes into `buf`; true when there were any.
    fn read_unread(&mut self, buf: &mut ReadBuf<'_>) -> bool {
        if self.rpos >= self.rbuf.len() {
            return false;
        }
        let n = buf.remaining().min(self.rbuf.len() - self.rpos);
        buf.put_slice(&self.rbuf[self.rpos..self.rpos + n]);
        self.rpos += n;
        if self.rpos == self.rbuf.len() {
            self.rbuf = Vec::new();
            self.rpos = 0;
        }
        true
    }

    /// Starts watching a new request if the accept loop announced one.
    fn take_next_request(&mut self) {
        if self.next_request.load(Ordering::Relaxed) {
            self.next_request.store(false, Ordering::Relaxed);
            if matches!(self.phase, Phase::Passing) {
                self.phase = Phase::Idle;
            }
        }
    }

    /// Polls a timer for `deadline`, creating or moving the one timer of the connection.
    fn poll_deadline(&mut self, cx: &mut Context<'_>, deadline: Instant) -> Poll<()> {
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if sleep.deadline() != deadline {
            sleep.as_mut().reset(deadline);
        }
        sleep.as_mut().poll(cx)
    }

    /// Hands everything buffered to `inner`.
    fn poll_write_buffered(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.wpos < self.wbuf.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.wbuf[self.wpos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.wpos += n;
        }
        self.wbuf.clear();
        self.wpos = 0;
        Poll::Ready(Ok(()))
    }

    /// Writes the 431, shuts the write side, then discards what the client still sends;
    /// finally fails the read so pingora closes the connection.
    fn poll_reject(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            match self.phase {
                Phase::Rejecting { written } if written < RESPONSE_431.len() => {
                    // Anything pingora wrote before goes out first.
                    ready!(self.poll_write_buffered(cx))?;
                    let n =
                        ready!(Pin::new(&mut self.inner).poll_write(cx, &RESPONSE_431[written..]))?;
                    if n == 0 {
                        return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                    }
                    self.phase = Phase::Rejecting {
                        written: written + n,
                    };
                }
                Phase::Rejecting { .. } => {
                    ready!(Pin::new(&mut self.inner).poll_flush(cx))?;
                    ready!(Pin::new(&mut self.inner).poll_shutdown(cx))?;
                    self.phase = Phase::Lingering {
                        until: Instant::now() + LINGER,
                        discarded: 0,
                    };
                }
                Phase::Lingering { until, discarded } => {
                    let mut scratch = [0u8; 8192];
                    let mut buf = ReadBuf::new(&mut scratch);
                    match Pin::new(&mut self.inner).poll_read(cx, &mut buf) {
                        Poll::Ready(Ok(())) if !buf.filled().is_empty() => {
                            let discarded = discarded + buf.filled().len();
                            if discarded >= LINGER_BYTES {
                                return Poll::Ready(Err(too_large()));
                            }
                            self.phase = Phase::Lingering { until, discarded };
                        }
                        // End of stream or a broken connection: nothing more to wait for.
                        Poll::Ready(_) => return Poll::Ready(Err(too_large())),
                        Poll::Pending => {
                            ready!(self.poll_deadline(cx, until));
                            return Poll::Ready(Err(too_large()));
                        }
                    }
                }
                _ => return Poll::Ready(Err(too_large())),
            }
        }
    }
}

fn too_large() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "request header too large")
}

/// Where a scan for the end of a header stands between reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scan {
    /// Nothing but empty lines so far. httparse skips empty lines before a request line, so
    /// they neither start nor end a header; counting them as its end would pass the rest of
    /// the header through unguarded.
    Start,
    /// Inside a line.
    Line,
    /// The last byte other than `\r` ended a line.
    Newline,
}

/// Scans newly read header bytes for the end of the header (an empty line after the request
/// line, `\r` ignored as httparse does). Returns how many of the bytes belong to the header
/// if it ended in them.
fn scan(bytes: &[u8], state: &mut Scan) -> Option<usize> {
    for (i, b) in bytes.iter().enumerate() {
        match (b, *state) {
            (b'\r' | b'\n', Scan::Start) | (b'\r', _) => {}
            (b'\n', Scan::Newline) => return Some(i + 1),
            (b'\n', Scan::Line) => *state = Scan::Newline,
            _ => *state = Scan::Line,
        }
    }
    None
}

/// A client transport lain's HTTP/1.1 path serves: the bare socket of a plain connection,
/// or pingora's stream of a TLS one.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send + Sized {
    /// Borrowed read and write halves, used at the same time by one task.
    fn halves(&mut self) -> (ReadPart<'_, Self>, WritePart<'_, Self>);
}

impl Transport for tokio::net::TcpStream {
    /// A socket reads and writes independently, so its halves need no lock.
    fn halves(&mut self) -> (ReadPart<'_, Self>, WritePart<'_, Self>) {
        let (r, w) = self.split();
        (ReadPart::Socket(r), WritePart::Socket(w))
    }
}

// Written for every lifetime of the trait object, not only `Stream`'s 'static: the check
// that a connection's future is `Send` asks for the impl at every lifetime.
impl<'s> Transport for Box<dyn IO + 's> {
    /// A TLS session is one state machine for both directions, so its halves share it
    /// through tokio's split, whose lock only this connection's one task ever takes.
    fn halves(&mut self) -> (ReadPart<'_, Self>, WritePart<'_, Self>) {
        let (r, w) = tokio::io::split(self);
        (ReadPart::Shared(r), WritePart::Shared(w))
    }
}

/// The read half of a [`Transport`].
pub enum ReadPart<'a, S> {
    /// A socket's own read half.
    Socket(tokio::net::tcp::ReadHalf<'a>),
    /// The read half of a stream both directions share.
    Shared(tokio::io::ReadHalf<&'a mut S>),
}

/// The write half of a [`Transport`].
pub enum WritePart<'a, S> {
    /// A socket's own write half.
    Socket(tokio::net::tcp::WriteHalf<'a>),
    /// The write half of a stream both directions share.
    Shared(tokio::io::WriteHalf<&'a mut S>),
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for ReadPart<'_, S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ReadPart::Socket(r) => Pin::new(r).poll_read(cx, buf),
            ReadPart::Shared(r) => Pin::new(r).poll_read(cx, buf),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WritePart<'_, S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            WritePart::Socket(w) => Pin::new(w).poll_write(cx, buf),
            WritePart::Shared(w) => Pin::new(w).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WritePart::Socket(w) => Pin::new(w).poll_flush(cx),
            WritePart::Shared(w) => Pin::new(w).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WritePart::Socket(w) => Pin::new(w).poll_shutdown(cx),
            WritePart::Shared(w) => Pin::new(w).poll_shutdown(cx),
        }
    }
}

impl<S: Transport> GuardedStream<S> {
    /// Read and write halves of the transport, for sending a request's body upstream while
    /// its response comes back. Reads and writes bypass the guard, which is right only
    /// while a body passes: lain's HTTP/1 path calls this after reading a complete header,
    /// it flushes every write, so nothing is left buffered, and bytes are handed back only
    /// when pingora takes the connection over.
    pub fn split_passing(&mut self) -> (ReadPart<'_, S>, WritePart<'_, S>) {
        debug_assert!(self.wbuf.is_empty() && self.rpos >= self.rbuf.len());
        self.inner.halves()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for GuardedStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.read_unread(buf) {
            return Poll::Ready(Ok(()));
        }
        this.take_next_request();
        match this.phase {
            Phase::Passing => return Pin::new(&mut this.inner).poll_read(cx, buf),
            Phase::Rejecting { .. } | Phase::Lingering { .. } => return this.poll_reject(cx),
            Phase::Idle | Phase::Header { .. } => {}
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let new = &buf.filled()[before..];
                if new.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                // The clock is read only for a header that does not arrive in one read.
                let (deadline, seen, mut state) = match this.phase {
                    Phase::Header {
                        deadline,
                        seen,
                        scan,
                    } => (Some(deadline), seen, scan),
                    _ => (None, 0, Scan::Start),
                };
                match scan(new, &mut state) {
                    Some(n) if seen + n <= this.limits.max_bytes => {
                        this.phase = Phase::Passing;
                        Poll::Ready(Ok(()))
                    }
                    None if seen + new.len() <= this.limits.max_bytes => {
                        this.phase = Phase::Header {
                            deadline: deadline
                                .unwrap_or_else(|| Instant::now() + this.limits.timeout),
                            seen: seen + new.len(),
                            scan: state,
                        };
                        Poll::Ready(Ok(()))
                    }
                    _ => {
                        // The bytes already in `buf` are never parsed: the read fails.
                        buf.set_filled(before);
                        this.phase = Phase::Rejecting { written: 0 };
                        this.poll_reject(cx)
                    }
                }
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if let Phase::Header { deadline, .. } = this.phase {
                    ready!(this.poll_deadline(cx, deadline));
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "request header not received in time",
                    )));
                }
                Poll::Pending
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for GuardedStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.wbuf.len() + buf.len() > WRITE_BUFFER {
            ready!(this.poll_write_buffered(cx))?;
        }
        if buf.len() >= WRITE_BUFFER {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        if this.wbuf.capacity() == 0 {
            this.wbuf.reserve_exact(WRITE_BUFFER);
        }
        this.wbuf.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_write_buffered(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_write_buffered(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if this.wbuf.len() + total > WRITE_BUFFER {
            ready!(this.poll_write_buffered(cx))?;
        }
        if total >= WRITE_BUFFER {
            return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        }
        if this.wbuf.capacity() == 0 {
            this.wbuf.reserve_exact(WRITE_BUFFER);
        }
        for b in bufs {
            this.wbuf.extend_from_slice(b);
        }
        Poll::Ready(Ok(total))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }
}

#[async_trait]
impl Shutdown for GuardedStream {
    async fn shutdown(&mut self) {
        // What is still buffered belongs before the close, if the client takes it soon.
        let flushed = tokio::time::timeout(
            CLOSE_FLUSH,
            std::future::poll_fn(|cx| self.poll_write_buffered(cx)),
        )
        .await;
        if flushed.is_ok() {
            let _ = tokio::time::timeout(CLOSE_FLUSH, self.inner.shutdown()).await;
        }
    }
}

impl UniqueID for GuardedStream {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for GuardedStream {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for GuardedStream {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for GuardedStream {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for GuardedStream {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for GuardedStream {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        // pingora peeks for the HTTP/2 preface (h2c) before reading a request, with no
        // timeout of its own: bound the wait by the header deadline of a first request, or
        // by the keep-alive timeout between requests.
        if self.rpos < self.rbuf.len() {
            // Bytes handed back come first; the peek needs as many as it asks for, so the
            // rest is read (under the header deadline) and kept behind them.
            let deadline = Instant::now() + self.limits.timeout;
            while self.rbuf.len() - self.rpos < buf.len() {
                let mut more = [0u8; 64];
                let n = match tokio::time::timeout_at(deadline, {
                    use tokio::io::AsyncReadExt;
                    self.inner.read(&mut more)
                })
                .await
                {
                    Ok(r) => r?,
                    Err(_) => {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "request header not received in time",
                        ));
                    }
                };
                if n == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                self.rbuf.extend_from_slice(&more[..n]);
            }
            let n = buf.len();
            buf.copy_from_slice(&self.rbuf[self.rpos..self.rpos + n]);
            return Ok(true);
        }
        self.take_next_request();
        let deadline = match self.phase {
            Phase::Header { deadline, .. } => deadline,
            _ => Instant::now() + IDLE_PEEK,
        };
        match tokio::time::timeout_at(deadline, self.inner.try_peek(buf)).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "request header not received in time",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_finds_the_blank_line_across_reads() {
        let mut st = Scan::Start;
        assert_eq!(scan(b"GET / HTTP/1.1\r\nHost: a\r\n", &mut st), None);
        assert_eq!(st, Scan::Newline);
        assert_eq!(scan(b"\r\nbody", &mut st), Some(2));
        let mut st = Scan::Start;
        assert_eq!(scan(b"GET / HTTP/1.1\nHost: a\n\nrest", &mut st), Some(24));
        let mut st = Scan::Start;
        assert_eq!(scan(b"\r\nGET / HTTP/1.1\r\nX: y\r", &mut st), None);
        assert_eq!(st, Scan::Line);
        assert_eq!(scan(b"\n", &mut st), None);
        assert_eq!(scan(b"\r\n", &mut st), Some(2));
        // Empty lines before the request line (which httparse skips) do not end a header,
        // however many there are and however they are split.
        let mut st = Scan::Start;
        assert_eq!(scan(b"\r\n\r\n\n\n\r\n", &mut st), None);
        assert_eq!(scan(b"\r\n", &mut st), None);
        assert_eq!(st, Scan::Start);
        assert_eq!(scan(b"GET / HTTP/1.1\r\n\r\n", &mut st), Some(18));
    }

    /// A connected pair: the guarded server side and the raw client side.
    async fn pair() -> (GuardedStream, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let limits = HeaderLimits {
            timeout: Duration::from_secs(5),
            max_bytes: 1024,
        };
        let inner: Stream = Box::new(pingora_core::protocols::l4::stream::Stream::from(server));
        (GuardedStream::new(inner, limits).0, client)
    }

    /// Reads what has arrived within 100 ms.
    async fn arrived(client: &mut tokio::net::TcpStream) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        let mut got = Vec::new();
        let mut buf = [0u8; 8192];
        while let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(100), client.read(&mut buf)).await
        {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        got
    }

    #[tokio::test]
    async fn small_writes_wait_for_the_flush_and_leave_together() {
        use tokio::io::AsyncWriteExt;
        let (mut guard, mut client) = pair().await;
        guard
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n")
            .await
            .unwrap();
        guard.write_all(b"hello").await.unwrap();
        assert!(
            arrived(&mut client).await.is_empty(),
            "sent before the flush"
        );
        guard.flush().await.unwrap();
        assert_eq!(
            arrived(&mut client).await,
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"
        );
    }

    #[tokio::test]
    async fn large_writes_pass_through_in_order_after_what_was_buffered() {
        use tokio::io::AsyncWriteExt;
        let (mut guard, mut client) = pair().await;
        let big = vec![b'x'; 3 * WRITE_BUFFER];
        guard.write_all(b"head;").await.unwrap();
        guard.write_all(&big).await.unwrap();
        // The large write went out without a flush, after the buffered bytes.
        let got = arrived(&mut client).await;
        assert_eq!(got.len(), 5 + big.len());
        assert!(got.starts_with(b"head;x"));
        guard.write_all(b"tail").await.unwrap();
        Shutdown::shutdown(&mut guard).await;
        assert_eq!(
            arrived(&mut client).await,
            b"tail",
            "shutdown sends what is buffered"
        );
    }
}
