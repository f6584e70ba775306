//! `keepalive-agent`: command-line entry point.

use std::{
    io::{IsTerminal as _, Write as _},
    os::unix::fs::MetadataExt as _,
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use clap::{Args, Parser, Subcommand};
use keepalive_agent::{
    attach::{self, AttachOptions, Probes},
    clock::WallClock,
    decode::Decoder,
    kernel::{self, KernelFacts},
    output::{Format, Printer},
    runtime::{EventLoop, Filter},
    timeline::engine::{Engine, EngineConfig},
};
use log::{info, warn};

/// Makes TCP keep-alive visible: per-connection timelines from the live kernel.
#[derive(Parser, Debug)]
#[command(name = "keepalive-agent", version, about)]
struct Cli {
    /// Log level for diagnostics on stderr (error, warn, info, debug, trace). RUST_LOG overrides.
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Stream keep-alive events as they happen (text or JSON lines on stdout).
    Trace(TraceArgs),
    /// Say which mechanism reaches each hook on this kernel, and whether the agent can run here.
    Check(CheckArgs),
    /// Run as a daemon exporting timelines as OpenTelemetry traces (OTLP gRPC or HTTP/protobuf;
    /// spans as JSON lines on stdout when no endpoint is configured).
    Run(RunArgs),
}

#[derive(Args, Debug)]
struct RunArgs {
    #[command(flatten)]
    attach: AttachArgs,
    #[command(flatten)]
    export: keepalive_agent::export::ExportArgs,
    /// Most connections tracked at once; past it new connections are not tracked (and that is reported).
    #[arg(long, default_value_t = 65_536)]
    max_connections: usize,
    /// Only connections in this network namespace (a path such as /run/netns/NAME).
    #[arg(long, value_name = "PATH")]
    netns: Option<PathBuf>,
    /// How long to wait for pending spans at shutdown, in seconds.
    #[arg(long, default_value_t = 5.0)]
    shutdown_timeout: f64,
    /// Stop after this many seconds (default: until SIGINT/SIGTERM).
    #[arg(long, value_name = "SECS")]
    duration: Option<f64>,
}

/// Options shared by every command that attaches programs.
#[derive(Args, Debug, Clone)]
struct AttachArgs {
    /// cgroup v2 directory for the setsockopt program (default: the cgroup2 root, i.e. every process).
    #[arg(long, value_name = "PATH")]
    cgroup: Option<PathBuf>,
    /// Ring buffer size in bytes (power of two, at least 4096).
    #[arg(long, default_value_t = 8 * 1024 * 1024, value_parser = parse_ringbuf_size)]
    ringbuf_size: u32,
    /// Do not report connections that existed before the agent started.
    #[arg(long)]
    no_snapshot: bool,
    /// Attach method: auto picks, per hook, fentry, then kprobe, then tracepoints; a specific method
    /// restricts every hook that has an alternative to that method.
    #[arg(long, value_enum, default_value_t = attach::Method::Auto)]
    attach: attach::Method,
    /// When to watch received segments for answers to keep-alive probes: on-demand attaches that
    /// program only while some probe is unanswered (no per-segment cost otherwise; quick answers
    /// are then timed from the socket's last-ACK time, to the jiffy); always sees every answer as it
    /// arrives, at one program run per received segment on the whole host.
    #[arg(long, value_enum, default_value_t = attach::Answers::OnDemand)]
    probe_answers: attach::Answers,
}

#[derive(Args, Debug)]
struct TraceArgs {
    #[command(flatten)]
    attach: AttachArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
    /// Only connections of this process (repeatable).
    #[arg(long)]
    pid: Vec<u32>,
    /// Only connections with this local or remote port (repeatable).
    #[arg(long)]
    port: Vec<u16>,
    /// Only connections in this network namespace (a path such as /run/netns/NAME or /proc/PID/ns/net).
    #[arg(long, value_name = "PATH")]
    netns: Option<PathBuf>,
    /// Stop after this many seconds.
    #[arg(long, value_name = "SECS")]
    duration: Option<f64>,
    /// Most connections tracked at once; past it new connections are not tracked (and that is reported).
    #[arg(long, default_value_t = 65_536)]
    max_connections: usize,
    /// Colour: auto (on a terminal), always, never.
    #[arg(long, default_value = "auto", value_parser = ["auto", "always", "never"])]
    color: String,
}

#[derive(Args, Debug)]
struct CheckArgs {
    #[command(flatten)]
    attach: AttachArgs,
}

fn parse_ringbuf_size(s: &str) -> Result<u32, String> {
    let v: u32 = s.parse().map_err(|e| format!("{e}"))?;
    if v < 4096 || !v.is_power_of_two() {
        return Err(format!("{v} is not a power of two of at least 4096"));
    }
    Ok(v)
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe).
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

fn main() {
    let cli = Cli::parse();
    env_logger::Builder::new()
        .parse_filters(&cli.log_level)
        .parse_env("RUST_LOG")
        .format_timestamp_millis()
        .init();
    let res = match cli.command {
        Command::Trace(args) => trace(args),
        Command::Check(args) => check(args),
        Command::Run(args) => run(args),
    };
    if let Err(e) = res {
        eprintln!("keepalive-agent: error: {e:#}");
        std::process::exit(1);
    }
}

/// Preconditions that make the agent unable to run at all.
fn preflight() -> Result<KernelFacts> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("must run as root (loading BPF programs needs CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN)");
    }
    let btf = std::path::Path::new("/sys/kernel/btf/vmlinux");
    if !btf.exists() {
        bail!(
            "kernel BTF not found at {}: the kernel needs CONFIG_DEBUG_INFO_BTF=y (every struct offset is read from it)",
            btf.display()
        );
    }
    match aya::sys::is_map_supported(aya::maps::MapType::RingBuf) {
        Ok(true) => {}
        Ok(false) => bail!("this kernel has no BPF ring buffer (BPF_MAP_TYPE_RINGBUF needs Linux 5.8+)"),
        Err(e) => bail!("probing BPF ring buffer support failed: {e}"),
    }
    let facts = kernel::resolve_default().context("resolving kernel layout from BTF")?;
    for note in &facts.notes {
        warn!("{note}");
    }
    Ok(facts)
}

fn prepare(args: &AttachArgs) -> Result<(KernelFacts, Probes)> {
    let mut facts = preflight()?;
    facts.offsets.snapshot_state_mask = snapshot_state_mask(&facts);
    let opts = AttachOptions {
        ringbuf_bytes: args.ringbuf_size,
        cgroup: args.cgroup.clone(),
        no_snapshot: args.no_snapshot,
        method: args.attach,
        answers: args.probe_answers,
    };
    let probes = attach::attach(&facts.offsets, &opts).context("attaching eBPF programs")?;
    Ok((facts, probes))
}

/// States of full, connected sockets the snapshot reports, from the BTF state names.
fn snapshot_state_mask(facts: &KernelFacts) -> u32 {
    use keepalive_agent::event::TcpState::*;
    facts
        .tables
        .tcp_states
        .iter()
        .filter(|(_, s)| matches!(s, Established | SynRecv | FinWait1 | FinWait2 | CloseWait | LastAck | Closing))
        .filter(|(v, _)| *v < 32)
        .fold(0u32, |m, (v, _)| m | (1 << v))
}

/// Everything a streaming command needs once the programs are attached.
struct Started {
    probes: Probes,
    decoder: Decoder,
    engine: Engine,
    /// Raw start-up snapshot records, fed to the engine before the first live event.
    snapshot: Vec<Vec<u8>>,
}

/// Attaches the programs, takes the start-up snapshot and prints the `ready` line: the contract is
/// one line starting with "ready" on stderr once every program is attached, before any event.
fn start(args: &AttachArgs, netns: Option<&std::path::Path>, max_connections: usize) -> Result<Started> {
    install_signal_handlers();
    let (facts, mut probes) = prepare(args)?;
    let snapshot = probes.snapshot(&attach::netns_paths(netns)).context("start-up snapshot")?;
    let attached: Vec<&str> = probes.attached().map(|o| o.hook.name).collect();
    eprintln!("ready: {} hooks attached ({})", attached.len(), attached.join(", "));
    Ok(Started {
        probes,
        decoder: Decoder::new(facts.tables.clone()),
        engine: Engine::new(EngineConfig { max_connections }),
        snapshot,
    })
}

/// The lost-event total (a warning) and the final summary line, with `extra` appended.
fn report_stop(summary: &keepalive_agent::runtime::LoopSummary, engine: &Engine, extra: &str) {
    if summary.lost_total() > 0 {
        warn!("lost {} kernel events in total: {}", summary.lost_total(), summary.loss_breakdown());
    }
    let stats = engine.stats();
    info!(
        "stopped: {} kernel events, {} records, {} lost ({}), {} decode errors; {} connections tracked ({} still open), {} refused by the cap{extra}",
        summary.events,
        summary.records,
        summary.lost_total(),
        summary.loss_causes(),
        summary.decode_errors,
        stats.opened,
        stats.tracked,
        stats.cap_rejected
    );
}

fn until(duration: Option<f64>) -> Option<Instant> {
    duration.map(|s| Instant::now() + Duration::from_secs_f64(s))
}

fn netns_inode(path: &PathBuf) -> Result<u32> {
    let md = std::fs::metadata(path).with_context(|| format!("--netns {}", path.display()))?;
    Ok(md.ino() as u32)
}

fn trace(args: TraceArgs) -> Result<()> {
    let filter = Filter {
        pids: args.pid.clone(),
        ports: args.port.clone(),
        netns: args.netns.as_ref().map(netns_inode).transpose()?,
    };
    let Started { mut probes, decoder, mut engine, snapshot } =
        start(&args.attach, args.netns.as_deref(), args.max_connections)?;
    let color = match args.color.as_str() {
        "always" => true,
        "never" => false,
        _ => std::io::stdout().is_terminal(),
    };
    let stdout = std::io::stdout();
    let cgroups = keepalive_agent::container::CgroupResolver::new(attach::cgroup2_mount());
    let mut printer =
        Printer::new(std::io::BufWriter::new(stdout.lock()), args.format, color, cgroups);
    let mut ev_loop = EventLoop::new(&mut probes, &decoder, &mut engine, &filter);
    let mut sink = |recs: &[keepalive_agent::timeline::Record], clock: &WallClock, _: &Engine| {
        for r in recs {
            printer.write(r, clock)?;
        }
        printer.flush()
    };
    let summary = match ev_loop.run(snapshot, &STOP, until(args.duration), &mut sink) {
        Ok(s) => s,
        Err(keepalive_agent::runtime::RunError::Sink(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    report_stop(&summary, &engine, "");
    let _ = std::io::stderr().flush();
    Ok(())
}

fn run(args: RunArgs) -> Result<()> {
    let filter = Filter {
        netns: args.netns.as_ref().map(netns_inode).transpose()?,
        ..Filter::default()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("keepalive-export")
        .enable_all()
        .build()
        .context("starting the export runtime")?;
    let _enter = runtime.enter();
    let mut exporter = keepalive_agent::export::Exporter::from_args(&args.export)
        .context("configuring the OpenTelemetry export")?;
    info!("exporting {}", exporter.description());
    let Started { mut probes, decoder, mut engine, snapshot } =
        start(&args.attach, args.netns.as_deref(), args.max_connections)?;
    let mut ev_loop = EventLoop::new(&mut probes, &decoder, &mut engine, &filter);
    // The event path only hands records to the exporter's bounded queue: it never waits on the
    // network.
    let mut sink = |recs: &[keepalive_agent::timeline::Record], clock: &WallClock, _: &Engine| {
        exporter.on_records(recs, clock);
        Ok(())
    };
    let summary = ev_loop.run(snapshot, &STOP, until(args.duration), &mut sink)?;
    let clock = ev_loop.clock;
    let open: Vec<_> = engine.open_connections().filter(|c| filter.matches(c)).collect();
    let deadline = Duration::from_secs_f64(args.shutdown_timeout);
    let report = runtime.block_on(exporter.shutdown(open.into_iter(), &clock, deadline));
    report_stop(&summary, &engine, &format!("; export: {report}"));
    Ok(())
}

fn check(args: CheckArgs) -> Result<()> {
    println!("kernel: {}", std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim());
    let (facts, probes) = match prepare(&args.attach) {
        Ok(v) => v,
        Err(e) => {
            println!("cannot run here: {e:#}");
            return Err(e);
        }
    };
    println!("HZ: {}", facts.tables.hz);
    println!(
        "reset reasons: {}",
        if facts.tables.reset_reasons.is_empty() {
            "not available (kernel < 6.10)".to_string()
        } else {
            format!("{} (from BTF enum sk_rst_reason)", facts.tables.reset_reasons.len())
        }
    );
    for note in &facts.notes {
        println!("note: {note}");
    }
    println!("\n{:<16} {:<10} {}", "HOOK", "METHOD", "ATTACHED TO / WHAT IS MISSING");
    for o in &probes.outcomes {
        println!("{}", o.summary());
    }
    let missing: Vec<_> = probes.outcomes.iter().filter(|o| o.chosen.is_none()).collect();
    println!();
    if missing.is_empty() {
        println!("ok: every hook is reachable on this kernel");
    } else {
        println!("degraded: {} hook(s) unreachable; the agent runs without them", missing.len());
    }
    Ok(())
}
