//! The kernel × attach method × scenario matrix (what `cargo xtask vm-test` runs by default).
//!
//! For each kernel (each Debian kernel booted in QEMU, and the host's own kernel) and each attach
//! method, `keepalive-agent check --attach METHOD` says first whether the kernel supports the method:
//! it does when the agent reached the `keepalive_timer` hook with it; otherwise the method is N/A on
//! that kernel (with the reason `check` gave), which is not a failure. When it does, every scenario
//! (one integration test of `tests/tests/keepalive.rs`, or of `tests/tests/privilege.rs`: the
//! agent as `nobody` with exactly the capabilities it declares) runs on its own with
//! `KEEPALIVE_TEST_ATTACH=METHOD`, which makes the test fail unless the agent used that method.
//!
//! Inside a guest this is one command per check and per scenario (see [`guest_commands`]); each
//! writes what the host parses to the results port as `VMTEST-DATA` lines. On the host, the same
//! programs run directly ([`super::hostrun`]). Both end up as a [`KernelResult`].

use std::fmt;
use std::path::PathBuf;

use anyhow::{bail, Result};

use super::guest::GuestCommand;

/// Where the agent and the test binary are inside a guest.
pub const GUEST_AGENT: &str = "/usr/local/bin/keepalive-agent";
/// Seconds the test harness waits for the agent's `ready` line in a guest
/// (`KEEPALIVE_TEST_READY_TIMEOUT`). Under TCG each fentry program takes seconds to load and attach,
/// and a 60 s wait (the host default) was missed once on Debian 6.1 with every hook on fentry.
pub const GUEST_READY_TIMEOUT_S: u32 = 180;

/// An attach method the agent can be forced to (`--attach`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Method {
    Fentry,
    Kprobe,
    Tracepoint,
}

impl Method {
    pub const ALL: [Method; 3] = [Method::Fentry, Method::Kprobe, Method::Tracepoint];

    /// The `--attach` value, which is also the METHOD word `check` prints for it.
    pub fn name(self) -> &'static str {
        match self {
            Method::Fentry => "fentry",
            Method::Kprobe => "kprobe",
            Method::Tracepoint => "tracepoint",
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One scenario: an integration test, with a short column name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scenario {
    pub test: &'static str,
    pub short: &'static str,
    /// Run inside the VMs by default (see [`SCENARIOS`] for the one that is not).
    pub in_vm: bool,
    /// The integration test target (`tests/tests/<target>.rs`) holding the test.
    pub target: &'static str,
}

/// The test target of the keep-alive scenarios.
pub const KEEPALIVE_TARGET: &str = "keepalive";
/// The test target of the least-privilege scenarios.
pub const PRIVILEGE_TARGET: &str = "privilege";

/// The name, in /usr/local/bin of a guest, of the test binary of `target`.
pub fn guest_test_binary(target: &str) -> String {
    format!("keepalive-tests-{target}")
}

/// The test targets `scenarios` need, in order of first use.
pub fn test_targets(scenarios: &[Scenario]) -> Vec<&'static str> {
    let mut targets: Vec<&'static str> = Vec::new();
    for s in scenarios {
        if !targets.contains(&s.target) {
            targets.push(s.target);
        }
    }
    targets
}

/// The scenarios, in matrix order.
///
/// `thousand_connections_no_lost_events` runs on the host only by default. It passes under TCG
/// (about 7 s per method), but once in six runs the guest kernel died with `Oops: int3` in
/// `tcp_keepalive_timer+0x5` while the fentry trampoline was being patched with 1000 keep-alive
/// timers firing: the kernel's int3-based live code patching racing with QEMU TCG's handling of
/// code modified by another vCPU, which takes the rest of that kernel's matrix down with it.
/// `--scenario scale` forces it into the VMs.
///
/// The `priv-*` scenarios prove the capability set per kernel: the agent as `nobody` with exactly
/// the capabilities `check` declares through a dead peer (`priv-dead`), each one removed in turn
/// (`priv-missing`), and the snapshot without the optional CAP_SYS_ADMIN (`priv-snapshot`).
pub const SCENARIOS: &[Scenario] = &[
    keepalive("healthy_peer_probes_are_answered", "healthy", true),
    keepalive("dead_peer_times_out_v4", "dead-v4", true),
    keepalive("dead_peer_times_out_v6", "dead-v6", true),
    keepalive("user_timeout_cuts_probing_short", "user-timeout", true),
    keepalive("unacked_data_suppresses_probes", "suppressed", true),
    keepalive("snapshot_reports_existing_connection", "snapshot", true),
    keepalive("setsockopt_before_connect_is_attributed", "settings", true),
    keepalive("peer_probes_are_not_answers", "one-way", true),
    keepalive("thousand_connections_no_lost_events", "scale", false),
    privilege("dead_peer_as_nobody_with_exactly_the_declared_capabilities", "priv-dead"),
    privilege("each_missing_capability_is_named", "priv-missing"),
    privilege("snapshot_without_cap_sys_admin", "priv-snapshot"),
];

const fn keepalive(test: &'static str, short: &'static str, in_vm: bool) -> Scenario {
    Scenario { test, short, in_vm, target: KEEPALIVE_TARGET }
}

const fn privilege(test: &'static str, short: &'static str) -> Scenario {
    Scenario { test, short, in_vm: true, target: PRIVILEGE_TARGET }
}

/// The scenarios named by `--scenario` (short names or test names; "all"), or the defaults.
pub fn select_scenarios(names: &[String]) -> Result<Vec<Scenario>> {
    if names.is_empty() {
        return Ok(SCENARIOS.to_vec());
    }
    let mut out: Vec<Scenario> = Vec::new();
    for name in names {
        let found: Vec<Scenario> = if name == "all" {
            SCENARIOS.to_vec()
        } else {
            match SCENARIOS.iter().find(|s| s.short == name || s.test == name) {
                Some(s) => vec![*s],
                None => bail!(
                    "--scenario {name:?}: not one of all, {}",
                    SCENARIOS.iter().map(|s| s.short).collect::<Vec<_>>().join(", ")
                ),
            }
        };
        for s in found {
            if !out.contains(&s) {
                out.push(s);
            }
        }
    }
    // Explicitly named scenarios run in the VMs too.
    Ok(out.into_iter().map(|s| Scenario { in_vm: true, ..s }).collect())
}

/// What `keepalive-agent check` reported.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CheckReport {
    /// `kernel:` line.
    pub kernel: Option<String>,
    /// `reset reasons:` line.
    pub reset_reasons: Option<String>,
    pub hooks: Vec<HookLine>,
    /// The last line (`ok: ...` or `degraded: ...`).
    pub summary: Option<String>,
    /// Why the agent cannot run with the method asked for (`cannot run here: ...`): `check` exits
    /// non-zero when the forced method cannot reach the keep-alive timer.
    pub cannot_run: Option<String>,
}

/// One hook of the `check` table.
#[derive(Debug, Clone, PartialEq)]
pub struct HookLine {
    pub hook: String,
    /// The METHOD column: fentry, kprobe, tracepoint, cgroup, iterator, or NONE.
    pub kind: String,
    /// What it attached to (or, for NONE, what the user does not see).
    pub target: String,
    /// Strategies tried before, and why each was not used.
    pub rejected: Vec<Rejection>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    pub kind: String,
    pub target: String,
    /// Possibly several lines (a verifier log).
    pub reason: String,
}

/// METHOD words of the `check` table.
const KINDS: &[&str] = &["fentry", "kprobe", "tracepoint", "cgroup", "iterator", "NONE"];
/// The hook whose method decides whether a kernel supports a method.
pub const DECIDING_HOOK: &str = "keepalive_timer";

impl CheckReport {
    /// Parses the output of `keepalive-agent check` (stdout). The table has one line per hook,
    /// `HOOK METHOD TARGET`, then for each rejected strategy an indented
    /// `METHOD not used: TARGET (REASON)` whose reason may continue on the following lines.
    pub fn parse(text: &str) -> CheckReport {
        let mut report = CheckReport::default();
        let mut in_table = false;
        for raw in text.lines() {
            let line = raw.trim_end_matches('\r');
            if !in_table {
                if let Some(v) = line.strip_prefix("kernel: ") {
                    report.kernel = Some(v.trim().to_string());
                } else if let Some(v) = line.strip_prefix("reset reasons: ") {
                    report.reset_reasons = Some(v.trim().to_string());
                } else if line.starts_with("HOOK ") {
                    in_table = true;
                } else if let Some(v) = line.strip_prefix("cannot run here: ") {
                    report.cannot_run = Some(v.trim().to_string());
                }
                continue;
            }
            if line.starts_with("ok: ") || line.starts_with("degraded: ") {
                report.summary = Some(line.to_string());
                break;
            }
            if let Some(hook) = parse_hook_line(line) {
                report.hooks.push(hook);
            } else if let Some(rejection) = parse_rejection(line) {
                if let Some(hook) = report.hooks.last_mut() {
                    hook.rejected.push(rejection);
                }
            } else if let Some(last) = report
                .hooks
                .last_mut()
                .and_then(|h| h.rejected.last_mut())
            {
                last.reason.push('\n');
                last.reason.push_str(line);
            }
        }
        for hook in &mut report.hooks {
            for r in &mut hook.rejected {
                let trimmed = r.reason.trim_end();
                r.reason = trimmed
                    .strip_suffix(')')
                    .unwrap_or(trimmed)
                    .to_string();
            }
        }
        report
    }

    pub fn hook(&self, name: &str) -> Option<&HookLine> {
        self.hooks.iter().find(|h| h.hook == name)
    }

    /// Whether the kernel supports `method`: `check --attach method` reached the keep-alive timer
    /// with it. Otherwise why not (the timer hook's rejection of that method, first line).
    pub fn support(&self, method: Method) -> Result<(), String> {
        let Some(timer) = self.hook(DECIDING_HOOK) else {
            return Err(format!("check listed no {DECIDING_HOOK} hook"));
        };
        if timer.kind == method.name() {
            return Ok(());
        }
        match timer.rejected.iter().find(|r| r.kind == method.name()) {
            Some(r) => Err(first_line(&r.reason).to_string()),
            None => Err(format!(
                "{DECIDING_HOOK} reached with {} instead",
                timer.kind
            )),
        }
    }

    /// Why `method`, forced, cannot reach the keep-alive timer, when `check` said so (it then stops
    /// with a non-zero exit instead of printing the table).
    pub fn core_unreachable(&self, method: Method) -> Option<&str> {
        let why = self.cannot_run.as_deref()?;
        let prefix = format!("--attach {} cannot reach {DECIDING_HOOK}", method.name());
        let rest = &why[why.find(&prefix)? + prefix.len()..];
        Some(rest.split_once(": ").map_or(rest, |(_, r)| r))
    }

    /// Hooks nothing reached.
    pub fn unreached(&self) -> Vec<&HookLine> {
        self.hooks.iter().filter(|h| h.kind == "NONE").collect()
    }
}

fn parse_hook_line(line: &str) -> Option<HookLine> {
    if line.starts_with(char::is_whitespace) {
        return None;
    }
    let (hook, rest) = line.split_once(char::is_whitespace)?;
    if hook.is_empty()
        || !hook
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return None;
    }
    let rest = rest.trim_start();
    let (kind, target) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    if !KINDS.contains(&kind) {
        return None;
    }
    Some(HookLine {
        hook: hook.to_string(),
        kind: kind.to_string(),
        target: target.trim().to_string(),
        rejected: Vec::new(),
    })
}

fn parse_rejection(line: &str) -> Option<Rejection> {
    if !line.starts_with(char::is_whitespace) {
        return None;
    }
    let rest = line.trim_start();
    let (kind, rest) = rest.split_once(char::is_whitespace)?;
    if !KINDS.contains(&kind) {
        return None;
    }
    let rest = rest.trim_start().strip_prefix("not used: ")?;
    let (target, reason) = rest.split_once(" (").unwrap_or((rest, ""));
    Some(Rejection {
        kind: kind.to_string(),
        target: target.to_string(),
        reason: reason.to_string(),
    })
}

pub fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

/// The verdict of one scenario under one method on one kernel.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Pass,
    /// With what went wrong (first line of the panic, timeout...).
    Fail(String),
    /// The kernel does not support the method.
    NotApplicable,
    /// Not run because something before it failed (the VM died, the check failed...).
    NotRun(String),
    /// Deliberately not run here (the 1000-connection test in a VM), with why.
    Skipped(String),
    /// Failed, then passed when run again (`--retries`): not a failure, but shown, with the first
    /// failure. Under TCG on shared cores a guest can be descheduled for seconds, which the
    /// tests' timing checks (probes about `intvl` apart) notice.
    Flaky(String),
}

impl Cell {
    pub fn label(&self) -> &'static str {
        match self {
            Cell::Pass => "PASS",
            Cell::Fail(_) => "FAIL",
            Cell::NotApplicable => "N/A",
            Cell::NotRun(_) => "NOT-RUN",
            Cell::Skipped(_) => "skip",
            Cell::Flaky(_) => "FLAKY",
        }
    }

    pub fn is_failure(&self) -> bool {
        matches!(self, Cell::Fail(_) | Cell::NotRun(_))
    }

    pub fn detail(&self) -> Option<&str> {
        match self {
            Cell::Fail(d) | Cell::NotRun(d) | Cell::Skipped(d) | Cell::Flaky(d) => Some(d),
            _ => None,
        }
    }
}

/// The verdict of a test run from its exit status and libtest's output (or its `test ...` and
/// `test result:` lines): PASS needs exit status 0 and libtest saying this test passed.
pub fn libtest_cell(test: &str, exit_ok: bool, output: &str) -> Cell {
    let result_line = format!("test {test} ... ");
    let mut said_ok = false;
    let mut said_failed = false;
    let mut ran_one = false;
    for line in output.lines().map(|l| l.trim_end_matches('\r')) {
        if let Some(verdict) = line.strip_prefix(&result_line) {
            said_ok |= verdict == "ok";
            said_failed |= verdict.ends_with("FAILED");
        }
        if line.starts_with("test result: ok. 1 passed") {
            ran_one = true;
        }
    }
    if exit_ok && (said_ok || ran_one) && !said_failed {
        return Cell::Pass;
    }
    if exit_ok {
        return Cell::Fail(format!("the test binary exited 0 without running {test}"));
    }
    Cell::Fail(panic_message(output).unwrap_or_else(|| "the test failed".to_string()))
}

/// The verdict over attempts (each a test run's verdict, in order): the last one decides; a pass
/// after failures is [`Cell::Flaky`] with the first failure.
pub fn combine_attempts(attempts: Vec<Cell>) -> Cell {
    let first_failure = attempts
        .iter()
        .find_map(|c| matches!(c, Cell::Fail(_)).then(|| c.detail().unwrap_or("").to_string()));
    match (attempts.into_iter().last(), first_failure) {
        (Some(Cell::Pass), Some(first)) => Cell::Flaky(first),
        (Some(last), _) => last,
        (None, _) => Cell::NotRun("no attempt ran".to_string()),
    }
}

/// Per-attempt verdicts from a scenario command's data lines (`<attempt> <line>`, where the
/// lines are libtest's result lines and a final `exit <code>`).
pub fn attempts_from_data<'a>(test: &str, lines: impl Iterator<Item = &'a str>) -> Vec<Cell> {
    let mut attempts: Vec<(u32, Vec<&str>, Option<i32>)> = Vec::new();
    for line in lines {
        let Some((n, rest)) = line.split_once(' ') else { continue };
        let Ok(n) = n.parse::<u32>() else { continue };
        if attempts.last().is_none_or(|a| a.0 != n) {
            attempts.push((n, Vec::new(), None));
        }
        let current = attempts.last_mut().expect("pushed above");
        match rest.strip_prefix("exit ").map(str::parse::<i32>) {
            Some(Ok(code)) => current.2 = Some(code),
            _ => current.1.push(rest),
        }
    }
    attempts
        .into_iter()
        .map(|(_, lines, code)| match code {
            Some(code) => {
                let cell = libtest_cell(test, code == 0, &lines.join("\n"));
                match cell {
                    // The data lines carry no panic message: the console has it.
                    Cell::Fail(d) if d == "the test failed" => {
                        Cell::Fail(format!("the test binary exited {code}"))
                    }
                    other => other,
                }
            }
            None => Cell::Fail("the attempt did not finish".to_string()),
        })
        .collect()
}

/// The first panic message in libtest output: its first line, the `left:`/`right:` lines of a
/// failed `assert_eq!`, and where it panicked.
pub fn panic_message(output: &str) -> Option<String> {
    let mut lines = output.lines().map(|l| l.trim_end_matches('\r'));
    while let Some(line) = lines.next() {
        if let Some(at) = line.find("panicked at ") {
            let location = line[at + "panicked at ".len()..].trim_end_matches(':');
            let message = lines.next().unwrap_or("").trim();
            let mut sides = Vec::new();
            for next in lines.by_ref() {
                if next.starts_with("note: ") || next.starts_with("stack backtrace:") || next.starts_with("---- ") {
                    break;
                }
                let t = next.trim();
                if t.starts_with("left: ") || t.starts_with("right: ") {
                    sides.push(t.to_string());
                }
            }
            let mut text = if sides.is_empty() {
                format!("{message} ({location})")
            } else {
                format!("{message} {} ({location})", sides.join(", "))
            };
            if text.len() > 300 {
                let mut cut = 300;
                while !text.is_char_boundary(cut) {
                    cut -= 1;
                }
                text.truncate(cut);
                text.push('…');
            }
            return Some(text);
        }
    }
    None
}

/// The `check` run for one method.
#[derive(Debug, Clone)]
pub struct CheckRun {
    pub exit_code: Option<i32>,
    pub report: CheckReport,
    pub seconds: Option<f64>,
}

/// Whether a kernel supports a method.
#[derive(Debug, Clone, PartialEq)]
pub enum Support {
    Supported,
    /// Not supported, and why (not a failure).
    NotApplicable(String),
    /// `check` itself failed or did not run: a failure.
    CheckFailed(String),
}

impl Support {
    /// From the check's exit code and report.
    pub fn decide(method: Method, exit_code: Option<i32>, report: &CheckReport) -> Support {
        match exit_code {
            Some(0) => match report.support(method) {
                Ok(()) => Support::Supported,
                Err(why) => Support::NotApplicable(why),
            },
            Some(code) => match report.core_unreachable(method) {
                // The method cannot reach the keep-alive timer here: not applicable, not a failure.
                Some(why) => Support::NotApplicable(first_line(why).to_string()),
                None => Support::CheckFailed(format!("keepalive-agent check exited {code}")),
            },
            None => Support::CheckFailed("keepalive-agent check did not finish".to_string()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ScenarioResult {
    pub scenario: Scenario,
    pub cell: Cell,
    pub seconds: Option<f64>,
    /// Where its full output is (host runs: a log file; guests: the console log).
    pub log: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct MethodResult {
    pub method: Method,
    pub check: Option<CheckRun>,
    pub support: Support,
    pub scenarios: Vec<ScenarioResult>,
}

/// Where a kernel ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    Vm,
    Host,
}

/// VM facts for a kernel booted in QEMU.
#[derive(Debug, Clone)]
pub struct VmFacts {
    pub package: String,
    /// ok, TIMEOUT, DIED.
    pub verdict: &'static str,
    pub downloaded: bool,
    pub fetch_seconds: f64,
    pub initramfs_seconds: f64,
    pub wall_seconds: f64,
    pub console_log: PathBuf,
    pub features: Vec<(String, String)>,
    pub warnings: Vec<String>,
}

/// Everything about one kernel.
#[derive(Debug, Clone)]
pub struct KernelResult {
    /// "6.1", "6.12", "host".
    pub label: String,
    pub place: Place,
    /// `uname -r`.
    pub release: Option<String>,
    /// `uname -v` (Debian kernels name their package version there).
    pub version: Option<String>,
    /// Set-up failed before anything ran (download, boot, build...).
    pub error: Option<String>,
    pub vm: Option<VmFacts>,
    pub methods: Vec<MethodResult>,
    pub wall_seconds: f64,
}

impl KernelResult {
    pub fn failed(label: &str, place: Place, error: String, wall_seconds: f64) -> KernelResult {
        KernelResult {
            label: label.to_string(),
            place,
            release: None,
            version: None,
            error: Some(error),
            vm: None,
            methods: Vec::new(),
            wall_seconds,
        }
    }

    /// No set-up error, the VM (if any) completed, every check ran, no scenario failed.
    pub fn passed(&self) -> bool {
        self.error.is_none()
            && self.vm.as_ref().is_none_or(|v| v.verdict == "ok")
            && self.methods.iter().all(|m| {
                !matches!(m.support, Support::CheckFailed(_))
                    && m.scenarios.iter().all(|s| !s.cell.is_failure())
            })
    }
}

/// Names of the guest commands.
pub fn check_command_name(method: Method) -> String {
    format!("check-{method}")
}

pub fn scenario_command_name(method: Method, scenario: &Scenario) -> String {
    format!("{method}.{}", scenario.test)
}

/// Exit code of a scenario command skipped because the kernel does not support the method.
pub const NOT_APPLICABLE_EXIT: i32 = 77;

/// The guest commands of the matrix, in order: for each method, its check, then its scenarios.
///
/// The check writes its stdout as `VMTEST-DATA check-METHOD` lines and, when the agent reached the
/// keep-alive timer with the method (the same rule as [`CheckReport::support`]), a flag file the
/// scenario commands of that method require (without it they exit [`NOT_APPLICABLE_EXIT`]). A
/// scenario runs its test up to `1 + retries` times until it passes, and for each attempt writes
/// libtest's `test NAME ... ok|FAILED` and `test result:` lines and `exit CODE` as data lines
/// `<attempt> <line>`.
pub fn guest_commands(
    methods: &[Method],
    scenarios: &[Scenario],
    retries: u32,
) -> Result<Vec<GuestCommand>> {
    let mut commands = Vec::new();
    for &method in methods {
        let flag = format!("/run/vmtest-supported-{method}");
        let check = check_command_name(method);
        let out = format!("/tmp/vmtest-{check}");
        let script = format!(
            "rm -f {flag}\n\
             {GUEST_AGENT} check --attach {method} > {out} 2> {out}.log\n\
             rc=$?\n\
             cat {out} {out}.log\n\
             sed 's/^/VMTEST-DATA {check} /' {out} > /dev/ttyS1\n\
             if [ $rc -eq 0 ] && grep -Eq '^{DECIDING_HOOK}[[:space:]]+{method}([[:space:]]|$)' {out}; then\n\
             \ttouch {flag}\n\
             fi\n\
             exit $rc"
        );
        commands.push(GuestCommand::new(&check, &script)?);
        for scenario in scenarios.iter().filter(|s| s.in_vm) {
            let name = scenario_command_name(method, scenario);
            let test = scenario.test;
            let binary = guest_test_binary(scenario.target);
            let script = format!(
                "[ -e {flag} ] || exit {NOT_APPLICABLE_EXIT}\n\
                 attempt=1\n\
                 while :; do\n\
                 \tKEEPALIVE_TEST_ATTACH={method} KEEPALIVE_AGENT_BIN={GUEST_AGENT} \
                 KEEPALIVE_TEST_READY_TIMEOUT={GUEST_READY_TIMEOUT_S} \
                 {binary} --exact --test-threads=1 {test} > /tmp/vmtest-out 2>&1\n\
                 \trc=$?\n\
                 \tcat /tmp/vmtest-out\n\
                 \t{{ grep -E '^test ({test} \\.\\.\\. |result: )' /tmp/vmtest-out; echo \"exit $rc\"; }} \
                 | sed \"s/^/VMTEST-DATA {name} $attempt /\" > /dev/ttyS1\n\
                 \tif [ $rc -eq 0 ] || [ $attempt -gt {retries} ]; then exit $rc; fi\n\
                 \techo \"--- {name}: attempt $attempt failed; running it again\"\n\
                 \tattempt=$((attempt + 1))\n\
                 done"
            );
            commands.push(GuestCommand::new(&name, &script)?);
        }
    }
    Ok(commands)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `check --attach kprobe` on Debian 6.1 before the kprobe reset program was fixed (shortened
    /// verifier log), with the real column layout.
    const CHECK_KPROBE: &str = "kernel: 6.1.0-56-amd64
HZ: 250
reset reasons: not available (kernel < 6.10)
note: enum sk_rst_reason is absent (kernel < 6.10): resets carry no reason

HOOK             METHOD     ATTACHED TO / WHAT IS MISSING
keepalive_timer  kprobe     kprobe/tcp_keepalive_timer + kretprobe/tcp_keepalive_timer
probe_answer     tracepoint raw_tp/tcp_probe
active_reset     NONE       no reset events (the timeout itself is still seen)
                 kprobe     not used: kprobe/tcp_send_active_reset (loading kprobe_tcp_send_active_reset: Verifier output: reg type unsupported
0: R1=ctx(off=0,imm=0) R10=fp0
18: (7b) *(u64 *)(r10 -32) = r6
R6 !read_ok
verification time 1123 usec
processed 16 insns (limit 1000000) max_states_per_insn 0 total_states 1 peak_states 1 mark_read 1
: Permission denied (os error 13))
setsockopt       kprobe     kprobe/tcp_set_keepalive + kprobe/do_tcp_setsockopt + kretprobe/do_tcp_setsockopt
snapshot         iterator   iter/tcp

degraded: 1 hook(s) unreachable; the agent runs without them
";

    /// `check --attach fentry` on the development kernel.
    const CHECK_FENTRY_EPERM: &str = "kernel: 6.18.44-fc-v657
reset reasons: 26 (from BTF enum sk_rst_reason)

HOOK             METHOD     ATTACHED TO / WHAT IS MISSING
keepalive_timer  NONE       no timer firings: no probes, suppressed firings, idle re-arms or keep-alive timeouts
                 fentry     not used: fentry/tcp_keepalive_timer + fexit/tcp_keepalive_timer (loading fentry_tcp_keepalive_timer: the kernel refused the BPF trampoline program (EPERM before verification): fentry/fexit is not allowed here)
setsockopt       cgroup     cgroup/setsockopt
                 fentry     not used: fentry/tcp_set_keepalive + fexit/do_tcp_setsockopt (loading fentry_tcp_set_keepalive: EPERM)

degraded: 1 hook(s) unreachable; the agent runs without them
";

    #[test]
    fn check_refusing_a_forced_method_is_not_applicable() {
        let out = "kernel: 6.18.44\ncannot run here: attaching eBPF programs: --attach fentry cannot reach keepalive_timer, the hook this tool exists for: fentry: the kernel refused the BPF trampoline program (EPERM before verification) (--attach auto picks what this kernel allows)\n";
        let r = CheckReport::parse(out);
        assert_eq!(
            Support::decide(Method::Fentry, Some(1), &r),
            Support::NotApplicable(
                "fentry: the kernel refused the BPF trampoline program (EPERM before verification) (--attach auto picks what this kernel allows)".into()
            )
        );
        assert!(matches!(Support::decide(Method::Kprobe, Some(1), &r), Support::CheckFailed(_)));
        assert!(matches!(Support::decide(Method::Fentry, Some(1), &CheckReport::default()), Support::CheckFailed(_)));
    }

    #[test]
    fn check_table_with_a_verifier_log() {
        let r = CheckReport::parse(CHECK_KPROBE);
        assert_eq!(r.kernel.as_deref(), Some("6.1.0-56-amd64"));
        assert_eq!(r.reset_reasons.as_deref(), Some("not available (kernel < 6.10)"));
        let names: Vec<&str> = r.hooks.iter().map(|h| h.hook.as_str()).collect();
        assert_eq!(
            names,
            ["keepalive_timer", "probe_answer", "active_reset", "setsockopt", "snapshot"]
        );
        let reset = r.hook("active_reset").unwrap();
        assert_eq!(reset.kind, "NONE");
        assert_eq!(reset.rejected.len(), 1);
        let why = &reset.rejected[0];
        assert_eq!(why.kind, "kprobe");
        assert_eq!(why.target, "kprobe/tcp_send_active_reset");
        assert!(why.reason.contains("R6 !read_ok"), "{}", why.reason);
        assert!(why.reason.ends_with("Permission denied (os error 13)"), "{}", why.reason);
        assert_eq!(
            r.hook("setsockopt").unwrap().target,
            "kprobe/tcp_set_keepalive + kprobe/do_tcp_setsockopt + kretprobe/do_tcp_setsockopt"
        );
        assert_eq!(r.support(Method::Kprobe), Ok(()));
        assert!(r.support(Method::Fentry).is_err());
        assert_eq!(
            r.unreached().iter().map(|h| h.hook.as_str()).collect::<Vec<_>>(),
            ["active_reset"]
        );
        assert!(r.summary.unwrap().starts_with("degraded"));
    }

    #[test]
    fn unsupported_method_gives_the_timer_hook_reason() {
        let r = CheckReport::parse(CHECK_FENTRY_EPERM);
        let why = r.support(Method::Fentry).unwrap_err();
        assert!(why.contains("EPERM before verification"), "{why}");
        assert_eq!(
            Support::decide(Method::Fentry, Some(0), &r),
            Support::NotApplicable(why)
        );
        assert!(matches!(
            Support::decide(Method::Fentry, Some(1), &r),
            Support::CheckFailed(_)
        ));
        assert!(matches!(
            Support::decide(Method::Fentry, None, &r),
            Support::CheckFailed(_)
        ));
        assert!(CheckReport::parse("cannot run here: no BTF\n")
            .support(Method::Tracepoint)
            .is_err());
    }

    #[test]
    fn libtest_verdicts() {
        let t = "dead_peer_times_out_v4";
        let ok = "running 1 test\ntest dead_peer_times_out_v4 ... ok\n\ntest result: ok. 1 passed; 0 failed";
        assert_eq!(libtest_cell(t, true, ok), Cell::Pass);
        // Uncaptured output can split the result line; the summary still counts.
        let split = "test dead_peer_times_out_v4 ... [noise]\nok\n\ntest result: ok. 1 passed; 0 failed";
        assert_eq!(libtest_cell(t, true, split), Cell::Pass);
        // Exit 0 but nothing ran: a renamed test must not pass.
        let none = "running 0 tests\n\ntest result: ok. 0 passed; 0 failed; 8 filtered out";
        assert!(libtest_cell(t, true, none).is_failure());
        let failed = "test dead_peer_times_out_v4 ... FAILED\n\nfailures:\n\n---- dead_peer_times_out_v4 stdout ----\n\n\
                      thread 'dead_peer_times_out_v4' (162) panicked at tests/tests/keepalive.rs:250:5:\n\
                      assertion `left == right` failed: {\"event\":\"reset\"}\n  left: Some(\"not_specified\")\n";
        let cell = libtest_cell(t, false, failed);
        assert_eq!(
            cell.detail(),
            Some("assertion `left == right` failed: {\"event\":\"reset\"} left: Some(\"not_specified\") (tests/tests/keepalive.rs:250:5)")
        );
        assert!(libtest_cell(t, false, "").is_failure());
    }

    #[test]
    fn attempts_and_flaky_verdicts() {
        let t = "dead_peer_times_out_v6";
        let data = [
            "1 test dead_peer_times_out_v6 ... FAILED",
            "1 test result: FAILED. 0 passed; 1 failed",
            "1 exit 101",
            "2 test dead_peer_times_out_v6 ... ok",
            "2 test result: ok. 1 passed; 0 failed",
            "2 exit 0",
        ];
        let attempts = attempts_from_data(t, data.iter().copied());
        assert_eq!(attempts.len(), 2);
        assert!(attempts[0].is_failure());
        assert_eq!(attempts[1], Cell::Pass);
        let cell = combine_attempts(attempts);
        assert_eq!(cell, Cell::Flaky("the test binary exited 101".to_string()));
        assert!(!cell.is_failure());
        // One passing attempt: PASS; failing to the end: FAIL; no exit line: not finished.
        assert_eq!(combine_attempts(attempts_from_data(t, data[3..].iter().copied())), Cell::Pass);
        assert!(combine_attempts(attempts_from_data(t, data[..3].iter().copied())).is_failure());
        let unfinished = attempts_from_data(t, data[..2].iter().copied());
        assert_eq!(unfinished, [Cell::Fail("the attempt did not finish".to_string())]);
        assert!(combine_attempts(Vec::new()).is_failure());
    }

    #[test]
    fn guest_scripts_follow_the_protocol() {
        let scenarios = select_scenarios(&["healthy".to_string()]).unwrap();
        let cmds = guest_commands(&[Method::Kprobe], &scenarios, 1).unwrap();
        let names: Vec<&str> = cmds.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["check-kprobe", "kprobe.healthy_peer_probes_are_answered"]);
        assert!(cmds[0].script.contains("check --attach kprobe"));
        assert!(cmds[0].script.contains("VMTEST-DATA check-kprobe "));
        assert!(cmds[0].script.contains("^keepalive_timer[[:space:]]+kprobe"));
        assert!(cmds[1].script.contains("KEEPALIVE_TEST_ATTACH=kprobe"));
        assert!(cmds[1].script.contains("exit 77"));
        assert!(cmds[1].script.contains(
            "keepalive-tests-keepalive --exact --test-threads=1 healthy_peer_probes_are_answered"
        ));
        assert!(cmds[1].script.contains("[ $attempt -gt 1 ]"));
        assert!(cmds[1]
            .script
            .contains("VMTEST-DATA kprobe.healthy_peer_probes_are_answered $attempt "));
    }

    #[test]
    fn scenario_selection() {
        let all = select_scenarios(&[]).unwrap();
        assert_eq!(all.len(), SCENARIOS.len());
        assert!(!all.iter().find(|s| s.short == "scale").unwrap().in_vm);
        let picked = select_scenarios(&["scale".into(), "dead_peer_times_out_v6".into()]).unwrap();
        assert_eq!(
            picked.iter().map(|s| s.short).collect::<Vec<_>>(),
            ["scale", "dead-v6"]
        );
        assert!(picked.iter().all(|s| s.in_vm));
        assert!(select_scenarios(&["nope".into()]).is_err());
    }

    #[test]
    fn privilege_scenarios_run_their_own_binary() {
        let picked = select_scenarios(&["priv-dead".into(), "healthy".into()]).unwrap();
        assert_eq!(test_targets(&picked), [PRIVILEGE_TARGET, KEEPALIVE_TARGET]);
        let cmds = guest_commands(&[Method::Fentry], &picked, 0).unwrap();
        assert!(cmds[1].script.contains(
            "keepalive-tests-privilege --exact --test-threads=1 dead_peer_as_nobody_with_exactly_the_declared_capabilities"
        ));
        // By default every privilege scenario runs in the VMs.
        let all = select_scenarios(&[]).unwrap();
        let privilege: Vec<_> = all.iter().filter(|s| s.target == PRIVILEGE_TARGET).collect();
        assert_eq!(privilege.len(), 3);
        assert!(privilege.iter().all(|s| s.in_vm && s.short.starts_with("priv-")));
    }
}
