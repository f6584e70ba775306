//! Spans as JSON lines: what `run` prints on stdout when no OTLP endpoint is configured.
//!
//! One object per span and line:
//! `{"trace_id", "span_id", "parent_span_id" (null for a root), "name", "kind", "start",
//! "start_unix_ns", "end", "end_unix_ns", "duration_ms", "status": {"code", "message"?},
//! "attributes": {..}, "events": [{"name", "time", "time_unix_ns", "attributes"}],
//! "dropped_events_count", "resource": {..}, "scope": {"name", "version"}}`.
//! Times are RFC 3339 UTC with microseconds, and exact Unix nanoseconds.
//!
//! [`SpanWriter`] writes the line straight from the [`SpanData`] into a reused buffer, with the
//! keys of every object in byte order and, where an attribute key repeats, its last value: the
//! bytes [`span_json`] (a `serde_json::Value` tree, what the agent built before) prints, without a
//! tree of allocated keys and values per span.

use std::time::{SystemTime, UNIX_EPOCH};

use opentelemetry::trace::{Event, SpanId, Status};
use opentelemetry::{Array, KeyValue, StringValue, Value};
use opentelemetry_sdk::trace::SpanData;
use serde::Serializer as _;
use serde_json::{json, Map, Value as Json};

use crate::clock::rfc3339;
use crate::json_text::{int, string, time};

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

/// The JSON object of one span, as a `serde_json::Value` tree (for tests and readers; `run` writes
/// its lines with [`SpanWriter`], which prints the same bytes).
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

/// Writes spans as JSON lines (see the module documentation). Holds the resource object,
/// serialised once, and scratch space reused from span to span.
#[derive(Debug)]
pub struct SpanWriter {
    resource: Vec<u8>,
    /// Indices of the attributes being written, in key order.
    order: Vec<usize>,
}

impl SpanWriter {
    /// A writer for spans of `resource`.
    pub fn new(resource: &[KeyValue]) -> Self {
        let mut w = SpanWriter { resource: Vec::new(), order: Vec::new() };
        let mut buf = Vec::new();
        match w.attrs(&mut buf, resource) {
            Ok(()) => w.resource = buf,
            // Not expected (writing into memory); an empty resource rather than a broken line.
            Err(e) => {
                log::warn!("serialising the span resource failed: {e}");
                w.resource = b"{}".to_vec();
            }
        }
        w
    }

    /// Appends `span` as one JSON line (newline included) to `buf`. On error (not expected: the
    /// buffer is memory) nothing is appended.
    pub fn write_line(&mut self, span: &SpanData, buf: &mut Vec<u8>) -> Result<(), serde_json::Error> {
        let len = buf.len();
        let r = self.span(span, buf);
        if r.is_err() {
            buf.truncate(len);
        }
        r
    }

    fn span(&mut self, span: &SpanData, buf: &mut Vec<u8>) -> Result<(), serde_json::Error> {
        let start = unix_ns(span.start_time);
        let end = unix_ns(span.end_time);
        buf.extend_from_slice(b"{\"attributes\":");
        self.attrs(buf, &span.attributes)?;
        buf.extend_from_slice(b",\"dropped_events_count\":");
        int(buf, span.events.dropped_count);
        buf.extend_from_slice(b",\"duration_ms\":");
        serde_json::to_writer(&mut *buf, &((end - start) as f64 / 1e6))?;
        buf.extend_from_slice(b",\"end\":");
        time(buf, end);
        buf.extend_from_slice(b",\"end_unix_ns\":");
        int(buf, end as i64);
        buf.extend_from_slice(b",\"events\":[");
        for (i, e) in span.events.iter().enumerate() {
            if i > 0 {
                buf.push(b',');
            }
            self.event(buf, e)?;
        }
        buf.extend_from_slice(b"],\"kind\":\"internal\",\"name\":");
        string(buf, &span.name);
        buf.extend_from_slice(b",\"parent_span_id\":");
        if span.parent_span_id == SpanId::INVALID {
            buf.extend_from_slice(b"null");
        } else {
            hex(buf, &span.parent_span_id.to_bytes());
        }
        buf.extend_from_slice(b",\"resource\":");
        buf.extend_from_slice(&self.resource);
        buf.extend_from_slice(b",\"scope\":{\"name\":");
        string(buf, span.instrumentation_scope.name());
        buf.extend_from_slice(b",\"version\":");
        serde_json::to_writer(&mut *buf, &span.instrumentation_scope.version())?;
        buf.extend_from_slice(b"},\"span_id\":");
        hex(buf, &span.span_context.span_id().to_bytes());
        buf.extend_from_slice(b",\"start\":");
        time(buf, start);
        buf.extend_from_slice(b",\"start_unix_ns\":");
        int(buf, start as i64);
        buf.extend_from_slice(b",\"status\":");
        match &span.status {
            Status::Unset => buf.extend_from_slice(b"{\"code\":\"unset\"}"),
            Status::Ok => buf.extend_from_slice(b"{\"code\":\"ok\"}"),
            Status::Error { description } => {
                buf.extend_from_slice(b"{\"code\":\"error\",\"message\":");
                string(buf, description);
                buf.push(b'}');
            }
        }
        buf.extend_from_slice(b",\"trace_id\":");
        hex(buf, &span.span_context.trace_id().to_bytes());
        buf.extend_from_slice(b"}\n");
        Ok(())
    }

    fn event(&mut self, buf: &mut Vec<u8>, e: &Event) -> Result<(), serde_json::Error> {
        let t = unix_ns(e.timestamp);
        buf.extend_from_slice(b"{\"attributes\":");
        self.attrs(buf, &e.attributes)?;
        buf.extend_from_slice(b",\"name\":");
        string(buf, &e.name);
        buf.extend_from_slice(b",\"time\":");
        time(buf, t);
        buf.extend_from_slice(b",\"time_unix_ns\":");
        int(buf, t as i64);
        buf.push(b'}');
        Ok(())
    }

    /// An attribute map: keys in byte order, the last value of a repeated key.
    fn attrs(&mut self, buf: &mut Vec<u8>, kvs: &[KeyValue]) -> Result<(), serde_json::Error> {
        let key = |i: usize| kvs[i].key.as_str();
        self.order.clear();
        self.order.extend(0..kvs.len());
        // Stable: a repeated key keeps its attributes in their order, and the last one is kept.
        self.order.sort_by(|&a, &b| key(a).cmp(key(b)));
        buf.push(b'{');
        let mut first = true;
        for (n, &i) in self.order.iter().enumerate() {
            if self.order.get(n + 1).is_some_and(|&next| key(next) == key(i)) {
                continue;
            }
            if !first {
                buf.push(b',');
            }
            first = false;
            string(buf, key(i));
            buf.push(b':');
            value_to(buf, &kvs[i].value)?;
        }
        buf.push(b'}');
        Ok(())
    }
}

/// An attribute value, as [`value`] makes it.
fn value_to(buf: &mut Vec<u8>, v: &Value) -> Result<(), serde_json::Error> {
    match v {
        Value::Bool(b) => buf.extend_from_slice(if *b { b"true" } else { b"false" }),
        Value::I64(i) => int(buf, *i),
        Value::F64(f) => serde_json::to_writer(&mut *buf, f)?,
        Value::String(s) => string(buf, s.as_str()),
        Value::Array(Array::Bool(a)) => serde_json::to_writer(&mut *buf, a)?,
        Value::Array(Array::I64(a)) => serde_json::to_writer(&mut *buf, a)?,
        Value::Array(Array::F64(a)) => serde_json::to_writer(&mut *buf, a)?,
        Value::Array(Array::String(a)) => {
            serde_json::Serializer::new(&mut *buf).collect_seq(a.iter().map(StringValue::as_str))?
        }
        other => serde_json::Serializer::new(&mut *buf).collect_str(other)?,
    }
    Ok(())
}

/// A trace or span id as a JSON string of lowercase hex digits (the ids' `Display`).
fn hex(buf: &mut Vec<u8>, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    buf.push(b'"');
    for b in bytes {
        buf.push(DIGITS[usize::from(b >> 4)]);
        buf.push(DIGITS[usize::from(b & 0xf)]);
    }
    buf.push(b'"');
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;
    use std::time::Duration;

    use opentelemetry::trace::{SpanContext, SpanKind, TraceFlags, TraceId, TraceState};
    use opentelemetry::InstrumentationScope;
    use opentelemetry_sdk::trace::{SpanEvents, SpanLinks};

    use super::*;
    use crate::clock::WallClock;
    use crate::event::{Process, SockSettings, TcpState};
    use crate::export::spans::{SpanModel, SpanPolicy};
    use crate::timeline::{
        AckPrecision, ConnView, Episode, EpisodeOutcome, Record, RecordKind, SettingsSource, TimeoutReason,
    };

    /// What `run` printed before: the `Value` tree, then its text.
    fn via_value(span: &SpanData, resource: &[KeyValue]) -> String {
        span_json(span, resource).to_string() + "\n"
    }

    fn written(w: &mut SpanWriter, span: &SpanData) -> String {
        let mut buf = b"previous line\n".to_vec();
        w.write_line(span, &mut buf).unwrap();
        String::from_utf8(buf).unwrap().strip_prefix("previous line\n").unwrap().to_string()
    }

    fn at(unix_ns: i128) -> SystemTime {
        if unix_ns >= 0 {
            UNIX_EPOCH + Duration::from_nanos(unix_ns as u64)
        } else {
            UNIX_EPOCH - Duration::from_nanos(unix_ns.unsigned_abs() as u64)
        }
    }

    fn event(name: &'static str, t: i128, attributes: Vec<KeyValue>) -> Event {
        Event::new(name, at(t), attributes, 0)
    }

    #[allow(clippy::too_many_arguments)]
    fn span(
        name: &'static str,
        parent: u64,
        (start, end): (i128, i128),
        attributes: Vec<KeyValue>,
        events: Vec<Event>,
        dropped: u32,
        status: Status,
        scope: InstrumentationScope,
    ) -> SpanData {
        let mut ev = SpanEvents::default();
        ev.events = events;
        ev.dropped_count = dropped;
        SpanData {
            span_context: SpanContext::new(
                TraceId::from(0x0af7_6519_16cd_43dd_8448_eb21_1c80_319c_u128),
                SpanId::from(0x00f0_67aa_0ba9_02b7_u64),
                TraceFlags::SAMPLED,
                false,
                TraceState::default(),
            ),
            parent_span_id: SpanId::from(parent),
            parent_span_is_remote: false,
            span_kind: SpanKind::Internal,
            name: Cow::Borrowed(name),
            start_time: at(start),
            end_time: at(end),
            attributes,
            dropped_attributes_count: 0,
            events: ev,
            links: SpanLinks::default(),
            status,
            instrumentation_scope: scope,
        }
    }

    /// Every kind of value, keys out of order, repeated, and needing escapes.
    fn odd_attributes() -> Vec<KeyValue> {
        vec![
            KeyValue::new("z.last", "zz"),
            KeyValue::new("b.bool", true),
            KeyValue::new("a.int", -42_i64),
            KeyValue::new("dup", 1_i64),
            KeyValue::new("f.float", 0.1_f64),
            KeyValue::new("f.nan", f64::NAN),
            KeyValue::new("f.inf", f64::INFINITY),
            KeyValue::new("f.big", 1e300_f64),
            KeyValue::new("f.neg_zero", -0.0_f64),
            KeyValue::new("s.escapes", "quote \" backslash \\ newline \n tab \t bell \u{7} é ☃"),
            KeyValue::new("k\"ey\\ with \u{1} escapes", "v"),
            KeyValue::new("arr.bool", Value::Array(Array::Bool(vec![true, false]))),
            KeyValue::new("arr.i64", Value::Array(Array::I64(vec![1, -2, i64::MAX]))),
            KeyValue::new("arr.f64", Value::Array(Array::F64(vec![1.5, f64::NAN, -3e-9]))),
            KeyValue::new("arr.str", Value::Array(Array::String(vec!["a\"".into(), "b".into()]))),
            KeyValue::new("arr.empty", Value::Array(Array::String(vec![]))),
            KeyValue::new("dup", "second"),
            KeyValue::new("Upper", "sorts before lower"),
            KeyValue::new("dup", false),
        ]
    }

    fn scope(version: Option<&'static str>) -> InstrumentationScope {
        let b = InstrumentationScope::builder("keepalive-agent");
        match version {
            Some(v) => b.with_version(v).build(),
            None => b.build(),
        }
    }

    #[test]
    fn hand_made_spans_print_as_the_value_tree_did() {
        let resource = vec![
            KeyValue::new("service.name", "svc"),
            KeyValue::new("host.name", "h\"1"),
            KeyValue::new("deployment.environment", "prod"),
            KeyValue::new("service.name", "override"),
        ];
        let t0: i128 = 1_795_000_000_123_456_789;
        let spans = [
            span("tcp.connection", 0, (t0, t0 + 2_500_000_001), odd_attributes(), vec![], 0, Status::Unset, scope(Some("0.1.0"))),
            span(
                "tcp.keepalive.episode",
                0x1122_3344_5566_7788,
                (t0, t0 + 999),
                vec![KeyValue::new("one", 1_i64)],
                vec![
                    event("tcp.keepalive.probe", t0, vec![KeyValue::new("tcp.keepalive.probe.n", 2_i64)]),
                    event("no attributes", t0 + 1, vec![]),
                    event("odd", t0 + 2, odd_attributes()),
                ],
                7,
                Status::error("keep-alive timeout: 9 probes \"unanswered\"\n"),
                scope(None),
            ),
            span("ok", 1, (t0, t0), vec![], vec![], 0, Status::Ok, scope(Some("v\u{e9}"))),
            // Before the epoch, and ending before it starts.
            span("négatif ☃", 2, (-1_500_000_000, -2_000_000_000), vec![], vec![event("e", -1, vec![])], 0, Status::Unset, scope(None)),
        ];
        let mut w = SpanWriter::new(&resource);
        for s in &spans {
            assert_eq!(written(&mut w, s), via_value(s, &resource), "{}", s.name);
        }
        let line = written(&mut w, &spans[0]);
        assert!(line.contains(r#""dup":false,"f.big":1e+300,"f.float":0.1,"f.inf":null"#), "{line}");
    }

    fn conn(id: u64, process: bool) -> ConnView {
        ConnView {
            id,
            sk: 1,
            netns: 4026531840,
            local: format!("127.0.0.1:{}", 40_000 + id).parse().unwrap(),
            remote: if id.is_multiple_of(2) { "[::1]:9000".parse().unwrap() } else { "10.0.0.1:9000".parse().unwrap() },
            process: process.then_some(Process { pid: 7, tid: 7, comm: *b"py\"thon\0\0\0\0\0\0\0\0\0", cgroup_id: 1 }),
            first_seen_ns: 1_000,
        }
    }

    fn episode(number: u32, start_ns: u64, probes: u32, outcome: EpisodeOutcome) -> RecordKind {
        let probe_ts_ns = (0..u64::from(probes)).map(|i| start_ns + i * 1_000_000_000).collect();
        RecordKind::EpisodeEnd(Episode {
            number,
            start_ns,
            end_ns: start_ns + u64::from(probes) * 1_000_000_000,
            probes,
            outcome,
            probe_ts_ns,
            first_timed_probe: 1,
        })
    }

    /// The model's spans of every ending (answered after two probes, timeout, reset, error, close,
    /// still open at the stop): printed as the value tree printed them.
    #[test]
    fn model_spans_print_as_the_value_tree_did() {
        let settings = SockSettings {
            keepalive: true,
            idle_s: Some(1),
            intvl_s: None,
            cnt: Some(3),
            user_timeout_ms: 0,
            idle_default_s: 7200,
            intvl_default_s: 75,
            cnt_default: 9,
        };
        let mut recs = Vec::new();
        let mut rec = |id: u64, ts_ns: u64, kind: RecordKind| recs.push(Record { ts_ns, conn: conn(id, id != 3), kind });
        for id in 1..=5 {
            rec(id, 2_000, RecordKind::Opened { state: TcpState::Established, established: true });
            rec(id, 3_000, RecordKind::Config { settings, source: SettingsSource::Snapshot, process: None });
            rec(id, 4_000, episode(1, 4_000, 2, EpisodeOutcome::Answered(AckPrecision::Segment)));
        }
        rec(1, 9_000, episode(2, 9_000, 3, EpisodeOutcome::TimedOut(TimeoutReason::Keepalive)));
        rec(1, 9_500, RecordKind::Timeout { reason: TimeoutReason::Keepalive, probes: 3, idle: None });
        rec(1, 9_600, RecordKind::Close { state: TcpState::Established, closed_by: None, idle: None });
        rec(2, 9_000, RecordKind::Reset { reason: "not_specified".into(), active: true, death: true });
        rec(2, 9_100, RecordKind::Error { errno: 104, death: true });
        rec(2, 9_200, RecordKind::Close { state: TcpState::Established, closed_by: None, idle: None });
        rec(3, 9_000, RecordKind::Suppressed { packets_out: 1, unsent: 10 });
        let clock = WallClock::with_offset_ns(1_795_000_000_000_000_000);
        let mut model = SpanModel::with_policy(128, SpanPolicy::All);
        let mut out = Vec::new();
        model.on_records(&recs, &clock, &mut out);
        model.finish(&clock, 20_000_000_000, &mut out);
        assert_eq!(out.len(), 5 + 1 + 5, "an episode each, the timeout, the connections");
        let resource = [KeyValue::new("service.name", "keepalive-agent")];
        let mut w = SpanWriter::new(&resource);
        let mut all = Vec::new();
        for s in &out {
            assert_eq!(written(&mut w, s), via_value(s, &resource));
            w.write_line(s, &mut all).unwrap();
        }
        let text = String::from_utf8(all).unwrap();
        assert_eq!(text.lines().count(), out.len());
        assert!(text.ends_with('\n'));
    }
}
