//! Table-driven tests of lain.yaml parsing, defaults, expansion and located errors over the
//! corpus in `tests/lain_yaml/`.

use std::path::PathBuf;

use lain_controlplane::lainyaml::{Mountpoint, ProcType};
use lain_controlplane::{LainConf, LocatedError};

fn domains() -> Vec<String> {
    vec!["lain.local".into(), "example.org".into()]
}

fn corpus(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/lain_yaml")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn parse(name: &str) -> Result<LainConf, Vec<LocatedError>> {
    LainConf::parse(name, &corpus(name), &domains())
}

fn ok(name: &str) -> LainConf {
    match parse(name) {
        Ok(c) => c,
        Err(errs) => panic!(
            "{name} should parse:\n{}",
            errs.iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        ),
    }
}

fn mp(host: &str, path: &str) -> Mountpoint {
    Mountpoint {
        host: host.into(),
        path: path.into(),
    }
}

#[test]
fn minimal_file_gets_lain_defaults() {
    let c = ok("minimal.yaml");
    assert_eq!(c.appname, "hello");
    let web = &c.procs["web"];
    assert_eq!(web.proc_type, ProcType::Web);
    assert_eq!(web.port, Some(80));
    assert_eq!(web.memory, "32m");
    assert_eq!(web.memory_bytes, 32 << 20);
    assert_eq!(web.cpu, 0);
    assert_eq!(web.num_instances, 1);
    assert_eq!(web.setup_time_secs, 0);
    assert_eq!(web.kill_timeout_secs, 10);
    assert_eq!(web.volumes, vec!["/lain/logs"]);
    assert!(!web.https_only);
    assert_eq!(web.cmd, vec!["hello"]);
    assert_eq!(
        web.mountpoints,
        vec![
            mp("hello.example.org", "/"),
            mp("hello.lain", "/"),
            mp("hello.lain.local", "/"),
        ]
    );
    assert_eq!(web.podgroup(&c.appname), "hello.web.web");
}

#[test]
fn full_file_reads_every_key() {
    let c = ok("full.yaml");
    let b = c.build.as_ref().unwrap();
    assert_eq!(b.base, "golang:1.22");
    assert_eq!(b.script, vec!["go build -o hello ."]);
    assert_eq!(b.build_arg, vec!["GOPROXY=off"]);
    assert_eq!(b.volumes, vec!["/root/.cache"]);
    let p = b.prepare.as_ref().unwrap();
    assert_eq!(
        (p.version.as_str(), p.keep.as_slice()),
        ("2", &["/go/pkg".to_string()][..])
    );
    let rel = c.release.as_ref().unwrap();
    assert_eq!(rel.dest_base.as_deref(), Some("lain/busybox:latest"));
    assert_eq!(rel.copy.len(), 2);
    assert_eq!(rel.copy[0].dest, "/usr/bin/hello");
    assert_eq!(rel.copy[1].dest, "/lain/app/static");
    assert_eq!(c.test, vec!["go test ./..."]);
    assert_eq!(c.use_services["echo"], vec!["echo"]);
    assert_eq!(c.use_resources["redis"].services, vec!["redis"]);
    assert_eq!(c.use_resources["redis"].params["memory"], "64m");
    assert_eq!(c.notify["slack"], "#hello");

    let web = &c.procs["web"];
    assert_eq!(web.cmd, vec!["hello", "serve", "--port", "8080"]);
    assert_eq!(web.entrypoint, vec!["/bin/sh", "-c"]);
    assert_eq!(web.image.as_deref(), Some("lain/busybox:latest"));
    assert_eq!(web.user.as_deref(), Some("nobody"));
    assert_eq!(web.workdir.as_deref(), Some("/lain/app"));
    assert_eq!(
        web.env,
        vec![
            ("MODE".to_string(), "prod".to_string()),
            ("EMPTY".to_string(), String::new())
        ]
    );
    assert_eq!(web.port, Some(8080));
    assert_eq!(web.memory_bytes, 64 << 20);
    assert_eq!(web.cpu, 2);
    assert_eq!(web.num_instances, 3);
    assert!(web.https_only);
    assert_eq!(web.healthcheck.as_deref(), Some("/healthz"));
    assert_eq!(web.volumes, vec!["/lain/logs", "/data", "/cache"]);
    assert_eq!(web.logs, vec!["access.log"]);
    assert_eq!(
        web.secret_files,
        vec!["/lain/app/secret/config.json", "/etc/hello.key"]
    );
    assert_eq!(web.setup_time_secs, 5);
    assert_eq!(web.kill_timeout_secs, 30);
    assert_eq!(web.labels["team"], "web");
    assert_eq!(web.filters.len(), 2);
    assert!(web.filters[0].equal && web.filters[0].label == "disk");
    assert!(!web.filters[1].equal && web.filters[1].label == "zone");
    // The web proc keeps its default hosts, gains /admin on each, and its explicit host.
    assert_eq!(
        web.mountpoints,
        vec![
            mp("hello.example.com", "/api"),
            mp("hello.example.org", "/"),
            mp("hello.example.org", "/admin"),
            mp("hello.lain", "/"),
            mp("hello.lain", "/admin"),
            mp("hello.lain.local", "/"),
            mp("hello.lain.local", "/admin"),
        ]
    );

    let admin = &c.procs["admin"];
    assert_eq!(admin.proc_type, ProcType::Web);
    assert_eq!(admin.podgroup("hello"), "hello.web.admin");
    assert_eq!(
        admin.mountpoints,
        vec![
            mp("admin.example.com", "/"),
            mp("hello.example.org", "/internal"),
            mp("hello.lain", "/internal"),
            mp("hello.lain.local", "/internal"),
        ]
    );

    let q = &c.procs["queue"];
    assert_eq!(q.proc_type, ProcType::Worker);
    assert_eq!(q.env, vec![("QUEUE".to_string(), "default".to_string())]);
    assert_eq!(q.volumes, vec!["/lain/logs", "/var/spool/hello"]);
    assert!(q.stateful);
    assert_eq!(q.port, Some(9000));
    assert!(q.mountpoints.is_empty());

    assert_eq!(c.procs["migrate"].proc_type, ProcType::Oneshot);
    assert_eq!(c.procs["migrate"].num_instances, 0);
    assert!(c.scheduled_procs().all(|p| p.name != "migrate"));
    assert_eq!(c.procs["cron"].proc_type, ProcType::Worker);
    assert_eq!(c.procs["cron"].memory_bytes, 1 << 30);
    let portal = &c.procs["echo-portal"];
    assert_eq!(portal.proc_type, ProcType::Portal);
    assert_eq!(portal.service_name.as_deref(), Some("echo"));
    assert!(portal.allow_clients.is_empty(), "** means every client");
    assert_eq!(c.procs["stream"].ports, vec![9500, 9501]);
}

#[test]
fn service_shorthand_adds_a_portal() {
    let c = ok("service.yaml");
    let s = &c.procs["echo"];
    assert_eq!(s.proc_type, ProcType::Worker);
    assert_eq!(s.num_instances, 2);
    let p = &c.procs["portal-echo"];
    assert_eq!(p.proc_type, ProcType::Portal);
    assert_eq!(p.service_name.as_deref(), Some("echo"));
    assert_eq!(p.allow_clients, vec!["hello", "world"]);
    assert_eq!(p.cmd, vec!["echo-portal"]);
    assert_eq!(p.memory_bytes, 16 << 20);
    assert_eq!(
        p.port,
        Some(5000),
        "the portal listens on the service's port"
    );
    assert_eq!(p.podgroup("echo"), "echo.portal.portal-echo");
}

#[test]
fn anchors_and_flow_mappings() {
    let c = ok("anchors.yaml");
    assert_eq!(c.procs["web"].memory_bytes, 128 << 20);
    assert_eq!(c.procs["copy"].env.len(), 2);
    assert_eq!(c.procs["copy"].proc_type, ProcType::Worker);
}

#[test]
fn resource_template_renders_then_parses() {
    let text = corpus("resource.yaml");
    let params = serde_json::json!({"memory": "64m"});
    let rendered = lain_controlplane::resources::render("resource.yaml", &text, &params).unwrap();
    let c = LainConf::parse_resource_instance(
        "resource.yaml",
        &rendered.replace("appname: redis", "appname: resource.redis.hello"),
        &domains(),
        "resource.redis.hello",
    )
    .unwrap();
    assert_eq!(c.appdomain(), "hello.redis.resource");
    assert_eq!(c.procs["redis"].memory, "64m");
    assert_eq!(
        c.procs["redis"].cmd,
        vec!["redis-server", "--maxmemory", "64m"]
    );
}

/// (file, [(line, column, key, part of the message)]): every error, in file order.
type Expected = (
    &'static str,
    &'static [(usize, usize, &'static str, &'static str)],
);

const INVALID: &[Expected] = &[
    (
        "invalid_many.yaml",
        &[
            (1, 10, "appname", "does not match"),
            (2, 10, "apptype", "neither app nor resource"),
            (3, 1, "color", "unknown key"),
            (5, 11, "web.memory", "does not match"),
            (6, 8, "web.cpu", "out of range"),
            (7, 18, "web.num_instances", "expected an integer"),
            (8, 15, "web.setup_time", "out of range"),
            (9, 17, "web.kill_timeout", "out of range"),
            (10, 16, "web.healthcheck", "does not start with '/'"),
            (11, 15, "web.https_only", "expected true or false"),
            (12, 9, "web.port", "out of range"),
            (13, 3, "web.bogus", "unknown key"),
            (15, 7, "web.env[0]", "is not NAME=VALUE"),
            (17, 7, "web.volumes[0]", "not an absolute path"),
            (19, 7, "web.logs[0]", "relative path"),
            (21, 7, "web.ports[0]", "out of range 9500"),
            (23, 7, "web.filters[0]", "LABEL==VALUE"),
            (24, 1, "web.api.mountpoint", "at least one mountpoint"),
            (26, 1, "worker.w.https_only", "only web procs"),
            (
                27,
                15,
                "worker.w.mountpoint",
                "only web procs have mountpoints",
            ),
        ],
    ),
    ("invalid_syntax.yaml", &[(4, 7, "", "invalid YAML")]),
    ("invalid_name.yaml", &[(1, 10, "appname", "reserved")]),
    (
        "missing_appname.yaml",
        &[(1, 1, "appname", "missing required key")],
    ),
];

#[test]
fn invalid_files_report_every_error_located() {
    for (file, expected) in INVALID {
        let errs = parse(file).expect_err(file);
        let got: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        for (line, col, key, msg) in expected.iter() {
            assert!(
                errs.iter().any(|e| e.file == *file
                    && e.line == *line
                    && e.column == *col
                    && e.key == *key
                    && e.message.contains(msg)),
                "{file}: expected {line}:{col} {key}: {msg}; got:\n{}",
                got.join("\n")
            );
        }
        assert_eq!(
            errs.len(),
            expected.len(),
            "{file}: unexpected extra errors:\n{}",
            got.join("\n")
        );
    }
}

#[test]
fn invalid_many_also_reports_cross_proc_problems() {
    // With the app name corrected, the proc-level errors remain: none depended on it.
    let text = corpus("invalid_many.yaml").replace("appname: 2bad", "appname: good");
    let errs = LainConf::parse("x.yaml", &text, &domains()).unwrap_err();
    let keys: Vec<&str> = errs.iter().map(|e| e.key.as_str()).collect();
    assert!(keys.contains(&"web.api.mountpoint"), "{keys:?}");
    assert!(keys.contains(&"worker.w.mountpoint"), "{keys:?}");
    assert!(keys.contains(&"worker.w.https_only"), "{keys:?}");
}

#[test]
fn type_and_structure_errors() {
    let errs = parse("invalid_types.yaml").unwrap_err();
    let show: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
    let has = |key: &str, msg: &str| {
        assert!(
            errs.iter().any(|e| e.key == key && e.message.contains(msg)),
            "missing {key}: {msg} in\n{}",
            show.join("\n")
        )
    };
    has("build.base", "missing required key");
    has("release.copy[0].src", "missing required key");
    has("release.unknown", "unknown key");
    has("test.scripts", "unknown key");
    has("use_services", "expected a mapping");
    has("proc.x.type", "missing required key");
    has("proc.y.type", "is not one of");
    has("portal.p.service_name", "must name its service");
    has("worker.dup-key.cmd", "duplicate key");
    has("mountpoint", "claimed by both");
    for e in &errs {
        assert!(e.line > 0 && e.column > 0, "{e}");
        assert_eq!(e.file, "invalid_types.yaml");
    }
}

#[test]
fn mountpoint_expansion_table() {
    // (mountpoint list of a `web.extra` proc, expected expansion).
    let cases: &[(&str, &[(&str, &str)])] = &[
        (
            "[/a]",
            &[
                ("app.example.org", "/a"),
                ("app.lain", "/a"),
                ("app.lain.local", "/a"),
            ],
        ),
        ("[x.com]", &[("x.com", "/")]),
        ("[X.COM/p/q/]", &[("x.com", "/p/q")]),
        (
            "[x.com/p, /q]",
            &[
                ("app.example.org", "/q"),
                ("app.lain", "/q"),
                ("app.lain.local", "/q"),
                ("x.com", "/p"),
            ],
        ),
    ];
    for (mps, expected) in cases {
        let text = format!("appname: app\nweb.extra:\n  mountpoint: {mps}\n");
        let c = LainConf::parse("t.yaml", &text, &domains()).unwrap();
        let got: Vec<(String, String)> = c.procs["extra"]
            .mountpoints
            .iter()
            .map(|m| (m.host.clone(), m.path.clone()))
            .collect();
        let want: Vec<(String, String)> = expected
            .iter()
            .map(|(h, p)| (h.to_string(), p.to_string()))
            .collect();
        assert_eq!(got, want, "mountpoint {mps}");
    }
    // A cluster domain itself cannot be claimed, nor a URL.
    for bad in ["lain.local", "http://x.com/", "a..b"] {
        let text = format!("appname: app\nweb.extra:\n  mountpoint: [\"{bad}\"]\n");
        assert!(
            LainConf::parse("t.yaml", &text, &domains()).is_err(),
            "{bad} should be rejected"
        );
    }
    // A path the proxy could never match (it merges slashes and resolves dot segments before
    // matching) is an error at its place, not a dead route.
    for bad in ["a.com/api//v1", "/x/../y", "a.com/./x", "/%2e%2e/x"] {
        let text = format!("appname: app\nweb.extra:\n  mountpoint: [\"{bad}\"]\n");
        let err = LainConf::parse("t.yaml", &text, &domains()).unwrap_err();
        let shown = format!("{err:?}");
        assert!(
            shown.contains("segment") && shown.contains("web.extra.mountpoint[0]"),
            "{bad}: {shown}"
        );
    }
    // A resource instance's app domain is reversed.
    let text = "appname: resource.redis.hello\nweb:\n  cmd: x\n";
    let c = LainConf::parse_resource_instance("t.yaml", text, &domains(), "resource.redis.hello")
        .unwrap();
    assert!(
        c.procs["web"]
            .mountpoints
            .contains(&mp("hello.redis.resource.lain", "/"))
    );
}

#[test]
fn arbitrary_garbage_never_panics() {
    let inputs = [
        "",
        "- a\n- b\n",
        "appname: [a]\n",
        "appname: hello\nweb: 3\n",
        "appname: hello\nweb:\n  env: 3\n  cmd: {a: b}\n",
        "appname: hello\n? [complex, key]\n: v\n",
        "appname: hello\nweb: *nope\n",
        "\t\u{0}\u{ffff}",
        "appname: hello\nweb:\n  ports: {a: b}\n  volumes: [{a: 1, b: 2}]\n  memory: 1k\n",
    ];
    for text in inputs {
        let _ = LainConf::parse("g.yaml", text, &domains());
    }
}
