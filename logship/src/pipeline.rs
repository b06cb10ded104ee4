//! Fan-out from sources to sinks: every batch goes to every sink through a bounded channel
//! (so a slow sink slows reading instead of growing memory), and each sink acknowledges it
//! once it is durably delivered.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use prometheus::IntGauge;
use tokio::sync::mpsc;

use crate::checkpoint::Ack;
use crate::event::Event;

/// Events read together, acknowledged together; each sink gets its own `Batch` sharing the
/// events.
#[derive(Debug)]
pub struct Batch {
    /// The events, in read order.
    pub events: Arc<Vec<Event>>,
    /// This sink's confirmation of the batch.
    pub ack: Arc<SinkAck>,
}

/// One sink's confirmation of a batch. Confirming twice counts once, so that a disk buffer
/// may confirm a batch its sink still holds (it wrote a copy) and the sink may confirm it
/// again when it delivers.
#[derive(Debug)]
pub struct SinkAck {
    source: Arc<Ack>,
    done: AtomicBool,
    delivered: AtomicBool,
}

impl SinkAck {
    /// A confirmation owed to `source`.
    pub fn new(source: Arc<Ack>) -> Arc<SinkAck> {
        Arc::new(SinkAck {
            source,
            done: AtomicBool::new(false),
            delivered: AtomicBool::new(false),
        })
    }

    /// The sink is done with the batch: delivered, or dead-lettered where it refused.
    pub fn ack(&self) {
        self.delivered.store(true, Ordering::Release);
        self.confirm();
    }

    /// A disk buffer wrote a copy of the batch, which the sink may still hold: the source
    /// may move on, and the copy is replayed unless the sink finishes the batch first.
    pub fn buffered(&self) {
        self.confirm();
    }

    fn confirm(&self) {
        if !self.done.swap(true, Ordering::AcqRel) {
            self.source.ack();
        }
    }

    /// Whether the batch is confirmed to its source (by the sink or its disk buffer).
    pub fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    /// Whether the sink itself is done with the batch.
    pub fn is_delivered(&self) -> bool {
        self.delivered.load(Ordering::Acquire)
    }
}

/// Sends batches to every sink.
#[derive(Debug, Clone)]
pub struct Dispatcher {
    sinks: Vec<mpsc::Sender<Arc<Batch>>>,
    buffer: IntGauge,
}

/// The receiving end a sink reads batches from.
pub type BatchReceiver = mpsc::Receiver<Arc<Batch>>;

impl Dispatcher {
    /// A dispatcher to one sink per entry of `capacities`, each with room for that many
    /// batches in flight towards it; returns the receivers in sink order.
    pub fn new(capacities: &[usize], buffer: IntGauge) -> (Dispatcher, Vec<BatchReceiver>) {
        let mut sinks = Vec::new();
        let mut rxs = Vec::new();
        for &capacity in capacities {
            let (tx, rx) = mpsc::channel(capacity.max(1));
            sinks.push(tx);
            rxs.push(rx);
        }
        (Dispatcher { sinks, buffer }, rxs)
    }

    /// Sends `events` to every sink, waiting while a sink's channel is full. Returns the
    /// batch's ack, or `None` when a sink has stopped (shutdown).
    pub async fn send(&self, events: Vec<Event>) -> Option<Arc<Ack>> {
        let ack = Ack::new(self.sinks.len(), events.len(), self.buffer.clone());
        let events = Arc::new(events);
        for s in &self.sinks {
            let batch = Arc::new(Batch {
                events: events.clone(),
                ack: SinkAck::new(ack.clone()),
            });
            if s.send(batch).await.is_err() {
                return None;
            }
        }
        Some(ack)
    }
}
