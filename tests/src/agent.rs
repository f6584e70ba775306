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

/// How long the agent may take to attach everything and print `ready`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
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

#[derive(Default)]
struct Collected {
    events: Vec<Value>,
    /// stdout lines that are not JSON objects with a string `event`.
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

impl<'env> Agent<'env> {
    /// `keepalive-agent trace --format json --netns NS --cgroup CG <extra>`, waits for `ready`.
    pub fn start(env: &'env Env, extra: &[&str]) -> Agent<'env> {
        let mut cmd = Command::new(agent_binary());
        cmd.args(["trace", "--format", "json", "--netns"])
            .arg(env.ns.path())
            .arg("--cgroup")
            .arg(env.cgroup.path())
            .args(extra);
        let process = AgentProcess::spawn(cmd, READY_TIMEOUT).unwrap_or_else(|e| panic!("{e:#}"));
        Agent { process, _env: env }
    }

    /// See [`AgentProcess::wait_for`].
    pub fn wait_for(&self, timeout: Duration, pred: impl FnMut(&Value) -> bool) -> Option<Value> {
        self.process.wait_for(timeout, pred)
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
        let shared = self.process.shared.clone();
        let events = self.process.stop().unwrap_or_else(|e| panic!("{e:#}"));
        let stderr = shared.stderr.lock().unwrap().clone();
        (events, stderr)
    }
}

/// Stderr lines reporting lost events: lines mentioning "lost" other than as a zero count
/// ("..., 0 lost, ..." in the agent's summary).
pub fn lost_event_reports(lines: &[String]) -> Vec<&String> {
    lines
        .iter()
        .filter(|line| {
            let lower = line.to_ascii_lowercase();
            lower
                .match_indices("lost")
                .any(|(i, _)| lower[..i].split_whitespace().next_back() != Some("0"))
        })
        .collect()
}

impl AgentProcess {
    /// Spawns `cmd` (stdout and stderr piped) and waits up to `ready_timeout` for a stderr line
    /// starting with `ready`. Stderr is forwarded to the test's stderr, prefixed with `[agent]`.
    pub fn spawn(mut cmd: Command, ready_timeout: Duration) -> Result<AgentProcess> {
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
                        Ok(v) if v.is_object() && v.get("event").is_some_and(Value::is_string) => {
                            out.events.push(v)
                        }
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
    pub fn wait_until(&self, timeout: Duration, mut f: impl FnMut(&[Value]) -> bool) -> bool {
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
            if out.stdout_closed {
                return false;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            out = self.shared.cv.wait_timeout(out, deadline - now).unwrap().0;
        }
    }

    /// Waits for the first event satisfying `pred` (earlier events included) and returns it.
    pub fn wait_for(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&Value) -> bool,
    ) -> Option<Value> {
        let mut found = None;
        let mut next = 0;
        self.wait_until(timeout, |evs| {
            if let Some(e) = evs[next..].iter().find(|e| pred(e)) {
                found = Some(e.clone());
                return true;
            }
            next = evs.len();
            false
        });
        found
    }

    /// Sends SIGINT, waits for the exit, checks it is 0 and that every stdout line was a JSON event
    /// with a valid `ts`; returns every event.
    pub fn stop(mut self) -> Result<Vec<Value>> {
        // SAFETY: signalling our own child, which has not been reaped (stopped is false).
        if unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGINT) } != 0 {
            bail!("kill(SIGINT): {}", std::io::Error::last_os_error());
        }
        let status = self.wait_exit(STOP_TIMEOUT);
        let Some(status) = status else {
            self.kill();
            bail!(
                "agent did not exit within {STOP_TIMEOUT:?} of SIGINT; stderr:\n{}",
                self.stderr_text()
            );
        };
        self.stopped = true;
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        if !status.success() {
            bail!(
                "agent exited with {status} after SIGINT; stderr:\n{}",
                self.stderr_text()
            );
        }
        let out = std::mem::take(&mut *self.shared.out.lock().unwrap());
        if !out.bad_lines.is_empty() {
            bail!(
                "agent wrote stdout lines that are not JSON events:\n{}",
                out.bad_lines.join("\n")
            );
        }
        for e in &out.events {
            match events::str_of(e, "ts") {
                Some(ts) if events::parse_rfc3339(ts).is_some() => {}
                _ => bail!("event without an RFC 3339 ts: {e}"),
            }
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
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let lost = lost_event_reports(&lines);
        assert_eq!(lost, vec![&lines[1], &lines[2], &lines[4]]);
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
        assert!(p
            .wait_for(Duration::from_millis(300), |e| events::kind(e) == "close")
            .is_none());
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
}
