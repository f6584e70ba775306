//! Building, running and reading the real `keepalive-agent`.
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use serde_json::Value;

use crate::events;
use crate::Env;

/// How long the agent may take to attach everything and print `ready`, unless
/// `KEEPALIVE_TEST_READY_TIMEOUT` (seconds) says otherwise: emulated kernels (QEMU without KVM, see
/// `cargo xtask vm-test`) take several seconds per fentry program to load and attach.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// [`READY_TIMEOUT`], or `KEEPALIVE_TEST_READY_TIMEOUT` seconds when that is set (a malformed value
/// is an error, not a silent default).
pub fn ready_timeout() -> Duration {
    match std::env::var("KEEPALIVE_TEST_READY_TIMEOUT") {
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(s) if s > 0 => Duration::from_secs(s),
            _ => panic!("KEEPALIVE_TEST_READY_TIMEOUT={v:?} is not a positive number of seconds"),
        },
        Err(_) => READY_TIMEOUT,
    }
}
/// How much longer [`AgentProcess::wait_for`] looks, after giving up, for the object it waited for
/// (the wait still fails): whether it comes late tells a slow agent from a blind one.
const LATE_LOOK: Duration = Duration::from_secs(10);

/// How long the agent may take to exit after SIGINT.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// The agent binary, built once per test process with the test binary's profile
/// (`cargo build -p keepalive-agent --bin keepalive-agent`). `KEEPALIVE_AGENT_BIN` names a prebuilt
/// binary instead (e.g. inside a VM image); then nothing is built.
pub fn agent_binary() -> &'static Path {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match BIN.get_or_init(|| build_agent().map_err(|e| format!("{e:#}"))) {
        Ok(p) => p,
        Err(e) => panic!("cannot get the keepalive-agent binary: {e}"),
    }
}

fn build_agent() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("KEEPALIVE_AGENT_BIN") {
        let bin = PathBuf::from(bin);
        if !bin.is_file() {
            bail!("KEEPALIVE_AGENT_BIN={} is not a file", bin.display());
        }
        return Ok(bin);
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow!("no workspace root"))?;
    // The test binary lives in <target>/<profile>/deps/.
    let exe = std::env::current_exe().context("current_exe")?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| anyhow!("unexpected test binary location {}", exe.display()))?;
    let profile = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| anyhow!("no profile directory above {}", exe.display()))?
        .to_string();
    let target_dir = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => workspace.join(d),
        None => workspace.join("target"),
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace)
        .args(["build", "-p", "keepalive-agent", "--bin", "keepalive-agent"]);
    match profile.as_str() {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    cmd.arg("--target-dir").arg(&target_dir);
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let bin = target_dir.join(&profile).join("keepalive-agent");
    if !bin.is_file() {
        bail!("{cmd:?} succeeded but {} does not exist", bin.display());
    }
    Ok(bin)
}

/// What the agent writes on stdout, and how the guard checks it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stdout {
    /// `trace --format json`: one event object per line, with a string `event` and an RFC 3339
    /// `ts`.
    TraceEvents,
    /// `run`: with no OTLP endpoint, one span object per line (string `trace_id`, `span_id` and
    /// `name`, RFC 3339 `start` and `end`); when exporting over OTLP, nothing at all.
    Spans,
}

impl Stdout {
    /// Whether one parsed stdout line is what this format promises (checked as lines arrive).
    fn accepts(self, v: &Value) -> bool {
        match self {
            Stdout::TraceEvents => v.is_object() && v.get("event").is_some_and(Value::is_string),
            Stdout::Spans => {
                v.is_object()
                    && ["trace_id", "span_id", "name"]
                        .iter()
                        .all(|k| v.get(*k).is_some_and(Value::is_string))
            }
        }
    }

    /// Checks done once the agent exited: every timestamp parses.
    fn check_final(self, v: &Value) -> Result<()> {
        let keys: &[&str] = match self {
            Stdout::TraceEvents => &["ts"],
            Stdout::Spans => &["start", "end"],
        };
        for k in keys {
            match events::str_of(v, k) {
                Some(t) if events::parse_rfc3339(t).is_some() => {}
                _ => bail!("stdout object without an RFC 3339 `{k}`: {v}"),
            }
        }
        Ok(())
    }
}

#[derive(Default)]
struct Collected {
    /// stdout objects accepted by the [`Stdout`] format (events for `trace`, spans for `run`).
    events: Vec<Value>,
    /// stdout lines the format does not accept.
    bad_lines: Vec<String>,
    stdout_closed: bool,
}

struct Shared {
    out: Mutex<Collected>,
    cv: Condvar,
    stderr: Mutex<Vec<String>>,
}

/// A running agent process. Kill-on-drop; [`AgentProcess::stop`] for an orderly SIGINT stop.
pub struct AgentProcess {
    child: Child,
    format: Stdout,
    shared: Arc<Shared>,
    readers: Vec<JoinHandle<()>>,
    stopped: bool,
}

/// The agent started for a test [`Env`]: always `--netns` of the test namespace and `--cgroup` of
/// the test cgroup. Borrowing the Env makes sure the agent is gone before the cgroup is removed.
pub struct Agent<'env> {
    pub process: AgentProcess,
    _env: &'env Env,
}

/// The attach method the tests force (`--attach`), from `KEEPALIVE_TEST_ATTACH`
/// (`fentry`, `kprobe`, `tracepoint`, `raw-tracepoint`); unset: the agent's own choice.
pub fn forced_attach() -> Option<String> {
    std::env::var("KEEPALIVE_TEST_ATTACH").ok().filter(|v| !v.is_empty() && v != "auto")
}

/// With a forced method, fails unless the agent reached the keep-alive timer with it (a silent
/// fallback to another method must not pass as a run of the forced one).
pub fn assert_forced_attach(stderr: &[String]) {
    let Some(method) = forced_attach() else { return };
    let want = match method.as_str() {
        "raw-tracepoint" => "hook keepalive_timer: tracepoint via raw_tp/".to_string(),
        m => format!("hook keepalive_timer: {m} via"),
    };
    assert!(
        stderr.iter().any(|l| l.contains(&want)),
        "KEEPALIVE_TEST_ATTACH={method}, but the agent did not reach keepalive_timer with it:\n{}",
        stderr.join("\n")
    );
}

/// The subcommand's arguments every test agent gets: the test's namespace and cgroup, the forced
/// attach method if any (see [`forced_attach`]), then `extra`.
fn scope(cmd: &mut Command, env: &Env, extra: &[&str]) {
    cmd.arg("--netns").arg(env.ns.path()).arg("--cgroup").arg(env.cgroup.path());
    if let Some(method) = forced_attach() {
        cmd.args(["--attach", &method]);
    }
    cmd.args(extra);
}

impl<'env> Agent<'env> {
    /// `keepalive-agent trace --format json --netns NS --cgroup CG [--attach M] <extra>`, waits for
    /// `ready`. `--attach` comes from `KEEPALIVE_TEST_ATTACH` (see [`forced_attach`]).
    pub fn start(env: &'env Env, extra: &[&str]) -> Agent<'env> {
        let mut cmd = Command::new(agent_binary());
        cmd.args(["trace", "--format", "json"]);
        scope(&mut cmd, env, extra);
        let process = AgentProcess::spawn(cmd, ready_timeout()).unwrap_or_else(|e| panic!("{e:#}"));
        assert_forced_attach(&process.stderr_lines());
        Agent { process, _env: env }
    }

    /// [`Agent::start`] with the agent binary `bin` executed by `wrapper` (a command that ends by
    /// executing its arguments, such as `setpriv ...`): `wrapper... BIN trace --format json ...`.
    /// Panics with the agent's stderr when it does not get ready.
    pub fn start_wrapped(env: &'env Env, wrapper: &[&str], bin: &Path, extra: &[&str]) -> Agent<'env> {
        let mut cmd = Command::new(wrapper[0]);
        cmd.args(&wrapper[1..]).arg(bin).args(["trace", "--format", "json"]);
        scope(&mut cmd, env, extra);
        let process = AgentProcess::spawn(cmd, ready_timeout()).unwrap_or_else(|e| panic!("{e:#}"));
        assert_forced_attach(&process.stderr_lines());
        Agent { process, _env: env }
    }

    /// `keepalive-agent --log-level info run --netns NS --cgroup CG [--attach M] <extra>`, with
    /// `envs` added to an environment cleared of every `OTEL_*` variable and of `RUST_LOG` (so that
    /// a developer's settings cannot change what a test checks); waits for `ready`. The level is
    /// `KEEPALIVE_TEST_LOG_LEVEL` when set (a filter such as `info,keepalive_agent::runtime=trace`
    /// logs every kernel event, to chase a failure). Stdout is read
    /// as [`Stdout::Spans`]: [`Agent::events`] and [`Agent::stop`] return the span objects printed
    /// in JSON-lines mode (none when exporting over OTLP).
    pub fn start_run(env: &'env Env, extra: &[&str], envs: &[(&str, &str)]) -> Agent<'env> {
        let mut cmd = Command::new(agent_binary());
        for (k, _) in std::env::vars_os() {
            if k.to_str()
                .is_some_and(|k| k.starts_with("OTEL_") || k == "RUST_LOG")
            {
                cmd.env_remove(k);
            }
        }
        let level = std::env::var("KEEPALIVE_TEST_LOG_LEVEL").unwrap_or_else(|_| "info".to_owned());
        cmd.envs(envs.iter().copied()).args(["--log-level", &level, "run"]);
        scope(&mut cmd, env, extra);
        let process = AgentProcess::spawn_with(cmd, ready_timeout(), Stdout::Spans)
            .unwrap_or_else(|e| panic!("{e:#}"));
        assert_forced_attach(&process.stderr_lines());
        Agent { process, _env: env }
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// See [`AgentProcess::wait_for`].
    pub fn wait_for(&self, timeout: Duration, pred: impl FnMut(&Value) -> bool) -> Option<Value> {
        self.process.wait_for(timeout, pred)
    }

    /// The tracepoints the agent has BPF links on now (`tp_name` of its raw tracepoint links, from
    /// its own `/proc/<pid>/fdinfo`).
    pub fn linked_tracepoints(&self) -> Vec<String> {
        let pid = self.pid();
        let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return Vec::new() };
        let mut tps = Vec::new();
        for entry in dir.flatten() {
            let is_link = std::fs::read_link(entry.path()).is_ok_and(|t| t.to_string_lossy() == "anon_inode:bpf_link");
            if !is_link {
                continue;
            }
            let info = format!("/proc/{pid}/fdinfo/{}", entry.file_name().to_string_lossy());
            let Ok(text) = std::fs::read_to_string(info) else { continue };
            if let Some(tp) = text.lines().find_map(|l| l.strip_prefix("tp_name:")) {
                tps.push(tp.trim().to_string());
            }
        }
        tps.sort();
        tps
    }

    /// Waits until `pred` holds for [`Agent::linked_tracepoints`]; false on timeout.
    pub fn wait_links(&self, timeout: Duration, mut pred: impl FnMut(&[String]) -> bool) -> bool {
        let end = Instant::now() + timeout;
        loop {
            if pred(&self.linked_tracepoints()) {
                return true;
            }
            if Instant::now() >= end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// See [`AgentProcess::wait_until`].
    pub fn wait_until(&self, timeout: Duration, f: impl FnMut(&[Value]) -> bool) -> bool {
        self.process.wait_until(timeout, f)
    }

    pub fn events(&self) -> Vec<Value> {
        self.process.events()
    }

    pub fn stderr_lines(&self) -> Vec<String> {
        self.process.stderr_lines()
    }

    /// SIGINT, exit status 0, all stdout well formed; returns every event.
    pub fn stop(self) -> Vec<Value> {
        self.stop_full().0
    }

    /// Like [`Agent::stop`], also returning every stderr line (including what the agent logged
    /// while stopping).
    pub fn stop_full(self) -> (Vec<Value>, Vec<String>) {
        self.stop_full_with(libc::SIGINT)
    }

    /// Like [`Agent::stop_full`], stopping with `signal` (SIGINT or SIGTERM) instead of SIGINT.
    pub fn stop_full_with(self, signal: libc::c_int) -> (Vec<Value>, Vec<String>) {
        let shared = self.process.shared.clone();
        let events = self
            .process
            .stop_with(signal)
            .unwrap_or_else(|e| panic!("{e:#}"));
        let stderr = shared.stderr.lock().unwrap().clone();
        (events, stderr)
    }
}

/// Stderr lines reporting events certainly lost: a full ring buffer (or the kprobe path's in-flight
/// map), live or in the final summary. Skipped program runs (the kernel did not run a program that
/// was already running on the CPU) are reported by the agent as possible losses: they are an upper
/// bound that mostly concerns other sockets of the host, and a test checks its own connections'
/// records instead; [`skipped_run_reports`] lists them.
pub fn lost_event_reports(lines: &[String]) -> Vec<&String> {
    lines
        .iter()
        .filter(|line| {
            let lower = line.to_ascii_lowercase();
            if lower.contains("kernel program runs") {
                return false; // a live skipped-run report
            }
            if lower.contains("in total:") {
                return lower.contains("ringbuf_full:") || lower.contains("inflight_map:") || lower.contains("unpaired_timer_run:");
            }
            if let Some(i) = lower.find(" ring buffer full") {
                return lower[..i].split_whitespace().next_back().is_some_and(|n| n.trim_start_matches('(') != "0");
            }
            lower
                .match_indices("lost")
                .any(|(i, _)| lower[..i].split_whitespace().next_back() != Some("0"))
        })
        .collect()
}

/// Stderr lines reporting program runs the kernel skipped (possible losses).
pub fn skipped_run_reports(lines: &[String]) -> Vec<&String> {
    lines.iter().filter(|l| l.contains("kernel program runs")).collect()
}

impl AgentProcess {
    /// Spawns `cmd` (stdout and stderr piped) and waits up to `ready_timeout` for a stderr line
    /// starting with `ready`. Stderr is forwarded to the test's stderr, prefixed with `[agent]`.
    /// Stdout is read as [`Stdout::TraceEvents`].
    pub fn spawn(cmd: Command, ready_timeout: Duration) -> Result<AgentProcess> {
        Self::spawn_with(cmd, ready_timeout, Stdout::TraceEvents)
    }

    /// [`AgentProcess::spawn`] with stdout read as `format`.
    pub fn spawn_with(
        mut cmd: Command,
        ready_timeout: Duration,
        format: Stdout,
    ) -> Result<AgentProcess> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let shared = Arc::new(Shared {
            out: Mutex::new(Collected::default()),
            cv: Condvar::new(),
            stderr: Mutex::new(Vec::new()),
        });
        let (ready_tx, ready_rx) = mpsc::channel::<()>();

        let sh = shared.clone();
        let err_reader = std::thread::Builder::new()
            .name("ka-agent-err".into())
            .spawn(move || {
                let mut ready_tx = Some(ready_tx);
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    eprintln!("[agent] {line}");
                    if line.starts_with("ready") {
                        if let Some(tx) = ready_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    sh.stderr.lock().unwrap().push(line);
                }
            })?;

        let sh = shared.clone();
        let out_reader = std::thread::Builder::new()
            .name("ka-agent-out".into())
            .spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    let mut out = sh.out.lock().unwrap();
                    match serde_json::from_str::<Value>(&line) {
                        Ok(v) if format.accepts(&v) => out.events.push(v),
                        _ => out.bad_lines.push(line),
                    }
                    drop(out);
                    sh.cv.notify_all();
                }
                sh.out.lock().unwrap().stdout_closed = true;
                sh.cv.notify_all();
            })?;

        let mut agent = AgentProcess {
            child,
            format,
            shared,
            readers: vec![err_reader, out_reader],
            stopped: false,
        };
        let deadline = Instant::now() + ready_timeout;
        loop {
            match ready_rx.recv_timeout(Duration::from_millis(100)) {
                Ok(()) => return Ok(agent),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    // stderr closed without `ready`: the agent exited (or closed stderr).
                    let status = agent.wait_exit(Duration::from_secs(5));
                    bail!(
                        "agent never printed `ready` (exit: {status:?}); stderr:\n{}",
                        agent.stderr_text()
                    );
                }
            }
            if let Ok(Some(status)) = agent.child.try_wait() {
                // Give the reader a moment to drain what the agent wrote before exiting.
                std::thread::sleep(Duration::from_millis(200));
                if ready_rx.try_recv().is_ok() {
                    bail!(
                        "agent printed `ready` but exited ({status}); stderr:\n{}",
                        agent.stderr_text()
                    );
                }
                bail!(
                    "agent exited ({status}) before `ready`; stderr:\n{}",
                    agent.stderr_text()
                );
            }
            if Instant::now() >= deadline {
                agent.kill();
                bail!(
                    "agent not ready within {ready_timeout:?}; stderr:\n{}",
                    agent.stderr_text()
                );
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn events(&self) -> Vec<Value> {
        self.shared.out.lock().unwrap().events.clone()
    }

    pub fn stderr_lines(&self) -> Vec<String> {
        self.shared.stderr.lock().unwrap().clone()
    }

    fn stderr_text(&self) -> String {
        self.stderr_lines().join("\n")
    }

    /// Waits until `f` (called with every event so far, each time new ones arrive) returns true.
    /// Returns false on timeout or when the agent's stdout closed without `f` being satisfied.
    pub fn wait_until(&self, timeout: Duration, f: impl FnMut(&[Value]) -> bool) -> bool {
        self.wait_until_reporting(timeout, f, true)
    }

    /// [`AgentProcess::wait_until`]; with `report`, a wait that gives up prints the agent's state
    /// ([`AgentProcess::state_report`]) on stderr.
    fn wait_until_reporting(&self, timeout: Duration, mut f: impl FnMut(&[Value]) -> bool, report: bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut out = self.shared.out.lock().unwrap();
        let mut seen = usize::MAX;
        loop {
            if out.events.len() != seen {
                seen = out.events.len();
                if f(&out.events) {
                    return true;
                }
            }
            let now = Instant::now();
            if out.stdout_closed || now >= deadline {
                let (closed, n) = (out.stdout_closed, out.events.len());
                drop(out);
                if report {
                    // What a failing test needs to tell a stuck agent from a blind or dead one.
                    eprintln!("{}", self.state_report(closed, n));
                }
                return false;
            }
            out = self.shared.cv.wait_timeout(out, deadline - now).unwrap().0;
        }
    }

    /// The agent's state when a wait gave up: alive or not, each thread's kernel state, wait
    /// channel and stack (`/proc/<pid>/task/*`), how many stdout objects came and the last one.
    fn state_report(&self, stdout_closed: bool, objects: usize) -> String {
        let pid = self.child.id();
        let read = |p: String| std::fs::read_to_string(p).unwrap_or_else(|e| format!("({e})"));
        let mut r = format!("agent {pid}: stdout closed: {stdout_closed}; {objects} stdout objects\n");
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            for t in tasks.flatten() {
                let dir = t.path().display().to_string();
                let stat = read(format!("{dir}/stat"));
                let fields: Vec<&str> = stat.rsplit(") ").next().unwrap_or("").split_whitespace().collect();
                let state = fields.first().copied().unwrap_or("?");
                if state == "Z" {
                    // Field 52 of stat, `exit_code` as waitpid reports it (a signal in the low bits).
                    r += &format!("  exited, not reaped: wait status {}\n", fields.get(49).copied().unwrap_or("?"));
                }
                r += &format!(
                    "  task {} {} state {state} wchan {} stack:\n{}",
                    t.file_name().to_string_lossy(),
                    read(format!("{dir}/comm")).trim(),
                    read(format!("{dir}/wchan")).trim(),
                    read(format!("{dir}/stack"))
                );
            }
        } else {
            r += "  process gone\n";
        }
        if let Some(last) = self.shared.out.lock().unwrap().events.last() {
            r += &format!("  last object: {last}\n");
        }
        r
    }

    /// Waits for the first event satisfying `pred` (earlier events included) and returns it.
    pub fn wait_for(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&Value) -> bool,
    ) -> Option<Value> {
        let mut found = None;
        let mut next = 0;
        let mut matches = |evs: &[Value]| {
            if let Some(e) = evs[next..].iter().find(|e| pred(e)) {
                found = Some(e.clone());
                return true;
            }
            next = evs.len();
            false
        };
        if !self.wait_until(timeout, &mut matches) && !self.shared.out.lock().unwrap().stdout_closed {
            // Still a failure; waiting a little longer tells a slow agent from a blind one (with
            // stdout closed there is nothing to wait for: the state report said so).
            let late = Instant::now();
            if self.wait_until_reporting(LATE_LOOK, &mut matches, false) {
                eprintln!("the awaited object came {:?} after the wait gave up: {}", late.elapsed(), found.take().unwrap_or_default());
            } else {
                eprintln!("the awaited object did not come in {LATE_LOOK:?} more either");
            }
        }
        found
    }

    /// Sends SIGINT, waits for the exit, checks it is 0 and that every stdout line was a JSON event
    /// with a valid `ts` (for [`Stdout::TraceEvents`]; see [`Stdout`]); returns every event.
    pub fn stop(self) -> Result<Vec<Value>> {
        self.stop_with(libc::SIGINT)
    }

    /// [`AgentProcess::stop`] with `signal` instead of SIGINT.
    pub fn stop_with(mut self, signal: libc::c_int) -> Result<Vec<Value>> {
        // SAFETY: signalling our own child, which has not been reaped (stopped is false).
        if unsafe { libc::kill(self.child.id() as libc::pid_t, signal) } != 0 {
            bail!("kill({signal}): {}", std::io::Error::last_os_error());
        }
        let status = self.wait_exit(STOP_TIMEOUT);
        let Some(status) = status else {
            self.kill();
            bail!(
                "agent did not exit within {STOP_TIMEOUT:?} of signal {signal}; stderr:\n{}",
                self.stderr_text()
            );
        };
        self.stopped = true;
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        if !status.success() {
            bail!(
                "agent exited with {status} after signal {signal}; stderr:\n{}",
                self.stderr_text()
            );
        }
        let out = std::mem::take(&mut *self.shared.out.lock().unwrap());
        if !out.bad_lines.is_empty() {
            bail!(
                "agent wrote stdout lines that are not JSON {}:\n{}",
                match self.format {
                    Stdout::TraceEvents => "events",
                    Stdout::Spans => "spans",
                },
                out.bad_lines.join("\n")
            );
        }
        for e in &out.events {
            self.format.check_final(e)?;
        }
        Ok(out.events)
    }

    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(s)) => return Some(s),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => return None,
            }
        }
    }

    fn kill(&mut self) {
        if !self.stopped {
            let _ = self.child.kill();
            let _ = self.child.wait();
            self.stopped = true;
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    //! The process plumbing of the guard, exercised with a shell script standing in for a process
    //! that follows the agent's stdout/stderr protocol (the real agent is exercised by the
    //! integration tests).
    use super::*;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("/bin/sh");
        c.args(["-c", script]);
        c
    }

    #[test]
    fn lost_reports() {
        let lines: Vec<String> = [
            "[INFO keepalive_agent] stopped: 10 kernel events, 3 records, 0 lost, 0 decode errors",
            "[WARN keepalive_agent::runtime] lost 12 kernel events (ring buffer full)",
            "[INFO x] 3 lost, 0 decode errors",
            "ready: 8 hooks attached",
            "[INFO x] closed: 10 lost",
            "[WARN r] skipped 36 kernel program runs (each may be a lost event): State=28 (total 36)",
            "[INFO k] stopped: 9 kernel events, 142 lost (0 ring buffer full, 142 skipped runs), 0 decode errors",
            "[WARN k] lost 142 kernel events in total: skipped_run: State=142",
            "[INFO k] stopped: 9 kernel events, 150 lost (8 ring buffer full, 142 skipped runs), 0 decode errors",
            "[WARN k] lost 150 kernel events in total: ringbuf_full: Timer=8; skipped_run: State=142",
            "[WARN k] lost 1 kernel events in total: unpaired_timer_run: Timer=1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let lost = lost_event_reports(&lines);
        assert_eq!(lost, vec![&lines[1], &lines[2], &lines[4], &lines[8], &lines[9], &lines[10]]);
        assert_eq!(skipped_run_reports(&lines), vec![&lines[5]]);
    }

    #[test]
    fn ready_events_and_sigint() {
        let p = AgentProcess::spawn(
            sh(r#"trap 'echo bye >&2; exit 0' INT
                  echo "starting" >&2
                  echo "ready: attached" >&2
                  echo '{"ts":"2025-11-21T13:25:00.5Z","event":"open","state":"ESTABLISHED"}'
                  echo '{"ts":"2025-11-21T13:25:01Z","event":"probe","probe":1}'
                  while :; do sleep 0.05; done"#),
            Duration::from_secs(10),
        )
        .unwrap();
        let e = p
            .wait_for(Duration::from_secs(5), |e| events::kind(e) == "probe")
            .expect("probe event");
        assert_eq!(events::u64_of(&e, "probe"), Some(1));
        assert!(!p.wait_until(Duration::from_millis(300), |evs| evs.iter().any(|e| events::kind(e) == "close")));
        let evs = p.stop().unwrap();
        assert_eq!(evs.len(), 2);
        assert_eq!(events::kind(&evs[0]), "open");
    }

    #[test]
    fn no_ready_reports_stderr() {
        let err = AgentProcess::spawn(
            sh("echo 'error: cannot load programs' >&2; exit 3"),
            Duration::from_secs(10),
        )
        .err()
        .expect("must fail");
        let msg = format!("{err:#}");
        assert!(msg.contains("cannot load programs"), "{msg}");
    }

    #[test]
    fn ready_timeout_kills() {
        let t0 = Instant::now();
        let err = AgentProcess::spawn(
            sh("echo waiting >&2; exec sleep 30"),
            Duration::from_millis(500),
        )
        .err()
        .expect("must time out");
        assert!(format!("{err:#}").contains("waiting"));
        assert!(t0.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn bad_stdout_and_exit_status_fail_stop() {
        let p = AgentProcess::spawn(
            sh(r#"trap 'exit 0' INT; echo ready >&2; echo 'not json'; while :; do sleep 0.05; done"#),
            Duration::from_secs(10),
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert!(format!("{:#}", p.stop().unwrap_err()).contains("not json"));

        let p = AgentProcess::spawn(
            sh(r#"trap 'exit 2' INT; echo ready >&2; while :; do sleep 0.05; done"#),
            Duration::from_secs(10),
        )
        .unwrap();
        assert!(format!("{:#}", p.stop().unwrap_err()).contains("exit status: 2"));
    }

    #[test]
    fn span_lines_and_sigterm() {
        let p = AgentProcess::spawn_with(
            sh(r#"trap 'exit 0' TERM
                  echo ready >&2
                  echo '{"trace_id":"0af7651916cd43dd8448eb211c80319c","span_id":"b7ad6b7169203331","name":"tcp.connection","start":"2025-11-21T13:25:00.000001Z","end":"2025-11-21T13:25:04Z"}'
                  while :; do sleep 0.05; done"#),
            Duration::from_secs(10),
            Stdout::Spans,
        )
        .unwrap();
        let s = p
            .wait_for(Duration::from_secs(5), |v| events::str_of(v, "name").is_some())
            .expect("span line");
        assert_eq!(events::str_of(&s, "name"), Some("tcp.connection"));
        assert_eq!(p.stop_with(libc::SIGTERM).unwrap().len(), 1);

        // A trace event is not a span.
        let p = AgentProcess::spawn_with(
            sh(r#"trap 'exit 0' INT; echo ready >&2
                  echo '{"ts":"2025-11-21T13:25:00Z","event":"open"}'
                  while :; do sleep 0.05; done"#),
            Duration::from_secs(10),
            Stdout::Spans,
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert!(format!("{:#}", p.stop().unwrap_err()).contains("not JSON spans"));
    }
}
