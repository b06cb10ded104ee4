//! Proves that each service the harness starts is real and reachable through the clients
//! lain itself uses: rdkafka for Kafka, the `elasticsearch` crate for the search node, and
//! bollard for every Docker engine.

use std::time::Duration;

use futures::StreamExt;
use lain_test_support::{require_docker_nodes, require_es, require_kafka, unique_prefix};

#[tokio::test]
async fn kafka_message_is_produced_and_consumed_with_rdkafka() {
    use rdkafka::ClientConfig;
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::Message;
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let brokers = require_kafka();
    let topic = format!(
        "harness-{}",
        unique_prefix("kafka")
            .replace('/', "-")
            .trim_start_matches('-')
    );
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", "30000")
        .create()
        .expect("producer");
    let payload = format!("hello from {topic}");
    producer
        .send(
            FutureRecord::to(&topic).key("k").payload(&payload),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| e)
        .expect("delivery");

    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", &topic)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    consumer.subscribe(&[&topic]).expect("subscribe");
    let msg = tokio::time::timeout(Duration::from_secs(60), consumer.stream().next())
        .await
        .expect("no message within 60 s")
        .expect("stream ended")
        .expect("kafka error");
    assert_eq!(msg.payload_view::<str>().unwrap().unwrap(), payload);
    assert_eq!(msg.key(), Some(&b"k"[..]));
}

#[tokio::test]
async fn document_is_bulk_indexed_and_found_with_search() {
    use elasticsearch::http::transport::Transport;
    use elasticsearch::{BulkParts, Elasticsearch, SearchParts, indices::IndicesRefreshParts};
    use serde_json::{Value, json};

    let url = require_es();
    let client = Elasticsearch::new(Transport::single_node(&url).expect("transport"));
    let index = format!("harness-{}", rand_suffix());
    let body: Vec<elasticsearch::http::request::JsonBody<Value>> = vec![
        json!({"create": {"_index": index, "_id": "1"}}).into(),
        json!({"@timestamp": "2026-01-01T00:00:00Z", "message": "needle in the haystack"}).into(),
        json!({"create": {"_index": index, "_id": "2"}}).into(),
        json!({"@timestamp": "2026-01-01T00:00:01Z", "message": "just hay"}).into(),
    ];
    let resp = client
        .bulk(BulkParts::None)
        .body(body)
        .send()
        .await
        .expect("bulk");
    assert!(
        resp.status_code().is_success(),
        "bulk status {}",
        resp.status_code()
    );
    let bulk: Value = resp.json().await.expect("bulk json");
    assert_eq!(bulk["errors"], json!(false), "{bulk}");
    client
        .indices()
        .refresh(IndicesRefreshParts::Index(&[&index]))
        .send()
        .await
        .expect("refresh");
    let found: Value = client
        .search(SearchParts::Index(&[&index]))
        .body(json!({"query": {"match": {"message": "needle"}}}))
        .send()
        .await
        .expect("search")
        .json()
        .await
        .expect("search json");
    assert_eq!(found["hits"]["total"]["value"], json!(1), "{found}");
    assert_eq!(found["hits"]["hits"][0]["_id"], json!("1"));
    client
        .indices()
        .delete(elasticsearch::indices::IndicesDeleteParts::Index(&[&index]))
        .send()
        .await
        .expect("delete index");
}

fn rand_suffix() -> String {
    unique_prefix("x")
        .rsplit('-')
        .next()
        .unwrap_or("0")
        .to_string()
}

#[tokio::test]
async fn container_runs_and_its_stdout_is_read_on_each_docker_engine() {
    use bollard::Docker;
    use bollard::models::{ContainerCreateBody, HostConfig};
    use bollard::query_parameters::{
        CreateContainerOptionsBuilder, LogsOptionsBuilder, RemoveContainerOptionsBuilder,
        WaitContainerOptions,
    };

    let nodes = require_docker_nodes();
    assert!(
        nodes.len() >= 2,
        "LAIN_DOCKER_NODES should name two engines, got {nodes:?}"
    );
    let mut ids = std::collections::BTreeSet::new();
    for (i, node) in nodes.iter().enumerate() {
        let path = node.strip_prefix("unix://").expect("unix socket engine");
        let docker =
            Docker::connect_with_unix(path, 30, bollard::API_DEFAULT_VERSION).expect("connect");
        let info = docker
            .info()
            .await
            .unwrap_or_else(|e| panic!("engine {node} does not answer: {e}"));
        ids.insert(info.id.unwrap_or_default());
        let name = format!("lain-harness-{}-{i}", rand_suffix());
        let text = format!("hello from engine {i}");
        docker
            .create_container(
                Some(CreateContainerOptionsBuilder::new().name(&name).build()),
                ContainerCreateBody {
                    image: Some("lain/busybox:latest".into()),
                    cmd: Some(vec!["/bin/echo".into(), text.clone()]),
                    host_config: Some(HostConfig {
                        network_mode: Some("host".into()),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            )
            .await
            .unwrap_or_else(|e| panic!("create on {node}: {e}"));
        docker.start_container(&name, None).await.expect("start");
        let exit = docker
            .wait_container(&name, None::<WaitContainerOptions>)
            .next()
            .await
            .expect("wait stream")
            .expect("wait");
        assert_eq!(exit.status_code, 0);
        let logs: Vec<String> = docker
            .logs(
                &name,
                Some(LogsOptionsBuilder::new().stdout(true).stderr(true).build()),
            )
            .map(|l| l.expect("log").to_string())
            .collect()
            .await;
        assert_eq!(logs.concat().trim(), text);
        docker
            .remove_container(
                &name,
                Some(RemoveContainerOptionsBuilder::new().force(true).build()),
            )
            .await
            .expect("remove");
        let gone = docker.inspect_container(&name, None).await;
        assert!(gone.is_err(), "container {name} still exists on {node}");
    }
    assert_eq!(
        ids.len(),
        nodes.len(),
        "the engines should be distinct, got ids {ids:?}"
    );
}
