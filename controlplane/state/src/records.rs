//! Typed, versioned values stored under the cluster-state keys.
//!
//! Every value is a JSON object with a `"v"` field naming its schema version. Readers reject
//! values whose version they do not know, and unknown fields, rather than guess: a record
//! that cannot be understood is skipped and counted, never half-applied.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::keys::Kind;

/// The schema version every record written by this build carries.
pub const SCHEMA_VERSION: u32 = 1;

fn schema_version() -> u32 {
    SCHEMA_VERSION
}

/// A value that lives under one kind of state key.
pub trait Record: Serialize + DeserializeOwned + Clone + Send + Sync + 'static {
    /// The kind of key this record is stored under.
    const KIND: Kind;
}

/// Why a stored value could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The bytes are not valid JSON for the record type.
    #[error("invalid {kind} record: {source}")]
    Json {
        /// The kind that was expected.
        kind: Kind,
        /// The JSON error, with line and column.
        #[source]
        source: serde_json::Error,
    },
    /// The record has a schema version this build does not understand.
    #[error("{kind} record has schema version {found}, this build reads version {SCHEMA_VERSION}")]
    Version {
        /// The kind that was expected.
        kind: Kind,
        /// The version found in the value.
        found: u32,
    },
    /// The record parsed but its contents are inconsistent.
    #[error("invalid {kind} record: {reason}")]
    Invalid {
        /// The kind that was expected.
        kind: Kind,
        /// What is wrong.
        reason: String,
    },
}

#[derive(Deserialize)]
struct VersionProbe {
    #[serde(default)]
    v: Option<u32>,
}

/// Decodes a stored value, checking its schema version and contents.
pub fn decode<T: Record + Validate>(bytes: &[u8]) -> Result<T, RecordError> {
    let probe: VersionProbe =
        serde_json::from_slice(bytes).map_err(|source| RecordError::Json {
            kind: T::KIND,
            source,
        })?;
    match probe.v {
        Some(SCHEMA_VERSION) => {}
        Some(found) => {
            return Err(RecordError::Version {
                kind: T::KIND,
                found,
            });
        }
        None => {
            return Err(RecordError::Invalid {
                kind: T::KIND,
                reason: "missing schema version field \"v\"".into(),
            });
        }
    }
    let value: T = serde_json::from_slice(bytes).map_err(|source| RecordError::Json {
        kind: T::KIND,
        source,
    })?;
    value.validate().map_err(|reason| RecordError::Invalid {
        kind: T::KIND,
        reason,
    })?;
    Ok(value)
}

/// Encodes a record for storage.
pub fn encode<T: Record>(value: &T) -> Vec<u8> {
    // Serialising these plain structs cannot fail: they hold no maps with non-string keys.
    serde_json::to_vec(value).unwrap_or_default()
}

/// Checks a decoded record's invariants that serde cannot express.
pub trait Validate {
    /// `Err` with a human-readable reason when the record must not be used.
    fn validate(&self) -> Result<(), String> {
        Ok(())
    }
}

/// LAIN's podgroup name: `{app}.{type}.{proc}`, e.g. `hello.web.web`.
pub fn podgroup(app: &str, proc_type: &str, proc_name: &str) -> String {
    format!("{app}.{proc_type}.{proc_name}")
}

/// LAIN's appdomain: the app name reversed on dots (`resource.redis.hello` → `hello.redis.resource`).
pub fn appdomain(app: &str) -> String {
    app.split('.').rev().collect::<Vec<_>>().join(".")
}

/// An app as the data plane needs to know it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppRecord {
    /// Schema version.
    #[serde(default = "schema_version")]
    pub v: u32,
    /// The app name (`appname` in lain.yaml).
    pub name: String,
    /// `app` or `resource`.
    #[serde(default = "default_apptype")]
    pub apptype: String,
    /// The version currently deployed, empty before the first deploy.
    #[serde(default)]
    pub version: String,
    /// Services this app consumes (`use_services`): provider app → service names.
    #[serde(default)]
    pub use_services: BTreeMap<String, Vec<String>>,
    /// Resources this app consumes (`use_resources`): resource name → instantiated app.
    #[serde(default)]
    pub use_resources: BTreeMap<String, String>,
    /// The validated lain.yaml as JSON; opaque to the data plane.
    #[serde(default)]
    pub spec: serde_json::Value,
}

fn default_apptype() -> String {
    "app".into()
}

impl Record for AppRecord {
    const KIND: Kind = Kind::App;
}
impl Validate for AppRecord {
    fn validate(&self) -> Result<(), String> {
        non_empty("name", &self.name)
    }
}

/// How a route spreads requests over a proc's endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "policy", deny_unknown_fields)]
pub enum Balance {
    /// Each endpoint in turn.
    #[default]
    RoundRobin,
    /// The endpoint with the fewest requests in flight.
    LeastConn,
    /// Consistent hashing on a request header.
    HashHeader {
        /// The header whose value is hashed.
        name: String,
    },
    /// Consistent hashing on a cookie.
    HashCookie {
        /// The cookie whose value is hashed.
        name: String,
    },
}

/// Per-route upstream timeouts, with LAIN's nginx defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    /// Connecting to an upstream.
    #[serde(default = "default_connect_ms")]
    pub connect_ms: u64,
    /// Waiting for the upstream between reads.
    #[serde(default = "default_read_ms")]
    pub read_ms: u64,
    /// Waiting for the upstream between writes.
    #[serde(default = "default_write_ms")]
    pub write_ms: u64,
}

fn default_connect_ms() -> u64 {
    90_000
}
fn default_read_ms() -> u64 {
    90_000
}
fn default_write_ms() -> u64 {
    900_000
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect_ms: default_connect_ms(),
            read_ms: default_read_ms(),
            write_ms: default_write_ms(),
        }
    }
}

/// Active health checking of a proc's endpoints, with LAIN's defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// HTTP path probed with GET; a 2xx or 3xx answer is healthy.
    pub path: String,
    /// Time between probes.
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u64,
    /// Consecutive successes that bring an endpoint back.
    #[serde(default = "default_rise")]
    pub rise: u32,
    /// Consecutive failures that take an endpoint out.
    #[serde(default = "default_fall")]
    pub fall: u32,
}

fn default_interval_ms() -> u64 {
    3_000
}
fn default_rise() -> u32 {
    2
}
fn default_fall() -> u32 {
    5
}

/// An HTTP route: a web proc's claim on `host[/path]` (one expanded mountpoint).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteRecord {
    /// Schema version.
    #[serde(default = "schema_version")]
    pub v: u32,
    /// The host, lower case, without port; it matches itself and every subdomain.
    pub host: String,
    /// The path prefix, starting with `/`; `/` for a bare host.
    #[serde(default = "root_path")]
    pub path: String,
    /// The app that owns the route.
    pub app: String,
    /// The web proc the route sends to.
    #[serde(rename = "proc")]
    pub proc_name: String,
    /// Answer plain HTTP with a redirect to HTTPS.
    #[serde(default)]
    pub https_only: bool,
    /// Upstream timeouts.
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Largest request body accepted; `None` is unlimited, as LAIN's default was.
    #[serde(default)]
    pub max_body_bytes: Option<u64>,
    /// Load-balancing policy.
    #[serde(default)]
    pub balance: Balance,
    /// Active health check of the proc's endpoints, if the proc declares one.
    #[serde(default)]
    pub healthcheck: Option<HealthCheck>,
}

fn root_path() -> String {
    "/".into()
}

impl Record for RouteRecord {
    const KIND: Kind = Kind::Route;
}
impl Validate for RouteRecord {
    fn validate(&self) -> Result<(), String> {
        non_empty("host", &self.host)?;
        non_empty("app", &self.app)?;
        non_empty("proc", &self.proc_name)?;
        if self.host.contains('/') || self.host.contains(char::is_whitespace) {
            return Err(format!("host {:?} is not a host name", self.host));
        }
        // nginx users write `*.example.com`; it would match nothing here, silently.
        if self.host.contains('*') {
            let base = self.host.trim_start_matches(['*', '.']);
            return Err(format!(
                "host {:?} has a wildcard; a route for {base:?} already matches it and every \
                 subdomain",
                self.host
            ));
        }
        if !self.path.starts_with('/') {
            return Err(format!("path {:?} does not start with '/'", self.path));
        }
        if let Some(why) = route_path_problem(&self.path) {
            return Err(format!("{why}; requests are matched with those resolved"));
        }
        if let Some(hc) = &self.healthcheck {
            if !hc.path.starts_with('/') {
                return Err(format!(
                    "healthcheck path {:?} does not start with '/'",
                    hc.path
                ));
            }
            if hc.rise == 0 || hc.fall == 0 || hc.interval_ms == 0 {
                return Err("healthcheck rise, fall and interval_ms must be positive".into());
            }
        }
        Ok(())
    }
}

/// One running instance of a proc, as the data plane reaches it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointRecord {
    /// Schema version.
    #[serde(default = "schema_version")]
    pub v: u32,
    /// The app.
    pub app: String,
    /// The proc name.
    #[serde(rename = "proc")]
    pub proc_name: String,
    /// The proc type (`web`, `worker`, `portal`, ...), part of the podgroup name.
    #[serde(default = "default_proc_type")]
    pub proc_type: String,
    /// The instance number, from 1.
    pub instance: u32,
    /// The node running it.
    #[serde(default)]
    pub node: String,
    /// The address the instance is reached at.
    pub address: IpAddr,
    /// The main port (`PORT`).
    pub port: u16,
    /// Named ports, for SRV records; the main port is `http` for web procs.
    #[serde(default)]
    pub ports: BTreeMap<String, u16>,
    /// Whether the control plane's probe currently passes.
    #[serde(default = "yes")]
    pub healthy: bool,
    /// The app version the instance runs.
    #[serde(default)]
    pub version: String,
    /// The Docker container id.
    #[serde(default)]
    pub container_id: String,
}

fn default_proc_type() -> String {
    "web".into()
}
fn yes() -> bool {
    true
}

impl EndpointRecord {
    /// LAIN's podgroup name of this instance's proc.
    pub fn podgroup(&self) -> String {
        podgroup(&self.app, &self.proc_type, &self.proc_name)
    }
}

impl Record for EndpointRecord {
    const KIND: Kind = Kind::Endpoint;
}
impl Validate for EndpointRecord {
    fn validate(&self) -> Result<(), String> {
        non_empty("app", &self.app)?;
        non_empty("proc", &self.proc_name)?;
        if self.instance == 0 {
            return Err("instance numbers start at 1".into());
        }
        if self.port == 0 {
            return Err("port must not be 0".into());
        }
        Ok(())
    }
}

/// A TCP route (LAIN's streamrouter): a listening port forwarded to a proc's endpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamRecord {
    /// Schema version.
    #[serde(default = "schema_version")]
    pub v: u32,
    /// The port the proxy listens on.
    pub listen_port: u16,
    /// The app.
    pub app: String,
    /// The proc whose endpoints receive the connections.
    #[serde(rename = "proc")]
    pub proc_name: String,
    /// The port on the endpoints; their main port when absent.
    #[serde(default)]
    pub upstream_port: Option<u16>,
}

impl Record for StreamRecord {
    const KIND: Kind = Kind::Stream;
}
impl Validate for StreamRecord {
    fn validate(&self) -> Result<(), String> {
        non_empty("app", &self.app)?;
        non_empty("proc", &self.proc_name)?;
        if self.listen_port == 0 {
            return Err("listen_port must not be 0".into());
        }
        Ok(())
    }
}

/// The types of static DNS records lain serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum DnsType {
    /// IPv4 address.
    A,
    /// IPv6 address.
    Aaaa,
    /// Canonical name.
    Cname,
    /// Text.
    Txt,
    /// Service location: `priority weight port target`.
    Srv,
    /// Mail exchange: `preference exchange`.
    Mx,
}

/// A static DNS record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsRecord {
    /// Schema version.
    #[serde(default = "schema_version")]
    pub v: u32,
    /// The owner name, absolute, without the trailing dot.
    pub name: String,
    /// The record type.
    #[serde(rename = "type")]
    pub rtype: DnsType,
    /// The record data in presentation form (`10.0.0.1`, `10 5 8080 host.lain.`, ...).
    pub data: String,
    /// TTL in seconds; the server's default when absent.
    #[serde(default)]
    pub ttl_secs: Option<u32>,
}

impl Record for DnsRecord {
    const KIND: Kind = Kind::Dns;
}
impl Validate for DnsRecord {
    fn validate(&self) -> Result<(), String> {
        non_empty("name", &self.name)?;
        non_empty("data", &self.data)?;
        let fields = self.data.split_whitespace().count();
        let ok = match self.rtype {
            DnsType::A => self.data.parse::<std::net::Ipv4Addr>().is_ok(),
            DnsType::Aaaa => self.data.parse::<std::net::Ipv6Addr>().is_ok(),
            DnsType::Cname => fields == 1,
            DnsType::Txt => true,
            DnsType::Srv => fields == 4,
            DnsType::Mx => fields == 2,
        };
        if ok {
            Ok(())
        } else {
            Err(format!(
                "data {:?} is not valid for type {:?}",
                self.data, self.rtype
            ))
        }
    }
}

/// A service offered by an app (a proc, optionally fronted by a portal proc).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceRecord {
    /// Schema version.
    #[serde(default = "schema_version")]
    pub v: u32,
    /// The providing app.
    pub app: String,
    /// The service name clients list in `use_services`.
    pub service: String,
    /// The proc that implements the service.
    #[serde(rename = "proc")]
    pub proc_name: String,
    /// The portal proc clients reach, if the service has one.
    #[serde(default)]
    pub portal: Option<String>,
    /// Apps allowed to use the service (`allow_clients`); empty means all.
    #[serde(default)]
    pub allow_clients: Vec<String>,
}

impl Record for ServiceRecord {
    const KIND: Kind = Kind::Service;
}
impl Validate for ServiceRecord {
    fn validate(&self) -> Result<(), String> {
        non_empty("app", &self.app)?;
        non_empty("service", &self.service)?;
        non_empty("proc", &self.proc_name)
    }
}

/// The addresses an edge proxy answers on; `{app}.lain` and `*.{domain}` resolve to them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngressRecord {
    /// Schema version.
    #[serde(default = "schema_version")]
    pub v: u32,
    /// The proxy's addresses.
    pub addresses: Vec<IpAddr>,
}

impl Record for IngressRecord {
    const KIND: Kind = Kind::Ingress;
}
impl Validate for IngressRecord {
    fn validate(&self) -> Result<(), String> {
        if self.addresses.is_empty() {
            return Err("addresses must not be empty".into());
        }
        Ok(())
    }
}

/// A TLS certificate chain and key, served for the listed names (exact or `*.` wildcard).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertRecord {
    /// Schema version.
    #[serde(default = "schema_version")]
    pub v: u32,
    /// Server names this certificate is chosen for by SNI.
    pub names: Vec<String>,
    /// The PEM certificate chain, leaf first.
    pub cert_pem: String,
    /// The PEM private key.
    pub key_pem: String,
}

impl Record for CertRecord {
    const KIND: Kind = Kind::Cert;
}
impl Validate for CertRecord {
    fn validate(&self) -> Result<(), String> {
        if self.names.is_empty() {
            return Err("names must not be empty".into());
        }
        if !self.cert_pem.contains("-----BEGIN") || !self.key_pem.contains("-----BEGIN") {
            return Err("cert_pem and key_pem must be PEM".into());
        }
        Ok(())
    }
}

/// Whether a node takes new instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Takes new instances.
    #[default]
    Active,
    /// Keeps nothing: its instances move elsewhere.
    Draining,
}

/// A Docker engine that runs instances.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeRecord {
    /// Schema version.
    #[serde(default = "schema_version")]
    pub v: u32,
    /// The node name.
    pub name: String,
    /// How to reach its Docker engine: `unix:///path` or `tcp://127.0.0.1:port`.
    pub docker_host: String,
    /// The address its instances are reached at.
    pub address: IpAddr,
    /// Labels used by placement constraints.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// CPU capacity, in cores.
    pub cpus: u32,
    /// Memory capacity, in bytes.
    pub memory_bytes: u64,
    /// Active or draining.
    #[serde(default)]
    pub state: NodeState,
}

impl Record for NodeRecord {
    const KIND: Kind = Kind::Node;
}
impl Validate for NodeRecord {
    fn validate(&self) -> Result<(), String> {
        non_empty("name", &self.name)?;
        if !(self.docker_host.starts_with("unix://") || self.docker_host.starts_with("tcp://")) {
            return Err(format!(
                "docker_host {:?} is neither unix:// nor tcp://",
                self.docker_host
            ));
        }
        Ok(())
    }
}

/// A container the control plane runs, so a log shipper can name its app without asking Docker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerRecord {
    /// Schema version.
    #[serde(default = "schema_version")]
    pub v: u32,
    /// The Docker container id.
    pub container_id: String,
    /// The node it runs on.
    pub node: String,
    /// The app.
    pub app: String,
    /// The proc name.
    #[serde(rename = "proc")]
    pub proc_name: String,
    /// LAIN's podgroup name.
    pub podgroup: String,
    /// The instance number.
    pub instance: u32,
    /// The app version.
    pub version: String,
    /// The host directory bound at `/lain/logs` in the container.
    #[serde(default)]
    pub log_dir: Option<String>,
    /// The `logs:` files declared in lain.yaml, relative to `/lain/logs`.
    #[serde(default)]
    pub logs: Vec<String>,
}

impl Record for ContainerRecord {
    const KIND: Kind = Kind::Container;
}
impl Validate for ContainerRecord {
    fn validate(&self) -> Result<(), String> {
        non_empty("container_id", &self.container_id)?;
        non_empty("app", &self.app)
    }
}

/// An encrypted secret file (stored under `cp/`, never watched by the data plane).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretRecord {
    /// Schema version.
    #[serde(default = "schema_version")]
    pub v: u32,
    /// The path inside the container.
    pub path: String,
    /// The AEAD algorithm, e.g. `chacha20poly1305`.
    pub alg: String,
    /// Identifies the key the secret was sealed with.
    pub key_id: String,
    /// Base64 nonce.
    pub nonce: String,
    /// Base64 ciphertext with its tag.
    pub ciphertext: String,
    /// RFC 3339 time of the last change.
    #[serde(default)]
    pub updated_at: String,
}

/// Whether a path segment is `.` (`Some(false)`) or `..` (`Some(true)`), also when its dots
/// are percent-encoded (`%2e`), since an app decodes them and then reads them as dot
/// segments. The proxy resolves such segments before it matches a route.
pub fn dot_segment(seg: &str) -> Option<bool> {
    if seg.len() > 6 || seg.is_empty() {
        return None;
    }
    let mut dots = 0;
    let mut rest = seg.as_bytes();
    while !rest.is_empty() {
        if rest[0] == b'.' {
            rest = &rest[1..];
        } else if rest.len() >= 3 && rest[0] == b'%' && rest[1] == b'2' && rest[2] | 0x20 == b'e' {
            rest = &rest[3..];
        } else {
            return None;
        }
        dots += 1;
    }
    match dots {
        1 => Some(false),
        2 => Some(true),
        _ => None,
    }
}

/// Why a route path could never match a request, if it could not: the proxy merges runs of
/// `/` and resolves `.` and `..` before it matches, so a prefix with an empty or dot segment
/// (`/api//v1`, `/a/../b`) would never be found.
pub fn route_path_problem(path: &str) -> Option<String> {
    let inner = path.strip_prefix('/')?;
    let inner = inner.strip_suffix('/').unwrap_or(inner);
    if inner.is_empty() {
        return None;
    }
    inner.split('/').find_map(|seg| {
        if seg.is_empty() {
            Some(format!("path {path:?} has an empty segment ('//')"))
        } else if dot_segment(seg).is_some() {
            Some(format!("path {path:?} has a {seg:?} segment"))
        } else {
            None
        }
    })
}

fn non_empty(field: &str, value: &str) -> Result<(), String> {
    if value.trim().is_empty() {
        Err(format!("{field} must not be empty"))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_defaults_follow_lain() {
        let r: RouteRecord =
            decode(br#"{"v":1,"host":"hello.lain.local","app":"hello","proc":"web"}"#).unwrap();
        assert_eq!(r.path, "/");
        assert_eq!(r.timeouts.connect_ms, 90_000);
        assert_eq!(r.timeouts.write_ms, 900_000);
        assert_eq!(r.max_body_bytes, None);
        assert_eq!(r.balance, Balance::RoundRobin);
    }

    #[test]
    fn decode_rejects_unknown_version_fields_and_bad_contents() {
        let err = decode::<RouteRecord>(br#"{"v":2,"host":"h","app":"a","proc":"p"}"#).unwrap_err();
        assert!(err.to_string().contains("version 2"), "{err}");
        let err = decode::<RouteRecord>(br#"{"host":"h","app":"a","proc":"p"}"#).unwrap_err();
        assert!(err.to_string().contains("\"v\""), "{err}");
        let err =
            decode::<RouteRecord>(br#"{"v":1,"host":"h","app":"a","proc":"p","x":1}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
        let err = decode::<RouteRecord>(br#"{"v":1,"host":"h","path":"api","app":"a","proc":"p"}"#)
            .unwrap_err();
        assert!(err.to_string().contains("does not start with '/'"), "{err}");
        let err = decode::<RouteRecord>(br#"{"v":1,"host":"*.example.com","app":"a","proc":"p"}"#)
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("a route for \"example.com\" already matches it"),
            "{err}"
        );
        for (path, want) in [
            ("/api//v1", "empty segment"),
            ("/a/../b", "\"..\" segment"),
            ("/a/./b", "\".\" segment"),
            ("/a/%2E%2e", "\"%2E%2e\" segment"),
        ] {
            let doc = format!(r#"{{"v":1,"host":"h","path":"{path}","app":"a","proc":"p"}}"#);
            let err = decode::<RouteRecord>(doc.as_bytes()).unwrap_err();
            assert!(err.to_string().contains(want), "{path}: {err}");
        }
        for path in ["/", "/api", "/api/", "/a.b/..c/.well-known"] {
            let doc = format!(r#"{{"v":1,"host":"h","path":"{path}","app":"a","proc":"p"}}"#);
            assert!(decode::<RouteRecord>(doc.as_bytes()).is_ok(), "{path}");
        }
        let err = decode::<EndpointRecord>(
            br#"{"v":1,"app":"a","proc":"p","instance":0,"address":"127.0.0.1","port":80}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("start at 1"), "{err}");
        assert!(
            decode::<DnsRecord>(br#"{"v":1,"name":"x.lain","type":"A","data":"nope"}"#).is_err()
        );
        assert!(decode::<AppRecord>(b"not json").is_err());
    }

    #[test]
    fn records_round_trip() {
        let e = EndpointRecord {
            v: SCHEMA_VERSION,
            app: "hello".into(),
            proc_name: "web".into(),
            proc_type: "web".into(),
            instance: 2,
            node: "node1".into(),
            address: "127.0.0.1".parse().unwrap(),
            port: 8080,
            ports: BTreeMap::from([("http".to_string(), 8080)]),
            healthy: true,
            version: "1-abc".into(),
            container_id: "c".into(),
        };
        let back: EndpointRecord = decode(&encode(&e)).unwrap();
        assert_eq!(back, e);
        assert_eq!(back.podgroup(), "hello.web.web");
    }

    #[test]
    fn lain_names() {
        assert_eq!(podgroup("hello", "web", "web"), "hello.web.web");
        assert_eq!(appdomain("resource.redis.hello"), "hello.redis.resource");
        assert_eq!(appdomain("hello"), "hello");
    }
}
