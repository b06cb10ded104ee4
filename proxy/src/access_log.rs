//! The access log: one JSON line per request, written by a dedicated thread so that a slow
//! disk never delays a request. When the writer falls behind, lines are dropped and counted.
//!
//! A log file renamed or removed (logrotate without `copytruncate`) is noticed within a
//! second and opened anew at its path, as nginx does on `USR1`, so rotation needs no signal
//! and lines never go on into the rotated file for good.
//!
//! The request side only does `try_send` on a bounded channel. The writer never blocks in
//! `recv`: a blocked receiver would make the next `try_send` take the channel's waker lock to
//! wake it, so the writer polls the queue and sleeps briefly when it is empty.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError};
use std::time::{Duration, Instant};

use prometheus::IntCounter;
use serde::Serialize;

/// One access-log line.
#[derive(Debug, Serialize)]
pub struct AccessLine {
    /// RFC 3339 time the request arrived.
    pub time: String,
    /// The client address (the real client when a trusted proxy forwarded the request).
    pub client_ip: String,
    /// The request method.
    pub method: String,
    /// The Host header.
    pub host: String,
    /// The path and query as received.
    pub path: String,
    /// The status sent; 0 when none was.
    pub status: u16,
    /// Request body bytes read.
    pub bytes_in: usize,
    /// Response body bytes written.
    pub bytes_out: usize,
    /// Milliseconds from arrival to the end of the response.
    pub duration_ms: f64,
    /// The endpoint that answered, if any.
    pub upstream: Option<String>,
    /// Milliseconds the upstream took, if one was used.
    pub upstream_ms: Option<f64>,
    /// The route's app.
    pub app: Option<String>,
    /// The route's proc.
    pub proc: Option<String>,
    /// The route (`host/path`).
    pub route: Option<String>,
    /// The request id sent upstream.
    pub request_id: String,
    /// The User-Agent header.
    pub user_agent: String,
    /// Why the request failed, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The sending side of the access log.
#[derive(Debug, Clone)]
pub struct AccessLog {
    tx: Option<SyncSender<AccessLine>>,
    dropped: IntCounter,
}

impl AccessLog {
    /// An access log that writes nothing.
    pub fn disabled(dropped: IntCounter) -> AccessLog {
        AccessLog { tx: None, dropped }
    }

    /// Opens `path` (`-` is stdout, empty disables) and starts the writer thread.
    pub fn open(path: &str, buffer: usize, dropped: IntCounter) -> std::io::Result<AccessLog> {
        let out = match path {
            "" => return Ok(AccessLog::disabled(dropped)),
            "-" => Sink::Stdout,
            p => Sink::File(LogFile::open(PathBuf::from(p))?),
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(buffer.max(1));
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_loop(rx, out))?;
        Ok(AccessLog {
            tx: Some(tx),
            dropped,
        })
    }

    /// Whether lines are written anywhere; a disabled log needs none built.
    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Queues a line; never blocks.
    pub fn log(&self, line: AccessLine) {
        let Some(tx) = &self.tx else { return };
        match tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => self.dropped.inc(),
        }
    }
}

/// How long the writer sleeps when the queue is empty; the most a line waits to be written.
const IDLE_POLL: Duration = Duration::from_millis(20);

/// How often the writer checks that its file is still the one at the configured path.
const REOPEN_CHECK: Duration = Duration::from_secs(1);

/// Where lines go.
enum Sink {
    Stdout,
    File(LogFile),
}

/// An open log file and the identity of what it was opened as.
struct LogFile {
    path: PathBuf,
    file: std::fs::File,
    id: (u64, u64),
}

impl LogFile {
    fn open(path: PathBuf) -> std::io::Result<LogFile> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        let meta = file.metadata()?;
        Ok(LogFile {
            path,
            file,
            id: (meta.dev(), meta.ino()),
        })
    }

    /// Whether the path now names another file, or none.
    fn moved(&self) -> bool {
        std::fs::metadata(&self.path).map_or(true, |m| (m.dev(), m.ino()) != self.id)
    }
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Sink::Stdout => std::io::stdout().write(buf),
            Sink::File(f) => f.file.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Sink::Stdout => std::io::stdout().flush(),
            Sink::File(f) => f.file.flush(),
        }
    }
}

/// Opens the log file anew when it was rotated away. Lines written before go to the old
/// file (flushed first), as a rotating tool expects; if the new one cannot be created, the
/// old one is kept and the next check tries again.
fn reopen_if_moved(out: &mut std::io::BufWriter<Sink>, complained: &mut bool) {
    let Sink::File(f) = out.get_ref() else { return };
    if !f.moved() {
        return;
    }
    let path = f.path.clone();
    let _ = out.flush();
    match LogFile::open(path.clone()) {
        Ok(new) => {
            *out.get_mut() = Sink::File(new);
            *complained = false;
            tracing::info!(path = %path.display(), "access log reopened");
        }
        Err(e) => {
            if !*complained {
                tracing::warn!(path = %path.display(), error = %e, "cannot reopen the access log");
                *complained = true;
            }
        }
    }
}

fn write_loop(rx: Receiver<AccessLine>, out: Sink) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
    let mut checked = Instant::now();
    let mut complained = false;
    loop {
        if checked.elapsed() >= REOPEN_CHECK {
            reopen_if_moved(&mut out, &mut complained);
            checked = Instant::now();
        }
        let mut wrote = false;
        let disconnected = loop {
            match rx.try_recv() {
                Ok(line) => {
                    if serde_json::to_writer(&mut out, &line).is_ok() {
                        let _ = out.write_all(b"\n");
                    }
                    wrote = true;
                }
                Err(TryRecvError::Empty) => break false,
                Err(TryRecvError::Disconnected) => break true,
            }
        };
        // Flush whenever the queue runs dry, so lines appear promptly at low rates and are
        // batched at high rates.
        if wrote {
            let _ = out.flush();
        }
        if disconnected {
            return;
        }
        std::thread::sleep(IDLE_POLL);
    }
}
