//! At least once across outages: with the Kafka broker absent and later crashed, and with
//! Elasticsearch refusing or losing answers, no line is lost, checkpoints do not move past
//! lines that are neither delivered nor in the disk buffer, reading pauses when the disk
//! buffer is full instead of buffering without bound, a file deleted while the broker is
//! away loses nothing once its lines are in the disk buffer (even across a crash), and
//! Elasticsearch holds no duplicate thanks to deterministic document ids.

mod common;

use std::io::Write;
use std::time::Duration;

use common::{EsMode, FlakyEs, PrivateKafka};
use lain_test_support::{LainProcess, eventually, require_es, require_kafka, temp_dir};

const KAFKA_OUT: &str = "lain_logship_lines_out_total{sink=\"kafka\"}";
const KAFKA_BUFFER: &str = "lain_logship_disk_buffer_bytes{sink=\"kafka\"}";
const KAFKA_RETRIES: &str = "lain_logship_retries_total{sink=\"kafka\"}";
const KAFKA_DEAD: &str = "lain_logship_dead_letters_total{sink=\"kafka\"}";

fn write_numbered(path: &std::path::Path, from: usize, to: usize) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    let mut buf = String::new();
    for i in from..to {
        buf.push_str(&format!("line {i:08} of the outage test\n"));
    }
    f.write_all(buf.as_bytes()).unwrap();
    f.sync_all().unwrap();
}

/// The checkpoint offset of the file at `path`, 0 when it has none yet.
async fn offset_of(admin: std::net::SocketAddr, path: &std::path::Path) -> u64 {
    common::checkpoints(admin)
        .await
        .iter()
        .filter(|e| e["path"] == path.display().to_string().as_str())
        .filter_map(|e| e["offset"].as_u64())
        .max()
        .unwrap_or(0)
}

/// A logship config reading `{dir}/logs/*.log` into `topic` on a broker at `port` that is
/// not there yet, with small batches and queues so that outages show quickly; `kafka`
/// adds lines to the Kafka sink's section. Returns the config path and the logs directory.
fn kafka_outage_config(
    dir: &std::path::Path,
    port: u16,
    topic: &str,
    kafka: &str,
) -> (String, std::path::PathBuf) {
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let cfg = common::agent_config(
        dir,
        "node1",
        &format!(
            r#"
scan_interval_ms = 100
batch_max_events = 500
queue_batches = 2
checkpoint_interval_ms = 200
buffer_spill_after_ms = 200
[[files]]
name = "app"
paths = ["{logs}/*.log"]
topic = "{topic}"
[sinks.kafka]
brokers = "127.0.0.1:{port}"
inflight_batches = 2
linger_ms = 5
{kafka}
"#,
            logs = logs.display(),
        ),
    );
    (cfg, logs)
}

/// Starts a private broker on `port` (in `dir/kafka`), waits until the Kafka sink
/// acknowledged `delivered` lines, and SIGKILLs it; returns the broker, to start again, and
/// when it went down.
async fn broker_crashing_after(
    dir: &std::path::Path,
    port: u16,
    admin: std::net::SocketAddr,
    delivered: u64,
) -> (PrivateKafka, std::time::Instant) {
    let kdir = dir.join("kafka");
    std::fs::create_dir_all(&kdir).unwrap();
    let mut kafka = PrivateKafka::prepare(&kdir, port);
    kafka.start();
    common::wait_metric(
        admin,
        KAFKA_OUT,
        Duration::from_secs(120),
        "delivery under way",
        move |v| v >= delivered,
    )
    .await;
    kafka.kill();
    (kafka, std::time::Instant::now())
}

/// Consumes `topic` until the `total` numbered lines were seen (or 180 s passed), asserts
/// none is missing, and returns how many arrived more than once.
async fn all_lines_in_kafka(brokers: String, topic: String, total: usize) -> u32 {
    let seen = tokio::task::spawn_blocking(move || {
        common::consume(
            &brokers,
            &topic,
            Duration::from_secs(180),
            |m| m.starts_with("line "),
            total,
        )
    })
    .await
    .unwrap();
    let mut missing = Vec::new();
    let mut duplicates = 0;
    for i in 0..total {
        match seen.get(&format!("line {i:08} of the outage test")) {
            None => missing.push(i),
            Some(&n) => duplicates += n - 1,
        }
    }
    assert!(
        missing.is_empty(),
        "{} lines lost, first {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    duplicates
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka_absent_then_crashed_loses_nothing() {
    // The shared broker must be there: its jars run the private one.
    let _ = require_kafka();
    let dir = temp_dir();
    let port = lain_test_support::free_port();
    let topic = common::unique("outage");
    let (cfg, logs) = kafka_outage_config(dir.path(), port, &topic, "buffer_max_bytes = 1048576");
    let log = logs.join("app.log");
    const FIRST: usize = 20_000;
    const TOTAL: usize = 40_000;
    write_numbered(&log, 0, FIRST);
    let p = LainProcess::spawn(&["logship", "--config", &cfg], &[], &["admin"]);
    let admin = p.addr("admin");

    // Phase 1: nothing listens on the broker's port. Lines go to the 1 MiB disk buffer
    // (acknowledged there, so the checkpoint moves) until it is full; then reading pauses.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let page = common::metrics_page(admin).await;
    let read = common::metric(&page, "lain_logship_lines_in_total{source=\"app\"}");
    assert_eq!(common::metric(&page, KAFKA_OUT), 0);
    assert!(read > 0, "the file is being read");
    assert!(
        read < FIRST as u64,
        "reading pauses while Kafka is away and the disk buffer is full, but {read} lines were read"
    );
    let on_disk = common::metric(&page, KAFKA_BUFFER);
    assert!(
        (1_048_576..3_000_000).contains(&on_disk),
        "the disk buffer holds {on_disk} bytes"
    );
    let offset = offset_of(admin, &log).await;
    let size = std::fs::metadata(&log).unwrap().len();
    assert!(
        offset > 0 && offset < size,
        "the checkpoint covers the buffered lines only: {offset} of {size}"
    );

    // Phase 2: the broker appears on that port; then it crashes mid-run and comes back.
    // The crash comes once delivery is under way (2,000 lines in), with the producer's
    // idempotence id settled. A kill in the first moments after the broker appears, while
    // the id is still being acquired, once left a replayed batch without delivery reports
    // (every line was in Kafka, but its disk-buffer segment stayed). The message timeout
    // bounds that case: what the producer holds comes back timed out and is sent again
    // (`kafka_timeouts_are_sent_again_until_the_broker_returns`).
    let (mut kafka, down) = broker_crashing_after(dir.path(), port, admin, 2_000).await;
    let brokers = kafka.brokers.clone();
    write_numbered(&log, FIRST, TOTAL);
    let stalled = common::metric(&common::metrics_page(admin).await, KAFKA_OUT);
    // The broker stays away for 20 s: the disk buffer fills again, then reading pauses.
    common::wait_metric(
        admin,
        KAFKA_BUFFER,
        Duration::from_secs(20),
        "the disk buffer full while the broker is down",
        |v| v >= 1_048_576,
    )
    .await;
    tokio::time::sleep_until((down + Duration::from_secs(20)).into()).await;
    let offset_while_down = offset_of(admin, &log).await;
    let size = std::fs::metadata(&log).unwrap().len();
    assert!(
        offset_while_down < size,
        "the checkpoint reached the end of the file while the broker was down"
    );
    kafka.start();

    let duplicates = all_lines_in_kafka(brokers, topic, TOTAL).await;
    println!("{TOTAL} lines, {duplicates} duplicates, {stalled} delivered before the crash");
    // The batches the sink held through both outages are delivered by the sink, not also
    // replayed from their disk copies; the idempotent producer's retries after the crash
    // are deduplicated by the broker. Allow at most the two batches in flight at the crash.
    assert!(
        duplicates <= 1_000,
        "{duplicates} duplicates: held batches were sent again"
    );
    eventually(Duration::from_secs(30), "the checkpoint at the end", || {
        let o = offset_of(admin, &log);
        async move { (o.await == size).then_some(()) }
    })
    .await;
    // The disk buffer drains once the broker takes everything again.
    common::wait_metric(
        admin,
        KAFKA_BUFFER,
        Duration::from_secs(30),
        "the disk buffer empty",
        |v| v == 0,
    )
    .await;
    let page = common::metrics_page(admin).await;
    assert_eq!(common::metric(&page, "lain_logship_dropped_total"), 0);
    assert_eq!(
        common::metric(&page, "lain_logship_dead_letters_total{sink=\"kafka\"}"),
        0
    );
    drop(p);
}

/// A message the producer holds longer than `message_timeout_secs` (in flight when the
/// broker crashed, or queued while it is away) comes back timed out and is sent again, for as
/// long as the broker stays away: a broker outage never turns lines into dead letters, and
/// nothing the producer holds can wait forever.
#[tokio::test(flavor = "multi_thread")]
async fn kafka_timeouts_are_sent_again_until_the_broker_returns() {
    let _ = require_kafka();
    let dir = temp_dir();
    let port = lain_test_support::free_port();
    let topic = common::unique("timeout");
    let (cfg, logs) = kafka_outage_config(dir.path(), port, &topic, "message_timeout_secs = 2");
    let log = logs.join("app.log");
    const FIRST: usize = 2_000;
    const TOTAL: usize = 6_000;
    write_numbered(&log, 0, FIRST);
    let p = LainProcess::spawn(&["logship", "--config", &cfg], &[], &["admin"]);
    let admin = p.addr("admin");

    let (mut kafka, down) = broker_crashing_after(dir.path(), port, admin, 500).await;
    let brokers = kafka.brokers.clone();
    write_numbered(&log, FIRST, TOTAL);
    common::wait_metric(
        admin,
        KAFKA_RETRIES,
        Duration::from_secs(20),
        "timed-out messages sent again",
        |v| v > 0,
    )
    .await;
    // Away for 20 s: ten message timeouts, more than the five attempts an event the broker
    // refuses gets before it becomes a dead letter.
    tokio::time::sleep_until((down + Duration::from_secs(20)).into()).await;
    let page = common::metrics_page(admin).await;
    assert_eq!(
        common::metric(&page, KAFKA_DEAD),
        0,
        "timed-out lines became dead letters while the broker was away"
    );
    let retries = common::metric(&page, KAFKA_RETRIES);
    kafka.start();

    let duplicates = all_lines_in_kafka(brokers, topic, TOTAL).await;
    println!("{TOTAL} lines, {duplicates} duplicates, {retries} retries while the broker was away");
    // A message that timed out in flight may have been written before the crash and is sent
    // again as a new message: at most the two batches in flight at the crash, and two more
    // for timeouts while the broker comes back. Held batches are not also replayed.
    assert!(
        duplicates <= 2_000,
        "{duplicates} duplicates: held batches were sent again"
    );
    common::wait_metric(
        admin,
        KAFKA_BUFFER,
        Duration::from_secs(30),
        "the disk buffer empty",
        |v| v == 0,
    )
    .await;
    let page = common::metrics_page(admin).await;
    assert_eq!(common::metric(&page, KAFKA_DEAD), 0);
    assert_eq!(common::metric(&page, "lain_logship_dropped_total"), 0);
    drop(p);
}

async fn es_count(es: &str, index: &str, query: serde_json::Value) -> u64 {
    let http = reqwest::Client::new();
    let _ = http.post(format!("{es}/{index}/_refresh")).send().await;
    let v: serde_json::Value = http
        .post(format!("{es}/{index}/_count"))
        .json(&serde_json::json!({ "query": query }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["count"].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn elasticsearch_failures_lose_nothing_and_duplicate_nothing() {
    let es = require_es();
    let flaky = FlakyEs::start(&es, EsMode::Unavailable).await;
    let dir = temp_dir();
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let prefix = common::unique("esout");
    let cfg = common::agent_config(
        dir.path(),
        "node1",
        &format!(
            r#"
scan_interval_ms = 100
batch_max_events = 200
queue_batches = 2
checkpoint_interval_ms = 200
buffer_spill_after_ms = 200
[[files]]
name = "app"
paths = ["{logs}/*.log"]
app = "outage"
[sinks.elasticsearch]
url = "http://{addr}"
index_prefix = "{prefix}"
flush_interval_ms = 100
bulk_max_bytes = 65536
buffer_max_bytes = 262144
"#,
            logs = logs.display(),
            addr = flaky.addr,
        ),
    );
    let log = logs.join("app.log");
    // More than one 256 KiB read, so that reading visibly pauses.
    const TOTAL: usize = 20_000;
    write_numbered(&log, 0, TOTAL);
    let p = LainProcess::spawn(&["logship", "--config", &cfg], &[], &["admin"]);
    let admin = p.addr("admin");
    let index = format!("{prefix}-*");

    // Down: 503 for everything, then 429.
    tokio::time::sleep(Duration::from_secs(3)).await;
    flaky.set(EsMode::TooMany);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let page = common::metrics_page(admin).await;
    let read = common::metric(&page, "lain_logship_lines_in_total{source=\"app\"}");
    assert!(
        read < TOTAL as u64,
        "reading pauses once the disk buffer is full, but {read} lines were read"
    );
    assert!(flaky.failures() >= 2, "logship kept retrying");
    assert!(
        common::metric(
            &page,
            "lain_logship_disk_buffer_bytes{sink=\"elasticsearch\"}"
        ) > 0
    );
    let size = std::fs::metadata(&log).unwrap().len();
    assert!(offset_of(admin, &log).await < size, "checkpoint at the end");

    // Indexed, but the answers are lost: the retries must not create second documents.
    flaky.set(EsMode::IndexedThenLost);
    // The first of these requests may be the index template's; wait for indexed lines.
    eventually(
        Duration::from_secs(60),
        "lines indexed with lost answers",
        || {
            let c = es_count(&es, &index, serde_json::json!({"match_all": {}}));
            async move { (c.await > 0).then_some(()) }
        },
    )
    .await;
    assert!(offset_of(admin, &log).await < size, "checkpoint at the end");
    flaky.set(EsMode::Forward);
    eventually(
        Duration::from_secs(120),
        "the checkpoint at the end",
        || {
            let o = offset_of(admin, &log);
            async move { (o.await == size).then_some(()) }
        },
    )
    .await;
    let total = es_count(&es, &index, serde_json::json!({"match_all": {}})).await;
    assert_eq!(total, TOTAL as u64, "every line exactly once");
    // Spot-check that the documents are the lines, first and last included.
    for i in [0, TOTAL / 2, TOTAL - 1] {
        let q = serde_json::json!({"match_phrase": {"message": format!("line {i:08}")}});
        assert_eq!(es_count(&es, &index, q).await, 1, "line {i}");
    }
    let page = common::metrics_page(admin).await;
    assert!(common::metric(&page, "lain_logship_retries_total{sink=\"elasticsearch\"}") > 0);
    assert_eq!(common::metric(&page, "lain_logship_dropped_total"), 0);
    drop(p);
    common::drop_es_indices(&es, &prefix).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_deleted_while_kafka_is_away_loses_nothing_even_across_a_crash() {
    let _ = require_kafka();
    let dir = temp_dir();
    let port = lain_test_support::free_port();
    let topic = common::unique("deleted");
    let (cfg, logs) = kafka_outage_config(dir.path(), port, &topic, "");
    const EACH: usize = 5_000;
    let first = logs.join("a.log");
    write_numbered(&first, 0, EACH);
    let size = std::fs::metadata(&first).unwrap().len();
    let mut p = LainProcess::spawn(&["logship", "--config", &cfg], &[], &["admin"]);
    let admin = p.addr("admin");

    // The broker is away: the whole file goes to the disk buffer and is acknowledged there,
    // except what the sink itself holds. Then the file is deleted, as a rotation that
    // outlives the outage would, and logship is killed.
    eventually(Duration::from_secs(60), "a.log checkpointed", || {
        let o = offset_of(admin, &first);
        async move { (o.await == size).then_some(()) }
    })
    .await;
    let page = common::metrics_page(admin).await;
    let spilled = common::metric(
        &page,
        "lain_logship_disk_buffer_spilled_total{sink=\"kafka\"}",
    );
    assert!(spilled > 0, "nothing went to the disk buffer");
    assert_eq!(common::metric(&page, KAFKA_OUT), 0);
    std::fs::remove_file(&first).unwrap();
    p.kill();

    // More lines in another file; logship starts again, still without a broker, then the
    // broker comes.
    write_numbered(&logs.join("b.log"), EACH, 2 * EACH);
    let p = LainProcess::spawn(&["logship", "--config", &cfg], &[], &["admin"]);
    let admin = p.addr("admin");
    let kdir = dir.path().join("kafka");
    std::fs::create_dir_all(&kdir).unwrap();
    let mut kafka = PrivateKafka::prepare(&kdir, port);
    kafka.start();
    let brokers = kafka.brokers.clone();
    all_lines_in_kafka(brokers, topic, 2 * EACH).await;
    // The replayed records are deleted once Kafka acknowledged them. (A record confirmed
    // while the stage was looking over the replayed ones used to be forgotten, which kept
    // its segment, and every one after it, on disk for good; see the buffer's unit tests.)
    common::wait_metric(
        admin,
        KAFKA_BUFFER,
        Duration::from_secs(60),
        "the disk buffer empty",
        |v| v == 0,
    )
    .await;
    let left = std::fs::read_dir(dir.path().join("state").join("buffer").join("kafka"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(left, 0, "segment files left");
    assert_eq!(
        common::metric(
            &common::metrics_page(admin).await,
            "lain_logship_dropped_total"
        ),
        0
    );
    drop(p);
}
