//! The Kafka sink: an idempotent rdkafka producer (`acks=all`) whose delivery reports
//! acknowledge batches. Topics come from a template (`{podgroup}` for app logs,
//! `{host}.access` for access logs); the key is the instance, so one instance's lines stay in
//! order within a partition.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientConfig, ClientContext};
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;

use super::DeadLetters;
use crate::event::Meta;
use crate::metrics::Metrics;
use crate::pipeline::{Batch, BatchReceiver};

/// An event the broker refuses (a permanent error) is tried this many times before it goes
/// to the dead letters. Timeouts and an absent broker are not refusals: those events are
/// sent again however long the broker is away.
const MAX_ATTEMPTS: u32 = 5;

/// Rounds of retries back off up to `backoff(MAX_BACKOFF_STEP)` (6.4 s) apart.
const MAX_BACKOFF_STEP: u32 = 6;

/// A batch waiting this long for its delivery reports is logged (and again at each further
/// interval), so that a batch that never completes, and so keeps its disk-buffer segment,
/// can be told apart from a slow broker.
const SLOW_REPORTS: Duration = Duration::from_secs(30);

/// How often a batch waiting for its delivery reports checks the producer for a fatal
/// error.
const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// How long after its producer was replaced a batch still waits for reports the old one
/// flushes while it is dropped.
const REPORTS_AFTER_REPLACE: Duration = Duration::from_secs(3);

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
    /// `message.timeout.ms` in seconds: how long the producer holds a message before it
    /// reports it timed out (and the sink sends it again).
    pub message_timeout_secs: u64,
    /// Batches being delivered at once.
    pub inflight_batches: usize,
    /// Where refused events go.
    pub dead_letter_path: std::path::PathBuf,
    /// Extra librdkafka properties.
    pub properties: Vec<(String, String)>,
}

/// One event of a batch that was not delivered.
#[derive(Debug)]
struct Failure {
    /// The event's index in its batch.
    index: usize,
    reason: String,
    /// Whether the failure says nothing about the event itself (it timed out, or no broker
    /// took it), so that it is sent again without counting as an attempt.
    transient: bool,
}

impl Failure {
    fn new(index: usize, err: &KafkaError) -> Failure {
        Failure {
            index,
            reason: err.to_string(),
            transient: err.rdkafka_error_code().is_some_and(is_transient),
        }
    }
}

/// Errors that come from the broker being away, slow or moving partitions, or from the
/// producer instance, not from the message: librdkafka gives up on such a message only when
/// `message.timeout.ms` expired, a request timed out, or the producer hit a fatal error
/// (which fails or purges what it holds; the sink then replaces the producer), and the same
/// message is expected to succeed later.
fn is_transient(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        code,
        C::Fatal
            | C::PurgeQueue
            | C::PurgeInflight
            | C::MessageTimedOut
            | C::OperationTimedOut
            | C::RequestTimedOut
            | C::TimedOutQueue
            | C::AllBrokersDown
            | C::BrokerTransportFailure
            | C::NetworkException
            | C::LeaderNotAvailable
            | C::NotLeaderForPartition
            | C::PreferredLeaderNotAvailable
            | C::FencedLeaderEpoch
            | C::UnknownLeaderEpoch
            | C::NotEnoughReplicas
            | C::NotEnoughReplicasAfterAppend
            | C::KafkaStorageError
            | C::ThrottlingQuotaExceeded
    )
}

/// The delivery reports of one batch (one attempt at it): how many are outstanding, which
/// events were reported, and which failed with what reason.
#[derive(Debug)]
struct Tracker {
    remaining: AtomicUsize,
    /// The events of this attempt (indices in the batch).
    todo: Vec<usize>,
    /// By index in the batch: whether the event's report came.
    reported: Vec<AtomicBool>,
    failed: Mutex<Vec<Failure>>,
    done: Notify,
    /// The producer the events were given to; once it is gone (replaced after a fatal
    /// error), a report that has not come never will.
    producer: Weak<KafkaProducer>,
}

impl Tracker {
    fn new(events: usize, todo: &[usize], producer: &Arc<KafkaProducer>) -> Arc<Tracker> {
        Arc::new(Tracker {
            remaining: AtomicUsize::new(todo.len()),
            todo: todo.to_vec(),
            reported: (0..events).map(|_| AtomicBool::new(false)).collect(),
            failed: Mutex::new(Vec::new()),
            done: Notify::new(),
            producer: Arc::downgrade(producer),
        })
    }

    /// The report of the event at `index` in the batch.
    fn report(&self, index: usize, failure: Option<Failure>) {
        if let Some(r) = self.reported.get(index) {
            r.store(true, Ordering::Release);
        }
        if let Some(f) = failure {
            self.failed
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(f);
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            // `notify_one` keeps a permit when nobody waits yet, so the wake-up is not lost.
            self.done.notify_one();
        }
    }

    async fn wait(&self) -> Vec<Failure> {
        while self.remaining.load(Ordering::Acquire) > 0 {
            self.done.notified().await;
        }
        std::mem::take(
            &mut *self
                .failed
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// The failures so far plus every event whose report has not come, as transient
    /// failures: for when the producer that held them is gone.
    fn abandon(&self) -> Vec<Failure> {
        let mut failed = std::mem::take(
            &mut *self
                .failed
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for &i in &self.todo {
            if !self.reported[i].load(Ordering::Acquire) {
                failed.push(Failure {
                    index: i,
                    reason: "no delivery report from a replaced producer".into(),
                    transient: true,
                });
            }
        }
        failed
    }
}

/// Which event of which batch a message is; handed back with its delivery report.
#[derive(Debug)]
pub struct Slot {
    tracker: Arc<Tracker>,
    index: usize,
}

/// Routes librdkafka's delivery reports to the batch trackers. Counting reports per batch
/// (rather than a future per message) keeps the per-line cost of the sink low.
#[derive(Debug, Default)]
pub struct Reports;

impl ClientContext for Reports {}

impl ProducerContext for Reports {
    type DeliveryOpaque = Box<Slot>;

    fn delivery(&self, result: &DeliveryResult<'_>, slot: Box<Slot>) {
        let failure = result
            .as_ref()
            .err()
            .map(|(e, _)| Failure::new(slot.index, e));
        slot.tracker.report(slot.index, failure);
    }
}

/// The producer the sink uses.
pub type KafkaProducer = ThreadedProducer<Reports>;

/// Builds the producer; fails on invalid settings.
pub fn producer(s: &KafkaSinkSettings) -> Result<KafkaProducer, KafkaError> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &s.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.type", &s.compression)
        .set("linger.ms", s.linger_ms.to_string())
        // A message the producer cannot deliver in this time comes back as timed out and
        // the sink sends it again, however long the broker is away: nothing waits inside
        // librdkafka without bound, and a timeout never makes a dead letter.
        .set(
            "message.timeout.ms",
            s.message_timeout_secs.saturating_mul(1000).to_string(),
        )
        .set("queue.buffering.max.messages", "200000");
    for (k, v) in &s.properties {
        c.set(k, v);
    }
    c.create_with_context(Reports)
}

struct Shared {
    /// Replaced when a fatal error makes it unusable.
    producer: Mutex<Arc<KafkaProducer>>,
    settings: KafkaSinkSettings,
    metrics: Metrics,
    dead: DeadLetters,
}

impl Shared {
    fn producer(&self) -> Arc<KafkaProducer> {
        self.producer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Replaces the producer when it hit a fatal error: an idempotent producer that cannot
    /// keep its guarantees stops producing for good, and every later line would otherwise
    /// fail. Dropping the old one purges what it still holds, whose delivery reports then
    /// send it again through the new one.
    async fn replace_if_fatal(&self) {
        let current = self.producer();
        let Some((code, reason)) = current.client().fatal_error() else {
            return;
        };
        let new = match producer(&self.settings) {
            Ok(p) => Arc::new(p),
            Err(e) => {
                tracing::error!(error = %e, "cannot create a new kafka producer; retrying");
                return;
            }
        };
        let old = {
            let mut slot = self
                .producer
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // Another batch may have replaced it meanwhile.
            if !Arc::ptr_eq(&slot, &current) {
                return;
            }
            std::mem::replace(&mut *slot, new)
        };
        drop(current);
        self.metrics.kafka_producer_replaced.inc();
        tracing::error!(code = ?code, reason = %reason, "kafka producer hit a fatal error; replaced it, its messages are sent again");
        // Dropping purges and flushes (up to half a second) and joins its polling thread.
        let _ = tokio::task::spawn_blocking(move || drop(old)).await;
    }

    fn topic(&self, meta: &Meta) -> String {
        meta.render_topic(meta.topic.as_deref().unwrap_or(&self.settings.topic))
    }

    /// Queues the given events of a batch, in order, waiting while the producer's queue is
    /// full; returns the tracker of their delivery reports. An event the producer refuses
    /// outright is reported as failed at once.
    async fn enqueue_all(&self, batch: &Batch, todo: &[usize]) -> Arc<Tracker> {
        let producer = self.producer();
        let tracker = Tracker::new(batch.events.len(), todo, &producer);
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
            // The id travels in a header so the indexer writes the same document id.
            let headers = OwnedHeaders::new_with_capacity(1).insert(Header {
                key: crate::indexer::ID_HEADER,
                value: Some(e.id.as_str()),
            });
            let mut record = BaseRecord::with_opaque_to(
                topic.as_str(),
                Box::new(Slot {
                    tracker: tracker.clone(),
                    index: i,
                }),
            )
            .key(key.as_str())
            .payload(&e.body)
            .headers(headers);
            let mut attempt = 0;
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        record = r;
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    Err((err @ KafkaError::MessageProduction(RDKafkaErrorCode::Fatal), r)) => {
                        // The producer is unusable: no point trying it again.
                        r.delivery_opaque
                            .tracker
                            .report(i, Some(Failure::new(i, &err)));
                        break;
                    }
                    Err((err, r)) => {
                        attempt += 1;
                        self.metrics.retries.with_label_values(&["kafka"]).inc();
                        if attempt >= MAX_ATTEMPTS {
                            // Reported as a failure of this attempt; `complete` decides
                            // whether the event is tried again.
                            r.delivery_opaque
                                .tracker
                                .report(i, Some(Failure::new(i, &err)));
                            break;
                        }
                        record = r;
                        super::backoff(attempt).await;
                    }
                }
            }
        }
        tracker
    }

    /// Waits for the delivery reports of a batch, re-sending failures; acknowledges the
    /// batch when every event is delivered or dead-lettered. An event goes to the dead
    /// letters after [`MAX_ATTEMPTS`] refusals; timeouts and an absent broker are retried
    /// until the event is delivered.
    async fn complete(&self, batch: &Batch, mut tracker: Arc<Tracker>) {
        let mut refusals: HashMap<usize, u32> = HashMap::new();
        let mut round = 0;
        loop {
            let mut failed = self.wait_reports(batch, &tracker).await;
            if failed.is_empty() {
                break;
            }
            failed.sort_by_key(|f| f.index);
            round += 1;
            self.metrics
                .retries
                .with_label_values(&["kafka"])
                .inc_by(failed.len() as u64);
            let mut retry = Vec::with_capacity(failed.len());
            for f in failed {
                if f.transient {
                    retry.push(f);
                    continue;
                }
                let n = refusals.entry(f.index).or_default();
                *n += 1;
                if *n >= MAX_ATTEMPTS {
                    self.dead_letter(&f.reason, &batch.events[f.index].body)
                        .await;
                } else {
                    retry.push(f);
                }
            }
            let Some(first) = retry.first() else {
                break;
            };
            self.replace_if_fatal().await;
            tracing::warn!(
                events = retry.len(),
                reason = %first.reason,
                transient = first.transient,
                round,
                "kafka delivery failed; sending again"
            );
            super::backoff(round.min(MAX_BACKOFF_STEP)).await;
            let todo: Vec<usize> = retry.into_iter().map(|f| f.index).collect();
            tracker = self.enqueue_all(batch, &todo).await;
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

    /// Waits for the delivery reports of one attempt at a batch, warning while they are late.
    async fn wait_reports(&self, batch: &Batch, tracker: &Tracker) -> Vec<Failure> {
        let started = Instant::now();
        let mut warn_at = started + SLOW_REPORTS;
        let mut gone_since: Option<Instant> = None;
        loop {
            // `wait` re-checks the count each time it is entered, so cancelling it on the
            // timeout loses no report.
            if let Ok(failed) = tokio::time::timeout(CHECK_INTERVAL, tracker.wait()).await {
                return failed;
            }
            // A producer that hit a fatal error neither sends nor reports what it holds
            // until it is dropped.
            self.replace_if_fatal().await;
            if tracker.producer.strong_count() == 0 {
                // Dropping a replaced producer purges what it holds and flushes the reports
                // for half a second; a report not out soon after is lost with it.
                let since = *gone_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= REPORTS_AFTER_REPLACE {
                    tracing::warn!(
                        outstanding = tracker.remaining.load(Ordering::Acquire),
                        "kafka reports lost with a replaced producer; sending those events again"
                    );
                    return tracker.abandon();
                }
            }
            if Instant::now() >= warn_at {
                warn_at += SLOW_REPORTS;
                tracing::warn!(
                    events = batch.events.len(),
                    outstanding = tracker.remaining.load(Ordering::Acquire),
                    producer_in_flight = self.producer().in_flight_count(),
                    waited_secs = started.elapsed().as_secs(),
                    "kafka batch still waiting for delivery reports"
                );
            }
        }
    }

    async fn dead_letter(&self, reason: &str, body: &[u8]) {
        let mut attempt = 0;
        // The dead-letter file is the last place an event can go; keep trying to write it
        // rather than drop the event.
        while let Err(err) = self.dead.write(reason, body) {
            tracing::error!(error = %err, "cannot write kafka dead letter; retrying");
            super::backoff(attempt).await;
            attempt += 1;
        }
        self.metrics
            .dead_letters
            .with_label_values(&["kafka"])
            .inc();
        self.dead.warn("kafka", reason);
    }
}

/// Runs the Kafka sink until its channel closes and every batch is delivered.
pub async fn run(
    producer: KafkaProducer,
    settings: KafkaSinkSettings,
    mut rx: BatchReceiver,
    metrics: Metrics,
) {
    let sem = Arc::new(Semaphore::new(settings.inflight_batches.max(1)));
    let shared = Arc::new(Shared {
        producer: Mutex::new(Arc::new(producer)),
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
        let tracker = shared.enqueue_all(&batch, &all).await;
        let s = shared.clone();
        tasks.spawn(async move {
            s.complete(&batch, tracker).await;
            drop(permit);
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let _ = shared.producer().flush(Duration::from_secs(10));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_and_broker_outages_are_transient_refusals_are_not() {
        let timed_out = KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut);
        let too_large = KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge);
        let no_broker = KafkaError::MessageProduction(RDKafkaErrorCode::AllBrokersDown);
        let bad_topic = KafkaError::MessageProduction(RDKafkaErrorCode::TopicAuthorizationFailed);
        assert!(Failure::new(0, &timed_out).transient);
        assert!(Failure::new(0, &no_broker).transient);
        // A fatal producer error says nothing about the message: the producer is replaced.
        let fatal = KafkaError::MessageProduction(RDKafkaErrorCode::Fatal);
        let purged = KafkaError::MessageProduction(RDKafkaErrorCode::PurgeQueue);
        assert!(Failure::new(0, &fatal).transient);
        assert!(Failure::new(0, &purged).transient);
        assert!(!Failure::new(0, &too_large).transient);
        assert!(!Failure::new(0, &bad_topic).transient);
        // An error without a librdkafka code is not known to pass by itself.
        assert!(!Failure::new(0, &KafkaError::Canceled).transient);
    }
}
