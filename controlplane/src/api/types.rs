//! The request and response bodies of the lain HTTP API (docs/api.md), shared by the server
//! and the `lain` CLI so that both sides agree on one definition.
//!
//! Requests reject unknown fields so that a typo is a 400 naming the field instead of a
//! silently ignored setting. Every type derives `utoipa::ToSchema`, from which the OpenAPI
//! document at `/openapi.json` is generated.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// A stable machine-readable code: `bad_request`, `unauthorized`, `forbidden`,
    /// `not_found`, `conflict`, `payload_too_large`, `invalid_lain_yaml`, `deploy_rejected`,
    /// `unavailable` or `internal`.
    pub code: String,
    /// A human-readable message that says what to do next.
    pub message: String,
    /// Located details: the offending request field, or every lain.yaml error.
    #[serde(default)]
    pub details: Vec<ErrorDetail>,
}

/// One located problem of an error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// The file the problem is in (`lain.yaml`), when it is about a file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// 1-based line, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    /// 1-based column, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub column: Option<usize>,
    /// The request field or dotted lain.yaml key (`web.memory`), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// What is wrong.
    pub message: String,
}

/// `GET /healthz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// Always `ok` when the process answers.
    pub status: String,
    /// Whether this replica leads (runs the engine).
    pub leader: bool,
}

/// `GET /api/v1/whoami`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct WhoAmI {
    /// The user the token belongs to.
    pub user: String,
    /// Whether the user is an admin.
    pub admin: bool,
    /// The apps the user maintains.
    pub apps: Vec<String>,
}

/// `POST /api/v1/users`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateUserRequest {
    /// The user name: lower-case letters, digits and `-`, at most 63 characters.
    pub name: String,
    /// Whether the user is an admin.
    #[serde(default)]
    pub admin: bool,
}

/// A user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct UserInfo {
    /// The user name.
    pub name: String,
    /// Whether the user is an admin.
    pub admin: bool,
}

/// `POST /api/v1/tokens`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTokenRequest {
    /// The user the token is for.
    pub user: String,
    /// A note telling tokens apart (`laptop`, `ci`).
    #[serde(default)]
    pub description: Option<String>,
}

/// A newly created token; the token itself is shown only in this response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CreatedToken {
    /// The token's id, used to revoke it.
    pub id: String,
    /// The user it belongs to.
    pub user: String,
    /// The bearer token.
    pub token: String,
}

/// A token as listed (never the token itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TokenInfo {
    /// The token's id, used to revoke it.
    pub id: String,
    /// The user it belongs to.
    pub user: String,
    /// Its note; empty when none was given.
    pub description: String,
    /// RFC 3339 creation time.
    pub created_at: String,
}

/// `POST /api/v1/apps`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterAppRequest {
    /// The text of lain.yaml (at most 256 KiB).
    pub lain_yaml: String,
}

/// A proc as listed with its app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ProcSummary {
    /// The proc name.
    pub name: String,
    /// The proc type: `web`, `worker`, `oneshot` or `portal`.
    #[serde(rename = "type")]
    pub proc_type: String,
    /// How many instances it runs.
    pub num_instances: u32,
}

/// An app as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AppSummary {
    /// The app name.
    pub name: String,
    /// `app` or `resource`.
    pub apptype: String,
    /// The deployed version, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Its procs.
    pub procs: Vec<ProcSummary>,
}

/// A proc in detail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ProcDetail {
    /// The proc name.
    pub name: String,
    /// The proc type: `web`, `worker`, `oneshot` or `portal`.
    #[serde(rename = "type")]
    pub proc_type: String,
    /// How many instances it runs.
    pub num_instances: u32,
    /// LAIN's CPU level, 0–8.
    pub cpu: u8,
    /// The memory limit as written (`64m`).
    pub memory: String,
    /// The main port, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// The mountpoints expanded onto the cluster's domains (`host/path`).
    pub mountpoints: Vec<String>,
}

/// An app in detail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AppDetail {
    /// The app name.
    pub name: String,
    /// `app` or `resource`.
    pub apptype: String,
    /// The deployed version, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The lain.yaml text as registered.
    pub lain_yaml: String,
    /// Its procs, with scaling applied.
    pub procs: Vec<ProcDetail>,
}

/// `POST /api/v1/apps/{app}/deploys`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeployRequest {
    /// The version; without it, the newest `{app}:release-*` image on the nodes.
    #[serde(default)]
    pub version: Option<String>,
    /// The image; `{app}:release-{version}` by default.
    #[serde(default)]
    pub image: Option<String>,
}

/// One entry of an app's deploy history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DeployEntry {
    /// Sequence number within the app.
    pub seq: u64,
    /// RFC 3339 time.
    pub at: String,
    /// The version deployed.
    pub version: String,
    /// Its image.
    pub image: String,
    /// `started`, `succeeded`, `failed` or `rolled-back`.
    pub outcome: String,
}

/// `PATCH /api/v1/apps/{app}/procs/{proc}`: only the fields given change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScaleRequest {
    /// How many instances run (0–100).
    #[serde(default)]
    pub num_instances: Option<u32>,
    /// LAIN's CPU level, 0–8.
    #[serde(default)]
    pub cpu: Option<u8>,
    /// The memory limit (`64m`, `1g`).
    #[serde(default)]
    pub memory: Option<String>,
}

/// One instance slot of an app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct InstanceInfo {
    /// The proc.
    pub proc_name: String,
    /// The instance number, from 1.
    pub instance: u32,
    /// The node of its current container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The current container's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    /// The current container's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_name: Option<String>,
    /// The version it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The address it is reached at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Its `PORT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Whether its probe passes.
    pub healthy: bool,
    /// Whether it is published as the slot's endpoint.
    pub serving: bool,
    /// How often it was replaced after crashing.
    pub restarts: u32,
    /// How its last container ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<String>,
    /// Why it is not running, when it is pending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<String>,
}

/// One entry of an app's event history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct EventEntry {
    /// Sequence number within the app.
    pub seq: u64,
    /// RFC 3339 time.
    pub at: String,
    /// `deployed`, `started`, `healthy`, `crashed`, `oom-killed`, `restarted`, `removed`,
    /// `rescheduled`, `pending`, `deploy-failed`, `rolled-back`, `scaled`, `registered`.
    pub kind: String,
    /// The proc, if the event is about one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proc_name: Option<String>,
    /// The instance, if the event is about one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<u32>,
    /// Details.
    pub message: String,
}

/// A secret file as listed (never its content).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SecretInfo {
    /// The proc it is mounted into.
    pub proc: String,
    /// Its absolute path in the container.
    pub path: String,
    /// Its size in bytes.
    pub size: u64,
    /// RFC 3339 time of the last change.
    pub updated_at: String,
}

/// `PUT /api/v1/apps/{app}/secrets`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutSecretRequest {
    /// The proc it is mounted into.
    pub proc: String,
    /// Its path in the container; relative paths are below `/lain/app`.
    pub path: String,
    /// The content, base64 (standard alphabet, padded).
    pub content_b64: String,
}

/// A secret file with its content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SecretContent {
    /// The proc it is mounted into.
    pub proc: String,
    /// Its absolute path in the container.
    pub path: String,
    /// The content, base64.
    pub content_b64: String,
}

/// The `?path=` query naming one secret file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct SecretPathQuery {
    /// The secret's path in the container.
    pub path: String,
}

/// A maintainer of an app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MaintainerInfo {
    /// The user name.
    pub user: String,
}

/// A Docker engine of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NodeInfo {
    /// The node name.
    pub name: String,
    /// `unix:///path` or `tcp://127.0.0.1:port`.
    pub docker_host: String,
    /// Where its instances are reached.
    pub address: String,
    /// Labels matched by `filters:`.
    pub labels: BTreeMap<String, String>,
    /// CPU capacity in cores.
    pub cpus: u32,
    /// Memory capacity in bytes.
    pub memory_bytes: u64,
    /// `active` or `draining`.
    pub state: String,
    /// The node's lease is alive: its engine answered the control plane within the lease
    /// TTL. A node whose lease expired has its stateless instances moved elsewhere.
    #[serde(default)]
    pub lease_alive: bool,
}

/// `POST /api/v1/nodes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddNodeRequest {
    /// The node name.
    pub name: String,
    /// `unix:///path` or `tcp://127.0.0.1:port`.
    pub docker_host: String,
    /// Where its instances are reached; 127.0.0.1 by default.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub address: Option<IpAddr>,
    /// Labels matched by `filters:`.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// CPU capacity in cores; 4 by default.
    #[serde(default)]
    pub cpus: Option<u32>,
    /// Memory capacity in bytes; 8 GiB by default.
    #[serde(default)]
    pub memory_bytes: Option<u64>,
}

/// An HTTP route of the cluster state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RouteInfo {
    /// The host it matches (and every subdomain).
    pub host: String,
    /// The path prefix.
    pub path: String,
    /// The app that owns it.
    pub app: String,
    /// The web proc it sends to.
    pub proc: String,
    /// Whether plain HTTP is redirected to HTTPS.
    pub https_only: bool,
}

/// A static DNS record of the cluster state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DnsInfo {
    /// The owner name.
    pub name: String,
    /// `A`, `AAAA`, `CNAME`, `TXT`, `SRV` or `MX`.
    #[serde(rename = "type")]
    pub rtype: String,
    /// The data in presentation form.
    pub data: String,
    /// The TTL in seconds, when not the server's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u32>,
}

/// `POST /api/v1/certs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UploadCertRequest {
    /// The certificate's name.
    pub name: String,
    /// The PEM certificate chain, leaf first.
    pub cert_pem: String,
    /// The PEM private key.
    pub key_pem: String,
}

/// A TLS certificate (never its key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CertInfo {
    /// The certificate's name.
    pub name: String,
    /// The server names it is chosen for.
    pub hosts: Vec<String>,
    /// RFC 3339 expiry time of the leaf certificate.
    pub not_after: String,
}
