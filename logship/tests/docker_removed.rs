//! A container removed while logship is still behind on its log: the lines it had not read
//! yet are still shipped (from the descriptor it holds), exactly once; and the files the
//! instance writes to its `/lain/logs` volume are shipped with the instance's metadata.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use bollard::Docker;
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{CreateContainerOptions, RemoveContainerOptions};
use common::{EsMode, FlakyEs};
use lain_test_support::{LainProcess, eventually, require_docker_nodes, require_es, temp_dir};

async fn es_count(es: &str, index: &str, filter: serde_json::Value) -> u64 {
    let http = reqwest::Client::new();
    let _ = http.post(format!("{es}/{index}/_refresh")).send().await;
    let v: serde_json::Value = http
        .post(format!("{es}/{index}/_count"))
        .json(&serde_json::json!({"query": {"bool": {"filter": filter}}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["count"].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn removed_container_lines_and_log_volume_files_are_shipped() {
    let es = require_es();
    let host = require_docker_nodes().remove(0);
    let docker = Docker::connect_with_unix(&host, 30, bollard::API_DEFAULT_VERSION)
        .unwrap()
        .negotiate_version()
        .await
        .unwrap();
    // Elasticsearch is away at first, so logship falls behind on the container's log.
    let flaky = FlakyEs::start(&es, EsMode::Unavailable).await;
    let dir = temp_dir();
    let app = common::unique("gone").replace('-', "");
    let prefix = common::unique("removed");
    let volume = dir.path().join("volume/lain/logs");
    std::fs::create_dir_all(&volume).unwrap();
    let cfg = common::agent_config(
        dir.path(),
        "node1",
        &format!(
            r#"
scan_interval_ms = 100
rotate_wait_ms = 500
batch_max_events = 100
queue_batches = 1
[docker]
host = "{host}"
only_lain = true
[sinks.elasticsearch]
url = "http://{addr}"
index_prefix = "{prefix}"
flush_interval_ms = 100
bulk_max_bytes = 65536
"#,
            addr = flaky.addr,
        ),
    );
    let p = LainProcess::spawn(&["logship", "--config", &cfg], &[], &["admin"]);
    let admin = p.addr("admin");
    const OUT: usize = 20_000;
    const FILE: usize = 2_000;
    let podgroup = format!("{app}.web.web");
    let labels: HashMap<String, String> = [
        ("lain.app", app.as_str()),
        ("lain.proc", "web"),
        ("lain.podgroup", podgroup.as_str()),
        ("lain.instance", "4"),
        ("lain.version", "v2"),
        ("lain.logs", "app.log"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let script = format!(
        "i=0; while [ $i -lt {FILE} ]; do echo \"file line $i\"; i=$((i+1)); done >> /lain/logs/app.log; \
         echo ignored > /lain/logs/other.txt; \
         i=0; while [ $i -lt {OUT} ]; do echo \"stdout line $i of the removed container\"; i=$((i+1)); done"
    );
    let created = docker
        .create_container(
            Some(CreateContainerOptions {
                name: Some(common::unique("removed")),
                ..Default::default()
            }),
            ContainerCreateBody {
                image: Some("lain/busybox:latest".into()),
                cmd: Some(vec!["sh".into(), "-c".into(), script]),
                labels: Some(labels),
                host_config: Some(HostConfig {
                    network_mode: Some("none".into()),
                    binds: Some(vec![format!("{}:/lain/logs", volume.display())]),
                    ..Default::default()
                }),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let id = created.id.clone();
    docker.start_container(&id, None).await.unwrap();
    let log_path = docker
        .inspect_container(&id, None)
        .await
        .unwrap()
        .log_path
        .unwrap();
    eventually(Duration::from_secs(120), "the container to finish", || {
        let d = docker.clone();
        let id = id.clone();
        async move {
            let i = d.inspect_container(&id, None).await.ok()?;
            (i.state?.running == Some(false)).then_some(())
        }
    })
    .await;
    let page = common::metrics_page(admin).await;
    let read = common::metric(&page, "lain_logship_lines_in_total{source=\"docker\"}");
    assert!(read > 0, "logship found the container");
    assert!(
        read < OUT as u64,
        "logship should still be behind when the container is removed, but read {read} records"
    );
    docker
        .remove_container(
            &id,
            Some(RemoveContainerOptions {
                force: true,
                ..Default::default()
            }),
        )
        .await
        .unwrap();
    assert!(
        !std::path::Path::new(&log_path).exists(),
        "the engine deleted the container's log"
    );
    flaky.set(EsMode::Forward);

    let index = format!("{prefix}-*");
    let mine = serde_json::json!([{"term": {"lain.app": app}}, {"term": {"container.id": id}}]);
    eventually(Duration::from_secs(180), "every stdout line", || {
        let mut f = mine.clone();
        f.as_array_mut()
            .unwrap()
            .push(serde_json::json!({"term": {"stream": "stdout"}}));
        let c = es_count(&es, &index, f);
        async move { (c.await >= OUT as u64).then_some(()) }
    })
    .await;
    let file_filter = |extra: serde_json::Value| {
        let mut f = mine.clone();
        f.as_array_mut().unwrap().push(extra);
        f
    };
    let volume_file = volume.join("app.log").display().to_string();
    eventually(
        Duration::from_secs(60),
        "every line of the log volume",
        || {
            let c = es_count(
                &es,
                &index,
                file_filter(serde_json::json!({"term": {"log.file.path": volume_file}})),
            );
            async move { (c.await >= FILE as u64).then_some(()) }
        },
    )
    .await;
    // Settle, then the counts must be exact: nothing lost, nothing twice.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stdout = es_count(
        &es,
        &index,
        file_filter(serde_json::json!({"term": {"stream": "stdout"}})),
    )
    .await;
    assert_eq!(stdout, OUT as u64, "stdout lines exactly once");
    let files = es_count(
        &es,
        &index,
        file_filter(serde_json::json!({"term": {"log.file.path": volume_file}})),
    )
    .await;
    assert_eq!(files, FILE as u64, "log volume lines exactly once");
    assert_eq!(
        es_count(&es, &index, mine.clone()).await,
        (OUT + FILE) as u64,
        "only the declared file of the volume (not other.txt) is shipped"
    );
    let http = reqwest::Client::new();
    let _ = http.post(format!("{es}/{index}/_refresh")).send().await;
    let hit: serde_json::Value = http
        .post(format!("{es}/{index}/_search"))
        .json(
            &serde_json::json!({"size": 1, "query": {"bool": {"filter": file_filter(
            serde_json::json!({"match_phrase": {"message": "file line 1999"}}))}}}),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let d = &hit["hits"]["hits"][0]["_source"];
    assert_eq!(d["message"], "file line 1999");
    assert_eq!(d["lain"]["podgroup"], podgroup.as_str());
    assert_eq!(d["lain"]["instance"], "4");
    assert_eq!(d["lain"]["version"], "v2");
    assert_eq!(d["container"]["id"], id.as_str());
    drop(p);
    common::drop_es_indices(&es, &prefix).await;
    // The container wrote the volume as root; the temporary directory is removed by its
    // owner's rights where possible.
    let _ = std::fs::remove_dir_all(&volume);
}
