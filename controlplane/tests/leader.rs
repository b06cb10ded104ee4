//! Leader election against real etcd: a leader whose connection to etcd goes silent
//! without closing steps down before its lease can expire.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use lain_common::Shutdown;
use lain_state::Keyspace;
use lain_test_support::{require_etcd, unique_prefix};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A TCP relay to `upstream` that can be frozen: it then stops passing bytes either way
/// but keeps every connection open, as a network that drops packets does.
async fn freezable_relay(upstream: SocketAddr) -> (SocketAddr, Arc<AtomicBool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let frozen = Arc::new(AtomicBool::new(false));
    let f = frozen.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(upstream).await else {
                continue;
            };
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::spawn(pump(cr, sw, f.clone()));
            tokio::spawn(pump(sr, cw, f.clone()));
        }
    });
    (addr, frozen)
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if frozen.load(Ordering::Relaxed) {
            // Hold the connection, pass nothing, for at most a minute.
            tokio::time::sleep(Duration::from_secs(60)).await;
            return;
        }
        match tokio::time::timeout(Duration::from_millis(50), from.read(&mut buf)).await {
            Err(_) => continue,
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(n)) => {
                if frozen.load(Ordering::Relaxed) {
                    continue;
                }
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_etcd_steps_down_before_its_lease_expires() {
    let endpoints = require_etcd();
    let etcd: SocketAddr = endpoints[0]
        .trim_start_matches("http://")
        .parse()
        .expect("an ip:port etcd endpoint");
    let (relay, frozen) = freezable_relay(etcd).await;
    let client = etcd_client::Client::connect([format!("http://{relay}")], None)
        .await
        .unwrap();
    let ks = Keyspace::new(&unique_prefix("leader-cut"));
    let ttl = Duration::from_secs(3);
    let shutdown = Shutdown::new();
    let leadership = lain_controlplane::leader::campaign(&client, &ks, "one", ttl, &shutdown)
        .await
        .unwrap()
        .expect("elected");
    // Heartbeats pass for a while.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!leadership.lost.is_triggered());
    frozen.store(true, Ordering::Relaxed);
    let cut = Instant::now();
    tokio::time::timeout(ttl, leadership.lost.wait())
        .await
        .expect("the leader stepped down within the lease's TTL");
    assert!(
        cut.elapsed() < ttl,
        "stepped down after {:?}",
        cut.elapsed()
    );
}
