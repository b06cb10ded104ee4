//! The handlers of every route of docs/api.md and the OpenAPI document built from their
//! annotations.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use axum::body::Bytes;
use axum::extract::{Extension, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post, put};
use axum::{Json as AxumJson, Router};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use lain_state::records::{CertRecord, DnsRecord, NodeRecord, RouteRecord, SecretRecord};
use lain_state::{AppRecord, Kind, NodeState, SCHEMA_VERSION};
use utoipa::OpenApi;

use super::auth::{self, Caller, MaintainerRecord, TokenRecord, UserRecord};
use super::error::{ApiError, Json, PathArgs, Query, parse_json};
use super::types::*;
use super::{ApiState, MAX_LAIN_YAML_BYTES};
use crate::engine::{NodeSpec, ScaleChange};
use crate::lainyaml::{APP_DIR, LainConf, Proc};
use crate::publish::AppSpec;

type Result<T> = std::result::Result<T, ApiError>;

/// The `/api/v1` routes.
pub(super) fn v1_routes() -> Router<ApiState> {
    Router::new()
        .route("/whoami", get(whoami))
        .route("/users", post(create_user))
        .route("/tokens", post(create_token).get(list_tokens))
        .route("/tokens/{id}", axum::routing::delete(delete_token))
        .route("/apps", post(register_app).get(list_apps))
        .route("/apps/{app}", get(show_app).delete(delete_app))
        .route("/apps/{app}/deploys", post(deploy).get(list_deploys))
        .route("/apps/{app}/rollback", post(rollback))
        .route("/apps/{app}/procs/{proc}", patch(scale))
        .route("/apps/{app}/instances", get(instances))
        .route("/apps/{app}/events", get(events))
        .route("/apps/{app}/secrets", get(list_secrets).put(put_secret))
        .route(
            "/apps/{app}/secrets/{proc}",
            get(get_secret).delete(delete_secret),
        )
        .route("/apps/{app}/maintainers", get(list_maintainers))
        .route(
            "/apps/{app}/maintainers/{user}",
            put(add_maintainer).delete(remove_maintainer),
        )
        .route("/nodes", get(list_nodes).post(add_node))
        .route("/nodes/{name}/drain", post(drain_node))
        .route("/nodes/{name}", axum::routing::delete(remove_node))
        .route("/routes", get(list_routes))
        .route("/dns", get(list_dns))
        .route("/certs", post(upload_cert).get(list_certs))
}

#[derive(OpenApi)]
#[openapi(
    info(title = "lain", description = "The lain control plane API (docs/api.md)."),
    paths(
        healthz, whoami, create_user, create_token, list_tokens, delete_token, register_app,
        list_apps, show_app, delete_app, deploy, list_deploys, rollback, scale, instances,
        events, list_secrets, put_secret, get_secret, delete_secret, list_maintainers,
        add_maintainer, remove_maintainer, list_nodes, add_node, drain_node, remove_node,
        list_routes, list_dns, upload_cert, list_certs
    ),
    components(schemas(ErrorBody, ErrorDetail)),
    modifiers(&BearerAuth),
    security(("bearer" = []))
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

pub(super) fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

pub(super) async fn openapi_json() -> Response {
    AxumJson(openapi()).into_response()
}

// ---------------------------------------------------------------------------------------
// Helpers.

fn require_admin(caller: &Caller) -> Result<()> {
    if caller.admin {
        Ok(())
    } else {
        Err(ApiError::forbidden(format!(
            "user {:?} is not an admin",
            caller.user
        )))
    }
}

/// An app as the API sees it: its spec and deployed version.
struct AppView {
    conf: LainConf,
    version: Option<String>,
}

async fn load_app(state: &ApiState, app: &str) -> Result<Option<AppView>> {
    let s = &state.inner;
    let rec: Option<AppRecord> = auth::get_json(&s.client, &s.ks.app(app)).await?;
    if let Some(rec) = rec
        && let Ok(spec) = serde_json::from_value::<AppSpec>(rec.spec)
    {
        return Ok(Some(AppView {
            conf: spec.conf,
            version: (!spec.version.is_empty()).then_some(spec.version),
        }));
    }
    // Registered but not yet published by the engine: the registered text tells.
    let text: Option<String> = auth::get_json(&s.client, &s.ks.lain_yaml(app)).await?;
    Ok(text.and_then(|t| {
        LainConf::parse("lain.yaml", &t, &s.cluster_domains)
            .ok()
            .map(|conf| AppView {
                conf,
                version: None,
            })
    }))
}

/// The app, if it exists and the caller maintains it: 404 before 403.
async fn maintained_app(state: &ApiState, caller: &Caller, app: &str) -> Result<AppView> {
    let view = load_app(state, app)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no app {app:?}; `lain app ls` lists them")))?;
    if !caller.admin
        && !auth::is_maintainer(&state.inner.client, &state.inner.ks, app, &caller.user).await?
    {
        return Err(ApiError::forbidden(format!(
            "user {:?} does not maintain app {app:?}; ask one of its maintainers",
            caller.user
        )));
    }
    Ok(view)
}

fn proc_detail(p: &Proc) -> ProcDetail {
    ProcDetail {
        name: p.name.clone(),
        proc_type: p.proc_type.as_str().to_string(),
        num_instances: p.num_instances,
        cpu: p.cpu,
        memory: p.memory.clone(),
        port: p.port,
        mountpoints: p
            .mountpoints
            .iter()
            .map(|m| format!("{}{}", m.host, m.path))
            .collect(),
    }
}

fn apptype(conf: &LainConf) -> String {
    serde_json::to_value(conf.apptype)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| "app".into())
}

async fn app_detail(state: &ApiState, view: AppView) -> Result<AppDetail> {
    let s = &state.inner;
    let text: Option<String> =
        auth::get_json(&s.client, &s.ks.lain_yaml(&view.conf.appname)).await?;
    Ok(AppDetail {
        name: view.conf.appname.clone(),
        apptype: apptype(&view.conf),
        version: view.version,
        lain_yaml: text.unwrap_or_default(),
        procs: view.conf.procs.values().map(proc_detail).collect(),
    })
}

/// A secret path as stored: relative paths are below `/lain/app`, as lain.yaml's are.
fn secret_path(path: &str) -> Result<String> {
    if path.is_empty()
        || path.len() > 1024
        || path.ends_with('/')
        || path.split('/').any(|s| s == ".." || s == ".")
        || path.contains('\0')
        || path.contains("//")
    {
        return Err(ApiError::bad_field(
            "path",
            format!("{path:?} is not a file path"),
        ));
    }
    Ok(if path.starts_with('/') {
        path.to_string()
    } else {
        format!("{APP_DIR}/{path}")
    })
}

fn engine_entry(e: crate::engine::DeployEntry) -> DeployEntry {
    DeployEntry {
        seq: e.seq,
        at: e.at,
        version: e.version,
        image: e.image,
        outcome: e.outcome,
    }
}

async fn deploy_entries(state: &ApiState, app: &str) -> Result<Vec<DeployEntry>> {
    let s = &state.inner;
    let all: Vec<(String, crate::engine::DeployEntry)> =
        auth::list_json(&s.client, &s.ks.deploys_of_app(app)).await?;
    Ok(all.into_iter().map(|(_, e)| engine_entry(e)).collect())
}

fn valid_version(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 128
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

// ---------------------------------------------------------------------------------------
// Health and identity.

/// Liveness and leadership of this replica.
#[utoipa::path(get, path = "/healthz", tag = "health", security(()),
    responses((status = 200, body = Health)))]
pub(super) async fn healthz(State(state): State<ApiState>) -> AxumJson<Health> {
    AxumJson(Health {
        status: "ok".into(),
        leader: state.leading(),
    })
}

/// The caller's identity and the apps they maintain.
#[utoipa::path(get, path = "/api/v1/whoami", tag = "auth",
    responses((status = 200, body = WhoAmI), (status = 401, body = ErrorBody)))]
async fn whoami(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
) -> Result<AxumJson<WhoAmI>> {
    let apps = auth::apps_of(&state.inner.client, &state.inner.ks, &caller.user).await?;
    Ok(AxumJson(WhoAmI {
        user: caller.user,
        admin: caller.admin,
        apps,
    }))
}

/// Creates a user (admin).
#[utoipa::path(post, path = "/api/v1/users", tag = "auth", request_body = CreateUserRequest,
    responses((status = 201, body = UserInfo), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
async fn create_user(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Json(req): Json<CreateUserRequest>,
) -> Result<(StatusCode, AxumJson<UserInfo>)> {
    require_admin(&caller)?;
    if !auth::valid_user_name(&req.name) {
        return Err(ApiError::bad_field(
            "name",
            format!(
                "{:?} is not a user name (lower-case letters, digits, '-', '_', '.'; at most 63)",
                req.name
            ),
        ));
    }
    if !auth::create_user(&state.inner.client, &state.inner.ks, &req.name, req.admin).await? {
        return Err(ApiError::conflict(format!("user {:?} exists", req.name)));
    }
    Ok((
        StatusCode::CREATED,
        AxumJson(UserInfo {
            name: req.name,
            admin: req.admin,
        }),
    ))
}

/// Creates a token (admin, or a user for themselves); the token is shown only here.
#[utoipa::path(post, path = "/api/v1/tokens", tag = "auth", request_body = CreateTokenRequest,
    responses((status = 201, body = CreatedToken), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
async fn create_token(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Json(req): Json<CreateTokenRequest>,
) -> Result<(StatusCode, AxumJson<CreatedToken>)> {
    if !caller.admin && caller.user != req.user {
        return Err(ApiError::forbidden(
            "only admins create tokens for other users",
        ));
    }
    let s = &state.inner;
    let user: Option<UserRecord> = auth::get_json(&s.client, &s.ks.user(&req.user)).await?;
    if user.is_none() {
        return Err(ApiError::not_found(format!("no user {:?}", req.user)));
    }
    let description = req.description.unwrap_or_default();
    if description.len() > 256 {
        return Err(ApiError::bad_field("description", "at most 256 bytes"));
    }
    let (id, token) = auth::create_token(&s.client, &s.ks, &req.user, &description).await?;
    Ok((
        StatusCode::CREATED,
        AxumJson(CreatedToken {
            id,
            user: req.user,
            token,
        }),
    ))
}

/// Lists tokens: all for an admin, the caller's own otherwise.
#[utoipa::path(get, path = "/api/v1/tokens", tag = "auth",
    responses((status = 200, body = [TokenInfo]), (status = 401, body = ErrorBody)))]
async fn list_tokens(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
) -> Result<AxumJson<Vec<TokenInfo>>> {
    let all = auth::tokens(&state.inner.client, &state.inner.ks).await?;
    Ok(AxumJson(
        all.into_iter()
            .filter(|(_, t)| caller.admin || t.user == caller.user)
            .map(|(id, t)| TokenInfo {
                id,
                user: t.user,
                description: t.description,
                created_at: t.created_at,
            })
            .collect(),
    ))
}

/// Revokes a token (admin, or its owner).
#[utoipa::path(delete, path = "/api/v1/tokens/{id}", tag = "auth",
    params(("id" = String, Path, description = "The token's id")),
    responses((status = 204), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
async fn delete_token(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    PathArgs(id): PathArgs<String>,
) -> Result<StatusCode> {
    let s = &state.inner;
    let found: Vec<(String, TokenRecord)> = if id.len() == auth::TOKEN_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        auth::list_json(&s.client, &s.ks.token(&id)).await?
    } else {
        Vec::new()
    };
    let Some((key, rec)) = found.into_iter().next() else {
        return Err(ApiError::not_found(format!("no token {id:?}")));
    };
    if !caller.admin && rec.user != caller.user {
        return Err(ApiError::forbidden(
            "only admins revoke other users' tokens",
        ));
    }
    s.client
        .kv_client()
        .delete(key, None)
        .await
        .map_err(ApiError::etcd)?;
    Ok(StatusCode::NO_CONTENT)
}

// ---------------------------------------------------------------------------------------
// Apps.

/// Registers a new app (the caller becomes its maintainer) or updates one they maintain.
#[utoipa::path(post, path = "/api/v1/apps", tag = "apps", request_body = RegisterAppRequest,
    responses((status = 201, body = AppDetail), (status = 200, body = AppDetail),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 422, body = ErrorBody)))]
async fn register_app(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Json(req): Json<RegisterAppRequest>,
) -> Result<(StatusCode, AxumJson<AppDetail>)> {
    if req.lain_yaml.len() > MAX_LAIN_YAML_BYTES {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("lain.yaml is larger than {} KiB", MAX_LAIN_YAML_BYTES >> 10),
        ));
    }
    let s = &state.inner;
    let conf = LainConf::parse("lain.yaml", &req.lain_yaml, &s.cluster_domains)
        .map_err(|e| ApiError::invalid_lain_yaml(&e))?;
    let app = conf.appname.clone();
    let existing = load_app(&state, &app).await?;
    if existing.is_some() {
        maintained_app(&state, &caller, &app).await?;
    }
    let engine = state.engine()?;
    let conf = engine.register("lain.yaml", &req.lain_yaml).await?;
    auth::put_json(&s.client, &s.ks.lain_yaml(&app), &req.lain_yaml).await?;
    let status = if existing.is_some() {
        StatusCode::OK
    } else {
        auth::add_maintainer(&s.client, &s.ks, &app, &caller.user).await?;
        StatusCode::CREATED
    };
    let version = existing.and_then(|e| e.version);
    let detail = app_detail(&state, AppView { conf, version }).await?;
    Ok((status, AxumJson(detail)))
}

/// Lists every app.
#[utoipa::path(get, path = "/api/v1/apps", tag = "apps",
    responses((status = 200, body = [AppSummary]), (status = 401, body = ErrorBody)))]
async fn list_apps(State(state): State<ApiState>) -> Result<AxumJson<Vec<AppSummary>>> {
    let s = &state.inner;
    let recs: Vec<(String, AppRecord)> =
        auth::list_json(&s.client, &s.ks.kind_prefix(Kind::App)).await?;
    let mut out = Vec::new();
    for (_, rec) in recs {
        let Ok(spec) = serde_json::from_value::<AppSpec>(rec.spec) else {
            continue;
        };
        out.push(AppSummary {
            name: rec.name,
            apptype: apptype(&spec.conf),
            version: (!spec.version.is_empty()).then_some(spec.version),
            procs: spec
                .conf
                .procs
                .values()
                .map(|p| ProcSummary {
                    name: p.name.clone(),
                    proc_type: p.proc_type.as_str().to_string(),
                    num_instances: p.num_instances,
                })
                .collect(),
        });
    }
    Ok(AxumJson(out))
}

/// Shows an app (maintainer).
#[utoipa::path(get, path = "/api/v1/apps/{app}", tag = "apps",
    params(("app" = String, Path, description = "The app name")),
    responses((status = 200, body = AppDetail), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn show_app(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    PathArgs(app): PathArgs<String>,
) -> Result<AxumJson<AppDetail>> {
    let view = maintained_app(&state, &caller, &app).await?;
    Ok(AxumJson(app_detail(&state, view).await?))
}

/// Removes an app: its containers stop and its records, secrets and maintainers go.
#[utoipa::path(delete, path = "/api/v1/apps/{app}", tag = "apps",
    params(("app" = String, Path, description = "The app name")),
    responses((status = 204), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
async fn delete_app(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    PathArgs(app): PathArgs<String>,
) -> Result<StatusCode> {
    maintained_app(&state, &caller, &app).await?;
    let engine = state.engine()?;
    match engine.remove_app(&app).await {
        Ok(()) | Err(crate::EngineError::NoApp(_)) => {}
        Err(e) => return Err(e.into()),
    }
    let s = &state.inner;
    let mut kv = s.client.kv_client();
    let prefix = etcd_client::DeleteOptions::new().with_prefix();
    for range in [s.ks.secrets_of_app(&app), s.ks.maintainers_of_app(&app)] {
        kv.delete(range, Some(prefix.clone()))
            .await
            .map_err(ApiError::etcd)?;
    }
    kv.delete(s.ks.lain_yaml(&app), None)
        .await
        .map_err(ApiError::etcd)?;
    Ok(StatusCode::NO_CONTENT)
}

/// The newest `{app}:release-*` image on the cluster's nodes.
async fn newest_release(state: &ApiState, app: &str) -> Result<Option<(String, String)>> {
    let s = &state.inner;
    let nodes: Vec<(String, NodeRecord)> =
        auth::list_json(&s.client, &s.ks.kind_prefix(Kind::Node)).await?;
    let mut best: Option<(i64, String)> = None;
    for (_, n) in nodes {
        let Ok(client) = crate::docker::NodeClient::connect(&n.name, &n.docker_host, n.address)
        else {
            continue;
        };
        let found = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            client.release_images(app),
        )
        .await;
        match found {
            Ok(Ok(list)) => {
                for (tag, created) in list {
                    if best.as_ref().is_none_or(|(c, t)| (created, &tag) > (*c, t)) {
                        best = Some((created, tag));
                    }
                }
            }
            Ok(Err(e)) => tracing::warn!(node = %n.name, error = %e, "cannot list images"),
            Err(_) => tracing::warn!(node = %n.name, "listing images timed out"),
        }
    }
    let prefix = format!("{app}:release-");
    Ok(best.and_then(|(_, tag)| {
        let version = tag.strip_prefix(&prefix)?.to_string();
        Some((version, tag))
    }))
}

/// The declared secret files of the app that are not stored.
async fn missing_secrets(state: &ApiState, conf: &LainConf) -> Result<Vec<(String, String)>> {
    let s = &state.inner;
    let mut missing = Vec::new();
    for p in conf.procs.values() {
        if p.secret_files_bypass {
            continue;
        }
        for path in &p.secret_files {
            let key = s.ks.secret(&conf.appname, &p.name, path);
            let resp = s
                .client
                .kv_client()
                .get(key, Some(etcd_client::GetOptions::new().with_count_only()))
                .await
                .map_err(ApiError::etcd)?;
            if resp.count() == 0 {
                missing.push((p.name.clone(), path.clone()));
            }
        }
    }
    Ok(missing)
}

/// Deploys a version (maintainer). Without `version`, the newest release image on the nodes.
#[utoipa::path(post, path = "/api/v1/apps/{app}/deploys", tag = "apps",
    params(("app" = String, Path, description = "The app name")),
    request_body(content = DeployRequest, description = "May be empty"),
    responses((status = 202, body = DeployEntry), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn deploy(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    PathArgs(app): PathArgs<String>,
    body: Bytes,
) -> Result<(StatusCode, AxumJson<DeployEntry>)> {
    let req: DeployRequest = if body.iter().all(u8::is_ascii_whitespace) {
        DeployRequest::default()
    } else {
        parse_json(&body)?
    };
    let view = maintained_app(&state, &caller, &app).await?;
    if let Some(v) = &req.version
        && !valid_version(v)
    {
        return Err(ApiError::bad_field(
            "version",
            format!("{v:?} must be 1–128 letters, digits, '-', '_' or '.'"),
        ));
    }
    if let Some(i) = &req.image
        && (i.is_empty() || i.len() > 512 || i.contains(char::is_whitespace))
    {
        return Err(ApiError::bad_field(
            "image",
            format!("{i:?} is not an image reference"),
        ));
    }
    let (version, image) = match (req.version, req.image) {
        (Some(v), Some(i)) => (v, i),
        (Some(v), None) => (v.clone(), format!("{app}:release-{v}")),
        (None, image) => {
            let Some((v, tag)) = newest_release(&state, &app).await? else {
                return Err(ApiError::deploy_rejected(
                    format!(
                        "no {app}:release-* image on any node; run `lain build` first or give a version"
                    ),
                    Vec::new(),
                ));
            };
            (v, image.unwrap_or(tag))
        }
    };
    let missing = missing_secrets(&state, &view.conf).await?;
    if !missing.is_empty() {
        let paths: Vec<String> = missing.iter().map(|(_, p)| p.clone()).collect();
        return Err(ApiError::deploy_rejected(
            format!(
                "declared secret files are missing: {}; set them with `lain secret set {app} PROC PATH` or set secret_files_bypass",
                paths.join(", ")
            ),
            missing
                .into_iter()
                .map(|(proc_name, path)| ErrorDetail {
                    file: None,
                    line: None,
                    column: None,
                    key: Some(format!("{proc_name}.secret_files")),
                    message: path,
                })
                .collect(),
        ));
    }
    let engine = state.engine()?;
    let seq = engine.deploy(&app, &version, &image).await?;
    let s = &state.inner;
    let entry: Option<crate::engine::DeployEntry> =
        auth::get_json(&s.client, &s.ks.deploy(&app, seq)).await?;
    let entry = entry.map(engine_entry).unwrap_or(DeployEntry {
        seq,
        at: auth::now(),
        version,
        image,
        outcome: "started".into(),
    });
    Ok((StatusCode::ACCEPTED, AxumJson(entry)))
}

/// The deploy history (maintainer), oldest first.
#[utoipa::path(get, path = "/api/v1/apps/{app}/deploys", tag = "apps",
    params(("app" = String, Path, description = "The app name")),
    responses((status = 200, body = [DeployEntry]), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn list_deploys(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    PathArgs(app): PathArgs<String>,
) -> Result<AxumJson<Vec<DeployEntry>>> {
    maintained_app(&state, &caller, &app).await?;
    Ok(AxumJson(deploy_entries(&state, &app).await?))
}

/// Deploys the version before the current one again (maintainer).
#[utoipa::path(post, path = "/api/v1/apps/{app}/rollback", tag = "apps",
    params(("app" = String, Path, description = "The app name")),
    responses((status = 202, body = DeployEntry), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
async fn rollback(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    PathArgs(app): PathArgs<String>,
) -> Result<(StatusCode, AxumJson<DeployEntry>)> {
    maintained_app(&state, &caller, &app).await?;
    let engine = state.engine()?;
    let version = engine.rollback(&app).await?;
    let entry = deploy_entries(&state, &app)
        .await?
        .into_iter()
        .last()
        .unwrap_or(DeployEntry {
            seq: 0,
            at: auth::now(),
            version: version.clone(),
            image: String::new(),
            outcome: "started".into(),
        });
    Ok((StatusCode::ACCEPTED, AxumJson(entry)))
}

/// Changes a proc's instances, CPU level or memory (maintainer).
#[utoipa::path(patch, path = "/api/v1/apps/{app}/procs/{proc}", tag = "apps",
    params(("app" = String, Path, description = "The app name"),
        ("proc" = String, Path, description = "The proc name")),
    request_body = ScaleRequest,
    responses((status = 200, body = ProcDetail), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
async fn scale(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    PathArgs((app, proc_name)): PathArgs<(String, String)>,
    Json(req): Json<ScaleRequest>,
) -> Result<AxumJson<ProcDetail>> {
    let view = maintained_app(&state, &caller, &app).await?;
    let Some(p) = view.conf.procs.get(&proc_name) else {
        return Err(ApiError::not_found(format!(
            "app {app:?} has no proc {proc_name:?}"
        )));
    };
    if let Some(n) = req.num_instances {
        if n > crate::engine::MAX_INSTANCES {
            return Err(ApiError::bad_field(
                "num_instances",
                format!("{n} is above {}", crate::engine::MAX_INSTANCES),
            ));
        }
        if p.proc_type == crate::lainyaml::ProcType::Oneshot {
            return Err(ApiError::bad_field(
                "num_instances",
                "oneshot procs are not scaled",
            ));
        }
    }
    if let Some(c) = req.cpu
        && c > 8
    {
        return Err(ApiError::bad_field(
            "cpu",
            format!("{c} is not a level 0–8"),
        ));
    }
    if let Some(m) = &req.memory
        && crate::lainyaml::parse_memory(m).is_none_or(|b| b < 4 << 20)
    {
        return Err(ApiError::bad_field(
            "memory",
            format!("{m:?} is not a size of at least 4m such as 64m or 1g"),
        ));
    }
    let engine = state.engine()?;
    let change = ScaleChange {
        num_instances: req.num_instances,
        cpu: req.cpu,
        memory: req.memory,
    };
    let p = engine.scale_proc(&app, &proc_name, change).await?;
    Ok(AxumJson(proc_detail(&p)))
}

/// The instance slots of an app (maintainer).
#[utoipa::path(get, path = "/api/v1/apps/{app}/instances", tag = "apps",
    params(("app" = String, Path, description = "The app name")),
    responses((status = 200, body = [InstanceInfo]), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn instances(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    PathArgs(app): PathArgs<String>,
) -> Result<AxumJson<Vec<InstanceInfo>>> {
    maintained_app(&state, &caller, &app).await?;
    let engine = state.engine()?;
    let list = engine.instances(&app).await?;
    let s = &state.inner;
    let nodes: BTreeMap<String, IpAddr> =
        auth::list_json::<NodeRecord>(&s.client, &s.ks.kind_prefix(Kind::Node))
            .await?
            .into_iter()
            .map(|(_, n)| (n.name, n.address))
            .collect();
    Ok(AxumJson(
        list.into_iter()
            .map(|i| InstanceInfo {
                address: i
                    .node
                    .as_ref()
                    .and_then(|n| nodes.get(n))
                    .map(|a| a.to_string()),
                proc_name: i.proc_name,
                instance: i.instance,
                node: i.node,
                container_id: i.container_id,
                container_name: i.container_name,
                version: i.version,
                port: i.port,
                healthy: i.healthy,
                serving: i.serving,
                restarts: i.restarts,
                last_exit: i.last_exit,
                pending: i.pending,
            })
            .collect(),
    ))
}

/// The app's event history (maintainer), oldest first.
#[utoipa::path(get, path = "/api/v1/apps/{app}/events", tag = "apps",
    params(("app" = String, Path, description = "The app name")),
    responses((status = 200, body = [EventEntry]), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn events(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    PathArgs(app): PathArgs<String>,
) -> Result<AxumJson<Vec<EventEntry>>> {
    maintained_app(&state, &caller, &app).await?;
    let s = &state.inner;
    let all: Vec<(String, crate::engine::AppEvent)> =
        auth::list_json(&s.client, &s.ks.events_of_app(&app)).await?;
    Ok(AxumJson(
        all.into_iter()
            .map(|(_, e)| EventEntry {
                seq: e.seq,
                at: e.at,
                kind: e.kind,
                proc_name: e.proc_name,
                instance: e.instance,
                message: e.message,
            })
            .collect(),
    ))
}

// ---------------------------------------------------------------------------------------
// Secrets.

fn secret_box(state: &ApiState) -> Result<&crate::secrets::SecretBox> {
    state.inner.secrets.as_ref().ok_or_else(|| {
        ApiError::unavailable("secrets are disabled: the control plane has no secret_key_file")
    })
}

/// Lists an app's secret files, never their content (maintainer).
#[utoipa::path(get, path = "/api/v1/apps/{app}/secrets", tag = "secrets",
    params(("app" = String, Path, description = "The app name")),
    responses((status = 200, body = [SecretInfo]), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn list_secrets(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    PathArgs(app): PathArgs<String>,
) -> Result<AxumJson<Vec<SecretInfo>>> {
    let view = maintained_app(&state, &caller, &app).await?;
    let s = &state.inner;
    let mut out = Vec::new();
    for p in view.conf.procs.keys() {
        let recs: Vec<(String, SecretRecord)> =
            auth::list_json(&s.client, &s.ks.secrets_of_proc(&app, p)).await?;
        out.extend(recs.into_iter().map(|(_, r)| SecretInfo {
            proc: p.clone(),
            size: crate::secrets::sealed_size(&r),
            path: r.path,
            updated_at: r.updated_at,
        }));
    }
    Ok(AxumJson(out))
}

/// Stores a secret file, encrypted (maintainer).
#[utoipa::path(put, path = "/api/v1/apps/{app}/secrets", tag = "secrets",
    params(("app" = String, Path, description = "The app name")),
    request_body = PutSecretRequest,
    responses((status = 204), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn put_secret(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    PathArgs(app): PathArgs<String>,
    Json(req): Json<PutSecretRequest>,
) -> Result<StatusCode> {
    let view = maintained_app(&state, &caller, &app).await?;
    if !view.conf.procs.contains_key(&req.proc) {
        return Err(ApiError::not_found(format!(
            "app {app:?} has no proc {:?}",
            req.proc
        )));
    }
    let path = secret_path(&req.path)?;
    let content = B64
        .decode(req.content_b64.as_bytes())
        .map_err(|_| ApiError::bad_field("content_b64", "content_b64 is not base64"))?;
    let sealed = secret_box(&state)?.seal(&app, &req.proc, &path, &content, auth::now());
    let s = &state.inner;
    auth::put_json(&s.client, &s.ks.secret(&app, &req.proc, &path), &sealed).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn find_secret(
    state: &ApiState,
    caller: &Caller,
    app: &str,
    proc_name: &str,
    path: &str,
) -> Result<(String, SecretRecord)> {
    maintained_app(state, caller, app).await?;
    let path = secret_path(path)?;
    let s = &state.inner;
    let key = s.ks.secret(app, proc_name, &path);
    let rec: Option<SecretRecord> = auth::get_json(&s.client, &key).await?;
    rec.map(|r| (key, r)).ok_or_else(|| {
        ApiError::not_found(format!(
            "app {app:?} proc {proc_name:?} has no secret {path:?}"
        ))
    })
}

/// Reads a secret file back (maintainer).
#[utoipa::path(get, path = "/api/v1/apps/{app}/secrets/{proc}", tag = "secrets",
    params(("app" = String, Path, description = "The app name"),
        ("proc" = String, Path, description = "The proc name"), SecretPathQuery),
    responses((status = 200, body = SecretContent), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
async fn get_secret(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    PathArgs((app, proc_name)): PathArgs<(String, String)>,
    Query(q): Query<SecretPathQuery>,
) -> Result<AxumJson<SecretContent>> {
    let (_, rec) = find_secret(&state, &caller, &app, &proc_name, &q.path).await?;
    let plain = secret_box(&state)?
        .open(&app, &proc_name, &rec)
        .map_err(|e| ApiError::internal("open secret", e))?;
    Ok(AxumJson(SecretContent {
        proc: proc_name,
        path: rec.path,
        content_b64: B64.encode(plain),
    }))
}

/// Removes a secret file (maintainer).
#[utoipa::path(delete, path = "/api/v1/apps/{app}/secrets/{proc}", tag = "secrets",
    params(("app" = String, Path, description = "The app name"),
        ("proc" = String, Path, description = "The proc name"), SecretPathQuery),
    responses((status = 204), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn delete_secret(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    PathArgs((app, proc_name)): PathArgs<(String, String)>,
    Query(q): Query<SecretPathQuery>,
) -> Result<StatusCode> {
    let (key, _) = find_secret(&state, &caller, &app, &proc_name, &q.path).await?;
    state
        .inner
        .client
        .kv_client()
        .delete(key, None)
        .await
        .map_err(ApiError::etcd)?;
    Ok(StatusCode::NO_CONTENT)
}

// ---------------------------------------------------------------------------------------
// Maintainers.

/// Lists an app's maintainers (maintainer).
#[utoipa::path(get, path = "/api/v1/apps/{app}/maintainers", tag = "apps",
    params(("app" = String, Path, description = "The app name")),
    responses((status = 200, body = [MaintainerInfo]), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn list_maintainers(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    PathArgs(app): PathArgs<String>,
) -> Result<AxumJson<Vec<MaintainerInfo>>> {
    maintained_app(&state, &caller, &app).await?;
    let s = &state.inner;
    let all: Vec<(String, MaintainerRecord)> =
        auth::list_json(&s.client, &s.ks.maintainers_of_app(&app)).await?;
    Ok(AxumJson(
        all.into_iter()
            .map(|(_, m)| MaintainerInfo { user: m.user })
            .collect(),
    ))
}

/// Makes a user a maintainer of the app (maintainer).
#[utoipa::path(put, path = "/api/v1/apps/{app}/maintainers/{user}", tag = "apps",
    params(("app" = String, Path, description = "The app name"),
        ("user" = String, Path, description = "The user name")),
    responses((status = 204), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
async fn add_maintainer(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    PathArgs((app, user)): PathArgs<(String, String)>,
) -> Result<StatusCode> {
    maintained_app(&state, &caller, &app).await?;
    let s = &state.inner;
    let rec: Option<UserRecord> = auth::get_json(&s.client, &s.ks.user(&user)).await?;
    if rec.is_none() {
        return Err(ApiError::not_found(format!("no user {user:?}")));
    }
    auth::add_maintainer(&s.client, &s.ks, &app, &user).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Removes a maintainer of the app (maintainer).
#[utoipa::path(delete, path = "/api/v1/apps/{app}/maintainers/{user}", tag = "apps",
    params(("app" = String, Path, description = "The app name"),
        ("user" = String, Path, description = "The user name")),
    responses((status = 204), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
async fn remove_maintainer(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    PathArgs((app, user)): PathArgs<(String, String)>,
) -> Result<StatusCode> {
    maintained_app(&state, &caller, &app).await?;
    let s = &state.inner;
    let resp = s
        .client
        .kv_client()
        .delete(s.ks.maintainer(&app, &user), None)
        .await
        .map_err(ApiError::etcd)?;
    if resp.deleted() == 0 {
        return Err(ApiError::not_found(format!(
            "user {user:?} does not maintain app {app:?}"
        )));
    }
    Ok(StatusCode::NO_CONTENT)
}

// ---------------------------------------------------------------------------------------
// Nodes, routes, DNS, certificates.

fn node_info(n: NodeRecord, lease_alive: bool) -> NodeInfo {
    NodeInfo {
        name: n.name,
        docker_host: n.docker_host,
        address: n.address.to_string(),
        labels: n.labels,
        cpus: n.cpus,
        memory_bytes: n.memory_bytes,
        state: match n.state {
            NodeState::Active => "active".into(),
            NodeState::Draining => "draining".into(),
        },
        lease_alive,
    }
}

/// Lists the cluster's nodes: every stored membership, with whether its lease is alive.
#[utoipa::path(get, path = "/api/v1/nodes", tag = "nodes",
    responses((status = 200, body = [NodeInfo]), (status = 401, body = ErrorBody)))]
async fn list_nodes(State(state): State<ApiState>) -> Result<AxumJson<Vec<NodeInfo>>> {
    let s = &state.inner;
    let leased: Vec<(String, NodeRecord)> =
        auth::list_json(&s.client, &s.ks.kind_prefix(Kind::Node)).await?;
    let members: Vec<(String, NodeRecord)> =
        auth::list_json(&s.client, &s.ks.node_members()).await?;
    let mut all: BTreeMap<String, NodeInfo> = members
        .into_iter()
        .map(|(_, n)| {
            let alive = leased.iter().any(|(_, l)| l.name == n.name);
            (n.name.clone(), node_info(n, alive))
        })
        .collect();
    // Records of a control plane that kept no memberships are still listed.
    for (_, n) in leased {
        all.entry(n.name.clone())
            .or_insert_with(|| node_info(n, true));
    }
    Ok(AxumJson(all.into_values().collect()))
}

/// Adds a Docker engine (admin).
#[utoipa::path(post, path = "/api/v1/nodes", tag = "nodes", request_body = AddNodeRequest,
    responses((status = 201, body = NodeInfo), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 422, body = ErrorBody)))]
async fn add_node(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Json(req): Json<AddNodeRequest>,
) -> Result<(StatusCode, AxumJson<NodeInfo>)> {
    require_admin(&caller)?;
    if !crate::lainyaml::valid_name(&req.name) {
        return Err(ApiError::bad_field(
            "name",
            format!("{:?} is not a valid node name", req.name),
        ));
    }
    if !(req.docker_host.starts_with("unix://") || req.docker_host.starts_with("tcp://")) {
        return Err(ApiError::bad_field(
            "docker_host",
            "must start with unix:// or tcp://",
        ));
    }
    let spec = NodeSpec {
        name: req.name,
        docker_host: req.docker_host,
        address: req.address.unwrap_or(IpAddr::from([127, 0, 0, 1])),
        labels: req.labels,
        cpus: req.cpus.unwrap_or(4),
        memory_bytes: req.memory_bytes.unwrap_or(8 << 30),
    };
    if spec.cpus == 0 || spec.memory_bytes == 0 {
        return Err(ApiError::bad_field(
            "cpus",
            "cpus and memory_bytes must be positive",
        ));
    }
    let engine = state.engine()?;
    engine.add_node(spec.clone()).await?;
    Ok((
        StatusCode::CREATED,
        AxumJson(node_info(spec.record(NodeState::Active), true)),
    ))
}

/// Drains a node: its instances move elsewhere (admin).
#[utoipa::path(post, path = "/api/v1/nodes/{name}/drain", tag = "nodes",
    params(("name" = String, Path, description = "The node name")),
    responses((status = 202), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
async fn drain_node(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    PathArgs(name): PathArgs<String>,
) -> Result<StatusCode> {
    require_admin(&caller)?;
    state.engine()?.drain_node(&name).await?;
    Ok(StatusCode::ACCEPTED)
}

/// Removes a node; its instances are rescheduled (admin).
#[utoipa::path(delete, path = "/api/v1/nodes/{name}", tag = "nodes",
    params(("name" = String, Path, description = "The node name")),
    responses((status = 204), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
async fn remove_node(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    PathArgs(name): PathArgs<String>,
) -> Result<StatusCode> {
    require_admin(&caller)?;
    state.engine()?.remove_node(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The HTTP routes of the cluster state.
#[utoipa::path(get, path = "/api/v1/routes", tag = "state",
    responses((status = 200, body = [RouteInfo]), (status = 401, body = ErrorBody)))]
async fn list_routes(State(state): State<ApiState>) -> Result<AxumJson<Vec<RouteInfo>>> {
    let s = &state.inner;
    let all: Vec<(String, RouteRecord)> =
        auth::list_json(&s.client, &s.ks.kind_prefix(Kind::Route)).await?;
    Ok(AxumJson(
        all.into_iter()
            .map(|(_, r)| RouteInfo {
                host: r.host,
                path: r.path,
                app: r.app,
                proc: r.proc_name,
                https_only: r.https_only,
            })
            .collect(),
    ))
}

/// The static DNS records of the cluster state.
#[utoipa::path(get, path = "/api/v1/dns", tag = "state",
    responses((status = 200, body = [DnsInfo]), (status = 401, body = ErrorBody)))]
async fn list_dns(State(state): State<ApiState>) -> Result<AxumJson<Vec<DnsInfo>>> {
    let s = &state.inner;
    let all: Vec<(String, DnsRecord)> =
        auth::list_json(&s.client, &s.ks.kind_prefix(Kind::Dns)).await?;
    Ok(AxumJson(
        all.into_iter()
            .map(|(_, r)| DnsInfo {
                name: r.name,
                rtype: serde_json::to_value(r.rtype)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default(),
                data: r.data,
                ttl_secs: r.ttl_secs,
            })
            .collect(),
    ))
}

/// The server names and expiry of a PEM chain's leaf certificate.
fn cert_facts(cert_pem: &str) -> std::result::Result<(Vec<String>, String), String> {
    use x509_parser::extensions::GeneralName;
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
        .map_err(|e| format!("not a PEM certificate: {e}"))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let mut hosts = BTreeSet::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let GeneralName::DNSName(d) = n {
                hosts.insert(d.to_ascii_lowercase());
            }
        }
    }
    if hosts.is_empty() {
        for cn in cert.subject().iter_common_name() {
            if let Ok(s) = cn.as_str() {
                hosts.insert(s.to_ascii_lowercase());
            }
        }
    }
    let not_after = chrono::DateTime::from_timestamp(cert.validity().not_after.timestamp(), 0)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default();
    Ok((hosts.into_iter().collect(), not_after))
}

/// Checks that `key_pem` is a private key the proxy can serve and that it belongs to the
/// leaf certificate of `cert_pem`: the same test the proxy makes when it loads the pair, so
/// an upload it would refuse is refused here, with the reason.
fn check_key(cert_pem: &str, key_pem: &str) -> std::result::Result<(), String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| format!("certificate chain: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| format!("not a PEM private key: {e}"))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| format!("unsupported private key: {e}"))?;
    match rustls::sign::CertifiedKey::new(chain, signing).keys_match() {
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            Err("the key does not belong to the certificate".into())
        }
        _ => Ok(()),
    }
}

/// Uploads a TLS certificate and key for the proxy (admin).
#[utoipa::path(post, path = "/api/v1/certs", tag = "certs", request_body = UploadCertRequest,
    responses((status = 201, body = CertInfo), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn upload_cert(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Json(req): Json<UploadCertRequest>,
) -> Result<(StatusCode, AxumJson<CertInfo>)> {
    require_admin(&caller)?;
    if !crate::lainyaml::valid_name(&req.name) {
        return Err(ApiError::bad_field(
            "name",
            format!("{:?} is not a valid certificate name", req.name),
        ));
    }
    let (hosts, not_after) =
        cert_facts(&req.cert_pem).map_err(|m| ApiError::bad_field("cert_pem", m))?;
    if hosts.is_empty() {
        return Err(ApiError::bad_field(
            "cert_pem",
            "the certificate names no host",
        ));
    }
    check_key(&req.cert_pem, &req.key_pem).map_err(|m| ApiError::bad_field("key_pem", m))?;
    let rec = CertRecord {
        v: SCHEMA_VERSION,
        names: hosts.clone(),
        cert_pem: req.cert_pem,
        key_pem: req.key_pem,
    };
    let s = &state.inner;
    // The state tree is written only through the publisher.
    crate::publish::Publisher::new(s.client.clone(), s.ks.clone())
        .put_cert(&req.name, &rec)
        .await
        .map_err(|e| ApiError::internal("store certificate", e))?;
    Ok((
        StatusCode::CREATED,
        AxumJson(CertInfo {
            name: req.name,
            hosts,
            not_after,
        }),
    ))
}

/// Lists the TLS certificates (never their keys).
#[utoipa::path(get, path = "/api/v1/certs", tag = "certs",
    responses((status = 200, body = [CertInfo]), (status = 401, body = ErrorBody)))]
async fn list_certs(State(state): State<ApiState>) -> Result<AxumJson<Vec<CertInfo>>> {
    let s = &state.inner;
    let prefix = s.ks.kind_prefix(Kind::Cert);
    let all: Vec<(String, CertRecord)> = auth::list_json(&s.client, &prefix).await?;
    Ok(AxumJson(
        all.into_iter()
            .map(|(key, r)| CertInfo {
                name: key
                    .strip_prefix(prefix.as_str())
                    .and_then(lain_state::keys::decode_segment)
                    .unwrap_or_default(),
                not_after: cert_facts(&r.cert_pem).map(|f| f.1).unwrap_or_default(),
                hosts: r.names,
            })
            .collect(),
    ))
}
