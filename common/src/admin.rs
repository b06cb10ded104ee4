//! The admin listener every component runs: `/metrics` (Prometheus text format),
//! `/healthz`, and whatever read-only pages a component adds (such as the proxy's `/routes`).
//!
//! It is a separate listener from the traffic a component serves, so that scraping and
//! probing never compete with, or are exposed as, user traffic.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::net::TcpListener;

use crate::shutdown::Shutdown;

/// A page the admin listener serves: returns status, content type and body.
pub type Page = Arc<dyn Fn() -> (StatusCode, &'static str, String) + Send + Sync>;

/// A health probe: `Ok` while the component can serve, `Err(reason)` otherwise.
pub type HealthProbe = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Builder for the admin listener.
pub struct Admin {
    registry: Registry,
    pages: BTreeMap<String, Page>,
    health: HealthProbe,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("pages", &self.pages.keys())
            .finish()
    }
}

impl Admin {
    /// An admin listener exporting `registry`, healthy until told otherwise.
    pub fn new(registry: Registry) -> Admin {
        Admin {
            registry,
            pages: BTreeMap::new(),
            health: Arc::new(|| Ok(())),
        }
    }

    /// Adds a page at `path`.
    pub fn page(mut self, path: &str, page: Page) -> Admin {
        self.pages.insert(path.to_string(), page);
        self
    }

    /// Sets the probe `/healthz` reports.
    pub fn health(mut self, probe: HealthProbe) -> Admin {
        self.health = probe;
        self
    }

    /// Binds `addr` (port 0 picks a free port) and serves until `shutdown`.
    /// Returns the bound address.
    pub async fn serve(self, addr: SocketAddr, shutdown: Shutdown) -> std::io::Result<SocketAddr> {
        let listener = TcpListener::bind(addr).await?;
        self.serve_on(listener, shutdown)
    }

    /// Serves on a listener the caller bound (or inherited) until `shutdown`.
    /// Returns its address.
    pub fn serve_on(
        self,
        listener: TcpListener,
        shutdown: Shutdown,
    ) -> std::io::Result<SocketAddr> {
        let local = listener.local_addr()?;
        let state = Arc::new(self);
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = shutdown.wait() => break,
                    a = listener.accept() => a,
                };
                let Ok((stream, _)) = accepted else { continue };
                let state = state.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(state.handle(&req)) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(local)
    }

    fn handle(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path();
        let (status, ctype, body) = match path {
            "/metrics" => {
                let mut buf = Vec::new();
                let families = self.registry.gather();
                match TextEncoder::new().encode(&families, &mut buf) {
                    Ok(()) => (
                        StatusCode::OK,
                        "text/plain; version=0.0.4",
                        String::from_utf8_lossy(&buf).into_owned(),
                    ),
                    Err(e) => (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "text/plain",
                        e.to_string(),
                    ),
                }
            }
            "/healthz" => match (self.health)() {
                Ok(()) => (StatusCode::OK, "text/plain", "ok\n".to_string()),
                Err(reason) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("{reason}\n"),
                ),
            },
            other => match self.pages.get(other) {
                Some(page) => page(),
                None => (
                    StatusCode::NOT_FOUND,
                    "text/plain",
                    "not found\n".to_string(),
                ),
            },
        };
        let mut resp = Response::new(Full::new(Bytes::from(body)));
        *resp.status_mut() = status;
        if let Ok(v) = header::HeaderValue::from_str(ctype) {
            resp.headers_mut().insert(header::CONTENT_TYPE, v);
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::IntCounter;

    #[tokio::test]
    async fn serves_metrics_health_and_pages() {
        let registry = Registry::new();
        let c = IntCounter::new("lain_test_things_total", "things").unwrap();
        registry.register(Box::new(c.clone())).unwrap();
        c.inc_by(7);
        let shutdown = Shutdown::new();
        let addr = Admin::new(registry)
            .page(
                "/routes",
                Arc::new(|| (StatusCode::OK, "application/json", "[]".into())),
            )
            .health(Arc::new(|| Err("no snapshot yet".into())))
            .serve("127.0.0.1:0".parse().unwrap(), shutdown.clone())
            .await
            .unwrap();
        let base = format!("http://{addr}");
        let metrics = reqwest::get(format!("{base}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(metrics.contains("lain_test_things_total 7"), "{metrics}");
        let health = reqwest::get(format!("{base}/healthz")).await.unwrap();
        assert_eq!(health.status(), 503);
        assert_eq!(health.text().await.unwrap(), "no snapshot yet\n");
        let routes = reqwest::get(format!("{base}/routes")).await.unwrap();
        assert_eq!(routes.text().await.unwrap(), "[]");
        assert_eq!(
            reqwest::get(format!("{base}/nope")).await.unwrap().status(),
            404
        );
        shutdown.trigger();
    }
}
