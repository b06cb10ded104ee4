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

fn git(dir: &Path, args: &[&str]) {
    let ok = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.name=t", "-c", "user.email=t@lain.invalid"])
        .args(args)
        .output()
        .unwrap()
        .status
        .success();
    assert!(ok, "git {args:?}");
}

#[test]
fn lain_build_prints_the_image_or_the_failing_step() {
    let host = require_docker_nodes()[0].clone();
    let dir = temp_dir();
    let config = dir.path().join("config.toml");
    let app_dir = dir.path().join("app");
    std::fs::create_dir(&app_dir).unwrap();
    let hello = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/hello");
    for e in std::fs::read_dir(&hello).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), app_dir.join(e.file_name())).unwrap();
    }
    let app = format!("clibuild{}", std::process::id());
    let yaml = std::fs::read_to_string(app_dir.join("lain.yaml"))
        .unwrap()
        .replace("appname: hello", &format!("appname: {app}"));
    std::fs::write(app_dir.join("lain.yaml"), &yaml).unwrap();
    git(&app_dir, &["init", "-q"]);
    git(&app_dir, &["add", "."]);
    git(&app_dir, &["commit", "-q", "-m", "x"]);

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
