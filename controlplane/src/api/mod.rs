//! The HTTP API of `lain controlplane` (docs/api.md): an axum router over etcd and the
//! engine, with bearer-token auth, an audit log, encrypted secrets and an OpenAPI document
//! generated from the handlers.
//!
//! Every replica serves the API. Only the leader holds the [`Engine`]; a standby answers
//! plain etcd reads itself and forwards everything else to the leader, whose API address
//! is the value it campaigned with (see [`ElectionValue`]).

pub mod auth;
pub mod error;
mod forward;
mod handlers;
pub mod types;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use etcd_client::Client;
use lain_common::Shutdown;
use lain_state::Keyspace;
use serde::{Deserialize, Serialize};

use crate::engine::Engine;
use crate::secrets::SecretBox;
pub use error::ApiError;

/// The largest request body accepted.
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// The largest lain.yaml accepted.
pub const MAX_LAIN_YAML_BYTES: usize = 256 << 10;
/// Marks a request a standby forwarded, so that it is never forwarded twice.
pub const FORWARDED_HEADER: &str = "x-lain-forwarded";

/// What a replica campaigns with: its id and where its API is reached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ElectionValue {
    /// The replica's id.
    pub id: String,
    /// The base URL of its API, e.g. `http://127.0.0.1:7001`.
    pub api: String,
}

/// The state every handler shares.
#[derive(Clone)]
pub struct ApiState {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    ks: Keyspace,
    cluster_domains: Vec<String>,
    engine: RwLock<Option<Engine>>,
    leading: Arc<AtomicBool>,
    secrets: Option<SecretBox>,
    http: reqwest::Client,
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState")
            .field("ks", &self.inner.ks)
            .field("leading", &self.inner.leading.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl ApiState {
    /// State for a replica; `leading` is shared with the election.
    pub fn new(
        client: Client,
        ks: Keyspace,
        cluster_domains: Vec<String>,
        leading: Arc<AtomicBool>,
        secrets: Option<SecretBox>,
    ) -> ApiState {
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(60))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default();
        ApiState {
            inner: Arc::new(Inner {
                client,
                ks,
                cluster_domains,
                engine: RwLock::new(None),
                leading,
                secrets,
                http,
            }),
        }
    }

    /// Hands the engine to the API once this replica leads, or takes it away.
    pub fn set_engine(&self, engine: Option<Engine>) {
        if let Ok(mut e) = self.inner.engine.write() {
            *e = engine;
        }
    }

    fn leading(&self) -> bool {
        self.inner.leading.load(Ordering::Relaxed)
    }

    fn engine(&self) -> Result<Engine, ApiError> {
        self.inner
            .engine
            .read()
            .ok()
            .and_then(|e| e.clone())
            .ok_or_else(|| ApiError::unavailable("no leading control plane yet; retry shortly"))
    }
}

/// The router of the whole API.
pub fn router(state: ApiState) -> Router {
    let v1 = handlers::v1_routes()
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .route("/healthz", axum::routing::get(handlers::healthz))
        .route("/openapi.json", axum::routing::get(handlers::openapi_json))
        .nest("/api/v1", v1)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            forward::forward,
        ))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route; see /openapi.json")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take that method; see /openapi.json",
    )
}

/// Authenticates every `/api/v1` request and writes the audit entry of each mutating one.
async fn authenticate(State(state): State<ApiState>, mut req: Request, next: Next) -> Response {
    let caller = match auth::authenticate(&state.inner.client, &state.inner.ks, req.headers()).await
    {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let method = req.method().clone();
    // Inside the nested router the URI lacks the `/api/v1` prefix; the audit log records
    // the path as the client sent it.
    let path = req
        .extensions()
        .get::<axum::extract::OriginalUri>()
        .map(|u| u.path().to_string())
        .unwrap_or_else(|| req.uri().path().to_string());
    req.extensions_mut().insert(caller.clone());
    let resp = next.run(req).await;
    if method != Method::GET
        && method != Method::HEAD
        && method != Method::OPTIONS
        && let Err(e) = auth::audit(
            &state.inner.client,
            &state.inner.ks,
            &caller.user,
            method.as_str(),
            &path,
            resp.status().as_u16(),
        )
        .await
    {
        tracing::error!(user = %caller.user, %method, %path, error = %e, "cannot write audit entry");
    }
    resp
}

/// Binds the API listener and serves it until `shutdown`; returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    state: ApiState,
    shutdown: Shutdown,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = router(state);
    tokio::spawn(async move {
        let result = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.wait().await })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "API listener failed");
        }
    });
    Ok(bound)
}

/// The OpenAPI document of the API.
pub fn openapi() -> utoipa::openapi::OpenApi {
    handlers::openapi()
}
