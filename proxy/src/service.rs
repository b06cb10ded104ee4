//! The request path: pingora's `ProxyHttp` phases for lain's edge proxy.
//!
//! Everything a request needs is read from the route table loaded once, with `arc-swap`, at
//! the start of the request; no phase takes a lock or does IO of its own. The request keeps
//! the `Arc` of its route, so a table swap in the middle of it changes nothing for it.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::Bytes;
use lain_state::Balance;
use pingora_core::prelude::HttpPeer;
use pingora_core::protocols::http::ServerSession;
use pingora_core::{Error, ErrorSource, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};

use crate::access_log::{AccessLine, AccessLog};
use crate::config::Cidr;
use crate::metrics::{ClassCounters, ProxyMetrics};
use crate::table::{Route, RouteTable};
use crate::upstream::Endpoint;

/// Longest `X-Request-Id` accepted from a client; longer ones are replaced.
const MAX_REQUEST_ID: usize = 200;

/// The proxy's shared, immutable settings and handles.
#[derive(Clone)]
pub struct LainProxy {
    /// The published route table.
    pub table: Arc<ArcSwap<RouteTable>>,
    /// Metrics.
    pub metrics: ProxyMetrics,
    /// The access log.
    pub access_log: AccessLog,
    /// Peers whose forwarding headers are believed.
    pub trusted: Vec<Cidr>,
    /// Attempts after the first when connecting fails.
    pub max_retries: usize,
    /// How long an idle upstream connection is kept.
    pub keepalive_idle: Duration,
    /// Consecutive failures that eject an endpoint; 0 disables.
    pub eject_after_failures: u32,
    /// How long an ejection lasts.
    pub eject_ms: u64,
    /// Largest request header block accepted.
    pub max_header_bytes: usize,
}

/// Per-request state.
#[derive(Default)]
pub struct Ctx {
    start: Option<Instant>,
    route: Option<Arc<Route>>,
    /// The request target sent upstream when the route stripped a prefix.
    upstream_path: Option<String>,
    client_ip: Option<IpAddr>,
    trusted_peer: bool,
    request_id: String,
    tried: Vec<SocketAddr>,
    endpoint: Option<SocketAddr>,
    in_flight: Option<Arc<crate::upstream::EndpointStats>>,
    upstream_start: Option<Instant>,
    upstream_elapsed: Option<Duration>,
    status: u16,
    /// Whether the current upstream attempt has sent its response header; after that a
    /// failure can no longer be hidden from the client by trying another endpoint.
    upstream_responded: bool,
    /// Interim (1xx) responses received from the current upstream attempt.
    interim: u32,
}

impl Ctx {
    fn release(&mut self) {
        if let Some(s) = self.in_flight.take() {
            s.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

fn header_str<'a>(req: &'a RequestHeader, name: &str) -> Option<&'a str> {
    req.headers.get(name).and_then(|v| v.to_str().ok())
}

/// Every `X-Forwarded-For` line of a request as one list, in order: a proxy may add its
/// own line rather than extend the client's, and the last addresses are the ones to trust.
fn forwarded_for(req: &RequestHeader) -> Option<std::borrow::Cow<'_, str>> {
    let mut lines = req
        .headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok());
    let first = lines.next()?;
    let mut joined: Option<String> = None;
    for more in lines {
        let j = joined.get_or_insert_with(|| first.to_string());
        j.push_str(", ");
        j.push_str(more);
    }
    Some(joined.map_or(std::borrow::Cow::Borrowed(first), std::borrow::Cow::Owned))
}

/// The Host of a request: the Host header, or the authority of an HTTP/2 request.
fn request_host(req: &RequestHeader) -> &str {
    header_str(req, "host")
        .or_else(|| req.uri.authority().map(|a| a.as_str()))
        .unwrap_or("")
}

/// The size of a request's header block as it would be sent over HTTP/1.
fn header_bytes(req: &RequestHeader) -> usize {
    let uri = req.uri.path_and_query().map_or(1, |p| p.as_str().len());
    req.headers
        .iter()
        .fold(uri + 16, |n, (k, v)| n + k.as_str().len() + v.len() + 4)
}

/// Whether raw HTTP/1 header bytes carry a `Content-Length` line. pingora drops
/// `Content-Length` from the parsed header when `Transfer-Encoding` is present (RFC 9112
/// 6.3), so a request that sent both can only be recognised in the raw bytes.
fn raw_has_content_length(raw: &[u8]) -> bool {
    raw.split(|b| *b == b'\n').skip(1).any(|line| {
        let line = line.trim_ascii_start();
        line.len() >= 15 && line[..15].eq_ignore_ascii_case(b"content-length:")
    })
}

/// Whether a request's Host is missing where HTTP/1.1 requires one, or is not a
/// `host[:port]` (RFC 9112 §3.2 answers both with 400; they would otherwise get the 404 of
/// a host no route has). An empty Host is valid (a target without authority).
fn bad_host(req: &RequestHeader) -> bool {
    match req.headers.get("host") {
        None => req.version == http::Version::HTTP_11,
        Some(v) => !v
            .as_bytes()
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:[]%".contains(b)),
    }
}

/// Whether the request's framing headers disagree in a way a backend could read differently
/// (request smuggling): both `Content-Length` and `Transfer-Encoding`, several different
/// `Content-Length` values, or a `Content-Length` that is not a number. `raw_cl` tells
/// whether the raw header had a `Content-Length` line.
fn ambiguous_framing(req: &RequestHeader, raw_cl: bool) -> bool {
    let te = req.headers.get_all("transfer-encoding").iter().count();
    let mut lengths = req.headers.get_all("content-length").iter();
    let first = lengths.next();
    if te > 0 && (first.is_some() || raw_cl) {
        return true;
    }
    if let Some(first) = first {
        let valid = |v: &http::HeaderValue| {
            v.to_str()
                .is_ok_and(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        };
        if !valid(first) || lengths.any(|v| v != first) {
            return true;
        }
    }
    false
}

/// Whether a request's `Transfer-Encoding` names anything but a single `chunked`: the one
/// coding lain decodes, and which pingora sends upstream alone, so that a body sent
/// `gzip, chunked` would reach the app as if it were not compressed. Such a request gets
/// 501 (RFC 9112 §6.1), as from nginx.
fn unsupported_coding(req: &RequestHeader) -> bool {
    let mut codings = req
        .headers
        .get_all("transfer-encoding")
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(|c| c.trim_ascii())
        .filter(|c| !c.is_empty());
    match codings.next() {
        None => false,
        Some(first) => !first.eq_ignore_ascii_case(b"chunked") || codings.next().is_some(),
    }
}

/// A random version-4 UUID for a request without an id. `Uuid::new_v4` asks the kernel for
/// randomness on every call; a per-thread generator seeded once from it keeps the request
/// path free of system calls.
fn new_request_id() -> String {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new(uuid::Uuid::new_v4().as_u64_pair().0 | 1);
    }
    // wyrand: fast, and good enough for identifiers that only need to be unique.
    let next = || {
        STATE.with(|s| {
            let x = s.get().wrapping_add(0xa076_1d64_78bd_642f);
            s.set(x);
            let t = u128::from(x) * u128::from(x ^ 0xe703_7ed1_a0b4_28db);
            ((t >> 64) as u64) ^ (t as u64)
        })
    };
    let bytes = (u128::from(next()) << 64 | u128::from(next())).to_be_bytes();
    uuid::Builder::from_random_bytes(bytes)
        .into_uuid()
        .to_string()
}

fn valid_request_id(v: &str) -> bool {
    !v.is_empty() && v.len() <= MAX_REQUEST_ID && v.bytes().all(|b| b.is_ascii_graphic())
}

/// The id of a request: the client's `X-Request-Id` when it is usable, a new one otherwise.
pub(crate) fn request_id(sent: Option<&str>) -> String {
    match sent {
        Some(id) if valid_request_id(id) => id.to_string(),
        _ => new_request_id(),
    }
}

/// The forwarding headers a request carries upstream, apart from the client address that
/// is appended to `X-Forwarded-For`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Forwarded<'a> {
    /// The `X-Forwarded-For` list the client address is appended to (a trusted peer's).
    pub xff_prev: Option<&'a str>,
    /// `X-Forwarded-Proto`.
    pub proto: &'a str,
    /// `X-Forwarded-Host`.
    pub host: &'a str,
}

/// The forwarding headers of a request for `host` that arrived over HTTPS or not, given what
/// the client sent; a peer that is not a trusted proxy has what it sent replaced.
pub(crate) fn forwarded<'a>(
    trusted_peer: bool,
    https: bool,
    host: &'a str,
    sent_xff: Option<&'a str>,
    sent_proto: Option<&'a str>,
    sent_host: Option<&'a str>,
) -> Forwarded<'a> {
    let own_proto = if https { "https" } else { "http" };
    if trusted_peer {
        Forwarded {
            xff_prev: sent_xff.filter(|p| !p.trim().is_empty()),
            proto: sent_proto.unwrap_or(own_proto),
            host: sent_host.unwrap_or(host),
        }
    } else {
        Forwarded {
            xff_prev: None,
            proto: own_proto,
            host,
        }
    }
}

/// What the end of one request records: its metrics and its access-log line.
pub(crate) struct Finished<'a> {
    pub route: Option<&'a Arc<Route>>,
    pub status: u16,
    pub elapsed: Duration,
    pub upstream_elapsed: Option<Duration>,
    pub client_ip: Option<IpAddr>,
    pub method: &'a str,
    pub host: &'a str,
    pub path: &'a str,
    pub bytes_in: usize,
    pub bytes_out: usize,
    pub endpoint: Option<SocketAddr>,
    pub request_id: &'a str,
    pub user_agent: &'a str,
    pub error: Option<String>,
}

/// Joins the `cookie` fields of a request into one, in order, separated by `; `.
///
/// An HTTP/2 client may send its cookies as several `cookie` fields (browsers do, so that
/// header compression can index each one), and RFC 9113 §8.2.3 requires them to be joined
/// before the request goes on over HTTP/1.1: apps read a single Cookie header, and one that
/// joins repeated headers itself uses `, `, which breaks the last cookie of each field.
fn join_cookies(header: &mut RequestHeader) -> Result<()> {
    // Nearly every request has one Cookie field or none, and costs no copy.
    let fields = header.headers.get_all("cookie");
    if fields.iter().nth(1).is_none() {
        return Ok(());
    }
    let mut joined = Vec::new();
    for v in fields.iter() {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(v.as_bytes());
    }
    header.remove_header("cookie");
    header.insert_header("cookie", joined)?;
    Ok(())
}

/// The value a hashing policy hashes, if the request carries it.
fn hash_key<'a>(req: &'a RequestHeader, balance: &Balance) -> Option<&'a [u8]> {
    hash_key_in(
        req.headers.iter().map(|(k, v)| (k.as_str(), v.as_bytes())),
        balance,
    )
}

/// The value a hashing policy hashes, found in a request's headers given as name and value
/// pairs (names compared without case).
pub(crate) fn hash_key_in<'a>(
    mut headers: impl Iterator<Item = (&'a str, &'a [u8])>,
    balance: &Balance,
) -> Option<&'a [u8]> {
    match balance {
        Balance::HashHeader { name } => headers
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v),
        Balance::HashCookie { name } => headers
            .filter(|(k, _)| k.eq_ignore_ascii_case("cookie"))
            .filter_map(|(_, v)| std::str::from_utf8(v).ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|kv| kv.trim().split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_bytes()),
        _ => None,
    }
}

impl LainProxy {
    pub(crate) fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|c| c.contains(ip))
    }

    /// The real client of a request from `peer`: the right-most `X-Forwarded-For` address
    /// that is not a trusted proxy when the peer is one, the peer otherwise.
    pub(crate) fn real_client(
        &self,
        peer: Option<IpAddr>,
        trusted_peer: bool,
        sent_xff: Option<&str>,
    ) -> Option<IpAddr> {
        if !trusted_peer {
            return peer;
        }
        let mut real = None;
        for part in sent_xff.unwrap_or("").rsplit(',') {
            match part.trim().parse::<IpAddr>() {
                Ok(ip) if self.is_trusted(ip) => real = Some(ip),
                Ok(ip) => {
                    real = Some(ip);
                    break;
                }
                Err(_) => break,
            }
        }
        real.or(peer)
    }

    /// Counts a finished request and writes its access-log line.
    pub(crate) fn finish(&self, f: Finished<'_>) {
        // Pre-resolved counters: an atomic increment, no lock. A table compiled without the
        // compiler (never the case while serving) falls back to the labelled lookup.
        match f.route.map(|r| (r, r.upstream.counters())) {
            None => self.metrics.unrouted.inc(f.status),
            Some((_, Some(c))) => c.inc(f.status),
            Some((r, None)) => {
                ClassCounters::resolve(&self.metrics.requests, &r.app, &r.proc_name).inc(f.status)
            }
        }
        self.metrics
            .request_seconds
            .observe(f.elapsed.as_secs_f64());
        if let Some(u) = f.upstream_elapsed {
            self.metrics.upstream_seconds.observe(u.as_secs_f64());
        }
        if !self.access_log.enabled() {
            return;
        }
        let line = AccessLine {
            // When the request arrived, as the field says: a two-hour WebSocket is logged
            // at its start, not at its end.
            time: (chrono::Utc::now() - chrono::Duration::from_std(f.elapsed).unwrap_or_default())
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            client_ip: f.client_ip.map(|ip| ip.to_string()).unwrap_or_default(),
            method: f.method.to_string(),
            host: f.host.to_string(),
            path: f.path.to_string(),
            status: f.status,
            bytes_in: f.bytes_in,
            bytes_out: f.bytes_out,
            duration_ms: f.elapsed.as_secs_f64() * 1000.0,
            upstream: f.endpoint.map(|a| a.to_string()),
            upstream_ms: f.upstream_elapsed.map(|d| d.as_secs_f64() * 1000.0),
            app: f.route.map(|r| r.app.to_string()),
            proc: f.route.map(|r| r.proc_name.to_string()),
            route: f.route.map(|r| r.name.to_string()),
            request_id: f.request_id.to_string(),
            user_agent: f.user_agent.to_string(),
            error: f.error,
        };
        self.access_log.log(line);
    }

    async fn respond(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        status: u16,
        extra: &[(&'static str, String)],
        body: &'static [u8],
    ) -> Result<bool> {
        let mut resp = ResponseHeader::build(status, Some(4))?;
        resp.insert_header("content-type", "text/plain; charset=utf-8")?;
        resp.insert_header("content-length", body.len().to_string())?;
        if !ctx.request_id.is_empty() {
            resp.insert_header("x-request-id", ctx.request_id.as_str())?;
        }
        for (k, v) in extra {
            resp.insert_header(*k, v.as_str())?;
        }
        ctx.status = status;
        session
            .write_response_header(Box::new(resp), body.is_empty())
            .await?;
        if !body.is_empty() {
            session
                .write_response_body(Some(Bytes::from_static(body)), true)
                .await?;
        }
        Ok(true)
    }
}

impl LainProxy {
    /// Counts a failure against the endpoint the request went to, ejecting it after
    /// `eject_after_failures` in a row.
    fn blame(&self, ctx: &Ctx) {
        if let Some(stats) = &ctx.in_flight
            && stats.record_failure(self.eject_after_failures, self.eject_ms)
        {
            self.metrics.ejections.inc();
            tracing::warn!(endpoint = ?ctx.endpoint, "endpoint ejected after consecutive failures");
        }
    }

    /// Answers `Expect: 100-continue` for the app, as nginx does, once the request is known
    /// to go upstream (it has a route, a healthy endpoint and an allowed length); the field
    /// itself stays behind. A client that expects it waits before sending its body (curl,
    /// and so PHP, for every body over 1 KiB), and many apps never send `100 Continue`
    /// themselves, so relaying theirs would stall such uploads for as long as the client
    /// waits, a second for curl. An HTTP/1.0 client gets none (RFC 9110 §10.1.1), nor does
    /// an HTTP/2 client: pingora cannot send an interim response over HTTP/2, so that
    /// client waits for its own timeout and then sends the body.
    async fn continue_if_expected(&self, session: &mut Session) -> Result<()> {
        let req = session.req_header();
        let expects = req
            .headers
            .get_all(http::header::EXPECT)
            .iter()
            .any(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        if !expects {
            return Ok(());
        }
        let http11 = req.version == http::Version::HTTP_11;
        if http11
            && !session.is_body_empty()
            && let ServerSession::H1(h1) = session.as_downstream_mut()
        {
            // pingora ends the connection after a response that starts before the request
            // body is read, which is right for a final answer but not for this one, so
            // that rule is lifted while it is written.
            h1.set_close_on_response_before_downstream_finish(false);
            let written = h1
                .write_response_header(Box::new(ResponseHeader::build(100, Some(0))?))
                .await;
            h1.set_close_on_response_before_downstream_finish(true);
            written?;
        }
        session
            .req_header_mut()
            .remove_header(&http::header::EXPECT);
        Ok(())
    }
}

/// The status a failed request is answered with (0: the client is gone, nothing to send).
/// An upstream that timed out gives 504, as nginx and lain's HTTP/1.1 path answer; any other
/// upstream failure 502.
/// Sends on what was relayed of a response that failed part way, before the connection is cut.
///
/// pingora's HTTP/1 writer keeps a response head in its buffer until body bytes follow, and
/// an upstream failure that reaches it on its own drops that buffer unsent: a client whose
/// app closed before the whole body got an empty reply, or lost the last body bytes read.
/// nginx sends what it has and then closes, which lets a client see how far the response
/// came (a short body against its length, or a chunked body without its last chunk). The
/// writer flushes its buffer when a failure follows other tasks in one batch, so an empty
/// body task goes first; an empty body is never written as a chunk.
///
/// Over HTTP/2 the head and body frames wait in the connection's queue for the task that
/// writes it, and resetting the stream, as dropping it does, discards what is still queued:
/// the client saw only the reset. Yielding once lets that task write them first.
async fn flush_relayed(session: &mut Session) {
    use pingora_core::protocols::http::HttpTask;
    match &*session.downstream_session {
        ServerSession::H1(_) => {}
        ServerSession::H2(_) => {
            tokio::task::yield_now().await;
            return;
        }
        _ => return,
    }
    let empty = if session.was_upgraded() {
        HttpTask::UpgradedBody(None, false)
    } else {
        HttpTask::Body(None, false)
    };
    let cut = Error::explain(
        ErrorType::WriteError,
        "response cut after an upstream failure",
    );
    // The failure comes back as the result; the connection is closed after this in any case.
    let _ = session
        .downstream_session
        .response_duplex_vec(vec![empty, HttpTask::Failed(cut)])
        .await;
}

fn failure_status(e: &Error) -> u16 {
    match (e.esource(), e.etype()) {
        (_, ErrorType::HTTPStatus(code)) => *code,
        (
            ErrorSource::Upstream,
            ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout,
        ) => 504,
        (ErrorSource::Upstream, _) => 502,
        (
            ErrorSource::Downstream,
            ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed,
        ) => 0,
        (ErrorSource::Downstream, _) => 400,
        (ErrorSource::Internal | ErrorSource::Unset, _) => 500,
    }
}

#[async_trait]
impl ProxyHttp for LainProxy {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            start: Some(Instant::now()),
            ..Ctx::default()
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        // A client may send its next requests before this one is answered (RFC 9112
        // §9.3.2), and lain's HTTP/1.1 path hands such bytes on with the request it gives
        // to pingora. Without this, pingora fails the request they follow with a 400 (or
        // closes the connection after it), and the requests behind it are lost; with it,
        // they are kept and read as the next requests. The setting stays with the
        // connection's later requests.
        if let ServerSession::H1(h1) = session.as_downstream_mut() {
            h1.set_pipelining_enabled(true);
            // A server must not send an HTTP/1.0 client an interim response (RFC 9110
            // §15.2), such as an app's 103 Early Hints; pingora relays them unless told.
            let http10 = h1.req_header().version == http::Version::HTTP_10;
            h1.set_ignore_info_resp(http10);
        }
        let peer_ip = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        ctx.trusted_peer = peer_ip.is_some_and(|ip| self.is_trusted(ip));
        let req = session.req_header();
        ctx.request_id = request_id(header_str(req, "x-request-id"));
        ctx.client_ip = self.real_client(peer_ip, ctx.trusted_peer, forwarded_for(req).as_deref());

        if header_bytes(req) > self.max_header_bytes {
            return self
                .respond(session, ctx, 431, &[], b"request header fields too large\n")
                .await;
        }
        let raw_cl = req.headers.contains_key("transfer-encoding")
            && raw_has_content_length(&session.as_downstream().to_h1_raw());
        let req = session.req_header();
        if ambiguous_framing(req, raw_cl) || bad_host(req) {
            return self.respond(session, ctx, 400, &[], b"bad request\n").await;
        }
        if unsupported_coding(req) {
            return self
                .respond(session, ctx, 501, &[], b"transfer coding not implemented\n")
                .await;
        }

        let table = self.table.load();
        let host = request_host(req);
        let Ok(path) = crate::table::clean_request_path(req.uri.path()) else {
            return self.respond(session, ctx, 400, &[], b"bad request\n").await;
        };
        let Some(m) = table.lookup(host, &path) else {
            return self.respond(session, ctx, 404, &[], b"no route\n").await;
        };
        let route = m.route.clone();
        // The request target is rewritten only when the route stripped a prefix, the path
        // was cleaned, or the client sent an absolute URI; parsing a new URI for every
        // request costs more than the rest of this phase, and an unchanged target goes
        // upstream byte for byte.
        // pingora keeps an absolute-form target (`GET http://host/path`) for the wire and
        // gives its Uri only the path, so the raw target tells the form: an upstream is an
        // origin server and gets the origin form (RFC 9112 §3.2.1), as nginx sends it.
        let raw = req.raw_path();
        let absolute = !raw.starts_with(b"/") && raw != b"*";
        let cleaned = matches!(path, std::borrow::Cow::Owned(_));
        let rewrite = m.upstream_path.len() != path.len() || absolute || cleaned;
        let upstream_path = rewrite.then(|| {
            let mut p = m.upstream_path.to_string();
            if let Some(q) = req.uri.query() {
                p.push('?');
                p.push_str(q);
            }
            p
        });
        drop(table);

        if route.https_only {
            let via_https = session.digest().is_some_and(|d| d.ssl_digest.is_some())
                || (ctx.trusted_peer
                    && header_str(session.req_header(), "x-forwarded-proto")
                        .is_some_and(|p| p.eq_ignore_ascii_case("https")));
            if !via_https {
                let req = session.req_header();
                let host = request_host(req).to_string();
                let uri = req
                    .uri
                    .path_and_query()
                    .map_or("/".to_string(), |p| p.as_str().to_string());
                let location = format!("https://{}{}", crate::table::normalise_host(&host), uri);
                ctx.route = Some(route);
                return self
                    .respond(session, ctx, 301, &[("location", location)], b"")
                    .await;
            }
        }

        if let Some(max) = route.max_body_bytes {
            let too_big = header_str(session.req_header(), "content-length")
                .and_then(|v| v.parse::<u64>().ok())
                .is_some_and(|n| n > max);
            if too_big {
                ctx.route = Some(route);
                return self
                    .respond(session, ctx, 413, &[], b"request body too large\n")
                    .await;
            }
        }

        if !route.upstream.any_admitted() {
            ctx.route = Some(route);
            return self
                .respond(session, ctx, 503, &[], b"no healthy endpoint\n")
                .await;
        }
        ctx.upstream_path = upstream_path;
        ctx.route = Some(route);
        self.continue_if_expected(session).await?;
        Ok(false)
    }

    async fn request_body_filter(
        &self,
        session: &mut Session,
        _body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<()> {
        // A chunked body has no Content-Length to check up front; count as it arrives.
        if let Some(max) = ctx.route.as_ref().and_then(|r| r.max_body_bytes)
            && session.body_bytes_read() as u64 > max
        {
            ctx.status = 413;
            return Err(Error::explain(
                ErrorType::HTTPStatus(413),
                "request body too large",
            ));
        }
        Ok(())
    }

    async fn upstream_peer(&self, session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        ctx.release();
        ctx.upstream_responded = false;
        ctx.interim = 0;
        let Some(route) = ctx.route.clone() else {
            return Err(Error::explain(ErrorType::HTTPStatus(404), "no route"));
        };
        let key = hash_key(session.req_header(), &route.balance);
        let Some(ep): Option<&Endpoint> = route.upstream.select(&route.balance, key, &ctx.tried)
        else {
            ctx.status = 503;
            return Err(Error::explain(
                ErrorType::HTTPStatus(503),
                "no healthy endpoint",
            ));
        };
        ep.stats.in_flight.fetch_add(1, Ordering::Relaxed);
        ctx.in_flight = Some(ep.stats.clone());
        ctx.tried.push(ep.addr);
        ctx.endpoint = Some(ep.addr);
        let mut peer = HttpPeer::new(ep.addr, false, String::new());
        let t = route.timeouts;
        peer.options.connection_timeout = Some(Duration::from_millis(t.connect_ms));
        peer.options.read_timeout = Some(Duration::from_millis(t.read_ms));
        peer.options.write_timeout = Some(Duration::from_millis(t.write_ms));
        peer.options.idle_timeout = Some(self.keepalive_idle);
        Ok(Box::new(peer))
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        self.metrics.connect_errors.inc();
        self.blame(ctx);
        ctx.release();
        // Nothing was sent, so another endpoint may take the request.
        if ctx.tried.len() <= self.max_retries {
            e.set_retry(true);
        }
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Ctx,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        // lain's own answers (a chunked body past the route's limit gets 413) are nobody
        // else's fault and answered once; retrying would replay the body into the same
        // answer.
        if e.esource == ErrorSource::Downstream || matches!(e.etype, ErrorType::HTTPStatus(_)) {
            // The client went away (or broke the protocol) while its request was upstream,
            // as every load generator does when it stops: the endpoint did nothing wrong, so
            // it is neither blamed nor ejected, and nobody is left to answer.
            e.set_retry(false);
            return e;
        }
        // An endpoint that dies after taking a request but before answering it (a killed
        // instance) looks like this. As nginx's `proxy_next_upstream error` does, an
        // idempotent request whose body is still buffered goes to another endpoint, provided
        // no byte of the failed answer reached the client; anything else fails as it is. A
        // timeout is not retried, since sending more work to a slow endpoint's peers only
        // spreads the slowness, and neither is a response that came but cannot be read: it
        // is the endpoint's answer, as broken as it is (nginx retries neither by default;
        // lain's HTTP/1.1 path decides alike).
        let replayable = session.req_header().method.is_idempotent()
            && !session.as_ref().retry_buffer_truncated()
            && !ctx.upstream_responded
            && !matches!(
                e.etype,
                ErrorType::ReadTimedout | ErrorType::WriteTimedout | ErrorType::InvalidHTTPHeader
            );
        // Any failure before the response (a timeout, a reset, a response that cannot be
        // read) counts against the endpoint, as on lain's path, whether or not the request
        // goes elsewhere; but not a pooled connection that turned out closed when the
        // request can simply be sent again.
        let retry = replayable && ctx.tried.len() <= self.max_retries;
        let stale = client_reused && retry;
        if !ctx.upstream_responded && !stale {
            self.blame(ctx);
        }
        if retry {
            ctx.release();
        }
        e.set_retry(retry);
        e
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let req = session.req_header();
        if let Some(p) = &ctx.upstream_path
            && let Ok(uri) = p.parse::<http::Uri>()
        {
            upstream.set_uri(uri);
        }
        let peer = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip().to_string())
            .unwrap_or_default();
        let https = session.digest().is_some_and(|d| d.ssl_digest.is_some());
        let host = request_host(req).to_string();
        let original_uri = req
            .uri
            .path_and_query()
            .map_or("/".to_string(), |p| p.as_str().to_string());
        let sent_xff = forwarded_for(req);
        let fwd = forwarded(
            ctx.trusted_peer,
            https,
            &host,
            sent_xff.as_deref(),
            header_str(req, "x-forwarded-proto"),
            header_str(req, "x-forwarded-host"),
        );
        let xff = match fwd.xff_prev {
            Some(prev) => format!("{prev}, {peer}"),
            None => peer.clone(),
        };
        let (proto, fwd_host) = (fwd.proto.to_string(), fwd.host.to_string());
        let real_ip = ctx.client_ip.map(|ip| ip.to_string()).unwrap_or(peer);
        upstream.insert_header("x-forwarded-for", xff)?;
        upstream.insert_header("x-forwarded-proto", proto)?;
        upstream.insert_header("x-forwarded-host", fwd_host)?;
        upstream.insert_header("x-real-ip", real_ip)?;
        upstream.insert_header("x-original-uri", original_uri)?;
        upstream.insert_header("x-request-id", ctx.request_id.as_str())?;
        if upstream.headers.get("host").is_none() && !host.is_empty() {
            upstream.insert_header("host", host)?;
        }
        if session.is_http2() {
            join_cookies(upstream)?;
        }
        ctx.upstream_start = Some(Instant::now());
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        ctx.upstream_responded = true;
        // A switch of protocols the client never asked for would turn its connection into a
        // raw tunnel to the app, past routing and every check after it (a way to smuggle
        // requests); like nginx, the proxy switches only on a request that offered it.
        if resp.status.as_u16() == 101 && !session.is_upgrade_req() {
            self.blame(ctx);
            return Err(Error::create(
                ErrorType::InvalidHTTPHeader,
                ErrorSource::Upstream,
                Some("101 Switching Protocols to a request without Upgrade".into()),
                None,
            ));
        }
        // The same bound on interim responses as lain's HTTP/1.1 path; pingora relays any
        // number of them.
        if resp.status.is_informational() && resp.status.as_u16() != 101 {
            ctx.interim += 1;
            if ctx.interim > crate::h1::MAX_INTERIM_RESPONSES {
                self.blame(ctx);
                return Err(Error::create(
                    ErrorType::InvalidHTTPHeader,
                    ErrorSource::Upstream,
                    Some("too many interim responses".into()),
                    None,
                ));
            }
        }
        // The same bound as lain's HTTP/1.1 path: pingora reads a response header of any
        // size, and one this large is an app fault to report, not to pass on.
        let size = resp
            .headers
            .iter()
            .fold(16, |n, (k, v)| n + k.as_str().len() + v.len() + 4);
        if size > crate::h1::MAX_RESPONSE_HEAD {
            return Err(Error::create(
                ErrorType::InvalidHTTPHeader,
                ErrorSource::Upstream,
                Some(format!("response header of {size} bytes, more than allowed").into()),
                None,
            ));
        }
        if let Err(e) = drop_hop_by_hop(resp) {
            self.blame(ctx);
            return Err(e);
        }
        if resp.status.is_server_error() {
            self.blame(ctx);
        } else if let Some(stats) = &ctx.in_flight {
            stats.record_success();
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        ctx.status = resp.status.as_u16();
        // An HTTP/1.0 client cannot read chunked framing, and a server must not send it one
        // (RFC 9112 §6.1); pingora frames a response that has no length (or came chunked)
        // that way whatever the client's version. Without `Transfer-Encoding` the body is
        // delimited by closing the connection, as nginx answers such a client.
        if session.req_header().version == http::Version::HTTP_10
            && resp.headers.contains_key("transfer-encoding")
        {
            resp.remove_header("transfer-encoding");
            session.set_keepalive(None);
        }
        // The final response carries the id, as on lain's path; an interim one goes as the
        // app sent it.
        if !resp.status.is_informational() && resp.headers.get("x-request-id").is_none() {
            resp.insert_header("x-request-id", ctx.request_id.as_str())?;
        }
        Ok(())
    }

    fn upstream_response_body_filter(
        &self,
        _session: &mut Session,
        _body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<Option<Duration>> {
        if end_of_stream && let Some(s) = ctx.upstream_start {
            ctx.upstream_elapsed = Some(s.elapsed());
        }
        Ok(None)
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let code = failure_status(e);
        // Once a final response has started, the client connection can only be cut.
        let started = session
            .response_written()
            .is_some_and(|r| !r.status.is_informational());
        if code > 0 && !started {
            // The same answers as lain's HTTP/1.1 path gives, request id included.
            let body: &'static [u8] = match code {
                502 => b"bad gateway\n",
                504 => b"upstream timed out\n",
                _ => b"",
            };
            session.set_keepalive(None);
            let sent = if body.is_empty() {
                ctx.status = code;
                session.respond_error(code).await.map(|()| true)
            } else {
                self.respond(session, ctx, code, &[], body).await
            };
            if let Err(e) = sent {
                tracing::debug!(error = %e, "cannot send the error response");
            }
        } else if started {
            flush_relayed(session).await;
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        ctx.release();
        self.metrics.served_by_pingora.inc();
        let status = session
            .response_written()
            // An interim answer (a 100 Continue, a relayed 103) is not the request's status;
            // a switch of protocols is.
            .filter(|r| !r.status.is_informational() || r.status.as_u16() == 101)
            .map(|r| r.status.as_u16())
            .unwrap_or(ctx.status);
        let req = session.req_header();
        self.finish(Finished {
            route: ctx.route.as_ref(),
            status,
            elapsed: ctx.start.map(|s| s.elapsed()).unwrap_or_default(),
            upstream_elapsed: ctx
                .upstream_elapsed
                .or_else(|| ctx.upstream_start.map(|s| s.elapsed())),
            client_ip: ctx.client_ip,
            method: req.method.as_str(),
            host: request_host(req),
            path: req.uri.path_and_query().map_or("", |p| p.as_str()),
            bytes_in: session.body_bytes_read(),
            bytes_out: session.body_bytes_sent(),
            endpoint: ctx.endpoint,
            request_id: &ctx.request_id,
            user_agent: header_str(req, "user-agent").unwrap_or(""),
            error: e.map(|e| e.to_string()),
        });
    }
}

/// Takes from an upstream response what lain's HTTP/1.1 path does not relay either: the
/// hop-by-hop fields ([`crate::h1::HOP_BY_HOP`], and those its `Connection` names; a 101
/// keeps its `Connection`, `Upgrade` and what they name, a 426 its `Upgrade`), and a
/// repeated Content-Length, sent once when every copy agrees (pingora would pass them all on,
/// which an HTTP/2 client refuses) and a 502 when they differ.
fn drop_hop_by_hop(resp: &mut ResponseHeader) -> Result<()> {
    let code = resp.status.as_u16();
    // A switch of protocols keeps its `Connection` and what it names: they are the switch.
    let switching = code == 101;
    let named: Vec<String> = resp
        .headers
        .iter()
        .filter(|(name, _)| *name == http::header::CONNECTION)
        .filter_map(|(_, v)| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|option| option.trim().to_ascii_lowercase())
        .filter(|option| !option.is_empty() && !crate::h1::framing_field(option))
        .filter(|_| !switching)
        .collect();
    for name in crate::h1::HOP_BY_HOP
        .iter()
        .copied()
        .filter(|name| !(switching && matches!(*name, "connection" | "upgrade")))
        .chain(named.iter().map(String::as_str))
    {
        if !crate::h1::kept_hop_by_hop(name, code) {
            resp.remove_header(name);
        }
    }
    if crate::h1::bodiless_status(code) {
        resp.remove_header(&http::header::CONTENT_LENGTH);
        resp.remove_header(&http::header::TRANSFER_ENCODING);
        return Ok(());
    }
    let lengths = resp.headers.get_all(http::header::CONTENT_LENGTH);
    let mut values = lengths.iter();
    if let (Some(first), Some(_)) = (values.next(), lengths.iter().nth(1)) {
        let first = first.clone();
        if values.any(|other| *other != first) {
            return Err(Error::create(
                ErrorType::InvalidHTTPHeader,
                ErrorSource::Upstream,
                Some("conflicting content-length".into()),
                None,
            ));
        }
        resp.insert_header(http::header::CONTENT_LENGTH, first)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build("POST", b"/", None).unwrap();
        for (k, v) in headers {
            r.append_header(k.to_string(), *v).unwrap();
        }
        r
    }

    #[test]
    fn failure_statuses() {
        let cases = [
            (ErrorType::ReadTimedout, ErrorSource::Upstream, 504),
            (ErrorType::WriteTimedout, ErrorSource::Upstream, 504),
            (ErrorType::ConnectTimedout, ErrorSource::Upstream, 504),
            (ErrorType::ConnectRefused, ErrorSource::Upstream, 502),
            (ErrorType::ConnectionClosed, ErrorSource::Upstream, 502),
            (ErrorType::InvalidHTTPHeader, ErrorSource::Upstream, 502),
            (ErrorType::HTTPStatus(413), ErrorSource::Downstream, 413),
            (ErrorType::ConnectionClosed, ErrorSource::Downstream, 0),
            (ErrorType::ReadError, ErrorSource::Downstream, 0),
            (ErrorType::InvalidHTTPHeader, ErrorSource::Downstream, 400),
            (ErrorType::InternalError, ErrorSource::Internal, 500),
        ];
        for (etype, source, want) in cases {
            let mut e = Error::new(etype.clone());
            e.esource = source.clone();
            assert_eq!(failure_status(&e), want, "{etype:?} from {source:?}");
        }
    }

    #[test]
    fn framing_checks() {
        assert!(!ambiguous_framing(&req(&[]), false));
        assert!(ambiguous_framing(
            &req(&[("transfer-encoding", "chunked")]),
            true
        ));
        assert!(raw_has_content_length(
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-LENGTH: 5\r\n\r\n"
        ));
        assert!(!raw_has_content_length(
            b"POST / HTTP/1.1\r\nX-Content-Length: 5\r\n\r\n"
        ));
        assert!(!ambiguous_framing(&req(&[("content-length", "5")]), false));
        assert!(!ambiguous_framing(
            &req(&[("transfer-encoding", "chunked")]),
            false
        ));
        assert!(ambiguous_framing(
            &req(&[("content-length", "5"), ("transfer-encoding", "chunked")]),
            false
        ));
        assert!(ambiguous_framing(
            &req(&[("content-length", "5"), ("content-length", "6")]),
            false
        ));
        assert!(!ambiguous_framing(
            &req(&[("content-length", "5"), ("content-length", "5")]),
            false
        ));
        assert!(ambiguous_framing(&req(&[("content-length", "-1")]), false));
        assert!(ambiguous_framing(&req(&[("content-length", "")]), false));
    }

    #[test]
    fn cookie_fields_are_joined_in_order() {
        let mut r = req(&[("cookie", "a=1"), ("x", "y"), ("cookie", "b=2; c=3")]);
        join_cookies(&mut r).unwrap();
        let all: Vec<_> = r.headers.get_all("cookie").iter().collect();
        assert_eq!(all, ["a=1; b=2; c=3"]);
        assert_eq!(r.headers.get("x").unwrap(), "y");
        let mut one = req(&[("cookie", "a=1")]);
        join_cookies(&mut one).unwrap();
        assert_eq!(one.headers.get_all("cookie").iter().count(), 1);
    }

    #[test]
    fn only_a_single_chunked_coding_is_supported() {
        let te = |values: &[&str]| {
            let headers: Vec<_> = values.iter().map(|v| ("transfer-encoding", *v)).collect();
            unsupported_coding(&req(&headers))
        };
        assert!(!te(&[]));
        assert!(!te(&["chunked"]));
        assert!(!te(&["Chunked "]));
        assert!(!te(&[" chunked,"]));
        assert!(te(&["gzip, chunked"]));
        assert!(te(&["gzip", "chunked"]));
        assert!(te(&["chunked, chunked"]));
        assert!(te(&["identity"]));
        assert!(te(&["chunked;q=1"]));
    }

    #[test]
    fn hash_keys_from_header_and_cookie() {
        let r = req(&[("x-user", "u1"), ("cookie", "a=1; sid=abc; b=2")]);
        assert_eq!(
            hash_key(
                &r,
                &Balance::HashHeader {
                    name: "x-user".into()
                }
            ),
            Some(&b"u1"[..])
        );
        assert_eq!(
            hash_key(&r, &Balance::HashCookie { name: "sid".into() }),
            Some(&b"abc"[..])
        );
        assert_eq!(
            hash_key(&r, &Balance::HashCookie { name: "zz".into() }),
            None
        );
        assert_eq!(hash_key(&r, &Balance::RoundRobin), None);
    }

    #[test]
    fn generated_request_ids_are_v4_and_distinct() {
        let a = new_request_id();
        let b = new_request_id();
        assert_ne!(a, b);
        let u = uuid::Uuid::parse_str(&a).unwrap();
        assert_eq!(u.get_version_num(), 4);
        assert!(valid_request_id(&a));
    }

    #[test]
    fn request_ids() {
        assert!(valid_request_id("abc-123"));
        assert!(!valid_request_id(""));
        assert!(!valid_request_id("has space"));
        assert!(!valid_request_id(&"x".repeat(201)));
    }
}
