//! `lain dns` against a real etcd: records written the way the control plane writes them
//! appear in answers, change with health, and disappear when removed; negative answers,
//! truncation, PTR, services and views, and a malformed record in etcd.

mod common;

use std::time::Duration;

use common::*;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{RData, RecordType};
use lain_state::{AppRecord, DnsRecord, DnsType, ServiceRecord, records};
use lain_test_support::{etcd_client, eventually, require_etcd, unique_prefix};

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_resolves_by_instance_and_proc_name_and_srv_until_unhealthy_or_removed() {
    let etcd = require_etcd();
    let prefix = unique_prefix("dns-instance");
    let mut client = etcd_client(&etcd).await;
    let dns = Dns::start_etcd(&etcd, &prefix, "");
    let ks = &dns.keyspace;

    let mut e1 = endpoint("hello", "web", 1, "127.0.10.1", 8081);
    let e2 = endpoint("hello", "web", 2, "127.0.10.2", 8082);
    put_endpoint(&mut client, ks, &e1).await;
    put_endpoint(&mut client, ks, &e2).await;

    eventually(WAIT, "per-proc name with both instances", || async {
        let m = ask(dns.addr, "web.hello.lain.", RecordType::A, Opts::default()).await;
        is(&m, ResponseCode::NoError, &["127.0.10.1", "127.0.10.2"]).then_some(())
    })
    .await;
    let m = ask(
        dns.addr,
        "web-1.hello.lain.",
        RecordType::A,
        Opts::default(),
    )
    .await;
    assert!(is(&m, ResponseCode::NoError, &["127.0.10.1"]), "{m:?}");
    assert!(m.metadata.authoritative);
    assert_eq!(m.answers[0].ttl, 5, "default TTL");
    let m = ask(
        dns.addr,
        "_http._tcp.web.hello.lain.",
        RecordType::SRV,
        Opts::default(),
    )
    .await;
    let mut srv: Vec<(u16, String)> = m
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::SRV(s) => Some((s.port, s.target.to_ascii())),
            _ => None,
        })
        .collect();
    srv.sort();
    assert_eq!(
        srv,
        vec![
            (8081, "web-1.hello.lain.".to_string()),
            (8082, "web-2.hello.lain.".to_string())
        ]
    );
    assert_eq!(m.additionals.len(), 2, "SRV targets' addresses ride along");

    // Marked unhealthy: gone from the per-proc name and SRV, kept under its own name.
    e1.healthy = false;
    put_endpoint(&mut client, ks, &e1).await;
    eventually(
        WAIT,
        "unhealthy instance out of the per-proc name",
        || async {
            let m = ask(dns.addr, "web.hello.lain.", RecordType::A, Opts::default()).await;
            is(&m, ResponseCode::NoError, &["127.0.10.2"]).then_some(())
        },
    )
    .await;
    let m = ask(
        dns.addr,
        "_http._tcp.web.hello.lain.",
        RecordType::SRV,
        Opts::default(),
    )
    .await;
    assert_eq!(m.answers.len(), 1, "{m:?}");

    // Removed: its own name is NXDOMAIN.
    client
        .delete(ks.endpoint("hello", "web", 1), None)
        .await
        .expect("delete");
    eventually(WAIT, "removed instance NXDOMAIN", || async {
        let m = ask(
            dns.addr,
            "web-1.hello.lain.",
            RecordType::A,
            Opts::default(),
        )
        .await;
        (m.metadata.response_code == ResponseCode::NXDomain).then_some(())
    })
    .await;
    cleanup(&mut client, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nxdomain_and_nodata_carry_the_soa_with_the_negative_ttl() {
    let etcd = require_etcd();
    let prefix = unique_prefix("dns-negative");
    let mut client = etcd_client(&etcd).await;
    let dns = Dns::start_etcd(
        &etcd,
        &prefix,
        "[zone]\ndomains = [\"lain\", \"lain.local\"]\n[zone.soa]\nminimum_secs = 7\nttl_secs = 60\n",
    );
    let ks = &dns.keyspace;
    let e = endpoint("hello", "web", 1, "127.0.11.1", 80);
    put_endpoint(&mut client, ks, &e).await;
    wait_answer(
        dns.addr,
        "web-1.hello.lain.local.",
        RecordType::A,
        ResponseCode::NoError,
        &["127.0.11.1"],
        WAIT,
    )
    .await;

    let nx = ask(
        dns.addr,
        "web-7.hello.lain.",
        RecordType::A,
        Opts::default(),
    )
    .await;
    assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);
    assert!(nx.answers.is_empty());
    let soa = &nx.authorities[0];
    assert_eq!(soa.record_type(), RecordType::SOA);
    assert_eq!(soa.name.to_ascii(), "lain.");
    assert_eq!(soa.ttl, 7, "negative TTL is the SOA minimum");

    let nodata = ask(
        dns.addr,
        "web-1.hello.lain.local.",
        RecordType::AAAA,
        Opts::default(),
    )
    .await;
    assert_eq!(nodata.metadata.response_code, ResponseCode::NoError);
    assert!(nodata.answers.is_empty());
    assert_eq!(nodata.authorities[0].record_type(), RecordType::SOA);
    assert_eq!(nodata.authorities[0].name.to_ascii(), "lain.local.");

    // The apex answers SOA and NS itself.
    let soa = ask(dns.addr, "lain.", RecordType::SOA, Opts::default()).await;
    assert_eq!(soa.answers.len(), 1);
    assert_eq!(soa.answers[0].ttl, 60);
    let ns = ask(dns.addr, "lain.local.", RecordType::NS, Opts::default()).await;
    assert_eq!(ns.answers[0].record_type(), RecordType::NS);
    cleanup(&mut client, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_answer_is_truncated_over_udp_and_whole_over_tcp() {
    let etcd = require_etcd();
    let prefix = unique_prefix("dns-tc");
    let mut client = etcd_client(&etcd).await;
    let dns = Dns::start_etcd(&etcd, &prefix, "");
    let ks = &dns.keyspace;
    for n in 1..=100u32 {
        let e = endpoint("big", "web", n, &format!("127.0.12.{n}"), 80);
        put_endpoint(&mut client, ks, &e).await;
    }
    eventually(WAIT, "all 100 instances over TCP", || async {
        let m = ask(
            dns.addr,
            "web.big.lain.",
            RecordType::A,
            Opts {
                tcp: true,
                ..Opts::default()
            },
        )
        .await;
        (m.answers.len() == 100 && !m.metadata.truncation).then_some(())
    })
    .await;
    // Plain DNS over UDP: 512 octets.
    let m = ask(
        dns.addr,
        "web.big.lain.",
        RecordType::A,
        Opts {
            edns: None,
            ..Opts::default()
        },
    )
    .await;
    assert!(m.metadata.truncation, "TC set without EDNS");
    assert!(m.answers.len() < 100);
    // EDNS 4096 is capped at the configured 1232.
    let raw = udp_raw(
        dns.addr,
        &query_bytes(
            "web.big.lain.",
            RecordType::A,
            Opts {
                edns: Some(4096),
                ..Opts::default()
            },
        ),
    )
    .await
    .expect("answer");
    assert!(raw.len() <= 1232, "{} octets", raw.len());
    let m = hickory_proto::op::Message::from_vec(&raw).expect("decode");
    assert!(m.metadata.truncation);
    assert!(m.edns.is_some(), "EDNS answered with EDNS");
    // An answer is counted just after it is sent, so the count can trail the client by a
    // moment.
    eventually(WAIT, "both truncated answers counted", || async {
        let page = dns.admin_get("/metrics").await;
        (metric(&page, "lain_dns_truncated_total") >= 2.0).then_some(())
    })
    .await;
    cleanup(&mut client, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ptr_points_at_the_instance_name() {
    let etcd = require_etcd();
    let prefix = unique_prefix("dns-ptr");
    let mut client = etcd_client(&etcd).await;
    let dns = Dns::start_etcd(
        &etcd,
        &prefix,
        "[zone]\nreverse_zones = [\"127.in-addr.arpa\"]\n",
    );
    let ks = &dns.keyspace;
    let e = endpoint("resource.redis.hello", "redis", 3, "127.0.13.7", 6379);
    put_endpoint(&mut client, ks, &e).await;
    let m = eventually(WAIT, "PTR", || async {
        let m = ask(
            dns.addr,
            "7.13.0.127.in-addr.arpa.",
            RecordType::PTR,
            Opts::default(),
        )
        .await;
        (!m.answers.is_empty()).then_some(m)
    })
    .await;
    match &m.answers[0].data {
        RData::PTR(p) => assert_eq!(p.0.to_ascii(), "redis-3.hello.redis.resource.lain."),
        other => panic!("not a PTR: {other:?}"),
    }
    let nx = ask(
        dns.addr,
        "8.13.0.127.in-addr.arpa.",
        RecordType::PTR,
        Opts::default(),
    )
    .await;
    assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(nx.authorities[0].name.to_ascii(), "127.in-addr.arpa.");
    cleanup(&mut client, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_static_records_ingress_and_per_client_views() {
    let etcd = require_etcd();
    let prefix = unique_prefix("dns-views");
    let mut client = etcd_client(&etcd).await;
    let dns = Dns::start_etcd(&etcd, &prefix, "[views]\nenabled = true\n");
    let ks = &dns.keyspace;
    let app = |name: &str, uses: &[(&str, &str)]| AppRecord {
        v: records::SCHEMA_VERSION,
        name: name.into(),
        apptype: "app".into(),
        version: "1".into(),
        use_services: uses
            .iter()
            .map(|(p, s)| (p.to_string(), vec![s.to_string()]))
            .collect(),
        use_resources: Default::default(),
        spec: serde_json::Value::Null,
    };
    put(
        &mut client,
        &ks.app("client"),
        records::encode(&app("client", &[("redis-app", "redis")])),
    )
    .await;
    put(
        &mut client,
        &ks.app("stranger"),
        records::encode(&app("stranger", &[])),
    )
    .await;
    let svc = ServiceRecord {
        v: records::SCHEMA_VERSION,
        app: "redis-app".into(),
        service: "redis".into(),
        proc_name: "redis".into(),
        portal: None,
        allow_clients: vec![],
    };
    put(
        &mut client,
        &ks.service("redis-app", "redis"),
        records::encode(&svc),
    )
    .await;
    for (app_name, proc_name, addr) in [
        ("redis-app", "redis", "127.0.14.1"),
        ("client", "web", "127.0.14.2"),
        ("stranger", "web", "127.0.14.3"),
    ] {
        let e = endpoint(app_name, proc_name, 1, addr, 80);
        put_endpoint(&mut client, ks, &e).await;
    }
    let txt = DnsRecord {
        v: records::SCHEMA_VERSION,
        name: "info.lain".into(),
        rtype: DnsType::Txt,
        data: "cluster=test".into(),
        ttl_secs: Some(30),
    };
    put(
        &mut client,
        &ks.dns("info.lain", "1"),
        records::encode(&txt),
    )
    .await;
    let ingress = lain_state::IngressRecord {
        v: records::SCHEMA_VERSION,
        addresses: vec!["127.0.14.100".parse().expect("ip")],
    };
    put(&mut client, &ks.ingress("edge"), records::encode(&ingress)).await;

    // The stranger's instance must be in the served zone before its view is checked;
    // until then its address is unknown, and unknown addresses see every service.
    wait_answer(
        dns.addr,
        "web-1.stranger.lain.",
        RecordType::A,
        ResponseCode::NoError,
        &["127.0.14.3"],
        WAIT,
    )
    .await;
    // The TXT and ingress records were written after it; the zone takes etcd's changes in
    // order, so once the last of them (the ingress) answers, every record above is served.
    wait_answer(
        dns.addr,
        "client.lain.",
        RecordType::A,
        ResponseCode::NoError,
        &["127.0.14.100"],
        WAIT,
    )
    .await;
    let q = query_bytes("redis.client.lain.", RecordType::A, Opts::default());
    // From the client's own instance, and from an unknown address: the service resolves.
    for from in ["127.0.14.2", "127.0.0.1"] {
        let raw = eventually(WAIT, "service name from a client", || async {
            let raw = udp_raw_from(from.parse().expect("ip"), dns.addr, &q).await?;
            let m = hickory_proto::op::Message::from_vec(&raw).ok()?;
            is(&m, ResponseCode::NoError, &["127.0.14.1"]).then_some(m)
        })
        .await;
        assert!(raw.metadata.authoritative);
    }
    // From another app's instance: NXDOMAIN.
    let raw = udp_raw_from("127.0.14.3".parse().expect("ip"), dns.addr, &q)
        .await
        .expect("answer");
    let m = hickory_proto::op::Message::from_vec(&raw).expect("decode");
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);

    let m = ask(dns.addr, "info.lain.", RecordType::TXT, Opts::default()).await;
    assert_eq!(m.answers.len(), 1);
    assert_eq!(m.answers[0].ttl, 30);
    let m = ask(dns.addr, "client.lain.", RecordType::A, Opts::default()).await;
    assert!(is(&m, ResponseCode::NoError, &["127.0.14.100"]), "{m:?}");
    let m = ask(dns.addr, "whatever.lain.", RecordType::A, Opts::default()).await;
    assert!(is(&m, ResponseCode::NoError, &["127.0.14.100"]), "{m:?}");
    cleanup(&mut client, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_record_in_etcd_is_skipped_and_counted() {
    let etcd = require_etcd();
    let prefix = unique_prefix("dns-malformed");
    let mut client = etcd_client(&etcd).await;
    let dns = Dns::start_etcd(&etcd, &prefix, "");
    let ks = &dns.keyspace;
    let good = endpoint("ok", "web", 1, "127.0.15.1", 80);
    put_endpoint(&mut client, ks, &good).await;
    put(
        &mut client,
        &ks.endpoint("bad", "web", 1),
        b"{not json".to_vec(),
    )
    .await;
    put(
        &mut client,
        &ks.endpoint("bad", "web", 2),
        br#"{"v":9,"app":"bad","proc":"web","instance":2,"address":"127.0.15.2","port":80}"#
            .to_vec(),
    )
    .await;
    eventually(WAIT, "good record served", || async {
        let m = ask(dns.addr, "web-1.ok.lain.", RecordType::A, Opts::default()).await;
        is(&m, ResponseCode::NoError, &["127.0.15.1"]).then_some(())
    })
    .await;
    eventually(WAIT, "bad records counted", || async {
        let page = dns.admin_get("/metrics").await;
        (metric(
            &page,
            "lain_state_invalid_records_total{kind=\"endpoints\"}",
        ) >= 2.0)
            .then_some(())
    })
    .await;
    let m = ask(dns.addr, "web-2.bad.lain.", RecordType::A, Opts::default()).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    cleanup(&mut client, &prefix).await;
}
