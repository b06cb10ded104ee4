//! Indexer mode, `lain logship --indexer`: a Kafka consumer group that writes the events the
//! agents produced into Elasticsearch and commits offsets only after Elasticsearch
//! acknowledged them (LAIN's Kafka → Logstash → Elasticsearch leg, without Logstash).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lain_common::Shutdown;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::checkpoint::Ack;
use crate::event::{Event, Meta, event_id};
use crate::metrics::Metrics;
use crate::pipeline::Dispatcher;

/// The header carrying an event's deterministic id from the agent to the indexer.
pub const ID_HEADER: &str = "lain-id";

/// The next offset to commit per (topic, partition).
type Offsets = BTreeMap<(String, i32), i64>;

/// Batches sent, in order, with the offsets to commit once each is acknowledged.
type Pending = VecDeque<(Arc<Ack>, Offsets)>;

/// Settings of the indexer.
#[derive(Debug, Clone)]
pub struct IndexerSettings {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// The consumer group.
    pub group_id: String,
    /// Topics, or patterns starting with `^`.
    pub topics: Vec<String>,
    /// Events per batch at most.
    pub batch_max_events: usize,
    /// A batch is sent after this long even when not full.
    pub batch_wait: Duration,
}

/// Runs the consumer until shutdown; commits what Elasticsearch acknowledged.
pub async fn run(
    settings: IndexerSettings,
    dispatcher: Dispatcher,
    metrics: Metrics,
    shutdown: Shutdown,
) -> Result<(), String> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &settings.brokers)
        .set("group.id", &settings.group_id)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        // A killed member's partitions move to another member after this long.
        .set("session.timeout.ms", "10000")
        .create()
        .map_err(|e| format!("cannot create the Kafka consumer: {e}"))?;
    let topics: Vec<&str> = settings.topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topics)
        .map_err(|e| format!("cannot subscribe to {topics:?}: {e}"))?;
    let meta = Arc::new(Meta {
        source: "kafka".into(),
        ..Meta::default()
    });
    let lines_in = metrics.lines_in.with_label_values(&["kafka"]);
    let bytes_in = metrics.bytes_in.with_label_values(&["kafka"]);
    let mut pending: Pending = VecDeque::new();
    let mut batch: Vec<Event> = Vec::new();
    let mut offsets: Offsets = BTreeMap::new();
    let mut started = Instant::now();
    loop {
        let wait = settings.batch_wait.saturating_sub(started.elapsed());
        let msg = tokio::select! {
            _ = shutdown.wait() => break,
            m = tokio::time::timeout(wait.max(Duration::from_millis(1)), consumer.recv()) => m,
        };
        match msg {
            Ok(Ok(m)) => {
                let payload = m.payload().unwrap_or_default().to_vec();
                lines_in.inc();
                bytes_in.inc_by(payload.len() as u64);
                let id = m
                    .headers()
                    .and_then(|h| {
                        h.iter()
                            .find(|h| h.key == ID_HEADER)
                            .and_then(|h| h.value)
                            .map(|v| String::from_utf8_lossy(v).into_owned())
                    })
                    .unwrap_or_else(|| {
                        event_id(
                            &format!("{}/{}", m.topic(), m.partition()),
                            m.offset() as u64,
                        )
                    });
                let time = serde_json::from_slice::<serde_json::Value>(&payload)
                    .ok()
                    .and_then(|v| {
                        v.get("@timestamp")
                            .and_then(|t| t.as_str())
                            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                    })
                    .map(|t| t.with_timezone(&chrono::Utc))
                    .unwrap_or_else(chrono::Utc::now);
                if batch.is_empty() {
                    started = Instant::now();
                }
                batch.push(Event {
                    id,
                    meta: meta.clone(),
                    time,
                    body: payload,
                });
                offsets.insert((m.topic().to_string(), m.partition()), m.offset() + 1);
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "Kafka consumer error");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(_) => {}
        }
        let due = !batch.is_empty() && started.elapsed() >= settings.batch_wait;
        if batch.len() >= settings.batch_max_events || due {
            let Some(ack) = dispatcher.send(std::mem::take(&mut batch)).await else {
                break;
            };
            pending.push_back((ack, std::mem::take(&mut offsets)));
        }
        commit_done(&consumer, &mut pending);
    }
    // Whatever was read but not acknowledged is read again by the group's next member.
    drop(dispatcher);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !pending.is_empty() && Instant::now() < deadline {
        commit_done(&consumer, &mut pending);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Commits the offsets of the acknowledged prefix of `pending`.
fn commit_done(consumer: &StreamConsumer, pending: &mut Pending) {
    let mut merged: Offsets = BTreeMap::new();
    while pending.front().is_some_and(|(a, _)| a.is_done()) {
        if let Some((_, o)) = pending.pop_front() {
            merged.extend(o);
        }
    }
    if merged.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for ((t, p), o) in merged {
        let _ = tpl.add_partition_offset(&t, p, Offset::Offset(o));
    }
    if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
        tracing::warn!(error = %e, "cannot commit offsets; the events are indexed again (same ids) after a restart");
    }
}
