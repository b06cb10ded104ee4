//! Active HTTP health checks of the endpoints of procs whose routes declare a `healthcheck`.
//!
//! pingora's load-balancing crate only checks backends registered as background services at
//! start, and lain's pools come and go with etcd, so this module drives its own checks: every
//! tick it walks the current table and probes each endpoint whose interval has passed with a
//! plain `GET`, taking it out after `fall` consecutive failures and back after `rise`
//! consecutive successes (2xx or 3xx). State lives in the shared per-endpoint stats, so it
//! survives table swaps.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use arc_swap::ArcSwap;
use lain_common::Shutdown;
use lain_state::HealthCheck;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::metrics::ProxyMetrics;
use crate::table::RouteTable;
use crate::upstream::{EndpointStats, now_ms};

/// How often the driver looks for due checks.
const TICK: Duration = Duration::from_millis(100);
/// The most response bytes read to find the status line.
const MAX_STATUS_BYTES: usize = 1024;

/// Runs the checks until shutdown.
pub async fn run(table: Arc<ArcSwap<RouteTable>>, metrics: ProxyMetrics, shutdown: Shutdown) {
    let mut tick = tokio::time::interval(TICK);
    loop {
        tokio::select! {
            _ = shutdown.wait() => return,
            _ = tick.tick() => {}
        }
        let t = table.load();
        let now = now_ms();
        for group in t.groups() {
            let (Some(hc), Some(host)) = (group.healthcheck(), group.healthcheck_host()) else {
                continue;
            };
            for ep in &group.endpoints {
                let last = ep.stats.last_check_ms.load(Ordering::Relaxed);
                if last != 0 && now.saturating_sub(last) < hc.interval_ms {
                    continue;
                }
                if ep.stats.checking.swap(true, Ordering::AcqRel) {
                    continue;
                }
                ep.stats.last_check_ms.store(now, Ordering::Relaxed);
                let stats = ep.stats.clone();
                let addr = ep.addr;
                let hc = hc.clone();
                let host: Box<str> = host.into();
                let metrics = metrics.clone();
                tokio::spawn(async move {
                    let ok = probe(addr, &hc, &host).await;
                    apply(&stats, &hc, ok, addr, &metrics);
                    stats.checking.store(false, Ordering::Release);
                });
            }
        }
    }
}

/// Records one probe result, moving the endpoint out or back in on rise/fall.
pub fn apply(
    stats: &EndpointStats,
    hc: &HealthCheck,
    ok: bool,
    addr: SocketAddr,
    m: &ProxyMetrics,
) {
    let down = stats.active_down.load(Ordering::Relaxed);
    if ok != down {
        // The result agrees with the current state: the streak towards a change restarts.
        stats.check_streak.store(0, Ordering::Relaxed);
        return;
    }
    let n = stats.check_streak.fetch_add(1, Ordering::Relaxed) + 1;
    let needed = if down { hc.rise } else { hc.fall };
    if n >= needed {
        stats.check_streak.store(0, Ordering::Relaxed);
        stats.active_down.store(!down, Ordering::Relaxed);
        let direction = if down { "up" } else { "down" };
        m.health_transitions.with_label_values(&[direction]).inc();
        tracing::warn!(endpoint = %addr, direction, "active health check changed endpoint state");
    }
}

/// One `GET` of the check path for `host`; healthy on a 2xx or 3xx status within the
/// interval.
async fn probe(addr: SocketAddr, hc: &HealthCheck, host: &str) -> bool {
    let timeout = Duration::from_millis(hc.interval_ms.clamp(100, 10_000));
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let req = format!(
            "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: lain-proxy-healthcheck\r\nConnection: close\r\n\r\n",
            hc.path
        );
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = Vec::with_capacity(256);
        let mut chunk = [0u8; 256];
        while !buf.windows(2).any(|w| w == b"\r\n") && buf.len() < MAX_STATUS_BYTES {
            let n = s.read(&mut chunk).await.ok()?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        status_code(&buf)
    };
    matches!(
        tokio::time::timeout(timeout, fut).await,
        Ok(Some(200..=399))
    )
}

/// The status code of the status line at the start of `bytes`. Only the line is read: what
/// follows it (a header value in Latin-1, a body cut inside a UTF-8 character) is no concern
/// of a health check.
fn status_code(bytes: &[u8]) -> Option<u16> {
    let end = bytes
        .windows(2)
        .position(|w| w == b"\r\n")
        .unwrap_or(bytes.len());
    let line = std::str::from_utf8(&bytes[..end]).ok()?;
    let mut parts = line.split(' ');
    if !parts.next()?.starts_with("HTTP/") {
        return None;
    }
    let code = parts.next()?;
    if code.len() != 3 {
        return None;
    }
    code.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_line_alone_decides() {
        assert_eq!(
            status_code(b"HTTP/1.1 200 OK\r\nx: \xe9t\xe9\r\n"),
            Some(200)
        );
        // A body cut inside a UTF-8 character by the read.
        let mut cut = b"HTTP/1.1 204 No Content\r\n\r\n".to_vec();
        cut.extend_from_slice(&"\u{5065}\u{5eb7}".as_bytes()[..4]);
        assert_eq!(status_code(&cut), Some(204));
        assert_eq!(status_code(b"HTTP/1.0 503 Busy\r\n"), Some(503));
        assert_eq!(status_code(b"HTTP/1.1 30"), None);
        assert_eq!(status_code(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(status_code(b"HTTP/1.1 2000 OK\r\n"), None);
        assert_eq!(status_code(b"HTTP/1.1 \xff\xfe OK\r\n"), None);
    }

    #[test]
    fn rise_and_fall() {
        let m = ProxyMetrics::unregistered();
        let s = EndpointStats::default();
        let hc = HealthCheck {
            path: "/".into(),
            interval_ms: 10,
            rise: 2,
            fall: 3,
        };
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        apply(&s, &hc, false, a, &m);
        apply(&s, &hc, false, a, &m);
        apply(&s, &hc, true, a, &m);
        assert!(
            !s.active_down.load(Ordering::Relaxed),
            "a success resets the fall streak"
        );
        for _ in 0..3 {
            apply(&s, &hc, false, a, &m);
        }
        assert!(s.active_down.load(Ordering::Relaxed));
        apply(&s, &hc, true, a, &m);
        assert!(s.active_down.load(Ordering::Relaxed));
        apply(&s, &hc, true, a, &m);
        assert!(!s.active_down.load(Ordering::Relaxed));
        assert_eq!(m.health_transitions.with_label_values(&["down"]).get(), 1);
        assert_eq!(m.health_transitions.with_label_values(&["up"]).get(), 1);
    }
}
