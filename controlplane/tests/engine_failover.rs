//! Two control planes, the leader killed with SIGKILL at each step of a rollout (the deploy
//! just accepted, new containers surging, old ones withdrawn and draining): the standby
//! takes over within seconds and converges, with no duplicate and no orphaned container.
//!
//! Both replicas are the real `lain controlplane` binary on one config; the test drives the
//! leader through the HTTP API (register, deploy) and kills it at a chosen step of a
//! rollout.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use etcd_client::GetOptions;
use lain_state::records::decode;
use lain_state::{AppRecord, EndpointRecord, Keyspace, Kind};
use lain_test_support::{
    ContainerCleanup, ControlPlaneConfig, LainProcess, eventually, require_etcd,
};
use serde_json::json;

const IMAGE: &str = "lain/busybox:latest";

fn app_yaml(app: &str) -> String {
    format!(
        "appname: {app}\n\
         web:\n  cmd: [\"/bin/busybox\", \"httpd\", \"-f\", \"-p\", \"$PORT\", \"-h\", \"/tmp\"]\n  \
         num_instances: 3\n  memory: 32m\n  kill_timeout: 10\n"
    )
}

/// One API call as the admin; panics unless it answers `want`.
async fn api(
    config: &ControlPlaneConfig,
    cp: &LainProcess,
    path: &str,
    body: serde_json::Value,
    want: u16,
) {
    let r = reqwest::Client::new()
        .post(format!("http://{}{path}", cp.addr("api")))
        .bearer_auth(&config.token)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap_or_default();
    assert_eq!(status, want, "POST {path}: {text}");
}

/// (name, version, running) of every container of the cluster on both engines.
async fn containers(hosts: &[String], prefix: &str) -> Vec<(String, String, bool)> {
    let mut out = Vec::new();
    for host in hosts {
        let o = tokio::process::Command::new("docker")
            .args([
                "-H",
                host,
                "ps",
                "-a",
                "--format",
                "{{.Names}} {{.Label \"lain.version\"}} {{.State}}",
                "--filter",
            ])
            .arg(format!("label=lain.cluster={prefix}"))
            .output()
            .await
            .unwrap();
        for line in String::from_utf8_lossy(&o.stdout).lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() == 3 {
                out.push((f[0].to_string(), f[1].to_string(), f[2] == "running"));
            }
        }
    }
    out
}

async fn leader_page(admin: SocketAddr) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(admin).await.ok()?;
    s.write_all(b"GET /leader HTTP/1.0\r\n\r\n").await.ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).await.ok()?;
    body.lines().last().map(|l| l.trim().to_string())
}

/// The rollout steps at which the leader is killed.
#[derive(Debug, Clone, Copy)]
enum Step {
    /// Right after the deploy was accepted, before any new container exists.
    Accepted,
    /// Once a new container exists and before all are replaced.
    Surging,
    /// Once every endpoint is of the new version and an old container still runs: withdrawn,
    /// draining in-flight requests before it is stopped.
    Draining,
}

async fn kill_the_leader_at(step: Step, app: &str) {
    let config = ControlPlaneConfig::init("cp-failover", "");
    let hosts = config.nodes.clone();
    let prefix = config.prefix.clone();
    let ks = Keyspace::new(&prefix);
    let _cleanup = ContainerCleanup {
        prefix: ks.prefix().to_string(),
        hosts: hosts.clone(),
    };
    let etcd = lain_test_support::etcd_client(&require_etcd()).await;

    // The first replica leads before the second starts.
    let mut first = config.spawn();
    let first_admin = first.addr("admin");
    eventually(
        Duration::from_secs(15),
        "the first replica to lead",
        || async { (leader_page(first_admin).await? == "leader").then_some(()) },
    )
    .await;
    api(
        &config,
        &first,
        "/api/v1/apps",
        json!({"lain_yaml": app_yaml(app)}),
        201,
    )
    .await;
    let deploy = |version: &str| json!({"version": version, "image": IMAGE});
    api(
        &config,
        &first,
        &format!("/api/v1/apps/{app}/deploys"),
        deploy("1"),
        202,
    )
    .await;
    let endpoints = |version: &'static str| {
        let etcd = etcd.clone();
        let ks = ks.clone();
        async move {
            let r = etcd
                .kv_client()
                .get(
                    ks.kind_prefix(Kind::Endpoint),
                    Some(GetOptions::new().with_prefix()),
                )
                .await
                .ok()?;
            let eps: Vec<EndpointRecord> = r
                .kvs()
                .iter()
                .filter_map(|kv| decode::<EndpointRecord>(kv.value()).ok())
                .collect();
            let inst: BTreeSet<u32> = eps.iter().map(|e| e.instance).collect();
            (eps.len() == 3
                && inst == BTreeSet::from([1, 2, 3])
                && eps.iter().all(|e| e.version == version))
            .then_some(eps)
        }
    };
    eventually(Duration::from_secs(60), "3 endpoints of v1", || {
        endpoints("1")
    })
    .await;

    // The standby: a second replica on the same config.
    let mut standby = config.spawn();
    let admin = standby.addr("admin");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(leader_page(admin).await.as_deref(), Some("standby"));

    api(
        &config,
        &first,
        &format!("/api/v1/apps/{app}/deploys"),
        deploy("2"),
        202,
    )
    .await;
    match step {
        Step::Accepted => {}
        Step::Surging => {
            eventually(Duration::from_secs(30), "a v2 container", || async {
                let c = containers(&hosts, ks.prefix()).await;
                let new = c.iter().filter(|c| c.1 == "2").count();
                let old = c.iter().filter(|c| c.1 == "1").count();
                (new >= 1 && old >= 1).then_some(())
            })
            .await;
        }
        Step::Draining => {
            eventually(
                Duration::from_secs(30),
                "v2 serving, a v1 container draining",
                || async {
                    endpoints("2").await?;
                    let c = containers(&hosts, ks.prefix()).await;
                    c.iter().any(|c| c.1 == "1" && c.2).then_some(())
                },
            )
            .await;
        }
    }
    first.kill();
    let killed = Instant::now();
    eventually(Duration::from_secs(15), "the standby to lead", || async {
        (leader_page(admin).await? == "leader").then_some(())
    })
    .await;
    let took = killed.elapsed();
    assert!(took < Duration::from_secs(8), "took over in {took:?}");

    // The new leader finishes the rollout: exactly one running v2 container per instance,
    // no v1 left, nothing stopped lying around, and the deploy recorded as succeeded.
    eventually(Duration::from_secs(60), "3 endpoints of v2", || {
        endpoints("2")
    })
    .await;
    let settled = eventually(Duration::from_secs(30), "only 3 v2 containers", || async {
        let c = containers(&hosts, ks.prefix()).await;
        (c.len() == 3 && c.iter().all(|c| c.1 == "2" && c.2)).then_some(c)
    })
    .await;
    let names: BTreeSet<String> = settled
        .iter()
        .map(|c| {
            let i = c.0.find("-i").unwrap();
            c.0[i..i + 3].to_string()
        })
        .collect();
    assert_eq!(names.len(), 3, "one container per instance: {settled:?}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(containers(&hosts, ks.prefix()).await, settled, "stable");
    let record = etcd
        .kv_client()
        .get(ks.app(app), None)
        .await
        .unwrap()
        .kvs()
        .first()
        .map(|kv| decode::<AppRecord>(kv.value()).unwrap())
        .unwrap();
    assert_eq!(record.version, "2");
    let deploys = eventually(Duration::from_secs(30), "deploy 2 recorded", || async {
        let r = etcd
            .kv_client()
            .get(
                ks.deploys_of_app(app),
                Some(GetOptions::new().with_prefix()),
            )
            .await
            .ok()?;
        let d: Vec<serde_json::Value> = r
            .kvs()
            .iter()
            .filter_map(|kv| serde_json::from_slice(kv.value()).ok())
            .collect();
        (d.len() == 2 && d[1]["outcome"] == "succeeded").then_some(d)
    })
    .await;
    assert_eq!(deploys[1]["version"], "2");
    eprintln!("{step:?}: the standby led {took:?} after the kill");
    standby.terminate(Duration::from_secs(10));
    drop(config);
    let _ = etcd
        .kv_client()
        .delete(
            ks.prefix(),
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_control_planes_converge_after_the_leader_is_killed_as_a_deploy_is_accepted() {
    kill_the_leader_at(Step::Accepted, "failover-accepted").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_control_planes_converge_after_the_leader_is_killed_mid_surge() {
    kill_the_leader_at(Step::Surging, "failover-surging").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_control_planes_converge_after_the_leader_is_killed_while_old_instances_drain() {
    kill_the_leader_at(Step::Draining, "failover-draining").await;
}
