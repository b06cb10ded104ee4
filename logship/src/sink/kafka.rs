//! The Kafka sink: an idempotent rdkafka producer (`acks=all`) whose delivery reports
//! acknowledge batches. Topics come from a template (`{podgroup}` for app logs,
//! `{host}.access` for access logs); the key is the instance, so one instance's lines stay in
//! order within a partition.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::DeadLetters;
use crate::event::{Event, Meta};
use crate::metrics::Metrics;
use crate::pipeline::{Batch, BatchReceiver};

/// A permanent error is retried this many times before the event goes to the dead letters.
const MAX_ATTEMPTS: u32 = 5;

/// Settings of the Kafka sink.
#[derive(Debug, Clone)]
pub struct KafkaSinkSettings {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// Topic template for events whose source has none.
    pub topic: String,
    /// `lz4`, `zstd`, `gzip`, `snappy` or `none`.
    pub compression: String,
    /// `linger.ms`.
    pub linger_ms: u64,
    /// Batches being delivered at once.
    pub inflight_batches: usize,
    /// Where refused events go.
    pub dead_letter_path: std::path::PathBuf,
    /// Extra librdkafka properties.
    pub properties: Vec<(String, String)>,
}

/// Builds the producer; fails on invalid settings.
pub fn producer(s: &KafkaSinkSettings) -> Result<FutureProducer, KafkaError> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &s.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.type", &s.compression)
        .set("linger.ms", s.linger_ms.to_string())
        // Never give up on a message because the broker is away: lines wait (and reading
        // pauses through backpressure) until it is back. Permanent errors still fail.
        .set("message.timeout.ms", "0")
        .set("queue.buffering.max.messages", "200000");
    for (k, v) in &s.properties {
        c.set(k, v);
    }
    c.create()
}

struct Shared {
    producer: FutureProducer,
    settings: KafkaSinkSettings,
    metrics: Metrics,
    dead: DeadLetters,
}

impl Shared {
    fn topic(&self, meta: &Meta) -> String {
        meta.render_topic(meta.topic.as_deref().unwrap_or(&self.settings.topic))
    }

    /// Queues one event, waiting while the producer's queue is full.
    async fn enqueue(&self, topic: &str, key: &str, e: &Event) -> Result<DeliveryFuture, String> {
        let mut attempt = 0;
        loop {
            // The id travels in a header so the indexer writes the same document id.
            let headers = OwnedHeaders::new().insert(Header {
                key: crate::indexer::ID_HEADER,
                value: Some(e.id.as_str()),
            });
            let rec = FutureRecord::to(topic)
                .key(key)
                .payload(&e.body)
                .headers(headers);
            match self.producer.send_result(rec) {
                Ok(f) => return Ok(f),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Err((err, _)) => {
                    attempt += 1;
                    self.metrics.retries.with_label_values(&["kafka"]).inc();
                    if attempt >= MAX_ATTEMPTS {
                        return Err(err.to_string());
                    }
                    super::backoff(attempt).await;
                }
            }
        }
    }

    /// Queues the given events of a batch, in order.
    async fn enqueue_all(
        &self,
        batch: &Batch,
        todo: &[usize],
    ) -> Vec<(usize, Result<DeliveryFuture, String>)> {
        let mut out = Vec::with_capacity(todo.len());
        // Consecutive events mostly share their metadata; render topic and key once per run.
        let mut last: Option<(Arc<Meta>, String, String)> = None;
        for &i in todo {
            let e = &batch.events[i];
            if last
                .as_ref()
                .is_none_or(|(m, _, _)| !Arc::ptr_eq(m, &e.meta))
            {
                last = Some((e.meta.clone(), self.topic(&e.meta), e.meta.key()));
            }
            let Some((_, topic, key)) = &last else {
                continue;
            };
            out.push((i, self.enqueue(topic, key, e).await));
        }
        out
    }

    /// Waits for the delivery reports of a batch, re-sending failures; acknowledges the
    /// batch when every event is delivered or dead-lettered.
    async fn complete(
        &self,
        batch: &Batch,
        mut queued: Vec<(usize, Result<DeliveryFuture, String>)>,
    ) {
        let mut attempt = 0;
        loop {
            let mut retry = Vec::new();
            for (i, f) in queued {
                match f {
                    Ok(f) => match f.await {
                        Ok(Ok(_)) => {}
                        Ok(Err((err, _))) => retry.push((i, err.to_string())),
                        Err(_) => retry.push((i, "delivery report lost".to_string())),
                    },
                    Err(reason) => retry.push((i, reason)),
                }
            }
            if retry.is_empty() {
                break;
            }
            attempt += 1;
            self.metrics
                .retries
                .with_label_values(&["kafka"])
                .inc_by(retry.len() as u64);
            if attempt >= MAX_ATTEMPTS {
                for (i, reason) in &retry {
                    self.dead_letter(reason, &batch.events[*i]).await;
                }
                break;
            }
            tracing::warn!(events = retry.len(), reason = %retry[0].1, "kafka delivery failed; retrying");
            super::backoff(attempt).await;
            let todo: Vec<usize> = retry.into_iter().map(|(i, _)| i).collect();
            queued = self.enqueue_all(batch, &todo).await;
        }
        let bytes: usize = batch.events.iter().map(|e| e.body.len()).sum();
        self.metrics
            .lines_out
            .with_label_values(&["kafka"])
            .inc_by(batch.events.len() as u64);
        self.metrics
            .bytes_out
            .with_label_values(&["kafka"])
            .inc_by(bytes as u64);
        batch.ack.ack();
    }

    async fn dead_letter(&self, reason: &str, e: &Event) {
        let mut attempt = 0;
        // The dead-letter file is the last place an event can go; keep trying to write it
        // rather than drop the event.
        while let Err(err) = self.dead.write(reason, &e.body) {
            tracing::error!(error = %err, "cannot write kafka dead letter; retrying");
            super::backoff(attempt).await;
            attempt += 1;
        }
        self.metrics
            .dead_letters
            .with_label_values(&["kafka"])
            .inc();
    }
}

/// Runs the Kafka sink until its channel closes and every batch is delivered.
pub async fn run(
    producer: FutureProducer,
    settings: KafkaSinkSettings,
    mut rx: BatchReceiver,
    metrics: Metrics,
) {
    let sem = Arc::new(Semaphore::new(settings.inflight_batches.max(1)));
    let shared = Arc::new(Shared {
        producer,
        dead: DeadLetters::new(&settings.dead_letter_path),
        settings,
        metrics,
    });
    let mut tasks = JoinSet::new();
    while let Some(batch) = rx.recv().await {
        let Ok(permit) = sem.clone().acquire_owned().await else {
            break;
        };
        // Queue this batch's events here, in order, so that one key's events keep their
        // order; only waiting for the delivery reports happens concurrently.
        let all: Vec<usize> = (0..batch.events.len()).collect();
        let queued = shared.enqueue_all(&batch, &all).await;
        let s = shared.clone();
        tasks.spawn(async move {
            s.complete(&batch, queued).await;
            drop(permit);
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let _ = shared.producer.flush(Duration::from_secs(10));
}
