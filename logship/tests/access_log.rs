//! The proxy's JSON access log shipped to Kafka: lines written with the proxy's own
//! `AccessLine` type arrive on the topic `{host}.access` with ECS `http.*`, `url.*` and
//! `source.*` fields.

mod common;

use std::io::Write;
use std::time::Duration;

use lain_proxy::access_log::AccessLine;
use lain_test_support::{LainProcess, require_kafka, temp_dir};

#[tokio::test(flavor = "multi_thread")]
async fn access_lines_arrive_as_ecs_on_the_host_access_topic() {
    let brokers = require_kafka();
    let dir = temp_dir();
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let node = common::unique("node");
    let cfg = common::agent_config(
        dir.path(),
        &node,
        &format!(
            r#"
scan_interval_ms = 100
[[files]]
name = "access"
paths = ["{logs}/access.log*"]
format = "proxy_access"
[sinks.kafka]
brokers = "{brokers}"
linger_ms = 5
"#,
            logs = logs.display(),
        ),
    );
    let mut f = std::fs::File::create(logs.join("access.log")).unwrap();
    for i in 0..20u16 {
        let line = AccessLine {
            time: "2024-05-01T10:00:00.5Z".into(),
            client_ip: format!("10.0.0.{i}"),
            method: "GET".into(),
            host: "hello.lain.local".into(),
            path: format!("/items/{i}?page=2"),
            status: if i == 7 { 502 } else { 200 },
            bytes_in: 0,
            bytes_out: 100 + usize::from(i),
            duration_ms: 2.5,
            upstream: Some("127.0.0.1:9000".into()),
            upstream_ms: Some(2.0),
            app: Some("hello".into()),
            proc: Some("web".into()),
            route: Some("hello.lain.local/".into()),
            request_id: format!("req-{i}"),
            user_agent: "curl/8.5".into(),
            error: (i == 7).then(|| "upstream refused".to_string()),
        };
        serde_json::to_writer(&mut f, &line).unwrap();
        f.write_all(b"\n").unwrap();
    }
    f.flush().unwrap();
    let mut p = LainProcess::spawn(&["logship", "--config", &cfg], &[], &["admin"]);
    let topic = format!("{node}.access");
    let docs = tokio::task::spawn_blocking(move || {
        common::consume_docs(&brokers, &topic, Duration::from_secs(60), 20)
    })
    .await
    .unwrap();
    assert_eq!(docs.len(), 20, "every access line on {node}.access");
    let d = docs
        .iter()
        .find(|d| d["http"]["request"]["id"] == "req-7")
        .expect("line 7");
    assert_eq!(d["message"], "GET hello.lain.local/items/7?page=2 502");
    assert_eq!(d["log"]["level"], "error");
    assert_eq!(d["http"]["request"]["method"], "GET");
    assert_eq!(d["http"]["response"]["status_code"], 502);
    assert_eq!(d["http"]["response"]["body"]["bytes"], 107);
    assert_eq!(d["url"]["domain"], "hello.lain.local");
    assert_eq!(d["url"]["path"], "/items/7");
    assert_eq!(d["url"]["query"], "page=2");
    assert_eq!(d["source"]["ip"], "10.0.0.7");
    assert_eq!(d["user_agent"]["original"], "curl/8.5");
    assert_eq!(d["error"]["message"], "upstream refused");
    assert_eq!(d["event"]["duration"], 2_500_000);
    assert_eq!(d["event"]["dataset"], "lain.access");
    assert_eq!(d["lain"]["app"], "hello");
    assert_eq!(d["service"]["name"], "hello");
    assert_eq!(d["host"]["name"], node.as_str());
    assert_eq!(d["@timestamp"], "2024-05-01T10:00:00.500000000Z");
    let ok = docs
        .iter()
        .find(|d| d["http"]["request"]["id"] == "req-3")
        .unwrap();
    assert_eq!(ok["log"]["level"], "info");
    assert!(ok.get("error").is_none());
    assert!(
        p.terminate(Duration::from_secs(20))
            .is_some_and(|s| s.success())
    );
}
