//! The HTTP side of the CLI: one reqwest client (rustls) that sends the bearer token, turns
//! the API's JSON errors into `CliError`s with the right exit code and a next step, and
//! decodes the typed bodies of `crate::api::types`.

use std::time::Duration;

use reqwest::{Method, RequestBuilder, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::CliError;
use super::config::Target;
use crate::api::types::ErrorBody;

/// A client of one lain API server.
#[derive(Debug, Clone)]
pub struct ApiClient {
    http: reqwest::Client,
    target: Target,
}

impl ApiClient {
    /// A client for `target`; requests time out after `timeout`.
    pub fn new(target: Target, timeout: Duration) -> Result<ApiClient, CliError> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(5))
            .user_agent(concat!("lain-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| CliError::failed(format!("cannot set up the HTTP client: {e}")))?;
        Ok(ApiClient { http, target })
    }

    /// The server's base URL.
    pub fn server(&self) -> &str {
        &self.target.server
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http
            .request(method, format!("{}/api/v1{path}", self.target.server))
            .bearer_auth(&self.target.token)
    }

    async fn send(&self, req: RequestBuilder) -> Result<reqwest::Response, CliError> {
        let resp = req.send().await.map_err(|e| self.transport(e))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        Err(api_error(status, &body))
    }

    fn transport(&self, e: reqwest::Error) -> CliError {
        let what = if e.is_timeout() {
            "did not answer in time"
        } else if e.is_connect() {
            "cannot be reached"
        } else {
            "failed to answer"
        };
        // reqwest's top-level message hides the cause (refused, no route, DNS).
        let mut cause = String::new();
        let mut src: Option<&dyn std::error::Error> = std::error::Error::source(&e);
        while let Some(s) = src {
            cause = s.to_string();
            src = s.source();
        }
        CliError::unreachable(format!(
            "the lain server {} {what}{}; check that `lain controlplane` runs there, or pass --server / run `lain login` for another one",
            self.target.server,
            if cause.is_empty() {
                String::new()
            } else {
                format!(" ({cause})")
            }
        ))
    }

    /// `GET` a JSON body.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, CliError> {
        self.json(self.request(Method::GET, path)).await
    }

    /// `GET` with query parameters.
    pub async fn get_query<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, &str)],
    ) -> Result<T, CliError> {
        self.json(self.request(Method::GET, path).query(query))
            .await
    }

    /// `GET` as untyped JSON (for `-o json` of bodies the CLI does not interpret).
    pub async fn get_value(&self, path: &str) -> Result<serde_json::Value, CliError> {
        self.json(self.request(Method::GET, path)).await
    }

    /// `POST` without a body, decoding the JSON answer.
    pub async fn post_empty<T: DeserializeOwned>(&self, path: &str) -> Result<T, CliError> {
        self.json(self.request(Method::POST, path)).await
    }

    /// A method with a JSON body, decoding the JSON answer.
    pub async fn call<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: &B,
    ) -> Result<T, CliError> {
        self.json(self.request(method, path).json(body)).await
    }

    /// A method with an optional JSON body whose answer has no body (204, 202).
    pub async fn call_empty<B: Serialize + ?Sized>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        query: &[(&str, &str)],
    ) -> Result<(), CliError> {
        let mut req = self.request(method, path).query(query);
        if let Some(b) = body {
            req = req.json(b);
        }
        self.send(req).await.map(|_| ())
    }

    async fn json<T: DeserializeOwned>(&self, req: RequestBuilder) -> Result<T, CliError> {
        let resp = self.send(req).await?;
        let bytes = resp.bytes().await.map_err(|e| self.transport(e))?;
        serde_json::from_slice(&bytes).map_err(|e| {
            CliError::failed(format!(
                "the server's answer is not what this lain CLI expects ({e}); is the server the same version?"
            ))
        })
    }
}

/// The CLI error for an API error response: the exit code from the status, the server's
/// message and details, and what to do next.
pub fn api_error(status: StatusCode, body: &str) -> CliError {
    let parsed: Option<ErrorBody> = serde_json::from_str(body).ok();
    let mut message = match &parsed {
        Some(b) => b.message.clone(),
        None if body.trim().is_empty() => status.to_string(),
        None => format!("{status}: {}", body.trim()),
    };
    if let Some(b) = &parsed {
        for d in &b.details {
            let mut at = String::new();
            if let Some(f) = &d.file {
                at.push_str(f);
            }
            if let Some(l) = d.line {
                at.push_str(&format!(":{l}"));
                if let Some(c) = d.column {
                    at.push_str(&format!(":{c}"));
                }
            }
            if let Some(k) = &d.key {
                if !at.is_empty() {
                    at.push(' ');
                }
                at.push_str(k);
            }
            if at.is_empty() {
                message.push_str(&format!("\n  {}", d.message));
            } else {
                message.push_str(&format!("\n  {at}: {}", d.message));
            }
        }
    }
    let code = parsed.as_ref().map(|b| b.code.as_str()).unwrap_or("");
    match status.as_u16() {
        401 => CliError::auth(format!(
            "{message}\nthe token was refused: run `lain login --server URL --token TOKEN` with a valid token"
        )),
        403 => CliError::auth(format!(
            "{message}\nyour token is not allowed to do this: ask an admin or a maintainer of the app (`lain maintainer add APP USER`)"
        )),
        404 => CliError::not_found(format!(
            "{message}\n(see `lain app ls` for the apps you can see)"
        )),
        422 if code == "invalid_lain_yaml" => {
            CliError::local(format!("{message}\nfix lain.yaml and try again"))
        }
        422 => CliError::deploy_failed(message),
        503 => CliError::unreachable(format!(
            "{message}\nthe cluster cannot act now (no leader or etcd unreachable); try again shortly"
        )),
        _ => CliError::failed(message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_exit_codes_with_a_next_step() {
        let e = api_error(
            StatusCode::UNAUTHORIZED,
            r#"{"code":"unauthorized","message":"no valid token"}"#,
        );
        assert_eq!(e.code, 4);
        assert!(e.message.contains("lain login"), "{}", e.message);
        assert_eq!(api_error(StatusCode::FORBIDDEN, "").code, 4);
        assert_eq!(api_error(StatusCode::NOT_FOUND, "").code, 3);
        assert_eq!(api_error(StatusCode::SERVICE_UNAVAILABLE, "").code, 5);
        assert_eq!(api_error(StatusCode::CONFLICT, "").code, 1);
        let e = api_error(
            StatusCode::UNPROCESSABLE_ENTITY,
            r#"{"code":"invalid_lain_yaml","message":"lain.yaml has 1 error","details":[{"file":"lain.yaml","line":3,"column":5,"key":"web.memory","message":"bad size"}]}"#,
        );
        assert_eq!(e.code, 64);
        assert!(
            e.message.contains("lain.yaml:3:5 web.memory: bad size"),
            "{}",
            e.message
        );
        let e = api_error(
            StatusCode::UNPROCESSABLE_ENTITY,
            r#"{"code":"deploy_rejected","message":"secret /etc/x is missing"}"#,
        );
        assert_eq!(e.code, 6);
        let e = api_error(StatusCode::BAD_GATEWAY, "upstream down");
        assert_eq!(e.code, 1);
        assert!(e.message.contains("upstream down"));
    }
}
