//! The cluster-state watcher against a real etcd: puts and deletes reach the snapshot,
//! a quiet watch stays open, malformed values are skipped and counted, a compacted resume point re-lists, and a
//! three-member cluster losing its leader loses no update.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lain_state::records::{EndpointRecord, RouteRecord, SCHEMA_VERSION, encode};
use lain_state::{
    EtcdConfig, Keyspace, Kind, Snapshot, Source, StateHandle, StateMetrics, Watcher,
};
use lain_test_support::{
    etcd_client, eventually, require_etcd, require_etcd_cluster, unique_prefix,
};

fn route(app: &str, host: &str) -> RouteRecord {
    RouteRecord {
        v: SCHEMA_VERSION,
        host: host.into(),
        path: "/".into(),
        app: app.into(),
        proc_name: "web".into(),
        https_only: false,
        timeouts: Default::default(),
        max_body_bytes: None,
        balance: Default::default(),
        healthcheck: None,
    }
}

fn endpoint(app: &str, instance: u32, port: u16) -> EndpointRecord {
    EndpointRecord {
        v: SCHEMA_VERSION,
        app: app.into(),
        proc_name: "web".into(),
        proc_type: "web".into(),
        instance,
        node: "node1".into(),
        address: "127.0.0.1".parse().unwrap(),
        port,
        ports: Default::default(),
        healthy: true,
        version: "1".into(),
        container_id: String::new(),
    }
}

struct Running {
    handle: StateHandle,
    metrics: StateMetrics,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn start(watcher: Watcher, metrics: StateMetrics) -> Running {
    let handle = watcher.handle();
    let task = tokio::spawn(watcher.run(std::future::pending()));
    Running {
        handle,
        metrics,
        task,
    }
}

fn watch(endpoints: Vec<String>, prefix: &str) -> Running {
    let metrics = StateMetrics::unregistered();
    let w = Watcher::new(
        Source::Etcd(EtcdConfig::new(endpoints, prefix)),
        metrics.clone(),
    );
    start(w, metrics)
}

async fn wait_for(handle: &StateHandle, what: &str, check: impl Fn(&Snapshot) -> bool) {
    eventually(Duration::from_secs(15), what, || {
        let ok = check(&handle.load());
        async move { ok.then_some(()) }
    })
    .await
}

/// Puts instance 1 of `app`'s endpoint and waits for the watcher to publish it, which must
/// take less than a second; returns its key.
async fn put_endpoint_quickly(
    client: &mut etcd_client::Client,
    w: &Running,
    ks: &Keyspace,
    app: &str,
) -> String {
    let key = ks.endpoint(app, "web", 1);
    let t0 = Instant::now();
    client
        .put(key.clone(), encode(&endpoint(app, 1, 8080)), None)
        .await
        .unwrap();
    wait_for(&w.handle, "endpoint put", |s| {
        s.endpoints.contains_key(&key)
    })
    .await;
    let latency = t0.elapsed();
    assert!(
        latency < Duration::from_secs(1),
        "propagation took {latency:?}"
    );
    key
}

#[tokio::test]
async fn put_and_delete_reach_the_snapshot_quickly() {
    let endpoints = require_etcd();
    let prefix = unique_prefix("watch-put");
    let ks = Keyspace::new(&prefix);
    let mut client = etcd_client(&endpoints).await;
    // A key written before the watcher starts arrives through the initial list.
    client
        .put(
            ks.app_ranges("a")[0].clone() + "x",
            "ignored-not-a-valid-key-shape",
            None,
        )
        .await
        .ok();
    client
        .put(
            ks.route("a", "web", "a.lain", "/"),
            encode(&route("a", "a.lain")),
            None,
        )
        .await
        .unwrap();
    let w = watch(endpoints.clone(), &prefix);
    assert!(
        w.handle.wait_ready(Duration::from_secs(10)).await,
        "watcher never listed"
    );
    assert_eq!(w.handle.load().routes.len(), 1);

    // A key written afterwards arrives through the watch, within milliseconds.
    let key = put_endpoint_quickly(&mut client, &w, &ks, "a").await;
    let snap = w.handle.load();
    assert_eq!(snap.endpoints[&key].value.port, 8080);
    assert!(snap.revision > 0);

    client.delete(key.clone(), None).await.unwrap();
    wait_for(&w.handle, "endpoint delete", |s| {
        !s.endpoints.contains_key(&key)
    })
    .await;
    client
        .delete(
            prefix.clone(),
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        )
        .await
        .unwrap();
}

/// etcd closes the connection of a client that pings more often than its minimum ping
/// interval (5 s) three times without data in between; a watch on a quiet cluster must
/// survive that long and longer, and still deliver the next change at once.
#[tokio::test]
async fn a_quiet_watch_stays_open() {
    let endpoints = require_etcd();
    let prefix = unique_prefix("watch-quiet");
    let ks = Keyspace::new(&prefix);
    let w = watch(endpoints.clone(), &prefix);
    assert!(
        w.handle.wait_ready(Duration::from_secs(10)).await,
        "watcher never listed"
    );
    // Three of etcd's minimum ping intervals and then some: with pings every 2 s the watch
    // was cut after about 8 s.
    tokio::time::sleep(Duration::from_secs(17)).await;
    assert_eq!(
        w.metrics.reconnect_count(),
        0,
        "the watch was lost while nothing changed"
    );
    let mut client = etcd_client(&endpoints).await;
    put_endpoint_quickly(&mut client, &w, &ks, "q").await;
    assert_eq!(w.metrics.reconnect_count(), 0);
    client
        .delete(
            prefix.clone(),
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn malformed_values_are_skipped_counted_and_the_rest_applied() {
    let endpoints = require_etcd();
    let prefix = unique_prefix("watch-bad");
    let ks = Keyspace::new(&prefix);
    let mut client = etcd_client(&endpoints).await;
    let w = watch(endpoints.clone(), &prefix);
    assert!(w.handle.wait_ready(Duration::from_secs(10)).await);

    let good = ks.endpoint("b", "web", 1);
    let bad = ks.endpoint("b", "web", 2);
    client
        .put(good.clone(), encode(&endpoint("b", 1, 9000)), None)
        .await
        .unwrap();
    client
        .put(bad.clone(), b"{not json".to_vec(), None)
        .await
        .unwrap();
    client
        .put(
            format!("{}state/nonsense/x", ks.prefix().to_string() + "/"),
            "1",
            None,
        )
        .await
        .unwrap();
    let route_key = ks.route("b", "web", "b.lain", "/");
    client
        .put(route_key.clone(), encode(&route("b", "b.lain")), None)
        .await
        .unwrap();
    wait_for(&w.handle, "the route after the bad values", |s| {
        s.routes.contains_key(&route_key)
    })
    .await;
    let snap = w.handle.load();
    assert!(snap.endpoints.contains_key(&good));
    assert!(!snap.endpoints.contains_key(&bad));
    assert_eq!(w.metrics.invalid_count(Some(Kind::Endpoint)), 1);
    assert_eq!(w.metrics.invalid_count(None), 1);

    // A bad overwrite keeps the last good value in place.
    client
        .put(good.clone(), b"[]".to_vec(), None)
        .await
        .unwrap();
    client
        .put(
            ks.app("marker"),
            br#"{"v":1,"name":"marker"}"#.to_vec(),
            None,
        )
        .await
        .unwrap();
    wait_for(&w.handle, "marker app", |s| s.apps.len() == 1).await;
    assert_eq!(w.handle.load().endpoints[&good].value.port, 9000);
    assert_eq!(w.metrics.invalid_count(Some(Kind::Endpoint)), 2);
    client
        .delete(
            prefix.clone(),
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn a_compacted_resume_point_is_recovered_by_relisting() {
    let endpoints = require_etcd();
    let prefix = unique_prefix("watch-compact");
    let ks = Keyspace::new(&prefix);
    let mut client = etcd_client(&endpoints).await;
    let stale = ks.endpoint("c", "web", 1);
    let put = client
        .put(stale.clone(), encode(&endpoint("c", 1, 1000)), None)
        .await
        .unwrap();
    let old_revision = put.header().unwrap().revision();
    client.delete(stale.clone(), None).await.unwrap();
    let fresh = ks.endpoint("c", "web", 2);
    let put = client
        .put(fresh.clone(), encode(&endpoint("c", 2, 2000)), None)
        .await
        .unwrap();
    client
        .compact(put.header().unwrap().revision(), None)
        .await
        .unwrap();

    // A watcher that believes it saw everything up to `old_revision` (as a process restarted
    // from a cached snapshot would) cannot resume there any more and must list again.
    let mut cached = Snapshot::default();
    cached
        .apply(
            &ks,
            lain_state::snapshot::Change::Put {
                key: &stale,
                value: &encode(&endpoint("c", 1, 1000)),
                create_revision: old_revision,
                mod_revision: old_revision,
            },
        )
        .unwrap();
    cached.revision = old_revision;
    let metrics = StateMetrics::unregistered();
    let w = Watcher::new(
        Source::Etcd(EtcdConfig::new(endpoints, &prefix)),
        metrics.clone(),
    )
    .starting_from(cached);
    let w = start(w, metrics);
    wait_for(&w.handle, "relisted state", |s| {
        s.endpoints.contains_key(&fresh) && !s.endpoints.contains_key(&stale)
    })
    .await;
    assert_eq!(w.metrics.relists.get(), 1);
    client
        .delete(
            prefix.clone(),
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        )
        .await
        .unwrap();
}

fn etcd_script(args: &[&str]) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/services/etcd.sh");
    let out = Command::new("bash")
        .arg(script)
        .args(args)
        .output()
        .expect("run etcd.sh");
    assert!(
        out.status.success(),
        "etcd.sh {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Restarts the killed member even when the test fails, so later tests find a whole cluster.
struct RestartMember(String);

impl Drop for RestartMember {
    fn drop(&mut self) {
        etcd_script(&["start-member", &self.0]);
    }
}

#[tokio::test]
async fn no_update_is_lost_while_the_leader_of_three_members_is_killed() {
    let endpoints = require_etcd_cluster();
    assert_eq!(
        endpoints.len(),
        3,
        "LAIN_ETCD_CLUSTER should list three members"
    );
    let prefix = unique_prefix("watch-failover");
    let ks = Keyspace::new(&prefix);
    let w = watch(endpoints.clone(), &prefix);
    assert!(w.handle.wait_ready(Duration::from_secs(10)).await);
    let mut writer = etcd_client(&endpoints).await;
    let first = ks.endpoint("d", "web", 1);
    writer
        .put(first.clone(), encode(&endpoint("d", 1, 10001)), None)
        .await
        .unwrap();
    wait_for(&w.handle, "first endpoint", |s| {
        s.endpoints.contains_key(&first)
    })
    .await;

    let leader = etcd_script(&["leader"]);
    let guard = RestartMember(leader.clone());
    etcd_script(&["kill-member", &leader]);

    // Write a numbered series while the cluster elects a new leader; every write is retried
    // until etcd acknowledges it, bounded in time.
    let total = 40u32;
    let deadline = Instant::now() + Duration::from_secs(60);
    let served = Arc::new(std::sync::atomic::AtomicBool::new(true));
    for n in 2..=total + 1 {
        let key = ks.endpoint("d", "web", n);
        loop {
            assert!(Instant::now() < deadline, "etcd never accepted write {n}");
            let put = tokio::time::timeout(
                Duration::from_secs(3),
                writer.put(
                    key.clone(),
                    encode(&endpoint("d", n, 10000 + n as u16)),
                    None,
                ),
            )
            .await;
            if matches!(put, Ok(Ok(_))) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The data plane keeps serving its last snapshot throughout.
        if !w.handle.load().endpoints.contains_key(&first) {
            served.store(false, std::sync::atomic::Ordering::Relaxed);
        }
    }
    wait_for(&w.handle, "every endpoint written during failover", |s| {
        (1..=total + 1).all(|n| s.endpoints.contains_key(&ks.endpoint("d", "web", n)))
    })
    .await;
    assert!(
        served.load(std::sync::atomic::Ordering::Relaxed),
        "snapshot lost a record during failover"
    );
    drop(guard);
    // The client balances over all members and may still pick the one just restarting, so
    // the clean-up is retried like the writes above.
    let deadline = Instant::now() + Duration::from_secs(30);
    while writer
        .delete(
            prefix.clone(),
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        )
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "could not clean up {prefix}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
