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

/// Writes an agent config to `dir/logship.toml` and returns its path: node `node`, state in
/// `dir/state`, the admin listener on a free port and 20 ms polling, then `rest`, which
/// goes on inside the `[limits]` table (so it starts with more limits or with a new table).
pub fn agent_config(dir: &Path, node: &str, rest: &str) -> String {
    write_config(
        dir,
        &format!(
            "node = \"{node}\"\nstate_dir = \"{state}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
             [limits]\npoll_interval_ms = 20\n{rest}",
            state = dir.join("state").display(),
        ),
    )
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

/// Reads `name{label="value"} N` from a Prometheus text page; 0 when absent.
pub fn metric(page: &str, name_and_labels: &str) -> u64 {
    page.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// Waits up to `timeout` until `check` holds for `name_and_labels` on the metrics page of
/// the logship at `admin`; returns the value. On a timeout the failure shows logship's own
/// metrics as last read (what the sinks and the disk buffer were doing).
pub async fn wait_metric(
    admin: std::net::SocketAddr,
    name_and_labels: &str,
    timeout: Duration,
    what: &str,
    check: impl Fn(u64) -> bool,
) -> u64 {
    let deadline = Instant::now() + timeout;
    loop {
        let page = metrics_page(admin).await;
        let v = metric(&page, name_and_labels);
        if check(v) {
            return v;
        }
        if Instant::now() > deadline {
            let own: Vec<&str> = page
                .lines()
                .filter(|l| l.starts_with("lain_logship_"))
                .collect();
            panic!(
                "timed out after {timeout:?} waiting for {what}; last metrics:\n{}",
                own.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Fetches the `/metrics` page of a running logship.
/// Deletes a test's Elasticsearch indices (`{prefix}-*`) and its index template.
pub async fn drop_es_indices(es: &str, prefix: &str) {
    let http = reqwest::Client::new();
    let _ = http.delete(format!("{es}/{prefix}-*")).send().await;
    let _ = http
        .delete(format!("{es}/_index_template/{prefix}"))
        .send()
        .await;
}

pub use lain_test_support::metrics_page;

/// The checkpoint entries logship shows at `/files`.
pub async fn checkpoints(admin: std::net::SocketAddr) -> Vec<serde_json::Value> {
    reqwest::get(format!("http://{admin}/files"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// How an [`FlakyEs`] answers the requests it receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EsMode {
    /// 503 without passing the request on: Elasticsearch is down.
    Unavailable,
    /// 429 without passing the request on: Elasticsearch is overloaded.
    TooMany,
    /// The request reaches Elasticsearch, but the answer is replaced by a 503: the client
    /// must retry a batch that was in fact indexed (deterministic ids prevent duplicates).
    IndexedThenLost,
    /// Requests and answers pass unchanged.
    Forward,
}

/// A loopback HTTP front of a real Elasticsearch whose failures the test controls. It
/// answers one request per connection (`Connection: close`), so a mode change applies to
/// the very next request.
pub struct FlakyEs {
    /// The address logship is pointed at.
    pub addr: std::net::SocketAddr,
    mode: std::sync::Arc<std::sync::Mutex<EsMode>>,
    /// Requests answered with a failure so far.
    pub failed: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl FlakyEs {
    /// Starts the front of the Elasticsearch at `upstream` in `mode`.
    pub async fn start(upstream: &str, mode: EsMode) -> FlakyEs {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mode = std::sync::Arc::new(std::sync::Mutex::new(mode));
        let failed = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (m, f, up) = (mode.clone(), failed.clone(), upstream.to_string());
        let http = reqwest::Client::new();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                let (m, f, up, http) = (m.clone(), f.clone(), up.clone(), http.clone());
                tokio::spawn(async move {
                    // Read the head, then as many body bytes as Content-Length says.
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 65536];
                    let head_end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
                    let mut lines = head.lines();
                    let request_line = lines.next().unwrap_or_default().to_string();
                    let mut headers = Vec::new();
                    let mut len = 0usize;
                    for l in lines {
                        if let Some((k, v)) = l.split_once(':') {
                            let (k, v) = (k.trim().to_string(), v.trim().to_string());
                            if k.eq_ignore_ascii_case("content-length") {
                                len = v.parse().unwrap_or(0);
                            }
                            headers.push((k, v));
                        }
                    }
                    while buf.len() < head_end + len {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let body = buf[head_end..head_end + len].to_vec();
                    let mode = *m.lock().unwrap();
                    let mut parts = request_line.split_whitespace();
                    let method = parts.next().unwrap_or("GET").to_string();
                    let path = parts.next().unwrap_or("/").to_string();
                    let forward = || async {
                        let mut r = http.request(
                            reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
                            format!("{up}{path}"),
                        );
                        for (k, v) in &headers {
                            if k.eq_ignore_ascii_case("content-type") {
                                r = r.header(k, v);
                            }
                        }
                        let resp = r.body(body.clone()).send().await.unwrap();
                        let status = resp.status().as_u16();
                        (status, resp.bytes().await.unwrap().to_vec())
                    };
                    let (status, answer) = match mode {
                        EsMode::Unavailable => (503, b"{\"error\":\"unavailable\"}".to_vec()),
                        EsMode::TooMany => (429, b"{\"error\":\"too many requests\"}".to_vec()),
                        // Only bulk answers are lost, so the sink gets past its template.
                        EsMode::IndexedThenLost if !path.contains("_bulk") => forward().await,
                        EsMode::IndexedThenLost => {
                            forward().await;
                            (503, b"{\"error\":\"answer lost\"}".to_vec())
                        }
                        EsMode::Forward => forward().await,
                    };
                    if status >= 429 && (mode != EsMode::Forward) {
                        f.fetch_add(1, Ordering::Relaxed);
                    }
                    let mut out = format!(
                        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                        answer.len()
                    )
                    .into_bytes();
                    out.extend_from_slice(&answer);
                    let _ = s.write_all(&out).await;
                    let _ = s.shutdown().await;
                });
            }
        });
        FlakyEs {
            addr,
            mode,
            failed,
            task,
        }
    }

    /// Changes how the next requests are answered.
    pub fn set(&self, mode: EsMode) {
        *self.mode.lock().unwrap() = mode;
    }

    /// Requests answered with a failure so far.
    pub fn failures(&self) -> u64 {
        self.failed.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for FlakyEs {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A private single-node Kafka 4.x broker (KRaft) for tests that take the broker away; it
/// runs the jars the harness resolved (tests/services/kafka.sh), in its own directory and on
/// its own ports, so the shared broker is never disturbed.
pub struct PrivateKafka {
    /// `127.0.0.1:PORT`.
    pub brokers: String,
    dir: std::path::PathBuf,
    classpath: String,
    child: Option<std::process::Child>,
}

impl PrivateKafka {
    /// Prepares (formats) a broker that will listen on `port`; it is not started yet.
    pub fn prepare(dir: &Path, port: u16) -> PrivateKafka {
        let root =
            std::env::var("LAIN_SERVICES_DIR").unwrap_or_else(|_| "/var/tmp/lain-services".into());
        let kafka = Path::new(&root).join("kafka");
        // The jars of the running shared broker are known to work.
        let pid = std::fs::read_to_string(kafka.join("kafka.pid"))
            .unwrap_or_else(|e| panic!("no shared Kafka (tests/services/kafka.sh start): {e}"));
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", pid.trim()))
            .unwrap_or_else(|e| panic!("shared Kafka is not running: {e}"));
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let classpath = args
            .iter()
            .position(|a| a == "-cp")
            .and_then(|i| args.get(i + 1))
            .cloned()
            .expect("the shared broker's classpath");
        let controller = lain_test_support::free_port();
        let data = dir.join("data");
        let conf = dir.join("server.properties");
        std::fs::write(
            &conf,
            format!(
                "process.roles=broker,controller\nnode.id=1\n\
                 controller.quorum.bootstrap.servers=127.0.0.1:{controller}\n\
                 listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}\n\
                 advertised.listeners=PLAINTEXT://127.0.0.1:{port}\n\
                 controller.listener.names=CONTROLLER\ninter.broker.listener.name=PLAINTEXT\n\
                 listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT\n\
                 log.dirs={data}\nnum.partitions=1\nauto.create.topics.enable=true\n\
                 default.replication.factor=1\nmin.insync.replicas=1\n\
                 offsets.topic.replication.factor=1\noffsets.topic.num.partitions=1\n\
                 transaction.state.log.replication.factor=1\ntransaction.state.log.min.isr=1\n\
                 transaction.state.log.num.partitions=1\n\
                 share.coordinator.state.topic.replication.factor=1\n\
                 share.coordinator.state.topic.min.isr=1\n\
                 group.initial.rebalance.delay.ms=0\nbroker.session.timeout.ms=3000\n\
                 broker.heartbeat.interval.ms=500\n",
                data = data.display()
            ),
        )
        .unwrap();
        std::fs::write(
            dir.join("log4j2.properties"),
            format!(
                "status = warn\nappender.file.type = File\nappender.file.name = file\n\
                 appender.file.fileName = {}\nappender.file.layout.type = PatternLayout\n\
                 appender.file.layout.pattern = [%d] %p %m (%c)%n\nrootLogger.level = warn\n\
                 rootLogger.appenderRef.file.ref = file\n",
                dir.join("kafka.log").display()
            ),
        )
        .unwrap();
        let k = PrivateKafka {
            brokers: format!("127.0.0.1:{port}"),
            dir: dir.to_path_buf(),
            classpath,
            child: None,
        };
        let id = k.java(&["kafka.tools.StorageTool", "random-uuid"]);
        let id = String::from_utf8_lossy(&id.stdout).trim().to_string();
        let out = k.java(&[
            "kafka.tools.StorageTool",
            "format",
            "-t",
            &id,
            "-c",
            &conf.display().to_string(),
            "--standalone",
        ]);
        assert!(out.status.success(), "kafka storage format failed: {out:?}");
        k
    }

    fn command(&self, heap: &str) -> std::process::Command {
        let mut c = std::process::Command::new("java");
        c.arg(heap)
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                self.dir.join("log4j2.properties").display()
            ))
            .arg("-cp")
            .arg(&self.classpath);
        c
    }

    fn java(&self, args: &[&str]) -> std::process::Output {
        self.command("-Xmx128m").args(args).output().expect("java")
    }

    /// Starts the broker (again, on the same data) and waits until it accepts connections.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = self
            .command("-Xmx384m")
            .arg("kafka.Kafka")
            .arg(self.dir.join("server.properties"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start java");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(120);
        while std::net::TcpStream::connect(&self.brokers).is_err() {
            assert!(
                Instant::now() < deadline,
                "private Kafka did not listen within 120 s; see {}",
                self.dir.join("kafka.log").display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills the broker with SIGKILL, like a crash; its data stays.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for PrivateKafka {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads up to `want` whole documents of `topic` within `timeout`.
pub fn consume_docs(
    brokers: &str,
    topic: &str,
    timeout: Duration,
    want: usize,
) -> Vec<serde_json::Value> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("consumer"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    while Instant::now() < deadline && out.len() < want {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            out.push(serde_json::from_slice(m.payload().unwrap_or(b"")).unwrap());
        }
    }
    out
}
