//! Request body validation against the API's own schemas (`schemas/openapi.json`, embedded),
//! producing the [`ParsedRequest`] extension the later layers read.
//!
//! Steps, each refused with 400 in the documented shape: the `Content-Type` must be JSON; the
//! body must parse (serde_json: invalid UTF-8, bad syntax, nesting deeper than 128 and an object
//! naming a member twice are parse errors, never a panic); it must be an object; it must match
//! the route's component (`CreateChatCompletionBody` / `CreateCompletionBody`); and the counts
//! the key policy and the quota reservation read (`max_tokens`, `max_completion_tokens`, `n`,
//! `best_of`) must be plain integers. Schema errors list each problem with its
//! `location` in the seed's style (`body.messages[2].role`), a `message` saying what was expected,
//! and the `value` that came (truncated).
//!
//! The validators are compiled once at start. Valid bodies take the fast path (`is_valid`); the
//! error walk runs only for invalid ones. The body bytes are never re-serialised: what the upstream
//! gets is what the client sent.

use std::sync::Arc;

use bytes::Bytes;
use http::{header, Request, Response};
use jsonschema::{Draft, Resource, ValidationError, Validator};
use serde_json::Value;
use tower_http::validate_request::{ValidateRequest, ValidateRequestHeaderLayer};

use crate::http::body::GatewayBody;
use crate::http::context::{Endpoint, ParsedRequest, RequestContext};
use crate::http::error::{FieldError, GatewayError};

/// The OpenAPI document the request schemas come from.
pub const OPENAPI_DOCUMENT: &str = include_str!("../../schemas/openapi.json");
const DOCUMENT_URI: &str = "urn:tollgate:openapi";
/// Errors listed in one answer; more are summarised in the detail.
const MAX_LISTED_ERRORS: usize = 10;
/// A value longer than this (as JSON) is shown truncated.
const MAX_VALUE_CHARS: usize = 200;

/// Why the embedded API document did not compile (a build defect, not a user's error).
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("schemas/openapi.json is not JSON: {0}")]
    NotJson(#[source] serde_json::Error),
    #[error("schemas/openapi.json: component {name}: {message}")]
    Component { name: &'static str, message: String },
}

/// The compiled request validators, one per endpoint with a body.
pub struct Schemas {
    chat: Validator,
    completions: Validator,
}

impl Schemas {
    /// Compiles the embedded document's request components.
    pub fn compile() -> Result<Schemas, SchemaError> {
        let document: Value =
            serde_json::from_str(OPENAPI_DOCUMENT).map_err(SchemaError::NotJson)?;
        let component = |name: &'static str| -> Result<Validator, SchemaError> {
            let resource = Resource::from_contents(document.clone());
            jsonschema::options()
                .with_draft(Draft::Draft202012)
                .with_resource(DOCUMENT_URI, resource)
                .build(&serde_json::json!({
                    "$ref": format!("{DOCUMENT_URI}#/components/schemas/{name}")
                }))
                .map_err(|e| SchemaError::Component {
                    name,
                    message: e.to_string(),
                })
        };
        Ok(Schemas {
            chat: component("CreateChatCompletionBody")?,
            completions: component("CreateCompletionBody")?,
        })
    }

    fn for_endpoint(&self, endpoint: Endpoint) -> Option<&Validator> {
        match endpoint {
            Endpoint::ChatCompletions => Some(&self.chat),
            Endpoint::Completions => Some(&self.completions),
            Endpoint::Models => None,
        }
    }

    /// Parses and checks a body for `endpoint`.
    pub fn check(&self, endpoint: Endpoint, body: &[u8]) -> Result<ParsedRequest, GatewayError> {
        let json = parse_strict(body).map_err(|e| {
            // A data error is the duplicate-key refusal; everything else is syntax.
            let what = if e.is_data() {
                "is ambiguous JSON"
            } else {
                "is not valid JSON"
            };
            GatewayError::BadRequest(format!("the request body {what}: {e}"))
        })?;
        if !json.is_object() {
            return Err(GatewayError::BadRequest(format!(
                "the request body must be a JSON object, not {}",
                json_type(&json)
            )));
        }
        if let Some(validator) = self.for_endpoint(endpoint) {
            if !validator.is_valid(&json) {
                let mut errors = Vec::new();
                let mut total = 0usize;
                for error in validator.iter_errors(&json) {
                    total += 1;
                    if errors.len() < MAX_LISTED_ERRORS {
                        errors.push(field_error(&json, &error));
                    }
                }
                return Err(GatewayError::InvalidBody {
                    errors: Box::new(errors),
                    total,
                });
            }
        }
        check_counts(&json)?;
        Ok(ParsedRequest::new(json))
    }
}

/// The fields the key policy (`max_tokens` and `max_n` caps) and the quota reservation read as
/// counts, whose schema type is `integer`.
const COUNT_FIELDS: [&str; 4] = ["max_tokens", "max_completion_tokens", "n", "best_of"];

/// Counts must be plain integers. JSON Schema's `integer` also admits `1e9`, `100.0` and
/// integers past `u64` (serde_json reads those as floats), which the policy and the quota read
/// as "no count" (`as_u64` is `None`) while the upstream reads the number: a key's `max_tokens`
/// cap and its quota reservation were bypassed by writing the count as `1e9` (and `"n": 2e2`
/// would reserve for one answer). OpenAI refuses such values too.
fn check_counts(json: &Value) -> Result<(), GatewayError> {
    let errors: Vec<FieldError> = COUNT_FIELDS
        .iter()
        .filter_map(|field| {
            let value = json.get(field)?;
            (value.is_number() && value.as_u64().is_none()).then(|| FieldError {
                location: format!("body.{field}"),
                message: format!(
                    "{value} is not an integer: write the count without a fraction or exponent, \
                     at most {}",
                    u64::MAX
                ),
                value: value.clone(),
            })
        })
        .collect();
    if errors.is_empty() {
        return Ok(());
    }
    let total = errors.len();
    Err(GatewayError::InvalidBody {
        errors: Box::new(errors),
        total,
    })
}

/// Parses like `serde_json::from_slice::<Value>`, but refuses an object that names a member
/// twice. serde_json keeps the last value of a duplicate while other parsers keep the first, so
/// `{"max_tokens":100000,"max_tokens":5}` or `{"model":"denied","model":"allowed"}` would be
/// checked as one request and run upstream as another. The nesting limit (128) is serde_json's
/// own, enforced by its deserializer whatever the visitor.
fn parse_strict(body: &[u8]) -> Result<Value, serde_json::Error> {
    serde_json::from_slice::<StrictValue>(body).map(|strict| strict.0)
}

struct StrictValue(Value);

impl<'de> serde::Deserialize<'de> for StrictValue {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrictVisitor).map(StrictValue)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        // As serde_json's own `Value` does (its parser never yields a non-finite number).
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(StrictValue(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut members = serde_json::Map::new();
        while let Some(name) = map.next_key::<String>()? {
            if members.contains_key(&name) {
                return Err(serde::de::Error::custom(format_args!(
                    "duplicate member {name:?}: parsers disagree on which value counts"
                )));
            }
            let StrictValue(value) = map.next_value()?;
            members.insert(name, value);
        }
        Ok(Value::Object(members))
    }
}

/// The validation layer: tower-http's request validation with our schema check.
pub(crate) fn validate_layer(schemas: Arc<Schemas>) -> ValidateRequestHeaderLayer<ValidateBody> {
    ValidateRequestHeaderLayer::custom(ValidateBody { schemas })
}

#[derive(Clone)]
pub(crate) struct ValidateBody {
    schemas: Arc<Schemas>,
}

impl ValidateRequest<Bytes> for ValidateBody {
    type ResponseBody = GatewayBody;

    fn validate(&mut self, request: &mut Request<Bytes>) -> Result<(), Response<GatewayBody>> {
        let Some(endpoint) = RequestContext::of(request).and_then(|c| c.endpoint()) else {
            return Err(
                GatewayError::Internal("validation reached unrouted".into()).into_response()
            );
        };
        if endpoint == Endpoint::Models {
            return Ok(());
        }
        check_content_type(request, endpoint).map_err(GatewayError::into_response)?;
        let parsed = self
            .schemas
            .check(endpoint, request.body())
            .map_err(GatewayError::into_response)?;
        let trace = RequestContext::of(request).and_then(|c| c.trace());
        if let Some(trace) = trace.filter(|t| t.is_recording()) {
            trace.set_requested(crate::http::trace::Requested {
                model: parsed.model.clone(),
                max_tokens: parsed.generation.standard_max_tokens(),
                stream: parsed.stream,
            });
        }
        request.extensions_mut().insert(Arc::new(parsed));
        Ok(())
    }
}

/// JSON, as `application/json` or any `+json` type. The seed also lists
/// `application/octet-stream` for chat; such a body must still be JSON.
fn check_content_type(request: &Request<Bytes>, endpoint: Endpoint) -> Result<(), GatewayError> {
    let Some(value) = request.headers().get(header::CONTENT_TYPE) else {
        return Err(GatewayError::BadRequest(
            "missing Content-Type: send `Content-Type: application/json`".into(),
        ));
    };
    let essence = value
        .to_str()
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let json = essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"));
    let seed_binary =
        endpoint == Endpoint::ChatCompletions && essence == "application/octet-stream";
    if json || seed_binary {
        Ok(())
    } else {
        Err(GatewayError::BadRequest(format!(
            "unsupported Content-Type {:?}: send `Content-Type: application/json`",
            value.to_str().unwrap_or("<not text>")
        )))
    }
}

/// A JSON value's kind, as messages name it (`a string`, `an object`): also the admin API's,
/// which names TOML's kinds the same way.
pub(crate) fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// One schema error as the client sees it.
fn field_error(root: &Value, error: &ValidationError<'_>) -> FieldError {
    use jsonschema::error::ValidationErrorKind;
    let pointer = error.instance_path().as_str();
    let (location, value) = match error.kind() {
        ValidationErrorKind::Required { property } => {
            let name = property.as_str().unwrap_or("?");
            (format!("{}.{name}", location(root, pointer)), Value::Null)
        }
        _ => (location(root, pointer), shown_value(error.instance())),
    };
    FieldError {
        location,
        message: error.masked().to_string(),
        value,
    }
}

/// A JSON pointer into `root` written the seed's way: `body.messages[2].role`. Whether a segment
/// is an index or a property name is decided by the value it walks through, so an object key
/// that looks like a number (`logit_bias."50256"`) stays a property.
pub(crate) fn location(root: &Value, pointer: &str) -> String {
    let mut out = String::from("body");
    let mut node = Some(root);
    for raw in pointer.split('/').skip(1) {
        let segment = raw.replace("~1", "/").replace("~0", "~");
        match node {
            Some(Value::Array(items)) => {
                out.push('[');
                out.push_str(&segment);
                out.push(']');
                node = segment.parse::<usize>().ok().and_then(|i| items.get(i));
            }
            other => {
                let plain = !segment.is_empty()
                    && segment
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'$');
                if plain {
                    out.push('.');
                    out.push_str(&segment);
                } else {
                    out.push_str(&format!("[{}]", Value::String(segment.clone())));
                }
                node = other.and_then(|v| v.get(&segment));
            }
        }
    }
    out
}

/// The offending value, or a truncated rendering of it when it is large.
fn shown_value(value: &Value) -> Value {
    match value {
        Value::String(s) if s.chars().count() > MAX_VALUE_CHARS => Value::String(format!(
            "{}…",
            s.chars().take(MAX_VALUE_CHARS).collect::<String>()
        )),
        Value::Array(_) | Value::Object(_) => {
            let text = value.to_string();
            if text.chars().count() > MAX_VALUE_CHARS {
                Value::String(format!(
                    "{}…",
                    text.chars().take(MAX_VALUE_CHARS).collect::<String>()
                ))
            } else {
                value.clone()
            }
        }
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schemas() -> Schemas {
        Schemas::compile().expect("the embedded document compiles")
    }

    #[test]
    fn locations_follow_the_seed_style() {
        let root = json!({"messages": [{"role": "x"}, {"content": [1, 2]}], "logit_bias": {"50256": "x"}, "a/b": 1});
        assert_eq!(location(&root, ""), "body");
        assert_eq!(location(&root, "/messages/0/role"), "body.messages[0].role");
        assert_eq!(
            location(&root, "/messages/1/content/1"),
            "body.messages[1].content[1]"
        );
        assert_eq!(
            location(&root, "/logit_bias/50256"),
            "body.logit_bias.50256"
        );
        assert_eq!(location(&root, "/a~1b"), "body[\"a/b\"]");
    }

    #[test]
    fn a_valid_chat_body_parses_into_the_extension() {
        let parsed = schemas()
            .check(
                Endpoint::ChatCompletions,
                br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true},"max_tokens":7}"#,
            )
            .expect("valid");
        assert_eq!(parsed.model, "m");
        assert!(parsed.stream && parsed.include_usage);
        assert_eq!(parsed.generation.standard_max_tokens(), Some(7));
    }

    #[test]
    fn schema_errors_point_at_the_field() {
        let err = schemas()
            .check(
                Endpoint::ChatCompletions,
                br#"{"model":"m","messages":[{"role":"user","content":"hi"},{"role":"robot","content":"x"}],"temperature":3}"#,
            )
            .expect_err("invalid");
        let GatewayError::InvalidBody { errors, .. } = err else {
            panic!("expected InvalidBody, got {err:?}");
        };
        let locations: Vec<&str> = errors.iter().map(|e| e.location.as_str()).collect();
        assert!(
            locations.contains(&"body.messages[1].role"),
            "{locations:?}"
        );
        assert!(locations.contains(&"body.temperature"), "{locations:?}");
        let temperature = errors
            .iter()
            .find(|e| e.location == "body.temperature")
            .expect("temperature error");
        assert_eq!(temperature.value, json!(3), "the value that came");
    }

    #[test]
    fn not_json_and_not_an_object_are_told_apart() {
        let s = schemas();
        let err = s
            .check(Endpoint::Completions, b"{\"model\": ")
            .expect_err("truncated");
        assert!(err.to_string().contains("not valid JSON"), "{err}");
        let err = s.check(Endpoint::Completions, b"[1,2]").expect_err("array");
        assert!(
            err.to_string()
                .contains("must be a JSON object, not an array"),
            "{err}"
        );
        let err = s
            .check(Endpoint::Completions, b"{\"a\":\"\xff\"}")
            .expect_err("bad utf-8");
        assert!(err.to_string().contains("not valid JSON"), "{err}");
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let deep = format!(
            "{{\"model\":\"m\",\"prompt\":\"p\",\"x\":{}{}}}",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        let err = schemas()
            .check(Endpoint::Completions, deep.as_bytes())
            .expect_err("too deep");
        assert!(err.to_string().contains("recursion limit"), "{err}");
    }

    #[test]
    fn duplicate_members_are_refused_at_any_depth() {
        let s = schemas();
        for body in [
            &br#"{"model":"m","prompt":"p","max_tokens":9,"max_tokens":1}"#[..],
            br#"{"model":"m","messages":[{"role":"user","role":"system","content":"x"}]}"#,
        ] {
            let err = s
                .check(Endpoint::ChatCompletions, body)
                .expect_err("duplicate");
            assert!(err.to_string().contains("duplicate member"), "{err}");
        }
        let parsed = parse_strict(br#"{"a":[1,-2,2.5,"x",null,true,{"b":{}}]}"#).expect("valid");
        assert_eq!(parsed, json!({"a":[1,-2,2.5,"x",null,true,{"b":{}}]}));
    }

    #[test]
    fn token_counts_must_be_plain_integers() {
        let s = schemas();
        for count in ["1e9", "100.0", "100000000000000000000000", "-0.0"] {
            let body = format!(r#"{{"model":"m","prompt":"p","max_completion_tokens":{count}}}"#);
            let err = s
                .check(Endpoint::Completions, body.as_bytes())
                .expect_err("not a plain integer");
            let GatewayError::InvalidBody { errors, .. } = err else {
                panic!("expected InvalidBody for {count}, got {err:?}");
            };
            assert_eq!(errors[0].location, "body.max_completion_tokens", "{count}");
        }
        let ok = s
            .check(
                Endpoint::Completions,
                br#"{"model":"m","prompt":"p","max_tokens":0}"#,
            )
            .expect("a plain integer");
        assert_eq!(ok.generation.standard_max_tokens(), Some(0));
    }

    #[test]
    fn answer_counts_must_be_plain_integers() {
        let s = schemas();
        for (field, count) in [("n", "2e2"), ("n", "4.0"), ("best_of", "2e1")] {
            let body = format!(r#"{{"model":"m","prompt":"p","{field}":{count}}}"#);
            let err = s
                .check(Endpoint::Completions, body.as_bytes())
                .expect_err("not a plain integer");
            let GatewayError::InvalidBody { errors, .. } = err else {
                panic!("expected InvalidBody for {field} = {count}, got {err:?}");
            };
            assert_eq!(errors[0].location, format!("body.{field}"));
        }
    }

    #[test]
    fn long_values_are_truncated() {
        let long = "x".repeat(10_000);
        let shown = shown_value(&Value::String(long));
        assert!(
            shown
                .as_str()
                .is_some_and(|s| s.chars().count() == MAX_VALUE_CHARS + 1),
            "{shown}"
        );
    }
}
