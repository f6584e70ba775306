//! `cargo xtask bench`: what the agent costs the host, and how far it scales, measured on the real
//! kernel; results written to BENCHMARKS.md with the machine they were measured on.
//!
//! Parts (run all, or some with `--parts`):
//! - `engine`: criterion benchmark of decoder + timeline engine throughput (`keepalive-agent/benches/engine.rs`);
//! - `kernel`: in-kernel cost of each agent program from BPF run-time statistics, under timers
//!   that are not keep-alive timers and under keep-alive load, against reference programs;
//! - `overhead`: loopback TCP request/response throughput with and without the agent, interleaved;
//! - `scale`: as many keep-alive connections as asked, probing every second: events handled, lost
//!   events, agent CPU and memory;
//! - `observers` (alias `polling`): the same keep-alive connections watched one observer at a time,
//!   `ss -tnoi` once a second, `trace --format json` and `run` to a file, at several sizes: CPU per
//!   second of each, the agent's BPF run time above the empty-program floor, what each saw;
//! - `audit`: one `keepalive-agent audit` of many sockets: wall time, CPU, peak RSS;
//! - `hostload`: nginx served to `wrk` on loopback (new connection per request, and keep-alive
//!   requests), with and without the agent: the agent's process and BPF time over the machine's
//!   busy CPU time in the same window.
//!
//! Everything runs in network namespaces the bench creates (loopback only) with the agent's cgroup
//! program on a cgroup the bench creates; all of it is removed afterwards. Each part's results are
//! kept in `target/bench/<part>.json` so that a partial run refreshes only its parts of the report;
//! `--baseline DIR` keeps another results directory (a previous binary's) as the "before" columns.

mod agent;
mod audit;
mod bpf;
mod engine;
mod hostload;
mod kernel;
mod load;
mod observers;
mod overhead;
mod report;
mod scale;
mod sys;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use clap::{Args, ValueEnum};
use log::{info, warn};


/// A part of the benchmark suite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum Part {
    Engine,
    Kernel,
    Overhead,
    Scale,
    #[value(alias = "polling")]
    Observers,
    Audit,
    Hostload,
}

impl Part {
    pub fn key(self) -> &'static str {
        match self {
            Part::Engine => "engine",
            Part::Kernel => "kernel",
            Part::Overhead => "overhead",
            Part::Scale => "scale",
            Part::Observers => "observers",
            Part::Audit => "audit",
            Part::Hostload => "hostload",
        }
    }

    pub const ALL: [Part; 7] =
        [Part::Engine, Part::Kernel, Part::Overhead, Part::Scale, Part::Observers, Part::Audit, Part::Hostload];
}

/// `cargo xtask bench` options.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Parts to run (comma-separated); default: all.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub parts: Vec<Part>,
    /// Use this agent binary instead of building `target/release/keepalive-agent`.
    #[arg(long, value_name = "PATH")]
    pub agent: Option<PathBuf>,
    /// Where to write the report.
    #[arg(long, value_name = "PATH", default_value = "BENCHMARKS.md")]
    pub output: PathBuf,
    /// Where each part's results are kept between runs (default: target/bench). Use another
    /// directory for trial runs that must not replace the results the report is made of.
    #[arg(long, value_name = "DIR")]
    pub results: Option<PathBuf>,
    /// Only rewrite the report from the results kept in target/bench (after editing notes.md).
    #[arg(long)]
    pub report_only: bool,
    /// Results directory of an earlier run (e.g. of the binary before a fix, measured with
    /// `--agent OLD --results DIR`): copied into `<results>/baseline/` and shown as "before" next
    /// to every measure of the same name. Kept there for `--report-only` until replaced.
    #[arg(long, value_name = "DIR")]
    pub baseline: Option<PathBuf>,
    /// Run even when the machine is busy (more than a quarter of its CPU time in use before starting).
    #[arg(long)]
    pub allow_busy: bool,

    /// engine: connections in the generated event stream.
    #[arg(long, default_value_t = 10_000)]
    pub engine_connections: usize,
    /// engine: criterion measurement time per benchmark, seconds.
    #[arg(long, default_value_t = 8)]
    pub engine_measure_s: u64,

    /// kernel: length of each measurement window, seconds.
    #[arg(long, default_value_t = 15)]
    pub kernel_window_s: u64,
    /// kernel: threads sleeping on 1 ms socket timeouts (timer_list timers that are not ours).
    #[arg(long, default_value_t = 64)]
    pub kernel_sleepers: usize,
    /// kernel: request/response connections during the non-keep-alive window.
    #[arg(long, default_value_t = 16)]
    pub kernel_rr_connections: usize,
    /// kernel: keep-alive connections (probing every second) during the keep-alive window.
    #[arg(long, default_value_t = 5_000)]
    pub kernel_ka_connections: usize,

    /// kernel, overhead: do not also measure the agent restricted to raw tracepoints
    /// (`--attach raw-tracepoint`, the path for kernels without BTF-typed tracepoints).
    #[arg(long)]
    pub no_raw_comparison: bool,

    /// overhead: request/response connections (two threads each).
    #[arg(long, default_value_t = 32)]
    pub rr_connections: usize,
    /// overhead: request and response size, bytes.
    #[arg(long, default_value_t = 64)]
    pub rr_message: usize,
    /// overhead: do not pin each connection's two threads to one CPU (pinning is the default: it
    /// keeps every transaction on one CPU and takes scheduler noise out of the comparison).
    #[arg(long)]
    pub rr_no_pin: bool,
    /// overhead: length of each phase of the fine interleaving (the agent's programs attached and
    /// detached by the bench), milliseconds.
    #[arg(long, default_value_t = 200)]
    pub overhead_phase_ms: u64,
    /// overhead: duration of the fine interleaving per agent mode, seconds.
    #[arg(long, default_value_t = 120)]
    pub overhead_toggle_s: u64,
    /// overhead: attach each of the agent's programs this many times in the fine interleaving
    /// (a diagnostic: the cost of one copy is then the measured cost divided by N; default 1).
    #[arg(long, default_value_t = 1)]
    pub overhead_copies: usize,
    /// overhead: off/on pairs.
    #[arg(long, default_value_t = 8)]
    pub overhead_reps: usize,
    /// overhead: length of each window, seconds.
    #[arg(long, default_value_t = 6)]
    pub overhead_window_s: u64,

    /// scale: keep-alive connections (idle 1 s, interval 1 s).
    #[arg(long, default_value_t = 20_000)]
    pub connections: usize,
    /// scale: measurement window after warm-up, seconds.
    #[arg(long, default_value_t = 30)]
    pub scale_window_s: u64,
    /// observers: connection counts, one setup each (comma-separated; the first is the one the
    /// targets are stated at, the last is compared with it per connection).
    #[arg(long, value_delimiter = ',', default_values_t = [5_000, 20_000])]
    pub observer_connections: Vec<usize>,
    /// observers: measurement window of each observer, seconds.
    #[arg(long, default_value_t = 20)]
    pub observer_window_s: u64,
    /// observers: warm-up after the connections are made and after each agent starts, seconds.
    #[arg(long, default_value_t = 5)]
    pub observer_warmup_s: u64,
    /// hostload: length of each window (one wrk run), seconds.
    #[arg(long, default_value_t = 8)]
    pub hostload_window_s: u64,
    /// hostload: rounds of (without agent, `run`, `run --all-closes`) per workload.
    #[arg(long, default_value_t = 2)]
    pub hostload_reps: usize,
    /// hostload: wrk connections (wrk uses one thread per CPU, at most this many).
    #[arg(long, default_value_t = 16)]
    pub hostload_connections: usize,
    /// audit: sockets to audit (half as many loopback connections).
    #[arg(long, default_value_t = 100_000)]
    pub audit_sockets: usize,
    /// audit: audit runs over the same sockets.
    #[arg(long, default_value_t = 3)]
    pub audit_runs: usize,
    /// Agent ring buffer size in bytes (power of two); default: the agent's own default.
    #[arg(long)]
    pub ringbuf_size: Option<u32>,

    // Internal: the bench runs itself as connection holder processes (see load::KaFarm).
    #[arg(long, hide = true)]
    pub holder_netns: Option<PathBuf>,
    #[arg(long, hide = true, value_delimiter = ',')]
    pub holder_targets: Vec<std::net::SocketAddrV4>,
    #[arg(long, hide = true, default_value_t = 0)]
    pub holder_count: usize,
    #[arg(long, hide = true, default_value_t = 0)]
    pub holder_offset: usize,
    #[arg(long, hide = true, value_delimiter = ',')]
    pub holder_keepalive: Vec<i32>,
}

/// What every part gets.
pub struct Ctx<'a> {
    pub workspace: &'a Path,
    pub args: &'a BenchArgs,
    /// Agent binary (None when only the engine part runs).
    pub agent_bin: Option<PathBuf>,
    /// The cgroup the bench moved itself into (for the agent's `--cgroup`).
    pub cgroup: Option<&'a sys::Cgroup>,
}

/// A way to run the agent that a part compares.
#[derive(Debug, Clone)]
pub struct Mode {
    /// Short name for tables (`auto`, `raw-tracepoint`).
    pub name: &'static str,
    pub args: Vec<String>,
}

impl Mode {
    /// The same mode with the probe-answer program attached all the time (by default it is
    /// attached only while keep-alive probes are unanswered).
    pub fn answers_always(mut self) -> Mode {
        self.args.extend(["--probe-answers".to_string(), "always".to_string()]);
        self
    }

    /// The agent's command-line flags of this mode, in full.
    pub fn flags(&self) -> String {
        if self.args.iter().any(|a| a == "--attach") {
            self.args.join(" ")
        } else {
            std::iter::once("--attach auto".to_string()).chain(self.args.iter().cloned()).collect::<Vec<_>>().join(" ")
        }
    }
}

impl Ctx<'_> {
    /// The agent as shipped (`--attach auto`), and unless `--no-raw-comparison` the agent
    /// restricted to raw tracepoints.
    pub fn modes(&self) -> Vec<Mode> {
        let mut v = vec![Mode { name: "auto", args: Vec::new() }];
        if !self.args.no_raw_comparison {
            v.push(Mode { name: "raw-tracepoint", args: vec!["--attach".into(), "raw-tracepoint".into()] });
        }
        v
    }

    pub fn agent_config(&self, netns: &Path, max_connections: usize) -> Result<agent::AgentConfig> {
        let (Some(binary), Some(cg)) = (&self.agent_bin, self.cgroup) else {
            bail!("internal: the agent is not prepared for this part");
        };
        Ok(agent::AgentConfig {
            binary: binary.clone(),
            command: agent::AgentCommand::Trace,
            netns: Some(netns.to_path_buf()),
            cgroup: cg.path().to_path_buf(),
            max_connections,
            ringbuf_size: self.args.ringbuf_size,
            env: Vec::new(),
            extra_args: Vec::new(),
            stdout_file: None,
        })
    }
}

/// Runs the selected parts and writes the report. Returns whether every target was met.
pub fn run(workspace: &Path, mut args: BenchArgs) -> Result<bool> {
    if let Some(netns) = &args.holder_netns {
        let [idle_s, intvl_s, cnt] = args.holder_keepalive[..] else {
            bail!("--holder-keepalive takes idle,intvl,cnt");
        };
        load::holder_main(&load::HolderArgs {
            netns: netns.clone(),
            targets: args.holder_targets.clone(),
            count: args.holder_count,
            offset: args.holder_offset,
            ka: load::KeepAlive { idle_s, intvl_s, cnt },
        })?;
        return Ok(true);
    }
    if args.report_only {
        let results_dir = results_dir(workspace, &args);
        let out = if args.output.is_absolute() { args.output.clone() } else { workspace.join(&args.output) };
        if let Some(b) = &args.baseline {
            report::keep_baseline(&results_dir, b)?;
        }
        let command = std::fs::read_to_string(results_dir.join("command")).unwrap_or_default();
        let all_met = report::write(&out, &results_dir, &sys::Machine::describe(), command.trim(), &[])?;
        info!("report written to {}", out.display());
        return Ok(all_met);
    }
    // The load generators and the reader of the agent's output run in this process: measure with
    // an optimised build, whatever profile `cargo xtask` used.
    if cfg!(debug_assertions) && std::env::var_os(OPTIMIZED_ENV).is_none() {
        return reexec_optimized(workspace);
    }
    sys::install_interrupt_handler();
    if args.parts.is_empty() {
        args.parts = Part::ALL.to_vec();
    }
    args.parts.sort();
    args.parts.dedup();
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let needs_kernel = args.parts.iter().any(|p| *p != Part::Engine);
    if needs_kernel && !root {
        bail!("the kernel, overhead, scale, observers, audit and hostload parts need root (BPF, network namespaces)");
    }
    let machine = sys::Machine::describe();
    // How busy the machine is right now (the load average would still count our own build).
    let busy = sys::busy_pct(std::time::Duration::from_secs(3));
    if busy > 25.0 {
        let msg = format!("the machine is busy ({busy:.0} % of its {} CPUs in use): numbers would be noise", machine.cpus);
        if args.allow_busy {
            warn!("{msg}; running anyway (--allow-busy)");
        } else {
            bail!("{msg}. Wait for other jobs to finish, or pass --allow-busy.");
        }
    }
    let results_dir = results_dir(workspace, &args);
    std::fs::create_dir_all(&results_dir).with_context(|| results_dir.display().to_string())?;
    if let Some(b) = &args.baseline {
        report::keep_baseline(&results_dir, b)?;
    }

    let agent_bin = if needs_kernel {
        Some(match &args.agent {
            Some(p) => p.clone(),
            None => agent::build_release(workspace)?,
        })
    } else {
        None
    };
    let cgroup = if needs_kernel { Some(sys::Cgroup::enter("agent")?) } else { None };
    let ctx = Ctx { workspace, args: &args, agent_bin, cgroup: cgroup.as_ref() };

    let mut failed = Vec::new();
    for &part in &args.parts {
        info!("== {} ==", part.key());
        let started = std::time::Instant::now();
        let load_before = sys::loadavg();
        let busy_before = sys::busy_pct(std::time::Duration::from_secs(2));
        let res = match part {
            Part::Engine => engine::run(&ctx).map(|s| vec![s]),
            Part::Kernel => kernel::run(&ctx).map(|s| vec![s]),
            Part::Overhead => overhead::run(&ctx).map(|s| vec![s]),
            Part::Scale => scale::run(&ctx).map(|s| vec![s]),
            Part::Observers => observers::run(&ctx).map(|s| vec![s]),
            Part::Audit => audit::run(&ctx).map(|s| vec![s]),
            Part::Hostload => hostload::run(&ctx).map(|s| vec![s]),
        };
        match res {
            Ok(sections) => {
                for mut s in sections {
                    s.stamp(started.elapsed().as_secs_f64(), load_before, busy_before);
                    if let Some(agent) = &args.agent {
                        s.code = format!("{} with agent binary {}", s.code, agent.display());
                    }
                    s.save(&results_dir)?;
                }
            }
            Err(e) => {
                warn!("part {} failed: {e:#}", part.key());
                failed.push((part, format!("{e:#}")));
            }
        }
    }
    drop(cgroup);

    let command = std::env::args().skip(2).collect::<Vec<_>>().join(" ");
    let command = commands_kept(&results_dir, &command, args.parts.len() == Part::ALL.len());
    let _ = std::fs::write(results_dir.join("command"), &command);
    let out = if args.output.is_absolute() { args.output.clone() } else { workspace.join(&args.output) };
    let all_met = report::write(&out, &results_dir, &machine, &command, &failed)?;
    info!("report written to {}", out.display());
    if !failed.is_empty() {
        bail!("{} part(s) failed: {}", failed.len(), failed.iter().map(|(p, _)| p.key()).collect::<Vec<_>>().join(", "));
    }
    Ok(all_met)
}

const OPTIMIZED_ENV: &str = "KEEPALIVE_BENCH_OPTIMIZED";

/// Builds xtask in release and runs `bench` again with it, with the same arguments.
fn reexec_optimized(workspace: &Path) -> Result<bool> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    info!("building xtask (release) to run the benchmarks optimised");
    let status = std::process::Command::new(cargo)
        .current_dir(workspace)
        .args(["build", "--release", "--quiet", "-p", "xtask"])
        .status()
        .context("building xtask in release")?;
    if !status.success() {
        bail!("cargo build --release -p xtask failed ({status})");
    }
    let bin = target_dir(workspace).join("release/xtask");
    // The child handles Ctrl-C itself and cleans up; this process only waits for it.
    // SAFETY: ignoring signals has no preconditions.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGTERM, libc::SIG_IGN);
    }
    let status = std::process::Command::new(&bin)
        .args(std::env::args_os().skip(1))
        .env(OPTIMIZED_ENV, "1")
        .status()
        .with_context(|| format!("running {}", bin.display()))?;
    match status.code() {
        Some(0) => Ok(true),
        Some(1) => Ok(false),
        _ => bail!("{} bench ended with {status}", bin.display()),
    }
}

/// The commands the kept results come from: a run of every part starts the list again, a run of
/// some parts adds to it (the other parts keep their results from the earlier commands). One
/// command per line, oldest first.
fn commands_kept(results_dir: &Path, command: &str, all_parts: bool) -> String {
    let earlier = std::fs::read_to_string(results_dir.join("command")).unwrap_or_default();
    match earlier.trim() {
        "" => command.to_string(),
        _ if all_parts => command.to_string(),
        earlier => format!("{earlier}\n{command}"),
    }
}

fn results_dir(workspace: &Path, args: &BenchArgs) -> PathBuf {
    match &args.results {
        Some(d) if d.is_absolute() => d.clone(),
        Some(d) => workspace.join(d),
        None => target_dir(workspace).join("bench"),
    }
}

fn target_dir(workspace: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(|d| workspace.join(d))
        .unwrap_or_else(|| workspace.join("target"))
}
