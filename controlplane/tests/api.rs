//! The HTTP API of the real `lain controlplane` binary against real etcd and the two Docker
//! engines of the harness: auth (401/403/revocation/audit), bad input (400/404/413/422),
//! encrypted secrets mounted into containers, deploys over HTTP, and a standby forwarding
//! to the leader.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use etcd_client::GetOptions;
use futures::StreamExt;
use lain_state::Keyspace;
use lain_test_support::{
    ContainerCleanup, ControlPlaneConfig, LainProcess, eventually, require_etcd, run_lain,
};
use serde_json::{Value, json};

const IMAGE: &str = "lain/busybox:latest";

struct Cluster {
    // Holds the config file and the volumes for as long as the cluster runs.
    _config: ControlPlaneConfig,
    cfg: std::path::PathBuf,
    ks: Keyspace,
    etcd: etcd_client::Client,
    nodes: Vec<String>,
    procs: Vec<LainProcess>,
    token: String,
    http: reqwest::Client,
    _cleanup: ContainerCleanup,
}

impl Cluster {
    /// Writes a config, runs `lain controlplane init` and starts `replicas` processes.
    async fn start(test: &str, replicas: usize) -> Cluster {
        let config = ControlPlaneConfig::init(test, "");
        let ks = Keyspace::new(&config.prefix);
        let procs = (0..replicas).map(|_| config.spawn()).collect();
        let etcd = lain_test_support::etcd_client(&require_etcd()).await;
        let c = Cluster {
            cfg: config.path.clone(),
            ks: ks.clone(),
            etcd,
            nodes: config.nodes.clone(),
            procs,
            token: config.token.clone(),
            http: reqwest::Client::new(),
            _cleanup: ContainerCleanup {
                prefix: ks.prefix().to_string(),
                hosts: config.nodes.clone(),
            },
            _config: config,
        };
        eventually(Duration::from_secs(15), "a leader", || async {
            for i in 0..c.procs.len() {
                let (_, v) = c.call(i, "GET", "/healthz", None, None).await;
                if v["leader"] == true {
                    return Some(());
                }
            }
            None
        })
        .await;
        c
    }

    fn url(&self, replica: usize, path: &str) -> String {
        format!("http://{}{path}", self.procs[replica].addr("api"))
    }

    async fn call(
        &self,
        replica: usize,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self.http.request(
            reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
            self.url(replica, path),
        );
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("API answers");
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.unwrap();
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| panic!("{method} {path}: not JSON: {bytes:?}"))
        };
        (status, value)
    }

    async fn admin(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.call(0, method, path, Some(&self.token), body).await
    }

    async fn raw_post(&self, path: &str, body: Vec<u8>) -> (u16, Value) {
        let resp = self
            .http
            .post(self.url(0, path))
            .bearer_auth(&self.token)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn finish(mut self) {
        for p in &mut self.procs {
            p.terminate(Duration::from_secs(10));
        }
        let _ = self
            .etcd
            .kv_client()
            .delete(
                self.ks.prefix(),
                Some(etcd_client::DeleteOptions::new().with_prefix()),
            )
            .await;
    }
}

fn web_yaml(app: &str, extra: &str) -> String {
    format!(
        "appname: {app}\nweb:\n  cmd: [\"/bin/busybox\", \"httpd\", \"-f\", \"-p\", \"$PORT\", \"-h\", \"/tmp\"]\n  memory: 32m\n{extra}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_roles_revocation_audit_and_bad_input() {
    let c = Cluster::start("api-auth", 1).await;

    // A second init refuses: an admin exists.
    let (code, _, err) = run_lain(
        &["controlplane", "init", "-c", c.cfg.to_str().unwrap()],
        None,
    );
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("admin user exists"), "{err}");

    // No token, a bad token: 401 with the JSON error body.
    let (s, v) = c.call(0, "GET", "/api/v1/apps", None, None).await;
    assert_eq!(s, 401, "{v}");
    assert_eq!(v["code"], "unauthorized");
    let (s, _) = c
        .call(0, "GET", "/api/v1/apps", Some("lain_nope"), None)
        .await;
    assert_eq!(s, 401);

    let (s, v) = c.admin("GET", "/api/v1/whoami", None).await;
    assert_eq!(
        (s, &v["user"], &v["admin"]),
        (200, &json!("admin"), &json!(true)),
        "{v}"
    );

    // The admin registers an app; bob, a plain user, may not see it.
    let (s, v) = c
        .admin(
            "POST",
            "/api/v1/apps",
            Some(json!({"lain_yaml": web_yaml("alpha", "")})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["name"], "alpha");
    assert_eq!(v["procs"][0]["memory"], "32m");
    let (s, v) = c
        .admin("POST", "/api/v1/users", Some(json!({"name": "bob"})))
        .await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = c
        .admin("POST", "/api/v1/users", Some(json!({"name": "bob"})))
        .await;
    assert_eq!(s, 409, "{v}");
    let (s, v) = c
        .admin(
            "POST",
            "/api/v1/tokens",
            Some(json!({"user": "bob", "description": "laptop"})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let bob = v["token"].as_str().unwrap().to_string();
    let bob_id = v["id"].as_str().unwrap().to_string();
    let (s, v) = c
        .call(0, "GET", "/api/v1/apps/alpha", Some(&bob), None)
        .await;
    assert_eq!(s, 403, "{v}");
    assert_eq!(v["code"], "forbidden");
    let (s, _) = c
        .call(
            0,
            "POST",
            "/api/v1/users",
            Some(&bob),
            Some(json!({"name": "eve"})),
        )
        .await;
    assert_eq!(s, 403);
    // Bob registers his own app and maintains it; the admin sees it too.
    let (s, v) = c
        .call(
            0,
            "POST",
            "/api/v1/apps",
            Some(&bob),
            Some(json!({"lain_yaml": web_yaml("bobs", "")})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = c.call(0, "GET", "/api/v1/whoami", Some(&bob), None).await;
    assert_eq!((s, &v["apps"]), (200, &json!(["bobs"])), "{v}");
    let (s, _) = c.admin("GET", "/api/v1/apps/bobs", None).await;
    assert_eq!(s, 200);
    // Bob updating alpha is forbidden too.
    let (s, _) = c
        .call(
            0,
            "POST",
            "/api/v1/apps",
            Some(&bob),
            Some(json!({"lain_yaml": web_yaml("alpha", "")})),
        )
        .await;
    assert_eq!(s, 403);

    // Bob sees only his own tokens; revoking his token locks him out.
    let (s, v) = c.call(0, "GET", "/api/v1/tokens", Some(&bob), None).await;
    assert_eq!(s, 200);
    assert_eq!(v.as_array().unwrap().len(), 1, "{v}");
    let (s, _) = c
        .admin("DELETE", &format!("/api/v1/tokens/{bob_id}"), None)
        .await;
    assert_eq!(s, 204);
    let (s, _) = c.call(0, "GET", "/api/v1/whoami", Some(&bob), None).await;
    assert_eq!(s, 401);
    let (s, _) = c
        .admin("DELETE", &format!("/api/v1/tokens/{bob_id}"), None)
        .await;
    assert_eq!(s, 404);

    // Bad input: wrong type and unknown field name the field; malformed JSON is 400.
    let (s, v) = c
        .admin(
            "PATCH",
            "/api/v1/apps/alpha/procs/web",
            Some(json!({"num_instances": "two"})),
        )
        .await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["details"][0]["key"], "num_instances", "{v}");
    let (s, v) = c
        .admin(
            "POST",
            "/api/v1/apps/alpha/deploys",
            Some(json!({"versoin": "1"})),
        )
        .await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["details"][0]["key"], "versoin", "{v}");
    let (s, v) = c
        .raw_post("/api/v1/apps", b"{\"lain_yaml\": ".to_vec())
        .await;
    assert_eq!((s, &v["code"]), (400, &json!("bad_request")), "{v}");
    // Unknown app and proc: 404.
    let (s, v) = c.admin("GET", "/api/v1/apps/nosuch", None).await;
    assert_eq!((s, &v["code"]), (404, &json!("not_found")), "{v}");
    let (s, _) = c
        .admin(
            "PATCH",
            "/api/v1/apps/alpha/procs/nosuch",
            Some(json!({"num_instances": 1})),
        )
        .await;
    assert_eq!(s, 404);
    // An invalid lain.yaml: 422 with every error located.
    let (s, v) = c
        .admin(
            "POST",
            "/api/v1/apps",
            Some(json!({"lain_yaml": "appname: bad\nweb:\n  memory: lots\n  cpu: 99\n"})),
        )
        .await;
    assert_eq!(s, 422, "{v}");
    assert_eq!(v["code"], "invalid_lain_yaml");
    let details = v["details"].as_array().unwrap();
    assert!(details.len() >= 2, "{v}");
    for d in details {
        assert_eq!(d["file"], "lain.yaml", "{v}");
        assert!(d["line"].as_u64().unwrap() >= 3, "{v}");
    }
    // Oversized: a body above 1 MiB, and a lain.yaml above 256 KiB.
    let (s, v) = c.raw_post("/api/v1/apps", vec![b' '; 2 << 20]).await;
    assert_eq!((s, &v["code"]), (413, &json!("payload_too_large")), "{v}");
    let big = format!("appname: big\n# {}\n", "x".repeat(300 << 10));
    let (s, _) = c
        .admin("POST", "/api/v1/apps", Some(json!({"lain_yaml": big})))
        .await;
    assert_eq!(s, 413);

    // Scaling CPU and memory changes the proc.
    let (s, v) = c
        .admin(
            "PATCH",
            "/api/v1/apps/alpha/procs/web",
            Some(json!({"cpu": 2, "memory": "64m"})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!((&v["cpu"], &v["memory"]), (&json!(2), &json!("64m")), "{v}");
    let (s, v) = c
        .admin(
            "PATCH",
            "/api/v1/apps/alpha/procs/web",
            Some(json!({"memory": "lots"})),
        )
        .await;
    assert_eq!((s, &v["details"][0]["key"]), (400, &json!("memory")), "{v}");

    // Every mutating call is in the audit log with who and what.
    let resp = c
        .etcd
        .kv_client()
        .get(c.ks.audits(), Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    let audit: Vec<Value> = resp
        .kvs()
        .iter()
        .map(|kv| serde_json::from_slice(kv.value()).unwrap())
        .collect();
    assert!(
        audit.iter().any(|a| a["user"] == "admin"
            && a["method"] == "POST"
            && a["path"] == "/api/v1/users"
            && a["status"] == 201),
        "{audit:?}"
    );
    assert!(
        audit
            .iter()
            .any(|a| a["user"] == "bob" && a["path"] == "/api/v1/apps"),
        "{audit:?}"
    );
    assert!(
        audit
            .iter()
            .all(|a| a["at"].as_str().is_some_and(|t| !t.is_empty()))
    );

    // The OpenAPI document is generated and lists the routes.
    let (s, v) = c.call(0, "GET", "/openapi.json", None, None).await;
    assert_eq!(s, 200);
    assert!(
        v["paths"]["/api/v1/apps/{app}/deploys"]["post"].is_object(),
        "{v}"
    );
    c.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_encrypted_required_and_mounted_read_only() {
    let c = Cluster::start("api-secrets", 1).await;
    let yaml = web_yaml("sec", "  secret_files: [conf/secret.txt]\n");
    let (s, v) = c
        .admin("POST", "/api/v1/apps", Some(json!({"lain_yaml": yaml})))
        .await;
    assert_eq!(s, 201, "{v}");

    // Deploying before the secret is set fails and names the path.
    let (s, v) = c
        .admin(
            "POST",
            "/api/v1/apps/sec/deploys",
            Some(json!({"version": "v1", "image": IMAGE})),
        )
        .await;
    assert_eq!((s, &v["code"]), (422, &json!("deploy_rejected")), "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("/lain/app/conf/secret.txt"),
        "{v}"
    );

    // Set, list, read back; etcd holds only ciphertext.
    let plaintext = "db-password-4f9a2c";
    let (s, v) = c
        .admin(
            "PUT",
            "/api/v1/apps/sec/secrets",
            Some(json!({"proc": "web", "path": "conf/secret.txt", "content_b64": B64.encode(plaintext)})),
        )
        .await;
    assert_eq!(s, 204, "{v}");
    let (s, v) = c.admin("GET", "/api/v1/apps/sec/secrets", None).await;
    assert_eq!(s, 200);
    assert_eq!(v[0]["path"], "/lain/app/conf/secret.txt", "{v}");
    assert_eq!(v[0]["size"], plaintext.len());
    assert!(!v.to_string().contains(plaintext));
    let (s, v) = c
        .admin(
            "GET",
            "/api/v1/apps/sec/secrets/web?path=conf/secret.txt",
            None,
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        B64.decode(v["content_b64"].as_str().unwrap()).unwrap(),
        plaintext.as_bytes()
    );
    let raw = c
        .etcd
        .kv_client()
        .get(
            c.ks.secrets_of_app("sec"),
            Some(GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    assert_eq!(raw.kvs().len(), 1);
    let stored = String::from_utf8_lossy(raw.kvs()[0].value()).into_owned();
    assert!(
        !stored.contains(plaintext) && !stored.contains(&B64.encode(plaintext)),
        "{stored}"
    );
    assert!(stored.contains("chacha20poly1305"), "{stored}");

    // Deploy over HTTP; the instance becomes healthy and sees its secret, read-only, 0400.
    let (s, v) = c
        .admin(
            "POST",
            "/api/v1/apps/sec/deploys",
            Some(json!({"version": "v1", "image": IMAGE})),
        )
        .await;
    assert_eq!(s, 202, "{v}");
    assert_eq!(
        (&v["version"], &v["outcome"]),
        (&json!("v1"), &json!("started")),
        "{v}"
    );
    let inst = eventually(Duration::from_secs(60), "a healthy instance", || async {
        let (s, v) = c.admin("GET", "/api/v1/apps/sec/instances", None).await;
        (s == 200 && v[0]["healthy"] == true).then_some(v[0].clone())
    })
    .await;
    assert_eq!(inst["address"], "127.0.0.1", "{inst}");
    let node_idx: usize = inst["node"]
        .as_str()
        .unwrap()
        .trim_start_matches("node")
        .parse()
        .unwrap();
    let docker = bollard::Docker::connect_with_unix(
        &c.nodes[node_idx - 1],
        30,
        bollard::API_DEFAULT_VERSION,
    )
    .unwrap();
    let id = inst["container_id"].as_str().unwrap();
    let exec = |cmd: Vec<&'static str>| {
        let docker = docker.clone();
        let id = id.to_string();
        async move {
            let created = docker
                .create_exec(
                    &id,
                    bollard::exec::CreateExecOptions {
                        cmd: Some(cmd),
                        attach_stdout: Some(true),
                        attach_stderr: Some(true),
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
            let mut out = String::new();
            if let bollard::exec::StartExecResults::Attached { mut output, .. } =
                docker.start_exec(&created.id, None).await.unwrap()
            {
                while let Some(Ok(chunk)) = output.next().await {
                    out.push_str(&chunk.to_string());
                }
            }
            out
        }
    };
    let mode = exec(vec![
        "/bin/busybox",
        "stat",
        "-c",
        "%a",
        "/lain/app/conf/secret.txt",
    ])
    .await;
    assert_eq!(mode.trim(), "400", "{mode}");
    let content = exec(vec!["/bin/busybox", "cat", "/lain/app/conf/secret.txt"]).await;
    assert_eq!(content, plaintext);
    let write = exec(vec![
        "/bin/busybox",
        "sh",
        "-c",
        "echo x > /lain/app/conf/secret.txt && echo wrote",
    ])
    .await;
    assert!(!write.contains("wrote"), "the secret is writable: {write}");

    // Events and the deploy history over HTTP.
    let (s, v) = c.admin("GET", "/api/v1/apps/sec/events", None).await;
    assert_eq!(s, 200);
    let kinds: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    assert!(
        kinds.contains(&"registered") && kinds.contains(&"deployed"),
        "{kinds:?}"
    );
    let (s, v) = c.admin("GET", "/api/v1/apps/sec/deploys", None).await;
    assert_eq!((s, &v[0]["version"]), (200, &json!("v1")), "{v}");

    // Removing the secret: listing is empty and a new deploy is refused again.
    let (s, _) = c
        .admin(
            "DELETE",
            "/api/v1/apps/sec/secrets/web?path=/lain/app/conf/secret.txt",
            None,
        )
        .await;
    assert_eq!(s, 204);
    let (_, v) = c.admin("GET", "/api/v1/apps/sec/secrets", None).await;
    assert_eq!(v, json!([]));
    let (s, _) = c
        .admin(
            "POST",
            "/api/v1/apps/sec/deploys",
            Some(json!({"version": "v2", "image": IMAGE})),
        )
        .await;
    assert_eq!(s, 422);
    c.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_forwards_to_the_leader() {
    let c = Cluster::start("api-standby", 2).await;
    // Whichever process leads, the other one is the standby.
    let (_, h0) = c.call(0, "GET", "/healthz", None, None).await;
    let standby = if h0["leader"] == true { 1 } else { 0 };
    let (_, h) = c.call(standby, "GET", "/healthz", None, None).await;
    assert_eq!(h["leader"], false, "{h}");
    // A mutation through the standby reaches the leader's engine.
    let (s, v) = c
        .call(
            standby,
            "POST",
            "/api/v1/apps",
            Some(&c.token),
            Some(json!({"lain_yaml": web_yaml("fwd", "")})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = c
        .call(
            standby,
            "GET",
            "/api/v1/apps/fwd/instances",
            Some(&c.token),
            None,
        )
        .await;
    assert_eq!(s, 200, "{v}");
    // Reads are answered by the standby itself, errors keep their shape through it.
    let (s, v) = c
        .call(standby, "GET", "/api/v1/apps/fwd", Some(&c.token), None)
        .await;
    assert_eq!((s, &v["name"]), (200, &json!("fwd")), "{v}");
    let (s, v) = c
        .call(
            standby,
            "PATCH",
            "/api/v1/apps/fwd/procs/web",
            Some(&c.token),
            Some(json!({"bogus": 1})),
        )
        .await;
    assert_eq!((s, &v["details"][0]["key"]), (400, &json!("bogus")), "{v}");
    let (s, _) = c
        .call(
            standby,
            "POST",
            "/api/v1/users",
            None,
            Some(json!({"name": "x"})),
        )
        .await;
    assert_eq!(s, 401);
    c.finish().await;
}
