//! The matrix's results: built from a guest's report ([`from_boot`]), printed (stdout: it is the
//! program's output) and written as JSON (the input of the README's compatibility table).

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use serde_json::{json, Value};

use super::matrix::{
    attempts_from_data, check_command_name, combine_attempts, first_line, panic_message,
    scenario_command_name, Cell, CheckReport, CheckRun, KernelResult, Method, MethodResult, Place,
    Scenario, ScenarioResult, Support, VmFacts, NOT_APPLICABLE_EXIT,
};
use super::qemu::VmExit;
use super::report::{print_table, print_tail, EXCERPT_LINES};
use super::results::{command_output, Status};
use super::BootRun;

/// Why the 1000-connection scenario is not run in the VMs by default.
pub const SCALE_SKIPPED: &str =
    "host only by default (it once crashed a TCG guest during fentry patching); --scenario scale forces it";

/// The matrix results of one booted guest.
pub fn from_boot(
    label: &str,
    boot: &BootRun,
    methods: &[Method],
    scenarios: &[Scenario],
) -> KernelResult {
    let console = fs::read_to_string(&boot.files.console_log).unwrap_or_default();
    let guest = &boot.guest;
    let exit = boot.vm.exit;
    let verdict = match exit {
        VmExit::TimedOut => "TIMEOUT",
        VmExit::Exited(status) if status.success() && guest.done_at.is_some() => "ok",
        VmExit::Exited(_) => "DIED",
    };
    let mut results = Vec::new();
    for &method in methods {
        let check_name = check_command_name(method);
        let check_status = guest.status(&check_name, exit);
        let exit_code = match check_status {
            Status::Pass => Some(0),
            Status::Fail(code) => Some(code),
            _ => None,
        };
        let report = CheckReport::parse(&guest.data_of(&check_name).collect::<Vec<_>>().join("\n"));
        let support = Support::decide(method, exit_code, &report);
        let check = CheckRun {
            exit_code,
            report,
            seconds: guest.command(&check_name).and_then(|c| c.duration()),
        };
        let mut cells = Vec::new();
        for scenario in scenarios {
            if !scenario.in_vm {
                cells.push(ScenarioResult {
                    scenario: *scenario,
                    cell: Cell::Skipped(SCALE_SKIPPED.to_string()),
                    seconds: None,
                    log: None,
                });
                continue;
            }
            let name = scenario_command_name(method, scenario);
            let attempts = attempts_from_data(scenario.test, guest.data_of(&name));
            let output = command_output(&console, &name).join("\n");
            // The console holds the panic messages the data lines lack (first failure first).
            let with_message = |cell: Cell| match cell {
                Cell::Fail(d) if d.starts_with("the test binary exited") => {
                    Cell::Fail(panic_message(&output).unwrap_or(d))
                }
                Cell::Flaky(d) if d.starts_with("the test binary exited") => {
                    Cell::Flaky(panic_message(&output).unwrap_or(d))
                }
                other => other,
            };
            let cell = match (guest.status(&name, exit), &support) {
                (Status::Pass | Status::Fail(_), _) if !attempts.is_empty() => {
                    with_message(combine_attempts(attempts))
                }
                (Status::Pass, _) => Cell::Fail("the guest reported no test result".to_string()),
                (Status::Fail(NOT_APPLICABLE_EXIT), Support::NotApplicable(_)) => {
                    Cell::NotApplicable
                }
                (Status::Fail(NOT_APPLICABLE_EXIT), Support::CheckFailed(why)) => {
                    Cell::NotRun(why.clone())
                }
                (Status::Fail(NOT_APPLICABLE_EXIT), Support::Supported) => Cell::Fail(format!(
                    "skipped in the guest although check reached {} with {method}",
                    super::matrix::DECIDING_HOOK
                )),
                (Status::Fail(code), _) => Cell::Fail(
                    panic_message(&output)
                        .unwrap_or_else(|| format!("the test binary exited {code}")),
                ),
                (Status::Timeout, _) => Cell::Fail("timed out".to_string()),
                (Status::VmDied, _) => Cell::Fail("the VM died while it ran".to_string()),
                (Status::NotRun, _) => Cell::NotRun(format!("the VM ended ({verdict}) first")),
            };
            cells.push(ScenarioResult {
                scenario: *scenario,
                cell,
                seconds: guest.command(&name).and_then(|c| c.duration()),
                log: Some(boot.files.console_log.clone()),
            });
        }
        results.push(MethodResult {
            method,
            check: Some(check),
            support,
            scenarios: cells,
        });
    }
    KernelResult {
        label: label.to_string(),
        place: Place::Vm,
        release: guest.feature("release").map(str::to_string),
        version: guest.feature("version").map(str::to_string),
        error: None,
        vm: Some(VmFacts {
            package: boot.kernel.package.clone(),
            verdict,
            downloaded: boot.kernel.downloaded,
            fetch_seconds: boot.fetch_time.as_secs_f64(),
            initramfs_seconds: boot.build_time.as_secs_f64(),
            wall_seconds: boot.vm.elapsed.as_secs_f64(),
            console_log: boot.files.console_log.clone(),
            features: guest.features.clone(),
            warnings: guest.warnings.clone(),
        }),
        methods: results,
        wall_seconds: boot.fetch_time.as_secs_f64()
            + boot.build_time.as_secs_f64()
            + boot.vm.elapsed.as_secs_f64(),
    }
}

/// Wall times of the whole run, for the report and the JSON.
#[derive(Debug, Clone, Default)]
pub struct Timings {
    pub build_seconds: f64,
    pub total_seconds: f64,
    /// Guest vCPUs.
    pub vm_cpus: u32,
}

pub fn all_passed(kernels: &[KernelResult]) -> bool {
    kernels.iter().all(KernelResult::passed)
}

/// The `check` column: ok, degraded (some hook reached by nothing), N/A, FAIL.
fn check_label(m: &MethodResult) -> String {
    match &m.support {
        Support::Supported => {
            let unreached = m
                .check
                .as_ref()
                .map(|c| c.report.unreached().len())
                .unwrap_or(0);
            if unreached == 0 {
                "ok".to_string()
            } else {
                format!("degraded({unreached})")
            }
        }
        Support::NotApplicable(_) => "N/A".to_string(),
        Support::CheckFailed(_) => "FAIL".to_string(),
    }
}

fn kernel_label(k: &KernelResult) -> String {
    match (&k.place, &k.release) {
        (Place::Host, Some(r)) => format!("host {r}"),
        _ => k.label.clone(),
    }
}

pub fn print(kernels: &[KernelResult], scenarios: &[Scenario], timings: &Timings) {
    println!();
    println!("== matrix: kernel × attach method × scenario ==");
    println!("(N/A: the kernel does not support the method; FLAKY: failed, then passed when run again; skip: not run here by default)");
    let mut header: Vec<String> = ["kernel", "method", "check"].map(String::from).to_vec();
    header.extend(scenarios.iter().map(|s| s.short.to_string()));
    let mut rows = Vec::new();
    for k in kernels {
        if let Some(e) = &k.error {
            let mut row = vec![kernel_label(k), "-".into(), "SETUP-ERROR".into()];
            row.extend(scenarios.iter().map(|_| "NOT-RUN".to_string()));
            rows.push(row);
            log::debug!("{}: {e}", k.label);
            continue;
        }
        for m in &k.methods {
            let mut row = vec![kernel_label(k), m.method.to_string(), check_label(m)];
            row.extend(m.scenarios.iter().map(|s| s.cell.label().to_string()));
            rows.push(row);
        }
    }
    print_table(&header, &rows);

    let na: Vec<String> = kernels
        .iter()
        .flat_map(|k| {
            k.methods.iter().filter_map(move |m| match &m.support {
                Support::NotApplicable(why) => {
                    Some(format!("  {} {}: {why}", kernel_label(k), m.method))
                }
                _ => None,
            })
        })
        .collect();
    if !na.is_empty() {
        println!();
        println!("N/A (the kernel does not support the method; not a failure):");
        for line in na {
            println!("{line}");
        }
    }

    println!();
    println!("== hooks: what `keepalive-agent check --attach METHOD` reached them with ==");
    let mut hooks: Vec<String> = Vec::new();
    for m in kernels.iter().flat_map(|k| &k.methods) {
        for h in m.check.iter().flat_map(|c| &c.report.hooks) {
            if !hooks.contains(&h.hook) {
                hooks.push(h.hook.clone());
            }
        }
    }
    let mut header: Vec<String> = ["kernel", "method"].map(String::from).to_vec();
    header.extend(hooks.iter().cloned());
    header.push("reset reasons".to_string());
    let mut rows = Vec::new();
    for k in kernels {
        for m in &k.methods {
            let Some(check) = &m.check else { continue };
            let mut row = vec![kernel_label(k), m.method.to_string()];
            row.extend(hooks.iter().map(|h| {
                check
                    .report
                    .hook(h)
                    .map_or_else(|| "-".to_string(), |l| l.kind.clone())
            }));
            row.push(
                check
                    .report
                    .reset_reasons
                    .clone()
                    .unwrap_or_else(|| "-".to_string()),
            );
            rows.push(row);
        }
    }
    print_table(&header, &rows);

    println!();
    println!("== timings (seconds) ==");
    let mut header: Vec<String> = ["kernel", "method", "check"].map(String::from).to_vec();
    header.extend(scenarios.iter().map(|s| s.short.to_string()));
    let secs = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |s| format!("{s:.1}"));
    let mut rows = Vec::new();
    for k in kernels {
        for m in &k.methods {
            let mut row = vec![
                kernel_label(k),
                m.method.to_string(),
                secs(m.check.as_ref().and_then(|c| c.seconds)),
            ];
            row.extend(m.scenarios.iter().map(|s| secs(s.seconds)));
            rows.push(row);
        }
    }
    print_table(&header, &rows);
    println!();
    println!("build (cargo): {:.1}", timings.build_seconds);
    for k in kernels {
        match &k.vm {
            Some(vm) => println!(
                "{}: {:.1} (fetch {:.1}{}, initramfs {:.1}, VM {:.1}, {})",
                kernel_label(k),
                k.wall_seconds,
                vm.fetch_seconds,
                if vm.downloaded { " downloaded" } else { " cached" },
                vm.initramfs_seconds,
                vm.wall_seconds,
                vm.package
            ),
            None => println!("{}: {:.1}", kernel_label(k), k.wall_seconds),
        }
    }
    println!("total wall time: {:.1}", timings.total_seconds);

    print_problems(kernels);
}

fn print_problems(kernels: &[KernelResult]) {
    for k in kernels {
        if let Some(e) = &k.error {
            println!();
            println!("== {}: set-up failed ==", kernel_label(k));
            println!("{e}");
            continue;
        }
        if let Some(vm) = &k.vm {
            if vm.verdict != "ok" || !vm.warnings.is_empty() {
                println!();
                println!("== {} ({}): VM {} ==", kernel_label(k), vm.package, vm.verdict);
                for w in &vm.warnings {
                    println!("guest warning: {w}");
                }
                if vm.verdict != "ok" {
                    let console = fs::read_to_string(&vm.console_log).unwrap_or_default();
                    let lines: Vec<&str> = console.lines().collect();
                    println!("--- console tail ({}):", vm.console_log.display());
                    print_tail(&lines);
                }
            }
        }
        for m in &k.methods {
            if let Support::CheckFailed(why) = &m.support {
                println!();
                println!("== {} {}: check failed: {why} ==", kernel_label(k), m.method);
            }
            // Unreached hooks matter only where the method is supported (elsewhere they are the
            // reason it is not).
            if let (Some(check), Support::Supported) = (&m.check, &m.support) {
                for h in check.report.unreached() {
                    println!();
                    println!(
                        "== {} --attach {}: hook {} reached by nothing ==",
                        kernel_label(k),
                        m.method,
                        h.hook
                    );
                    for r in &h.rejected {
                        println!("{} {}:", r.kind, r.target);
                        let lines: Vec<&str> = r.reason.lines().collect();
                        print_tail(&lines);
                    }
                }
            }
            for s in &m.scenarios {
                let (Cell::Fail(detail) | Cell::Flaky(detail)) = &s.cell else { continue };
                println!();
                println!(
                    "== {} {} {}: {}: {detail} ==",
                    kernel_label(k),
                    m.method,
                    s.scenario.short,
                    if matches!(s.cell, Cell::Flaky(_)) {
                        "FLAKY (failed, then passed when run again)"
                    } else {
                        "FAIL"
                    }
                );
                match (&k.place, &s.log) {
                    (Place::Vm, Some(console)) => {
                        let text = fs::read_to_string(console).unwrap_or_default();
                        let name = scenario_command_name(m.method, &s.scenario);
                        println!("--- last {EXCERPT_LINES} lines ({}):", console.display());
                        print_tail(&command_output(&text, &name));
                    }
                    (Place::Host, Some(log)) => {
                        let text = fs::read_to_string(log).unwrap_or_default();
                        println!("--- last {EXCERPT_LINES} lines ({}):", log.display());
                        print_tail(&text.lines().collect::<Vec<_>>());
                    }
                    _ => {}
                }
            }
        }
    }
}


/// The matrix as JSON (see the README's compatibility section for what reads it).
pub fn to_json(kernels: &[KernelResult], scenarios: &[Scenario], methods: &[Method], timings: &Timings) -> Value {
    let kernels: Vec<Value> = kernels.iter().map(kernel_json).collect();
    json!({
        "generated": utc_now(),
        "methods": methods.iter().map(|m| m.name()).collect::<Vec<_>>(),
        "scenarios": scenarios.iter().map(|s| json!({"test": s.test, "short": s.short, "in_vm": s.in_vm})).collect::<Vec<_>>(),
        "passed": kernels.iter().all(|k| k["passed"] == true),
        "seconds": {
            "build": rounded(timings.build_seconds),
            "total": rounded(timings.total_seconds),
        },
        "vm_cpus": timings.vm_cpus,
        "host_cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "kernels": kernels,
    })
}

fn kernel_json(k: &KernelResult) -> Value {
    let methods: Vec<Value> = k.methods.iter().map(method_json).collect();
    let vm = k.vm.as_ref().map(|vm| {
        let features: BTreeMap<&str, &str> = vm
            .features
            .iter()
            .filter(|(key, _)| key != "function")
            .map(|(key, value)| (key.as_str(), value.as_str()))
            .collect();
        json!({
            "package": vm.package,
            "verdict": vm.verdict,
            "downloaded": vm.downloaded,
            "features": features,
            "warnings": vm.warnings,
            "console_log": vm.console_log,
            "seconds": {
                "fetch": rounded(vm.fetch_seconds),
                "initramfs": rounded(vm.initramfs_seconds),
                "vm": rounded(vm.wall_seconds),
            },
        })
    });
    json!({
        "label": k.label,
        "place": match k.place { Place::Vm => "qemu-tcg", Place::Host => "host" },
        "release": k.release,
        "version": k.version,
        "error": k.error,
        "passed": k.passed(),
        "vm": vm,
        "seconds": rounded(k.wall_seconds),
        "methods": methods,
    })
}

fn method_json(m: &MethodResult) -> Value {
    let (status, reason) = match &m.support {
        Support::Supported => ("supported", None),
        Support::NotApplicable(why) => ("n/a", Some(why.clone())),
        Support::CheckFailed(why) => ("check-failed", Some(why.clone())),
    };
    let check = m.check.as_ref().map(|c| {
        json!({
            "exit_code": c.exit_code,
            "seconds": c.seconds.map(rounded),
            "kernel": c.report.kernel,
            "reset_reasons": c.report.reset_reasons,
            "summary": c.report.summary,
            "hooks": c.report.hooks.iter().map(|h| json!({
                "hook": h.hook,
                "method": h.kind,
                "target": h.target,
                "rejected": h.rejected.iter().map(|r| json!({
                    "method": r.kind,
                    "target": r.target,
                    "reason": r.reason,
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        })
    });
    json!({
        "method": m.method.name(),
        "status": status,
        "reason": reason,
        "check": check,
        "scenarios": m.scenarios.iter().map(|s| json!({
            "test": s.scenario.test,
            "short": s.scenario.short,
            "status": s.cell.label(),
            "detail": s.cell.detail(),
            "seconds": s.seconds.map(rounded),
            "log": s.log,
        })).collect::<Vec<_>>(),
    })
}

/// Seconds rounded to 10 ms.
fn rounded(seconds: f64) -> f64 {
    (seconds * 100.0).round() / 100.0
}

/// The current UTC time as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    utc_from_unix(secs)
}

/// Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
fn utc_from_unix(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Writes `value` to `path` (pretty JSON).
pub fn write_json(path: &Path, value: &Value) -> anyhow::Result<()> {
    use anyhow::Context as _;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::write(path, serde_json::to_string_pretty(value)? + "\n")
        .with_context(|| format!("writing {}", path.display()))
}

/// One line for logs: "6.1 fentry: 7 PASS, 0 FAIL".
pub fn summary_line(k: &KernelResult) -> String {
    let mut parts = Vec::new();
    for m in &k.methods {
        let pass = m.scenarios.iter().filter(|s| s.cell == Cell::Pass).count();
        let flaky = m.scenarios.iter().filter(|s| matches!(s.cell, Cell::Flaky(_))).count();
        let fail = m.scenarios.iter().filter(|s| s.cell.is_failure()).count();
        parts.push(match &m.support {
            Support::Supported => format!("{} {pass} PASS {flaky} FLAKY {fail} FAIL", m.method),
            Support::NotApplicable(why) => format!("{} N/A ({})", m.method, first_line(why)),
            Support::CheckFailed(why) => format!("{} check FAILED ({why})", m.method),
        });
    }
    format!("{}: {}", kernel_label(k), parts.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(utc_from_unix(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_from_unix(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc_from_unix(1_795_000_000), "2026-11-18T11:06:40Z");
    }

    #[test]
    fn kernels_pass_only_without_failures() {
        let scenario = super::super::matrix::SCENARIOS[0];
        let method = |cell: Cell, support: Support| MethodResult {
            method: Method::Kprobe,
            check: None,
            support,
            scenarios: vec![ScenarioResult { scenario, cell, seconds: None, log: None }],
        };
        let kernel = |methods| KernelResult {
            label: "6.1".into(),
            place: Place::Host,
            release: None,
            version: None,
            error: None,
            vm: None,
            methods,
            wall_seconds: 0.0,
        };
        assert!(kernel(vec![method(Cell::Pass, Support::Supported)]).passed());
        assert!(kernel(vec![method(Cell::NotApplicable, Support::NotApplicable("x".into()))]).passed());
        assert!(kernel(vec![method(Cell::Skipped("x".into()), Support::Supported)]).passed());
        assert!(!kernel(vec![method(Cell::Fail("x".into()), Support::Supported)]).passed());
        assert!(!kernel(vec![method(Cell::NotRun("x".into()), Support::CheckFailed("y".into()))]).passed());
        assert!(!KernelResult::failed("6.12", Place::Vm, "boom".into(), 0.0).passed());
    }
}
