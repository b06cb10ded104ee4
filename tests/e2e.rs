//! The end-to-end test: every part of lain as a separate process against every real service.
//!
//! Two `lain controlplane` replicas, `lain proxy`, `lain dns` and one `lain logship` agent per
//! Docker engine run against the harness's etcd, both Docker engines, the loopback registry,
//! Kafka and OpenSearch. The demo app of `examples/hello` is built, pushed and deployed with
//! the `lain` CLI, then served, resolved, logged, crashed, rolled out under load, moved off a
//! stopped engine, and redeployed after its leading control plane is killed.
//!
//! One test function holds the whole story because each step builds on the cluster the step
//! before left behind. It stops and restarts the harness's second Docker engine, which is safe
//! because cargo runs test binaries one after another.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use lain_test_support::{
    LainProcess, lain_binary, require_docker_nodes, require_es, require_etcd, require_kafka,
    require_registry, temp_dir, unique_prefix,
};

/// Runs `lain ARGS` with the client configuration of this test; returns (code, stdout, stderr).
fn lain(
    config: &Path,
    args: &[&str],
    env: &[(&str, &str)],
    stdin: Option<&str>,
) -> (i32, String, String) {
    let mut cmd = Command::new(lain_binary());
    cmd.args(args)
        .env("LAIN_CONFIG", config)
        .env_remove("LAIN_SERVER")
        .env_remove("LAIN_TOKEN")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn lain");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write stdin");
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().expect("wait for lain");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Like [`lain`], but the command must succeed; returns its standard output.
fn lain_ok(config: &Path, args: &[&str], env: &[(&str, &str)], stdin: Option<&str>) -> String {
    let (code, out, err) = lain(config, args, env, stdin);
    assert_eq!(code, 0, "lain {args:?} failed with {code}:\n{out}\n{err}");
    out
}

/// One HTTP/1.1 request on a fresh connection; returns (status, body), or an error text.
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    host: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<(u16, String), String> {
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    s.write_all(body).map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| e.to_string())?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no complete header: {:?}", String::from_utf8_lossy(&raw)))?;
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("not an HTTP response: {head:?}"))?;
    let body = &raw[split + 4..];
    let chunked = head
        .lines()
        .any(|l| l.starts_with("transfer-encoding:") && l.contains("chunked"));
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_vec()
    };
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Joins the chunks of a chunked body (RFC 9112, section 7.1), ignoring extensions and
/// trailers.
fn dechunk(mut rest: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
        let line = String::from_utf8_lossy(&rest[..eol]);
        let size =
            usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16).unwrap_or(0);
        let data = &rest[eol + 2..];
        if size == 0 || data.len() < size {
            break;
        }
        out.extend_from_slice(&data[..size]);
        rest = data[size..].strip_prefix(b"\r\n").unwrap_or(&data[size..]);
    }
    out
}

/// A DNS query over UDP; returns (rcode, the IPv4 addresses in the answer section).
fn resolve_a(server: SocketAddr, name: &str) -> (u8, Vec<std::net::Ipv4Addr>) {
    let mut q = vec![0x4c, 0x61, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind udp");
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    sock.send_to(&q, server).expect("send query");
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).expect("DNS answer");
    let m = &buf[..n];
    let rcode = m[3] & 0x0f;
    let ancount = u16::from_be_bytes([m[6], m[7]]) as usize;
    // Skip the question (its name is ours, uncompressed), then walk the answers.
    let mut i = 12;
    while m[i] != 0 {
        i += 1 + m[i] as usize;
    }
    i += 5;
    let mut addrs = Vec::new();
    for _ in 0..ancount {
        // Names in answers are compression pointers or label sequences.
        loop {
            if m[i] & 0xc0 == 0xc0 {
                i += 2;
                break;
            }
            if m[i] == 0 {
                i += 1;
                break;
            }
            i += 1 + m[i] as usize;
        }
        let rtype = u16::from_be_bytes([m[i], m[i + 1]]);
        let len = u16::from_be_bytes([m[i + 8], m[i + 9]]) as usize;
        let data = &m[i + 10..i + 10 + len];
        if rtype == 1 && len == 4 {
            addrs.push(std::net::Ipv4Addr::new(data[0], data[1], data[2], data[3]));
        }
        i += 10 + len;
    }
    (rcode, addrs)
}

/// Polls `check` every 200 ms until it returns `Some`, or panics with `what` after `timeout`.
fn wait_for<T>(timeout: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Sends requests one after another through the proxy until stopped (at most 60,000 or
/// 300 s), counting answers that are not 200 and recording every body seen.
struct Traffic {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    failed: Arc<std::sync::Mutex<Vec<String>>>,
    bodies: Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Traffic {
    fn start(proxy: SocketAddr, host: String) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(std::sync::Mutex::new(Vec::new()));
        let bodies = Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::new()));
        let (s, n, f, b) = (stop.clone(), sent.clone(), failed.clone(), bodies.clone());
        let handle = std::thread::spawn(move || {
            let started = Instant::now();
            for _ in 0..60_000 {
                if s.load(Ordering::Relaxed) || started.elapsed() > Duration::from_secs(300) {
                    break;
                }
                n.fetch_add(1, Ordering::Relaxed);
                match http(proxy, "GET", "/", &host, &[], b"") {
                    Ok((200, body)) => {
                        b.lock().unwrap().insert(body.trim().to_string());
                    }
                    Ok((code, body)) => f.lock().unwrap().push(format!("{code}: {body}")),
                    Err(e) => f.lock().unwrap().push(e),
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Traffic {
            stop,
            sent,
            failed,
            bodies,
            handle: Some(handle),
        }
    }

    /// Waits (at most `limit`) until the loop itself received a body containing `text`.
    /// A probe of the test's own can see a new version first; the loop, which sleeps between
    /// requests, must then get its turn before it is stopped, or it never saw that version.
    fn wait_for_body(&self, text: &str, limit: Duration) {
        let started = Instant::now();
        while started.elapsed() < limit {
            if self.bodies.lock().unwrap().iter().any(|b| b.contains(text)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the loop; returns (requests sent, failures, distinct bodies).
    fn finish(mut self) -> (u64, Vec<String>, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            h.join().expect("traffic thread");
        }
        (
            self.sent.load(Ordering::Relaxed),
            self.failed.lock().unwrap().clone(),
            self.bodies.lock().unwrap().iter().cloned().collect(),
        )
    }
}

/// Cleans up what the test leaves on the shared services, also when it fails: the second
/// Docker engine is started again, containers of this cluster are removed, its keys and its
/// log indices deleted.
struct Cleanup {
    root: PathBuf,
    prefix: String,
    nodes: Vec<String>,
    etcd: String,
    es: SocketAddr,
    index_prefix: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(self.root.join("tests/services/docker.sh"))
            .args(["start-node", "2"])
            .stdout(std::process::Stdio::null())
            .status();
        lain_test_support::remove_cluster_containers(&self.nodes, &self.prefix);
        let _ = Command::new("etcdctl")
            .args(["del", "--prefix", &self.prefix])
            .env("ETCDCTL_API", "3")
            .env("ETCDCTL_ENDPOINTS", &self.etcd)
            .output();
        let p = &self.index_prefix;
        let _ = http(self.es, "DELETE", &format!("/{p}-*"), "es", &[], b"");
        let _ = http(
            self.es,
            "DELETE",
            &format!("/_index_template/{p}"),
            "es",
            &[],
            b"",
        );
    }
}

/// The instances of `app` as `lain ps -o json` reports them.
fn instances(config: &Path, app: &str) -> Vec<serde_json::Value> {
    let out = lain_ok(config, &["ps", app, "-o", "json"], &[], None);
    serde_json::from_str::<Vec<serde_json::Value>>(&out).expect("ps -o json")
}

fn serving_count(list: &[serde_json::Value], version: Option<&str>) -> usize {
    list.iter()
        .filter(|i| i["serving"] == true && version.is_none_or(|v| i["version"] == v))
        .count()
}

#[test]
fn a_lain_cluster_serves_resolves_logs_heals_and_rolls_out_an_app() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let etcd = require_etcd();
    let nodes = require_docker_nodes();
    assert!(
        nodes.len() >= 2,
        "the end-to-end test needs two Docker engines"
    );
    let registry = require_registry();
    let kafka = require_kafka();
    let es = require_es();
    let es_addr = es_addr(&es);
    let prefix = unique_prefix("e2e");
    // Its own indices: the day's shared `lain-logs-*` holds whatever else ran today, whose
    // mappings are not this test's business.
    let index_prefix = format!("lain-e2e-{}-{:08x}", std::process::id(), rand_u32());
    let dir = temp_dir();
    let d = dir.path();
    let _cleanup = Cleanup {
        root: root.clone(),
        prefix: prefix.clone(),
        nodes: nodes.clone(),
        etcd: etcd[0].clone(),
        es: es_addr,
        index_prefix: index_prefix.clone(),
    };
    let app = format!("e2e{}", std::process::id());
    let podgroup = format!("{app}.web.web");
    let host = format!("{app}.lain.local");

    // --- The cluster: two control planes, the proxy, DNS, and a log agent per engine. ---
    // Each engine's host-networked instances are reached at an address of their own on
    // loopback, as two real nodes would be, so per-proc DNS answers hold two addresses.
    let cp_cfg = d.join("cp.toml");
    let mut text = format!(
        "etcd_endpoints = [\"{}\"]\nprefix = \"{prefix}\"\ncluster_domains = [\"lain.local\"]\n\
         volume_root = \"{}\"\nelection_ttl_secs = 2\nhealth_deadline_secs = 60\nnode_down_grace_secs = 3\n\
         secret_key_file = \"{}\"\nregistry = \"{registry}\"\nadmin_listen = \"127.0.0.1:0\"\napi_listen = \"127.0.0.1:0\"\n",
        etcd[0],
        d.join("volumes").display(),
        d.join("keys/secret.key").display(),
    );
    for (i, n) in nodes.iter().take(2).enumerate() {
        text.push_str(&format!(
            "[[nodes]]\nname = \"node{}\"\ndocker_host = \"{n}\"\naddress = \"127.0.0.{}\"\nmemory_bytes = 4294967296\n",
            i + 1,
            i + 1
        ));
    }
    std::fs::write(&cp_cfg, text).unwrap();
    let cp_cfg_s = cp_cfg.to_str().unwrap();
    let (code, out, err) =
        lain_test_support::run_lain(&["controlplane", "init", "-c", cp_cfg_s], None);
    assert_eq!(code, 0, "controlplane init: {err}");
    let admin_token = out.trim().to_string();
    let mut cps = [
        LainProcess::spawn(&["controlplane", "-c", cp_cfg_s], &[], &["admin", "api"]),
        LainProcess::spawn(&["controlplane", "-c", cp_cfg_s], &[], &["admin", "api"]),
    ];

    let access_log = d.join("access.log");
    let proxy_cfg = d.join("proxy.toml");
    std::fs::write(
        &proxy_cfg,
        format!(
            "[listen]\nhttp = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n[state]\netcd_endpoints = [\"{}\"]\nprefix = \"{prefix}\"\n[access_log]\npath = \"{}\"\n",
            etcd[0],
            access_log.display()
        ),
    )
    .unwrap();
    let proxy = LainProcess::spawn(
        &["proxy", "-c", proxy_cfg.to_str().unwrap()],
        &[],
        &["http", "admin"],
    );
    let proxy_addr = proxy.addr("http");

    let dns_cfg = d.join("dns.toml");
    std::fs::write(
        &dns_cfg,
        format!(
            "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[state]\netcd_endpoints = [\"{}\"]\nprefix = \"{prefix}\"\n[zone]\ndomains = [\"lain\", \"lain.local\"]\n",
            etcd[0]
        ),
    )
    .unwrap();
    let dns = LainProcess::spawn(
        &["dns", "-c", dns_cfg.to_str().unwrap()],
        &[],
        &["dns", "admin"],
    );
    let dns_addr = dns.addr("dns");

    let mut agents = Vec::new();
    for (i, n) in nodes.iter().take(2).enumerate() {
        let cfg = d.join(format!("logship{i}.toml"));
        let mut t = format!(
            "node = \"node{}\"\nstate_dir = \"{}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[docker]\nhost = \"{n}\"\nonly_lain = true\n\
             [sinks.kafka]\nbrokers = \"{kafka}\"\n[sinks.elasticsearch]\nurl = \"{es}\"\nindex_prefix = \"{index_prefix}\"\n",
            i + 1,
            d.join(format!("logship{i}")).display(),
        );
        if i == 0 {
            t.push_str(&format!(
                "[[files]]\nname = \"access\"\npaths = [\"{}\"]\nformat = \"proxy_access\"\n",
                access_log.display()
            ));
        }
        std::fs::write(&cfg, t).unwrap();
        agents.push(LainProcess::spawn(
            &["logship", "-c", cfg.to_str().unwrap()],
            &[],
            &["admin"],
        ));
    }

    // --- Log in, build and push the demo app, register it. ---
    let config = d.join("cli.toml");
    let api_urls: Vec<String> = cps
        .iter()
        .map(|c| format!("http://{}", c.addr("api")))
        .collect();
    let api = |i: usize| api_urls[i].clone();
    lain_ok(
        &config,
        &["login", "--server", &api(0), "--token", &admin_token],
        &[],
        None,
    );

    let app_dir = d.join("hello");
    let yaml = lain_test_support::hello_app(&app_dir, &app);
    let app_dir_s = app_dir.to_str().unwrap();
    let build = |config: &Path| -> String {
        let out = lain_ok(
            config,
            &["build", app_dir_s, "--push", &registry, "-o", "json"],
            &[("DOCKER_HOST", &nodes[0])],
            None,
        );
        let built: serde_json::Value = serde_json::from_str(&out).expect("build -o json");
        built["version"].as_str().expect("version").to_string()
    };
    let v1 = build(&config);
    lain_ok(&config, &["app", "create", app_dir_s], &[], None);

    // --- 401 and 403. ---
    let api0: SocketAddr = cps[0].addr("api");
    let (status, _) = http(api0, "GET", "/api/v1/apps", "lain", &[], b"").unwrap();
    assert_eq!(status, 401, "no token");
    let (code, _, _) = lain(
        &config,
        &["app", "ls", "--token", "lain_not_a_token"],
        &[],
        None,
    );
    assert_eq!(code, 4, "a wrong token exits 4");
    lain_ok(&config, &["user", "add", "mallory"], &[], None);
    let out = lain_ok(
        &config,
        &["token", "create", "mallory", "-o", "json"],
        &[],
        None,
    );
    let mallory: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mallory_token = mallory["token"].as_str().unwrap().to_string();
    let auth = format!("Bearer {mallory_token}");
    let (status, _) = http(
        api0,
        "GET",
        &format!("/api/v1/apps/{app}/instances"),
        "lain",
        &[("Authorization", &auth)],
        b"",
    )
    .unwrap();
    assert_eq!(
        status, 403,
        "a user who maintains no app may not see this one"
    );
    let (code, _, err) = lain(&config, &["ps", &app, "--token", &mallory_token], &[], None);
    assert_eq!(code, 4, "forbidden exits 4: {err}");

    // --- Deploy and serve. ---
    lain_ok(&config, &["deploy", &app, "-v", &v1], &[], None);
    let list = instances(&config, &app);
    assert_eq!(
        serving_count(&list, Some(&v1)),
        2,
        "two instances serve v1: {list:?}"
    );
    let nodes_used: std::collections::BTreeSet<_> =
        list.iter().map(|i| i["node"].to_string()).collect();
    assert_eq!(
        nodes_used.len(),
        2,
        "the two instances are spread over both engines: {list:?}"
    );
    let (status, body) = wait_for(Duration::from_secs(10), "the app through the proxy", || {
        http(proxy_addr, "GET", "/", &host, &[], b"")
            .ok()
            .filter(|(s, _)| *s == 200)
    });
    assert_eq!(status, 200);
    assert!(!body.trim().is_empty(), "the page has content");
    // A subdomain of the mountpoint is served too, and an unknown host is not.
    let (status, _) = http(proxy_addr, "GET", "/", &format!("www.{host}"), &[], b"").unwrap();
    assert_eq!(status, 200, "subdomains of a mountpoint route to it");
    let (status, _) = http(proxy_addr, "GET", "/", "nobody.invalid", &[], b"").unwrap();
    assert_eq!(status, 404, "unknown host");

    // --- Resolve through lain dns: per proc, per instance, and a name that does not exist. ---
    let appdomain = app.clone();
    let (rcode, addrs) = wait_for(
        Duration::from_secs(10),
        "two A records for the proc",
        || {
            let r = resolve_a(dns_addr, &format!("web.{appdomain}.lain"));
            (r.1.len() == 2).then_some(r)
        },
    );
    assert_eq!(rcode, 0);
    assert!(addrs.iter().all(|a| a.is_loopback()), "{addrs:?}");
    let (rcode, addrs) = resolve_a(dns_addr, &format!("web-1.{appdomain}.lain"));
    assert_eq!((rcode, addrs.len()), (0, 1), "the per-instance name");
    let (rcode, _) = resolve_a(dns_addr, &format!("nope.{appdomain}.lain"));
    assert_eq!(rcode, 3, "NXDOMAIN for a name that does not exist");

    // --- Request logs in Kafka, in Elasticsearch and through `lain logs`. ---
    let marker = format!("e2e-marker-{:08x}", rand_u32());
    let (status, _) = http(proxy_addr, "GET", &format!("/{marker}"), &host, &[], b"").unwrap();
    assert_eq!(status, 404, "busybox httpd answers 404 for a missing file");
    wait_for(
        Duration::from_secs(60),
        "the request's log line in Kafka",
        || kafka_has(&kafka, &podgroup, &marker).then_some(()),
    );
    wait_for(
        Duration::from_secs(60),
        "the request's access line in Kafka (topic {node}.access, as LAIN named it)",
        || kafka_has(&kafka, "node1.access", &marker).then_some(()),
    );
    wait_for(
        Duration::from_secs(60),
        "the request's log line in Elasticsearch",
        || {
            let dataset = serde_json::json!({"term": {"event.dataset": podgroup}});
            es_has(es_addr, &index_prefix, &marker, &app, dataset).then_some(())
        },
    );
    // The proxy's access line of the same request, mapped to ECS as Kibana filters on it.
    wait_for(
        Duration::from_secs(60),
        "the request's access line in Elasticsearch",
        || {
            let access = serde_json::json!({"bool": {"filter": [
                {"term": {"event.dataset": "lain.access"}},
                {"term": {"url.path": format!("/{marker}")}},
                {"term": {"http.response.status_code": 404}},
                {"term": {"lain.proc": "web"}}
            ]}});
            es_has(es_addr, &index_prefix, &marker, &app, access).then_some(())
        },
    );
    wait_for(
        Duration::from_secs(30),
        "the request's log line through `lain logs`",
        || {
            let (code, out, _) = lain(
                &config,
                &[
                    "logs",
                    &app,
                    "--es",
                    &es,
                    "--index-prefix",
                    &index_prefix,
                    "-n",
                    "200",
                ],
                &[],
                None,
            );
            (code == 0 && out.contains(&marker)).then_some(())
        },
    );

    // --- Kill an instance: answers keep coming, and it is replaced. ---
    let victim = list[0]["container_id"]
        .as_str()
        .expect("container id")
        .to_string();
    let victim_node = list[0]["node"].as_str().expect("node").to_string();
    let victim_host = if victim_node == "node1" {
        &nodes[0]
    } else {
        &nodes[1]
    };
    let traffic = Traffic::start(proxy_addr, host.clone());
    std::thread::sleep(Duration::from_millis(300));
    let st = Command::new("docker")
        .args(["-H", victim_host, "kill", &victim])
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "docker kill: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    wait_for(
        Duration::from_secs(30),
        "the killed instance replaced and serving",
        || {
            let l = instances(&config, &app);
            (serving_count(&l, Some(&v1)) == 2
                && l.iter().all(|i| i["container_id"] != victim.as_str())
                && l.iter().any(|i| i["restarts"].as_u64().unwrap_or(0) >= 1))
            .then_some(())
        },
    );
    let (sent, failed, _) = traffic.finish();
    assert!(sent > 20, "the traffic loop ran ({sent} requests)");
    assert!(
        failed.is_empty(),
        "{} of {sent} requests failed around the kill: {failed:?}",
        failed.len()
    );

    // --- A secret, then a new version rolled out under continuous requests. ---
    let secret = format!("s3cret-{:08x}", rand_u32());
    let yaml2 = format!("{}\n  secret_files:\n    - secret.txt\n", yaml.trim_end());
    std::fs::write(app_dir.join("lain.yaml"), &yaml2).unwrap();
    let page = std::fs::read_to_string(app_dir.join("index.html")).unwrap_or_default();
    std::fs::write(app_dir.join("index.html"), format!("{page}\nversion two\n")).unwrap();
    lain_test_support::git(&app_dir, &["commit", "-q", "-a", "-m", "v2"]);
    // A declared secret file that was never set stops the deploy, naming the path.
    let v2 = build(&config);
    lain_ok(&config, &["app", "create", app_dir_s], &[], None);
    let (code, _, err) = lain(&config, &["deploy", &app, "-v", &v2], &[], None);
    assert_ne!(code, 0, "a deploy with a missing secret file fails");
    assert!(
        err.contains("secret.txt"),
        "the error names the missing file: {err}"
    );
    lain_ok(
        &config,
        &["secret", "set", &app, "web", "secret.txt"],
        &[],
        Some(&secret),
    );
    let traffic = Traffic::start(proxy_addr, host.clone());
    std::thread::sleep(Duration::from_millis(300));
    lain_ok(&config, &["deploy", &app, "-v", &v2], &[], None);
    wait_for(
        Duration::from_secs(20),
        "version two through the proxy",
        || {
            http(proxy_addr, "GET", "/", &host, &[], b"")
                .ok()
                .filter(|(s, b)| *s == 200 && b.contains("version two"))
        },
    );
    traffic.wait_for_body("version two", Duration::from_secs(10));
    let (sent, failed, bodies) = traffic.finish();
    assert!(
        failed.is_empty(),
        "{} of {sent} requests failed during the rollout: {failed:?}",
        failed.len()
    );
    assert!(
        bodies.iter().any(|b| !b.contains("version two")),
        "v1 was served during the rollout"
    );
    assert!(
        bodies.iter().any(|b| b.contains("version two")),
        "v2 was served during the rollout"
    );
    let list = instances(&config, &app);
    assert_eq!(serving_count(&list, Some(&v2)), 2, "{list:?}");
    for i in &list {
        let id = i["container_id"].as_str().unwrap();
        let h = if i["node"] == "node1" {
            &nodes[0]
        } else {
            &nodes[1]
        };
        let out = Command::new("docker")
            .args([
                "-H",
                h,
                "exec",
                id,
                "sh",
                "-c",
                "cat /lain/app/secret.txt; echo; stat -c %a /lain/app/secret.txt",
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains(&secret),
            "the secret is readable in {id}: {text:?}"
        );
        assert!(
            text.contains("400"),
            "the secret file is mode 0400 in {id}: {text:?}"
        );
    }

    // --- Stop the second engine: the app is served from the first. ---
    let st = Command::new("bash")
        .arg(root.join("tests/services/docker.sh"))
        .args(["stop-node", "2"])
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "stop-node 2: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    wait_for(
        Duration::from_secs(60),
        "both instances serving from node1",
        || {
            let l = instances(&config, &app);
            (serving_count(&l, Some(&v2)) == 2 && l.iter().all(|i| i["node"] == "node1"))
                .then_some(())
        },
    );
    for _ in 0..20 {
        let (status, body) =
            http(proxy_addr, "GET", "/", &host, &[], b"").expect("served from node1");
        assert_eq!(status, 200, "{body}");
    }

    // --- Kill the leading control plane; keep deploying through the other. ---
    let leader = wait_for(Duration::from_secs(10), "a leader", || {
        (0..2).find(|&i| {
            let addr: SocketAddr = api_urls[i].trim_start_matches("http://").parse().unwrap();
            http(addr, "GET", "/healthz", "lain", &[], b"")
                .ok()
                .and_then(|(_, b)| serde_json::from_str::<serde_json::Value>(&b).ok())
                .is_some_and(|v| v["leader"] == true)
        })
    });
    let other = 1 - leader;
    cps[leader].kill();
    let other_api = api(other);
    wait_for(
        Duration::from_secs(30),
        "a scale accepted by the surviving control plane",
        || {
            let (code, _, _) = lain(
                &config,
                &["scale", &app, "web", "-n", "3", "--server", &other_api],
                &[],
                None,
            );
            (code == 0).then_some(())
        },
    );
    let l = wait_for(Duration::from_secs(60), "three instances serving", || {
        let out = lain_ok(
            &config,
            &["ps", &app, "-o", "json", "--server", &other_api],
            &[],
            None,
        );
        let l: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
        (serving_count(&l, Some(&v2)) == 3).then_some(l)
    });
    assert_eq!(l.len(), 3, "{l:?}");
    drop(agents);
    drop(dns);
    drop(proxy);
}

fn rand_u32() -> u32 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    t.subsec_nanos() ^ std::process::id()
}

/// Whether any message of `topic` contains `needle`, reading the topic from the start.
fn kafka_has(brokers: &str, topic: &str, needle: &str) -> bool {
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Message;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("lain-e2e-{}", rand_u32()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("kafka consumer");
    if consumer.subscribe(&[topic]).is_err() {
        return false;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(500))
            && m.payload()
                .is_some_and(|p| String::from_utf8_lossy(p).contains(needle))
        {
            return true;
        }
    }
    false
}

/// The address of `LAIN_ES`.
fn es_addr(es: &str) -> SocketAddr {
    es.trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .expect("LAIN_ES is http://IP:PORT")
}

/// Whether the indices `{index_prefix}-*` hold a document of `app` whose message contains
/// `needle` and that matches the query `filter`.
fn es_has(
    addr: SocketAddr,
    index_prefix: &str,
    needle: &str,
    app: &str,
    filter: serde_json::Value,
) -> bool {
    let _ = http(
        addr,
        "POST",
        &format!("/{index_prefix}-*/_refresh"),
        "es",
        &[],
        b"",
    );
    let query = serde_json::json!({
        "query": {"bool": {"filter": [
            {"match_phrase": {"message": needle}},
            {"term": {"lain.app": app}},
            filter
        ]}}
    })
    .to_string();
    match http(
        addr,
        "POST",
        &format!("/{index_prefix}-*/_search"),
        "es",
        &[("Content-Type", "application/json")],
        query.as_bytes(),
    ) {
        Ok((200, body)) => serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["hits"]["total"]["value"].as_u64())
            .is_some_and(|n| n > 0),
        _ => false,
    }
}
