//! Serving one UDP socket: a receive loop that answers repeated questions from a cache of
//! encoded answers, and hands everything else to the request handler in a task of its own.
//!
//! Most queries a cluster DNS server sees are the same few questions asked again and again
//! (every client resolving the same service names). NSD and Knot answer those from answers
//! compiled ahead of time; lain does the same lazily. The first time a question is asked,
//! hickory decodes it and [`DnsHandler::respond`] answers it; when the handler reports the
//! answer as a pure function of the request (see [`Responded::repeatable`]), its encoded
//! bytes are kept, keyed by the request's bytes after its ID. The next identical request is
//! answered by copying those bytes and the new ID: no decoding, no task, no encoding.
//!
//! The cache belongs to one socket's thread (no lock, no sharing), answers only for the
//! zone it was filled from (it empties itself when another zone is swapped in), is bounded
//! in entries, and keeps one answer per rotation for names whose address sets rotate, so
//! rotation continues exactly as without it.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{self, IoSlice, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use hickory_proto::op::{Header, MessageType, ResponseCode};
use hickory_proto::rr::{Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder, BinEncodable, BinEncoder};
use hickory_server::net::NetError;
use hickory_server::net::xfer::Protocol;
use hickory_server::server::{Request, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::{MessageResponse, MessageResponseBuilder, Queries};
use lain_common::Shutdown;
use nix::sys::socket::{MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg, sendmmsg};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::task::JoinSet;

use crate::handler::{DnsHandler, Responded};
use crate::metrics::{DnsMetrics, Source};
use crate::zone::Zone;

/// The largest datagram read. Larger ones arrive cut and fail to decode (FORMERR), as with
/// hickory's own UDP server.
const RECEIVE_BUFFER_BYTES: usize = 4096;

/// Requests longer than this are answered but not cached: a question with EDNS and a
/// cookie is far smaller, and bigger keys would only let one client fill the cache faster.
const MAX_CACHED_REQUEST_BYTES: usize = 512;

/// Names whose answers repeat only after more rotations than this are not cached.
const MAX_CACHED_ROTATIONS: usize = 64;

/// How many datagrams the loop handles before it yields to the tasks answering the others
/// (forwarded and first-time questions), so a steady stream cannot starve them.
const DATAGRAMS_PER_YIELD: u32 = 64;

/// The octets of a DNS header before its flags: the ID.
const ID_BYTES: usize = 2;

/// One cached question: an encoded answer per rotation, and what counting it needs.
#[derive(Debug)]
struct Entry {
    /// Answers by rotation modulo their number; `None` until that rotation is asked.
    answers: Box<[Option<Box<[u8]>>]>,
    qtype: Option<RecordType>,
    rcode: ResponseCode,
    truncated: bool,
}

/// What a cache hit sends and counts.
#[derive(Debug, Clone, Copy)]
pub struct Hit<'c> {
    /// The encoded answer, with the ID of the request it was first made for.
    pub answer: &'c [u8],
    /// The question's type, for the query counter.
    pub qtype: Option<RecordType>,
    /// The answer's response code.
    pub rcode: ResponseCode,
    /// Whether the answer was truncated (TC set).
    pub truncated: bool,
}

/// Encoded answers of one socket's thread, for one zone.
///
/// Keys are built from client bytes, so the map keeps std's keyed SipHash rather than the
/// zone's faster unkeyed hash: a client must not be able to pick colliding questions.
#[derive(Debug)]
pub struct AnswerCache {
    zone: Option<Arc<Zone>>,
    entries: HashMap<Box<[u8]>, Entry>,
    capacity: usize,
}

impl AnswerCache {
    /// A cache of at most `capacity` questions; 0 caches nothing.
    pub fn new(capacity: usize) -> AnswerCache {
        AnswerCache {
            zone: None,
            entries: HashMap::new(),
            capacity,
        }
    }

    /// Whether the cache keeps anything at all.
    pub fn enabled(&self) -> bool {
        self.capacity > 0
    }

    /// The number of cached questions.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no question is cached.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Makes `zone` the one answers are kept for, dropping every answer from another.
    pub fn follow(&mut self, zone: &Arc<Zone>) {
        if !self.zone.as_ref().is_some_and(|z| Arc::ptr_eq(z, zone)) {
            self.entries.clear();
            self.zone = Some(zone.clone());
        }
    }

    /// Writes into `key` the cache key of `request` (a whole datagram) from a client with the
    /// given recursion availability and viewer. False when the request is not cacheable.
    pub fn key(key: &mut Vec<u8>, request: &[u8], recursion: bool, viewer: usize) -> bool {
        if request.len() < 12 || request.len() > MAX_CACHED_REQUEST_BYTES {
            return false;
        }
        key.clear();
        key.push(u8::from(recursion));
        key.extend_from_slice(&viewer.to_ne_bytes());
        key.extend_from_slice(&request[ID_BYTES..]);
        true
    }

    /// The answer cached for `key` at `rotation`, if any.
    pub fn get(&self, key: &[u8], rotation: usize) -> Option<Hit<'_>> {
        let e = self.entries.get(key)?;
        let answer = e.answers[rotation % e.answers.len()].as_deref()?;
        Some(Hit {
            answer,
            qtype: e.qtype,
            rcode: e.rcode,
            truncated: e.truncated,
        })
    }

    /// Keeps `made`, an answer from `zone`. Ignored when `zone` is no longer the one
    /// followed; a full cache is emptied first, which keeps it bounded without bookkeeping
    /// on every hit.
    pub fn insert(&mut self, zone: &Arc<Zone>, key: Box<[u8]>, made: Made) -> bool {
        let Made {
            rotation,
            period,
            answer,
            qtype,
            rcode,
            truncated,
        } = made;
        if !self.enabled()
            || period == 0
            || period > MAX_CACHED_ROTATIONS
            || answer.len() < 12
            || !self.zone.as_ref().is_some_and(|z| Arc::ptr_eq(z, zone))
        {
            return false;
        }
        if self.entries.len() >= self.capacity && !self.entries.contains_key(&key) {
            self.entries.clear();
        }
        let fresh = || Entry {
            answers: vec![None; period].into_boxed_slice(),
            qtype,
            rcode,
            truncated,
        };
        let entry = self.entries.entry(key).or_insert_with(fresh);
        if entry.answers.len() != period {
            // The same zone gives the same period for the same question; a mismatch means
            // the entry is not what this code believes, so it is replaced rather than mixed.
            *entry = fresh();
        }
        entry.answers[rotation % period] = Some(answer);
        true
    }
}

/// An answer the handler made, as the cache keeps it.
#[derive(Debug)]
pub struct Made {
    /// The rotation it was made at.
    pub rotation: usize,
    /// After how many rotations answers repeat ([`Responded::repeatable`]).
    pub period: usize,
    /// The encoded answer.
    pub answer: Box<[u8]>,
    /// The question's type.
    pub qtype: Option<RecordType>,
    /// The answer's response code.
    pub rcode: ResponseCode,
    /// Whether the answer was truncated.
    pub truncated: bool,
}

/// Whether an answer may be sent to `src` (hickory's server applies the same rule): never to
/// port 0, an unspecified or a broadcast address.
fn answerable(src: SocketAddr) -> bool {
    if src.port() == 0 {
        return false;
    }
    match src.ip() {
        IpAddr::V4(v4) => !v4.is_unspecified() && !v4.is_broadcast(),
        IpAddr::V6(v6) => !v6.is_unspecified(),
    }
}

/// Sends the answers of the handler for one datagram, keeping their bytes for the cache.
#[derive(Clone)]
struct UdpResponder {
    socket: Arc<UdpSocket>,
    dst: SocketAddr,
    sent: Arc<OnceLock<Vec<u8>>>,
}

#[async_trait::async_trait]
impl ResponseHandler for UdpResponder {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        // Encoded as hickory's own response handle does: limited to the EDNS size (512
        // octets without EDNS), and a bare SERVFAIL header if it cannot be encoded.
        let id = response.metadata().id;
        let limit = response.edns().map_or(512, |e| e.max_payload());
        let mut bytes = Vec::with_capacity(512);
        let mut encoder = BinEncoder::new(&mut bytes);
        encoder.set_max_size(limit);
        let info = match response.destructive_emit(&mut encoder) {
            Ok(info) => info,
            Err(error) => {
                tracing::error!(%error, "cannot encode an answer; sending SERVFAIL");
                bytes.clear();
                let mut encoder = BinEncoder::new(&mut bytes);
                let mut metadata = hickory_proto::op::Metadata::new(
                    id,
                    MessageType::Response,
                    hickory_proto::op::OpCode::Query,
                );
                metadata.response_code = ResponseCode::ServFail;
                let header = Header {
                    metadata,
                    counts: Default::default(),
                };
                header.emit(&mut encoder)?;
                ResponseInfo::from(header)
            }
        };
        self.socket.send_to(&bytes, self.dst).await?;
        let _ = self.sent.set(bytes);
        Ok(info)
    }
}

/// What a first-time question needs to be answered and cached.
struct Miss {
    packet: Vec<u8>,
    src: SocketAddr,
    zone: Arc<Zone>,
    rotation: usize,
    key: Option<Box<[u8]>>,
}

/// Answers one datagram the cache did not: decodes it (FORMERR when it does not decode),
/// drops responses, answers through the handler, and caches a repeatable answer.
async fn answer_miss(
    handler: Rc<DnsHandler>,
    cache: Rc<RefCell<AnswerCache>>,
    socket: Arc<UdpSocket>,
    metrics: DnsMetrics,
    miss: Miss,
) {
    let started = Instant::now();
    let Miss {
        packet,
        src,
        zone,
        rotation,
        key,
    } = miss;
    let Ok(header) = Header::read(&mut BinDecoder::new(&packet)) else {
        // Shorter than a header: not a DNS message, and nothing to address an answer to.
        return;
    };
    if header.metadata.message_type == MessageType::Response {
        // Answering responses would make the server a reflector.
        return;
    }
    let request = match Request::from_bytes(packet, src, Protocol::Udp) {
        Ok(r) => r,
        Err(error) => {
            tracing::debug!(%src, %error, "undecodable request; answering FORMERR");
            let Ok(queries) = Queries::read(&mut BinDecoder::new(&[]), 0) else {
                return;
            };
            let response = MessageResponseBuilder::new(&queries, None)
                .error_msg(&header.metadata, ResponseCode::FormErr);
            let mut responder = UdpResponder {
                socket,
                dst: src,
                sent: Arc::default(),
            };
            if let Err(e) = responder.send_response(response).await {
                tracing::debug!(%src, error = %e, "could not send FORMERR");
            }
            metrics.query(
                None,
                ResponseCode::FormErr,
                Source::Error,
                started.elapsed().as_secs_f64(),
            );
            return;
        }
    };
    let qtype = match request.queries.queries() {
        [q] => Some(q.query_type()),
        _ => None,
    };
    let sent = Arc::new(OnceLock::new());
    let responder = UdpResponder {
        socket,
        dst: src,
        sent: sent.clone(),
    };
    let Responded { info, repeatable } =
        handler.respond(&zone, &request, rotation, responder).await;
    if let (Some(key), Some(period)) = (key, repeatable)
        && let Some(bytes) = Arc::into_inner(sent).and_then(OnceLock::into_inner)
    {
        cache.borrow_mut().insert(
            &zone,
            key,
            Made {
                rotation,
                period,
                answer: bytes.into_boxed_slice(),
                qtype,
                rcode: info.response_code,
                truncated: info.truncation,
            },
        );
    }
}

/// How a datagram fared in the cache.
enum Cached {
    /// The answer is in `out`, with the request's ID.
    Hit(HitInfo),
    /// Not cached; `cacheable` when its key is in `key` and its answer may be kept.
    Miss { cacheable: bool },
}

/// What counting a hit needs, once the cache is no longer borrowed.
struct HitInfo {
    qtype: Option<RecordType>,
    rcode: ResponseCode,
    truncated: bool,
}

/// Looks `packet` up in the cache (following `zone` first), building its key in `key` and,
/// on a hit, the answer to send in `out`.
#[allow(clippy::too_many_arguments)]
fn cached(
    cache: &RefCell<AnswerCache>,
    handler: &DnsHandler,
    zone: &Arc<Zone>,
    packet: &[u8],
    src: SocketAddr,
    rotation: usize,
    key: &mut Vec<u8>,
    out: &mut Vec<u8>,
) -> Cached {
    let mut cache = cache.borrow_mut();
    cache.follow(zone);
    let cacheable = cache.enabled()
        && AnswerCache::key(
            key,
            packet,
            handler.recursion_available(src.ip()),
            handler.viewer_key(zone, src.ip()),
        );
    if !cacheable {
        return Cached::Miss { cacheable };
    }
    match cache.get(key, rotation) {
        Some(hit) => {
            out.clear();
            out.extend_from_slice(hit.answer);
            out[..ID_BYTES].copy_from_slice(&packet[..ID_BYTES]);
            Cached::Hit(HitInfo {
                qtype: hit.qtype,
                rcode: hit.rcode,
                truncated: hit.truncated,
            })
        }
        None => Cached::Miss { cacheable },
    }
}

/// Whether a receive error means the socket is gone rather than one datagram lost.
fn unrecoverable(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotConnected | io::ErrorKind::ConnectionAborted
    )
}

/// Datagrams read by one receive call.
const RECEIVE_BATCH: usize = 32;

/// Buffers for reading up to [`RECEIVE_BATCH`] datagrams with one `recvmmsg` call: under
/// load a socket holds many queries, and one system call per batch instead of one per
/// datagram is what NSD and Knot do too.
struct Receiver {
    headers: MultiHeaders<SockaddrStorage>,
    buffers: Vec<Vec<u8>>,
    /// Per datagram read: its buffer, its length and its sender.
    received: Vec<(usize, usize, SocketAddr)>,
}

impl Receiver {
    fn new() -> Receiver {
        Receiver {
            headers: MultiHeaders::preallocate(RECEIVE_BATCH, None),
            buffers: vec![vec![0u8; RECEIVE_BUFFER_BYTES]; RECEIVE_BATCH],
            received: Vec::with_capacity(RECEIVE_BATCH),
        }
    }

    /// Reads the datagrams waiting on `socket`, without waiting for any: `WouldBlock` when
    /// there are none (and tokio then waits for readiness again).
    fn receive(&mut self, socket: &UdpSocket) -> io::Result<usize> {
        let fd = socket.as_raw_fd();
        let Receiver {
            headers,
            buffers,
            received,
        } = self;
        received.clear();
        socket.try_io(Interest::READABLE, || {
            let mut slices: Vec<[IoSliceMut<'_>; 1]> =
                buffers.iter_mut().map(|b| [IoSliceMut::new(b)]).collect();
            let results = recvmmsg(fd, headers, slices.iter_mut(), MsgFlags::MSG_DONTWAIT, None)
                .map_err(io::Error::from)?;
            for (i, r) in results.enumerate() {
                // A datagram without an IPv4 or IPv6 sender cannot be answered.
                if let Some(src) = r.address.as_ref().and_then(socket_addr) {
                    received.push((i, r.bytes.min(RECEIVE_BUFFER_BYTES), src));
                }
            }
            Ok(())
        })?;
        Ok(received.len())
    }
}

fn socket_addr(a: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddr::V4((*v4).into()));
    }
    a.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into()))
}

/// Answers from the cache waiting to be sent, all at once with one `sendmmsg` call after the
/// batch they answer: one system call per batch, and a client reading many answers is
/// woken once for them rather than once per answer.
struct Sender {
    headers: MultiHeaders<SockaddrStorage>,
    answers: Vec<Vec<u8>>,
    destinations: Vec<Option<SockaddrStorage>>,
    /// What counting each waiting answer needs, and when its query was read.
    counted: Vec<(HitInfo, Instant)>,
    pending: usize,
}

impl Sender {
    fn new() -> Sender {
        Sender {
            headers: MultiHeaders::preallocate(RECEIVE_BATCH, None),
            answers: (0..RECEIVE_BATCH)
                .map(|_| Vec::with_capacity(512))
                .collect(),
            destinations: vec![None; RECEIVE_BATCH],
            counted: Vec::with_capacity(RECEIVE_BATCH),
            pending: 0,
        }
    }

    /// The buffer the next answer is written into.
    fn next(&mut self) -> &mut Vec<u8> {
        &mut self.answers[self.pending]
    }

    /// Queues the answer written into [`Sender::next`] for `dst`.
    fn queue(&mut self, dst: SocketAddr, hit: HitInfo, started: Instant) {
        self.destinations[self.pending] = Some(SockaddrStorage::from(dst));
        self.counted.push((hit, started));
        self.pending += 1;
    }

    /// Sends the queued answers from the `from`th on, without waiting: how many were sent.
    fn send_from(&mut self, fd: std::os::fd::RawFd, from: usize) -> io::Result<usize> {
        let Sender {
            headers,
            answers,
            destinations,
            pending,
            ..
        } = self;
        let slices: Vec<[IoSlice<'_>; 1]> = answers[from..*pending]
            .iter()
            .map(|a| [IoSlice::new(a)])
            .collect();
        let sent = sendmmsg(
            fd,
            headers,
            &slices,
            &destinations[from..*pending],
            [],
            MsgFlags::MSG_DONTWAIT,
        )
        .map_err(io::Error::from)?;
        Ok(sent.count())
    }

    /// Sends every queued answer, waiting for room in the socket's buffer when it is full;
    /// an answer the kernel refuses (its destination unreachable) is dropped alone.
    async fn flush(&mut self, socket: &UdpSocket, metrics: &DnsMetrics) {
        let fd = socket.as_raw_fd();
        let mut from = 0;
        while from < self.pending {
            match socket.try_io(Interest::WRITABLE, || self.send_from(fd, from)) {
                Ok(n) => {
                    for (hit, started) in &self.counted[from..from + n] {
                        if hit.truncated {
                            metrics.truncated.inc();
                        }
                        metrics.answer_cache_hits.inc();
                        metrics.query(
                            hit.qtype,
                            hit.rcode,
                            Source::Zone,
                            started.elapsed().as_secs_f64(),
                        );
                    }
                    from += n.max(1);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if let Err(e) = socket.writable().await {
                        tracing::debug!(error = %e, "UDP socket not writable; answers dropped");
                        break;
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "could not send a response");
                    from += 1;
                }
            }
        }
        self.pending = 0;
        self.counted.clear();
    }
}

/// Serves `socket` until `shutdown`, then waits at most `drain` for answers in progress.
/// Must run inside a [`tokio::task::LocalSet`]: first-time questions are answered by local
/// tasks that share the socket thread's cache.
pub async fn serve(
    socket: UdpSocket,
    handler: DnsHandler,
    metrics: DnsMetrics,
    cache_entries: usize,
    shutdown: Shutdown,
    drain: Duration,
) {
    let socket = Arc::new(socket);
    let handler = Rc::new(handler);
    let cache = Rc::new(RefCell::new(AnswerCache::new(cache_entries)));
    let mut misses = JoinSet::new();
    let mut receiver = Receiver::new();
    let mut key = Vec::with_capacity(MAX_CACHED_REQUEST_BYTES + 16);
    let mut sender = Sender::new();
    let mut rotation: usize = 0;
    let mut since_yield: u32 = 0;
    let stop = shutdown.wait();
    tokio::pin!(stop);
    loop {
        match receiver.receive(&socket) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                since_yield = 0;
                tokio::select! {
                    biased;
                    _ = &mut stop => break,
                    ready = socket.readable() => {
                        if let Err(e) = ready {
                            tracing::error!(error = %e, "UDP socket failed; shutting down");
                            shutdown.trigger();
                            break;
                        }
                        while misses.try_join_next().is_some() {}
                        continue;
                    }
                }
            }
            Err(e) if unrecoverable(&e) => {
                tracing::error!(error = %e, "UDP socket failed; shutting down");
                shutdown.trigger();
                break;
            }
            Err(e) => {
                // ICMP errors from earlier answers surface here (e.g. connection refused
                // on some systems); they concern one client, not the socket.
                tracing::debug!(error = %e, "UDP receive error");
                continue;
            }
        }
        since_yield += receiver.received.len() as u32;
        if since_yield >= DATAGRAMS_PER_YIELD {
            since_yield = 0;
            if shutdown.is_triggered() {
                break;
            }
            while misses.try_join_next().is_some() {}
            tokio::task::yield_now().await;
        }
        for &(i, len, src) in &receiver.received {
            let packet = &receiver.buffers[i][..len];
            // Responses (QR set) are never answered; shorter-than-header datagrams neither.
            if len < 12 || packet[2] & 0x80 != 0 || !answerable(src) {
                continue;
            }
            let started = Instant::now();
            rotation = rotation.wrapping_add(1);
            let zone = handler.zone().load();
            let cacheable = match cached(
                &cache,
                &handler,
                &zone,
                packet,
                src,
                rotation,
                &mut key,
                sender.next(),
            ) {
                Cached::Hit(hit) => {
                    sender.queue(src, hit, started);
                    continue;
                }
                Cached::Miss { cacheable } => cacheable,
            };
            if cacheable {
                metrics.answer_cache_misses.inc();
            }
            let miss = Miss {
                packet: packet.to_vec(),
                src,
                zone: arc_swap::Guard::into_inner(zone),
                rotation,
                key: cacheable.then(|| key.as_slice().into()),
            };
            misses.spawn_local(answer_miss(
                handler.clone(),
                cache.clone(),
                socket.clone(),
                metrics.clone(),
                miss,
            ));
        }
        sender.flush(&socket, &metrics).await;
    }
    if lain_common::shutdown::with_grace(drain, async {
        while misses.join_next().await.is_some() {}
    })
    .await
    .is_none()
    {
        tracing::warn!(?drain, "in-flight UDP queries did not finish in time");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn made(rotation: usize, period: usize, byte: u8, rcode: ResponseCode) -> Made {
        Made {
            rotation,
            period,
            answer: vec![byte; 20].into_boxed_slice(),
            qtype: Some(RecordType::A),
            rcode,
            truncated: false,
        }
    }

    fn request(id: u16) -> Vec<u8> {
        let mut p = id.to_be_bytes().to_vec();
        p.extend_from_slice(
            b"\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03web\x04lain\x00\x00\x01\x00\x01",
        );
        p
    }

    #[test]
    fn keys_ignore_the_id_but_not_the_client_class_or_the_question() {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        assert!(AnswerCache::key(&mut a, &request(1), false, 0));
        assert!(AnswerCache::key(&mut b, &request(2), false, 0));
        assert_eq!(a, b);
        assert!(AnswerCache::key(&mut b, &request(1), true, 0));
        assert_ne!(a, b);
        assert!(AnswerCache::key(&mut b, &request(1), false, 7));
        assert_ne!(a, b);
        let mut other = request(1);
        *other.last_mut().unwrap() = 3;
        assert!(AnswerCache::key(&mut b, &other, false, 0));
        assert_ne!(a, b);
        // Too short to be a header, and too long to be worth caching.
        assert!(!AnswerCache::key(&mut b, &[0; 11], false, 0));
        assert!(!AnswerCache::key(
            &mut b,
            &[0; MAX_CACHED_REQUEST_BYTES + 1],
            false,
            0
        ));
    }

    #[test]
    fn answers_are_kept_per_rotation_and_per_zone() {
        let zone = Arc::new(Zone::default());
        let mut cache = AnswerCache::new(2);
        cache.follow(&zone);
        let mut key = Vec::new();
        assert!(AnswerCache::key(&mut key, &request(1), false, 0));
        let ok = ResponseCode::NoError;
        assert!(cache.insert(&zone, key.clone().into(), made(5, 3, 2, ok)));
        // Rotation 5 is slot 2 of 3; the other slots are still empty.
        assert_eq!(cache.get(&key, 8).unwrap().answer, &[2; 20][..]);
        assert!(cache.get(&key, 6).is_none());
        assert!(cache.insert(&zone, key.clone().into(), made(6, 3, 0, ok)));
        assert_eq!(cache.get(&key, 0).unwrap().answer, &[0; 20][..]);
        // Too many rotations, an empty period, or an answer from another zone: not kept.
        let too_many = made(0, MAX_CACHED_ROTATIONS + 1, 1, ok);
        assert!(!cache.insert(&zone, key.clone().into(), too_many));
        assert!(!cache.insert(&zone, key.clone().into(), made(0, 0, 1, ok)));
        let other = Arc::new(Zone::default());
        assert!(!cache.insert(&other, b"x".to_vec().into(), made(0, 1, 1, ok)));
        // A new zone empties the cache.
        cache.follow(&other);
        assert!(cache.get(&key, 0).is_none());
        assert!(cache.is_empty());
    }

    #[test]
    fn a_full_cache_starts_over_instead_of_growing() {
        let zone = Arc::new(Zone::default());
        let mut cache = AnswerCache::new(2);
        cache.follow(&zone);
        let nx = ResponseCode::NXDomain;
        for k in [b"a", b"b", b"c"] {
            assert!(cache.insert(&zone, k.to_vec().into(), made(0, 1, 0, nx)));
        }
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.get(b"c", 0).unwrap().rcode, nx);
        let mut off = AnswerCache::new(0);
        off.follow(&zone);
        assert!(!off.insert(&zone, b"a".to_vec().into(), made(0, 1, 0, nx)));
    }

    #[test]
    fn answers_go_only_to_addresses_that_can_receive_them() {
        assert!(answerable("127.0.0.1:5353".parse().unwrap()));
        assert!(answerable("[::1]:5353".parse().unwrap()));
        assert!(!answerable("127.0.0.1:0".parse().unwrap()));
        assert!(!answerable("0.0.0.0:53".parse().unwrap()));
        assert!(!answerable("255.255.255.255:53".parse().unwrap()));
        assert!(!answerable("[::]:53".parse().unwrap()));
    }
}
