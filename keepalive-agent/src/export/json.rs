//! Spans as JSON lines: what `run` prints on stdout when no OTLP endpoint is configured.
//!
//! One object per span and line:
//! `{"trace_id", "span_id", "parent_span_id" (null for a root), "name", "kind", "start",
//! "start_unix_ns", "end", "end_unix_ns", "duration_ms", "status": {"code", "message"?},
//! "attributes": {..}, "events": [{"name", "time", "time_unix_ns", "attributes"}],
//! "dropped_events_count", "resource": {..}, "scope": {"name", "version"}}`.
//! Times are RFC 3339 UTC with microseconds, and exact Unix nanoseconds.

use std::time::{SystemTime, UNIX_EPOCH};

use opentelemetry::trace::{SpanId, Status};
use opentelemetry::{Array, KeyValue, Value};
use opentelemetry_sdk::trace::SpanData;
use serde_json::{json, Map, Value as Json};

use crate::clock::rfc3339;

fn unix_ns(t: SystemTime) -> i128 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i128,
        Err(e) => -(e.duration().as_nanos() as i128),
    }
}

fn value(v: &Value) -> Json {
    match v {
        Value::Bool(b) => json!(b),
        Value::I64(i) => json!(i),
        Value::F64(f) => json!(f),
        Value::String(s) => json!(s.as_str()),
        Value::Array(Array::Bool(a)) => json!(a),
        Value::Array(Array::I64(a)) => json!(a),
        Value::Array(Array::F64(a)) => json!(a),
        Value::Array(Array::String(a)) => {
            Json::Array(a.iter().map(|s| json!(s.as_str())).collect())
        }
        other => json!(other.to_string()),
    }
}

fn attrs(kvs: &[KeyValue]) -> Json {
    Json::Object(
        kvs.iter()
            .map(|kv| (kv.key.as_str().to_string(), value(&kv.value)))
            .collect::<Map<_, _>>(),
    )
}

/// The JSON object of one span.
pub fn span_json(span: &SpanData, resource: &[KeyValue]) -> Json {
    let start = unix_ns(span.start_time);
    let end = unix_ns(span.end_time);
    let status = match &span.status {
        Status::Unset => json!({"code": "unset"}),
        Status::Ok => json!({"code": "ok"}),
        Status::Error { description } => json!({"code": "error", "message": description}),
    };
    let parent = (span.parent_span_id != SpanId::INVALID).then(|| span.parent_span_id.to_string());
    let events: Vec<Json> = span
        .events
        .iter()
        .map(|e| {
            let t = unix_ns(e.timestamp);
            json!({
                "name": e.name,
                "time": rfc3339(t),
                "time_unix_ns": t as i64,
                "attributes": attrs(&e.attributes),
            })
        })
        .collect();
    json!({
        "trace_id": span.span_context.trace_id().to_string(),
        "span_id": span.span_context.span_id().to_string(),
        "parent_span_id": parent,
        "name": span.name,
        "kind": "internal",
        "start": rfc3339(start),
        "start_unix_ns": start as i64,
        "end": rfc3339(end),
        "end_unix_ns": end as i64,
        "duration_ms": (end - start) as f64 / 1e6,
        "status": status,
        "attributes": attrs(&span.attributes),
        "events": events,
        "dropped_events_count": span.events.dropped_count,
        "resource": attrs(resource),
        "scope": {
            "name": span.instrumentation_scope.name(),
            "version": span.instrumentation_scope.version(),
        },
    })
}
