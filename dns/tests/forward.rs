//! Forwarding: names outside the cluster zones go to a real upstream (Debian's Unbound
//! serving a test zone on loopback), answers are cached, and clients outside the allowed
//! networks are refused.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RecordType;
use lain_test_support::{eventually, free_port};

/// An Unbound process this test started; killed by pid when dropped.
struct Unbound {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Unbound {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts Unbound on a free port. Another test may take the port between the check and
/// Unbound's bind; Unbound then exits at once, and a new port is tried.
fn start_unbound() -> Unbound {
    for _ in 0..5 {
        let mut u = start_unbound_once();
        std::thread::sleep(Duration::from_millis(300));
        match u.child.try_wait() {
            Ok(None) => return u,
            status => eprintln!(
                "unbound on port {} exited early ({status:?}); retrying",
                u.port
            ),
        }
    }
    panic!("unbound did not stay up on any of 5 ports");
}

fn start_unbound_once() -> Unbound {
    let bin = ["/usr/sbin/unbound", "/usr/bin/unbound"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or_else(|| panic!("unbound is not installed: apt-get install unbound"));
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let conf = dir.path().join("unbound.conf");
    std::fs::write(
        &conf,
        format!(
            r#"server:
  interface: 127.0.0.1
  port: {port}
  do-daemonize: no
  use-syslog: no
  logfile: ""
  username: ""
  chroot: ""
  pidfile: ""
  directory: "{dir}"
  do-ip6: no
  access-control: 127.0.0.0/8 allow
  module-config: "iterator"
  local-zone: "example.test." static
  local-data: "example.test. 60 IN SOA ns.example.test. admin.example.test. 1 60 60 600 30"
  local-data: "www.example.test. 60 IN A 192.0.2.10"
  local-data: "www.example.test. 60 IN TXT \"from unbound\""
remote-control:
  control-enable: no
"#,
            dir = dir.path().display()
        ),
    )
    .expect("write unbound.conf");
    let child = Command::new(bin)
        .args(["-d", "-c", conf.to_str().expect("path")])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn unbound");
    Unbound {
        child,
        port,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_to_unbound_caches_and_refuses_other_networks() {
    let unbound = start_unbound();
    let upstream: std::net::SocketAddr = ([127, 0, 0, 1], unbound.port).into();
    eventually(Duration::from_secs(10), "unbound answering", || async {
        let raw = udp_raw(
            upstream,
            &query_bytes("www.example.test.", RecordType::A, Opts::default()),
        )
        .await?;
        let m = Message::from_vec(&raw).ok()?;
        (!m.answers.is_empty()).then_some(())
    })
    .await;

    let tmp = tempfile::tempdir().expect("tempdir");
    let state = tmp.path().join("state.yaml");
    std::fs::write(
        &state,
        "endpoints:\n  - {app: hello, proc: web, instance: 1, address: 127.0.30.1, port: 80}\n",
    )
    .expect("write");
    let dns = Dns::start_file(
        &state,
        &format!(
            "[forward]\nupstreams = [\"{upstream}\"]\nallowed_networks = [\"127.0.0.1/32\"]\ntimeout_ms = 300\n"
        ),
    );
    let m = ask(
        dns.addr,
        "www.example.test.",
        RecordType::A,
        Opts::default(),
    )
    .await;
    assert!(is(&m, ResponseCode::NoError, &["192.0.2.10"]), "{m:?}");
    assert!(m.metadata.recursion_available);
    assert!(!m.metadata.authoritative);
    let m = ask(
        dns.addr,
        "www.example.test.",
        RecordType::A,
        Opts::default(),
    )
    .await;
    assert!(is(&m, ResponseCode::NoError, &["192.0.2.10"]), "{m:?}");
    let m = ask(
        dns.addr,
        "www.example.test.",
        RecordType::TXT,
        Opts {
            tcp: true,
            ..Opts::default()
        },
    )
    .await;
    assert_eq!(m.answers.len(), 1, "{m:?}");
    let nx = ask(
        dns.addr,
        "nope.example.test.",
        RecordType::A,
        Opts::default(),
    )
    .await;
    assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain, "{nx:?}");
    assert_eq!(
        nx.authorities.first().map(|r| r.record_type()),
        Some(RecordType::SOA)
    );
    let page = dns.admin_get("/metrics").await;
    assert!(
        metric(&page, "lain_dns_forward_queries_total{cache=\"hit\"}") >= 1.0,
        "{page}"
    );

    // A client outside the allowed networks may not recurse, but gets cluster answers.
    let other = "127.0.0.2".parse().expect("ip");
    let q = query_bytes("www.example.test.", RecordType::A, Opts::default());
    let m = Message::from_vec(&udp_raw_from(other, dns.addr, &q).await.expect("answer"))
        .expect("decode");
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    let q = query_bytes("web-1.hello.lain.", RecordType::A, Opts::default());
    let m = Message::from_vec(&udp_raw_from(other, dns.addr, &q).await.expect("answer"))
        .expect("decode");
    assert!(is(&m, ResponseCode::NoError, &["127.0.30.1"]), "{m:?}");
    assert!(!m.metadata.recursion_available);

    // Upstream gone: SERVFAIL for uncached names, counted; cached ones still answered.
    drop(unbound);
    let m = ask(
        dns.addr,
        "other.example.test.",
        RecordType::A,
        Opts::default(),
    )
    .await;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    let m = ask(
        dns.addr,
        "www.example.test.",
        RecordType::A,
        Opts::default(),
    )
    .await;
    assert!(is(&m, ResponseCode::NoError, &["192.0.2.10"]), "{m:?}");
    let page = dns.admin_get("/metrics").await;
    assert!(
        metric(&page, "lain_dns_forward_errors_total") >= 1.0,
        "{page}"
    );
}

/// A flood of new names towards an upstream that does not answer: at most
/// `max_in_flight` wait for it; the others get SERVFAIL at once instead of each holding a
/// task for the whole timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_waiting_for_a_silent_upstream_are_bounded() {
    // An upstream that reads queries and never answers.
    let silent = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let upstream = silent.local_addr().expect("addr");
    let sink = tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        while silent.recv_from(&mut buf).await.is_ok() {}
    });
    let tmp = tempfile::tempdir().expect("tempdir");
    let state = tmp.path().join("state.yaml");
    std::fs::write(&state, "endpoints: []\n").expect("write");
    let dns = Dns::start_file(
        &state,
        &format!(
            "[forward]\nupstreams = [\"{upstream}\"]\nallowed_networks = [\"127.0.0.1/32\"]\n\
             timeout_ms = 5000\nmax_in_flight = 3\n"
        ),
    );
    // Ten new names at once; `udp_raw` waits 2 s for each answer, far less than the
    // upstream timeout, so only the answers not waiting for the upstream arrive.
    let mut asks = tokio::task::JoinSet::new();
    for i in 0..10 {
        let q = query_bytes(
            &format!("n{i}.example.test."),
            RecordType::A,
            Opts::default(),
        );
        let addr = dns.addr;
        asks.spawn(async move { Message::from_vec(&udp_raw(addr, &q).await?).ok() });
    }
    let fast: Vec<Message> = asks.join_all().await.into_iter().flatten().collect();
    assert_eq!(fast.len(), 7, "{fast:?}");
    for m in &fast {
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    }
    let page = dns.admin_get("/metrics").await;
    assert!(
        metric(&page, "lain_dns_forward_queries_total{cache=\"busy\"}") >= 7.0,
        "{page}"
    );
    sink.abort();
}
