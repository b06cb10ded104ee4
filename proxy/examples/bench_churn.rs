//! Route churn and propagation latency for `benches/proxy/run.sh`: writes routes to etcd the
//! way the control plane does while a client loads a running `lain proxy`, and prints JSON.
//!
//! Environment: `LAIN_ETCD` (client URLs), `BENCH_PREFIX` (the proxy's key prefix),
//! `BENCH_PROXY` (its http address), `BENCH_UPSTREAM` (the upstream address),
//! `BENCH_CHURN_SECS` (default 10), `BENCH_UPDATES_PER_SEC` (default 200),
//! `BENCH_PROPAGATIONS` (default 50), `BENCH_KEEP` (leave the keys). Traffic goes to
//! loopback only.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use lain_state::{EndpointRecord, Keyspace, RouteRecord, encode};

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn route(host: &str, app: &str) -> RouteRecord {
    serde_json::from_value(serde_json::json!({"v":1,"host":host,"app":app,"proc":"web"}))
        .expect("route")
}

#[tokio::main]
async fn main() {
    let endpoints: Vec<String> = env("LAIN_ETCD", "http://127.0.0.1:23100")
        .split(',')
        .map(str::to_string)
        .collect();
    let ks = Keyspace::new(&env("BENCH_PREFIX", "/lain-bench"));
    let proxy: SocketAddr = env("BENCH_PROXY", "").parse().expect("BENCH_PROXY");
    let upstream: SocketAddr = env("BENCH_UPSTREAM", "").parse().expect("BENCH_UPSTREAM");
    let churn_secs: u64 = env("BENCH_CHURN_SECS", "10").parse().expect("secs");
    let rate: u64 = env("BENCH_UPDATES_PER_SEC", "200").parse().expect("rate");
    let props: usize = env("BENCH_PROPAGATIONS", "50").parse().expect("count");

    let mut etcd = etcd_client::Client::connect(&endpoints, None)
        .await
        .expect("etcd");
    let ep: EndpointRecord = serde_json::from_value(serde_json::json!({
        "v":1,"app":"churnbench","proc":"web","instance":1,
        "address": upstream.ip().to_string(),"port": upstream.port()}))
    .expect("endpoint");
    etcd.put(ks.endpoint("churnbench", "web", 1), encode(&ep), None)
        .await
        .expect("put");
    let main = route("churn.bench.lain", "churnbench");
    etcd.put(
        ks.route("churnbench", "web", &main.host, &main.path),
        encode(&main),
        None,
    )
    .await
    .expect("put");

    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    let url = format!("http://{proxy}/");
    // Wait for the route to be served.
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(r) = client
            .get(&url)
            .header("host", "churn.bench.lain")
            .send()
            .await
            && r.status() == 200
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Churn: clients load the stable route while other routes are written and deleted.
    let stop = Arc::new(AtomicBool::new(false));
    let requests = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let loaders: Vec<_> = (0..4)
        .map(|_| {
            let (c, url, stop, requests, failed) = (
                client.clone(),
                url.clone(),
                stop.clone(),
                requests.clone(),
                failed.clone(),
            );
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    requests.fetch_add(1, Ordering::Relaxed);
                    match c.get(&url).header("host", "churn.bench.lain").send().await {
                        Ok(r) if r.status() == 200 => {
                            let _ = r.bytes().await;
                        }
                        _ => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    let start = Instant::now();
    let mut updates = 0u64;
    let interval = Duration::from_micros(1_000_000 / rate.max(1));
    while start.elapsed() < Duration::from_secs(churn_secs) {
        let r = route(&format!("c{}.bench.lain", updates % 100), "churnother");
        let key = ks.route("churnother", "web", &r.host, &r.path);
        if updates.is_multiple_of(2) {
            let _ = etcd.put(key, encode(&r), None).await;
        } else {
            let _ = etcd.delete(key, None).await;
        }
        updates += 1;
        let next = start + interval * updates as u32;
        tokio::time::sleep_until(next.into()).await;
    }
    stop.store(true, Ordering::Relaxed);
    for l in loaders {
        let _ = l.await;
    }

    // Propagation: time from a put to the first request the new route serves.
    let mut lat = Vec::with_capacity(props);
    for i in 0..props {
        let host = format!("p{i}.bench.lain");
        let r = route(&host, "churnbench");
        let t0 = Instant::now();
        etcd.put(ks.route("churnbench", "web", &host, "/"), encode(&r), None)
            .await
            .expect("put");
        loop {
            if let Ok(resp) = client.get(&url).header("host", host.as_str()).send().await
                && resp.status() == 200
            {
                break;
            }
            if t0.elapsed() > Duration::from_secs(5) {
                break;
            }
        }
        lat.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or(0.0)
    };
    // `BENCH_KEEP` leaves the keys in place, for the set-up call that only writes the route.
    if std::env::var_os("BENCH_KEEP").is_none() {
        let _ = etcd
            .delete(
                ks.prefix().to_string(),
                Some(etcd_client::DeleteOptions::new().with_prefix()),
            )
            .await;
    }
    println!(
        "{}",
        serde_json::json!({
            "churn": {
                "updates": updates,
                "requests": requests.load(Ordering::Relaxed),
                "failed": failed.load(Ordering::Relaxed),
            },
            "propagation_ms": {"p50": pct(0.5), "p99": pct(0.99)},
        })
    );
}
