//! The route table: routes and endpoints compiled from a cluster-state snapshot into an
//! immutable structure that request handlers read without locks.
//!
//! Matching follows LAIN's mountpoint semantics (nginx `server_name .host` plus `location`):
//!
//! * A route's host matches itself and every subdomain of it. The most specific host wins:
//!   an exact host beats any suffix, and a longer suffix beats a shorter one. Host matching
//!   ignores case, a port and a trailing dot.
//! * Once a host is chosen, the longest path prefix among that host's routes wins. A prefix
//!   matches on segment boundaries (`/api` matches `/api` and `/api/x`, not `/apix`). If no
//!   prefix of the chosen host matches, the request has no route (as nginx would answer from
//!   the selected server block, not from a less specific one).
//! * The matched prefix is stripped before the request goes upstream: `/api/users` on
//!   mountpoint `/api` reaches the app as `/users`.
//! * When two procs claim the same host and path, the claim whose etcd key was created first
//!   wins; the newer claim is rejected, logged and counted, and the existing route keeps
//!   serving.
//!
//! A table is never modified after it is built. A new snapshot compiles a new table, which is
//! published with `arc-swap`; a request holds the `Arc` of the route it matched, so it
//! finishes on the table it started with.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use lain_state::{Balance, Snapshot, Timeouts};
use serde::Serialize;

use crate::upstream::{Endpoint, EndpointStats, UpstreamGroup};

/// One compiled HTTP route.
#[derive(Debug)]
pub struct Route {
    /// The normalised host.
    pub host: Box<str>,
    /// The normalised path prefix: `/` or a prefix without a trailing `/`.
    pub path: Box<str>,
    /// The owning app.
    pub app: Box<str>,
    /// The web proc receiving the traffic.
    pub proc_name: Box<str>,
    /// `host/path` as shown in logs and metrics.
    pub name: Box<str>,
    /// The etcd key of the claim.
    pub key: Box<str>,
    /// The etcd create revision of the claim (lower is older).
    pub create_revision: i64,
    /// Answer plain HTTP with a redirect to HTTPS.
    pub https_only: bool,
    /// Upstream timeouts.
    pub timeouts: Timeouts,
    /// Largest request body accepted, if limited.
    pub max_body_bytes: Option<u64>,
    /// How requests are spread over the endpoints.
    pub balance: Balance,
    /// The proc's endpoints.
    pub upstream: Arc<UpstreamGroup>,
}

impl Route {
    /// The path to send upstream for a request path that this route matched.
    pub fn strip<'a>(&self, path: &'a str) -> &'a str {
        if &*self.path == "/" {
            return path;
        }
        match path.get(self.path.len()..) {
            Some(rest) if rest.starts_with('/') => rest,
            _ => "/",
        }
    }
}

/// A claim that lost to an older claim on the same host and path.
#[derive(Debug, Clone, Serialize)]
pub struct RejectedClaim {
    /// The etcd key of the rejected claim.
    pub key: String,
    /// `host/path` claimed.
    pub route: String,
    /// The key that keeps the route.
    pub kept: String,
}

#[derive(Debug, Default)]
struct HostRoutes {
    /// Sorted by path length, longest first, so the first match is the longest prefix.
    routes: Vec<Arc<Route>>,
}

/// The compiled, immutable route table.
#[derive(Debug, Default)]
pub struct RouteTable {
    /// Bumped on every compile; 0 for the empty table at start.
    pub version: u64,
    /// The etcd revision of the snapshot it was compiled from.
    pub revision: i64,
    /// Probed once or twice per request with the request's host, so hashed with foldhash
    /// rather than SipHash: SipHash's resistance to flooding protects maps whose keys an
    /// attacker can insert, and these keys come only from the cluster state.
    hosts: foldhash::HashMap<Box<str>, HostRoutes>,
    routes: usize,
    rejected: Vec<RejectedClaim>,
    groups: HashMap<(Box<str>, Box<str>), Arc<UpstreamGroup>>,
}

/// The result of a lookup: the route and the path to send upstream.
#[derive(Debug)]
pub struct Matched<'a> {
    /// The route.
    pub route: &'a Arc<Route>,
    /// The request path with the route's prefix stripped.
    pub upstream_path: &'a str,
}

/// Lower-cases a host and removes a port and a trailing dot. Borrowed when nothing changes.
pub fn normalise_host(host: &str) -> std::borrow::Cow<'_, str> {
    let host = strip_port(host.trim());
    let host = host.trim_end_matches('.');
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(host.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(host)
    }
}

fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        // An IPv6 literal: `[::1]:8080`.
        return match rest.find(']') {
            Some(end) => &host[..end + 2],
            None => host,
        };
    }
    match host.rfind(':') {
        Some(i) if host[i + 1..].bytes().all(|b| b.is_ascii_digit()) => &host[..i],
        _ => host,
    }
}

/// Normalises a route path: `/` stays, a trailing `/` is removed otherwise.
pub fn normalise_path(path: &str) -> &str {
    let trimmed = path.trim_end_matches('/');
    if trimmed.is_empty() { "/" } else { trimmed }
}

/// A request path with `..` segments that climb above the root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AboveRoot;

/// The request path routes are matched against and the upstream is sent: runs of `/`
/// merged into one and `.` and `..` segments resolved (RFC 3986 §5.2.4), as nginx does
/// before it matches a location. Without this, `/static/../api/x` would reach the app
/// mounted at `/static` although it names `/api/x`, and `/api//evil.example/x` would reach
/// the app at `/api` as `//evil.example/x`, which many frameworks read as a host. Borrowed
/// when the path is already clean, which is the case for nearly every request; an error
/// when `..` climbs above the root (nginx answers that 400 too).
pub fn clean_request_path(path: &str) -> Result<std::borrow::Cow<'_, str>, AboveRoot> {
    let b = path.as_bytes();
    let suspect = b
        .windows(2)
        .any(|w| w[0] == b'/' && matches!(w[1], b'/' | b'.' | b'%'));
    if !suspect || !path.starts_with('/') {
        return Ok(std::borrow::Cow::Borrowed(path));
    }
    let mut segs: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    let mut parts = path[1..].split('/').peekable();
    while let Some(seg) = parts.next() {
        let last = parts.peek().is_none();
        match lain_state::dot_segment(seg) {
            Some(up) => {
                if up && segs.pop().is_none() {
                    return Err(AboveRoot);
                }
                trailing_slash = last;
            }
            None if seg.is_empty() => trailing_slash = last,
            None => {
                segs.push(seg);
                trailing_slash = false;
            }
        }
    }
    let mut clean = String::with_capacity(path.len());
    for seg in &segs {
        clean.push('/');
        clean.push_str(seg);
    }
    if trailing_slash || segs.is_empty() {
        clean.push('/');
    }
    if clean == path {
        Ok(std::borrow::Cow::Borrowed(path))
    } else {
        Ok(std::borrow::Cow::Owned(clean))
    }
}

/// Whether `prefix` (normalised) matches `path` on a segment boundary.
fn path_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

impl RouteTable {
    /// Compiles a table from a snapshot. `previous` lends its per-endpoint state (in-flight
    /// counts, health) to endpoints that are still present, so a table swap does not reset
    /// load balancing or health.
    pub fn compile(snap: &Snapshot, previous: &RouteTable, version: u64) -> RouteTable {
        // Keyed by proc as well as address: a container of another app that gets a removed
        // one's address starts afresh instead of inheriting its ejection or health.
        let mut stats: HashMap<(&str, &str, SocketAddr), Arc<EndpointStats>> = HashMap::new();
        for g in previous.groups.values() {
            for e in &g.endpoints {
                stats.insert((&g.app, &g.proc_name, e.addr), e.stats.clone());
            }
        }

        // Endpoints grouped by (app, proc), sorted by instance for stable order.
        let mut endpoints: HashMap<(Box<str>, Box<str>), Vec<Endpoint>> = HashMap::new();
        for item in snap.endpoints.values() {
            let e = &item.value;
            let addr = SocketAddr::new(e.address, e.port);
            let st = stats
                .get(&(e.app.as_str(), e.proc_name.as_str(), addr))
                .cloned()
                .unwrap_or_default();
            endpoints
                .entry((e.app.as_str().into(), e.proc_name.as_str().into()))
                .or_default()
                .push(Endpoint {
                    addr,
                    instance: e.instance,
                    declared_healthy: e.healthy,
                    stats: st,
                });
        }

        // Claims sorted oldest first; the first claim of a host+path wins.
        let mut claims: Vec<_> = snap.routes.values().collect();
        claims.sort_by(|a, b| (a.create_revision, &a.key).cmp(&(b.create_revision, &b.key)));

        let mut groups: HashMap<(Box<str>, Box<str>), Arc<UpstreamGroup>> = HashMap::new();
        let mut hosts: foldhash::HashMap<Box<str>, HostRoutes> = foldhash::HashMap::default();
        let mut owners: HashMap<(Box<str>, Box<str>), Box<str>> = HashMap::new();
        let mut rejected = Vec::new();
        let mut count = 0;
        for item in claims {
            let r = &item.value;
            let host: Box<str> = normalise_host(r.host.trim_start_matches('.')).into();
            let path: Box<str> = normalise_path(&r.path).into();
            let name: Box<str> = if &*path == "/" {
                host.clone()
            } else {
                format!("{host}{path}").into()
            };
            let claim = (host.clone(), path.clone());
            if let Some(kept) = owners.get(&claim) {
                rejected.push(RejectedClaim {
                    key: item.key.clone(),
                    route: name.to_string(),
                    kept: kept.to_string(),
                });
                continue;
            }
            owners.insert(claim, item.key.as_str().into());
            let gkey: (Box<str>, Box<str>) = (r.app.as_str().into(), r.proc_name.as_str().into());
            let group = groups
                .entry(gkey.clone())
                .or_insert_with(|| {
                    let group = UpstreamGroup::new(
                        &gkey.0,
                        &gkey.1,
                        endpoints.remove(&gkey).unwrap_or_default(),
                    );
                    if let Some(before) = previous.groups.get(&gkey) {
                        group.continue_from(before);
                    }
                    Arc::new(group)
                })
                .clone();
            if let Some(hc) = &r.healthcheck {
                group.set_healthcheck(hc.clone(), &host);
            }
            let route = Arc::new(Route {
                host: host.clone(),
                path,
                app: r.app.as_str().into(),
                proc_name: r.proc_name.as_str().into(),
                name,
                key: item.key.as_str().into(),
                create_revision: item.create_revision,
                https_only: r.https_only,
                timeouts: r.timeouts,
                max_body_bytes: r.max_body_bytes,
                balance: r.balance.clone(),
                upstream: group,
            });
            hosts.entry(host).or_default().routes.push(route);
            count += 1;
        }
        for h in hosts.values_mut() {
            h.routes.sort_by_key(|r| std::cmp::Reverse(r.path.len()));
        }
        // Active health state belongs to a check. Once no route of a proc declares one,
        // nothing checks its endpoints any more, and one the last check took out would stay
        // out for good.
        for g in groups.values() {
            if g.healthcheck().is_none() {
                for e in g.endpoints.iter() {
                    e.stats.active_down.store(false, Ordering::Relaxed);
                    e.stats.check_streak.store(0, Ordering::Relaxed);
                }
            }
        }
        RouteTable {
            version,
            revision: snap.revision,
            hosts,
            routes: count,
            rejected,
            groups,
        }
    }

    /// Finds the route for a request. `host` is the Host header (any case, with or without
    /// a port); `path` the request path without the query. No allocation unless the host
    /// has upper-case letters.
    pub fn lookup<'a>(&'a self, host: &str, path: &'a str) -> Option<Matched<'a>> {
        let host = normalise_host(host);
        let entry = self.host_entry(&host)?;
        let route = entry.routes.iter().find(|r| path_matches(&r.path, path))?;
        Some(Matched {
            route,
            upstream_path: route.strip(path),
        })
    }

    fn host_entry(&self, host: &str) -> Option<&HostRoutes> {
        if host.is_empty() {
            return None;
        }
        if let Some(e) = self.hosts.get(host) {
            return Some(e);
        }
        // Only a host name can be a subdomain of a route's host. Anything else (`a@b/.host`,
        // spaces, quotes) would otherwise match by its tail and be echoed into redirects.
        if !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        {
            return None;
        }
        // Walk the suffixes from the longest: `a.b.c` tries `b.c`, then `c`.
        let mut rest = host;
        while let Some(i) = rest.find('.') {
            rest = &rest[i + 1..];
            if rest.is_empty() {
                break;
            }
            if let Some(e) = self.hosts.get(rest) {
                return Some(e);
            }
        }
        None
    }

    /// The number of routes served.
    pub fn len(&self) -> usize {
        self.routes
    }

    /// Whether the table has no routes.
    pub fn is_empty(&self) -> bool {
        self.routes == 0
    }

    /// Claims rejected because an older claim holds the same host and path.
    pub fn rejected(&self) -> &[RejectedClaim] {
        &self.rejected
    }

    /// Every upstream group, for health checking.
    pub fn groups(&self) -> impl Iterator<Item = &Arc<UpstreamGroup>> {
        self.groups.values()
    }

    /// Every route, sorted by name, for the admin page.
    pub fn routes(&self) -> Vec<&Arc<Route>> {
        let mut all: Vec<_> = self.hosts.values().flat_map(|h| h.routes.iter()).collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// The table as JSON for `/routes`.
    pub fn to_json(&self) -> serde_json::Value {
        let routes: Vec<_> = self
            .routes()
            .into_iter()
            .map(|r| {
                serde_json::json!({
                    "route": &*r.name,
                    "host": &*r.host,
                    "path": &*r.path,
                    "app": &*r.app,
                    "proc": &*r.proc_name,
                    "key": &*r.key,
                    "https_only": r.https_only,
                    "balance": &r.balance,
                    "endpoints": r.upstream.endpoints.iter().map(|e| serde_json::json!({
                        "addr": e.addr.to_string(),
                        "instance": e.instance,
                        "healthy": e.is_healthy(),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        serde_json::json!({
            "version": self.version,
            "revision": self.revision,
            "routes": routes,
            "rejected": &self.rejected,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lain_state::{Keyspace, StateDocument};

    fn table(yaml: &str) -> RouteTable {
        let doc: StateDocument = serde_json::from_str(yaml).unwrap();
        let (snap, rejected) = Snapshot::from_document(&Keyspace::default(), &doc);
        assert!(rejected.is_empty(), "{rejected:?}");
        RouteTable::compile(&snap, &RouteTable::default(), 1)
    }

    fn route(host: &str, path: &str, app: &str) -> String {
        format!(r#"{{"host":"{host}","path":"{path}","app":"{app}","proc":"web"}}"#)
    }

    fn doc(routes: &[(&str, &str, &str)]) -> String {
        let rs: Vec<_> = routes.iter().map(|(h, p, a)| route(h, p, a)).collect();
        format!(r#"{{"routes":[{}]}}"#, rs.join(","))
    }

    /// One lookup case: (host, path) → Some((app, upstream path)) or None.
    type Case<'a> = (&'a str, &'a str, Option<(&'a str, &'a str)>);

    fn check(t: &RouteTable, cases: &[Case<'_>]) {
        for (host, path, want) in cases {
            let got = t
                .lookup(host, path)
                .map(|m| (m.route.app.to_string(), m.upstream_path.to_string()));
            let want = want.map(|(a, p)| (a.to_string(), p.to_string()));
            assert_eq!(got, want, "lookup({host:?}, {path:?})");
        }
    }

    #[test]
    fn request_paths_are_cleaned_as_nginx_does() {
        let cases: &[(&str, Result<&str, AboveRoot>)] = &[
            ("/", Ok("/")),
            ("/api/users", Ok("/api/users")),
            ("/api/", Ok("/api/")),
            ("//api/y", Ok("/api/y")),
            ("/api//evil.example/x", Ok("/api/evil.example/x")),
            ("/api///", Ok("/api/")),
            ("/api/./y", Ok("/api/y")),
            ("/api/.", Ok("/api/")),
            ("/api/..", Ok("/")),
            ("/api/../admin", Ok("/admin")),
            ("/x/../api/y", Ok("/api/y")),
            ("/a/b/../../c/", Ok("/c/")),
            ("/api/%2e%2e/admin", Ok("/admin")),
            ("/api/%2E./admin", Ok("/admin")),
            ("/api/.%2e", Ok("/")),
            ("/api/%2e/y", Ok("/api/y")),
            // Only whole segments are dot segments.
            ("/api/...", Ok("/api/...")),
            ("/api/..x/y", Ok("/api/..x/y")),
            ("/api/.well-known", Ok("/api/.well-known")),
            ("/a%2eb/%2f", Ok("/a%2eb/%2f")),
            ("/..", Err(AboveRoot)),
            ("/../x", Err(AboveRoot)),
            ("/a/../../x", Err(AboveRoot)),
            ("/%2e%2e/x", Err(AboveRoot)),
            ("*", Ok("*")),
        ];
        for (path, want) in cases {
            let got = clean_request_path(path);
            assert_eq!(got.as_deref().map_err(|e| *e), *want, "{path:?}");
            if let Ok(clean) = got {
                // Borrowed exactly when nothing changed, which decides a rewrite.
                let borrowed = matches!(clean, std::borrow::Cow::Borrowed(_));
                assert_eq!(borrowed, clean == *path, "{path:?}");
            }
        }
    }

    #[test]
    fn host_matches_itself_and_subdomains_exact_wins() {
        let t = table(&doc(&[
            ("hello.lain.local", "/", "hello"),
            ("api.hello.lain.local", "/", "api"),
            ("lain.local", "/", "root"),
        ]));
        check(
            &t,
            &[
                ("hello.lain.local", "/", Some(("hello", "/"))),
                ("www.hello.lain.local", "/x", Some(("hello", "/x"))),
                ("api.hello.lain.local", "/", Some(("api", "/"))),
                ("v2.api.hello.lain.local", "/", Some(("api", "/"))),
                ("other.lain.local", "/", Some(("root", "/"))),
                ("lain.local", "/", Some(("root", "/"))),
                ("example.com", "/", None),
                ("xhello.lain.local", "/", Some(("root", "/"))),
                ("", "/", None),
                ("local", "/", None),
            ],
        );
    }

    #[test]
    fn host_ignores_case_port_and_trailing_dot() {
        let t = table(&doc(&[("Hello.Lain.Local", "/", "hello")]));
        check(
            &t,
            &[
                ("HELLO.lain.LOCAL", "/", Some(("hello", "/"))),
                ("hello.lain.local:8080", "/", Some(("hello", "/"))),
                ("hello.lain.local.", "/", Some(("hello", "/"))),
                ("WWW.hello.lain.local:443", "/a", Some(("hello", "/a"))),
                ("hello.lain.local:", "/", Some(("hello", "/"))),
            ],
        );
    }

    #[test]
    fn only_host_names_match_as_subdomains() {
        let t = table(&doc(&[("lain.local", "/", "hello")]));
        check(
            &t,
            &[
                ("a-b_c.9.lain.local", "/", Some(("hello", "/"))),
                // Shapes that end in the route's host but are no host name.
                ("a@evil.example/.lain.local", "/", None),
                ("evil.example/x.lain.local", "/", None),
                ("a b.lain.local", "/", None),
                ("\"x\".lain.local", "/", None),
                ("a%2f.lain.local", "/", None),
            ],
        );
    }

    #[test]
    fn dot_prefixed_host_is_the_same_as_plain() {
        let t = table(&doc(&[(".hello.lain", "/", "hello")]));
        check(
            &t,
            &[
                ("hello.lain", "/", Some(("hello", "/"))),
                ("a.hello.lain", "/", Some(("hello", "/"))),
            ],
        );
    }

    #[test]
    fn longest_prefix_wins_and_is_stripped() {
        let t = table(&doc(&[
            ("hello.lain.local", "/", "root"),
            ("hello.lain.local", "/api", "api"),
            ("hello.lain.local", "/api/v2/", "v2"),
        ]));
        check(
            &t,
            &[
                ("hello.lain.local", "/", Some(("root", "/"))),
                (
                    "hello.lain.local",
                    "/index.html",
                    Some(("root", "/index.html")),
                ),
                ("hello.lain.local", "/api", Some(("api", "/"))),
                ("hello.lain.local", "/api/", Some(("api", "/"))),
                ("hello.lain.local", "/api/users", Some(("api", "/users"))),
                ("hello.lain.local", "/apix", Some(("root", "/apix"))),
                ("hello.lain.local", "/api/v2", Some(("v2", "/"))),
                ("hello.lain.local", "/api/v2/x/y", Some(("v2", "/x/y"))),
                ("hello.lain.local", "/api/v20", Some(("api", "/v20"))),
            ],
        );
    }

    #[test]
    fn chosen_host_without_matching_path_has_no_route() {
        let t = table(&doc(&[
            ("lain.local", "/", "root"),
            ("hello.lain.local", "/api", "api"),
        ]));
        check(
            &t,
            &[
                ("hello.lain.local", "/api/x", Some(("api", "/x"))),
                ("hello.lain.local", "/other", None),
                ("x.lain.local", "/other", Some(("root", "/other"))),
            ],
        );
    }

    #[test]
    fn older_claim_wins_newer_is_rejected() {
        // Document order stands for etcd create order.
        let t = table(&doc(&[
            ("hello.lain.local", "/", "first"),
            ("hello.lain.local", "/", "second"),
            ("Hello.lain.local", "/api", "third"),
            ("hello.lain.local", "/api/", "fourth"),
        ]));
        check(
            &t,
            &[
                ("hello.lain.local", "/", Some(("first", "/"))),
                ("hello.lain.local", "/api/x", Some(("third", "/x"))),
            ],
        );
        assert_eq!(t.len(), 2);
        let rejected: Vec<_> = t.rejected().iter().map(|r| r.route.as_str()).collect();
        assert_eq!(rejected, ["hello.lain.local", "hello.lain.local/api"]);
        assert!(
            t.rejected()[0].key.contains("/second/"),
            "{:?}",
            t.rejected()
        );
    }

    #[test]
    fn claim_order_follows_create_revision_not_key_order() {
        let ks = Keyspace::default();
        let mut snap = Snapshot::default();
        for (app, rev) in [("aaa", 9), ("zzz", 3)] {
            let r = lain_state::RouteRecord {
                v: 1,
                host: "h.lain".into(),
                path: "/".into(),
                app: app.into(),
                proc_name: "web".into(),
                https_only: false,
                timeouts: Timeouts::default(),
                max_body_bytes: None,
                balance: Balance::RoundRobin,
                healthcheck: None,
            };
            let key = ks.route(app, "web", "h.lain", "/");
            let bytes = lain_state::encode(&r);
            snap.apply(
                &ks,
                lain_state::snapshot::Change::Put {
                    key: &key,
                    value: &bytes,
                    create_revision: rev,
                    mod_revision: rev,
                },
            )
            .unwrap();
        }
        let t = RouteTable::compile(&snap, &RouteTable::default(), 1);
        check(&t, &[("h.lain", "/", Some(("zzz", "/")))]);
        assert_eq!(t.rejected().len(), 1);
    }

    #[test]
    fn normalisers() {
        for (input, want) in [
            ("a.B.c", "a.b.c"),
            ("a.b:80", "a.b"),
            ("a.b.", "a.b"),
            ("[::1]:8080", "[::1]"),
            ("[::1]", "[::1]"),
            ("127.0.0.1:1", "127.0.0.1"),
            ("a:b", "a:b"),
        ] {
            assert_eq!(normalise_host(input), want, "{input}");
        }
        for (input, want) in [("/", "/"), ("//", "/"), ("/a/", "/a"), ("/a/b", "/a/b")] {
            assert_eq!(normalise_path(input), want, "{input}");
        }
    }

    /// The snapshot of a state document given as JSON.
    fn snapshot_of(text: &str) -> Snapshot {
        let doc: StateDocument = serde_json::from_str(text).unwrap();
        Snapshot::from_document(&Keyspace::default(), &doc).0
    }

    #[test]
    fn endpoints_group_by_proc_and_keep_state_across_compiles() {
        let text = r#"{"routes":[{"host":"a.lain","app":"a","proc":"web"}],
            "endpoints":[
              {"app":"a","proc":"web","instance":2,"address":"127.0.0.1","port":8002},
              {"app":"a","proc":"web","instance":1,"address":"127.0.0.1","port":8001},
              {"app":"b","proc":"web","instance":1,"address":"127.0.0.1","port":9001}]}"#;
        let snap = snapshot_of(text);
        let t1 = RouteTable::compile(&snap, &RouteTable::default(), 1);
        let m = t1.lookup("a.lain", "/").unwrap();
        let ports: Vec<_> = m
            .route
            .upstream
            .endpoints
            .iter()
            .map(|e| e.addr.port())
            .collect();
        assert_eq!(ports, [8001, 8002]);
        m.route.upstream.endpoints[0]
            .stats
            .record_failure(1, 10_000);
        let t2 = RouteTable::compile(&snap, &t1, 2);
        let m2 = t2.lookup("a.lain", "/").unwrap();
        assert!(Arc::ptr_eq(
            &m.route.upstream.endpoints[0].stats,
            &m2.route.upstream.endpoints[0].stats
        ));
        assert_eq!(t2.to_json()["routes"][0]["endpoints"][0]["healthy"], false);
        // Another app's container given the ejected endpoint's address starts afresh.
        let text = r#"{"routes":[{"host":"a.lain","app":"a","proc":"web"},
              {"host":"c.lain","app":"c","proc":"web"}],
            "endpoints":[
              {"app":"a","proc":"web","instance":2,"address":"127.0.0.1","port":8002},
              {"app":"c","proc":"web","instance":1,"address":"127.0.0.1","port":8001}]}"#;
        let snap = snapshot_of(text);
        let t3 = RouteTable::compile(&snap, &t2, 3);
        let c = &t3.lookup("c.lain", "/").unwrap().route.upstream.endpoints[0];
        assert_eq!(c.addr.port(), 8001);
        assert!(c.is_healthy());
    }

    #[test]
    fn round_robin_goes_on_where_the_previous_table_stopped() {
        let text = r#"{"routes":[{"host":"a.lain","app":"a","proc":"web"}],
            "endpoints":[
              {"app":"a","proc":"web","instance":1,"address":"127.0.0.1","port":8001},
              {"app":"a","proc":"web","instance":2,"address":"127.0.0.1","port":8002},
              {"app":"a","proc":"web","instance":3,"address":"127.0.0.1","port":8003}]}"#;
        let snap = snapshot_of(text);
        // One request per table, the table swapping between requests (a busy cluster):
        // every endpoint still gets its turn.
        let mut table = RouteTable::compile(&snap, &RouteTable::default(), 1);
        let mut ports = Vec::new();
        for version in 2..8 {
            let up = &table.lookup("a.lain", "/").unwrap().route.upstream;
            let e = up
                .select(&lain_state::Balance::RoundRobin, None, &[])
                .unwrap();
            ports.push(e.addr.port());
            table = RouteTable::compile(&snap, &table, version);
        }
        assert_eq!(ports, [8001, 8002, 8003, 8001, 8002, 8003]);
    }

    #[test]
    fn removing_a_health_check_brings_the_endpoints_it_took_out_back() {
        let with = |check: &str| {
            let text = format!(
                r#"{{"routes":[{{"host":"a.lain","app":"a","proc":"web"{check}}}],
                "endpoints":[{{"app":"a","proc":"web","instance":1,"address":"127.0.0.1","port":8001}}]}}"#
            );
            snapshot_of(&text)
        };
        let checked = with(r#","healthcheck":{"path":"/health"}"#);
        let t1 = RouteTable::compile(&checked, &RouteTable::default(), 1);
        let up = &t1.lookup("a.lain", "/").unwrap().route.upstream;
        up.endpoints[0]
            .stats
            .active_down
            .store(true, Ordering::Relaxed);
        assert!(!up.any_healthy());
        // While the check is declared, its verdict survives a recompile.
        let t2 = RouteTable::compile(&checked, &t1, 2);
        assert!(
            !t2.lookup("a.lain", "/")
                .unwrap()
                .route
                .upstream
                .any_healthy()
        );
        // Without it, nothing would ever bring the endpoint back.
        let t3 = RouteTable::compile(&with(""), &t2, 3);
        assert!(
            t3.lookup("a.lain", "/")
                .unwrap()
                .route
                .upstream
                .any_healthy()
        );
    }
}
