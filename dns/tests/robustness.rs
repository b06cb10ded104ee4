//! Bad input and faults: malformed packets, oversized names, unknown opcodes, missing or
//! extra questions, ANY; configuration checking; SIGTERM; and answers that keep coming
//! while the etcd leader of a three-member cluster is killed.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{RData, RecordType};
use lain_state::records;
use lain_test_support::{
    etcd_client, eventually, require_etcd, require_etcd_cluster, run_lain, unique_prefix,
};

const WAIT: Duration = Duration::from_secs(10);

fn state_file(dir: &std::path::Path) -> std::path::PathBuf {
    let p = dir.join("state.yaml");
    std::fs::write(
        &p,
        "endpoints:\n  - {app: hello, proc: web, instance: 1, address: 127.0.20.1, port: 80}\n",
    )
    .expect("write state");
    p
}

/// A header: id 0x1234, flags, and the four section counts.
fn header(flags: u16, qd: u16, an: u16, ns: u16, ar: u16) -> Vec<u8> {
    let mut v = vec![0x12, 0x34];
    for x in [flags, qd, an, ns, ar] {
        v.extend_from_slice(&x.to_be_bytes());
    }
    v
}

fn question(labels: &[&[u8]]) -> Vec<u8> {
    let mut v = Vec::new();
    for l in labels {
        v.push(l.len() as u8);
        v.extend_from_slice(l);
    }
    v.push(0);
    v.extend_from_slice(&1u16.to_be_bytes()); // A
    v.extend_from_slice(&1u16.to_be_bytes()); // IN
    v
}

fn rcode_of(raw: &[u8]) -> u8 {
    raw[3] & 0x0f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_packets_get_formerr_notimp_or_nothing_and_never_crash() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dns = Dns::start_file(&state_file(tmp.path()), "");
    wait_answer(
        dns.addr,
        "web-1.hello.lain.",
        RecordType::A,
        ResponseCode::NoError,
        &["127.0.20.1"],
        WAIT,
    )
    .await;

    let ok_q = question(&[b"web-1", b"hello", b"lain"]);
    let rd = 0x0100;

    // No question: FORMERR.
    let raw = udp_raw(dns.addr, &header(rd, 0, 0, 0, 0))
        .await
        .expect("answer");
    assert_eq!(rcode_of(&raw), 1, "no question");
    // Two questions: FORMERR.
    let mut two = header(rd, 2, 0, 0, 0);
    two.extend(&ok_q);
    two.extend(&ok_q);
    let raw = udp_raw(dns.addr, &two).await.expect("answer");
    assert_eq!(rcode_of(&raw), 1, "two questions");
    assert_eq!(&raw[4..6], &[0, 0], "FORMERR to two questions echoes none");
    // Unknown opcode 3: NOTIMP.
    let mut op3 = header(rd | (3 << 11), 1, 0, 0, 0);
    op3.extend(&ok_q);
    let raw = udp_raw(dns.addr, &op3).await.expect("answer");
    assert_eq!(rcode_of(&raw), 4, "unknown opcode");
    // A name over 255 octets: FORMERR.
    let l63 = [b'a'; 63];
    let mut long = header(rd, 1, 0, 0, 0);
    long.extend(question(&[&l63, &l63, &l63, &l63, &l63]));
    let raw = udp_raw(dns.addr, &long).await.expect("answer");
    assert_eq!(rcode_of(&raw), 1, "long name");
    // A label over 63 octets (its length byte reads as a reserved label type): FORMERR.
    let l64 = [b'b'; 64];
    let mut label = header(rd, 1, 0, 0, 0);
    label.extend(question(&[&l64, b"lain"]));
    let raw = udp_raw(dns.addr, &label).await.expect("answer");
    assert_eq!(rcode_of(&raw), 1, "long label");
    // A question cut short: FORMERR.
    let mut cut = header(rd, 1, 0, 0, 0);
    cut.extend(&ok_q[..5]);
    let raw = udp_raw(dns.addr, &cut).await.expect("answer");
    assert_eq!(rcode_of(&raw), 1, "cut question");
    // A compression pointer loop: FORMERR.
    let mut lp = header(rd, 1, 0, 0, 0);
    lp.extend([0xc0, 12, 0, 1, 0, 1]);
    let raw = udp_raw(dns.addr, &lp).await.expect("answer");
    assert_eq!(rcode_of(&raw), 1, "pointer loop");
    // Garbage shorter than a header, and a response sent to us: dropped.
    assert!(udp_raw(dns.addr, &[1, 2, 3]).await.is_none());
    let mut resp = header(0x8000, 1, 0, 0, 0);
    resp.extend(&ok_q);
    assert!(udp_raw(dns.addr, &resp).await.is_none());
    // Random bytes, many times, over UDP and TCP: answered or dropped, never fatal.
    for i in 0..300u32 {
        let len = 12 + (i as usize * 7) % 300;
        let bytes: Vec<u8> = (0..len).map(|_| rand::random()).collect();
        let _ = tokio::time::timeout(Duration::from_millis(50), udp_raw(dns.addr, &bytes)).await;
        if i % 30 == 0 {
            let _ = tcp_raw(dns.addr, &bytes).await;
        }
    }
    // EDNS version 1: BADVERS.
    let mut q = Message::from_vec(&query_bytes(
        "web-1.hello.lain.",
        RecordType::A,
        Opts::default(),
    ))
    .expect("decode");
    if let Some(e) = q.edns.as_mut() {
        e.set_version(1);
    }
    let raw = udp_raw(dns.addr, &q.to_vec().expect("encode"))
        .await
        .expect("answer");
    let m = Message::from_vec(&raw).expect("decode");
    // Code 16 is BADVERS with OPT and BADSIG with TSIG; the decoder names it the latter.
    assert_eq!(u16::from(m.metadata.response_code), 16, "{m:?}");
    // ANY: one small HINFO record (RFC 8482).
    let m = ask(
        dns.addr,
        "web-1.hello.lain.",
        RecordType::ANY,
        Opts::default(),
    )
    .await;
    assert_eq!(m.answers.len(), 1);
    assert!(matches!(m.answers[0].data, RData::HINFO(_)));
    // AXFR is refused.
    let m = ask(
        dns.addr,
        "lain.",
        RecordType::AXFR,
        Opts {
            tcp: true,
            ..Opts::default()
        },
    )
    .await;
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    // Names outside the zones with forwarding off: REFUSED.
    let m = ask(dns.addr, "example.com.", RecordType::A, Opts::default()).await;
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);

    // Still alive and correct.
    let m = ask(
        dns.addr,
        "web-1.hello.lain.",
        RecordType::A,
        Opts {
            tcp: true,
            ..Opts::default()
        },
    )
    .await;
    assert!(is(&m, ResponseCode::NoError, &["127.0.20.1"]));
    let page = dns.admin_get("/metrics").await;
    assert!(
        metric(
            &page,
            "lain_dns_queries_total{qtype=\"none\",rcode=\"FORMERR\"}"
        ) >= 1.0,
        "{page}"
    );
}

#[test]
fn check_config_exits_zero_or_64_with_every_error() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let good = tmp.path().join("good.toml");
    std::fs::write(
        &good,
        "listen = \"127.0.0.1:5353\"\n[zone]\ndomains = [\"lain\", \"lain.local\"]\n",
    )
    .expect("write");
    let (code, _, err) = run_lain(
        &["dns", "--check-config", "-c", good.to_str().expect("path")],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let bad = tmp.path().join("bad.toml");
    std::fs::write(&bad, "listen = \"nope\"\nwhat = 1\n[zone]\nttl_secs = -1\n").expect("write");
    let (code, _, err) = run_lain(
        &["dns", "--check-config", "-c", bad.to_str().expect("path")],
        None,
    );
    assert_eq!(code, 64, "{err}");
    assert!(
        err.contains("listen") && err.contains("what") && err.contains("zone.ttl_secs"),
        "{err}"
    );
    assert!(err.contains("bad.toml:1:"), "located: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_zero() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut dns = Dns::start_file(&state_file(tmp.path()), "");
    let _ = ask(
        dns.addr,
        "web-1.hello.lain.",
        RecordType::A,
        Opts::default(),
    )
    .await;
    let status = dns
        .process
        .terminate(Duration::from_secs(10))
        .expect("exited in time");
    assert!(status.success(), "{status:?}");
}

/// Brings a killed etcd member back even when the test fails half-way.
struct RestartMember(u32);

impl Drop for RestartMember {
    fn drop(&mut self) {
        let status = Command::new(etcd_script())
            .args(["start-member", &self.0.to_string()])
            .status();
        assert!(
            matches!(status, Ok(s) if s.success()),
            "could not restart etcd member {}",
            self.0
        );
    }
}

fn etcd_script() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/services/etcd.sh")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_continue_while_the_etcd_leader_is_killed() {
    let cluster = require_etcd_cluster();
    let prefix = unique_prefix("dns-leader");
    let mut client = etcd_client(&cluster).await;
    let dns = Dns::start_etcd(&cluster, &prefix, "");
    let ks = dns.keyspace.clone();
    let e = endpoint("hello", "web", 1, "127.0.21.1", 80);
    put_endpoint(&mut client, &ks, &e).await;
    wait_answer(
        dns.addr,
        "web-1.hello.lain.",
        RecordType::A,
        ResponseCode::NoError,
        &["127.0.21.1"],
        WAIT,
    )
    .await;

    let out = Command::new(etcd_script())
        .arg("leader")
        .output()
        .expect("etcd.sh leader");
    let leader: u32 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("leader number");
    let kill = Command::new(etcd_script())
        .args(["kill-member", &leader.to_string()])
        .status()
        .expect("kill-member");
    assert!(kill.success());
    let _restart = RestartMember(leader);

    // Every query during the election and after it is answered from the last zone.
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut answered = 0;
    while Instant::now() < deadline {
        let m = ask(
            dns.addr,
            "web-1.hello.lain.",
            RecordType::A,
            Opts::default(),
        )
        .await;
        assert!(is(&m, ResponseCode::NoError, &["127.0.21.1"]), "{m:?}");
        answered += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(answered > 50, "{answered}");

    // A write through the surviving members reaches the server: the watch resumed.
    let survivors: Vec<String> = cluster
        .iter()
        .enumerate()
        .filter(|(i, _)| *i as u32 + 1 != leader)
        .map(|(_, u)| u.clone())
        .collect();
    let mut client2 = etcd_client(&survivors).await;
    let e2 = endpoint("hello", "web", 2, "127.0.21.2", 80);
    put(
        &mut client2,
        &ks.endpoint("hello", "web", 2),
        records::encode(&e2),
    )
    .await;
    eventually(
        Duration::from_secs(30),
        "record written after the kill",
        || async {
            let m = ask(dns.addr, "web.hello.lain.", RecordType::A, Opts::default()).await;
            is(&m, ResponseCode::NoError, &["127.0.21.1", "127.0.21.2"]).then_some(())
        },
    )
    .await;
    cleanup(&mut client2, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_file_changes_are_picked_up() {
    let _ = require_etcd; // Standalone mode needs no etcd.
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = state_file(tmp.path());
    let dns = Dns::start_file(&path, "");
    eventually(WAIT, "file served", || async {
        let m = ask(dns.addr, "web.hello.lain.", RecordType::A, Opts::default()).await;
        is(&m, ResponseCode::NoError, &["127.0.20.1"]).then_some(())
    })
    .await;
    std::fs::write(
        &path,
        "endpoints:\n  - {app: hello, proc: web, instance: 1, address: 127.0.20.1, port: 80}\n  - {app: hello, proc: web, instance: 2, address: 127.0.20.2, port: 80}\n",
    )
    .expect("rewrite");
    eventually(WAIT, "file change served", || async {
        let m = ask(dns.addr, "web.hello.lain.", RecordType::A, Opts::default()).await;
        is(&m, ResponseCode::NoError, &["127.0.20.1", "127.0.20.2"]).then_some(())
    })
    .await;
}

/// Every input the fuzzer ever found a fault with (kept in `dns/fuzz/regressions`) gets an
/// answer that decodes, or no answer at all, from the real server over UDP and TCP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuzz_regressions_get_decodable_answers() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dns = Dns::start_file(&state_file(tmp.path()), "");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions");
    let mut inputs: Vec<_> = std::fs::read_dir(&dir)
        .expect("regressions directory")
        .map(|e| e.expect("entry").path())
        .collect();
    inputs.sort();
    assert!(
        !inputs.is_empty(),
        "no regression inputs in {}",
        dir.display()
    );
    for path in inputs {
        let bytes = std::fs::read(&path).expect("read input");
        for (transport, raw) in [
            ("udp", udp_raw(dns.addr, &bytes).await),
            ("tcp", tcp_raw(dns.addr, &bytes).await),
        ] {
            let Some(raw) = raw else { continue };
            if let Err(e) = Message::from_vec(&raw) {
                panic!(
                    "{} over {transport}: answer does not decode ({e}): {raw:02x?}",
                    path.display()
                );
            }
            // Without EDNS a UDP answer is at most 512 octets, with it at most what the
            // server allows (1232 by default).
            if transport == "udp" {
                assert!(
                    raw.len() <= 1232,
                    "{}: UDP answer of {} octets",
                    path.display(),
                    raw.len()
                );
            }
        }
    }
}
