//! Helpers shared by the integration tests of `lain dns`: starting the real binary against
//! a real etcd or state file, writing records the way the control plane does, and a small
//! DNS client over UDP and TCP built on hickory-proto's message codec.

#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use lain_state::{EndpointRecord, Keyspace, records};
use lain_test_support::LainProcess;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// A running `lain dns` and what it was started with.
pub struct Dns {
    pub process: LainProcess,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub keyspace: Keyspace,
    pub dir: tempfile::TempDir,
}

impl Dns {
    /// Starts `lain dns` reading `etcd` under `prefix`, with `extra` TOML appended.
    pub fn start_etcd(etcd: &[String], prefix: &str, extra: &str) -> Dns {
        let endpoints = etcd
            .iter()
            .map(|e| format!("{e:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        let state = format!("[state]\netcd_endpoints = [{endpoints}]\nprefix = {prefix:?}\n");
        Dns::start(&state, extra, Keyspace::new(prefix))
    }

    /// Starts `lain dns` in standalone mode from a state file.
    pub fn start_file(state_file: &std::path::Path, extra: &str) -> Dns {
        let state = format!("[state]\nfile = {:?}\n", state_file.display().to_string());
        Dns::start(&state, extra, Keyspace::default())
    }

    fn start(state: &str, extra: &str, keyspace: Keyspace) -> Dns {
        let dir = tempfile::tempdir().expect("tempdir");
        let path: PathBuf = dir.path().join("dns.toml");
        // Top-level keys first, then tables, as TOML requires.
        let (top, tables) = match extra.find("\n[").or(extra.starts_with('[').then_some(0)) {
            Some(i) => extra.split_at(i),
            None => (extra, ""),
        };
        let text = format!(
            "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nudp_sockets = 2\nworker_threads = 2\n{top}\n{state}\n{tables}\n"
        );
        std::fs::write(&path, text).expect("write config");
        let process = LainProcess::spawn(
            &["dns", "-c", path.to_str().expect("utf-8 path")],
            &[("LAIN_LOG", "warn")],
            &["dns", "admin"],
        );
        let addr = process.addr("dns");
        let admin = process.addr("admin");
        Dns {
            process,
            addr,
            admin,
            keyspace,
            dir,
        }
    }

    /// The body of an admin page.
    pub async fn admin_get(&self, path: &str) -> String {
        http_get(self.admin, path).await
    }
}

/// A plain HTTP/1.0 GET, enough for the admin listener.
pub async fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect admin");
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
        .await
        .expect("admin answered in time")
        .expect("read");
    out
}

/// The value of one sample line of a Prometheus text page, 0 when absent.
pub fn metric(page: &str, series: &str) -> f64 {
    page.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// An endpoint record as the control plane writes it.
pub fn endpoint(app: &str, proc_name: &str, n: u32, addr: &str, port: u16) -> EndpointRecord {
    EndpointRecord {
        v: records::SCHEMA_VERSION,
        app: app.into(),
        proc_name: proc_name.into(),
        proc_type: "web".into(),
        instance: n,
        node: "node1".into(),
        address: addr.parse().expect("address"),
        port,
        ports: BTreeMap::from([("http".to_string(), port)]),
        healthy: true,
        version: "1".into(),
        container_id: format!("c{n}"),
    }
}

/// Options of one query.
#[derive(Debug, Clone, Copy)]
pub struct Opts {
    pub edns: Option<u16>,
    pub tcp: bool,
    pub rd: bool,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            edns: Some(1232),
            tcp: false,
            rd: true,
        }
    }
}

/// Builds the wire form of a query.
pub fn query_bytes(name: &str, t: RecordType, opts: Opts) -> Vec<u8> {
    let mut m = Message::new(rand::random(), MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = opts.rd;
    m.add_query(Query::query(Name::from_ascii(name).expect("name"), t));
    if let Some(size) = opts.edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        m.set_edns(e);
    }
    m.to_vec().expect("encode query")
}

/// Sends raw bytes over UDP from `bind` and waits up to 2 s for one datagram back.
pub async fn udp_raw_from(bind: IpAddr, server: SocketAddr, bytes: &[u8]) -> Option<Vec<u8>> {
    let sock = UdpSocket::bind(SocketAddr::new(bind, 0))
        .await
        .expect("bind");
    sock.send_to(bytes, server).await.expect("send");
    let mut buf = vec![0u8; 65_535];
    match tokio::time::timeout(Duration::from_secs(2), sock.recv_from(&mut buf)).await {
        Ok(Ok((n, _))) => Some(buf[..n].to_vec()),
        _ => None,
    }
}

/// Sends raw bytes over UDP and waits for one datagram back.
pub async fn udp_raw(server: SocketAddr, bytes: &[u8]) -> Option<Vec<u8>> {
    udp_raw_from("127.0.0.1".parse().expect("ip"), server, bytes).await
}

/// Sends one length-prefixed message over a fresh TCP connection and reads one back.
pub async fn tcp_raw(server: SocketAddr, bytes: &[u8]) -> Option<Vec<u8>> {
    let fut = async {
        let mut s = TcpStream::connect(server).await.ok()?;
        let len = u16::try_from(bytes.len()).ok()?;
        s.write_all(&len.to_be_bytes()).await.ok()?;
        s.write_all(bytes).await.ok()?;
        let mut lb = [0u8; 2];
        s.read_exact(&mut lb).await.ok()?;
        let mut buf = vec![0u8; u16::from_be_bytes(lb) as usize];
        s.read_exact(&mut buf).await.ok()?;
        Some(buf)
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .ok()
        .flatten()
}

/// Asks one question and decodes the answer; panics when none comes.
pub async fn ask(server: SocketAddr, name: &str, t: RecordType, opts: Opts) -> Message {
    let q = query_bytes(name, t, opts);
    let raw = if opts.tcp {
        tcp_raw(server, &q).await
    } else {
        udp_raw(server, &q).await
    };
    let raw = raw.unwrap_or_else(|| panic!("no answer to {name} {t}"));
    Message::from_vec(&raw).expect("decode answer")
}

/// The addresses in an answer section, sorted.
pub fn addresses(m: &Message) -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = m
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect();
    v.sort();
    v
}

/// Whether an answer has this code and, for NOERROR, these addresses.
pub fn is(m: &Message, rcode: ResponseCode, addrs: &[&str]) -> bool {
    let want: Vec<IpAddr> = addrs.iter().map(|a| a.parse().expect("ip")).collect();
    m.metadata.response_code == rcode && addresses(m) == want
}

/// Puts a record under `key`.
pub async fn put(client: &mut etcd_client::Client, key: &str, value: Vec<u8>) {
    client.put(key, value, None).await.expect("etcd put");
}

/// Puts an endpoint record under its key, as the control plane does.
pub async fn put_endpoint(client: &mut etcd_client::Client, ks: &Keyspace, e: &EndpointRecord) {
    put(
        client,
        &ks.endpoint(&e.app, &e.proc_name, e.instance),
        records::encode(e),
    )
    .await;
}

/// Asks for `name` until the answer has `rcode` and exactly `addrs` (in any order for more
/// than one), failing the test after `within`.
pub async fn wait_answer(
    server: SocketAddr,
    name: &str,
    t: RecordType,
    rcode: ResponseCode,
    addrs: &[&str],
    within: Duration,
) -> Message {
    let mut want: Vec<IpAddr> = addrs.iter().map(|a| a.parse().expect("ip")).collect();
    want.sort();
    lain_test_support::eventually(within, name, || {
        let want = want.clone();
        async move {
            let m = ask(server, name, t, Opts::default()).await;
            let mut got = addresses(&m);
            got.sort();
            (m.metadata.response_code == rcode && got == want).then_some(m)
        }
    })
    .await
}

/// Deletes everything under the test's prefix.
pub async fn cleanup(client: &mut etcd_client::Client, prefix: &str) {
    let opts = etcd_client::DeleteOptions::new().with_prefix();
    let _ = client.delete(format!("{prefix}/"), Some(opts)).await;
}
