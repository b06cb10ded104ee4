//! The driver of `benches/run controlplane`: times deploy → first request served through a
//! real `lain proxy` (1 and 10 instances), container kill → served again, and scale 1 → 20,
//! against real etcd and the harness's Docker engines. Prints a markdown table and writes
//! the JSON file named by `BENCH_OUT`.
//!
//! Knobs: `BENCH_REPS` (default 20) repetitions of each timed step, `BENCH_SCALE_REPS`
//! (default 3) scale-ups, of which the median is reported. Every wait is bounded.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use etcd_client::GetOptions;
use lain_common::Shutdown;
use lain_controlplane::engine::{Engine, EngineSettings, NodeSpec};
use lain_controlplane::metrics::Metrics;
use lain_state::records::decode;
use lain_state::{EndpointRecord, Keyspace, Kind};
use lain_test_support::{LainProcess, require_docker_nodes, require_etcd, unique_prefix};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const IMAGE: &str = "lain/busybox:latest";
/// The longest any one timed step may take before the run fails.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

fn app_yaml(name: &str, n: u32) -> String {
    // Each container answers with a token of its own, so a replacement is told apart.
    format!(
        "appname: {name}\n\
         web:\n  cmd: [\"/bin/busybox\", \"sh\", \"-c\", \
         \"echo $DEPLOYD_POD_INSTANCE_NO-$RANDOM$RANDOM > /tmp/index.html && exec /bin/busybox httpd -f -p $PORT -h /tmp\"]\n  \
         num_instances: {n}\n  memory: 32m\n  kill_timeout: 10\n"
    )
}

async fn get(proxy: SocketAddr, host: &str) -> Option<String> {
    let once = async {
        let mut s = tokio::net::TcpStream::connect(proxy).await.ok()?;
        let req = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        if !text.starts_with("HTTP/1.1 200") {
            return None;
        }
        text.split_once("\r\n\r\n")
            .map(|(_, b)| b.trim().to_string())
    };
    tokio::time::timeout(Duration::from_secs(2), once)
        .await
        .ok()
        .flatten()
}

/// Polls the proxy every 5 ms until `accept` takes a body; returns the time it took.
async fn until_served(
    proxy: SocketAddr,
    host: &str,
    t0: Instant,
    accept: impl Fn(&str) -> bool,
) -> anyhow::Result<(Duration, String)> {
    while t0.elapsed() < STEP_TIMEOUT {
        if let Some(body) = get(proxy, host).await
            && accept(&body)
        {
            return Ok((t0.elapsed(), body));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    bail!("{host} was not served within {STEP_TIMEOUT:?}")
}

struct Bench {
    engine: Engine,
    etcd: etcd_client::Client,
    ks: Keyspace,
    hosts: Vec<String>,
    docker: HashMap<String, bollard::Docker>,
    proxy: SocketAddr,
}

impl Bench {
    async fn endpoints(&self, app: &str) -> anyhow::Result<Vec<EndpointRecord>> {
        let resp = self
            .etcd
            .kv_client()
            .get(
                self.ks.kind_prefix(Kind::Endpoint),
                Some(GetOptions::new().with_prefix()),
            )
            .await?;
        Ok(resp
            .kvs()
            .iter()
            .filter_map(|kv| decode::<EndpointRecord>(kv.value()).ok())
            .filter(|e| e.app == app)
            .collect())
    }

    async fn deploy(&self, app: &str, n: u32) -> anyhow::Result<()> {
        self.engine.register("lain.yaml", &app_yaml(app, n)).await?;
        self.engine.deploy(app, "1", IMAGE).await?;
        Ok(())
    }

    /// Removes an app and waits until its endpoints are withdrawn, so repetitions do not
    /// pile up containers.
    async fn remove(&self, app: &str) -> anyhow::Result<()> {
        self.engine.remove_app(app).await?;
        let t0 = Instant::now();
        while !self.endpoints(app).await?.is_empty() {
            if t0.elapsed() > STEP_TIMEOUT {
                bail!("{app} was not withdrawn");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    async fn deploy_to_served(&self, app: &str, n: u32) -> anyhow::Result<Duration> {
        let host = format!("{app}.lain.local");
        let t0 = Instant::now();
        self.deploy(app, n).await?;
        let (took, _) = until_served(self.proxy, &host, t0, |_| true).await?;
        Ok(took)
    }

    async fn crash_to_served(&self, app: &str) -> anyhow::Result<Duration> {
        let host = format!("{app}.lain.local");
        self.deploy(app, 1).await?;
        let (_, before) = until_served(self.proxy, &host, Instant::now(), |_| true).await?;
        let ep = self
            .endpoints(app)
            .await?
            .into_iter()
            .next()
            .context("no endpoint")?;
        let docker = self.docker.get(&ep.node).context("unknown node")?;
        let t0 = Instant::now();
        docker
            .kill_container(
                &ep.container_id,
                None::<bollard::query_parameters::KillContainerOptions>,
            )
            .await?;
        let (took, _) = until_served(self.proxy, &host, t0, |b| b != before).await?;
        Ok(took)
    }

    async fn scale_1_to_20(&self, app: &str) -> anyhow::Result<Duration> {
        let host = format!("{app}.lain.local");
        self.deploy(app, 1).await?;
        until_served(self.proxy, &host, Instant::now(), |_| true).await?;
        let t0 = Instant::now();
        self.engine.scale(app, "web", 20).await?;
        loop {
            let eps = self.endpoints(app).await?;
            if eps.len() == 20 {
                return Ok(t0.elapsed());
            }
            if t0.elapsed() > STEP_TIMEOUT {
                bail!("{app} reached {} of 20 endpoints", eps.len());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Removes every container this run started, whatever happened.
    fn cleanup(&self) {
        for host in &self.hosts {
            let out = std::process::Command::new("docker")
                .args(["-H", host, "ps", "-aq", "--filter"])
                .arg(format!("label=lain.cluster={}", self.ks.prefix()))
                .output();
            let Ok(out) = out else { continue };
            let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .map(str::to_string)
                .collect();
            if !ids.is_empty() {
                let _ = std::process::Command::new("docker")
                    .args(["-H", host, "rm", "-f"])
                    .args(&ids)
                    .output();
            }
        }
    }
}

/// The nearest-rank percentile of sorted samples, in seconds.
fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1].as_secs_f64()
}

fn summary(mut v: Vec<Duration>) -> serde_json::Value {
    v.sort();
    serde_json::json!({
        "p50": percentile(&v, 50.0),
        "p99": percentile(&v, 99.0),
        "max": v.last().map(Duration::as_secs_f64),
        "n": v.len(),
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let reps: u32 = std::env::var("BENCH_REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let scale_reps: u32 = std::env::var("BENCH_SCALE_REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let out =
        std::env::var("BENCH_OUT").unwrap_or_else(|_| "target/bench/controlplane.json".into());
    let endpoints = require_etcd();
    let hosts: Vec<String> = require_docker_nodes().into_iter().take(2).collect();
    let ks = Keyspace::new(&unique_prefix("bench-cp"));
    let nodes: Vec<NodeSpec> = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| NodeSpec {
            name: format!("node{}", i + 1),
            docker_host: h.clone(),
            address: IpAddr::from([127, 0, 0, 1]),
            labels: BTreeMap::new(),
            cpus: 8,
            memory_bytes: 16 << 30,
        })
        .collect();
    let docker = nodes
        .iter()
        .map(|n| {
            let d = bollard::Docker::connect_with_unix(
                &n.docker_host,
                30,
                bollard::API_DEFAULT_VERSION,
            )?;
            Ok((n.name.clone(), d))
        })
        .collect::<anyhow::Result<HashMap<_, _>>>()?;
    let volumes = tempfile::tempdir()?;
    let settings = EngineSettings::new(
        ks.clone(),
        vec!["lain.local".into()],
        volumes.path().to_path_buf(),
    );
    let etcd = lain_test_support::etcd_client(&endpoints).await;
    let shutdown = Shutdown::new();
    let metrics = Metrics::new(&prometheus::Registry::new());
    let (engine, task) =
        Engine::start(settings, etcd.clone(), nodes, metrics, shutdown.clone()).await?;

    let dir = tempfile::tempdir()?;
    let config = format!(
        "threads = 2\ndrain_secs = 1\n[listen]\nhttp = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\
         [state]\netcd_endpoints = {endpoints:?}\nprefix = \"{}\"\n[access_log]\npath = \"{}\"\n",
        ks.prefix(),
        dir.path().join("access.log").display(),
    );
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, config)?;
    let proxy_process = LainProcess::spawn(
        &["proxy", "--config", path.to_str().context("path")?],
        &[("LAIN_LOG", "off")],
        &["http"],
    );
    let b = Bench {
        engine,
        etcd: etcd.clone(),
        ks: ks.clone(),
        hosts,
        docker,
        proxy: proxy_process.addr("http"),
    };

    let result = async {
        let (mut d1, mut d10, mut crash, mut scale) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for r in 0..reps {
            let app = format!("one{r}");
            d1.push(b.deploy_to_served(&app, 1).await?);
            b.remove(&app).await?;
            let app = format!("ten{r}");
            d10.push(b.deploy_to_served(&app, 10).await?);
            b.remove(&app).await?;
            let app = format!("crash{r}");
            crash.push(b.crash_to_served(&app).await?);
            b.remove(&app).await?;
            eprintln!(
                "rep {r}: deploy {:?}, deploy10 {:?}, crash {:?}",
                d1.last().unwrap(),
                d10.last().unwrap(),
                crash.last().unwrap()
            );
        }
        for r in 0..scale_reps {
            let app = format!("scale{r}");
            scale.push(b.scale_1_to_20(&app).await?);
            b.remove(&app).await?;
            eprintln!("scale {r}: {:?}", scale.last().unwrap());
        }
        scale.sort();
        let scale_s = scale
            .get(scale.len() / 2)
            .map(Duration::as_secs_f64)
            .unwrap_or(f64::NAN);
        anyhow::Ok(serde_json::json!({
            "deploy_to_served_s": summary(d1),
            "deploy10_to_served_s": summary(d10),
            "crash_to_served_s": summary(crash),
            "scale_1_to_20_s": scale_s,
            "scale_1_to_20_runs_s": scale.iter().map(Duration::as_secs_f64).collect::<Vec<_>>(),
            "repetitions": reps,
        }))
    }
    .await;
    shutdown.trigger();
    let _ = task.await;
    b.cleanup();
    let _ = etcd
        .kv_client()
        .delete(
            ks.prefix(),
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        )
        .await;
    drop(proxy_process);
    let json = result?;

    let row = |name: &str, v: &serde_json::Value| {
        format!(
            "| {name} | {:.3} | {:.3} | {:.3} |",
            v["p50"].as_f64().unwrap_or(f64::NAN),
            v["p99"].as_f64().unwrap_or(f64::NAN),
            v["max"].as_f64().unwrap_or(f64::NAN)
        )
    };
    println!("| measure ({reps} runs) | p50 s | p99 s | max s |");
    println!("|---|---|---|---|");
    println!(
        "{}",
        row("deploy → served, 1 instance", &json["deploy_to_served_s"])
    );
    println!(
        "{}",
        row(
            "deploy → served, 10 instances",
            &json["deploy10_to_served_s"]
        )
    );
    println!(
        "{}",
        row("container kill → served again", &json["crash_to_served_s"])
    );
    println!(
        "| scale 1 → 20 instances published (median of {scale_reps}) | {:.3} | | |",
        json["scale_1_to_20_s"].as_f64().unwrap_or(f64::NAN)
    );
    if let Some(parent) = std::path::Path::new(&out).parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&out, serde_json::to_vec_pretty(&json)?)?;
    eprintln!("wrote {out}");
    Ok(())
}
