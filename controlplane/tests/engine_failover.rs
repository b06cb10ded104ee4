//! Two control planes, the leader killed with SIGKILL in the middle of a rollout: the
//! standby takes over within seconds and converges, with no duplicate and no orphaned
//! container.
//!
//! The first leader is this test binary run again as a child process (entry point: the
//! ignored test `leader_child`, which does nothing unless the parent sets its environment):
//! it campaigns, runs the engine, and deploys on command from stdin, so the parent can kill it
//! at a chosen step of a rollout. The standby is the real `lain controlplane --config FILE`.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use etcd_client::GetOptions;
use lain_common::Shutdown;
use lain_controlplane::engine::{Engine, EngineSettings, NodeSpec};
use lain_controlplane::metrics::Metrics;
use lain_state::records::decode;
use lain_state::{AppRecord, EndpointRecord, Keyspace, Kind};
use lain_test_support::{
    ContainerCleanup, eventually, parse_listening, require_docker_nodes, require_etcd, temp_dir,
    unique_prefix,
};

const IMAGE: &str = "lain/busybox:latest";
const CHILD_ENV: &str = "LAIN_CP_TEST_CHILD_PREFIX";

fn nodes() -> Vec<NodeSpec> {
    let hosts = require_docker_nodes();
    assert!(hosts.len() >= 2, "two Docker engines are needed");
    hosts
        .iter()
        .take(2)
        .enumerate()
        .map(|(i, h)| NodeSpec {
            name: format!("node{}", i + 1),
            docker_host: h.clone(),
            address: IpAddr::from([127, 0, 0, 1]),
            labels: Default::default(),
            cpus: 4,
            memory_bytes: 4 << 30,
        })
        .collect()
}

fn app_yaml(app: &str) -> String {
    format!(
        "appname: {app}\n\
         web:\n  cmd: [\"/bin/busybox\", \"httpd\", \"-f\", \"-p\", \"$PORT\", \"-h\", \"/tmp\"]\n  \
         num_instances: 3\n  memory: 32m\n  kill_timeout: 10\n"
    )
}

/// The first leader, run as a child process by the test below; it does nothing unless the
/// parent set its environment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the entry point of the child process of two_control_planes_converge_after_the_leader_is_killed"]
async fn leader_child() {
    let Ok(prefix) = std::env::var(CHILD_ENV) else {
        return;
    };
    // Docker names containers per engine, so concurrent tests use apps of their own.
    let app = std::env::var("LAIN_CP_TEST_CHILD_APP").unwrap();
    let volumes = std::env::var("LAIN_CP_TEST_CHILD_VOLUMES").unwrap();
    let etcd = lain_test_support::etcd_client(&require_etcd()).await;
    let ks = Keyspace::new(&prefix);
    let never = Shutdown::new();
    let leadership =
        lain_controlplane::leader::campaign(&etcd, &ks, "child", Duration::from_secs(2), &never)
            .await
            .unwrap()
            .unwrap();
    let settings = EngineSettings::new(ks, vec!["lain.local".into()], volumes.into());
    let metrics = Metrics::new(&prometheus::Registry::new());
    let (engine, _task) = Engine::start(settings, etcd, nodes(), metrics, never.clone())
        .await
        .unwrap();
    println!("child: leading");
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(8);
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines().map_while(Result::ok) {
            if tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    while let Some(line) = rx.recv().await {
        match line.split_whitespace().collect::<Vec<_>>()[..] {
            ["register"] => {
                engine.register("lain.yaml", &app_yaml(&app)).await.unwrap();
            }
            ["deploy", version] => {
                engine.deploy(&app, version, IMAGE).await.unwrap();
            }
            _ => panic!("unknown command {line:?}"),
        }
        println!("child: done {line}");
    }
    drop(leadership);
}

/// The standby control plane process and its admin address.
struct Standby {
    child: Child,
    admin: std::net::SocketAddr,
}

impl Standby {
    fn spawn(config: &std::path::Path) -> Standby {
        // The standby is the real `lain controlplane` binary.
        let mut child = Command::new(lain_test_support::lain_binary())
            .arg("controlplane")
            .arg("-c")
            .arg(config)
            .env(
                "LAIN_LOG",
                std::env::var("LAIN_LOG").unwrap_or("warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some((name, addr)) = parse_listening(&line)
                    && name == "admin"
                {
                    let _ = tx.send(addr);
                }
            }
        });
        let admin = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the standby announces its admin listener");
        Standby { child, admin }
    }

    /// SIGTERM, then up to `grace` for it to exit.
    fn terminate(&mut self, grace: Duration) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Standby {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The child process and the lines it prints.
struct ChildLeader {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl ChildLeader {
    fn spawn(prefix: &str, volumes: &str, app: &str) -> ChildLeader {
        let exe = std::env::current_exe().unwrap();
        let mut child = Command::new(exe)
            .args(["--exact", "leader_child", "--ignored", "--nocapture"])
            .env(CHILD_ENV, prefix)
            .env("LAIN_CP_TEST_CHILD_VOLUMES", volumes)
            .env("LAIN_CP_TEST_CHILD_APP", app)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut c = ChildLeader {
            child,
            stdin,
            lines,
        };
        c.expect("child: leading");
        c
    }

    fn expect(&mut self, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.trim() == want => return,
                Ok(_) => {}
                Err(_) => panic!("the child leader did not print {want:?} within 30 s"),
            }
        }
    }

    fn command(&mut self, cmd: &str) {
        writeln!(self.stdin, "{cmd}").unwrap();
        self.stdin.flush().unwrap();
        self.expect(&format!("child: done {cmd}"));
    }

    fn kill9(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for ChildLeader {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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

async fn leader_page(admin: std::net::SocketAddr) -> Option<String> {
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
}

async fn kill_the_leader_at(step: Step, app: &str) {
    let etcd_endpoints = require_etcd();
    let hosts: Vec<String> = nodes().into_iter().map(|n| n.docker_host).collect();
    let prefix = unique_prefix("cp-failover");
    let ks = Keyspace::new(&prefix);
    let dir = temp_dir();
    let volumes = dir.path().join("volumes");
    let _cleanup = ContainerCleanup {
        prefix: ks.prefix().to_string(),
        hosts: hosts.clone(),
    };
    let etcd = lain_test_support::etcd_client(&etcd_endpoints).await;

    let mut first = ChildLeader::spawn(&prefix, volumes.to_str().unwrap(), app);
    first.command("register");
    first.command("deploy 1");
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

    // The standby: `lain controlplane` on the same prefix and engines.
    let cfg = dir.path().join("cp.toml");
    let mut text = format!(
        "etcd_endpoints = {etcd_endpoints:?}\nprefix = \"{prefix}\"\ncluster_domains = [\"lain.local\"]\n\
         volume_root = \"{}\"\nelection_ttl_secs = 2\n",
        volumes.display()
    );
    for (i, h) in hosts.iter().enumerate() {
        text.push_str(&format!(
            "[[nodes]]\nname = \"node{}\"\ndocker_host = \"{h}\"\nmemory_bytes = {}\n",
            i + 1,
            4u64 << 30
        ));
    }
    std::fs::write(&cfg, text).unwrap();
    let mut standby = Standby::spawn(&cfg);
    let admin = standby.admin;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(leader_page(admin).await.as_deref(), Some("standby"));

    first.command("deploy 2");
    if let Step::Surging = step {
        eventually(Duration::from_secs(30), "a v2 container", || async {
            let c = containers(&hosts, ks.prefix()).await;
            let new = c.iter().filter(|c| c.1 == "2").count();
            let old = c.iter().filter(|c| c.1 == "1").count();
            (new >= 1 && old >= 1).then_some(())
        })
        .await;
    }
    first.kill9();
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
