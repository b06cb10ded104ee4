//! Turning raw log lines into events: JSON objects keep their fields, multiline joining,
//! truncation, lossy UTF-8, level detection, and rendering to Elastic Common Schema fields.

use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use regex::bytes::Regex;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// What is known about where a line came from; shared by every event of one file or container.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Meta {
    /// The configured source name (a bounded metric label).
    pub source: String,
    /// `event.dataset`.
    pub dataset: String,
    /// `host.name`: the node.
    pub host: String,
    /// `log.file.path`, for file sources.
    pub path: Option<String>,
    /// `lain.app`, also `service.name`.
    pub app: Option<String>,
    /// `lain.proc`.
    pub proc_name: Option<String>,
    /// `lain.podgroup`, such as `hello.web.web`.
    pub podgroup: Option<String>,
    /// `lain.instance`.
    pub instance: Option<String>,
    /// `lain.version`.
    pub version: Option<String>,
    /// `container.id`.
    pub container_id: Option<String>,
    /// `container.name`.
    pub container_name: Option<String>,
    /// `container.image.name`.
    pub image: Option<String>,
    /// A topic template overriding the Kafka sink's, such as `{host}.access`.
    pub topic: Option<String>,
}

impl Meta {
    /// The Kafka key: one instance's (or one file's) lines share it, so they stay in order.
    pub fn key(&self) -> String {
        match (&self.podgroup, &self.instance) {
            (Some(pg), Some(i)) => format!("{pg}.{i}"),
            _ => self
                .container_id
                .clone()
                .or_else(|| self.path.clone())
                .unwrap_or_else(|| self.source.clone()),
        }
    }

    /// Renders a topic template: `{podgroup}`, `{app}`, `{proc}`, `{host}`, `{dataset}`,
    /// `{source}`. Missing values render as `unknown`; characters Kafka does not allow in
    /// topic names become `_`.
    pub fn render_topic(&self, template: &str) -> String {
        let or = |v: &Option<String>| v.clone().unwrap_or_else(|| "unknown".into());
        let out = template
            .replace("{podgroup}", &or(&self.podgroup))
            .replace("{app}", &or(&self.app))
            .replace("{proc}", &or(&self.proc_name))
            .replace("{host}", &self.host)
            .replace("{dataset}", &self.dataset)
            .replace("{source}", &self.source);
        let cleaned: String = out
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                    c
                } else {
                    '_'
                }
            })
            .take(249)
            .collect();
        if cleaned.is_empty() || cleaned == "." || cleaned == ".." {
            "unknown".into()
        } else {
            cleaned
        }
    }
}

/// One line (or joined lines) as read, before rendering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawLine {
    /// The bytes, without the trailing newline, at most the configured maximum.
    pub bytes: Vec<u8>,
    /// Byte offset of the first byte in the file.
    pub start: u64,
    /// Byte offset just past the newline that ended it.
    pub end: u64,
    /// The line was longer than the maximum and was cut.
    pub truncated: bool,
    /// Lines joined into this one, 1 for a single line.
    pub lines: u32,
    /// The timestamp the line carried outside its text (Docker's), if any.
    pub time: Option<DateTime<Utc>>,
    /// `stream` (`stdout`/`stderr`) for container logs.
    pub stream: Option<String>,
}

/// A rendered event, ready for every sink.
#[derive(Debug, Clone)]
pub struct Event {
    /// A deterministic id, so a retried delivery does not create a second document.
    pub id: String,
    /// Where it came from.
    pub meta: Arc<Meta>,
    /// `@timestamp`, also choosing the daily index.
    pub time: DateTime<Utc>,
    /// The ECS JSON document.
    pub body: Vec<u8>,
}

/// Options of the processing step.
#[derive(Debug, Clone)]
pub struct Processing {
    /// Decode lines that are JSON objects and keep their fields.
    pub parse_json: bool,
}

/// Field names of a JSON line taken as the message, level and time.
const MESSAGE_KEYS: &[&str] = &["message", "msg", "log"];
const LEVEL_KEYS: &[&str] = &["level", "lvl", "severity", "loglevel", "log.level"];
const TIME_KEYS: &[&str] = &["@timestamp", "timestamp", "time", "ts"];
/// Top-level fields lain sets; a JSON line's own fields of these names move under `json.`.
const RESERVED: &[&str] = &[
    "@timestamp",
    "message",
    "log",
    "stream",
    "service",
    "container",
    "host",
    "event",
    "lain",
    "tags",
    "json",
];

static LEVEL_RE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?i)\b(trace|debug|info|notice|warn|warning|error|err|fatal|critical|crit|panic)\b",
    )
    .expect("valid regex")
});

/// Normalises a level name to ECS-style lower case (`warning` → `warn`).
pub fn normalize_level(s: &str) -> Option<String> {
    let l = s.trim().to_ascii_lowercase();
    let n = match l.as_str() {
        "trace" => "trace",
        "debug" => "debug",
        "info" | "information" | "notice" => "info",
        "warn" | "warning" => "warn",
        "error" | "err" => "error",
        "fatal" | "critical" | "crit" | "panic" => "fatal",
        _ => return None,
    };
    Some(n.to_string())
}

/// Finds a level word near the start of a plain-text line.
pub fn detect_level(text: &[u8]) -> Option<String> {
    let head = &text[..text.len().min(100)];
    let m = LEVEL_RE.find(head)?;
    normalize_level(&String::from_utf8_lossy(m.as_bytes()))
}

/// A deterministic document id from where the line was read.
pub fn event_id(identity: &str, start: u64) -> String {
    let mut h = Sha256::new();
    h.update(identity.as_bytes());
    h.update(start.to_be_bytes());
    hex::encode(&h.finalize()[..16])
}

fn set_path(doc: &mut Map<String, Value>, path: &[&str], v: Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut cur = doc;
    for p in parents {
        let entry = cur
            .entry((*p).to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        if !entry.is_object() {
            *entry = Value::Object(Map::new());
        }
        let Value::Object(m) = entry else { return };
        cur = m;
    }
    cur.insert((*last).to_string(), v);
}

/// Renders a line into an ECS document.
pub fn render(
    meta: &Arc<Meta>,
    identity: &str,
    line: &RawLine,
    opts: &Processing,
    now: DateTime<Utc>,
) -> Event {
    let mut tags: Vec<Value> = Vec::new();
    let text = match std::str::from_utf8(&line.bytes) {
        Ok(s) => s.to_string(),
        Err(_) => {
            tags.push("invalid_utf8".into());
            String::from_utf8_lossy(&line.bytes).into_owned()
        }
    };
    if line.truncated {
        tags.push("truncated".into());
    }
    if line.lines > 1 {
        tags.push("multiline".into());
    }
    let mut doc = Map::new();
    let mut message = None;
    let mut level = None;
    let mut time = line.time;
    if opts.parse_json
        && !line.truncated
        && text.trim_start().starts_with('{')
        && let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(&text)
    {
        for (k, v) in fields {
            if message.is_none()
                && MESSAGE_KEYS.contains(&k.as_str())
                && let Value::String(s) = &v
            {
                message = Some(s.clone());
                continue;
            }
            if level.is_none()
                && LEVEL_KEYS.contains(&k.as_str())
                && let Some(l) = v.as_str().and_then(normalize_level)
            {
                level = Some(l);
                continue;
            }
            if TIME_KEYS.contains(&k.as_str())
                && let Some(t) = v
                    .as_str()
                    .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
            {
                time = Some(t.with_timezone(&Utc));
                continue;
            }
            if RESERVED.contains(&k.as_str()) {
                set_path(&mut doc, &["json", &k], v);
            } else {
                doc.insert(k, v);
            }
        }
        if message.is_none() {
            message = Some(text.clone());
        }
    }
    let message = message.unwrap_or(text);
    if level.is_none() {
        level = detect_level(message.as_bytes());
    }
    let ts = time.unwrap_or(now);
    doc.insert(
        "@timestamp".into(),
        ts.to_rfc3339_opts(SecondsFormat::Nanos, true).into(),
    );
    doc.insert("message".into(), message.into());
    if let Some(l) = level {
        set_path(&mut doc, &["log", "level"], l.into());
    }
    if let Some(p) = &meta.path {
        set_path(&mut doc, &["log", "file", "path"], p.clone().into());
    }
    set_path(&mut doc, &["log", "offset"], line.start.into());
    if let Some(s) = &line.stream {
        doc.insert("stream".into(), s.clone().into());
    }
    set_path(&mut doc, &["host", "name"], meta.host.clone().into());
    set_path(&mut doc, &["event", "dataset"], meta.dataset.clone().into());
    if let Some(a) = &meta.app {
        set_path(&mut doc, &["service", "name"], a.clone().into());
    }
    let opt = [
        (&meta.container_id, &["container", "id"][..]),
        (&meta.container_name, &["container", "name"][..]),
        (&meta.image, &["container", "image", "name"][..]),
        (&meta.app, &["lain", "app"][..]),
        (&meta.proc_name, &["lain", "proc"][..]),
        (&meta.podgroup, &["lain", "podgroup"][..]),
        (&meta.instance, &["lain", "instance"][..]),
        (&meta.version, &["lain", "version"][..]),
    ];
    for (v, path) in opt {
        if let Some(v) = v {
            set_path(&mut doc, path, v.clone().into());
        }
    }
    if !tags.is_empty() {
        doc.insert("tags".into(), Value::Array(tags));
    }
    let body = serde_json::to_vec(&Value::Object(doc)).unwrap_or_default();
    Event {
        id: event_id(identity, line.start),
        meta: meta.clone(),
        time: ts,
        body,
    }
}

/// Splits a byte stream into lines, cutting lines longer than `max_bytes` and remembering
/// offsets. Memory stays bounded by `max_bytes` however long a line is.
#[derive(Debug)]
pub struct LineSplitter {
    max_bytes: usize,
    buf: Vec<u8>,
    start: u64,
    pos: u64,
    truncated: bool,
}

impl LineSplitter {
    /// A splitter whose next byte is at `offset`.
    pub fn new(max_bytes: usize, offset: u64) -> LineSplitter {
        LineSplitter {
            max_bytes: max_bytes.max(1),
            buf: Vec::new(),
            start: offset,
            pos: offset,
            truncated: false,
        }
    }

    /// Feeds bytes; complete lines are pushed to `out`.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<RawLine>) {
        let mut rest = data;
        while !rest.is_empty() {
            match memchr_nl(rest) {
                Some(i) => {
                    self.take(&rest[..i]);
                    self.pos += i as u64 + 1;
                    let mut bytes = std::mem::take(&mut self.buf);
                    if bytes.last() == Some(&b'\r') {
                        bytes.pop();
                    }
                    out.push(RawLine {
                        bytes,
                        start: self.start,
                        end: self.pos,
                        truncated: std::mem::take(&mut self.truncated),
                        lines: 1,
                        time: None,
                        stream: None,
                    });
                    self.start = self.pos;
                    rest = &rest[i + 1..];
                }
                None => {
                    self.take(rest);
                    self.pos += rest.len() as u64;
                    rest = &[];
                }
            }
        }
    }

    fn take(&mut self, part: &[u8]) {
        let room = self.max_bytes.saturating_sub(self.buf.len());
        if part.len() > room {
            self.truncated = true;
        }
        self.buf.extend_from_slice(&part[..part.len().min(room)]);
    }

    /// The offset just past the last byte fed.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Bytes of an unfinished line held back.
    pub fn pending(&self) -> u64 {
        self.pos - self.start
    }
}

fn memchr_nl(b: &[u8]) -> Option<usize> {
    b.iter().position(|&c| c == b'\n')
}

/// Joins continuation lines onto the line they continue.
#[derive(Debug)]
pub struct Joiner {
    start: Option<Regex>,
    max_bytes: usize,
    timeout: Duration,
    pending: Option<(RawLine, Instant)>,
}

impl Joiner {
    /// `start`: a pattern that begins a new event (otherwise: a line not starting with
    /// whitespace begins one). `max_bytes` caps a joined event.
    pub fn new(start: Option<Regex>, max_bytes: usize, timeout: Duration) -> Joiner {
        Joiner {
            start,
            max_bytes,
            timeout,
            pending: None,
        }
    }

    fn is_start(&self, line: &RawLine) -> bool {
        match &self.start {
            Some(re) => re.is_match(&line.bytes),
            None => !matches!(line.bytes.first(), Some(b' ' | b'\t')),
        }
    }

    /// Takes one line; completed events are pushed to `out`.
    pub fn push(&mut self, line: RawLine, out: &mut Vec<RawLine>) {
        let start = self.is_start(&line);
        match &mut self.pending {
            Some((p, _)) if !start => {
                let room = self.max_bytes.saturating_sub(p.bytes.len());
                let add = 1 + line.bytes.len();
                if add > room {
                    p.truncated = true;
                    if room > 0 {
                        p.bytes.push(b'\n');
                        p.bytes
                            .extend_from_slice(&line.bytes[..line.bytes.len().min(room - 1)]);
                    }
                } else {
                    p.bytes.push(b'\n');
                    p.bytes.extend_from_slice(&line.bytes);
                }
                p.truncated |= line.truncated;
                p.end = line.end;
                p.lines += 1;
            }
            _ => {
                if let Some((p, _)) = self.pending.take() {
                    out.push(p);
                }
                self.pending = Some((line, Instant::now()));
            }
        }
    }

    /// Emits the pending event if it waited longer than the timeout (or `force`).
    pub fn flush(&mut self, force: bool, out: &mut Vec<RawLine>) {
        if let Some((_, since)) = &self.pending
            && (force || since.elapsed() >= self.timeout)
            && let Some((p, _)) = self.pending.take()
        {
            out.push(p);
        }
    }

    /// Whether an event waits for more lines.
    pub fn has_pending(&self) -> bool {
        self.pending.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> Arc<Meta> {
        Arc::new(Meta {
            source: "app".into(),
            dataset: "hello.web".into(),
            host: "node1".into(),
            path: Some("/var/log/a.log".into()),
            app: Some("hello".into()),
            proc_name: Some("web".into()),
            podgroup: Some("hello.web.web".into()),
            instance: Some("1".into()),
            version: Some("v3".into()),
            ..Meta::default()
        })
    }

    fn line(b: &[u8]) -> RawLine {
        RawLine {
            bytes: b.to_vec(),
            start: 7,
            end: 8 + b.len() as u64,
            truncated: false,
            lines: 1,
            time: None,
            stream: None,
        }
    }

    fn doc(e: &Event) -> Value {
        serde_json::from_slice(&e.body).unwrap()
    }

    fn opts() -> Processing {
        Processing { parse_json: true }
    }

    #[test]
    fn plain_line_gets_ecs_and_lain_fields() {
        let e = render(
            &meta(),
            "fp",
            &line(b"2024 WARN disk low"),
            &opts(),
            Utc::now(),
        );
        let d = doc(&e);
        assert_eq!(d["message"], "2024 WARN disk low");
        assert_eq!(d["log"]["level"], "warn");
        assert_eq!(d["log"]["file"]["path"], "/var/log/a.log");
        assert_eq!(d["log"]["offset"], 7);
        assert_eq!(d["service"]["name"], "hello");
        assert_eq!(d["host"]["name"], "node1");
        assert_eq!(d["event"]["dataset"], "hello.web");
        assert_eq!(d["lain"]["podgroup"], "hello.web.web");
        assert_eq!(d["lain"]["instance"], "1");
        assert_eq!(d["lain"]["version"], "v3");
        assert!(d["@timestamp"].as_str().unwrap().ends_with('Z'));
        assert!(d.get("tags").is_none());
        assert_eq!(e.id, event_id("fp", 7));
        assert_ne!(e.id, event_id("fp", 8));
    }

    #[test]
    fn json_line_keeps_fields_and_reserved_names_move() {
        let l = line(
            br#"{"msg":"hi","level":"ERROR","user":"bob","n":3,"host":"x","time":"2024-05-01T10:00:00Z"}"#,
        );
        let d = doc(&render(&meta(), "fp", &l, &opts(), Utc::now()));
        assert_eq!(d["message"], "hi");
        assert_eq!(d["log"]["level"], "error");
        assert_eq!(d["user"], "bob");
        assert_eq!(d["n"], 3);
        assert_eq!(d["json"]["host"], "x");
        assert_eq!(d["host"]["name"], "node1");
        assert_eq!(d["@timestamp"], "2024-05-01T10:00:00.000000000Z");
    }

    #[test]
    fn invalid_utf8_is_lossy_and_flagged() {
        let d = doc(&render(
            &meta(),
            "fp",
            &line(b"a\xff\xfeb"),
            &opts(),
            Utc::now(),
        ));
        assert_eq!(d["message"], "a\u{fffd}\u{fffd}b");
        assert_eq!(d["tags"], serde_json::json!(["invalid_utf8"]));
    }

    #[test]
    fn splitter_truncates_long_lines_and_keeps_offsets() {
        let mut s = LineSplitter::new(4, 100);
        let mut out = Vec::new();
        s.feed(b"ab\ncdefgh", &mut out);
        s.feed(b"ij\nk", &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].bytes, b"ab");
        assert_eq!((out[0].start, out[0].end), (100, 103));
        assert!(!out[0].truncated);
        assert_eq!(out[1].bytes, b"cdef");
        assert!(out[1].truncated);
        assert_eq!((out[1].start, out[1].end), (103, 112));
        assert_eq!(s.pending(), 1);
        assert_eq!(s.position(), 113);
        let d = doc(&render(&meta(), "fp", &out[1], &opts(), Utc::now()));
        assert_eq!(d["tags"], serde_json::json!(["truncated"]));
    }

    #[test]
    fn splitter_handles_a_mebibyte_line_in_small_memory() {
        let mut s = LineSplitter::new(1024, 0);
        let mut out = Vec::new();
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..16 {
            s.feed(&chunk, &mut out);
            assert!(s.buf.len() <= 1024);
        }
        s.feed(b"\n", &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].bytes.len(), 1024);
        assert!(out[0].truncated);
        assert_eq!(out[0].end, 1024 * 1024 + 1);
    }

    #[test]
    fn joiner_joins_indented_lines_by_default() {
        let mut j = Joiner::new(None, 1000, Duration::from_secs(60));
        let mut out = Vec::new();
        let mut s = LineSplitter::new(1000, 0);
        let mut lines = Vec::new();
        s.feed(
            b"Exception: boom\n  at a.b\n\tat c.d\nnext line\n",
            &mut lines,
        );
        for l in lines {
            j.push(l, &mut out);
        }
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].bytes, b"Exception: boom\n  at a.b\n\tat c.d");
        assert_eq!(out[0].lines, 3);
        assert_eq!((out[0].start, out[0].end), (0, 33));
        assert!(j.has_pending());
        j.flush(false, &mut out);
        assert_eq!(out.len(), 1, "not timed out yet");
        j.flush(true, &mut out);
        assert_eq!(out[1].bytes, b"next line");
        let d = doc(&render(&meta(), "fp", &out[0], &opts(), Utc::now()));
        assert_eq!(d["tags"], serde_json::json!(["multiline"]));
    }

    #[test]
    fn joiner_with_start_pattern_and_timeout() {
        let re = Regex::new(r"^\d{4}-").unwrap();
        let mut j = Joiner::new(Some(re), 1000, Duration::from_millis(0));
        let mut out = Vec::new();
        let mut lines = Vec::new();
        LineSplitter::new(1000, 0).feed(b"2024-01 a\nb\n2024-02 c\n", &mut lines);
        for l in lines {
            j.push(l, &mut out);
        }
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].bytes, b"2024-01 a\nb");
        j.flush(false, &mut out);
        assert_eq!(out[1].bytes, b"2024-02 c");
    }

    #[test]
    fn topics_render_lain_names() {
        let m = meta();
        assert_eq!(m.render_topic("{podgroup}"), "hello.web.web");
        assert_eq!(m.render_topic("{host}.access"), "node1.access");
        let bare = Meta::default();
        assert_eq!(bare.render_topic("{podgroup}"), "unknown");
        assert_eq!(m.render_topic("a b/{app}"), "a_b_hello");
        assert_eq!(m.key(), "hello.web.web.1");
    }

    #[test]
    fn levels_normalise() {
        assert_eq!(detect_level(b"[error] x"), Some("error".into()));
        assert_eq!(detect_level(b"Warning: x"), Some("warn".into()));
        assert_eq!(detect_level(b"information x"), None);
        assert_eq!(detect_level(b"nothing here"), None);
    }
}
