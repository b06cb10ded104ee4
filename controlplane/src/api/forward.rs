//! Forwarding from a standby to the leader: a standby answers plain etcd reads itself and
//! passes every other request, body and headers unchanged, to the leader's API.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::{ApiState, ElectionValue, FORWARDED_HEADER, MAX_BODY_BYTES};

/// Whether a standby can answer the request from etcd alone.
fn answered_locally(method: &Method, path: &str) -> bool {
    !path.starts_with("/api/v1/") || (*method == Method::GET && !path.ends_with("/instances"))
}

/// Hop-by-hop headers, which a proxy must not pass on (RFC 9110 section 7.6.1).
fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "te"
            | "trailer"
            | "upgrade"
            | "host"
            | "content-length"
    )
}

/// The middleware: passes the request on locally, or to the leader.
pub(super) async fn forward(State(state): State<ApiState>, req: Request, next: Next) -> Response {
    if state.leading() || answered_locally(req.method(), req.uri().path()) {
        return next.run(req).await;
    }
    if req.headers().contains_key(FORWARDED_HEADER) {
        return ApiError::unavailable("leadership is changing; retry shortly").into_response();
    }
    match to_leader(&state, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn leader_api(state: &ApiState) -> Result<String, ApiError> {
    let mut election = state.inner.client.election_client();
    let resp = election
        .leader(state.inner.ks.election())
        .await
        .map_err(|e| {
            tracing::debug!(error = %e, "no leader");
            ApiError::unavailable("no leading control plane; retry shortly")
        })?;
    let value = resp
        .kv()
        .map(|kv| kv.value().to_vec())
        .ok_or_else(|| ApiError::unavailable("no leading control plane; retry shortly"))?;
    let parsed: ElectionValue = serde_json::from_slice(&value).map_err(|_| {
        ApiError::unavailable("the leading control plane does not publish an API address")
    })?;
    Ok(parsed.api)
}

async fn to_leader(state: &ApiState, req: Request) -> Result<Response, ApiError> {
    let base = leader_api(state).await?;
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "the request body is larger than the API accepts",
            )
        })?;
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let mut out = state
        .inner
        .http
        .request(parts.method.clone(), format!("{base}{path}"))
        .header(FORWARDED_HEADER, "1")
        .body(bytes);
    for (name, value) in &parts.headers {
        if !hop_by_hop(name) {
            out = out.header(name, value);
        }
    }
    let resp = out.send().await.map_err(|e| {
        tracing::warn!(leader = %base, error = %e, "cannot reach the leader");
        ApiError::unavailable("the leading control plane did not answer; retry shortly")
    })?;
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.bytes().await.map_err(|e| {
        tracing::warn!(leader = %base, error = %e, "leader's answer broke off");
        ApiError::unavailable("the leading control plane did not answer; retry shortly")
    })?;
    let mut builder = Response::builder().status(status);
    for (name, value) in &headers {
        if !hop_by_hop(name) {
            builder = builder.header(name, value);
        }
    }
    builder
        .body(Body::from(body))
        .map_err(|e| ApiError::internal("build forwarded response", e))
}
