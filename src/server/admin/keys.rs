//! The admin API's keys: listed and shown for every key, made, changed, rotated and revoked for
//! the keys of the API (the file's keys are read-only here: 409 `defined-in-config`).
//!
//! - `POST /admin/keys` `{"name": …, FIELDS}` → 201 `{"name", "key"}`: the token, shown this once.
//! - `PATCH /admin/keys/{name}` `{FIELDS}` → 200 and the key as `GET` shows it; a field set to
//!   `null` drops the key's own value (its policy's, if any, applies again). A field replaces
//!   the old value whole (`rate`, `quotas`).
//! - `POST /admin/keys/{name}/rotate` `{"grace": "1h"}` (optional, default none) → 200
//!   `{"name", "key", "previous_key_valid_until"}`.
//! - `DELETE /admin/keys/{name}` → 204.
//!
//! FIELDS are a `[[keys]]` entry's (`policy`, `models`, `max_tokens`, …; `sha256` is the
//! gateway's to set), read and checked by the config's own code, so that a 400 says what
//! `tollgate check` would say of the same entry. Every change is written to the log as an audit
//! line (action, key name, the caller's address), never with a token or a hash.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::{json, Map, Value};

use super::{json_response, Admin};
use crate::http::body::GatewayBody;
use crate::http::error::GatewayError;
use crate::keys::registry::KeyError;
use crate::layers::validate::json_type;
use crate::state::managed_keys::ManagedKey;

/// A key's fields fit in far less; a larger body is a mistake.
const MAX_BODY_BYTES: usize = 64 * 1024;
/// A caller on the admin port must send its body within this time.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

pub(super) fn is_keys_path(path: &str) -> bool {
    path == "/admin/keys" || path.starts_with("/admin/keys/")
}

/// Dispatches a `/admin/keys…` request by path and method.
pub(super) async fn route(
    admin: &Admin,
    request: Request<Incoming>,
    peer: SocketAddr,
) -> Response<GatewayBody> {
    let path = request.uri().path().to_owned();
    let method = request.method().clone();
    let rest = path.strip_prefix("/admin/keys").unwrap_or_default();
    let segments: Vec<&str> = rest.split('/').skip(1).collect();
    let result = match (segments.as_slice(), &method) {
        ([], &Method::GET) => Ok(admin.all_keys().await),
        ([], &Method::POST) => create(admin, request.into_body(), peer).await,
        ([], _) => Err(GatewayError::MethodNotAllowed { allow: "GET, POST" }),
        ([name], &Method::GET) => Ok(admin.one_key(name).await),
        ([name], &Method::PATCH) => patch(admin, name, request.into_body(), peer).await,
        ([name], &Method::DELETE) => revoke(admin, name, peer).await,
        ([_], _) => Err(GatewayError::MethodNotAllowed {
            allow: "GET, PATCH, DELETE",
        }),
        ([name, "rotate"], &Method::POST) => rotate(admin, name, request.into_body(), peer).await,
        ([_, "rotate"], _) => Err(GatewayError::MethodNotAllowed { allow: "POST" }),
        _ => Err(GatewayError::NotFound { path }),
    };
    result.unwrap_or_else(GatewayError::into_response)
}

async fn create(
    admin: &Admin,
    body: Incoming,
    peer: SocketAddr,
) -> Result<Response<GatewayBody>, GatewayError> {
    let mut fields = read_object(body).await?;
    let name = match fields.remove("name") {
        Some(Value::String(name)) => name,
        Some(other) => {
            return Err(GatewayError::BadRequest(format!(
                "name: expected a string, found {}",
                json_type(&other)
            )))
        }
        None => return Err(GatewayError::BadRequest("missing field `name`".into())),
    };
    refuse_hashes(&fields)?;
    fields.retain(|_, value| !value.is_null());
    let token = admin
        .registry
        .create(&name, fields)
        .await
        .map_err(|e| refusal(e, &name))?;
    audit("create", &name, peer);
    Ok(json_response(
        StatusCode::CREATED,
        json!({"name": name, "key": token}),
    ))
}

async fn patch(
    admin: &Admin,
    name: &str,
    body: Incoming,
    peer: SocketAddr,
) -> Result<Response<GatewayBody>, GatewayError> {
    let mut changes = read_object(body).await?;
    match changes.remove("name") {
        Some(Value::String(same)) if same == name => {}
        Some(_) => {
            return Err(GatewayError::BadRequest(
                "name: a key's name cannot change (its usage is counted by name); create a key \
                 of the new name and revoke this one"
                    .into(),
            ))
        }
        None => {}
    }
    refuse_hashes(&changes)?;
    admin
        .registry
        .patch(name, &changes)
        .await
        .map_err(|e| refusal(e, name))?;
    audit("update", name, peer);
    Ok(admin.one_key(name).await)
}

async fn rotate(
    admin: &Admin,
    name: &str,
    body: Incoming,
    peer: SocketAddr,
) -> Result<Response<GatewayBody>, GatewayError> {
    let mut fields = read_object(body).await?;
    let grace = match fields.remove("grace") {
        None | Some(Value::Null) => Duration::ZERO,
        Some(Value::String(text)) => humantime::parse_duration(&text).map_err(|_| {
            GatewayError::BadRequest(format!(
                "grace: expected a duration such as \"30s\" or \"1h\", found the string {text:?}"
            ))
        })?,
        Some(other) => {
            return Err(GatewayError::BadRequest(format!(
                "grace: expected a duration such as \"30s\" or \"1h\", found {}",
                json_type(&other)
            )))
        }
    };
    if let Some(field) = fields.keys().next() {
        return Err(GatewayError::BadRequest(format!(
            "unknown field `{field}`, expected `grace`"
        )));
    }
    let (token, until) = admin
        .registry
        .rotate(name, grace)
        .await
        .map_err(|e| refusal(e, name))?;
    audit("rotate", name, peer);
    Ok(json_response(
        StatusCode::OK,
        json!({"name": name, "key": token, "previous_key_valid_until": until.map(rfc3339)}),
    ))
}

async fn revoke(
    admin: &Admin,
    name: &str,
    peer: SocketAddr,
) -> Result<Response<GatewayBody>, GatewayError> {
    admin
        .registry
        .revoke(name)
        .await
        .map_err(|e| refusal(e, name))?;
    audit("revoke", name, peer);
    let mut response = Response::new(crate::http::body::empty());
    *response.status_mut() = StatusCode::NO_CONTENT;
    Ok(response)
}

/// The audit line of a change made: what, to which key, asked from where.
fn audit(action: &'static str, name: &str, peer: SocketAddr) {
    tracing::info!(
        target: "tollgate::audit",
        action,
        key = name,
        source = %peer,
        "managed key changed"
    );
}

/// The request body: a JSON object (an empty body is an empty object).
async fn read_object(body: Incoming) -> Result<Map<String, Value>, GatewayError> {
    let collected =
        tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, MAX_BODY_BYTES).collect())
            .await
            .map_err(|_| GatewayError::RequestTimeout)?
            .map_err(|error| {
                if error.is::<http_body_util::LengthLimitError>() {
                    GatewayError::PayloadTooLarge {
                        limit: MAX_BODY_BYTES,
                    }
                } else {
                    GatewayError::BadRequest("the request body could not be read".into())
                }
            })?;
    let bytes = collected.to_bytes();
    if bytes.trim_ascii().is_empty() {
        return Ok(Map::new());
    }
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(GatewayError::BadRequest(format!(
            "the body must be a JSON object, found {}",
            json_type(&other)
        ))),
        Err(error) => Err(GatewayError::BadRequest(format!(
            "the body is not JSON: {error}"
        ))),
    }
}

/// Hashes are the gateway's to make: a caller never sets one.
fn refuse_hashes(fields: &Map<String, Value>) -> Result<(), GatewayError> {
    if fields.contains_key("sha256") {
        return Err(GatewayError::BadRequest(
            "sha256: set by the gateway; the answer to POST /admin/keys (or …/rotate) carries \
             the new key, and only its SHA-256 is stored"
                .into(),
        ));
    }
    Ok(())
}

/// The answer to a change the registry refused.
fn refusal(error: KeyError, name: &str) -> GatewayError {
    let detail = error.to_string();
    match error {
        KeyError::InConfig(_) => GatewayError::Conflict {
            code: "defined-in-config",
            detail,
        },
        KeyError::Exists(_) => GatewayError::Conflict {
            code: "key-exists",
            detail,
        },
        KeyError::Busy(_) => GatewayError::Conflict {
            code: "key-busy",
            detail,
        },
        KeyError::NotFound(_) => GatewayError::UnknownKey {
            name: name.to_owned(),
        },
        KeyError::Invalid(message) => GatewayError::BadRequest(message),
        KeyError::Unavailable(why) => {
            tracing::warn!(key = name, %why, "managed key change not stored");
            GatewayError::StateUnavailable(why.into())
        }
        KeyError::Random => GatewayError::Internal(detail),
    }
}

/// What a managed key was given and when, added to its `GET` answer.
pub(super) fn describe_managed(described: &mut Value, key: &ManagedKey, now: u64) {
    described["definition"] = Value::Object(key.fields.clone());
    described["created_at"] = rfc3339(key.created_at).into();
    described["updated_at"] = rfc3339(key.updated_at).into();
    described["previous_key_valid_until"] = key.grace_until(now).map(rfc3339).into();
}

/// Unix seconds as `2026-01-31T12:00:00Z`.
fn rfc3339(unix: u64) -> String {
    let time = UNIX_EPOCH + Duration::from_secs(unix);
    humantime::format_rfc3339_seconds(
        time.min(SystemTime::UNIX_EPOCH + Duration::from_secs(253_402_300_799)),
    )
    .to_string()
}
