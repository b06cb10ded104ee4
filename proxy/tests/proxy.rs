//! End-to-end tests of `lain proxy`: the real binary against real etcd and real upstream
//! HTTP servers on 127.0.0.1:0.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use etcd_client::Client;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use lain_state::{Balance, EndpointRecord, Keyspace, RouteRecord, encode};
use lain_test_support::{
    LainProcess, Rng, eventually, free_port, metrics_page, require_etcd, run_lain, unique_prefix,
};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// An upstream HTTP server that answers with its name, the path it saw and the headers.
struct Upstream {
    addr: SocketAddr,
    tasks: Arc<std::sync::Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
    healthy: Arc<AtomicBool>,
    hits: Arc<AtomicU64>,
    /// Set to answer the `/hold` requests, which wait for it (30 s at most).
    released: Arc<AtomicBool>,
}

impl Upstream {
    async fn start(name: &str) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tasks: Arc<std::sync::Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let healthy = Arc::new(AtomicBool::new(true));
        let hits = Arc::new(AtomicU64::new(0));
        let released = Arc::new(AtomicBool::new(false));
        let name = name.to_string();
        let accept = tokio::spawn({
            let tasks = tasks.clone();
            let healthy = healthy.clone();
            let hits = hits.clone();
            let released = released.clone();
            async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let name = name.clone();
                    let healthy = healthy.clone();
                    let hits = hits.clone();
                    let released = released.clone();
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let name = name.clone();
                        let healthy = healthy.clone();
                        let hits = hits.clone();
                        let released = released.clone();
                        async move {
                            if req.uri().path() == "/healthz" {
                                // As an app that checks the host it serves (Django's
                                // ALLOWED_HOSTS): an address is no name of it.
                                let named = req
                                    .headers()
                                    .get("host")
                                    .and_then(|h| h.to_str().ok())
                                    .is_some_and(|h| h.ends_with(".lain.local"));
                                let ok = healthy.load(Ordering::Relaxed);
                                let mut r = Response::new(Full::new(Bytes::from("hc")));
                                *r.status_mut() = match (named, ok) {
                                    (false, _) => 400,
                                    (true, true) => 200,
                                    (true, false) => 503,
                                }
                                .try_into()
                                .unwrap();
                                // A field value in Latin-1, as old frameworks send them.
                                r.headers_mut().insert(
                                    "x-note",
                                    hyper::header::HeaderValue::from_bytes(b"\xe9t\xe9").unwrap(),
                                );
                                return Ok::<_, Infallible>(r);
                            }
                            hits.fetch_add(1, Ordering::Relaxed);
                            if req.uri().path() == "/slow" {
                                tokio::time::sleep(Duration::from_millis(300)).await;
                            }
                            // Held until the test has sent its other requests, however
                            // long a busy machine makes them take.
                            if req.uri().path() == "/hold" {
                                let until = Instant::now() + Duration::from_secs(30);
                                while !released.load(Ordering::Relaxed) && Instant::now() < until {
                                    tokio::time::sleep(Duration::from_millis(10)).await;
                                }
                            }
                            let headers: HashMap<String, String> = req
                                .headers()
                                .iter()
                                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
                                .collect();
                            // Every Cookie field as it arrived: the map above keeps one.
                            let cookies: Vec<String> = req
                                .headers()
                                .get_all("cookie")
                                .iter()
                                .map(|v| v.to_str().unwrap_or("").to_string())
                                .collect();
                            let uri = req.uri().to_string();
                            // An upload is read before it is answered, as an app does.
                            let body_len = if req.uri().path().starts_with("/upload") {
                                use http_body_util::BodyExt;
                                req.into_body()
                                    .collect()
                                    .await
                                    .map_or(0, |b| b.to_bytes().len())
                            } else {
                                0
                            };
                            let body = serde_json::json!({
                                "name": name,
                                "uri": uri,
                                "headers": headers,
                                "cookies": cookies,
                                "body_len": body_len,
                            });
                            Ok(Response::new(Full::new(Bytes::from(body.to_string()))))
                        }
                    });
                    let h = tokio::spawn(async move {
                        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                    tasks.lock().unwrap().push(h);
                }
            }
        });
        Upstream {
            addr,
            tasks,
            accept,
            healthy,
            hits,
            released,
        }
    }

    /// Stops accepting and closes every open connection, as a crashed instance would.
    fn kill(&self) {
        self.accept.abort();
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The etcd side of a test: its own prefix, cleaned up on drop.
struct Cluster {
    client: Client,
    ks: Keyspace,
    prefix: String,
    endpoints: Vec<String>,
}

impl Cluster {
    async fn new(test: &str) -> Cluster {
        let endpoints = require_etcd();
        let client = lain_test_support::etcd_client(&endpoints).await;
        let prefix = unique_prefix(test);
        Cluster {
            client,
            ks: Keyspace::new(&prefix),
            prefix,
            endpoints,
        }
    }

    async fn put_route(&mut self, r: &RouteRecord) {
        let key = self.ks.route(&r.app, &r.proc_name, &r.host, &r.path);
        self.client.put(key, encode(r), None).await.unwrap();
    }

    async fn delete_route(&mut self, r: &RouteRecord) {
        let key = self.ks.route(&r.app, &r.proc_name, &r.host, &r.path);
        self.client.delete(key, None).await.unwrap();
    }

    async fn put_endpoint(&mut self, app: &str, instance: u32, addr: SocketAddr) {
        let e = endpoint(app, instance, addr);
        self.client
            .put(self.ks.endpoint(app, "web", instance), encode(&e), None)
            .await
            .unwrap();
    }

    /// A TCP stream route on a free port to a `worker` proc whose one instance is `addr`;
    /// returns the port.
    async fn put_stream(&mut self, app: &str, proc_name: &str, addr: SocketAddr) -> u16 {
        let e: EndpointRecord = serde_json::from_value(serde_json::json!({
            "app": app, "proc": proc_name, "proc_type": "worker", "instance": 1,
            "address": addr.ip().to_string(), "port": addr.port(),
        }))
        .unwrap();
        self.client
            .put(self.ks.endpoint(app, proc_name, 1), encode(&e), None)
            .await
            .unwrap();
        let port = free_port();
        let record: lain_state::StreamRecord = serde_json::from_value(serde_json::json!({
            "listen_port": port, "app": app, "proc": proc_name,
        }))
        .unwrap();
        self.client
            .put(self.ks.stream(port), encode(&record), None)
            .await
            .unwrap();
        port
    }

    async fn delete_endpoint(&mut self, app: &str, instance: u32) {
        self.client
            .delete(self.ks.endpoint(app, "web", instance), None)
            .await
            .unwrap();
    }

    /// Removes the test's keys; dropping does the same, also when the test fails.
    async fn cleanup(self) {
        drop(self);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Drop cannot await, and may run inside the test's runtime: delete from a thread
        // with its own runtime.
        let (endpoints, prefix) = (self.endpoints.clone(), format!("{}/", self.prefix));
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                if let Ok(Ok(mut c)) =
                    tokio::time::timeout(Duration::from_secs(5), Client::connect(&endpoints, None))
                        .await
                {
                    let _ = c
                        .delete(
                            prefix,
                            Some(etcd_client::DeleteOptions::new().with_prefix()),
                        )
                        .await;
                }
            });
        })
        .join();
    }
}

fn route(host: &str, path: &str, app: &str) -> RouteRecord {
    serde_json::from_value(serde_json::json!({
        "v": 1, "host": host, "path": path, "app": app, "proc": "web",
    }))
    .unwrap()
}

fn endpoint(app: &str, instance: u32, addr: SocketAddr) -> EndpointRecord {
    serde_json::from_value(serde_json::json!({
        "v": 1, "app": app, "proc": "web", "instance": instance,
        "address": addr.ip().to_string(), "port": addr.port(),
    }))
    .unwrap()
}

struct Proxy {
    process: LainProcess,
    dir: tempfile::TempDir,
    http: SocketAddr,
    admin: SocketAddr,
}

impl Proxy {
    /// Starts a proxy; `extra` is top-level TOML (by default trusting 10.0.0.0/8).
    fn start(cluster: &Cluster, extra: &str) -> Proxy {
        Proxy::start_listen(cluster, extra, "")
    }

    /// Starts a proxy with `listen` added to its `[listen]` table.
    fn start_listen(cluster: &Cluster, extra: &str, listen: &str) -> Proxy {
        let extra = if extra.is_empty() {
            r#"trusted_proxies = ["10.0.0.0/8"]"#
        } else {
            extra
        };
        let dir = lain_test_support::temp_dir();
        let access = dir.path().join("access.log");
        let config = format!(
            r#"threads = 2
drain_secs = 2
{extra}
[listen]
http = "127.0.0.1:0"
admin = "127.0.0.1:0"
{listen}
[state]
etcd_endpoints = {endpoints:?}
prefix = "{prefix}"
[access_log]
path = "{access}"
"#,
            endpoints = cluster.endpoints,
            prefix = cluster.prefix,
            access = access.display(),
        );
        let path = dir.path().join("proxy.toml");
        std::fs::write(&path, config).unwrap();
        Proxy::spawn(&["proxy", "--config", path.to_str().unwrap()], dir)
    }

    fn spawn(args: &[&str], dir: tempfile::TempDir) -> Proxy {
        let process = LainProcess::spawn(args, &[("LAIN_LOG", "warn")], &["http", "admin"]);
        let http = process.addr("http");
        let admin = process.addr("admin");
        Proxy {
            process,
            dir,
            http,
            admin,
        }
    }

    fn access_log(&self) -> PathBuf {
        self.dir.path().join("access.log")
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.http, path)
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// One app with one upstream behind one route and a proxy serving it with `extra` config,
/// already answering 200 for `probe_path` when a test gets them.
async fn one_route(
    test: &str,
    app: &str,
    host: &str,
    route_path: &str,
    probe_path: &str,
    extra: &str,
) -> (Cluster, Upstream, Proxy, reqwest::Client) {
    let mut cluster = Cluster::new(test).await;
    let up = Upstream::start(app).await;
    cluster.put_endpoint(app, 1, up.addr).await;
    cluster.put_route(&route(host, route_path, app)).await;
    let proxy = Proxy::start(&cluster, extra);
    let c = client();
    wait_status(&c, &proxy, host, probe_path, 200).await;
    (cluster, up, proxy, c)
}

/// GET `path` on the proxy with `host`; returns (status, body).
async fn get(c: &reqwest::Client, p: &Proxy, host: &str, path: &str) -> (u16, String) {
    let r = c
        .get(p.url(path))
        .header("host", host)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.text().await.unwrap())
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

async fn wait_status(c: &reqwest::Client, p: &Proxy, host: &str, path: &str, want: u16) -> String {
    eventually(
        Duration::from_secs(10),
        &format!("{host}{path} -> {want}"),
        || async {
            let (s, b) = get(c, p, host, path).await;
            (s == want).then_some(b)
        },
    )
    .await
}

async fn metrics(p: &Proxy) -> String {
    metrics_page(p.admin).await
}

fn metric_value(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_written_is_served_stripped_and_removal_gives_404() {
    let mut cluster = Cluster::new("proxy-basic").await;
    let up = Upstream::start("hello-1").await;
    let proxy = Proxy::start(&cluster, "");
    let c = client();

    let (s, body) = get(&c, &proxy, "hello.lain.local", "/").await;
    assert_eq!((s, body.as_str()), (404, "no route\n"));

    cluster.put_endpoint("hello", 1, up.addr).await;
    let api = route("hello.lain.local", "/api", "hello");
    cluster.put_route(&api).await;
    let body = wait_status(&c, &proxy, "hello.lain.local", "/api/users?x=1", 200).await;
    let v = json(&body);
    assert_eq!(v["name"], "hello-1");
    assert_eq!(v["uri"], "/users?x=1");
    assert_eq!(v["headers"]["x-original-uri"], "/api/users?x=1");
    // Subdomains and any case or port reach the same route.
    let (s, body) = get(&c, &proxy, "WWW.Hello.lain.local:8080", "/api").await;
    assert_eq!(s, 200);
    assert_eq!(json(&body)["uri"], "/");
    // The chosen host has no route for other paths.
    assert_eq!(get(&c, &proxy, "hello.lain.local", "/other").await.0, 404);

    let routes: serde_json::Value = reqwest::get(format!("http://{}/routes", proxy.admin))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(routes["routes"][0]["route"], "hello.lain.local/api");
    assert_eq!(
        reqwest::get(format!("http://{}/healthz", proxy.admin))
            .await
            .unwrap()
            .status(),
        200
    );

    cluster.delete_route(&api).await;
    wait_status(&c, &proxy, "hello.lain.local", "/api/users", 404).await;
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_spreads_over_three_upstreams() {
    let mut cluster = Cluster::new("proxy-rr").await;
    let ups = [
        Upstream::start("rr-1").await,
        Upstream::start("rr-2").await,
        Upstream::start("rr-3").await,
    ];
    for (i, u) in ups.iter().enumerate() {
        cluster.put_endpoint("rr", i as u32 + 1, u.addr).await;
    }
    cluster.put_route(&route("rr.lain.local", "/", "rr")).await;
    let proxy = Proxy::start(&cluster, "");
    let c = client();
    wait_status(&c, &proxy, "rr.lain.local", "/", 200).await;
    let mut seen: HashMap<String, u32> = HashMap::new();
    for _ in 0..30 {
        let (s, body) = get(&c, &proxy, "rr.lain.local", "/").await;
        assert_eq!(s, 200);
        *seen
            .entry(json(&body)["name"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    for n in seen.values() {
        assert!((8..=12).contains(n), "uneven spread {seen:?}");
    }
    cluster.cleanup().await;
}

/// Waits until `/routes` shows the proxy's one route with `policy` over `endpoints` endpoints.
async fn wait_balance(proxy: &Proxy, policy: &str, endpoints: usize) {
    let url = format!("http://{}/routes", proxy.admin);
    eventually(
        Duration::from_secs(10),
        &format!("a {policy} route over {endpoints} endpoints"),
        || async {
            let routes: serde_json::Value = reqwest::get(&url).await.ok()?.json().await.ok()?;
            let r = &routes["routes"][0];
            (r["balance"]["policy"] == policy
                && r["endpoints"].as_array().map(Vec::len) == Some(endpoints))
            .then_some(())
        },
    )
    .await
}

/// The upstream that answered a GET of `bal.lain.local` sent with `field: value`.
async fn answered_by(c: &reqwest::Client, p: &Proxy, field: &str, value: &str) -> String {
    let r = c
        .get(format!("http://bal.lain.local:{}/", p.http.port()))
        .header(field, value)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    json(&r.text().await.unwrap())["name"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balance_policies_written_with_a_route_choose_its_endpoints() {
    let mut cluster = Cluster::new("proxy-balance").await;
    let ups = [
        Upstream::start("bal-1").await,
        Upstream::start("bal-2").await,
        Upstream::start("bal-3").await,
    ];
    for (i, u) in ups.iter().enumerate() {
        cluster.put_endpoint("bal", i as u32 + 1, u.addr).await;
    }
    let mut r = route("bal.lain.local", "/", "bal");
    r.balance = Balance::HashHeader {
        name: "x-user".into(),
    };
    cluster.put_route(&r).await;
    let proxy = Proxy::start_listen(&cluster, "", "h2c = true");
    wait_balance(&proxy, "hash_header", 3).await;

    // Hashing on a header: every request of a key reaches one endpoint, on lain's HTTP/1.1
    // path and on pingora's (HTTP/2) alike, and the keys spread over the endpoints.
    let builder = || {
        reqwest::Client::builder()
            .resolve("bal.lain.local", proxy.http)
            .timeout(Duration::from_secs(10))
    };
    let c = builder().http1_only().build().unwrap();
    let h2 = builder().http2_prior_knowledge().build().unwrap();
    let mut owner = Vec::new();
    for k in 0..30 {
        let key = format!("user-{k}");
        let first = answered_by(&c, &proxy, "x-user", &key).await;
        for _ in 0..3 {
            assert_eq!(
                answered_by(&c, &proxy, "x-user", &key).await,
                first,
                "{key}"
            );
            assert_eq!(
                answered_by(&h2, &proxy, "x-user", &key).await,
                first,
                "{key} over h2"
            );
        }
        owner.push((key, first));
    }
    let owners: std::collections::HashSet<_> = owner.iter().map(|(_, o)| o.as_str()).collect();
    assert_eq!(owners.len(), 3, "30 keys all went to {owners:?}");

    // An endpoint that leaves takes only its own keys elsewhere: the others stay put, as
    // consistent hashing promises (a modulo over the endpoint count would move most).
    cluster.delete_endpoint("bal", 3).await;
    wait_balance(&proxy, "hash_header", 2).await;
    for (key, before) in &owner {
        let now = answered_by(&c, &proxy, "x-user", key).await;
        if before == "bal-3" {
            assert_ne!(now, "bal-3", "{key}");
        } else {
            assert_eq!(&now, before, "{key} moved although its endpoint stayed");
        }
    }
    cluster.put_endpoint("bal", 3, ups[2].addr).await;

    // Hashing on a cookie: the cookie decides, whatever else the request carries.
    r.balance = Balance::HashCookie { name: "sid".into() };
    cluster.put_route(&r).await;
    wait_balance(&proxy, "hash_cookie", 3).await;
    let mut cookie_owners = std::collections::HashSet::new();
    for k in 0..30 {
        let jar = |other: u32| format!("theme=dark{other}; sid=s{k}; lang=en");
        let first = answered_by(&c, &proxy, "cookie", &jar(0)).await;
        for other in 1..4 {
            assert_eq!(answered_by(&c, &proxy, "cookie", &jar(other)).await, first);
            assert_eq!(answered_by(&h2, &proxy, "cookie", &jar(other)).await, first);
        }
        cookie_owners.insert(first);
    }
    assert_eq!(cookie_owners.len(), 3, "{cookie_owners:?}");

    // Least connections: with two endpoints busy on slow requests, new requests go to the
    // idle one (round robin would send two of every three to the busy ones).
    r.balance = Balance::LeastConn;
    cluster.put_route(&r).await;
    wait_balance(&proxy, "least_conn", 3).await;
    let hits = |u: &Upstream| u.hits.load(Ordering::Relaxed);
    let base: Vec<u64> = ups.iter().map(hits).collect();
    let mut held = Vec::new();
    for _ in 0..2 {
        let (c, url) = (
            c.clone(),
            format!("http://bal.lain.local:{}/hold", proxy.http.port()),
        );
        let before: u64 = ups.iter().map(hits).sum();
        held.push(tokio::spawn(async move {
            c.get(url).send().await.unwrap().status()
        }));
        eventually(
            Duration::from_secs(5),
            "a held request upstream",
            || async { (ups.iter().map(hits).sum::<u64>() == before + 1).then_some(()) },
        )
        .await;
    }
    let busy: Vec<u64> = ups.iter().zip(&base).map(|(u, b)| hits(u) - b).collect();
    let idle = busy
        .iter()
        .position(|&h| h == 0)
        .unwrap_or_else(|| panic!("held requests went {busy:?}"));
    assert_eq!(busy.iter().filter(|&&h| h == 1).count(), 2, "{busy:?}");
    let mut fast = HashMap::new();
    for _ in 0..12 {
        *fast
            .entry(answered_by(&c, &proxy, "x-n", "1").await)
            .or_insert(0) += 1;
    }
    assert_eq!(fast.len(), 1, "{fast:?}");
    assert_eq!(
        fast.get(&format!("bal-{}", idle + 1)),
        Some(&12),
        "{fast:?}"
    );
    for u in &ups {
        u.released.store(true, Ordering::Relaxed);
    }
    for h in held {
        assert_eq!(h.await.unwrap(), 200);
    }
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_kept_alive_on_both_workers() {
    let (cluster, up, proxy, c) =
        one_route("proxy-reuse", "reuse", "reuse.lain.local", "/", "/", "").await;
    // Eight kept-alive clients, spread by the kernel over the proxy's two workers, each
    // sending its requests one after another: no worker ever needs more upstream
    // connections than it has clients, so the upstream sees at most one connection per
    // client (plus the probe's). A pooled connection taken by a worker other than the one
    // that returned it is raced by the returning worker's idle watcher, lost, and replaced
    // by a new connection, which this count would show.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let url = proxy.url("/");
        tasks.push(tokio::spawn(async move {
            let c = client();
            for _ in 0..200 {
                let r = c
                    .get(&url)
                    .header("host", "reuse.lain.local")
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status().as_u16(), 200);
                r.bytes().await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    drop(c);
    assert_eq!(up.hits.load(Ordering::Relaxed), 8 * 200 + 1);
    let opened = up.tasks.lock().unwrap().len();
    assert!(
        opened <= 9,
        "{opened} upstream connections for 9 sequential clients"
    );
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_and_request_id() {
    // 127.0.0.1 is not trusted here, so client-sent forwarding headers are replaced.
    let (cluster, _up, proxy, c) =
        one_route("proxy-headers", "h", "h.lain.local", "/", "/", "").await;
    let r = c
        .get(proxy.url("/p?q=1"))
        .header("host", "h.lain.local")
        .header("x-forwarded-for", "1.2.3.4")
        .header("x-forwarded-proto", "https")
        .header("x-request-id", "req-123")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "req-123");
    let v = json(&r.text().await.unwrap());
    let h = &v["headers"];
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-real-ip"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], "h.lain.local");
    assert_eq!(h["host"], "h.lain.local");
    assert_eq!(h["x-original-uri"], "/p?q=1");
    assert_eq!(h["x-request-id"], "req-123");
    // Without an id, one is generated and sent both ways.
    let r = c
        .get(proxy.url("/"))
        .header("host", "h.lain.local")
        .send()
        .await
        .unwrap();
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(id.len(), 36, "{id}");
    assert_eq!(
        json(&r.text().await.unwrap())["headers"]["x-request-id"],
        id
    );

    // With 127.0.0.1 trusted, the chain is appended and the real client taken from it.
    let trusting = Proxy::start(&cluster, r#"trusted_proxies = ["127.0.0.0/8"]"#.trim());
    drop(proxy);
    wait_status(&c, &trusting, "h.lain.local", "/", 200).await;
    let r = c
        .get(trusting.url("/"))
        .header("host", "h.lain.local")
        .header("x-forwarded-for", "203.0.113.9, 127.0.0.5")
        .header("x-forwarded-proto", "https")
        .send()
        .await
        .unwrap();
    let v = json(&r.text().await.unwrap());
    let h = &v["headers"];
    assert_eq!(h["x-forwarded-for"], "203.0.113.9, 127.0.0.5, 127.0.0.1");
    assert_eq!(h["x-real-ip"], "203.0.113.9");
    assert_eq!(h["x-forwarded-proto"], "https");
    // A proxy in front may add its own line instead of extending the client's: the lines
    // are one list, in order, and the real client is still taken from its trusted end.
    let r = c
        .get(trusting.url("/"))
        .header("host", "h.lain.local")
        .header("x-forwarded-for", "198.51.100.1")
        .header("x-forwarded-for", "203.0.113.9, 127.0.0.5")
        .send()
        .await
        .unwrap();
    let v = json(&r.text().await.unwrap());
    let h = &v["headers"];
    assert_eq!(
        h["x-forwarded-for"],
        "198.51.100.1, 203.0.113.9, 127.0.0.5, 127.0.0.1"
    );
    assert_eq!(h["x-real-ip"], "203.0.113.9");
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_line_and_metrics() {
    let (cluster, up, proxy, c) =
        one_route("proxy-log", "logapp", "log.lain.local", "/v1", "/v1/x", "").await;
    let r = c
        .get(proxy.url("/v1/items?a=b"))
        .header("host", "log.lain.local")
        .header("user-agent", "lain-test/1")
        .header("x-request-id", "log-req-1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(get(&c, &proxy, "nope.example", "/").await.0, 404);
    let line = eventually(Duration::from_secs(5), "access-log line", || async {
        let text = std::fs::read_to_string(proxy.access_log()).unwrap_or_default();
        text.lines()
            .find(|l| l.contains("log-req-1"))
            .map(str::to_string)
    })
    .await;
    let v = json(&line);
    for field in [
        "time",
        "client_ip",
        "method",
        "host",
        "path",
        "status",
        "bytes_in",
        "bytes_out",
        "duration_ms",
        "upstream",
        "upstream_ms",
        "app",
        "proc",
        "route",
        "request_id",
        "user_agent",
    ] {
        assert!(v.get(field).is_some(), "missing {field} in {line}");
    }
    assert_eq!(v["status"], 200);
    assert_eq!(v["method"], "GET");
    assert_eq!(v["path"], "/v1/items?a=b");
    assert_eq!(v["app"], "logapp");
    assert_eq!(v["proc"], "web");
    assert_eq!(v["route"], "log.lain.local/v1");
    assert_eq!(v["upstream"], up.addr.to_string());
    assert_eq!(v["user_agent"], "lain-test/1");
    assert_eq!(v["client_ip"], "127.0.0.1");
    assert!(v["bytes_out"].as_u64().unwrap() > 0);

    // A request is counted just after its answer is sent: give the last one a moment.
    let m = eventually(Duration::from_secs(2), "the requests counted", || async {
        let m = metrics(&proxy).await;
        let ok = metric_value(
            &m,
            r#"lain_proxy_requests_total{app="logapp",class="2xx",proc="web"}"#,
        ) >= 2.0
            && metric_value(&m, "lain_proxy_request_duration_seconds_count") >= 3.0;
        ok.then_some(m)
    })
    .await;
    assert!(
        metric_value(
            &m,
            r#"lain_proxy_requests_total{app="",class="4xx",proc=""}"#
        ) >= 1.0
    );
    assert!(metric_value(&m, "lain_proxy_request_duration_seconds_count") >= 3.0);
    assert!(metric_value(&m, "lain_proxy_upstream_duration_seconds_count") >= 2.0);
    assert_eq!(
        metric_value(&m, "lain_proxy_route_table_routes "),
        1.0,
        "{m}"
    );
    assert!(metric_value(&m, "lain_proxy_route_table_version ") >= 1.0);
    assert!(metric_value(&m, "lain_proxy_active_connections ") >= 0.0);
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_404_503_400_and_conflicting_claims() {
    let mut cluster = Cluster::new("proxy-errors").await;
    let up = Upstream::start("first").await;
    cluster.put_endpoint("first", 1, up.addr).await;
    cluster
        .put_route(&route("e.lain.local", "/", "first"))
        .await;
    // A second proc claims the same host and path later: rejected, counted.
    cluster
        .put_route(&route("e.lain.local", "/", "second"))
        .await;
    // A route whose proc has no endpoints.
    cluster
        .put_route(&route("empty.lain.local", "/", "empty"))
        .await;
    let proxy = Proxy::start(&cluster, "");
    let c = client();
    let body = wait_status(&c, &proxy, "e.lain.local", "/", 200).await;
    assert_eq!(json(&body)["name"], "first");
    let (s, body) = get(&c, &proxy, "empty.lain.local", "/").await;
    assert_eq!((s, body.as_str()), (503, "no healthy endpoint\n"));
    let m = metrics(&proxy).await;
    assert_eq!(
        metric_value(&m, "lain_proxy_route_rejected_claims "),
        1.0,
        "{m}"
    );
    let routes: serde_json::Value = reqwest::get(format!("http://{}/routes", proxy.admin))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        routes["rejected"][0]["key"]
            .as_str()
            .unwrap()
            .contains("/second/")
    );

    // Conflicting framing is refused, never forwarded.
    let hits = up.hits.load(Ordering::Relaxed);
    let raw = raw_request(
        proxy.http,
        "POST / HTTP/1.1\r\nHost: e.lain.local\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    )
    .await;
    assert!(raw.starts_with("HTTP/1.1 400"), "{raw}");
    // A transfer coding other than a single `chunked` is not passed on with the coding
    // dropped: 501, and the connection ends, so what follows it is never read as a request.
    for coding in [
        "gzip, chunked",
        "chunked, chunked",
        "gzip\r\nTransfer-Encoding: chunked",
    ] {
        let raw = raw_request(
            proxy.http,
            &format!(
                "POST / HTTP/1.1\r\nHost: e.lain.local\r\nTransfer-Encoding: {coding}\r\n\r\n\
                 5\r\nGET /\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: e.lain.local\r\n\r\n"
            ),
        )
        .await;
        assert!(raw.starts_with("HTTP/1.1 501"), "{coding}: {raw}");
        assert_eq!(raw.matches("HTTP/1.1").count(), 1, "{coding}: {raw}");
    }
    let big = format!(
        "GET / HTTP/1.1\r\nHost: e.lain.local\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(100_000)
    );
    let raw = raw_request(proxy.http, &big).await;
    assert!(
        raw.starts_with("HTTP/1.1 431"),
        "{}",
        &raw[..raw.len().min(200)]
    );
    let raw = raw_request(proxy.http, "GARBAGE\r\n\r\n").await;
    assert!(raw.is_empty() || raw.starts_with("HTTP/1.1 400"), "{raw}");
    // An HTTP/1.1 request without Host, or with one that is no host name, is a bad request
    // (RFC 9112 §3.2), not one for a host without a route; HTTP/1.0 needs no Host.
    for (request, status) in [
        ("GET / HTTP/1.1\r\nConnection: close\r\n\r\n", "400"),
        (
            "GET / HTTP/1.1\r\nHost: e.lain.local/x\r\nConnection: close\r\n\r\n",
            "400",
        ),
        (
            "GET / HTTP/1.1\r\nHost: a@e.lain.local\r\nConnection: close\r\n\r\n",
            "400",
        ),
        ("GET / HTTP/1.0\r\n\r\n", "404"),
        (
            "GET / HTTP/1.1\r\nHost: [::1]:80\r\nConnection: close\r\n\r\n",
            "404",
        ),
    ] {
        let raw = raw_request(proxy.http, request).await;
        assert!(
            raw.starts_with(&format!("HTTP/1.1 {status}")),
            "{request:?}: {raw}"
        );
    }
    assert_eq!(up.hits.load(Ordering::Relaxed), hits);
    // The proxy is still up.
    assert_eq!(get(&c, &proxy, "e.lain.local", "/").await.0, 200);
    cluster.cleanup().await;
}

/// Sends `parts` on one connection with `gap` between them, then reads the answer. Returns
/// the answer and how long after connecting the connection was closed by the proxy (or the
/// answer was complete).
async fn dribble(addr: SocketAddr, parts: &[&[u8]], gap: Duration) -> (String, Duration) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let start = Instant::now();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut r, mut w) = s.split();
    let mut out = Vec::new();
    let write = async {
        for (i, p) in parts.iter().enumerate() {
            if i > 0 {
                tokio::time::sleep(gap).await;
            }
            if w.write_all(p).await.is_err() {
                break;
            }
        }
        // Keep the connection open for reading.
        std::future::pending::<()>().await;
    };
    let read = async {
        let _ = tokio::time::timeout(Duration::from_secs(15), r.read_to_end(&mut out)).await;
    };
    tokio::select! {
        _ = write => {}
        _ = read => {}
    }
    (String::from_utf8_lossy(&out).into_owned(), start.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_get_431_and_slow_headers_are_cut_off() {
    let (cluster, up, proxy, c) = one_route(
        "proxy-headers",
        "h",
        "h.lain.local",
        "/",
        "/",
        "header_timeout_secs = 1\nmax_header_bytes = 4096",
    )
    .await;
    let hits = up.hits.load(Ordering::Relaxed);

    // Over the configured limit, and far over pingora's own 1 MiB limit (where pingora alone
    // would answer 400): 431 both times, and the connection is closed.
    for size in [5_000, 2_000_000] {
        let big = format!(
            "GET / HTTP/1.1\r\nHost: h.lain.local\r\nX-Big: {}\r\n\r\n",
            "a".repeat(size)
        );
        let (raw, _) = dribble(proxy.http, &[big.as_bytes()], Duration::ZERO).await;
        assert!(
            raw.starts_with("HTTP/1.1 431"),
            "{size}: {}",
            &raw[..raw.len().min(200)]
        );
        assert!(raw.ends_with("request header fields too large\n"), "{raw}");
    }
    // Just under the limit is served.
    let fits = format!(
        "GET / HTTP/1.1\r\nHost: h.lain.local\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(3_500)
    );
    let raw = raw_request(proxy.http, &fits).await;
    assert!(
        raw.starts_with("HTTP/1.1 200"),
        "{}",
        &raw[..raw.len().min(200)]
    );
    assert_eq!(up.hits.load(Ordering::Relaxed), hits + 1);

    // A header dribbled one byte every 100 ms would take 4 s; it is cut off after 1 s,
    // without an answer and without reaching the upstream.
    let slow = b"GET / HTTP/1.1\r\nHost: h.lain.local\r\nX-Slow: 1\r\n\r\n";
    let bytes: Vec<&[u8]> = slow.chunks(1).collect();
    let (raw, took) = dribble(proxy.http, &bytes, Duration::from_millis(100)).await;
    assert!(raw.is_empty(), "{raw}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(2_500),
        "closed after {took:?}"
    );
    // A connection that sends nothing is closed after the same time.
    let (raw, took) = dribble(proxy.http, &[], Duration::ZERO).await;
    assert!(raw.is_empty(), "{raw}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(2_500),
        "idle first request closed after {took:?}"
    );
    // Empty lines before the request line do not count as the end of a header (httparse
    // skips them): the header behind them is still bounded in size and in time.
    let big = format!(
        "\r\n\r\nGET / HTTP/1.1\r\nHost: h.lain.local\r\nX-Big: {}\r\n\r\n",
        "a".repeat(5_000)
    );
    let (raw, _) = dribble(proxy.http, &[big.as_bytes()], Duration::ZERO).await;
    assert!(
        raw.starts_with("HTTP/1.1 431"),
        "{}",
        &raw[..raw.len().min(200)]
    );
    let stalled: &[(&str, &[u8])] = &[
        ("empty lines first", b"\r\n\r\nGET / HTTP/1.1\r\nX: "),
        // More header lines than the fast path parses: the guard still times the rest.
        (
            "many header lines",
            &b"GET / HTTP/1.1\r\nHost: h.lain.local\r\n"
                .iter()
                .chain(b"a: b\r\n".repeat(70).iter())
                .copied()
                .collect::<Vec<u8>>(),
        ),
    ];
    for (what, start) in stalled {
        let (raw, took) = dribble(proxy.http, &[start], Duration::ZERO).await;
        assert!(!raw.starts_with("HTTP/1.1 200"), "{what}: {raw}");
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_millis(2_500),
            "{what}: closed after {took:?}"
        );
    }
    // A request followed by the start of another that never ends: the first is answered,
    // and the second's header clock starts with the bytes already sent.
    let (raw, took) = dribble(
        proxy.http,
        &[b"GET /1 HTTP/1.1\r\nHost: h.lain.local\r\n\r\nG"],
        Duration::ZERO,
    )
    .await;
    assert_eq!(raw.matches("HTTP/1.1 200").count(), 1, "{raw}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(2_500),
        "a started pipelined request closed after {took:?}"
    );
    assert_eq!(up.hits.load(Ordering::Relaxed), hits + 2);
    let hits = hits + 1;

    // A header in three parts within the limit is served.
    let (raw, _) = dribble(
        proxy.http,
        &[
            b"GET / HTTP/1.1\r\nHost: h.la",
            b"in.local\r\nConnection: close\r\n",
            b"\r\n",
        ],
        Duration::from_millis(250),
    )
    .await;
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    assert_eq!(up.hits.load(Ordering::Relaxed), hits + 2);

    // On a kept-alive connection the clock starts with the next request's first byte: a
    // pause longer than the header timeout between requests is fine.
    let (raw, _) = dribble(
        proxy.http,
        &[
            b"GET /1 HTTP/1.1\r\nHost: h.lain.local\r\n\r\n",
            b"GET /2 HTTP/1.1\r\nHost: h.lain.local\r\nConnection: close\r\n\r\n",
        ],
        Duration::from_millis(1_500),
    )
    .await;
    assert_eq!(raw.matches("HTTP/1.1 200").count(), 2, "{raw}");
    assert_eq!(up.hits.load(Ordering::Relaxed), hits + 4);
    assert_eq!(get(&c, &proxy, "h.lain.local", "/").await.0, 200);
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_prior_knowledge_on_the_plain_listener() {
    let mut cluster = Cluster::new("proxy-h2c").await;
    let up = Upstream::start("h2c").await;
    cluster.put_endpoint("h2c", 1, up.addr).await;
    cluster
        .put_route(&route("h2c.lain.local", "/api", "h2c"))
        .await;
    let proxy = Proxy::start_listen(&cluster, "header_timeout_secs = 1", "h2c = true");
    let c = client();
    wait_status(&c, &proxy, "h2c.lain.local", "/api/x", 200).await;
    // A real HTTP/2 client names the host in `:authority`, not in a Host header.
    let h2 = |to: SocketAddr| {
        reqwest::Client::builder()
            .http2_prior_knowledge()
            .resolve("h2c.lain.local", to)
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap()
    };
    let url = |to: SocketAddr, path: &str| format!("http://h2c.lain.local:{}{path}", to.port());
    let client2 = h2(proxy.http);
    // Several requests multiplexed on one HTTP/2 connection.
    let answers = futures::future::join_all((0..5).map(|i| {
        client2
            .get(url(proxy.http, &format!("/api/users/{i}")))
            .send()
    }))
    .await;
    for (i, r) in answers.into_iter().enumerate() {
        let r = r.unwrap();
        assert_eq!(r.version(), reqwest::Version::HTTP_2);
        assert_eq!(r.status(), 200);
        let body = json(&r.text().await.unwrap());
        assert_eq!(body["uri"], format!("/users/{i}"));
    }
    // Cookies an HTTP/2 client sent as separate fields reach the HTTP/1.1 app as one
    // Cookie header, in order (RFC 9113 §8.2.3).
    let r = client2
        .get(url(proxy.http, "/api/c"))
        .header("cookie", "a=1")
        .header("cookie", "sid=x; b=2")
        .header("cookie", "c=3")
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    let body = json(&r.text().await.unwrap());
    assert_eq!(body["cookies"], serde_json::json!(["a=1; sid=x; b=2; c=3"]));
    let r = client2
        .get(url(proxy.http, "/api/c"))
        .header("cookie", "only=1")
        .send()
        .await
        .unwrap();
    assert_eq!(
        json(&r.text().await.unwrap())["cookies"],
        serde_json::json!(["only=1"])
    );
    // The h2c preface check does not wait forever on a silent connection.
    let (raw, took) = dribble(proxy.http, &[], Duration::ZERO).await;
    assert!(raw.is_empty(), "{raw}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(2_500),
        "silent connection closed after {took:?}"
    );
    // HTTP/1.1 keeps working on the same listener.
    let r = c
        .get(proxy.url("/api/y"))
        .header("host", "h2c.lain.local")
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_11);
    assert_eq!(r.status(), 200);
    // Without the setting, prior knowledge is not spoken.
    let plain = Proxy::start(&cluster, "");
    wait_status(&c, &plain, "h2c.lain.local", "/api/x", 200).await;
    assert!(
        h2(plain.http)
            .get(url(plain.http, "/api/x"))
            .send()
            .await
            .is_err()
    );
    cluster.cleanup().await;
}

/// Dot segments and repeated slashes are resolved before routing, on both HTTP/1.1 paths,
/// as nginx resolves them before it matches a location.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dot_segments_and_double_slashes_route_as_nginx_does() {
    let mut cluster = Cluster::new("proxy-dots").await;
    let root = Upstream::start("root").await;
    let api = Upstream::start("api").await;
    cluster.put_endpoint("root", 1, root.addr).await;
    cluster.put_endpoint("api", 1, api.addr).await;
    cluster.put_route(&route("d.lain.local", "/", "root")).await;
    cluster
        .put_route(&route("d.lain.local", "/api", "api"))
        .await;
    let proxy = Proxy::start(&cluster, "");
    let c = client();
    wait_status(&c, &proxy, "d.lain.local", "/api/x", 200).await;
    wait_status(&c, &proxy, "d.lain.local", "/x", 200).await;
    // (target, app that must answer, target it must see)
    let cases = [
        ("/api/users?q=/../x", "api", "/users?q=/../x"),
        ("/static/../api/secret", "api", "/secret"),
        ("/api/../admin", "root", "/admin"),
        ("/api/%2e%2e/admin?a=1", "root", "/admin?a=1"),
        ("/api//evil.example/x", "api", "/evil.example/x"),
        ("//api/y", "api", "/y"),
        ("/api/./y/", "api", "/y/"),
        ("/a//b/./c", "root", "/a/b/c"),
    ];
    // HTTP/1.1 with no body takes lain's own path; HTTP/1.0 takes pingora's.
    for version in ["1.1", "1.0"] {
        for (target, app, seen) in cases {
            let raw = raw_request(
                proxy.http,
                &format!(
                    "GET {target} HTTP/{version}\r\nHost: d.lain.local\r\nConnection: close\r\n\r\n"
                ),
            )
            .await;
            let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
            assert!(head.contains(" 200 "), "{version} {target}: {raw}");
            let body = json(body);
            assert_eq!(body["name"], app, "{version} {target}");
            assert_eq!(body["uri"], seen, "{version} {target}");
            // The app is told what the client asked for.
            assert_eq!(
                body["headers"]["x-original-uri"], target,
                "{version} {target}"
            );
        }
        // A path that climbs above the root names nothing: 400, never forwarded.
        let hits = root.hits.load(Ordering::Relaxed) + api.hits.load(Ordering::Relaxed);
        for target in ["/../etc/passwd", "/api/../../x", "/%2e%2e/x"] {
            let raw = raw_request(
                proxy.http,
                &format!(
                    "GET {target} HTTP/{version}\r\nHost: d.lain.local\r\nConnection: close\r\n\r\n"
                ),
            )
            .await;
            assert!(raw.starts_with("HTTP/1.1 400"), "{version} {target}: {raw}");
        }
        let after = root.hits.load(Ordering::Relaxed) + api.hits.load(Ordering::Relaxed);
        assert_eq!(after, hits, "{version}");
    }
    cluster.cleanup().await;
}

/// A TCP echo server that prefixes every answer with its name.
async fn echo_upstream(name: &'static str) -> (SocketAddr, JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    let mut out = format!("{name}:").into_bytes();
                    out.extend_from_slice(&buf[..n]);
                    if s.write_all(&out).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (addr, task)
}

/// Sends `text` on a TCP connection to `addr` and reads one answer.
async fn tcp_round_trip(addr: SocketAddr, text: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(text.as_bytes()).await?;
    let mut buf = [0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// The configuration that opens TCP stream routes on loopback, on any port a record names.
const STREAM_CONFIG: &str =
    "[stream]\nlisten_ip = \"127.0.0.1\"\nport_min = 1024\nport_max = 65535";

/// Waits until the stream port at `addr` forwards a round trip.
async fn wait_stream(addr: SocketAddr) {
    eventually(Duration::from_secs(10), "stream port answers", || async {
        tcp_round_trip(addr, "ping").await.ok()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_stream_route_forwards_round_robin_and_closes_on_removal() {
    let mut cluster = Cluster::new("proxy-stream").await;
    let (a, _ta) = echo_upstream("a").await;
    let (b, _tb) = echo_upstream("b").await;
    for (i, addr) in [(1, a), (2, b)] {
        let e: EndpointRecord = serde_json::from_value(serde_json::json!({
            "app": "redis", "proc": "redis", "proc_type": "worker", "instance": i,
            "address": addr.ip().to_string(), "port": addr.port(),
        }))
        .unwrap();
        cluster
            .client
            .put(cluster.ks.endpoint("redis", "redis", i), encode(&e), None)
            .await
            .unwrap();
    }
    // The stream port comes from the record, so it cannot be 0: take a free one.
    let port = free_port();
    let record: lain_state::StreamRecord = serde_json::from_value(serde_json::json!({
        "listen_port": port, "app": "redis", "proc": "redis",
    }))
    .unwrap();
    let key = cluster.ks.stream(port);
    cluster
        .client
        .put(key.clone(), encode(&record), None)
        .await
        .unwrap();
    let proxy = Proxy::start(&cluster, STREAM_CONFIG);
    let stream_addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_stream(stream_addr).await;
    let mut seen = HashMap::new();
    for i in 0..10 {
        let answer = tcp_round_trip(stream_addr, &format!("m{i}")).await.unwrap();
        let (name, echoed) = answer.split_once(':').unwrap();
        assert_eq!(echoed, format!("m{i}"));
        *seen.entry(name.to_string()).or_insert(0) += 1;
    }
    assert_eq!(seen.get("a"), Some(&5), "{seen:?}");
    assert_eq!(seen.get("b"), Some(&5), "{seen:?}");

    // A connection opened before the record goes away keeps working; new ones are refused.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut open = tokio::net::TcpStream::connect(stream_addr).await.unwrap();
    open.write_all(b"x").await.unwrap();
    let mut buf = [0u8; 64];
    let n = open.read(&mut buf).await.unwrap();
    assert!(buf[..n].ends_with(b":x"));
    cluster.client.delete(key, None).await.unwrap();
    eventually(Duration::from_secs(10), "stream port closed", || async {
        tokio::net::TcpStream::connect(stream_addr)
            .await
            .is_err()
            .then_some(())
    })
    .await;
    open.write_all(b"y").await.unwrap();
    let n = open.read(&mut buf).await.unwrap();
    assert!(buf[..n].ends_with(b":y"), "{:?}", &buf[..n]);
    let m = metrics(&proxy).await;
    assert!(
        metric_value(&m, "lain_proxy_stream_connections_total ") >= 11.0,
        "{m}"
    );
    assert_eq!(metric_value(&m, "lain_proxy_stream_listeners "), 0.0, "{m}");
    cluster.cleanup().await;
}

async fn raw_request(addr: SocketAddr, text: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(text.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_etcd_value_is_skipped_and_counted() {
    let mut cluster = Cluster::new("proxy-malformed").await;
    let up = Upstream::start("m").await;
    cluster.put_endpoint("m", 1, up.addr).await;
    cluster.put_route(&route("m.lain.local", "/", "m")).await;
    let bad_key = cluster.ks.route("bad", "web", "bad.lain.local", "/");
    cluster
        .client
        .put(bad_key.clone(), "{not json", None)
        .await
        .unwrap();
    let proxy = Proxy::start(&cluster, "");
    let c = client();
    wait_status(&c, &proxy, "m.lain.local", "/", 200).await;
    assert_eq!(get(&c, &proxy, "bad.lain.local", "/").await.0, 404);
    let m = metrics(&proxy).await;
    assert!(
        metric_value(&m, r#"lain_state_invalid_records_total{kind="routes"}"#) >= 1.0,
        "{m}"
    );
    // A later bad write to a good key keeps the last good value serving.
    let good_key = cluster.ks.route("m", "web", "m.lain.local", "/");
    cluster.client.put(good_key, "garbage", None).await.unwrap();
    let m2 = eventually(
        Duration::from_secs(5),
        "second invalid record counted",
        || async {
            let m = metrics(&proxy).await;
            (metric_value(&m, r#"lain_state_invalid_records_total{kind="routes"}"#) >= 2.0)
                .then_some(m)
        },
    )
    .await;
    assert!(m2.contains("lain_state_invalid_records_total"));
    assert_eq!(get(&c, &proxy, "m.lain.local", "/").await.0, 200);
    cluster.cleanup().await;
}

/// Runs a client loop until `stop`; returns (requests, failures, first failure).
async fn load_loop(
    c: reqwest::Client,
    url: String,
    host: &'static str,
    stop: Arc<AtomicBool>,
    limit: u64,
) -> (u64, u64, Option<String>) {
    let (mut n, mut failed, mut first) = (0u64, 0u64, None);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !stop.load(Ordering::Relaxed) && n < limit && Instant::now() < deadline {
        n += 1;
        match c.get(&url).header("host", host).send().await {
            Ok(r) if r.status() == 200 => {
                let _ = r.bytes().await;
            }
            Ok(r) => {
                failed += 1;
                first.get_or_insert(format!("status {}", r.status()));
            }
            Err(e) => {
                failed += 1;
                first.get_or_insert(e.to_string());
            }
        }
    }
    (n, failed, first)
}

/// Two client loops against one host, running until [`Load::finish`].
struct Load {
    stop: Arc<AtomicBool>,
    loops: Vec<JoinHandle<(u64, u64, Option<String>)>>,
}

impl Load {
    /// Starts the loops; each stops by itself after `limit` requests or a minute.
    fn start(c: &reqwest::Client, url: String, host: &'static str, limit: u64) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let loops = (0..2)
            .map(|_| tokio::spawn(load_loop(c.clone(), url.clone(), host, stop.clone(), limit)))
            .collect();
        Load { stop, loops }
    }

    /// Stops the loops and fails the test if any request failed; returns how many ran.
    async fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = 0;
        for l in self.loops {
            let (n, failed, first) = l.await.unwrap();
            assert_eq!(failed, 0, "{failed} of {n} failed, first: {first:?}");
            total += n;
        }
        total
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_route_updates_under_load_fail_no_request() {
    let (mut cluster, _up, proxy, c) =
        one_route("proxy-churn", "churn", "churn.lain.local", "/", "/", "").await;
    let load = Load::start(&c, proxy.url("/"), "churn.lain.local", 200_000);
    for i in 0..1000u32 {
        // Other apps' routes come and go; the served route is rewritten now and then.
        let r = route(&format!("app{}.lain.local", i % 50), "/", "other");
        if i % 3 == 2 {
            cluster.delete_route(&r).await;
        } else {
            cluster.put_route(&r).await;
        }
        if i % 100 == 0 {
            cluster
                .put_route(&route("churn.lain.local", "/", "churn"))
                .await;
        }
    }
    let table_version = eventually(Duration::from_secs(10), "table caught up", || async {
        let m = metrics(&proxy).await;
        let v = metric_value(&m, "lain_proxy_route_table_version ");
        (v > 1.0).then_some(v)
    })
    .await;
    let total = load.finish().await;
    assert!(total > 100, "only {total} requests ran");
    assert!(table_version > 1.0);
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_killed_under_load_causes_no_client_error() {
    let mut cluster = Cluster::new("proxy-kill").await;
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    cluster.put_endpoint("kill", 1, a.addr).await;
    cluster.put_endpoint("kill", 2, b.addr).await;
    cluster
        .put_route(&route("kill.lain.local", "/", "kill"))
        .await;
    let proxy = Proxy::start(&cluster, "");
    let c = client();
    wait_status(&c, &proxy, "kill.lain.local", "/", 200).await;
    let load = Load::start(&c, proxy.url("/"), "kill.lain.local", 100_000);
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.kill();
    let before = b.hits.load(Ordering::Relaxed);
    eventually(
        Duration::from_secs(10),
        "traffic continues on b",
        || async { (b.hits.load(Ordering::Relaxed) > before + 200).then_some(()) },
    )
    .await;
    load.finish().await;
    let m = metrics(&proxy).await;
    assert!(
        metric_value(&m, "lain_proxy_upstream_connect_errors_total") >= 1.0,
        "{m}"
    );
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_take_an_endpoint_out_and_back() {
    let mut cluster = Cluster::new("proxy-health").await;
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    cluster.put_endpoint("hc", 1, a.addr).await;
    cluster.put_endpoint("hc", 2, b.addr).await;
    let mut r = route("hc.lain.local", "/", "hc");
    r.healthcheck = Some(lain_state::HealthCheck {
        path: "/healthz".into(),
        interval_ms: 100,
        rise: 2,
        fall: 2,
    });
    cluster.put_route(&r).await;
    let proxy = Proxy::start(&cluster, "");
    let c = client();
    wait_status(&c, &proxy, "hc.lain.local", "/", 200).await;
    a.healthy.store(false, Ordering::Relaxed);
    // Once a is out, every request lands on b.
    eventually(Duration::from_secs(10), "a taken out", || async {
        let mut names = Vec::new();
        for _ in 0..6 {
            let (_, body) = get(&c, &proxy, "hc.lain.local", "/").await;
            names.push(json(&body)["name"].as_str().unwrap().to_string());
        }
        names.iter().all(|n| n == "b").then_some(())
    })
    .await;
    a.healthy.store(true, Ordering::Relaxed);
    eventually(Duration::from_secs(10), "a back in", || async {
        let (_, body) = get(&c, &proxy, "hc.lain.local", "/").await;
        (json(&body)["name"] == "a").then_some(())
    })
    .await;
    let m = metrics(&proxy).await;
    assert!(
        metric_value(
            &m,
            r#"lain_proxy_health_transitions_total{direction="down"}"#
        ) >= 1.0
    );
    assert!(metric_value(&m, r#"lain_proxy_health_transitions_total{direction="up"}"#) >= 1.0);
    // An endpoint removed from etcd stops receiving traffic.
    cluster.delete_endpoint("hc", 1).await;
    eventually(Duration::from_secs(10), "a removed", || async {
        let routes: serde_json::Value = reqwest::get(format!("http://{}/routes", proxy.admin))
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (routes["routes"][0]["endpoints"].as_array()?.len() == 1).then_some(())
    })
    .await;
    cluster.cleanup().await;
}

fn write(path: &Path, text: &str) {
    // Write then rename, so the watcher never reads a half-written file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_routes_file_is_served_and_reread() {
    let up = Upstream::start("file").await;
    let dir = lain_test_support::temp_dir();
    let routes = dir.path().join("routes.yaml");
    let doc = |host: &str| {
        format!(
            "routes:\n  - {{host: {host}, path: /, app: f, proc: web}}\nendpoints:\n  - {{app: f, proc: web, instance: 1, address: 127.0.0.1, port: {}}}\n",
            up.addr.port()
        )
    };
    write(&routes, &doc("one.lain.local"));
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        "[listen]\nhttp = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n[access_log]\npath = \"\"\n",
    )
    .unwrap();
    let proxy = Proxy::spawn(
        &[
            "proxy",
            "--config",
            config.to_str().unwrap(),
            "--routes",
            routes.to_str().unwrap(),
        ],
        dir,
    );
    let c = client();
    wait_status(&c, &proxy, "one.lain.local", "/", 200).await;
    write(&routes, &doc("two.lain.local"));
    wait_status(&c, &proxy, "two.lain.local", "/", 200).await;
    assert_eq!(get(&c, &proxy, "one.lain.local", "/").await.0, 404);
}

#[test]
fn check_config_exit_codes() {
    let dir = lain_test_support::temp_dir();
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "[state]\netcd_endpoints = [\"http://127.0.0.1:1\"]\n",
    )
    .unwrap();
    let (code, _, err) = run_lain(
        &["proxy", "--check-config", "-c", good.to_str().unwrap()],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "trusted_proxies = [\"nope\"]\nbogus = 1\n[state]\netcd_endpoints = [\"127.0.0.1:1\"]\n",
    )
    .unwrap();
    let (code, _, err) = run_lain(
        &["proxy", "--check-config", "-c", bad.to_str().unwrap()],
        None,
    );
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("bogus"), "{err}");
    let (code, _, err) = run_lain(&["proxy", "--check-config"], None);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("state"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_cleanly() {
    let (cluster, _up, mut proxy, _) =
        one_route("proxy-term", "t", "t.lain.local", "/", "/", "").await;
    let status = proxy.process.terminate(Duration::from_secs(10));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    cluster.cleanup().await;
}

fn self_signed(names: &[&str]) -> (String, String) {
    let c =
        rcgen::generate_simple_self_signed(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
    (c.cert.pem(), c.signing_key.serialize_pem())
}

async fn put_cert(cluster: &mut Cluster, id: &str, names: &[&str], pem: &(String, String)) {
    let rec: lain_state::CertRecord = serde_json::from_value(serde_json::json!({
        "v": 1, "names": names, "cert_pem": pem.0, "key_pem": pem.1,
    }))
    .unwrap();
    cluster
        .client
        .put(cluster.ks.cert(id), encode(&rec), None)
        .await
        .unwrap();
}

fn tls_client(roots: &[&String], names: &[&str], addr: SocketAddr) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none())
        .tls_built_in_root_certs(false);
    for r in roots {
        b = b.add_root_certificate(reqwest::Certificate::from_pem(r.as_bytes()).unwrap());
    }
    for n in names {
        b = b.resolve(n, addr);
    }
    b.build().unwrap()
}

/// A proxy with an https listener (and http and admin) following `cluster`; the directory
/// holds its configuration.
fn tls_proxy(cluster: &Cluster) -> (LainProcess, tempfile::TempDir) {
    let dir = lain_test_support::temp_dir();
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            "[listen]\nhttp = \"127.0.0.1:0\"\nhttps = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n[state]\netcd_endpoints = {:?}\nprefix = \"{}\"\n[access_log]\npath = \"\"\n",
            cluster.endpoints, cluster.prefix
        ),
    )
    .unwrap();
    let process = LainProcess::spawn(
        &["proxy", "--config", config.to_str().unwrap()],
        &[("LAIN_LOG", "warn")],
        &["http", "https", "admin"],
    );
    (process, dir)
}

/// Everything `s` sends until it closes, within 10 s; `None` when it failed or took longer.
async fn read_all(s: &mut (impl tokio::io::AsyncRead + Unpin)) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut all))
        .await
        .ok()?
        .ok()?;
    Some(all)
}

/// One TLS connection to `addr` for `name` with `config`, carrying one request so that
/// tickets the server sends after the handshake are read; how the handshake went, or `None`
/// when it failed.
async fn tls_exchange(
    config: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    name: &str,
) -> Option<rustls::HandshakeKind> {
    use tokio::io::AsyncWriteExt;
    let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    let server = rustls::pki_types::ServerName::try_from(name.to_string()).ok()?;
    let mut s = tokio_rustls::TlsConnector::from(config)
        .connect(server, tcp)
        .await
        .ok()?;
    let request = format!("GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes()).await.ok()?;
    let answer = read_all(&mut s).await?;
    assert!(answer.starts_with(b"HTTP/1.1 "), "{answer:?}");
    s.get_ref().1.handshake_kind()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_sessions_resume_however_many_clients_came_between() {
    let mut cluster = Cluster::new("proxy-tls-resume").await;
    let name = "resume.tls.lain";
    let cert = self_signed(&[name]);
    put_cert(&mut cluster, "resume", &[name], &cert).await;
    let (process, _dir) = tls_proxy(&cluster);
    let https = process.addr("https");
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(
            <rustls::pki_types::CertificateDer as rustls::pki_types::pem::PemObject>::from_pem_slice(
                cert.0.as_bytes(),
            )
            .unwrap(),
        )
        .unwrap();
    // A client of its own, with its own store of sessions to resume.
    let client = |version: &'static rustls::SupportedProtocolVersion| {
        Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots.clone())
            .with_no_client_auth(),
        )
    };
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        let returning = client(version);
        let first = eventually(Duration::from_secs(10), "the certificate served", || {
            tls_exchange(returning.clone(), https, name)
        })
        .await;
        assert_eq!(first, rustls::HandshakeKind::Full, "{version:?}");
        // More clients than a session cache of 256 holds.
        for _ in 0..300 {
            assert_eq!(
                tls_exchange(client(version), https, name).await,
                Some(rustls::HandshakeKind::Full),
                "{version:?}"
            );
        }
        assert_eq!(
            tls_exchange(returning, https, name).await,
            Some(rustls::HandshakeKind::Resumed),
            "{version:?}"
        );
    }
    cluster.cleanup().await;
}

/// Accepts any server certificate and keeps the leaf, so a test can see which one a
/// handshake was given.
#[derive(Debug)]
struct Leaf {
    provider: Arc<rustls::crypto::CryptoProvider>,
    seen: std::sync::Mutex<Option<Vec<u8>>>,
}

impl rustls::client::danger::ServerCertVerifier for Leaf {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        *self.seen.lock().unwrap() = Some(end_entity.to_vec());
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The leaf certificate (DER) the server at `addr` presents for `name`, a DNS name sent as
/// SNI or an IP address, which sends none.
async fn served_leaf(addr: SocketAddr, name: &str) -> Option<Vec<u8>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let leaf = Arc::new(Leaf {
        provider: provider.clone(),
        seen: Default::default(),
    });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(leaf.clone())
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    let server = rustls::pki_types::ServerName::try_from(name.to_string()).ok()?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(server, tcp)
        .await
        .ok()?;
    leaf.seen.lock().unwrap().take()
}

fn der(pem: &str) -> Vec<u8> {
    <rustls::pki_types::CertificateDer as rustls::pki_types::pem::PemObject>::from_pem_slice(
        pem.as_bytes(),
    )
    .unwrap()
    .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_certificates_are_chosen_by_name_and_read_again_when_renewed() {
    let mut cluster = Cluster::new("proxy-tls-files").await;
    let dir = lain_test_support::temp_dir();
    let file = self_signed(&["files.tls.lain", "*.files.tls.lain"]);
    let other = self_signed(&["other.tls.lain"]);
    let from_etcd = self_signed(&["etcd.tls.lain", "files.tls.lain"]);
    for (name, pem) in [("files", &file), ("other", &other)] {
        std::fs::write(dir.path().join(format!("{name}.crt")), &pem.0).unwrap();
        std::fs::write(dir.path().join(format!("{name}.key")), &pem.1).unwrap();
    }
    put_cert(
        &mut cluster,
        "etcd",
        &["etcd.tls.lain", "files.tls.lain"],
        &from_etcd,
    )
    .await;
    let certs = |names: &str, stem: &str| {
        format!(
            "[[tls.certs]]\nnames = {names}\ncert_path = {:?}\nkey_path = {:?}\n",
            dir.path().join(format!("{stem}.crt")),
            dir.path().join(format!("{stem}.key")),
        )
    };
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            "[listen]\nhttp = \"127.0.0.1:0\"\nhttps = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\
             [tls]\nfiles_check_secs = 1\n[state]\netcd_endpoints = {:?}\nprefix = \"{}\"\n[access_log]\npath = \"\"\n{}{}",
            cluster.endpoints,
            cluster.prefix,
            certs(r#"["files.tls.lain", "*.files.tls.lain"]"#, "files"),
            certs(r#"["other.tls.lain"]"#, "other"),
        ),
    )
    .unwrap();
    let process = LainProcess::spawn(
        &["proxy", "--config", config.to_str().unwrap()],
        &[("LAIN_LOG", "warn")],
        &["http", "https", "admin"],
    );
    let https = process.addr("https");
    // The etcd certificate arrives with the first snapshot.
    eventually(Duration::from_secs(10), "the etcd certificate", || async {
        (served_leaf(https, "etcd.tls.lain").await? == der(&from_etcd.0)).then_some(())
    })
    .await;
    let (file_der, other) = (der(&file.0), der(&other.0));
    let file = &file_der;
    for (name, want) in [
        // By exact name and by wildcard; a file certificate keeps a name etcd also claims.
        ("files.tls.lain", file),
        ("a.files.tls.lain", file),
        ("other.tls.lain", &other),
        // The first file certificate answers names nobody claims, and clients that send
        // no name at all.
        ("unknown.example", file),
        ("127.0.0.1", file),
    ] {
        assert!(
            served_leaf(https, name).await.as_ref() == Some(want),
            "{name} was not given its certificate"
        );
    }
    let admin = process.addr("admin");
    let metrics = || metrics_page(admin);
    // files, *.files, other and etcd.
    let m = metrics().await;
    assert_eq!(
        metric_value(&m, "lain_proxy_tls_certificate_names"),
        4.0,
        "{m}"
    );

    // A renewed certificate written over the files is served without a restart, and the
    // default follows it; also when it is copied in with the old files' modification times
    // kept, as `cp -p` of a renewal made elsewhere does.
    let renewed_pem = self_signed(&["files.tls.lain", "*.files.tls.lain"]);
    for (name, text) in [("files.key", &renewed_pem.1), ("files.crt", &renewed_pem.0)] {
        let path = dir.path().join(name);
        let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
        std::fs::write(&path, text).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
    }
    let renewed = der(&renewed_pem.0);
    eventually(
        Duration::from_secs(10),
        "the renewed certificate",
        || async {
            (served_leaf(https, "files.tls.lain").await.as_ref() == Some(&renewed)).then_some(())
        },
    )
    .await;
    assert!(served_leaf(https, "unknown.example").await.as_ref() == Some(&renewed));
    // A file that no longer loads is reported, and the certificate loaded before it keeps
    // serving.
    std::fs::write(dir.path().join("files.crt"), "not a certificate").unwrap();
    eventually(
        Duration::from_secs(10),
        "the broken file reported",
        || async {
            let m = metrics().await;
            (metric_value(
                &m,
                "lain_proxy_tls_certificate_errors_total{source=\"file\"}",
            ) >= 1.0)
                .then_some(())
        },
    )
    .await;
    for name in ["files.tls.lain", "b.files.tls.lain", "unknown.example"] {
        assert!(
            served_leaf(https, name).await.as_ref() == Some(&renewed),
            "{name} lost its certificate to a broken file"
        );
    }
    // So does an etcd certificate overwritten with a key of another certificate.
    let mismatched = (from_etcd.0.clone(), renewed_pem.1.clone());
    put_cert(
        &mut cluster,
        "etcd",
        &["etcd.tls.lain", "files.tls.lain"],
        &mismatched,
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "the broken record reported",
        || async {
            let m = metrics().await;
            (metric_value(
                &m,
                "lain_proxy_tls_certificate_errors_total{source=\"etcd\"}",
            ) >= 1.0)
                .then_some(())
        },
    )
    .await;
    assert!(
        served_leaf(https, "etcd.tls.lain").await == Some(der(&from_etcd.0)),
        "etcd.tls.lain lost its certificate to a broken record"
    );
    drop(process);

    // Files that cannot be served are configuration errors, each named by where it is
    // configured, found by --check-config before anything starts.
    std::fs::write(dir.path().join("other.key"), &from_etcd.1).unwrap();
    std::fs::remove_file(dir.path().join("files.crt")).unwrap();
    let (code, _, err) = run_lain(
        &["proxy", "--check-config", "-c", config.to_str().unwrap()],
        None,
    );
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("tls.certs[0].cert_path"), "{err}");
    assert!(err.contains("tls.certs[1].key_path"), "{err}");
    assert!(err.contains("does not belong"), "{err}");
    let (code, _, err) = run_lain(&["proxy", "-c", config.to_str().unwrap()], None);
    assert_eq!(code, 64, "{err}");
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_sni_certificates_rotation_http2_and_https_only() {
    let mut cluster = Cluster::new("proxy-tls").await;
    let up = Upstream::start("tls").await;
    cluster.put_endpoint("tls", 1, up.addr).await;
    cluster.put_route(&route("a.tls.lain", "/", "tls")).await;
    let mut secure = route("b.tls.lain", "/", "tls");
    secure.https_only = true;
    cluster.put_route(&secure).await;
    let a = self_signed(&["a.tls.lain"]);
    let b = self_signed(&["*.b.tls.lain", "b.tls.lain"]);
    put_cert(&mut cluster, "a", &["a.tls.lain"], &a).await;
    put_cert(&mut cluster, "b", &["*.b.tls.lain", "b.tls.lain"], &b).await;

    let (process, _dir) = tls_proxy(&cluster);
    let https = process.addr("https");
    let names = ["a.tls.lain", "b.tls.lain", "x.b.tls.lain"];
    let c = tls_client(&[&a.0, &b.0], &names, https);

    // Each name gets its own certificate by SNI, and HTTP/2 is negotiated by ALPN.
    let r = eventually(Duration::from_secs(10), "https a", || async {
        let r = c
            .get(format!("https://a.tls.lain:{}/x", https.port()))
            .send()
            .await
            .ok()?;
        (r.status() == 200).then_some(r)
    })
    .await;
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    let v = json(&r.text().await.unwrap());
    assert_eq!(v["headers"]["x-forwarded-proto"], "https");
    let r = c
        .get(format!("https://x.b.tls.lain:{}/", https.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // A client trusting only a's certificate cannot reach b's name.
    let only_a = tls_client(&[&a.0], &names, https);
    assert!(
        only_a
            .get(format!("https://b.tls.lain:{}/", https.port()))
            .send()
            .await
            .is_err()
    );

    // https_only answers plain HTTP with a redirect.
    let plain = process.addr("http");
    let r = client()
        .get(format!("http://{plain}/p?q=1"))
        .header("host", "b.tls.lain")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 301);
    assert_eq!(r.headers()["location"], "https://b.tls.lain/p?q=1");

    // Rotation: a new certificate for a is served on the next handshake, no restart.
    let a2 = self_signed(&["a.tls.lain"]);
    put_cert(&mut cluster, "a", &["a.tls.lain"], &a2).await;
    let only_a2 = tls_client(&[&a2.0], &names, https);
    eventually(
        Duration::from_secs(10),
        "rotated certificate served",
        || async {
            let r = only_a2
                .get(format!("https://a.tls.lain:{}/", https.port()))
                .send()
                .await
                .ok()?;
            (r.status() == 200).then_some(())
        },
    )
    .await;
    drop(process);
    cluster.cleanup().await;
}

/// An upstream that answers any request with `101 Switching Protocols` and then echoes bytes.
async fn upgrade_echo_upstream() -> (SocketAddr, JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if s.read(&mut b).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(b[0]);
                }
                let _ = s
                    .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
                    .await;
                let mut buf = [0u8; 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_stays_open_across_table_swaps() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut cluster = Cluster::new("proxy-ws").await;
    let (up, task) = upgrade_echo_upstream().await;
    cluster.put_endpoint("ws", 1, up).await;
    cluster.put_route(&route("ws.lain.local", "/", "ws")).await;
    let proxy = Proxy::start(&cluster, "");
    let mut s = eventually(Duration::from_secs(10), "upgrade accepted", || async {
        let mut s = tokio::net::TcpStream::connect(proxy.http).await.ok()?;
        s.write_all(b"GET /chat HTTP/1.1\r\nHost: ws.lain.local\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
            .await
            .ok()?;
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if s.read(&mut b).await.ok()? == 0 {
                return None;
            }
            head.push(b[0]);
        }
        head.starts_with(b"HTTP/1.1 101").then_some(s)
    })
    .await;
    let echo = async |s: &mut tokio::net::TcpStream, msg: &[u8]| {
        s.write_all(msg).await.unwrap();
        let mut got = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got))
            .await
            .expect("echo in time")
            .expect("echo");
        assert_eq!(got, msg);
    };
    echo(&mut s, b"before").await;
    let v0 = metric_value(&metrics(&proxy).await, "lain_proxy_route_table_version ");
    for i in 0..50 {
        cluster
            .put_route(&route(&format!("x{i}.lain.local"), "/", "other"))
            .await;
    }
    eventually(Duration::from_secs(10), "tables swapped", || async {
        let v = metric_value(&metrics(&proxy).await, "lain_proxy_route_table_version ");
        (v > v0).then_some(())
    })
    .await;
    echo(&mut s, b"after the swaps").await;
    task.abort();
    cluster.cleanup().await;
}

/// One request on a fresh connection, so that every request tests that a connection is
/// accepted: Ok(status line) or the error.
async fn fresh_connection_get(addr: SocketAddr, host: &str) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    s.write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .map_err(|_| "read timed out".to_string())?
        .map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&buf);
    Ok(text.lines().next().unwrap_or_default().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_upgrade_under_load_refuses_no_connection() {
    let mut cluster = Cluster::new("proxy-upgrade").await;
    let up = Upstream::start("up").await;
    cluster.put_endpoint("up", 1, up.addr).await;
    cluster.put_route(&route("up.lain.local", "/", "up")).await;
    // A TCP stream port too: its listener is handed over like the HTTP ones.
    let (echo, _echo_task) = echo_upstream("echo").await;
    let stream_port = cluster.put_stream("kv", "kv", echo).await;
    let stream_addr: SocketAddr = ([127, 0, 0, 1], stream_port).into();

    let sock_dir = lain_test_support::temp_dir();
    let sock = sock_dir.path().join("upgrade.sock");
    let mut old = Proxy::start_listen(
        &cluster,
        STREAM_CONFIG,
        &format!("upgrade_socket_path = {:?}", sock.display().to_string()),
    );
    let c = client();
    wait_status(&c, &old, "up.lain.local", "/", 200).await;
    wait_stream(stream_addr).await;

    let stop = Arc::new(AtomicBool::new(false));
    let addr = old.http;
    let loads: Vec<_> = (0..2)
        .map(|_| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let (mut n, mut failures) = (0u64, Vec::new());
                let deadline = Instant::now() + Duration::from_secs(60);
                while !stop.load(Ordering::Relaxed) && n < 100_000 && Instant::now() < deadline {
                    n += 1;
                    match fresh_connection_get(addr, "up.lain.local").await {
                        Ok(line) if line.contains(" 200 ") => {}
                        Ok(line) => failures.push(line),
                        Err(e) => failures.push(e),
                    }
                }
                (n, failures)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The successor runs the same configuration and takes the listeners over.
    let config = old.dir.path().join("proxy.toml");
    let new_dir = lain_test_support::temp_dir();
    let new = Proxy::spawn(
        &["proxy", "--config", config.to_str().unwrap(), "--upgrade"],
        new_dir,
    );
    assert_eq!(
        new.http, old.http,
        "the successor serves on the same socket"
    );
    assert_eq!(new.admin, old.admin);
    // The old process drains and exits by itself, successfully.
    let status = tokio::task::block_in_place(|| old.process.wait_exit(Duration::from_secs(15)));
    assert!(
        status.is_some_and(|s| s.success()),
        "old proxy did not exit cleanly: {status:?}"
    );
    // Load goes on against the successor alone for a while.
    let served_before = metric_value(&metrics(&new).await, "lain_proxy_requests_total");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for l in loads {
        let (n, failures) = l.await.unwrap();
        assert!(
            failures.is_empty(),
            "{} of {n} requests failed, first: {:?}",
            failures.len(),
            failures.first()
        );
        total += n;
    }
    assert!(total > 100, "only {total} requests ran");
    let served_after = metric_value(&metrics(&new).await, "lain_proxy_requests_total");
    assert!(
        served_after > served_before,
        "the successor served nothing: {served_before} then {served_after}"
    );
    // The old process is gone, so the stream port answers from the successor.
    assert_eq!(
        tcp_round_trip(stream_addr, "ping").await.unwrap(),
        "echo:ping"
    );

    // A second upgrade works too: the successor kept the upgrade socket.
    let config2 = config.clone();
    let mut new = new;
    let newer = Proxy::spawn(
        &["proxy", "--config", config2.to_str().unwrap(), "--upgrade"],
        lain_test_support::temp_dir(),
    );
    assert_eq!(newer.http, addr);
    let status = tokio::task::block_in_place(|| new.process.wait_exit(Duration::from_secs(15)));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    assert_eq!(
        fresh_connection_get(addr, "up.lain.local").await.as_deref(),
        Ok("HTTP/1.1 200 OK")
    );
    cluster.cleanup().await;
}

#[test]
fn upgrade_without_a_running_proxy_fails_and_without_a_socket_is_a_config_error() {
    let dir = lain_test_support::temp_dir();
    let config = dir.path().join("proxy.toml");
    write(
        &config,
        &format!(
            "[listen]\nhttp = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nupgrade_socket_path = {:?}\n[state]\nroutes_file = {:?}\n",
            dir.path().join("none.sock").display().to_string(),
            dir.path().join("routes.yaml").display().to_string(),
        ),
    );
    write(&dir.path().join("routes.yaml"), "routes: []\n");
    let (code, _, err) = run_lain(
        &["proxy", "--config", config.to_str().unwrap(), "--upgrade"],
        None,
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no running proxy at"), "{err}");
    assert!(err.contains("none.sock"), "{err}");
    let (code, _, err) = run_lain(&["proxy", "--upgrade", "--routes", "/dev/null"], None);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("listen.upgrade_socket_path"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_hang_up_mid_request_do_not_eject_the_endpoint() {
    use tokio::io::AsyncWriteExt;
    let (cluster, up, proxy, c) =
        one_route("proxy-hangup", "hangup", "hangup.lain.local", "/", "/", "").await;
    // Every client sends a request the upstream is slow to answer, then goes away: what a
    // load generator does when it stops, or a browser when its user leaves the page.
    // Each hangs up once the upstream has the request, so all 20 are failures of the kind
    // that used to be blamed on the endpoint (5 eject it).
    for _ in 0..20 {
        let before = up.hits.load(Ordering::Relaxed);
        let mut s = tokio::net::TcpStream::connect(proxy.http).await.unwrap();
        s.write_all(b"GET /slow HTTP/1.1\r\nHost: hangup.lain.local\r\n\r\n")
            .await
            .unwrap();
        eventually(
            Duration::from_secs(5),
            "the upstream has the request",
            || async { (up.hits.load(Ordering::Relaxed) > before).then_some(()) },
        )
        .await;
        drop(s);
    }
    // Let the proxy notice the last hang-ups before asking.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(get(&c, &proxy, "hangup.lain.local", "/").await.0, 200);
    let m = metrics(&proxy).await;
    assert_eq!(
        metric_value(&m, "lain_proxy_upstream_ejections_total"),
        0.0,
        "{m}"
    );
    cluster.cleanup().await;
}

/// An upstream speaking HTTP/1.1 by hand, so that a test chooses every byte of a response:
/// chunked bodies with extensions and trailers, bodies ended by closing, interim responses,
/// and connections it closes while they are idle. Counts the connections it accepted.
struct ScriptedUpstream {
    addr: SocketAddr,
    connections: Arc<AtomicU64>,
    /// Requests for `/hang` whose connection the proxy closed before they were answered.
    abandoned: Arc<AtomicU64>,
    /// Requests read, of every kind.
    requests: Arc<AtomicU64>,
    accept: JoinHandle<()>,
}

impl ScriptedUpstream {
    async fn start() -> ScriptedUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicU64::new(0));
        let abandoned = Arc::new(AtomicU64::new(0));
        let requests = Arc::new(AtomicU64::new(0));
        let (count, gone, read) = (connections.clone(), abandoned.clone(), requests.clone());
        let accept = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let n = count.fetch_add(1, Ordering::Relaxed) + 1;
                tokio::spawn(ScriptedUpstream::serve(s, n, gone.clone(), read.clone()));
            }
        });
        ScriptedUpstream {
            addr,
            connections,
            abandoned,
            requests,
            accept,
        }
    }

    async fn serve(
        mut s: tokio::net::TcpStream,
        conn: u64,
        abandoned: Arc<AtomicU64>,
        requests: Arc<AtomicU64>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = Vec::new();
        loop {
            // One request: its header, then its body (by length, or chunked).
            let (method, target, head, length, chunked) = loop {
                let mut headers = [httparse::EMPTY_HEADER; 64];
                let mut req = httparse::Request::new(&mut headers);
                if let Ok(httparse::Status::Complete(n)) = req.parse(&buf) {
                    let value = |name: &str| {
                        req.headers
                            .iter()
                            .find(|h| h.name.eq_ignore_ascii_case(name))
                            .map(|h| std::str::from_utf8(h.value).unwrap().to_string())
                    };
                    let length = value("content-length").map_or(0, |v| v.parse().unwrap());
                    let chunked = value("transfer-encoding").is_some();
                    requests.fetch_add(1, Ordering::Relaxed);
                    break (
                        req.method.unwrap().to_string(),
                        req.path.unwrap().to_string(),
                        n,
                        length,
                        chunked,
                    );
                }
                let mut more = [0u8; 65536];
                match s.read(&mut more).await {
                    Ok(0) | Err(_) => return,
                    Ok(k) => buf.extend_from_slice(&more[..k]),
                }
            };
            buf.drain(..head);
            if target == "/refuse" {
                // Answered at once, the body unread, and closed: an app refusing an upload.
                let _ = s
                    .write_all(
                        b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 9\r\n\r\ntoo large",
                    )
                    .await;
                return;
            }
            if target == "/stream-echo" {
                // Each piece of the body is sent back as a chunk as soon as it is read, the
                // way a streaming app (a transcoder, an echo service) answers: it reads on
                // only as fast as its answer is taken.
                let mut left = length;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                    .await;
                loop {
                    let piece: Vec<u8> = buf.drain(..buf.len().min(left)).collect();
                    left -= piece.len();
                    if !piece.is_empty() {
                        let mut chunk = format!("{:x}\r\n", piece.len()).into_bytes();
                        chunk.extend_from_slice(&piece);
                        chunk.extend_from_slice(b"\r\n");
                        if s.write_all(&chunk).await.is_err() {
                            return;
                        }
                    }
                    if left == 0 {
                        break;
                    }
                    let mut more = [0u8; 65536];
                    match s.read(&mut more).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => buf.extend_from_slice(&more[..k]),
                    }
                }
                if s.write_all(b"0\r\n\r\n").await.is_err() {
                    return;
                }
                continue;
            }
            if target == "/crash" {
                // The request kills the app's worker: the connection closes unanswered.
                return;
            }
            // Closed part way through the body, right after it was written: an app that
            // crashed while answering.
            let cut: &[u8] = match target.as_str() {
                "/cut/length" => b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npart",
                "/cut/chunked" => {
                    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\npart\r\n"
                }
                "/cut/badchunk" => {
                    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\npart\r\n0\r\n\r\n"
                }
                _ => b"",
            };
            if !cut.is_empty() {
                let _ = s.write_all(cut).await;
                return;
            }
            let body: Vec<u8> = loop {
                if chunked {
                    // The whole chunked body, once it is all there.
                    if let Some((whole, used)) = dechunk(&buf) {
                        buf.drain(..used);
                        break whole;
                    }
                } else if buf.len() >= length {
                    break buf.drain(..length).collect();
                }
                let mut more = [0u8; 65536];
                match s.read(&mut more).await {
                    Ok(0) | Err(_) => return,
                    Ok(k) => buf.extend_from_slice(&more[..k]),
                }
            };
            let with_length = |b: &[u8]| {
                let mut r =
                    format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", b.len()).into_bytes();
                if method != "HEAD" {
                    r.extend_from_slice(b);
                }
                r
            };
            let (response, then_close): (Vec<u8>, Option<Duration>) = match target.as_str() {
                // An empty list element after the coding (RFC 9110, section 5.6.1).
                "/te/empty-element" => (
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked,\r\n\r\n2\r\nok\r\n0\r\n\r\n"
                        .to_vec(),
                    None,
                ),
                "/chunked" => (
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n\
                      6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
                        .to_vec(),
                    None,
                ),
                "/close" => (
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nended by closing".to_vec(),
                    Some(Duration::ZERO),
                ),
                "/early" => (
                    b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>\r\n\r\n\
                      HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                        .to_vec(),
                    None,
                ),
                "/echo" => {
                    let sum = body.iter().fold(0u64, |a, b| a.wrapping_add(u64::from(*b)));
                    (
                        with_length(format!("{}:{sum}", body.len()).as_bytes()),
                        None,
                    )
                }
                "/big" => (
                    with_length(&(0..1 << 20).map(|i| (i % 251) as u8).collect::<Vec<_>>()),
                    None,
                ),
                // Answered, then closed while idle, as an upstream's keep-alive timeout does.
                "/idle-close" => (with_length(b"soon closed"), Some(Duration::from_millis(50))),
                // Answered late, unless the proxy gives up on the request first.
                "/hang" => {
                    let mut probe = [0u8; 1];
                    match tokio::time::timeout(Duration::from_secs(3), s.read(&mut probe)).await {
                        Ok(Ok(0) | Err(_)) => {
                            abandoned.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                        _ => (with_length(b"late"), None),
                    }
                }
                // A header far larger than any proxy passes on.
                "/bighead" => {
                    let mut r = b"HTTP/1.1 200 OK\r\nx-big: ".to_vec();
                    r.resize(r.len() + (100 << 10), b'a');
                    r.extend_from_slice(b"\r\ncontent-length: 2\r\n\r\nok");
                    (r, None)
                }
                // Apache's offer to upgrade, and fields its Connection makes hop-by-hop.
                "/hop" => (
                    b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\nConnection: X-Hint\r\n\
                      X-Hint: 1\r\nContent-Length: 0\r\n\r\n\
                      HTTP/1.1 200 OK\r\nUpgrade: h2,h2c\r\nConnection: Upgrade, Keep-Alive, X-Hop\r\n\
                      Keep-Alive: timeout=5, max=100\r\nProxy-Connection: keep-alive\r\n\
                      TE: trailers\r\nX-Hop: secret\r\nX-Kept: 1\r\ncontent-length: 2\r\n\r\nok"
                        .to_vec(),
                    None,
                ),
                "/426" => (
                    b"HTTP/1.1 426 Upgrade Required\r\nUpgrade: TLS/1.2\r\nConnection: Upgrade\r\n\
                      content-length: 2\r\n\r\nno"
                        .to_vec(),
                    None,
                ),
                "/lengths/same" => (
                    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nContent-Length: 2\r\n\r\nok".to_vec(),
                    None,
                ),
                // Framing fields on a response that never has a body.
                // Whitespace between a field name and its colon, which a proxy takes away.
                "/spaced" => (
                    b"HTTP/1.1 200 OK\r\nX-Spaced : v\r\ncontent-length: 2\r\n\r\nok".to_vec(),
                    None,
                ),
                "/204/framed" => (
                    b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\
                      Transfer-Encoding: chunked\r\nX-Kept: 1\r\n\r\n"
                        .to_vec(),
                    None,
                ),
                // A switch of protocols to a request that offered none.
                "/switch" => (
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                      Connection: Upgrade\r\n\r\nraw bytes"
                        .to_vec(),
                    None,
                ),
                "/status/000" => (
                    b"HTTP/1.1 000 OK\r\ncontent-length: 2\r\n\r\nok".to_vec(),
                    None,
                ),
                "/lengths/differ" => (
                    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nContent-Length: 3\r\n\r\nok!".to_vec(),
                    Some(Duration::ZERO),
                ),
                // As many Set-Cookie headers as asked for: an app that sets many cookies.
                t if t.starts_with("/cookies/") => {
                    let n: usize = t["/cookies/".len()..].parse().unwrap_or(0);
                    let mut r = b"HTTP/1.1 200 OK\r\n".to_vec();
                    for i in 0..n {
                        r.extend_from_slice(
                            format!("set-cookie: c{i}=v{i}; Path=/\r\n").as_bytes(),
                        );
                    }
                    r.extend_from_slice(b"content-length: 2\r\n\r\nok");
                    (r, None)
                }
                // As many 103 Early Hints as asked for before the answer.
                t if t.starts_with("/hints/") => {
                    let n: usize = t["/hints/".len()..].parse().unwrap_or(0);
                    let mut r = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n".repeat(n);
                    r.extend_from_slice(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
                    (r, None)
                }
                t if t.starts_with("/gen/") => (
                    generated_response(&method, t, &body),
                    (t.contains("/eof/") || t.contains("/bye/")).then_some(Duration::ZERO),
                ),
                "/slowish" => {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    (
                        with_length(format!("{conn}:{method} {target}").as_bytes()),
                        None,
                    )
                }
                _ => (
                    with_length(format!("{conn}:{method} {target}").as_bytes()),
                    None,
                ),
            };
            // Written in pieces, so that the proxy sees a response arrive in parts: halves,
            // or for a generated answer three pieces cut where the request's number says
            // (inside a status line, a header, a chunk size or a CRLF alike).
            let n = response.len();
            let mut cuts = vec![n / 2];
            if let Some(id) = target
                .strip_prefix("/gen/")
                .and_then(|t| t.split('/').next())
                .and_then(|id| id.parse::<usize>().ok())
            {
                cuts = vec![(id * 7919 + 13) % n.max(1), (id * 104_729 + 7) % n.max(1)];
                cuts.sort_unstable();
            }
            let mut from = 0;
            for cut in cuts.into_iter().chain([n]) {
                if cut <= from {
                    continue;
                }
                if s.write_all(&response[from..cut]).await.is_err() {
                    return;
                }
                from = cut;
                if from < n {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            if let Some(after) = then_close {
                tokio::time::sleep(after).await;
                return;
            }
        }
    }
}

/// The body `/gen/{id}/{framing}/{len}` asks for: `len` bytes that depend on `id`, so that
/// a body delivered to the wrong request shows.
fn generated_body(id: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| b'a' + ((i + id) % 26) as u8)
        .collect()
}

/// The scripted upstream's answer to `/gen/{id}/{framing}/{len}`: `framing` is `cl`,
/// `chunked`, `eof` (no length: the upstream closes after the body), `bye` (a length, and
/// the upstream closes after the body), `early` (a 103 first), `204` or `304` (which
/// carries the `content-length` of the body it does not send), and `x-seen` tells what the upstream received: method, target, body length and
/// byte sum.
fn generated_response(method: &str, target: &str, body: &[u8]) -> Vec<u8> {
    let path = target.split('?').next().unwrap();
    let parts: Vec<&str> = path.split('/').collect();
    let (id, framing, len): (u64, &str, usize) = match parts.as_slice() {
        ["", "gen", id, framing, len] => (id.parse().unwrap(), framing, len.parse().unwrap()),
        _ => panic!("bad generated target {target}"),
    };
    let sum = body.iter().fold(0u64, |a, b| a + u64::from(*b));
    let seen = format!("x-seen: {method} {target} {}:{sum}\r\n", body.len());
    let bytes = generated_body(id, len);
    let with_body = method != "HEAD";
    let mut r = Vec::new();
    match framing {
        "cl" => {
            r.extend(format!("HTTP/1.1 200 OK\r\n{seen}content-length: {len}\r\n\r\n").bytes());
            if with_body {
                r.extend_from_slice(&bytes);
            }
        }
        "chunked" => {
            r.extend(
                format!("HTTP/1.1 200 OK\r\n{seen}transfer-encoding: chunked\r\n\r\n").bytes(),
            );
            if with_body {
                // Chunks of growing, id-dependent sizes, so that chunk boundaries fall
                // anywhere in the proxy's reads.
                let mut rest = &bytes[..];
                let mut size = 1 + (id as usize % 13);
                while !rest.is_empty() {
                    let n = size.min(rest.len());
                    r.extend(format!("{n:x}\r\n").bytes());
                    r.extend_from_slice(&rest[..n]);
                    r.extend_from_slice(b"\r\n");
                    rest = &rest[n..];
                    size = size * 3 + 1;
                }
                r.extend_from_slice(b"0\r\n\r\n");
            }
        }
        // A body that ends where the connection does; the upstream closes after it.
        "eof" => {
            // An answer to HEAD has no body to end, so only `Connection: close` can tell a
            // proxy not to send another request on the connection; without it the next
            // request may meet the close (the keep-alive race every HTTP client has, which
            // costs a non-idempotent request a 502).
            let close = if with_body {
                ""
            } else {
                "connection: close\r\n"
            };
            r.extend(format!("HTTP/1.1 200 OK\r\n{seen}{close}\r\n").bytes());
            if with_body {
                r.extend_from_slice(&bytes);
            }
        }
        // A length, and the upstream closing after it: the connection must not be reused.
        "bye" => {
            r.extend(
                format!(
                    "HTTP/1.1 200 OK\r\n{seen}connection: close\r\ncontent-length: {len}\r\n\r\n"
                )
                .bytes(),
            );
            if with_body {
                r.extend_from_slice(&bytes);
            }
        }
        // An interim 103 before the answer.
        "early" => {
            r.extend(b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>; rel=preload\r\n\r\n");
            r.extend(format!("HTTP/1.1 200 OK\r\n{seen}content-length: {len}\r\n\r\n").bytes());
            if with_body {
                r.extend_from_slice(&bytes);
            }
        }
        "204" => r.extend(format!("HTTP/1.1 204 No Content\r\n{seen}\r\n").bytes()),
        "304" => r.extend(
            format!("HTTP/1.1 304 Not Modified\r\n{seen}content-length: {len}\r\n\r\n").bytes(),
        ),
        other => panic!("bad framing {other}"),
    }
    r
}

impl Drop for ScriptedUpstream {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Reads one response with a `Content-Length` body from a raw connection, keeping what
/// follows it in `buf`; returns (status, body).
async fn read_response(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> (u16, String) {
    use tokio::io::AsyncReadExt;
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        if let Ok(httparse::Status::Complete(n)) = resp.parse(buf) {
            let length: usize = resp
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .map_or(0, |h| {
                    std::str::from_utf8(h.value).unwrap().parse().unwrap()
                });
            if buf.len() >= n + length {
                let body = String::from_utf8_lossy(&buf[n..n + length]).into_owned();
                let status = resp.code.unwrap();
                buf.drain(..n + length);
                return (status, body);
            }
        }
        let mut more = [0u8; 65536];
        let k = tokio::time::timeout(Duration::from_secs(5), s.read(&mut more))
            .await
            .expect("a response in time")
            .unwrap();
        assert!(
            k > 0,
            "closed mid-response: {}",
            String::from_utf8_lossy(buf)
        );
        buf.extend_from_slice(&more[..k]);
    }
}

/// A proxy serving one route to a scripted upstream.
async fn scripted_route(test: &str, host: &str) -> (Cluster, ScriptedUpstream, Proxy) {
    scripted_route_with(test, host, "").await
}

/// A cluster for `test` whose route for `host` goes to a new scripted upstream.
async fn scripted_cluster(test: &str, host: &str) -> (Cluster, ScriptedUpstream) {
    let mut cluster = Cluster::new(test).await;
    let up = ScriptedUpstream::start().await;
    cluster.put_endpoint("scripted", 1, up.addr).await;
    cluster.put_route(&route(host, "/", "scripted")).await;
    (cluster, up)
}

/// [`scripted_route`] with `extra` top-level proxy configuration.
async fn scripted_route_with(
    test: &str,
    host: &str,
    extra: &str,
) -> (Cluster, ScriptedUpstream, Proxy) {
    let (cluster, up) = scripted_cluster(test, host).await;
    let proxy = Proxy::start(&cluster, extra);
    wait_status(&client(), &proxy, host, "/", 200).await;
    (cluster, up, proxy)
}

fn served_by(m: &str, path: &str) -> f64 {
    metric_value(m, &format!("lain_proxy_served_total{{path=\"{path}\"}}"))
}

/// The metrics once the requests answered so far are all counted: a request is counted just
/// after its response is sent, so a client that was just answered can read the metrics
/// before its request shows in them.
async fn settled_metrics(p: &Proxy) -> String {
    let served = |m: &str| served_by(m, "h1") + served_by(m, "pingora");
    let mut last = metrics(p).await;
    let mut unchanged = 0;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = metrics(p).await;
        if served(&now) == served(&last) {
            unchanged += 1;
            if unchanged == 2 {
                return now;
            }
        } else {
            unchanged = 0;
        }
        last = now;
    }
    panic!("requests kept being counted with no client sending any");
}

/// Waits until `path` (h1 or pingora) served `want` requests more than `before` shows. A
/// request is counted just after its response is sent, so a client can be a moment early.
async fn wait_served(p: &Proxy, before: &str, path: &str, want: f64) {
    let start = served_by(before, path);
    let mut seen = 0.0;
    for _ in 0..100 {
        seen = served_by(&metrics(p).await, path) - start;
        if seen == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{path} served {seen} requests, not {want}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h1_path_relays_every_response_framing() {
    let host = "framing.lain.local";
    let (cluster, _up, proxy) = scripted_route("proxy-h1-framing", host).await;
    let c = client();
    let send = |method: reqwest::Method, path: &str| {
        c.request(method, proxy.url(path)).header("host", host)
    };
    let text = |r: reqwest::Response| async move {
        assert_eq!(r.status().as_u16(), 200);
        r.text().await.unwrap()
    };
    // A chunked body (with an extension and a trailer) arriving in parts keeps its framing.
    assert_eq!(
        text(send(reqwest::Method::GET, "/chunked").send().await.unwrap()).await,
        "hello world"
    );
    // A body ended by the upstream closing reaches its end, and the client is told to close.
    let r = send(reqwest::Method::GET, "/close").send().await.unwrap();
    assert_eq!(r.headers()["connection"], "close");
    assert_eq!(text(r).await, "ended by closing");
    // An interim response is passed on and the final one follows.
    assert_eq!(
        text(send(reqwest::Method::GET, "/early").send().await.unwrap()).await,
        "ok"
    );
    // HEAD: the length of the body that is not sent.
    let r = send(reqwest::Method::HEAD, "/big").send().await.unwrap();
    assert_eq!(r.headers()["content-length"], "1048576");
    assert_eq!(r.bytes().await.unwrap().len(), 0);
    // A large body each way, streamed through in pieces.
    let big = send(reqwest::Method::GET, "/big")
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(big.len(), 1 << 20);
    assert!(big.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));
    let body: Vec<u8> = (0..3_000_000u32).map(|i| (i % 7) as u8).collect();
    let sum = body.iter().fold(0u64, |a, b| a + u64::from(*b));
    let r = send(reqwest::Method::POST, "/echo")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(text(r).await, format!("3000000:{sum}"));
    // Every one of these went through lain's own path, none through pingora.
    let m = metrics(&proxy).await;
    assert!(served_by(&m, "h1") >= 7.0, "{m}");
    assert_eq!(served_by(&m, "pingora"), 0.0, "{m}");
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h1_pipelined_requests_then_a_chunked_body_goes_to_pingora() {
    use tokio::io::AsyncWriteExt;
    let host = "pipe.lain.local";
    let (cluster, up, proxy) = scripted_route("proxy-h1-pipe", host).await;
    // The probe's last request is counted just after its answer.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = settled_metrics(&proxy).await;
    let mut s = tokio::net::TcpStream::connect(proxy.http).await.unwrap();
    // Two requests in one write: answered in order, on one upstream connection.
    s.write_all(
        format!(
            "GET /a HTTP/1.1\r\nHost: {host}\r\n\r\nGET /b?x=1 HTTP/1.1\r\nHost: {host}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    let (s1, a) = read_response(&mut s, &mut buf).await;
    let (s2, b) = read_response(&mut s, &mut buf).await;
    assert_eq!((s1, s2), (200, 200));
    let conn_a = a.strip_suffix(":GET /a").expect(&a);
    assert_eq!(
        b,
        format!("{conn_a}:GET /b?x=1"),
        "the pooled connection is reused"
    );
    wait_served(&proxy, &before, "h1", 2.0).await;

    // A chunked request body is pingora's to read: the request and the next one on the
    // connection are answered through it. (pingora does not read pipelined requests, so
    // the next one waits for the answer.)
    s.write_all(
        format!(
            "POST /echo HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n\
             5\r\nhello\r\n0\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let sum = b"hello".iter().fold(0u64, |a, b| a + u64::from(*b));
    assert_eq!(
        read_response(&mut s, &mut buf).await,
        (200, format!("5:{sum}"))
    );
    s.write_all(format!("GET /c HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let (status, c) = read_response(&mut s, &mut buf).await;
    assert_eq!(status, 200);
    assert!(c.ends_with(":GET /c"), "{c}");
    wait_served(&proxy, &before, "pingora", 2.0).await;
    wait_served(&proxy, &before, "h1", 2.0).await;
    assert!(up.connections.load(Ordering::Relaxed) >= 2);
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h1_pooled_connection_closed_by_the_upstream_is_not_used() {
    let host = "stale.lain.local";
    let (cluster, up, proxy) = scripted_route("proxy-h1-stale", host).await;
    let c = client();
    for round in 0..5 {
        // The upstream answers and then closes the connection while it sits in the pool.
        let r = c
            .get(proxy.url("/idle-close"))
            .header("host", host)
            .send()
            .await
            .unwrap();
        assert_eq!(r.text().await.unwrap(), "soon closed");
        tokio::time::sleep(Duration::from_millis(200)).await;
        // A POST may not be sent twice, so it must not go to the closed connection.
        let r = c
            .post(proxy.url("/echo"))
            .header("host", host)
            .body("abc")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "round {round}");
        assert_eq!(r.text().await.unwrap(), "3:294");
    }
    let m = metrics(&proxy).await;
    assert_eq!(
        metric_value(
            &m,
            "lain_proxy_requests_total{app=\"scripted\",proc=\"web\",class=\"5xx\"}"
        ),
        0.0,
        "{m}"
    );
    assert!(up.connections.load(Ordering::Relaxed) >= 6);
    cluster.cleanup().await;
}

/// One request of the differential test, built for a given proxy.
type Case<'a> = dyn Fn(&Proxy) -> reqwest::RequestBuilder + 'a;

/// The parts of an answer both request paths must agree on: status, body as the upstream
/// saw the request (minus generated request ids), and whether a request id came back.
async fn answer(c: &reqwest::Client, r: reqwest::RequestBuilder) -> String {
    let r = c.execute(r.build().unwrap()).await.unwrap();
    let status = r.status().as_u16();
    let id_back = r.headers().contains_key("x-request-id");
    let mut body = r.text().await.unwrap();
    if let Ok(mut v) = serde_json::from_str::<serde_json::Value>(&body) {
        let headers = v["headers"].as_object_mut().unwrap();
        if headers
            .get("x-request-id")
            .is_some_and(|id| id.as_str().unwrap().len() == 36)
        {
            headers.insert("x-request-id".into(), "(generated)".into());
        }
        body = v.to_string();
    }
    format!("{status} id:{id_back} {body}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h1_and_pingora_paths_forward_alike() {
    let mut cluster = Cluster::new("proxy-h1-diff").await;
    let up = Upstream::start("diff").await;
    cluster.put_endpoint("diff", 1, up.addr).await;
    cluster
        .put_route(&route("diff.lain.local", "/", "diff"))
        .await;
    cluster
        .put_route(&route("diff.lain.local", "/api", "diff"))
        .await;
    let c = client();
    for trusted in [
        r#"trusted_proxies = ["10.0.0.0/8"]"#,
        r#"trusted_proxies = ["127.0.0.0/8"]"#,
    ] {
        let own = Proxy::start(&cluster, trusted);
        let pingora = Proxy::start(&cluster, &format!("{trusted}\nh1_fast_path = false"));
        for p in [&own, &pingora] {
            wait_status(&c, p, "diff.lain.local", "/", 200).await;
        }
        let cases: Vec<Box<Case>> = vec![
            Box::new(|p| c.get(p.url("/"))),
            Box::new(|p| c.get(p.url("/x/y?q=1&r=%20"))),
            Box::new(|p| c.get(p.url("/api/users?page=2"))),
            Box::new(|p| c.get(p.url("/api"))),
            Box::new(|p| {
                c.get(p.url("/API/Users"))
                    .header("host", "DIFF.lain.local:8080")
            }),
            Box::new(|p| {
                c.get(p.url("/"))
                    .header("x-request-id", "abc-123")
                    .header("user-agent", "differ/1.0")
            }),
            Box::new(|p| c.get(p.url("/")).header("x-request-id", "has space")),
            Box::new(|p| {
                c.get(p.url("/"))
                    .header("x-forwarded-for", "203.0.113.9, 127.0.0.5")
                    .header("x-forwarded-proto", "https")
                    .header("x-forwarded-host", "outside.example")
                    .header("x-real-ip", "198.51.100.1")
                    .header("x-original-uri", "/forged")
            }),
            Box::new(|p| {
                c.get(p.url("/"))
                    .header("x-forwarded-for", "garbage, 127.0.0.9")
            }),
            Box::new(|p| {
                c.get(p.url("/"))
                    .header("accept", "a/b")
                    .header("x-custom", "1")
                    .header("cookie", "a=1; b=2")
            }),
            Box::new(|p| c.get(p.url("/")).header("connection", "close")),
            Box::new(|p| c.post(p.url("/api/items")).body("payload")),
            Box::new(|p| c.put(p.url("/p")).body("")),
            Box::new(|p| c.delete(p.url("/p"))),
            Box::new(|p| c.head(p.url("/"))),
            Box::new(|p| c.get(p.url("/")).header("host", "nowhere.lain.local")),
        ];
        for (i, case) in cases.iter().enumerate() {
            let with_host = |p: &Proxy| {
                let r = case(p);
                let has_host = r
                    .try_clone()
                    .and_then(|r| r.build().ok())
                    .is_some_and(|r| r.headers().contains_key("host"));
                if has_host {
                    r
                } else {
                    r.header("host", "diff.lain.local")
                }
            };
            let a = answer(&c, with_host(&own)).await;
            let b = answer(&c, with_host(&pingora)).await;
            assert_eq!(a, b, "case {i} ({trusted}): lain's path, then pingora's");
        }
        let (m_own, m_pingora) = (metrics(&own).await, metrics(&pingora).await);
        assert!(served_by(&m_own, "h1") >= 14.0, "{m_own}");
        assert_eq!(served_by(&m_pingora, "h1"), 0.0, "{m_pingora}");
    }
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h1_client_leaving_abandons_its_request_and_early_bytes_are_kept() {
    use tokio::io::AsyncWriteExt;
    let host = "leave.lain.local";
    let (cluster, up, proxy) = scripted_route("proxy-h1-leave", host).await;
    // A client that goes away while the upstream has not answered: its request is
    // abandoned and the upstream connection closed, as nginx and pingora do.
    let mut s = tokio::net::TcpStream::connect(proxy.http).await.unwrap();
    s.write_all(format!("GET /hang HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(s);
    eventually(
        Duration::from_secs(2),
        "the upstream connection closed",
        || async { (up.abandoned.load(Ordering::Relaxed) == 1).then_some(()) },
    )
    .await;
    // A client that sends its next request while the first waits for the upstream gets
    // both answers, in order.
    let mut s = tokio::net::TcpStream::connect(proxy.http).await.unwrap();
    s.write_all(format!("GET /slowish HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.write_all(format!("GET /next HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    let (s1, first) = read_response(&mut s, &mut buf).await;
    let (s2, second) = read_response(&mut s, &mut buf).await;
    assert_eq!((s1, s2), (200, 200));
    assert!(first.ends_with(":GET /slowish"), "{first}");
    assert!(second.ends_with(":GET /next"), "{second}");
    let m = metrics(&proxy).await;
    assert_eq!(served_by(&m, "pingora"), 0.0, "{m}");
    cluster.cleanup().await;
}

/// An endpoint that accepts a connection, reads the request and then either closes without
/// a word, as a port forwarder does once the instance behind it was killed, or (`hold`)
/// keeps the connection open without answering.
async fn silent_upstream(hold: bool) -> (SocketAddr, Arc<AtomicU64>, JoinHandle<()>) {
    use tokio::io::AsyncReadExt;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    let task = tokio::spawn({
        let accepted = accepted.clone();
        async move {
            while let Ok((mut s, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::Relaxed);
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                if hold {
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_secs(30)).await;
                        drop(s);
                    });
                }
            }
        }
    });
    (addr, accepted, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_hangs_up_unanswered_sends_idempotent_requests_elsewhere() {
    let mut cluster = Cluster::new("proxy-hangup").await;
    let good = Upstream::start("good").await;
    let (dead, accepted, task) = silent_upstream(false).await;
    cluster.put_endpoint("hangup", 1, good.addr).await;
    cluster.put_endpoint("hangup", 2, dead).await;
    cluster
        .put_route(&route("hangup.lain.local", "/", "hangup"))
        .await;
    let c = client();
    for config in ["", "h1_fast_path = false"] {
        let proxy = Proxy::start(&cluster, config);
        wait_status(&c, &proxy, "hangup.lain.local", "/", 200).await;
        let before = accepted.load(Ordering::Relaxed);
        // Fresh client connections each time, so that round robin alternates over both
        // endpoints until the silent one is ejected.
        for i in 0..20 {
            let (status, body) = get(&client(), &proxy, "hangup.lain.local", "/").await;
            assert_eq!(status, 200, "request {i} with {config:?}: {body}");
        }
        assert!(
            accepted.load(Ordering::Relaxed) > before,
            "the silent endpoint was never tried with {config:?}"
        );
        let m = metrics(&proxy).await;
        assert_eq!(
            metric_value(
                &m,
                "lain_proxy_requests_total{app=\"hangup\",proc=\"web\",class=\"5xx\"}"
            ),
            0.0,
            "{m}"
        );
    }
    task.abort();
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_endpoint_times_out_is_not_sent_elsewhere() {
    let mut cluster = Cluster::new("proxy-slow").await;
    let good = Upstream::start("good").await;
    let (slow, accepted, task) = silent_upstream(true).await;
    cluster.put_endpoint("slow", 1, good.addr).await;
    cluster.put_endpoint("slow", 2, slow).await;
    let mut r = route("slow.lain.local", "/", "slow");
    r.timeouts.read_ms = 300;
    cluster.put_route(&r).await;
    let c = client();
    for config in ["", "h1_fast_path = false"] {
        let proxy = Proxy::start(&cluster, config);
        wait_status(&c, &proxy, "slow.lain.local", "/", 200).await;
        let before = accepted.load(Ordering::Relaxed);
        let hits_before = good.hits.load(Ordering::Relaxed);
        let mut timed_out = 0;
        for i in 0..4 {
            let (status, body) = get(&client(), &proxy, "slow.lain.local", "/").await;
            match status {
                200 => {}
                504 => {
                    assert_eq!(body, "upstream timed out\n", "with {config:?}");
                    timed_out += 1;
                }
                other => panic!("request {i} with {config:?}: {other} {body}"),
            }
        }
        // Every request the silent endpoint took timed out there and was not tried again.
        let taken = accepted.load(Ordering::Relaxed) - before;
        assert!(
            taken >= 1,
            "round robin never chose the silent endpoint ({config:?})"
        );
        assert_eq!(timed_out, taken, "with {config:?}");
        assert_eq!(
            good.hits.load(Ordering::Relaxed) - hits_before,
            4 - taken,
            "with {config:?}"
        );
        // Timeouts count against the endpoint on both paths: five in a row eject it.
        let mut sent = 0;
        while metric_value(
            &metrics(&proxy).await,
            "lain_proxy_upstream_ejections_total",
        ) < 1.0
        {
            sent += 1;
            assert!(
                sent <= 20,
                "the silent endpoint was never ejected with {config:?}"
            );
            let _ = get(&client(), &proxy, "slow.lain.local", "/").await;
        }
    }
    task.abort();
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_connections_are_spread_evenly_over_the_workers() {
    use tokio::io::AsyncWriteExt;
    let (cluster, _up, proxy, c) =
        one_route("proxy-spread", "spread", "spread.lain.local", "/", "/", "").await;
    drop(c);
    let worker = |m: &str, w: u32| {
        metric_value(
            m,
            &format!("lain_proxy_worker_connections{{worker=\"{w}\"}}"),
        )
    };
    eventually(
        Duration::from_secs(5),
        "the probe's connection closed",
        || {
            let p = &proxy;
            async move {
                let m = metrics(p).await;
                (worker(&m, 0) + worker(&m, 1) == 0.0).then_some(())
            }
        },
    )
    .await;
    // Twenty connections opened at once: the kernel queues them all before a worker wakes,
    // and the first worker to wake would accept every one it finds.
    let opened =
        futures::future::join_all((0..20).map(|_| tokio::net::TcpStream::connect(proxy.http)))
            .await;
    let mut conns = Vec::new();
    for s in opened {
        let mut s = s.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: spread.lain.local\r\n\r\n")
            .await
            .unwrap();
        conns.push(s);
    }
    // Every connection is answered, so every one is being served by some worker.
    for s in &mut conns {
        let mut buf = Vec::new();
        let (status, _) = read_response(s, &mut buf).await;
        assert_eq!(status, 200);
    }
    let m = metrics(&proxy).await;
    let (a, b) = (worker(&m, 0), worker(&m, 1));
    assert_eq!(a + b, 20.0, "{m}");
    assert!(
        (a - b).abs() <= 2.0,
        "worker 0 serves {a}, worker 1 serves {b}"
    );
    drop(conns);
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_a_stream_is_let_go() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // An upstream that streams small chunks (a server-sent-events feed, say) for at most
    // 40 s, so the proxy relays many small writes that its write buffer collects.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_addr = listener.local_addr().unwrap();
    let feed = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = vec![0u8; 4096];
                let _ = s.read(&mut head).await;
                let reply = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
                if s.write_all(reply).await.is_err() {
                    return;
                }
                let chunk = format!("3e8\r\n{}\r\n", "e".repeat(1000));
                let until = Instant::now() + Duration::from_secs(40);
                while Instant::now() < until {
                    let sent =
                        tokio::time::timeout(Duration::from_secs(1), s.write_all(chunk.as_bytes()))
                            .await;
                    if matches!(sent, Ok(Err(_))) {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            });
        }
    });
    let mut cluster = Cluster::new("proxy-stuck-reader").await;
    cluster.put_endpoint("feed", 1, up_addr).await;
    let mut r = route("feed.lain.local", "/", "feed");
    r.timeouts.write_ms = 1_000;
    cluster.put_route(&r).await;
    let proxy = Proxy::start(&cluster, "");
    let c = client();
    // The route is live once a request gets the stream's head.
    eventually(Duration::from_secs(10), "the feed route", || async {
        let r = c
            .get(proxy.url("/"))
            .header("host", "feed.lain.local")
            .send()
            .await
            .ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    eventually(Duration::from_secs(10), "no client connection", || async {
        let m = metrics(&proxy).await;
        (metric_value(&m, "lain_proxy_active_connections ") == 0.0).then_some(())
    })
    .await;

    // A client with a small receive window asks for the feed and never reads it.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut stuck = sock.connect(proxy.http).await.unwrap();
    stuck
        .write_all(b"GET / HTTP/1.1\r\nHost: feed.lain.local\r\n\r\n")
        .await
        .unwrap();
    eventually(
        Duration::from_secs(10),
        "the stuck client counted",
        || async {
            let m = metrics(&proxy).await;
            (metric_value(&m, "lain_proxy_active_connections ") == 1.0).then_some(())
        },
    )
    .await;
    // Once a write has waited the route's write timeout, the proxy gives the connection up
    // although the client still holds it open.
    eventually(
        Duration::from_secs(15),
        "the stuck client let go",
        || async {
            let m = metrics(&proxy).await;
            (metric_value(&m, "lain_proxy_active_connections ") == 0.0).then_some(())
        },
    )
    .await;
    drop(stuck);
    feed.abort();
    cluster.cleanup().await;
}

/// One request of a randomized exchange, and what its answer must show.
struct Planned {
    bytes: Vec<u8>,
    method: &'static str,
    target: String,
    id: u64,
    framing: &'static str,
    len: usize,
    body_len: usize,
    body_sum: u64,
    close: bool,
    /// `1.0` or `1.1`.
    version: &'static str,
}

/// A random request for `/gen/...` on `host`: method, response framing and size, request
/// body (by length, or chunked, which sends it to pingora), header spelling, padding
/// headers, forwarding headers, and `Connection: close` on the last request of a connection.
fn plan_request(rng: &mut Rng, id: u64, host: &str, last: bool) -> Planned {
    let method = rng.pick(&["GET", "GET", "HEAD", "POST", "PUT", "DELETE"]);
    // An HTTP/1.0 request (pingora's) ends its connection unless it asks for keep-alive, so
    // only a last request is one.
    let version = if last && rng.below(6) == 0 {
        "1.0"
    } else {
        "1.1"
    };
    // A body ended by the upstream closing ends the client's connection too, so only a
    // connection's last request asks for one.
    let framings: &[&'static str] = if last {
        &["cl", "cl", "chunked", "eof", "bye", "early", "204", "304"]
    } else {
        &["cl", "cl", "chunked", "bye", "early", "204", "304"]
    };
    let framing = rng.pick(framings);
    let len = rng.pick(&[0usize, 1, 17, 1000, 40_000]) + rng.below(50) as usize;
    let target = format!("/gen/{id}/{framing}/{len}");
    let body: Vec<u8> = if matches!(method, "POST" | "PUT") {
        let n = rng.pick(&[0usize, 1, 100, 5000, 70_000]) + rng.below(10) as usize;
        (0..n).map(|_| rng.below(256) as u8).collect()
    } else {
        Vec::new()
    };
    let chunked = !body.is_empty() && rng.below(8) == 0 && version == "1.1";
    // Now and then the absolute form a client sends to a proxy (which pingora serves, and
    // refuses when Host names another authority than the target, even the same host with
    // its default port).
    let absolute = rng.below(10) == 0;
    let mut head = if absolute {
        format!("{method} http://{host}{target} HTTP/{version}\r\n")
    } else {
        format!("{method} {target} HTTP/{version}\r\n")
    };
    let host_value = match if absolute { 0 } else { rng.below(3) } {
        0 => host.to_string(),
        1 => host.to_ascii_uppercase(),
        _ => format!("{host}:80"),
    };
    head.push_str(&format!(
        "{}: {host_value}\r\n",
        rng.pick(&["Host", "host", "HOST"])
    ));
    for k in 0..rng.below(4) {
        let n = rng.below(300) as usize;
        let value: String = (0..n)
            .map(|_| (b' ' + rng.below(95) as u8) as char)
            .collect();
        head.push_str(&format!("x-pad-{k}: {}\r\n", value.trim()));
    }
    for _ in 0..rng.below(3) {
        head.push_str(&format!(
            "X-Forwarded-For: 10.1.{}.{}\r\n",
            rng.below(256),
            rng.below(256)
        ));
    }
    if !body.is_empty() && rng.below(6) == 0 {
        // Sent with its body at once, as a client that does not wait for 100 may.
        head.push_str("Expect: 100-continue\r\n");
    }
    let close = version == "1.0" || (last && rng.below(3) == 0);
    if close {
        head.push_str("Connection: close\r\n");
    } else if rng.below(4) == 0 {
        head.push_str("Connection: keep-alive\r\n");
    }
    let mut bytes;
    if chunked {
        head.push_str("Transfer-Encoding: chunked\r\n\r\n");
        bytes = head.into_bytes();
        let mut rest = &body[..];
        while !rest.is_empty() {
            let n = (1 + rng.below(9000) as usize).min(rest.len());
            bytes.extend(format!("{n:x}\r\n").bytes());
            bytes.extend_from_slice(&rest[..n]);
            bytes.extend_from_slice(b"\r\n");
            rest = &rest[n..];
        }
        bytes.extend_from_slice(b"0\r\n\r\n");
    } else {
        if !body.is_empty() || rng.below(2) == 0 {
            head.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        bytes = head.into_bytes();
        bytes.extend_from_slice(&body);
    }
    Planned {
        bytes,
        method,
        target,
        id,
        framing,
        len,
        body_len: body.len(),
        body_sum: body.iter().fold(0u64, |a, b| a + u64::from(*b)),
        close,
        version,
    }
}

/// Decodes a complete chunked body at the start of `b`: (body, bytes used), or `None` while
/// it is incomplete.
fn dechunk(b: &[u8]) -> Option<(Vec<u8>, usize)> {
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        let line_end = at + b[at..].windows(2).position(|w| w == b"\r\n")?;
        let line = std::str::from_utf8(&b[at..line_end]).expect("a chunk size line");
        let size = usize::from_str_radix(line.split(';').next().unwrap().trim(), 16)
            .unwrap_or_else(|e| panic!("chunk size {line:?}: {e}"));
        at = line_end + 2;
        if size == 0 {
            // Trailers, if any, end at an empty line.
            loop {
                let end = at + b[at..].windows(2).position(|w| w == b"\r\n")?;
                let empty = end == at;
                at = end + 2;
                if empty {
                    return Some((body, at));
                }
            }
        }
        if b.len() < at + size + 2 {
            return None;
        }
        body.extend_from_slice(&b[at..at + size]);
        assert_eq!(
            &b[at + size..at + size + 2],
            b"\r\n",
            "chunk data ends with CRLF"
        );
        at += size + 2;
    }
}

/// Reads one response of any framing from a raw connection, keeping what follows it in
/// `buf`: (status, headers with lower-case names, body). `head` says the request was HEAD.
async fn read_any_response(
    s: &mut tokio::net::TcpStream,
    buf: &mut Vec<u8>,
    head: bool,
) -> Result<(u16, HashMap<String, String>, Vec<u8>), String> {
    use tokio::io::AsyncReadExt;
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(buf) {
            Ok(httparse::Status::Complete(n)) => {
                let status = resp.code.unwrap();
                if (100..200).contains(&status) {
                    // An interim answer (100 Continue): the final one follows.
                    buf.drain(..n);
                    continue;
                }
                let fields: HashMap<String, String> = resp
                    .headers
                    .iter()
                    .map(|h| {
                        let v = String::from_utf8_lossy(h.value).into_owned();
                        (h.name.to_ascii_lowercase(), v)
                    })
                    .collect();
                let no_body = head || status == 204 || status == 304;
                let done = if no_body {
                    Some((Vec::new(), 0))
                } else if fields
                    .get("transfer-encoding")
                    .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
                {
                    dechunk(&buf[n..])
                } else if let Some(length) = fields.get("content-length") {
                    let length: usize =
                        length.parse().map_err(|e| format!("content-length: {e}"))?;
                    (buf.len() >= n + length).then(|| (buf[n..n + length].to_vec(), length))
                } else {
                    // A body that ends with the connection.
                    let mut rest = buf.split_off(n);
                    s.read_to_end(&mut rest)
                        .await
                        .map_err(|e| format!("reading to the end: {e}"))?;
                    buf.truncate(n);
                    buf.extend_from_slice(&rest);
                    Some((rest, buf.len() - n))
                };
                if let Some((body, used)) = done {
                    buf.drain(..n + used);
                    return Ok((status, fields, body));
                }
            }
            Ok(httparse::Status::Partial) => {}
            Err(e) => {
                return Err(format!(
                    "unparsable response ({e}): {:?}",
                    String::from_utf8_lossy(&buf[..buf.len().min(300)])
                ));
            }
        }
        let mut more = [0u8; 65536];
        let k = tokio::time::timeout(Duration::from_secs(10), s.read(&mut more))
            .await
            .map_err(|_| "no response within 10 s".to_string())?
            .map_err(|e| format!("reading: {e}"))?;
        if k == 0 {
            return Err(format!(
                "closed mid-response after {:?}",
                String::from_utf8_lossy(&buf[..buf.len().min(300)])
            ));
        }
        buf.extend_from_slice(&more[..k]);
    }
}

/// One client connection of the randomized test: a random number of requests, sent in
/// pipelined batches of random size and written in random pieces; every answer must be the
/// one for its own request, in order, with what the upstream saw matching what was sent.
async fn random_connection(
    addr: SocketAddr,
    seed: u64,
    conn: u64,
    host: &str,
) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut rng = Rng(seed ^ (conn + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let count = 1 + rng.below(8);
    let plans: Vec<Planned> = (0..count)
        .map(|i| plan_request(&mut rng, conn * 100 + i, host, i + 1 == count))
        .collect();
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut buf = Vec::new();
    let mut next = 0;
    let mut said_close = false;
    while next < plans.len() {
        let batch = 1 + rng.below((plans.len() - next) as u64) as usize;
        let out: Vec<u8> = plans[next..next + batch]
            .iter()
            .flat_map(|p| p.bytes.iter().copied())
            .collect();
        let mut rest = &out[..];
        while !rest.is_empty() {
            let n = (1 + rng.below(3000) as usize).min(rest.len());
            s.write_all(&rest[..n])
                .await
                .map_err(|e| format!("writing: {e}"))?;
            rest = &rest[n..];
            if rng.below(4) == 0 {
                tokio::time::sleep(Duration::from_millis(rng.below(3))).await;
            }
        }
        for (i, p) in plans[next..next + batch].iter().enumerate() {
            let at = format!("request {} ({} {})", next + i, p.method, p.target);
            let (status, fields, body) = read_any_response(&mut s, &mut buf, p.method == "HEAD")
                .await
                .map_err(|e| format!("{at}: {e}"))?;
            let want_status = match p.framing {
                "204" => 204,
                "304" => 304,
                _ => 200,
            };
            said_close = fields.get("connection").is_some_and(|v| v == "close");
            let seen = format!("{} {} {}:{}", p.method, p.target, p.body_len, p.body_sum);
            if status != want_status || fields.get("x-seen") != Some(&seen) {
                let head_end = p
                    .bytes
                    .windows(4)
                    .position(|w| w == b"\r\n\r\n")
                    .unwrap_or(0);
                return Err(format!(
                    "{at}: answered {status} with x-seen {:?} and {:?}, wanted {want_status} and \
                     {seen:?}; the request's header: {:?}",
                    fields.get("x-seen"),
                    String::from_utf8_lossy(&body),
                    String::from_utf8_lossy(&p.bytes[..head_end])
                ));
            }
            let want_body = if p.method == "HEAD" || want_status != 200 {
                Vec::new()
            } else {
                generated_body(p.id, p.len)
            };
            if body != want_body {
                return Err(format!(
                    "{at}: a body of {} bytes, not the {} wanted",
                    body.len(),
                    want_body.len()
                ));
            }
            // An HTTP/1.0 client cannot read chunked framing (RFC 9112 §6.1).
            if p.version == "1.0" && fields.contains_key("transfer-encoding") {
                return Err(format!(
                    "{at}: an HTTP/1.0 request answered with transfer-encoding {:?}",
                    fields["transfer-encoding"]
                ));
            }
            if p.method == "HEAD" && p.framing == "cl" {
                let length = fields.get("content-length").map(String::as_str);
                if length != Some(p.len.to_string().as_str()) {
                    return Err(format!(
                        "{at}: HEAD content-length {length:?}, not {}",
                        p.len
                    ));
                }
            }
        }
        next += batch;
    }
    if !buf.is_empty() {
        return Err(format!(
            "bytes after the last answer: {:?}",
            String::from_utf8_lossy(&buf[..buf.len().min(300)])
        ));
    }
    // A request that asked to close, or an answer that said it closes, ends the connection
    // (a body the upstream ended by closing may reach the client chunked instead).
    if plans.last().is_some_and(|p| p.close) || said_close {
        let mut probe = [0u8; 1];
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut probe)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {}
            other => {
                return Err(format!(
                    "not closed after Connection: close (asked {}, answered {said_close}): \
                     {other:?}",
                    plans.last().is_some_and(|p| p.close)
                ));
            }
        }
    }
    Ok(())
}

/// Runs 96 random connections (four at a time) through `proxy` to `host`; returns the
/// requests each HTTP/1.1 path served meanwhile, (h1, pingora). Every loop is bounded by its
/// count, and every read by a timeout.
async fn random_connections(proxy: &Proxy, host: &str) -> (f64, f64) {
    let seed = std::env::var("LAIN_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("LAIN_TEST_SEED={seed}");
    let before = settled_metrics(proxy).await;
    for group in 0..24u64 {
        let runs = (0..4).map(|k| random_connection(proxy.http, seed, group * 4 + k, host));
        for (k, r) in futures::future::join_all(runs)
            .await
            .into_iter()
            .enumerate()
        {
            if let Err(e) = r {
                panic!(
                    "LAIN_TEST_SEED={seed}, connection {}: {e}",
                    group * 4 + k as u64
                );
            }
        }
    }
    let after = metrics(proxy).await;
    (
        served_by(&after, "h1") - served_by(&before, "h1"),
        served_by(&after, "pingora") - served_by(&before, "pingora"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_pipelined_requests_split_anywhere_get_their_own_answers() {
    let host = "random.lain.local";
    let (cluster, _up, proxy) = scripted_route("proxy-random", host).await;
    let (h1, pingora) = random_connections(&proxy, host).await;
    // Both of the proxy's HTTP/1.1 paths took part.
    assert!(h1 > 30.0 && pingora > 30.0, "h1 {h1}, pingora {pingora}");
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_pipelined_requests_get_their_own_answers_from_pingora_alone() {
    let host = "random-pingora.lain.local";
    let (cluster, _up, proxy) =
        scripted_route_with("proxy-random-pingora", host, "h1_fast_path = false").await;
    let (h1, pingora) = random_connections(&proxy, host).await;
    assert!(h1 == 0.0 && pingora > 100.0, "h1 {h1}, pingora {pingora}");
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_pipelined_behind_one_pingora_serves_are_answered_in_origin_form() {
    use tokio::io::AsyncWriteExt;
    let host = "behind.lain.local";
    let (cluster, _up, proxy) = scripted_route("proxy-pipelined-pingora", host).await;
    let mut s = tokio::net::TcpStream::connect(proxy.http).await.unwrap();
    // The first request is pingora's (an absolute-form target) and has a body; two more
    // follow it in the same write, the first of them also pingora's (two forwarding
    // header lines).
    s.write_all(
        format!(
            "POST http://{host}/gen/1/cl/5?q=1 HTTP/1.1\r\nHost: {host}\r\nContent-Length: 3\r\n\r\nabc\
             GET /gen/2/chunked/7 HTTP/1.1\r\nHost: {host}\r\nX-Forwarded-For: 10.0.0.1\r\n\
             X-Forwarded-For: 10.0.0.2\r\n\r\n\
             GET /gen/3/cl/2 HTTP/1.1\r\nHost: {host}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    for (id, seen, len) in [
        (1, "POST /gen/1/cl/5?q=1 3:294", 5),
        (2, "GET /gen/2/chunked/7 0:0", 7),
        (3, "GET /gen/3/cl/2 0:0", 2),
    ] {
        let (status, fields, body) = read_any_response(&mut s, &mut buf, false)
            .await
            .unwrap_or_else(|e| panic!("request {id}: {e}"));
        // The upstream sees every request, and in origin form.
        assert_eq!(
            (status, fields.get("x-seen").map(String::as_str)),
            (200, Some(seen)),
            "request {id}"
        );
        assert_eq!(body, generated_body(id, len), "request {id}");
    }
    cluster.cleanup().await;
}

/// An HTTP/1.0 client is never sent chunked framing (RFC 9112 §6.1): a response without a
/// length reaches it delimited by the connection's close, as from nginx, whether it asked
/// for keep-alive or not; an HTTP/1.1 client still gets a chunked answer chunked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_1_0_client_gets_no_chunked_framing() {
    let host = "old.lain.local";
    let (cluster, _up, proxy) = scripted_route("proxy-http10", host).await;
    for (version, extra) in [("1.0", ""), ("1.0", "Connection: keep-alive\r\n")] {
        for target in ["/chunked", "/close"] {
            let raw = raw_request(
                proxy.http,
                &format!("GET {target} HTTP/{version}\r\nHost: {host}\r\n{extra}\r\n"),
            )
            .await;
            let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
            let head = head.to_ascii_lowercase();
            assert!(
                head.starts_with("http/1.1 200"),
                "{target} {extra:?}: {raw}"
            );
            assert!(
                !head.contains("transfer-encoding"),
                "{target} {extra:?}: {raw}"
            );
            assert!(
                head.contains("connection: close"),
                "{target} {extra:?}: {raw}"
            );
            let want = if target == "/chunked" {
                "hello world"
            } else {
                "ended by closing"
            };
            assert_eq!(body, want, "{target} {extra:?}");
        }
    }
    let raw = raw_request(
        proxy.http,
        &format!("GET /chunked HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert!(
        raw.to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{raw}"
    );
    cluster.cleanup().await;
}

/// A response with more headers than lain's HTTP/1.1 path parses at first (an app setting
/// many cookies) is relayed whole, as pingora's path relays it; only more than either path
/// allows is a 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_with_many_headers_is_relayed_whole() {
    let host = "cookies.lain.local";
    let (cluster, _up, proxy) = scripted_route("proxy-many-headers", host).await;
    let before = settled_metrics(&proxy).await;
    let addr = proxy.http;
    // HTTP/1.1 takes lain's own path, HTTP/1.0 pingora's.
    let ask = |target: String, version: &'static str| async move {
        let request =
            format!("GET {target} HTTP/{version}\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        raw_request(addr, &request).await
    };
    for version in ["1.1", "1.0"] {
        for n in [100usize, 250] {
            let raw = ask(format!("/cookies/{n}"), version).await;
            assert!(
                raw.starts_with("HTTP/1.1 200"),
                "{version} {n}: {}",
                &raw[..raw.len().min(300)]
            );
            let cookies: Vec<&str> = raw
                .lines()
                .filter(|l| l.to_ascii_lowercase().starts_with("set-cookie: "))
                .map(|l| &l["set-cookie: ".len()..])
                .collect();
            let want: Vec<String> = (0..n).map(|i| format!("c{i}=v{i}; Path=/")).collect();
            assert_eq!(cookies, want, "{version} {n}");
            assert!(raw.ends_with("\r\n\r\nok"), "{version} {n}");
        }
        if version == "1.1" {
            // Both through lain's own path, not handed on.
            wait_served(&proxy, &before, "h1", 2.0).await;
        }
        // More fields than either path allows, or more than 64 KiB of header: 502 on both.
        for target in ["/cookies/300", "/bighead"] {
            let raw = ask(target.to_string(), version).await;
            assert!(
                raw.starts_with("HTTP/1.1 502"),
                "{version} {target}: {}",
                &raw[..raw.len().min(300)]
            );
        }
    }
    cluster.cleanup().await;
}

/// How an HTTP/1 request is sent to reach each request path, as (version, chunked):
/// HTTP/1.1 takes lain's own path; with a chunked (empty) body, or as HTTP/1.0, pingora's.
const H1_PATHS: [(&str, bool); 3] = [("1.1", false), ("1.1", true), ("1.0", false)];

/// The whole answer to a GET for `target` sent on a connection of its own as `version`,
/// with an empty chunked body when `chunked`.
async fn ask_by(
    addr: SocketAddr,
    host: &str,
    version: &str,
    chunked: bool,
    target: String,
) -> String {
    let body = if chunked {
        "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    } else {
        "\r\n"
    };
    let request =
        format!("GET {target} HTTP/{version}\r\nHost: {host}\r\nConnection: close\r\n{body}");
    raw_request(addr, &request).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_response_fields_stay_behind_on_every_path() {
    let host = "hop.lain.local";
    let (cluster, up) = scripted_cluster("proxy-hop-by-hop", host).await;
    let proxy = Proxy::start_listen(&cluster, "", "h2c = true");
    wait_status(&client(), &proxy, host, "/", 200).await;
    let before = settled_metrics(&proxy).await;
    let addr = proxy.http;
    let hop = [
        "upgrade",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "x-hop",
    ];
    for (version, chunked) in H1_PATHS {
        let ask = |target: &str| ask_by(addr, host, version, chunked, target.to_string());
        let version = if chunked { "1.1 chunked" } else { version };
        let raw = ask("/hop").await;
        // The app's 103 Early Hints, also without its hop-by-hop fields; none for an
        // HTTP/1.0 client (RFC 9110 §15.2).
        let raw = if version == "1.0" {
            assert!(!raw.contains(" 103 "), "{version}: {raw}");
            raw
        } else {
            let (interim, rest) = raw.split_once("\r\n\r\n").unwrap();
            assert!(interim.starts_with("HTTP/1.1 103"), "{version}: {raw}");
            assert!(interim.contains("Link: </a.css>"), "{version}: {raw}");
            let interim = interim.to_ascii_lowercase();
            assert!(
                !interim.contains("x-hint")
                    && !interim.contains("connection")
                    && !interim.contains("content-length"),
                "{version}: {raw}"
            );
            rest.to_string()
        };
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{version}: {raw}");
        assert_eq!(body, "ok", "{version}");
        let names: Vec<String> = head
            .lines()
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| {
                format!(
                    "{}:{}",
                    n.to_ascii_lowercase(),
                    v.trim().to_ascii_lowercase()
                )
            })
            .collect();
        assert!(
            names.contains(&"x-kept:1".to_string()),
            "{version}: {names:?}"
        );
        for name in hop {
            // The proxy's own `Connection: close` is the only one allowed.
            assert!(
                names
                    .iter()
                    .all(|n| !n.starts_with(&format!("{name}:")) || n == "connection:close"),
                "{version}: {name} relayed: {names:?}"
            );
        }
        // A length repeated alike is sent once; lengths that differ are a 502, and the request
        // is not sent to the upstream again.
        let raw = ask("/lengths/same").await;
        assert!(raw.starts_with("HTTP/1.1 200"), "{version}: {raw}");
        assert_eq!(
            raw.to_ascii_lowercase().matches("content-length:").count(),
            1,
            "{version}: {raw}"
        );
        assert!(raw.ends_with("\r\n\r\nok"), "{version}: {raw}");
        let asked = up.requests.load(Ordering::Relaxed);
        let raw = ask("/lengths/differ").await;
        assert!(raw.starts_with("HTTP/1.1 502"), "{version}: {raw}");
        assert_eq!(
            up.requests.load(Ordering::Relaxed),
            asked + 1,
            "{version}: retried"
        );
        // So is a status line without a status, and a switch of protocols the client did
        // not ask for, which would leave it a raw tunnel to the app.
        let raw = ask("/status/000").await;
        assert!(raw.starts_with("HTTP/1.1 502"), "{version}: {raw}");
        let raw = ask("/switch").await;
        assert!(raw.starts_with("HTTP/1.1 502"), "{version}: {raw}");
        assert!(!raw.contains("raw bytes"), "{version}: {raw}");
        if version == "1.1" {
            wait_served(&proxy, &before, "h1", 5.0).await;
        }
        // A few interim responses are relayed; an app that never stops sending them gets
        // the client a 502 instead of an endless wait.
        let raw = ask("/hints/16").await;
        let hints = if version == "1.0" { 0 } else { 16 };
        assert_eq!(
            raw.matches("HTTP/1.1 103 ").count(),
            hints,
            "{version}: {raw}"
        );
        assert!(raw.ends_with("\r\n\r\nok"), "{version}: {raw}");
        let raw = ask("/hints/17").await;
        assert!(!raw.contains("\r\n\r\nok"), "{version}: {raw}");
        assert!(raw.contains("HTTP/1.1 502 "), "{version}: {raw}");
        // A field name followed by whitespace is relayed without it (RFC 9112 §5.1).
        let raw = ask("/spaced").await;
        assert!(raw.starts_with("HTTP/1.1 200"), "{version}: {raw}");
        assert!(raw.contains("\r\nX-Spaced: v\r\n"), "{version}: {raw}");
        // A 204 goes without the framing fields it must not have, whatever the app sent.
        let raw = ask("/204/framed").await;
        let head = raw.to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 204"), "{version}: {raw}");
        assert!(head.contains("\r\nx-kept: 1\r\n"), "{version}: {raw}");
        assert!(
            !head.contains("content-length") && !head.contains("transfer-encoding"),
            "{version}: {raw}"
        );
        assert!(raw.ends_with("\r\n\r\n"), "{version}: {raw}");
        // A 426 keeps the Upgrade that names the protocol the app requires.
        let raw = ask("/426").await;
        assert!(raw.starts_with("HTTP/1.1 426"), "{version}: {raw}");
        assert!(raw.contains("Upgrade: TLS/1.2\r\n"), "{version}: {raw}");
    }
    // HTTP/2 (pingora's path): a connection-specific field would make the response
    // malformed, and a repeated length is refused by HTTP/2 clients.
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .resolve(host, addr)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let url = |path: &str| format!("http://{host}:{}{path}", addr.port());
    let r = h2.get(url("/hop")).send().await.unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-kept"], "1");
    for name in hop {
        assert!(r.headers().get(name).is_none(), "h2: {name} relayed");
    }
    assert_eq!(r.text().await.unwrap(), "ok");
    let r = h2.get(url("/switch")).send().await.unwrap();
    assert_eq!(r.status(), 502);
    let r = h2.get(url("/hints/16")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "ok");
    let r = h2.get(url("/hints/17")).send().await.unwrap();
    assert_eq!(r.status(), 502);
    let r = h2.get(url("/lengths/same")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers().get_all("content-length").iter().count(), 1);
    assert_eq!(r.text().await.unwrap(), "ok");

    // Responses that cannot be read count against their endpoint on pingora's path too:
    // five in a row eject it.
    let ejections = |m: &str| metric_value(m, "lain_proxy_upstream_ejections_total");
    assert_eq!(ejections(&metrics(&proxy).await), 0.0);
    for _ in 0..5 {
        let request = format!("GET /lengths/differ HTTP/1.0\r\nHost: {host}\r\n\r\n");
        let raw = raw_request(addr, &request).await;
        assert!(raw.starts_with("HTTP/1.1 502"), "{raw}");
    }
    assert_eq!(ejections(&metrics(&proxy).await), 1.0);
    // Ejection never leaves the proc without its only endpoint: the app's own answers
    // beat the proxy's 503, on both paths.
    for version in ["1.0", "1.1"] {
        let request = format!(
            "GET /lengths/same HTTP/{version}\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        );
        let raw = raw_request(addr, &request).await;
        assert!(raw.starts_with("HTTP/1.1 200"), "{version}: {raw}");
    }
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_cut_by_the_upstream_reaches_the_client_as_far_as_it_came() {
    let host = "cut.tls.lain";
    let (mut cluster, _up) = scripted_cluster("proxy-cut", host).await;
    let cert = self_signed(&[host]);
    put_cert(&mut cluster, "cut", &[host], &cert).await;
    let (process, _dir) = tls_proxy(&cluster);
    let (addr, https) = (process.addr("http"), process.addr("https"));
    // HTTP/2 over TLS (pingora's path): the head arrives, then the stream is reset, so
    // reading the body fails instead of ending early.
    let h2 = tls_client(&[&cert.0], &[host], https);
    let url = |path: &str| format!("https://{host}:{}{path}", https.port());
    let first = eventually(Duration::from_secs(10), "the route served", || async {
        let r = h2.get(url("/")).send().await.ok()?;
        (r.status() == 200).then_some(r)
    })
    .await;
    assert_eq!(first.version(), reqwest::Version::HTTP_2);
    for round in 0..8 {
        for path in ["/cut/length", "/cut/chunked", "/"] {
            // A connection of its own each time, as a browser's first request has.
            let r = tls_client(&[&cert.0], &[host], https)
                .get(url(path))
                .send()
                .await;
            let r = r.unwrap_or_else(|e| panic!("h2 {path} #{round}: {e:?}"));
            assert_eq!(r.status(), 200, "h2 {path} #{round}");
            let body = r.bytes().await;
            assert_eq!(body.is_ok(), path == "/", "h2 {path} #{round}: {body:?}");
        }
    }
    // Whether a failure reached pingora's writer on its own or behind the body bytes varies,
    // so each is asked several times.
    for (version, chunked) in H1_PATHS {
        let label = if chunked { "1.1 chunked" } else { version };
        let ask = |target: &str| ask_by(addr, host, version, chunked, target.to_string());
        for round in 0..8 {
            // The head and the part of the body that came, then the end of the connection,
            // which read_to_end waits for: the client can tell the body is short.
            let raw = ask("/cut/length").await;
            assert!(raw.starts_with("HTTP/1.1 200"), "{label} #{round}: {raw:?}");
            assert!(
                raw.contains("\r\ncontent-length: 100\r\n"),
                "{label} #{round}: {raw:?}"
            );
            assert!(raw.ends_with("\r\n\r\npart"), "{label} #{round}: {raw:?}");
            // A chunked body keeps its chunks and never gets the last one, which would tell
            // the client the body was whole. An HTTP/1.0 client gets no chunked framing.
            if version == "1.1" {
                let raw = ask("/cut/chunked").await;
                assert!(raw.starts_with("HTTP/1.1 200"), "{label} #{round}: {raw:?}");
                assert!(
                    raw.ends_with("\r\n\r\n4\r\npart\r\n"),
                    "{label} #{round}: {raw:?}"
                );
            }
            // A chunked body broken from its first bytes: lain's path has sent nothing yet
            // and answers 502; pingora's has sent the head, and stops there.
            if version == "1.1" {
                let raw = ask("/cut/badchunk").await;
                if chunked {
                    assert!(!raw.ends_with("0\r\n\r\n"), "{label} #{round}: {raw:?}");
                } else {
                    assert!(raw.starts_with("HTTP/1.1 502"), "{label} #{round}: {raw:?}");
                }
            }
            // A whole answer between the cut ones keeps the endpoint from being ejected.
            let raw = ask("/").await;
            assert!(raw.starts_with("HTTP/1.1 200"), "{label} #{round}: {raw:?}");
        }
    }
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_is_answered_by_the_proxy() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let host = "expect.lain.local";
    let mut cluster = Cluster::new("proxy-expect").await;
    // An app that reads the body of an upload before it answers.
    let up = Upstream::start("expect").await;
    cluster.put_endpoint("expect", 1, up.addr).await;
    cluster.put_route(&route(host, "/", "expect")).await;
    let mut limited = route(&format!("small.{host}"), "/", "expect");
    limited.max_body_bytes = Some(4);
    cluster.put_route(&limited).await;
    let proxy = Proxy::start(&cluster, "");
    wait_status(&client(), &proxy, host, "/", 200).await;
    // Reads until `until` has arrived or the connection ends, for at most `secs`.
    async fn read_until(s: &mut tokio::net::TcpStream, until: &str, secs: u64) -> String {
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(secs), async {
            let mut piece = [0u8; 4096];
            while !String::from_utf8_lossy(&got).contains(until) {
                match s.read(&mut piece).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&piece[..n]),
                }
            }
        })
        .await;
        String::from_utf8_lossy(&got).into_owned()
    }
    for chunked in [false, true] {
        let mut s = tokio::net::TcpStream::connect(proxy.http).await.unwrap();
        let framing = if chunked {
            "Transfer-Encoding: chunked"
        } else {
            "Content-Length: 5"
        };
        let head = format!(
            "POST /upload HTTP/1.1\r\nHost: {host}\r\n{framing}\r\nExpect: 100-continue\r\n\r\n"
        );
        s.write_all(head.as_bytes()).await.unwrap();
        // The body is held back until the proxy says to go on, as a client does.
        let interim = read_until(&mut s, "\r\n\r\n", 5).await;
        assert_eq!(
            interim, "HTTP/1.1 100 Continue\r\n\r\n",
            "chunked: {chunked}"
        );
        let body: &[u8] = if chunked {
            b"5\r\nhello\r\n0\r\n\r\n"
        } else {
            b"hello"
        };
        s.write_all(body).await.unwrap();
        let mut buf = Vec::new();
        let (status, fields, answer) = read_any_response(&mut s, &mut buf, false).await.unwrap();
        assert_eq!(status, 200);
        let sent = json(&String::from_utf8_lossy(&answer));
        assert_eq!(sent["body_len"], 5, "{sent}");
        // The app is not asked again.
        assert!(sent["headers"].get("expect").is_none(), "{sent}");
        // The connection goes on to the next request.
        assert_eq!(
            fields.get("connection").map(String::as_str),
            Some("keep-alive")
        );
        let next = format!("GET /next HTTP/1.1\r\nHost: {host}\r\n\r\n");
        s.write_all(next.as_bytes()).await.unwrap();
        let (status, _, answer) = read_any_response(&mut s, &mut buf, false).await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(json(&String::from_utf8_lossy(&answer))["uri"], "/next");
    }
    // A request that gets a final answer from the proxy gets no 100 first.
    let raw = raw_request(
        proxy.http,
        &format!(
            "POST /upload HTTP/1.1\r\nHost: small.{host}\r\nContent-Length: 5\r\n\
             Expect: 100-continue\r\nConnection: close\r\n\r\n"
        ),
    )
    .await;
    assert!(raw.starts_with("HTTP/1.1 413"), "{raw}");
    // An HTTP/1.0 client gets none (RFC 9110 §10.1.1); its body is still delivered.
    let raw = raw_request(
        proxy.http,
        &format!(
            "POST /upload HTTP/1.0\r\nHost: {host}\r\nContent-Length: 5\r\n\
             Expect: 100-continue\r\n\r\nhello"
        ),
    )
    .await;
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    assert!(!raw.contains("100 Continue"), "{raw}");
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_answers_before_taking_the_whole_body_is_relayed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let host = "refuse.lain.local";
    let (cluster, _up, proxy) = scripted_route("proxy-h1-refuse", host).await;
    let before = settled_metrics(&proxy).await;
    let s = tokio::net::TcpStream::connect(proxy.http).await.unwrap();
    let (mut r, mut w) = s.into_split();
    // 32 MiB announced: far more than the sockets between here and the upstream hold, so
    // the upstream's close cuts the proxy off while it is still sending the body.
    let size = 32usize << 20;
    let writer = tokio::spawn(async move {
        let head =
            format!("POST /refuse HTTP/1.1\r\nHost: {host}\r\nContent-Length: {size}\r\n\r\n");
        w.write_all(head.as_bytes()).await?;
        let piece = vec![b'x'; 64 << 10];
        for _ in 0..size / piece.len() {
            w.write_all(&piece).await?;
        }
        Ok::<_, std::io::Error>(())
    });
    let mut got = Vec::new();
    let mut piece = [0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match r.read(&mut piece).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&piece[..n]),
            }
        }
    })
    .await;
    writer.abort();
    let text = String::from_utf8_lossy(&got).to_ascii_lowercase();
    // The upstream's own answer, not a 502, and the connection closed after it (the rest of
    // the body could not be read past), within the time allowed.
    assert!(read.is_ok(), "the connection stayed open: {text}");
    assert!(text.starts_with("http/1.1 413"), "{text}");
    assert!(
        text.contains("connection: close") && text.ends_with("too large"),
        "{text}"
    );
    // Served by lain's own path.
    wait_served(&proxy, &before, "h1", 1.0).await;
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_answered_as_it_arrives_flows_both_ways_at_once() {
    let host = "stream.lain.local";
    // lain's own path; pingora's stops reading the answer while a write of the body to the
    // upstream waits, so there the same exchange stalls (see proxy/README.md).
    let (cluster, _up, proxy) = scripted_route_with("proxy-duplex-h1", host, "").await;
    let before = settled_metrics(&proxy).await;
    let s = tokio::net::TcpStream::connect(proxy.http).await.unwrap();
    let (r, w) = s.into_split();
    stream_echo(r, w, host, "plain").await;
    wait_served(&proxy, &before, "h1", 1.0).await;
    cluster.cleanup().await;
}

/// Sends 32 MiB to the scripted app's `/stream-echo` at `host` through `w` while reading
/// the answer from `r`, and checks that the whole body came back, in a response that ends
/// the connection. The app sends each piece back as it reads it; 32 MiB is far more than
/// the socket buffers between the proxy and the app hold, so a proxy that sent the whole
/// body before reading any of the answer would wait on the app while the app waits on it.
async fn stream_echo<R, W>(mut r: R, mut w: W, host: &str, label: &str)
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let size = 32usize << 20;
    let body: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
    let sent = body.clone();
    let head =
        format!("POST /stream-echo HTTP/1.1\r\nHost: {host}\r\nContent-Length: {size}\r\n\r\n");
    let writer = tokio::spawn(async move {
        w.write_all(head.as_bytes()).await?;
        for piece in sent.chunks(64 << 10) {
            w.write_all(piece).await?;
        }
        w.flush().await?;
        // The write side stays open: the proxy ends the exchange, not the client.
        Ok::<_, std::io::Error>(w)
    });
    // Read until the last chunk, or the end of the connection.
    let mut got = Vec::with_capacity(size + (1 << 20));
    let read = tokio::time::timeout(Duration::from_secs(20), async {
        let mut piece = vec![0u8; 1 << 16];
        loop {
            match r.read(&mut piece).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&piece[..n]),
            }
            if got.ends_with(b"\r\n0\r\n\r\n") {
                return;
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "{label}: no whole answer in 20 s, {} bytes",
        got.len()
    );
    let writer = writer.await.unwrap();
    assert!(writer.is_ok(), "{label}: {:?}", writer.err());
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let head = match resp.parse(&got) {
        Ok(httparse::Status::Complete(n)) => n,
        other => panic!(
            "{label}: {other:?}: {}",
            String::from_utf8_lossy(&got[..got.len().min(300)])
        ),
    };
    assert_eq!(resp.code, Some(200), "{label}");
    let (echoed, used) = dechunk(&got[head..]).expect("a whole chunked body");
    assert_eq!(
        used,
        got.len() - head,
        "{label}: bytes after the last chunk"
    );
    assert!(
        echoed == body,
        "{label}: the echo differs from what was sent"
    );
    // The answer began before the body had all gone upstream, so the connection ends
    // after it, and says so.
    let close = resp.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("connection") && h.value.eq_ignore_ascii_case(b"close")
    });
    assert!(close, "{label}: no Connection: close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_1_1_over_tls_takes_lains_path_with_https_forwarding_and_duplex_uploads() {
    use tokio::io::AsyncWriteExt;
    let (stream_host, app_host) = ("stream.tls.lain", "app.tls.lain");
    let (mut cluster, _scripted) = scripted_cluster("proxy-tls-h1", stream_host).await;
    let up = Upstream::start("tls-app").await;
    cluster.put_endpoint("tls-app", 1, up.addr).await;
    let mut secure = route(app_host, "/", "tls-app");
    secure.https_only = true;
    cluster.put_route(&secure).await;
    let cert = self_signed(&[stream_host, app_host]);
    put_cert(&mut cluster, "tls-h1", &[stream_host, app_host], &cert).await;
    let (process, _dir) = tls_proxy(&cluster);
    let (https, admin) = (process.addr("https"), process.addr("admin"));

    let mut roots = rustls::RootCertStore::empty();
    roots.add(der(&cert.0).into()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    // What a browser without HTTP/2 offers; a client offering nothing gets HTTP/1.1 too.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let connect = |name: &'static str| {
        let connector = connector.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(https).await.unwrap();
            let server = rustls::pki_types::ServerName::try_from(name).unwrap();
            connector.connect(server, tcp).await.unwrap()
        }
    };
    let h1_served = |m: &str| served_by(m, "h1");

    // An https_only route is served over TLS, not redirected, with the forwarding headers of
    // an HTTPS request; a client's own X-Forwarded-Proto is not trusted.
    let answer = eventually(Duration::from_secs(10), "the route served over TLS", || async {
        let mut s = connect(app_host).await;
        let request = format!(
            "GET /p?q=1 HTTP/1.1\r\nHost: {app_host}\r\nX-Forwarded-Proto: http\r\nConnection: close\r\n\r\n"
        );
        s.write_all(request.as_bytes()).await.ok()?;
        let answer = read_all(&mut s).await?;
        let text = String::from_utf8_lossy(&answer).into_owned();
        text.starts_with("HTTP/1.1 200").then_some(text)
    })
    .await;
    let body = &answer[answer.find("\r\n\r\n").unwrap() + 4..];
    let seen: serde_json::Value = serde_json::from_str(body).unwrap();
    let h = &seen["headers"];
    assert_eq!(seen["uri"], "/p?q=1", "{seen}");
    assert_eq!(h["x-forwarded-proto"], "https", "{seen}");
    assert_eq!(h["x-forwarded-host"], app_host, "{seen}");
    assert_eq!(h["x-forwarded-for"], "127.0.0.1", "{seen}");
    assert_eq!(h["x-real-ip"], "127.0.0.1", "{seen}");
    assert!(
        h["x-request-id"].as_str().is_some_and(|id| !id.is_empty()),
        "{seen}"
    );

    // Two requests on one kept-alive TLS connection, both on lain's path.
    let before = metrics_page(admin).await;
    let mut s = connect(app_host).await;
    for i in 0..2 {
        let close = if i == 1 { "Connection: close\r\n" } else { "" };
        let request = format!("GET /k{i} HTTP/1.1\r\nHost: {app_host}\r\n{close}\r\n");
        s.write_all(request.as_bytes()).await.unwrap();
    }
    let answers = read_all(&mut s).await.expect("both answers, then the end");
    let answers = String::from_utf8_lossy(&answers);
    assert_eq!(answers.matches("HTTP/1.1 200").count(), 2, "{answers}");
    assert!(
        answers.contains("/k0") && answers.contains("/k1"),
        "{answers}"
    );
    let after = eventually(Duration::from_secs(5), "both counted", || async {
        let now = metrics_page(admin).await;
        (h1_served(&now) - h1_served(&before) >= 2.0).then_some(now)
    })
    .await;
    assert_eq!(
        served_by(&after, "pingora"),
        served_by(&before, "pingora"),
        "an HTTP/1.1 request over TLS went to pingora's path"
    );

    // An app streaming its answer to an upload, over TLS: pingora's path would stall here.
    let (r, w) = tokio::io::split(connect(stream_host).await);
    stream_echo(r, w, stream_host, "tls").await;
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_kills_the_app_is_replayed_once_not_once_per_pooled_connection() {
    let host = "crash.lain.local";
    let (cluster, up, proxy) = scripted_route("proxy-h1-crash", host).await;
    // Sixteen connections at once leave sixteen upstream connections in the workers' pools.
    let warm: Vec<_> = (0..16)
        .map(|_| {
            let url = proxy.url("/slowish");
            tokio::spawn(async move { client().get(url).header("host", host).send().await })
        })
        .collect();
    for w in warm {
        assert_eq!(w.await.unwrap().unwrap().status(), 200);
    }
    let before = up.requests.load(Ordering::Relaxed);
    let r = client()
        .get(proxy.url("/crash"))
        .header("host", host)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    // One try on a pooled connection, which may have been closed while idle and so costs
    // the endpoint nothing; then only new connections, each a counted retry (3 by default).
    let tries = up.requests.load(Ordering::Relaxed) - before;
    assert!((2..=5).contains(&tries), "{tries} tries");
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_element_in_a_transfer_coding_list_frames_the_body_as_chunked() {
    let host = "te.lain.local";
    let (cluster, _up, proxy) = scripted_route("proxy-h1-te", host).await;
    // Two requests on one connection: the second is answered only once the first
    // response's end was found, not when the upstream gives up on the connection.
    let started = Instant::now();
    let raw = raw_request(
        proxy.http,
        &format!(
            "GET /te/empty-element HTTP/1.1\r\nHost: {host}\r\n\r\n\
             GET /after HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        ),
    )
    .await;
    assert!(started.elapsed() < Duration::from_secs(5), "{raw}");
    assert!(raw.contains("2\r\nok\r\n0\r\n\r\n"), "{raw}");
    assert!(raw.ends_with("GET /after"), "{raw}");
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelined_header_over_the_limit_gets_431() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (cluster, up, proxy, _c) = one_route(
        "proxy-pipelined-431",
        "p",
        "p.lain.local",
        "/",
        "/",
        "max_header_bytes = 4096",
    )
    .await;
    let mut s = tokio::net::TcpStream::connect(proxy.http).await.unwrap();
    s.write_all(b"GET /slow HTTP/1.1\r\nHost: p.lain.local\r\n\r\n")
        .await
        .unwrap();
    // Sent while the first request waits for its answer, so that the proxy reads it whole
    // ahead of time.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let big = format!(
        "GET /second HTTP/1.1\r\nHost: p.lain.local\r\nx-big: {}\r\n\r\n",
        "a".repeat(8_000)
    );
    s.write_all(big.as_bytes()).await.unwrap();
    let hits = up.hits.load(Ordering::Relaxed);
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("HTTP/1.1 431"), "{text}");
    assert!(!text.contains("/second"), "{text}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        up.hits.load(Ordering::Relaxed),
        hits,
        "the second request went upstream"
    );
    cluster.cleanup().await;
}

/// The proxy process's resident memory in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_pipelining_without_end_is_held_back_not_buffered() {
    use std::io::{Read, Write};
    let (cluster, _up, proxy, _c) =
        one_route("proxy-pipeline-flood", "f", "f.lain.local", "/", "/", "").await;
    let pid = proxy.process.pid();
    let base = rss_kib(pid);
    let addr = proxy.http;
    // A client that sends requests far faster than they are answered, and reads the
    // answers so that they never hold the proxy back: at most 48 MiB, or until the proxy
    // stops taking them for a second, or 10 s.
    let flood = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(1))).unwrap();
        let mut r = s.try_clone().unwrap();
        let reader = std::thread::spawn(move || {
            let mut sink = [0u8; 65536];
            while matches!(r.read(&mut sink), Ok(n) if n > 0) {}
        });
        let block = b"GET / HTTP/1.1\r\nHost: f.lain.local\r\n\r\n".repeat(1700);
        let (started, mut sent) = (Instant::now(), 0usize);
        while sent < 48 << 20 && started.elapsed() < Duration::from_secs(10) {
            match s.write(&block) {
                Ok(n) => sent += n,
                Err(_) => break,
            }
        }
        (s, reader, sent)
    });
    let (s, reader, sent) = flood.await.unwrap();
    let grown = rss_kib(pid).saturating_sub(base);
    s.shutdown(std::net::Shutdown::Both).unwrap();
    reader.join().unwrap();
    // Every byte sent is either answered or in a socket buffer, not in the proxy's memory.
    assert!(
        grown < 12 << 10,
        "the proxy grew by {grown} KiB while a client pipelined {sent} bytes"
    );
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_before_the_whole_body_leaves_the_connection_readable_for_a_while() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut cluster = Cluster::new("proxy-linger").await;
    // An endpoint that refuses connections: the upload is answered 502 at once.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gone = closed.local_addr().unwrap();
    drop(closed);
    cluster.put_endpoint("linger", 1, gone).await;
    cluster
        .put_route(&route("linger.lain.local", "/", "linger"))
        .await;
    let proxy = Proxy::start(&cluster, "");
    wait_status(&client(), &proxy, "linger.lain.local", "/", 502).await;
    let mut s = tokio::net::TcpStream::connect(proxy.http).await.unwrap();
    s.write_all(
        b"POST /upload HTTP/1.1\r\nHost: linger.lain.local\r\nContent-Length: 1048576\r\n\r\nfirst",
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    let (status, _) = read_response(&mut s, &mut buf).await;
    assert_eq!(status, 502);
    // The client goes on sending its body, as a client does that is not reading yet. The
    // proxy reads it and throws it away before closing; a proxy that closed at once would
    // have the kernel answer with a reset, which on a real network can destroy the answer.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        s.write_all(&[b'x'; 16 << 10]).await.unwrap();
    }
    let mut rest = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest)).await;
    assert!(matches!(end, Ok(Ok(0))), "{end:?}");
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_idle_kept_alive_connections_at_once() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (cluster, _up, mut proxy, _c) =
        one_route("proxy-idle-shutdown", "i", "i.lain.local", "/", "/", "").await;
    let mut s = tokio::net::TcpStream::connect(proxy.http).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: i.lain.local\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    assert_eq!(read_response(&mut s, &mut buf).await.0, 200);
    // The connection is idle now; shutdown drains for up to 2 s (drain_secs).
    let stopping = tokio::task::spawn_blocking(move || {
        let status = proxy.process.terminate(Duration::from_secs(10));
        (proxy, status)
    });
    let started = Instant::now();
    let mut one = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut one)).await;
    assert!(matches!(n, Ok(Ok(0))), "{n:?}");
    assert!(
        started.elapsed() < Duration::from_millis(1_500),
        "closed after {:?}",
        started.elapsed()
    );
    let (_proxy, status) = stopping.await.unwrap();
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_past_the_limit_is_answered_413_once_and_blames_nobody() {
    let host = "limit.lain.local";
    let mut cluster = Cluster::new("proxy-chunked-413").await;
    let up = ScriptedUpstream::start().await;
    cluster.put_endpoint("scripted", 1, up.addr).await;
    let mut r = route(host, "/", "scripted");
    r.max_body_bytes = Some(1024);
    cluster.put_route(&r).await;
    let proxy = Proxy::start(&cluster, "");
    wait_status(&client(), &proxy, host, "/", 200).await;
    let before = up.requests.load(Ordering::Relaxed);
    // A chunked body has no length to refuse up front; PUT may be retried, and must not be
    // for this.
    let chunk = "x".repeat(10 << 10);
    for _ in 0..6 {
        let request = format!(
            "PUT /echo HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\
             Connection: close\r\n\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n",
            chunk.len()
        );
        let raw = raw_request(proxy.http, &request).await;
        assert!(raw.starts_with("HTTP/1.1 413"), "{raw}");
    }
    let sent = up.requests.load(Ordering::Relaxed) - before;
    assert!(sent <= 6, "{sent} requests upstream for 6 refused uploads");
    let m = metrics(&proxy).await;
    assert_eq!(
        metric_value(&m, "lain_proxy_upstream_ejections_total"),
        0.0,
        "{m}"
    );
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_connection_idle_past_its_timeout_is_closed_and_a_busy_one_is_not() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut cluster = Cluster::new("proxy-stream-idle").await;
    let (echo, _task) = echo_upstream("e").await;
    let port = cluster.put_stream("idle", "tcp", echo).await;
    let _proxy = Proxy::start(&cluster, &format!("{STREAM_CONFIG}\nidle_timeout_secs = 1"));
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_stream(addr).await;
    let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut busy = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 64];
    for s in [&mut idle, &mut busy] {
        s.write_all(b"hi").await.unwrap();
        let n = s.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"e:hi");
    }
    let started = Instant::now();
    // The busy connection talks every 300 ms for 2.4 s, well past the timeout in all.
    for i in 0..8 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        busy.write_all(b"x").await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(2), busy.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf[..n], b"e:x", "message {i}");
    }
    // The idle one was closed after about a second of silence.
    let n = tokio::time::timeout(Duration::from_secs(1), idle.read(&mut buf)).await;
    assert!(
        matches!(n, Ok(Ok(0))),
        "{n:?} after {:?}",
        started.elapsed()
    );
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_follows_a_rotation_and_dates_requests_by_arrival() {
    let (cluster, _up, proxy, c) =
        one_route("proxy-log-rotate", "rot", "rot.lain.local", "/", "/", "").await;
    let line_with = |path: PathBuf, id: &'static str| async move {
        eventually(Duration::from_secs(5), id, || async {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            text.lines().find(|l| l.contains(id)).map(str::to_string)
        })
        .await
    };
    let ask = |id: &'static str, path: &'static str| {
        c.get(proxy.url(path))
            .header("host", "rot.lain.local")
            .header("x-request-id", id)
            .send()
    };
    let sent = chrono::Utc::now();
    assert_eq!(ask("rot-1", "/slow").await.unwrap().status(), 200);
    let first = json(&line_with(proxy.access_log(), "rot-1").await);
    // `/slow` takes 300 ms upstream: the line's time is when the request came, not when
    // it ended.
    let time = chrono::DateTime::parse_from_rfc3339(first["time"].as_str().unwrap()).unwrap();
    let late = (time.with_timezone(&chrono::Utc) - sent).num_milliseconds();
    assert!(
        late < 150,
        "logged {late} ms after the request was sent: {first}"
    );
    assert!(first["duration_ms"].as_f64().unwrap() >= 300.0, "{first}");
    // Rotated away as logrotate does without copytruncate: the proxy opens a new file at
    // the path and goes on there.
    let rotated = proxy.access_log().with_extension("log.1");
    std::fs::rename(proxy.access_log(), &rotated).unwrap();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(ask("rot-2", "/").await.unwrap().status(), 200);
    line_with(proxy.access_log(), "rot-2").await;
    let old = std::fs::read_to_string(&rotated).unwrap();
    assert!(old.contains("rot-1") && !old.contains("rot-2"), "{old}");
    cluster.cleanup().await;
}
