//! File checkpoints: which file (device, inode, fingerprint of its first bytes) has been
//! delivered up to which byte offset, advanced only past batches every sink acknowledged,
//! and written atomically (temp file, fsync, rename, fsync of the directory).
//!
//! A file's fingerprint is the SHA-256 of its first bytes, up to [`FP_MAX`]. It grows with a
//! young file and is stable once the file has `FP_MAX` bytes. Identity is (device, inode,
//! fingerprint) so that a reused inode is recognised as a new file; a file that appears
//! under a new inode with a full-length fingerprint equal to a known one is a copy (the
//! copy half of copytruncate rotation) and resumes from that checkpoint, so lines already
//! acknowledged are not read again.
//!
//! Each entry also keeps the identity its events' ids are derived from (with the line's
//! offset), so that a sink that deduplicates by id (Elasticsearch `create`) drops a line sent
//! twice but never a line of another file. It is chosen once, when the entry is created, and
//! kept through restarts and renames: the full fingerprint for a file that already has
//! `FP_MAX` bytes, the original's identity for a copy, and for a younger file its device,
//! inode and the time it was first seen. Device and inode alone are not enough: a file
//! deleted and a new one created get the same inode, and the new file's lines would take
//! the old file's ids and be dropped as already indexed.

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use prometheus::IntGauge;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Bytes of a file's start its fingerprint covers once the file is that long.
pub const FP_MAX: u64 = 1024;

/// The most checkpoint entries kept; the oldest closed ones go first.
const MAX_ENTRIES: usize = 10_000;

/// Closed entries not updated for this long are forgotten.
const ENTRY_TTL_SECS: i64 = 7 * 24 * 3600;

/// Errors of the checkpoint store.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// Reading or writing the checkpoint file failed.
    #[error("checkpoint file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The checkpoint file is not valid JSON of the expected shape.
    #[error("checkpoint file {path} is corrupt: {source}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: serde_json::Error,
    },
}

/// The acknowledgement state of one batch: how many sinks still have to confirm it.
#[derive(Debug)]
pub struct Ack {
    remaining: AtomicUsize,
    events: i64,
    buffer: IntGauge,
}

impl Ack {
    /// An ack waiting for `sinks` confirmations of a batch of `events` events.
    pub fn new(sinks: usize, events: usize, buffer: IntGauge) -> Arc<Ack> {
        let events = i64::try_from(events).unwrap_or(i64::MAX);
        buffer.add(events);
        Arc::new(Ack {
            remaining: AtomicUsize::new(sinks),
            events,
            buffer,
        })
    }

    /// One sink confirms the whole batch is durably delivered.
    pub fn ack(&self) {
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.buffer.sub(self.events);
        }
    }

    /// Every sink confirmed.
    pub fn is_done(&self) -> bool {
        self.remaining.load(Ordering::Acquire) == 0
    }
}

/// Fingerprint of the first `len` bytes of `file`; `None` when it has fewer bytes.
pub fn fingerprint(file: &File, len: u64) -> std::io::Result<Option<String>> {
    fingerprint_at(file, 0, len)
}

/// Fingerprint of the `len` bytes from `from`; `None` if the file ends before them.
fn fingerprint_at(file: &File, from: u64, len: u64) -> std::io::Result<Option<String>> {
    let mut buf = vec![0u8; usize::try_from(len).unwrap_or(0)];
    let mut got = 0;
    while got < buf.len() {
        let n = file.read_at(&mut buf[got..], from + got as u64)?;
        if n == 0 {
            return Ok(None);
        }
        got += n;
    }
    Ok(Some(hex::encode(&Sha256::digest(&buf)[..16])))
}

/// One file's checkpoint as stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Stored {
    /// Device number.
    pub dev: u64,
    /// Inode number.
    pub ino: u64,
    /// Fingerprint of the first `fp_len` bytes.
    pub fp: String,
    /// Bytes the fingerprint covers.
    pub fp_len: u64,
    /// Offset up to which every line was acknowledged by every sink.
    pub offset: u64,
    /// The path it was last read at, for people and for `log.file.path`.
    pub path: String,
    /// Unix seconds of the last change.
    pub updated: i64,
    /// What the ids of this file's events are derived from. Empty in entries written
    /// before it existed; such an entry gets one when the file is next opened.
    #[serde(default)]
    pub identity: String,
    /// Fingerprint of the [`TAIL_BYTES`] before `tail_at` (an offset this entry reached
    /// past the first [`FP_MAX`] bytes). A new file taken for a copy of this one must hold
    /// the same bytes there too, not only the same first bytes. Empty until taken.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tail: String,
    /// Where `tail` ends.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub tail_at: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Bytes the `tail` fingerprint of an entry covers.
const TAIL_BYTES: u64 = 256;

/// Whether `file` holds, before `tail_at`, the bytes the entry `e` held there.
fn tail_matches(file: &File, e: &Stored) -> std::io::Result<bool> {
    if e.tail.is_empty() || e.tail_at < TAIL_BYTES {
        // Taken before tails existed, or not past the first bytes: the head decides.
        return Ok(true);
    }
    Ok(fingerprint_at(file, e.tail_at - TAIL_BYTES, TAIL_BYTES)?.as_deref() == Some(&e.tail))
}

#[derive(Debug)]
struct Entry {
    stored: Stored,
    source: String,
    open: bool,
    size: u64,
    pending: VecDeque<(Arc<Ack>, u64)>,
}

#[derive(Debug, Default)]
struct Inner {
    entries: BTreeMap<u64, Entry>,
    next_id: u64,
    dirty: bool,
}

/// The checkpoint store, shared by the file readers and the flusher.
#[derive(Debug, Clone)]
pub struct Checkpoints {
    inner: Arc<Mutex<Inner>>,
    path: PathBuf,
}

/// Where a newly opened file starts reading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    /// The entry id to register batches under.
    pub id: u64,
    /// The offset to read from.
    pub offset: u64,
    /// What the ids of the file's events are derived from.
    pub identity: String,
}

fn now_secs() -> i64 {
    chrono::Utc::now().timestamp()
}

/// The identity of a file too young to have a full fingerprint: its device and inode, and
/// when it was first seen, which tells apart the files that get the same inode in turn.
fn young_identity(dev: u64, ino: u64) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{dev}:{ino}:{nanos}")
}

impl Checkpoints {
    /// Loads the store from `path`; a missing file is an empty store.
    pub fn load(path: &Path) -> Result<Checkpoints, CheckpointError> {
        let mut inner = Inner::default();
        match std::fs::read(path) {
            Ok(bytes) => {
                let stored: Vec<Stored> =
                    serde_json::from_slice(&bytes).map_err(|source| CheckpointError::Corrupt {
                        path: path.to_path_buf(),
                        source,
                    })?;
                for s in stored {
                    let id = inner.next_id;
                    inner.next_id += 1;
                    inner.entries.insert(
                        id,
                        Entry {
                            stored: s,
                            source: String::new(),
                            open: false,
                            size: 0,
                            pending: VecDeque::new(),
                        },
                    );
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(CheckpointError::Io {
                    path: path.to_path_buf(),
                    source,
                });
            }
        }
        Ok(Checkpoints {
            inner: Arc::new(Mutex::new(inner)),
            path: path.to_path_buf(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the map half-updated in a way that
        // loses data (every update is one assignment), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens a checkpoint entry for a file. `at_end`: a file never seen before starts at
    /// its current size instead of its beginning.
    pub fn open(
        &self,
        source: &str,
        path: &str,
        file: &File,
        meta: &std::fs::Metadata,
        at_end: bool,
    ) -> std::io::Result<Opened> {
        use std::os::unix::fs::MetadataExt;
        let (dev, ino, size) = (meta.dev(), meta.ino(), meta.len());
        let mut inner = self.lock();
        // The same file seen before: same inode and its fingerprint still matches.
        let mut resume = None;
        for (id, e) in &inner.entries {
            if e.open || e.stored.dev != dev || e.stored.ino != ino {
                continue;
            }
            if fingerprint(file, e.stored.fp_len)?.as_deref() == Some(e.stored.fp.as_str()) {
                resume = Some(*id);
                break;
            }
        }
        if let Some(id) = resume {
            // An entry written before identities were kept gets one now.
            let missing = inner
                .entries
                .get(&id)
                .is_some_and(|e| e.stored.identity.is_empty());
            let fresh = if missing {
                Some(match fingerprint(file, FP_MAX)? {
                    Some(full) => full,
                    None => young_identity(dev, ino),
                })
            } else {
                None
            };
            if let Some(e) = inner.entries.get_mut(&id) {
                e.open = true;
                e.source = source.to_string();
                e.stored.path = path.to_string();
                e.size = size;
                if e.stored.offset > size {
                    // Shorter than what was delivered: truncated while nobody watched.
                    e.stored.offset = 0;
                }
                if let Some(identity) = fresh {
                    e.stored.identity = identity;
                }
                let opened = Opened {
                    id,
                    offset: e.stored.offset,
                    identity: e.stored.identity.clone(),
                };
                inner.dirty |= missing;
                return Ok(opened);
            }
        }
        // A copy of a known file: the full fingerprint matches, and so do the bytes before
        // where the original was last read to. It continues the original's offset and ids,
        // so lines the original already delivered are recognised as such.
        let full = fingerprint(file, FP_MAX)?;
        let mut offset = if at_end { size } else { 0 };
        // Any other new file has an identity of its own, even one that begins with the same
        // bytes as another (a fixed banner): a shared identity would give the two files the
        // same event ids, and Elasticsearch would drop the second's lines as indexed.
        let mut identity = young_identity(dev, ino);
        let mut tail = (String::new(), 0);
        if let Some(full) = &full {
            let mut best: Option<&Stored> = None;
            for e in inner.entries.values() {
                let s = &e.stored;
                if s.fp_len == FP_MAX
                    && &s.fp == full
                    && s.offset <= size
                    && best.is_none_or(|b| s.offset > b.offset)
                    && tail_matches(file, s)?
                {
                    best = Some(s);
                }
            }
            if let Some(s) = best {
                offset = s.offset;
                // It holds the same bytes there, so a copy of the copy is checked the same.
                tail = (s.tail.clone(), s.tail_at);
                if !s.identity.is_empty() {
                    identity = s.identity.clone();
                }
            }
        }
        let fp_len = size.min(FP_MAX);
        let fp = match &full {
            Some(f) => f.clone(),
            None => fingerprint(file, fp_len)?.unwrap_or_default(),
        };
        let id = inner.next_id;
        inner.next_id += 1;
        inner.entries.insert(
            id,
            Entry {
                stored: Stored {
                    dev,
                    ino,
                    fp,
                    fp_len,
                    offset,
                    path: path.to_string(),
                    updated: now_secs(),
                    identity: identity.clone(),
                    tail: tail.0,
                    tail_at: tail.1,
                },
                source: source.to_string(),
                open: true,
                size,
                pending: VecDeque::new(),
            },
        );
        inner.dirty = true;
        Ok(Opened {
            id,
            offset,
            identity,
        })
    }

    /// Re-checks a growing file's fingerprint. Returns `false` when the file no longer starts
    /// with the bytes it started with (it was truncated or rewritten).
    pub fn refresh(&self, id: u64, file: &File, size: u64) -> std::io::Result<bool> {
        let (fp, fp_len, offset, tail_at) = {
            let inner = self.lock();
            let Some(e) = inner.entries.get(&id) else {
                return Ok(true);
            };
            let s = &e.stored;
            (s.fp.clone(), s.fp_len, s.offset, s.tail_at)
        };
        if fingerprint(file, fp_len)?.as_deref() != Some(fp.as_str()) {
            return Ok(false);
        }
        let mut update = None;
        if fp_len < FP_MAX && size > fp_len {
            let len = size.min(FP_MAX);
            update = fingerprint(file, len)?.map(|f| (f, len));
        }
        // The bytes before the checkpoint, taken here from the reader's own descriptor
        // once the checkpoint has moved (see `Stored::tail`).
        let mut tail = None;
        if offset > FP_MAX && offset != tail_at && offset <= size {
            tail = fingerprint_at(file, offset - TAIL_BYTES, TAIL_BYTES)?.map(|t| (t, offset));
        }
        let mut inner = self.lock();
        let changed = update.is_some() || tail.is_some();
        if let Some(e) = inner.entries.get_mut(&id) {
            e.size = size;
            if let Some((f, len)) = update {
                e.stored.fp = f;
                e.stored.fp_len = len;
            }
            if let Some((t, at)) = tail {
                e.stored.tail = t;
                e.stored.tail_at = at;
            }
            inner.dirty |= changed;
        }
        Ok(true)
    }

    /// Records a batch whose lines end at `end`, acknowledged through `ack`.
    pub fn register(&self, id: u64, ack: Arc<Ack>, end: u64) {
        if let Some(e) = self.lock().entries.get_mut(&id) {
            e.pending.push_back((ack, end));
        }
    }

    /// The reader stopped reading this file; acknowledgements may still arrive.
    pub fn close(&self, id: u64) {
        if let Some(e) = self.lock().entries.get_mut(&id) {
            e.open = false;
        }
    }

    /// Moves offsets past acknowledged batches, in order. Returns whether any moved.
    pub fn advance(&self) -> bool {
        let mut inner = self.lock();
        let mut moved = false;
        let now = now_secs();
        for e in inner.entries.values_mut() {
            while e.pending.front().is_some_and(|(a, _)| a.is_done()) {
                if let Some((_, end)) = e.pending.pop_front() {
                    e.stored.offset = end;
                    e.stored.updated = now;
                    moved = true;
                }
            }
        }
        inner.dirty |= moved;
        moved
    }

    /// Unacknowledged bytes per source, for the lag gauge.
    pub fn lag(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for e in self.lock().entries.values().filter(|e| e.open) {
            *out.entry(e.source.clone()).or_insert(0) += e.size.saturating_sub(e.stored.offset);
        }
        out
    }

    /// Every entry, for the admin page and tests.
    pub fn entries(&self) -> Vec<Stored> {
        self.lock()
            .entries
            .values()
            .map(|e| e.stored.clone())
            .collect()
    }

    /// Whether any batch is still unacknowledged.
    pub fn has_pending(&self) -> bool {
        self.lock().entries.values().any(|e| !e.pending.is_empty())
    }

    /// Writes the store if it changed: temp file, fsync, rename, fsync of the directory.
    pub fn write(&self) -> Result<bool, CheckpointError> {
        let stored = {
            let mut inner = self.lock();
            if !inner.dirty {
                return Ok(false);
            }
            let now = now_secs();
            inner.entries.retain(|_, e| {
                e.open || !e.pending.is_empty() || now - e.stored.updated < ENTRY_TTL_SECS
            });
            while inner.entries.len() > MAX_ENTRIES {
                let oldest = inner
                    .entries
                    .iter()
                    .filter(|(_, e)| !e.open && e.pending.is_empty())
                    .min_by_key(|(_, e)| e.stored.updated)
                    .map(|(id, _)| *id);
                match oldest {
                    Some(id) => {
                        inner.entries.remove(&id);
                    }
                    None => break,
                }
            }
            inner.dirty = false;
            inner
                .entries
                .values()
                .map(|e| e.stored.clone())
                .collect::<Vec<_>>()
        };
        let io = |source| CheckpointError::Io {
            path: self.path.clone(),
            source,
        };
        let tmp = self.path.with_extension("tmp");
        let body = serde_json::to_vec_pretty(&stored).unwrap_or_default();
        let mut f = File::create(&tmp).map_err(io)?;
        f.write_all(&body).map_err(io)?;
        f.sync_all().map_err(io)?;
        drop(f);
        std::fs::rename(&tmp, &self.path).map_err(io)?;
        if let Some(dir) = self.path.parent()
            && let Ok(d) = File::open(dir)
        {
            let _ = d.sync_all();
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gauge() -> IntGauge {
        IntGauge::new("g", "g").unwrap()
    }

    fn open(c: &Checkpoints, p: &Path) -> Opened {
        let f = File::open(p).unwrap();
        let m = f.metadata().unwrap();
        c.open("s", &p.display().to_string(), &f, &m, false)
            .unwrap()
    }

    #[test]
    fn offsets_advance_only_past_acknowledged_batches_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("a.log");
        std::fs::write(&log, "one\ntwo\nthree\n").unwrap();
        let store = dir.path().join("checkpoints.json");
        let c = Checkpoints::load(&store).unwrap();
        let o = open(&c, &log);
        assert_eq!(o.offset, 0);
        let a1 = Ack::new(2, 1, gauge());
        let a2 = Ack::new(2, 1, gauge());
        c.register(o.id, a1.clone(), 4);
        c.register(o.id, a2.clone(), 8);
        a2.ack();
        a2.ack();
        c.advance();
        assert_eq!(c.entries()[0].offset, 0, "second batch done, first not");
        a1.ack();
        c.advance();
        assert_eq!(c.entries()[0].offset, 0, "one of two sinks only");
        a1.ack();
        c.advance();
        assert_eq!(c.entries()[0].offset, 8);
        assert!(c.write().unwrap());
        c.close(o.id);
        // A restart resumes at the acknowledged offset.
        let c2 = Checkpoints::load(&store).unwrap();
        assert_eq!(open(&c2, &log).offset, 8);
    }

    #[test]
    fn a_rewritten_file_on_the_same_inode_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("a.log");
        std::fs::write(&log, "aaaa\nbbbb\n").unwrap();
        let c = Checkpoints::load(&dir.path().join("c.json")).unwrap();
        let o = open(&c, &log);
        let a = Ack::new(1, 1, gauge());
        a.ack();
        c.register(o.id, a, 10);
        c.advance();
        c.close(o.id);
        // Truncate and rewrite in place (same inode, different first bytes).
        std::fs::write(&log, "cccc\ndddd\neeee\n").unwrap();
        assert_eq!(open(&c, &log).offset, 0);
    }

    #[test]
    fn a_file_that_only_begins_like_another_is_not_its_copy() {
        let dir = tempfile::tempdir().unwrap();
        let c = Checkpoints::load(&dir.path().join("c.json")).unwrap();
        // Two logs that begin with the same 2 KiB banner and go on differently.
        let banner: String = (0..100).map(|i| format!("banner line {i:06}\n")).collect();
        let first = dir.path().join("a.log");
        let second = dir.path().join("b.log");
        std::fs::write(&first, format!("{banner}first: one\nfirst: two\n")).unwrap();
        let o = open(&c, &first);
        let end = std::fs::metadata(&first).unwrap().len();
        let a = Ack::new(1, 1, gauge());
        a.ack();
        c.register(o.id, a, end);
        c.advance();
        // The reader looks at its file again after each read, which takes the tail.
        assert!(c.refresh(o.id, &File::open(&first).unwrap(), end).unwrap());
        std::fs::write(&second, format!("{banner}second: one\nsecond: two\n")).unwrap();
        let other = open(&c, &second);
        assert_eq!(
            other.offset, 0,
            "read from its start, not the other file's offset"
        );
        assert_ne!(other.identity, o.identity, "its own event ids");
        // A real copy of the first still continues where the first was read to.
        let copy = dir.path().join("a.log.1");
        std::fs::copy(&first, &copy).unwrap();
        let copied = open(&c, &copy);
        assert_eq!((copied.offset, copied.identity), (end, o.identity));
    }

    #[test]
    fn a_copy_resumes_from_the_original_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("a.log");
        let body: String = (0..200).map(|i| format!("line {i:05}\n")).collect();
        std::fs::write(&log, &body).unwrap();
        let c = Checkpoints::load(&dir.path().join("c.json")).unwrap();
        let o = open(&c, &log);
        let f = File::open(&log).unwrap();
        assert!(c.refresh(o.id, &f, body.len() as u64).unwrap());
        let a = Ack::new(1, 1, gauge());
        a.ack();
        c.register(o.id, a, 1100);
        c.advance();
        let copy = dir.path().join("a.log.1");
        std::fs::copy(&log, &copy).unwrap();
        std::fs::write(&log, "").unwrap();
        let f = File::open(&log).unwrap();
        assert!(!c.refresh(o.id, &f, 0).unwrap(), "truncation is noticed");
        assert_eq!(open(&c, &copy).offset, 1100);
    }

    #[test]
    fn a_new_file_on_a_reused_inode_gets_a_new_identity() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("a.log");
        let store = dir.path().join("c.json");
        let c = Checkpoints::load(&store).unwrap();
        std::fs::write(&log, "one\n").unwrap();
        let ino = std::fs::metadata(&log).unwrap().ino();
        let first = open(&c, &log);
        c.close(first.id);
        // Reopened, and after a restart, the same file keeps its identity.
        let again = open(&c, &log);
        assert_eq!(again.identity, first.identity);
        c.close(again.id);
        c.write().unwrap();
        let c = Checkpoints::load(&store).unwrap();
        let reloaded = open(&c, &log);
        assert_eq!(reloaded.identity, first.identity);
        c.close(reloaded.id);
        // Deleted, and another file created under the same name: ext4 and most file
        // systems hand out the freed inode again. Keep trying for one that does.
        std::fs::remove_file(&log).unwrap();
        let mut reused = false;
        for _ in 0..100 {
            std::fs::write(&log, "two\n").unwrap();
            if std::fs::metadata(&log).unwrap().ino() == ino {
                reused = true;
                break;
            }
            std::fs::rename(&log, dir.path().join(format!("keep-{}", rand_suffix()))).unwrap();
        }
        assert!(reused, "the file system never reused inode {ino}");
        let second = open(&c, &log);
        assert_eq!(second.offset, 0);
        assert_ne!(
            second.identity, first.identity,
            "the new file would take the old file's event ids"
        );
    }

    fn rand_suffix() -> u128 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    }

    #[test]
    fn a_copy_keeps_the_original_identity_and_old_entries_get_one() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("a.log");
        // Young when first seen: its identity is not its fingerprint.
        std::fs::write(&log, "line 00000\n").unwrap();
        let store = dir.path().join("c.json");
        let c = Checkpoints::load(&store).unwrap();
        let o = open(&c, &log);
        let body: String = (0..200).map(|i| format!("line {i:05}\n")).collect();
        std::fs::write(&log, &body).unwrap();
        let f = File::open(&log).unwrap();
        assert!(c.refresh(o.id, &f, body.len() as u64).unwrap());
        let copy = dir.path().join("a.log.1");
        std::fs::copy(&log, &copy).unwrap();
        assert_eq!(open(&c, &copy).identity, o.identity);
        // A store written before identities existed: the entry is resumed and given one.
        c.close(o.id);
        c.write().unwrap();
        let text = std::fs::read_to_string(&store).unwrap();
        let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
        for e in v.as_array_mut().unwrap() {
            e.as_object_mut().unwrap().remove("identity");
        }
        std::fs::write(&store, v.to_string()).unwrap();
        let c = Checkpoints::load(&store).unwrap();
        let old = open(&c, &log);
        assert!(!old.identity.is_empty());
        assert_eq!(
            c.entries()
                .iter()
                .filter(|e| e.identity == old.identity)
                .count(),
            1
        );
    }

    #[test]
    fn corrupt_file_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.json");
        std::fs::write(&p, b"\xff{not json").unwrap();
        let e = Checkpoints::load(&p).unwrap_err();
        assert!(e.to_string().contains("corrupt"), "{e}");
    }
}
