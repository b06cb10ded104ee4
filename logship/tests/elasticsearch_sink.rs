//! `lain logship` to OpenSearch/Elasticsearch: lines arrive with ECS and LAIN fields, are
//! found by a Discover-shaped search, and a line conflicting with the mapping goes to the
//! dead-letter file while the rest are indexed; a new file on a reused inode loses no line;
//! an app's JSON fields never block the access lines that share its index.

mod common;

use std::io::Write;
use std::time::Duration;

use lain_test_support::{LainProcess, eventually, require_es, temp_dir};

async fn search(
    http: reqwest::Client,
    base: String,
    body: serde_json::Value,
) -> Option<Vec<serde_json::Value>> {
    let _ = http.post(format!("{base}/_refresh")).send().await;
    let r = http
        .post(format!("{base}/_search"))
        .json(&body)
        .send()
        .await
        .ok()?;
    let v: serde_json::Value = r.json().await.ok()?;
    v["hits"]["hits"].as_array().cloned()
}

/// One test's agent: a `logs/` directory, an index prefix of its own and a config with
/// `files` (TOML `[[files]]` tables, `{logs}` standing for the directory) shipping to it.
struct Setup {
    dir: tempfile::TempDir,
    logs: std::path::PathBuf,
    es: String,
    prefix: String,
    cfg: String,
    http: reqwest::Client,
}

impl Setup {
    fn new(what: &str, files: &str) -> Setup {
        let es = require_es();
        let dir = temp_dir();
        let logs = dir.path().join("logs");
        std::fs::create_dir_all(&logs).unwrap();
        let prefix = common::unique(what);
        let files = files.replace("{logs}", &logs.display().to_string());
        let cfg = common::agent_config(
            dir.path(),
            "node1",
            &format!(
                "scan_interval_ms = 100\nmultiline_timeout_ms = 100\n{files}\n\
                 [sinks.elasticsearch]\nurl = \"{es}\"\nindex_prefix = \"{prefix}\"\n\
                 flush_interval_ms = 200\n"
            ),
        );
        Setup {
            dir,
            logs,
            es,
            prefix,
            cfg,
            http: reqwest::Client::new(),
        }
    }

    fn spawn(&self) -> LainProcess {
        LainProcess::spawn(&["logship", "--config", &self.cfg], &[], &["admin"])
    }

    /// The hits of a search body over this test's indices.
    fn search(
        &self,
        body: serde_json::Value,
    ) -> impl Future<Output = Option<Vec<serde_json::Value>>> + use<> {
        search(
            self.http.clone(),
            format!("{}/{}-*", self.es, self.prefix),
            body,
        )
    }

    /// Stops the agent (it must exit cleanly) and deletes this test's indices and template.
    async fn finish(self, mut p: LainProcess) {
        assert!(
            p.terminate(Duration::from_secs(20))
                .is_some_and(|s| s.success())
        );
        common::drop_es_indices(&self.es, &self.prefix).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn lines_are_indexed_searchable_and_conflicts_dead_lettered() {
    let t = Setup::new(
        "es",
        r#"
[[files]]
name = "app"
paths = ["{logs}/*.log"]
app = "hello"
proc = "web"
podgroup = "hello.web.web"
instance = "1"
version = "v3"
"#,
    );
    let logs = &t.logs;
    let log = logs.join("app.log");
    let mut f = std::fs::File::create(&log).unwrap();
    for i in 0..50 {
        writeln!(f, "request {i} served needle-{} ERROR maybe", i % 5).unwrap();
    }
    writeln!(f, r#"{{"msg":"typed","n":5}}"#).unwrap();
    f.flush().unwrap();
    let p = t.spawn();
    let search = |body: serde_json::Value| t.search(body);
    let all = lain_logship::discover_query("hello", Some("web"), Duration::from_secs(900), None);
    eventually(Duration::from_secs(60), "51 documents", || {
        let s = search(all.clone());
        async move { s.await.filter(|h| h.len() >= 51) }
    })
    .await;
    // The conflicting line comes after the mapping of `n` exists.
    writeln!(f, r#"{{"msg":"conflict","n":"not a number"}}"#).unwrap();
    writeln!(f, "after the conflict needle-9").unwrap();
    f.flush().unwrap();
    let dead = t.dir.path().join("state/dead-letters/elasticsearch.ndjson");
    let dead_text = eventually(Duration::from_secs(60), "a dead letter", || {
        let t = std::fs::read_to_string(&dead).unwrap_or_default();
        async move { (!t.is_empty()).then_some(t) }
    })
    .await;
    assert!(
        dead_text.contains("mapper_parsing_exception")
            || dead_text.contains("document_parsing_exception"),
        "{dead_text}"
    );
    assert!(dead_text.contains("conflict"), "{dead_text}");
    let q = lain_logship::discover_query(
        "hello",
        Some("web"),
        Duration::from_secs(900),
        Some("\"needle-9\""),
    );
    let hits = eventually(
        Duration::from_secs(60),
        "the line after the conflict",
        || {
            let s = search(q.clone());
            async move { s.await.filter(|h| !h.is_empty()) }
        },
    )
    .await;
    assert_eq!(hits.len(), 1);
    let d = &hits[0]["_source"];
    assert_eq!(d["message"], "after the conflict needle-9");
    assert_eq!(d["lain"]["app"], "hello");
    assert_eq!(d["lain"]["proc"], "web");
    assert_eq!(d["lain"]["podgroup"], "hello.web.web");
    assert_eq!(d["lain"]["instance"], "1");
    assert_eq!(d["lain"]["version"], "v3");
    assert_eq!(d["service"]["name"], "hello");
    assert_eq!(d["host"]["name"], "node1");
    assert_eq!(d["event"]["dataset"], "app");
    assert!(d["@timestamp"].is_string());
    let q = lain_logship::discover_query(
        "hello",
        None,
        Duration::from_secs(900),
        Some("\"needle-3\" AND log.level:error"),
    );
    let hits = search(q).await.unwrap();
    assert_eq!(hits.len(), 10, "{hits:#?}");
    let other = lain_logship::discover_query("other-app", None, Duration::from_secs(900), None);
    assert!(search(other).await.unwrap().is_empty());
    let metrics = reqwest::get(format!("http://{}/metrics", p.addr("admin")))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("lain_logship_dead_letters_total{sink=\"elasticsearch\"} 1"),
        "{metrics}"
    );
    t.finish(p).await;
}

/// A log file deleted and a new one created take the same inode on ext4. Event ids come
/// from the file's identity and the line's offset, and Elasticsearch's `create` drops an id
/// it already holds; with the inode as a young file's identity, the new file's lines took
/// the old file's ids and were silently dropped as already indexed.
#[tokio::test(flavor = "multi_thread")]
async fn a_new_file_on_a_reused_inode_is_indexed_in_full() {
    use std::os::unix::fs::MetadataExt;
    let t = Setup::new(
        "inode",
        r#"
[[files]]
name = "app"
paths = ["{logs}/*.log"]
app = "hello"
proc = "web"
"#,
    );
    let logs = &t.logs;
    let count = |word: &'static str| {
        t.search(lain_logship::discover_query(
            "hello",
            None,
            Duration::from_secs(900),
            Some(word),
        ))
    };
    // Lines of equal length in both files, so every line of the second starts at an offset
    // where a line of the first started.
    let write = |word: &str| {
        let body: String = (0..20).map(|i| format!("{word} line {i:02}\n")).collect();
        std::fs::write(logs.join("app.log"), body).unwrap();
    };
    write("alpha");
    let ino = std::fs::metadata(logs.join("app.log")).unwrap().ino();
    let mut p = t.spawn();
    eventually(Duration::from_secs(60), "the first file's 20 lines", || {
        let s = count("alpha");
        async move { s.await.filter(|h| h.len() == 20) }
    })
    .await;
    assert!(
        p.terminate(Duration::from_secs(20))
            .is_some_and(|s| s.success())
    );

    // The file is replaced while the agent is down, as when a container is replaced.
    std::fs::remove_file(logs.join("app.log")).unwrap();
    let mut reused = false;
    for i in 0..100 {
        write("bravo");
        if std::fs::metadata(logs.join("app.log")).unwrap().ino() == ino {
            reused = true;
            break;
        }
        // Park the file that got another inode outside the watched pattern and try again.
        std::fs::rename(
            logs.join("app.log"),
            t.dir.path().join(format!("parked-{i}")),
        )
        .unwrap();
    }
    assert!(reused, "the file system never gave inode {ino} out again");
    let p = t.spawn();
    let hits = eventually(
        Duration::from_secs(30),
        "the second file's 20 lines",
        || {
            let s = count("bravo");
            async move { s.await.filter(|h| h.len() == 20) }
        },
    )
    .await;
    assert!(hits.iter().all(|h| {
        h["_source"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("bravo line "))
    }));
    assert_eq!(count("alpha").await.map(|h| h.len()), Some(20));
    t.finish(p).await;
}

/// App lines and the proxy's access lines share each day's index. An app's JSON line with
/// its own `error`, `url` or `user_agent` string, indexed first, used to fix those names as
/// strings for the day, and every access line (which has them as ECS objects) was then
/// refused into the dead-letter file. The access fields are also typed for Kibana: status
/// codes as numbers, client addresses as IPs.
#[tokio::test(flavor = "multi_thread")]
async fn app_json_fields_never_block_access_lines_in_the_shared_index() {
    use lain_proxy::access_log::AccessLine;
    let t = Setup::new(
        "shared",
        r#"
[[files]]
name = "app"
paths = ["{logs}/app.log"]
app = "hello"
proc = "web"
parse_json = true
[[files]]
name = "access"
paths = ["{logs}/access.log"]
format = "proxy_access"
"#,
    );
    let logs = &t.logs;
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    std::fs::write(
        logs.join("app.log"),
        format!(
            "{{\"time\":\"{now}\",\"msg\":\"app line\",\"error\":\"boom\",\"url\":\"/u\",\"user_agent\":\"ua\",\"http\":\"x\",\"source\":\"s\"}}\n"
        ),
    )
    .unwrap();
    let p = t.spawn();
    let find = |query: serde_json::Value| t.search(serde_json::json!({"query": query}));
    let app = eventually(Duration::from_secs(60), "the app line", || {
        let s = find(serde_json::json!({"term": {"event.dataset": "app"}}));
        async move { s.await.filter(|h| h.len() == 1) }
    })
    .await;
    assert_eq!(app[0]["_source"]["json"]["error"], "boom");

    // Only now the access lines, after the app line had its say about the mapping.
    let mut body = String::new();
    for (i, status) in [200u16, 404, 502].into_iter().enumerate() {
        let line = AccessLine {
            time: now.clone(),
            client_ip: format!("10.1.2.{i}"),
            method: "GET".into(),
            host: "hello.lain.local".into(),
            path: format!("/p/{i}?q=1"),
            status,
            bytes_in: 0,
            bytes_out: 10,
            duration_ms: 1.5,
            upstream: Some("127.0.0.1:9000".into()),
            upstream_ms: Some(1.0),
            app: Some("hello".into()),
            proc: Some("web".into()),
            route: Some("hello.lain.local/".into()),
            request_id: format!("r{i}"),
            user_agent: "curl/8".into(),
            error: (status == 502).then(|| "upstream refused".to_string()),
        };
        body.push_str(&serde_json::to_string(&line).unwrap());
        body.push('\n');
    }
    std::fs::write(logs.join("access.log"), body).unwrap();
    eventually(Duration::from_secs(30), "the three access lines", || {
        let s = find(serde_json::json!({"term": {"event.dataset": "lain.access"}}));
        async move { s.await.filter(|h| h.len() == 3) }
    })
    .await;
    // What Kibana sends for "status 400 and up from 10.1.2.0/24".
    let errors = find(serde_json::json!({"bool": {"filter": [
        {"range": {"http.response.status_code": {"gte": 400}}},
        {"term": {"source.ip": "10.1.2.0/24"}},
        {"term": {"lain.app": "hello"}}
    ]}}))
    .await
    .unwrap();
    let mut ids: Vec<String> = errors
        .iter()
        .map(|h| {
            h["_source"]["http"]["request"]["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    ids.sort();
    assert_eq!(ids, ["r1", "r2"]);
    let metrics = common::metrics_page(p.addr("admin")).await;
    assert_eq!(
        common::metric(
            &metrics,
            "lain_logship_dead_letters_total{sink=\"elasticsearch\"}"
        ),
        0,
        "{metrics}"
    );
    t.finish(p).await;
}
