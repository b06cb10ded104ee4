//! Fan-out from sources to sinks: every batch goes to every sink through a bounded channel
//! (so a slow sink slows reading instead of growing memory), and each sink acknowledges it
//! once it is durably delivered.

use std::sync::Arc;

use prometheus::IntGauge;
use tokio::sync::mpsc;

use crate::checkpoint::Ack;
use crate::event::Event;

/// Events read together, acknowledged together.
#[derive(Debug)]
pub struct Batch {
    /// The events, in read order.
    pub events: Vec<Event>,
    /// Confirmation owed by every sink.
    pub ack: Arc<Ack>,
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
    /// A dispatcher to `n` sinks, each with room for `capacity` batches in flight towards
    /// it; returns the receivers in sink order.
    pub fn new(n: usize, capacity: usize, buffer: IntGauge) -> (Dispatcher, Vec<BatchReceiver>) {
        let mut sinks = Vec::new();
        let mut rxs = Vec::new();
        for _ in 0..n {
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
        let batch = Arc::new(Batch {
            events,
            ack: ack.clone(),
        });
        for s in &self.sinks {
            if s.send(batch.clone()).await.is_err() {
                return None;
            }
        }
        Some(ack)
    }
}
