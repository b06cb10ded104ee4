//! The file source: tails plain files and globs, follows rename and copytruncate rotation,
//! and resumes from checkpoints.
//!
//! A scanner expands the globs every `scan_interval_ms` and starts one reader per file
//! (device, inode) it has not open. A reader reads to the end, then polls; it keeps its file
//! descriptor across a rename, so lines written to the old file before the writer reopened
//! are still read; it stops once its file is no longer matched by any glob and has been idle
//! for `rotate_wait_ms`. A file that shrinks or whose first bytes change was truncated: the
//! reader starts it over from offset 0 under a new checkpoint entry.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use lain_common::Shutdown;
use regex::bytes::Regex;
use tokio::task::JoinHandle;

use crate::checkpoint::Checkpoints;
use crate::event::{Event, Joiner, LineSplitter, Meta, Processing, RawLine, render};
use crate::metrics::Metrics;
use crate::pipeline::Dispatcher;

/// Bytes read from a file at once.
const CHUNK: usize = 256 * 1024;

/// Settings of one file source.
#[derive(Debug, Clone)]
pub struct FileSourceSettings {
    /// Paths; the last component may contain `*` and `?`.
    pub paths: Vec<String>,
    /// Metadata every event of this source carries (`path` is set per file).
    pub meta: Meta,
    /// Pattern that starts a new multiline event.
    pub multiline_start: Option<Regex>,
    /// A pending multiline event is emitted after this long without a continuation.
    pub multiline_timeout: Duration,
    /// Longer lines are cut and tagged `truncated`.
    pub max_line_bytes: usize,
    /// Processing options.
    pub processing: Processing,
    /// Files never seen before that are there at the first scan start at their end instead
    /// of their beginning. Files that appear later (a rotation's new file) are read whole:
    /// their first lines were written after this source started.
    pub read_from_end: bool,
    /// Events per batch at most.
    pub batch_max_events: usize,
    /// Rendered bytes per batch at most.
    pub batch_max_bytes: usize,
    /// Sleep at end of file.
    pub poll_interval: Duration,
    /// Glob expansion interval.
    pub scan_interval: Duration,
    /// How long a file no longer matched is still read after its last growth.
    pub rotate_wait: Duration,
    /// How lines are encoded.
    pub format: Format,
    /// Stop once no file is matched or read for `rotate_wait` (a removed container).
    pub exit_when_idle: bool,
}

/// How the lines of a file are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One log line per line.
    Plain,
    /// Docker's json-file driver: `{"log":..,"stream":..,"time":..}` records, long lines
    /// split into partial records of 16 KiB.
    DockerJson,
}

/// Joins Docker's partial records and unwraps them into lines.
#[derive(Debug, Default)]
pub struct DockerRecords {
    /// The unfinished line of each stream. Docker copies stdout and stderr separately, so a
    /// record of one stream can come between the pieces of a long line of the other; pieces
    /// are only ever joined within their own stream.
    partial: Vec<RawLine>,
    max_bytes: usize,
}

#[derive(serde::Deserialize)]
struct DockerRecord {
    log: String,
    #[serde(default)]
    stream: Option<String>,
    #[serde(default)]
    time: Option<String>,
}

impl DockerRecords {
    /// Lines are cut at `max_bytes`.
    pub fn new(max_bytes: usize) -> DockerRecords {
        DockerRecords {
            partial: Vec::new(),
            max_bytes,
        }
    }

    /// Takes one record; returns a line when one is complete. A record that is not valid
    /// JSON is passed through as a line of its own, so nothing is lost.
    pub fn push(&mut self, rec: RawLine) -> Option<RawLine> {
        let Ok(r) = serde_json::from_slice::<DockerRecord>(&rec.bytes) else {
            return Some(rec);
        };
        let complete = r.log.ends_with('\n');
        let mut text = r.log.into_bytes();
        if complete {
            text.pop();
            if text.last() == Some(&b'\r') {
                text.pop();
            }
        }
        let time = r
            .time
            .as_deref()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&chrono::Utc));
        let pending = self
            .partial
            .iter()
            .position(|p| p.stream == r.stream)
            .map(|i| self.partial.swap_remove(i));
        let line = match pending {
            Some(mut p) => {
                let room = self.max_bytes.saturating_sub(p.bytes.len());
                if text.len() > room {
                    p.truncated = true;
                }
                p.bytes.extend_from_slice(&text[..text.len().min(room)]);
                p.end = rec.end;
                p
            }
            None => {
                let truncated = text.len() > self.max_bytes;
                text.truncate(self.max_bytes);
                RawLine {
                    bytes: text,
                    start: rec.start,
                    end: rec.end,
                    truncated,
                    lines: 1,
                    time,
                    stream: r.stream,
                }
            }
        };
        if complete {
            Some(line)
        } else {
            self.partial.push(line);
            None
        }
    }

    /// Where the earliest unfinished line starts in the file.
    pub fn pending_start(&self) -> Option<u64> {
        self.partial.iter().map(|p| p.start).min()
    }

    /// An unfinished line, at shutdown or when the container is gone; call until `None`.
    pub fn take(&mut self) -> Option<RawLine> {
        self.partial.pop()
    }
}

/// Whether `name` matches `pattern` with `*` (any run) and `?` (one character).
pub fn wildcard(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ni));
            pi += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// Expands paths whose last component may hold wildcards; returns regular files.
pub fn expand(patterns: &[String]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for pat in patterns {
        let path = Path::new(pat);
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !name.contains(['*', '?']) {
            if path.is_file() {
                out.push(path.to_path_buf());
            }
            continue;
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        let Ok(rd) = std::fs::read_dir(dir) else {
            continue;
        };
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if wildcard(&name, &n) && e.path().is_file() {
                out.push(e.path());
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

struct ReaderHandle {
    matched: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

/// Runs one file source until shutdown; returns once every reader has stopped.
pub async fn run(
    settings: FileSourceSettings,
    dispatcher: Dispatcher,
    checkpoints: Checkpoints,
    metrics: Metrics,
    shutdown: Shutdown,
) {
    let settings = Arc::new(settings);
    let mut readers: HashMap<(u64, u64), ReaderHandle> = HashMap::new();
    let mut idle_since = Instant::now();
    let mut first_scan = true;
    loop {
        let mut seen = HashMap::new();
        for p in expand(&settings.paths) {
            if let Ok(m) = std::fs::metadata(&p) {
                seen.entry((m.dev(), m.ino())).or_insert(p);
            }
        }
        readers.retain(|_, r| !r.task.is_finished());
        for (key, r) in &readers {
            r.matched.store(seen.contains_key(key), Ordering::Release);
        }
        for (key, path) in seen {
            if readers.contains_key(&key) {
                continue;
            }
            let matched = Arc::new(AtomicBool::new(true));
            let reader = Reader {
                settings: settings.clone(),
                path,
                dispatcher: dispatcher.clone(),
                checkpoints: checkpoints.clone(),
                metrics: metrics.clone(),
                matched: matched.clone(),
                shutdown: shutdown.clone(),
                at_end: settings.read_from_end && first_scan,
            };
            let task = tokio::spawn(reader.run());
            readers.insert(key, ReaderHandle { matched, task });
        }
        first_scan = false;
        if !readers.is_empty() {
            idle_since = Instant::now();
        } else if settings.exit_when_idle && idle_since.elapsed() >= settings.rotate_wait {
            break;
        }
        tokio::select! {
            _ = shutdown.wait() => break,
            _ = tokio::time::sleep(settings.scan_interval) => {}
        }
    }
    for (_, r) in readers {
        let _ = r.task.await;
    }
}

struct Reader {
    settings: Arc<FileSourceSettings>,
    path: PathBuf,
    dispatcher: Dispatcher,
    checkpoints: Checkpoints,
    metrics: Metrics,
    matched: Arc<AtomicBool>,
    shutdown: Shutdown,
    /// A file never seen before starts at its end (`read_from_end`, first scan only).
    at_end: bool,
}

/// The per-file reading state that restarts when the file is truncated.
struct Cursor {
    id: u64,
    splitter: LineSplitter,
    joiner: Joiner,
    docker: DockerRecords,
    identity: String,
}

impl Cursor {
    /// Hands over, as lines, everything still held back for content that will not go on:
    /// the line being joined, partial Docker records, and with `unfinished` a last line
    /// without its newline.
    fn release_held(&mut self, unfinished: bool, out: &mut Vec<RawLine>) {
        if unfinished && let Some(l) = self.splitter.finish() {
            self.joiner.push(l, out);
        }
        self.joiner.flush(true, out);
        while let Some(l) = self.docker.take() {
            out.push(l);
        }
    }
}

impl Reader {
    fn cursor(&self, file: &mut File, at_end: bool) -> std::io::Result<Cursor> {
        let m = file.metadata()?;
        let path = self.path.display().to_string();
        let s = &self.settings;
        let docker_max = s.max_line_bytes;
        let opened = self
            .checkpoints
            .open(&s.meta.source, &path, file, &m, at_end)?;
        file.seek(SeekFrom::Start(opened.offset))?;
        Ok(Cursor {
            id: opened.id,
            splitter: LineSplitter::new(self.splitter_max(), opened.offset),
            joiner: Joiner::new(
                s.multiline_start.clone(),
                s.max_line_bytes,
                s.multiline_timeout,
            ),
            docker: DockerRecords::new(docker_max),
            identity: opened.identity,
        })
    }

    /// Docker records carry up to 16 KiB of line plus JSON escaping; they are cut only
    /// after unwrapping.
    fn splitter_max(&self) -> usize {
        match self.settings.format {
            Format::Plain => self.settings.max_line_bytes,
            Format::DockerJson => self.settings.max_line_bytes.max(16 * 1024) * 7,
        }
    }

    async fn run(self) {
        self.metrics.files_open.inc();
        let result = self.read().await;
        self.metrics.files_open.dec();
        if let Err(e) = result {
            tracing::warn!(path = %self.path.display(), error = %e, "stopped reading file");
        }
    }

    async fn read(&self) -> std::io::Result<()> {
        let mut file = File::open(&self.path)?;
        let mut cur = self.cursor(&mut file, self.at_end)?;
        let result = self.read_with(&mut file, &mut cur).await;
        // Closed however reading ended: an entry left open after an error could not be
        // resumed by the next reader of the file, which would start it over.
        self.checkpoints.close(cur.id);
        result
    }

    async fn read_with(&self, file: &mut File, cur: &mut Cursor) -> std::io::Result<()> {
        let s = self.settings.clone();
        let mut meta = s.meta.clone();
        meta.path = Some(self.path.display().to_string());
        let meta = Arc::new(meta);
        let source = s.meta.source.as_str();
        let lines_in = self.metrics.lines_in.with_label_values(&[source]);
        let bytes_in = self.metrics.bytes_in.with_label_values(&[source]);
        let mut buf = vec![0u8; CHUNK];
        let mut raw = Vec::new();
        let mut done = Vec::new();
        let mut batch: Vec<Event> = Vec::new();
        let mut batch_bytes = 0;
        let mut batch_end = 0;
        let mut idle_since = Instant::now();
        loop {
            let stopping = self.shutdown.is_triggered();
            let mut n = if stopping { 0 } else { file.read(&mut buf)? };
            // Checking the first bytes after each read, before using what was read, catches a
            // truncate-and-rewrite that happened before the read: the chunk then belongs to
            // the new content at a wrong offset and is discarded.
            if n > 0
                && !self
                    .checkpoints
                    .refresh(cur.id, file, cur.splitter.position() + n as u64)?
            {
                n = 0;
            }
            let now = chrono::Utc::now();
            if n > 0 {
                idle_since = Instant::now();
                bytes_in.inc_by(n as u64);
                cur.splitter.feed(&buf[..n], &mut raw);
                lines_in.inc_by(raw.len() as u64);
                for l in raw.drain(..) {
                    match s.format {
                        Format::Plain => cur.joiner.push(l, &mut done),
                        Format::DockerJson => done.extend(cur.docker.push(l)),
                    }
                }
            } else {
                cur.joiner.flush(stopping, &mut done);
                if stopping {
                    while let Some(l) = cur.docker.take() {
                        done.push(l);
                    }
                }
            }
            for l in done.drain(..) {
                let l: RawLine = l;
                // The checkpoint never passes the start of a line still being joined, so a
                // restart reads that line again whole.
                batch_end = match cur.docker.pending_start() {
                    Some(start) => l.end.min(start).max(batch_end),
                    None => l.end,
                };
                let e = render(&meta, &cur.identity, &l, &s.processing, now);
                batch_bytes += e.body.len();
                batch.push(e);
                if batch.len() >= s.batch_max_events || batch_bytes >= s.batch_max_bytes {
                    self.send(cur.id, &mut batch, batch_end).await;
                    batch_bytes = 0;
                }
            }
            if n > 0 {
                continue;
            }
            if !batch.is_empty() {
                self.send(cur.id, &mut batch, batch_end).await;
                batch_bytes = 0;
            }
            if stopping {
                break;
            }
            let size = file.metadata()?.len();
            let intact =
                size >= cur.splitter.position() && self.checkpoints.refresh(cur.id, file, size)?;
            if !intact {
                tracing::info!(path = %self.path.display(), "file truncated; reading it from the start");
                // What the old content still holds back (a line being joined, a partial
                // Docker record) is sent under the old entry first: the new content cannot
                // bring it back, and the old entry's checkpoint stops before it.
                cur.release_held(false, &mut done);
                for l in done.drain(..) {
                    batch_end = batch_end.max(l.end);
                    batch.push(render(&meta, &cur.identity, &l, &s.processing, now));
                }
                if !batch.is_empty() {
                    self.send(cur.id, &mut batch, batch_end).await;
                    batch_bytes = 0;
                }
                self.checkpoints.close(cur.id);
                *cur = self.cursor(file, false)?;
                if cur.splitter.position() > 0 {
                    // The checkpoint store matched the truncated file to a copy; a truncated
                    // file's new content always starts at 0.
                    file.seek(SeekFrom::Start(0))?;
                    cur.splitter = LineSplitter::new(self.splitter_max(), 0);
                }
                // Offsets of the old content mean nothing in the new one.
                batch_end = cur.splitter.position();
                continue;
            }
            if size > cur.splitter.position() {
                // Grew since the read that returned 0; read again at once.
                continue;
            }
            if !self.matched.load(Ordering::Acquire)
                && idle_since.elapsed() >= s.rotate_wait
                && !cur.joiner.has_pending()
            {
                // Nothing more will be written here. A last line without its newline, and a
                // partial Docker record whose continuation never came (the container is
                // gone), are still lines.
                cur.release_held(matches!(s.format, Format::Plain), &mut done);
                for l in done.drain(..) {
                    batch_end = batch_end.max(l.end);
                    batch.push(render(&meta, &cur.identity, &l, &s.processing, now));
                }
                if !batch.is_empty() {
                    self.send(cur.id, &mut batch, batch_end).await;
                }
                break;
            }
            tokio::select! {
                _ = self.shutdown.wait() => {}
                _ = tokio::time::sleep(s.poll_interval) => {}
            }
        }
        Ok(())
    }

    async fn send(&self, id: u64, batch: &mut Vec<Event>, end: u64) {
        let events = std::mem::take(batch);
        match self.dispatcher.send(events).await {
            Some(ack) => self.checkpoints.register(id, ack, end),
            // A sink's stage is gone, which is meant to happen only at shutdown. Reading on
            // would drop every later batch while the checkpoint stays behind; the lines are
            // read again after a restart instead.
            None => self.shutdown.wait().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(json: &str, start: u64) -> RawLine {
        RawLine {
            bytes: json.as_bytes().to_vec(),
            start,
            end: start + json.len() as u64 + 1,
            truncated: false,
            lines: 1,
            time: None,
            stream: None,
        }
    }

    #[test]
    fn docker_partial_records_are_joined() {
        let mut d = DockerRecords::new(100);
        let a = r#"{"log":"part one ","stream":"stdout","time":"2024-05-01T10:00:00.123456789Z"}"#;
        let b = r#"{"log":"part two\n","stream":"stdout","time":"2024-05-01T10:00:00.2Z"}"#;
        assert!(d.push(rec(a, 0)).is_none());
        let l = d.push(rec(b, 100)).unwrap();
        assert_eq!(l.bytes, b"part one part two");
        assert_eq!(l.stream.as_deref(), Some("stdout"));
        assert_eq!((l.start, l.end), (0, 100 + b.len() as u64 + 1));
        assert_eq!(l.time.unwrap().timestamp_subsec_nanos(), 123_456_789);
        let junk = d.push(rec("not json", 300)).unwrap();
        assert_eq!(junk.bytes, b"not json");
        let mut small = DockerRecords::new(4);
        let l = small
            .push(rec(r#"{"log":"abcdefgh\n","stream":"stderr"}"#, 0))
            .unwrap();
        assert_eq!(l.bytes, b"abcd");
        assert!(l.truncated);
    }

    #[test]
    fn partial_records_join_within_their_own_stream() {
        let mut d = DockerRecords::new(100);
        let a = r#"{"log":"long ","stream":"stdout"}"#;
        let b = r#"{"log":"oops\n","stream":"stderr"}"#;
        let c = r#"{"log":"line\n","stream":"stdout"}"#;
        assert!(d.push(rec(a, 0)).is_none());
        assert_eq!(d.pending_start(), Some(0));
        let err = d.push(rec(b, 50)).unwrap();
        assert_eq!(
            (err.bytes.as_slice(), err.stream.as_deref()),
            (&b"oops"[..], Some("stderr"))
        );
        let out = d.push(rec(c, 100)).unwrap();
        assert_eq!(
            (out.bytes.as_slice(), out.stream.as_deref()),
            (&b"long line"[..], Some("stdout"))
        );
        assert_eq!(d.pending_start(), None);
        assert!(d.take().is_none());
    }

    #[test]
    fn wildcards_match() {
        assert!(wildcard("app.log*", "app.log"));
        assert!(wildcard("app.log*", "app.log.1"));
        assert!(wildcard("*.log", "x.log"));
        assert!(wildcard("a?c", "abc"));
        assert!(!wildcard("*.log", "x.log.1"));
        assert!(!wildcard("a?c", "ac"));
        assert!(wildcard("*a*b", "xxaxxb"));
    }

    #[test]
    fn expand_lists_matching_regular_files() {
        let d = tempfile::tempdir().unwrap();
        for n in ["a.log", "a.log.1", "b.txt"] {
            std::fs::write(d.path().join(n), "x\n").unwrap();
        }
        std::fs::create_dir(d.path().join("c.log")).unwrap();
        let got = expand(&[format!("{}/*.log*", d.path().display())]);
        let names: Vec<_> = got
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["a.log", "a.log.1"]);
    }
}
