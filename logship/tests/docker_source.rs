//! `lain logship` reading a real container's json-file log: LAIN labels become fields,
//! Docker's 16 KiB partial records are joined, stream and timestamps are kept.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use bollard::Docker;
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{CreateContainerOptions, RemoveContainerOptions};
use lain_test_support::{LainProcess, eventually, require_docker_nodes, temp_dir};

#[tokio::test(flavor = "multi_thread")]
async fn container_lines_arrive_with_lain_fields_and_joined_partials() {
    let host = require_docker_nodes().remove(0);
    let docker = Docker::connect_with_unix(&host, 30, bollard::API_DEFAULT_VERSION)
        .unwrap()
        .negotiate_version()
        .await
        .unwrap();
    let name = common::unique("busybox");
    let labels: HashMap<String, String> = [
        ("lain.app", "hello"),
        ("lain.proc", "web"),
        ("lain.podgroup", "hello.web.web"),
        ("lain.instance", "3"),
        ("lain.version", "v9"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let script = "i=0; while [ $i -lt 100 ]; do echo \"hello line $i\"; i=$((i+1)); done; \
                  head -c 40000 /dev/zero | tr '\\0' y; echo; echo oops >&2; echo done; sleep 2";
    let dir = temp_dir();
    let cfg = common::agent_config(
        dir.path(),
        "node1",
        &format!(
            r#"
scan_interval_ms = 100
rotate_wait_ms = 500
[docker]
host = "{host}"
only_lain = true
[sinks.file]
path = "{out}"
"#,
            out = dir.path().join("out.ndjson").display(),
        ),
    );
    let created = docker
        .create_container(
            Some(CreateContainerOptions {
                name: Some(name.clone()),
                ..Default::default()
            }),
            ContainerCreateBody {
                image: Some("lain/busybox:latest".into()),
                cmd: Some(vec!["sh".into(), "-c".into(), script.into()]),
                labels: Some(labels),
                host_config: Some(HostConfig {
                    network_mode: Some("none".into()),
                    ..Default::default()
                }),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    docker.start_container(&created.id, None).await.unwrap();
    // Started after the container, logship finds it in its first listing: without
    // `read_from_end` its log is still read from the start.
    let mut p = LainProcess::spawn(&["logship", "--config", &cfg], &[], &["admin"]);
    let out_path = dir.path().join("out.ndjson");
    let result = eventually(Duration::from_secs(60), "the container's last line", || {
        let text = std::fs::read_to_string(&out_path).unwrap_or_default();
        let id = created.id.clone();
        async move {
            let docs: Vec<serde_json::Value> = text
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect();
            // This container's: the engine may hold stopped containers of earlier runs.
            docs.iter()
                .any(|d| d["message"] == "done" && d["container"]["id"] == id.as_str())
                .then_some(docs)
        }
    })
    .await;
    let _ = docker
        .remove_container(
            &created.id,
            Some(RemoveContainerOptions {
                force: true,
                ..Default::default()
            }),
        )
        .await;
    let mine: Vec<&serde_json::Value> = result
        .iter()
        .filter(|d| d["container"]["id"] == created.id.as_str())
        .collect();
    assert_eq!(mine.len(), 103, "{mine:#?}");
    // Docker copies stdout and stderr separately, so only each stream keeps its order.
    let out: Vec<&serde_json::Value> = mine
        .iter()
        .copied()
        .filter(|d| d["stream"] == "stdout")
        .collect();
    assert_eq!(out.len(), 102);
    assert_eq!(out[101]["message"], "done");
    for (i, d) in out.iter().take(100).enumerate() {
        assert_eq!(d["message"], format!("hello line {i}"));
    }
    let first = out[0];
    assert_eq!(first["stream"], "stdout");
    assert_eq!(first["lain"]["app"], "hello");
    assert_eq!(first["lain"]["proc"], "web");
    assert_eq!(first["lain"]["podgroup"], "hello.web.web");
    assert_eq!(first["lain"]["instance"], "3");
    assert_eq!(first["lain"]["version"], "v9");
    assert_eq!(first["service"]["name"], "hello");
    assert_eq!(first["container"]["name"], name.as_str());
    assert_eq!(first["container"]["image"]["name"], "lain/busybox:latest");
    assert_eq!(first["event"]["dataset"], "hello.web.web");
    assert_eq!(first["host"]["name"], "node1");
    let long = out[100]["message"].as_str().unwrap();
    assert_eq!(long.len(), 40000, "partial records joined into one line");
    assert!(long.bytes().all(|b| b == b'y'));
    assert!(out[100].get("tags").is_none());
    let err = mine.iter().find(|d| d["message"] == "oops").unwrap();
    assert_eq!(err["stream"], "stderr");
    assert!(
        p.terminate(Duration::from_secs(20))
            .is_some_and(|s| s.success())
    );
}
