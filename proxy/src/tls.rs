//! TLS certificates chosen by SNI, from etcd (`CertRecord`) and from files, swapped live.
//!
//! The rustls acceptor holds one [`CertStore`] as its certificate resolver. The store keeps
//! an immutable map of names to keys behind `arc-swap`; a new snapshot whose certificate
//! table changed builds a new map, so a certificate written to etcd is served on the next
//! handshake without a restart. Exact names beat wildcards (`*.example.com` matches one
//! label, as browsers do); a handshake without SNI, or for an unknown name, gets the
//! configured default certificate if there is one.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use lain_common::Shutdown;
use lain_state::{CertRecord, Snapshot, StateHandle};
use pingora_rustls::sign::CertifiedKey;
use pingora_rustls::{
    CertificateDer, ClientHello, CryptoProvider, PrivateKeyDer, ResolvesServerCert,
};
use rustls_pki_types::pem::PemObject;

/// A certificate that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// The chain has no certificate or does not parse.
    #[error("certificate chain: {0}")]
    Chain(String),
    /// The key does not parse or is of an unsupported type.
    #[error("private key: {0}")]
    Key(String),
}

/// Parses a PEM chain and key into a signing key rustls can serve.
pub fn certified_key(cert_pem: &str, key_pem: &str) -> Result<Arc<CertifiedKey>, CertError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| CertError::Chain(e.to_string()))?;
    if chain.is_empty() {
        return Err(CertError::Chain("no CERTIFICATE block".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| CertError::Key(e.to_string()))?;
    pingora_rustls::install_default_crypto_provider();
    let provider = CryptoProvider::get_default()
        .ok_or_else(|| CertError::Key("no crypto provider installed".into()))?;
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| CertError::Key(e.to_string()))?;
    let key = CertifiedKey::new(chain, signing);
    // A key of another certificate would fail every handshake for these names; refusing it
    // here keeps the previous certificate serving. When rustls cannot tell (a key type that
    // exposes no public key), the pair is taken on trust.
    if let Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) =
        key.keys_match()
    {
        return Err(CertError::Key(
            "the key does not belong to the certificate".into(),
        ));
    }
    Ok(Arc::new(key))
}

/// Names to keys; immutable once built.
#[derive(Debug, Default)]
pub struct CertMap {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.example.com` stored as `example.com`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
}

impl CertMap {
    /// Adds a key for `names`; the first key added for a name keeps it.
    pub fn add(&mut self, names: &[String], key: &Arc<CertifiedKey>) {
        for n in names {
            let n = n.trim().trim_end_matches('.').to_ascii_lowercase();
            if let Some(base) = n.strip_prefix("*.") {
                self.wildcard
                    .entry(base.to_string())
                    .or_insert_with(|| key.clone());
            } else if !n.is_empty() {
                self.exact.entry(n).or_insert_with(|| key.clone());
            }
        }
    }

    /// Sets the key served when no name matches.
    pub fn set_default(&mut self, key: Arc<CertifiedKey>) {
        self.default = Some(key);
    }

    /// The key for a server name.
    pub fn find(&self, name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        if let Some(name) = name {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            if let Some(k) = self.exact.get(&name) {
                return Some(k.clone());
            }
            if let Some((_, parent)) = name.split_once('.')
                && let Some(k) = self.wildcard.get(parent)
            {
                return Some(k.clone());
            }
        }
        self.default.clone()
    }

    /// How many names are served.
    pub fn len(&self) -> usize {
        self.exact.len() + self.wildcard.len()
    }

    /// Whether no name is served.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A file certificate from the configuration, loaded once at start.
#[derive(Debug, Clone)]
pub struct FileCert {
    /// Names it is served for.
    pub names: Vec<String>,
    /// The loaded key.
    pub key: Arc<CertifiedKey>,
}

/// The live certificate resolver.
#[derive(Debug)]
pub struct CertStore {
    map: ArcSwap<CertMap>,
    files: Vec<FileCert>,
}

impl CertStore {
    /// A store serving `files` until the first snapshot adds etcd certificates. File
    /// certificates win over etcd ones for the same name, and the first file certificate is
    /// the default.
    pub fn new(files: Vec<FileCert>) -> CertStore {
        let store = CertStore {
            map: ArcSwap::from_pointee(CertMap::default()),
            files,
        };
        store.rebuild(&[]);
        store
    }

    fn rebuild(&self, records: &[(String, CertRecord)]) {
        let mut map = CertMap::default();
        for f in &self.files {
            map.add(&f.names, &f.key);
        }
        if let Some(f) = self.files.first() {
            map.set_default(f.key.clone());
        }
        for (key, rec) in records {
            match certified_key(&rec.cert_pem, &rec.key_pem) {
                Ok(k) => map.add(&rec.names, &k),
                Err(e) => {
                    tracing::warn!(key = %key, error = %e, "skipped certificate that does not load")
                }
            }
        }
        self.map.store(Arc::new(map));
    }

    /// Rebuilds the map from a snapshot's certificates.
    pub fn update(&self, snap: &Snapshot) {
        let records: Vec<_> = snap
            .certs
            .values()
            .map(|i| (i.key.clone(), i.value.clone()))
            .collect();
        self.rebuild(&records);
    }

    /// Follows the state handle, rebuilding when the certificate table changes.
    pub async fn follow(self: Arc<Self>, handle: StateHandle, shutdown: Shutdown) {
        let mut rx = handle.subscribe();
        let mut last = None;
        loop {
            if *rx.borrow_and_update() > 0 {
                let snap = handle.load();
                let changed = last
                    .as_ref()
                    .is_none_or(|l: &lain_state::Table<CertRecord>| !Arc::ptr_eq(l, &snap.certs));
                if changed {
                    self.update(&snap);
                    last = Some(snap.certs.clone());
                }
            }
            tokio::select! {
                _ = shutdown.wait() => return,
                r = rx.changed() => if r.is_err() { return },
            }
        }
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.map.load().find(hello.server_name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> Arc<CertifiedKey> {
        let c = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
        certified_key(&c.cert.pem(), &c.signing_key.serialize_pem()).unwrap()
    }

    #[test]
    fn exact_beats_wildcard_and_default_catches_the_rest() {
        let exact = key("a.example.com");
        let wild = key("*.example.com");
        let fallback = key("fallback");
        let mut m = CertMap::default();
        m.add(&["A.example.com".into()], &exact);
        m.add(&["*.example.com".into()], &wild);
        assert!(Arc::ptr_eq(&m.find(Some("a.example.com")).unwrap(), &exact));
        assert!(Arc::ptr_eq(&m.find(Some("b.example.com")).unwrap(), &wild));
        assert!(
            m.find(Some("x.b.example.com")).is_none(),
            "a wildcard covers one label"
        );
        assert!(m.find(Some("example.com")).is_none());
        assert!(m.find(None).is_none());
        m.set_default(fallback.clone());
        assert!(Arc::ptr_eq(&m.find(Some("other.org")).unwrap(), &fallback));
    }

    #[test]
    fn a_key_of_another_certificate_is_refused() {
        let a = rcgen::generate_simple_self_signed(vec!["a".to_string()]).unwrap();
        let b = rcgen::generate_simple_self_signed(vec!["b".to_string()]).unwrap();
        let err = certified_key(&a.cert.pem(), &b.signing_key.serialize_pem()).unwrap_err();
        assert!(err.to_string().contains("does not belong"), "{err}");
    }

    #[test]
    fn bad_pem_is_an_error_not_a_panic() {
        assert!(certified_key("nope", "nope").is_err());
        let c = rcgen::generate_simple_self_signed(vec!["x".to_string()]).unwrap();
        assert!(
            certified_key(
                &c.cert.pem(),
                "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
            )
            .is_err()
        );
    }
}
