//! Helpers shared by the logship integration tests: configs, line writers, Kafka consumers.

#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};

/// A unique name for topics and indices.
pub fn unique(what: &str) -> String {
    format!(
        "logship-{what}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

/// Writes `config` to `dir/logship.toml` and returns its path as a string.
pub fn write_config(dir: &Path, config: &str) -> String {
    let p = dir.join("logship.toml");
    std::fs::write(&p, config).unwrap();
    p.display().to_string()
}

/// Reads messages of `topic` until `want` distinct `message` values for which `valid` holds
/// were seen or `timeout` passes; returns how often each `message` value was seen.
pub fn consume(
    brokers: &str,
    topic: &str,
    timeout: Duration,
    valid: impl Fn(&str) -> bool,
    want: usize,
) -> HashMap<String, u32> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("consumer"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut seen: HashMap<String, u32> = HashMap::new();
    let deadline = Instant::now() + timeout;
    let mut distinct = 0;
    while Instant::now() < deadline && distinct < want {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let v: serde_json::Value =
                    serde_json::from_slice(m.payload().unwrap_or(b"")).unwrap();
                let msg = v["message"].as_str().unwrap_or_default().to_string();
                let c = seen.entry(msg.clone()).or_insert(0);
                *c += 1;
                if *c == 1 && valid(&msg) {
                    distinct += 1;
                }
            }
            Some(Err(e)) => {
                let s = e.to_string();
                // The topic may not exist until the first message was produced.
                assert!(
                    s.contains("UnknownTopic") || s.contains("Unknown topic"),
                    "consumer error: {s}"
                );
            }
            None => {}
        }
    }
    seen
}

/// Reads the first message of `topic`.
pub fn first_message(brokers: &str, topic: &str, timeout: Duration) -> Option<serde_json::Value> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("consumer"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            return serde_json::from_slice(m.payload().unwrap_or(b"")).ok();
        }
    }
    None
}
