//! The `lain proxy` configuration file (TOML): listeners, where cluster state comes from,
//! the access log, trusted proxies and upstream behaviour.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use lain_common::{ConfigError, Validate};
use serde::Deserialize;

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Listening addresses.
    #[serde(default)]
    pub listen: Listen,
    /// Where routes and endpoints come from.
    #[serde(default)]
    pub state: StateConfig,
    /// The access log.
    #[serde(default)]
    pub access_log: AccessLogConfig,
    /// Peers whose `X-Forwarded-*` headers are believed, as CIDRs (`10.0.0.0/8`, `::1/128`).
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// Upstream connection behaviour.
    #[serde(default)]
    pub upstream: UpstreamConfig,
    /// TLS on the https listener.
    #[serde(default)]
    pub tls: TlsConfig,
    /// TCP routes (stream ports).
    #[serde(default)]
    pub stream: StreamConfig,
    /// Worker threads serving clients, each with its own runtime and upstream connection
    /// pool; the number of CPUs when 0.
    #[serde(default)]
    pub threads: usize,
    /// Largest request header block (request line and headers) accepted; larger ones get
    /// 431. At most 1 MiB - 1, pingora's own limit.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    /// How long a client has to send a complete request header (from the connection's
    /// start for its first request, from the first byte for later ones) before the
    /// connection is closed.
    #[serde(default = "default_header_timeout_secs")]
    pub header_timeout_secs: u64,
    /// How long a shutdown waits for requests in flight.
    #[serde(default = "default_drain_secs")]
    pub drain_secs: u64,
    /// Whether HTTP/1.1 requests, plain or over TLS, are served by lain's own HTTP/1.1
    /// path (`h1`), which costs less CPU per request than pingora's; everything else (and
    /// every request when this is off) goes through pingora.
    #[serde(default = "default_true")]
    pub h1_fast_path: bool,
    /// How many tasks (one step of one connection each) a worker runs before it looks for
    /// new network events again; tokio's own default, 61, unless set. 1 looks after every
    /// step, which costs a non-blocking `epoll_wait` per step: on the benchmark machine, at
    /// one saturated worker, about 10 % more CPU per request, and in 18 paired rounds no
    /// lower p99 than 61 (see the README's proxy benchmark).
    #[serde(default = "default_event_interval")]
    pub event_interval: u32,
}

fn default_event_interval() -> u32 {
    61
}

fn default_true() -> bool {
    true
}

fn default_max_header_bytes() -> usize {
    64 * 1024
}

fn default_header_timeout_secs() -> u64 {
    60
}

/// pingora's own ceiling on a request header block.
pub const MAX_HEADER_BYTES_LIMIT: usize = 1_048_575;

fn default_drain_secs() -> u64 {
    30
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: Listen::default(),
            state: StateConfig::default(),
            access_log: AccessLogConfig::default(),
            trusted_proxies: Vec::new(),
            upstream: UpstreamConfig::default(),
            tls: TlsConfig::default(),
            stream: StreamConfig::default(),
            threads: 0,
            max_header_bytes: default_max_header_bytes(),
            header_timeout_secs: default_header_timeout_secs(),
            drain_secs: default_drain_secs(),
            h1_fast_path: true,
            event_interval: default_event_interval(),
        }
    }
}

/// Listening addresses; port 0 picks a free port, announced on stdout.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    /// Plain HTTP.
    #[serde(default = "default_http")]
    pub http: SocketAddr,
    /// HTTPS (HTTP/1.1 and HTTP/2 by ALPN); no TLS listener when absent.
    #[serde(default)]
    pub https: Option<SocketAddr>,
    /// The admin listener: `/healthz`, `/metrics`, `/routes`.
    #[serde(default = "default_admin")]
    pub admin: SocketAddr,
    /// Also accept HTTP/2 with prior knowledge (h2c) on the plain listener.
    #[serde(default)]
    pub h2c: bool,
    /// A unix socket where this proxy hands its listeners to a successor started with
    /// `lain proxy --upgrade` (zero-downtime binary upgrade); no upgrades when absent.
    #[serde(default)]
    pub upgrade_socket_path: Option<PathBuf>,
}

fn default_http() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 80))
}
fn default_admin() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9080))
}

impl Default for Listen {
    fn default() -> Self {
        Listen {
            http: default_http(),
            https: None,
            admin: default_admin(),
            h2c: false,
            upgrade_socket_path: None,
        }
    }
}

/// TLS settings. Certificates come from etcd (`state/certs/`) and from these files.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Offer HTTP/2 by ALPN.
    #[serde(default = "yes")]
    pub h2: bool,
    /// How long a client may take to finish the TLS handshake.
    #[serde(default = "default_handshake_secs")]
    pub handshake_timeout_secs: u64,
    /// Certificates loaded from files; the first is the default for unknown names.
    #[serde(default)]
    pub certs: Vec<TlsFile>,
    /// How often the certificate files are checked for changes, which are served from the
    /// next handshake on; 0 reads them only at start.
    #[serde(default = "default_files_check_secs")]
    pub files_check_secs: u64,
}

fn default_files_check_secs() -> u64 {
    5
}

fn yes() -> bool {
    true
}
fn default_handshake_secs() -> u64 {
    10
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            h2: true,
            handshake_timeout_secs: default_handshake_secs(),
            certs: Vec::new(),
            files_check_secs: default_files_check_secs(),
        }
    }
}

/// TCP routes: the ports `state/streams/` records may open and how they are reached.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamConfig {
    /// The address stream ports listen on.
    #[serde(default = "default_stream_ip")]
    pub listen_ip: IpAddr,
    /// The lowest port a stream record may claim (LAIN: 9500).
    #[serde(default = "default_stream_port_min")]
    pub port_min: u16,
    /// The highest port a stream record may claim (LAIN: 10000).
    #[serde(default = "default_stream_port_max")]
    pub port_max: u16,
    /// How long connecting to one endpoint may take before the next one is tried.
    #[serde(default = "default_stream_connect_secs")]
    pub connect_timeout_secs: u64,
    /// How long a forwarded connection may carry nothing either way before it is closed
    /// (nginx's `proxy_timeout`, 10 minutes by default as there).
    #[serde(default = "default_stream_idle_secs")]
    pub idle_timeout_secs: u64,
}

fn default_stream_ip() -> IpAddr {
    IpAddr::from([0, 0, 0, 0])
}
fn default_stream_port_min() -> u16 {
    9500
}
fn default_stream_port_max() -> u16 {
    10000
}
fn default_stream_connect_secs() -> u64 {
    5
}
fn default_stream_idle_secs() -> u64 {
    600
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            listen_ip: default_stream_ip(),
            port_min: default_stream_port_min(),
            port_max: default_stream_port_max(),
            connect_timeout_secs: default_stream_connect_secs(),
            idle_timeout_secs: default_stream_idle_secs(),
        }
    }
}

/// A certificate chain and key in PEM files.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFile {
    /// Server names (exact or `*.` wildcard) it is chosen for.
    pub names: Vec<String>,
    /// The PEM chain, leaf first.
    pub cert_path: PathBuf,
    /// The PEM private key.
    pub key_path: PathBuf,
}

/// Where cluster state is read from: etcd, or a standalone file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// etcd client URLs.
    #[serde(default)]
    pub etcd_endpoints: Vec<String>,
    /// The cluster's key prefix.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// A standalone routes file (YAML or JSON) used instead of etcd.
    #[serde(default)]
    pub routes_file: Option<PathBuf>,
}

fn default_prefix() -> String {
    lain_state::keys::DEFAULT_PREFIX.to_string()
}

/// Where access-log lines go.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLogConfig {
    /// A file path, `-` for stdout, or empty to disable.
    #[serde(default = "default_access_log")]
    pub path: String,
    /// Lines buffered before new ones are dropped (and counted) rather than slow requests.
    #[serde(default = "default_buffer_lines")]
    pub buffer_lines: usize,
}

fn default_access_log() -> String {
    "-".into()
}
fn default_buffer_lines() -> usize {
    65_536
}

impl Default for AccessLogConfig {
    fn default() -> Self {
        AccessLogConfig {
            path: default_access_log(),
            buffer_lines: default_buffer_lines(),
        }
    }
}

/// Upstream connection behaviour.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Attempts after the first when connecting fails (another endpoint each time).
    #[serde(default = "default_retries")]
    pub max_retries: usize,
    /// Idle keep-alive upstream connections kept by each worker thread (each has its own
    /// pool, as each nginx worker has).
    #[serde(default = "default_pool")]
    pub keepalive_pool_size: usize,
    /// How long an idle upstream connection is kept.
    #[serde(default = "default_idle_secs")]
    pub keepalive_idle_secs: u64,
    /// Consecutive failures (connect errors or 5xx) that eject an endpoint; 0 disables.
    #[serde(default = "default_eject_failures")]
    pub eject_after_failures: u32,
    /// How long an ejected endpoint stays out before it is tried again.
    #[serde(default = "default_eject_ms")]
    pub eject_ms: u64,
}

fn default_retries() -> usize {
    3
}
fn default_pool() -> usize {
    512
}
fn default_idle_secs() -> u64 {
    60
}
fn default_eject_failures() -> u32 {
    5
}
fn default_eject_ms() -> u64 {
    10_000
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            max_retries: default_retries(),
            keepalive_pool_size: default_pool(),
            keepalive_idle_secs: default_idle_secs(),
            eject_after_failures: default_eject_failures(),
            eject_ms: default_eject_ms(),
        }
    }
}

/// An IP network, `addr/len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    len: u8,
}

impl Cidr {
    /// Parses `10.0.0.0/8`, `::1/128`, or a bare address (a single host).
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (a, l) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = a
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not an IP network"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match l {
            Some(l) => l
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| format!("{s:?} has a prefix length outside 0..={max}"))?,
            None => max,
        };
        Ok(Cidr { addr, len })
    }

    /// Whether `ip` is inside the network. IPv4-mapped IPv6 addresses match IPv4 networks.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.len))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl Validate for Config {
    fn validate(&self, errors: &mut Vec<ConfigError>) {
        for (i, c) in self.trusted_proxies.iter().enumerate() {
            if let Err(e) = Cidr::parse(c) {
                errors.push(ConfigError::at(format!("trusted_proxies[{i}]"), e));
            }
        }
        let s = &self.state;
        // A missing source is checked after command-line overrides (`--routes`).
        if !s.etcd_endpoints.is_empty() && s.routes_file.is_some() {
            errors.push(ConfigError::at(
                "state.routes_file",
                "set either etcd_endpoints or routes_file, not both",
            ));
        }
        for (i, e) in s.etcd_endpoints.iter().enumerate() {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                errors.push(ConfigError::at(
                    format!("state.etcd_endpoints[{i}]"),
                    format!("{e:?} is not an http:// or https:// URL"),
                ));
            }
        }
        if self.access_log.buffer_lines == 0 {
            errors.push(ConfigError::at(
                "access_log.buffer_lines",
                "must be at least 1",
            ));
        }
        if self.listen.http == self.listen.admin && self.listen.http.port() != 0 {
            errors.push(ConfigError::at(
                "listen.admin",
                "must differ from listen.http",
            ));
        }
        for (i, f) in self.tls.certs.iter().enumerate() {
            if f.names.is_empty() {
                errors.push(ConfigError::at(
                    format!("tls.certs[{i}].names"),
                    "must name at least one server name",
                ));
            }
        }
        if self.tls.handshake_timeout_secs == 0 {
            errors.push(ConfigError::at(
                "tls.handshake_timeout_secs",
                "must be positive",
            ));
        }
        if self.stream.port_min == 0 || self.stream.port_min > self.stream.port_max {
            errors.push(ConfigError::at(
                "stream.port_min",
                "must be positive and at most stream.port_max",
            ));
        }
        if self.stream.connect_timeout_secs == 0 {
            errors.push(ConfigError::at(
                "stream.connect_timeout_secs",
                "must be positive",
            ));
        }
        if self.stream.idle_timeout_secs == 0 {
            errors.push(ConfigError::at(
                "stream.idle_timeout_secs",
                "must be positive",
            ));
        }
        if self.header_timeout_secs == 0 {
            errors.push(ConfigError::at("header_timeout_secs", "must be positive"));
        }
        if !(256..=MAX_HEADER_BYTES_LIMIT).contains(&self.max_header_bytes) {
            errors.push(ConfigError::at(
                "max_header_bytes",
                format!("must be between 256 and {MAX_HEADER_BYTES_LIMIT}"),
            ));
        }
        if self.threads > 1024 {
            errors.push(ConfigError::at("threads", "must be at most 1024"));
        }
        if !(1..=1024).contains(&self.event_interval) {
            errors.push(ConfigError::at(
                "event_interval",
                "must be between 1 and 1024",
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs() {
        let c = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(c.contains("10.1.2.3".parse().unwrap()));
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        assert!(c.contains("::ffff:10.0.0.1".parse().unwrap()));
        let all = Cidr::parse("0.0.0.0/0").unwrap();
        assert!(all.contains("1.2.3.4".parse().unwrap()));
        let one = Cidr::parse("127.0.0.1").unwrap();
        assert!(one.contains("127.0.0.1".parse().unwrap()));
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        let v6 = Cidr::parse("fd00::/8").unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!(!v6.contains("10.0.0.1".parse().unwrap()));
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("nope").is_err());
    }

    #[test]
    fn every_error_is_reported_and_located() {
        let text = "trusted_proxies = [\"10.0.0.0/8\", \"bad\"]\nevent_interval = 0\n[state]\netcd_endpoints = [\"127.0.0.1:2379\"]\nroutes_file = \"r.yaml\"\n";
        let err = lain_common::parse_config::<Config>("p.toml", text).unwrap_err();
        let paths: Vec<_> = err.errors.iter().map(|e| e.path.as_str()).collect();
        assert!(paths.contains(&"trusted_proxies[1]"), "{err}");
        assert!(paths.contains(&"state.routes_file"), "{err}");
        assert!(paths.contains(&"state.etcd_endpoints[0]"), "{err}");
        assert!(paths.contains(&"event_interval"), "{err}");
        let err =
            lain_common::parse_config::<Config>("p.toml", "[listen]\nhttps2 = 1\n").unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    #[test]
    fn minimal_config_parses() {
        let c: Config = lain_common::parse_config(
            "p.toml",
            "[state]\netcd_endpoints = [\"http://127.0.0.1:2379\"]\n",
        )
        .unwrap();
        assert_eq!(c.upstream.max_retries, 3);
        assert_eq!(c.access_log.path, "-");
        assert_eq!(c.event_interval, 61);
    }
}
