//! Turning raw log lines into events: JSON objects keep their fields, multiline joining,
//! truncation, lossy UTF-8, level detection, and rendering to Elastic Common Schema fields.

use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use regex::bytes::Regex;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// What is known about where a line came from; shared by every event of one file or container.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
    /// The lines are the proxy's JSON access log: map its fields to ECS `http.*`, `url.*`,
    /// `source.*`.
    pub access_log: bool,
}

/// Field names of a JSON line taken as the message, level and time.
const MESSAGE_KEYS: &[&str] = &["message", "msg", "log"];
const LEVEL_KEYS: &[&str] = &["level", "lvl", "severity", "loglevel", "log.level"];
const TIME_KEYS: &[&str] = &["@timestamp", "timestamp", "time", "ts"];
/// Top-level fields lain sets; a JSON line's own fields of these names move under `json.`.
/// The access log's ECS objects are among them: every event of a day shares one index, and
/// an app line's `"error": "..."` or `"url": "..."` indexed first would fix those names as
/// strings, after which every access line of that day would be refused (and the other way
/// round).
const RESERVED: &[&str] = &[
    "@timestamp",
    "source",
    "http",
    "url",
    "user_agent",
    "error",
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
        // ASCII-only case folding and word boundaries let the regex engine use its fast DFA.
        r"(?i-u)\b(trace|debug|info|notice|warn|warning|error|err|fatal|critical|crit|panic)\b",
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
    // Written by hand: `hex::encode` builds the string a char at a time, which showed up
    // in the per-line cost of shipping.
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut id = String::with_capacity(32);
    for b in &h.finalize()[..16] {
        id.push(char::from(DIGITS[usize::from(b >> 4)]));
        id.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    id
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
    let json_like = opts.parse_json && !line.truncated && {
        let first = line.bytes.iter().find(|b| !b.is_ascii_whitespace());
        first == Some(&b'{')
    };
    if !opts.access_log && !json_like {
        return render_plain(meta, identity, line, now);
    }
    render_general(meta, identity, line, opts, now)
}

/// Renders any line by building its document as a map.
fn render_general(
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
    let mut line_meta = None;
    if opts.access_log
        && !line.truncated
        && let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(&text)
    {
        let a = access_fields(fields, &mut doc);
        message = Some(a.message);
        level = Some(a.level.to_string());
        time = a.time.or(time);
        line_meta = Some((a.app, a.proc_name));
    } else if opts.parse_json
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
    // An access line names the app its route belongs to; the source's own app wins.
    let (line_app, line_proc) = line_meta.unwrap_or_default();
    let app = meta.app.as_ref().or(line_app.as_ref());
    let proc_name = meta.proc_name.as_ref().or(line_proc.as_ref());
    if let Some(a) = app {
        set_path(&mut doc, &["service", "name"], a.clone().into());
    }
    let opt = [
        (&meta.container_id, &["container", "id"][..]),
        (&meta.container_name, &["container", "name"][..]),
        (&meta.image, &["container", "image", "name"][..]),
        (&app.cloned(), &["lain", "app"][..]),
        (&proc_name.cloned(), &["lain", "proc"][..]),
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

/// The JSON of a source's fixed fields (`host`, `event`, `service`, `container`, `lain`),
/// starting with a comma; the same for every line of a file, so computed once per source.
fn meta_fragment(meta: &Meta) -> Vec<u8> {
    let mut doc = Map::new();
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
    let mut out = serde_json::to_vec(&Value::Object(doc)).unwrap_or_default();
    // `{...}` becomes `,...`: spliced after the per-line fields.
    out.pop();
    if let Some(first) = out.first_mut() {
        *first = b',';
    }
    if out.len() == 1 {
        out.clear();
    }
    out
}

/// Per-thread memo of the last source's fragment and the last formatted reading time: a
/// reader renders thousands of lines of one source with one reading time in a row. The
/// `Weak` keeps the `Meta` allocation from being reused while it is remembered, so a pointer
/// match is a true match.
struct RenderMemo {
    meta: std::sync::Weak<Meta>,
    fragment: Vec<u8>,
    now: Option<DateTime<Utc>>,
    now_text: String,
}

thread_local! {
    static MEMO: std::cell::RefCell<RenderMemo> = const {
        std::cell::RefCell::new(RenderMemo {
            meta: std::sync::Weak::new(),
            fragment: Vec::new(),
            now: None,
            now_text: String::new(),
        })
    };
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    // Writing a str to a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// Renders a line that is not a JSON object straight into its JSON text: the same document
/// as the general path produces, without building a map per line.
fn render_plain(meta: &Arc<Meta>, identity: &str, line: &RawLine, now: DateTime<Utc>) -> Event {
    let mut invalid = false;
    let text = match std::str::from_utf8(&line.bytes) {
        Ok(s) => std::borrow::Cow::Borrowed(s),
        Err(_) => {
            invalid = true;
            String::from_utf8_lossy(&line.bytes)
        }
    };
    let level = detect_level(text.as_bytes());
    let ts = line.time.unwrap_or(now);
    let mut b = Vec::with_capacity(text.len() + 512);
    b.extend_from_slice(b"{\"@timestamp\":\"");
    MEMO.with(|m| {
        let mut m = m.borrow_mut();
        if !std::sync::Weak::ptr_eq(&m.meta, &Arc::downgrade(meta)) {
            m.meta = Arc::downgrade(meta);
            m.fragment = meta_fragment(meta);
        }
        if m.now != Some(ts) {
            m.now = Some(ts);
            m.now_text = ts.to_rfc3339_opts(SecondsFormat::Nanos, true);
        }
        b.extend_from_slice(m.now_text.as_bytes());
        b.extend_from_slice(b"\",\"message\":");
        write_str(&mut b, &text);
        b.extend_from_slice(b",\"log\":{");
        if let Some(l) = &level {
            b.extend_from_slice(b"\"level\":");
            write_str(&mut b, l);
            b.push(b',');
        }
        if let Some(p) = &meta.path {
            b.extend_from_slice(b"\"file\":{\"path\":");
            write_str(&mut b, p);
            b.extend_from_slice(b"},");
        }
        b.extend_from_slice(b"\"offset\":");
        b.extend_from_slice(line.start.to_string().as_bytes());
        b.push(b'}');
        if let Some(s) = &line.stream {
            b.extend_from_slice(b",\"stream\":");
            write_str(&mut b, s);
        }
        b.extend_from_slice(&m.fragment);
    });
    let tags = [
        (invalid, "\"invalid_utf8\""),
        (line.truncated, "\"truncated\""),
        (line.lines > 1, "\"multiline\""),
    ];
    if tags.iter().any(|(on, _)| *on) {
        b.extend_from_slice(b",\"tags\":[");
        let mut first = true;
        for (on, t) in tags {
            if on {
                if !first {
                    b.push(b',');
                }
                first = false;
                b.extend_from_slice(t.as_bytes());
            }
        }
        b.push(b']');
    }
    b.push(b'}');
    Event {
        id: event_id(identity, line.start),
        meta: meta.clone(),
        time: ts,
        body: b,
    }
}

/// What the ECS rendering of an access line needs besides the fields it set.
struct Access {
    message: String,
    level: &'static str,
    time: Option<DateTime<Utc>>,
    app: Option<String>,
    proc_name: Option<String>,
}

/// Maps one line of the proxy's access log (`proxy/src/access_log.rs`) to ECS fields:
/// `source.ip`, `http.request.method`, `url.domain`, `url.original`, `url.path`, `url.query`,
/// `http.response.status_code`, `http.request.body.bytes`, `http.response.body.bytes`,
/// `event.duration` (nanoseconds), `http.request.id`, `user_agent.original`,
/// `error.message`, and the proxy's own `lain.proxy.upstream`, `lain.proxy.upstream_ms`,
/// `lain.proxy.route`. Unknown fields are kept under `json.`.
fn access_fields(fields: Map<String, Value>, doc: &mut Map<String, Value>) -> Access {
    let s = |v: &Value| v.as_str().map(str::to_string);
    let mut a = Access {
        message: String::new(),
        level: "info",
        time: None,
        app: None,
        proc_name: None,
    };
    let (mut method, mut host, mut path, mut status) = (None, None, None, None);
    for (k, v) in fields {
        match k.as_str() {
            "time" => {
                a.time = v
                    .as_str()
                    .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                    .map(|t| t.with_timezone(&Utc));
            }
            "client_ip" => set_path(doc, &["source", "ip"], v),
            "method" => {
                method = s(&v);
                set_path(doc, &["http", "request", "method"], v);
            }
            "host" => {
                host = s(&v);
                set_path(doc, &["url", "domain"], v);
            }
            "path" => {
                if let Some(p) = v.as_str() {
                    let (only, query) = match p.split_once('?') {
                        Some((o, q)) => (o, Some(q)),
                        None => (p, None),
                    };
                    set_path(doc, &["url", "path"], only.into());
                    if let Some(q) = query {
                        set_path(doc, &["url", "query"], q.into());
                    }
                }
                path = s(&v);
                set_path(doc, &["url", "original"], v);
            }
            "status" => {
                status = v.as_u64();
                set_path(doc, &["http", "response", "status_code"], v);
            }
            "bytes_in" => set_path(doc, &["http", "request", "body", "bytes"], v),
            "bytes_out" => set_path(doc, &["http", "response", "body", "bytes"], v),
            "duration_ms" => {
                if let Some(ms) = v.as_f64() {
                    set_path(doc, &["event", "duration"], ((ms * 1e6) as u64).into());
                }
            }
            "upstream" if !v.is_null() => set_path(doc, &["lain", "proxy", "upstream"], v),
            "upstream_ms" if !v.is_null() => set_path(doc, &["lain", "proxy", "upstream_ms"], v),
            "route" if !v.is_null() => set_path(doc, &["lain", "proxy", "route"], v),
            "app" => a.app = s(&v),
            "proc" => a.proc_name = s(&v),
            "request_id" => set_path(doc, &["http", "request", "id"], v),
            "user_agent" => set_path(doc, &["user_agent", "original"], v),
            "error" if !v.is_null() => set_path(doc, &["error", "message"], v),
            "upstream" | "upstream_ms" | "route" | "error" => {}
            _ => set_path(doc, &["json", &k], v),
        }
    }
    let status_text = status.map_or_else(|| "-".to_string(), |c| c.to_string());
    a.level = match status {
        Some(500..) | Some(0) => "error",
        Some(400..=499) => "warn",
        _ => "info",
    };
    a.message = format!(
        "{} {}{} {status_text}",
        method.as_deref().unwrap_or("-"),
        host.as_deref().unwrap_or(""),
        path.as_deref().unwrap_or(""),
    );
    a
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
                    if self.buf.last() == Some(&b'\r') {
                        self.buf.pop();
                    }
                    out.push(self.cut());
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

    /// Ends the unfinished line, if any, as it is: for a file nothing more will be written
    /// to, whose last line has no newline.
    pub fn finish(&mut self) -> Option<RawLine> {
        (self.pending() > 0).then(|| self.cut())
    }

    /// The line held so far, ending at the current position; the next starts there.
    fn cut(&mut self) -> RawLine {
        let line = RawLine {
            bytes: std::mem::take(&mut self.buf),
            start: self.start,
            end: self.pos,
            truncated: std::mem::take(&mut self.truncated),
            lines: 1,
            time: None,
            stream: None,
        };
        self.start = self.pos;
        line
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
        Processing {
            parse_json: true,
            access_log: false,
        }
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
    fn event_ids_never_change_between_versions() {
        // A line shipped again after an upgrade must get the id it had before, or the index
        // would hold it twice: sha256(identity, offset as 8 big-endian octets), first 16
        // octets in lower-case hex.
        assert_eq!(event_id("fp", 7), "d74feeea1dd416a9c4946b9f964596c5");
    }

    #[test]
    fn json_line_keeps_fields_and_reserved_names_move() {
        let l = line(
            br#"{"msg":"hi","level":"ERROR","user":"bob","n":3,"host":"x","time":"2024-05-01T10:00:00Z","error":"boom","url":"/a","user_agent":"ua","http":1,"source":"s"}"#,
        );
        let d = doc(&render(&meta(), "fp", &l, &opts(), Utc::now()));
        // The names the access log's ECS objects use never arrive as scalars.
        for k in ["error", "url", "user_agent", "http", "source"] {
            assert!(d.get(k).is_none(), "{k} at the top: {d}");
        }
        assert_eq!(d["json"]["error"], "boom");
        assert_eq!(d["json"]["url"], "/a");
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
    fn plain_fast_path_renders_the_same_document() {
        let full = meta();
        let bare = Arc::new(Meta {
            source: "s".into(),
            dataset: "d".into(),
            host: "h".into(),
            ..Meta::default()
        });
        let mut cases = vec![
            line(b"2024-05-01 INFO started \"quoted\" \\ tab\t"),
            line(b"no level here"),
            line(b""),
            line(b"bad \xff\xfe utf8 ERROR"),
            line(b"{not json"),
        ];
        let mut t = line(b"cut WARNING");
        t.truncated = true;
        t.lines = 3;
        t.stream = Some("stderr".into());
        t.time = Some(Utc::now());
        cases.push(t);
        let plain = Processing {
            parse_json: false,
            access_log: false,
        };
        let now = Utc::now();
        for m in [&full, &bare, &full] {
            for l in &cases {
                let fast = render_plain(m, "id", l, now);
                let general = render_general(m, "id", l, &plain, now);
                assert_eq!(
                    doc(&fast),
                    doc(&general),
                    "{:?}",
                    String::from_utf8_lossy(&l.bytes)
                );
                assert_eq!(fast.id, general.id);
                assert_eq!(fast.time, general.time);
            }
        }
    }

    #[test]
    fn access_lines_become_ecs_http_fields() {
        let meta = Arc::new(Meta {
            source: "access".into(),
            dataset: "lain.access".into(),
            host: "node1".into(),
            ..Meta::default()
        });
        let text = r#"{"time":"2024-05-01T10:00:00Z","client_ip":"10.0.0.9","method":"GET","host":"hello.lain.local","path":"/a/b?x=1","status":503,"bytes_in":0,"bytes_out":12,"duration_ms":1.5,"upstream":"127.0.0.1:9000","upstream_ms":1.2,"app":"hello","proc":"web","route":"hello.lain.local/","request_id":"r1","user_agent":"curl/8","error":"upstream refused"}"#;
        let l = line(text.as_bytes());
        let opts = Processing {
            parse_json: true,
            access_log: true,
        };
        let e = render(&meta, "id", &l, &opts, Utc::now());
        let d: Value = serde_json::from_slice(&e.body).unwrap();
        assert_eq!(d["message"], "GET hello.lain.local/a/b?x=1 503");
        assert_eq!(d["log"]["level"], "error");
        assert_eq!(d["source"]["ip"], "10.0.0.9");
        assert_eq!(d["http"]["request"]["method"], "GET");
        assert_eq!(d["http"]["request"]["id"], "r1");
        assert_eq!(d["http"]["response"]["status_code"], 503);
        assert_eq!(d["http"]["response"]["body"]["bytes"], 12);
        assert_eq!(d["url"]["domain"], "hello.lain.local");
        assert_eq!(d["url"]["path"], "/a/b");
        assert_eq!(d["url"]["query"], "x=1");
        assert_eq!(d["url"]["original"], "/a/b?x=1");
        assert_eq!(d["event"]["duration"], 1_500_000);
        assert_eq!(d["user_agent"]["original"], "curl/8");
        assert_eq!(d["error"]["message"], "upstream refused");
        assert_eq!(d["lain"]["app"], "hello");
        assert_eq!(d["lain"]["proc"], "web");
        assert_eq!(d["lain"]["proxy"]["upstream"], "127.0.0.1:9000");
        assert_eq!(d["@timestamp"], "2024-05-01T10:00:00.000000000Z");
        // A line that is not JSON is still shipped as a message.
        let e = render(&meta, "id", &line(b"not json"), &opts, Utc::now());
        let d: Value = serde_json::from_slice(&e.body).unwrap();
        assert_eq!(d["message"], "not json");
    }

    #[test]
    fn levels_normalise() {
        assert_eq!(detect_level(b"[error] x"), Some("error".into()));
        assert_eq!(detect_level(b"Warning: x"), Some("warn".into()));
        assert_eq!(detect_level(b"information x"), None);
        assert_eq!(detect_level(b"nothing here"), None);
    }
}
