//! Shared helpers for lain's tests: finding the real services the harness started, giving
//! each test its own etcd prefix, and running the `lain` binary and reading back the
//! addresses it bound.
//!
//! A test that needs a service calls one of the `require_*` functions, which panic with a
//! message naming the missing variable or the unreachable address. Tests never skip: a
//! missing service is a failed test.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Reads a service address from the environment, or fails the test with what to do.
pub fn require_env(var: &str, what: &str) -> String {
    match std::env::var(var) {
        Ok(v) if !v.trim().is_empty() => v,
        _ => panic!(
            "{var} is not set: this test needs {what}. Start the services with \
             `eval \"$(tests/services/all.sh start)\"` (or `source tests/services/env.sh` if they run)."
        ),
    }
}

/// The single-member etcd the harness started (`LAIN_ETCD`), as client URLs.
pub fn require_etcd() -> Vec<String> {
    split_list(&require_env("LAIN_ETCD", "a running etcd"))
}

/// The three-member etcd cluster (`LAIN_ETCD_CLUSTER`), as client URLs.
pub fn require_etcd_cluster() -> Vec<String> {
    split_list(&require_env(
        "LAIN_ETCD_CLUSTER",
        "a three-member etcd cluster",
    ))
}

/// The Kafka bootstrap address (`LAIN_KAFKA`).
pub fn require_kafka() -> String {
    require_env("LAIN_KAFKA", "a running Kafka broker")
}

/// The Elasticsearch-API URL (`LAIN_ES`).
pub fn require_es() -> String {
    require_env("LAIN_ES", "a running OpenSearch/Elasticsearch node")
}

/// The loopback Docker registry (`LAIN_REGISTRY`), as `host:port`.
pub fn require_registry() -> String {
    require_env(
        "LAIN_REGISTRY",
        "a running Docker registry (tests/services/registry.sh start)",
    )
}

/// The Docker engines (`LAIN_DOCKER_NODES`), as `unix://` or `tcp://` addresses.
pub fn require_docker_nodes() -> Vec<String> {
    split_list(&require_env(
        "LAIN_DOCKER_NODES",
        "two running Docker engines",
    ))
}

fn split_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect()
}

/// A key prefix no other test uses, so tests can share one etcd and run in parallel.
pub fn unique_prefix(test: &str) -> String {
    format!(
        "/lain-test/{test}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

/// Connects an etcd client, failing the test with the address when etcd is unreachable.
pub async fn etcd_client(endpoints: &[String]) -> etcd_client::Client {
    let fut = etcd_client::Client::connect(endpoints, None);
    match tokio::time::timeout(Duration::from_secs(10), fut).await {
        Ok(Ok(mut c)) => {
            if let Err(e) = c.status().await {
                panic!("etcd at {endpoints:?} does not answer: {e}");
            }
            c
        }
        Ok(Err(e)) => panic!("cannot connect to etcd at {endpoints:?}: {e}"),
        Err(_) => panic!("connecting to etcd at {endpoints:?} timed out"),
    }
}

/// Polls `check` every 20 ms until it returns `Some`, or panics after `timeout` with `what`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The Prometheus page of the lain component whose admin listener is at `admin`.
pub async fn metrics_page(admin: SocketAddr) -> String {
    reqwest::get(format!("http://{admin}/metrics"))
        .await
        .expect("the admin listener answers")
        .text()
        .await
        .expect("the metrics page is text")
}

/// The path of the `lain` binary built next to the running test.
pub fn lain_binary() -> PathBuf {
    if let Ok(p) = std::env::var("CARGO_BIN_EXE_lain") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // Test binaries live in target/<profile>/deps; the lain binary one level up.
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let bin = dir.join("lain");
    assert!(
        bin.exists(),
        "{} does not exist: build it with `cargo build --bin lain` first",
        bin.display()
    );
    bin
}

/// A running `lain` process. It is killed when dropped.
pub struct LainProcess {
    child: Child,
    listeners: Vec<(String, SocketAddr)>,
    lines: mpsc::Receiver<String>,
}

impl std::fmt::Debug for LainProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LainProcess")
            .field("pid", &self.child.id())
            .field("listeners", &self.listeners)
            .finish()
    }
}

impl LainProcess {
    /// Starts `lain ARGS...` and waits until it has announced `expect` listeners on stdout
    /// (lines `{"listening":{"name":..,"addr":..}}`), or panics with its output.
    pub fn spawn(args: &[&str], envs: &[(&str, &str)], expect: &[&str]) -> LainProcess {
        let mut cmd = Command::new(lain_binary());
        cmd.args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn lain");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut p = LainProcess {
            child,
            listeners: Vec::new(),
            lines: rx,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !expect
            .iter()
            .all(|n| p.listeners.iter().any(|(m, _)| m == n))
        {
            let left = deadline.saturating_duration_since(Instant::now());
            match p.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(l) = parse_listening(&line) {
                        p.listeners.push(l);
                    }
                }
                Err(_) => {
                    let status = p.child.try_wait().ok().flatten();
                    panic!(
                        "lain {args:?} did not announce {expect:?} within 30 s (exit status {status:?}, saw {:?})",
                        p.listeners
                    );
                }
            }
        }
        p
    }

    /// The address a listener named `name` bound.
    pub fn addr(&self, name: &str) -> SocketAddr {
        self.listeners
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
            .unwrap_or_else(|| panic!("no listener named {name}: {:?}", self.listeners))
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits up to `grace` for the exit status.
    pub fn terminate(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.wait_exit(grace)
    }

    /// Waits up to `grace` for the process to exit by itself; its status, if it did.
    pub fn wait_exit(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Kills the process with SIGKILL and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for LainProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Parses a listener announcement line.
pub fn parse_listening(line: &str) -> Option<(String, SocketAddr)> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let l = v.get("listening")?;
    let name = l.get("name")?.as_str()?.to_string();
    let addr = l.get("addr")?.as_str()?.parse().ok()?;
    Some((name, addr))
}

/// Runs `lain ARGS...` to completion with `stdin` as input; returns (exit code, stdout, stderr).
pub fn run_lain(args: &[&str], stdin: Option<&str>) -> (i32, String, String) {
    use std::io::Write;
    let mut child = Command::new(lain_binary())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn lain");
    if let Some(input) = stdin {
        let _ = child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes());
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().expect("wait lain");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A loopback port free for both TCP and UDP right now, for a peer program that cannot
/// bind port 0 and report back. Another process may take it before the peer binds it, so
/// callers of programs that exit on a bind failure retry with a new port.
pub fn free_port() -> u16 {
    loop {
        let t = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        let port = t.local_addr().expect("local address").port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A temporary directory removed when dropped.
pub fn temp_dir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// Runs `git -C dir ARGS...` with a fixed author; panics when it fails.
pub fn git(dir: &std::path::Path, args: &[&str]) {
    let st = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args([
            "-c",
            "user.name=lain-test",
            "-c",
            "user.email=test@lain.invalid",
        ])
        .args(args)
        .status()
        .expect("run git");
    assert!(st.success(), "git {args:?} failed");
}

/// Copies `examples/hello` into `dir` as the app `app` (its lain.yaml renamed) and commits
/// it to a new git repository, as `lain build` needs; returns the lain.yaml text.
pub fn hello_app(dir: &std::path::Path, app: &str) -> String {
    let hello = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/hello");
    std::fs::create_dir_all(dir).expect("create the app directory");
    for e in std::fs::read_dir(&hello).expect("examples/hello") {
        let e = e.expect("examples/hello entry");
        std::fs::copy(e.path(), dir.join(e.file_name())).expect("copy examples/hello");
    }
    let yaml = std::fs::read_to_string(dir.join("lain.yaml"))
        .expect("examples/hello/lain.yaml")
        .replace("appname: hello", &format!("appname: {app}"));
    std::fs::write(dir.join("lain.yaml"), &yaml).expect("write lain.yaml");
    git(dir, &["init", "-q"]);
    git(dir, &["add", "."]);
    git(dir, &["commit", "-q", "-m", "v1"]);
    yaml
}

/// The configuration of a test cluster's `lain controlplane`: its own etcd prefix, the
/// harness's first two Docker engines as `node1` and `node2`, volumes and a secret key in a
/// temporary directory, and the admin token `lain controlplane init` printed.
#[derive(Debug)]
pub struct ControlPlaneConfig {
    /// Holds the config file, volumes and keys.
    pub dir: tempfile::TempDir,
    /// The config file.
    pub path: PathBuf,
    /// The cluster's etcd prefix, also the `lain.cluster` label of its containers.
    pub prefix: String,
    /// The Docker hosts of `node1` and `node2`.
    pub nodes: Vec<String>,
    /// The first admin's bearer token.
    pub token: String,
}

impl ControlPlaneConfig {
    /// Writes the config for `test` (with `extra` top-level lines, such as `registry = ...`)
    /// and runs `lain controlplane init` on it.
    pub fn init(test: &str, extra: &str) -> ControlPlaneConfig {
        let etcd = require_etcd();
        let nodes: Vec<String> = require_docker_nodes().into_iter().take(2).collect();
        assert!(
            nodes.len() == 2,
            "two Docker engines are needed, got {nodes:?}"
        );
        let prefix = unique_prefix(test);
        let dir = temp_dir();
        let path = dir.path().join("cp.toml");
        let mut text = format!(
            "etcd_endpoints = {etcd:?}\nprefix = \"{prefix}\"\ncluster_domains = [\"lain.local\"]\n\
             volume_root = \"{}\"\nelection_ttl_secs = 2\nhealth_deadline_secs = 30\n\
             secret_key_file = \"{}\"\n{extra}\n",
            dir.path().join("volumes").display(),
            dir.path().join("keys/secret.key").display(),
        );
        for (i, n) in nodes.iter().enumerate() {
            text.push_str(&format!(
                "[[nodes]]\nname = \"node{}\"\ndocker_host = \"{n}\"\nmemory_bytes = 4294967296\n",
                i + 1
            ));
        }
        std::fs::write(&path, text).expect("write the control-plane config");
        let (code, out, err) = run_lain(
            &[
                "controlplane",
                "init",
                "-c",
                path.to_str().expect("UTF-8 path"),
            ],
            None,
        );
        assert_eq!(code, 0, "lain controlplane init failed: {err}");
        let token = out.trim().to_string();
        assert!(token.starts_with("lain_"), "not a token: {out}");
        ControlPlaneConfig {
            dir,
            path,
            prefix,
            nodes,
            token,
        }
    }

    /// Starts one `lain controlplane` replica on this config, once it announced its admin
    /// and API listeners.
    pub fn spawn(&self) -> LainProcess {
        LainProcess::spawn(
            &[
                "controlplane",
                "-c",
                self.path.to_str().expect("UTF-8 path"),
            ],
            &[],
            &["admin", "api"],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_lines_parse() {
        let l =
            parse_listening(r#"{"listening":{"name":"admin","addr":"127.0.0.1:4000"}}"#).unwrap();
        assert_eq!(l.0, "admin");
        assert_eq!(l.1.port(), 4000);
        assert!(parse_listening("hello").is_none());
    }

    #[test]
    fn prefixes_differ() {
        assert_ne!(unique_prefix("a"), unique_prefix("a"));
    }
}

/// Removes every container labelled `lain.cluster={prefix}` (one test cluster's) from each
/// Docker engine in `hosts`, through the docker CLI so that it works from any `Drop`.
pub fn remove_cluster_containers(hosts: &[String], prefix: &str) -> usize {
    let mut removed = 0;
    for host in hosts {
        let Ok(out) = Command::new("docker")
            .args(["-H", host, "ps", "-aq", "--filter"])
            .arg(format!("label=lain.cluster={prefix}"))
            .output()
        else {
            continue;
        };
        let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_string)
            .collect();
        if !ids.is_empty() {
            removed += ids.len();
            let _ = Command::new("docker")
                .args(["-H", host, "rm", "-f"])
                .args(&ids)
                .output();
        }
    }
    removed
}

/// Removes a test cluster's containers from its engines when dropped, so that a failing
/// test leaves none behind.
#[derive(Debug)]
pub struct ContainerCleanup {
    /// The cluster's key prefix, which its containers carry as `lain.cluster`.
    pub prefix: String,
    /// The engines' Docker hosts.
    pub hosts: Vec<String>,
}

impl Drop for ContainerCleanup {
    fn drop(&mut self) {
        // An engine still winding down (a failed test drops it without waiting) may finish
        // creating a container just after the first pass, so a pass that found some is
        // followed by another.
        if remove_cluster_containers(&self.hosts, &self.prefix) > 0 {
            std::thread::sleep(std::time::Duration::from_secs(1));
            remove_cluster_containers(&self.hosts, &self.prefix);
        }
    }
}

/// A small deterministic generator (xorshift64*), so that a failing randomized run can be
/// repeated from the seed it prints. The seed must not be zero.
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number below `n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// An index into something `len` long; 0 when it is empty.
    pub fn index(&mut self, len: usize) -> usize {
        (self.next_u64() % len.max(1) as u64) as usize
    }

    /// One of `from` (not empty).
    pub fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.index(from.len())]
    }
}
