//! The printed report: kernel support, the kernel × command matrix, timings, and the console
//! output of whatever failed. This is the program's output, so it goes to stdout.

use std::fs;

use serde_json::{json, Value};

use super::guest::{GuestCommand, PROBED_FUNCTIONS};
use super::qemu::{VmConfig, VmExit};
use super::results::{command_output, Status};
use super::{mib, BootRun, KernelRun};

/// Kernel config options shown in the support table.
const CONFIG_SHOWN: &[&str] = &[
    "CONFIG_DEBUG_INFO_BTF",
    "CONFIG_KPROBES",
    "CONFIG_DYNAMIC_FTRACE_WITH_DIRECT_CALLS",
    "CONFIG_FPROBE",
    "CONFIG_BPF_JIT",
];
/// Console lines shown for a failed command or VM.
pub(super) const EXCERPT_LINES: usize = 40;

/// How the VM as a whole ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VmVerdict {
    /// Init ran every command and powered off.
    Completed,
    TimedOut,
    /// QEMU exited before init said it was done (kernel panic, init died, QEMU error).
    Died,
}

fn verdict(run: &BootRun) -> VmVerdict {
    match run.vm.exit {
        VmExit::TimedOut => VmVerdict::TimedOut,
        VmExit::Exited(status) if status.success() && run.guest.done_at.is_some() => {
            VmVerdict::Completed
        }
        VmExit::Exited(_) => VmVerdict::Died,
    }
}

pub fn all_passed(runs: &[KernelRun], commands: &[GuestCommand]) -> bool {
    runs.iter().all(|r| match &r.outcome {
        Ok(run) => {
            verdict(run) == VmVerdict::Completed
                && commands
                    .iter()
                    .all(|c| run.guest.status(&c.name, run.vm.exit) == Status::Pass)
        }
        Err(_) => false,
    })
}

pub fn print(runs: &[KernelRun], commands: &[GuestCommand], config: &VmConfig) {
    let booted: Vec<(&str, &BootRun)> = runs
        .iter()
        .filter_map(|r| r.outcome.as_ref().ok().map(|b| (r.requested.as_str(), b)))
        .collect();

    println!();
    println!("== kernel support (probed inside each guest; CONFIG_* from the package) ==");
    let mut header = vec![String::new()];
    header.extend(booted.iter().map(|(label, _)| label.to_string()));
    let mut rows = Vec::new();
    let mut row = |name: &str, cell: &dyn Fn(&BootRun) -> String| {
        let mut r = vec![name.to_string()];
        r.extend(booted.iter().map(|(_, b)| cell(b)));
        rows.push(r);
    };
    let feature = |b: &BootRun, key: &str| b.guest.feature(key).unwrap_or("?").to_string();
    row("package", &|b| b.kernel.package.clone());
    row("release (uname -r)", &|b| feature(b, "release"));
    row("/sys/kernel/btf/vmlinux", &|b| feature(b, "btf"));
    row("kprobe_events", &|b| feature(b, "kprobe_events"));
    row("test kprobe attaches", &|b| feature(b, "kprobe_attach"));
    row("lockdown", &|b| feature(b, "lockdown"));
    row("bpf_jit_enable", &|b| feature(b, "bpf_jit"));
    for option in CONFIG_SHOWN {
        row(option, &|b| {
            b.config
                .get(*option)
                .cloned()
                .unwrap_or_else(|| "n".to_string())
        });
    }
    for function in PROBED_FUNCTIONS {
        row(&format!("{function} (symbol, ftrace)"), &|b| {
            let (symbol, ftrace) = function_support(b, function);
            format!("{symbol}, {ftrace}")
        });
    }
    print_table(&header, &rows);

    println!();
    println!(
        "== results (QEMU TCG, {} vCPU, {} MiB, timeout {} s) ==",
        config.cpus,
        config.memory_mib,
        config.timeout.as_secs()
    );
    let mut header = vec!["kernel".to_string(), "vm".to_string()];
    header.extend(commands.iter().map(|c| c.name.clone()));
    let rows: Vec<Vec<String>> = runs
        .iter()
        .map(|r| {
            let mut row = vec![r.requested.clone()];
            match &r.outcome {
                Ok(b) => {
                    row.push(verdict_text(verdict(b)).to_string());
                    row.extend(
                        commands
                            .iter()
                            .map(|c| b.guest.status(&c.name, b.vm.exit).to_string()),
                    );
                }
                Err(_) => {
                    row.push("SETUP-ERROR".to_string());
                    row.extend(commands.iter().map(|_| Status::NotRun.to_string()));
                }
            }
            row
        })
        .collect();
    print_table(&header, &rows);

    println!();
    println!("== timings (seconds; guest times are uptimes read inside the guest) ==");
    let mut header: Vec<String> = [
        "kernel",
        "fetch",
        "initramfs",
        "size MiB",
        "VM wall",
        "init at",
        "ready at",
        "done at",
    ]
    .map(String::from)
    .to_vec();
    header.extend(commands.iter().map(|c| c.name.clone()));
    let secs = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |s| format!("{s:.1}"));
    let rows: Vec<Vec<String>> = booted
        .iter()
        .map(|(label, b)| {
            let mut row = vec![
                label.to_string(),
                format!(
                    "{:.1}{}",
                    b.fetch_time.as_secs_f64(),
                    if b.kernel.downloaded { "" } else { " (cached)" }
                ),
                format!("{:.1}", b.build_time.as_secs_f64()),
                format!("{:.1}", mib(b.initramfs.compressed_bytes)),
                format!("{:.1}", b.vm.elapsed.as_secs_f64()),
                secs(b.guest.init_at),
                secs(b.guest.ready_at),
                secs(b.guest.done_at),
            ];
            row.extend(
                commands
                    .iter()
                    .map(|c| secs(b.guest.command(&c.name).and_then(|r| r.duration()))),
            );
            row
        })
        .collect();
    print_table(&header, &rows);

    print_problems(runs, commands);
}

/// The same facts as the printed report, for tools (the README's compatibility table).
pub fn to_json(runs: &[KernelRun], commands: &[GuestCommand], config: &VmConfig) -> Value {
    let kernels: Vec<Value> = runs
        .iter()
        .map(|r| match &r.outcome {
            Err(e) => json!({ "requested": r.requested, "error": format!("{e:#}") }),
            Ok(b) => {
                let features: serde_json::Map<String, Value> = b
                    .guest
                    .features
                    .iter()
                    .filter(|(key, _)| key != "function")
                    .map(|(key, value)| (key.clone(), json!(value)))
                    .collect();
                let functions: serde_json::Map<String, Value> = PROBED_FUNCTIONS
                    .iter()
                    .map(|f| {
                        let (symbol, ftrace) = function_support(b, f);
                        (f.to_string(), json!({ "symbol": symbol, "ftrace": ftrace }))
                    })
                    .collect();
                let config_shown: serde_json::Map<String, Value> = CONFIG_SHOWN
                    .iter()
                    .map(|o| (o.to_string(), json!(b.config.get(*o).map_or("n", String::as_str))))
                    .collect();
                let results: Vec<Value> = commands
                    .iter()
                    .map(|c| {
                        let record = b.guest.command(&c.name);
                        json!({
                            "name": c.name,
                            "status": b.guest.status(&c.name, b.vm.exit).to_string(),
                            "exit_code": record.and_then(|r| r.finished.as_ref()).map(|f| f.exit_code),
                            "seconds": record.and_then(|r| r.duration()).map(rounded),
                        })
                    })
                    .collect();
                json!({
                    "requested": r.requested,
                    "package": b.kernel.package,
                    "release": b.kernel.release,
                    "vm": verdict_text(verdict(b)),
                    "features": features,
                    "functions": functions,
                    "config": config_shown,
                    "warnings": b.guest.warnings,
                    "commands": results,
                    "seconds": {
                        "fetch": rounded(b.fetch_time.as_secs_f64()),
                        "initramfs": rounded(b.build_time.as_secs_f64()),
                        "vm_wall": rounded(b.vm.elapsed.as_secs_f64()),
                        "guest_init": b.guest.init_at,
                        "guest_ready": b.guest.ready_at,
                        "guest_done": b.guest.done_at,
                    },
                    "console_log": b.files.console_log,
                })
            }
        })
        .collect();
    json!({
        "accelerator": "tcg",
        "cpus": config.cpus,
        "memory_mib": config.memory_mib,
        "passed": all_passed(runs, commands),
        "kernels": kernels,
    })
}

fn verdict_text(v: VmVerdict) -> &'static str {
    match v {
        VmVerdict::Completed => "ok",
        VmVerdict::TimedOut => "TIMEOUT",
        VmVerdict::Died => "DIED",
    }
}

/// For a function: whether /proc/kallsyms has it as text (or only clones of it), and whether
/// ftrace lists it as traceable (what fentry and ftrace-based kprobes need).
fn function_support(b: &BootRun, function: &str) -> (String, String) {
    let prefix = format!("{function} ");
    let line = b
        .guest
        .features_named("function")
        .find(|v| v.starts_with(&prefix))
        .unwrap_or_default();
    let value = |key: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
            .unwrap_or("?")
            .replace(',', " ")
    };
    (value("symbol"), value("ftrace"))
}

/// Seconds rounded to 10 ms, for JSON.
fn rounded(seconds: f64) -> f64 {
    (seconds * 100.0).round() / 100.0
}

fn print_problems(runs: &[KernelRun], commands: &[GuestCommand]) {
    for r in runs {
        let b = match &r.outcome {
            Ok(b) => b,
            Err(e) => {
                println!();
                println!("== {}: set-up failed ==", r.requested);
                println!("{e:#}");
                continue;
            }
        };
        let console = fs::read_to_string(&b.files.console_log).unwrap_or_default();
        let v = verdict(b);
        let failed: Vec<&GuestCommand> = commands
            .iter()
            .filter(|c| {
                !matches!(
                    b.guest.status(&c.name, b.vm.exit),
                    Status::Pass | Status::NotRun
                )
            })
            .collect();
        if b.guest.warnings.is_empty() && failed.is_empty() && v == VmVerdict::Completed {
            continue;
        }
        println!();
        println!("== {} ({}) ==", r.requested, b.kernel.package);
        for w in &b.guest.warnings {
            println!("guest warning: {w}");
        }
        for c in failed {
            println!(
                "--- {} {} (last {EXCERPT_LINES} console lines):",
                c.name,
                b.guest.status(&c.name, b.vm.exit)
            );
            print_tail(&command_output(&console, &c.name));
        }
        if v != VmVerdict::Completed {
            println!(
                "--- VM {} after {:.1} s; console tail ({}):",
                verdict_text(v),
                b.vm.elapsed.as_secs_f64(),
                b.files.console_log.display()
            );
            print_tail(&console.lines().collect::<Vec<_>>());
            println!("(QEMU's own messages: {})", b.files.qemu_log.display());
        }
    }
}

/// The last [`EXCERPT_LINES`] of a log, indented.
pub(super) fn print_tail(lines: &[&str]) {
    for line in &lines[lines.len().saturating_sub(EXCERPT_LINES)..] {
        println!("    {}", line.trim_end_matches('\r'));
    }
}

/// A plain-text table with columns padded to their widest cell.
pub(super) fn print_table(header: &[String], rows: &[Vec<String>]) {
    let columns = header.len();
    let widths: Vec<usize> = (0..columns)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .chain(std::iter::once(&header[i]))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: &[String]| {
        let text: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", text.join("  ").trim_end());
    };
    line(header);
    for row in rows {
        line(row);
    }
}
