//! OpenTelemetry traces (`[telemetry]`): one SERVER span per request, named and attributed by the
//! semantic conventions for generative AI, one CLIENT span per attempt at the upstream, and the
//! W3C trace context carried both ways — continued from the client's `traceparent`/`tracestate`,
//! and sent to the upstream as the attempt's own, so that the model server's spans join the
//! trace. Spans leave in batches from a bounded queue ([`export`]); a sampled answer is read for
//! its model and finish reasons as it passes ([`answer`]).
//!
//! | span | kind | name | attributes |
//! |------|------|------|------------|
//! | the request | SERVER | `chat {model}`, `text_completion {model}`, else `{METHOD} {path}` | [`end_request`] |
//! | an attempt | CLIENT | `chat {model}` … as the request's | `server.address`, `server.port`, `tollgate.upstream`, `http.response.status_code` or `error.type` |
//!
//! Sampling is parent-based: a client's sampled trace is always kept and an unsampled one never;
//! a trace that starts here is kept with probability `sample_ratio`. An unsampled request still
//! sends a `traceparent` (flag 00) upstream, so the trace stays one.
//!
//! No prompt, answer, key secret or credential is ever an attribute: `tollgate.key` is the key's
//! name, the model is the one the client asked for, and headers are never copied.
//!
//! Edge cases: a request that ends before the response headers (the client left) ends its span
//! with status 499 and `error.type = client_gone`; a body that fails mid-stream marks the span an
//! error (`error.type = body_error`); a client `traceparent` that does not parse starts a new
//! trace.

pub(crate) mod answer;
mod export;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderValue};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{Span as _, SpanKind, Status, TraceContextExt, Tracer as _};
use opentelemetry::{Array, KeyValue, StringValue, Value};
use opentelemetry_http::HeaderExtractor;
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider, Span, SpanExporter as _};
use opentelemetry_sdk::Resource;
use tokio::time::Instant;

use self::export::{Dropped, Exporting};
use crate::config::TelemetryConfig;
use crate::http::body::BoxError;
use crate::http::context::{Ending, Endpoint, Outcome, RequestContext};
use crate::http::trace::RequestTrace;
use crate::observability::labels::SpanDrop;
use crate::observability::metrics::Metrics;

/// The gateway's tracer, its propagator and its export task.
pub struct Traces {
    tracer: SdkTracer,
    /// Kept alive for the tracer; its processor is ours ([`export::QueueProcessor`]).
    _provider: SdkTracerProvider,
    propagator: TraceContextPropagator,
    exporting: Mutex<Option<Exporting>>,
}

impl Traces {
    /// The tracer for `config`, with its export task spawned on the current runtime.
    pub(crate) fn start(config: &TelemetryConfig, metrics: &Metrics) -> Result<Traces, BoxError> {
        let headers = config
            .headers
            .iter()
            .map(|(name, value)| (name.clone(), value.expose().to_owned()))
            .collect();
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(config.endpoint.clone())
            .with_timeout(export::EXPORT_TIMEOUT)
            .with_headers(headers)
            .build()
            .map_err(|e| format!("telemetry: cannot make the OTLP exporter: {e}"))?;
        let resource = Resource::builder_empty()
            .with_service_name(config.service_name.clone())
            .build();
        exporter.set_resource(&resource);
        let dropped = |reason: SpanDrop| {
            let reason: &'static str = reason.into();
            metrics
                .trace_spans_dropped_total
                .with_label_values(&[reason])
        };
        let dropped = Dropped {
            queue_full: dropped(SpanDrop::QueueFull),
            export_failed: dropped(SpanDrop::ExportFailed),
            closed: dropped(SpanDrop::Closed),
        };
        let (processor, exporting) =
            export::start(exporter, config.queue_size, config.batch_delay, dropped);
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                config.sample_ratio,
            ))))
            .with_resource(resource)
            .build();
        let tracer = opentelemetry::trace::TracerProvider::tracer(&provider, "tollgate");
        tracing::info!(
            endpoint = %config.endpoint,
            service = %config.service_name,
            sample_ratio = config.sample_ratio,
            "sending traces"
        );
        Ok(Traces {
            tracer,
            _provider: provider,
            propagator: TraceContextPropagator::new(),
            exporting: Mutex::new(Some(exporting)),
        })
    }

    /// Starts the SERVER span of a request that came with `headers`, continuing the client's
    /// trace when it sent one.
    pub(crate) fn start_request(&self, headers: &HeaderMap, method: &http::Method) -> RequestTrace {
        let parent = self.propagator.extract(&HeaderExtractor(headers));
        // Named at the end, when the model is known.
        let span = self
            .tracer
            .span_builder(method_name(method))
            .with_kind(SpanKind::Server)
            .start_with_context(&self.tracer, &parent);
        RequestTrace::new(self.tracer.clone(), parent.with_span(span))
    }

    /// Sends the spans still queued, waiting at most `within`.
    pub(crate) async fn shutdown(&self, within: Duration) {
        let exporting = self
            .exporting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(exporting) = exporting {
            exporting.stop(within).await;
        }
    }
}

/// The span's name: the GenAI operation and the model, or the HTTP method and path.
fn span_name(context: &RequestContext, trace: &RequestTrace) -> Option<String> {
    let operation = operation(context.endpoint()?)?;
    let model = trace.requested().map_or("", |r| r.model.as_str());
    Some(format!("{operation} {model}").trim_end().to_owned())
}

/// A span's first name: the method, without an allocation for the usual ones.
fn method_name(method: &http::Method) -> std::borrow::Cow<'static, str> {
    match *method {
        http::Method::POST => "POST".into(),
        http::Method::GET => "GET".into(),
        _ => method.as_str().to_owned().into(),
    }
}

/// `gen_ai.operation.name` of an endpoint that generates.
fn operation(endpoint: Endpoint) -> Option<&'static str> {
    match endpoint {
        Endpoint::ChatCompletions => Some("chat"),
        Endpoint::Completions => Some("text_completion"),
        Endpoint::Models => None,
    }
}

/// Ends the request's SERVER span (and its answering attempt's), with what the request learnt.
/// `reason` is the gateway's own error reason, when it answered with an error.
pub(crate) fn end_request(context: &RequestContext, ending: &Ending, reason: Option<&'static str>) {
    let Some(trace) = context.trace() else {
        return;
    };
    if let Some(mut answered) = trace.take_answered() {
        if ending.outcome == Outcome::UpstreamError {
            answered.set_attribute(KeyValue::new("error.type", "body_error"));
            answered.set_status(Status::error("the answer's body failed"));
        }
        answered.end();
    }
    let span = trace.cx.span();
    if !span.is_recording() {
        span.end();
        return;
    }
    let status = ending.status.as_u16();
    let mut attributes = Vec::with_capacity(20);
    attributes.push(KeyValue::new(
        "http.request.method",
        context.method().to_string(),
    ));
    attributes.push(KeyValue::new("url.path", context.path().to_owned()));
    attributes.push(KeyValue::new(
        "http.response.status_code",
        i64::from(status),
    ));
    attributes.push(KeyValue::new(
        "tollgate.request.id",
        context.id().to_owned(),
    ));
    match span_name(context, trace) {
        Some(name) => span.update_name(name),
        None => span.update_name(format!("{} {}", context.method(), context.path())),
    }
    if let Some(operation) = context.endpoint().and_then(operation) {
        attributes.push(KeyValue::new("gen_ai.operation.name", operation));
    }
    if let Some(requested) = trace.requested() {
        attributes.push(KeyValue::new(
            "gen_ai.request.model",
            requested.model.clone(),
        ));
        if let Some(max) = requested.max_tokens {
            let max = i64::try_from(max).unwrap_or(i64::MAX);
            attributes.push(KeyValue::new("gen_ai.request.max_tokens", max));
        }
    }
    if let Some(model) = trace.response_model() {
        attributes.push(KeyValue::new("gen_ai.response.model", model.to_owned()));
    }
    let reasons = trace.finish_reasons();
    if !reasons.is_empty() {
        let reasons: Vec<StringValue> = reasons.into_iter().map(StringValue::from).collect();
        attributes.push(KeyValue::new(
            "gen_ai.response.finish_reasons",
            Value::Array(Array::String(reasons)),
        ));
    }
    if let Some(key) = context.key() {
        attributes.push(KeyValue::new("tollgate.key", key.name.to_string()));
        if let Some(group) = &key.group {
            attributes.push(KeyValue::new("tollgate.group", group.name.to_string()));
        }
    }
    if let Some(pool) = context.pool() {
        attributes.push(KeyValue::new(
            "tollgate.upstream",
            pool.config.name.to_string(),
        ));
    }
    if let Some(charged) = trace.charged() {
        let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        attributes.push(KeyValue::new(
            "gen_ai.usage.input_tokens",
            count(charged.input_tokens),
        ));
        attributes.push(KeyValue::new(
            "gen_ai.usage.output_tokens",
            count(charged.output_tokens),
        ));
        attributes.push(KeyValue::new("tollgate.usage.source", charged.source));
        let streamed = trace.requested().is_some_and(|r| r.stream);
        if let (Some(first), true) = (charged.first_data, streamed) {
            span.add_event_with_timestamp("gen_ai.first_token", wall_clock(first), Vec::new());
        }
    }
    let error = match (reason, ending.outcome) {
        (_, Outcome::ClientGone) => Some("client_gone".to_owned()),
        (_, Outcome::UpstreamError) => Some("body_error".to_owned()),
        (Some(reason), _) => Some(reason.to_owned()),
        (None, _) if status >= 400 => Some(status.to_string()),
        (None, _) => None,
    };
    if let Some(error) = error {
        // Server spans: a 4xx is the client's doing, not the server's error (HTTP conventions).
        if status >= 500 || ending.outcome == Outcome::UpstreamError {
            span.set_status(Status::error(error.clone()));
        }
        attributes.push(KeyValue::new("error.type", error));
    }
    span.set_attributes(attributes);
    span.end();
}

/// The wall-clock time of `at`, which was measured on the monotonic clock.
fn wall_clock(at: Instant) -> SystemTime {
    SystemTime::now() - at.elapsed()
}

// === attempts ===

/// The CLIENT span of one attempt at an upstream endpoint.
pub(crate) struct Attempt {
    span: Span,
}

impl Attempt {
    /// Starts an attempt at `authority` (`host[:port]`, the port defaulting by `https`) of the
    /// pool `upstream`.
    pub(crate) fn start(
        context: &RequestContext,
        trace: &RequestTrace,
        authority: &http::uri::Authority,
        https: bool,
        upstream: &str,
    ) -> Attempt {
        // An unsampled attempt only needs its ids, for the upstream's `traceparent`.
        if !trace.is_recording() {
            let span = trace
                .tracer
                .span_builder("")
                .with_kind(SpanKind::Client)
                .start_with_context(&trace.tracer, &trace.cx);
            return Attempt { span };
        }
        let name = span_name(context, trace).unwrap_or_else(|| context.method().to_string());
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let attributes = vec![
            KeyValue::new("server.address", authority.host().to_owned()),
            KeyValue::new("server.port", i64::from(port)),
            KeyValue::new("http.request.method", context.method().to_string()),
            KeyValue::new("tollgate.upstream", upstream.to_owned()),
        ];
        let span = trace
            .tracer
            .span_builder(name)
            .with_kind(SpanKind::Client)
            .with_attributes(attributes)
            .start_with_context(&trace.tracer, &trace.cx);
        Attempt { span }
    }

    /// Sets the attempt's `traceparent` (and the trace's `tracestate`) on the upstream request,
    /// in place of any the client sent.
    pub(crate) fn inject(&self, headers: &mut HeaderMap) {
        let cx = self.span.span_context();
        // `00-{trace id}-{span id}-{flags}`, hex, written in place: every request sends one.
        let mut parent = *b"00-00000000000000000000000000000000-0000000000000000-00";
        let ids = (
            hex::encode_to_slice(cx.trace_id().to_bytes(), &mut parent[3..35]),
            hex::encode_to_slice(cx.span_id().to_bytes(), &mut parent[36..52]),
            hex::encode_to_slice([cx.trace_flags().to_u8()], &mut parent[53..55]),
        );
        if let (Ok(()), Ok(()), Ok(())) = ids {
            if let Ok(value) = HeaderValue::from_bytes(&parent) {
                headers.insert("traceparent", value);
            }
        }
        let state = cx.trace_state().header();
        match HeaderValue::from_str(&state) {
            Ok(value) if !state.is_empty() => {
                headers.insert("tracestate", value);
            }
            _ => {
                headers.remove("tracestate");
            }
        }
    }

    /// The upstream answered with `status`: the span ends with the request.
    pub(crate) fn answered(mut self, trace: &RequestTrace, status: http::StatusCode) {
        self.span.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(status.as_u16()),
        ));
        if status.is_server_error() {
            self.span
                .set_attribute(KeyValue::new("error.type", status.as_str().to_owned()));
            self.span
                .set_status(Status::error(status.as_str().to_owned()));
        }
        trace.keep_answered(self.span);
    }

    /// The attempt got no answer (`connect`, `timeout`, `broken`): the span ends now.
    pub(crate) fn failed(mut self, kind: &'static str) {
        self.span.set_attribute(KeyValue::new("error.type", kind));
        self.span.set_status(Status::error(kind));
        self.span.end();
    }
}

/// Traces, when `[telemetry]` is set.
pub(crate) type SharedTraces = Option<Arc<Traces>>;
