//! The local file sink: NDJSON appended to one file, rotated by size, synced before a batch
//! is acknowledged. It is the default sink when neither Kafka nor Elasticsearch is set.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;

use crate::metrics::Metrics;
use crate::pipeline::BatchReceiver;

/// Settings of the file sink.
#[derive(Debug, Clone)]
pub struct FileSinkSettings {
    /// The output file; rotated copies get `.1`, `.2`, ...
    pub path: PathBuf,
    /// Rotate when the file reaches this size.
    pub max_bytes: u64,
    /// Rotated copies kept.
    pub max_files: u32,
    /// `fsync` before acknowledging.
    pub fsync: bool,
}

struct Out {
    s: FileSinkSettings,
    file: File,
    size: u64,
}

impl Out {
    fn open(s: FileSinkSettings) -> std::io::Result<Out> {
        if let Some(d) = s.path.parent() {
            std::fs::create_dir_all(d)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(&s.path)?;
        let size = file.metadata()?.len();
        Ok(Out { s, file, size })
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        let name = |i: u32| PathBuf::from(format!("{}.{i}", self.s.path.display()));
        for i in (1..self.s.max_files).rev() {
            let _ = std::fs::rename(name(i), name(i + 1));
        }
        if self.s.max_files == 0 {
            std::fs::remove_file(&self.s.path)?;
        } else {
            std::fs::rename(&self.s.path, name(1))?;
        }
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.s.path)?;
        self.size = 0;
        Ok(())
    }
}

/// Runs the file sink until its channel closes.
pub async fn run(settings: FileSinkSettings, mut rx: BatchReceiver, metrics: Metrics) {
    let mut out: Option<Out> = None;
    let mut attempt = 0;
    while let Some(batch) = rx.recv().await {
        loop {
            let result = (|| -> std::io::Result<u64> {
                if out.is_none() {
                    out = Some(Out::open(settings.clone())?);
                }
                let Some(o) = out.as_mut() else {
                    return Ok(0);
                };
                let mut buf = Vec::with_capacity(batch.events.len() * 256);
                for e in batch.events.iter() {
                    buf.extend_from_slice(&e.body);
                    buf.push(b'\n');
                }
                if o.size > 0 && o.size + buf.len() as u64 > o.s.max_bytes {
                    o.rotate()?;
                }
                o.file.write_all(&buf)?;
                if o.s.fsync {
                    o.file.sync_data()?;
                }
                o.size += buf.len() as u64;
                Ok(buf.len() as u64)
            })();
            match result {
                Ok(bytes) => {
                    attempt = 0;
                    metrics
                        .lines_out
                        .with_label_values(&["file"])
                        .inc_by(batch.events.len() as u64);
                    metrics.bytes_out.with_label_values(&["file"]).inc_by(bytes);
                    batch.ack.ack();
                    break;
                }
                Err(e) => {
                    // A write that failed part-way may have left a partial line; the retry
                    // writes the whole batch again (at least once), and reopening starts a
                    // fresh append position.
                    tracing::warn!(path = %settings.path.display(), error = %e, "file sink write failed; retrying");
                    metrics.retries.with_label_values(&["file"]).inc();
                    out = None;
                    super::backoff(attempt).await;
                    attempt += 1;
                }
            }
        }
    }
    if let Some(o) = out {
        let _ = o.file.sync_all();
    }
}
