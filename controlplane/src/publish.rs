//! Publishing: the only code that writes the cluster state the data plane reads.
//!
//! [`app_records`] turns an app and its instances into `lain_state` records keyed with
//! `lain_state::Keyspace`; [`Publisher::sync`] makes etcd hold exactly that set below the
//! ranges the control plane owns, writing what changed and deleting what is stale.
//! Node records are written separately, each bound to a lease that a heartbeat keeps alive.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};
use lain_state::records::{self, encode};
use lain_state::{
    AppRecord, ContainerRecord, DnsRecord, DnsType, EndpointRecord, HealthCheck, Keyspace, Kind,
    NodeRecord, RouteRecord, SCHEMA_VERSION, ServiceRecord, StreamRecord,
};
use serde::{Deserialize, Serialize};

use crate::lainyaml::{LainConf, ProcType};

/// DNS record ids the control plane writes start with this, so records others put under
/// `state/dns/` (static entries) are never taken for stale.
pub const DNS_ID_PREFIX: &str = "cp-";
/// etcd's default limit of operations in one transaction.
const MAX_TXN_OPS: usize = 100;

/// An app as the control plane wants it: its lain.yaml, the version and image to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppSpec {
    /// The validated lain.yaml.
    pub conf: LainConf,
    /// The deployed version; empty before the first deploy.
    pub version: String,
    /// The release image of that version.
    pub image: String,
    /// For a resource (`apptype: resource`): its lain.yaml template, rendered for each client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
}

/// One container of an app, as the publisher needs to know it.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceView {
    /// The proc name.
    pub proc_name: String,
    /// The proc type.
    pub proc_type: ProcType,
    /// The instance number.
    pub instance: u32,
    /// The node it runs on.
    pub node: String,
    /// Where it is reached.
    pub address: IpAddr,
    /// Its `PORT`.
    pub port: u16,
    /// Whether its probe passes and it is the one serving its instance number.
    pub serving: bool,
    /// The version it runs.
    pub version: String,
    /// The container id.
    pub container_id: String,
    /// The host directory bound at `/lain/logs`.
    pub log_dir: Option<String>,
}

/// Every state record of one app: app, routes, services, streams, endpoints and DNS of
/// its serving instances, and a container record of every container.
pub fn app_records(
    ks: &Keyspace,
    spec: &AppSpec,
    resources: &BTreeMap<String, String>,
    instances: &[InstanceView],
) -> BTreeMap<String, Vec<u8>> {
    let conf = &spec.conf;
    let app = &conf.appname;
    let appdomain = conf.appdomain();
    let mut out = BTreeMap::new();
    let app_record = AppRecord {
        v: SCHEMA_VERSION,
        name: app.clone(),
        apptype: match conf.apptype {
            crate::lainyaml::AppType::App => "app".into(),
            crate::lainyaml::AppType::Resource => "resource".into(),
        },
        version: spec.version.clone(),
        use_services: conf.use_services.clone(),
        use_resources: resources.clone(),
        spec: serde_json::to_value(spec).unwrap_or_default(),
    };
    out.insert(ks.app(app), encode(&app_record));
    for p in conf.procs.values() {
        for m in &p.mountpoints {
            let r = RouteRecord {
                v: SCHEMA_VERSION,
                host: m.host.clone(),
                path: m.path.clone(),
                app: app.clone(),
                proc_name: p.name.clone(),
                https_only: p.https_only,
                timeouts: Default::default(),
                max_body_bytes: None,
                balance: Default::default(),
                healthcheck: p.healthcheck.as_ref().map(|path| HealthCheck {
                    path: path.clone(),
                    interval_ms: 3_000,
                    rise: 2,
                    fall: 5,
                }),
            };
            out.insert(ks.route(app, &p.name, &m.host, &m.path), encode(&r));
        }
        for port in &p.ports {
            let s = StreamRecord {
                v: SCHEMA_VERSION,
                listen_port: *port,
                app: app.clone(),
                proc_name: p.name.clone(),
                upstream_port: None,
            };
            out.insert(ks.stream(*port), encode(&s));
        }
        if p.proc_type == ProcType::Portal
            && let Some(service) = &p.service_name
        {
            let s = ServiceRecord {
                v: SCHEMA_VERSION,
                app: app.clone(),
                service: service.clone(),
                proc_name: service.clone(),
                portal: Some(p.name.clone()),
                allow_clients: p.allow_clients.clone(),
            };
            out.insert(ks.service(app, service), encode(&s));
        }
    }
    for i in instances {
        let c = ContainerRecord {
            v: SCHEMA_VERSION,
            container_id: i.container_id.clone(),
            node: i.node.clone(),
            app: app.clone(),
            proc_name: i.proc_name.clone(),
            podgroup: records::podgroup(app, i.proc_type.as_str(), &i.proc_name),
            instance: i.instance,
            version: i.version.clone(),
            log_dir: i.log_dir.clone(),
            logs: conf
                .procs
                .get(&i.proc_name)
                .map(|p| p.logs.clone())
                .unwrap_or_default(),
        };
        out.insert(ks.container(&i.node, &i.container_id), encode(&c));
        if !i.serving {
            continue;
        }
        let mut ports = BTreeMap::new();
        if i.proc_type == ProcType::Web {
            ports.insert("http".to_string(), i.port);
        }
        let e = EndpointRecord {
            v: SCHEMA_VERSION,
            app: app.clone(),
            proc_name: i.proc_name.clone(),
            proc_type: i.proc_type.as_str().to_string(),
            instance: i.instance,
            node: i.node.clone(),
            address: i.address,
            port: i.port,
            ports,
            healthy: true,
            version: i.version.clone(),
            container_id: i.container_id.clone(),
        };
        out.insert(ks.endpoint(app, &i.proc_name, i.instance), encode(&e));
        let rtype = if i.address.is_ipv4() {
            DnsType::A
        } else {
            DnsType::Aaaa
        };
        let proc_name = format!("{}.{appdomain}.lain", i.proc_name);
        let instance_name = format!("{}.{proc_name}", i.instance);
        let id = format!("{DNS_ID_PREFIX}i{}", i.instance);
        for (name, id) in [
            (&instance_name, &format!("{DNS_ID_PREFIX}a")),
            (&proc_name, &id),
        ] {
            let d = DnsRecord {
                v: SCHEMA_VERSION,
                name: name.clone(),
                rtype,
                data: i.address.to_string(),
                ttl_secs: Some(5),
            };
            out.insert(ks.dns(name, id), encode(&d));
        }
        let srv = DnsRecord {
            v: SCHEMA_VERSION,
            name: format!("_lain._tcp.{proc_name}"),
            rtype: DnsType::Srv,
            data: format!("0 1 {} {instance_name}.", i.port),
            ttl_secs: Some(5),
        };
        out.insert(ks.dns(&srv.name, &id), encode(&srv));
    }
    out
}

/// Why etcd could not be written.
#[derive(Debug, thiserror::Error)]
#[error("etcd: {0}")]
pub struct PublishError(#[from] pub etcd_client::Error);

/// Writes the control plane's share of the cluster state.
#[derive(Clone)]
pub struct Publisher {
    client: Client,
    ks: Keyspace,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher").field("ks", &self.ks).finish()
    }
}

/// The kinds the control plane owns entirely (nodes are leased, ingress and certs belong to
/// the edge's operators).
const OWNED: [Kind; 7] = [
    Kind::App,
    Kind::Route,
    Kind::Endpoint,
    Kind::Stream,
    Kind::Dns,
    Kind::Service,
    Kind::Container,
];

/// What one [`Publisher::sync`] changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncStats {
    /// Keys written.
    pub put: usize,
    /// Keys deleted.
    pub deleted: usize,
}

impl Publisher {
    /// A publisher writing below `ks`.
    pub fn new(client: Client, ks: Keyspace) -> Publisher {
        Publisher { client, ks }
    }

    /// The keyspace.
    pub fn keyspace(&self) -> &Keyspace {
        &self.ks
    }

    /// Everything currently stored in the owned ranges.
    pub async fn current(&self) -> Result<BTreeMap<String, Vec<u8>>, PublishError> {
        let mut kv = self.client.kv_client();
        let mut out = BTreeMap::new();
        for kind in OWNED {
            let prefix = self.ks.kind_prefix(kind);
            let resp = kv
                .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
                .await?;
            for item in resp.kvs() {
                let key = String::from_utf8_lossy(item.key()).into_owned();
                if kind == Kind::Dns && !self.is_our_dns(&key) {
                    continue;
                }
                out.insert(key, item.value().to_vec());
            }
        }
        Ok(out)
    }

    fn is_our_dns(&self, key: &str) -> bool {
        self.ks
            .parse(key)
            .ok()
            .and_then(|k| k.parts.get(1).map(|id| id.starts_with(DNS_ID_PREFIX)))
            .unwrap_or(false)
    }

    /// Whether the stored record `key` (holding `value`) belongs to one of `apps`: by the
    /// app in its key, by a label of its DNS name, or by the `app` field of its value.
    /// Errs on the side of yes for DNS names, as a name kept too long harms less than one
    /// deleted under a running app.
    pub fn belongs_to(&self, key: &str, value: &[u8], apps: &BTreeSet<String>) -> bool {
        if apps.is_empty() {
            return false;
        }
        let Ok(k) = self.ks.parse(key) else {
            return false;
        };
        match k.kind {
            Kind::App | Kind::Route | Kind::Endpoint | Kind::Service => {
                k.parts.first().is_some_and(|a| apps.contains(a))
            }
            Kind::Dns => k
                .parts
                .first()
                .is_some_and(|n| n.split('.').any(|label| apps.contains(label))),
            _ => serde_json::from_slice::<serde_json::Value>(value)
                .ok()
                .and_then(|v| v.get("app")?.as_str().map(|a| apps.contains(a)))
                .unwrap_or(false),
        }
    }

    /// Makes the owned ranges hold exactly `desired`: changed keys are written, keys no
    /// longer desired are deleted, except those of the apps in `untouchable` (apps whose
    /// stored definition this control plane cannot read, so it cannot know what they
    /// want). Puts go first so a moved record never disappears briefly.
    pub async fn sync(
        &self,
        desired: &BTreeMap<String, Vec<u8>>,
        untouchable: &BTreeSet<String>,
    ) -> Result<SyncStats, PublishError> {
        let current = self.current().await?;
        let mut ops = Vec::new();
        let mut stats = SyncStats::default();
        for (k, v) in desired {
            if current.get(k) != Some(v) {
                ops.push(TxnOp::put(k.as_str(), v.clone(), None));
                stats.put += 1;
            }
        }
        for (k, v) in &current {
            if !desired.contains_key(k) && !self.belongs_to(k, v, untouchable) {
                ops.push(TxnOp::delete(k.as_str(), None));
                stats.deleted += 1;
            }
        }
        let mut kv = self.client.kv_client();
        for chunk in ops.chunks(MAX_TXN_OPS) {
            kv.txn(Txn::new().and_then(chunk.to_vec())).await?;
        }
        Ok(stats)
    }

    /// Writes an uploaded TLS certificate to the state tree, where the proxy finds it.
    pub async fn put_cert(
        &self,
        name: &str,
        cert: &lain_state::records::CertRecord,
    ) -> Result<(), PublishError> {
        self.client
            .kv_client()
            .put(self.ks.cert(name), encode(cert), None)
            .await?;
        Ok(())
    }

    /// Writes one cp-only JSON value (deploy history, events).
    pub async fn put_raw(&self, key: &str, value: Vec<u8>) -> Result<(), PublishError> {
        self.client.kv_client().put(key, value, None).await?;
        Ok(())
    }

    /// Atomically increments the counter `name` and returns its new value.
    pub async fn next_seq(&self, name: &str) -> Result<u64, PublishError> {
        let key = self.ks.counter(name);
        let mut kv = self.client.kv_client();
        loop {
            let resp = kv.get(key.as_str(), None).await?;
            let (cur, rev) = match resp.kvs().first() {
                Some(item) => (
                    std::str::from_utf8(item.value())
                        .ok()
                        .and_then(|s| s.parse::<u64>().ok())
                        .unwrap_or(0),
                    item.mod_revision(),
                ),
                None => (0, 0),
            };
            let next = cur + 1;
            let txn = Txn::new()
                .when(vec![Compare::mod_revision(
                    key.as_str(),
                    CompareOp::Equal,
                    rev,
                )])
                .and_then(vec![TxnOp::put(key.as_str(), next.to_string(), None)]);
            if kv.txn(txn).await?.succeeded() {
                return Ok(next);
            }
        }
    }

    /// Stores a node's membership (`cp/nodes/{node}`), which outlives leases and leaders.
    pub async fn save_node_member(&self, node: &NodeRecord) -> Result<(), PublishError> {
        self.client
            .kv_client()
            .put(self.ks.node_member(&node.name), encode(node), None)
            .await?;
        Ok(())
    }

    /// Forgets a removed node: its membership and its lease-bound record.
    pub async fn forget_node(&self, name: &str) -> Result<(), PublishError> {
        let mut kv = self.client.kv_client();
        kv.delete(self.ks.node_member(name), None).await?;
        kv.delete(self.ks.node(name), None).await?;
        Ok(())
    }

    /// The node memberships stored by earlier control planes.
    pub async fn node_members(&self) -> Result<Vec<NodeRecord>, PublishError> {
        let resp = self
            .client
            .kv_client()
            .get(
                self.ks.node_members(),
                Some(GetOptions::new().with_prefix()),
            )
            .await?;
        Ok(resp
            .kvs()
            .iter()
            .filter_map(|kv| records::decode::<NodeRecord>(kv.value()).ok())
            .collect())
    }

    /// Whether a node's lease-bound record exists, that is whether its lease is alive.
    pub async fn node_lease_alive(&self, name: &str) -> Result<bool, PublishError> {
        let resp = self
            .client
            .kv_client()
            .get(
                self.ks.node(name),
                Some(GetOptions::new().with_count_only()),
            )
            .await?;
        Ok(resp.count() > 0)
    }

    /// Registers a node under a lease of `ttl` and renews the lease only while `alive`
    /// answers true (the node's engine answers), so the record vanishes `ttl` after the
    /// engine stopped answering: the lease's expiry is the cluster-wide signal that the node
    /// is lost, seen by every control plane. The renewing task ends when it is aborted, when
    /// etcd stops answering, or when the lease expired.
    pub async fn register_node<F, Fut>(
        &self,
        node: &NodeRecord,
        ttl: Duration,
        mut alive: F,
    ) -> Result<tokio::task::JoinHandle<()>, PublishError>
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = bool> + Send,
    {
        let ttl_secs = i64::try_from(ttl.as_secs().max(2)).unwrap_or(10);
        let mut lease = self.client.lease_client();
        let id = lease.grant(ttl_secs, None).await?.id();
        self.client
            .kv_client()
            .put(
                self.ks.node(&node.name),
                encode(node),
                Some(PutOptions::new().with_lease(id)),
            )
            .await?;
        let (mut keeper, mut responses) = lease.keep_alive(id).await?;
        let name = node.name.clone();
        let period = Duration::from_secs(u64::try_from(ttl_secs).unwrap_or(10)) / 3;
        Ok(tokio::spawn(async move {
            let mut answering = true;
            loop {
                tokio::time::sleep(period).await;
                // The engine gets one period to answer; a hung engine is a lost one.
                let ok = tokio::time::timeout(period, alive()).await.unwrap_or(false);
                if ok != answering {
                    answering = ok;
                    if ok {
                        tracing::info!(node = %name, "engine answers again; lease renewed");
                    } else {
                        tracing::warn!(node = %name, "engine does not answer; lease not renewed");
                    }
                }
                if !ok {
                    continue;
                }
                if let Err(e) = keeper.keep_alive().await {
                    tracing::warn!(node = %name, error = %e, "node lease heartbeat failed");
                    return;
                }
                match responses.message().await {
                    Ok(Some(r)) if r.ttl() > 0 => {}
                    other => {
                        tracing::warn!(node = %name, ?other, "node lease expired");
                        return;
                    }
                }
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> AppSpec {
        let conf = LainConf::parse(
            "t.yaml",
            "appname: hello\nweb:\n  cmd: x\n  healthcheck: /h\n  https_only: true\n\
             service.echo:\n  cmd: e\n  port: 5000\n  ports: [9500]\n",
            &["lain.local".to_string()],
        )
        .unwrap();
        AppSpec {
            conf,
            version: "1".into(),
            image: "img:1".into(),
            template: None,
        }
    }

    fn inst(n: u32, serving: bool) -> InstanceView {
        InstanceView {
            proc_name: "web".into(),
            proc_type: ProcType::Web,
            instance: n,
            node: "node1".into(),
            address: "127.0.0.1".parse().unwrap(),
            port: 20000 + u16::try_from(n).unwrap(),
            serving,
            version: "1".into(),
            container_id: format!("c{n}"),
            log_dir: None,
        }
    }

    #[test]
    fn records_of_an_app_decode_and_cover_every_kind() {
        let ks = Keyspace::new("/t");
        let recs = app_records(
            &ks,
            &spec(),
            &BTreeMap::new(),
            &[inst(1, true), inst(2, false)],
        );
        let route: RouteRecord =
            records::decode(&recs[&ks.route("hello", "web", "hello.lain.local", "/")]).unwrap();
        assert!(route.https_only);
        assert_eq!(route.healthcheck.unwrap().path, "/h");
        assert!(recs.contains_key(&ks.route("hello", "web", "hello.lain", "/")));
        let e: EndpointRecord = records::decode(&recs[&ks.endpoint("hello", "web", 1)]).unwrap();
        assert_eq!(e.port, 20001);
        assert!(
            !recs.contains_key(&ks.endpoint("hello", "web", 2)),
            "only serving instances"
        );
        assert!(
            recs.contains_key(&ks.container("node1", "c2")),
            "every container for logship"
        );
        let s: ServiceRecord = records::decode(&recs[&ks.service("hello", "echo")]).unwrap();
        assert_eq!(s.portal.as_deref(), Some("portal-echo"));
        let st: StreamRecord = records::decode(&recs[&ks.stream(9500)]).unwrap();
        assert_eq!(st.proc_name, "echo");
        let d: DnsRecord = records::decode(&recs[&ks.dns("web.hello.lain", "cp-i1")]).unwrap();
        assert_eq!(d.data, "127.0.0.1");
        let d: DnsRecord = records::decode(&recs[&ks.dns("1.web.hello.lain", "cp-a")]).unwrap();
        assert_eq!(d.rtype, DnsType::A);
        let a: AppRecord = records::decode(&recs[&ks.app("hello")]).unwrap();
        assert_eq!(a.version, "1");
        let back: AppSpec = serde_json::from_value(a.spec).unwrap();
        assert_eq!(back, spec());
        // Every key parses back through the contract's own parser.
        for k in recs.keys() {
            ks.parse(k).unwrap();
        }
    }
}
