//! `lain build` against the real Docker engines of the test harness: examples/hello built
//! from a git copy into a release image that serves its page, a failing script step named
//! with its exit code, the git checks, and an image pushed to the loopback registry and run
//! on a node that never had it.
//!
//! Each test builds under an app name of its own and removes its images when it ends.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bollard::Docker;
use lain_controlplane::build::{BuildError, BuildEvent, BuildOptions, LABEL_COMMIT, build};
use lain_controlplane::docker::{ContainerSpec, LABEL_APP, LABEL_VERSION, NodeClient};
use lain_test_support::{require_docker_nodes, require_registry};

fn hello_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/hello")
}

fn git(dir: &Path, args: &[&str]) {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args([
            "-c",
            "user.name=lain test",
            "-c",
            "user.email=test@lain.invalid",
            "-c",
            "commit.gpgsign=false",
        ])
        .args(args)
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A git repository holding a copy of examples/hello under a unique app name, committed.
fn hello_repo(app: &str, edit: impl FnOnce(String) -> String) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(hello_dir()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    let yaml = std::fs::read_to_string(dir.path().join("lain.yaml")).unwrap();
    let yaml = edit(yaml.replace("appname: hello", &format!("appname: {app}")));
    std::fs::write(dir.path().join("lain.yaml"), yaml).unwrap();
    git(dir.path(), &["init", "-q"]);
    git(dir.path(), &["add", "."]);
    git(dir.path(), &["commit", "-q", "-m", "hello"]);
    dir
}

fn unique_app(what: &str) -> String {
    format!(
        "{what}{}x{:06x}",
        std::process::id(),
        rand_u32() & 0xff_ffff
    )
}

fn rand_u32() -> u32 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    t.subsec_nanos() ^ (t.as_secs() as u32)
}

/// Removes every image of one app from the engines when the test ends, failed or not.
struct Images {
    app: String,
    hosts: Vec<String>,
}

impl Drop for Images {
    fn drop(&mut self) {
        for host in &self.hosts {
            let Ok(out) = Command::new("docker")
                .args(["-H", host, "images", "--format", "{{.Repository}}:{{.Tag}}"])
                .output()
            else {
                continue;
            };
            let names: Vec<String> = String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| {
                    l.rsplit_once(':')
                        .is_some_and(|(r, _)| r.ends_with(&self.app))
                })
                .map(str::to_string)
                .collect();
            if !names.is_empty() {
                let _ = Command::new("docker")
                    .args(["-H", host, "rmi", "-f"])
                    .args(&names)
                    .output();
            }
        }
    }
}

fn docker(host: &str) -> Docker {
    lain_controlplane::build::connect(host).unwrap()
}

/// GETs `path` from 127.0.0.1:`port` until it answers, for at most `limit`.
async fn get_until(port: u16, path: &str, limit: Duration) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < limit {
        match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            Ok(mut s) => {
                let req = format!("GET {path} HTTP/1.0\r\nHost: hello\r\n\r\n");
                s.write_all(req.as_bytes()).await.unwrap();
                let mut body = String::new();
                let _ = s.read_to_string(&mut body).await;
                return Ok(body);
            }
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(last)
}

#[tokio::test]
async fn hello_builds_into_a_release_image_that_serves_its_page() {
    let host = require_docker_nodes()[0].clone();
    let app = unique_app("hello");
    let _images = Images {
        app: app.clone(),
        hosts: vec![host.clone()],
    };
    let repo = hello_repo(&app, |y| y);
    let mut events = Vec::new();
    let out = build(
        &BuildOptions {
            dir: repo.path().to_path_buf(),
            docker_host: host.clone(),
            push: None,
            allow_dirty: false,
        },
        |e| events.push(e),
    )
    .await
    .unwrap_or_else(|e| panic!("build failed: {e}"));

    let expected = String::from_utf8(
        Command::new("git")
            .arg("-C")
            .arg(repo.path())
            .args(["log", "-1", "--format=%ct-%H"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .to_string();
    assert_eq!(out.version, expected);
    assert_eq!(out.image, format!("{app}:release-{expected}"));
    assert!(events.contains(&BuildEvent::Step {
        stage: "script",
        index: 1,
        command: "sh build.sh".into()
    }));
    assert!(events.contains(&BuildEvent::Tagged(out.image.clone())));

    let d = docker(&host);
    let inspect = d.inspect_image(&out.image).await.unwrap();
    let labels = inspect.config.and_then(|c| c.labels).unwrap_or_default();
    assert_eq!(labels.get(LABEL_APP), Some(&app));
    assert_eq!(labels.get(LABEL_VERSION), Some(&expected));
    assert_eq!(
        labels.get(LABEL_COMMIT).map(String::as_str),
        expected.split_once('-').map(|v| v.1)
    );

    // The release image runs the web proc's command and serves the page built by the script.
    let port = lain_test_support::free_port();
    let node = NodeClient::connect("build-test", &host, "127.0.0.1".parse().unwrap()).unwrap();
    let name = format!("{app}-serve");
    let id = node
        .run(&ContainerSpec {
            name: name.clone(),
            image: out.image.clone(),
            cmd: vec![
                "httpd".into(),
                "-f".into(),
                "-vv".into(),
                "-p".into(),
                format!("127.0.0.1:{port}"),
                "-h".into(),
                "/lain/app/www".into(),
            ],
            entrypoint: vec![],
            env: vec![],
            labels: HashMap::new(),
            memory_bytes: 32 << 20,
            cpu: 0,
            binds: vec![],
            network_mode: "host".into(),
            user: None,
            workdir: None,
            kill_timeout_secs: 1,
        })
        .await
        .unwrap();
    let page = get_until(port, "/", Duration::from_secs(10)).await;
    let health = get_until(port, "/healthz", Duration::from_secs(10)).await;
    // The request log lines reach the container's log.
    let logs = Command::new("docker")
        .args(["-H", &host, "logs", &id])
        .output()
        .unwrap();
    node.remove(&id).await.unwrap();
    let page = page.unwrap_or_else(|e| panic!("the release image does not serve: {e}"));
    assert!(
        page.starts_with("HTTP/1.") && page.contains(" 200 "),
        "{page}"
    );
    assert!(page.contains("hello from lain"), "{page}");
    assert!(health.unwrap().contains("\r\n\r\nok"));
    let logs = String::from_utf8_lossy(&logs.stderr).to_string();
    assert!(logs.contains("url:/healthz"), "request log: {logs}");
}

#[tokio::test]
async fn a_failing_script_step_is_named_with_its_exit_code() {
    let host = require_docker_nodes()[0].clone();
    let app = unique_app("broken");
    let _images = Images {
        app: app.clone(),
        hosts: vec![host.clone()],
    };
    let repo = hello_repo(&app, |y| {
        y.replace(
            "    - sh build.sh\n",
            "    - sh build.sh\n    - echo about to fail; exit 7\n    - echo never runs\n",
        )
    });
    let mut events = Vec::new();
    let err = build(
        &BuildOptions {
            dir: repo.path().to_path_buf(),
            docker_host: host.clone(),
            push: None,
            allow_dirty: false,
        },
        |e| events.push(e),
    )
    .await
    .unwrap_err();
    match &err {
        BuildError::Step {
            stage,
            index,
            command,
            code,
        } => {
            assert_eq!((*stage, *index, *code), ("script", 2, 7));
            assert_eq!(command, "echo about to fail; exit 7");
        }
        other => panic!("expected a step error, got {other}"),
    }
    assert!(err.to_string().contains("build.script[2]"), "{err}");
    assert!(events.contains(&BuildEvent::Output("about to fail".into())));
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, BuildEvent::Step { index: 3, .. }))
    );
    // No image was tagged, and no build container was left behind.
    let images = Command::new("docker")
        .args(["-H", &host, "images", "-q", "--filter"])
        .arg(format!("reference={app}"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&images.stdout).trim().is_empty());
    let left = Command::new("docker")
        .args(["-H", &host, "ps", "-aq", "--filter"])
        .arg(format!("name=lain-build-{app}-"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&left.stdout).trim().is_empty());
}

#[tokio::test]
async fn git_state_is_checked_before_anything_is_built() {
    let host = require_docker_nodes()[0].clone();
    let app = unique_app("dirty");
    let repo = hello_repo(&app, |y| y);
    std::fs::write(repo.path().join("index.html"), "changed").unwrap();
    let opts = BuildOptions {
        dir: repo.path().to_path_buf(),
        docker_host: host.clone(),
        push: None,
        allow_dirty: false,
    };
    let err = build(&opts, |_| {}).await.unwrap_err();
    assert!(
        matches!(&err, BuildError::Dirty { files, .. } if files.iter().any(|f| f.contains("index.html"))),
        "{err}"
    );
    assert!(err.to_string().contains("--allow-dirty"));

    let plain = tempfile::tempdir().unwrap();
    std::fs::copy(
        hello_dir().join("lain.yaml"),
        plain.path().join("lain.yaml"),
    )
    .unwrap();
    let err = build(
        &BuildOptions {
            dir: plain.path().to_path_buf(),
            ..opts.clone()
        },
        |_| {},
    )
    .await
    .unwrap_err();
    assert!(matches!(err, BuildError::Git { .. }), "{err}");

    std::fs::write(
        plain.path().join("lain.yaml"),
        "appname: x\nweb:\n  memory: lots\n",
    )
    .unwrap();
    let err = build(
        &BuildOptions {
            dir: plain.path().to_path_buf(),
            ..opts
        },
        |_| {},
    )
    .await
    .unwrap_err();
    match err {
        BuildError::Invalid(errors) => assert!(errors.iter().any(|e| e.line == 3), "{errors:?}"),
        other => panic!("expected invalid lain.yaml, got {other}"),
    }
}

#[tokio::test]
async fn a_pushed_image_runs_on_a_node_that_never_had_it() {
    let hosts = require_docker_nodes();
    assert!(hosts.len() >= 2, "this test needs two Docker engines");
    let registry = require_registry();
    let app = unique_app("pushed");
    let _images = Images {
        app: app.clone(),
        hosts: hosts.clone(),
    };
    let repo = hello_repo(&app, |y| y);
    let out = build(
        &BuildOptions {
            dir: repo.path().to_path_buf(),
            docker_host: hosts[0].clone(),
            push: Some(registry.clone()),
            allow_dirty: false,
        },
        |_| {},
    )
    .await
    .unwrap_or_else(|e| panic!("build failed: {e}"));
    assert_eq!(
        out.pushed.as_deref(),
        Some(format!("{registry}/{}", out.image).as_str())
    );
    assert!(docker(&hosts[1]).inspect_image(&out.image).await.is_err());

    let spec = |name: &str| ContainerSpec {
        name: name.to_string(),
        image: out.image.clone(),
        cmd: vec!["true".into()],
        entrypoint: vec![],
        env: vec![],
        labels: HashMap::new(),
        memory_bytes: 32 << 20,
        cpu: 0,
        binds: vec![],
        network_mode: "host".into(),
        user: None,
        workdir: None,
        kill_timeout_secs: 1,
    };
    // Without a registry the node cannot run the image; with one it pulls and tags it.
    let without = NodeClient::connect("node2", &hosts[1], "127.0.0.1".parse().unwrap()).unwrap();
    assert!(without.run(&spec(&format!("{app}-a"))).await.is_err());
    let with = without.with_registry(Some(registry.clone()));
    let id = with
        .run(&spec(&format!("{app}-b")))
        .await
        .unwrap_or_else(|e| panic!("run with the registry failed: {e}"));
    with.remove(&id).await.unwrap();
    let local = docker(&hosts[1]).inspect_image(&out.image).await.unwrap();
    let labels = local.config.and_then(|c| c.labels).unwrap_or_default();
    assert_eq!(labels.get(LABEL_VERSION), Some(&out.version));
}
