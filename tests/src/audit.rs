//! Helpers for the `audit` tests: run `keepalive-agent audit` once and read its JSON, `ss -tnoi`
//! in the test namespace for the same sockets, and a process in a container-named cgroup.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use serde_json::Value;

use crate::netns::NetNs;
use crate::tcp::fmt_addr;
use crate::{agent_binary, terminate};

/// What one `keepalive-agent audit` run printed.
#[derive(Debug)]
pub struct AuditRun {
    /// Exit status (`None`: killed by a signal).
    pub status: Option<i32>,
    /// stdout, as text.
    pub stdout: String,
    pub stderr: String,
}

impl AuditRun {
    /// The JSON objects of stdout (`--format json`), one per line.
    pub fn sockets(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}\nstderr:\n{}", self.stderr)))
            .collect()
    }
}

/// Runs `keepalive-agent audit ARGS` to the end.
pub fn run_audit(args: &[&str]) -> AuditRun {
    let out = Command::new(agent_binary())
        .arg("audit")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running keepalive-agent audit");
    AuditRun {
        status: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The object of the socket `local` -> `remote` among `sockets`.
pub fn find(sockets: &[Value], local: SocketAddr, remote: SocketAddr) -> Option<&Value> {
    let (l, r) = (fmt_addr(local), fmt_addr(remote));
    sockets.iter().find(|s| s["local"] == l.as_str() && s["remote"] == r.as_str())
}

/// The diagnosis ids of one socket object.
pub fn diagnosis_ids(socket: &Value) -> Vec<String> {
    socket["diagnoses"]
        .as_array()
        .map(|a| a.iter().filter_map(|d| d["id"].as_str().map(String::from)).collect())
        .unwrap_or_default()
}

/// A timer as `ss -o` prints it: `timer:(NAME,EXPIRES,COUNT)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SsTimer {
    /// `on` (retransmit), `keepalive`, `persist` (zero-window probe), `timewait`...
    pub name: String,
    /// Expiry, ms from when ss ran.
    pub expires_ms: u64,
    /// How precisely ss printed the expiry (it drops ms above 10 s and seconds above 10 min).
    pub resolution_ms: u64,
    /// Retransmissions (`on`) or probes out (`keepalive`, `persist`).
    pub count: u32,
}

/// One socket of `ss -tnoi`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SsSocket {
    pub state: String,
    pub local: String,
    pub remote: String,
    pub timer: Option<SsTimer>,
    pub lastsnd_ms: Option<u64>,
    pub lastrcv_ms: Option<u64>,
    pub lastack_ms: Option<u64>,
}

/// `ss -tnoi` inside `ns`.
pub fn ss_sockets(ns: &NetNs) -> Result<Vec<SsSocket>> {
    Ok(parse_ss(&ns.exec(&["ss", "-tnoi"])?))
}

/// Parses `ss -tnoi` output: a socket line, then an indented line of TCP info.
pub fn parse_ss(text: &str) -> Vec<SsSocket> {
    let mut out: Vec<SsSocket> = Vec::new();
    for line in text.lines().skip(1) {
        if line.starts_with(char::is_whitespace) {
            if let Some(s) = out.last_mut() {
                let field = |key: &str| {
                    line.split_whitespace().find_map(|w| w.strip_prefix(key)).and_then(|v| v.parse().ok())
                };
                s.lastsnd_ms = field("lastsnd:");
                s.lastrcv_ms = field("lastrcv:");
                s.lastack_ms = field("lastack:");
            }
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.len() < 5 {
            continue;
        }
        let timer = words.iter().find_map(|w| w.strip_prefix("timer:(")).and_then(parse_ss_timer);
        out.push(SsSocket {
            state: words[0].to_string(),
            local: words[3].to_string(),
            remote: words[4].to_string(),
            timer,
            lastsnd_ms: None,
            lastrcv_ms: None,
            lastack_ms: None,
        });
    }
    out
}

/// `NAME,EXPIRES,COUNT)` of `timer:(...)`.
fn parse_ss_timer(s: &str) -> Option<SsTimer> {
    let mut parts = s.trim_end_matches(')').split(',');
    let name = parts.next()?.to_string();
    let (expires_ms, resolution_ms) = parse_ss_duration(parts.next()?)?;
    let count = parts.next()?.parse().ok()?;
    Some(SsTimer { name, expires_ms, resolution_ms, count })
}

/// iproute2's `print_ms_timer`: `[Mmin][S(.|sec)][MMMms]`, milliseconds dropped above 9 s and
/// seconds above 9 minutes. Returns the value and its resolution, in ms.
pub fn parse_ss_duration(s: &str) -> Option<(u64, u64)> {
    let mut rest = s;
    let (mut ms, mut res) = (0u64, 1u64);
    let number = |r: &str| -> (u64, usize) {
        let n = r.bytes().take_while(u8::is_ascii_digit).count();
        (r[..n].parse().unwrap_or(0), n)
    };
    let (v, n) = number(rest);
    if rest[n..].starts_with("min") {
        ms += v * 60_000;
        res = if v > 9 { 60_000 } else { 1000 };
        rest = &rest[n + 3..];
    }
    let (v, n) = number(rest);
    if rest[n..].starts_with("sec") {
        ms += v * 1000;
        res = res.max(if v > 9 { 1000 } else { 1 });
        rest = &rest[n + 3..];
    } else if rest[n..].starts_with('.') {
        ms += v * 1000;
        rest = &rest[n + 1..];
    }
    let (v, n) = number(rest);
    if rest[n..].starts_with("ms") {
        ms += v;
        rest = &rest[n + 2..];
    }
    rest.is_empty().then_some((ms, res))
}

/// A cgroup named like a Docker container's (`docker-<64 hex>.scope`) under `parent` (the test's
/// own cgroup), holding one child process the test started. Drop stops the child and removes the
/// directory.
pub struct ContainerCgroup {
    pub path: PathBuf,
    pub id: String,
    child: Option<Child>,
}

impl ContainerCgroup {
    /// Creates `parent/docker-<id>.scope` with `id` derived from the test's pid.
    pub fn new(parent: &Path) -> Result<ContainerCgroup> {
        let id = format!("{:0>64x}", (u64::from(std::process::id()) << 20) | 0xc0ffee);
        let path = parent.join(format!("docker-{id}.scope"));
        std::fs::create_dir(&path).with_context(|| format!("mkdir {}", path.display()))?;
        Ok(ContainerCgroup { path, id, child: None })
    }

    /// Starts, inside `ns`, a shell that connects to `addr` (fd 3, bash's `/dev/tcp`) and then
    /// becomes `sleep` holding the connection; moves it into this cgroup. Returns its pid.
    pub fn spawn_holder(&mut self, ns: &NetNs, addr: SocketAddr) -> Result<u32> {
        let script = format!("exec 3<>/dev/tcp/{}/{} && exec sleep 120", addr.ip(), addr.port());
        let child = Command::new("ip")
            .args(["netns", "exec", ns.name(), "bash", "-c", &script])
            .stdin(Stdio::null())
            .spawn()
            .context("spawning the connection holder")?;
        let pid = child.id();
        self.child = Some(child);
        std::fs::write(self.path.join("cgroup.procs"), pid.to_string())
            .with_context(|| format!("moving {pid} into {}", self.path.display()))?;
        Ok(pid)
    }
}

impl Drop for ContainerCgroup {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            terminate(&mut c, Duration::from_secs(2));
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while let Err(e) = std::fs::remove_dir(&self.path) {
            if e.kind() == std::io::ErrorKind::NotFound {
                return;
            }
            if Instant::now() > deadline {
                eprintln!("harness: rmdir {}: {e}", self.path.display());
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Waits until `f` holds, polling every 50 ms, at most `timeout`.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !f() {
        if Instant::now() > deadline {
            bail!("condition not met within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ss_durations() {
        assert_eq!(parse_ss_duration("1.784ms"), Some((1784, 1)));
        assert_eq!(parse_ss_duration("784ms"), Some((784, 1)));
        assert_eq!(parse_ss_duration("2sec"), Some((2000, 1)));
        assert_eq!(parse_ss_duration("12sec"), Some((12_000, 1000)));
        assert_eq!(parse_ss_duration("1min5sec"), Some((65_000, 1000)));
        assert_eq!(parse_ss_duration("119min"), Some((119 * 60_000, 60_000)));
        assert_eq!(parse_ss_duration("x"), None);
    }

    #[test]
    fn ss_lines() {
        let text = "State Recv-Q Send-Q Local Address:Port  Peer Address:Port Process\n\
ESTAB 0      0          127.0.0.1:43666    127.0.0.1:36825 timer:(keepalive,1.784ms,0)\n\
\t ts sack rto:204 lastsnd:1216 lastrcv:1215 lastack:1214 pacing_rate 1bps\n";
        let s = parse_ss(text);
        assert_eq!(s.len(), 1);
        assert_eq!((s[0].local.as_str(), s[0].remote.as_str()), ("127.0.0.1:43666", "127.0.0.1:36825"));
        assert_eq!(s[0].timer, Some(SsTimer { name: "keepalive".into(), expires_ms: 1784, resolution_ms: 1, count: 0 }));
        assert_eq!((s[0].lastsnd_ms, s[0].lastrcv_ms, s[0].lastack_ms), (Some(1216), Some(1215), Some(1214)));
    }
}
