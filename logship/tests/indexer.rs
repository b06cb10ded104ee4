//! Indexer mode: Kafka → Elasticsearch with a SIGKILL in the middle; every message ends up
//! indexed exactly once (deterministic ids absorb the re-reads).

mod common;

use std::time::Duration;

use lain_test_support::{LainProcess, eventually, require_es, require_kafka, temp_dir};
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};

const MESSAGES: u64 = 20_000;

async fn count(http: &reqwest::Client, es: &str, prefix: &str) -> Option<u64> {
    let _ = http.post(format!("{es}/{prefix}-*/_refresh")).send().await;
    let v: serde_json::Value = http
        .get(format!("{es}/{prefix}-*/_count"))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    v["count"].as_u64()
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka_to_elasticsearch_survives_sigkill() {
    let brokers = require_kafka();
    let es = require_es();
    let topic = common::unique("indexer");
    let prefix = common::unique("idx");
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("linger.ms", "20")
        .create()
        .unwrap();
    let now = chrono::Utc::now().to_rfc3339();
    let mut futs = Vec::new();
    for i in 0..MESSAGES {
        let body = serde_json::json!({"@timestamp": now, "message": format!("n {i}"), "lain": {"app": "hello"}}).to_string();
        let key = format!("k{}", i % 7);
        futs.push(
            producer
                .send_result(FutureRecord::to(&topic).key(&key).payload(&body))
                .unwrap(),
        );
        if futs.len() >= 5000 {
            for f in futs.drain(..) {
                f.await.unwrap().unwrap();
            }
        }
    }
    for f in futs {
        f.await.unwrap().unwrap();
    }
    let dir = temp_dir();
    let cfg = common::write_config(
        dir.path(),
        &format!(
            r#"
state_dir = "{state}"
[admin]
listen = "127.0.0.1:0"
[limits]
batch_max_events = 500
[indexer]
brokers = "{brokers}"
group_id = "{group}"
topics = ["{topic}"]
batch_wait_ms = 100
[sinks.elasticsearch]
url = "{es}"
index_prefix = "{prefix}"
flush_interval_ms = 100
bulk_max_bytes = 200000
"#,
            state = dir.path().join("state").display(),
            group = common::unique("group"),
        ),
    );
    let http = reqwest::Client::new();
    let mut p = LainProcess::spawn(&["logship", "--indexer", "--config", &cfg], &[], &["admin"]);
    eventually(Duration::from_secs(60), "some documents", || {
        let (http, es, prefix) = (http.clone(), es.clone(), prefix.clone());
        async move { count(&http, &es, &prefix).await.filter(|c| *c >= 2000) }
    })
    .await;
    p.kill();
    let mut p = LainProcess::spawn(&["logship", "--indexer", "--config", &cfg], &[], &["admin"]);
    let n = eventually(Duration::from_secs(120), "every message indexed", || {
        let (http, es, prefix) = (http.clone(), es.clone(), prefix.clone());
        async move { count(&http, &es, &prefix).await.filter(|c| *c >= MESSAGES) }
    })
    .await;
    assert_eq!(
        n, MESSAGES,
        "no duplicates: ids come from topic, partition and offset"
    );
    assert!(
        p.terminate(Duration::from_secs(20))
            .is_some_and(|s| s.success())
    );
    common::drop_es_indices(&es, &prefix).await;
}

/// One Kafka message whose payload holds a raw newline breaks the framing of the bulk
/// request it travels in, and Elasticsearch refuses the whole request: only that message
/// goes to the dead letters; the others in the same request are indexed.
#[tokio::test(flavor = "multi_thread")]
async fn a_message_that_breaks_a_bulk_request_costs_only_itself() {
    let brokers = require_kafka();
    let es = require_es();
    let topic = common::unique("broken");
    let prefix = common::unique("brk");
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    let now = chrono::Utc::now().to_rfc3339();
    for i in 0..30 {
        let body = if i == 15 {
            format!(
                "{{\"@timestamp\": \"{now}\", \"message\": \"broken\"}}\n{{\"not\": \"an action\"}}"
            )
        } else {
            serde_json::json!({"@timestamp": now, "message": format!("n {i}")}).to_string()
        };
        producer
            .send_result(FutureRecord::to(&topic).key("k").payload(&body))
            .unwrap()
            .await
            .unwrap()
            .unwrap();
    }
    let dir = temp_dir();
    let cfg = common::write_config(
        dir.path(),
        &format!(
            r#"
state_dir = "{state}"
[admin]
listen = "127.0.0.1:0"
[indexer]
brokers = "{brokers}"
group_id = "{group}"
topics = ["{topic}"]
batch_wait_ms = 500
[sinks.elasticsearch]
url = "{es}"
index_prefix = "{prefix}"
flush_interval_ms = 500
dead_letter_path = "{dead}"
"#,
            state = dir.path().join("state").display(),
            group = common::unique("group"),
            dead = dir.path().join("dead.ndjson").display(),
        ),
    );
    let http = reqwest::Client::new();
    let mut p = LainProcess::spawn(&["logship", "--indexer", "--config", &cfg], &[], &["admin"]);
    let admin = p.addr("admin");
    common::wait_metric(
        admin,
        "lain_logship_dead_letters_total{sink=\"elasticsearch\"}",
        Duration::from_secs(60),
        "the broken message dead-lettered",
        |v| v >= 1,
    )
    .await;
    let n = eventually(Duration::from_secs(30), "the others indexed", || {
        let (http, es, prefix) = (http.clone(), es.clone(), prefix.clone());
        async move { count(&http, &es, &prefix).await.filter(|c| *c >= 29) }
    })
    .await;
    assert_eq!(n, 29);
    let page = common::metrics_page(admin).await;
    assert_eq!(
        common::metric(
            &page,
            "lain_logship_dead_letters_total{sink=\"elasticsearch\"}"
        ),
        1
    );
    let dead = std::fs::read_to_string(dir.path().join("dead.ndjson")).unwrap_or_default();
    assert!(dead.contains("broken"), "{dead}");
    assert!(
        p.terminate(Duration::from_secs(20))
            .is_some_and(|s| s.success())
    );
    common::drop_es_indices(&es, &prefix).await;
}
