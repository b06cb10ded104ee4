//! The `lain` client commands as a process: how the server and token are chosen (flag,
//! environment, config file), the exit codes and next steps for an unreachable server, a
//! missing login, usage mistakes and invalid local input, and `lain build` against a real
//! Docker engine with table and JSON output.
//!
//! Every run gets its own `LAIN_CONFIG` and no inherited `LAIN_SERVER`/`LAIN_TOKEN`, so the
//! machine's own configuration never leaks in.

use std::path::Path;
use std::process::{Command, Stdio};

use lain_test_support::{lain_binary, require_docker_nodes, temp_dir};

/// Runs `lain ARGS` with `LAIN_CONFIG=config` and the given extra environment.
fn lain(config: &Path, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(lain_binary());
    cmd.args(args)
        .env("LAIN_CONFIG", config)
        .env_remove("LAIN_SERVER")
        .env_remove("LAIN_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run lain");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A loopback address where nothing listens: a port bound and released again.
fn closed_server() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    format!("http://127.0.0.1:{port}")
}

#[test]
fn an_unreachable_server_exits_5_and_says_what_to_check() {
    let dir = temp_dir();
    let config = dir.path().join("config.toml");
    let server = closed_server();
    for args in [
        vec!["app", "ls"],
        vec!["ps", "hello"],
        vec!["deploy", "hello", "-v", "1"],
        vec!["whoami"],
    ] {
        let mut full = args.clone();
        full.extend(["--server", &server, "--token", "t"]);
        let (code, out, err) = lain(&config, &full, &[]);
        assert_eq!(code, 5, "{args:?}: {err}");
        assert!(out.is_empty(), "{out}");
        assert!(
            err.contains(&server) && err.contains("cannot be reached"),
            "{err}"
        );
        assert!(err.contains("lain controlplane"), "{err}");
    }
    // A failed login writes nothing.
    let (code, _, err) = lain(
        &config,
        &["login", "--server", &server, "--token", "t"],
        &[],
    );
    assert_eq!(code, 5, "{err}");
    assert!(!config.exists());
}

#[test]
fn without_a_login_the_error_says_to_log_in() {
    let dir = temp_dir();
    let config = dir.path().join("none.toml");
    let (code, _, err) = lain(&config, &["ps", "hello"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("lain login --server URL --token TOKEN"),
        "{err}"
    );
    let (code, _, err) = lain(&config, &["ps", "hello", "--server", &closed_server()], &[]);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("no token configured"), "{err}");
    let (code, _, err) = lain(&config, &["login", "--server", &closed_server()], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--token"), "{err}");
}

#[test]
fn the_server_comes_from_the_flag_then_the_environment_then_the_file() {
    let dir = temp_dir();
    let config = dir.path().join("config.toml");
    let (in_file, in_env, in_flag) = (closed_server(), closed_server(), closed_server());
    std::fs::write(
        &config,
        format!("server = \"{in_file}\"\ntoken = \"from-file\"\n"),
    )
    .unwrap();
    let (code, _, err) = lain(&config, &["app", "ls"], &[]);
    assert_eq!(code, 5);
    assert!(err.contains(&in_file), "{err}");
    let (_, _, err) = lain(&config, &["app", "ls"], &[("LAIN_SERVER", &in_env)]);
    assert!(err.contains(&in_env), "{err}");
    // The global flag works after a nested subcommand as well as before it.
    let (_, _, err) = lain(
        &config,
        &["app", "--server", &in_flag, "ls"],
        &[("LAIN_SERVER", &in_env)],
    );
    assert!(err.contains(&in_flag), "{err}");
    let (_, _, err) = lain(
        &config,
        &["app", "ls", "--server", &in_flag],
        &[("LAIN_SERVER", &in_env)],
    );
    assert!(err.contains(&in_flag), "{err}");
    // A host:port without a scheme is taken as http.
    let bare = in_flag.trim_start_matches("http://").to_string();
    let (_, _, err) = lain(&config, &["app", "ls", "--server", &bare], &[]);
    assert!(err.contains(&in_flag), "{err}");

    // A config file with an unknown key is invalid local input.
    std::fs::write(&config, "server = \"x\"\ntokn = \"typo\"\n").unwrap();
    let (code, _, err) = lain(&config, &["app", "ls"], &[]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains(config.to_str().unwrap()), "{err}");
}

#[test]
fn usage_mistakes_and_invalid_local_input_exit_2_and_64() {
    let dir = temp_dir();
    let config = dir.path().join("config.toml");
    let server = closed_server();
    let (code, _, err) = lain(
        &config,
        &["scale", "hello", "web", "--server", &server, "--token", "t"],
        &[],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("-n INSTANCES"), "{err}");
    let (code, _, _) = lain(&config, &["deploy"], &[]);
    assert_eq!(code, 2);
    let (code, _, err) = lain(
        &config,
        &["ps", "../etc", "--server", &server, "--token", "t"],
        &[],
    );
    assert_eq!(code, 2, "{err}");

    // lain.yaml is checked locally, with every error located, before anything is sent.
    let app = dir.path().join("bad");
    std::fs::create_dir(&app).unwrap();
    std::fs::write(
        app.join("lain.yaml"),
        "appname: bad\nweb:\n  memory: lots\n  num_instances: many\n",
    )
    .unwrap();
    let (code, _, err) = lain(
        &config,
        &[
            "app",
            "create",
            app.to_str().unwrap(),
            "--server",
            &server,
            "--token",
            "t",
        ],
        &[],
    );
    assert_eq!(code, 64, "{err}");
    assert!(err.contains(":3:") && err.contains(":4:"), "{err}");
    let (code, _, err) = lain(
        &config,
        &[
            "secret",
            "set",
            "a",
            "web",
            "/x",
            "--file",
            "/nonexistent/x",
            "--server",
            &server,
            "--token",
            "t",
        ],
        &[],
    );
    assert_eq!(code, 64, "{err}");
}

#[test]
fn lain_build_prints_the_image_or_the_failing_step() {
    let host = require_docker_nodes()[0].clone();
    let dir = temp_dir();
    let config = dir.path().join("config.toml");
    let app_dir = dir.path().join("app");
    let app = format!("clibuild{}", std::process::id());
    let yaml = lain_test_support::hello_app(&app_dir, &app);

    let (code, out, err) = lain(
        &config,
        &["build", app_dir.to_str().unwrap(), "-o", "json"],
        &[("DOCKER_HOST", &host)],
    );
    let cleanup = |image: &str| {
        let _ = Command::new("docker")
            .args(["-H", &host, "rmi", "-f", image])
            .output();
    };
    assert_eq!(code, 0, "{err}");
    // Progress goes to stderr; stdout holds only the JSON result.
    assert!(err.contains("==> build.script[1]: sh build.sh"), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON on stdout");
    let image = v["image"].as_str().unwrap().to_string();
    let build_image = v["build_image"].as_str().unwrap().to_string();
    cleanup(&image);
    cleanup(&build_image);
    assert_eq!(v["app"], app.as_str());
    assert!(image.starts_with(&format!("{app}:release-")), "{image}");

    // A failing step: exit 1, the step named; a dirty tree: exit 64.
    std::fs::write(
        app_dir.join("lain.yaml"),
        yaml.replace("    - sh build.sh\n", "    - sh build.sh\n    - exit 9\n"),
    )
    .unwrap();
    let (code, _, err) = lain(
        &config,
        &["build", app_dir.to_str().unwrap(), "--docker-host", &host],
        &[],
    );
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("--allow-dirty"), "{err}");
    let (code, _, err) = lain(
        &config,
        &[
            "build",
            app_dir.to_str().unwrap(),
            "--docker-host",
            &host,
            "--allow-dirty",
        ],
        &[],
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("build.script[2] `exit 9` failed with exit code 9"),
        "{err}"
    );
}

/// A real `lain controlplane` on a unique prefix with both engines and the registry; its
/// containers are removed and its keys deleted when the test ends.
struct RealServer {
    config: lain_test_support::ControlPlaneConfig,
    cp: lain_test_support::LainProcess,
    url: String,
}

impl RealServer {
    fn start(test: &str) -> RealServer {
        let registry = lain_test_support::require_registry();
        let config = lain_test_support::ControlPlaneConfig::init(
            test,
            &format!("registry = \"{registry}\""),
        );
        let cp = config.spawn();
        let url = format!("http://{}", cp.addr("api"));
        RealServer { config, cp, url }
    }
}

impl Drop for RealServer {
    fn drop(&mut self) {
        self.cp.terminate(std::time::Duration::from_secs(10));
        let c = &self.config;
        lain_test_support::remove_cluster_containers(&c.nodes, &c.prefix);
        let _ = Command::new("etcdctl")
            .args(["del", "--prefix", &c.prefix])
            .env("ETCDCTL_API", "3")
            .env(
                "ETCDCTL_ENDPOINTS",
                lain_test_support::require_etcd()[0].clone(),
            )
            .output();
    }
}

#[test]
fn the_cli_drives_a_real_control_plane_from_login_to_rollback() {
    let server = RealServer::start("cli-e2e");
    let registry = lain_test_support::require_registry();
    let config = server.config.dir.path().join("cli.toml");
    let run = |args: &[&str]| lain(&config, args, &[]);

    // login checks the token and writes the file; later commands need no flags.
    let (code, out, err) = run(&[
        "login",
        "--server",
        &server.url,
        "--token",
        &server.config.token,
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("(admin)"), "{out}");
    let (code, out, err) = run(&["whoami", "-o", "json"]);
    assert_eq!(code, 0, "{err}");
    let me: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(me["admin"], true);
    let (code, _, err) = run(&["app", "ls", "--token", "lain_wrong"]);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("lain login"), "{err}");

    // Build and push the demo app under a name of its own, register it, deploy it.
    let app_dir = server.config.dir.path().join("app");
    let app = format!("clie2e{}", std::process::id());
    lain_test_support::hello_app(&app_dir, &app);
    let dir = app_dir.to_str().unwrap();
    let (code, out, err) = lain(
        &config,
        &["build", dir, "--push", &registry, "-o", "json"],
        &[("DOCKER_HOST", &server.config.nodes[0])],
    );
    assert_eq!(code, 0, "{err}");
    let built: serde_json::Value = serde_json::from_str(&out).unwrap();
    let version = built["version"].as_str().unwrap().to_string();
    let image = built["image"].as_str().unwrap().to_string();
    let _images = scopeguard(server.config.nodes.clone(), app.clone());

    let (code, out, err) = run(&["app", "create", dir]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("app {app} registered")), "{out}");
    let (code, out, _) = run(&["app", "ls"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("NAME") && out.contains(&app), "{out}");

    let (code, out, err) = run(&["deploy", &app, "-v", &version, "--wait-secs", "120"]);
    assert_eq!(code, 0, "deploy: {out}\n{err}");
    assert!(out.contains("succeeded"), "{out}");
    assert!(err.contains("new: "), "progress on stderr: {err}");

    let (code, out, err) = run(&["ps", &app, "-o", "json"]);
    assert_eq!(code, 0, "{err}");
    let list: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(list.len(), 2, "{out}");
    assert!(
        list.iter()
            .all(|i| i["healthy"] == true && i["version"] == version.as_str())
    );
    let (_, out, _) = run(&["ps", &app]);
    assert!(out.lines().next().unwrap().contains("HEALTHY"), "{out}");
    assert_eq!(out.lines().count(), 3, "{out}");

    let (code, out, _) = run(&["node", "ls"]);
    assert_eq!(code, 0);
    assert!(out.contains("node1") && out.contains("node2"), "{out}");
    assert!(
        out.lines()
            .filter(|l| l.starts_with("node"))
            .all(|l| l.contains(" alive ")),
        "both engines answer, so both leases live: {out}"
    );
    let (code, out, _) = run(&["routes"]);
    assert_eq!(code, 0);
    assert!(out.contains(&app), "{out}");

    // A second version (the same image under another name), then back.
    let (code, out, err) = run(&["deploy", &app, "-v", "second", "--image", &image]);
    assert_eq!(code, 0, "{out}\n{err}");
    let (code, out, err) = run(&["rollback", &app]);
    assert_eq!(code, 0, "rollback: {out}\n{err}");
    assert!(out.contains(&version), "{out}");

    // A version whose image exists nowhere fails the rollout: exit 6.
    let (code, out, err) = run(&["deploy", &app, "-v", "missing", "--wait-secs", "90"]);
    assert_eq!(code, 6, "{out}\n{err}");

    let (code, out, err) = run(&["scale", &app, "web", "-n", "1"]);
    assert_eq!(code, 0, "scale: {out}\n{err}");
    let (_, out, _) = run(&["events", &app]);
    assert!(out.contains("deployed"), "{out}");

    // Secrets: set from stdin and from a file, listed without content, removed.
    let secret = server.config.dir.path().join("s.txt");
    std::fs::write(&secret, "hush").unwrap();
    let (code, _, err) = run(&[
        "secret",
        "set",
        &app,
        "web",
        "/lain/app/s.txt",
        "--file",
        secret.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let (_, out, _) = run(&["secret", "ls", &app]);
    assert!(
        out.contains("/lain/app/s.txt") && !out.contains("hush"),
        "{out}"
    );
    let (code, _, err) = run(&["secret", "rm", &app, "web", "/lain/app/s.txt"]);
    assert_eq!(code, 0, "{err}");

    // TLS certificates: uploaded from PEM files, listed by the names the proxy serves them
    // for (never with their keys); a file that is no certificate is refused, naming the field.
    let cert_host = format!("{app}.example.test");
    let generated = rcgen::generate_simple_self_signed(vec![cert_host.clone()]).unwrap();
    let cert_pem = server.config.dir.path().join("c.pem");
    let key_pem = server.config.dir.path().join("k.pem");
    std::fs::write(&cert_pem, generated.cert.pem()).unwrap();
    std::fs::write(&key_pem, generated.signing_key.serialize_pem()).unwrap();
    let cert_name = format!("cert-{app}");
    let (code, out, err) = run(&[
        "cert",
        "add",
        &cert_name,
        "--cert",
        cert_pem.to_str().unwrap(),
        "--key",
        key_pem.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&cert_host), "{out}");
    let (code, out, err) = run(&["cert", "ls", "-o", "json"]);
    assert_eq!(code, 0, "{err}");
    let certs: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let mine = certs
        .iter()
        .find(|c| c["name"] == cert_name.as_str())
        .unwrap_or_else(|| panic!("{cert_name} not listed: {out}"));
    assert_eq!(mine["hosts"], serde_json::json!([cert_host]));
    assert!(!out.contains("PRIVATE KEY"), "{out}");
    let (code, _, err) = run(&[
        "cert",
        "add",
        "bad",
        "--cert",
        key_pem.to_str().unwrap(),
        "--key",
        key_pem.to_str().unwrap(),
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("cert_pem"), "{err}");
    let other = rcgen::generate_simple_self_signed(vec![cert_host.clone()]).unwrap();
    let other_key = server.config.dir.path().join("other.pem");
    std::fs::write(&other_key, other.signing_key.serialize_pem()).unwrap();
    let (code, _, err) = run(&[
        "cert",
        "add",
        "mismatched",
        "--cert",
        cert_pem.to_str().unwrap(),
        "--key",
        other_key.to_str().unwrap(),
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("does not belong"), "{err}");

    // A maintainer of this app only: allowed here, 403 on admin routes, 404 for others.
    let (code, _, err) = run(&["user", "add", "bob"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = run(&["maintainer", "add", &app, "bob"]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = run(&["token", "create", "bob", "-o", "json"]);
    assert_eq!(code, 0, "{err}");
    let bob: serde_json::Value = serde_json::from_str(&out).unwrap();
    let bob_token = bob["token"].as_str().unwrap();
    let (code, _, err) = run(&["ps", &app, "--token", bob_token]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = run(&["node", "drain", "node1", "--token", bob_token]);
    assert_eq!(code, 4, "{err}");
    let (code, _, err) = run(&["ps", "nosuchapp", "--token", bob_token]);
    assert_eq!(code, 3, "{err}");
    let (code, _, err) = run(&["token", "revoke", bob["id"].as_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let (code, _, _) = run(&["ps", &app, "--token", bob_token]);
    assert_eq!(code, 4);

    let (code, _, err) = run(&["app", "rm", &app]);
    assert_eq!(code, 0, "{err}");
    // The engine stops the containers and then deletes the records, so the app is gone
    // shortly after the command returns, not necessarily at once.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (code, _, _) = run(&["app", "show", &app]);
        if code == 3 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the app is still shown 20 s after `lain app rm` (exit {code})"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// Removes the app's images (local and registry-named) from the engines when dropped.
fn scopeguard(nodes: Vec<String>, app: String) -> impl Drop {
    struct G(Vec<String>, String);
    impl Drop for G {
        fn drop(&mut self) {
            for host in &self.0 {
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
                            .is_some_and(|(r, _)| r.ends_with(&self.1))
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
    G(nodes, app)
}
