//! The access log: one JSON line per request, written by a dedicated thread so that a slow
//! disk never delays a request. When the writer falls behind, lines are dropped and counted.
//!
//! The request side only does `try_send` on a bounded channel. The writer never blocks in
//! `recv`: a blocked receiver would make the next `try_send` take the channel's waker lock to
//! wake it, so the writer polls the queue and sleeps briefly when it is empty.

use std::io::Write;
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError};
use std::time::Duration;

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
        let out: Box<dyn Write + Send> = match path {
            "" => return Ok(AccessLog::disabled(dropped)),
            "-" => Box::new(std::io::stdout()),
            p => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)?,
            ),
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

fn write_loop(rx: Receiver<AccessLine>, out: Box<dyn Write + Send>) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
    loop {
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
