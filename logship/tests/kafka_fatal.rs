//! A Kafka producer that hits a fatal error is replaced, and nothing but the event that
//! caused it is lost to Kafka. The fatal error comes from the real broker: with
//! `enable.gapless.guarantee`, a message the topic refuses as too large leaves a gap the
//! idempotent producer may not skip, which librdkafka treats as fatal; from then on that
//! producer instance refuses every message.

mod common;

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;

use lain_test_support::{LainProcess, require_kafka, temp_dir};

const KAFKA_DEAD: &str = "lain_logship_dead_letters_total{sink=\"kafka\"}";
const REPLACED: &str = "lain_logship_kafka_producers_replaced_total";

#[tokio::test(flavor = "multi_thread")]
async fn a_fatal_producer_error_replaces_the_producer_and_loses_nothing_else() {
    let brokers = require_kafka();
    let topic = common::unique("fatal");
    // The topic takes record batches up to 2 KiB; the sink's batches stay under that.
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    let created = admin
        .create_topics(
            &[NewTopic::new(&topic, 1, TopicReplication::Fixed(1))
                .set("max.message.bytes", "2048")],
            &AdminOptions::new(),
        )
        .await
        .unwrap();
    assert!(created.iter().all(Result::is_ok), "{created:?}");

    let dir = temp_dir();
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    const LINES: usize = 3_000;
    const BIG: usize = 1_000;
    let mut text = String::new();
    for i in 0..LINES {
        if i == BIG {
            text.push_str(&format!("big {}\n", "x".repeat(4_000)));
        } else {
            text.push_str(&format!("line {i:08} of the fatal test\n"));
        }
    }
    std::fs::write(logs.join("app.log"), text).unwrap();
    let cfg = common::agent_config(
        dir.path(),
        "node1",
        &format!(
            r#"
scan_interval_ms = 100
batch_max_events = 200
[[files]]
name = "app"
paths = ["{logs}/*.log"]
topic = "{topic}"
[sinks.kafka]
brokers = "{brokers}"
compression = "none"
linger_ms = 5
properties = {{ "enable.gapless.guarantee" = "true", "batch.size" = "1500" }}
"#,
            logs = logs.display(),
        ),
    );
    let p = LainProcess::spawn(&["logship", "--config", &cfg], &[], &["admin"]);
    let admin_addr = p.addr("admin");

    let (b, t) = (brokers.clone(), topic.clone());
    let seen = tokio::task::spawn_blocking(move || {
        common::consume(
            &b,
            &t,
            Duration::from_secs(120),
            |m| m.starts_with("line "),
            LINES - 1,
        )
    })
    .await
    .unwrap();
    let missing: Vec<usize> = (0..LINES)
        .filter(|&i| i != BIG)
        .filter(|i| !seen.contains_key(&format!("line {i:08} of the fatal test")))
        .collect();
    assert!(
        missing.is_empty(),
        "{} lines lost, first {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    // The refused line is the one dead letter, after its attempts; each attempt made the
    // producer fatal again, and each time it was replaced.
    common::wait_metric(
        admin_addr,
        KAFKA_DEAD,
        Duration::from_secs(60),
        "the big line dead-lettered",
        |v| v == 1,
    )
    .await;
    let page = common::metrics_page(admin_addr).await;
    assert!(
        common::metric(&page, REPLACED) >= 1,
        "no producer was replaced"
    );
    assert_eq!(common::metric(&page, KAFKA_DEAD), 1);
    assert_eq!(common::metric(&page, "lain_logship_dropped_total"), 0);
    let dead = std::fs::read_to_string(dir.path().join("state/dead-letters/kafka.ndjson")).unwrap();
    assert_eq!(dead.lines().count(), 1, "{dead}");
    assert!(dead.contains("big xxxx"), "{dead}");
    drop(p);
}
