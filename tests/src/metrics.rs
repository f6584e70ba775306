//! Metrics side of the `run` tests: a plain HTTP GET for the agent's `--metrics-listen` endpoints,
//! a real Prometheus server (Debian's `prometheus`, installed by scripts/setup.sh) scraping the
//! agent, `promtool check metrics`, and rotel (`rotel-agent` from the venv of
//! scripts/setup-otel.sh) as an OTLP collector in front of tests/otlp/receiver.py.
//!
//! Everything listens on 127.0.0.1 only, with its data in a scratch directory removed on drop.
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use serde_json::Value;

use crate::otlp::free_loopback_port;

/// An HTTP response: status, `Content-Type`, body.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub content_type: String,
    pub body: String,
}

/// `GET path` on `addr` (HTTP/1.0, so that the body is neither chunked nor kept alive), with an
/// optional `Accept` header.
pub fn http_get(addr: SocketAddr, path: &str, accept: Option<&str>) -> Result<Response> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let accept = accept.map(|a| format!("Accept: {a}\r\n")).unwrap_or_default();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n{accept}\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).with_context(|| format!("reading the answer to GET {path}"))?;
    let text = String::from_utf8(raw).context("answer is not UTF-8")?;
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| anyhow!("no header end in {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("no status in {head:?}"))?;
    let content_type = head
        .lines()
        .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("content-type")).map(|(_, v)| v.trim().to_string()))
        .unwrap_or_default();
    Ok(Response { status, content_type, body: body.to_string() })
}

/// Polls `GET path` until `pred` holds for a response (returned) or `timeout` passes (the last
/// response or error, as an error).
pub fn wait_http(addr: SocketAddr, path: &str, timeout: Duration, mut pred: impl FnMut(&Response) -> bool) -> Result<Response> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = http_get(addr, path, None);
        if let Ok(r) = &last {
            if pred(r) {
                return Ok(r.clone());
            }
        }
        if Instant::now() >= deadline {
            bail!("GET {path} on {addr}: no matching answer within {timeout:?}; last: {last:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `promtool check metrics` on `exposition`: its combined output and whether it succeeded.
pub fn promtool_check(exposition: &str) -> Result<(bool, String)> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running promtool (Debian package prometheus: run scripts/setup.sh)")?;
    child.stdin.take().expect("piped").write_all(exposition.as_bytes())?;
    let out = child.wait_with_output()?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Ok((out.status.success(), text))
}

/// A scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(what: &str) -> Result<Scratch> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let d = std::env::temp_dir().join(format!("keepalive-tests-{what}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst)));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).with_context(|| format!("mkdir {}", d.display()))?;
        Ok(Scratch(d))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// SIGTERM, then SIGKILL after 5 s; reaps the child.
fn stop_child(child: &mut Child) {
    // SAFETY: signalling our own child, not reaped yet.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A Prometheus server on 127.0.0.1 scraping one target, stopped and its data removed on drop.
pub struct Prometheus {
    child: Child,
    scratch: Scratch,
    pub addr: SocketAddr,
}

impl Prometheus {
    /// Starts `prometheus` scraping `target` (`/metrics`) every `scrape_interval`, and waits until
    /// it is ready.
    pub fn start(target: SocketAddr, scrape_interval: Duration) -> Result<Prometheus> {
        let scratch = Scratch::new("prometheus")?;
        let dir = &scratch.0;
        let ms = scrape_interval.as_millis();
        let config = format!(
            "global:\n  scrape_interval: {ms}ms\n  scrape_timeout: {ms}ms\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: keepalive\n    static_configs:\n      - targets: ['{target}']\n"
        );
        std::fs::write(dir.join("prometheus.yml"), config)?;
        let addr: SocketAddr = format!("127.0.0.1:{}", free_loopback_port()).parse()?;
        let log = std::fs::File::create(dir.join("log"))?;
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting prometheus (Debian package prometheus: run scripts/setup.sh)")?;
        let mut p = Prometheus { child, scratch, addr };
        if let Err(e) = wait_http(addr, "/-/ready", Duration::from_secs(30), |r| r.status == 200) {
            bail!("prometheus not ready: {e:#}\nits log:\n{}", p.log());
        }
        if let Ok(Some(status)) = p.child.try_wait() {
            bail!("prometheus exited ({status}):\n{}", p.log());
        }
        Ok(p)
    }

    /// What Prometheus logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.scratch.0.join("log")).unwrap_or_default()
    }

    /// An instant PromQL query through the HTTP API: the `data.result` vector.
    pub fn query(&self, promql: &str) -> Result<Vec<Value>> {
        let path = format!("/api/v1/query?query={}", url_encode(promql));
        let r = http_get(self.addr, &path, None)?;
        let v: Value = serde_json::from_str(&r.body).with_context(|| format!("query {promql}: {}", r.body))?;
        if v["status"] != "success" {
            bail!("query {promql}: {v}");
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// Polls `promql` until `pred` holds for its result (returned) or `timeout` passes (error with
    /// the last result).
    pub fn wait_query(&self, promql: &str, timeout: Duration, mut pred: impl FnMut(&[Value]) -> bool) -> Result<Vec<Value>> {
        let deadline = Instant::now() + timeout;
        loop {
            let result = self.query(promql)?;
            if pred(&result) {
                return Ok(result);
            }
            if Instant::now() >= deadline {
                bail!("PromQL `{promql}`: not as expected within {timeout:?}; last result: {result:?}");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        stop_child(&mut self.child);
    }
}

/// The value of one sample of an instant-vector result.
pub fn sample_value(sample: &Value) -> f64 {
    sample["value"][1].as_str().and_then(|s| s.parse().ok()).unwrap_or(f64::NAN)
}

/// Percent-encodes everything but unreserved characters (RFC 3986).
fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// rotel (an OTLP collector, not built on the Rust OpenTelemetry crates) receiving OTLP on
/// 127.0.0.1 over gRPC and HTTP and forwarding everything over OTLP/gRPC to `forward_to`.
pub struct Rotel {
    child: Child,
    scratch: Scratch,
    pub grpc_port: u16,
    pub http_port: u16,
}

impl Rotel {
    pub fn start(forward_to: &str) -> Result<Rotel> {
        let bin = crate::otlp::venv().join("bin/rotel-agent");
        let scratch = Scratch::new("rotel")?;
        let (grpc_port, http_port) = (free_loopback_port(), free_loopback_port());
        let log = std::fs::File::create(scratch.0.join("log"))?;
        let child = Command::new(&bin)
            .arg("start")
            .args(["--otlp-grpc-endpoint", &format!("127.0.0.1:{grpc_port}")])
            .args(["--otlp-http-endpoint", &format!("127.0.0.1:{http_port}")])
            .args(["--exporter", "otlp", "--otlp-exporter-endpoint", forward_to, "--otlp-exporter-protocol", "grpc"])
            .args(["--batch-timeout", "200ms"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut r = Rotel { child, scratch, grpc_port, http_port };
        let deadline = Instant::now() + Duration::from_secs(30);
        for port in [grpc_port, http_port] {
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
            while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
                if let Ok(Some(status)) = r.child.try_wait() {
                    bail!("rotel-agent exited ({status}):\n{}", r.log());
                }
                if Instant::now() >= deadline {
                    bail!("rotel-agent not listening on {addr} after 30 s:\n{}", r.log());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(r)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.scratch.0.join("log")).unwrap_or_default()
    }
}

impl Drop for Rotel {
    fn drop(&mut self) {
        stop_child(&mut self.child);
    }
}
