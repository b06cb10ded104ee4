//! Users, bearer tokens, app maintainers and the audit log, all kept in etcd below
//! `{prefix}/cp/`.
//!
//! A token is 32 random bytes shown once; etcd holds only its SHA-256, as the key
//! `cp/tokens/{sha256}`, so a copy of etcd gives no way in. A token's public id is the first
//! 16 hex digits of that hash, enough to name it for revocation without revealing it.

use axum::http::HeaderMap;
use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp};
use lain_state::Keyspace;
use lain_state::keys::decode_segment;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::error::ApiError;

/// The schema version of the credential records.
const V: u32 = 1;

/// How many hex digits of a token's hash make its id.
pub const TOKEN_ID_LEN: usize = 16;

/// A user: `cp/users/{name}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserRecord {
    /// Schema version.
    pub v: u32,
    /// The user name.
    pub name: String,
    /// Whether the user may do everything.
    pub admin: bool,
    /// RFC 3339 creation time.
    pub created_at: String,
}

/// A token: `cp/tokens/{sha256}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Schema version.
    pub v: u32,
    /// The user it authenticates.
    pub user: String,
    /// A note telling tokens apart.
    pub description: String,
    /// RFC 3339 creation time.
    pub created_at: String,
}

/// A maintainer of an app: `cp/maintainers/{app}/{user}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MaintainerRecord {
    /// Schema version.
    pub v: u32,
    /// The app.
    pub app: String,
    /// The user.
    pub user: String,
    /// RFC 3339 time it was added.
    pub added_at: String,
}

/// One mutating API call: `cp/audit/{seq}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Schema version.
    pub v: u32,
    /// Sequence number.
    pub seq: u64,
    /// RFC 3339 time.
    pub at: String,
    /// Who called.
    pub user: String,
    /// The HTTP method.
    pub method: String,
    /// The request path (never the body, which may hold a secret).
    pub path: String,
    /// The response status.
    pub status: u16,
}

/// The authenticated caller of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The user name.
    pub user: String,
    /// Whether the user is an admin.
    pub admin: bool,
}

/// The current time in RFC 3339.
pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// The SHA-256 of a token, hex.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A fresh token and its hash.
pub fn new_token() -> (String, String) {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let token = format!("lain_{}", hex::encode(bytes));
    let hash = hash_token(&token);
    (token, hash)
}

/// Whether `name` is a valid user name.
pub fn valid_user_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_' || b == b'.'
        })
        && !name.starts_with(['-', '.'])
}

/// Reads one JSON value; `None` when the key is absent or unreadable.
pub async fn get_json<T: for<'de> Deserialize<'de>>(
    client: &Client,
    key: &str,
) -> Result<Option<T>, ApiError> {
    let resp = client
        .kv_client()
        .get(key, None)
        .await
        .map_err(ApiError::etcd)?;
    Ok(resp
        .kvs()
        .first()
        .and_then(|kv| serde_json::from_slice(kv.value()).ok()))
}

/// Reads every JSON value below `prefix` in key order, with its key; unreadable ones are
/// skipped.
pub async fn list_json<T: for<'de> Deserialize<'de>>(
    client: &Client,
    prefix: &str,
) -> Result<Vec<(String, T)>, ApiError> {
    let resp = client
        .kv_client()
        .get(prefix, Some(GetOptions::new().with_prefix()))
        .await
        .map_err(ApiError::etcd)?;
    Ok(resp
        .kvs()
        .iter()
        .filter_map(|kv| {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            serde_json::from_slice(kv.value()).ok().map(|v| (key, v))
        })
        .collect())
}

/// Writes one JSON value.
pub async fn put_json<T: Serialize>(client: &Client, key: &str, value: &T) -> Result<(), ApiError> {
    let bytes = serde_json::to_vec(value).map_err(|e| ApiError::internal("encode record", e))?;
    client
        .kv_client()
        .put(key, bytes, None)
        .await
        .map_err(ApiError::etcd)?;
    Ok(())
}

/// Writes one JSON value only if the key does not exist yet; `false` if it did.
pub async fn create_json<T: Serialize>(
    client: &Client,
    key: &str,
    value: &T,
) -> Result<bool, ApiError> {
    let bytes = serde_json::to_vec(value).map_err(|e| ApiError::internal("encode record", e))?;
    let txn = Txn::new()
        .when(vec![Compare::create_revision(key, CompareOp::Equal, 0)])
        .and_then(vec![TxnOp::put(key, bytes, None)]);
    let resp = client.kv_client().txn(txn).await.map_err(ApiError::etcd)?;
    Ok(resp.succeeded())
}

/// Authenticates the `Authorization: Bearer` header.
pub async fn authenticate(
    client: &Client,
    ks: &Keyspace,
    headers: &HeaderMap,
) -> Result<Caller, ApiError> {
    let Some(value) = headers.get(axum::http::header::AUTHORIZATION) else {
        return Err(ApiError::unauthorized(
            "no token: send `Authorization: Bearer TOKEN` (run `lain login`)",
        ));
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ApiError::unauthorized("the Authorization header is not `Bearer TOKEN`"))?;
    let record: Option<TokenRecord> = get_json(client, &ks.token(&hash_token(token))).await?;
    let Some(record) = record else {
        return Err(ApiError::unauthorized(
            "the token is unknown or revoked; ask an admin for a new one",
        ));
    };
    let user: Option<UserRecord> = get_json(client, &ks.user(&record.user)).await?;
    let Some(user) = user else {
        return Err(ApiError::unauthorized("the token's user no longer exists"));
    };
    Ok(Caller {
        user: user.name,
        admin: user.admin,
    })
}

/// Whether `user` maintains `app`.
pub async fn is_maintainer(
    client: &Client,
    ks: &Keyspace,
    app: &str,
    user: &str,
) -> Result<bool, ApiError> {
    let rec: Option<MaintainerRecord> = get_json(client, &ks.maintainer(app, user)).await?;
    Ok(rec.is_some())
}

/// The apps `user` maintains.
pub async fn apps_of(client: &Client, ks: &Keyspace, user: &str) -> Result<Vec<String>, ApiError> {
    let all: Vec<(String, MaintainerRecord)> = list_json(client, &ks.maintainers()).await?;
    Ok(all
        .into_iter()
        .filter(|(_, m)| m.user == user)
        .map(|(_, m)| m.app)
        .collect())
}

/// Makes `user` a maintainer of `app`.
pub async fn add_maintainer(
    client: &Client,
    ks: &Keyspace,
    app: &str,
    user: &str,
) -> Result<(), ApiError> {
    let rec = MaintainerRecord {
        v: V,
        app: app.to_string(),
        user: user.to_string(),
        added_at: now(),
    };
    put_json(client, &ks.maintainer(app, user), &rec).await
}

/// Creates a user; `false` if it exists.
pub async fn create_user(
    client: &Client,
    ks: &Keyspace,
    name: &str,
    admin: bool,
) -> Result<bool, ApiError> {
    let rec = UserRecord {
        v: V,
        name: name.to_string(),
        admin,
        created_at: now(),
    };
    create_json(client, &ks.user(name), &rec).await
}

/// Creates a token for `user`; returns (id, token).
pub async fn create_token(
    client: &Client,
    ks: &Keyspace,
    user: &str,
    description: &str,
) -> Result<(String, String), ApiError> {
    let (token, hash) = new_token();
    let rec = TokenRecord {
        v: V,
        user: user.to_string(),
        description: description.to_string(),
        created_at: now(),
    };
    put_json(client, &ks.token(&hash), &rec).await?;
    Ok((hash[..TOKEN_ID_LEN].to_string(), token))
}

/// Every token with its id.
pub async fn tokens(
    client: &Client,
    ks: &Keyspace,
) -> Result<Vec<(String, TokenRecord)>, ApiError> {
    let prefix = ks.tokens();
    let all: Vec<(String, TokenRecord)> = list_json(client, &prefix).await?;
    Ok(all
        .into_iter()
        .filter_map(|(key, rec)| {
            let hash = decode_segment(key.strip_prefix(prefix.as_str())?)?;
            Some((hash.get(..TOKEN_ID_LEN)?.to_string(), rec))
        })
        .collect())
}

/// Appends a mutating call to the audit log.
pub async fn audit(
    client: &Client,
    ks: &Keyspace,
    user: &str,
    method: &str,
    path: &str,
    status: u16,
) -> Result<(), etcd_client::Error> {
    let counter = ks.counter("audit");
    let mut kv = client.kv_client();
    // Bounded retries: a lost race with another writer only costs another round trip.
    for _ in 0..32 {
        let resp = kv.get(counter.as_str(), None).await?;
        let (cur, rev) = match resp.kvs().first() {
            Some(item) => (
                std::str::from_utf8(item.value())
                    .ok()
                    .and_then(|s| s.parse::<u64>().ok())
                    .unwrap_or(0),
                item.mod_revision(),
            ),
            None => (0, 0),
        };
        let seq = cur + 1;
        let rec = AuditRecord {
            v: V,
            seq,
            at: now(),
            user: user.to_string(),
            method: method.to_string(),
            path: path.to_string(),
            status,
        };
        let txn = Txn::new()
            .when(vec![Compare::mod_revision(
                counter.as_str(),
                CompareOp::Equal,
                rev,
            )])
            .and_then(vec![
                TxnOp::put(counter.as_str(), seq.to_string(), None),
                TxnOp::put(
                    ks.audit(seq),
                    serde_json::to_vec(&rec).unwrap_or_default(),
                    None,
                ),
            ]);
        if kv.txn(txn).await?.succeeded() {
            return Ok(());
        }
    }
    tracing::warn!(user, method, path, "audit log contended; entry dropped");
    Ok(())
}

/// Whether any admin user exists.
pub async fn admin_exists(client: &Client, ks: &Keyspace) -> Result<bool, ApiError> {
    let users: Vec<(String, UserRecord)> = list_json(client, &ks.users()).await?;
    Ok(users.iter().any(|(_, u)| u.admin))
}
