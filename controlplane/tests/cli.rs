//! `lain controlplane` as a process: config checking, and a run that registers its nodes
//! and serves the admin listener.

use std::time::Duration;

use etcd_client::GetOptions;
use lain_state::{Keyspace, Kind};
use lain_test_support::{
    LainProcess, eventually, require_docker_nodes, require_etcd, run_lain, temp_dir, unique_prefix,
};

#[test]
fn check_config_exits_0_or_64_with_every_error() {
    let dir = temp_dir();
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "etcd_endpoints = [\"http://127.0.0.1:2379\"]\ncluster_domains = [\"lain.local\"]\nvolume_root = \"/tmp/v\"\n",
    )
    .unwrap();
    let (code, _, err) = run_lain(
        &[
            "controlplane",
            "-c",
            good.to_str().unwrap(),
            "--check-config",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "etcd_endpoints = []\ncluster_domains = [\"lain.local\"]\nvolume_root = \"rel\"\nbogus = 1\n",
    )
    .unwrap();
    let (code, _, err) = run_lain(
        &[
            "controlplane",
            "-c",
            bad.to_str().unwrap(),
            "--check-config",
        ],
        None,
    );
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("bogus"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_with_admin_listener_and_registers_nodes() {
    let etcd = require_etcd();
    let nodes = require_docker_nodes();
    let prefix = unique_prefix("cp-cli");
    let dir = temp_dir();
    let cfg = dir.path().join("cp.toml");
    let mut text = format!(
        "etcd_endpoints = [{}]\nprefix = \"{prefix}\"\ncluster_domains = [\"lain.local\"]\nvolume_root = \"{}\"\nadmin_listen = \"127.0.0.1:0\"\n",
        etcd.iter()
            .map(|e| format!("\"{e}\""))
            .collect::<Vec<_>>()
            .join(", "),
        dir.path().join("volumes").display()
    );
    for (i, n) in nodes.iter().enumerate() {
        text.push_str(&format!(
            "[[nodes]]\nname = \"node{}\"\ndocker_host = \"{n}\"\n",
            i + 1
        ));
    }
    std::fs::write(&cfg, text).unwrap();
    let mut p = LainProcess::spawn(
        &["controlplane", "-c", cfg.to_str().unwrap()],
        &[],
        &["admin"],
    );
    let admin = p.addr("admin");
    let client = lain_test_support::etcd_client(&etcd).await;
    let ks = Keyspace::new(&prefix);
    eventually(Duration::from_secs(20), "node records", || {
        let mut kv = client.kv_client();
        let prefix = ks.kind_prefix(Kind::Node);
        let want = nodes.len();
        async move {
            let r = kv
                .get(prefix, Some(GetOptions::new().with_prefix()))
                .await
                .ok()?;
            (r.kvs().len() == want).then_some(())
        }
    })
    .await;
    let metrics = eventually(Duration::from_secs(10), "metrics", || async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(admin).await.ok()?;
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await.ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).await.ok()?;
        body.contains("lain_controlplane_reconcile_passes_total")
            .then_some(body)
    })
    .await;
    assert!(metrics.contains("result=\"ok\""), "{metrics}");
    assert!(
        p.terminate(Duration::from_secs(10))
            .is_some_and(|s| s.success())
    );
    let _ = client
        .kv_client()
        .delete(
            ks.prefix(),
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        )
        .await;
}

async fn leader_page(admin: std::net::SocketAddr) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(admin).await.ok()?;
    s.write_all(b"GET /leader HTTP/1.0\r\n\r\n").await.ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).await.ok()?;
    body.lines().last().map(|l| l.trim().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_when_the_leader_is_killed() {
    let etcd = require_etcd();
    let prefix = unique_prefix("cp-ha");
    let dir = temp_dir();
    let cfg = dir.path().join("cp.toml");
    std::fs::write(
        &cfg,
        format!(
            "etcd_endpoints = [\"{}\"]\nprefix = \"{prefix}\"\ncluster_domains = [\"lain.local\"]\nvolume_root = \"{}\"\nelection_ttl_secs = 2\n",
            etcd[0],
            dir.path().display()
        ),
    )
    .unwrap();
    let args = ["controlplane", "-c", cfg.to_str().unwrap()];
    let mut a = LainProcess::spawn(&args, &[], &["admin"]);
    eventually(Duration::from_secs(10), "a leader", || async {
        (leader_page(a.addr("admin")).await? == "leader").then_some(())
    })
    .await;
    let mut b = LainProcess::spawn(&args, &[], &["admin"]);
    // The second replica stays standby while the first one lives.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        leader_page(b.addr("admin")).await.as_deref(),
        Some("standby")
    );
    let started = std::time::Instant::now();
    a.kill();
    eventually(Duration::from_secs(10), "the standby to lead", || async {
        (leader_page(b.addr("admin")).await? == "leader").then_some(())
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "took over in {:?}",
        started.elapsed()
    );
    b.terminate(Duration::from_secs(10));
    let client = lain_test_support::etcd_client(&etcd).await;
    let ks = Keyspace::new(&prefix);
    let _ = client
        .kv_client()
        .delete(
            ks.prefix(),
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        )
        .await;
}
