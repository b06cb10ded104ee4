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
    warned: std::sync::Mutex<Limiter>,
}

/// How often a sink says it is writing dead letters; the count says how many there were.
const WARN_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Lets one warning through per [`WARN_EVERY`] and counts the ones held back.
#[derive(Debug, Default)]
pub struct Limiter {
    last: Option<std::time::Instant>,
    held: u64,
}

impl Limiter {
    /// Counts one occurrence at `now`; returns how many occurred since the last warning
    /// (this one included) when a warning is due.
    pub fn hit(&mut self, now: std::time::Instant) -> Option<u64> {
        self.held += 1;
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < WARN_EVERY)
        {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.held))
    }
}

impl DeadLetters {
    /// Dead letters appended to `path`.
    pub fn new(path: &Path) -> DeadLetters {
        DeadLetters {
            path: path.to_path_buf(),
            warned: std::sync::Mutex::new(Limiter::default()),
        }
    }

    /// Warns that `sink` refused an event for good, with the reason and where it went; at
    /// most once per 10 s, counting the events since the last warning. The metric counts
    /// every one, but a refusal (a mapping conflict, a record too large) is usually a
    /// configuration problem someone has to see in the log.
    pub fn warn(&self, sink: &str, reason: &str) {
        let due = self
            .warned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .hit(std::time::Instant::now());
        if let Some(events) = due {
            tracing::warn!(
                sink,
                events,
                reason,
                file = %self.path.display(),
                "events refused for good were written to the dead-letter file"
            );
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn dead_letter_warnings_are_limited_and_counted() {
        let mut l = Limiter::default();
        let t = Instant::now();
        assert_eq!(l.hit(t), Some(1), "the first one is reported at once");
        assert_eq!(l.hit(t + Duration::from_secs(1)), None);
        assert_eq!(l.hit(t + Duration::from_secs(9)), None);
        assert_eq!(
            l.hit(t + Duration::from_secs(10)),
            Some(3),
            "the next warning counts the two held back and itself"
        );
        assert_eq!(l.hit(t + Duration::from_secs(11)), None);
        assert_eq!(l.hit(t + Duration::from_secs(25)), Some(2));
    }
}
