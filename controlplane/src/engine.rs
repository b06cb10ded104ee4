//! The engine: one reconcile loop that owns all control-plane state and consumes one closed
//! event type, and a cloneable [`Engine`] handle whose async methods (register, deploy,
//! scale, roll back, list instances and events, add/drain/remove nodes) an API or CLI calls.
//!
//! Each pass is level-triggered: it lists the containers labelled with this cluster on
//! every node, compares them with the app specs, creates/stops/removes containers until
//! they match, probes health, and publishes the result. Nothing depends on having seen an
//! earlier event, so a restarted control plane adopts the containers it finds.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions, SortOrder, SortTarget};
use futures::StreamExt;
use lain_common::Shutdown;
use lain_state::records::{self, decode};
use lain_state::{AppRecord, Keyspace, Kind, NodeRecord, NodeState, SCHEMA_VERSION};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::docker::{self, Actual, ContainerSpec, NodeClient};
use crate::lainyaml::{LainConf, LocatedError, Proc, ProcType};
use crate::metrics::Metrics;
use crate::publish::{AppSpec, InstanceView, Publisher, app_records};

/// Settings of the engine, from the `lain controlplane` config.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// The cluster's key layout; its prefix also labels the containers.
    pub keyspace: Keyspace,
    /// Domains web mountpoints are expanded onto; the first is `LAIN_DOMAIN`.
    pub cluster_domains: Vec<String>,
    /// Root of the per-instance volume directories.
    pub volume_root: PathBuf,
    /// Host-mode ports handed out as `PORT`, inclusive.
    pub port_range: (u16, u16),
    /// Time between reconcile passes when nothing happens.
    pub tick: Duration,
    /// How long a new version may take to become healthy before the rollout is undone.
    pub health_deadline: Duration,
    /// Time allowed for one probe.
    pub probe_timeout: Duration,
    /// How often an instance that passed its last probe is probed again; the others are
    /// probed on every pass.
    pub probe_interval: Duration,
    /// How long a node may fail to answer before its stateless instances move (sooner when
    /// its lease expires first).
    pub node_down_grace: Duration,
    /// TTL of node leases, renewed only while the node's engine answers a ping.
    pub node_lease_ttl: Duration,
    /// How instances are networked.
    pub network: Network,
    /// The key that opens secret files; without it no secret is mounted.
    pub secrets: Option<crate::secrets::SecretBox>,
    /// The registry (`host:port`) nodes pull missing images from.
    pub registry: Option<String>,
}

/// How instances are networked, for the whole cluster.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Network {
    /// Host networking: each instance listens on a `PORT` of its own from `port_range` and is
    /// reached at its node's address.
    #[default]
    Host,
    /// Each instance joins this Docker network (it must exist on every node), listens on its
    /// proc's declared port (`PORT`), and is reached at its own address on that network.
    Bridge(String),
}

impl EngineSettings {
    /// Defaults suited to tests and small clusters.
    pub fn new(keyspace: Keyspace, cluster_domains: Vec<String>, volume_root: PathBuf) -> Self {
        EngineSettings {
            keyspace,
            cluster_domains,
            volume_root,
            port_range: (20000, 29999),
            tick: Duration::from_millis(250),
            health_deadline: Duration::from_secs(60),
            probe_timeout: Duration::from_millis(500),
            probe_interval: Duration::from_secs(1),
            node_down_grace: Duration::from_secs(5),
            node_lease_ttl: Duration::from_secs(10),
            network: Network::Host,
            secrets: None,
            registry: None,
        }
    }
}

/// A node as configured or added at run time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeSpec {
    /// The node name.
    pub name: String,
    /// `unix://...` or `tcp://127.0.0.1:port`.
    pub docker_host: String,
    /// Where its instances are reached.
    pub address: IpAddr,
    /// Labels matched by `filters:`.
    pub labels: BTreeMap<String, String>,
    /// CPU capacity in cores.
    pub cpus: u32,
    /// Memory capacity in bytes.
    pub memory_bytes: u64,
}

impl NodeSpec {
    /// The node as recorded in etcd, in `state`.
    pub fn record(&self, state: NodeState) -> NodeRecord {
        NodeRecord {
            v: SCHEMA_VERSION,
            name: self.name.clone(),
            docker_host: self.docker_host.clone(),
            address: self.address,
            labels: self.labels.clone(),
            cpus: self.cpus,
            memory_bytes: self.memory_bytes,
            state,
        }
    }
}

impl From<&NodeRecord> for NodeSpec {
    fn from(r: &NodeRecord) -> NodeSpec {
        NodeSpec {
            name: r.name.clone(),
            docker_host: r.docker_host.clone(),
            address: r.address,
            labels: r.labels.clone(),
            cpus: r.cpus,
            memory_bytes: r.memory_bytes,
        }
    }
}

/// Why an engine call failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The lain.yaml is invalid; every error is listed.
    #[error("invalid lain.yaml: {}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<LocatedError>),
    /// No such app.
    #[error("no app {0:?}")]
    NoApp(String),
    /// No such proc.
    #[error("app {0:?} has no proc {1:?}")]
    NoProc(String, String),
    /// No such node.
    #[error("no node {0:?}")]
    NoNode(String),
    /// Nothing to roll back to.
    #[error("app {0:?} has no earlier version to roll back to")]
    NoPrevious(String),
    /// A bad argument.
    #[error("{0}")]
    Bad(String),
    /// etcd failed.
    #[error(transparent)]
    Etcd(#[from] crate::publish::PublishError),
    /// Docker failed.
    #[error(transparent)]
    Docker(#[from] docker::DockerError),
    /// The engine has stopped.
    #[error("the engine has stopped")]
    Stopped,
}

/// One entry of an app's history under `Keyspace::event`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppEvent {
    /// Sequence number within the app.
    pub seq: u64,
    /// RFC 3339 time.
    pub at: String,
    /// `deployed`, `started`, `healthy`, `crashed`, `oom-killed`, `restarted`, `removed`,
    /// `rescheduled`, `stranded` (a stateful instance on a lost node, which stays),
    /// `pending`, `deploy-failed`, `rolled-back`, `scaled`, `registered`.
    pub kind: String,
    /// The proc, if the event is about one.
    #[serde(default)]
    pub proc_name: Option<String>,
    /// The instance, if the event is about one.
    #[serde(default)]
    pub instance: Option<u32>,
    /// Details.
    pub message: String,
}

/// One entry of an app's deploy history under `Keyspace::deploy`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeployEntry {
    /// Sequence number within the app.
    pub seq: u64,
    /// RFC 3339 time.
    pub at: String,
    /// The version deployed.
    pub version: String,
    /// Its image.
    pub image: String,
    /// `started`, `succeeded`, `failed`, `rolled-back`.
    pub outcome: String,
}

/// An instance slot as reported by [`Engine::instances`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceStatus {
    /// The proc.
    pub proc_name: String,
    /// The instance number.
    pub instance: u32,
    /// The node of its current container, if any.
    pub node: Option<String>,
    /// The current container's id.
    pub container_id: Option<String>,
    /// The current container's name.
    pub container_name: Option<String>,
    /// The version it runs.
    pub version: Option<String>,
    /// Its `PORT`.
    pub port: Option<u16>,
    /// Whether its probe passes.
    pub healthy: bool,
    /// Whether it is published as the slot's endpoint.
    pub serving: bool,
    /// How often it was replaced after crashing.
    pub restarts: u32,
    /// How its last container ended.
    pub last_exit: Option<String>,
    /// Why it is not running, when it is pending.
    pub pending: Option<String>,
}

/// A change to one proc's scale: only the fields given change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScaleChange {
    /// How many instances run.
    pub num_instances: Option<u32>,
    /// LAIN's CPU level, 0–8.
    pub cpu: Option<u8>,
    /// The memory limit (`64m`, `1g`).
    pub memory: Option<String>,
}

/// The most instances one proc may be scaled to.
pub const MAX_INSTANCES: u32 = 100;

/// The commands the handle sends to the loop.
enum Command {
    Register(
        String,
        String,
        oneshot::Sender<Result<LainConf, EngineError>>,
    ),
    Deploy(
        String,
        String,
        String,
        oneshot::Sender<Result<u64, EngineError>>,
    ),
    Scale(
        String,
        String,
        ScaleChange,
        oneshot::Sender<Result<Proc, EngineError>>,
    ),
    Rollback(String, oneshot::Sender<Result<String, EngineError>>),
    Remove(String, oneshot::Sender<Result<(), EngineError>>),
    Instances(
        String,
        oneshot::Sender<Result<Vec<InstanceStatus>, EngineError>>,
    ),
    AddNode(NodeSpec, oneshot::Sender<Result<(), EngineError>>),
    DrainNode(String, oneshot::Sender<Result<(), EngineError>>),
    RemoveNode(String, oneshot::Sender<Result<(), EngineError>>),
}

/// Everything that wakes the loop: one closed type.
enum Event {
    /// A request from the handle.
    Command(Command),
    /// A container changed on a node.
    Docker,
    /// Something changed in etcd.
    Etcd,
    /// A node's event stream ended or failed.
    NodeStream(String),
    /// A retired container is gone.
    Retired(String),
    /// A node's lease-bound record was deleted.
    NodeLeaseGone(String),
    /// The nodes whose lease-bound records exist, listed when the lease watch (re)starts.
    NodeLeasesPresent(HashSet<String>),
}

/// The handle to a running engine.
#[derive(Clone)]
pub struct Engine {
    tx: mpsc::Sender<Event>,
    client: Client,
    ks: Keyspace,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("ks", &self.ks).finish()
    }
}

impl Engine {
    /// Starts the engine loop: loads the app specs from etcd, registers `nodes`, and runs
    /// until `shutdown`. Containers keep running when the engine stops.
    pub async fn start(
        settings: EngineSettings,
        client: Client,
        nodes: Vec<NodeSpec>,
        metrics: Metrics,
        shutdown: Shutdown,
    ) -> Result<(Engine, tokio::task::JoinHandle<()>), EngineError> {
        let (tx, rx) = mpsc::channel(1024);
        let publisher = Publisher::new(client.clone(), settings.keyspace.clone());
        let mut state = State {
            settings: settings.clone(),
            publisher,
            client: client.clone(),
            nodes: BTreeMap::new(),
            apps: BTreeMap::new(),
            unreadable: BTreeSet::new(),
            previous: HashMap::new(),
            rollouts: HashMap::new(),
            slots: HashMap::new(),
            health: HashMap::new(),
            retiring: HashSet::new(),
            last_seen: HashMap::new(),
            unjoined: Vec::new(),
            unjoined_tried: None,
            tx: tx.clone(),
            metrics,
            shutdown: shutdown.clone(),
        };
        state.load_apps().await?;
        // Nodes come from the configuration and from the memberships stored by earlier
        // control planes (nodes added at run time); a stored drain is kept.
        let members = state.publisher.node_members().await?;
        let stored = |name: &str| {
            members
                .iter()
                .find(|m| m.name == name)
                .map_or(NodeState::Active, |m| m.state)
        };
        let configured: HashSet<String> = nodes.iter().map(|n| n.name.clone()).collect();
        for n in nodes {
            let st = stored(&n.name);
            state.join_or_defer(n, st).await?;
        }
        for m in members.iter().filter(|m| !configured.contains(&m.name)) {
            state.join_or_defer(NodeSpec::from(m), m.state).await?;
        }
        state.watch_etcd();
        state.watch_node_leases();
        let handle = tokio::spawn(state.run(rx));
        Ok((
            Engine {
                tx,
                client,
                ks: settings.keyspace,
            },
            handle,
        ))
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, EngineError>>) -> Command,
    ) -> Result<T, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Event::Command(make(reply)))
            .await
            .map_err(|_| EngineError::Stopped)?;
        rx.await.map_err(|_| EngineError::Stopped)?
    }

    /// Registers or updates an app from lain.yaml text (`file` names it in errors). A new
    /// app runs nothing until its first deploy; an updated one keeps its version.
    pub async fn register(&self, file: &str, text: &str) -> Result<LainConf, EngineError> {
        self.call(|r| Command::Register(file.to_string(), text.to_string(), r))
            .await
    }

    /// Deploys `version` of `app` from `image`; returns the deploy's sequence number.
    pub async fn deploy(&self, app: &str, version: &str, image: &str) -> Result<u64, EngineError> {
        self.call(|r| Command::Deploy(app.to_string(), version.to_string(), image.to_string(), r))
            .await
    }

    /// Sets the number of instances of one proc.
    pub async fn scale(&self, app: &str, proc_name: &str, n: u32) -> Result<(), EngineError> {
        let change = ScaleChange {
            num_instances: Some(n),
            ..ScaleChange::default()
        };
        self.scale_proc(app, proc_name, change).await.map(|_| ())
    }

    /// Changes the instances, CPU level or memory limit of one proc; returns the proc as it
    /// now is. New limits apply to running containers at once (`docker update`) and to
    /// every container started later.
    pub async fn scale_proc(
        &self,
        app: &str,
        proc_name: &str,
        change: ScaleChange,
    ) -> Result<Proc, EngineError> {
        self.call(|r| Command::Scale(app.to_string(), proc_name.to_string(), change, r))
            .await
    }

    /// Deploys the version before the current one again; returns it.
    pub async fn rollback(&self, app: &str) -> Result<String, EngineError> {
        self.call(|r| Command::Rollback(app.to_string(), r)).await
    }

    /// Removes an app: its containers are stopped and its records deleted.
    pub async fn remove_app(&self, app: &str) -> Result<(), EngineError> {
        self.call(|r| Command::Remove(app.to_string(), r)).await
    }

    /// The instance slots of an app.
    pub async fn instances(&self, app: &str) -> Result<Vec<InstanceStatus>, EngineError> {
        self.call(|r| Command::Instances(app.to_string(), r)).await
    }

    /// Adds a node at run time.
    pub async fn add_node(&self, node: NodeSpec) -> Result<(), EngineError> {
        self.call(|r| Command::AddNode(node, r)).await
    }

    /// Drains a node: it takes no new instances and its instances move elsewhere.
    pub async fn drain_node(&self, name: &str) -> Result<(), EngineError> {
        self.call(|r| Command::DrainNode(name.to_string(), r)).await
    }

    /// Removes a node: it is forgotten, and its instances are rescheduled.
    pub async fn remove_node(&self, name: &str) -> Result<(), EngineError> {
        self.call(|r| Command::RemoveNode(name.to_string(), r))
            .await
    }

    /// The app's event history, oldest first.
    pub async fn events(&self, app: &str) -> Result<Vec<AppEvent>, EngineError> {
        self.read_json(&self.ks.events_of_app(app)).await
    }

    /// The app's deploy history, oldest first.
    pub async fn deploys(&self, app: &str) -> Result<Vec<DeployEntry>, EngineError> {
        self.read_json(&self.ks.deploys_of_app(app)).await
    }

    async fn read_json<T: for<'de> Deserialize<'de>>(
        &self,
        prefix: &str,
    ) -> Result<Vec<T>, EngineError> {
        let resp = self
            .client
            .kv_client()
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await
            .map_err(crate::publish::PublishError)?;
        Ok(resp
            .kvs()
            .iter()
            .filter_map(|kv| serde_json::from_slice(kv.value()).ok())
            .collect())
    }
}

/// Per-slot memory: restarts, backoff, the last exit, and why it is pending.
#[derive(Debug, Default, Clone)]
struct Slot {
    restarts: u32,
    failures: u32,
    /// The slot's container crashed and its replacement has not been started yet: the next
    /// start is a restart (a start for a deploy or a move is not).
    crashed: bool,
    next_attempt: Option<Instant>,
    last_exit: Option<String>,
    pending: Option<String>,
    drift: u32,
    last_node: Option<String>,
    /// Set once a stateful instance's node is lost and the event reported, so it is
    /// reported once per loss.
    stranded: bool,
}

/// Probe memory per container.
#[derive(Debug, Clone)]
struct Health {
    started: Instant,
    healthy: bool,
    fails: u32,
    announced: bool,
    /// When the last probe was sent.
    probed: Option<Instant>,
}

struct Rollout {
    started: Instant,
    seq: u64,
}

struct NodeEntry {
    spec: NodeSpec,
    client: NodeClient,
    state: NodeState,
    down_since: Option<Instant>,
    /// The node's lease expired: its engine did not answer for a whole lease TTL, as seen by
    /// this control plane or by the one before it.
    lease_expired: bool,
    lease: Option<tokio::task::JoinHandle<()>>,
    events: Option<tokio::task::JoinHandle<()>>,
}

type SlotKey = (String, String, u32);

/// The `PORT` of a proc that declares none, in bridge mode (LAIN's web default).
const DEFAULT_BRIDGE_PORT: u16 = 80;

/// How many containers one pass creates at the same time.
const CONCURRENT_STARTS: usize = 8;

/// How long a retired instance on a reachable node keeps running after the pass that
/// withdraws its endpoint, so the proxies and DNS servers watching etcd stop sending to it
/// before it stops.
const WITHDRAW_DELAY: Duration = Duration::from_secs(1);

/// The containers one pass decided to start, and the host ports taken so far.
struct Starts {
    used_ports: HashSet<u16>,
    planned: Vec<PlannedStart>,
}

/// A container a pass decided to start.
struct PlannedStart {
    key: SlotKey,
    node_name: String,
    port: u16,
    drift: u32,
    /// The slot's node before this start, restored if it fails.
    prev_node: Option<String>,
    restarted: bool,
    image: String,
    client: NodeClient,
    cs: ContainerSpec,
}

/// How long an instance must stay healthy before its crash backoff starts over.
const STABLE_AFTER: Duration = Duration::from_secs(10);

struct State {
    settings: EngineSettings,
    publisher: Publisher,
    client: Client,
    nodes: BTreeMap<String, NodeEntry>,
    apps: BTreeMap<String, AppSpec>,
    /// Apps whose stored record this control plane cannot read (written by another
    /// release, or damaged). What they want is unknown, so their containers and published
    /// records are left exactly as they are until the app is registered or removed again;
    /// taking them for apps nobody wants would stop them all.
    unreadable: BTreeSet<String>,
    /// The version each app ran before its current deploy, for rollbacks.
    previous: HashMap<String, (String, String)>,
    rollouts: HashMap<String, Rollout>,
    slots: HashMap<SlotKey, Slot>,
    health: HashMap<String, Health>,
    retiring: HashSet<String>,
    /// The containers each node listed last; a node that stops answering keeps its
    /// instances in their slots until its grace period ends, so nothing moves on a blip.
    last_seen: HashMap<String, Vec<Actual>>,
    /// Configured nodes whose engine could not be reached when this engine started; they
    /// join as soon as they answer. A control plane taking over while a node is down must
    /// still lead, so an absent engine never fails the start.
    unjoined: Vec<(NodeSpec, NodeState)>,
    unjoined_tried: Option<Instant>,
    tx: mpsc::Sender<Event>,
    metrics: Metrics,
    shutdown: Shutdown,
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

impl State {
    async fn load_apps(&mut self) -> Result<(), EngineError> {
        let prefix = self.settings.keyspace.kind_prefix(Kind::App);
        let resp = self
            .client
            .kv_client()
            .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(crate::publish::PublishError)?;
        for kv in resp.kvs() {
            let key = String::from_utf8_lossy(kv.key());
            let (name, error) = match decode::<AppRecord>(kv.value()) {
                Ok(rec) => match serde_json::from_value::<AppSpec>(rec.spec) {
                    Ok(spec) => {
                        self.apps.insert(rec.name, spec);
                        continue;
                    }
                    Err(e) => (rec.name, e.to_string()),
                },
                Err(e) => {
                    let parsed = self.settings.keyspace.parse(&key);
                    match parsed.ok().and_then(|k| k.parts.into_iter().next()) {
                        Some(name) => (name, e.to_string()),
                        None => {
                            tracing::error!(%key, error = %e, "unreadable app record under an unreadable key");
                            continue;
                        }
                    }
                }
            };
            tracing::error!(
                app = %name,
                %key,
                %error,
                "unreadable app record: its containers and records are left as they are \
                 until the app is registered or removed again"
            );
            self.unreadable.insert(name);
        }
        // The previous versions come from the deploy history.
        for app in self.apps.keys().cloned().collect::<Vec<_>>() {
            if let Some(prev) = self.previous_deploy(&app).await? {
                self.previous.insert(app.clone(), prev);
            }
            // A rollout that an earlier leader started and did not finish is carried on,
            // with a fresh deadline, so it still ends as succeeded or rolled back.
            if let Some(last) = self.latest_deploy(&app).await?
                && last.outcome == "started"
                && self
                    .apps
                    .get(&app)
                    .is_some_and(|s| s.version == last.version)
            {
                tracing::info!(%app, version = %last.version, "resuming an unfinished rollout");
                self.rollouts.insert(
                    app,
                    Rollout {
                        started: Instant::now(),
                        seq: last.seq,
                    },
                );
            }
        }
        Ok(())
    }

    async fn latest_deploy(&self, app: &str) -> Result<Option<DeployEntry>, EngineError> {
        let resp = self
            .client
            .kv_client()
            .get(
                self.settings.keyspace.deploys_of_app(app),
                Some(
                    GetOptions::new()
                        .with_prefix()
                        .with_sort(SortTarget::Key, SortOrder::Descend)
                        .with_limit(1),
                ),
            )
            .await
            .map_err(crate::publish::PublishError)?;
        Ok(resp
            .kvs()
            .first()
            .and_then(|kv| serde_json::from_slice(kv.value()).ok()))
    }

    async fn previous_deploy(&self, app: &str) -> Result<Option<(String, String)>, EngineError> {
        let current = self
            .apps
            .get(app)
            .map(|s| s.version.clone())
            .unwrap_or_default();
        let resp = self
            .client
            .kv_client()
            .get(
                self.settings.keyspace.deploys_of_app(app),
                Some(
                    GetOptions::new()
                        .with_prefix()
                        .with_sort(SortTarget::Key, SortOrder::Descend)
                        .with_limit(50),
                ),
            )
            .await
            .map_err(crate::publish::PublishError)?;
        for kv in resp.kvs() {
            if let Ok(d) = serde_json::from_slice::<DeployEntry>(kv.value())
                && d.version != current
                && d.outcome != "failed"
            {
                return Ok(Some((d.version, d.image)));
            }
        }
        Ok(None)
    }

    fn watch_etcd(&self) {
        let mut client = self.client.clone();
        let prefix = self.settings.keyspace.kind_prefix(Kind::App);
        let tx = self.tx.clone();
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let Ok(mut stream) = client
                .watch(
                    prefix.as_str(),
                    Some(etcd_client::WatchOptions::new().with_prefix()),
                )
                .await
            else {
                return;
            };
            loop {
                tokio::select! {
                    _ = shutdown.wait() => return,
                    m = stream.next() => match m {
                        Some(Ok(_)) => { let _ = tx.try_send(Event::Etcd); }
                        _ => return,
                    },
                }
            }
        });
    }

    /// Adds a configured node, or defers it when its engine cannot be reached yet.
    async fn join_or_defer(&mut self, spec: NodeSpec, state: NodeState) -> Result<(), EngineError> {
        match self.add_node(spec.clone(), state).await {
            Ok(()) => Ok(()),
            Err(EngineError::Docker(e)) => {
                tracing::warn!(node = %spec.name, error = %e, "node unreachable; it joins when it answers");
                self.unjoined.push((spec, state));
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Tries the deferred nodes again, at most once a second.
    async fn retry_unjoined(&mut self) {
        if self.unjoined.is_empty()
            || self
                .unjoined_tried
                .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        self.unjoined_tried = Some(Instant::now());
        for (spec, state) in std::mem::take(&mut self.unjoined) {
            if let Err(e) = self.join_or_defer(spec, state).await {
                tracing::warn!(error = %e, "a deferred node could not join");
            }
        }
    }

    /// Adds (or re-adds) a node: stores its membership, and registers its lease when its
    /// engine answers. A node whose engine does not answer and whose lease is already gone
    /// (it expired while no control plane renewed it) is taken as lost at once.
    async fn add_node(&mut self, spec: NodeSpec, state: NodeState) -> Result<(), EngineError> {
        let client = NodeClient::connect(&spec.name, &spec.docker_host, spec.address)?
            .with_registry(self.settings.registry.clone());
        let record = spec.record(state);
        self.publisher.save_node_member(&record).await?;
        let answers = tokio::time::timeout(Duration::from_secs(3), client.ping())
            .await
            .is_ok_and(|r| r.is_ok());
        let (lease, down_since, lease_expired) = if answers {
            let lease = self
                .publisher
                .register_node(&record, self.settings.node_lease_ttl, alive(&client))
                .await?;
            (Some(lease), None, false)
        } else {
            // The record of an earlier control plane is left to expire on its own lease;
            // its deletion is seen by the node watch.
            let expired = !self.publisher.node_lease_alive(&spec.name).await?;
            tracing::warn!(node = %spec.name, lease_expired = expired, "node does not answer");
            (None, Some(Instant::now()), expired)
        };
        let events = self.watch_node(&client);
        if let Some(old) = self.nodes.remove(&spec.name) {
            old.abort();
        }
        self.nodes.insert(
            spec.name.clone(),
            NodeEntry {
                spec,
                client,
                state,
                down_since,
                lease_expired,
                lease,
                events: Some(events),
            },
        );
        Ok(())
    }

    /// Registers a fresh lease for a node whose engine answers again after its lease expired
    /// or its renewing task ended (etcd was away).
    async fn renew_lease(&mut self, name: &str) {
        let Some(n) = self.nodes.get(name) else {
            return;
        };
        let record = n.spec.record(n.state);
        let alive_fn = alive(&n.client);
        match self
            .publisher
            .register_node(&record, self.settings.node_lease_ttl, alive_fn)
            .await
        {
            Ok(lease) => {
                if let Some(n) = self.nodes.get_mut(name) {
                    tracing::info!(node = %name, "node lease registered again");
                    n.lease_expired = false;
                    if let Some(old) = n.lease.replace(lease) {
                        old.abort();
                    }
                }
            }
            Err(e) => tracing::warn!(node = %name, error = %e, "cannot register the node lease"),
        }
    }

    /// Watches the lease-bound node records: a deletion that nobody asked for is a lease
    /// that expired. Each (re)start of the watch first lists the records, so a deletion
    /// missed while etcd was away is still seen, then watches from that revision on.
    fn watch_node_leases(&self) {
        let mut client = self.client.clone();
        let prefix = self.settings.keyspace.kind_prefix(Kind::Node);
        let ks = self.settings.keyspace.clone();
        let tx = self.tx.clone();
        let shutdown = self.shutdown.clone();
        let name_of = move |key: &[u8]| -> Option<String> {
            let key = std::str::from_utf8(key).ok()?;
            ks.parse(key).ok()?.parts.into_iter().next()
        };
        tokio::spawn(async move {
            loop {
                let listed = client
                    .kv_client()
                    .get(
                        prefix.as_str(),
                        Some(GetOptions::new().with_prefix().with_keys_only()),
                    )
                    .await;
                if let Ok(resp) = listed {
                    let present = resp
                        .kvs()
                        .iter()
                        .filter_map(|kv| name_of(kv.key()))
                        .collect();
                    let _ = tx.send(Event::NodeLeasesPresent(present)).await;
                    let from = resp.header().map_or(0, |h| h.revision()) + 1;
                    let opts = etcd_client::WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(from);
                    if let Ok(mut stream) = client.watch(prefix.as_str(), Some(opts)).await {
                        loop {
                            let m = tokio::select! {
                                _ = shutdown.wait() => return,
                                m = stream.next() => m,
                            };
                            let Some(Ok(resp)) = m else { break };
                            for ev in resp.events() {
                                if ev.event_type() == etcd_client::EventType::Delete
                                    && let Some(name) = ev.kv().and_then(|kv| name_of(kv.key()))
                                {
                                    let _ = tx.send(Event::NodeLeaseGone(name)).await;
                                }
                            }
                        }
                    }
                }
                tokio::select! {
                    _ = shutdown.wait() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        });
    }

    /// Marks a node draining, in its membership and (while its lease lives) its record.
    async fn drain_node(&mut self, name: &str) -> Result<(), EngineError> {
        let Some(n) = self.nodes.get_mut(name) else {
            return Err(EngineError::NoNode(name.to_string()));
        };
        n.state = NodeState::Draining;
        let leased = !n.lease_expired && n.lease.as_ref().is_some_and(|l| !l.is_finished());
        let record = n.spec.record(NodeState::Draining);
        self.publisher.save_node_member(&record).await?;
        if leased {
            self.renew_lease(name).await;
        }
        Ok(())
    }

    fn watch_node(&self, client: &NodeClient) -> tokio::task::JoinHandle<()> {
        let stream = client.events(self.settings.keyspace.prefix());
        let tx = self.tx.clone();
        let name = client.name.clone();
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            loop {
                tokio::select! {
                    _ = shutdown.wait() => return,
                    e = stream.next() => match e {
                        Some(Ok(_)) => { let _ = tx.try_send(Event::Docker); }
                        _ => {
                            let _ = tx.send(Event::NodeStream(name)).await;
                            return;
                        }
                    },
                }
            }
        })
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Event>) {
        let mut tick = tokio::time::interval(self.settings.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.shutdown.wait() => break,
                _ = tick.tick() => {}
                ev = rx.recv() => match ev {
                    Some(ev) => self.handle(ev).await,
                    None => break,
                },
            }
            // Coalesce whatever else is queued into this pass.
            while let Ok(ev) = rx.try_recv() {
                self.handle(ev).await;
            }
            self.retry_unjoined().await;
            let started = Instant::now();
            if let Err(e) = self.reconcile().await {
                tracing::warn!(error = %e, "reconcile pass failed");
                self.metrics.passes.with_label_values(&["error"]).inc();
            } else {
                self.metrics.passes.with_label_values(&["ok"]).inc();
            }
            self.metrics
                .pass_seconds
                .observe(started.elapsed().as_secs_f64());
        }
        for (_, n) in std::mem::take(&mut self.nodes) {
            n.abort();
        }
    }

    async fn handle(&mut self, ev: Event) {
        match ev {
            Event::Command(c) => self.command(c).await,
            Event::Docker | Event::Etcd => {}
            Event::NodeLeaseGone(name) => {
                if let Some(n) = self.nodes.get_mut(&name) {
                    tracing::warn!(node = %name, "node lease expired");
                    n.lease_expired = true;
                }
            }
            Event::NodeLeasesPresent(present) => {
                for (name, n) in self.nodes.iter_mut() {
                    if !present.contains(name) && !n.lease_expired {
                        tracing::warn!(node = %name, "node lease found expired");
                        n.lease_expired = true;
                    }
                }
            }
            Event::Retired(id) => {
                self.retiring.remove(&id);
                self.health.remove(&id);
            }
            Event::NodeStream(name) => {
                // Re-subscribe after a pause; the pass meanwhile marks the node down if it
                // stopped answering.
                let tx = self.tx.clone();
                if let Some(n) = self.nodes.get_mut(&name) {
                    let client = n.client.clone();
                    let stream = client.events(self.settings.keyspace.prefix());
                    let shutdown = self.shutdown.clone();
                    n.events = Some(tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        let mut stream = std::pin::pin!(stream);
                        loop {
                            tokio::select! {
                                _ = shutdown.wait() => return,
                                e = stream.next() => match e {
                                    Some(Ok(_)) => { let _ = tx.try_send(Event::Docker); }
                                    _ => { let _ = tx.send(Event::NodeStream(name)).await; return; }
                                },
                            }
                        }
                    }));
                }
            }
        }
    }

    async fn command(&mut self, c: Command) {
        match c {
            Command::Register(file, text, reply) => {
                let _ = reply.send(self.register(&file, &text).await);
            }
            Command::Deploy(app, version, image, reply) => {
                let _ = reply.send(self.deploy(&app, &version, &image, "deployed").await);
            }
            Command::Scale(app, proc_name, change, reply) => {
                let r = self.scale(&app, &proc_name, change).await;
                let _ = reply.send(r);
            }
            Command::Rollback(app, reply) => {
                let r = match self.previous.get(&app).cloned() {
                    None => Err(EngineError::NoPrevious(app.clone())),
                    Some((version, image)) => self
                        .deploy(&app, &version, &image, "rolled-back")
                        .await
                        .map(|_| version),
                };
                let _ = reply.send(r);
            }
            Command::Remove(app, reply) => {
                // Removing an unreadable app hands its containers and records over to the
                // usual clean-up.
                let unreadable = self.unreadable.remove(&app);
                let r = if self.apps.remove(&app).is_some() || unreadable {
                    self.event(&app, "removed", None, None, "app removed".into())
                        .await;
                    Ok(())
                } else {
                    Err(EngineError::NoApp(app))
                };
                let _ = reply.send(r);
            }
            Command::Instances(app, reply) => {
                let r = self.instances(&app).await;
                let _ = reply.send(r);
            }
            Command::AddNode(spec, reply) => {
                let _ = reply.send(self.add_node(spec, NodeState::Active).await);
            }
            Command::DrainNode(name, reply) => {
                let r = self.drain_node(&name).await;
                let _ = reply.send(r);
            }
            Command::RemoveNode(name, reply) => {
                let r = match self.nodes.remove(&name) {
                    None => Err(EngineError::NoNode(name)),
                    Some(n) => {
                        // Its containers are stopped and removed, as far as the node still
                        // answers: forgotten but running, they would serve (or write to
                        // their data) beside the replacements the next pass starts elsewhere.
                        let client = n.client.clone();
                        let cluster = self.settings.keyspace.prefix().to_string();
                        let kill_timeouts: HashMap<(String, String), u32> = self
                            .apps
                            .iter()
                            .flat_map(|(app, spec)| {
                                spec.conf.procs.values().map(move |p| {
                                    ((app.clone(), p.name.clone()), p.kill_timeout_secs)
                                })
                            })
                            .collect();
                        self.last_seen.remove(&name);
                        let node = name.clone();
                        tokio::spawn(async move {
                            let listed = tokio::time::timeout(
                                Duration::from_secs(10),
                                client.list(&cluster),
                            )
                            .await;
                            let Ok(Ok(list)) = listed else {
                                tracing::warn!(
                                    %node,
                                    "a removed node's containers could not be listed; they are left to it"
                                );
                                return;
                            };
                            for a in list {
                                let t = kill_timeouts
                                    .get(&(a.app.clone(), a.proc_name.clone()))
                                    .copied()
                                    .unwrap_or(10);
                                let _ = client.stop(&a.id, t).await;
                                let _ = client.remove(&a.id).await;
                            }
                        });
                        n.abort();
                        self.publisher.forget_node(&name).await.map_err(Into::into)
                    }
                };
                let _ = reply.send(r);
            }
        }
    }

    /// A stream port is one listening port of the edge for the whole cluster (its key is
    /// `state/streams/{port}`): a port another app already declares is refused, where the
    /// later app would silently take the earlier one's TCP route over.
    fn check_stream_ports(&self, conf: &LainConf) -> Result<(), EngineError> {
        for p in conf.procs.values() {
            for port in &p.ports {
                let owner = self
                    .apps
                    .iter()
                    .filter(|(name, _)| **name != conf.appname)
                    .find_map(|(name, spec)| {
                        spec.conf
                            .procs
                            .values()
                            .find(|q| q.ports.contains(port))
                            .map(|q| (name, &q.name))
                    });
                if let Some((app, proc_name)) = owner {
                    return Err(EngineError::Bad(format!(
                        "stream port {port} of proc {:?} is already used by {app}.{proc_name}",
                        p.name
                    )));
                }
            }
        }
        Ok(())
    }

    async fn register(&mut self, file: &str, text: &str) -> Result<LainConf, EngineError> {
        // A resource's lain.yaml is a template: only its name is read now; each client's
        // instance is rendered, parsed and validated when that client deploys.
        let template = crate::resources::is_template(text).then(|| text.to_string());
        let conf = match &template {
            Some(t) => {
                crate::resources::check(file, t).map_err(|e| EngineError::Bad(e.to_string()))?;
                let name = crate::resources::top_level(t, "appname").unwrap_or_default();
                LainConf::parse(
                    file,
                    &format!("appname: {name}\napptype: resource\n"),
                    &self.settings.cluster_domains,
                )
                .map_err(EngineError::Invalid)?
            }
            None => LainConf::parse(file, text, &self.settings.cluster_domains)
                .map_err(EngineError::Invalid)?,
        };
        let app = conf.appname.clone();
        self.check_stream_ports(&conf)?;
        let spec = match self.apps.get(&app) {
            Some(old) => AppSpec {
                conf: conf.clone(),
                version: old.version.clone(),
                image: old.image.clone(),
                template,
            },
            None => AppSpec {
                conf: conf.clone(),
                version: String::new(),
                image: String::new(),
                template,
            },
        };
        self.apps.insert(app.clone(), spec);
        self.unreadable.remove(&app);
        // Written now, not at the next pass, so that listing apps right after registering
        // one shows it.
        self.persist_app(&app).await?;
        self.event(
            &app,
            "registered",
            None,
            None,
            format!("lain.yaml {file} registered"),
        )
        .await;
        Ok(conf)
    }

    async fn deploy(
        &mut self,
        app: &str,
        version: &str,
        image: &str,
        kind: &str,
    ) -> Result<u64, EngineError> {
        if version.is_empty()
            || !version
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(EngineError::Bad(format!(
                "version {version:?} must be non-empty letters, digits, '-', '_' or '.'"
            )));
        }
        let Some(spec) = self.apps.get(app) else {
            return Err(EngineError::NoApp(app.to_string()));
        };
        // The resources a client uses are instantiated before the client itself is deployed.
        let uses = spec.conf.use_resources.clone();
        for (res, used) in &uses {
            self.instantiate(res, app, used).await?;
        }
        self.start_rollout(app, version, image, kind).await
    }

    /// Renders resource `res` for `client` and deploys it as the app
    /// `resource.{res}.{client}`, with the resource's current version and image.
    async fn instantiate(
        &mut self,
        res: &str,
        client: &str,
        used: &crate::lainyaml::ResourceUse,
    ) -> Result<(), EngineError> {
        let Some(resource) = self.apps.get(res).cloned() else {
            return Err(EngineError::Bad(format!(
                "{client} uses resource {res:?}, which is not registered"
            )));
        };
        let Some(template) = resource.template.as_deref() else {
            return Err(EngineError::Bad(format!(
                "{client} uses {res:?} as a resource, but it is not one (apptype: resource)"
            )));
        };
        if resource.version.is_empty() {
            return Err(EngineError::Bad(format!(
                "{client} uses resource {res:?}, which has not been deployed"
            )));
        }
        let name = crate::resources::instance_name(res, client);
        let params = serde_json::Value::Object(used.params.clone().into_iter().collect());
        let file = format!("{res} (rendered for {client})");
        let text = crate::resources::render(&file, template, &params)
            .map_err(|e| EngineError::Bad(e.to_string()))?;
        let text = crate::resources::rename(&text, &name);
        let conf =
            LainConf::parse_resource_instance(&file, &text, &self.settings.cluster_domains, &name)
                .map_err(EngineError::Invalid)?;
        self.check_stream_ports(&conf)?;
        let unchanged = self.apps.get(&name).is_some_and(|s| {
            s.conf == conf && s.version == resource.version && s.image == resource.image
        });
        if unchanged {
            return Ok(());
        }
        // The instance keeps its running version until the rollout below replaces it.
        let (version, image) = self
            .apps
            .get(&name)
            .map(|s| (s.version.clone(), s.image.clone()))
            .unwrap_or_default();
        self.unreadable.remove(&name);
        self.apps.insert(
            name.clone(),
            AppSpec {
                conf,
                version,
                image,
                template: None,
            },
        );
        self.event(
            &name,
            "registered",
            None,
            None,
            format!("resource {res} instantiated for {client}"),
        )
        .await;
        self.start_rollout(&name, &resource.version, &resource.image, "deployed")
            .await?;
        Ok(())
    }

    /// Makes `version` the desired version of `app` and starts its surge-first rollout.
    async fn start_rollout(
        &mut self,
        app: &str,
        version: &str,
        image: &str,
        kind: &str,
    ) -> Result<u64, EngineError> {
        let Some(spec) = self.apps.get_mut(app) else {
            return Err(EngineError::NoApp(app.to_string()));
        };
        if !spec.version.is_empty() && spec.version != version {
            self.previous
                .insert(app.to_string(), (spec.version.clone(), spec.image.clone()));
        }
        spec.version = version.to_string();
        spec.image = image.to_string();
        let seq = self.publisher.next_seq(&format!("deploys.{app}")).await?;
        let entry = DeployEntry {
            seq,
            at: now_rfc3339(),
            version: version.to_string(),
            image: image.to_string(),
            outcome: "started".into(),
        };
        self.put_deploy(app, &entry).await;
        // The desired version is stored before anything is started, so a leader that takes
        // over at any later step carries on with this deploy instead of undoing it.
        self.persist_app(app).await?;
        self.rollouts.insert(
            app.to_string(),
            Rollout {
                started: Instant::now(),
                seq,
            },
        );
        // A deploy resets the crash backoff and the restart count: the new version deserves
        // a fresh start, and `lain ps` then counts its restarts, not its predecessors'.
        for (k, s) in self.slots.iter_mut() {
            if k.0 == app {
                s.failures = 0;
                s.next_attempt = None;
                s.restarts = 0;
                s.last_exit = None;
            }
        }
        self.event(
            app,
            kind,
            None,
            None,
            format!("version {version} ({image})"),
        )
        .await;
        Ok(seq)
    }

    /// Writes the app record (lain.yaml, version, image) at once, ahead of the next pass.
    async fn persist_app(&self, app: &str) -> Result<(), EngineError> {
        let Some(spec) = self.apps.get(app) else {
            return Ok(());
        };
        let ks = &self.settings.keyspace;
        let resources: BTreeMap<String, String> = spec
            .conf
            .use_resources
            .keys()
            .map(|r| (r.clone(), crate::resources::instance_name(r, app)))
            .collect();
        let key = ks.app(app);
        if let Some(value) = app_records(ks, spec, &resources, &[]).remove(&key) {
            self.publisher.put_raw(&key, value).await?;
        }
        Ok(())
    }

    async fn put_deploy(&self, app: &str, entry: &DeployEntry) {
        let key = self.settings.keyspace.deploy(app, entry.seq);
        if let Err(e) = self
            .publisher
            .put_raw(&key, serde_json::to_vec(entry).unwrap_or_default())
            .await
        {
            tracing::warn!(%app, error = %e, "cannot record deploy");
        }
    }

    async fn finish_rollout(&mut self, app: &str, outcome: &str) {
        let Some(r) = self.rollouts.remove(app) else {
            return;
        };
        let Some(spec) = self.apps.get(app) else {
            return;
        };
        let entry = DeployEntry {
            seq: r.seq,
            at: now_rfc3339(),
            version: spec.version.clone(),
            image: spec.image.clone(),
            outcome: outcome.into(),
        };
        self.put_deploy(app, &entry).await;
    }

    /// Undoes a failed rollout: the previous version becomes desired again.
    async fn fail_rollout(&mut self, app: &str, reason: String) {
        self.finish_rollout(app, "failed").await;
        self.event(app, "deploy-failed", None, None, reason.clone())
            .await;
        if let Some((version, image)) = self.previous.get(app).cloned() {
            if let Some(spec) = self.apps.get_mut(app) {
                spec.version = version.clone();
                spec.image = image;
            }
            if let Err(e) = self.persist_app(app).await {
                tracing::warn!(%app, error = %e, "cannot store the restored version yet");
            }
            self.event(
                app,
                "rolled-back",
                None,
                None,
                format!("back to version {version}: {reason}"),
            )
            .await;
        }
    }

    async fn scale(
        &mut self,
        app: &str,
        proc_name: &str,
        change: ScaleChange,
    ) -> Result<Proc, EngineError> {
        let spec = self
            .apps
            .get_mut(app)
            .ok_or_else(|| EngineError::NoApp(app.to_string()))?;
        let p = spec
            .conf
            .procs
            .get_mut(proc_name)
            .ok_or_else(|| EngineError::NoProc(app.to_string(), proc_name.to_string()))?;
        if let Some(n) = change.num_instances {
            if p.proc_type == ProcType::Oneshot {
                return Err(EngineError::Bad("oneshot procs are not scaled".into()));
            }
            if n > MAX_INSTANCES {
                return Err(EngineError::Bad(format!(
                    "num_instances {n} is above {MAX_INSTANCES}"
                )));
            }
        }
        if let Some(cpu) = change.cpu
            && cpu > 8
        {
            return Err(EngineError::Bad(format!("cpu {cpu} is not a level 0–8")));
        }
        let memory = match &change.memory {
            None => None,
            Some(m) => match crate::lainyaml::parse_memory(m) {
                Some(b) if b >= 4 << 20 => Some((m.clone(), b)),
                _ => {
                    return Err(EngineError::Bad(format!(
                        "memory {m:?} is not a size of at least 4m such as 64m or 1g"
                    )));
                }
            },
        };
        let mut changes = Vec::new();
        if let Some(n) = change.num_instances {
            changes.push(format!("{} → {n} instances", p.num_instances));
            p.num_instances = n;
        }
        if let Some(cpu) = change.cpu {
            changes.push(format!("cpu {} → {cpu}", p.cpu));
            p.cpu = cpu;
        }
        if let Some((text, bytes)) = memory {
            changes.push(format!("memory {} → {text}", p.memory));
            p.memory = text;
            p.memory_bytes = bytes;
        }
        let proc_now = p.clone();
        if change.cpu.is_some() || change.memory.is_some() {
            self.update_running(app, &proc_now).await;
        }
        self.event(app, "scaled", Some(proc_name), None, changes.join(", "))
            .await;
        Ok(proc_now)
    }

    /// Applies a proc's CPU and memory limits to its running containers.
    async fn update_running(&mut self, app: &str, p: &Proc) {
        let actual = self.actual().await;
        for a in actual
            .iter()
            .filter(|a| a.app == app && a.proc_name == p.name)
        {
            let Some(node) = self.nodes.get(&a.node) else {
                continue;
            };
            if let Err(e) = node
                .client
                .update_limits(&a.id, p.memory_bytes, p.cpu)
                .await
            {
                tracing::warn!(%app, container = %a.id, error = %e, "cannot update container limits");
            }
        }
    }

    async fn event(
        &self,
        app: &str,
        kind: &str,
        proc_name: Option<&str>,
        instance: Option<u32>,
        message: String,
    ) {
        self.metrics
            .events
            .with_label_values(&[crate::metrics::event_label(kind)])
            .inc();
        tracing::info!(%app, kind, proc = proc_name.unwrap_or(""), instance = instance.unwrap_or(0), %message, "app event");
        let seq = match self.publisher.next_seq(&format!("events.{app}")).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(%app, error = %e, "cannot number event");
                return;
            }
        };
        let ev = AppEvent {
            seq,
            at: now_rfc3339(),
            kind: kind.to_string(),
            proc_name: proc_name.map(str::to_string),
            instance,
            message,
        };
        let key = self.settings.keyspace.event(app, seq);
        if let Err(e) = self
            .publisher
            .put_raw(&key, serde_json::to_vec(&ev).unwrap_or_default())
            .await
        {
            tracing::warn!(%app, error = %e, "cannot record event");
        }
    }

    async fn actual(&mut self) -> Vec<Actual> {
        let cluster = self.settings.keyspace.prefix().to_string();
        let lists = futures::future::join_all(self.nodes.values().map(|n| {
            let c = n.client.clone();
            let cluster = cluster.clone();
            async move {
                tokio::time::timeout(Duration::from_secs(3), c.list(&cluster))
                    .await
                    .unwrap_or_else(|_| {
                        Err(docker::DockerError::Address(format!(
                            "{} timed out",
                            c.docker_host
                        )))
                    })
            }
        }))
        .await;
        let mut out = Vec::new();
        let mut renew = Vec::new();
        let names: Vec<String> = self.nodes.keys().cloned().collect();
        for (name, list) in names.into_iter().zip(lists) {
            let Some(n) = self.nodes.get_mut(&name) else {
                continue;
            };
            match list {
                Ok(l) => {
                    if n.lease_expired || n.lease.as_ref().is_none_or(|l| l.is_finished()) {
                        renew.push(name.clone());
                    }
                    if n.down_since.take().is_some() {
                        tracing::info!(node = %name, "node answers again");
                        for ((_, _, _), slot) in self.slots.iter_mut() {
                            if slot.last_node.as_deref() == Some(name.as_str()) {
                                slot.stranded = false;
                            }
                        }
                    }
                    self.last_seen.insert(name.clone(), l.clone());
                    out.extend(l);
                }
                Err(e) => {
                    if n.down_since.is_none() {
                        tracing::warn!(node = %name, error = %e, "node does not answer");
                        n.down_since = Some(Instant::now());
                    }
                    // Until the grace period ends its instances are taken as they were
                    // last seen: they keep their slots, and their probes decide whether
                    // they are still published.
                    out.extend(self.last_seen.get(&name).cloned().unwrap_or_default());
                }
            }
        }
        for name in renew {
            self.renew_lease(&name).await;
        }
        out
    }

    /// Where an instance is reached: its own address on its network in bridge mode, else
    /// its node's address.
    fn address_of(&self, a: &Actual) -> IpAddr {
        a.ip.unwrap_or_else(|| {
            self.nodes
                .get(&a.node)
                .map(|n| n.spec.address)
                .unwrap_or(IpAddr::from([127, 0, 0, 1]))
        })
    }

    fn node_usable(&self, name: &str) -> bool {
        self.nodes
            .get(name)
            .is_some_and(|n| n.state == NodeState::Active && n.down_since.is_none())
    }

    /// Why a node's instances are given up, or `None` while they are kept: the node is
    /// gone, draining, or does not answer and either its lease expired or the grace ended.
    fn node_lost(&self, name: &str) -> Option<&'static str> {
        match self.nodes.get(name) {
            None => Some("removed"),
            Some(n) if n.state == NodeState::Draining => Some("draining"),
            Some(n) => match n.down_since {
                Some(_) if n.lease_expired => Some("its lease expired"),
                Some(d) if d.elapsed() >= self.settings.node_down_grace => {
                    Some("its engine does not answer")
                }
                _ => None,
            },
        }
    }

    async fn reconcile(&mut self) -> Result<(), EngineError> {
        let actual = self.actual().await;
        let mut starts = Starts {
            used_ports: actual.iter().filter_map(|a| a.port).collect(),
            planned: Vec::new(),
        };
        let mut by_slot: BTreeMap<SlotKey, Vec<Actual>> = BTreeMap::new();
        let mut to_remove: Vec<(Actual, &'static str)> = Vec::new();
        for a in actual {
            if self.retiring.contains(&a.id) || self.unreadable.contains(&a.app) {
                continue;
            }
            let wanted = self.apps.get(&a.app).and_then(|s| {
                s.conf
                    .procs
                    .get(&a.proc_name)
                    .filter(|p| p.proc_type != ProcType::Oneshot && !s.version.is_empty())
                    .map(|p| a.instance >= 1 && a.instance <= p.num_instances)
            });
            match wanted {
                Some(true) => by_slot
                    .entry((a.app.clone(), a.proc_name.clone(), a.instance))
                    .or_default()
                    .push(a),
                Some(false) => to_remove.push((a, "scaled down")),
                None => to_remove.push((a, "no longer desired")),
            }
        }
        // Scale-down removes the highest instance numbers first.
        to_remove.sort_by_key(|a| std::cmp::Reverse(a.0.instance));
        for (a, why) in to_remove {
            self.retire(&a, why, Duration::from_secs(0)).await;
        }

        // Crashed containers are recorded and removed; their slot is refilled below. A stopped
        // container on a node its slot has moved away from (one that came back after it was
        // lost) is not a crash: it is only removed. Nor is a stopped container of a version
        // the app no longer wants (one a deploy is replacing, or one found stopped after
        // its engine restarted): nothing would restart it, and counting it would charge the
        // new version's slot with its predecessor's exit.
        for (key, list) in by_slot.iter_mut() {
            let mut keep = Vec::new();
            for a in list.drain(..) {
                if a.running {
                    keep.push(a);
                    continue;
                }
                let moved = self
                    .slots
                    .get(key)
                    .and_then(|s| s.last_node.as_deref())
                    .is_some_and(|l| l != a.node);
                let superseded = self
                    .apps
                    .get(&a.app)
                    .is_some_and(|s| !s.version.is_empty() && s.version != a.version);
                if moved {
                    self.retire(
                        &a,
                        "left behind on a node it moved away from",
                        Duration::ZERO,
                    )
                    .await;
                } else if superseded {
                    self.retire(
                        &a,
                        "stopped, of a version the app no longer runs",
                        Duration::ZERO,
                    )
                    .await;
                } else {
                    self.crashed(&a).await;
                }
            }
            *list = keep;
        }

        self.probe(&by_slot).await;

        let mut views: BTreeMap<String, Vec<InstanceView>> = BTreeMap::new();
        let apps: Vec<(String, AppSpec)> = self
            .apps
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (app, spec) in &apps {
            if spec.version.is_empty() {
                continue;
            }
            let mut rollout_done = true;
            for p in spec.conf.scheduled_procs() {
                for n in 1..=p.num_instances {
                    let key = (app.clone(), p.name.clone(), n);
                    let list = by_slot.remove(&key).unwrap_or_default();
                    let done = self
                        .reconcile_slot(
                            spec,
                            p,
                            n,
                            list,
                            views.entry(app.clone()).or_default(),
                            &mut starts,
                        )
                        .await;
                    rollout_done &= done;
                }
            }
            if let Some(r) = self.rollouts.get(app) {
                if rollout_done {
                    self.finish_rollout(app, "succeeded").await;
                    self.event(
                        app,
                        "deploy-succeeded",
                        None,
                        None,
                        format!("version {} is healthy", spec.version),
                    )
                    .await;
                } else if r.started.elapsed() > self.settings.health_deadline {
                    self.fail_rollout(
                        app,
                        format!(
                            "version {} did not become healthy within {:?}",
                            spec.version, self.settings.health_deadline
                        ),
                    )
                    .await;
                }
            }
        }
        // Published before the starts, which may wait for image pulls: the retirements of
        // this pass are withdrawn before their containers stop.
        let published = self.publish(&views).await;
        self.run_starts(starts.planned).await;
        published
    }

    /// Brings one slot to its desired state; returns whether it serves the desired version.
    async fn reconcile_slot(
        &mut self,
        spec: &AppSpec,
        p: &Proc,
        n: u32,
        mut list: Vec<Actual>,
        views: &mut Vec<InstanceView>,
        starts: &mut Starts,
    ) -> bool {
        let app = &spec.conf.appname;
        let key = (app.clone(), p.name.clone(), n);
        // Containers on lost nodes are abandoned unless stateful (those stay and are reported).
        // A stateless one on a node that is draining (and answers) keeps serving until its
        // replacement elsewhere does, as an old version does in a rollout.
        let draining = |s: &State, a: &Actual| {
            s.nodes
                .get(&a.node)
                .is_some_and(|n| n.state == NodeState::Draining && n.down_since.is_none())
        };
        let mut lost = Vec::new();
        let mut stranded = Vec::new();
        list.retain(|a| match self.node_lost(&a.node) {
            None => true,
            Some(_) if !p.stateful && draining(self, a) => true,
            Some(why) if p.stateful => {
                stranded.push((a.clone(), why));
                true
            }
            Some(why) => {
                lost.push((a.clone(), why));
                false
            }
        });
        for (a, why) in &stranded {
            let slot = self.slots.entry(key.clone()).or_default();
            if !slot.stranded {
                slot.stranded = true;
                self.event(
                    app,
                    "stranded",
                    Some(&p.name),
                    Some(n),
                    format!(
                        "node {} lost ({why}); stateful instance {} stays there until it returns",
                        a.node, a.name
                    ),
                )
                .await;
            }
        }
        for (a, why) in &lost {
            self.retire(a, "node lost", Duration::from_secs(0)).await;
            self.reschedule(&key, format!("node {} lost ({why})", a.node))
                .await;
        }
        let healthy = |s: &State, a: &Actual| s.health.get(&a.id).is_some_and(|h| h.healthy);
        // What has to go once the slot's desired container serves: older versions, and
        // anything on a draining node.
        let leaving = |s: &State, a: &Actual| a.version != spec.version || draining(s, a);
        let mut desired: Vec<&Actual> = list.iter().filter(|a| !leaving(self, a)).collect();
        // Of several (a lost node came back with its container after the slot moved on),
        // the healthy one stays; the order is otherwise kept.
        desired.sort_by_key(|a| !healthy(self, a));
        let current = desired.first().map(|a| (*a).clone());
        // Duplicates of the desired version (e.g. after a crash mid-create) are retired.
        for extra in desired.iter().skip(1) {
            let extra = (*extra).clone();
            self.retire(&extra, "duplicate", Duration::from_secs(0))
                .await;
        }
        let mut serving: Option<Actual> = None;
        let mut done = false;
        match &current {
            Some(c) if healthy(self, c) => {
                serving = Some(c.clone());
                done = true;
                // Surge-first: the old version leaves only once the new one serves.
                let old: Vec<Actual> = list.iter().filter(|a| leaving(self, a)).cloned().collect();
                for old in &old {
                    let grace = Duration::from_secs(u64::from(p.kill_timeout_secs));
                    let why = if old.version == spec.version {
                        "moved off a draining node"
                    } else {
                        "replaced"
                    };
                    self.retire(old, why, grace).await;
                }
            }
            Some(_) => {}
            None => {
                if let Some(d) = list.iter().find(|a| draining(self, a)) {
                    let why = format!(
                        "node {} is draining; the instance serves there until its \
                         replacement does",
                        d.node
                    );
                    self.reschedule(&key, why).await;
                }
                self.plan_start(spec, p, n, starts).await;
            }
        }
        if serving.is_none() {
            // Until the new container is healthy, a healthy leaving one keeps serving: the
            // desired version on a draining node first, else the newest older version.
            serving = list
                .iter()
                .filter(|a| leaving(self, a) && healthy(self, a))
                .max_by_key(|a| (a.version == spec.version, a.version.clone()))
                .cloned();
        }
        let log_dir = |a: &Actual| {
            self.settings
                .volume_root
                .join(&a.app)
                .join(p.podgroup(&a.app))
                .join(a.instance.to_string())
                .join(crate::lainyaml::LOG_DIR.trim_start_matches('/'))
                .display()
                .to_string()
        };
        for a in &list {
            let address = self.address_of(a);
            let Some(port) = a.port else { continue };
            views.push(InstanceView {
                proc_name: p.name.clone(),
                proc_type: p.proc_type,
                instance: n,
                node: a.node.clone(),
                address,
                port,
                serving: serving.as_ref().is_some_and(|s| s.id == a.id),
                version: a.version.clone(),
                container_id: a.id.clone(),
                log_dir: Some(log_dir(a)),
            });
        }
        done
    }

    /// A slot's instance is to start on another node: its drift grows (so the container
    /// gets a new name) and the move is recorded.
    async fn reschedule(&mut self, key: &SlotKey, why: String) {
        let (app, proc_name, n) = key.clone();
        self.slots.entry(key.clone()).or_default().drift += 1;
        self.event(&app, "rescheduled", Some(&proc_name), Some(n), why)
            .await;
    }

    async fn crashed(&mut self, a: &Actual) {
        let Some(node) = self.nodes.get(&a.node) else {
            return;
        };
        let client = node.client.clone();
        // A container last seen stopped on a node that no longer answers: asking that node
        // would wait for its timeouts on every pass.
        let node_down = node.down_since.is_some();
        let info = if node_down {
            None
        } else {
            client.exit_info(&a.id).await.ok()
        };
        let (kind, reason) = match &info {
            Some(i) if i.oom_killed => ("oom-killed", format!("OOM-killed (exit {})", i.code)),
            Some(i) if !i.error.is_empty() => ("crashed", format!("exit {}: {}", i.code, i.error)),
            Some(i) => ("crashed", format!("exit {}", i.code)),
            None => ("crashed", "container stopped".to_string()),
        };
        let key = (a.app.clone(), a.proc_name.clone(), a.instance);
        let slot = self.slots.entry(key).or_default();
        slot.restarts += 1;
        slot.failures += 1;
        slot.crashed = true;
        slot.last_exit = Some(reason.clone());
        // Exponential backoff: the first replacement is immediate, then 1 s, 2 s, … 30 s.
        let delay = if slot.failures <= 1 {
            Duration::ZERO
        } else {
            Duration::from_millis(500u64 << slot.failures.min(7)).min(Duration::from_secs(30))
        };
        slot.next_attempt = Some(Instant::now() + delay);
        let restarts = slot.restarts;
        self.metrics.restarts.inc();
        self.event(
            &a.app,
            kind,
            Some(&a.proc_name),
            Some(a.instance),
            format!(
                "{} {reason}; restart {restarts} in {:.1} s",
                a.name,
                delay.as_secs_f64()
            ),
        )
        .await;
        if node_down {
            // Recorded once and forgotten, as a retired container there is: remembered, it
            // would crash again on every pass and hold its slot's replacement back. If the
            // node returns, its own listing shows the container, which is removed then as
            // one left behind.
            if let Some(seen) = self.last_seen.get_mut(&a.node) {
                seen.retain(|c| c.id != a.id);
            }
        } else {
            let _ = client.remove(&a.id).await;
        }
        self.health.remove(&a.id);
    }

    /// Withdraws a container (this pass's sync unpublishes it) and stops it in the
    /// background once the proxies have seen that ([`WITHDRAW_DELAY`], or up to 2 s of
    /// `grace`), with its proc's `kill_timeout`, so in-flight requests drain.
    async fn retire(&mut self, a: &Actual, why: &str, grace: Duration) {
        let node_down = self
            .nodes
            .get(&a.node)
            .is_none_or(|n| n.down_since.is_some());
        // A container on a node that does not answer is forgotten at once: it is gone with
        // its node, and remembering it would retire it again on every pass.
        if node_down && let Some(seen) = self.last_seen.get_mut(&a.node) {
            seen.retain(|c| c.id != a.id);
        }
        if !self.retiring.insert(a.id.clone()) {
            return;
        }
        let Some(node) = self.nodes.get(&a.node) else {
            self.retiring.remove(&a.id);
            return;
        };
        self.event(
            &a.app,
            "removed",
            Some(&a.proc_name),
            Some(a.instance),
            format!("{} {why}", a.name),
        )
        .await;
        let client = node.client.clone();
        let tx = self.tx.clone();
        let id = a.id.clone();
        let kill_timeout = self
            .apps
            .get(&a.app)
            .and_then(|s| s.conf.procs.get(&a.proc_name))
            .map(|p| p.kill_timeout_secs)
            .unwrap_or(10);
        // Nothing is sent to a container on a node that does not answer.
        let withdraw = if node_down {
            Duration::ZERO
        } else {
            grace.min(Duration::from_secs(2)).max(WITHDRAW_DELAY)
        };
        tokio::spawn(async move {
            // Wait for the proxies to see the endpoint withdrawn before stopping it.
            tokio::time::sleep(withdraw).await;
            let _ = client.stop(&id, kill_timeout).await;
            let _ = client.remove(&id).await;
            let _ = tx.send(Event::Retired(id)).await;
        });
    }

    fn place(
        &self,
        spec: &AppSpec,
        p: &Proc,
        n: u32,
        prefer_not: Option<&str>,
    ) -> Result<String, String> {
        let mut best: Option<((usize, usize, bool), String)> = None;
        let mut reasons = Vec::new();
        let podgroup = p.podgroup(&spec.conf.appname);
        for (name, node) in &self.nodes {
            if !self.node_usable(name) {
                reasons.push(format!("{name}: not active"));
                continue;
            }
            if let Some(f) = p.filters.iter().find(|f| !f.matches(&node.spec.labels)) {
                reasons.push(format!(
                    "{name}: label {}{}{}",
                    f.label,
                    if f.equal { "!=" } else { "==" },
                    f.value
                ));
                continue;
            }
            let (mem, cpu, same, total) =
                self.usage(name, &podgroup, (&spec.conf.appname, &p.name, n));
            if mem + p.memory_bytes > node.spec.memory_bytes {
                reasons.push(format!("{name}: not enough memory"));
                continue;
            }
            if cpu + u32::from(p.cpu) > node.spec.cpus * 4 {
                reasons.push(format!("{name}: not enough CPU"));
                continue;
            }
            let score = (same, total, prefer_not == Some(name.as_str()));
            if best.as_ref().is_none_or(|(s, _)| score < *s) {
                best = Some((score, name.clone()));
            }
        }
        best.map(|(_, n)| n).ok_or_else(|| {
            if reasons.is_empty() {
                "no nodes".to_string()
            } else {
                reasons.join("; ")
            }
        })
    }

    /// Memory, CPU levels, instances of `podgroup` and all instances on `node`, from the
    /// views of the last pass plus the slots being started in this one.
    fn usage(
        &self,
        node: &str,
        podgroup: &str,
        skip: (&str, &str, u32),
    ) -> (u64, u32, usize, usize) {
        let (mut mem, mut cpu, mut same, mut total) = (0, 0, 0, 0);
        for ((app, proc_name, n), slot) in &self.slots {
            if slot.last_node.as_deref() != Some(node)
                || (app.as_str(), proc_name.as_str(), *n) == skip
            {
                continue;
            }
            let Some(p) = self.apps.get(app).and_then(|s| s.conf.procs.get(proc_name)) else {
                continue;
            };
            if *n > p.num_instances {
                continue;
            }
            mem += p.memory_bytes;
            cpu += u32::from(p.cpu);
            total += 1;
            if p.podgroup(app) == podgroup {
                same += 1;
            }
        }
        (mem, cpu, same, total)
    }

    fn allocate_port(&self, used: &mut HashSet<u16>) -> Option<u16> {
        let (lo, hi) = self.settings.port_range;
        let span = u32::from(hi.saturating_sub(lo)) + 1;
        let start = rand::random::<u32>() % span;
        for i in 0..span {
            let port = lo + u16::try_from((start + i) % span).ok()?;
            if used.contains(&port) {
                continue;
            }
            // Skip ports something else on the host already holds.
            if std::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).is_err() {
                continue;
            }
            used.insert(port);
            return Some(port);
        }
        None
    }

    /// Decides where and how a slot's container starts; the containers of one pass are then
    /// created together by [`State::run_starts`]. The node is recorded at once so the next
    /// placement in the same pass sees it taken.
    async fn plan_start(&mut self, spec: &AppSpec, p: &Proc, n: u32, starts: &mut Starts) {
        let app = &spec.conf.appname;
        let key = (app.clone(), p.name.clone(), n);
        let slot = self.slots.get(&key).cloned().unwrap_or_default();
        if slot.next_attempt.is_some_and(|t| Instant::now() < t) {
            return;
        }
        // A stateful instance comes back on the node that holds its data, when it can.
        let home = slot
            .last_node
            .clone()
            .filter(|l| p.stateful && self.node_usable(l));
        let placed = match home {
            Some(l) => Ok(l),
            None => self.place(spec, p, n, None),
        };
        let node_name = match placed {
            Ok(node) => node,
            Err(reason) => {
                let reason = format!("no node fits: {reason}");
                if slot.pending.as_deref() != Some(reason.as_str()) {
                    self.event(app, "pending", Some(&p.name), Some(n), reason.clone())
                        .await;
                }
                let s = self.slots.entry(key).or_default();
                s.pending = Some(reason);
                s.next_attempt = Some(Instant::now() + Duration::from_secs(1));
                return;
            }
        };
        let port = match &self.settings.network {
            Network::Host => match self.allocate_port(&mut starts.used_ports) {
                Some(port) => port,
                None => {
                    tracing::warn!("port range exhausted");
                    return;
                }
            },
            // On its own network address every instance can use the port its proc declares.
            Network::Bridge(_) => p.port.unwrap_or(DEFAULT_BRIDGE_PORT),
        };
        let drift = if slot.last_node.as_deref().is_some_and(|l| l != node_name) {
            slot.drift.max(1)
        } else {
            slot.drift
        };
        let podgroup = p.podgroup(app);
        let name = docker::container_name(&podgroup, &spec.version, n, drift);
        let mut cs = self.container_spec(spec, p, n, drift, port, &name);
        self.mount_secrets(spec, p, n, &mut cs).await;
        let Some(node) = self.nodes.get(&node_name) else {
            return;
        };
        let client = node.client.clone();
        let entry = self.slots.entry(key.clone()).or_default();
        entry.last_node = Some(node_name.clone());
        entry.crashed = false;
        starts.planned.push(PlannedStart {
            key,
            node_name,
            port,
            drift,
            prev_node: slot.last_node.clone(),
            restarted: slot.crashed,
            image: spec.image.clone(),
            client,
            cs,
        });
    }

    /// Creates and starts the planned containers, several at a time, and records the outcome
    /// of each in its slot and the app's history.
    async fn run_starts(&mut self, starts: Vec<PlannedStart>) {
        let results: Vec<_> = futures::stream::iter(starts.into_iter().map(|st| async move {
            let result = st.client.run(&st.cs).await;
            (st, result)
        }))
        .buffer_unordered(CONCURRENT_STARTS)
        .collect()
        .await;
        for (st, result) in results {
            let (app, proc_name, n) = st.key.clone();
            let name = &st.cs.name;
            let s = self.slots.entry(st.key.clone()).or_default();
            match result {
                Ok(id) => {
                    s.pending = None;
                    s.drift = st.drift;
                    self.health.insert(
                        id,
                        Health {
                            started: Instant::now(),
                            healthy: false,
                            fails: 0,
                            announced: false,
                            probed: None,
                        },
                    );
                    let kind = if st.restarted { "restarted" } else { "started" };
                    self.event(
                        &app,
                        kind,
                        Some(&proc_name),
                        Some(n),
                        format!("{name} on {}, PORT {}", st.node_name, st.port),
                    )
                    .await;
                }
                Err(e) => {
                    s.last_node = st.prev_node.clone();
                    s.failures += 1;
                    let delay = Duration::from_millis(500u64 << s.failures.min(6))
                        .min(Duration::from_secs(30));
                    s.next_attempt = Some(Instant::now() + delay);
                    let reason = e.to_string();
                    s.pending = Some(reason.clone());
                    let missing_image = matches!(
                        &e,
                        docker::DockerError::Api {
                            source: bollard::errors::Error::DockerResponseServerError {
                                status_code: 404,
                                ..
                            },
                            ..
                        }
                    );
                    self.event(
                        &app,
                        "start-failed",
                        Some(&proc_name),
                        Some(n),
                        format!("{name}: {reason}"),
                    )
                    .await;
                    if missing_image && self.rollouts.contains_key(&app) {
                        self.fail_rollout(
                            &app,
                            format!("image {} cannot be run: {reason}", st.image),
                        )
                        .await;
                    }
                }
            }
        }
    }

    /// Writes each declared secret file of the proc, decrypted, to a per-instance host
    /// directory (mode 0400) and bind-mounts it read-only at its path. A proc with
    /// `secret_files_bypass` manages its secrets itself and gets none.
    async fn mount_secrets(&self, spec: &AppSpec, p: &Proc, n: u32, cs: &mut ContainerSpec) {
        if p.secret_files_bypass || p.secret_files.is_empty() {
            return;
        }
        let app = &spec.conf.appname;
        let Some(secrets) = &self.settings.secrets else {
            tracing::warn!(%app, proc = %p.name, "secret files declared but no secret key configured");
            return;
        };
        let dir = self
            .settings
            .volume_root
            .join(".lain-secrets")
            .join(app)
            .join(p.podgroup(app))
            .join(n.to_string());
        for path in &p.secret_files {
            let key = self.settings.keyspace.secret(app, &p.name, path);
            let rec = match self.client.kv_client().get(key.as_str(), None).await {
                Ok(r) => r.kvs().first().and_then(|kv| {
                    serde_json::from_slice::<lain_state::records::SecretRecord>(kv.value()).ok()
                }),
                Err(e) => {
                    tracing::warn!(%app, error = %e, "cannot read secret");
                    None
                }
            };
            let Some(rec) = rec else {
                tracing::warn!(%app, proc = %p.name, %path, "declared secret file is missing");
                continue;
            };
            let plain = match secrets.open(app, &p.name, &rec) {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(%app, proc = %p.name, %path, error = %e, "cannot open secret");
                    continue;
                }
            };
            let host = dir.join(lain_state::keys::encode_segment(path));
            match write_secret_file(&host, &plain) {
                Ok(()) => cs.binds.push(format!("{}:{path}:ro", host.display())),
                Err(e) => {
                    tracing::warn!(file = %host.display(), error = %e, "cannot write secret file")
                }
            }
        }
    }

    fn container_spec(
        &self,
        spec: &AppSpec,
        p: &Proc,
        n: u32,
        drift: u32,
        port: u16,
        name: &str,
    ) -> ContainerSpec {
        let app = &spec.conf.appname;
        let podgroup = p.podgroup(app);
        let domain = self
            .settings
            .cluster_domains
            .first()
            .cloned()
            .unwrap_or_else(|| "lain".into());
        let mut env = vec![
            format!("LAIN_APPNAME={app}"),
            format!("LAIN_PROCNAME={}", p.name),
            format!("LAIN_DOMAIN={domain}"),
            format!("LAIN_APP_RELEASE_VERSION={}", spec.version),
            format!("DEPLOYD_POD_INSTANCE_NO={n}"),
            format!("DEPLOYD_POD_NAME={podgroup}"),
            format!("DEPLOYD_POD_NAMESPACE={app}"),
            format!("PORT={port}"),
        ];
        env.extend(p.env.iter().map(|(k, v)| format!("{k}={v}")));
        let labels = HashMap::from([
            (docker::LABEL_APP.to_string(), app.clone()),
            (docker::LABEL_PROC.to_string(), p.name.clone()),
            (
                docker::LABEL_PROC_TYPE.to_string(),
                p.proc_type.as_str().to_string(),
            ),
            (docker::LABEL_PODGROUP.to_string(), podgroup.clone()),
            (docker::LABEL_INSTANCE.to_string(), n.to_string()),
            (docker::LABEL_VERSION.to_string(), spec.version.clone()),
            (docker::LABEL_DRIFT.to_string(), drift.to_string()),
            (docker::LABEL_PORT.to_string(), port.to_string()),
            (
                docker::LABEL_CLUSTER.to_string(),
                self.settings.keyspace.prefix().to_string(),
            ),
        ])
        .into_iter()
        .chain(p.labels.clone())
        .collect();
        let mut binds = Vec::new();
        for v in &p.volumes {
            let host = self
                .settings
                .volume_root
                .join(app)
                .join(&podgroup)
                .join(n.to_string())
                .join(v.trim_start_matches('/'));
            if let Err(e) = std::fs::create_dir_all(&host) {
                tracing::warn!(dir = %host.display(), error = %e, "cannot create volume directory");
            }
            binds.push(format!("{}:{v}", host.display()));
        }
        // The instance listens on its PORT, which `$PORT` in the command stands for
        // (Docker does not expand variables in exec-form commands).
        let expand = |s: &String| {
            s.replace("${PORT}", &port.to_string())
                .replace("$PORT", &port.to_string())
        };
        ContainerSpec {
            name: name.to_string(),
            image: p.image.clone().unwrap_or_else(|| spec.image.clone()),
            cmd: p.cmd.iter().map(expand).collect(),
            entrypoint: p.entrypoint.iter().map(expand).collect(),
            env,
            labels,
            memory_bytes: p.memory_bytes,
            cpu: p.cpu,
            binds,
            network_mode: match &self.settings.network {
                Network::Host => "host".into(),
                Network::Bridge(name) => name.clone(),
            },
            user: p.user.clone(),
            workdir: p.workdir.clone(),
            kill_timeout_secs: p.kill_timeout_secs,
        }
    }

    async fn probe(&mut self, by_slot: &BTreeMap<SlotKey, Vec<Actual>>) {
        let mut jobs = Vec::new();
        for ((app, proc_name, _), list) in by_slot {
            let Some(p) = self.apps.get(app).and_then(|s| s.conf.procs.get(proc_name)) else {
                continue;
            };
            for a in list {
                let address = self.address_of(a);
                let h = self.health.entry(a.id.clone()).or_insert(Health {
                    // An adopted container was started before; it is probed right away.
                    started: Instant::now(),
                    healthy: false,
                    fails: 0,
                    announced: false,
                    probed: None,
                });
                // An instance on a node that does not answer fails its probes, even one
                // whose only check is its setup time.
                let node_down = self
                    .nodes
                    .get(&a.node)
                    .is_none_or(|n| n.down_since.is_some());
                // A steady instance is probed once per interval, not on every pass: each
                // probe is a request the app serves (and usually logs).
                let steady = h.healthy && h.fails == 0 && !node_down;
                if steady
                    && h.probed
                        .is_some_and(|t| t.elapsed() < self.settings.probe_interval)
                {
                    continue;
                }
                h.probed = Some(Instant::now());
                let check = match (&p.healthcheck, a.port, p.proc_type) {
                    (Some(path), Some(port), _) => {
                        Probe::Http(SocketAddr::new(address, port), path.clone())
                    }
                    (None, Some(port), ProcType::Web | ProcType::Portal) => {
                        Probe::Tcp(SocketAddr::new(address, port))
                    }
                    (None, Some(port), _) if p.port.is_some() => {
                        Probe::Tcp(SocketAddr::new(address, port))
                    }
                    _ => Probe::Setup(Duration::from_secs(u64::from(p.setup_time_secs))),
                };
                let started = h.started;
                let timeout = self.settings.probe_timeout;
                jobs.push(async move {
                    let ok = !node_down && check.run(started, timeout).await;
                    (a.clone(), ok)
                });
            }
        }
        let results = futures::future::join_all(jobs).await;
        for (a, ok) in results {
            let Some(h) = self.health.get_mut(&a.id) else {
                continue;
            };
            if ok {
                h.fails = 0;
                h.healthy = true;
            } else {
                h.fails += 1;
                if h.fails >= 3 {
                    h.healthy = false;
                }
            }
            let key = (a.app.clone(), a.proc_name.clone(), a.instance);
            // The crash backoff is forgiven only once an instance has stayed up for a while;
            // one that passes its first probe and then crashes keeps backing off.
            if h.healthy
                && h.started.elapsed() >= STABLE_AFTER
                && let Some(s) = self.slots.get_mut(&key)
                && s.failures > 0
            {
                s.failures = 0;
                s.next_attempt = None;
            }
            if h.healthy && !h.announced {
                h.announced = true;
                let slot = self.slots.entry(key).or_default();
                if slot.last_node.is_none() {
                    slot.last_node = Some(a.node.clone());
                }
                self.event(
                    &a.app,
                    "healthy",
                    Some(&a.proc_name),
                    Some(a.instance),
                    a.name.clone(),
                )
                .await;
            }
        }
        let live: HashSet<&String> = by_slot.values().flatten().map(|a| &a.id).collect();
        self.health
            .retain(|id, _| live.contains(id) || self.retiring.contains(id));
    }

    async fn publish(
        &mut self,
        views: &BTreeMap<String, Vec<InstanceView>>,
    ) -> Result<(), EngineError> {
        let ks = &self.settings.keyspace;
        let mut desired = BTreeMap::new();
        for (app, spec) in &self.apps {
            let resources: BTreeMap<String, String> = spec
                .conf
                .use_resources
                .keys()
                .map(|r| (r.clone(), crate::resources::instance_name(r, app)))
                .collect();
            let empty = Vec::new();
            desired.extend(app_records(
                ks,
                spec,
                &resources,
                views.get(app).unwrap_or(&empty),
            ));
        }
        let stats = self.publisher.sync(&desired, &self.unreadable).await?;
        self.metrics
            .published
            .with_label_values(&["put"])
            .inc_by(stats.put as u64);
        self.metrics
            .published
            .with_label_values(&["delete"])
            .inc_by(stats.deleted as u64);
        let serving = views.values().flatten().filter(|v| v.serving).count();
        self.metrics
            .serving
            .set(i64::try_from(serving).unwrap_or(0));
        Ok(())
    }

    async fn instances(&mut self, app: &str) -> Result<Vec<InstanceStatus>, EngineError> {
        let spec = self
            .apps
            .get(app)
            .cloned()
            .ok_or_else(|| EngineError::NoApp(app.to_string()))?;
        let actual = self.actual().await;
        let resp = self
            .client
            .kv_client()
            .get(
                self.settings.keyspace.kind_prefix(Kind::Endpoint),
                Some(GetOptions::new().with_prefix()),
            )
            .await
            .map_err(crate::publish::PublishError)?;
        let serving: HashSet<String> = resp
            .kvs()
            .iter()
            .filter_map(|kv| records::decode::<lain_state::EndpointRecord>(kv.value()).ok())
            .map(|e| e.container_id)
            .collect();
        let mut out = Vec::new();
        for p in spec.conf.scheduled_procs() {
            for n in 1..=p.num_instances {
                let slot = self
                    .slots
                    .get(&(app.to_string(), p.name.clone(), n))
                    .cloned()
                    .unwrap_or_default();
                let c = actual
                    .iter()
                    .filter(|a| a.app == app && a.proc_name == p.name && a.instance == n)
                    .filter(|a| !self.retiring.contains(&a.id))
                    .max_by_key(|a| (a.version == spec.version, a.running));
                out.push(InstanceStatus {
                    proc_name: p.name.clone(),
                    instance: n,
                    node: c.map(|c| c.node.clone()),
                    container_id: c.map(|c| c.id.clone()),
                    container_name: c.map(|c| c.name.clone()),
                    version: c.map(|c| c.version.clone()),
                    port: c.and_then(|c| c.port),
                    healthy: c.is_some_and(|c| self.health.get(&c.id).is_some_and(|h| h.healthy)),
                    serving: c.is_some_and(|c| serving.contains(&c.id)),
                    restarts: slot.restarts,
                    last_exit: slot.last_exit.clone(),
                    pending: slot.pending.clone(),
                });
            }
        }
        Ok(out)
    }
}

/// The liveness check a node's lease renewal waits on: its engine answers a ping.
fn alive(
    client: &NodeClient,
) -> impl FnMut() -> futures::future::BoxFuture<'static, bool> + Send + 'static {
    let client = client.clone();
    move || {
        let c = client.clone();
        Box::pin(async move { c.ping().await.is_ok() })
    }
}

impl NodeEntry {
    fn abort(self) {
        if let Some(l) = self.lease {
            l.abort();
        }
        if let Some(e) = self.events {
            e.abort();
        }
    }
}

enum Probe {
    Http(SocketAddr, String),
    Tcp(SocketAddr),
    Setup(Duration),
}

impl Probe {
    async fn run(&self, started: Instant, timeout: Duration) -> bool {
        match self {
            Probe::Setup(d) => started.elapsed() >= *d,
            Probe::Tcp(addr) => matches!(
                tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await,
                Ok(Ok(_))
            ),
            Probe::Http(addr, path) => tokio::time::timeout(timeout, http_get_ok(*addr, path))
                .await
                .unwrap_or(false),
        }
    }
}

/// A minimal HTTP/1.0 GET: healthy on a 2xx or 3xx status line.
async fn http_get_ok(addr: SocketAddr, path: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return false;
    };
    let req =
        format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: lain-controlplane\r\n\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut buf = [0u8; 32];
    let mut got = 0;
    while got < 12 {
        match s.read(&mut buf[got..]).await {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    let line = String::from_utf8_lossy(&buf[..got]);
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok());
    status.is_some_and(|c| (200..400).contains(&c))
}

/// Writes a secret file readable only by its owner: to a new file renamed into place, so a
/// running container keeps the file it was started with until it is replaced.
fn write_secret_file(path: &std::path::Path, content: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o400)
        .open(&tmp)?;
    f.write_all(content)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}
