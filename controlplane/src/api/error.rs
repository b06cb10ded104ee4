//! API errors as JSON `{code, message, details}` and the JSON and query extractors whose
//! rejections name the offending field.
//!
//! Internal failures (etcd, Docker, a bug) are logged with their cause and answered with a
//! generic message, so that no internal detail leaks to a client.

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;

use super::types::{ErrorBody, ErrorDetail};
use crate::engine::EngineError;
use crate::lainyaml::LocatedError;

/// An error answered to a client.
#[derive(Debug)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// The stable code.
    pub code: &'static str,
    /// The human message.
    pub message: String,
    /// Located details.
    pub details: Vec<ErrorDetail>,
}

impl ApiError {
    /// An error without details.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            details: Vec::new(),
        }
    }

    /// 400 naming the field `key`.
    pub fn bad_field(key: &str, message: impl Into<String>) -> ApiError {
        let message = message.into();
        ApiError {
            details: vec![ErrorDetail {
                file: None,
                line: None,
                column: None,
                key: Some(key.to_string()),
                message: message.clone(),
            }],
            ..ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
        }
    }

    /// 401.
    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    /// 403.
    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// 404.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 409.
    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, "conflict", message)
    }

    /// 422 `deploy_rejected`.
    pub fn deploy_rejected(message: impl Into<String>, details: Vec<ErrorDetail>) -> ApiError {
        ApiError {
            details,
            ..ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "deploy_rejected", message)
        }
    }

    /// 422 `invalid_lain_yaml` with every located error.
    pub fn invalid_lain_yaml(errors: &[LocatedError]) -> ApiError {
        let n = errors.len();
        ApiError {
            details: errors
                .iter()
                .map(|e| ErrorDetail {
                    file: Some(e.file.clone()),
                    line: Some(e.line),
                    column: Some(e.column),
                    key: (!e.key.is_empty()).then(|| e.key.clone()),
                    message: e.message.clone(),
                })
                .collect(),
            ..ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_lain_yaml",
                format!(
                    "lain.yaml has {n} error{}; fix them and register again",
                    if n == 1 { "" } else { "s" }
                ),
            )
        }
    }

    /// 503.
    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }

    /// 500: the cause is logged, the client gets a generic message.
    pub fn internal(what: &str, cause: impl std::fmt::Display) -> ApiError {
        tracing::error!(what, error = %cause, "internal API error");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; the control plane's log has the cause",
        )
    }

    /// An etcd failure: the store is unreachable or refused the call.
    pub fn etcd(cause: etcd_client::Error) -> ApiError {
        tracing::error!(error = %cause, "etcd call failed");
        ApiError::unavailable("the cluster store (etcd) did not answer; retry shortly")
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> ApiError {
        match e {
            EngineError::Invalid(errors) => ApiError::invalid_lain_yaml(&errors),
            EngineError::NoApp(app) => ApiError::not_found(format!("no app {app:?}")),
            EngineError::NoProc(app, p) => {
                ApiError::not_found(format!("app {app:?} has no proc {p:?}"))
            }
            EngineError::NoNode(n) => ApiError::not_found(format!("no node {n:?}")),
            EngineError::NoPrevious(app) => ApiError::conflict(format!(
                "app {app:?} has no earlier version to roll back to"
            )),
            EngineError::Bad(m) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "bad_request", m)
            }
            EngineError::Docker(d) => {
                tracing::warn!(error = %d, "Docker call failed");
                ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "bad_request",
                    "a Docker engine refused or did not answer; check the node with `lain node ls`",
                )
            }
            EngineError::Etcd(e) => {
                tracing::error!(error = %e, "etcd call failed");
                ApiError::unavailable("the cluster store (etcd) did not answer; retry shortly")
            }
            EngineError::Stopped => {
                ApiError::unavailable("this replica no longer leads; retry shortly")
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            code: self.code.to_string(),
            message: self.message,
            details: self.details,
        };
        (self.status, axum::Json(body)).into_response()
    }
}

/// A JSON body whose rejection is an [`ApiError`] naming the offending field.
#[derive(Debug)]
pub struct Json<T>(pub T);

impl<T, S> FromRequest<S> for Json<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| {
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "payload_too_large",
                        "the request body is larger than the API accepts",
                    )
                } else {
                    ApiError::bad_field("body", format!("cannot read the body: {}", e.body_text()))
                }
            })?;
        parse_json(&bytes).map(Json)
    }
}

/// Parses a JSON body, naming the field of the first error.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let message = inner.to_string();
        // For a missing field the path names the enclosing object and the field is quoted in
        // serde's message between backticks; for an unknown field the path already ends
        // with it.
        let named = message.split('`').nth(1).filter(|_| {
            message.starts_with("unknown field") || message.starts_with("missing field")
        });
        let key = match (path.as_str(), named) {
            (p, Some(f)) if p == f || p.ends_with(&format!(".{f}")) => p.to_string(),
            (".", Some(f)) => f.to_string(),
            (p, Some(f)) => format!("{p}.{f}"),
            (".", None) => "body".to_string(),
            (p, None) => p.to_string(),
        };
        ApiError::bad_field(&key, format!("{key}: {message}"))
    })
}

/// A query string whose rejection is an [`ApiError`].
#[derive(Debug)]
pub struct Query<T>(pub T);

impl<T, S> FromRequestParts<S> for Query<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| Query(q.0))
            .map_err(|e| ApiError::bad_field("query", e.body_text()))
    }
}

/// A path whose rejection is an [`ApiError`].
#[derive(Debug)]
pub struct PathArgs<T>(pub T);

impl<T, S> FromRequestParts<S> for PathArgs<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| PathArgs(p.0))
            .map_err(|e| ApiError::bad_field("path", e.body_text()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::types::{DeployRequest, RegisterAppRequest, ScaleRequest};

    #[test]
    fn json_errors_name_the_field() {
        let e = parse_json::<ScaleRequest>(br#"{"num_instances":"two"}"#).unwrap_err();
        assert_eq!(e.details[0].key.as_deref(), Some("num_instances"));
        let e = parse_json::<DeployRequest>(br#"{"versoin":"1"}"#).unwrap_err();
        assert_eq!(e.details[0].key.as_deref(), Some("versoin"));
        let e = parse_json::<RegisterAppRequest>(b"{}").unwrap_err();
        assert_eq!(e.details[0].key.as_deref(), Some("lain_yaml"));
        let e = parse_json::<RegisterAppRequest>(b"{nope").unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
    }
}
