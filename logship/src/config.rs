//! The configuration of `lain logship` (TOML), with every semantic error collected.

use std::net::SocketAddr;
use std::path::PathBuf;

use lain_common::{ConfigError, Validate};
use serde::Deserialize;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The node name written as `host.name`; defaults to the machine's host name.
    #[serde(default)]
    pub node: Option<String>,
    /// Directory of the checkpoint file and default outputs.
    pub state_dir: PathBuf,
    /// The admin listener.
    #[serde(default)]
    pub admin: AdminConfig,
    /// Limits and timings.
    #[serde(default)]
    pub limits: Limits,
    /// File sources.
    #[serde(default)]
    pub files: Vec<FileSource>,
    /// The Docker source: every container's json-file log.
    #[serde(default)]
    pub docker: Option<DockerSource>,
    /// Indexer mode (`--indexer`): Kafka topics to Elasticsearch.
    #[serde(default)]
    pub indexer: Option<IndexerConfig>,
    /// Sinks; the file sink is used when none is configured.
    #[serde(default)]
    pub sinks: Sinks,
}

/// The admin listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of `/metrics`, `/healthz` and `/files`.
    #[serde(default = "default_admin")]
    pub listen: String,
}

fn default_admin() -> String {
    "127.0.0.1:9532".into()
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: default_admin(),
        }
    }
}

/// Limits and timings shared by every source and sink.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Longer lines (and joined multiline events) are cut and tagged `truncated`.
    pub max_line_bytes: usize,
    /// Events per batch at most.
    pub batch_max_events: usize,
    /// Rendered bytes per batch at most.
    pub batch_max_bytes: usize,
    /// Batches queued towards each sink; with the batch limits this bounds memory.
    pub queue_batches: usize,
    /// Sleep at the end of a file before looking for more.
    pub poll_interval_ms: u64,
    /// Glob expansion interval.
    pub scan_interval_ms: u64,
    /// Checkpoint write interval.
    pub checkpoint_interval_ms: u64,
    /// A multiline event is emitted after this long without a continuation line.
    pub multiline_timeout_ms: u64,
    /// A rotated-away file is still read until idle this long.
    pub rotate_wait_ms: u64,
    /// Longest wait for sinks to deliver what was read, at shutdown.
    pub drain_timeout_secs: u64,
    /// A batch a sink has not taken for this long goes to the sink's disk buffer.
    pub buffer_spill_after_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_line_bytes: 64 * 1024,
            batch_max_events: 2048,
            batch_max_bytes: 2 * 1024 * 1024,
            queue_batches: 16,
            poll_interval_ms: 100,
            scan_interval_ms: 1000,
            checkpoint_interval_ms: 1000,
            multiline_timeout_ms: 1000,
            rotate_wait_ms: 5000,
            drain_timeout_secs: 30,
            buffer_spill_after_ms: 1000,
        }
    }
}

/// One file source.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSource {
    /// The source name (metrics label).
    pub name: String,
    /// Paths; the last component may contain `*` and `?`.
    pub paths: Vec<String>,
    /// `event.dataset`; defaults to the name.
    #[serde(default)]
    pub dataset: Option<String>,
    /// `lain.app` and `service.name`.
    #[serde(default)]
    pub app: Option<String>,
    /// `lain.proc`.
    #[serde(default)]
    pub proc: Option<String>,
    /// `lain.podgroup`.
    #[serde(default)]
    pub podgroup: Option<String>,
    /// `lain.instance`.
    #[serde(default)]
    pub instance: Option<String>,
    /// `lain.version`.
    #[serde(default)]
    pub version: Option<String>,
    /// Kafka topic template overriding the sink's.
    #[serde(default)]
    pub topic: Option<String>,
    /// A regular expression that starts a new multiline event; by default a line starting
    /// with a space or tab continues the previous one.
    #[serde(default)]
    pub multiline_start: Option<String>,
    /// Decode lines that are JSON objects.
    #[serde(default = "yes")]
    pub parse_json: bool,
    /// Files there at start and never seen before start at their end; files that appear
    /// later (a rotation's new file) are read from their beginning.
    #[serde(default)]
    pub read_from_end: bool,
    /// `plain` (the default), or `proxy_access`: the JSON access log of `lain proxy`, mapped
    /// to ECS `http.*`, `url.*` and `source.*` fields with the topic `{host}.access`.
    #[serde(default)]
    pub format: LineFormat,
}

/// How a file source's lines are interpreted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LineFormat {
    /// Log lines: JSON objects keep their fields, other lines are messages.
    #[default]
    Plain,
    /// The proxy's JSON access log.
    ProxyAccess,
}

fn yes() -> bool {
    true
}

/// Indexer mode.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexerConfig {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// The consumer group.
    #[serde(default = "default_group")]
    pub group_id: String,
    /// Topics, or regular expressions starting with `^`.
    pub topics: Vec<String>,
    /// A batch goes to Elasticsearch after this long even when not full.
    #[serde(default = "default_batch_wait")]
    pub batch_wait_ms: u64,
}

fn default_group() -> String {
    "lain-logship-indexer".into()
}

fn default_batch_wait() -> u64 {
    500
}

/// The Docker source.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DockerSource {
    /// The engine's socket, `unix:///var/run/docker.sock` by default.
    #[serde(default = "default_docker_host")]
    pub host: String,
    /// Ship only containers labelled `lain.app`.
    #[serde(default)]
    pub only_lain: bool,
    /// Containers there at start and never seen before are read from the end of their log;
    /// containers started later are read whole.
    #[serde(default)]
    pub read_from_end: bool,
}

fn default_docker_host() -> String {
    "unix:///var/run/docker.sock".into()
}

/// The sinks.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sinks {
    /// Local NDJSON files.
    #[serde(default)]
    pub file: Option<FileSink>,
    /// Kafka.
    #[serde(default)]
    pub kafka: Option<KafkaSink>,
    /// Elasticsearch or OpenSearch.
    #[serde(default)]
    pub elasticsearch: Option<EsSink>,
}

/// The file sink.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSink {
    /// The output file; defaults to `<state_dir>/out/logship.ndjson`.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Rotate at this size.
    #[serde(default = "default_file_max_bytes")]
    pub max_bytes: u64,
    /// Rotated files kept.
    #[serde(default = "default_max_files")]
    pub max_files: u32,
    /// Sync before acknowledging.
    #[serde(default = "yes")]
    pub fsync: bool,
}

fn default_file_max_bytes() -> u64 {
    256 * 1024 * 1024
}

fn default_max_files() -> u32 {
    4
}

/// The Kafka sink.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSink {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// Topic template: `{podgroup}`, `{app}`, `{proc}`, `{host}`, `{dataset}`, `{source}`.
    #[serde(default = "default_topic")]
    pub topic: String,
    /// `lz4`, `zstd`, `gzip`, `snappy` or `none`.
    #[serde(default = "default_compression")]
    pub compression: String,
    /// `linger.ms`.
    #[serde(default = "default_linger")]
    pub linger_ms: u64,
    /// How long the producer holds a message it cannot deliver before it reports it timed
    /// out (`message.timeout.ms`); the sink then sends it again, however long the broker
    /// is away.
    #[serde(default = "default_message_timeout_secs")]
    pub message_timeout_secs: u64,
    /// Batches awaiting delivery reports at once.
    #[serde(default = "default_inflight")]
    pub inflight_batches: usize,
    /// Refused events; defaults to `<state_dir>/dead-letters/kafka.ndjson`.
    #[serde(default)]
    pub dead_letter_path: Option<PathBuf>,
    /// Disk buffer (`<state_dir>/buffer/kafka`) for batches the sink does not take while
    /// the broker is away; reading pauses when it is full. 0 turns it off.
    #[serde(default = "default_buffer_max_bytes")]
    pub buffer_max_bytes: u64,
    /// Extra librdkafka properties.
    #[serde(default)]
    pub properties: std::collections::BTreeMap<String, String>,
}

fn default_topic() -> String {
    "{podgroup}".into()
}
fn default_compression() -> String {
    "lz4".into()
}
fn default_linger() -> u64 {
    20
}
fn default_message_timeout_secs() -> u64 {
    120
}
fn default_inflight() -> usize {
    8
}

/// The Elasticsearch sink.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EsSink {
    /// Base URL, such as `http://127.0.0.1:9200`.
    pub url: String,
    /// Index name prefix; daily indices `<prefix>-YYYY.MM.DD` are written.
    #[serde(default = "default_index")]
    pub index_prefix: String,
    /// A bulk request is sent when it reaches this size...
    #[serde(default = "default_bulk_bytes")]
    pub bulk_max_bytes: usize,
    /// ...or when its oldest event waited this long.
    #[serde(default = "default_flush_ms")]
    pub flush_interval_ms: u64,
    /// Request timeout.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// Refused events; defaults to `<state_dir>/dead-letters/elasticsearch.ndjson`.
    #[serde(default)]
    pub dead_letter_path: Option<PathBuf>,
    /// Disk buffer (`<state_dir>/buffer/elasticsearch`) for batches the sink does not take
    /// while Elasticsearch is away; reading pauses when it is full. 0 turns it off.
    #[serde(default = "default_buffer_max_bytes")]
    pub buffer_max_bytes: u64,
}

fn default_buffer_max_bytes() -> u64 {
    1024 * 1024 * 1024
}

fn default_index() -> String {
    "lain-logs".into()
}
fn default_bulk_bytes() -> usize {
    5 * 1024 * 1024
}
fn default_flush_ms() -> u64 {
    1000
}
fn default_timeout() -> u64 {
    30
}

const COMPRESSIONS: &[&str] = &["none", "gzip", "snappy", "lz4", "zstd"];

impl Validate for Config {
    fn validate(&self, errors: &mut Vec<ConfigError>) {
        if self.admin.listen.parse::<SocketAddr>().is_err() {
            errors.push(ConfigError::at(
                "admin.listen",
                "must be an IP address and port, such as 127.0.0.1:9532",
            ));
        }
        if self.state_dir.as_os_str().is_empty() {
            errors.push(ConfigError::at("state_dir", "must not be empty"));
        }
        let l = &self.limits;
        let positive = [
            ("limits.max_line_bytes", l.max_line_bytes as u64),
            ("limits.batch_max_events", l.batch_max_events as u64),
            ("limits.batch_max_bytes", l.batch_max_bytes as u64),
            ("limits.queue_batches", l.queue_batches as u64),
            ("limits.poll_interval_ms", l.poll_interval_ms),
            ("limits.scan_interval_ms", l.scan_interval_ms),
            ("limits.checkpoint_interval_ms", l.checkpoint_interval_ms),
            ("limits.buffer_spill_after_ms", l.buffer_spill_after_ms),
        ];
        for (k, v) in positive {
            if v == 0 {
                errors.push(ConfigError::at(k, "must be greater than 0"));
            }
        }
        if l.max_line_bytes > 16 * 1024 * 1024 {
            errors.push(ConfigError::at(
                "limits.max_line_bytes",
                "must be at most 16777216",
            ));
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, f) in self.files.iter().enumerate() {
            if f.name.is_empty() {
                errors.push(ConfigError::at(
                    format!("files[{i}].name"),
                    "must not be empty",
                ));
            } else if !names.insert(f.name.clone()) {
                errors.push(ConfigError::at(
                    format!("files[{i}].name"),
                    format!("duplicate source name {:?}", f.name),
                ));
            }
            if f.paths.is_empty() {
                errors.push(ConfigError::at(
                    format!("files[{i}].paths"),
                    "needs at least one path",
                ));
            }
            for (j, p) in f.paths.iter().enumerate() {
                let path = std::path::Path::new(p);
                let dir_has_wildcard = path
                    .parent()
                    .is_some_and(|d| d.to_string_lossy().contains(['*', '?']));
                if !path.is_absolute() {
                    errors.push(ConfigError::at(
                        format!("files[{i}].paths[{j}]"),
                        "must be an absolute path",
                    ));
                } else if dir_has_wildcard {
                    errors.push(ConfigError::at(
                        format!("files[{i}].paths[{j}]"),
                        "wildcards are allowed only in the file name",
                    ));
                }
            }
            if let Some(re) = &f.multiline_start
                && let Err(e) = regex::bytes::Regex::new(re)
            {
                errors.push(ConfigError::at(
                    format!("files[{i}].multiline_start"),
                    format!("invalid regular expression: {e}"),
                ));
            }
        }
        if let Some(d) = &self.docker
            && !d.host.starts_with("unix://")
        {
            errors.push(ConfigError::at(
                "docker.host",
                "must be a unix:// socket address",
            ));
        }
        if let Some(x) = &self.indexer {
            if x.brokers.trim().is_empty() {
                errors.push(ConfigError::at("indexer.brokers", "must not be empty"));
            }
            if x.topics.is_empty() {
                errors.push(ConfigError::at(
                    "indexer.topics",
                    "needs at least one topic",
                ));
            }
            if self.sinks.elasticsearch.is_none() {
                errors.push(ConfigError::at(
                    "indexer",
                    "needs [sinks.elasticsearch] to write to",
                ));
            }
        }
        if let Some(k) = &self.sinks.kafka {
            if k.brokers.trim().is_empty() {
                errors.push(ConfigError::at("sinks.kafka.brokers", "must not be empty"));
            }
            if k.topic.trim().is_empty() {
                errors.push(ConfigError::at("sinks.kafka.topic", "must not be empty"));
            }
            if !COMPRESSIONS.contains(&k.compression.as_str()) {
                errors.push(ConfigError::at(
                    "sinks.kafka.compression",
                    format!("must be one of {}", COMPRESSIONS.join(", ")),
                ));
            }
            if k.inflight_batches == 0 {
                errors.push(ConfigError::at(
                    "sinks.kafka.inflight_batches",
                    "must be greater than 0",
                ));
            }
            // librdkafka takes at most 2^31 - 1 ms; 0 would mean never, which is what the
            // retries already give without leaving a message inside librdkafka for good.
            if !(1..=2_147_483).contains(&k.message_timeout_secs) {
                errors.push(ConfigError::at(
                    "sinks.kafka.message_timeout_secs",
                    "must be between 1 and 2147483",
                ));
            }
        }
        if let Some(e) = &self.sinks.elasticsearch {
            if !(e.url.starts_with("http://") || e.url.starts_with("https://")) {
                errors.push(ConfigError::at(
                    "sinks.elasticsearch.url",
                    "must be an http:// or https:// URL",
                ));
            }
            let ok = !e.index_prefix.is_empty()
                && e.index_prefix
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c))
                && !e.index_prefix.starts_with(['-', '_', '.']);
            if !ok {
                errors.push(ConfigError::at(
                    "sinks.elasticsearch.index_prefix",
                    "must be lower-case letters, digits, '-', '_' or '.', not starting with '-', '_' or '.'",
                ));
            }
            if e.bulk_max_bytes == 0 || e.flush_interval_ms == 0 || e.timeout_secs == 0 {
                errors.push(ConfigError::at(
                    "sinks.elasticsearch",
                    "bulk_max_bytes, flush_interval_ms and timeout_secs must be greater than 0",
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_config_parses_with_defaults() {
        let c: Config = lain_common::parse_config(
            "l.toml",
            "state_dir = \"/tmp/x\"\n[[files]]\nname = \"app\"\npaths = [\"/var/log/*.log\"]\n",
        )
        .unwrap();
        assert_eq!(c.limits.max_line_bytes, 65536);
        assert!(c.files[0].parse_json);
        assert!(c.sinks.kafka.is_none());
    }

    #[test]
    fn every_error_is_reported() {
        let text = "state_dir = \"/tmp/x\"\n[admin]\nlisten = \"nope\"\n[[files]]\nname = \"a\"\npaths = [\"rel/*.log\", \"/a/*/b.log\"]\nmultiline_start = \"(\"\n[sinks.kafka]\nbrokers = \"\"\ncompression = \"brotli\"\nmessage_timeout_secs = 0\n";
        let e = lain_common::parse_config::<Config>("l.toml", text).unwrap_err();
        let paths: Vec<_> = e.errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            vec![
                "admin.listen",
                "files[0].paths[0]",
                "files[0].paths[1]",
                "files[0].multiline_start",
                "sinks.kafka.brokers",
                "sinks.kafka.compression",
                "sinks.kafka.message_timeout_secs"
            ],
            "{e}"
        );
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let e = lain_common::parse_config::<Config>(
            "l.toml",
            "state_dir = \"/x\"\n[limits]\nmax_line = 3\n",
        )
        .unwrap_err();
        assert_eq!(e.errors[0].path, "limits.max_line");
        assert_eq!(e.errors[0].line, Some(3));
    }
}
