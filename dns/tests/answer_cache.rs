//! The UDP answer cache against the handler it stands in for: two UDP servers answer from
//! the same zone, one with the cache and one without, and every answer of the first must be
//! byte for byte the answer of the second, for every client class, rotation and kind of
//! question, before and after a zone swap.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use common::{Opts, query_bytes};
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RecordType;
use lain_common::Shutdown;
use lain_dns::config::ZoneConfig;
use lain_dns::forward::Forwarder;
use lain_dns::handler::{DnsHandler, HandlerOptions};
use lain_dns::metrics::DnsMetrics;
use lain_dns::zone::{ZoneSettings, compile};
use lain_state::{Keyspace, Snapshot, StateDocument};
use tokio::net::UdpSocket;

/// A cluster with a rotating proc of two IPv4 instances and one IPv6, one of 40 (too big for
/// 512 octets),
/// a service with per-client views, static records and an ingress.
fn state(web1: &str) -> String {
    let mut endpoints = vec![
        format!(
            r#"{{"app": "hello", "proc": "web", "instance": 1, "address": "{web1}", "port": 80, "ports": {{"http": 80}}}}"#
        ),
        r#"{"app": "hello", "proc": "web", "instance": 2, "address": "10.0.0.2", "port": 80, "ports": {"http": 80}}"#.to_string(),
        r#"{"app": "hello", "proc": "web", "instance": 3, "address": "fd00::3", "port": 80, "ports": {"http": 80}}"#.to_string(),
        r#"{"app": "svc", "proc": "redis", "instance": 1, "address": "10.0.1.1", "port": 6379}"#.to_string(),
        // Instances whose addresses the test's clients send from, for per-client views.
        r#"{"app": "hello", "proc": "worker", "instance": 1, "address": "127.0.31.3", "port": 1}"#.to_string(),
        r#"{"app": "stranger", "proc": "web", "instance": 1, "address": "127.0.31.4", "port": 1}"#.to_string(),
    ];
    for i in 1..=40 {
        endpoints.push(format!(
            r#"{{"app": "big", "proc": "web", "instance": {i}, "address": "10.2.0.{i}", "port": 80}}"#
        ));
    }
    format!(
        r#"{{
  "apps": [{{"name": "hello", "use_services": {{"svc": ["redis"]}}}}, {{"name": "stranger"}}],
  "endpoints": [{}],
  "services": [{{"app": "svc", "service": "redis", "proc": "redis"}}],
  "ingress": [{{"addresses": ["10.9.9.9"]}}],
  "dns": [
    {{"name": "a.lain", "type": "CNAME", "data": "web.hello.lain"}},
    {{"name": "t.lain", "type": "TXT", "data": "x"}}
  ]
}}"#,
        endpoints.join(",\n")
    )
}

fn zone(web1: &str) -> lain_dns::zone::Zone {
    let doc: StateDocument = serde_json::from_str(&state(web1)).expect("state document");
    let (snap, _): (Snapshot, _) = Snapshot::from_document(&Keyspace::default(), &doc);
    let settings = ZoneSettings::from_config(&ZoneConfig {
        reverse_zones: vec!["10.in-addr.arpa".into()],
        ..ZoneConfig::default()
    })
    .expect("zone settings");
    compile(&snap, &settings, 1)
}

/// One UDP server on a thread of its own, as `lain dns` runs each socket.
struct Server {
    addr: SocketAddr,
    metrics: DnsMetrics,
    shutdown: Shutdown,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(zone: Arc<ArcSwap<lain_dns::zone::Zone>>, cache_entries: usize) -> Server {
        Server::start_on("127.0.0.1:0", zone, cache_entries)
    }

    fn start_on(
        bind: &str,
        zone: Arc<ArcSwap<lain_dns::zone::Zone>>,
        cache_entries: usize,
    ) -> Server {
        let metrics = DnsMetrics::unregistered();
        // A forwarder makes recursion availability depend on the client (allowed only from
        // 127.0.31.2), which the cache must tell apart; nothing here is ever forwarded.
        let forwarder = Forwarder::new(
            &["127.0.0.1:9".parse().expect("addr")],
            Duration::from_millis(200),
            16,
            16,
            metrics.clone(),
        )
        .expect("forwarder");
        let handler = DnsHandler::new(
            zone,
            Some(Arc::new(forwarder)),
            HandlerOptions {
                views: true,
                max_udp_payload: 1232,
                allowed_networks: vec!["127.0.31.2/32".parse().expect("net")],
            },
            metrics.clone(),
        );
        let std_socket = std::net::UdpSocket::bind(bind).expect("bind");
        std_socket.set_nonblocking(true).expect("nonblocking");
        let addr = std_socket.local_addr().expect("addr");
        let shutdown = Shutdown::new();
        let (m, s) = (metrics.clone(), shutdown.clone());
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let local = tokio::task::LocalSet::new();
            local.block_on(&runtime, async move {
                let socket = UdpSocket::from_std(std_socket).expect("socket");
                lain_dns::udp::serve(socket, handler, m, cache_entries, s, Duration::from_secs(1))
                    .await;
            });
        });
        Server {
            addr,
            metrics,
            shutdown,
            thread: Some(thread),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.trigger();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends `bytes` from `client` to `server` and waits up to `wait` for the answer.
async fn ask(
    client: &UdpSocket,
    server: SocketAddr,
    bytes: &[u8],
    wait: Duration,
) -> Option<Vec<u8>> {
    client.send_to(bytes, server).await.expect("send");
    let mut buf = vec![0u8; 65_535];
    match tokio::time::timeout(wait, client.recv_from(&mut buf)).await {
        Ok(Ok((n, from))) => {
            assert_eq!(from, server, "answer from the server asked");
            Some(buf[..n].to_vec())
        }
        _ => None,
    }
}

fn with_id(mut bytes: Vec<u8>, id: u16) -> Vec<u8> {
    bytes[..2].copy_from_slice(&id.to_be_bytes());
    bytes
}

/// The questions asked, as wire bytes: every kind of answer the zone gives, in several
/// spellings and with and without EDNS and RD, plus requests answered with errors.
fn questions() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let plain = Opts::default();
    let no_edns = Opts {
        edns: None,
        ..Opts::default()
    };
    let no_rd = Opts {
        rd: false,
        ..Opts::default()
    };
    let small = Opts {
        edns: Some(512),
        ..Opts::default()
    };
    for (name, t) in [
        ("web-1.hello.lain.", RecordType::A),
        ("web.hello.lain.", RecordType::A),
        ("WeB.HeLLo.LaIn.", RecordType::A),
        ("web.hello.lain.", RecordType::AAAA),
        ("web.hello.lain.", RecordType::TXT),
        ("nope.hello.lain.", RecordType::A),
        ("_http._tcp.web.hello.lain.", RecordType::SRV),
        ("hello.lain.", RecordType::A),
        ("anything.lain.", RecordType::A),
        ("a.lain.", RecordType::A),
        ("t.lain.", RecordType::TXT),
        ("web.hello.lain.", RecordType::ANY),
        ("lain.", RecordType::SOA),
        ("lain.", RecordType::NS),
        ("redis.hello.lain.", RecordType::A),
        ("redis.stranger.lain.", RecordType::A),
        ("1.0.0.10.in-addr.arpa.", RecordType::PTR),
        ("web.big.lain.", RecordType::A),
        ("lain.", RecordType::AXFR),
    ] {
        for (label, opts) in [
            ("edns", plain),
            ("no-edns", no_edns),
            ("no-rd", no_rd),
            ("edns-512", small),
        ] {
            out.push((format!("{name} {t} {label}"), query_bytes(name, t, opts)));
        }
    }
    // Two questions: FORMERR.
    let q = query_bytes("t.lain.", RecordType::TXT, no_edns);
    let mut two_plain = query_bytes("web.hello.lain.", RecordType::A, no_edns);
    two_plain[5] = 2;
    two_plain.extend_from_slice(&q[12..]);
    out.push(("two questions".into(), two_plain));
    // A NOTIFY (opcode 4): NOTIMP.
    let mut notify = query_bytes("lain.", RecordType::SOA, Opts::default());
    notify[2] = (notify[2] & 0x87) | (4 << 3);
    out.push(("notify".into(), notify));
    // EDNS version 1: BADVERS.
    let mut v1 = query_bytes("web.hello.lain.", RecordType::A, Opts::default());
    let len = v1.len();
    v1[len - 5] = 1;
    out.push(("edns version 1".into(), v1));
    // A label running past the end: FORMERR.
    let mut cut = query_bytes("web.hello.lain.", RecordType::A, no_edns);
    cut.truncate(16);
    out.push(("cut question".into(), cut));
    out
}

#[tokio::test(flavor = "current_thread")]
async fn cached_answers_are_the_handlers_answers_byte_for_byte() {
    let zone_a = Arc::new(ArcSwap::from_pointee(zone("10.0.0.1")));
    let zone_b = Arc::new(ArcSwap::from_pointee(zone("10.0.0.1")));
    let cached = Server::start(zone_a.clone(), 1024);
    let uncached = Server::start(zone_b.clone(), 0);
    // Clients: a plain one, one allowed to recurse, an instance of the app using the
    // service, and an instance of an app that does not.
    let mut clients = Vec::new();
    for ip in ["127.0.31.1", "127.0.31.2", "127.0.31.3", "127.0.31.4"] {
        let ip: IpAddr = ip.parse().expect("ip");
        clients.push(
            UdpSocket::bind(SocketAddr::new(ip, 0))
                .await
                .expect("bind client"),
        );
    }
    let questions = questions();
    let wait = Duration::from_secs(2);
    let mut id: u16 = 0;
    let mut answered = 0;
    let mut distinct_by_client = std::collections::HashMap::new();
    for round in 0..2 {
        if round == 1 {
            // A swap must empty the cache: the instance moved.
            zone_a.store(Arc::new(zone("10.0.0.111")));
            zone_b.store(Arc::new(zone("10.0.0.111")));
        }
        // Four passes: the first fills the cache, the rest are answered from it. Each
        // question is asked three times in a row, so rotating names are asked at successive
        // rotations (two A records at `web.hello`; 40 at `web.big`).
        for pass in 0..4 {
            for (c, client) in clients.iter().enumerate() {
                for (what, q) in questions.iter().flat_map(|q| [q, q, q]) {
                    id = id.wrapping_add(1);
                    let q = with_id(q.clone(), id);
                    let a = ask(client, cached.addr, &q, wait).await;
                    let b = ask(client, uncached.addr, &q, wait).await;
                    assert_eq!(
                        a, b,
                        "round {round} pass {pass} client {c}: {what}: cached and uncached answers differ"
                    );
                    let a = a.unwrap_or_else(|| panic!("{what}: no answer"));
                    assert_eq!(
                        a[..2],
                        id.to_be_bytes(),
                        "{what}: the answer carries the request's ID"
                    );
                    answered += 1;
                    if what == "redis.hello.lain. A edns" {
                        distinct_by_client.insert(c, ResponseCode::from_low(a[3] & 0x0f));
                    }
                    if round == 1 && what == "web-1.hello.lain. A edns" {
                        let m = Message::from_vec(&a).expect("decode");
                        assert_eq!(
                            m.answers[0].data.to_string(),
                            "10.0.0.111",
                            "answer from the new zone"
                        );
                    }
                }
            }
        }
    }
    // The views: the stranger's instance does not see the service, the others do.
    assert_eq!(distinct_by_client[&0], ResponseCode::NoError);
    assert_eq!(distinct_by_client[&2], ResponseCode::NoError);
    assert_eq!(distinct_by_client[&3], ResponseCode::NXDomain);
    // Most answers came from the cache; none could from the server without one.
    let hits = hits_settled(&cached.metrics, answered / 2 + 1).await;
    assert!(
        hits * 2 > answered,
        "{hits} of {answered} answers came from the cache"
    );
    assert_eq!(uncached.metrics.answer_cache_hits(), 0);
}

#[tokio::test(flavor = "current_thread")]
async fn responses_and_runts_are_never_answered() {
    let zone = Arc::new(ArcSwap::from_pointee(zone("10.0.0.1")));
    let server = Server::start(zone, 1024);
    let client = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let q = query_bytes("web-1.hello.lain.", RecordType::A, Opts::default());
    // Asked once so that the question is cached: a response with the same bytes after the
    // header's QR bit must not be answered from the cache either.
    assert!(
        ask(&client, server.addr, &q, Duration::from_secs(2))
            .await
            .is_some()
    );
    assert!(
        ask(&client, server.addr, &q, Duration::from_secs(2))
            .await
            .is_some()
    );
    let mut response = q.clone();
    response[2] |= 0x80;
    assert_eq!(
        ask(&client, server.addr, &response, Duration::from_millis(300)).await,
        None
    );
    assert_eq!(
        ask(&client, server.addr, &q[..11], Duration::from_millis(300)).await,
        None
    );
    // Still serving.
    assert!(
        ask(&client, server.addr, &q, Duration::from_secs(2))
            .await
            .is_some()
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_burst_of_queries_is_answered_in_full() {
    let zone = Arc::new(ArcSwap::from_pointee(zone("10.0.0.1")));
    let server = Server::start(zone, 1024);
    let client = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    // Ten bursts of 40 queries, each sent without waiting so that the server reads it in
    // batches: 40 different questions (first-time ones in the first burst, repeated ones
    // after), each query with its own ID. A burst is no bigger than the client's receive
    // buffer holds.
    let names: Vec<String> = (1..=40).map(|i| format!("web-{i}.big.lain.")).collect();
    let mut buf = vec![0u8; 4096];
    for burst in 0..10u16 {
        let mut expected = std::collections::HashMap::new();
        for i in 0..40u16 {
            let id = burst * 40 + i;
            let q = with_id(
                query_bytes(&names[usize::from(i)], RecordType::A, Opts::default()),
                id,
            );
            client.send_to(&q, server.addr).await.expect("send");
            expected.insert(id, format!("10.2.0.{}", i + 1));
        }
        while !expected.is_empty() {
            let (len, _) = tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("burst {burst}: {} answers missing", expected.len()))
                .expect("receive");
            let m = Message::from_vec(&buf[..len]).expect("decode");
            let want = expected.remove(&m.metadata.id).unwrap_or_else(|| {
                panic!("an answer to an unknown or repeated ID {}", m.metadata.id)
            });
            assert_eq!(m.answers.len(), 1);
            assert_eq!(
                m.answers[0].data.to_string(),
                want,
                "answer to ID {}",
                m.metadata.id
            );
        }
    }
    assert!(hits_settled(&server.metrics, 360).await >= 360);
}

#[tokio::test(flavor = "current_thread")]
async fn ipv6_clients_are_answered_from_the_cache_too() {
    let zone = Arc::new(ArcSwap::from_pointee(zone("10.0.0.1")));
    let server = Server::start_on("[::1]:0", zone, 1024);
    let client = UdpSocket::bind("[::1]:0").await.expect("bind");
    for id in 1..=3u16 {
        let q = with_id(
            query_bytes("web-1.hello.lain.", RecordType::A, Opts::default()),
            id,
        );
        let a = ask(&client, server.addr, &q, Duration::from_secs(2))
            .await
            .expect("an answer over IPv6");
        let m = Message::from_vec(&a).expect("decode");
        assert_eq!(m.metadata.id, id);
        assert_eq!(m.answers[0].data.to_string(), "10.0.0.1");
    }
    // Hits are counted once their answers are sent, so the count can trail the last answer.
    assert_eq!(hits_settled(&server.metrics, 2).await, 2);
}

/// The answer-cache hit count once it reaches `want`, or after a second whatever it is.
async fn hits_settled(metrics: &DnsMetrics, want: u64) -> u64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    loop {
        let hits = metrics.answer_cache_hits();
        if hits >= want || tokio::time::Instant::now() >= deadline {
            return hits;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
