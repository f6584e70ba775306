//! Running the real agent (`trace --format json`, or `run`) for a benchmark, reading what it says.

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use log::{debug, info, warn};

/// Builds the release agent (with its eBPF object) and returns its path.
pub fn build_release(workspace: &Path) -> Result<PathBuf> {
    info!("building keepalive-agent (release)");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(workspace)
        .args(["build", "--release", "-p", "keepalive-agent", "--bin", "keepalive-agent"])
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("cargo build --release -p keepalive-agent failed ({status})");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(|d| workspace.join(d))
        .unwrap_or_else(|| workspace.join("target"));
    let bin = target.join("release/keepalive-agent");
    if !bin.is_file() {
        bail!("{} was not built", bin.display());
    }
    Ok(bin)
}

/// Which of the agent's streaming commands a benchmark runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AgentCommand {
    /// `trace --format json --color never`: one JSON line per record.
    #[default]
    Trace,
    /// `run` with no endpoint: spans (default policy) as JSON lines on stdout.
    Run,
}

/// How to start the agent.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub binary: PathBuf,
    pub command: AgentCommand,
    /// `--netns`: only this namespace's connections (None: the whole host).
    pub netns: Option<PathBuf>,
    pub cgroup: PathBuf,
    pub max_connections: usize,
    pub ringbuf_size: Option<u32>,
    /// Extra environment for the agent process.
    pub env: Vec<(String, String)>,
    /// Extra arguments (e.g. `--attach raw-tracepoint`).
    pub extra_args: Vec<String>,
    /// Write the agent's stdout to this file (created, truncated) instead of counting its records
    /// through a pipe; [`Agent::counts`] then stays empty (see [`count_file`]).
    pub stdout_file: Option<PathBuf>,
}

/// Counts of the records the agent printed, by `event` name.
pub type Counts = BTreeMap<String, u64>;

/// A running agent; SIGINT then SIGKILL on drop.
pub struct Agent {
    child: Child,
    pub pid: u32,
    counts: Arc<Mutex<Counts>>,
    stderr_lines: Arc<Mutex<Vec<String>>>,
    readers: Vec<JoinHandle<()>>,
}

/// What the agent said when it stopped.
#[derive(Debug, Clone, Default)]
pub struct StopReport {
    /// Kernel events it handled (`stopped: N kernel events`).
    pub kernel_events: u64,
    pub records: u64,
    /// Lost ring-buffer events (`N lost`).
    pub lost: u64,
    pub decode_errors: u64,
    /// Warning lines mentioning lost events.
    pub lost_warnings: Vec<String>,
    pub stopped_line: String,
    /// Peak RSS (VmHWM) just before it stopped, KiB.
    pub vm_hwm_kib: u64,
}

impl Agent {
    pub fn start(cfg: &AgentConfig) -> Result<Agent> {
        let mut cmd = Command::new(&cfg.binary);
        match cfg.command {
            AgentCommand::Trace => cmd.args(["trace", "--format", "json", "--color", "never"]),
            AgentCommand::Run => cmd.arg("run"),
        };
        if let Some(ns) = &cfg.netns {
            cmd.arg("--netns").arg(ns);
        }
        cmd.arg("--cgroup")
            .arg(&cfg.cgroup)
            .arg("--max-connections")
            .arg(cfg.max_connections.to_string());
        cmd.args(&cfg.extra_args);
        if let Some(rb) = cfg.ringbuf_size {
            cmd.arg("--ringbuf-size").arg(rb.to_string());
        }
        cmd.envs(cfg.env.iter().map(|(k, v)| (k, v)));
        let stdout = match &cfg.stdout_file {
            Some(p) => Stdio::from(std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?),
            None => Stdio::piped(),
        };
        cmd.stdin(Stdio::null()).stdout(stdout).stderr(Stdio::piped());
        debug!("starting {cmd:?}");
        let mut child = cmd.spawn().with_context(|| format!("starting {}", cfg.binary.display()))?;
        let pid = child.id();
        let stdout = child.stdout.take();
        let stderr = child.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
        let counts = Arc::new(Mutex::new(Counts::new()));
        let stderr_lines = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = mpsc::channel::<()>();
        let mut readers = Vec::new();
        if let Some(stdout) = stdout {
            let counts = counts.clone();
            readers.push(std::thread::spawn(move || {
                count_events(stdout, &counts);
            }));
        }
        {
            let lines = stderr_lines.clone();
            readers.push(std::thread::spawn(move || {
                let mut ready_tx = Some(ready_tx);
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if line.starts_with("ready") {
                        if let Some(tx) = ready_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    if line.contains("lost") || line.contains("WARN") || line.contains("ERROR") {
                        debug!("agent: {line}");
                    }
                    lines.lock().expect("lock").push(line);
                }
            }));
        }
        let mut agent = Agent { child, pid, counts, stderr_lines, readers };
        match ready_rx.recv_timeout(Duration::from_secs(60)) {
            Ok(()) => Ok(agent),
            Err(_) => {
                let _ = agent.child.kill();
                let _ = agent.child.wait();
                let said = agent.stderr_lines.lock().expect("lock").join("\n");
                bail!("the agent did not become ready within 60 s:\n{said}")
            }
        }
    }

    /// Records printed so far, by event name.
    pub fn counts(&self) -> Counts {
        self.counts.lock().expect("lock").clone()
    }

    /// Stops the agent (SIGINT) and parses its final report.
    pub fn stop(mut self) -> Result<StopReport> {
        let vm_hwm_kib = super::sys::process_mem(self.pid).map(|m| m.vm_hwm).unwrap_or(0);
        // SAFETY: signalling our own child, which has not been reaped yet.
        unsafe { libc::kill(self.pid as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.child.try_wait()?.is_some() {
                break;
            }
            if Instant::now() > deadline {
                warn!("agent {} did not stop on SIGINT; killing it", self.pid);
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        let lines = self.stderr_lines.lock().expect("lock").clone();
        let mut rep = StopReport { vm_hwm_kib, ..Default::default() };
        for l in &lines {
            if l.contains("lost") && !l.contains(" 0 lost") {
                rep.lost_warnings.push(l.clone());
            }
            if let Some(i) = l.find("stopped:") {
                let s = &l[i..];
                rep.stopped_line = s.to_string();
                rep.kernel_events = number_before(s, " kernel events").unwrap_or(0);
                rep.records = number_before(s, " records").unwrap_or(0);
                rep.lost = number_before(s, " lost").unwrap_or(0);
                rep.decode_errors = number_before(s, " decode errors").unwrap_or(0);
            }
        }
        if rep.stopped_line.is_empty() {
            bail!("the agent did not print its final report; stderr:\n{}", lines.join("\n"));
        }
        Ok(rep)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: our own unreaped child.
            unsafe { libc::kill(self.pid as i32, libc::SIGINT) };
            super::sys::wait_or_kill(&mut self.child, Duration::from_secs(10));
        }
    }
}

/// The integer just before `suffix` in `s` (`"12 kernel events"` → 12).
fn number_before(s: &str, suffix: &str) -> Option<u64> {
    let end = s.find(suffix)?;
    let head = &s[..end];
    let start = head.rfind(|c: char| !c.is_ascii_digit()).map_or(0, |i| i + 1);
    head[start..].parse().ok()
}

/// A process's CPU time (user + system) and its BPF programs' counters at one moment.
#[derive(Debug, Clone)]
pub struct Usage {
    pub at: Instant,
    /// From `/proc/<pid>/stat` (clock ticks).
    pub cpu_s: f64,
    /// From the threads' `schedstat` (nanoseconds).
    pub cpu_precise_s: f64,
    pub progs: Vec<super::bpf::ProgSample>,
}

/// What a process and its BPF programs used between two [`Usage`] samples.
#[derive(Debug, Clone)]
pub struct UsageDelta {
    pub secs: f64,
    pub cpu_s: f64,
    pub progs: Vec<super::bpf::ProgDelta>,
}

impl Usage {
    /// Samples process `pid` (`/proc/<pid>/stat`, and its programs through its own fds).
    pub fn sample(pid: u32) -> Result<Usage> {
        Ok(Usage {
            at: Instant::now(),
            cpu_s: super::sys::process_cpu_s(pid)?,
            cpu_precise_s: super::sys::process_cpu_precise_s(pid)?,
            progs: super::bpf::process_bpf(pid)?.progs,
        })
    }

    /// The nanosecond figure, unless threads that exited in between make it fall short of the
    /// clock-tick one by more than two ticks.
    pub fn since(&self, earlier: &Usage) -> UsageDelta {
        let ticks = self.cpu_s - earlier.cpu_s;
        let precise = self.cpu_precise_s - earlier.cpu_precise_s;
        UsageDelta {
            secs: self.at.duration_since(earlier.at).as_secs_f64(),
            cpu_s: if ticks - precise > 2.0 / super::sys::clk_tck() { ticks } else { precise },
            progs: super::bpf::deltas(&earlier.progs, &self.progs),
        }
    }
}

impl UsageDelta {
    /// Run time of all the programs, ns.
    pub fn bpf_ns(&self) -> u64 {
        self.progs.iter().map(|p| p.run_time_ns).sum()
    }
}

/// Records by event name, and lines, in bytes `from..to` of a file the agent writes its output
/// to (a line cut at either end may be miscounted by one).
pub fn count_file(path: &Path, from: u64, to: u64) -> Result<(Counts, u64)> {
    use std::io::{Seek as _, SeekFrom};
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    f.seek(SeekFrom::Start(from)).with_context(|| format!("seeking in {}", path.display()))?;
    let counts = Mutex::new(Counts::new());
    let lines = count_events(std::io::Read::take(f, to.saturating_sub(from)), &counts);
    Ok((counts.into_inner().expect("lock"), lines))
}

/// Current size of a file, 0 if it does not exist yet.
pub fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// Counts JSON lines by their `"event":"NAME"` field, reading in large chunks (the agent may print
/// tens of thousands of lines a second; the reader must never be what slows it down).
/// Returns the number of complete lines read.
fn count_events(mut r: impl std::io::Read, counts: &Mutex<Counts>) -> u64 {
    const KEY: &[u8] = b"\"event\":\"";
    let mut buf = vec![0u8; 1 << 20];
    let mut carry: Vec<u8> = Vec::new();
    let mut local: BTreeMap<Vec<u8>, u64> = BTreeMap::new();
    let mut lines = 0;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        carry.extend_from_slice(&buf[..n]);
        let last_nl = match carry.iter().rposition(|&b| b == b'\n') {
            Some(i) => i,
            None => continue,
        };
        for line in carry[..last_nl].split(|&b| b == b'\n') {
            lines += 1;
            if let Some(p) = find(line, KEY) {
                let rest = &line[p + KEY.len()..];
                let end = rest.iter().position(|&b| b == b'"').unwrap_or(rest.len());
                *local.entry(rest[..end].to_vec()).or_default() += 1;
            }
        }
        carry.drain(..=last_nl);
        let mut c = counts.lock().expect("lock");
        for (k, v) in std::mem::take(&mut local) {
            *c.entry(String::from_utf8_lossy(&k).into_owned()).or_default() += v;
        }
    }
    lines
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_stopped_line() {
        let s = "stopped: 1234 kernel events, 99 records, 7 lost, 0 decode errors; 3 connections";
        assert_eq!(number_before(s, " kernel events"), Some(1234));
        assert_eq!(number_before(s, " records"), Some(99));
        assert_eq!(number_before(s, " lost"), Some(7));
        assert_eq!(number_before(s, " decode errors"), Some(0));
        assert_eq!(number_before(s, " nothing"), None);
    }

    #[test]
    fn counts_a_range_of_a_file() {
        let path = std::env::temp_dir().join(format!("ka-bench-count-{}.jsonl", std::process::id()));
        let text = "{\"event\":\"probe\"}\n{\"event\":\"ack\"}\n{\"event\":\"probe\"}\n";
        std::fs::write(&path, text).unwrap();
        let second = text.find('\n').unwrap() as u64 + 1;
        let (c, lines) = count_file(&path, second, file_len(&path)).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(lines, 2);
        assert_eq!(c.get("probe"), Some(&1));
        assert_eq!(c.get("ack"), Some(&1));
    }

    #[test]
    fn counts_events_across_chunks() {
        let text = b"{\"conn\":1,\"event\":\"probe\",\"x\":1}\n{\"event\":\"ack\"}\n{\"event\":\"probe\"}\nnot json\n";
        // A reader that returns 5 bytes at a time splits lines across reads.
        struct Slow<'a>(&'a [u8]);
        impl std::io::Read for Slow<'_> {
            fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
                let n = self.0.len().min(5).min(b.len());
                b[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let c = Mutex::new(Counts::new());
        assert_eq!(count_events(Slow(text), &c), 4);
        let c = c.into_inner().unwrap();
        assert_eq!(c.get("probe"), Some(&2));
        assert_eq!(c.get("ack"), Some(&1));
        assert_eq!(c.len(), 2);
    }
}
