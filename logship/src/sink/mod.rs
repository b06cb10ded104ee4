//! Sinks: each runs as one task reading batches from its channel and acknowledging each
//! batch once every event of it is durably delivered (or written to its dead-letter file).

pub mod elasticsearch;
pub mod file;
pub mod kafka;

use std::io::Write;
use std::path::{Path, PathBuf};

/// A dead-letter file: events a sink refused for good, one JSON line each with the reason.
#[derive(Debug)]
pub struct DeadLetters {
    path: PathBuf,
}

impl DeadLetters {
    /// Dead letters appended to `path`.
    pub fn new(path: &Path) -> DeadLetters {
        DeadLetters {
            path: path.to_path_buf(),
        }
    }

    /// Appends one event with the reason and syncs the file.
    pub fn write(&self, reason: &str, body: &[u8]) -> std::io::Result<()> {
        let event: serde_json::Value = serde_json::from_slice(body)
            .unwrap_or_else(|_| String::from_utf8_lossy(body).into_owned().into());
        let line = serde_json::json!({
            "@timestamp": chrono::Utc::now().to_rfc3339(),
            "reason": reason,
            "event": event,
        });
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        let mut buf = serde_json::to_vec(&line).unwrap_or_default();
        buf.push(b'\n');
        f.write_all(&buf)?;
        f.sync_data()
    }
}

/// Sleeps for an exponential backoff step: 100 ms doubling up to 10 s.
pub async fn backoff(attempt: u32) {
    let ms = 100u64.saturating_mul(1 << attempt.min(7)).min(10_000);
    tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
}
