//! OpenTelemetry side of the `run` tests: the OTLP receiver tests/otlp/receiver.py (grpcio +
//! opentelemetry-proto, stdlib HTTP server; not built on the Rust opentelemetry crates) from the
//! venv made by scripts/setup-otel.sh, and a common view of the spans the agent exports, whether
//! they came over OTLP (the receiver's JSON lines) or as the agent's own JSON lines on stdout.
//!
//! The receiver listens on the host's loopback (127.0.0.1) only: the agent runs in the host's
//! network namespace and exports from there.
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use serde_json::{Map, Value};

/// The venv holding the receiver's Python packages: `$KEEPALIVE_OTEL_VENV`, default
/// `/opt/keepalive/otel-venv`. Panics with what to run when it is missing.
pub fn venv() -> PathBuf {
    let v = PathBuf::from(
        std::env::var("KEEPALIVE_OTEL_VENV").unwrap_or_else(|_| "/opt/keepalive/otel-venv".into()),
    );
    let python = v.join("bin/python");
    if !python.exists() {
        panic!(
            "the OTLP receiver venv is missing ({} does not exist): run scripts/setup.sh \
             (it runs scripts/setup-otel.sh), or point KEEPALIVE_OTEL_VENV at such a venv",
            python.display()
        );
    }
    v
}

/// tests/otlp/receiver.py.
pub fn receiver_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("otlp/receiver.py")
}

/// A TCP port on 127.0.0.1 that nothing listens on right now (bound, then released).
pub fn free_loopback_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding 127.0.0.1:0")
        .port()
}

/// The two OTLP transports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    HttpProtobuf,
}

impl Protocol {
    /// The value of `--otlp-protocol`.
    pub fn flag(self) -> &'static str {
        match self {
            Protocol::Grpc => "grpc",
            Protocol::HttpProtobuf => "http/protobuf",
        }
    }

    /// What the receiver writes in its `protocol` field.
    pub fn receiver_name(self) -> &'static str {
        match self {
            Protocol::Grpc => "grpc",
            Protocol::HttpProtobuf => "http",
        }
    }
}

/// A running receiver.py, stopped (SIGTERM, then SIGKILL) and its scratch directory removed on
/// drop.
pub struct Receiver {
    child: Child,
    dir: PathBuf,
    out: PathBuf,
    /// What was read of `out` so far (it is read incrementally: a test may receive tens of
    /// thousands of spans and poll often).
    seen: Mutex<Seen>,
    pub grpc_port: u16,
    pub http_port: u16,
}

#[derive(Default)]
struct Seen {
    /// Bytes of complete lines consumed.
    offset: u64,
    requests: Vec<Value>,
    spans: Vec<Span>,
    /// "metric" lines (one per metric of an accepted metrics request).
    metrics: Vec<Value>,
    /// "metrics_request" lines.
    metric_requests: Vec<Value>,
}

impl Receiver {
    /// Starts the receiver with gRPC on 127.0.0.1:`grpc_port` and HTTP on 127.0.0.1:`http_port`
    /// (0: a free port) and waits until both listen. Panics with the receiver's stderr when it
    /// cannot start.
    pub fn start(grpc_port: u16, http_port: u16) -> Receiver {
        Self::try_start(grpc_port, http_port, &[]).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// [`Receiver::start`] with extra receiver.py arguments, returning errors.
    pub fn try_start(grpc_port: u16, http_port: u16, extra: &[&str]) -> Result<Receiver> {
        let python = venv().join("bin/python");
        let script = receiver_script();
        if !script.is_file() {
            bail!("{} is missing", script.display());
        }
        let dir = scratch_dir()?;
        let out = dir.join("spans.jsonl");
        let ready = dir.join("ready.json");
        let stderr = std::fs::File::create(dir.join("stderr")).context("receiver stderr file")?;
        let child = Command::new(&python)
            .arg(&script)
            .arg("--out")
            .arg(&out)
            .arg("--ready-file")
            .arg(&ready)
            .arg("--grpc")
            .arg(format!("127.0.0.1:{grpc_port}"))
            .arg("--http")
            .arg(format!("127.0.0.1:{http_port}"))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("starting {} {}", python.display(), script.display()))?;
        let mut r = Receiver {
            child,
            dir,
            out,
            seen: Mutex::new(Seen::default()),
            grpc_port: 0,
            http_port: 0,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(text) = std::fs::read_to_string(&ready) {
                let ports: Value = serde_json::from_str(&text)
                    .with_context(|| format!("receiver ready file {text:?}"))?;
                let port = |k: &str| -> Result<u16> {
                    ports[k]
                        .as_u64()
                        .and_then(|p| u16::try_from(p).ok())
                        .ok_or_else(|| anyhow!("no {k} port in the receiver's ready file: {text}"))
                };
                r.grpc_port = port("grpc")?;
                r.http_port = port("http")?;
                return Ok(r);
            }
            if let Some(status) = r.child.try_wait()? {
                bail!(
                    "receiver.py exited before listening ({status}); stderr:\n{}",
                    r.stderr()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "receiver.py not listening after 30 s; stderr:\n{}",
                    r.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What the receiver wrote on stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr")).unwrap_or_default()
    }

    /// `http://127.0.0.1:PORT` for the protocol (the agent appends `/v1/traces` for HTTP).
    pub fn endpoint(&self, p: Protocol) -> String {
        match p {
            Protocol::Grpc => format!("http://127.0.0.1:{}", self.grpc_port),
            Protocol::HttpProtobuf => format!("http://127.0.0.1:{}", self.http_port),
        }
    }

    /// Reads the complete lines the receiver appended since the last call (a line being written
    /// is left for next time).
    fn refresh(&self) -> MutexGuard<'_, Seen> {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let mut buf = Vec::new();
        if let Ok(mut f) = File::open(&self.out) {
            if f.seek(SeekFrom::Start(seen.offset)).is_ok() {
                f.read_to_end(&mut buf)
                    .unwrap_or_else(|e| panic!("reading {}: {e}", self.out.display()));
            }
        }
        let complete = buf.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        for line in buf[..complete]
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
        {
            let v: Value = serde_json::from_slice(line).unwrap_or_else(|e| {
                panic!(
                    "receiver wrote a bad line ({e}): {}",
                    String::from_utf8_lossy(line)
                )
            });
            match v["type"].as_str() {
                Some("span") => {
                    let span = Span::from_otlp(&v).unwrap_or_else(|e| panic!("{e:#}: {v}"));
                    seen.spans.push(span);
                }
                Some("request") => seen.requests.push(v),
                Some("metric") => seen.metrics.push(v),
                Some("metrics_request") => seen.metric_requests.push(v),
                _ => panic!("receiver wrote an unknown line: {v}"),
            }
        }
        seen.offset += complete as u64;
        seen
    }

    /// One object per export request received: `protocol`, `spans`, `accepted`, `headers`.
    pub fn requests(&self) -> Vec<Value> {
        self.refresh().requests.clone()
    }

    /// Every span received so far, in arrival order.
    pub fn spans(&self) -> Vec<Span> {
        self.refresh().spans.clone()
    }

    /// Every metric received so far (the receiver's "metric" objects: `name`, `data`,
    /// `temporality`, `points` with `attributes` and `value`, `resource`...), in arrival order.
    pub fn metrics(&self) -> Vec<Value> {
        self.refresh().metrics.clone()
    }

    /// One object per metrics export request: `protocol`, `metrics`, `points`, `accepted`, `headers`.
    pub fn metric_requests(&self) -> Vec<Value> {
        self.refresh().metric_requests.clone()
    }

    /// Polls the metrics received until `f` returns true (true) or `timeout` passes (false).
    pub fn wait_metrics(&self, timeout: Duration, mut f: impl FnMut(&[Value]) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if f(&self.refresh().metrics) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Number of spans received so far.
    pub fn span_count(&self) -> usize {
        self.refresh().spans.len()
    }

    /// Polls the spans received until `f` returns true (true) or `timeout` passes (false).
    pub fn wait_until(&self, timeout: Duration, mut f: impl FnMut(&[Span]) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if f(&self.refresh().spans) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        // SAFETY: signalling our own child, not reaped yet (try_wait below reaps it).
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("harness: removing {}: {e}", self.dir.display());
        }
    }
}

fn scratch_dir() -> Result<PathBuf> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "keepalive-tests-otlp-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).with_context(|| format!("mkdir {}", d.display()))?;
    Ok(d)
}

/// A span event.
#[derive(Clone, Debug)]
pub struct SpanEvent {
    pub name: String,
    pub time_ns: u64,
    pub attrs: Map<String, Value>,
}

/// Span status code, lower case: `unset`, `ok`, `error`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusCode {
    Unset,
    Ok,
    Error,
}

/// A span as the agent exported it, from either the receiver (OTLP) or the agent's stdout.
#[derive(Clone, Debug)]
pub struct Span {
    pub trace_id: String,
    pub span_id: String,
    /// None for a root span.
    pub parent_span_id: Option<String>,
    pub name: String,
    /// `internal`, `server`... (lower case).
    pub kind: String,
    pub start_ns: u64,
    pub end_ns: u64,
    pub status: StatusCode,
    pub status_message: String,
    pub attrs: Map<String, Value>,
    pub events: Vec<SpanEvent>,
    pub dropped_events: u64,
    pub resource: Map<String, Value>,
    pub scope_name: String,
    /// The whole object as received.
    pub raw: Value,
}

fn obj(v: &Value, k: &str) -> Result<Map<String, Value>> {
    v.get(k)
        .and_then(Value::as_object)
        .cloned()
        .ok_or_else(|| anyhow!("no object `{k}`"))
}

fn string(v: &Value, k: &str) -> Result<String> {
    v.get(k)
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| anyhow!("no string `{k}`"))
}

fn uint(v: &Value, k: &str) -> Result<u64> {
    v.get(k)
        .and_then(Value::as_u64)
        .ok_or_else(|| anyhow!("no unsigned integer `{k}`"))
}

fn hex_id(s: &str, bytes: usize, what: &str) -> Result<()> {
    if s.len() != 2 * bytes
        || !s.bytes().all(|c| c.is_ascii_hexdigit())
        || s.bytes().all(|c| c == b'0')
    {
        bail!("{what} {s:?} is not a valid {bytes}-byte id");
    }
    Ok(())
}

/// The span's `events`, each time read from `time_key` (the two formats name it differently).
fn span_events(v: &Value, time_key: &str) -> Result<Vec<SpanEvent>> {
    v.get("events")
        .and_then(Value::as_array)
        .ok_or_else(|| anyhow!("no events"))?
        .iter()
        .map(|e| {
            Ok(SpanEvent {
                name: string(e, "name")?,
                time_ns: uint(e, time_key)?,
                attrs: obj(e, "attributes")?,
            })
        })
        .collect()
}

impl Span {
    /// From a receiver.py `span` line (OTLP field names, `STATUS_CODE_*`, `SPAN_KIND_*`, empty
    /// parent id for a root).
    pub fn from_otlp(v: &Value) -> Result<Span> {
        let parent = string(v, "parent_span_id")?;
        let status = v.get("status").ok_or_else(|| anyhow!("no status"))?;
        let code = match string(status, "code")?.as_str() {
            "STATUS_CODE_UNSET" => StatusCode::Unset,
            "STATUS_CODE_OK" => StatusCode::Ok,
            "STATUS_CODE_ERROR" => StatusCode::Error,
            other => bail!("unknown status code {other}"),
        };
        let events = span_events(v, "time_unix_nano")?;
        let kind = string(v, "kind")?;
        let span = Span {
            trace_id: string(v, "trace_id")?,
            span_id: string(v, "span_id")?,
            parent_span_id: (!parent.is_empty()).then_some(parent),
            name: string(v, "name")?,
            kind: kind
                .strip_prefix("SPAN_KIND_")
                .unwrap_or(&kind)
                .to_ascii_lowercase(),
            start_ns: uint(v, "start_time_unix_nano")?,
            end_ns: uint(v, "end_time_unix_nano")?,
            status: code,
            status_message: string(status, "message")?,
            attrs: obj(v, "attributes")?,
            events,
            dropped_events: uint(v, "dropped_events_count")?,
            resource: obj(v, "resource")?,
            scope_name: string(v.get("scope").unwrap_or(&Value::Null), "name")?,
            raw: v.clone(),
        };
        span.check_ids()?;
        Ok(span)
    }

    /// From one of the agent's stdout JSON lines (`run` with no endpoint).
    pub fn from_json_line(v: &Value) -> Result<Span> {
        let status = v.get("status").ok_or_else(|| anyhow!("no status"))?;
        let code = match string(status, "code")?.as_str() {
            "unset" => StatusCode::Unset,
            "ok" => StatusCode::Ok,
            "error" => StatusCode::Error,
            other => bail!("unknown status code {other}"),
        };
        let parent = match v.get("parent_span_id") {
            Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            _ => bail!("parent_span_id is neither null nor a string"),
        };
        let events = span_events(v, "time_unix_ns")?;
        let span = Span {
            trace_id: string(v, "trace_id")?,
            span_id: string(v, "span_id")?,
            parent_span_id: parent,
            name: string(v, "name")?,
            kind: string(v, "kind")?,
            start_ns: uint(v, "start_unix_ns")?,
            end_ns: uint(v, "end_unix_ns")?,
            status: code,
            status_message: status
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            attrs: obj(v, "attributes")?,
            events,
            dropped_events: uint(v, "dropped_events_count")?,
            resource: obj(v, "resource")?,
            scope_name: string(v.get("scope").unwrap_or(&Value::Null), "name")?,
            raw: v.clone(),
        };
        span.check_ids()?;
        Ok(span)
    }

    fn check_ids(&self) -> Result<()> {
        hex_id(&self.trace_id, 16, "trace_id")?;
        hex_id(&self.span_id, 8, "span_id")?;
        if let Some(p) = &self.parent_span_id {
            hex_id(p, 8, "parent_span_id")?;
        }
        Ok(())
    }

    pub fn attr(&self, k: &str) -> Option<&Value> {
        self.attrs.get(k)
    }

    pub fn attr_str(&self, k: &str) -> Option<&str> {
        self.attr(k).and_then(Value::as_str)
    }

    pub fn attr_i64(&self, k: &str) -> Option<i64> {
        self.attr(k).and_then(Value::as_i64)
    }

    pub fn attr_bool(&self, k: &str) -> Option<bool> {
        self.attr(k).and_then(Value::as_bool)
    }

    /// Whether the span describes the connection with these local and peer addresses
    /// (`network.local.*`, `network.peer.*`).
    pub fn is_conn(&self, local: SocketAddr, peer: SocketAddr) -> bool {
        self.attr_str("network.local.address") == Some(local.ip().to_string().as_str())
            && self.attr_i64("network.local.port") == Some(i64::from(local.port()))
            && self.attr_str("network.peer.address") == Some(peer.ip().to_string().as_str())
            && self.attr_i64("network.peer.port") == Some(i64::from(peer.port()))
    }

    /// Events with this name, in order.
    pub fn events_named(&self, name: &str) -> Vec<&SpanEvent> {
        self.events.iter().filter(|e| e.name == name).collect()
    }

    /// One line for messages: name, ids, times, status, outcome.
    pub fn summary(&self) -> String {
        format!(
            "{} trace {} span {} parent {:?} {}..{} status {:?} {:?} attrs {} events [{}]",
            self.name,
            self.trace_id,
            self.span_id,
            self.parent_span_id,
            self.start_ns,
            self.end_ns,
            self.status,
            self.status_message,
            Value::Object(self.attrs.clone()),
            self.events
                .iter()
                .map(|e| format!(
                    "{}@{} {}",
                    e.name,
                    e.time_ns,
                    Value::Object(e.attrs.clone())
                ))
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

/// One span per line, for panic messages.
pub fn render(spans: &[Span]) -> String {
    let mut s = String::new();
    for sp in spans {
        s.push_str("  ");
        s.push_str(&sp.summary());
        s.push('\n');
    }
    s
}

/// The spans of one connection (matched by addresses), in arrival order.
pub fn of_conn(spans: &[Span], local: SocketAddr, peer: SocketAddr) -> Vec<Span> {
    spans
        .iter()
        .filter(|s| s.is_conn(local, peer))
        .cloned()
        .collect()
}

/// The counters of the agent's final `stopped: ... export: N spans created, ...` log line, by
/// name: `created`, `exported`, `dropped`, `failed`, `export errors`, `retries`, `queued`,
/// `unsent`.
pub fn export_report(stderr: &[String]) -> Result<HashMap<String, u64>> {
    let line = stderr
        .iter()
        .rev()
        .find(|l| l.contains("stopped:") && l.contains("export:"))
        .ok_or_else(|| anyhow!("no `stopped: ... export: ...` line in the agent's stderr"))?;
    let export = line
        .split_once("export:")
        .map(|(_, r)| r)
        .unwrap_or_default();
    let mut counts = HashMap::new();
    // "12 spans created, 10 exported, 2 dropped (queue full), 0 failed, 1 export errors, 1 retries,
    //  0 queued; 3 open connections and 0 open episodes ended at shutdown; 0 spans unsent; ..."
    for part in export.split([',', ';']) {
        let part = part.trim();
        let Some((n, rest)) = part.split_once(' ') else {
            continue;
        };
        let Ok(n) = n.parse::<u64>() else { continue };
        let name = rest
            .trim_start_matches("spans ")
            .split(" (")
            .next()
            .unwrap_or("")
            .trim();
        let name = match name {
            "created" | "exported" | "dropped" | "failed" | "export errors" | "retries"
            | "queued" | "unsent" => name,
            _ => continue,
        };
        counts.insert(name.to_string(), n);
    }
    for k in [
        "created",
        "exported",
        "dropped",
        "failed",
        "export errors",
        "retries",
        "queued",
        "unsent",
    ] {
        if !counts.contains_key(k) {
            bail!("no `{k}` counter in the agent's final line: {line}");
        }
    }
    Ok(counts)
}

/// Resident set size of a process in KiB (`VmRSS` of /proc/PID/status).
pub fn rss_kib(pid: u32) -> Result<u64> {
    let p = format!("/proc/{pid}/status");
    let s = std::fs::read_to_string(&p).with_context(|| format!("reading {p}"))?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS in {p}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_line_counters() {
        let lines = vec![
            "ready: 8 hooks attached".to_string(),
            "[2025-11-21T13:25:00.000Z INFO  keepalive_agent] stopped: 100 kernel events, 90 records, 0 lost, \
             0 decode errors; 4 connections tracked; export: 12 spans created, 10 exported, 2 dropped (queue full), \
             0 failed, 3 export errors, 1 retries, 0 queued; 3 open connections and 0 open episodes ended at \
             shutdown; 0 spans unsent; flushed in 12 ms"
                .to_string(),
        ];
        let c = export_report(&lines).unwrap();
        assert_eq!(c["created"], 12);
        assert_eq!(c["exported"], 10);
        assert_eq!(c["dropped"], 2);
        assert_eq!(c["failed"], 0);
        assert_eq!(c["export errors"], 3);
        assert_eq!(c["retries"], 1);
        assert_eq!(c["queued"], 0);
        assert_eq!(c["unsent"], 0);
        assert!(export_report(&lines[..1]).is_err());
    }

    #[test]
    fn spans_from_both_shapes() {
        let otlp = serde_json::json!({
            "type": "span", "protocol": "grpc", "resource": {"service.name": "x"},
            "scope": {"name": "keepalive-agent", "version": "0.1.0"},
            "trace_id": "0af7651916cd43dd8448eb211c80319c", "span_id": "b7ad6b7169203331",
            "parent_span_id": "", "name": "tcp.connection", "kind": "SPAN_KIND_INTERNAL", "flags": 0,
            "start_time_unix_nano": 1_000_000_000u64, "end_time_unix_nano": 2_000_000_000u64,
            "attributes": {"network.local.address": "127.0.0.1", "network.local.port": 40000,
                           "network.peer.address": "127.0.0.1", "network.peer.port": 8080},
            "dropped_attributes_count": 0,
            "events": [{"name": "tcp.keepalive.probe", "time_unix_nano": 1_500_000_000u64,
                        "attributes": {"tcp.keepalive.probe.n": 1}, "dropped_attributes_count": 0}],
            "dropped_events_count": 0,
            "status": {"code": "STATUS_CODE_ERROR", "message": "boom"}
        });
        let s = Span::from_otlp(&otlp).unwrap();
        assert_eq!(s.parent_span_id, None);
        assert_eq!(s.kind, "internal");
        assert_eq!(s.status, StatusCode::Error);
        assert_eq!(s.events[0].time_ns, 1_500_000_000);
        assert!(s.is_conn(
            "127.0.0.1:40000".parse().unwrap(),
            "127.0.0.1:8080".parse().unwrap()
        ));
        assert!(!s.is_conn(
            "127.0.0.1:40001".parse().unwrap(),
            "127.0.0.1:8080".parse().unwrap()
        ));

        let line = serde_json::json!({
            "trace_id": "0af7651916cd43dd8448eb211c80319c", "span_id": "00f067aa0ba902b7",
            "parent_span_id": "b7ad6b7169203331", "name": "tcp.keepalive.episode", "kind": "internal",
            "start": "2025-11-21T13:25:00.000000Z", "start_unix_ns": 1_763_731_500_000_000_000u64,
            "end": "2025-11-21T13:25:01.000000Z", "end_unix_ns": 1_763_731_501_000_000_000u64,
            "duration_ms": 1000.0, "status": {"code": "unset"}, "attributes": {},
            "events": [], "dropped_events_count": 0, "resource": {}, "scope": {"name": "keepalive-agent"}
        });
        let s = Span::from_json_line(&line).unwrap();
        assert_eq!(s.parent_span_id.as_deref(), Some("b7ad6b7169203331"));
        assert_eq!(s.status, StatusCode::Unset);

        let mut bad = line.clone();
        bad["span_id"] = Value::from("0000000000000000");
        assert!(Span::from_json_line(&bad).is_err());
    }
}
