//! The TOML configuration of `lain dns`: parsed with unknown keys rejected, validated purely,
//! then turned into the settings the zone compiler and the request handler use.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use hickory_proto::rr::Name;
use ipnet::IpNet;
use lain_common::{ConfigError, Validate};
use serde::Deserialize;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The address DNS is served on, over UDP and TCP on the same port.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The admin listener (`/metrics`, `/healthz`, `/zone`).
    #[serde(default = "default_admin")]
    pub admin_listen: SocketAddr,
    /// UDP sockets bound to the listen port with SO_REUSEPORT; the kernel spreads datagrams
    /// over them, and each is served by a thread of its own. 0 means one per CPU.
    #[serde(default)]
    pub udp_sockets: usize,
    /// Worker threads of the runtime that serves TCP, forwarding's background work, the
    /// state watcher and the admin listener (UDP has its own threads); 0 means one per CPU.
    #[serde(default)]
    pub worker_threads: usize,
    /// Questions whose encoded answers each UDP socket keeps, so a question asked again is
    /// answered without decoding or encoding; 0 turns the cache off.
    #[serde(default = "default_answer_cache_entries")]
    pub answer_cache_entries: usize,
    /// How long an idle TCP connection is kept.
    #[serde(default = "default_tcp_idle_ms")]
    pub tcp_idle_ms: u64,
    /// The largest UDP answer sent to EDNS clients, whatever size they advertise. 1232 avoids
    /// IP fragmentation (DNS flag day 2020).
    #[serde(default = "default_max_udp_payload_bytes")]
    pub max_udp_payload_bytes: u16,
    /// How long a shutdown waits for in-flight work.
    #[serde(default = "default_drain_ms")]
    pub drain_ms: u64,
    /// Log lines as JSON instead of text.
    #[serde(default)]
    pub log_json: bool,
    /// Where cluster state comes from.
    #[serde(default)]
    pub state: StateConfig,
    /// What the zones contain.
    #[serde(default)]
    pub zone: ZoneConfig,
    /// Per-client views of service names.
    #[serde(default)]
    pub views: ViewsConfig,
    /// Forwarding of names outside the cluster zones.
    #[serde(default)]
    pub forward: ForwardConfig,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 53))
}
fn default_admin() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9153))
}
fn default_answer_cache_entries() -> usize {
    16_384
}
fn default_tcp_idle_ms() -> u64 {
    5_000
}
fn default_max_udp_payload_bytes() -> u16 {
    1232
}
fn default_drain_ms() -> u64 {
    2_000
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: default_listen(),
            admin_listen: default_admin(),
            udp_sockets: 0,
            worker_threads: 0,
            answer_cache_entries: default_answer_cache_entries(),
            tcp_idle_ms: default_tcp_idle_ms(),
            max_udp_payload_bytes: default_max_udp_payload_bytes(),
            drain_ms: default_drain_ms(),
            log_json: false,
            state: StateConfig::default(),
            zone: ZoneConfig::default(),
            views: ViewsConfig::default(),
            forward: ForwardConfig::default(),
        }
    }
}

/// The cluster-state source: etcd, or a standalone file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// etcd client URLs; ignored when `file` is set.
    #[serde(default = "default_etcd")]
    pub etcd_endpoints: Vec<String>,
    /// The cluster's key prefix.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// A standalone state file (YAML or JSON) read instead of etcd.
    #[serde(default)]
    pub file: Option<PathBuf>,
}

fn default_etcd() -> Vec<String> {
    vec!["http://127.0.0.1:2379".into()]
}
fn default_prefix() -> String {
    lain_state::keys::DEFAULT_PREFIX.into()
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            etcd_endpoints: default_etcd(),
            prefix: default_prefix(),
            file: None,
        }
    }
}

/// The zones served and their records' parameters.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZoneConfig {
    /// The cluster domains; the first is the one PTR records point into.
    #[serde(default = "default_domains")]
    pub domains: Vec<String>,
    /// Reverse zones served authoritatively (with SOA), such as `10.in-addr.arpa`. PTR
    /// records of instances outside them are still answered, without SOA.
    #[serde(default)]
    pub reverse_zones: Vec<String>,
    /// TTL of every generated answer.
    #[serde(default = "default_ttl_secs")]
    pub ttl_secs: u32,
    /// Addresses of the name server `ns.{apex}` named in each apex's NS record.
    #[serde(default)]
    pub nameserver_addresses: Vec<IpAddr>,
    /// SOA parameters.
    #[serde(default)]
    pub soa: SoaConfig,
}

fn default_domains() -> Vec<String> {
    vec!["lain".into()]
}
fn default_ttl_secs() -> u32 {
    5
}

impl Default for ZoneConfig {
    fn default() -> Self {
        ZoneConfig {
            domains: default_domains(),
            reverse_zones: Vec::new(),
            ttl_secs: default_ttl_secs(),
            nameserver_addresses: Vec::new(),
            soa: SoaConfig::default(),
        }
    }
}

/// The SOA record at each apex.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SoaConfig {
    /// The mailbox of the zone's administrator, as a name (`hostmaster.lain`); by default
    /// `hostmaster.{apex}`.
    #[serde(default)]
    pub rname: Option<String>,
    /// Secondary refresh interval.
    #[serde(default = "default_refresh")]
    pub refresh_secs: u32,
    /// Secondary retry interval.
    #[serde(default = "default_retry")]
    pub retry_secs: u32,
    /// Secondary expiry.
    #[serde(default = "default_expire")]
    pub expire_secs: u32,
    /// The negative-caching TTL (RFC 2308).
    #[serde(default = "default_minimum")]
    pub minimum_secs: u32,
    /// The SOA record's own TTL.
    #[serde(default = "default_minimum")]
    pub ttl_secs: u32,
}

fn default_refresh() -> u32 {
    60
}
fn default_retry() -> u32 {
    10
}
fn default_expire() -> u32 {
    86_400
}
fn default_minimum() -> u32 {
    5
}

impl Default for SoaConfig {
    fn default() -> Self {
        SoaConfig {
            rname: None,
            refresh_secs: default_refresh(),
            retry_secs: default_retry(),
            expire_secs: default_expire(),
            minimum_secs: default_minimum(),
            ttl_secs: default_minimum(),
        }
    }
}

/// Per-client views.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ViewsConfig {
    /// When on, a query from a known instance sees only the service names its app declared.
    #[serde(default)]
    pub enabled: bool,
}

/// Forwarding to upstream resolvers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardConfig {
    /// Upstream resolvers (`ip:port`); empty turns forwarding off (REFUSED).
    #[serde(default)]
    pub upstreams: Vec<SocketAddr>,
    /// Client networks allowed to recurse; others get REFUSED for names outside the zones.
    #[serde(default = "default_allowed")]
    pub allowed_networks: Vec<IpNet>,
    /// Timeout of one upstream query.
    #[serde(default = "default_forward_timeout_ms")]
    pub timeout_ms: u64,
    /// Entries of the answer cache.
    #[serde(default = "default_cache_entries")]
    pub cache_entries: u64,
    /// Queries waiting for an upstream at once; beyond that, names not in the cache get
    /// SERVFAIL at once (a flood of new names towards a slow upstream would otherwise hold
    /// one task and its query each for `timeout_ms`, without bound).
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
}

fn default_allowed() -> Vec<IpNet> {
    [
        "127.0.0.0/8",
        "::1/128",
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
    ]
    .iter()
    .filter_map(|s| s.parse().ok())
    .collect()
}
fn default_forward_timeout_ms() -> u64 {
    2_000
}
fn default_cache_entries() -> u64 {
    4_096
}
fn default_max_in_flight() -> usize {
    1_024
}

impl Default for ForwardConfig {
    fn default() -> Self {
        ForwardConfig {
            upstreams: Vec::new(),
            allowed_networks: default_allowed(),
            timeout_ms: default_forward_timeout_ms(),
            cache_entries: default_cache_entries(),
            max_in_flight: default_max_in_flight(),
        }
    }
}

/// Parses a configured domain into an absolute, lower-case name.
pub fn parse_domain(s: &str) -> Result<Name, String> {
    let trimmed = s.trim().trim_end_matches('.');
    if trimmed.is_empty() {
        return Err("must not be empty (the root zone cannot be served)".into());
    }
    let mut name =
        Name::from_ascii(trimmed).map_err(|e| format!("{s:?} is not a domain name: {e}"))?;
    name.set_fqdn(true);
    // Generated names add up to four labels below a domain; leave them room.
    if name.len() > 200 {
        return Err(format!("{s:?} is too long to hold generated names"));
    }
    Ok(name.to_lowercase())
}

impl Validate for Config {
    fn validate(&self, errors: &mut Vec<ConfigError>) {
        if self.zone.domains.is_empty() {
            errors.push(ConfigError::at(
                "zone.domains",
                "at least one domain is needed",
            ));
        }
        let mut seen = Vec::new();
        for (i, d) in self.zone.domains.iter().enumerate() {
            match parse_domain(d) {
                Ok(n) => {
                    if seen.contains(&n) {
                        errors.push(ConfigError::at(
                            format!("zone.domains[{i}]"),
                            "listed twice",
                        ));
                    }
                    seen.push(n);
                }
                Err(e) => errors.push(ConfigError::at(format!("zone.domains[{i}]"), e)),
            }
        }
        for (i, d) in self.zone.reverse_zones.iter().enumerate() {
            match parse_domain(d) {
                Ok(n) => {
                    let arpa = Name::from_ascii("arpa.").unwrap_or_else(|_| Name::root());
                    if !arpa.zone_of(&n) {
                        errors.push(ConfigError::at(
                            format!("zone.reverse_zones[{i}]"),
                            "must be below in-addr.arpa or ip6.arpa",
                        ));
                    }
                }
                Err(e) => errors.push(ConfigError::at(format!("zone.reverse_zones[{i}]"), e)),
            }
        }
        if let Some(r) = &self.zone.soa.rname
            && let Err(e) = parse_domain(r)
        {
            errors.push(ConfigError::at("zone.soa.rname", e));
        }
        if self.zone.soa.refresh_secs > i32::MAX as u32
            || self.zone.soa.retry_secs > i32::MAX as u32
            || self.zone.soa.expire_secs > i32::MAX as u32
        {
            errors.push(ConfigError::at(
                "zone.soa",
                "intervals must be below 2^31 seconds",
            ));
        }
        if self.max_udp_payload_bytes < 512 {
            errors.push(ConfigError::at(
                "max_udp_payload_bytes",
                "must be at least 512",
            ));
        }
        if self.udp_sockets > 64 {
            errors.push(ConfigError::at("udp_sockets", "must be at most 64"));
        }
        if self.answer_cache_entries > 1 << 24 {
            errors.push(ConfigError::at(
                "answer_cache_entries",
                "must be at most 16777216",
            ));
        }
        if self.worker_threads > 256 {
            errors.push(ConfigError::at("worker_threads", "must be at most 256"));
        }
        if self.tcp_idle_ms == 0 {
            errors.push(ConfigError::at("tcp_idle_ms", "must be positive"));
        }
        if self.forward.timeout_ms == 0 {
            errors.push(ConfigError::at("forward.timeout_ms", "must be positive"));
        }
        if self.forward.max_in_flight == 0 {
            errors.push(ConfigError::at("forward.max_in_flight", "must be positive"));
        }
        if self.state.file.is_none() && self.state.etcd_endpoints.is_empty() {
            errors.push(ConfigError::at(
                "state.etcd_endpoints",
                "needs at least one endpoint unless state.file is set",
            ));
        }
        for (i, e) in self.state.etcd_endpoints.iter().enumerate() {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                errors.push(ConfigError::at(
                    format!("state.etcd_endpoints[{i}]"),
                    format!("{e:?} is not an http:// or https:// URL"),
                ));
            }
        }
        if !self.state.prefix.starts_with('/') {
            errors.push(ConfigError::at("state.prefix", "must start with '/'"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lain_common::parse_config;

    #[test]
    fn empty_file_gives_defaults() {
        let c: Config = parse_config("dns.toml", "").unwrap();
        assert_eq!(c.zone.ttl_secs, 5);
        assert_eq!(c.zone.domains, vec!["lain".to_string()]);
        assert!(c.forward.upstreams.is_empty());
        assert!(!c.views.enabled);
    }

    #[test]
    fn every_error_is_reported() {
        let text = "max_udp_payload_bytes = 100\nbogus = 1\n[zone]\ndomains = [\"lain\", \"\", \"lain.\"]\nreverse_zones = [\"example.com\"]\n[state]\netcd_endpoints = [\"127.0.0.1:2379\"]\nprefix = \"x\"\n";
        let err = parse_config::<Config>("dns.toml", text).unwrap_err();
        assert_eq!(err.errors.len(), 1, "{err}");
        assert_eq!(err.errors[0].path, "bogus");
        let text = text.replace("bogus = 1\n", "");
        let err = parse_config::<Config>("dns.toml", &text).unwrap_err();
        let paths: Vec<&str> = err.errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            vec![
                "zone.domains[1]",
                "zone.domains[2]",
                "zone.reverse_zones[0]",
                "max_udp_payload_bytes",
                "state.etcd_endpoints[0]",
                "state.prefix"
            ],
            "{err}"
        );
    }

    #[test]
    fn domains_are_normalised() {
        assert_eq!(
            parse_domain("Lain.Local.").unwrap().to_ascii(),
            "lain.local."
        );
        assert!(parse_domain(".").is_err());
        assert!(parse_domain(&"a".repeat(64)).is_err());
    }
}
