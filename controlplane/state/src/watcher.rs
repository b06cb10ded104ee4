//! The one cluster-state watcher: an initial ranged get, then a watch from the next
//! revision, resumed after every disconnect and re-listed after a compaction.
//!
//! Readers never talk to etcd. They hold a [`StateHandle`], load the current [`Snapshot`]
//! without locking (`arc-swap`), and wait on a generation counter to learn that a new one
//! was published.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use etcd_client::{Client, ConnectOptions, EventType, GetOptions, WatchOptions};
use tokio::sync::watch;

use crate::keys::{Keyspace, Kind};
use crate::metrics::{InvalidRecord, StateMetrics, WatchLost};
use crate::snapshot::{Change, Snapshot, StateDocument};

/// Keys fetched per page of the initial list, so a large cluster never exceeds gRPC's
/// message size limit.
const LIST_PAGE: i64 = 2_000;

/// A cheap, cloneable reader of the published snapshot.
#[derive(Clone, Debug)]
pub struct StateHandle {
    cell: Arc<ArcSwap<Snapshot>>,
    generation: watch::Sender<u64>,
}

impl Default for StateHandle {
    fn default() -> Self {
        StateHandle::new(Snapshot::default())
    }
}

impl StateHandle {
    /// A handle holding `initial`, at generation 0 (not yet ready).
    pub fn new(initial: Snapshot) -> StateHandle {
        StateHandle {
            cell: Arc::new(ArcSwap::from_pointee(initial)),
            generation: watch::Sender::new(0),
        }
    }

    /// The current snapshot. Lock-free; the snapshot stays valid while the `Arc` is held,
    /// whatever is published meanwhile.
    pub fn load(&self) -> Arc<Snapshot> {
        self.cell.load_full()
    }

    /// A receiver of the generation number, bumped on every publish.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// The number of snapshots published so far; 0 until the first list completed.
    pub fn generation(&self) -> u64 {
        *self.generation.borrow()
    }

    /// Waits until the first snapshot is published; `false` on timeout.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let mut rx = self.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|g| *g > 0))
            .await
            .map(|r| r.is_ok())
            .unwrap_or(false)
    }

    /// Publishes a new snapshot. Only sources in this crate call it.
    pub(crate) fn publish(&self, snap: Snapshot, metrics: &StateMetrics) {
        metrics.revision.set(snap.revision);
        for kind in Kind::ALL {
            metrics
                .records
                .with_label_values(&[kind.segment()])
                .set(snap.count(kind) as i64);
        }
        self.cell.store(Arc::new(snap));
        metrics.swaps.inc();
        self.generation.send_modify(|g| *g += 1);
    }
}

/// How to reach etcd and where the cluster's keys live.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// Every member's client URL; the client fails over between them.
    pub endpoints: Vec<String>,
    /// The key prefix of the cluster.
    pub prefix: String,
    /// How long one connection attempt may take.
    pub connect_timeout: Duration,
    /// First delay after a failure; doubled up to `backoff_max`.
    pub backoff_initial: Duration,
    /// Longest delay between attempts.
    pub backoff_max: Duration,
    /// HTTP/2 keep-alive ping interval while a watch is open, which is how a member that
    /// stopped answering without closing the connection is noticed. etcd closes the
    /// connection of a client that pings more often than its `--grpc-keepalive-min-time`
    /// (5 s by default) three times without data in between, so this must stay above it.
    pub keepalive_interval: Duration,
    /// How long a keep-alive ping may go unanswered before the connection is dropped.
    pub keepalive_timeout: Duration,
}

impl EtcdConfig {
    /// Defaults suited to a data-plane reader: fast to notice loss, gentle to retry.
    pub fn new(endpoints: Vec<String>, prefix: &str) -> EtcdConfig {
        EtcdConfig {
            endpoints,
            prefix: prefix.to_string(),
            connect_timeout: Duration::from_secs(3),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            // Twice etcd's default minimum ping interval, so timer jitter never makes a
            // ping look early to the server; an idle watch is otherwise cut every ~8 s.
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(5),
        }
    }

    /// The etcd client options every lain process uses.
    pub fn connect_options(&self) -> ConnectOptions {
        ConnectOptions::new()
            .with_connect_timeout(self.connect_timeout)
            .with_timeout(Duration::from_secs(10))
            .with_keep_alive(self.keepalive_interval, self.keepalive_timeout)
            // etcd counts a ping on a connection without an open stream as abuse whatever the
            // interval; a client with no watch open finds a dead member on its next request.
            .with_keep_alive_while_idle(false)
            .with_require_leader(true)
    }

    /// Connects a client to all endpoints, bounded by the connect timeout.
    pub async fn connect(&self) -> Result<Client, etcd_client::Error> {
        let fut = Client::connect(&self.endpoints, Some(self.connect_options()));
        match tokio::time::timeout(self.connect_timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(etcd_client::Error::InvalidArgs(format!(
                "connecting to etcd at {:?} timed out after {:?}",
                self.endpoints, self.connect_timeout
            ))),
        }
    }
}

/// Where a watcher reads cluster state from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A live etcd cluster.
    Etcd(EtcdConfig),
    /// A standalone state file (YAML or JSON), re-read when it changes.
    File(PathBuf),
}

/// Feeds a [`StateHandle`] from a [`Source`] until shut down.
#[derive(Debug)]
pub struct Watcher {
    source: Source,
    keyspace: Keyspace,
    handle: StateHandle,
    metrics: StateMetrics,
    initial: Option<Snapshot>,
}

impl Watcher {
    /// A watcher for `source`, reporting through `metrics`.
    pub fn new(source: Source, metrics: StateMetrics) -> Watcher {
        let keyspace = match &source {
            Source::Etcd(cfg) => Keyspace::new(&cfg.prefix),
            Source::File(_) => Keyspace::default(),
        };
        Watcher {
            source,
            keyspace,
            handle: StateHandle::default(),
            metrics,
            initial: None,
        }
    }

    /// Starts from a snapshot saved earlier: it is published at once, and the watch resumes
    /// from its revision, or re-lists if etcd has compacted that revision away.
    pub fn starting_from(mut self, snapshot: Snapshot) -> Watcher {
        self.initial = Some(snapshot);
        self
    }

    /// The handle readers use.
    pub fn handle(&self) -> StateHandle {
        self.handle.clone()
    }

    /// The keyspace the watcher reads.
    pub fn keyspace(&self) -> &Keyspace {
        &self.keyspace
    }

    /// Runs until `shutdown` completes. Errors are retried forever; the last snapshot keeps
    /// being served meanwhile.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        match &self.source {
            Source::Etcd(cfg) => {
                tokio::select! {
                    _ = &mut shutdown => {}
                    _ = self.run_etcd(cfg) => {}
                }
            }
            Source::File(path) => {
                tokio::select! {
                    _ = &mut shutdown => {}
                    _ = self.run_file(path) => {}
                }
            }
        }
    }

    async fn run_etcd(&self, cfg: &EtcdConfig) {
        let mut current = self.initial.clone().unwrap_or_default();
        // `None` means the next connection must list everything first.
        let mut resume_from: Option<i64> = None;
        if self.initial.is_some() && current.revision > 0 {
            resume_from = Some(current.revision);
            self.handle.publish(current.clone(), &self.metrics);
        }
        let mut backoff = cfg.backoff_initial;
        loop {
            match self.session(cfg, &mut current, &mut resume_from).await {
                Ok(()) => backoff = cfg.backoff_initial,
                Err(e) => {
                    WatchLost {
                        error: &e,
                        resume_from,
                    }
                    .emit(&self.metrics);
                    tokio::time::sleep(jitter(backoff)).await;
                    backoff = (backoff * 2).min(cfg.backoff_max);
                }
            }
        }
    }

    /// One connection: list if needed, then watch until the stream ends. Returns `Ok` when
    /// the stream ended cleanly (compaction or server close), `Err` on failure.
    async fn session(
        &self,
        cfg: &EtcdConfig,
        current: &mut Snapshot,
        resume_from: &mut Option<i64>,
    ) -> Result<(), String> {
        let mut client = cfg.connect().await.map_err(|e| e.to_string())?;
        let prefix = self.keyspace.state_prefix();
        let rev = match *resume_from {
            Some(rev) => rev,
            None => {
                let rev = self.relist(&mut client, current).await?;
                *resume_from = Some(rev);
                rev
            }
        };
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(rev + 1)
            .with_progress_notify();
        let mut stream = client
            .watch(prefix.as_bytes(), Some(opts))
            .await
            .map_err(|e| e.to_string())?;
        self.metrics.connected.set(1);
        loop {
            let resp = match stream.message().await {
                Ok(Some(resp)) => resp,
                Ok(None) => return Err("watch stream closed by server".into()),
                Err(e) => return Err(e.to_string()),
            };
            if resp.compact_revision() > 0 {
                tracing::warn!(
                    compacted = resp.compact_revision(),
                    resume_from = rev,
                    "watch revision was compacted; re-listing"
                );
                *resume_from = None;
                return Ok(());
            }
            if resp.canceled() {
                return Err(format!("watch canceled: {}", resp.cancel_reason()));
            }
            if resp.events().is_empty() {
                // A progress notification: everything up to its revision has been seen.
                if !resp.created()
                    && let Some(h) = resp.header()
                {
                    *resume_from = Some(resume_from.unwrap_or(0).max(h.revision()));
                }
                continue;
            }
            let mut last = resume_from.unwrap_or(0);
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                let Ok(key) = kv.key_str() else {
                    tracing::warn!("skipped a cluster-state key that is not UTF-8");
                    continue;
                };
                last = last.max(kv.mod_revision());
                let change = match ev.event_type() {
                    EventType::Put => Change::Put {
                        key,
                        value: kv.value(),
                        create_revision: kv.create_revision(),
                        mod_revision: kv.mod_revision(),
                    },
                    EventType::Delete => Change::Delete { key },
                };
                if let Err(rejected) = current.apply(&self.keyspace, change) {
                    InvalidRecord {
                        rejected: &rejected,
                    }
                    .emit(&self.metrics);
                }
            }
            *resume_from = Some(last);
            current.revision = last;
            self.handle.publish(current.clone(), &self.metrics);
        }
    }

    /// Lists the whole state range at one revision, page by page, and publishes it.
    async fn relist(&self, client: &mut Client, current: &mut Snapshot) -> Result<i64, String> {
        let prefix = self.keyspace.state_prefix();
        let range_end = prefix_end(prefix.as_bytes());
        let mut next = prefix.as_bytes().to_vec();
        let mut revision = 0i64;
        let mut fresh = Snapshot::default();
        loop {
            let mut opts = GetOptions::new()
                .with_range(range_end.clone())
                .with_limit(LIST_PAGE);
            if revision > 0 {
                opts = opts.with_revision(revision);
            }
            let resp = client
                .get(next.clone(), Some(opts))
                .await
                .map_err(|e| e.to_string())?;
            if revision == 0 {
                revision = resp.header().map_or(0, |h| h.revision());
            }
            for kv in resp.kvs() {
                let Ok(key) = kv.key_str() else { continue };
                let change = Change::Put {
                    key,
                    value: kv.value(),
                    create_revision: kv.create_revision(),
                    mod_revision: kv.mod_revision(),
                };
                if let Err(rejected) = fresh.apply(&self.keyspace, change) {
                    InvalidRecord {
                        rejected: &rejected,
                    }
                    .emit(&self.metrics);
                    fresh.keep_previous(&self.keyspace, current, key);
                }
            }
            match (resp.more(), resp.kvs().last()) {
                (true, Some(last)) => {
                    next = last.key().to_vec();
                    next.push(0);
                }
                _ => break,
            }
        }
        fresh.revision = revision;
        *current = fresh;
        self.metrics.relists.inc();
        self.handle.publish(current.clone(), &self.metrics);
        tracing::info!(revision, "listed cluster state");
        Ok(revision)
    }

    async fn run_file(&self, path: &PathBuf) {
        let mut last_seen: Option<(std::time::SystemTime, u64)> = None;
        loop {
            let stamp = std::fs::metadata(path)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())));
            if stamp.is_some() && stamp != last_seen {
                last_seen = stamp;
                match load_document(path) {
                    Ok(doc) => {
                        let (snap, rejected) = Snapshot::from_document(&self.keyspace, &doc);
                        for r in &rejected {
                            InvalidRecord { rejected: r }.emit(&self.metrics);
                        }
                        self.handle.publish(snap, &self.metrics);
                    }
                    Err(e) => {
                        // A file that does not parse keeps the previous state, like a bad etcd value.
                        tracing::warn!(path = %path.display(), error = %e, "state file not applied");
                        self.metrics.invalid.with_label_values(&["file"]).inc();
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// Reads a standalone state file; YAML unless the name ends in `.json`.
pub fn load_document(path: &std::path::Path) -> Result<StateDocument, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    } else {
        serde_norway::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// The smallest key greater than every key starting with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn jitter(d: Duration) -> Duration {
    let ms = d.as_millis() as u64;
    Duration::from_millis(ms / 2 + rand::random_range(0..=ms / 2 + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_last_byte() {
        assert_eq!(prefix_end(b"/lain/state/"), b"/lain/state0".to_vec());
        assert_eq!(prefix_end(&[b'a', 0xff]), b"b".to_vec());
    }

    #[tokio::test]
    async fn file_source_publishes_and_skips_bad_records() {
        let dir = std::env::temp_dir().join(format!("lain-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.yaml");
        std::fs::write(
            &path,
            "routes:\n  - {host: a.lain, app: a, proc: web}\n  - {host: b.lain, path: nope, app: b, proc: web}\n",
        )
        .unwrap();
        let metrics = StateMetrics::unregistered();
        let w = Watcher::new(Source::File(path.clone()), metrics.clone());
        let h = w.handle();
        let task = tokio::spawn(w.run(std::future::pending()));
        assert!(h.wait_ready(Duration::from_secs(5)).await);
        assert_eq!(h.load().routes.len(), 1);
        assert_eq!(metrics.invalid_count(Some(Kind::Route)), 1);
        task.abort();
        std::fs::remove_dir_all(&dir).ok();
    }
}
