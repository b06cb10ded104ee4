//! lain.yaml: LAIN's app description, parsed and validated as lain-sdk did, so that existing
//! files run unchanged.
//!
//! Parsing walks a located YAML tree ([`crate::yaml`]) and collects every problem instead of
//! stopping at the first one; each error names the file, line, column and key. The result
//! is a [`LainConf`] with LAIN's defaults filled in and mountpoints expanded onto the
//! cluster's domains, ready to be stored as an app spec and scheduled.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::yaml::{self, Node, Pos};

/// Names no app may take: LAIN reserved them for its own prefixes.
const RESERVED_APPNAMES: [&str; 3] = ["service", "resource", "portal"];
/// Default memory limit of a proc.
pub const DEFAULT_MEMORY: &str = "32m";
/// The log directory every proc gets as a volume.
pub const LOG_DIR: &str = "/lain/logs";
/// The working directory LAIN images use; relative secret files live below it.
pub const APP_DIR: &str = "/lain/app";
/// The stream-port range LAIN's streamrouter accepted.
pub const STREAM_PORTS: std::ops::RangeInclusive<i64> = 9500..=10000;

/// One problem in a lain.yaml, located.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocatedError {
    /// The file name as given to the parser.
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// The dotted key path, e.g. `web.memory` or `web.env[2]`; empty for the whole file.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for LocatedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file, self.line, self.column)?;
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

/// `app` or `resource`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AppType {
    /// An ordinary app.
    #[default]
    App,
    /// A templated app instantiated per client.
    Resource,
}

/// The kinds of procs LAIN knows; part of the podgroup name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcType {
    /// Serves HTTP through the edge proxy.
    Web,
    /// A long-running process without routes.
    Worker,
    /// Runs once on demand; never scheduled by the reconciler.
    Oneshot,
    /// The client-side proxy of a service.
    Portal,
}

impl ProcType {
    /// The name used in section keys and podgroup names.
    pub fn as_str(self) -> &'static str {
        match self {
            ProcType::Web => "web",
            ProcType::Worker => "worker",
            ProcType::Oneshot => "oneshot",
            ProcType::Portal => "portal",
        }
    }

    fn from_name(s: &str) -> Option<ProcType> {
        match s {
            "web" => Some(ProcType::Web),
            "worker" => Some(ProcType::Worker),
            "oneshot" => Some(ProcType::Oneshot),
            "portal" => Some(ProcType::Portal),
            _ => None,
        }
    }
}

/// The `build:` section.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Build {
    /// The base image.
    pub base: String,
    /// Shell lines run to build the app.
    pub script: Vec<String>,
    /// The prepare stage, cached between builds.
    pub prepare: Option<Prepare>,
    /// `--build-arg` values, `KEY=VALUE`.
    pub build_arg: Vec<String>,
    /// Directories cached between builds.
    pub volumes: Vec<String>,
}

/// `build.prepare`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Prepare {
    /// Bumping it invalidates the prepare image.
    pub version: String,
    /// Shell lines of the prepare stage.
    pub script: Vec<String>,
    /// Paths kept from the prepare stage.
    pub keep: Vec<String>,
}

/// The `release:` section.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Release {
    /// The base image of the release image.
    pub dest_base: Option<String>,
    /// Files copied from the build image.
    pub copy: Vec<Copy>,
}

/// One `release.copy` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Copy {
    /// Source path in the build image.
    pub src: String,
    /// Destination in the release image; the source path when absent.
    pub dest: String,
}

/// A resource an app consumes, with the parameters its template is filled with.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ResourceUse {
    /// The services of the resource the client uses.
    pub services: Vec<String>,
    /// Template parameters.
    pub params: BTreeMap<String, serde_json::Value>,
}

/// An HTTP mountpoint, expanded: a host and a path prefix.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Mountpoint {
    /// Lower-case host.
    pub host: String,
    /// Path prefix starting with `/`.
    pub path: String,
}

impl fmt::Display for Mountpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path == "/" {
            f.write_str(&self.host)
        } else {
            write!(f, "{}{}", self.host, self.path)
        }
    }
}

/// A placement constraint from `filters:`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filter {
    /// The node label.
    pub label: String,
    /// The value compared with.
    pub value: String,
    /// `true` for `==`, `false` for `!=`.
    pub equal: bool,
}

impl Filter {
    /// Whether a node with `labels` satisfies this constraint.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let is = labels.get(&self.label).is_some_and(|v| *v == self.value);
        is == self.equal
    }
}

/// One proc of an app, with LAIN's defaults filled in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Proc {
    /// The proc name (`web`, `foo` of `worker.foo`).
    pub name: String,
    /// The proc type.
    pub proc_type: ProcType,
    /// The command; the image's when empty.
    pub cmd: Vec<String>,
    /// The entrypoint; the image's when empty.
    pub entrypoint: Vec<String>,
    /// An image other than the app's release image.
    pub image: Option<String>,
    /// The user to run as.
    pub user: Option<String>,
    /// The working directory.
    pub workdir: Option<String>,
    /// Environment, in file order.
    pub env: Vec<(String, String)>,
    /// The main port (`PORT`); 80 for web procs unless set.
    pub port: Option<u16>,
    /// Stream (TCP) ports offered through the proxy.
    pub ports: Vec<u16>,
    /// The memory limit as written (`32m`).
    pub memory: String,
    /// The memory limit in bytes.
    pub memory_bytes: u64,
    /// LAIN's CPU level, 0–8.
    pub cpu: u8,
    /// How many instances run.
    pub num_instances: u32,
    /// The mountpoints as written.
    pub mountpoint: Vec<String>,
    /// The mountpoints expanded onto the cluster's domains.
    pub mountpoints: Vec<Mountpoint>,
    /// Redirect plain HTTP to HTTPS.
    pub https_only: bool,
    /// HTTP path probed for health.
    pub healthcheck: Option<String>,
    /// Persistent directories, always including `/lain/logs`.
    pub volumes: Vec<String>,
    /// Log files below `/lain/logs` to ship.
    pub logs: Vec<String>,
    /// Secret files mounted into the container.
    pub secret_files: Vec<String>,
    /// Whether secret files are left to the app instead of mounted.
    pub secret_files_bypass: bool,
    /// Stateful instances never move between nodes on their own.
    pub stateful: bool,
    /// Seconds an instance without a port or health check needs before it counts as healthy.
    pub setup_time_secs: u32,
    /// Seconds between SIGTERM and SIGKILL on stop.
    pub kill_timeout_secs: u32,
    /// Container labels.
    pub labels: BTreeMap<String, String>,
    /// Placement constraints.
    pub filters: Vec<Filter>,
    /// For portals: the service they front.
    pub service_name: Option<String>,
    /// For portals: the apps allowed to use the service; empty means all.
    pub allow_clients: Vec<String>,
}

impl Proc {
    fn new(name: &str, proc_type: ProcType) -> Proc {
        Proc {
            name: name.to_string(),
            proc_type,
            cmd: Vec::new(),
            entrypoint: Vec::new(),
            image: None,
            user: None,
            workdir: None,
            env: Vec::new(),
            port: None,
            ports: Vec::new(),
            memory: DEFAULT_MEMORY.into(),
            memory_bytes: 32 << 20,
            cpu: 0,
            num_instances: 1,
            mountpoint: Vec::new(),
            mountpoints: Vec::new(),
            https_only: false,
            healthcheck: None,
            volumes: Vec::new(),
            logs: Vec::new(),
            secret_files: Vec::new(),
            secret_files_bypass: false,
            stateful: false,
            setup_time_secs: 0,
            kill_timeout_secs: 10,
            labels: BTreeMap::new(),
            filters: Vec::new(),
            service_name: None,
            allow_clients: Vec::new(),
        }
    }

    /// LAIN's podgroup name of this proc in `app`.
    pub fn podgroup(&self, app: &str) -> String {
        lain_state::podgroup(app, self.proc_type.as_str(), &self.name)
    }
}

/// A parsed and validated lain.yaml.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LainConf {
    /// The app name.
    pub appname: String,
    /// `app` or `resource`.
    pub apptype: AppType,
    /// The build section.
    pub build: Option<Build>,
    /// The release section.
    pub release: Option<Release>,
    /// Test script lines.
    pub test: Vec<String>,
    /// Services consumed: provider app → service names.
    pub use_services: BTreeMap<String, Vec<String>>,
    /// Resources consumed: resource name → use.
    pub use_resources: BTreeMap<String, ResourceUse>,
    /// Notification targets (`slack: URL`, ...).
    pub notify: BTreeMap<String, String>,
    /// The procs, by name.
    pub procs: BTreeMap<String, Proc>,
}

/// Parses `memory` strings (`32m`, `1g`) into bytes.
pub fn parse_memory(s: &str) -> Option<u64> {
    // The unit is the last character, which need not be one byte long.
    let (digits, unit) = s.split_at(s.char_indices().last()?.0);
    if digits.is_empty() || digits.starts_with('0') || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    let shift = match unit {
        "m" | "M" => 20,
        "g" | "G" => 30,
        _ => return None,
    };
    n.checked_mul(1 << shift)
}

/// Whether `s` is a valid app or proc name (LAIN's pattern).
pub fn valid_name(s: &str) -> bool {
    let mut parts = s.split('-');
    let first = parts.next().unwrap_or_default();
    let mut chars = first.chars();
    if !chars.next().is_some_and(|c| c.is_ascii_alphabetic()) {
        return false;
    }
    if !chars.all(|c| c.is_ascii_alphanumeric()) {
        return false;
    }
    parts.all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric()))
}

/// Splits a command line as a POSIX shell would split words (quotes and backslashes),
/// without expansions; `None` when a quote is not closed.
pub fn split_command(s: &str) -> Option<Vec<String>> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                loop {
                    match chars.next()? {
                        '\'' => break,
                        c => cur.push(c),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next()? {
                        '"' => break,
                        '\\' => cur.push(chars.next()?),
                        c => cur.push(c),
                    }
                }
            }
            '\\' => {
                in_word = true;
                cur.push(chars.next()?);
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    Some(words)
}

/// Collects located errors while reading the tree.
struct Reader<'a> {
    file: &'a str,
    errors: Vec<LocatedError>,
}

impl Reader<'_> {
    fn err(&mut self, pos: Pos, key: &str, message: impl Into<String>) {
        self.errors.push(LocatedError {
            file: self.file.to_string(),
            line: pos.line,
            column: pos.column,
            key: key.to_string(),
            message: message.into(),
        });
    }

    /// A mapping's entries with string keys, reporting duplicates and non-scalar keys.
    fn map<'n>(&mut self, node: &'n Node, key: &str) -> Option<Vec<(String, &'n Node, Pos)>> {
        let Some(entries) = node.as_map() else {
            self.err(
                node.pos,
                key,
                format!("expected a mapping, found {}", node.type_name()),
            );
            return None;
        };
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        for (k, v) in entries {
            let Some(name) = k.as_scalar() else {
                self.err(k.pos, key, "mapping keys must be strings");
                continue;
            };
            if !seen.insert(name.to_string()) {
                self.err(k.pos, &join(key, name), "duplicate key");
                continue;
            }
            out.push((name.to_string(), v, k.pos));
        }
        Some(out)
    }

    fn string(&mut self, node: &Node, key: &str) -> Option<String> {
        match node.as_scalar() {
            Some(s) => Some(s.to_string()),
            None => {
                self.err(
                    node.pos,
                    key,
                    format!("expected a string, found {}", node.type_name()),
                );
                None
            }
        }
    }

    fn bool(&mut self, node: &Node, key: &str) -> Option<bool> {
        let b = node.as_bool();
        if b.is_none() {
            self.err(
                node.pos,
                key,
                format!("expected true or false, found {}", node.type_name()),
            );
        }
        b
    }

    fn int(&mut self, node: &Node, key: &str, range: std::ops::RangeInclusive<i64>) -> Option<i64> {
        match node.as_i64() {
            Some(n) if range.contains(&n) => Some(n),
            Some(n) => {
                self.err(
                    node.pos,
                    key,
                    format!("{n} is out of range {}..={}", range.start(), range.end()),
                );
                None
            }
            None => {
                self.err(
                    node.pos,
                    key,
                    format!("expected an integer, found {}", node.type_name()),
                );
                None
            }
        }
    }

    /// A list of strings; a single string is accepted as a one-item list, as lain-sdk did.
    fn strings(&mut self, node: &Node, key: &str) -> Vec<String> {
        if node.is_null() {
            return Vec::new();
        }
        if let Some(s) = node.as_scalar() {
            return vec![s.to_string()];
        }
        let Some(items) = node.as_seq() else {
            self.err(
                node.pos,
                key,
                format!("expected a list of strings, found {}", node.type_name()),
            );
            return Vec::new();
        };
        items
            .iter()
            .enumerate()
            .filter_map(|(i, n)| self.string(n, &format!("{key}[{i}]")))
            .collect()
    }

    /// A command: a list of words, or a string split like a shell would.
    fn command(&mut self, node: &Node, key: &str) -> Vec<String> {
        if let Some(s) = node.as_scalar() {
            return match split_command(s) {
                Some(w) => w,
                None => {
                    self.err(node.pos, key, "unterminated quote in command");
                    Vec::new()
                }
            };
        }
        self.strings(node, key)
    }

    fn string_map(&mut self, node: &Node, key: &str) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        if node.is_null() {
            return out;
        }
        for (k, v, _) in self.map(node, key).unwrap_or_default() {
            let path = join(key, &k);
            if let Some(s) = self.string(v, &path) {
                out.insert(k, s);
            }
        }
        out
    }

    fn unknown(&mut self, pos: Pos, key: &str, known: &[&str]) {
        self.err(
            pos,
            key,
            format!("unknown key; expected one of: {}", known.join(", ")),
        );
    }
}

fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

const PROC_KEYS: [&str; 27] = [
    "cmd",
    "entrypoint",
    "image",
    "user",
    "workdir",
    "env",
    "port",
    "ports",
    "memory",
    "cpu",
    "num_instances",
    "mountpoint",
    "https_only",
    "healthcheck",
    "volumes",
    "persistent_dirs",
    "logs",
    "secret_files",
    "secret_files_bypass",
    "stateful",
    "setup_time",
    "kill_timeout",
    "labels",
    "filters",
    "service_name",
    "allow_clients",
    "type",
];

const TOP_KEYS: [&str; 15] = [
    "appname",
    "apptype",
    "build",
    "release",
    "test",
    "use_services",
    "use_resources",
    "notify",
    "web",
    "web.NAME",
    "worker.NAME",
    "oneshot.NAME",
    "proc.NAME",
    "portal.NAME",
    "service.NAME",
];

/// A proc section found at the top level, before its body is read.
struct Section<'n> {
    key: String,
    key_pos: Pos,
    name: String,
    kind: SectionKind,
    body: &'n Node,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum SectionKind {
    Typed(ProcType),
    /// `proc.NAME`: the type comes from its `type:` key.
    Proc,
    /// `service.NAME`: a worker plus `portal-NAME`.
    Service,
}

impl LainConf {
    /// Parses and validates lain.yaml `text`; `name` is the file name used in errors and
    /// `cluster_domains` the domains web mountpoints are expanded onto.
    pub fn parse(
        name: &str,
        text: &str,
        cluster_domains: &[String],
    ) -> Result<LainConf, Vec<LocatedError>> {
        Self::parse_inner(name, text, cluster_domains, None)
    }

    /// Parses an instantiated resource, whose app name is `resource.{res}.{client}` and may
    /// therefore contain dots that ordinary app names may not.
    pub fn parse_resource_instance(
        name: &str,
        text: &str,
        cluster_domains: &[String],
        instance_name: &str,
    ) -> Result<LainConf, Vec<LocatedError>> {
        Self::parse_inner(name, text, cluster_domains, Some(instance_name))
    }

    fn parse_inner(
        name: &str,
        text: &str,
        cluster_domains: &[String],
        instance_name: Option<&str>,
    ) -> Result<LainConf, Vec<LocatedError>> {
        let mut r = Reader {
            file: name,
            errors: Vec::new(),
        };
        let root = match yaml::parse(text) {
            Ok(root) => root,
            Err(e) => {
                r.err(e.pos, "", format!("invalid YAML: {}", e.message));
                return Err(r.errors);
            }
        };
        let conf = read_conf(&mut r, &root, cluster_domains, instance_name);
        if r.errors.is_empty()
            && let Some(conf) = conf
        {
            return Ok(conf);
        }
        r.errors.sort_by_key(|e| (e.line, e.column));
        Err(r.errors)
    }

    /// The app's domain label: the name reversed on dots (`hello`, `hello.redis.resource`).
    pub fn appdomain(&self) -> String {
        lain_state::appdomain(&self.appname)
    }

    /// The procs the reconciler schedules (oneshots run on demand only).
    pub fn scheduled_procs(&self) -> impl Iterator<Item = &Proc> {
        self.procs
            .values()
            .filter(|p| p.proc_type != ProcType::Oneshot)
    }
}

/// The hosts every web mountpoint of `app` is expanded onto.
pub fn default_hosts(appname: &str, cluster_domains: &[String]) -> Vec<String> {
    let appdomain = lain_state::appdomain(appname);
    let mut hosts: Vec<String> = cluster_domains
        .iter()
        .map(|d| format!("{appdomain}.{}", d.trim_matches('.')).to_ascii_lowercase())
        .collect();
    hosts.push(format!("{appdomain}.lain").to_ascii_lowercase());
    hosts
}

fn read_conf(
    r: &mut Reader<'_>,
    root: &Node,
    domains: &[String],
    instance_name: Option<&str>,
) -> Option<LainConf> {
    let entries = r.map(root, "")?;
    let mut appname = None;
    let mut appname_seen = false;
    let mut conf = LainConf {
        appname: String::new(),
        apptype: AppType::App,
        build: None,
        release: None,
        test: Vec::new(),
        use_services: BTreeMap::new(),
        use_resources: BTreeMap::new(),
        notify: BTreeMap::new(),
        procs: BTreeMap::new(),
    };
    let mut sections = Vec::new();
    for (key, value, kpos) in entries {
        match key.as_str() {
            "appname" => {
                appname_seen = true;
                if let Some(n) = r.string(value, "appname") {
                    let ok = match instance_name {
                        Some(inst) => n == inst,
                        None => valid_name(&n) && !RESERVED_APPNAMES.contains(&n.as_str()),
                    };
                    if ok {
                        appname = Some(n);
                    } else if instance_name.is_some() {
                        r.err(
                            value.pos,
                            "appname",
                            format!(
                                "a resource instance must be named {:?}",
                                instance_name.unwrap_or_default()
                            ),
                        );
                    } else if RESERVED_APPNAMES.contains(&n.as_str()) {
                        r.err(value.pos, "appname", format!("{n:?} is reserved"));
                    } else {
                        r.err(
                            value.pos,
                            "appname",
                            format!("{n:?} does not match ^[a-zA-Z][a-zA-Z0-9]*(-[a-zA-Z0-9]+)*$"),
                        );
                    }
                }
            }
            "apptype" => match r.string(value, "apptype").as_deref() {
                Some("app") => conf.apptype = AppType::App,
                Some("resource") => conf.apptype = AppType::Resource,
                Some(other) => r.err(
                    value.pos,
                    "apptype",
                    format!("{other:?} is neither app nor resource"),
                ),
                None => {}
            },
            "build" => conf.build = read_build(r, value),
            "release" => conf.release = read_release(r, value),
            "test" => conf.test = read_test(r, value),
            "use_services" => conf.use_services = read_use_services(r, value),
            "use_resources" => conf.use_resources = read_use_resources(r, value),
            "notify" => conf.notify = r.string_map(value, "notify"),
            _ => match section_of(&key) {
                Some((kind, name)) => {
                    if !valid_name(&name) {
                        r.err(
                            kpos,
                            &key,
                            format!("proc name {name:?} does not match ^[a-zA-Z][a-zA-Z0-9]*(-[a-zA-Z0-9]+)*$"),
                        );
                    } else {
                        sections.push(Section {
                            key: key.clone(),
                            key_pos: kpos,
                            name,
                            kind,
                            body: value,
                        });
                    }
                }
                None => r.unknown(kpos, &key, &TOP_KEYS),
            },
        }
    }
    if !appname_seen {
        r.err(root.pos, "appname", "missing required key");
    }
    // Procs are checked even when the app name is wrong, so that every error shows at once;
    // their mountpoints are then expanded onto a placeholder name.
    let checked_name = appname.clone().unwrap_or_else(|| "app".to_string());
    conf.appname = checked_name.clone();
    let hosts = default_hosts(&checked_name, domains);

    for s in sections {
        for p in read_section(r, &s, &hosts, domains) {
            if conf.procs.contains_key(&p.name) {
                r.err(
                    s.key_pos,
                    &s.key,
                    format!("proc {:?} is defined twice", p.name),
                );
            } else {
                conf.procs.insert(p.name.clone(), p);
            }
        }
    }
    check_cross_proc(r, &conf, root.pos);
    appname.map(|_| conf)
}

fn section_of(key: &str) -> Option<(SectionKind, String)> {
    if key == "web" {
        return Some((SectionKind::Typed(ProcType::Web), "web".into()));
    }
    let (prefix, name) = key.split_once('.')?;
    let kind = match prefix {
        "web" => SectionKind::Typed(ProcType::Web),
        "worker" => SectionKind::Typed(ProcType::Worker),
        "oneshot" => SectionKind::Typed(ProcType::Oneshot),
        "portal" => SectionKind::Typed(ProcType::Portal),
        "proc" => SectionKind::Proc,
        "service" => SectionKind::Service,
        _ => return None,
    };
    Some((kind, name.to_string()))
}

fn read_section(
    r: &mut Reader<'_>,
    s: &Section<'_>,
    hosts: &[String],
    domains: &[String],
) -> Vec<Proc> {
    let body_empty = s.body.is_null();
    let entries = if body_empty {
        Vec::new()
    } else {
        match r.map(s.body, &s.key) {
            Some(e) => e,
            None => return Vec::new(),
        }
    };
    let proc_type = match s.kind {
        SectionKind::Typed(t) => Some(t),
        SectionKind::Service => Some(ProcType::Worker),
        SectionKind::Proc => match entries.iter().find(|(k, _, _)| k == "type") {
            None => {
                r.err(s.key_pos, &join(&s.key, "type"), "missing required key");
                None
            }
            Some((_, v, _)) => match r.string(v, &join(&s.key, "type")) {
                Some(t) => match ProcType::from_name(&t) {
                    Some(t) => Some(t),
                    None => {
                        r.err(
                            v.pos,
                            &join(&s.key, "type"),
                            format!("{t:?} is not one of web, worker, oneshot, portal"),
                        );
                        None
                    }
                },
                None => None,
            },
        },
    };
    let Some(proc_type) = proc_type else {
        return Vec::new();
    };
    let mut p = Proc::new(&s.name, proc_type);
    let mut portal_body = None;
    let mut mountpoint_pos = s.key_pos;
    for (k, v, kpos) in &entries {
        let key = join(&s.key, k);
        match k.as_str() {
            "type" if s.kind == SectionKind::Proc => {}
            "portal" if s.kind == SectionKind::Service => portal_body = Some((*v, *kpos)),
            "mountpoint" => mountpoint_pos = v.pos,
            _ => {}
        }
        read_proc_key(r, &mut p, k, v, *kpos, &key, s.kind);
    }
    if p.proc_type == ProcType::Web && p.port.is_none() {
        p.port = Some(80);
    }
    finish_proc(r, &mut p, &s.key, s.key_pos, mountpoint_pos, hosts, domains);
    let mut out = vec![p];
    if s.kind == SectionKind::Service {
        // lain-sdk turned `service.NAME` into the proc plus its portal `portal-NAME`.
        let mut portal = Proc::new(&format!("portal-{}", s.name), ProcType::Portal);
        portal.service_name = Some(s.name.clone());
        if let Some((body, _)) = portal_body {
            let key = join(&s.key, "portal");
            if !body.is_null() {
                for (k, v, kpos) in r.map(body, &key).unwrap_or_default() {
                    let kk = join(&key, &k);
                    read_proc_key(
                        r,
                        &mut portal,
                        &k,
                        v,
                        kpos,
                        &kk,
                        SectionKind::Typed(ProcType::Portal),
                    );
                }
            }
        }
        if portal.port.is_none() {
            portal.port = out[0].port;
        }
        finish_proc(r, &mut portal, &s.key, s.key_pos, s.key_pos, hosts, domains);
        out.push(portal);
    }
    out
}

fn read_proc_key(
    r: &mut Reader<'_>,
    p: &mut Proc,
    k: &str,
    v: &Node,
    kpos: Pos,
    key: &str,
    kind: SectionKind,
) {
    match k {
        "type" if kind == SectionKind::Proc => {}
        "portal" if kind == SectionKind::Service => {}
        "cmd" => p.cmd = r.command(v, key),
        "entrypoint" => p.entrypoint = r.command(v, key),
        "image" => p.image = r.string(v, key),
        "user" => p.user = r.string(v, key),
        "workdir" => {
            if let Some(w) = r.string(v, key) {
                if !w.starts_with('/') {
                    r.err(v.pos, key, format!("{w:?} is not an absolute path"));
                }
                p.workdir = Some(w);
            }
        }
        "env" => p.env = read_env(r, v, key),
        "port" => {
            if let Some(n) = r.int(v, key, 1..=65535) {
                p.port = u16::try_from(n).ok();
            }
        }
        "ports" => p.ports = read_ports(r, v, key),
        "memory" => {
            if let Some(m) = r.string(v, key) {
                match parse_memory(&m) {
                    Some(b) => {
                        p.memory_bytes = b;
                        p.memory = m;
                    }
                    None => r.err(
                        v.pos,
                        key,
                        format!("{m:?} does not match ^[1-9][0-9]*[mMgG]$"),
                    ),
                }
            }
        }
        "cpu" => {
            if let Some(n) = r.int(v, key, 0..=8) {
                p.cpu = u8::try_from(n).unwrap_or(0);
            }
        }
        "num_instances" => {
            if let Some(n) = r.int(v, key, 0..=1000) {
                p.num_instances = u32::try_from(n).unwrap_or(0);
            }
        }
        "mountpoint" => p.mountpoint = r.strings(v, key),
        "https_only" => p.https_only = r.bool(v, key).unwrap_or(false),
        "healthcheck" => {
            if let Some(h) = r.string(v, key) {
                if h.starts_with('/') {
                    p.healthcheck = Some(h);
                } else {
                    r.err(v.pos, key, format!("{h:?} does not start with '/'"));
                }
            }
        }
        "volumes" | "persistent_dirs" => {
            for vol in read_volumes(r, v, key) {
                if !p.volumes.contains(&vol) {
                    p.volumes.push(vol);
                }
            }
        }
        "logs" => {
            let logs = r.strings(v, key);
            for (i, l) in logs.iter().enumerate() {
                if l.starts_with('/') || l.split('/').any(|s| s == "..") || l.is_empty() {
                    r.err(
                        item_pos(v, i),
                        &format!("{key}[{i}]"),
                        format!("{l:?} must be a relative path below {LOG_DIR}"),
                    );
                }
            }
            p.logs = logs;
        }
        "secret_files" => {
            let files = r.strings(v, key);
            for (i, f) in files.iter().enumerate() {
                if f.is_empty() || f.ends_with('/') || f.split('/').any(|s| s == "..") {
                    r.err(
                        item_pos(v, i),
                        &format!("{key}[{i}]"),
                        format!("{f:?} is not a file path"),
                    );
                }
            }
            p.secret_files = files
                .into_iter()
                .map(|f| {
                    if f.starts_with('/') {
                        f
                    } else {
                        format!("{APP_DIR}/{f}")
                    }
                })
                .collect();
        }
        "secret_files_bypass" => p.secret_files_bypass = r.bool(v, key).unwrap_or(false),
        "stateful" => p.stateful = r.bool(v, key).unwrap_or(false),
        "setup_time" => {
            if let Some(n) = r.int(v, key, 0..=120) {
                p.setup_time_secs = u32::try_from(n).unwrap_or(0);
            }
        }
        "kill_timeout" => {
            if let Some(n) = r.int(v, key, 10..=60) {
                p.kill_timeout_secs = u32::try_from(n).unwrap_or(10);
            }
        }
        "labels" => p.labels = r.string_map(v, key),
        "filters" => {
            let raw = r.strings(v, key);
            for (i, f) in raw.iter().enumerate() {
                match parse_filter(f) {
                    Some(f) => p.filters.push(f),
                    None => r.err(
                        item_pos(v, i),
                        &format!("{key}[{i}]"),
                        format!("{f:?} is not LABEL==VALUE or LABEL!=VALUE"),
                    ),
                }
            }
        }
        "service_name" => {
            if let Some(s) = r.string(v, key) {
                if valid_name(&s) {
                    p.service_name = Some(s);
                } else {
                    r.err(v.pos, key, format!("{s:?} is not a valid service name"));
                }
            }
        }
        "allow_clients" => {
            p.allow_clients = r
                .strings(v, key)
                .into_iter()
                .filter(|c| c != "**")
                .collect();
        }
        _ => {
            let mut known: Vec<&str> = PROC_KEYS
                .iter()
                .copied()
                .filter(|k| *k != "type" || kind == SectionKind::Proc)
                .collect();
            if kind == SectionKind::Service {
                known.push("portal");
            }
            r.unknown(kpos, key, &known);
        }
    }
}

fn item_pos(node: &Node, i: usize) -> Pos {
    node.as_seq()
        .and_then(|s| s.get(i))
        .map(|n| n.pos)
        .unwrap_or(node.pos)
}

fn parse_filter(s: &str) -> Option<Filter> {
    let s = s.strip_prefix("constraint:").unwrap_or(s).trim();
    let (label, value, equal) = if let Some((l, v)) = s.split_once("!=") {
        (l, v, false)
    } else if let Some((l, v)) = s.split_once("==") {
        (l, v, true)
    } else {
        return None;
    };
    let (label, value) = (label.trim(), value.trim());
    if label.is_empty() || value.is_empty() {
        return None;
    }
    Some(Filter {
        label: label.to_string(),
        value: value.to_string(),
        equal,
    })
}

fn valid_env_name(s: &str) -> bool {
    let mut c = s.chars();
    c.next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && c.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn read_env(r: &mut Reader<'_>, v: &Node, key: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if v.is_null() {
        return out;
    }
    if v.as_map().is_some() {
        for (k, val, kpos) in r.map(v, key).unwrap_or_default() {
            let path = join(key, &k);
            if !valid_env_name(&k) {
                r.err(kpos, &path, format!("{k:?} is not a valid variable name"));
                continue;
            }
            let value = if val.is_null() {
                Some(String::new())
            } else {
                r.string(val, &path)
            };
            if let Some(value) = value {
                out.push((k, value));
            }
        }
        return out;
    }
    let Some(items) = v.as_seq() else {
        r.err(
            v.pos,
            key,
            format!(
                "expected a list of NAME=VALUE or a mapping, found {}",
                v.type_name()
            ),
        );
        return out;
    };
    for (i, item) in items.iter().enumerate() {
        let path = format!("{key}[{i}]");
        let Some(s) = r.string(item, &path) else {
            continue;
        };
        match s.split_once('=') {
            Some((k, val)) if valid_env_name(k) => out.push((k.to_string(), val.to_string())),
            _ => r.err(item.pos, &path, format!("{s:?} is not NAME=VALUE")),
        }
    }
    out
}

fn read_ports(r: &mut Reader<'_>, v: &Node, key: &str) -> Vec<u16> {
    let mut out = Vec::new();
    if v.is_null() {
        return out;
    }
    let items: Vec<&Node> = match v.as_seq() {
        Some(s) => s.iter().collect(),
        None => vec![v],
    };
    for (i, item) in items.into_iter().enumerate() {
        let path = format!("{key}[{i}]");
        // lain-sdk accepted `9500` and `9500:tcp`.
        let n = match item.as_i64() {
            Some(n) => Some(n),
            None => match item.as_scalar() {
                Some(s) => match s.split_once(':') {
                    Some((n, "tcp")) => n.trim().parse::<i64>().ok(),
                    _ => None,
                },
                None => None,
            },
        };
        match n {
            Some(n) if STREAM_PORTS.contains(&n) => {
                let n = u16::try_from(n).unwrap_or(0);
                if out.contains(&n) {
                    r.err(item.pos, &path, format!("port {n} is listed twice"));
                } else {
                    out.push(n);
                }
            }
            Some(n) => r.err(
                item.pos,
                &path,
                format!("stream port {n} is out of range 9500..=10000"),
            ),
            None => r.err(
                item.pos,
                &path,
                format!(
                    "expected a port number or PORT:tcp, found {}",
                    item.type_name()
                ),
            ),
        }
    }
    out
}

fn read_volumes(r: &mut Reader<'_>, v: &Node, key: &str) -> Vec<String> {
    let mut out = Vec::new();
    if v.is_null() {
        return out;
    }
    let Some(items) = v.as_seq() else {
        r.err(
            v.pos,
            key,
            format!("expected a list of paths, found {}", v.type_name()),
        );
        return out;
    };
    for (i, item) in items.iter().enumerate() {
        let path_key = format!("{key}[{i}]");
        // A volume is a path, or a one-key mapping `PATH: {backup options}` as LAIN allowed.
        let path = if let Some(entries) = item.as_map() {
            if entries.len() != 1 {
                r.err(
                    item.pos,
                    &path_key,
                    "a volume mapping has exactly one path key",
                );
                continue;
            }
            let (k, _) = &entries[0];
            r.string(k, &path_key)
        } else {
            r.string(item, &path_key)
        };
        let Some(path) = path else { continue };
        if !path.starts_with('/') || path.split('/').any(|s| s == "..") {
            r.err(
                item.pos,
                &path_key,
                format!("{path:?} is not an absolute path"),
            );
            continue;
        }
        let path = if path.len() > 1 {
            path.trim_end_matches('/').to_string()
        } else {
            path
        };
        if path == "/" {
            r.err(item.pos, &path_key, "the root directory cannot be a volume");
            continue;
        }
        out.push(path);
    }
    out
}

fn finish_proc(
    r: &mut Reader<'_>,
    p: &mut Proc,
    key: &str,
    key_pos: Pos,
    mountpoint_pos: Pos,
    hosts: &[String],
    domains: &[String],
) {
    if !p.volumes.iter().any(|v| v == LOG_DIR) {
        p.volumes.insert(0, LOG_DIR.to_string());
    }
    if p.proc_type != ProcType::Web {
        if !p.mountpoint.is_empty() {
            r.err(
                mountpoint_pos,
                &join(key, "mountpoint"),
                "only web procs have mountpoints",
            );
        }
        if p.https_only {
            r.err(
                key_pos,
                &join(key, "https_only"),
                "only web procs serve HTTPS",
            );
        }
    }
    if p.proc_type == ProcType::Portal && p.service_name.is_none() {
        r.err(
            key_pos,
            &join(key, "service_name"),
            "a portal must name its service",
        );
    }
    if p.proc_type != ProcType::Portal && (p.service_name.is_some() || !p.allow_clients.is_empty())
    {
        r.err(
            key_pos,
            key,
            "service_name and allow_clients belong to portal procs",
        );
    }
    if p.proc_type == ProcType::Oneshot {
        p.num_instances = 0;
    }
    if p.proc_type != ProcType::Web {
        return;
    }
    let mut expanded = BTreeSet::new();
    if p.name == "web" {
        for h in hosts {
            expanded.insert(Mountpoint {
                host: h.clone(),
                path: "/".into(),
            });
        }
    } else if p.mountpoint.is_empty() {
        r.err(
            key_pos,
            &join(key, "mountpoint"),
            "a web proc other than `web` must declare at least one mountpoint",
        );
    }
    for (i, m) in p.mountpoint.iter().enumerate() {
        let mkey = format!("{}[{i}]", join(key, "mountpoint"));
        let m = m.trim();
        if m.contains("://") || m.contains(char::is_whitespace) || m.is_empty() {
            r.err(
                mountpoint_pos,
                &mkey,
                format!("{m:?} is not HOST[/PATH] or /PATH"),
            );
            continue;
        }
        let path_part = m.find('/').map_or("/", |i| &m[i..]);
        if let Some(why) = lain_state::route_path_problem(path_part) {
            r.err(
                mountpoint_pos,
                &mkey,
                format!("{why}; the proxy resolves those before matching, so it would never match"),
            );
            continue;
        }
        if let Some(path) = m.strip_prefix('/').map(|_| m) {
            for h in hosts {
                expanded.insert(Mountpoint {
                    host: h.clone(),
                    path: normalise_path(path),
                });
            }
            continue;
        }
        let (host, path) = match m.find('/') {
            Some(i) => (&m[..i], &m[i..]),
            None => (m, "/"),
        };
        let host = host.to_ascii_lowercase();
        let host_ok = host
            .split('.')
            .all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
        if !host_ok {
            r.err(
                mountpoint_pos,
                &mkey,
                format!("{host:?} is not a host name"),
            );
            continue;
        }
        if domains
            .iter()
            .any(|d| d.trim_matches('.').eq_ignore_ascii_case(&host))
            || host == "lain"
        {
            r.err(
                mountpoint_pos,
                &mkey,
                format!("{host:?} is a cluster domain itself and cannot be claimed by one app"),
            );
            continue;
        }
        expanded.insert(Mountpoint {
            host,
            path: normalise_path(path),
        });
    }
    p.mountpoints = expanded.into_iter().collect();
}

fn normalise_path(path: &str) -> String {
    let trimmed = path.trim_end_matches('/');
    if trimmed.is_empty() {
        "/".into()
    } else {
        trimmed.to_string()
    }
}

fn check_cross_proc(r: &mut Reader<'_>, conf: &LainConf, pos: Pos) {
    let mut claimed: BTreeMap<&Mountpoint, &str> = BTreeMap::new();
    for p in conf.procs.values() {
        for m in &p.mountpoints {
            if let Some(other) = claimed.insert(m, &p.name) {
                r.err(
                    pos,
                    "mountpoint",
                    format!(
                        "mountpoint {m} is claimed by both {other:?} and {:?}",
                        p.name
                    ),
                );
            }
        }
    }
    let mut stream: BTreeMap<u16, &str> = BTreeMap::new();
    for p in conf.procs.values() {
        for port in &p.ports {
            if let Some(other) = stream.insert(*port, &p.name) {
                r.err(
                    pos,
                    "ports",
                    format!(
                        "stream port {port} is used by both {other:?} and {:?}",
                        p.name
                    ),
                );
            }
        }
    }
}

fn read_build(r: &mut Reader<'_>, v: &Node) -> Option<Build> {
    let mut b = Build::default();
    let mut base = false;
    for (k, val, kpos) in r.map(v, "build")? {
        let key = join("build", &k);
        match k.as_str() {
            "base" => {
                if let Some(s) = r.string(val, &key) {
                    b.base = s;
                    base = true;
                }
            }
            "script" => b.script = r.strings(val, &key),
            "build_arg" => {
                b.build_arg = r.strings(val, &key);
                for (i, a) in b.build_arg.iter().enumerate() {
                    if !a.split_once('=').is_some_and(|(k, _)| valid_env_name(k)) {
                        r.err(
                            item_pos(val, i),
                            &format!("{key}[{i}]"),
                            format!("{a:?} is not NAME=VALUE"),
                        );
                    }
                }
            }
            "volumes" => b.volumes = read_volumes(r, val, &key),
            "prepare" => {
                let mut p = Prepare::default();
                if let Some(entries) = r.map(val, &key) {
                    for (pk, pv, ppos) in entries {
                        let pkey = join(&key, &pk);
                        match pk.as_str() {
                            "version" => p.version = r.string(pv, &pkey).unwrap_or_default(),
                            "script" => p.script = r.strings(pv, &pkey),
                            "keep" => p.keep = r.strings(pv, &pkey),
                            _ => r.unknown(ppos, &pkey, &["version", "script", "keep"]),
                        }
                    }
                }
                b.prepare = Some(p);
            }
            _ => r.unknown(
                kpos,
                &key,
                &["base", "script", "prepare", "build_arg", "volumes"],
            ),
        }
    }
    if !base {
        r.err(v.pos, "build.base", "missing required key");
    }
    Some(b)
}

fn read_release(r: &mut Reader<'_>, v: &Node) -> Option<Release> {
    let mut rel = Release::default();
    for (k, val, kpos) in r.map(v, "release")? {
        let key = join("release", &k);
        match k.as_str() {
            "dest_base" => rel.dest_base = r.string(val, &key),
            "copy" => {
                let Some(items) = val.as_seq() else {
                    r.err(
                        val.pos,
                        &key,
                        format!("expected a list, found {}", val.type_name()),
                    );
                    continue;
                };
                for (i, item) in items.iter().enumerate() {
                    let ikey = format!("{key}[{i}]");
                    if let Some(s) = item.as_scalar() {
                        rel.copy.push(Copy {
                            src: s.to_string(),
                            dest: s.to_string(),
                        });
                        continue;
                    }
                    let Some(entries) = r.map(item, &ikey) else {
                        continue;
                    };
                    let (mut src, mut dest) = (None, None);
                    for (ck, cv, cpos) in entries {
                        let ckey = join(&ikey, &ck);
                        match ck.as_str() {
                            "src" => src = r.string(cv, &ckey),
                            "dest" => dest = r.string(cv, &ckey),
                            _ => r.unknown(cpos, &ckey, &["src", "dest"]),
                        }
                    }
                    match src {
                        Some(src) => rel.copy.push(Copy {
                            dest: dest.unwrap_or_else(|| src.clone()),
                            src,
                        }),
                        None => r.err(item.pos, &join(&ikey, "src"), "missing required key"),
                    }
                }
            }
            _ => r.unknown(kpos, &key, &["dest_base", "copy"]),
        }
    }
    Some(rel)
}

fn read_test(r: &mut Reader<'_>, v: &Node) -> Vec<String> {
    let mut script = Vec::new();
    if v.is_null() {
        return script;
    }
    for (k, val, kpos) in r.map(v, "test").unwrap_or_default() {
        let key = join("test", &k);
        match k.as_str() {
            "script" => script = r.strings(val, &key),
            _ => r.unknown(kpos, &key, &["script"]),
        }
    }
    script
}

fn read_use_services(r: &mut Reader<'_>, v: &Node) -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    if v.is_null() {
        return out;
    }
    for (app, val, kpos) in r.map(v, "use_services").unwrap_or_default() {
        let key = join("use_services", &app);
        if !valid_name(&app) {
            r.err(kpos, &key, format!("{app:?} is not a valid app name"));
            continue;
        }
        let services = r.strings(val, &key);
        if services.is_empty() {
            r.err(val.pos, &key, "list at least one service");
        }
        out.insert(app, services);
    }
    out
}

fn read_use_resources(r: &mut Reader<'_>, v: &Node) -> BTreeMap<String, ResourceUse> {
    let mut out = BTreeMap::new();
    if v.is_null() {
        return out;
    }
    for (res, val, kpos) in r.map(v, "use_resources").unwrap_or_default() {
        let key = join("use_resources", &res);
        if !valid_name(&res) {
            r.err(kpos, &key, format!("{res:?} is not a valid resource name"));
            continue;
        }
        let mut u = ResourceUse::default();
        if !val.is_null() {
            for (k, pv, _) in r.map(val, &key).unwrap_or_default() {
                let pkey = join(&key, &k);
                if k == "services" {
                    u.services = r.strings(pv, &pkey);
                } else {
                    u.params.insert(k, to_json(pv));
                }
            }
        }
        out.insert(res, u);
    }
    out
}

/// Converts a YAML node to JSON, typing plain scalars as YAML does.
pub fn to_json(n: &Node) -> serde_json::Value {
    use serde_json::Value as J;
    match &n.value {
        yaml::Value::Null => J::Null,
        yaml::Value::Scalar { text, quoted } => {
            if !quoted {
                if let Some(b) = n.as_bool() {
                    return J::Bool(b);
                }
                if let Some(i) = n.as_i64() {
                    return J::from(i);
                }
                if let Ok(f) = text.parse::<f64>()
                    && let Some(num) = serde_json::Number::from_f64(f)
                {
                    return J::Number(num);
                }
            }
            J::String(text.clone())
        }
        yaml::Value::Seq(items) => J::Array(items.iter().map(to_json).collect()),
        yaml::Value::Map(entries) => J::Object(
            entries
                .iter()
                .filter_map(|(k, v)| Some((k.as_scalar()?.to_string(), to_json(v))))
                .collect(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory("32m"), Some(32 << 20));
        assert_eq!(parse_memory("2G"), Some(2 << 30));
        assert_eq!(parse_memory("0m"), None);
        assert_eq!(parse_memory("32"), None);
        assert_eq!(parse_memory("m"), None);
        assert_eq!(parse_memory(""), None);
        assert_eq!(parse_memory("99999999999999999g"), None);
        assert_eq!(parse_memory("1é"), None);
        assert_eq!(parse_memory("é"), None);
        assert_eq!(parse_memory("32mé"), None);
    }

    #[test]
    fn names() {
        assert!(valid_name("hello"));
        assert!(valid_name("hello-world2"));
        assert!(!valid_name("2hello"));
        assert!(!valid_name("hello-"));
        assert!(!valid_name("hello_world"));
        assert!(!valid_name(""));
    }

    #[test]
    fn command_splitting() {
        assert_eq!(
            split_command(r#"sh -c 'echo "a b"' x\ y"#).unwrap(),
            vec!["sh", "-c", "echo \"a b\"", "x y"]
        );
        assert!(split_command("echo 'open").is_none());
    }
}
