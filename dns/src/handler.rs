//! The request handler for every decoded query (from hickory's TCP server and from the UDP
//! loop in [`crate::udp`] when its cache has no answer yet): it answers from the
//! current compiled zone (loaded lock-free from an `ArcSwap`), forwards names outside the
//! zones when the client may recurse, and turns everything else into the right error code.
//!
//! The server in front of it (hickory's for TCP, [`crate::udp`] for UDP) has already
//! answered FORMERR to packets that do not decode (names over 255 octets, labels over 63,
//! truncated sections) and dropped responses sent to us; what reaches this handler is a
//! well-formed request, though possibly an odd one (see [`requeried`]).

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use arc_swap::ArcSwap;
use hickory_proto::op::{Edns, Header, HeaderCounts, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::{DNSClass, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecoder, BinEncodable, BinEncoder, NameEncoding};
use hickory_server::net::runtime::Time;
use hickory_server::net::xfer::Protocol;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::{MessageResponseBuilder, Queries};
use ipnet::IpNet;

use crate::forward::Forwarder;
use crate::metrics::{DnsMetrics, Source};
use crate::zone::Zone;

/// What the handler decided, before it is encoded.
#[derive(Debug, Default)]
pub struct Reply<'z> {
    /// The response code.
    pub rcode: ResponseCode,
    /// Whether the answer comes from our own zone data.
    pub authoritative: bool,
    /// Whether the client may recurse through us.
    pub recursion_available: bool,
    /// Answer section.
    pub answers: Vec<Cow<'z, Record>>,
    /// Authority section.
    pub authorities: Vec<Cow<'z, Record>>,
    /// Additional section.
    pub additionals: Vec<Cow<'z, Record>>,
}

impl Reply<'_> {
    fn error(rcode: ResponseCode) -> Reply<'static> {
        Reply {
            rcode,
            ..Reply::default()
        }
    }
}

/// Options of the handler that do not change at run time.
#[derive(Debug, Clone)]
pub struct HandlerOptions {
    /// Per-client views of service names.
    pub views: bool,
    /// The largest UDP answer, whatever the client advertises.
    pub max_udp_payload: u16,
    /// Networks allowed to recurse.
    pub allowed_networks: Vec<IpNet>,
}

/// The `lain dns` request handler.
pub struct DnsHandler {
    zone: Arc<ArcSwap<Zone>>,
    forwarder: Option<Arc<Forwarder>>,
    options: HandlerOptions,
    metrics: DnsMetrics,
    rotation: AtomicUsize,
}

impl std::fmt::Debug for DnsHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsHandler")
            .field("options", &self.options)
            .field("forwarding", &self.forwarder.is_some())
            .finish()
    }
}

impl DnsHandler {
    /// A handler answering from `zone`, forwarding through `forwarder` when there is one.
    pub fn new(
        zone: Arc<ArcSwap<Zone>>,
        forwarder: Option<Arc<Forwarder>>,
        options: HandlerOptions,
        metrics: DnsMetrics,
    ) -> DnsHandler {
        DnsHandler {
            zone,
            forwarder,
            options,
            metrics,
            rotation: AtomicUsize::new(0),
        }
    }

    fn may_recurse(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.options
            .allowed_networks
            .iter()
            .any(|n| n.contains(&ip))
    }

    /// Whether answers to `ip` say recursion is available: forwarding is configured and the
    /// client is in an allowed network.
    pub fn recursion_available(&self, ip: IpAddr) -> bool {
        self.forwarder.is_some() && self.may_recurse(ip)
    }

    /// Who is asking, as far as the zone's answers can differ by client: a value naming the
    /// app whose instance has this address when per-client views are on, 0 otherwise. It
    /// stays the same for as long as `zone` is served.
    pub fn viewer_key(&self, zone: &Zone, ip: IpAddr) -> usize {
        if !self.options.views {
            return 0;
        }
        zone.owner_of(ip.to_canonical())
            .map_or(0, |app| app.as_ptr() as usize)
    }

    /// The zone being served.
    pub fn zone(&self) -> &ArcSwap<Zone> {
        &self.zone
    }

    /// Decides the reply to a request whose header and EDNS are acceptable, and the rotation
    /// period of a reply from the zone.
    async fn decide<'z>(
        &self,
        zone: &'z Zone,
        request: &Request,
        rotation: usize,
    ) -> (Reply<'z>, Source, usize) {
        if request.metadata.op_code != OpCode::Query {
            return (Reply::error(ResponseCode::NotImp), Source::Error, 1);
        }
        // RFC 9619: a query has exactly one question; none or several is a format error.
        let [query] = request.queries.queries() else {
            return (Reply::error(ResponseCode::FormErr), Source::Error, 1);
        };
        let qtype = query.query_type();
        if query.query_class() != DNSClass::IN
            || matches!(qtype, RecordType::AXFR | RecordType::IXFR)
        {
            return (Reply::error(ResponseCode::Refused), Source::Error, 1);
        }
        let src = request.src().ip();
        let may_recurse = self.recursion_available(src);
        let viewer = if self.options.views {
            zone.owner_of(src.to_canonical())
        } else {
            None
        };
        if let Some(a) = zone.lookup(query.name(), qtype, viewer, rotation) {
            let reply = Reply {
                rcode: a.rcode,
                authoritative: true,
                recursion_available: may_recurse,
                answers: a.answers,
                authorities: a.authorities,
                additionals: a.additionals,
            };
            return (reply, Source::Zone, a.rotation_period);
        }
        match &self.forwarder {
            Some(fwd) if may_recurse && request.metadata.recursion_desired => {
                let mut reply = fwd.forward(query.name().into(), qtype).await;
                reply.recursion_available = true;
                (reply, Source::Forward, 1)
            }
            _ => (Reply::error(ResponseCode::Refused), Source::Error, 1),
        }
    }
}

/// Whether a question section holds a compression pointer: walks each name's label lengths.
/// A section too short to walk counts as compressed, so it is re-encoded.
fn has_pointer(section: &[u8], questions: usize) -> bool {
    let mut i = 0;
    for _ in 0..questions {
        loop {
            let Some(&len) = section.get(i) else {
                return true;
            };
            if len & 0xC0 != 0 {
                return true;
            }
            i += 1 + usize::from(len);
            if len == 0 {
                break;
            }
        }
        // Type and class.
        i += 4;
    }
    false
}

/// The question section to echo when the client's own bytes cannot be echoed.
///
/// hickory echoes the question as the client sent it. A name compressed with a pointer
/// (legal in a question, though no resolver sends one) points at an offset of the request,
/// which in the response holds something else, so the answer would not decode. Such a
/// question is encoded afresh without compression; the common case costs one scan.
///
/// A request without exactly one question gets FORMERR with no question section at all
/// (RFC 9619 leaves it open), since echoing many questions can outgrow a UDP answer.
fn requeried(request: &Request) -> Option<Queries> {
    let original = request.queries.as_bytes();
    if request.queries.len() != 1 {
        return Queries::read(&mut BinDecoder::new(&[]), 0).ok();
    }
    if !has_pointer(original, 1) {
        return None;
    }
    let mut buf = Vec::with_capacity(original.len());
    let mut encoder = BinEncoder::new(&mut buf);
    encoder.set_name_encoding(NameEncoding::Uncompressed);
    for q in request.queries.queries() {
        q.emit(&mut encoder).ok()?;
    }
    Queries::read(&mut BinDecoder::new(&buf), request.queries.len()).ok()
}

/// An upper bound of a record's wire size, without name compression.
fn wire_bound(r: &Record) -> usize {
    let name = |n: &hickory_proto::rr::Name| n.len() + 2;
    let rdata = match &r.data {
        RData::A(_) => 4,
        RData::AAAA(_) => 16,
        RData::CNAME(n) => name(&n.0),
        RData::PTR(n) => name(&n.0),
        RData::NS(n) => name(&n.0),
        RData::SRV(s) => 6 + name(&s.target),
        RData::MX(m) => 2 + name(&m.exchange),
        RData::SOA(s) => name(&s.mname) + name(&s.rname) + 20,
        RData::TXT(t) => t.txt_data.iter().map(|d| d.len() + 1).sum(),
        // Anything else (forwarded answers): assume the worst, so the exact check runs.
        _ => usize::from(u16::MAX),
    };
    name(&r.name) + 10 + rdata
}

/// Whether the reply fits `limit` octets: by a cheap bound first, exactly when that fails.
fn fits(
    queries: &Queries,
    edns: Option<&Edns>,
    metadata: Metadata,
    reply: &Reply<'_>,
    limit: u16,
) -> bool {
    let limit_usize = usize::from(limit);
    let mut bound = 12 + queries.as_bytes().len() + if edns.is_some() { 11 } else { 0 };
    for r in reply
        .answers
        .iter()
        .chain(&reply.authorities)
        .chain(&reply.additionals)
    {
        bound = bound.saturating_add(wire_bound(r));
        if bound > limit_usize {
            break;
        }
    }
    if bound <= limit_usize {
        return true;
    }
    let mut buf = Vec::with_capacity(limit_usize);
    let mut encoder = BinEncoder::new(&mut buf);
    encoder.set_max_size(limit);
    let builder = MessageResponseBuilder::new(queries, edns);
    let response = builder.build(
        metadata,
        reply.answers.iter().map(|r| r.as_ref()),
        reply.authorities.iter().map(|r| r.as_ref()),
        std::iter::empty(),
        reply.additionals.iter().map(|r| r.as_ref()),
    );
    match response.destructive_emit(&mut encoder) {
        Ok(info) => !info.truncation,
        Err(_) => false,
    }
}

/// What [`DnsHandler::respond`] did.
#[derive(Debug)]
pub struct Responded {
    /// The header of the answer sent.
    pub info: ResponseInfo,
    /// Whether the answer sent was a pure function of the request's bytes after its ID, the
    /// client's [`DnsHandler::recursion_available`] and [`DnsHandler::viewer_key`], the zone
    /// and the rotation: `Some(period)` when it was (answers repeat every `period`
    /// rotations), `None` for forwarded answers, errors and answers that were not sent.
    pub repeatable: Option<usize>,
}

#[async_trait::async_trait]
impl RequestHandler for DnsHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        response_handle: R,
    ) -> ResponseInfo {
        let zone = self.zone.load_full();
        let rotation = self.rotation.fetch_add(1, Ordering::Relaxed);
        self.respond(&zone, request, rotation, response_handle)
            .await
            .info
    }
}

impl DnsHandler {
    /// Answers `request` from `zone` through `response_handle`, starting rotated address
    /// sets at `rotation`, and counts it.
    pub async fn respond<R: ResponseHandler>(
        &self,
        zone: &Zone,
        request: &Request,
        rotation: usize,
        mut response_handle: R,
    ) -> Responded {
        let started = Instant::now();
        let mut resp_edns = None;
        let mut bad_version = false;
        if let Some(req) = &request.edns {
            let mut e = Edns::new();
            e.set_max_payload(req.max_payload().clamp(512, self.options.max_udp_payload));
            e.set_version(0);
            bad_version = req.version() > 0;
            resp_edns = Some(e);
        }
        let (reply, source, period) = if bad_version {
            (Reply::error(ResponseCode::BADVERS), Source::Error, 1)
        } else {
            self.decide(zone, request, rotation).await
        };
        let qtype = request.queries.queries().first().map(|q| q.query_type());

        let mut reply = reply;
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.response_code = reply.rcode;
        metadata.authoritative = reply.authoritative;
        metadata.recursion_available = reply.recursion_available;
        let requeried = requeried(request);
        let queries = requeried.as_ref().unwrap_or(&request.queries);
        if request.protocol() == Protocol::Udp {
            let limit = resp_edns.as_ref().map_or(512, Edns::max_payload);
            if !fits(queries, resp_edns.as_ref(), metadata, &reply, limit) {
                // Partial RRsets are worse than none (RFC 2181 §9): send the header, the
                // question and OPT with TC set, and let the client retry over TCP.
                reply.answers.clear();
                reply.authorities.clear();
                reply.additionals.clear();
                metadata.truncation = true;
            }
        }
        let builder = MessageResponseBuilder::new(queries, resp_edns.as_ref());
        let response = builder.build(
            metadata,
            reply.answers.iter().map(|r| r.as_ref()),
            reply.authorities.iter().map(|r| r.as_ref()),
            std::iter::empty(),
            reply.additionals.iter().map(|r| r.as_ref()),
        );
        let mut repeatable = (source == Source::Zone).then_some(period);
        let info = match response_handle.send_response(response).await {
            Ok(info) => info,
            Err(e) => {
                repeatable = None;
                tracing::debug!(error = %e, src = %request.src(), "could not send a response");
                let mut metadata = Metadata::response_from_request(&request.metadata);
                metadata.response_code = ResponseCode::ServFail;
                ResponseInfo::from(Header {
                    metadata,
                    counts: HeaderCounts::default(),
                })
            }
        };
        if info.truncation {
            self.metrics.truncated.inc();
        }
        self.metrics.query(
            qtype,
            info.response_code,
            source,
            started.elapsed().as_secs_f64(),
        );
        Responded { info, repeatable }
    }
}

#[cfg(test)]
mod tests {
    use super::has_pointer;

    #[test]
    fn pointers_are_found_in_any_question() {
        // web.lain. A IN
        let plain = b"\x03web\x04lain\x00\x00\x01\x00\x01";
        assert!(!has_pointer(plain, 1));
        // web + pointer to offset 12.
        assert!(has_pointer(b"\x03web\xc0\x0c\x00\x01\x00\x01", 1));
        // The second of two questions is compressed.
        let mut two = plain.to_vec();
        two.extend_from_slice(b"\x01a\xc0\x0c\x00\x01\x00\x01");
        assert!(has_pointer(&two, 2));
        // A section shorter than its count says is treated as compressed.
        assert!(has_pointer(b"\x03we", 1));
        // The root name.
        assert!(!has_pointer(b"\x00\x00\x02\x00\x01", 1));
    }
}
