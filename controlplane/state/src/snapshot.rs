//! The immutable view of cluster state that readers load through `arc-swap`.
//!
//! A snapshot is a set of tables, one per record kind, each an `Arc` of a sorted map from
//! etcd key to record. Applying a batch of changes copies only the tables it touches, so
//! a reader can tell which kinds changed by comparing table pointers (`Arc::ptr_eq`) and
//! skip recompiling what did not.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::keys::{Keyspace, Kind};
use crate::records::{
    self, AppRecord, CertRecord, ContainerRecord, DnsRecord, EndpointRecord, IngressRecord,
    NodeRecord, Record, RouteRecord, ServiceRecord, StreamRecord, Validate,
};

/// One record with the etcd revisions it was created and last modified at.
#[derive(Debug, Clone, PartialEq)]
pub struct Item<T> {
    /// The etcd key.
    pub key: String,
    /// The revision the key was created at; lower means an older claim.
    pub create_revision: i64,
    /// The revision of the value's last change.
    pub mod_revision: i64,
    /// The decoded value.
    pub value: T,
}

/// All records of one kind, by key.
pub type Table<T> = Arc<BTreeMap<String, Arc<Item<T>>>>;

/// A consistent view of `{prefix}/state/` at one etcd revision.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The etcd revision this view reflects (0 before the first list, or for a file).
    pub revision: i64,
    /// Apps by key.
    pub apps: Table<AppRecord>,
    /// HTTP routes by key.
    pub routes: Table<RouteRecord>,
    /// Endpoints by key.
    pub endpoints: Table<EndpointRecord>,
    /// TCP routes by key.
    pub streams: Table<StreamRecord>,
    /// Static DNS records by key.
    pub dns: Table<DnsRecord>,
    /// Services by key.
    pub services: Table<ServiceRecord>,
    /// Proxy addresses by key.
    pub ingress: Table<IngressRecord>,
    /// TLS certificates by key.
    pub certs: Table<CertRecord>,
    /// Nodes by key.
    pub nodes: Table<NodeRecord>,
    /// Containers by key.
    pub containers: Table<ContainerRecord>,
}

/// A value that could not be applied; the rest of the batch still is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("skipped {key}: {reason}")]
pub struct Rejected {
    /// The etcd key.
    pub key: String,
    /// The kind, when the key named one.
    pub kind: Option<Kind>,
    /// Why it was skipped.
    pub reason: String,
}

/// One change to apply: a put with its revisions, or a delete.
#[derive(Debug, Clone)]
pub enum Change<'a> {
    /// A key was created or modified.
    Put {
        /// The etcd key.
        key: &'a str,
        /// The raw value.
        value: &'a [u8],
        /// The key's create revision.
        create_revision: i64,
        /// The key's mod revision.
        mod_revision: i64,
    },
    /// A key was deleted.
    Delete {
        /// The etcd key.
        key: &'a str,
    },
}

fn put<T: Record + Validate>(
    table: &mut Table<T>,
    key: &str,
    value: &[u8],
    create_revision: i64,
    mod_revision: i64,
) -> Result<(), String> {
    let value = records::decode::<T>(value).map_err(|e| e.to_string())?;
    Arc::make_mut(table).insert(
        key.to_string(),
        Arc::new(Item {
            key: key.to_string(),
            create_revision,
            mod_revision,
            value,
        }),
    );
    Ok(())
}

fn delete<T>(table: &mut Table<T>, key: &str) {
    // Only copy the table when the key is really there, so no-op deletes keep pointers equal.
    if table.contains_key(key) {
        Arc::make_mut(table).remove(key);
    }
}

impl Snapshot {
    /// The number of records of one kind.
    pub fn count(&self, kind: Kind) -> usize {
        match kind {
            Kind::App => self.apps.len(),
            Kind::Route => self.routes.len(),
            Kind::Endpoint => self.endpoints.len(),
            Kind::Stream => self.streams.len(),
            Kind::Dns => self.dns.len(),
            Kind::Service => self.services.len(),
            Kind::Ingress => self.ingress.len(),
            Kind::Cert => self.certs.len(),
            Kind::Node => self.nodes.len(),
            Kind::Container => self.containers.len(),
        }
    }

    /// Applies one change. A malformed value leaves whatever the key held before in place,
    /// so a bad write never takes down a working route; the caller logs and counts it.
    pub fn apply(&mut self, ks: &Keyspace, change: Change<'_>) -> Result<(), Rejected> {
        let key = match &change {
            Change::Put { key, .. } | Change::Delete { key } => *key,
        };
        let parsed = ks.parse(key).map_err(|e| Rejected {
            key: key.to_string(),
            kind: None,
            reason: e.to_string(),
        })?;
        let kind = parsed.kind;
        let result = match change {
            Change::Put {
                value,
                create_revision: c,
                mod_revision: m,
                ..
            } => match kind {
                Kind::App => put(&mut self.apps, key, value, c, m),
                Kind::Route => put(&mut self.routes, key, value, c, m),
                Kind::Endpoint => put(&mut self.endpoints, key, value, c, m),
                Kind::Stream => put(&mut self.streams, key, value, c, m),
                Kind::Dns => put(&mut self.dns, key, value, c, m),
                Kind::Service => put(&mut self.services, key, value, c, m),
                Kind::Ingress => put(&mut self.ingress, key, value, c, m),
                Kind::Cert => put(&mut self.certs, key, value, c, m),
                Kind::Node => put(&mut self.nodes, key, value, c, m),
                Kind::Container => put(&mut self.containers, key, value, c, m),
            },
            Change::Delete { .. } => {
                match kind {
                    Kind::App => delete(&mut self.apps, key),
                    Kind::Route => delete(&mut self.routes, key),
                    Kind::Endpoint => delete(&mut self.endpoints, key),
                    Kind::Stream => delete(&mut self.streams, key),
                    Kind::Dns => delete(&mut self.dns, key),
                    Kind::Service => delete(&mut self.services, key),
                    Kind::Ingress => delete(&mut self.ingress, key),
                    Kind::Cert => delete(&mut self.certs, key),
                    Kind::Node => delete(&mut self.nodes, key),
                    Kind::Container => delete(&mut self.containers, key),
                }
                Ok(())
            }
        };
        result.map_err(|reason| Rejected {
            key: key.to_string(),
            kind: Some(kind),
            reason,
        })
    }

    /// Copies the value `previous` held under `key`, if any, into this snapshot. Used when a
    /// re-list finds a malformed value, so the last good value survives the re-list as it
    /// survives a watch event.
    pub fn keep_previous(&mut self, ks: &Keyspace, previous: &Snapshot, key: &str) {
        fn copy<T>(to: &mut Table<T>, from: &Table<T>, key: &str) {
            if let Some(item) = from.get(key) {
                Arc::make_mut(to).insert(key.to_string(), item.clone());
            }
        }
        let Ok(parsed) = ks.parse(key) else { return };
        match parsed.kind {
            Kind::App => copy(&mut self.apps, &previous.apps, key),
            Kind::Route => copy(&mut self.routes, &previous.routes, key),
            Kind::Endpoint => copy(&mut self.endpoints, &previous.endpoints, key),
            Kind::Stream => copy(&mut self.streams, &previous.streams, key),
            Kind::Dns => copy(&mut self.dns, &previous.dns, key),
            Kind::Service => copy(&mut self.services, &previous.services, key),
            Kind::Ingress => copy(&mut self.ingress, &previous.ingress, key),
            Kind::Cert => copy(&mut self.certs, &previous.certs, key),
            Kind::Node => copy(&mut self.nodes, &previous.nodes, key),
            Kind::Container => copy(&mut self.containers, &previous.containers, key),
        }
    }

    /// Builds a snapshot from a standalone document, keyed as the control plane would key it.
    /// Every invalid record is reported; the valid ones are kept.
    pub fn from_document(ks: &Keyspace, doc: &StateDocument) -> (Snapshot, Vec<Rejected>) {
        let mut snap = Snapshot::default();
        let mut rejected = Vec::new();
        let mut add = |key: String, bytes: Vec<u8>| {
            if let Err(r) = snap.apply(
                ks,
                Change::Put {
                    key: &key,
                    value: &bytes,
                    create_revision: 0,
                    mod_revision: 0,
                },
            ) {
                rejected.push(r);
            }
        };
        for r in &doc.apps {
            add(ks.app(&r.name), records::encode(r));
        }
        for r in &doc.routes {
            add(
                ks.route(&r.app, &r.proc_name, &r.host, &r.path),
                records::encode(r),
            );
        }
        for r in &doc.endpoints {
            add(
                ks.endpoint(&r.app, &r.proc_name, r.instance),
                records::encode(r),
            );
        }
        for r in &doc.streams {
            add(ks.stream(r.listen_port), records::encode(r));
        }
        for (i, r) in doc.dns.iter().enumerate() {
            add(ks.dns(&r.name, &format!("file{i}")), records::encode(r));
        }
        for r in &doc.services {
            add(ks.service(&r.app, &r.service), records::encode(r));
        }
        for (i, r) in doc.ingress.iter().enumerate() {
            add(ks.ingress(&format!("file{i}")), records::encode(r));
        }
        for (i, r) in doc.certs.iter().enumerate() {
            add(ks.cert(&format!("file{i}")), records::encode(r));
        }
        // Creation order in a file is document order, so an earlier route claim wins there
        // as an older key wins in etcd.
        let routes = Arc::make_mut(&mut snap.routes);
        for (i, item) in doc
            .routes
            .iter()
            .map(|r| ks.route(&r.app, &r.proc_name, &r.host, &r.path))
            .enumerate()
        {
            if let Some(entry) = routes.get_mut(&item) {
                let e = Arc::make_mut(entry);
                e.create_revision = i as i64 + 1;
                e.mod_revision = i as i64 + 1;
            }
        }
        (snap, rejected)
    }
}

/// The standalone state file: the same records the control plane writes to etcd, as lists.
/// Records carry their schema version `v`; it defaults to the current one in a file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateDocument {
    /// Apps.
    #[serde(default)]
    pub apps: Vec<AppRecord>,
    /// HTTP routes.
    #[serde(default)]
    pub routes: Vec<RouteRecord>,
    /// Endpoints.
    #[serde(default)]
    pub endpoints: Vec<EndpointRecord>,
    /// TCP routes.
    #[serde(default)]
    pub streams: Vec<StreamRecord>,
    /// Static DNS records.
    #[serde(default)]
    pub dns: Vec<DnsRecord>,
    /// Services.
    #[serde(default)]
    pub services: Vec<ServiceRecord>,
    /// Proxy addresses.
    #[serde(default)]
    pub ingress: Vec<IngressRecord>,
    /// TLS certificates.
    #[serde(default)]
    pub certs: Vec<CertRecord>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put_change<'a>(key: &'a str, value: &'a [u8], rev: i64) -> Change<'a> {
        Change::Put {
            key,
            value,
            create_revision: rev,
            mod_revision: rev,
        }
    }

    #[test]
    fn apply_put_delete_and_untouched_tables_keep_their_pointer() {
        let ks = Keyspace::new("/t");
        let mut snap = Snapshot::default();
        let before_dns = snap.dns.clone();
        let key = ks.route("hello", "web", "hello.lain", "/");
        snap.apply(
            &ks,
            put_change(
                &key,
                br#"{"v":1,"host":"hello.lain","app":"hello","proc":"web"}"#,
                5,
            ),
        )
        .unwrap();
        assert_eq!(snap.routes.len(), 1);
        assert_eq!(snap.routes[&key].create_revision, 5);
        assert!(Arc::ptr_eq(&before_dns, &snap.dns));
        snap.apply(&ks, Change::Delete { key: &key }).unwrap();
        assert!(snap.routes.is_empty());
    }

    #[test]
    fn malformed_value_keeps_last_good_value() {
        let ks = Keyspace::new("/t");
        let mut snap = Snapshot::default();
        let key = ks.endpoint("a", "web", 1);
        snap.apply(
            &ks,
            put_change(
                &key,
                br#"{"v":1,"app":"a","proc":"web","instance":1,"address":"127.0.0.1","port":80}"#,
                2,
            ),
        )
        .unwrap();
        let err = snap
            .apply(&ks, put_change(&key, b"{garbage", 3))
            .unwrap_err();
        assert_eq!(err.kind, Some(Kind::Endpoint));
        assert_eq!(err.key, key);
        assert_eq!(snap.endpoints[&key].value.port, 80);
    }

    #[test]
    fn unknown_kind_is_rejected_not_fatal() {
        let ks = Keyspace::new("/t");
        let mut snap = Snapshot::default();
        let err = snap
            .apply(&ks, put_change("/t/state/what/x", b"{}", 1))
            .unwrap_err();
        assert_eq!(err.kind, None);
    }

    #[test]
    fn document_keys_match_etcd_keys_and_order_claims() {
        let ks = Keyspace::default();
        let doc: StateDocument = serde_json::from_str(
            r#"{"routes":[{"host":"a.lain","app":"a","proc":"web"},{"host":"a.lain","app":"b","proc":"web"}],
                "endpoints":[{"app":"a","proc":"web","instance":1,"address":"127.0.0.1","port":8080},
                             {"app":"a","proc":"web","instance":0,"address":"127.0.0.1","port":8080}]}"#,
        )
        .unwrap();
        let (snap, rejected) = Snapshot::from_document(&ks, &doc);
        assert_eq!(rejected.len(), 1, "{rejected:?}");
        let a = &snap.routes[&ks.route("a", "web", "a.lain", "/")];
        let b = &snap.routes[&ks.route("b", "web", "a.lain", "/")];
        assert!(a.create_revision < b.create_revision);
        assert!(snap.endpoints.contains_key(&ks.endpoint("a", "web", 1)));
    }
}
