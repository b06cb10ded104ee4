//! TLS certificates chosen by SNI, from etcd (`CertRecord`) and from files, both swapped
//! live.
//!
//! The rustls acceptor holds one [`CertStore`] as its certificate resolver. The store keeps
//! an immutable map of names to keys behind `arc-swap`; a new snapshot whose certificate
//! table changed builds a new map, so a certificate written to etcd is served on the next
//! handshake without a restart, and so is a certificate file that changed on disk (checked
//! every `tls.files_check_secs`). Exact names beat wildcards (`*.example.com` matches one
//! label, as browsers do); a handshake without SNI, or for an unknown name, gets the
//! configured default certificate if there is one.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use lain_common::{ConfigError, Shutdown};
use lain_state::{CertRecord, Snapshot, StateHandle};
use pingora_rustls::sign::CertifiedKey;
use pingora_rustls::{
    CertificateDer, ClientHello, CryptoProvider, PrivateKeyDer, ResolvesServerCert,
};
use rustls_pki_types::pem::PemObject;

use crate::config::TlsFile;
use crate::metrics::ProxyMetrics;

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

/// What a file looked like when last read: its inode, length, and modification and change
/// times. A renewal moved into place (a new inode, as when a symlink is swapped to a new
/// directory) or copied with its old modification time kept (`cp -p`, which still sets the
/// change time) differs in one of them.
type Stamp = Option<(u64, u64, SystemTime, i64, i64)>;

fn stamp(path: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((
        m.ino(),
        m.len(),
        m.modified().ok()?,
        m.ctime(),
        m.ctime_nsec(),
    ))
}

/// A file certificate from the configuration: where it is read from, and the key last
/// loaded from it.
#[derive(Debug, Clone)]
pub struct FileCert {
    /// Its place in the configuration (`tls.certs[i]`), for errors.
    pub at: String,
    /// The configured names and paths.
    pub source: TlsFile,
    /// The loaded key.
    pub key: Arc<CertifiedKey>,
    /// The certificate and key files as they were when last read.
    stamps: (Stamp, Stamp),
}

/// Reads and parses one configured certificate; errors name the field they come from.
fn load_file(at: &str, f: &TlsFile) -> Result<FileCert, Vec<ConfigError>> {
    // Stamped before reading: a file replaced while it is read looks changed to the next
    // check, which reads it again.
    let stamps = (stamp(&f.cert_path), stamp(&f.key_path));
    let read = |field: &str, path: &Path| {
        std::fs::read_to_string(path).map_err(|e| {
            ConfigError::at(
                format!("{at}.{field}"),
                format!("cannot read {}: {e}", path.display()),
            )
        })
    };
    let (cert, key) = match (
        read("cert_path", &f.cert_path),
        read("key_path", &f.key_path),
    ) {
        (Ok(c), Ok(k)) => (c, k),
        (c, k) => return Err(c.err().into_iter().chain(k.err()).collect()),
    };
    let key = certified_key(&cert, &key).map_err(|e| {
        let field = match e {
            CertError::Chain(_) => "cert_path",
            CertError::Key(_) => "key_path",
        };
        vec![ConfigError::at(format!("{at}.{field}"), e.to_string())]
    })?;
    Ok(FileCert {
        at: at.to_string(),
        source: f.clone(),
        key,
        stamps,
    })
}

/// Loads the configured certificate files, every problem reported with the configuration
/// path it comes from (`tls.certs[1].key_path: ...`), so that a missing or mismatched file is
/// a configuration error found by `--check-config`, as `nginx -t` finds it, not a failure
/// at start.
pub fn load_files(certs: &[TlsFile]) -> Result<Vec<FileCert>, Vec<ConfigError>> {
    let mut errors = Vec::new();
    let mut files = Vec::new();
    for (i, f) in certs.iter().enumerate() {
        match load_file(&format!("tls.certs[{i}]"), f) {
            Ok(c) => files.push(c),
            Err(e) => errors.extend(e),
        }
    }
    if errors.is_empty() {
        Ok(files)
    } else {
        Err(errors)
    }
}

/// The live certificate resolver.
#[derive(Debug)]
pub struct CertStore {
    map: ArcSwap<CertMap>,
    /// Only the follower task and the store's construction touch this, never a handshake.
    files: Mutex<Vec<FileCert>>,
    /// The key each etcd record last loaded, by etcd key.
    etcd_loaded: Mutex<HashMap<String, Arc<CertifiedKey>>>,
    /// How often certificate files are checked for changes; zero never.
    check_every: Duration,
    metrics: ProxyMetrics,
}

impl CertStore {
    /// A store serving `files` until the first snapshot adds etcd certificates. File
    /// certificates win over etcd ones for the same name, and the first file certificate is
    /// the default. Files are read again when they change, checked every `check_every`.
    pub fn new(files: Vec<FileCert>, check_every: Duration, metrics: ProxyMetrics) -> CertStore {
        let store = CertStore {
            map: ArcSwap::from_pointee(CertMap::default()),
            files: Mutex::new(files),
            etcd_loaded: Mutex::default(),
            check_every,
            metrics,
        };
        store.rebuild(&[]);
        store
    }

    fn rebuild(&self, records: &[(String, CertRecord)]) {
        let mut map = CertMap::default();
        {
            let files = self.files.lock().unwrap_or_else(PoisonError::into_inner);
            for f in files.iter() {
                map.add(&f.source.names, &f.key);
            }
            if let Some(f) = files.first() {
                map.set_default(f.key.clone());
            }
        }
        let mut loaded = self
            .etcd_loaded
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut now = HashMap::with_capacity(records.len());
        for (key, rec) in records {
            let k = match certified_key(&rec.cert_pem, &rec.key_pem) {
                Ok(k) => k,
                Err(e) => {
                    self.metrics.cert_errors_etcd.inc();
                    // A record overwritten with one that does not load keeps serving what
                    // it served before; a new record that does not load serves nothing.
                    let Some(before) = loaded.get(key) else {
                        tracing::warn!(key = %key, error = %e, "skipped certificate that does not load");
                        continue;
                    };
                    tracing::warn!(key = %key, error = %e, "certificate does not load; the previous one keeps serving");
                    before.clone()
                }
            };
            map.add(&rec.names, &k);
            now.insert(key.clone(), k);
        }
        // Records deleted from etcd are forgotten.
        *loaded = now;
        self.metrics.cert_names.set(map.len() as i64);
        self.map.store(Arc::new(map));
    }

    /// Reads again every certificate file that changed since it was last read. A pair that
    /// no longer loads (a renewal half written, a key of another certificate) is reported and
    /// the certificate loaded before keeps serving. Returns whether any key was replaced.
    fn reload_files(&self) -> bool {
        let mut files = self.files.lock().unwrap_or_else(PoisonError::into_inner);
        let mut replaced = false;
        for f in files.iter_mut() {
            let now = (stamp(&f.source.cert_path), stamp(&f.source.key_path));
            if now == f.stamps {
                continue;
            }
            match load_file(&f.at, &f.source) {
                Ok(new) => {
                    tracing::info!(certificate = %f.at, "certificate file changed, reloaded");
                    *f = new;
                    replaced = true;
                }
                Err(errors) => {
                    // Remembered, so one bad renewal is reported once, not at every check;
                    // the next change to either file is read again.
                    f.stamps = now;
                    self.metrics.cert_errors_file.inc();
                    for e in errors {
                        tracing::warn!(
                            config = %e.path,
                            error = %e.message,
                            "certificate file does not load; the previous one keeps serving"
                        );
                    }
                }
            }
        }
        replaced
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

    /// Follows the state handle, rebuilding when the certificate table changes or a
    /// certificate file does.
    pub async fn follow(self: Arc<Self>, handle: StateHandle, shutdown: Shutdown) {
        let mut rx = handle.subscribe();
        let mut last = None;
        // An interval, not a sleep per turn, so that frequent etcd changes cannot put the
        // file checks off.
        let mut checks = (!self.check_every.is_zero()).then(|| {
            let mut i = tokio::time::interval(self.check_every);
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            i
        });
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
            let check_files = async {
                match checks.as_mut() {
                    Some(i) => {
                        i.tick().await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.wait() => return,
                r = rx.changed() => if r.is_err() { return },
                () = check_files => {
                    // Reading files is blocking IO, kept off the runtime's worker.
                    let store = self.clone();
                    let replaced = tokio::task::spawn_blocking(move || store.reload_files())
                        .await
                        .unwrap_or(false);
                    if replaced {
                        self.update(&handle.load());
                    }
                }
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
