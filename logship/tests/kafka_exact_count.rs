//! Exact count through Kafka: numbered lines written with a rename rotation and a
//! copytruncate rotation while `lain logship` is killed with SIGKILL twice; every number must
//! arrive, and duplicates are counted and printed.

mod common;

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use lain_test_support::{LainProcess, require_kafka, temp_dir};

/// Lines written; `LAIN_LOGSHIP_EXACT_LINES` overrides it.
const DEFAULT_LINES: u64 = 1_000_000;

fn append(path: &Path, from: u64, to: u64) {
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    let mut buf = String::new();
    for i in from..to {
        buf.push_str(&format!(
            "line {i:09} some realistic padding for a log line\n"
        ));
        if buf.len() > 64 * 1024 {
            f.write_all(buf.as_bytes()).unwrap();
            buf.clear();
        }
    }
    f.write_all(buf.as_bytes()).unwrap();
}

fn spawn(config: &str) -> LainProcess {
    LainProcess::spawn(&["logship", "--config", config], &[], &["admin"])
}

#[test]
fn exact_count_across_rotations_and_sigkills() {
    let brokers = require_kafka();
    let n: u64 = std::env::var("LAIN_LOGSHIP_EXACT_LINES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_LINES);
    let dir = temp_dir();
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let log = logs.join("app.log");
    let topic = common::unique("exact");
    let config = common::agent_config(
        dir.path(),
        "node1",
        &format!(
            r#"
scan_interval_ms = 200
rotate_wait_ms = 3000
[[files]]
name = "exact"
paths = ["{logs}/app.log*"]
podgroup = "hello.web.web"
instance = "1"
[sinks.kafka]
brokers = "{brokers}"
topic = "{topic}"
"#,
            logs = logs.display(),
        ),
    );
    let q = n / 4;
    let started = Instant::now();
    append(&log, 0, q);
    let mut p = spawn(&config);
    std::thread::sleep(Duration::from_millis(1500));
    p.kill();
    // Rename rotation while logship is down.
    std::fs::rename(&log, logs.join("app.log.1")).unwrap();
    append(&log, q, 2 * q);
    let mut p = spawn(&config);
    append(&log, 2 * q, 3 * q);
    std::thread::sleep(Duration::from_millis(1000));
    // Copytruncate rotation while logship runs (the writer pauses meanwhile, as a writer
    // that copytruncate does not lose lines from must).
    std::fs::copy(&log, logs.join("app.log.2")).unwrap();
    OpenOptions::new()
        .write(true)
        .open(&log)
        .unwrap()
        .set_len(0)
        .unwrap();
    append(&log, 3 * q, n - q / 2);
    std::thread::sleep(Duration::from_millis(1000));
    p.kill();
    append(&log, n - q / 2, n);
    let mut p = spawn(&config);
    let want: Vec<String> = (0..n)
        .map(|i| format!("line {i:09} some realistic padding for a log line"))
        .collect();
    let seen = common::consume(
        &brokers,
        &topic,
        Duration::from_secs(240),
        |m| m.len() == want[0].len() && m.starts_with("line "),
        want.len(),
    );
    let missing: Vec<&String> = want.iter().filter(|w| !seen.contains_key(*w)).collect();
    let duplicates: u64 = seen.values().map(|c| u64::from(c - 1)).sum();
    println!(
        "exact count: {n} lines, {} distinct received, {duplicates} duplicates, {} missing, {:?}",
        seen.len(),
        missing.len(),
        started.elapsed()
    );
    assert!(
        missing.is_empty(),
        "{} of {n} lines missing, first: {:?}",
        missing.len(),
        missing.iter().take(5).collect::<Vec<_>>()
    );
    // A copytruncate racing a read can leave a fragment of a line; it is counted, not lost.
    let extra = seen.len() as u64 - (n - missing.len() as u64);
    println!("exact count: {extra} messages that are not whole numbered lines");
    let status = p.terminate(Duration::from_secs(30));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
}
