//! `lain logs`: an app's lines found in real OpenSearch with the Discover-shaped search
//! (proc and instance filters, a query string, `-n`, `--follow`), and in the local file
//! sink's output when no Elasticsearch is given.

mod common;

use std::io::Write;
use std::time::Duration;

use lain_test_support::{LainProcess, eventually, require_es, run_lain, temp_dir};

fn config(dir: &std::path::Path, sink: &str) -> String {
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    common::agent_config(
        dir,
        "node1",
        &format!(
            r#"
scan_interval_ms = 100
multiline_timeout_ms = 100
[[files]]
name = "web1"
paths = ["{logs}/web1.log"]
app = "{{app}}"
proc = "web"
podgroup = "{{app}}.web.web"
instance = "1"
[[files]]
name = "web2"
paths = ["{logs}/web2.log"]
app = "{{app}}"
proc = "web"
podgroup = "{{app}}.web.web"
instance = "2"
[[files]]
name = "worker"
paths = ["{logs}/worker.log"]
app = "{{app}}"
proc = "worker"
podgroup = "{{app}}.worker.worker"
instance = "1"
{sink}
"#,
            logs = logs.display(),
        ),
    )
}

fn append(dir: &std::path::Path, file: &str, lines: &[String]) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("logs").join(file))
        .unwrap();
    for l in lines {
        writeln!(f, "{l}").unwrap();
    }
}

fn numbered(what: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{what} line {i:03}")).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn lain_logs_searches_elasticsearch_and_follows() {
    let es = require_es();
    let dir = temp_dir();
    let app = common::unique("logs").replace('-', "");
    let prefix = common::unique("logscli");
    let cfg = config(
        dir.path(),
        &format!(
            "[sinks.elasticsearch]\nurl = \"{es}\"\nindex_prefix = \"{prefix}\"\nflush_interval_ms = 100\n"
        ),
    );
    std::fs::write(
        &cfg,
        std::fs::read_to_string(&cfg)
            .unwrap()
            .replace("{app}", &app),
    )
    .unwrap();
    append(dir.path(), "web1.log", &numbered("web1", 30));
    append(dir.path(), "web2.log", &numbered("web2", 30));
    append(
        dir.path(),
        "worker.log",
        &[
            "worker started".into(),
            "worker ERROR timeout talking to db".into(),
        ],
    );
    let _p = LainProcess::spawn(&["logship", "--config", &cfg], &[], &["admin"]);
    let base = [
        "logs",
        "--es",
        es.as_str(),
        "--index-prefix",
        prefix.as_str(),
    ];
    let logs = |extra: &[&str]| {
        let mut a: Vec<&str> = base.to_vec();
        a.push(app.as_str());
        a.extend_from_slice(extra);
        let a: Vec<String> = a.iter().map(|s| s.to_string()).collect();
        async move {
            tokio::task::spawn_blocking(move || {
                let a: Vec<&str> = a.iter().map(String::as_str).collect();
                run_lain(&a, None)
            })
            .await
            .unwrap()
        }
    };
    let all = eventually(Duration::from_secs(60), "all 62 lines", || {
        let r = logs(&["-n", "1000"]);
        async move {
            let (code, out, err) = r.await;
            assert_eq!(code, 0, "{err}");
            (out.lines().count() == 62).then_some(out)
        }
    })
    .await;
    // Oldest first, each instance's lines in order.
    let web1: Vec<&str> = all.lines().filter(|l| l.contains(".web.web.1 ")).collect();
    assert_eq!(web1.len(), 30);
    for (i, l) in web1.iter().enumerate() {
        assert!(l.ends_with(&format!("web1 line {i:03}")), "{l}");
    }
    let (_, out, _) = logs(&["--proc", "worker"]).await;
    assert_eq!(out.lines().count(), 2, "{out}");
    let (_, out, _) = logs(&["--proc", "web", "--instance", "2", "-n", "5"]).await;
    let got: Vec<&str> = out.lines().collect();
    assert_eq!(got.len(), 5, "{out}");
    assert!(got[0].ends_with("web2 line 025"), "{out}");
    assert!(got[4].ends_with("web2 line 029"), "{out}");
    let (_, out, _) = logs(&["log.level:error AND timeout"]).await;
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(out.contains("worker ERROR timeout talking to db"), "{out}");
    let (code, _, err) = logs(&["--since", "5y"]).await;
    assert_ne!(code, 0);
    assert!(err.contains("unit"), "{err}");

    // --follow prints what is written after it started, once each.
    let follower = logs(&[
        "--proc",
        "worker",
        "--follow",
        "--follow-timeout-secs",
        "12",
        "--poll-interval-ms",
        "200",
    ]);
    let follower = tokio::spawn(follower);
    tokio::time::sleep(Duration::from_secs(2)).await;
    append(dir.path(), "worker.log", &numbered("later", 10));
    let (code, out, err) = follower.await.unwrap();
    assert_eq!(code, 0, "{err}");
    let later: Vec<&str> = out.lines().filter(|l| l.contains("later line")).collect();
    assert_eq!(later.len(), 10, "{out}");
    for (i, l) in later.iter().enumerate() {
        assert!(l.ends_with(&format!("later line {i:03}")), "{out}");
    }
    assert_eq!(out.lines().count(), 12, "{out}");
    common::drop_es_indices(&es, &prefix).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn lain_logs_reads_the_file_sink_without_elasticsearch() {
    let dir = temp_dir();
    let out_file = dir.path().join("out.ndjson");
    let cfg = config(
        dir.path(),
        &format!("[sinks.file]\npath = \"{}\"\n", out_file.display()),
    );
    std::fs::write(
        &cfg,
        std::fs::read_to_string(&cfg)
            .unwrap()
            .replace("{app}", "filed"),
    )
    .unwrap();
    append(dir.path(), "web1.log", &numbered("web1", 10));
    append(dir.path(), "worker.log", &numbered("worker", 3));
    let _p = LainProcess::spawn(&["logship", "--config", &cfg], &[], &["admin"]);
    let f = out_file.display().to_string();
    eventually(Duration::from_secs(30), "13 lines in the file sink", || {
        let t = std::fs::read_to_string(&out_file).unwrap_or_default();
        async move { (t.lines().count() >= 13).then_some(()) }
    })
    .await;
    let (code, out, err) = run_lain(&["logs", "--file", &f, "filed", "-n", "4"], None);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 4, "{out}");
    let (_, out, _) = run_lain(&["logs", "--file", &f, "filed", "--proc", "worker"], None);
    let got: Vec<&str> = out.lines().collect();
    assert_eq!(got.len(), 3, "{out}");
    assert!(
        got[0].ends_with("filed.worker.worker.1 worker line 000"),
        "{out}"
    );
    let (_, out, _) = run_lain(&["logs", "--file", &f, "filed", "line 007"], None);
    assert_eq!(out.lines().count(), 1, "{out}");
    let (_, out, _) = run_lain(&["logs", "--file", &f, "other"], None);
    assert!(out.is_empty(), "{out}");
}
