//! The engine under traffic and faults, against real etcd, real Docker engines and a real
//! `lain proxy`: a rolling update with zero failed requests, a Docker engine that stops
//! (stateless instances move, stateful ones stay and are reported), a node whose lease
//! expires, a node added at run time kept by the next leader, OOM kills and crash backoff.
//!
//! Each test uses its own etcd prefix, which also labels its containers, and removes every
//! container carrying that label when it ends. The engine that is stopped is a private
//! dockerd the test starts itself, never one of the harness's shared engines.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use etcd_client::GetOptions;
use lain_common::Shutdown;
use lain_controlplane::engine::{Engine, EngineSettings, NodeSpec};
use lain_controlplane::metrics::Metrics;
use lain_state::records::decode;
use lain_state::{EndpointRecord, Keyspace, Kind};
use lain_test_support::{
    ContainerCleanup, LainProcess, eventually, require_docker_nodes, require_etcd, unique_prefix,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const IMAGE: &str = "lain/busybox:latest";

/// A dockerd of this test's own, on a unix socket in a temporary directory, with the
/// busybox image copied from a shared engine. It is stopped by its PID when dropped.
struct PrivateDocker {
    child: Option<Child>,
    dir: PathBuf,
    host: String,
}

impl PrivateDocker {
    fn start(image_from: &str) -> PrivateDocker {
        // Unix socket paths are limited to 107 bytes, so the directory lives under /tmp.
        let dir = tempfile::Builder::new()
            .prefix("lcp")
            .tempdir_in("/tmp")
            .unwrap()
            .keep();
        let sock = dir.join("d.sock");
        let host = format!("unix://{}", sock.display());
        std::fs::create_dir_all(dir.join("data")).unwrap();
        std::fs::create_dir_all(dir.join("exec")).unwrap();
        std::fs::write(
            dir.join("daemon.json"),
            format!(
                "{{\"deprecated-key-path\": \"{}\"}}\n",
                dir.join("key.json").display()
            ),
        )
        .unwrap();
        let mut d = PrivateDocker {
            child: None,
            dir,
            host,
        };
        d.spawn();
        let status = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "docker -H {image_from} save {IMAGE} | docker -H {} load -q",
                d.host
            ))
            .status()
            .unwrap();
        assert!(
            status.success(),
            "cannot copy {IMAGE} into the private dockerd"
        );
        d
    }

    /// Starts dockerd on this engine's directories and waits until it answers.
    fn spawn(&mut self) {
        let (dir, host) = (self.dir.clone(), self.host.clone());
        let log = std::fs::File::create(dir.join("dockerd.log")).unwrap();
        let dockerd = if Path::new("/usr/sbin/dockerd").exists() {
            "/usr/sbin/dockerd"
        } else {
            "dockerd"
        };
        // The same isolation as the harness's engines: no bridge, no iptables, an own cgroup
        // parent, data root and exec root.
        let child = Command::new(dockerd)
            .arg("--config-file")
            .arg(dir.join("daemon.json"))
            .arg("-H")
            .arg(&host)
            .arg("--data-root")
            .arg(dir.join("data"))
            .arg("--exec-root")
            .arg(dir.join("exec"))
            .arg("--pidfile")
            .arg(dir.join("dockerd.pid"))
            .args([
                "--bridge=none",
                "--iptables=false",
                "--ip6tables=false",
                "--ip-forward=false",
                "--ip-masq=false",
                "--userland-proxy=false",
                "--log-level=warn",
            ])
            .arg(format!(
                "--cgroup-parent=lain-dockerp{}",
                std::process::id()
            ))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {dockerd}: {e}"));
        self.child = Some(child);
        let d = self;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ok = Command::new("docker")
                .args(["-H", &d.host, "version", "--format", "{{.Server.Version}}"])
                .output()
                .is_ok_and(|o| o.status.success());
            if ok {
                break;
            }
            if Instant::now() > deadline
                || d.child
                    .as_mut()
                    .unwrap()
                    .try_wait()
                    .ok()
                    .flatten()
                    .is_some()
            {
                let log = std::fs::read_to_string(d.dir.join("dockerd.log")).unwrap_or_default();
                panic!("private dockerd did not come up: {log}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Stops the engine with SIGTERM, as an operator would; dockerd stops its containers and
    /// its containerd on the way out. SIGKILL after 30 s.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if child.try_wait().ok().flatten().is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateDocker {
    fn drop(&mut self) {
        self.stop();
        // dockerd leaves its data root bind-mounted and its network namespace pinned; they
        // are unmounted, deepest first, only below this engine's own directory.
        let dir = format!("{}/", self.dir.display());
        for _ in 0..4 {
            let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
            let mut ours: Vec<&str> = mounts
                .lines()
                .filter_map(|l| l.split_whitespace().nth(1))
                .filter(|m| m.starts_with(&dir))
                .collect();
            if ours.is_empty() {
                break;
            }
            ours.sort_by(|a, b| b.cmp(a));
            for m in ours {
                let _ = Command::new("umount").arg("-l").arg(m).status();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Harness {
    engine: Engine,
    task: tokio::task::JoinHandle<()>,
    shutdown: Shutdown,
    etcd: etcd_client::Client,
    endpoints: Vec<String>,
    ks: Keyspace,
    _volumes: tempfile::TempDir,
    // Declared before the clean-up so that a failed test stops the engine before its
    // containers are removed.
    _stop: StopOnDrop,
    _cleanup: ContainerCleanup,
}

/// Stops an engine when a test ends without `Harness::stop` (a failed assertion).
struct StopOnDrop(Shutdown);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.trigger();
    }
}

fn node(name: &str, host: &str) -> NodeSpec {
    NodeSpec {
        name: name.to_string(),
        docker_host: host.to_string(),
        address: IpAddr::from([127, 0, 0, 1]),
        labels: BTreeMap::new(),
        cpus: 4,
        memory_bytes: 4 << 30,
    }
}

fn shared_nodes() -> Vec<NodeSpec> {
    let hosts = require_docker_nodes();
    assert!(
        hosts.len() >= 2,
        "two Docker engines are needed, got {hosts:?}"
    );
    vec![node("node1", &hosts[0]), node("node2", &hosts[1])]
}

async fn start(
    test: &str,
    nodes: Vec<NodeSpec>,
    tune: impl FnOnce(&mut EngineSettings),
) -> Harness {
    // With LAIN_LOG set, the engine's log goes to the test output.
    if std::env::var_os("LAIN_LOG").is_some() {
        lain_common::telemetry::init(lain_common::telemetry::LogFormat::Text);
    }
    let endpoints = require_etcd();
    let prefix = unique_prefix(test);
    let ks = Keyspace::new(&prefix);
    let cleanup = ContainerCleanup {
        prefix: ks.prefix().to_string(),
        hosts: nodes.iter().map(|n| n.docker_host.clone()).collect(),
    };
    let volumes = tempfile::tempdir().unwrap();
    let mut settings = EngineSettings::new(
        ks.clone(),
        vec!["lain.local".into()],
        volumes.path().to_path_buf(),
    );
    settings.health_deadline = Duration::from_secs(30);
    tune(&mut settings);
    let etcd = lain_test_support::etcd_client(&endpoints).await;
    let shutdown = Shutdown::new();
    let metrics = Metrics::new(&prometheus::Registry::new());
    let (engine, task) = Engine::start(settings, etcd.clone(), nodes, metrics, shutdown.clone())
        .await
        .unwrap();
    Harness {
        engine,
        task,
        shutdown: shutdown.clone(),
        etcd,
        endpoints,
        ks,
        _volumes: volumes,
        _stop: StopOnDrop(shutdown.clone()),
        _cleanup: cleanup,
    }
}

impl Harness {
    async fn endpoints(&self, app: &str) -> Vec<EndpointRecord> {
        let resp = self
            .etcd
            .kv_client()
            .get(
                self.ks.kind_prefix(Kind::Endpoint),
                Some(GetOptions::new().with_prefix()),
            )
            .await
            .unwrap();
        resp.kvs()
            .iter()
            .filter_map(|kv| decode::<EndpointRecord>(kv.value()).ok())
            .filter(|e| e.app == app)
            .collect()
    }

    async fn event_kinds(&self, app: &str) -> Vec<String> {
        self.engine
            .events(app)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.kind)
            .collect()
    }

    /// Starts a real `lain proxy` on this cluster's prefix; returns it and its HTTP address.
    fn proxy(&self) -> (LainProcess, SocketAddr, tempfile::TempDir) {
        let dir = lain_test_support::temp_dir();
        let config = format!(
            "threads = 2\ndrain_secs = 2\n[listen]\nhttp = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\
             [state]\netcd_endpoints = {:?}\nprefix = \"{}\"\n[access_log]\npath = \"{}\"\n",
            self.endpoints,
            self.ks.prefix(),
            dir.path().join("access.log").display(),
        );
        let path = dir.path().join("proxy.toml");
        std::fs::write(&path, config).unwrap();
        let p = LainProcess::spawn(
            &["proxy", "--config", path.to_str().unwrap()],
            &[("LAIN_LOG", "warn")],
            &["http", "admin"],
        );
        let http = p.addr("http");
        (p, http, dir)
    }

    /// Stops this engine (its containers and records stay) and starts another on the same
    /// prefix, as a control plane taking over would.
    async fn new_leader(
        self,
        nodes: Vec<NodeSpec>,
        tune: impl FnOnce(&mut EngineSettings),
    ) -> Harness {
        self.shutdown.trigger();
        let _ = self.task.await;
        let mut settings = EngineSettings::new(
            self.ks.clone(),
            vec!["lain.local".into()],
            self._volumes.path().to_path_buf(),
        );
        settings.health_deadline = Duration::from_secs(30);
        tune(&mut settings);
        let shutdown = Shutdown::new();
        let metrics = Metrics::new(&prometheus::Registry::new());
        let (engine, task) = Engine::start(
            settings,
            self.etcd.clone(),
            nodes,
            metrics,
            shutdown.clone(),
        )
        .await
        .unwrap();
        Harness {
            engine,
            task,
            _stop: StopOnDrop(shutdown.clone()),
            shutdown,
            ..self
        }
    }

    /// Whether `state/nodes/{name}`, the record bound to the node's lease, exists.
    async fn node_leased(&self, name: &str) -> bool {
        let resp = self
            .etcd
            .kv_client()
            .get(self.ks.node(name), None)
            .await
            .unwrap();
        resp.count() > 0
    }

    async fn stop(self) {
        self.shutdown.trigger();
        let _ = self.task.await;
        let _ = self
            .etcd
            .kv_client()
            .delete(
                self.ks.prefix(),
                Some(etcd_client::DeleteOptions::new().with_prefix()),
            )
            .await;
    }
}

/// A web app whose instances answer `/` with `v{version} i{instance}`.
fn versioned_app(name: &str, n: u32, extra: &str) -> String {
    format!(
        "appname: {name}\n\
         web:\n  cmd: [\"/bin/busybox\", \"sh\", \"-c\", \
         \"echo v$LAIN_APP_RELEASE_VERSION i$DEPLOYD_POD_INSTANCE_NO > /tmp/index.html && exec /bin/busybox httpd -f -p $PORT -h /tmp\"]\n  \
         num_instances: {n}\n  memory: 32m\n  kill_timeout: 10\n{extra}"
    )
}

/// One HTTP/1.1 GET through the proxy on a fresh connection: the status and the body.
async fn get(proxy: SocketAddr, host: &str, path: &str) -> Result<(u16, String), String> {
    let once = async {
        let mut s = tokio::net::TcpStream::connect(proxy)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)
            .await
            .map_err(|e| format!("read: {e}"))?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse::<u16>().ok())
            .ok_or_else(|| format!("no status line in {text:?}"))?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.trim().to_string())
            .unwrap_or_default();
        Ok((status, body))
    };
    tokio::time::timeout(Duration::from_secs(5), once)
        .await
        .unwrap_or_else(|_| Err("timed out".into()))
}

/// Waits until the proxy answers 200 for `host` with a body starting with `want`.
async fn wait_served(proxy: SocketAddr, host: &str, want: &str) -> String {
    eventually(
        Duration::from_secs(60),
        &format!("{host} served {want:?} through the proxy"),
        || async {
            match get(proxy, host, "/").await {
                Ok((200, body)) if body.starts_with(want) => Some(body),
                _ => None,
            }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_update_through_the_proxy_fails_no_request() {
    let h = start("cp-roll", shared_nodes(), |_| {}).await;
    let (_proxy, http, _dir) = h.proxy();
    let app = "rolling";
    let host = "rolling.lain.local";
    h.engine
        .register("lain.yaml", &versioned_app(app, 2, ""))
        .await
        .unwrap();
    h.engine.deploy(app, "1", IMAGE).await.unwrap();
    wait_served(http, host, "v1").await;

    // A client sends requests one after another, each on a new connection, for as long as
    // the rollouts last (bounded in count and time).
    let stop = Arc::new(AtomicBool::new(false));
    let client_stop = stop.clone();
    let client = tokio::spawn(async move {
        let deadline = Instant::now() + Duration::from_secs(180);
        let mut ok = 0u32;
        let mut failures: Vec<String> = Vec::new();
        let mut bodies = BTreeSet::new();
        for _ in 0..100_000 {
            if client_stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                break;
            }
            match get(http, host, "/").await {
                Ok((200, body)) => {
                    ok += 1;
                    bodies.insert(body.split_whitespace().next().unwrap_or("").to_string());
                }
                Ok((status, body)) => failures.push(format!("{status}: {body}")),
                Err(e) => failures.push(e),
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        (ok, failures, bodies)
    });

    // Two rollouts in a row: 1 → 2 → 3, each waited for until the old containers are gone.
    for version in ["2", "3"] {
        h.engine.deploy(app, version, IMAGE).await.unwrap();
        eventually(
            Duration::from_secs(60),
            &format!("only version {version} runs"),
            || async {
                let inst = h.engine.instances(app).await.ok()?;
                let eps = h.endpoints(app).await;
                let all_new = eps.len() == 2 && eps.iter().all(|e| e.version == version);
                let containers = docker_ps(&h).await;
                (all_new
                    && inst.iter().all(|i| i.serving)
                    && containers.len() == 2
                    && containers.iter().all(|v| v == version))
                .then_some(())
            },
        )
        .await;
    }
    // Requests keep flowing a little after the last old container stopped.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let (ok, failures, bodies) = client.await.unwrap();
    assert!(
        failures.is_empty(),
        "{} of {} requests failed, first: {:?}",
        failures.len(),
        ok as usize + failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(ok > 50, "only {ok} requests were sent");
    let want: BTreeSet<String> = ["v1", "v2", "v3"].iter().map(|s| s.to_string()).collect();
    assert_eq!(bodies, want, "every version served during the rollouts");
    let deploys = h.engine.deploys(app).await.unwrap();
    assert_eq!(
        deploys
            .iter()
            .map(|d| d.outcome.as_str())
            .collect::<Vec<_>>(),
        ["succeeded", "succeeded", "succeeded"]
    );
    h.stop().await;
}

/// The versions of this test's containers on the shared engines.
async fn docker_ps(h: &Harness) -> Vec<String> {
    let mut out = Vec::new();
    for host in &h._cleanup.hosts {
        let o = tokio::process::Command::new("docker")
            .args([
                "-H",
                host,
                "ps",
                "-a",
                "--format",
                "{{.Label \"lain.version\"}}",
                "--filter",
            ])
            .arg(format!("label=lain.cluster={}", h.ks.prefix()))
            .output()
            .await
            .unwrap();
        out.extend(
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .map(str::to_string),
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_engine_has_its_stateless_instances_moved_and_its_stateful_ones_kept() {
    let shared = require_docker_nodes();
    let mut private = PrivateDocker::start(&shared[0]);
    let nodes = vec![node("node1", &shared[0]), node("nodep", &private.host)];
    let h = start("cp-engine-down", nodes, |s| {
        s.node_down_grace = Duration::from_secs(2);
    })
    .await;
    let (_proxy, http, _dir) = h.proxy();
    let app = "spread";
    let host = "spread.lain.local";
    // Two web instances spread over both engines, and one stateful worker per engine.
    let yaml = versioned_app(
        app,
        2,
        "worker.db:\n  cmd: [\"/bin/busybox\", \"sleep\", \"600\"]\n  num_instances: 2\n  stateful: true\n",
    );
    h.engine.register("lain.yaml", &yaml).await.unwrap();
    h.engine.deploy(app, "1", IMAGE).await.unwrap();
    let web = |eps: Vec<EndpointRecord>| -> Vec<EndpointRecord> {
        eps.into_iter().filter(|e| e.proc_name == "web").collect()
    };
    let eps = eventually(
        Duration::from_secs(60),
        "spread over both engines",
        || async {
            let eps = web(h.endpoints(app).await);
            let nodes: BTreeSet<&str> = eps.iter().map(|e| e.node.as_str()).collect();
            (eps.len() == 2 && nodes.len() == 2).then_some(eps)
        },
    )
    .await;
    wait_served(http, host, "v1").await;
    let moved = eps.iter().find(|e| e.node == "nodep").unwrap().instance;
    let db_on_p = eventually(Duration::from_secs(30), "a db worker on nodep", || async {
        let inst = h.engine.instances(app).await.ok()?;
        let dbs: Vec<_> = inst
            .iter()
            .filter(|i| i.proc_name == "db" && i.healthy)
            .collect();
        if dbs.len() != 2 {
            return None;
        }
        dbs.iter()
            .find(|i| i.node.as_deref() == Some("nodep"))
            .map(|i| (i.instance, i.container_id.clone()))
    })
    .await;

    // The private engine stops (SIGTERM to its PID); its web instance comes back on node1
    // and is served, with no second node to spread onto.
    assert!(private.pid() > 0);
    private.stop();
    let stopped = Instant::now();
    eventually(
        Duration::from_secs(60),
        &format!("web instance {moved} rescheduled onto node1"),
        || async {
            let eps = web(h.endpoints(app).await);
            (eps.len() == 2 && eps.iter().all(|e| e.node == "node1")).then_some(())
        },
    )
    .await;
    let took = stopped.elapsed();
    for _ in 0..20 {
        let (status, body) = get(http, host, "/").await.unwrap();
        assert_eq!(status, 200, "{body}");
    }
    let events = h.engine.events(app).await.unwrap();
    assert!(
        events.iter().any(|e| e.kind == "rescheduled"
            && e.instance == Some(moved)
            && e.message.contains("nodep")),
        "{events:?}"
    );

    // The stateful worker stays bound to its node, pending its return, and that is reported.
    let stranded = events
        .iter()
        .find(|e| e.kind == "stranded")
        .unwrap_or_else(|| panic!("no stranded event: {events:?}"));
    assert_eq!(stranded.proc_name.as_deref(), Some("db"));
    assert_eq!(stranded.instance, Some(db_on_p.0));
    let inst = h.engine.instances(app).await.unwrap();
    let db = inst
        .iter()
        .find(|i| i.proc_name == "db" && i.instance == db_on_p.0)
        .unwrap();
    assert_eq!(db.node.as_deref(), Some("nodep"), "{db:?}");
    assert_eq!(db.container_id, db_on_p.1);
    assert!(!db.healthy, "{db:?}");
    assert_eq!(
        events.iter().filter(|e| e.kind == "stranded").count(),
        1,
        "reported once: {events:?}"
    );
    // Exactly one container per slot runs on the engine that is left.
    let on1 = docker_ps(&h).await;
    assert_eq!(on1.len(), 3, "2 web + 1 db on node1: {on1:?}");
    eprintln!("engine stop → rescheduled and published in {took:?}");

    // The engine comes back: the stateful worker restarts there, on its data; the web
    // instance stays where it moved, and its old container is cleared away, not counted as
    // a crash.
    private.spawn();
    eventually(
        Duration::from_secs(60),
        "the db worker back on nodep",
        || async {
            let inst = h.engine.instances(app).await.ok()?;
            inst.iter()
                .find(|i| i.proc_name == "db" && i.instance == db_on_p.0)
                .filter(|i| i.healthy && i.node.as_deref() == Some("nodep"))
                .map(|_| ())
        },
    )
    .await;
    eventually(
        Duration::from_secs(30),
        "one container per slot",
        || async {
            let all = docker_ps(&h).await;
            let on_p = Command::new("docker")
                .args(["-H", &private.host, "ps", "-aq"])
                .output()
                .ok()?;
            let on_p = String::from_utf8_lossy(&on_p.stdout).lines().count();
            (all.len() == 4 && on_p == 1).then_some(())
        },
    )
    .await;
    let inst = h.engine.instances(app).await.unwrap();
    let moved_web = inst
        .iter()
        .find(|i| i.proc_name == "web" && i.instance == moved)
        .unwrap();
    assert_eq!(moved_web.node.as_deref(), Some("node1"), "{moved_web:?}");
    assert_eq!(moved_web.restarts, 0, "{moved_web:?}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_added_at_run_time_outlives_its_leader_and_its_expired_lease_moves_its_instances() {
    let shared = require_docker_nodes();
    let mut private = PrivateDocker::start(&shared[0]);
    // The grace for an engine that does not answer is far longer than this test, so only the
    // node's lease expiring can move its instances.
    let tune = |s: &mut EngineSettings| {
        s.node_down_grace = Duration::from_secs(600);
        s.node_lease_ttl = Duration::from_secs(2);
    };
    let configured = vec![node("node1", &shared[0])];
    let h = start("cp-node-lease", configured.clone(), tune).await;
    h.engine
        .add_node(node("nodep", &private.host))
        .await
        .unwrap();
    let app = "leased";
    h.engine
        .register("lain.yaml", &versioned_app(app, 2, ""))
        .await
        .unwrap();
    h.engine.deploy(app, "1", IMAGE).await.unwrap();
    let spread = || async {
        let inst = h.engine.instances(app).await.ok()?;
        let nodes: BTreeSet<Option<String>> = inst.iter().map(|i| i.node.clone()).collect();
        (inst.len() == 2 && inst.iter().all(|i| i.healthy) && nodes.len() == 2).then_some(inst)
    };
    let before = eventually(Duration::from_secs(60), "spread over both engines", spread).await;
    let on_p = before
        .iter()
        .find(|i| i.node.as_deref() == Some("nodep"))
        .unwrap()
        .clone();

    // A new leader configured with node1 only knows nodep from its stored membership and
    // adopts the instance there instead of starting another.
    let h = h.new_leader(configured, tune).await;
    let after = eventually(
        Duration::from_secs(60),
        "both instances adopted",
        || async {
            let inst = h.engine.instances(app).await.ok()?;
            (inst.len() == 2 && inst.iter().all(|i| i.healthy)).then_some(inst)
        },
    )
    .await;
    let adopted = after.iter().find(|i| i.instance == on_p.instance).unwrap();
    assert_eq!(adopted.node.as_deref(), Some("nodep"), "{after:?}");
    assert_eq!(adopted.container_id, on_p.container_id, "{after:?}");
    assert!(h.node_leased("nodep").await);

    // The private engine stops: nodep's lease is no longer renewed and expires, and its
    // instance moves to node1 long before the grace would have ended.
    private.stop();
    let stopped = Instant::now();
    eventually(Duration::from_secs(30), "nodep's lease expired", || async {
        (!h.node_leased("nodep").await).then_some(())
    })
    .await;
    eventually(
        Duration::from_secs(60),
        "the instance moved to node1",
        || async {
            let eps = h.endpoints(app).await;
            (eps.len() == 2 && eps.iter().all(|e| e.node == "node1")).then_some(())
        },
    )
    .await;
    eprintln!(
        "engine stop → lease expired → rescheduled in {:?}",
        stopped.elapsed()
    );
    let events = h.engine.events(app).await.unwrap();
    assert!(
        events.iter().any(|e| e.kind == "rescheduled"
            && e.instance == Some(on_p.instance)
            && e.message.contains("nodep")
            && e.message.contains("lease expired")),
        "{events:?}"
    );
    // The node is still a member of the cluster, and its lease comes back with its engine.
    let member = h
        .etcd
        .kv_client()
        .get(h.ks.node_member("nodep"), None)
        .await
        .unwrap();
    assert_eq!(member.count(), 1);
    private.spawn();
    eventually(Duration::from_secs(60), "nodep's lease renewed", || async {
        h.node_leased("nodep").await.then_some(())
    })
    .await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oom_kill_is_recorded_and_crashes_back_off() {
    let h = start("cp-oom", shared_nodes(), |_| {}).await;
    let app = "hog";
    // The shell holds 64 MB in a variable, twice its 32 MB limit, and has no swap to use.
    let yaml = "appname: hog\n\
                worker.hog:\n  cmd: [\"/bin/busybox\", \"sh\", \"-c\", \
                \"sleep 0.5; x=$(head -c 67108864 /dev/zero | tr '\\\\0' a); echo ${#x}\"]\n  \
                memory: 32m\n";
    h.engine.register("lain.yaml", yaml).await.unwrap();
    // A registered app is in etcd when `register` returns, so that a listing shows it.
    let stored = h
        .etcd
        .clone()
        .get(h.ks.app(app), None)
        .await
        .unwrap()
        .kvs()
        .len();
    assert_eq!(stored, 1, "the app record right after registering");
    h.engine.deploy(app, "1", IMAGE).await.unwrap();
    let ooms = eventually(Duration::from_secs(90), "three OOM kills", || async {
        let events = h.engine.events(app).await.ok()?;
        let ooms: Vec<_> = events
            .into_iter()
            .filter(|e| e.kind == "oom-killed")
            .collect();
        (ooms.len() >= 3).then_some(ooms)
    })
    .await;
    for e in &ooms {
        assert_eq!(e.proc_name.as_deref(), Some("hog"));
        assert!(e.message.contains("OOM-killed"), "{e:?}");
    }
    // The backoff grows: at once, then 2 s, then 4 s; the gaps between the kills show it.
    assert!(ooms[0].message.contains("in 0.0 s"), "{:?}", ooms[0]);
    assert!(ooms[1].message.contains("in 2.0 s"), "{:?}", ooms[1]);
    assert!(ooms[2].message.contains("in 4.0 s"), "{:?}", ooms[2]);
    let at = |i: usize| chrono::DateTime::parse_from_rfc3339(&ooms[i].at).unwrap();
    assert!(
        (at(2) - at(1)).num_milliseconds() >= 2_000,
        "{:?} then {:?}",
        ooms[1].at,
        ooms[2].at
    );
    let inst = h.engine.instances(app).await.unwrap();
    let hog = &inst[0];
    assert!(hog.restarts >= 3, "{hog:?}");
    assert!(
        hog.last_exit
            .as_deref()
            .unwrap_or("")
            .contains("OOM-killed"),
        "{hog:?}"
    );
    assert!(h.event_kinds(app).await.iter().any(|k| k == "restarted"));
    h.stop().await;
}

/// A GET of an admin page of a `lain` process.
async fn admin_page(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).await.ok()?;
    Some(body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_and_a_resource_reach_their_client_through_dns() {
    let h = start("cp-svc", shared_nodes(), |_| {}).await;
    let httpd = "[\"/bin/busybox\", \"httpd\", \"-f\", \"-p\", \"$PORT\", \"-h\", \"/tmp\"]";
    // A provider offering the service `echo` to `hello` only, in LAIN's shorthand.
    let provider = format!(
        "appname: echo\n\
         service.echo:\n  cmd: {httpd}\n  port: 5000\n  memory: 32m\n  \
         portal:\n    allow_clients: [hello]\n    cmd: {httpd}\n    memory: 32m\n"
    );
    // A resource: its template is filled from each client's parameters.
    let resource = format!(
        "appname: kv\napptype: resource\n\
         service.kv:\n  cmd: [\"/bin/busybox\", \"sh\", \"-c\", \
         \"echo {{{{ greeting }}}} > /tmp/index.html && exec /bin/busybox httpd -f -p $PORT -h /tmp\"]\n  \
         port: 6000\n  memory: \"{{{{ memory }}}}\"\n  num_instances: {{{{ replicas }}}}\n  \
         portal:\n    cmd: {httpd}\n    memory: 32m\n"
    );
    let client = format!(
        "appname: hello\n\
         use_services:\n  echo: [echo]\n\
         use_resources:\n  kv:\n    greeting: bonjour\n    memory: 48m\n    replicas: 2\n    services: [kv]\n\
         web:\n  cmd: {httpd}\n  memory: 32m\n"
    );
    h.engine.register("echo.yaml", &provider).await.unwrap();
    h.engine.deploy("echo", "1", IMAGE).await.unwrap();
    h.engine.register("kv.yaml", &resource).await.unwrap();
    // A client cannot use a resource before it is deployed, and is told why.
    h.engine.register("hello.yaml", &client).await.unwrap();
    let err = h.engine.deploy("hello", "1", IMAGE).await.unwrap_err();
    assert!(err.to_string().contains("not been deployed"), "{err}");
    h.engine.deploy("kv", "1", IMAGE).await.unwrap();
    h.engine.deploy("hello", "1", IMAGE).await.unwrap();

    // The resource runs as `resource.kv.hello`, rendered with hello's parameters.
    let instance = "resource.kv.hello";
    let eps = eventually(
        Duration::from_secs(60),
        "the resource instance serves",
        || async {
            let eps = h.endpoints(instance).await;
            let kv: Vec<_> = eps
                .iter()
                .filter(|e| e.proc_name == "kv")
                .cloned()
                .collect();
            (kv.len() == 2 && eps.iter().any(|e| e.proc_name == "portal-kv")).then_some(kv)
        },
    )
    .await;
    let mut s = tokio::net::TcpStream::connect(SocketAddr::new(eps[0].address, eps[0].port))
        .await
        .unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).await.unwrap();
    assert!(body.ends_with("bonjour\n"), "{body}");
    let inst = h.engine.instances(instance).await.unwrap();
    assert_eq!(inst.iter().filter(|i| i.proc_name == "kv").count(), 2);
    let containers = docker_names(&h).await;
    assert!(
        containers
            .iter()
            .any(|n| n.starts_with("resource.kv.hello.") && n.contains("-i2-")),
        "{containers:?}"
    );

    // What the data plane reads: the services, and the client's view of what it uses.
    let etcd_get = |kind: Kind| {
        let etcd = h.etcd.clone();
        let prefix = h.ks.kind_prefix(kind);
        async move {
            etcd.kv_client()
                .get(prefix, Some(GetOptions::new().with_prefix()))
                .await
                .unwrap()
                .kvs()
                .iter()
                .map(|kv| kv.value().to_vec())
                .collect::<Vec<_>>()
        }
    };
    let services: Vec<lain_state::ServiceRecord> = etcd_get(Kind::Service)
        .await
        .iter()
        .map(|v| decode(v).unwrap())
        .collect();
    let echo = services.iter().find(|s| s.app == "echo").unwrap();
    assert_eq!(
        (echo.service.as_str(), echo.portal.as_deref()),
        ("echo", Some("portal-echo"))
    );
    assert_eq!(echo.allow_clients, ["hello"]);
    assert!(
        services
            .iter()
            .any(|s| s.app == instance && s.service == "kv")
    );
    let apps: Vec<lain_state::AppRecord> = etcd_get(Kind::App)
        .await
        .iter()
        .map(|v| decode(v).unwrap())
        .collect();
    let hello = apps.iter().find(|a| a.name == "hello").unwrap();
    assert_eq!(hello.use_services["echo"], ["echo"]);
    assert_eq!(hello.use_resources["kv"], instance);
    assert_eq!(
        apps.iter().find(|a| a.name == instance).unwrap().apptype,
        "resource"
    );

    // A real `lain dns` on the same state answers the client's names for both.
    let dir = lain_test_support::temp_dir();
    let cfg = dir.path().join("dns.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[state]\netcd_endpoints = {:?}\nprefix = \"{}\"\n[zone]\ndomains = [\"lain\"]\n",
            h.endpoints,
            h.ks.prefix()
        ),
    )
    .unwrap();
    let dns = LainProcess::spawn(
        &["dns", "--config", cfg.to_str().unwrap()],
        &[("LAIN_LOG", "warn")],
        &["dns", "admin"],
    );
    let zone = eventually(
        Duration::from_secs(20),
        "service names in the zone",
        || async {
            let z = admin_page(dns.addr("admin"), "/zone").await?;
            (z.contains("echo.hello.lain.") && z.contains("kv.hello.lain.")).then_some(z)
        },
    )
    .await;
    assert!(
        zone.lines()
            .any(|l| l.starts_with("echo.hello.lain.") && l.contains("127.0.0.1")),
        "{zone}"
    );
    drop(dns);
    h.stop().await;
}

/// The names of this test's containers on the shared engines.
async fn docker_names(h: &Harness) -> Vec<String> {
    let mut out = Vec::new();
    for host in &h._cleanup.hosts {
        let o = tokio::process::Command::new("docker")
            .args(["-H", host, "ps", "-a", "--format", "{{.Names}}", "--filter"])
            .arg(format!("label=lain.cluster={}", h.ks.prefix()))
            .output()
            .await
            .unwrap();
        out.extend(
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .map(str::to_string),
        );
    }
    out
}

/// A Docker bridge network of this test's own on every engine, each with its own subnet;
/// removed when dropped (after the harness, declared later, removed the containers).
struct BridgeNet {
    name: String,
    hosts: Vec<String>,
}

impl BridgeNet {
    fn create(hosts: &[String]) -> BridgeNet {
        let name = format!("lcp-{}-{:06x}", std::process::id(), rand_u32() & 0xff_ffff);
        for (i, host) in hosts.iter().enumerate() {
            // Subnets are picked at random and retried, as other clusters may hold some.
            let created = (0..20).any(|_| {
                let subnet = format!("10.{}.{}.0/24", 200 + i, rand_u32() % 256);
                Command::new("docker")
                    .args(["-H", host, "network", "create", "--driver", "bridge"])
                    .args(["--subnet", &subnet, &name])
                    .output()
                    .is_ok_and(|o| o.status.success())
            });
            assert!(created, "cannot create network {name} on {host}");
        }
        BridgeNet {
            name,
            hosts: hosts.to_vec(),
        }
    }
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.finish() as u32
}

impl Drop for BridgeNet {
    fn drop(&mut self) {
        for host in &self.hosts {
            let _ = Command::new("docker")
                .args(["-H", host, "network", "rm", &self.name])
                .output();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_networking_reaches_instances_at_their_own_address() {
    let nodes = shared_nodes();
    let hosts: Vec<String> = nodes.iter().map(|n| n.docker_host.clone()).collect();
    let net = BridgeNet::create(&hosts);
    let network = net.name.clone();
    let h = start("cp-bridge", nodes, |s| {
        s.network = lain_controlplane::engine::Network::Bridge(network);
    })
    .await;
    let (_proxy, http, _dir) = h.proxy();
    let app = "bridged";
    // Every instance listens on the same declared port, 8080, on its own address.
    h.engine
        .register("lain.yaml", &versioned_app(app, 3, "  port: 8080\n"))
        .await
        .unwrap();
    h.engine.deploy(app, "1", IMAGE).await.unwrap();
    let eps = eventually(Duration::from_secs(60), "3 bridged endpoints", || async {
        let eps = h.endpoints(app).await;
        (eps.len() == 3).then_some(eps)
    })
    .await;
    let addrs: BTreeSet<IpAddr> = eps.iter().map(|e| e.address).collect();
    assert_eq!(addrs.len(), 3, "{eps:?}");
    for e in &eps {
        assert_eq!(e.port, 8080);
        assert!(
            matches!(e.address, IpAddr::V4(a) if a.octets()[0] == 10),
            "{e:?}"
        );
    }
    // Through the proxy, every instance answers.
    let mut seen = BTreeSet::new();
    for _ in 0..60 {
        let body = wait_served(http, "bridged.lain.local", "v1").await;
        seen.insert(body);
        if seen.len() == 3 {
            break;
        }
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    h.stop().await;
    drop(net);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_of_another_cluster_with_the_same_name_is_left_alone() {
    let h = start("cp-clash", shared_nodes(), |_| {}).await;
    let app = "clash";
    let name = "clash.web.web.v1-i1-d0";
    // Another cluster on the same engines already runs a container of that name.
    let other = format!("{}-other", h.ks.prefix());
    let _other_cleanup = ContainerCleanup {
        prefix: other.clone(),
        hosts: h._cleanup.hosts.clone(),
    };
    for host in &h._cleanup.hosts {
        let out = Command::new("docker")
            .args(["-H", host, "run", "-d", "--network", "none", "--name", name])
            .arg("--label")
            .arg(format!("lain.cluster={other}"))
            .args([IMAGE, "/bin/busybox", "sleep", "600"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    h.engine
        .register("lain.yaml", &versioned_app(app, 1, ""))
        .await
        .unwrap();
    h.engine.deploy(app, "1", IMAGE).await.unwrap();
    let failed = eventually(Duration::from_secs(30), "a start-failed event", || async {
        h.engine
            .events(app)
            .await
            .ok()?
            .into_iter()
            .find(|e| e.kind == "start-failed")
    })
    .await;
    assert!(failed.message.contains("409"), "{failed:?}");
    // The other cluster's containers still run, untouched.
    for host in &h._cleanup.hosts {
        let out = Command::new("docker")
            .args([
                "-H",
                host,
                "inspect",
                "--format",
                "{{.State.Running}}",
                name,
            ])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "true");
    }
    h.stop().await;
}
