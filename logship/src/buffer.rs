//! The disk buffer in front of a sink: batches a stalled sink does not take are written to
//! segment files and acknowledged to their sources, so checkpoints move on and a log file
//! deleted while the sink is down loses nothing; they are replayed to the sink, in order,
//! when it takes batches again. A full buffer stops taking batches, which pauses reading.
//!
//! Layout: `{dir}/{seq:016}.seg`, each a sequence of records
//! `[u32 LE payload length][u32 LE CRC-32 of the payload][payload]`, the payload being one
//! batch (see [`encode_batch`]). A record is fsynced before its batch is acknowledged to the
//! sources. A segment is deleted once the sink acknowledged every record in it. After a
//! crash, every record still on disk is replayed (at least once: a record the sink took but
//! had not acknowledged is sent again); a torn record at the end of a segment (a crash in the
//! middle of a write) was never acknowledged to its source and is cut off with a warning
//! naming the file and the byte.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use prometheus::IntGauge;
use tokio::sync::mpsc;

use crate::checkpoint::Ack;
use crate::event::{Event, Meta};
use crate::pipeline::{Batch, BatchReceiver, SinkAck};

/// The first wait before reading a record that could not be read back again; it doubles
/// up to [`REPLAY_RETRY_MAX`].
const REPLAY_RETRY_FIRST: Duration = Duration::from_millis(500);
const REPLAY_RETRY_MAX: Duration = Duration::from_secs(30);
/// A replayed record the sink has not confirmed for this long is logged.
const SLOW_REPLAY: Duration = Duration::from_secs(60);
/// Bytes of a record's header: payload length and CRC-32.
const HEADER_BYTES: u64 = 8;
/// A segment is closed and a new one started past this size.
pub const SEGMENT_MAX_BYTES: u64 = 16 * 1024 * 1024;
/// The largest payload accepted when reading: twice the largest batch a source can make
/// plus room for metadata; anything larger is a corrupt length.
const PAYLOAD_MAX_BYTES: u32 = 512 * 1024 * 1024;

/// What can go wrong with a disk buffer.
#[derive(Debug, thiserror::Error)]
pub enum BufferError {
    /// A file operation failed.
    #[error("disk buffer {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A record could not be decoded although its checksum matched.
    #[error("disk buffer {path}, byte {offset}: {reason}")]
    Corrupt {
        /// The segment.
        path: PathBuf,
        /// Where the record starts.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BufferError + '_ {
    move |source| BufferError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Identifies a record for acknowledging it: its segment, and its number in write order
/// since the buffer was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordId {
    segment: u64,
    number: u64,
}

#[derive(Debug)]
struct Segment {
    seq: u64,
    path: PathBuf,
    bytes: u64,
    records: u64,
    /// Records handed out by [`DiskBuffer::next_record`].
    sent: u64,
    /// Records acknowledged.
    acked: u64,
    /// Byte offset of the next record to hand out.
    read_at: u64,
    /// Events in the records not yet handed out.
    unsent_events: u64,
}

/// The segment files of one sink's buffer.
#[derive(Debug)]
pub struct DiskBuffer {
    dir: PathBuf,
    max_bytes: u64,
    segment_max_bytes: u64,
    /// Oldest first; the last one is written to.
    segments: VecDeque<Segment>,
    writer: Option<File>,
    next_seq: u64,
    /// Records written since opened, counting those found at opening first.
    written: u64,
    /// Records handed out since opened; the number of the next one.
    served: u64,
}

impl DiskBuffer {
    /// Opens (creating) the buffer in `dir`, holding at most `max_bytes` (one record may
    /// pass the limit so that a batch larger than it still goes through). Records left by
    /// an earlier run are replayed first; a torn record is cut off.
    pub fn open(
        dir: &Path,
        max_bytes: u64,
        segment_max_bytes: u64,
    ) -> Result<DiskBuffer, BufferError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let mut seqs: Vec<u64> = std::fs::read_dir(dir)
            .map_err(io(dir))?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_suffix(".seg")?.parse().ok()
            })
            .collect();
        seqs.sort_unstable();
        let mut segments = VecDeque::new();
        for seq in seqs {
            let path = dir.join(format!("{seq:016}.seg"));
            let seg = recover(&path, seq)?;
            if seg.records == 0 {
                std::fs::remove_file(&path).map_err(io(&path))?;
            } else {
                segments.push_back(seg);
            }
        }
        let next_seq = segments.back().map_or(0, |s| s.seq + 1);
        let written = segments.iter().map(|s| s.records).sum();
        Ok(DiskBuffer {
            dir: dir.to_path_buf(),
            max_bytes,
            segment_max_bytes,
            segments,
            writer: None,
            next_seq,
            written,
            served: 0,
        })
    }

    /// Bytes on disk.
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum()
    }

    /// Events written and not yet handed out for replay.
    pub fn unsent_events(&self) -> u64 {
        self.segments.iter().map(|s| s.unsent_events).sum()
    }

    /// Records written and not yet handed out for replay.
    pub fn unsent(&self) -> u64 {
        self.segments.iter().map(|s| s.records - s.sent).sum()
    }

    /// Whether another record may be written.
    pub fn has_room(&self) -> bool {
        self.bytes() < self.max_bytes
    }

    /// The number [`DiskBuffer::next_record`] gives the record it hands out next (records
    /// are handed out in write order).
    pub fn next_number(&self) -> u64 {
        self.served
    }

    /// Writes one batch and syncs it to disk; once this returns, the batch survives a crash.
    /// Returns the record's number.
    pub fn append(&mut self, events: &[Event]) -> Result<u64, BufferError> {
        let payload = encode_batch(events);
        let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
        let record_bytes = HEADER_BYTES + payload.len() as u64;
        let roll = match self.segments.back() {
            None => true,
            // Only the last segment is written to; one that was already fully handed out
            // and acknowledged is gone, and a full one is closed.
            Some(s) => self.writer.is_none() || s.bytes + record_bytes > self.segment_max_bytes,
        };
        if roll {
            self.start_segment()?;
        }
        let (Some(seg), Some(w)) = (self.segments.back_mut(), self.writer.as_mut()) else {
            return Err(io(&self.dir)(std::io::Error::other(
                "no segment to write to",
            )));
        };
        let mut record = Vec::with_capacity(payload.len() + HEADER_BYTES as usize);
        record.extend_from_slice(&len.to_le_bytes());
        record.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        record.extend_from_slice(&payload);
        w.write_all(&record).map_err(io(&seg.path))?;
        w.sync_data().map_err(io(&seg.path))?;
        seg.bytes += record_bytes;
        seg.records += 1;
        seg.unsent_events += events.len() as u64;
        self.written += 1;
        Ok(self.written - 1)
    }

    fn start_segment(&mut self) -> Result<(), BufferError> {
        let seq = self.next_seq;
        self.next_seq += 1;
        let path = self.dir.join(format!("{seq:016}.seg"));
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(io(&path))?;
        // The new name must survive a crash too.
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))?;
        self.segments.push_back(Segment {
            seq,
            path,
            bytes: 0,
            records: 0,
            sent: 0,
            acked: 0,
            read_at: 0,
            unsent_events: 0,
        });
        self.writer = Some(file);
        Ok(())
    }

    /// The oldest record not yet handed out, in write order.
    pub fn next_record(&mut self) -> Result<Option<(RecordId, Vec<Event>)>, BufferError> {
        let Some(seg) = self.segments.iter_mut().find(|s| s.sent < s.records) else {
            return Ok(None);
        };
        let mut f = File::open(&seg.path).map_err(io(&seg.path))?;
        f.seek(SeekFrom::Start(seg.read_at))
            .map_err(io(&seg.path))?;
        let payload = match read_record(&mut f).map_err(io(&seg.path))? {
            Record::Ok(p) => p,
            // Checked when the segment was opened or written by this process.
            Record::End | Record::Bad(_) => {
                return Err(BufferError::Corrupt {
                    path: seg.path.clone(),
                    offset: seg.read_at,
                    reason: "a record written earlier cannot be read back".into(),
                });
            }
        };
        let events = decode_batch(&payload).map_err(|reason| BufferError::Corrupt {
            path: seg.path.clone(),
            offset: seg.read_at,
            reason,
        })?;
        seg.read_at += HEADER_BYTES + payload.len() as u64;
        seg.sent += 1;
        seg.unsent_events = seg.unsent_events.saturating_sub(events.len() as u64);
        let id = RecordId {
            segment: seg.seq,
            number: self.served,
        };
        self.served += 1;
        Ok(Some((id, events)))
    }

    /// The sink acknowledged a record; segments whose every record is acknowledged are
    /// deleted.
    pub fn ack(&mut self, id: RecordId) -> Result<(), BufferError> {
        if let Some(seg) = self.segments.iter_mut().find(|s| s.seq == id.segment) {
            seg.acked += 1;
        }
        while let Some(front) = self.segments.front() {
            if front.acked < front.records {
                break;
            }
            let is_writer = self.segments.len() == 1 && self.writer.is_some();
            if is_writer {
                self.writer = None;
            }
            let path = front.path.clone();
            self.segments.pop_front();
            std::fs::remove_file(&path).map_err(io(&path))?;
        }
        Ok(())
    }
}

enum Record {
    Ok(Vec<u8>),
    /// Clean end of the file.
    End,
    /// A torn or corrupt record, with what is wrong.
    Bad(String),
}

fn read_record(f: &mut File) -> std::io::Result<Record> {
    let mut header = [0u8; HEADER_BYTES as usize];
    let mut got = 0;
    while got < header.len() {
        let n = f.read(&mut header[got..])?;
        if n == 0 {
            return Ok(if got == 0 {
                Record::End
            } else {
                Record::Bad("the header is cut short".into())
            });
        }
        got += n;
    }
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if len > PAYLOAD_MAX_BYTES {
        return Ok(Record::Bad(format!(
            "a length of {len} bytes is not believable"
        )));
    }
    let mut payload = Vec::new();
    let read = f.take(u64::from(len)).read_to_end(&mut payload)?;
    if read < len as usize {
        return Ok(Record::Bad(format!(
            "the payload is cut short ({read} of {len} bytes)"
        )));
    }
    if crc32fast::hash(&payload) != crc {
        return Ok(Record::Bad("the checksum does not match".into()));
    }
    Ok(Record::Ok(payload))
}

/// Scans a segment left by an earlier run, cutting it at the first torn or corrupt record.
fn recover(path: &Path, seq: u64) -> Result<Segment, BufferError> {
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io(path))?;
    let mut at = 0u64;
    let mut records = 0u64;
    let mut events = 0u64;
    loop {
        match read_record(&mut f).map_err(io(path))? {
            Record::End => break,
            Record::Ok(p) => match decode_batch(&p) {
                Ok(e) => {
                    at += HEADER_BYTES + p.len() as u64;
                    records += 1;
                    events += e.len() as u64;
                }
                Err(reason) => {
                    cut(&f, path, at, &reason)?;
                    break;
                }
            },
            Record::Bad(reason) => {
                cut(&f, path, at, &reason)?;
                break;
            }
        }
    }
    Ok(Segment {
        seq,
        path: path.to_path_buf(),
        bytes: at,
        records,
        sent: 0,
        acked: 0,
        read_at: 0,
        unsent_events: events,
    })
}

fn cut(f: &File, path: &Path, at: u64, reason: &str) -> Result<(), BufferError> {
    // Such a record was being written when the process died, so its batch was never
    // acknowledged to its source and is read again from there.
    tracing::warn!(
        path = %path.display(),
        byte = at,
        reason,
        "disk buffer: a torn record is cut off; its lines are read again from their source"
    );
    f.set_len(at).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

/// Encodes a batch: its distinct metadata once each (JSON), then per event the index of its
/// metadata, its time, its id and its rendered body. All integers little-endian.
pub fn encode_batch(events: &[Event]) -> Vec<u8> {
    let mut metas: Vec<&Arc<Meta>> = Vec::new();
    let mut index = Vec::with_capacity(events.len());
    for e in events {
        let i = match metas.iter().position(|m| Arc::ptr_eq(m, &e.meta)) {
            Some(i) => i,
            None => {
                metas.push(&e.meta);
                metas.len() - 1
            }
        };
        index.push(i as u32);
    }
    let size: usize = events.iter().map(|e| e.body.len() + e.id.len() + 24).sum();
    let mut out = Vec::with_capacity(size + 256 * metas.len() + 8);
    out.extend_from_slice(&(metas.len() as u32).to_le_bytes());
    for m in &metas {
        let json = serde_json::to_vec(m.as_ref()).unwrap_or_default();
        put_bytes(&mut out, &json);
    }
    out.extend_from_slice(&(events.len() as u32).to_le_bytes());
    for (e, i) in events.iter().zip(index) {
        out.extend_from_slice(&i.to_le_bytes());
        out.extend_from_slice(&e.time.timestamp().to_le_bytes());
        out.extend_from_slice(&e.time.timestamp_subsec_nanos().to_le_bytes());
        put_bytes(&mut out, e.id.as_bytes());
        put_bytes(&mut out, &e.body);
    }
    out
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

/// A bounds-checked reader over a payload.
struct Cursor<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| format!("the payload ends at byte {} inside a field", self.buf.len()))?;
        let s = &self.buf[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn i64(&mut self) -> Result<i64, String> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(i64::from_le_bytes(a))
    }

    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = self.u32()? as usize;
        self.take(n)
    }
}

/// Decodes what [`encode_batch`] wrote; a clear reason instead of a panic on bad input.
pub fn decode_batch(payload: &[u8]) -> Result<Vec<Event>, String> {
    let mut c = Cursor {
        buf: payload,
        at: 0,
    };
    let n_metas = c.u32()? as usize;
    let mut metas = Vec::with_capacity(n_metas.min(1024));
    for _ in 0..n_metas {
        let m: Meta =
            serde_json::from_slice(c.bytes()?).map_err(|e| format!("unreadable metadata: {e}"))?;
        metas.push(Arc::new(m));
    }
    let n = c.u32()? as usize;
    let mut events = Vec::with_capacity(n.min(1 << 16));
    for _ in 0..n {
        let i = c.u32()? as usize;
        let meta = metas
            .get(i)
            .cloned()
            .ok_or_else(|| format!("metadata {i} of {n_metas} does not exist"))?;
        let secs = c.i64()?;
        let nanos = c.u32()?;
        let time: DateTime<Utc> = DateTime::from_timestamp(secs, nanos)
            .ok_or_else(|| format!("{secs}.{nanos} is not a time"))?;
        let id = String::from_utf8(c.bytes()?.to_vec()).map_err(|_| "an id is not UTF-8")?;
        let body = c.bytes()?.to_vec();
        events.push(Event {
            id,
            meta,
            time,
            body,
        });
    }
    if c.at != payload.len() {
        return Err(format!(
            "{} bytes follow the last event",
            payload.len() - c.at
        ));
    }
    Ok(events)
}

/// Gauges and counters of one sink's disk buffer.
#[derive(Debug, Clone)]
pub struct BufferGauges {
    /// Bytes on disk.
    pub bytes: IntGauge,
    /// Events on disk not yet handed to the sink.
    pub events: IntGauge,
    /// Events written to the buffer since start.
    pub spilled: prometheus::IntCounter,
}

/// How the stage in front of a sink behaves.
#[derive(Debug, Clone)]
pub struct StageSettings {
    /// A batch the sink has not taken for this long goes to disk instead.
    pub spill_after: Duration,
    /// At shutdown, how long to wait for the sink to acknowledge replayed batches.
    pub drain: Duration,
}

/// Runs the stage between the dispatcher and one sink until the dispatcher is gone.
///
/// While the sink takes batches, they pass straight through (no disk IO). When a batch
/// waits longer than `spill_after` (the sink is down or stalled), copies of the batches the
/// sink holds unconfirmed, that batch, and every batch after it go to disk and are
/// confirmed to their sources; the disk is then replayed to the sink as it takes batches,
/// and batches pass straight through again once it is empty, so the sink sees batches in
/// the order they were read. A batch the sink held when the stall began may reach it twice
/// (at least once).
pub async fn run_stage(
    mut input: BatchReceiver,
    output: mpsc::Sender<Arc<Batch>>,
    buffer: DiskBuffer,
    settings: StageSettings,
    in_memory: IntGauge,
    gauges: BufferGauges,
) {
    let buffer = Arc::new(Mutex::new(buffer));
    let state = |b: &Arc<Mutex<DiskBuffer>>| {
        let g = b.lock().unwrap_or_else(|e| e.into_inner());
        (
            g.unsent(),
            g.has_room(),
            g.bytes(),
            g.unsent_events(),
            g.next_number(),
        )
    };
    // Batches handed straight to the sink and not yet confirmed by it, oldest first.
    let mut passed: VecDeque<Arc<Batch>> = VecDeque::new();
    // Copies on disk of batches the sink held when the stall began, by record number. The
    // sink still delivers those batches itself; a copy is replayed only if this process
    // stops first, so an outage does not send them twice.
    let mut copies: HashMap<u64, Arc<SinkAck>> = HashMap::new();
    // Records replayed to the sink and not yet confirmed by it, oldest first, with when they
    // were handed out.
    let mut replayed: Vec<(RecordId, Arc<Batch>, Instant)> = Vec::new();
    // When a replayed record the sink holds for long was last reported.
    let mut slow_reported: Option<Instant> = None;
    let mut pending: Option<Arc<Batch>> = None;
    let mut stalled_since: Option<Instant> = None;
    let mut input_open = true;
    let mut closed_at: Option<Instant> = None;
    // After a write error the buffer takes nothing more: batches wait for the sink instead.
    let mut disk_failed = false;
    // After a record could not be read back: when to try it again, and the wait after that.
    let mut replay_retry: Option<(Instant, Duration)> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        passed.retain(|b| !b.ack.is_done());
        // Retire replayed records the sink confirmed.
        // One pass decides both: the sink confirms from other threads, and a record
        // confirmed between a look for the done ones and a separate removal would leave the
        // list without its segment ever hearing of it.
        let mut done: Vec<RecordId> = Vec::new();
        replayed.retain(|(id, b, _)| {
            let finished = b.ack.is_done();
            if finished {
                done.push(*id);
            }
            !finished
        });
        if !done.is_empty() {
            let r = on_disk(&buffer, move |b| {
                // Every id is acknowledged even if deleting one segment fails: the ids are
                // no longer listed anywhere else, and one skipped would keep its segment,
                // and every later one, on disk.
                let mut first_error = None;
                for id in done {
                    if let Err(e) = b.ack(id) {
                        first_error.get_or_insert(e);
                    }
                }
                first_error.map_or(Ok(()), Err)
            })
            .await;
            if let Err(e) = r {
                tracing::error!(error = %e, "disk buffer: cannot delete a replayed segment");
            }
        }
        if let Some((id, b, since)) = replayed.first()
            && since.elapsed() >= SLOW_REPLAY
            && slow_reported.is_none_or(|t| t.elapsed() >= SLOW_REPLAY)
        {
            // Its segment stays on disk until the sink confirms it.
            slow_reported = Some(Instant::now());
            tracing::warn!(
                segment = id.segment,
                events = b.events.len(),
                waited_secs = since.elapsed().as_secs(),
                unconfirmed = replayed.len(),
                "disk buffer: a replayed record is still not confirmed by the sink"
            );
        }
        let (unsent, room, bytes, unsent_events, next) = state(&buffer);
        gauges.bytes.set(i64::try_from(bytes).unwrap_or(i64::MAX));
        gauges
            .events
            .set(i64::try_from(unsent_events).unwrap_or(i64::MAX));

        // Place the batch taken from the dispatcher: behind what is on disk, or straight on.
        if let Some(b) = pending.take() {
            if unsent > 0 && room && !disk_failed {
                if let Err(b) = spill(&buffer, vec![b], &gauges).await {
                    disk_failed = true;
                    pending = Some(b);
                }
                continue;
            } else if unsent == 0 {
                match output.try_send(b.clone()) {
                    Ok(()) => {
                        passed.push_back(b);
                        stalled_since = None;
                        continue;
                    }
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        stalled_since.get_or_insert_with(Instant::now);
                        pending = Some(b);
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => return,
                }
            } else {
                pending = Some(b);
            }
        }

        if !input_open && pending.is_none() {
            // Shutdown: what is on disk is replayed after the restart; replayed batches in
            // the sink's hands get a short while to be confirmed so they are not sent twice.
            let since = *closed_at.get_or_insert_with(Instant::now);
            if replayed.is_empty() || since.elapsed() >= settings.drain {
                return;
            }
        }

        let spill_at = match (&pending, stalled_since) {
            (Some(_), Some(t)) if unsent == 0 && room && !disk_failed => {
                Some(t + settings.spill_after)
            }
            _ => None,
        };
        // The next record is a copy of a batch the sink still holds: wait for the sink to
        // finish it (the record is then skipped) rather than send it twice.
        let original_pending = copies.get(&next).is_some_and(|a| !a.is_delivered());
        let replay_due = replay_retry.is_none_or(|(at, _)| Instant::now() >= at);
        let replay = unsent > 0 && input_open && !original_pending && replay_due;
        tokio::select! {
            biased;
            permit = output.reserve(), if replay || (pending.is_some() && unsent == 0) => {
                let Ok(permit) = permit else { return };
                stalled_since = None;
                if replay {
                    let got = on_disk(&buffer, DiskBuffer::next_record).await;
                    match got {
                        Ok(Some((id, _)))
                            if copies.get(&id.number).is_some_and(|a| a.is_delivered()) =>
                        {
                            // The sink delivered the original of this copy itself.
                            copies.remove(&id.number);
                            let r = on_disk(&buffer, move |b| b.ack(id)).await;
                            if let Err(e) = r {
                                tracing::error!(error = %e, "disk buffer: cannot delete a delivered segment");
                            }
                        }
                        Ok(Some((id, events))) => {
                            replay_retry = None;
                            copies.remove(&id.number);
                            let source = Ack::new(1, events.len(), in_memory.clone());
                            let batch = Arc::new(Batch {
                                events: Arc::new(events),
                                ack: SinkAck::new(source),
                            });
                            replayed.push((id, batch.clone(), Instant::now()));
                            permit.send(batch);
                        }
                        Ok(None) => {}
                        Err(e) => {
                            // A record that passed its checksum cannot be read back (the disk
                            // is failing, or its file was removed). It is tried again, later
                            // and later, rather than skipped; meanwhile new batches still go
                            // to disk behind it until the buffer is full, which pauses the
                            // sources. Ending the stage instead would make every source's
                            // send fail, and lines read after that would be lost.
                            let wait = replay_retry.map_or(REPLAY_RETRY_FIRST, |(_, w)| {
                                (w * 2).min(REPLAY_RETRY_MAX)
                            });
                            tracing::error!(
                                error = %e,
                                retry_secs = wait.as_secs_f64(),
                                "disk buffer: cannot read a record back; the sink waits for it"
                            );
                            replay_retry = Some((Instant::now() + wait, wait));
                        }
                    }
                } else if let Some(b) = pending.take() {
                    permit.send(b.clone());
                    passed.push_back(b);
                }
            }
            b = input.recv(), if pending.is_none() && input_open => match b {
                Some(b) => pending = Some(b),
                None => input_open = false,
            },
            _ = sleep_until(spill_at), if spill_at.is_some() => {
                // The sink is stalled: what it holds unconfirmed goes to disk first, then
                // the waiting batch, so the replay keeps the read order.
                if let Some(b) = pending.take() {
                    let mut all: Vec<Arc<Batch>> = passed.drain(..).filter(|b| !b.ack.is_done()).collect();
                    let held: Vec<Arc<SinkAck>> = all.iter().map(|b| b.ack.clone()).collect();
                    all.push(b);
                    match spill(&buffer, all, &gauges).await {
                        Ok(numbers) => copies.extend(numbers.into_iter().zip(held)),
                        Err(b) => {
                            disk_failed = true;
                            pending = Some(b);
                        }
                    }
                }
                stalled_since = None;
            }
            _ = tick.tick() => {}
        }
    }
}

/// Runs blocking file IO on the buffer off the async threads; only the stage touches it.
async fn on_disk<T: Send + 'static>(
    buffer: &Arc<Mutex<DiskBuffer>>,
    f: impl FnOnce(&mut DiskBuffer) -> Result<T, BufferError> + Send + 'static,
) -> Result<T, BufferError> {
    let b = buffer.clone();
    tokio::task::spawn_blocking(move || f(&mut b.lock().unwrap_or_else(|e| e.into_inner())))
        .await
        .unwrap_or_else(|e| Err(io(Path::new(""))(std::io::Error::other(e.to_string()))))
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

/// Writes batches to disk, in order, and confirms them to their sources; returns their
/// record numbers. On a disk error the last batch is handed back to wait for the sink (the
/// ones before it still reach the sink, which holds them).
async fn spill(
    buffer: &Arc<Mutex<DiskBuffer>>,
    batches: Vec<Arc<Batch>>,
    gauges: &BufferGauges,
) -> Result<Vec<u64>, Arc<Batch>> {
    let copies: Vec<Arc<Batch>> = batches.clone();
    let written = on_disk(buffer, move |d| {
        copies.iter().map(|b| d.append(&b.events)).collect()
    })
    .await;
    match written {
        Ok(numbers) => {
            for b in &batches {
                gauges.spilled.inc_by(b.events.len() as u64);
                b.ack.buffered();
            }
            Ok(numbers)
        }
        Err(e) => {
            tracing::error!(error = %e, "disk buffer: cannot write; batches wait for the sink");
            match batches.into_iter().last() {
                Some(b) => Err(b),
                None => Ok(Vec::new()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(source: &str) -> Arc<Meta> {
        Arc::new(Meta {
            source: source.into(),
            dataset: "d".into(),
            host: "node1".into(),
            podgroup: Some("hello.web.web".into()),
            instance: Some("2".into()),
            ..Meta::default()
        })
    }

    fn events(m: &Arc<Meta>, from: usize, n: usize) -> Vec<Event> {
        (from..from + n)
            .map(|i| Event {
                id: format!("id-{i}"),
                meta: m.clone(),
                time: DateTime::from_timestamp(1_700_000_000 + i as i64, 123_456_789).unwrap(),
                body: format!("{{\"message\":\"line {i}\"}}").into_bytes(),
            })
            .collect()
    }

    fn ids(e: &[Event]) -> Vec<String> {
        e.iter().map(|e| e.id.clone()).collect()
    }

    #[test]
    fn a_batch_reads_back_as_written() {
        let (a, b) = (meta("a"), meta("b"));
        let mut batch = events(&a, 0, 3);
        batch.extend(events(&b, 3, 2));
        let back = decode_batch(&encode_batch(&batch)).unwrap();
        assert_eq!(back.len(), 5);
        for (x, y) in batch.iter().zip(&back) {
            assert_eq!(x.id, y.id);
            assert_eq!(x.time, y.time);
            assert_eq!(x.body, y.body);
            assert_eq!(*x.meta, *y.meta);
        }
        // Events of one source share their metadata again.
        assert!(Arc::ptr_eq(&back[0].meta, &back[2].meta));
        assert!(!Arc::ptr_eq(&back[0].meta, &back[3].meta));
    }

    #[test]
    fn bad_payloads_are_errors_not_panics() {
        let good = encode_batch(&events(&meta("a"), 0, 4));
        for cut in 0..good.len() {
            assert!(decode_batch(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = good.clone();
        longer.push(0);
        assert!(decode_batch(&longer).unwrap_err().contains("follow"));
        let mut seed = 7u64;
        for _ in 0..2000 {
            let mut b = good.clone();
            for _ in 0..4 {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let i = (seed >> 33) as usize % b.len();
                b[i] = (seed >> 17) as u8;
            }
            let _ = decode_batch(&b);
        }
    }

    #[test]
    fn records_replay_in_order_across_segments_and_acked_segments_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let m = meta("a");
        // Small segments, so the records spread over several files.
        let mut buf = DiskBuffer::open(dir.path(), 1 << 30, 600).unwrap();
        for i in 0..10 {
            buf.append(&events(&m, i * 3, 3)).unwrap();
        }
        let files = || std::fs::read_dir(dir.path()).unwrap().count();
        assert!(files() > 2, "{} segment files", files());
        assert_eq!(buf.unsent(), 10);
        assert_eq!(buf.unsent_events(), 30);
        let mut got = Vec::new();
        let mut handed = Vec::new();
        while let Some((id, e)) = buf.next_record().unwrap() {
            got.extend(ids(&e));
            handed.push(id);
        }
        let want: Vec<String> = (0..30).map(|i| format!("id-{i}")).collect();
        assert_eq!(got, want);
        assert_eq!(buf.unsent(), 0);
        // Confirmed out of order: a segment goes only once all its records are done.
        let before = files();
        buf.ack(handed[9]).unwrap();
        assert_eq!(files(), before);
        for id in &handed[..9] {
            buf.ack(*id).unwrap();
        }
        assert_eq!(files(), 0);
        assert_eq!(buf.bytes(), 0);
        // Writing goes on in a new segment.
        buf.append(&events(&m, 100, 1)).unwrap();
        assert_eq!(ids(&buf.next_record().unwrap().unwrap().1), vec!["id-100"]);
    }

    #[test]
    fn what_was_not_confirmed_is_replayed_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let m = meta("a");
        {
            let mut buf = DiskBuffer::open(dir.path(), 1 << 30, 600).unwrap();
            for i in 0..6 {
                buf.append(&events(&m, i * 2, 2)).unwrap();
            }
            // The first two records are delivered; the third was handed out but never
            // confirmed when the process died.
            let (a, _) = buf.next_record().unwrap().unwrap();
            let (b, _) = buf.next_record().unwrap().unwrap();
            let _ = buf.next_record().unwrap().unwrap();
            buf.ack(a).unwrap();
            buf.ack(b).unwrap();
        }
        let mut buf = DiskBuffer::open(dir.path(), 1 << 30, 600).unwrap();
        let mut got = Vec::new();
        while let Some((_, e)) = buf.next_record().unwrap() {
            got.extend(ids(&e));
        }
        // Nothing after the confirmed records is missing; what shares a segment with them
        // may come again (at least once).
        for i in 4..12 {
            assert!(got.contains(&format!("id-{i}")), "id-{i} lost: {got:?}");
        }
        let mut sorted = got.clone();
        sorted.sort_by_key(|s| s[3..].parse::<u32>().unwrap());
        assert_eq!(got, sorted, "replayed out of order");
    }

    #[test]
    fn a_torn_record_is_cut_off_and_the_rest_survives() {
        let dir = tempfile::tempdir().unwrap();
        let m = meta("a");
        {
            let mut buf = DiskBuffer::open(dir.path(), 1 << 30, 1 << 20).unwrap();
            buf.append(&events(&m, 0, 2)).unwrap();
            buf.append(&events(&m, 2, 2)).unwrap();
        }
        let seg = std::fs::read_dir(dir.path())
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let whole = std::fs::metadata(&seg).unwrap().len();
        // A crash in the middle of the third write leaves half a record behind.
        let third = {
            let p = encode_batch(&events(&m, 4, 2));
            let mut r = (p.len() as u32).to_le_bytes().to_vec();
            r.extend_from_slice(&crc32fast::hash(&p).to_le_bytes());
            r.extend_from_slice(&p[..p.len() / 2]);
            r
        };
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&third).unwrap();
        drop(f);
        let mut buf = DiskBuffer::open(dir.path(), 1 << 30, 1 << 20).unwrap();
        assert_eq!(std::fs::metadata(&seg).unwrap().len(), whole);
        assert_eq!(buf.unsent(), 2);
        buf.append(&events(&m, 6, 1)).unwrap();
        let mut got = Vec::new();
        while let Some((_, e)) = buf.next_record().unwrap() {
            got.extend(ids(&e));
        }
        assert_eq!(got, vec!["id-0", "id-1", "id-2", "id-3", "id-6"]);

        // A flipped bit in a stored record fails its checksum and is cut the same way: the
        // first record of that segment and the one record of the newer segment remain.
        drop(buf);
        let mut bytes = std::fs::read(&seg).unwrap();
        let last = bytes.len() - 3;
        bytes[last] ^= 0x40;
        std::fs::write(&seg, &bytes).unwrap();
        let buf = DiskBuffer::open(dir.path(), 1 << 30, 1 << 20).unwrap();
        assert_eq!(buf.unsent_events(), 3);
        assert_eq!(buf.unsent(), 2);
    }

    #[test]
    fn the_buffer_is_full_at_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        let m = meta("a");
        let mut buf = DiskBuffer::open(dir.path(), 1000, 1 << 20).unwrap();
        assert!(buf.has_room());
        let mut n = 0;
        while buf.has_room() {
            buf.append(&events(&m, 0, 2)).unwrap();
            n += 1;
        }
        assert!(n > 1 && buf.bytes() >= 1000);
        // Room comes back only when the segment's records are all confirmed.
        let mut handed = Vec::new();
        while let Some((id, _)) = buf.next_record().unwrap() {
            handed.push(id);
        }
        for id in handed {
            assert!(!buf.has_room());
            buf.ack(id).unwrap();
        }
        assert!(buf.has_room());
    }

    fn gauges() -> (BufferGauges, IntGauge) {
        let g = |n: &str| IntGauge::new(n, "h").unwrap();
        (
            BufferGauges {
                bytes: g("b"),
                events: g("e"),
                spilled: prometheus::IntCounter::new("s", "h").unwrap(),
            },
            g("m"),
        )
    }

    fn batch(m: &Arc<Meta>, from: usize, n: usize, mem: &IntGauge) -> Arc<Batch> {
        Arc::new(Batch {
            events: Arc::new(events(m, from, n)),
            ack: SinkAck::new(Ack::new(1, n, mem.clone())),
        })
    }

    /// A running stage over a fresh buffer of `max_bytes`, spilling after `spill_after_ms`,
    /// in front of a sink queue of `queue` batches.
    struct TestStage {
        dir: tempfile::TempDir,
        m: Arc<Meta>,
        g: BufferGauges,
        mem: IntGauge,
        in_tx: mpsc::Sender<Arc<Batch>>,
        out_rx: mpsc::Receiver<Arc<Batch>>,
        task: tokio::task::JoinHandle<()>,
    }

    fn stage(max_bytes: u64, spill_after_ms: u64, queue: usize) -> TestStage {
        let dir = tempfile::tempdir().unwrap();
        let (g, mem) = gauges();
        let (in_tx, in_rx) = mpsc::channel(1);
        let (out_tx, out_rx) = mpsc::channel(queue);
        let disk = DiskBuffer::open(dir.path(), max_bytes, 1 << 20).unwrap();
        let settings = StageSettings {
            spill_after: Duration::from_millis(spill_after_ms),
            drain: Duration::from_secs(1),
        };
        let task = tokio::spawn(run_stage(
            in_rx,
            out_tx,
            disk,
            settings,
            mem.clone(),
            g.clone(),
        ));
        TestStage {
            dir,
            m: meta("a"),
            g,
            mem,
            in_tx,
            out_rx,
            task,
        }
    }

    /// Sends `n` batches of 5 events (ids from 0) to a stage whose sink takes nothing, and
    /// waits until every one is confirmed to its source (spilled).
    async fn send_until_confirmed(
        in_tx: &mpsc::Sender<Arc<Batch>>,
        m: &Arc<Meta>,
        mem: &IntGauge,
        n: usize,
    ) {
        let mut sent = Vec::new();
        for i in 0..n {
            let b = batch(m, i * 5, 5, mem);
            sent.push(b.ack.clone());
            in_tx.send(b).await.unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sent.iter().all(|a| a.is_done()) {
            assert!(Instant::now() < deadline, "spilled batches not confirmed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn a_stalled_sink_gets_everything_in_order_after_it_went_to_disk() {
        let TestStage {
            dir,
            m,
            g,
            mem,
            in_tx,
            mut out_rx,
            task: stage,
        } = stage(1 << 30, 100, 2);
        // The sink takes nothing: two batches fill its queue; once it has taken nothing
        // for the spill delay, copies of those two and every later batch go to disk and are
        // confirmed to their sources although the sink has delivered none of them.
        send_until_confirmed(&in_tx, &m, &mem, 10).await;
        assert_eq!(g.spilled.get(), 50);
        assert!(std::fs::read_dir(dir.path()).unwrap().count() > 0);
        // The sink comes back: it delivers the two batches it held, then gets every later
        // event from disk in order (not those two again: their copies are only for a
        // restart), and the disk empties as it confirms.
        let mut got = Vec::new();
        while got.len() < 50 {
            let b = tokio::time::timeout(Duration::from_secs(10), out_rx.recv())
                .await
                .expect("the sink gets the rest")
                .unwrap();
            got.extend(ids(&b.events));
            b.ack.ack();
        }
        let want: Vec<String> = (0..50).map(|i| format!("id-{i}")).collect();
        assert_eq!(got, want);
        assert!(
            tokio::time::timeout(Duration::from_millis(300), out_rx.recv())
                .await
                .is_err(),
            "nothing more reaches the sink"
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::read_dir(dir.path()).unwrap().count() > 0 {
            assert!(Instant::now() < deadline, "replayed segments not deleted");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // With the disk empty, batches pass straight through again.
        let b = batch(&m, 50, 1, &mem);
        in_tx.send(b).await.unwrap();
        let b = out_rx.recv().await.unwrap();
        assert_eq!(ids(&b.events), vec!["id-50"]);
        assert_eq!(g.spilled.get(), 50);
        drop(in_tx);
        stage.await.unwrap();
    }

    #[tokio::test]
    async fn copies_of_held_batches_the_sink_did_not_finish_are_replayed_after_a_restart() {
        let TestStage {
            dir,
            m,
            mem,
            in_tx,
            mut out_rx,
            task,
            ..
        } = stage(1 << 30, 100, 2);
        send_until_confirmed(&in_tx, &m, &mem, 4).await;
        // The sink takes the two batches it held but never finishes them; logship stops.
        let held = [out_rx.recv().await.unwrap(), out_rx.recv().await.unwrap()];
        drop(in_tx);
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the stage ends")
            .unwrap();
        drop(held);
        // Their copies are still on disk, ahead of the later batches, for the next start.
        let mut left = DiskBuffer::open(dir.path(), 1 << 30, 1 << 20).unwrap();
        let mut got = Vec::new();
        while let Some((_, e)) = left.next_record().unwrap() {
            got.extend(ids(&e));
        }
        let want: Vec<String> = (0..20).map(|i| format!("id-{i}")).collect();
        assert_eq!(got, want);
    }

    #[tokio::test]
    async fn a_sink_that_keeps_up_never_touches_the_disk() {
        let TestStage {
            dir,
            m,
            g,
            mem,
            in_tx,
            mut out_rx,
            ..
        } = stage(1 << 30, 200, 2);
        let sink = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(b) = out_rx.recv().await {
                // Slower than the source, but never stalled for the spill delay.
                tokio::time::sleep(Duration::from_millis(5)).await;
                got.extend(ids(&b.events));
                b.ack.ack();
            }
            got
        });
        for i in 0..100 {
            in_tx.send(batch(&m, i * 2, 2, &mem)).await.unwrap();
        }
        drop(in_tx);
        let got = sink.await.unwrap();
        let want: Vec<String> = (0..200).map(|i| format!("id-{i}")).collect();
        assert_eq!(got, want);
        assert_eq!(g.spilled.get(), 0);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn at_shutdown_every_accepted_batch_reaches_the_sink_or_stays_on_disk() {
        let TestStage {
            dir,
            m,
            mem,
            in_tx,
            mut out_rx,
            task,
            ..
        } = stage(2000, 50, 1);
        // The sink is away until the buffer is full and a batch waits for room.
        let mut accepted = Vec::new();
        for i in 0..100 {
            let b = batch(&m, i * 5, 5, &mem);
            let ids = ids(&b.events);
            if tokio::time::timeout(Duration::from_secs(2), in_tx.send(b))
                .await
                .is_err()
            {
                break;
            }
            accepted.extend(ids);
        }
        // The dispatcher goes away, then the sink comes back: the stage places what it
        // holds and ends by itself.
        drop(in_tx);
        let sink = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(b) = out_rx.recv().await {
                got.extend(ids(&b.events));
                b.ack.ack();
            }
            got
        });
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the stage ends")
            .unwrap();
        let mut seen = sink.await.unwrap();
        let mut left = DiskBuffer::open(dir.path(), 1 << 30, 1 << 20).unwrap();
        while let Some((_, e)) = left.next_record().unwrap() {
            seen.extend(ids(&e));
        }
        assert!(accepted.len() > 10, "{} events accepted", accepted.len());
        for id in &accepted {
            assert!(seen.contains(id), "{id} lost");
        }
    }

    #[tokio::test]
    async fn a_full_buffer_stops_taking_batches() {
        let TestStage {
            dir: _dir,
            m,
            g,
            mem,
            in_tx,
            out_rx: _out_rx,
            ..
        } = stage(2000, 50, 1);
        let mut acks = Vec::new();
        let mut refused = false;
        for i in 0..100 {
            let b = batch(&m, i * 5, 5, &mem);
            acks.push(b.ack.clone());
            if tokio::time::timeout(Duration::from_secs(2), in_tx.send(b))
                .await
                .is_err()
            {
                refused = true;
                break;
            }
        }
        assert!(refused, "the stage kept taking batches past its limit");
        let on_disk = g.bytes.get();
        assert!((2000..4000).contains(&on_disk), "{on_disk} bytes on disk");
        assert!(
            !acks.last().unwrap().is_done(),
            "a refused batch was confirmed"
        );
    }

    #[tokio::test]
    async fn a_record_that_cannot_be_read_back_is_waited_for_not_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let m = meta("a");
        {
            let mut buf = DiskBuffer::open(dir.path(), 1 << 30, 1 << 20).unwrap();
            buf.append(&events(&m, 0, 3)).unwrap();
        }
        let disk = DiskBuffer::open(dir.path(), 1 << 30, 1 << 20).unwrap();
        // The segment goes away after the buffer was opened, as on a failing disk.
        let seg = std::fs::read_dir(dir.path())
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let saved = std::fs::read(&seg).unwrap();
        std::fs::remove_file(&seg).unwrap();
        let (g, mem) = gauges();
        let (in_tx, in_rx) = mpsc::channel(1);
        let (out_tx, mut out_rx) = mpsc::channel(4);
        let settings = StageSettings {
            spill_after: Duration::from_millis(100),
            drain: Duration::from_secs(1),
        };
        let task = tokio::spawn(run_stage(in_rx, out_tx, disk, settings, mem.clone(), g));
        tokio::time::sleep(Duration::from_millis(300)).await;
        // The stage still takes batches (behind the record on disk), so no source's send
        // fails and nothing read is thrown away.
        assert!(!task.is_finished(), "the stage ended");
        let b = batch(&m, 3, 2, &mem);
        let ack = b.ack.clone();
        tokio::time::timeout(Duration::from_secs(2), in_tx.send(b))
            .await
            .expect("the stage takes a batch")
            .expect("the stage is there");
        // Once the record can be read again, everything reaches the sink in order.
        std::fs::write(&seg, saved).unwrap();
        let mut got = Vec::new();
        while got.len() < 5 {
            let b = tokio::time::timeout(Duration::from_secs(10), out_rx.recv())
                .await
                .expect("the sink gets the records")
                .unwrap();
            got.extend(ids(&b.events));
            b.ack.ack();
        }
        assert_eq!(got, ["id-0", "id-1", "id-2", "id-3", "id-4"]);
        assert!(ack.is_done());
        drop(in_tx);
        task.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replayed_records_the_sink_confirms_concurrently_all_leave_the_disk() {
        // Records left by an earlier run, one event each.
        const RECORDS: usize = 4000;
        let dir = tempfile::tempdir().unwrap();
        let m = meta("a");
        {
            let mut buf = DiskBuffer::open(dir.path(), 1 << 30, 1 << 20).unwrap();
            for i in 0..RECORDS {
                buf.append(&events(&m, i, 1)).unwrap();
            }
        }
        let (g, mem) = gauges();
        let (in_tx, in_rx) = mpsc::channel(1);
        let (out_tx, mut out_rx) = mpsc::channel(64);
        let disk = DiskBuffer::open(dir.path(), 1 << 30, 1 << 20).unwrap();
        let settings = StageSettings {
            spill_after: Duration::from_secs(60),
            drain: Duration::from_secs(1),
        };
        let task = tokio::spawn(run_stage(in_rx, out_tx, disk, settings, mem, g.clone()));
        // The sink confirms from another thread while the stage goes on replaying, as the
        // Kafka sink's delivery reports do: a record confirmed while the stage looks over
        // the ones it handed out must still leave the disk.
        let (ack_tx, ack_rx) = std::sync::mpsc::channel::<Arc<Batch>>();
        let acker = std::thread::spawn(move || {
            for b in ack_rx {
                b.ack.ack();
            }
        });
        let mut got = 0;
        while got < RECORDS {
            let b = tokio::time::timeout(Duration::from_secs(10), out_rx.recv())
                .await
                .expect("the sink gets every record")
                .unwrap();
            got += b.events.len();
            ack_tx.send(b).unwrap();
        }
        drop(ack_tx);
        acker.join().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while g.bytes.get() > 0 || std::fs::read_dir(dir.path()).unwrap().count() > 0 {
            assert!(
                Instant::now() < deadline,
                "{} bytes left on disk after every record was confirmed",
                g.bytes.get()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(in_tx);
        task.await.unwrap();
    }
}
