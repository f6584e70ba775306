//! The matrix on the host's own kernel: the same `check` and scenario runs as inside a guest,
//! run directly (as root; the tests create and remove their own namespaces, cgroups and nft tables).

use std::fs::{self, File};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};

use super::matrix::{
    combine_attempts, libtest_cell, Cell, CheckReport, CheckRun, KernelResult, Method,
    MethodResult, Place, Scenario, ScenarioResult, Support,
};

pub struct HostRun<'a> {
    pub agent: &'a Path,
    /// Each test target with its binary.
    pub tests: &'a [(String, PathBuf)],
    pub methods: &'a [Method],
    pub scenarios: &'a [Scenario],
    /// Limit per check or test run (0: none).
    pub command_timeout: Duration,
    /// How many times a failed scenario runs again.
    pub retries: u32,
    /// Where each run's output goes.
    pub log_dir: PathBuf,
}

impl HostRun<'_> {
    pub fn run(&self) -> KernelResult {
        let started = Instant::now();
        match self.try_run() {
            Ok(mut k) => {
                k.wall_seconds = started.elapsed().as_secs_f64();
                k
            }
            Err(e) => {
                log::error!("host: {e:#}");
                KernelResult::failed(
                    "host",
                    Place::Host,
                    format!("{e:#}"),
                    started.elapsed().as_secs_f64(),
                )
            }
        }
    }

    fn try_run(&self) -> Result<KernelResult> {
        // SAFETY: geteuid has no preconditions.
        ensure!(
            unsafe { libc::geteuid() } == 0,
            "the host run needs root (the tests create network namespaces and cgroups and load eBPF programs); use --no-host otherwise"
        );
        fs::create_dir_all(&self.log_dir)
            .with_context(|| format!("creating {}", self.log_dir.display()))?;
        let release = fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .ok();
        let version = fs::read_to_string("/proc/sys/kernel/version")
            .map(|s| s.trim().to_string())
            .ok();
        let mut methods = Vec::new();
        for &method in self.methods {
            methods.push(self.method(method)?);
        }
        Ok(KernelResult {
            label: "host".to_string(),
            place: Place::Host,
            release,
            version,
            error: None,
            vm: None,
            methods,
            wall_seconds: 0.0,
        })
    }

    fn method(&self, method: Method) -> Result<MethodResult> {
        let out = self.log_dir.join(format!("check-{method}.out"));
        let log = self.log_dir.join(format!("check-{method}.log"));
        let mut cmd = Command::new(self.agent);
        cmd.args(["check", "--attach", method.name()]);
        log::info!("host: keepalive-agent check --attach {method}");
        // The table on stdout, the agent's log on stderr: kept apart for parsing.
        let run = self.run_logged(cmd, &out, Some(&log))?;
        let report = CheckReport::parse(&run.stdout);
        let exit_code = run.status.and_then(|s| s.code());
        let support = Support::decide(method, exit_code, &report);
        let check = CheckRun {
            exit_code,
            report,
            seconds: Some(run.seconds),
        };
        let mut scenarios = Vec::new();
        for scenario in self.scenarios {
            let result = match &support {
                Support::Supported => self.scenario(method, scenario)?,
                Support::NotApplicable(_) => ScenarioResult {
                    scenario: *scenario,
                    cell: Cell::NotApplicable,
                    seconds: None,
                    log: None,
                },
                Support::CheckFailed(why) => ScenarioResult {
                    scenario: *scenario,
                    cell: Cell::NotRun(why.clone()),
                    seconds: None,
                    log: None,
                },
            };
            scenarios.push(result);
        }
        Ok(MethodResult {
            method,
            check: Some(check),
            support,
            scenarios,
        })
    }

    fn scenario(&self, method: Method, scenario: &Scenario) -> Result<ScenarioResult> {
        let mut attempts = Vec::new();
        let mut seconds = 0.0;
        let mut log = None;
        for attempt in 1..=self.retries + 1 {
            let path = self
                .log_dir
                .join(format!("{method}.{}.{attempt}.log", scenario.test));
            let binary = self
                .tests
                .iter()
                .find(|(target, _)| target == scenario.target)
                .map(|(_, path)| path)
                .with_context(|| format!("no test binary for target {}", scenario.target))?;
            let mut cmd = Command::new(binary);
            cmd.args(["--exact", "--test-threads=1", scenario.test])
                .env("KEEPALIVE_TEST_ATTACH", method.name())
                .env("KEEPALIVE_AGENT_BIN", self.agent);
            log::info!("host: {method} {} (attempt {attempt})", scenario.test);
            let run = self.run_logged(cmd, &path, None)?;
            seconds += run.seconds;
            let cell = match run.status {
                Some(status) => libtest_cell(scenario.test, status.success(), &run.stdout),
                None => Cell::Fail(format!(
                    "killed after {} s (--command-timeout)",
                    self.command_timeout.as_secs()
                )),
            };
            let passed = cell == Cell::Pass;
            // The log shown for a failure is the first failed attempt's.
            if (log.is_none() && !passed) || (passed && attempt == 1) {
                log = Some(path);
            }
            attempts.push(cell);
            if passed {
                break;
            }
        }
        let cell = combine_attempts(attempts);
        log::info!("host: {method} {}: {}", scenario.test, cell.label());
        Ok(ScenarioResult {
            scenario: *scenario,
            cell,
            seconds: Some(seconds),
            log,
        })
    }

    /// Runs `cmd` in its own process group with stdout in `out` and stderr in `err` (default: in
    /// `out` too, as in a terminal); kills the group after the timeout. Returns stdout and the exit
    /// status (`None`: killed).
    fn run_logged(&self, mut cmd: Command, out: &Path, err: Option<&Path>) -> Result<Finished> {
        let file = File::create(out).with_context(|| format!("creating {}", out.display()))?;
        let err = match err {
            Some(path) => {
                File::create(path).with_context(|| format!("creating {}", path.display()))?
            }
            None => file.try_clone()?,
        };
        cmd.stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .process_group(0);
        let started = Instant::now();
        let mut child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break Some(status);
            }
            if !self.command_timeout.is_zero() && started.elapsed() >= self.command_timeout {
                // SAFETY: signalling the process group of a child we started and have not reaped.
                unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
                let _ = child.wait();
                break None;
            }
            thread::sleep(Duration::from_millis(100));
        };
        let seconds = started.elapsed().as_secs_f64();
        let stdout = fs::read_to_string(out).unwrap_or_default();
        Ok(Finished {
            status,
            stdout,
            seconds,
        })
    }
}

struct Finished {
    status: Option<ExitStatus>,
    /// stdout (with stderr when they were merged).
    stdout: String,
    seconds: f64,
}
