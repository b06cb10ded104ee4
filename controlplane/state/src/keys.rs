//! The etcd key layout: every key lain reads or writes is built and parsed here and nowhere else.
//!
//! All keys live under one prefix (`/lain` by default) so that several clusters, or
//! several tests, can share one etcd without seeing each other. Below the prefix the tree
//! is split in two:
//!
//! * `{prefix}/state/...` is the cluster state the data plane serves. It is watched as one
//!   range, so every reader sees one consistent revision of it.
//! * `{prefix}/cp/...` holds records only the control plane needs (deploy history, events,
//!   secrets, credentials, leader election). Data-plane processes never watch it.
//!
//! Each object has its own key, so a change is one small watch event, never a rewrite of
//! a large blob. Free-form segments (route paths, file paths) are percent-encoded so that a
//! key always has a fixed number of `/`-separated segments.

use std::fmt;

/// The default key prefix of a lain cluster.
pub const DEFAULT_PREFIX: &str = "/lain";

/// The kinds of records under `{prefix}/state/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// An app's spec and current version: `state/apps/{app}`.
    App,
    /// An HTTP route claimed by a web proc: `state/routes/{app}/{proc}/{host+path}`.
    Route,
    /// One instance of a proc: `state/endpoints/{app}/{proc}/{instance}`.
    Endpoint,
    /// A TCP (stream) route: `state/streams/{listen_port}`.
    Stream,
    /// A static DNS record: `state/dns/{name}/{id}`.
    Dns,
    /// A service offered by an app: `state/services/{app}/{service}`.
    Service,
    /// The addresses of the edge proxies: `state/ingress/{id}`.
    Ingress,
    /// A TLS certificate served by the proxy: `state/certs/{name}`.
    Cert,
    /// A Docker engine: `state/nodes/{node}`.
    Node,
    /// A container the control plane runs, for log shippers: `state/containers/{node}/{id}`.
    Container,
}

impl Kind {
    /// Every kind, in the order they are listed in the documentation.
    pub const ALL: [Kind; 10] = [
        Kind::App,
        Kind::Route,
        Kind::Endpoint,
        Kind::Stream,
        Kind::Dns,
        Kind::Service,
        Kind::Ingress,
        Kind::Cert,
        Kind::Node,
        Kind::Container,
    ];

    /// The path segment of this kind below `{prefix}/state/`, also used as a metric label.
    pub const fn segment(self) -> &'static str {
        match self {
            Kind::App => "apps",
            Kind::Route => "routes",
            Kind::Endpoint => "endpoints",
            Kind::Stream => "streams",
            Kind::Dns => "dns",
            Kind::Service => "services",
            Kind::Ingress => "ingress",
            Kind::Cert => "certs",
            Kind::Node => "nodes",
            Kind::Container => "containers",
        }
    }

    /// How many segments follow the kind's own segment.
    const fn arity(self) -> usize {
        match self {
            Kind::App | Kind::Stream | Kind::Ingress | Kind::Cert | Kind::Node => 1,
            Kind::Dns | Kind::Service | Kind::Container => 2,
            Kind::Route | Kind::Endpoint => 3,
        }
    }

    fn from_segment(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.segment() == s)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.segment())
    }
}

/// A parsed key under `{prefix}/state/`: the kind and its identifying segments, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateKey {
    /// What sort of record the key holds.
    pub kind: Kind,
    /// The decoded segments after the kind, e.g. `[app, proc, "3"]` for an endpoint.
    pub parts: Vec<String>,
}

/// Why a key could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The key is not below this keyspace's state prefix.
    #[error("key {0:?} is not below the cluster-state prefix")]
    OutsidePrefix(String),
    /// The kind segment is not one lain knows.
    #[error("key {key:?} has unknown kind {kind:?}")]
    UnknownKind {
        /// The whole key.
        key: String,
        /// The segment that should have named a kind.
        kind: String,
    },
    /// The key has the wrong number of segments for its kind.
    #[error("key {key:?} should have {expected} segments after {kind}, has {found}")]
    Arity {
        /// The whole key.
        key: String,
        /// The kind named by the key.
        kind: Kind,
        /// Segments the kind needs.
        expected: usize,
        /// Segments the key has.
        found: usize,
    },
    /// A segment is empty or badly percent-encoded.
    #[error("key {key:?} has a malformed segment {segment:?}")]
    Segment {
        /// The whole key.
        key: String,
        /// The offending raw segment.
        segment: String,
    },
}

/// The key layout of one cluster, rooted at a prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keyspace {
    prefix: String,
}

impl Default for Keyspace {
    fn default() -> Self {
        Keyspace::new(DEFAULT_PREFIX)
    }
}

impl Keyspace {
    /// A keyspace rooted at `prefix`; a trailing `/` is ignored and a leading one added.
    pub fn new(prefix: &str) -> Keyspace {
        let trimmed = prefix.trim_end_matches('/');
        let prefix = if trimmed.starts_with('/') {
            trimmed.to_string()
        } else {
            format!("/{trimmed}")
        };
        Keyspace { prefix }
    }

    /// The root prefix, without a trailing `/`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The range the data plane watches: everything below `{prefix}/state/`.
    pub fn state_prefix(&self) -> String {
        format!("{}/state/", self.prefix)
    }

    /// The range of one kind, e.g. `{prefix}/state/routes/`.
    pub fn kind_prefix(&self, kind: Kind) -> String {
        format!("{}/state/{}/", self.prefix, kind.segment())
    }

    fn state_key(&self, kind: Kind, parts: &[&str]) -> String {
        let mut key = self.kind_prefix(kind);
        for (i, p) in parts.iter().enumerate() {
            if i > 0 {
                key.push('/');
            }
            encode_segment_into(p, &mut key);
        }
        key
    }

    /// `state/apps/{app}`.
    pub fn app(&self, app: &str) -> String {
        self.state_key(Kind::App, &[app])
    }

    /// `state/routes/{app}/{proc}/{host}{path}`: one key per (proc, host, path) claim, so two
    /// procs claiming one mountpoint are two keys and the reader decides which one wins.
    pub fn route(&self, app: &str, proc_name: &str, host: &str, path: &str) -> String {
        let id = format!("{}{}", host.to_ascii_lowercase(), path);
        self.state_key(Kind::Route, &[app, proc_name, &id])
    }

    /// The range holding every route of one proc.
    pub fn routes_of_proc(&self, app: &str, proc_name: &str) -> String {
        format!("{}/", self.state_key(Kind::Route, &[app, proc_name]))
    }

    /// `state/endpoints/{app}/{proc}/{instance}`.
    pub fn endpoint(&self, app: &str, proc_name: &str, instance: u32) -> String {
        self.state_key(Kind::Endpoint, &[app, proc_name, &instance.to_string()])
    }

    /// The range holding every endpoint of one proc.
    pub fn endpoints_of_proc(&self, app: &str, proc_name: &str) -> String {
        format!("{}/", self.state_key(Kind::Endpoint, &[app, proc_name]))
    }

    /// `state/streams/{listen_port}`.
    pub fn stream(&self, listen_port: u16) -> String {
        self.state_key(Kind::Stream, &[&listen_port.to_string()])
    }

    /// `state/dns/{name}/{id}`; `id` tells records of one name apart.
    pub fn dns(&self, name: &str, id: &str) -> String {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        self.state_key(Kind::Dns, &[&name, id])
    }

    /// `state/services/{app}/{service}`.
    pub fn service(&self, app: &str, service: &str) -> String {
        self.state_key(Kind::Service, &[app, service])
    }

    /// `state/ingress/{id}`.
    pub fn ingress(&self, id: &str) -> String {
        self.state_key(Kind::Ingress, &[id])
    }

    /// `state/certs/{name}`.
    pub fn cert(&self, name: &str) -> String {
        self.state_key(Kind::Cert, &[name])
    }

    /// `state/nodes/{node}`.
    pub fn node(&self, node: &str) -> String {
        self.state_key(Kind::Node, &[node])
    }

    /// `state/containers/{node}/{container_id}`.
    pub fn container(&self, node: &str, container_id: &str) -> String {
        self.state_key(Kind::Container, &[node, container_id])
    }

    /// The range of every record that belongs to one app, per kind that is grouped by app.
    pub fn app_ranges(&self, app: &str) -> Vec<String> {
        [Kind::Route, Kind::Endpoint, Kind::Service]
            .into_iter()
            .map(|k| format!("{}/", self.state_key(k, &[app])))
            .collect()
    }

    /// `cp/deploys/{app}/{seq}`: the deploy history, zero-padded so keys sort by sequence.
    pub fn deploy(&self, app: &str, seq: u64) -> String {
        self.cp_key(&["deploys", app, &format!("{seq:012}")])
    }

    /// The range of an app's deploy history.
    pub fn deploys_of_app(&self, app: &str) -> String {
        format!("{}/", self.cp_key(&["deploys", app]))
    }

    /// `cp/events/{app}/{seq}`: an app's event history.
    pub fn event(&self, app: &str, seq: u64) -> String {
        self.cp_key(&["events", app, &format!("{seq:012}")])
    }

    /// The range of an app's event history.
    pub fn events_of_app(&self, app: &str) -> String {
        format!("{}/", self.cp_key(&["events", app]))
    }

    /// `cp/secrets/{app}/{proc}/{path}`: one encrypted secret file.
    pub fn secret(&self, app: &str, proc_name: &str, path: &str) -> String {
        self.cp_key(&["secrets", app, proc_name, path])
    }

    /// The range of an app's secrets.
    pub fn secrets_of_app(&self, app: &str) -> String {
        format!("{}/", self.cp_key(&["secrets", app]))
    }

    /// The range of every secret of one proc.
    pub fn secrets_of_proc(&self, app: &str, proc_name: &str) -> String {
        format!("{}/", self.cp_key(&["secrets", app, proc_name]))
    }

    /// `cp/nodes/{node}`: a node's membership (its spec and whether it drains). It has no
    /// lease, unlike `state/nodes/{node}`, so a control plane that starts or takes over knows
    /// every node added at run time, even one that is down at that moment.
    pub fn node_member(&self, node: &str) -> String {
        self.cp_key(&["nodes", node])
    }

    /// The range of every node membership.
    pub fn node_members(&self) -> String {
        format!("{}/", self.cp_key(&["nodes"]))
    }

    /// `cp/lainyaml/{app}`: the lain.yaml text as registered, shown back by the API.
    pub fn lain_yaml(&self, app: &str) -> String {
        self.cp_key(&["lainyaml", app])
    }

    /// The range of every user.
    pub fn users(&self) -> String {
        format!("{}/", self.cp_key(&["users"]))
    }

    /// The range of every token.
    pub fn tokens(&self) -> String {
        format!("{}/", self.cp_key(&["tokens"]))
    }

    /// The range of every maintainer of every app.
    pub fn maintainers(&self) -> String {
        format!("{}/", self.cp_key(&["maintainers"]))
    }

    /// The range of the maintainers of one app.
    pub fn maintainers_of_app(&self, app: &str) -> String {
        format!("{}/", self.cp_key(&["maintainers", app]))
    }

    /// The range of the audit log.
    pub fn audits(&self) -> String {
        format!("{}/", self.cp_key(&["audit"]))
    }

    /// `cp/users/{name}`.
    pub fn user(&self, name: &str) -> String {
        self.cp_key(&["users", name])
    }

    /// `cp/tokens/{sha256 of the token}`: tokens are stored only as hashes.
    pub fn token(&self, token_hash: &str) -> String {
        self.cp_key(&["tokens", token_hash])
    }

    /// `cp/maintainers/{app}/{user}`.
    pub fn maintainer(&self, app: &str, user: &str) -> String {
        self.cp_key(&["maintainers", app, user])
    }

    /// `cp/audit/{seq}`: the audit log of mutating API calls.
    pub fn audit(&self, seq: u64) -> String {
        self.cp_key(&["audit", &format!("{seq:012}")])
    }

    /// `cp/election`: the leader election of control-plane replicas.
    pub fn election(&self) -> String {
        self.cp_key(&["election"])
    }

    /// `cp/counters/{name}`: monotonically increasing sequence numbers.
    pub fn counter(&self, name: &str) -> String {
        self.cp_key(&["counters", name])
    }

    fn cp_key(&self, parts: &[&str]) -> String {
        let mut key = format!("{}/cp", self.prefix);
        for p in parts {
            key.push('/');
            encode_segment_into(p, &mut key);
        }
        key
    }

    /// Parses a key below `{prefix}/state/` into its kind and decoded segments.
    pub fn parse(&self, key: &str) -> Result<StateKey, KeyError> {
        let state = self.state_prefix();
        let rest = key
            .strip_prefix(state.as_str())
            .ok_or_else(|| KeyError::OutsidePrefix(key.to_string()))?;
        let mut segments = rest.split('/');
        let kind_seg = segments.next().unwrap_or_default();
        let kind = Kind::from_segment(kind_seg).ok_or_else(|| KeyError::UnknownKind {
            key: key.to_string(),
            kind: kind_seg.to_string(),
        })?;
        let raw: Vec<&str> = segments.collect();
        if raw.len() != kind.arity() {
            return Err(KeyError::Arity {
                key: key.to_string(),
                kind,
                expected: kind.arity(),
                found: raw.len(),
            });
        }
        let parts = raw
            .iter()
            .map(|s| {
                decode_segment(s).ok_or_else(|| KeyError::Segment {
                    key: key.to_string(),
                    segment: s.to_string(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(StateKey { kind, parts })
    }
}

/// Characters that stand for themselves in a key segment; everything else is `%XX`.
fn is_plain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'*' | b':' | b'@')
}

fn encode_segment_into(s: &str, out: &mut String) {
    for b in s.bytes() {
        if is_plain(b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

/// Percent-encodes one key segment.
pub fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    encode_segment_into(s, &mut out);
    out
}

/// Decodes one percent-encoded key segment; `None` when it is empty or malformed.
pub fn decode_segment(s: &str) -> Option<String> {
    if s.is_empty() {
        return None;
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_is_normalised() {
        assert_eq!(Keyspace::new("lain/").prefix(), "/lain");
        assert_eq!(Keyspace::new("/t/x").state_prefix(), "/t/x/state/");
    }

    #[test]
    fn every_builder_round_trips_through_parse() {
        let ks = Keyspace::new("/lain");
        let cases: Vec<(String, Kind, Vec<&str>)> = vec![
            (ks.app("hello"), Kind::App, vec!["hello"]),
            (
                ks.route("hello", "web", "Hello.LAIN.local", "/api/v1"),
                Kind::Route,
                vec!["hello", "web", "hello.lain.local/api/v1"],
            ),
            (
                ks.endpoint("hello", "web", 3),
                Kind::Endpoint,
                vec!["hello", "web", "3"],
            ),
            (ks.stream(9501), Kind::Stream, vec!["9501"]),
            (ks.dns("db.lain.", "a1"), Kind::Dns, vec!["db.lain", "a1"]),
            (
                ks.service("redis", "redis"),
                Kind::Service,
                vec!["redis", "redis"],
            ),
            (ks.ingress("node1"), Kind::Ingress, vec!["node1"]),
            (ks.cert("*.lain.local"), Kind::Cert, vec!["*.lain.local"]),
            (ks.node("node1"), Kind::Node, vec!["node1"]),
            (
                ks.container("node1", "abc123"),
                Kind::Container,
                vec!["node1", "abc123"],
            ),
        ];
        for (key, kind, parts) in cases {
            let parsed = ks.parse(&key).unwrap_or_else(|e| panic!("{key}: {e}"));
            assert_eq!(parsed.kind, kind, "{key}");
            assert_eq!(parsed.parts, parts, "{key}");
        }
    }

    #[test]
    fn route_paths_with_slashes_and_percent_are_one_segment() {
        let ks = Keyspace::default();
        let key = ks.route("a", "web", "h", "/x/%2F y");
        assert_eq!(
            key.matches('/').count(),
            ks.kind_prefix(Kind::Route).matches('/').count() + 2
        );
        assert_eq!(ks.parse(&key).unwrap().parts[2], "h/x/%2F y");
    }

    #[test]
    fn malformed_keys_are_rejected_with_reason() {
        let ks = Keyspace::default();
        assert!(matches!(
            ks.parse("/other/state/apps/x"),
            Err(KeyError::OutsidePrefix(_))
        ));
        assert!(matches!(
            ks.parse("/lain/state/bogus/x"),
            Err(KeyError::UnknownKind { .. })
        ));
        assert!(matches!(
            ks.parse("/lain/state/endpoints/a/b"),
            Err(KeyError::Arity { .. })
        ));
        assert!(matches!(
            ks.parse("/lain/state/apps/%zz"),
            Err(KeyError::Segment { .. })
        ));
        assert!(matches!(
            ks.parse("/lain/state/apps/"),
            Err(KeyError::Segment { .. })
        ));
    }

    #[test]
    fn control_plane_keys_stay_outside_the_watched_range() {
        let ks = Keyspace::default();
        for key in [
            ks.secret("a", "web", "/etc/x"),
            ks.deploy("a", 1),
            ks.token("ff"),
            ks.election(),
        ] {
            assert!(!key.starts_with(&ks.state_prefix()), "{key}");
            assert!(key.starts_with("/lain/cp/"), "{key}");
        }
    }
}
