//! `lain logship` to the local file sink: bad input (invalid UTF-8, a 1 MiB line, binary
//! garbage, multiline), a file deleted while being read, checkpoints across SIGTERM, and
//! `--check-config`.

mod common;

use std::io::Write;
use std::time::Duration;

use lain_test_support::{LainProcess, eventually, run_lain, temp_dir};

fn config(dir: &std::path::Path, extra: &str) -> String {
    common::agent_config(
        dir,
        "node1",
        &format!(
            r#"
scan_interval_ms = 100
rotate_wait_ms = 500
multiline_timeout_ms = 200
max_line_bytes = 4096
[[files]]
name = "app"
paths = ["{logs}/*.log"]
app = "hello"
proc = "web"
podgroup = "hello.web.web"
instance = "2"
version = "v7"
{extra}
[sinks.file]
path = "{out}"
"#,
            logs = dir.join("logs").display(),
            out = dir.join("out.ndjson").display(),
        ),
    )
}

fn output(dir: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("out.ndjson"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("each output line is JSON"))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_shipped_flagged_and_nothing_crashes() {
    let dir = temp_dir();
    std::fs::create_dir_all(dir.path().join("logs")).unwrap();
    let cfg = config(dir.path(), "");
    let mut f = std::fs::File::create(dir.path().join("logs/a.log")).unwrap();
    f.write_all(b"first INFO line\n").unwrap();
    f.write_all(b"bad \xff\xfe utf8\n").unwrap();
    f.write_all(&vec![b'x'; 1024 * 1024]).unwrap();
    f.write_all(b"\n").unwrap();
    let garbage: Vec<u8> = (0..4000u32)
        .map(|i| (i * 7919 % 251) as u8)
        .filter(|b| *b != b'\n')
        .collect();
    f.write_all(&garbage).unwrap();
    f.write_all(b"\nException: boom\n  at a.b(c.java:1)\n  at d.e(f.java:2)\n{\"msg\":\"json here\",\"level\":\"error\",\"user\":\"bob\"}\nlast\n").unwrap();
    drop(f);
    let mut p = LainProcess::spawn(&["logship", "--config", &cfg], &[], &["admin"]);
    let out = eventually(Duration::from_secs(30), "7 events in the output", || {
        let o = output(dir.path());
        async move { (o.len() >= 7).then_some(o) }
    })
    .await;
    assert_eq!(out.len(), 7, "{out:#?}");
    assert_eq!(out[0]["message"], "first INFO line");
    assert_eq!(out[0]["log"]["level"], "info");
    assert_eq!(out[0]["lain"]["podgroup"], "hello.web.web");
    assert_eq!(out[0]["lain"]["instance"], "2");
    assert_eq!(out[0]["service"]["name"], "hello");
    assert_eq!(out[0]["host"]["name"], "node1");
    assert!(
        out[0]["log"]["file"]["path"]
            .as_str()
            .unwrap()
            .ends_with("logs/a.log")
    );
    assert_eq!(out[1]["message"], "bad \u{fffd}\u{fffd} utf8");
    assert_eq!(out[1]["tags"], serde_json::json!(["invalid_utf8"]));
    assert_eq!(out[2]["message"].as_str().unwrap().len(), 4096);
    assert_eq!(out[2]["tags"], serde_json::json!(["truncated"]));
    assert!(
        out[3]["tags"]
            .as_array()
            .unwrap()
            .contains(&"invalid_utf8".into())
    );
    assert_eq!(
        out[4]["message"],
        "Exception: boom\n  at a.b(c.java:1)\n  at d.e(f.java:2)"
    );
    assert_eq!(out[4]["tags"], serde_json::json!(["multiline"]));
    assert_eq!(out[5]["message"], "json here");
    assert_eq!(out[5]["user"], "bob");
    assert_eq!(out[5]["log"]["level"], "error");
    assert_eq!(out[6]["message"], "last");
    let metrics = reqwest::get(format!("http://{}/metrics", p.addr("admin")))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("lain_logship_lines_out_total{sink=\"file\"} 7"),
        "{metrics}"
    );
    assert!(
        metrics.contains("lain_logship_dropped_total 0"),
        "{metrics}"
    );
    let status = p.terminate(Duration::from_secs(20));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_resumes_from_checkpoint_and_deleted_files_are_finished() {
    let dir = temp_dir();
    std::fs::create_dir_all(dir.path().join("logs")).unwrap();
    let cfg = config(dir.path(), "");
    let a = dir.path().join("logs/a.log");
    std::fs::write(
        &a,
        (0..1000).map(|i| format!("a {i}\n")).collect::<String>(),
    )
    .unwrap();
    let mut p = LainProcess::spawn(&["logship", "--config", &cfg], &[], &["admin"]);
    eventually(Duration::from_secs(30), "1000 events", || {
        let n = output(dir.path()).len();
        async move { (n >= 1000).then_some(()) }
    })
    .await;
    assert!(
        p.terminate(Duration::from_secs(20))
            .is_some_and(|s| s.success())
    );
    // More lines while it is down, then the file is deleted while logship reads it.
    let mut f = std::fs::OpenOptions::new().append(true).open(&a).unwrap();
    f.write_all(
        (1000..1500)
            .map(|i| format!("a {i}\n"))
            .collect::<String>()
            .as_bytes(),
    )
    .unwrap();
    let mut p = LainProcess::spawn(&["logship", "--config", &cfg], &[], &["admin"]);
    // Delete the file once logship has it open (a file deleted before it was ever opened
    // cannot be read by anyone).
    wait_open(&p).await;
    std::fs::remove_file(&a).unwrap();
    // The writer still holds the deleted file open and keeps writing.
    f.write_all(
        (1500..2000)
            .map(|i| format!("a {i}\n"))
            .collect::<String>()
            .as_bytes(),
    )
    .unwrap();
    let out = eventually(Duration::from_secs(30), "2000 events", || {
        let o = output(dir.path());
        async move { (o.len() >= 2000).then_some(o) }
    })
    .await;
    let msgs: Vec<String> = out
        .iter()
        .map(|v| v["message"].as_str().unwrap().to_string())
        .collect();
    let want: Vec<String> = (0..2000).map(|i| format!("a {i}")).collect();
    assert_eq!(
        msgs, want,
        "a clean restart re-reads nothing and loses nothing"
    );
    assert!(
        p.terminate(Duration::from_secs(20))
            .is_some_and(|s| s.success())
    );
}

/// Waits until the output holds exactly `want`, in order.
async fn wait_messages(dir: &std::path::Path, want: &[&str], what: &str) {
    eventually(Duration::from_secs(10), what, || {
        let m = messages(dir);
        async move { (m == want).then_some(()) }
    })
    .await;
}

/// Waits until logship has one file open.
async fn wait_open(p: &LainProcess) {
    let url = format!("http://{}/metrics", p.addr("admin"));
    eventually(Duration::from_secs(10), "the file to be open", || {
        let url = url.clone();
        async move {
            let m = reqwest::get(url).await.ok()?.text().await.ok()?;
            m.contains("lain_logship_files_open 1").then_some(())
        }
    })
    .await;
}

fn messages(dir: &std::path::Path) -> Vec<String> {
    output(dir)
        .iter()
        .map(|v| v["message"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_copytruncate_keeps_the_line_being_joined() {
    let dir = temp_dir();
    std::fs::create_dir_all(dir.path().join("logs")).unwrap();
    // The joiner holds each line until the next one starts, or for 30 s: far longer than
    // this test waits, so only the truncation can let the held line go.
    let cfg = common::agent_config(
        dir.path(),
        "node1",
        &format!(
            r#"
scan_interval_ms = 100
multiline_timeout_ms = 30000
[[files]]
name = "app"
paths = ["{logs}/app.log"]
[sinks.file]
path = "{out}"
"#,
            logs = dir.path().join("logs").display(),
            out = dir.path().join("out.ndjson").display(),
        ),
    );
    let log = dir.path().join("logs/app.log");
    std::fs::write(&log, "one\ntwo\n").unwrap();
    let mut p = LainProcess::spawn(&["logship", "--config", &cfg], &[], &["admin"]);
    wait_messages(dir.path(), &["one"], "the first line").await;
    // copytruncate: the content was copied elsewhere (not watched), the file cut to zero,
    // and the writer goes on at its start.
    let f = std::fs::OpenOptions::new().write(true).open(&log).unwrap();
    f.set_len(0).unwrap();
    drop(f);
    std::fs::write(&log, "three\nfour\n").unwrap();
    eventually(
        Duration::from_secs(10),
        "the held line and the new one",
        || {
            let m = messages(dir.path());
            async move { (m == ["one", "two", "three"]).then_some(()) }
        },
    )
    .await;
    assert!(
        p.terminate(Duration::from_secs(20))
            .is_some_and(|s| s.success())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_last_line_of_a_finished_file_needs_no_newline() {
    let dir = temp_dir();
    std::fs::create_dir_all(dir.path().join("logs")).unwrap();
    let cfg = config(dir.path(), "");
    let log = dir.path().join("logs/a.log");
    std::fs::write(&log, "first\nlast without newline").unwrap();
    let mut p = LainProcess::spawn(&["logship", "--config", &cfg], &[], &["admin"]);
    wait_messages(dir.path(), &["first"], "the first line").await;
    // While the file may still grow, an unfinished line waits for its newline.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(messages(dir.path()), ["first"]);
    // Rotated away (no longer matched): nothing more will come, and the line is sent as
    // it is.
    std::fs::rename(&log, dir.path().join("logs/a.log.1")).unwrap();
    wait_messages(
        dir.path(),
        &["first", "last without newline"],
        "the unfinished last line",
    )
    .await;
    assert!(
        p.terminate(Duration::from_secs(20))
            .is_some_and(|s| s.success())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn read_from_end_skips_only_what_was_there_at_start() {
    let dir = temp_dir();
    std::fs::create_dir_all(dir.path().join("logs")).unwrap();
    let cfg = config(dir.path(), "read_from_end = true");
    let log = dir.path().join("logs/a.log");
    std::fs::write(&log, "old 1\nold 2\n").unwrap();
    let mut p = LainProcess::spawn(&["logship", "--config", &cfg], &[], &["admin"]);
    wait_open(&p).await;
    let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    f.write_all(b"new 1\n").unwrap();
    wait_messages(dir.path(), &["new 1"], "the appended line").await;
    // A rotation: the file found next was written after logship started, so all of it is
    // shipped, although it is found a scan interval after its first line was written.
    std::fs::rename(&log, dir.path().join("logs/a.log.1")).unwrap();
    std::fs::write(&log, "fresh 1\nfresh 2\n").unwrap();
    wait_messages(
        dir.path(),
        &["new 1", "fresh 1", "fresh 2"],
        "the new file whole",
    )
    .await;
    assert!(
        p.terminate(Duration::from_secs(20))
            .is_some_and(|s| s.success())
    );
}

#[test]
fn check_config_exits_0_or_64_with_every_error() {
    let dir = temp_dir();
    let good = config(dir.path(), "");
    let (code, out, err) = run_lain(&["logship", "--config", &good, "--check-config"], None);
    assert_eq!(code, 0, "{out}{err}");
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "state_dir = \"/tmp/x\"\n[[files]]\nname = \"a\"\npaths = [\"relative.log\"]\nmultiline_start = \"(\"\n",
    )
    .unwrap();
    let (code, _, err) = run_lain(
        &[
            "logship",
            "--config",
            &bad.display().to_string(),
            "--check-config",
        ],
        None,
    );
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("files[0].paths[0]"), "{err}");
    assert!(err.contains("files[0].multiline_start"), "{err}");
    std::fs::write(&bad, "state_dir = \"/tmp/x\"\nbogus = 1\n").unwrap();
    let (code, _, err) = run_lain(
        &[
            "logship",
            "--config",
            &bad.display().to_string(),
            "--check-config",
        ],
        None,
    );
    assert_eq!(code, 64, "{err}");
    assert!(err.contains(":2:1: bogus"), "{err}");
}
