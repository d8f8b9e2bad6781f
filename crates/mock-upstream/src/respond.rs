//! One request's answer: the request is read and recorded, the knobs read from its headers,
//! then auth, `x-mock-status`, routing, the canned answers and finally the generated completion,
//! in that order.

use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};

use bytes::Bytes;
use http::header::{HeaderValue, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::Value;

use crate::body::{Frames, MockAbort, MockBody, Track};
use crate::canned;
use crate::conn::ConnCtl;
use crate::fault::{Fault, Knobs};
use crate::generate::{json_string, Generation, Route};
use crate::{RecordedRequest, Shared};

const NOT_FOUND_BODY: &str =
    r#"{"error":{"message":"File Not Found","type":"not_found_error","code":404}}"#;
const UNAUTHORIZED_BODY: &str = r#"{"error":{"message":"Incorrect API key provided.","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}"#;
const HEALTH_BODY: &str = r#"{"status":"ok"}"#;

/// `GET /v1/models`: the configured models (by default `mock-model`), OpenAI's list shape.
fn models_body(models: &[String]) -> Bytes {
    let data: Vec<String> = models
        .iter()
        .map(|id| {
            format!(
                r#"{{"id":{},"object":"model","created":1700000000,"owned_by":"mock"}}"#,
                json_string(id)
            )
        })
        .collect();
    Bytes::from(format!(
        r#"{{"object":"list","data":[{}]}}"#,
        data.join(",")
    ))
}

pub(crate) async fn handle(
    shared: Arc<Shared>,
    ctl: Arc<ConnCtl>,
    req: Request<Incoming>,
) -> Result<Response<MockBody>, MockAbort> {
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            return Ok(error_400(&format!("failed to read request body: {e}")));
        }
    };
    shared.request_count.fetch_add(1, Ordering::SeqCst);
    if shared.recording.load(Ordering::Relaxed) {
        let record = RecordedRequest {
            method: parts.method.clone(),
            path_and_query: parts
                .uri
                .path_and_query()
                .map_or_else(|| parts.uri.path().to_owned(), |pq| pq.as_str().to_owned()),
            version: parts.version,
            headers: parts.headers.clone(),
            body: body.clone(),
        };
        shared
            .requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(record);
    }

    let knobs = Knobs::from_headers(&parts.headers);
    match knobs.fault {
        Some(Fault::ResetBeforeHeaders) => {
            ctl.reset.store(true, Ordering::SeqCst);
            ctl.kill.notify_one();
            // For HTTP/1 a service error also makes hyper drop the connection
            // without writing a response.
            return Err(MockAbort("reset-before-headers"));
        }
        Some(Fault::StallHeaders) => std::future::pending::<()>().await,
        _ => {}
    }
    // llama.cpp's and vLLM's liveness route, at the server's root; never slowed.
    if parts.method == Method::GET && parts.uri.path() == "/health" {
        return Ok(json_response(
            StatusCode::OK,
            MockBody::full(Bytes::from_static(HEALTH_BODY.as_bytes())),
        ));
    }
    // An OTLP/HTTP trace sink (benches point a gateway's `[telemetry]` here): every export is
    // taken and discarded, answered as a collector does (an empty ExportTraceServiceResponse).
    if parts.method == Method::POST && parts.uri.path() == "/v1/traces" {
        let mut response = Response::new(MockBody::full(Bytes::new()));
        response.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/x-protobuf"),
        );
        return Ok(response);
    }
    if let Some(delay) = shared.opts.delay {
        tokio::time::sleep(delay).await;
    }
    if let Some(delay) = knobs.header_delay {
        tokio::time::sleep(delay).await;
    }
    Ok(respond(&shared, &ctl, &parts, &body, &knobs))
}

fn respond(
    shared: &Arc<Shared>,
    ctl: &Arc<ConnCtl>,
    parts: &http::request::Parts,
    body: &Bytes,
    knobs: &Knobs,
) -> Response<MockBody> {
    if let Some(expected) = &shared.expected_auth {
        let ok = parts
            .headers
            .get(AUTHORIZATION)
            .is_some_and(|v| v.as_bytes() == expected.as_bytes());
        if !ok {
            return json_response(
                StatusCode::UNAUTHORIZED,
                MockBody::full(Bytes::from_static(UNAUTHORIZED_BODY.as_bytes())),
            );
        }
    }
    if knobs.bad_fault {
        return error_400("unknown x-mock-fault value");
    }
    if let Some(status) = knobs.status {
        let kind = if status.is_client_error() {
            "invalid_request_error"
        } else {
            "server_error"
        };
        let text = format!(
            r#"{{"error":{{"message":"mock error","type":"{kind}","code":{}}}}}"#,
            status.as_u16()
        );
        return json_response(status, MockBody::full(Bytes::from(text)));
    }

    let path = parts.uri.path();
    let route = if path == shared.chat_path {
        Some(Route::Chat)
    } else if path == shared.completions_path {
        Some(Route::Completions)
    } else if path == shared.models_path {
        Some(Route::Models)
    } else {
        None
    };
    let route = match (route, &parts.method) {
        (Some(Route::Models), &Method::GET) => Route::Models,
        (Some(r @ (Route::Chat | Route::Completions)), &Method::POST) => r,
        _ => {
            return json_response(
                StatusCode::NOT_FOUND,
                MockBody::full(Bytes::from_static(NOT_FOUND_BODY.as_bytes())),
            )
        }
    };

    let track = |sse| Track {
        shared: Arc::clone(shared),
        ctl: Arc::clone(ctl),
        sse,
    };
    if let Some(fault) = knobs.fault.filter(|f| f.is_canned()) {
        return canned_answer(fault, track);
    }
    if route == Route::Models {
        let body = MockBody::full(models_body(&shared.models));
        return json_response(StatusCode::OK, body.with_faults(knobs, false));
    }

    let request: Value = match serde_json::from_slice(body) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => return error_400("request body must be a JSON object"),
        Err(e) => return error_400(&format!("invalid JSON in request body: {e}")),
    };
    let gen = Generation::new(route, &request, body, knobs, shared.opts.default_tokens);
    let stream = request
        .get("stream")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let track = track(stream);
    let include_usage = request
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if let Some((prompt, completion)) = gen.generated_usage().filter(|_| include_usage || !stream) {
        shared.reported_prompt.fetch_add(prompt, Ordering::SeqCst);
        shared
            .reported_completion
            .fetch_add(completion, Ordering::SeqCst);
    }
    if stream {
        let events = if route == Route::Chat {
            gen.chat_events(include_usage)
        } else {
            gen.completion_events(include_usage)
        };
        let frames = Frames::Slices {
            data: Bytes::from(events.buf),
            ends: events.ends,
        };
        let body = MockBody::stream(frames)
            .with_faults(knobs, true)
            .tracked(track);
        sse_response(body)
    } else {
        let text = if route == Route::Chat {
            gen.chat_json()
        } else {
            gen.completion_json()
        };
        let body = MockBody::full(Bytes::from(text))
            .with_faults(knobs, false)
            .tracked(track);
        json_response(StatusCode::OK, body)
    }
}

/// The answer of a canned [`Fault`], whatever the request said.
fn canned_answer(fault: Fault, track: impl Fn(bool) -> Track) -> Response<MockBody> {
    let json = |bytes: Bytes| {
        let body = MockBody::full(bytes).tracked(track(false));
        json_response(StatusCode::OK, body)
    };
    let sse = |frames: Frames| sse_response(MockBody::stream(frames).tracked(track(true)));
    match fault {
        Fault::GarbageJson => json(canned::garbage_json()),
        Fault::AbsurdUsage => json(Bytes::from_static(canned::ABSURD_USAGE.as_bytes())),
        Fault::GarbageSse => sse(Frames::packed(&canned::garbage_sse())),
        Fault::Flood(total) => sse(Frames::Repeat {
            frame: canned::flood_frame(),
            total,
        }),
        // `not-json`; the other faults are not canned answers and never come here.
        _ => json(Bytes::from_static(canned::NOT_JSON.as_bytes())),
    }
}

fn sse_response(body: MockBody) -> Response<MockBody> {
    let mut resp = Response::new(body);
    let headers = resp.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

fn json_response(status: StatusCode, body: MockBody) -> Response<MockBody> {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn error_400(message: &str) -> Response<MockBody> {
    let text = format!(
        r#"{{"error":{{"code":400,"message":{},"type":"invalid_request_error"}}}}"#,
        json_string(message)
    );
    json_response(StatusCode::BAD_REQUEST, MockBody::full(Bytes::from(text)))
}
