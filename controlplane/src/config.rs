//! The TOML configuration of `lain controlplane`: etcd, the cluster's domains, volumes,
//! ports, timing, the admin listener and the Docker engines to start with.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use lain_common::config::ConfigError;
use lain_state::Keyspace;
use serde::Deserialize;

use crate::engine::{EngineSettings, NodeSpec};

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// etcd client URLs.
    pub etcd_endpoints: Vec<String>,
    /// The key prefix of the cluster.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Domains web mountpoints are expanded onto.
    pub cluster_domains: Vec<String>,
    /// Root of the per-instance volume directories.
    pub volume_root: PathBuf,
    /// Lowest host-mode `PORT` handed out.
    #[serde(default = "default_port_min")]
    pub port_min: u16,
    /// Highest host-mode `PORT` handed out.
    #[serde(default = "default_port_max")]
    pub port_max: u16,
    /// Time between reconcile passes when nothing happens.
    #[serde(default = "default_tick_ms")]
    pub tick_ms: u64,
    /// How often a healthy instance is probed. An instance not yet healthy, or one whose
    /// last probe failed, is probed on every pass, so rollouts and failures are seen within
    /// a tick or two while a steady app is not probed several times a second.
    #[serde(default = "default_probe_interval_ms")]
    pub probe_interval_ms: u64,
    /// How long a new version may take to become healthy before it is rolled back.
    #[serde(default = "default_health_deadline_secs")]
    pub health_deadline_secs: u64,
    /// How long a node may fail to answer before its stateless instances move (sooner when
    /// its lease expires first).
    #[serde(default = "default_node_down_grace_secs")]
    pub node_down_grace_secs: u64,
    /// TTL of the node leases, renewed only while a node's engine answers: a node whose lease
    /// expired is lost for every control plane, including one that takes over.
    #[serde(default = "default_node_lease_ttl_secs")]
    pub node_lease_ttl_secs: u64,
    /// TTL of the leader-election lease: a dead leader is replaced within about this long.
    #[serde(default = "default_election_ttl_secs")]
    pub election_ttl_secs: u64,
    /// Bridge networking: the Docker network (present on every node) that instances join;
    /// each listens on its proc's port and is reached at its own address. Unset: host
    /// networking, with a `PORT` per instance from `port_min`..`port_max`.
    #[serde(default)]
    pub bridge_network: Option<String>,
    /// The admin listener (`/metrics`, `/healthz`, `/leader`).
    #[serde(default = "default_admin")]
    pub admin_listen: SocketAddr,
    /// The HTTP API listener (docs/api.md); every replica serves it.
    #[serde(default = "default_api")]
    pub api_listen: SocketAddr,
    /// The file holding the 32-byte key (64 hex digits) that seals secret files; without it
    /// secrets are disabled. `lain controlplane init` creates it (mode 0600).
    #[serde(default)]
    pub secret_key_file: Option<PathBuf>,
    /// The registry (`host:port`) a node pulls an image from when it lacks it; images are
    /// pushed there by `lain build --push`.
    #[serde(default)]
    pub registry: Option<String>,
    /// Docker engines registered at start.
    #[serde(default)]
    pub nodes: Vec<NodeConfig>,
}

/// One Docker engine.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// The node name.
    pub name: String,
    /// `unix:///path` or `tcp://127.0.0.1:port`.
    pub docker_host: String,
    /// Where its instances are reached.
    #[serde(default = "default_address")]
    pub address: IpAddr,
    /// Labels matched by `filters:`.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// CPU capacity in cores.
    #[serde(default = "default_cpus")]
    pub cpus: u32,
    /// Memory capacity in bytes.
    #[serde(default = "default_memory_bytes")]
    pub memory_bytes: u64,
}

fn default_prefix() -> String {
    lain_state::keys::DEFAULT_PREFIX.into()
}
fn default_port_min() -> u16 {
    20000
}
fn default_port_max() -> u16 {
    29999
}
fn default_tick_ms() -> u64 {
    250
}
fn default_probe_interval_ms() -> u64 {
    1000
}
fn default_health_deadline_secs() -> u64 {
    60
}
fn default_node_down_grace_secs() -> u64 {
    5
}
fn default_node_lease_ttl_secs() -> u64 {
    10
}
fn default_election_ttl_secs() -> u64 {
    3
}
fn default_admin() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}
fn default_api() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}
fn default_address() -> IpAddr {
    IpAddr::from([127, 0, 0, 1])
}
fn default_cpus() -> u32 {
    4
}
fn default_memory_bytes() -> u64 {
    8 << 30
}

impl lain_common::Validate for Config {
    fn validate(&self, errors: &mut Vec<ConfigError>) {
        if self.etcd_endpoints.is_empty() {
            errors.push(ConfigError::at(
                "etcd_endpoints",
                "list at least one etcd URL",
            ));
        }
        for (i, e) in self.etcd_endpoints.iter().enumerate() {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                errors.push(ConfigError::at(
                    format!("etcd_endpoints[{i}]"),
                    format!("{e:?} is not an http:// or https:// URL"),
                ));
            }
        }
        if self.cluster_domains.is_empty() {
            errors.push(ConfigError::at(
                "cluster_domains",
                "list at least one domain",
            ));
        }
        for (i, d) in self.cluster_domains.iter().enumerate() {
            let ok = !d.is_empty()
                && d.split('.').all(|l| {
                    !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                });
            if !ok {
                errors.push(ConfigError::at(
                    format!("cluster_domains[{i}]"),
                    format!("{d:?} is not a domain name"),
                ));
            }
        }
        if !self.volume_root.is_absolute() {
            errors.push(ConfigError::at("volume_root", "must be an absolute path"));
        }
        if self.port_min == 0 || self.port_min > self.port_max {
            errors.push(ConfigError::at(
                "port_min",
                "port_min must be positive and not above port_max",
            ));
        }
        if let Some(f) = &self.secret_key_file
            && !f.is_absolute()
        {
            errors.push(ConfigError::at(
                "secret_key_file",
                "must be an absolute path",
            ));
        }
        if self.tick_ms == 0 {
            errors.push(ConfigError::at("tick_ms", "must be positive"));
        }
        if self.probe_interval_ms == 0 {
            errors.push(ConfigError::at("probe_interval_ms", "must be positive"));
        }
        if self.health_deadline_secs == 0 {
            errors.push(ConfigError::at("health_deadline_secs", "must be positive"));
        }
        if self.node_lease_ttl_secs < 2 {
            errors.push(ConfigError::at("node_lease_ttl_secs", "must be at least 2"));
        }
        if self.election_ttl_secs < 2 {
            errors.push(ConfigError::at("election_ttl_secs", "must be at least 2"));
        }
        if let Some(n) = &self.bridge_network
            && (n.is_empty()
                || n == "host"
                || !n
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        {
            errors.push(ConfigError::at(
                "bridge_network",
                format!("{n:?} is not a Docker network name"),
            ));
        }
        if let Some(r) = &self.registry
            && (r.is_empty() || r.contains("://") || r.contains(char::is_whitespace))
        {
            errors.push(ConfigError::at(
                "registry",
                format!("{r:?} is not a registry address (host:port, without a scheme)"),
            ));
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, n) in self.nodes.iter().enumerate() {
            if !crate::lainyaml::valid_name(&n.name) {
                errors.push(ConfigError::at(
                    format!("nodes[{i}].name"),
                    format!("{:?} is not a valid node name", n.name),
                ));
            }
            if !names.insert(n.name.clone()) {
                errors.push(ConfigError::at(
                    format!("nodes[{i}].name"),
                    "duplicate node name",
                ));
            }
            if !(n.docker_host.starts_with("unix://") || n.docker_host.starts_with("tcp://")) {
                errors.push(ConfigError::at(
                    format!("nodes[{i}].docker_host"),
                    "must start with unix:// or tcp://",
                ));
            }
            if n.cpus == 0 || n.memory_bytes == 0 {
                errors.push(ConfigError::at(
                    format!("nodes[{i}]"),
                    "cpus and memory_bytes must be positive",
                ));
            }
        }
    }
}

impl Config {
    /// The engine settings this config describes.
    pub fn engine_settings(&self) -> EngineSettings {
        let mut s = EngineSettings::new(
            Keyspace::new(&self.prefix),
            self.cluster_domains.clone(),
            self.volume_root.clone(),
        );
        s.port_range = (self.port_min, self.port_max);
        s.tick = Duration::from_millis(self.tick_ms);
        s.probe_interval = Duration::from_millis(self.probe_interval_ms);
        s.health_deadline = Duration::from_secs(self.health_deadline_secs);
        s.node_down_grace = Duration::from_secs(self.node_down_grace_secs);
        s.node_lease_ttl = Duration::from_secs(self.node_lease_ttl_secs);
        if let Some(n) = &self.bridge_network {
            s.network = crate::engine::Network::Bridge(n.clone());
        }
        s.registry = self.registry.clone();
        s
    }

    /// The nodes to register at start.
    pub fn node_specs(&self) -> Vec<NodeSpec> {
        self.nodes
            .iter()
            .map(|n| NodeSpec {
                name: n.name.clone(),
                docker_host: n.docker_host.clone(),
                address: n.address,
                labels: n.labels.clone(),
                cpus: n.cpus,
                memory_bytes: n.memory_bytes,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_is_reported() {
        let text = r#"
etcd_endpoints = ["127.0.0.1:2379"]
cluster_domains = ["bad domain"]
volume_root = "relative"
port_min = 9
port_max = 8
tick_ms = 0
probe_interval_ms = 0
[[nodes]]
name = "n1"
docker_host = "ssh://x"
"#;
        let e = lain_common::parse_config::<Config>("cp.toml", text).unwrap_err();
        assert_eq!(e.errors.len(), 7, "{e}");
        let ok = lain_common::parse_config::<Config>(
            "cp.toml",
            "etcd_endpoints = [\"http://127.0.0.1:2379\"]\ncluster_domains = [\"lain.local\"]\nvolume_root = \"/tmp/v\"\n",
        )
        .unwrap();
        assert_eq!(ok.engine_settings().port_range, (20000, 29999));
        let unknown = lain_common::parse_config::<Config>("cp.toml", "bogus = 1\n").unwrap_err();
        assert!(unknown.to_string().contains("bogus"), "{unknown}");
    }
}
