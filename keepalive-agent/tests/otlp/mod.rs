//! Shared by the OTLP export tests: the OTLP receivers (tests/otlp/receiver.py and rotel from the
//! venv made by scripts/setup-otel.sh) and process guards.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use keepalive_agent::export::Protocol;

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn venv() -> Result<PathBuf> {
    let v = PathBuf::from(
        std::env::var("KEEPALIVE_OTEL_VENV").unwrap_or_else(|_| "/opt/keepalive/otel-venv".into()),
    );
    if !v.join("bin/python").exists() || !v.join("bin/rotel-agent").exists() {
        bail!(
            "OTLP receiver venv missing at {}: run scripts/setup-otel.sh",
            v.display()
        );
    }
    Ok(v)
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn scratch_dir(tag: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("keepalive-otlp-{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A child process stopped (SIGTERM, then SIGKILL) and its scratch directory removed on drop.
pub struct Proc {
    pub child: Child,
    pub dir: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                let _ = std::fs::remove_dir_all(&self.dir);
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// tests/otlp/receiver.py.
pub struct Receiver {
    _proc: Proc,
    out: PathBuf,
    pub grpc: u16,
    pub http: u16,
}

impl Receiver {
    pub fn start(grpc: u16, http: u16, extra: &[&str]) -> Result<Receiver> {
        let dir = scratch_dir("receiver");
        let out = dir.join("spans.jsonl");
        let ready = dir.join("ready.json");
        let child = Command::new(venv()?.join("bin/python"))
            .arg(repo().join("tests/otlp/receiver.py"))
            .args([
                "--out",
                out.to_str().unwrap(),
                "--ready-file",
                ready.to_str().unwrap(),
            ])
            .args([
                "--grpc",
                &format!("127.0.0.1:{grpc}"),
                "--http",
                &format!("127.0.0.1:{http}"),
            ])
            .args(extra)
            .stdout(Stdio::null())
            .spawn()
            .context("starting receiver.py")?;
        let mut proc = Proc { child, dir };
        let t = Instant::now();
        loop {
            if let Ok(text) = std::fs::read_to_string(&ready) {
                let ports: Value = serde_json::from_str(&text)?;
                return Ok(Receiver {
                    grpc: ports["grpc"].as_u64().unwrap() as u16,
                    http: ports["http"].as_u64().unwrap() as u16,
                    out,
                    _proc: proc,
                });
            }
            if let Some(status) = proc.child.try_wait()? {
                bail!("receiver.py exited early: {status}");
            }
            if t.elapsed() > Duration::from_secs(20) {
                bail!("receiver.py not ready after 20 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn lines(&self, kind: &str) -> Vec<Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["type"] == kind)
            .collect()
    }

    pub fn spans(&self) -> Vec<Value> {
        self.lines("span")
    }

    pub async fn wait_spans(&self, n: usize, timeout: Duration) -> Result<Vec<Value>> {
        let t = Instant::now();
        loop {
            let spans = self.spans();
            if spans.len() >= n {
                return Ok(spans);
            }
            if t.elapsed() > timeout {
                bail!(
                    "receiver has {} spans, expected {n}, after {timeout:?}",
                    spans.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn endpoint(&self, p: Protocol) -> String {
        match p {
            Protocol::Grpc => format!("http://127.0.0.1:{}", self.grpc),
            Protocol::HttpProtobuf => format!("http://127.0.0.1:{}", self.http),
        }
    }
}
