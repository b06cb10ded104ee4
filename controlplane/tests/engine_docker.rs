//! The engine against real etcd and the two real Docker engines of the test harness:
//! deploy, publish, self-heal, scale, failed deploys, adoption after restart, rollouts and
//! how often a steady instance is probed.
//!
//! Each test uses its own etcd prefix, which also labels its containers, and removes every
//! container carrying that label when it ends.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use etcd_client::GetOptions;
use lain_common::Shutdown;
use lain_controlplane::engine::{Engine, EngineError, EngineSettings, NodeSpec};
use lain_controlplane::metrics::Metrics;
use lain_state::records::decode;
use lain_state::{AppRecord, DnsRecord, EndpointRecord, Keyspace, Kind, NodeRecord, RouteRecord};
use lain_test_support::{
    ContainerCleanup, eventually, require_docker_nodes, require_etcd, unique_prefix,
};

const IMAGE: &str = "lain/busybox:latest";

struct Harness {
    engine: Engine,
    task: tokio::task::JoinHandle<()>,
    shutdown: Shutdown,
    etcd: etcd_client::Client,
    ks: Keyspace,
    settings: EngineSettings,
    nodes: Vec<NodeSpec>,
    docker: Vec<bollard::Docker>,
    _volumes: tempfile::TempDir,
    _cleanup: ContainerCleanup,
}

fn node_specs() -> Vec<NodeSpec> {
    let hosts = require_docker_nodes();
    assert!(
        hosts.len() >= 2,
        "two Docker engines are needed, got {hosts:?}"
    );
    hosts
        .iter()
        .take(2)
        .enumerate()
        .map(|(i, h)| NodeSpec {
            name: format!("node{}", i + 1),
            docker_host: h.clone(),
            address: IpAddr::from([127, 0, 0, 1]),
            labels: BTreeMap::from([(
                "disk".to_string(),
                if i == 0 { "ssd" } else { "hdd" }.to_string(),
            )]),
            cpus: 4,
            memory_bytes: 4 << 30,
        })
        .collect()
}

async fn start(test: &str) -> Harness {
    let endpoints = require_etcd();
    let prefix = unique_prefix(test);
    let ks = Keyspace::new(&prefix);
    let nodes = node_specs();
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
    settings.health_deadline = Duration::from_secs(20);
    let etcd = lain_test_support::etcd_client(&endpoints).await;
    let docker = nodes
        .iter()
        .map(|n| {
            bollard::Docker::connect_with_unix(&n.docker_host, 30, bollard::API_DEFAULT_VERSION)
                .unwrap()
        })
        .collect();
    let (engine, task, shutdown) = spawn_engine(&settings, &etcd, &nodes).await;
    Harness {
        engine,
        task,
        shutdown,
        etcd,
        ks,
        settings,
        nodes,
        docker,
        _volumes: volumes,
        _cleanup: cleanup,
    }
}

async fn spawn_engine(
    settings: &EngineSettings,
    etcd: &etcd_client::Client,
    nodes: &[NodeSpec],
) -> (Engine, tokio::task::JoinHandle<()>, Shutdown) {
    let shutdown = Shutdown::new();
    let metrics = Metrics::new(&prometheus::Registry::new());
    let (engine, task) = Engine::start(
        settings.clone(),
        etcd.clone(),
        nodes.to_vec(),
        metrics,
        shutdown.clone(),
    )
    .await
    .unwrap();
    (engine, task, shutdown)
}

impl Harness {
    async fn range<T: lain_state::Record + lain_state::records::Validate>(
        &self,
        kind: Kind,
    ) -> BTreeMap<String, T> {
        let resp = self
            .etcd
            .kv_client()
            .get(
                self.ks.kind_prefix(kind),
                Some(GetOptions::new().with_prefix()),
            )
            .await
            .unwrap();
        resp.kvs()
            .iter()
            .map(|kv| {
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                let v = decode::<T>(kv.value()).unwrap_or_else(|e| panic!("{key}: {e}"));
                (key, v)
            })
            .collect()
    }

    async fn endpoints(&self, app: &str) -> Vec<EndpointRecord> {
        self.range::<EndpointRecord>(Kind::Endpoint)
            .await
            .into_values()
            .filter(|e| e.app == app)
            .collect()
    }

    /// Waits until the app's endpoints are exactly instances 1..=n of `version`, all answering.
    /// Registers `yaml` (app `app`), deploys version 1 and waits until its `n` instances
    /// serve.
    async fn deploy_v1(&self, app: &str, yaml: &str, n: u32) -> Vec<EndpointRecord> {
        self.engine.register("lain.yaml", yaml).await.unwrap();
        self.engine.deploy(app, "1", IMAGE).await.unwrap();
        self.wait_serving(app, n, "1").await
    }

    async fn wait_serving(&self, app: &str, n: u32, version: &str) -> Vec<EndpointRecord> {
        eventually(
            Duration::from_secs(60),
            &format!("{n} endpoints of {app} v{version}"),
            || async {
                let eps = self.endpoints(app).await;
                let instances: BTreeSet<u32> = eps.iter().map(|e| e.instance).collect();
                let want: BTreeSet<u32> = (1..=n).collect();
                if instances != want || eps.iter().any(|e| e.version != version) {
                    return None;
                }
                for e in &eps {
                    tokio::net::TcpStream::connect(SocketAddr::new(e.address, e.port))
                        .await
                        .ok()?;
                }
                Some(eps)
            },
        )
        .await
    }

    /// Every container of this test's cluster, on every engine: (name, id, running).
    /// Kills an endpoint's container by hand, on the engine that runs it.
    async fn kill(&self, e: &EndpointRecord) {
        let node = self.nodes.iter().position(|n| n.name == e.node).unwrap();
        self.docker[node]
            .kill_container(
                &e.container_id,
                None::<bollard::query_parameters::KillContainerOptions>,
            )
            .await
            .unwrap();
    }

    async fn containers(&self) -> Vec<(String, String, bool, BTreeMap<String, String>)> {
        let mut out = Vec::new();
        for d in &self.docker {
            let filters = std::collections::HashMap::from([(
                "label",
                vec![format!("lain.cluster={}", self.ks.prefix())],
            )]);
            let opts = bollard::query_parameters::ListContainersOptionsBuilder::new()
                .all(true)
                .filters(&filters)
                .build();
            for c in d.list_containers(Some(opts)).await.unwrap() {
                out.push((
                    c.names
                        .unwrap_or_default()
                        .first()
                        .cloned()
                        .unwrap_or_default()
                        .trim_start_matches('/')
                        .to_string(),
                    c.id.unwrap_or_default(),
                    c.state == Some(bollard::models::ContainerSummaryStateEnum::RUNNING),
                    c.labels.unwrap_or_default().into_iter().collect(),
                ));
            }
        }
        out
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

    async fn stop(self) {
        self.shutdown.trigger();
        let _ = self.task.await;
        let mut kv = self.etcd.kv_client();
        let _ = kv
            .delete(
                self.ks.prefix(),
                Some(etcd_client::DeleteOptions::new().with_prefix()),
            )
            .await;
    }
}

fn web_app(name: &str, n: u32) -> String {
    format!(
        "appname: {name}\n\
         web:\n  cmd: [\"/bin/busybox\", \"httpd\", \"-f\", \"-p\", \"$PORT\", \"-h\", \"/tmp\"]\n  \
         num_instances: {n}\n  memory: 32m\n  kill_timeout: 10\n  mountpoint:\n    - /admin\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_publishes_spreads_heals_and_scales() {
    let h = start("cp-deploy").await;
    let app = "hello";
    let eps = h.deploy_v1(app, &web_app(app, 3), 3).await;

    // Spread over both engines, with LAIN's names, labels and one PORT each.
    let nodes: BTreeSet<&str> = eps.iter().map(|e| e.node.as_str()).collect();
    assert_eq!(nodes.len(), 2, "instances spread over both nodes: {eps:?}");
    let ports: BTreeSet<u16> = eps.iter().map(|e| e.port).collect();
    assert_eq!(ports.len(), 3);
    let containers = h.containers().await;
    assert_eq!(containers.len(), 3, "{containers:?}");
    for (name, _, running, labels) in &containers {
        assert!(*running);
        assert!(
            name.starts_with("hello.web.web.v1-i") && name.ends_with("-d0"),
            "{name}"
        );
        for k in [
            "lain.app",
            "lain.proc",
            "lain.podgroup",
            "lain.instance",
            "lain.version",
        ] {
            assert!(labels.contains_key(k), "{name} lacks label {k}");
        }
        assert_eq!(labels["lain.podgroup"], "hello.web.web");
    }

    // Routes of every expanded mountpoint, DNS records, container records, the app, nodes.
    let routes = h.range::<RouteRecord>(Kind::Route).await;
    let claimed: BTreeSet<String> = routes
        .values()
        .map(|r| format!("{}{}", r.host, r.path))
        .collect();
    for want in [
        "hello.lain.local/",
        "hello.lain/",
        "hello.lain.local/admin",
        "hello.lain/admin",
    ] {
        assert!(claimed.contains(want), "route {want} in {claimed:?}");
    }
    let dns = h.range::<DnsRecord>(Kind::Dns).await;
    assert!(
        dns.values()
            .any(|d| d.name == "web.hello.lain" && d.data == "127.0.0.1"),
        "{dns:?}"
    );
    assert!(
        dns.values().any(|d| d.name == "2.web.hello.lain"),
        "{dns:?}"
    );
    let crecs = h
        .range::<lain_state::ContainerRecord>(Kind::Container)
        .await;
    assert_eq!(crecs.len(), 3);
    let apps = h.range::<AppRecord>(Kind::App).await;
    assert_eq!(apps[&h.ks.app(app)].version, "1");
    let nodes = h.range::<NodeRecord>(Kind::Node).await;
    assert_eq!(nodes.len(), 2);

    // A container killed by hand is replaced and re-published.
    let victim = eps.iter().find(|e| e.instance == 2).unwrap().clone();
    h.kill(&victim).await;
    eventually(Duration::from_secs(30), "instance 2 replaced", || async {
        let eps = h.endpoints(app).await;
        let e = eps.iter().find(|e| e.instance == 2)?;
        (e.container_id != victim.container_id).then_some(())
    })
    .await;
    h.wait_serving(app, 3, "1").await;
    let kinds = h.event_kinds(app).await;
    assert!(kinds.iter().any(|k| k == "crashed"), "{kinds:?}");
    let inst = h.engine.instances(app).await.unwrap();
    let two = inst.iter().find(|i| i.instance == 2).unwrap();
    assert_eq!(two.restarts, 1);
    assert!(
        two.last_exit.as_deref().unwrap_or("").contains("exit"),
        "{two:?}"
    );
    let restarted = |kinds: &[String]| kinds.iter().filter(|k| *k == "restarted").count();
    assert_eq!(restarted(&kinds), 1, "{kinds:?}");

    // A deploy after the crash starts the new version's containers; none of them is
    // reported as a restart.
    h.engine.deploy(app, "2", IMAGE).await.unwrap();
    h.wait_serving(app, 3, "2").await;
    let events = h.engine.events(app).await.unwrap();
    let v2: Vec<&str> = events
        .iter()
        .filter(|e| e.message.contains(".v2-"))
        .map(|e| e.kind.as_str())
        .collect();
    assert_eq!(
        v2.iter().filter(|k| **k == "started").count(),
        3,
        "{events:?}"
    );
    assert!(!v2.contains(&"restarted"), "{events:?}");
    // The new version's instances start with no restarts and no last exit of their own.
    let inst = h.engine.instances(app).await.unwrap();
    let two = inst.iter().find(|i| i.instance == 2).unwrap();
    assert_eq!(
        (two.restarts, two.last_exit.as_deref()),
        (0, None),
        "{two:?}"
    );

    // Scale 3 → 5 → 1: the highest instance numbers go first.
    h.engine.scale(app, "web", 5).await.unwrap();
    h.wait_serving(app, 5, "2").await;
    h.engine.scale(app, "web", 1).await.unwrap();
    h.wait_serving(app, 1, "2").await;
    eventually(Duration::from_secs(30), "only instance 1 left", || async {
        let c = h.containers().await;
        (c.len() == 1 && c[0].3.get("lain.instance").map(String::as_str) == Some("1")).then_some(())
    })
    .await;
    h.stop().await;
}

/// A container of the version a deploy is replacing that stops meanwhile is removed, not
/// counted as a crash of the slot the new version is taking over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_container_of_a_replaced_version_is_no_crash() {
    let h = start("cp-replaced").await;
    let app = "replaced";
    // Version 2 never listens, so its rollout waits for it while version 1 serves.
    let yaml = format!(
        "appname: {app}\nweb:\n  cmd: [\"/bin/busybox\", \"sh\", \"-c\", \
         \"[ \\\"$LAIN_APP_RELEASE_VERSION\\\" = 2 ] && exec /bin/busybox sleep 600; \
         exec /bin/busybox httpd -f -p $PORT -h /tmp\"]\n  \
         num_instances: 1\n  memory: 32m\n  kill_timeout: 10\n"
    );
    let old = h.deploy_v1(app, &yaml, 1).await[0].clone();
    h.engine.deploy(app, "2", IMAGE).await.unwrap();
    eventually(Duration::from_secs(30), "version 2 started", || async {
        let c = h.containers().await;
        c.iter()
            .any(|c| c.2 && c.3.get("lain.version").map(String::as_str) == Some("2"))
            .then_some(())
    })
    .await;
    // Version 1's container dies while version 2's is not yet healthy.
    h.kill(&old).await;
    let events = eventually(
        Duration::from_secs(30),
        "the dead container removed",
        || async {
            let events = h.engine.events(app).await.unwrap();
            events
                .iter()
                .any(|e| e.kind == "removed" && e.message.contains(".v1-"))
                .then_some(events)
        },
    )
    .await;
    assert!(!events.iter().any(|e| e.kind == "crashed"), "{events:?}");
    let inst = h.engine.instances(app).await.unwrap();
    assert!(inst.iter().all(|i| i.restarts == 0), "{inst:?}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_image_fails_the_deploy_and_the_old_version_keeps_serving() {
    let h = start("cp-missing").await;
    let app = "steady";
    let before = h.deploy_v1(app, &web_app(app, 1), 1).await;
    h.engine
        .deploy(app, "2", "lain/does-not-exist:2")
        .await
        .unwrap();
    eventually(Duration::from_secs(30), "deploy-failed event", || async {
        let k = h.event_kinds(app).await;
        (k.iter().any(|k| k == "deploy-failed") && k.iter().any(|k| k == "rolled-back"))
            .then_some(())
    })
    .await;
    let events = h.engine.events(app).await.unwrap();
    let failed = events.iter().find(|e| e.kind == "deploy-failed").unwrap();
    assert!(failed.message.contains("does-not-exist"), "{failed:?}");
    let after = h.wait_serving(app, 1, "1").await;
    assert_eq!(
        after[0].container_id, before[0].container_id,
        "the running version was never touched"
    );
    let deploys = h.engine.deploys(app).await.unwrap();
    assert_eq!(deploys.last().unwrap().outcome, "failed");
    let apps = h.range::<AppRecord>(Kind::App).await;
    assert_eq!(apps[&h.ks.app(app)].version, "1");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_lain_yaml_is_rejected_with_every_error() {
    let h = start("cp-invalid").await;
    let err = h
        .engine
        .register(
            "bad.yaml",
            "appname: bad\nweb:\n  memory: lots\n  cpu: 99\n",
        )
        .await
        .unwrap_err();
    match err {
        EngineError::Invalid(errs) => {
            assert_eq!(errs.len(), 2, "{errs:?}");
            assert_eq!((errs[0].line, errs[0].key.as_str()), (3, "web.memory"));
            assert_eq!((errs[1].line, errs[1].key.as_str()), (4, "web.cpu"));
        }
        other => panic!("expected Invalid, got {other}"),
    }
    assert!(matches!(
        h.engine.deploy("bad", "1", IMAGE).await,
        Err(EngineError::NoApp(_))
    ));
    assert!(h.range::<AppRecord>(Kind::App).await.is_empty());

    // A stream port is the cluster's: a second app cannot claim one another app holds,
    // while the holder may register again.
    let with_port = |app: &str| format!("appname: {app}\nworker.tcp:\n  ports: [9500]\n");
    h.engine
        .register("lain.yaml", &with_port("first"))
        .await
        .unwrap();
    let err = h
        .engine
        .register("lain.yaml", &with_port("second"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, EngineError::Bad(m) if m.contains("9500") && m.contains("first.")),
        "{err}"
    );
    h.engine
        .register("lain.yaml", &with_port("first"))
        .await
        .unwrap();
    let apps = h.range::<AppRecord>(Kind::App).await;
    assert_eq!(apps.len(), 1, "{apps:?}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_engine_adopts_its_containers_and_rolls_forward() {
    let mut h = start("cp-adopt").await;
    let app = "adopted";
    let before = h.deploy_v1(app, &web_app(app, 2), 2).await;
    let ids: BTreeSet<String> = before.iter().map(|e| e.container_id.clone()).collect();

    // Stop the engine and start a new one on the same prefix: nothing is duplicated.
    h.shutdown.trigger();
    let _ = (&mut h.task).await;
    let (engine, task, shutdown) = spawn_engine(&h.settings, &h.etcd, &h.nodes).await;
    h.engine = engine;
    h.task = task;
    h.shutdown = shutdown;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = h.wait_serving(app, 2, "1").await;
    let ids_after: BTreeSet<String> = after.iter().map(|e| e.container_id.clone()).collect();
    assert_eq!(
        ids, ids_after,
        "the new engine adopted the running containers"
    );
    assert_eq!(h.containers().await.len(), 2);

    // A surge-first rolling update to version 2 replaces both and records the deploy.
    h.engine.deploy(app, "2", IMAGE).await.unwrap();
    h.wait_serving(app, 2, "2").await;
    eventually(Duration::from_secs(30), "old containers gone", || async {
        let c = h.containers().await;
        (c.len() == 2
            && c.iter()
                .all(|c| c.3.get("lain.version").map(String::as_str) == Some("2")))
        .then_some(())
    })
    .await;
    let deploys = h.engine.deploys(app).await.unwrap();
    assert_eq!(deploys.len(), 2, "{deploys:?}");
    assert_eq!(deploys[1].outcome, "succeeded");

    // A rollback is a deploy of the earlier version.
    assert_eq!(h.engine.rollback(app).await.unwrap(), "1");
    h.wait_serving(app, 2, "1").await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_record_the_engine_cannot_read_leaves_the_app_running() {
    let mut h = start("cp-unreadable").await;
    let app = "future";
    let before = h.deploy_v1(app, &web_app(app, 2), 2).await;

    // The engine stops; the app's record is rewritten in a schema this release does not
    // know (as a newer release would write it), and an engine starts on it.
    h.shutdown.trigger();
    let _ = (&mut h.task).await;
    let key = h.ks.app(app);
    let mut kv = h.etcd.kv_client();
    let stored = kv.get(key.as_str(), None).await.unwrap();
    let mut record: serde_json::Value = serde_json::from_slice(stored.kvs()[0].value()).unwrap();
    record["v"] = serde_json::json!(99);
    let future = serde_json::to_vec(&record).unwrap();
    kv.put(key.as_str(), future.clone(), None).await.unwrap();
    let (engine, task, shutdown) = spawn_engine(&h.settings, &h.etcd, &h.nodes).await;
    h.engine = engine;
    h.task = task;
    h.shutdown = shutdown;

    // Many passes later, the app is as it was: its containers run, its endpoints and its
    // record are still published.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let running = h.containers().await.iter().filter(|c| c.2).count();
    assert_eq!(running, 2, "{:?}", h.containers().await);
    let after = h.endpoints(app).await;
    assert_eq!(after.len(), before.len(), "{after:?}");
    let stored = kv.get(key.as_str(), None).await.unwrap();
    assert_eq!(stored.kvs()[0].value(), future.as_slice());

    // Removing it hands it to the usual clean-up.
    h.engine.remove_app(app).await.unwrap();
    eventually(
        Duration::from_secs(30),
        "the app's containers gone",
        || async { (h.containers().await.is_empty()).then_some(()) },
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "the app's endpoints gone",
        || async { h.endpoints(app).await.is_empty().then_some(()) },
    )
    .await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_honours_filters_and_reports_pending() {
    let h = start("cp-place").await;
    let app = "placed";
    let yaml = "appname: placed\n\
                worker.ssd:\n  cmd: [\"/bin/busybox\", \"sleep\", \"600\"]\n  num_instances: 2\n  filters: [disk==ssd]\n\
                worker.none:\n  cmd: [\"/bin/busybox\", \"sleep\", \"600\"]\n  filters: [disk==nvme]\n";
    h.engine.register("lain.yaml", yaml).await.unwrap();
    h.engine.deploy(app, "1", IMAGE).await.unwrap();
    let inst = eventually(Duration::from_secs(30), "ssd workers running", || async {
        let inst = h.engine.instances(app).await.ok()?;
        let ssd: Vec<_> = inst
            .iter()
            .filter(|i| i.proc_name == "ssd" && i.healthy)
            .collect();
        (ssd.len() == 2).then_some(inst)
    })
    .await;
    for i in inst.iter().filter(|i| i.proc_name == "ssd") {
        assert_eq!(i.node.as_deref(), Some("node1"), "{i:?}");
    }
    let none = inst.iter().find(|i| i.proc_name == "none").unwrap();
    assert!(none.node.is_none());
    assert!(
        none.pending
            .as_deref()
            .unwrap_or("")
            .contains("no node fits"),
        "{none:?}"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_a_node_moves_its_instances() {
    let h = start("cp-drain").await;
    let app = "mover";
    let eps = h.deploy_v1(app, &web_app(app, 2), 2).await;
    let on2 = eps
        .iter()
        .find(|e| e.node == "node2")
        .expect("spread onto node2")
        .clone();
    // While the node drains, every instance stays published: the one on node2 serves
    // until its replacement on node1 does.
    let moved = std::sync::atomic::AtomicBool::new(false);
    let watch = async {
        let mut fewest = usize::MAX;
        while !moved.load(std::sync::atomic::Ordering::Relaxed) {
            fewest = fewest.min(h.endpoints(app).await.len());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        fewest
    };
    let drain = async {
        h.engine.drain_node("node2").await.unwrap();
        let nodes = h.range::<NodeRecord>(Kind::Node).await;
        assert_eq!(
            nodes[&h.ks.node("node2")].state,
            lain_state::NodeState::Draining
        );
        eventually(Duration::from_secs(30), "everything on node1", || async {
            let eps = h.endpoints(app).await;
            (eps.len() == 2 && eps.iter().all(|e| e.node == "node1")).then_some(())
        })
        .await;
        moved.store(true, std::sync::atomic::Ordering::Relaxed);
    };
    let (fewest, ()) = futures::join!(watch, drain);
    assert_eq!(
        fewest, 2,
        "an instance was unpublished while its node drained"
    );
    h.wait_serving(app, 2, "1").await;
    let kinds = h.event_kinds(app).await;
    assert!(kinds.iter().any(|k| k == "rescheduled"), "{kinds:?}");
    let moved = h
        .containers()
        .await
        .into_iter()
        .find(|c| c.3.get("lain.instance") == Some(&on2.instance.to_string()))
        .unwrap();
    assert!(
        moved.0.ends_with("-d1"),
        "a moved instance's drift grows: {}",
        moved.0
    );
    h.stop().await;
}

/// A steady instance is probed once per `probe_interval`, not on every reconcile pass: each
/// probe is a request the app serves and usually logs (it was four a second, one per pass).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steady_instance_is_probed_once_per_interval() {
    use futures::StreamExt;
    let h = start("cp-probe").await;
    assert_eq!(h.settings.tick, Duration::from_millis(250));
    assert_eq!(h.settings.probe_interval, Duration::from_secs(1));
    let app = "probed";
    // busybox httpd -vv writes one line per request to stderr, which Docker keeps.
    let yaml = format!(
        "appname: {app}\nweb:\n  cmd: [\"/bin/busybox\", \"sh\", \"-c\", \
         \"mkdir -p /tmp/www && echo ok > /tmp/www/healthz && exec /bin/busybox httpd -f -vv -p $PORT -h /tmp/www\"]\n  \
         num_instances: 1\n  memory: 32m\n  healthcheck: /healthz\n"
    );
    h.engine.register("lain.yaml", &yaml).await.unwrap();
    h.engine.deploy(app, "1", IMAGE).await.unwrap();
    h.wait_serving(app, 1, "1").await;
    eventually(Duration::from_secs(30), "the instance healthy", || async {
        h.endpoints(app)
            .await
            .first()
            .is_some_and(|e| e.healthy)
            .then_some(())
    })
    .await;
    let (_, id, _, _) = h
        .containers()
        .await
        .into_iter()
        .next()
        .expect("a container");
    let probes = || async {
        for d in &h.docker {
            let opts = bollard::query_parameters::LogsOptionsBuilder::new()
                .stdout(true)
                .stderr(true)
                .build();
            let chunks: Vec<_> = d.logs(&id, Some(opts)).collect().await;
            if chunks.first().is_some_and(|c| c.is_err()) {
                continue;
            }
            let text: String = chunks
                .into_iter()
                .filter_map(Result::ok)
                .map(|c| String::from_utf8_lossy(&c.into_bytes()).into_owned())
                .collect();
            return text.matches("url:/healthz").count();
        }
        panic!("container {id} is on no engine");
    };
    let before = probes().await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let during = probes().await - before;
    // One a second, fewer if passes are slow under load; it was about 24, one per pass.
    assert!(
        (1..=8).contains(&during),
        "{during} probes of a steady instance in 6 s"
    );
    h.stop().await;
}

/// A scaled-down instance leaves the published endpoints before it is stopped, so the
/// proxies stop sending to it first. The app here exits at once on SIGTERM, so the stop's
/// timing shows in when it dies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scaled_down_instance_is_withdrawn_before_it_stops() {
    use futures::StreamExt;
    let h = start("cp-withdraw").await;
    let app = "withdrawn";
    let yaml = format!(
        "appname: {app}\nweb:\n  cmd: [\"/bin/busybox\", \"sh\", \"-c\", \
         \"trap 'exit 0' TERM; /bin/busybox httpd -f -p $PORT -h /tmp & wait\"]\n  \
         num_instances: 2\n  memory: 32m\n  kill_timeout: 10\n"
    );
    let eps = h.deploy_v1(app, &yaml, 2).await;
    let second = eps.iter().find(|e| e.instance == 2).unwrap().clone();

    // Watch both: the endpoint's key in etcd, and the container's death on every engine.
    let key = h.ks.endpoint(app, "web", 2);
    let mut watch = h
        .etcd
        .watch_client()
        .watch(key.as_str(), None)
        .await
        .unwrap();
    let (died_tx, mut died_rx) = tokio::sync::mpsc::unbounded_channel();
    for d in &h.docker {
        let filters = std::collections::HashMap::from([
            ("container".to_string(), vec![second.container_id.clone()]),
            ("event".to_string(), vec!["die".to_string()]),
        ]);
        let mut events = d.events(Some(bollard::query_parameters::EventsOptions {
            filters: Some(filters),
            ..Default::default()
        }));
        let tx = died_tx.clone();
        tokio::spawn(async move {
            if let Some(Ok(_)) = events.next().await {
                let _ = tx.send(std::time::Instant::now());
            }
        });
    }

    h.engine.scale(app, "web", 1).await.unwrap();
    let withdrawn = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let resp = watch
                .message()
                .await
                .unwrap()
                .expect("the watch stays open");
            if resp
                .events()
                .iter()
                .any(|e| e.event_type() == etcd_client::EventType::Delete)
            {
                return std::time::Instant::now();
            }
        }
    })
    .await
    .expect("the endpoint withdrawn");
    let died = tokio::time::timeout(Duration::from_secs(30), died_rx.recv())
        .await
        .expect("the container stopped")
        .unwrap();
    assert!(
        died >= withdrawn + Duration::from_millis(500),
        "the container died {:?} after its endpoint was withdrawn",
        died.checked_duration_since(withdrawn)
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_node_stops_its_containers_and_moves_its_instances() {
    let h = start("cp-remove-node").await;
    let app = "evicted";
    let eps = h.deploy_v1(app, &web_app(app, 2), 2).await;
    assert!(eps.iter().any(|e| e.node == "node2"), "{eps:?}");
    let on_node2 = || async {
        let filters = std::collections::HashMap::from([(
            "label",
            vec![format!("lain.cluster={}", h.ks.prefix())],
        )]);
        let opts = bollard::query_parameters::ListContainersOptionsBuilder::new()
            .all(true)
            .filters(&filters)
            .build();
        h.docker[1].list_containers(Some(opts)).await.unwrap().len()
    };
    assert_eq!(on_node2().await, 1);
    h.engine.remove_node("node2").await.unwrap();
    // The node's container does not run on, unmanaged, beside its replacement.
    eventually(
        Duration::from_secs(30),
        "node2's container gone",
        || async { (on_node2().await == 0).then_some(()) },
    )
    .await;
    eventually(
        Duration::from_secs(30),
        "both instances on node1",
        || async {
            let eps = h.endpoints(app).await;
            (eps.len() == 2 && eps.iter().all(|e| e.node == "node1")).then_some(())
        },
    )
    .await;
    h.stop().await;
}
