//! `keepalive-agent`: command-line entry point.

use std::{
    io::{IsTerminal as _, Write as _},
    os::unix::fs::MetadataExt as _,
    path::PathBuf,
    sync::{atomic::AtomicBool, Arc},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use clap::{Args, Parser, Subcommand};
use keepalive_agent::{
    attach::{self, AttachOptions, Probes},
    audit,
    clock::WallClock,
    decode::Decoder,
    kernel::{self, KernelFacts},
    metrics::{config::MetricsConfig, Metrics},
    output::{Format, Printer},
    owners, privilege,
    runtime::{EventLoop, Filter},
    timeline::engine::{Engine, EngineConfig},
};
use log::{info, warn};

mod config;

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
    /// Which connections will die silently, and why: every established and CLOSE_WAIT TCP socket
    /// of the host with its effective keep-alive settings, owner, idle times, pending timer and
    /// diagnoses against a middlebox idle timeout (exit 3 with --fail-on when a diagnosis is at
    /// least that severe).
    Audit(AuditArgs),
    /// Run as a daemon exporting timelines as OpenTelemetry traces (OTLP gRPC or HTTP/protobuf;
    /// spans as JSON lines on stdout when no endpoint is configured).
    Run(RunArgs),
    /// Print the effective configuration of `run` (flags, OTEL_* variables, the --config file,
    /// defaults) with the source of each value; header values are redacted.
    Config(RunArgs),
    /// Write the man pages and shell completions (bash, zsh, fish) generated from these
    /// definitions into a directory (used by `cargo xtask package`).
    #[command(hide = true)]
    Generate(GenerateArgs),
}

#[derive(Args, Debug)]
struct GenerateArgs {
    /// Directory to write into (man pages in man1/, completions in completions/).
    #[arg(long, value_name = "DIR")]
    out_dir: PathBuf,
}

/// `keepalive-agent generate`: man pages (one per subcommand) and completions from the clap
/// definitions, so that they never drift from the flags.
fn generate(args: GenerateArgs) -> Result<()> {
    use clap::CommandFactory as _;
    let man = args.out_dir.join("man1");
    let completions = args.out_dir.join("completions");
    for dir in [&man, &completions] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    clap_mangen::generate_to(Cli::command(), &man).with_context(|| format!("writing man pages to {}", man.display()))?;
    for shell in [clap_complete::Shell::Bash, clap_complete::Shell::Zsh, clap_complete::Shell::Fish] {
        clap_complete::generate_to(shell, &mut Cli::command(), "keepalive-agent", &completions)
            .with_context(|| format!("writing {shell} completions to {}", completions.display()))?;
    }
    Ok(())
}

#[derive(Args, Debug)]
struct RunArgs {
    /// TOML configuration file holding any of these options (precedence: flags, then OTEL_*
    /// variables, then the file, then defaults; see `keepalive-agent config`).
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(flatten)]
    attach: AttachArgs,
    #[command(flatten)]
    export: keepalive_agent::export::ExportArgs,
    #[command(flatten)]
    metrics: keepalive_agent::metrics::config::MetricsArgs,
    /// Most connections tracked at once, 1 to 16777216; past it new connections are not tracked
    /// (and that is reported).
    #[arg(long, default_value_t = 65_536, value_parser = max_connections_parser(), allow_negative_numbers = true)]
    max_connections: usize,
    /// Only connections in this network namespace (a path such as /run/netns/NAME).
    #[arg(long, value_name = "PATH", value_parser = parse_netns)]
    netns: Option<PathBuf>,
    /// How long the stop may take, in seconds, 0 to 3600: the pending spans first, then the last
    /// OTLP metrics export with what is left.
    #[arg(long, value_name = "SECS", default_value = "5", value_parser = parse_shutdown_timeout, allow_negative_numbers = true)]
    shutdown_timeout: Duration,
    /// Stop after this many seconds, 0 to 31536000 (default: until SIGINT/SIGTERM).
    #[arg(long, value_name = "SECS", value_parser = parse_duration, allow_negative_numbers = true)]
    duration: Option<Duration>,
    /// With metrics on: audit every socket (as `keepalive-agent audit`, against the 240 s default
    /// middlebox) every this many seconds and publish keepalive.connections.at_risk; 0 turns it
    /// off; 1 to 86400 otherwise.
    #[arg(long, value_name = "SECS", default_value = "60", value_parser = parse_audit_interval, allow_negative_numbers = true)]
    audit_interval: Duration,
}

/// `run --audit-interval`: 0 (off), or 1 to 86400 seconds.
fn parse_audit_interval(s: &str) -> Result<Duration, String> {
    let d = parse_seconds(s, 86_400.0)?;
    if !d.is_zero() && d < Duration::from_secs(1) {
        return Err("must be 0 (off) or a number of seconds from 1 to 86400".into());
    }
    Ok(d)
}

/// Options shared by every command that attaches programs.
#[derive(Args, Debug, Clone)]
struct AttachArgs {
    /// cgroup v2 directory for the setsockopt program (default: the cgroup2 root, i.e. every process).
    #[arg(long, value_name = "PATH", value_parser = parse_cgroup)]
    cgroup: Option<PathBuf>,
    /// Ring buffer size in bytes (a power of two from the page size to 1 GiB).
    #[arg(long, default_value_t = 8 * 1024 * 1024, value_parser = parse_ringbuf_size, allow_negative_numbers = true)]
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
    /// arrives, at one program run per received segment on the whole host; next-firing never
    /// watches segments: every answer is timed from the last-ACK time at the socket's next timer
    /// firing (up to one probe interval later), nothing runs per segment (the fleet setting).
    #[arg(long, value_enum, default_value_t = attach::Answers::OnDemand)]
    probe_answers: attach::Answers,
    /// Also report the normal close (`close` with `closed_by` and `idle_ms`) of connections without
    /// keep-alive: one record per connection, most closes on a busy host. Their deaths (timeouts,
    /// resets) are always reported.
    #[arg(long)]
    all_closes: bool,
}

#[derive(Args, Debug)]
struct TraceArgs {
    #[command(flatten)]
    attach: AttachArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
    /// Only connections of this process (repeatable).
    #[arg(long, value_parser = pid_parser(), allow_negative_numbers = true)]
    pid: Vec<u32>,
    /// Only connections with this local or remote port (repeatable).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..), allow_negative_numbers = true)]
    port: Vec<u16>,
    /// Only connections in this network namespace (a path such as /run/netns/NAME or /proc/PID/ns/net).
    #[arg(long, value_name = "PATH", value_parser = parse_netns)]
    netns: Option<PathBuf>,
    /// Stop after this many seconds, 0 to 31536000.
    #[arg(long, value_name = "SECS", value_parser = parse_duration, allow_negative_numbers = true)]
    duration: Option<Duration>,
    /// Most connections tracked at once, 1 to 16777216; past it new connections are not tracked
    /// (and that is reported).
    #[arg(long, default_value_t = 65_536, value_parser = max_connections_parser(), allow_negative_numbers = true)]
    max_connections: usize,
    /// Colour: auto (on a terminal), always, never.
    #[arg(long, default_value = "auto", value_parser = ["auto", "always", "never"])]
    color: String,
}

#[derive(Args, Debug)]
struct AuditArgs {
    /// Idle timeout of the middlebox on the path (load balancer, NAT, firewall), in seconds above
    /// 0 (default: 240, Azure's, the smallest common one).
    #[arg(long, value_name = "SECS", value_parser = audit::middlebox::parse_idle_timeout, allow_negative_numbers = true, conflicts_with = "middlebox")]
    idle_timeout: Option<audit::Middlebox>,
    /// The middlebox on the path, by name: azure-lb, azure-nat-gateway (240 s), aws-nlb,
    /// aws-nat-gateway (350 s), gcp-vpc (600 s), gcp-cloud-nat (1200 s), or conntrack (this host's
    /// nf_conntrack_tcp_timeout_established).
    #[arg(long, value_name = "NAME", value_parser = parse_middlebox)]
    middlebox: Option<audit::Middlebox>,
    /// Longest acceptable time to detect a dead peer (keep-alive idle + interval × count), seconds,
    /// 1 to 31536000.
    #[arg(long, value_name = "SECS", default_value_t = audit::diagnose::DEFAULT_DETECT_WITHIN_S, value_parser = clap::value_parser!(u64).range(1..=31_536_000), allow_negative_numbers = true)]
    detect_within: u64,
    /// Output format: text (summary by owner, then one line per socket) or json (one object per
    /// socket and line).
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
    /// Only sockets held by this process (repeatable).
    #[arg(long, value_parser = pid_parser(), allow_negative_numbers = true)]
    pid: Vec<u32>,
    /// Only sockets with this local or remote port (repeatable).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..), allow_negative_numbers = true)]
    port: Vec<u16>,
    /// Only this network namespace (a path such as /run/netns/NAME or /proc/PID/ns/net).
    #[arg(long, value_name = "PATH", value_parser = parse_netns)]
    netns: Option<PathBuf>,
    /// Only sockets of processes in this container (its id or a prefix of it, hexadecimal).
    #[arg(long, value_name = "ID", value_parser = parse_container)]
    container: Option<String>,
    /// Only sockets with at least one diagnosis.
    #[arg(long)]
    only_problems: bool,
    /// Most sockets audited, 1 to 16777216 (about 220 bytes each); past it sockets are counted,
    /// not audited, and that is reported.
    #[arg(long, default_value_t = 1_048_576, value_parser = max_connections_parser(), allow_negative_numbers = true)]
    max_sockets: usize,
    /// Exit with status 3 when a reported socket has a diagnosis of this severity or worse.
    #[arg(long, value_enum)]
    fail_on: Option<audit::Severity>,
    /// Colour: auto (on a terminal), always, never.
    #[arg(long, default_value = "auto", value_parser = ["auto", "always", "never"])]
    color: String,
}

/// Exit status of `audit --fail-on` when a diagnosis is at least that severe.
const EXIT_PROBLEMS: i32 = 3;

/// `--middlebox`: a preset name, or `conntrack` (read now, so a missing module is a usage error).
fn parse_middlebox(s: &str) -> Result<audit::Middlebox, String> {
    audit::middlebox::parse_middlebox(s, std::path::Path::new(audit::middlebox::CONNTRACK_SYSCTL))
}

/// `--container`: a container id or a prefix of one (1 to 64 hexadecimal digits).
fn parse_container(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("`{s}` is not a container id or a prefix of one (1 to 64 hexadecimal digits)"));
    }
    Ok(s.to_ascii_lowercase())
}

#[derive(Args, Debug)]
struct CheckArgs {
    #[command(flatten)]
    attach: AttachArgs,
}

/// Most connections `--max-connections` accepts: far above any host's TCP socket count, low enough
/// that the engine's tables (one entry per connection) cannot exhaust memory by a typo.
const MAX_CONNECTIONS: u64 = 16_777_216;
/// Longest `--duration`, in seconds (a year): a deadline the monotonic clock always represents.
const MAX_DURATION_S: f64 = 31_536_000.0;
/// Longest `--shutdown-timeout`, in seconds.
const MAX_SHUTDOWN_TIMEOUT_S: f64 = 3_600.0;
/// Largest `--ringbuf-size`: 1 GiB of locked kernel memory.
const MAX_RINGBUF: u32 = 1 << 30;
/// The kernel's largest possible process id (`PID_MAX_LIMIT` on 64-bit).
const PID_MAX_LIMIT: u64 = 4_194_304;
/// `statfs` magic numbers (linux/magic.h).
const CGROUP2_SUPER_MAGIC: u64 = 0x6367_7270;
const NSFS_MAGIC: u64 = 0x6e73_6673;
/// `ioctl(NS_GET_NSTYPE)` on a namespace file (linux/nsfs.h, Linux 4.11+).
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

fn max_connections_parser() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(1..=MAX_CONNECTIONS)
}

fn pid_parser() -> clap::builder::RangedU64ValueParser<u32> {
    clap::builder::RangedU64ValueParser::<u32>::new().range(1..=PID_MAX_LIMIT)
}

/// `--ringbuf-size`: the kernel wants a power of two and a multiple of the page size.
fn parse_ringbuf_size(s: &str) -> Result<u32, String> {
    let v: u32 = s.trim().parse().map_err(|e| format!("`{s}` is not a number of bytes: {e}"))?;
    let page = page_size();
    if !v.is_power_of_two() || v < page || v > MAX_RINGBUF {
        return Err(format!("{v} is not a power of two from the page size ({page}) to {MAX_RINGBUF} bytes"));
    }
    Ok(v)
}

fn page_size() -> u32 {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u32::try_from(page).unwrap_or(4096)
}

/// `--duration`: finite seconds from 0 to a year.
fn parse_duration(s: &str) -> Result<Duration, String> {
    parse_seconds(s, MAX_DURATION_S)
}

/// `--shutdown-timeout`: finite seconds from 0 to an hour.
fn parse_shutdown_timeout(s: &str) -> Result<Duration, String> {
    parse_seconds(s, MAX_SHUTDOWN_TIMEOUT_S)
}

/// A number of seconds in `0..=max` (fractions allowed; NaN and infinities refused).
fn parse_seconds(s: &str, max: f64) -> Result<Duration, String> {
    let range = || format!("must be a number of seconds from 0 to {max}");
    match s.trim().parse::<f64>() {
        // The range check also refuses NaN; -0.0 is within it and is zero.
        Ok(v) if (0.0..=max).contains(&v) => Duration::try_from_secs_f64(v.abs()).map_err(|_| range()),
        _ => Err(range()),
    }
}

/// `f_type` of the file system holding `file`.
fn fs_magic(file: &std::fs::File) -> std::io::Result<u64> {
    use std::os::fd::AsRawFd as _;
    // SAFETY: a valid open fd and a zeroed out-buffer of the right type.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_type as u64)
}

/// `--cgroup`: an existing directory of the cgroup v2 hierarchy (the setsockopt program cannot be
/// attached anywhere else).
fn parse_cgroup(s: &str) -> Result<PathBuf, String> {
    let dir = std::fs::File::open(s).map_err(|e| format!("{s}: {e}"))?;
    if !dir.metadata().map_err(|e| format!("{s}: {e}"))?.is_dir() {
        return Err(format!("{s} is not a directory"));
    }
    if fs_magic(&dir).map_err(|e| format!("{s}: statfs: {e}"))? != CGROUP2_SUPER_MAGIC {
        let mount = match attach::cgroup2_mount() {
            Some(m) => format!("the cgroup v2 hierarchy is mounted at {}", m.display()),
            None => "no cgroup v2 hierarchy is mounted".to_string(),
        };
        return Err(format!("{s} is not a cgroup v2 directory ({mount})"));
    }
    Ok(PathBuf::from(s))
}

/// `--netns`: a network namespace file (`/run/netns/NAME`, `/proc/PID/ns/net`).
fn parse_netns(s: &str) -> Result<PathBuf, String> {
    use std::os::fd::AsRawFd as _;
    let not_netns = || format!("{s} is not a network namespace file (e.g. /run/netns/NAME or /proc/PID/ns/net)");
    let file = std::fs::File::open(s).map_err(|e| format!("{s}: {e}"))?;
    if fs_magic(&file).map_err(|e| format!("{s}: statfs: {e}"))? != NSFS_MAGIC {
        return Err(not_netns());
    }
    // SAFETY: a valid open fd; NS_GET_NSTYPE takes no argument.
    let nstype = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE as _) };
    if nstype != libc::CLONE_NEWNET {
        return Err(not_netns());
    }
    Ok(PathBuf::from(s))
}

/// Sets the returned flag on SIGINT or SIGTERM (the event loop polls it).
fn stop_on_signals() -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&stop)).with_context(|| format!("installing the handler of signal {sig}"))?;
    }
    Ok(stop)
}

fn main() {
    // The matches say which values came from the command line (the configuration file's layering).
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    let cli = <Cli as clap::FromArgMatches>::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let sub = matches.subcommand().map(|(_, m)| m.clone()).unwrap_or_default();
    env_logger::Builder::new()
        .parse_filters(&cli.log_level)
        .parse_env("RUST_LOG")
        .format_timestamp_millis()
        .init();
    let res = match cli.command {
        Command::Trace(args) => trace(args),
        Command::Check(args) => check(args),
        Command::Run(args) => config::run_args(args, &sub).and_then(run),
        Command::Config(args) => config::show(args, &sub),
        Command::Generate(args) => generate(args),
        Command::Audit(args) => match audit(args) {
            Ok(0) => Ok(()),
            Ok(code) => std::process::exit(code),
            Err(e) => Err(e),
        },
    };
    if let Err(e) = res {
        eprintln!("keepalive-agent: error: {e:#}");
        std::process::exit(1);
    }
}

/// Preconditions that make the agent unable to run at all.
fn preflight() -> Result<KernelFacts> {
    let paranoid = privilege::perf_event_paranoid();
    for need in privilege::require()? {
        warn!("capability {} is missing: {}", need.cap, need.cost(paranoid));
    }
    privilege::raise_memlock().context("raising RLIMIT_MEMLOCK (BPF maps are charged to it before Linux 5.11): needs CAP_SYS_RESOURCE")?;
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

fn prepare(args: &AttachArgs, only_netns: Option<u32>) -> Result<(KernelFacts, Probes)> {
    let mut facts = preflight()?;
    facts.offsets.snapshot_state_mask = snapshot_state_mask(&facts);
    facts.offsets.report_all_closes = u32::from(args.all_closes);
    if let Some(ns) = only_netns {
        facts.offsets.only_netns = ns;
        info!("--netns: the kernel side sends only the events of network namespace {ns}");
    }
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
    /// Set by SIGINT/SIGTERM.
    stop: Arc<AtomicBool>,
}

/// Attaches the programs, takes the start-up snapshot and prints the `ready` line: the contract is
/// one line starting with "ready" on stderr once every program is attached, before any event.
/// `on_attached` runs just before the `ready` line (`run` marks its metrics ready there).
fn start(
    args: &AttachArgs,
    netns: Option<&std::path::Path>,
    filter: &Filter,
    max_connections: usize,
    on_attached: &dyn Fn(&Probes),
) -> Result<Started> {
    let stop = stop_on_signals()?;
    let (facts, mut probes) = prepare(args, filter.netns)?;
    let snapshot = probes.snapshot(&attach::netns_paths(netns)).context("start-up snapshot")?;
    let snapshot = owners::attribute_snapshot(snapshot, std::path::Path::new("/proc"), attach::cgroup2_mount().as_deref());
    // Start-up is over: keep only the capabilities later work needs (README.md, "Least privilege").
    let dropped = privilege::drop_after_start_up().context("dropping capabilities after start-up")?;
    info!("capabilities after start-up: {dropped}");
    let attached: Vec<&str> = probes.attached().map(|o| o.hook.name).collect();
    on_attached(&probes);
    eprintln!("ready: {} hooks attached ({})", attached.len(), attached.join(", "));
    Ok(Started {
        probes,
        decoder: Decoder::new(facts.tables.clone()),
        engine: Engine::new(EngineConfig { max_connections }),
        snapshot,
        stop,
    })
}

/// The lost-event total (a warning) and the final summary line, with `extra` appended.
fn report_stop(summary: &keepalive_agent::runtime::LoopSummary, engine: &Engine, extra: &str) {
    if summary.lost_total() > 0 {
        warn!("lost {} kernel events in total: {}", summary.lost_total(), summary.loss_breakdown());
    }
    let stats = engine.stats();
    let unreported = stop_notes(summary, &stats);
    info!(
        "stopped: {} kernel events, {} records, {} lost ({}), {} decode errors; {} connections tracked ({} still open), {} refused by the cap; not followed: {} deaths, {} closes, {} resets{unreported}{extra}",
        summary.events,
        summary.records,
        summary.lost_total(),
        summary.loss_causes(),
        summary.decode_errors,
        stats.opened,
        stats.tracked,
        stats.cap_rejected,
        stats.unfollowed_deaths,
        stats.unfollowed_closes,
        stats.unfollowed_resets
    );
}

/// The stop line's notes on probes only the kernel counted and on the bounds hit (README, "Bounds"),
/// each "; …" and only when not zero.
fn stop_notes(summary: &keepalive_agent::runtime::LoopSummary, stats: &keepalive_agent::timeline::EngineStats) -> String {
    let notes = [
        (stats.unreported_probes, "probes seen only by the kernel's probe counter (their timer runs reached no record)"),
        (stats.unordered, "events handled out of order (hold for timer runs full)"),
        (summary.held_full, "times the records held for owner lookups were full"),
        (summary.death_owners.dropped, "deaths not followed left without their owner (lookup bound)"),
        (summary.death_owners_unawaited, "deaths not followed the kernel's owner table had no room for"),
        (stats.pending_expired, "notes on sockets not tracked forgotten after ten minutes (their destruction missed)"),
    ];
    notes.iter().filter(|(n, _)| *n > 0).map(|(n, what)| format!("; {n} {what}")).collect()
}

fn until(duration: Option<Duration>) -> Option<Instant> {
    duration.map(|d| Instant::now() + d)
}

fn netns_inode(path: &std::path::Path) -> Result<u32> {
    let md = std::fs::metadata(path).with_context(|| format!("--netns {}", path.display()))?;
    Ok(md.ino() as u32)
}

fn trace(args: TraceArgs) -> Result<()> {
    let filter = Filter {
        pids: args.pid.clone(),
        ports: args.port.clone(),
        netns: args.netns.as_deref().map(netns_inode).transpose()?,
    };
    let Started { mut probes, decoder, mut engine, snapshot, stop } =
        start(&args.attach, args.netns.as_deref(), &filter, args.max_connections, &|_| {})?;
    let color = match args.color.as_str() {
        "always" => true,
        "never" => false,
        _ => std::io::stdout().is_terminal(),
    };
    let stdout = std::io::stdout();
    let cgroups = keepalive_agent::container::CgroupResolver::new(attach::cgroup2_mount());
    let mut printer =
        Printer::new(std::io::BufWriter::with_capacity(OUTPUT_BUFFER, stdout.lock()), args.format, color, cgroups);
    let mut ev_loop = EventLoop::new(&mut probes, &decoder, &mut engine, &filter);
    let mut sink = |recs: &[keepalive_agent::timeline::Record], clock: &WallClock, _: &Engine| {
        for r in recs {
            printer.write(r, clock)?;
        }
        printer.flush()
    };
    let summary = ev_loop.run(snapshot, &stop, until(args.duration), &mut sink).and_then(|s| {
        // Every connection still followed ends with a record.
        let last = ev_loop.end_all();
        sink(&last, &ev_loop.clock, ev_loop.engine).map_err(keepalive_agent::runtime::RunError::Sink)?;
        Ok(s)
    });
    let summary = match summary {
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

/// `trace`'s output buffer: records are flushed once per batch of ring-buffer events; a batch
/// of JSON lines fits, so it is written with a few calls instead of one per 8 KiB.
const OUTPUT_BUFFER: usize = 1 << 20;

fn run(args: RunArgs) -> Result<()> {
    let filter = Filter {
        netns: args.netns.as_deref().map(netns_inode).transpose()?,
        ..Filter::default()
    };
    // TLS files are read here, before the capabilities that may be needed to read them are dropped.
    let export_config = keepalive_agent::export::ExportConfig::from_args(&args.export)
        .context("configuring the OpenTelemetry export")?;
    // The export runtime's threads (OTLP export, the metrics server) need no capability: each drops
    // every one as it starts. They start before the programs are attached, so that the metrics
    // server answers (`/readyz`: 503) meanwhile and a bad `--metrics-listen` stops the agent first.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("keepalive-export")
        .on_thread_start(privilege::drop_all_in_this_thread)
        .enable_all()
        .build()
        .context("starting the export runtime")?;
    let _enter = runtime.enter();
    let mut exporter = keepalive_agent::export::Exporter::from_config(export_config)
        .context("configuring the OpenTelemetry export")?
        .with_cgroups(keepalive_agent::container::CgroupResolver::new(attach::cgroup2_mount()));
    info!("exporting {}", exporter.description());
    let (metrics, otlp_metrics) = start_metrics(&args, exporter.resource())?;
    let attached = |probes: &Probes| {
        if let Some(m) = &metrics {
            m.set_hooks(probes.attached().filter_map(|o| Some((o.hook.name, o.chosen.as_ref()?.kind()))).collect());
            m.health().set_ready();
        }
    };
    // Attaches, then drops this thread's capabilities to those later work needs.
    let Started { mut probes, decoder, mut engine, snapshot, stop } =
        start(&args.attach, args.netns.as_deref(), &filter, args.max_connections, &attached)?;
    let audit_thread = match &metrics {
        Some(m) if !args.audit_interval.is_zero() => start_periodic_audit(&args, m.clone(), stop.clone()),
        _ => None,
    };
    let mut recorder = metrics.as_ref().map(|m| m.recorder(probes.program_ids().into_iter().map(|(name, id)| (id, name)).collect()));
    let mut ev_loop = EventLoop::new(&mut probes, &decoder, &mut engine, &filter);
    ev_loop.observer = recorder.as_mut().map(|r| r as &mut dyn keepalive_agent::runtime::LoopObserver);
    // The event path only hands records to the exporter's bounded queue: it never waits on the
    // network.
    let mut sink = |recs: &[keepalive_agent::timeline::Record], clock: &WallClock, _: &Engine| {
        exporter.on_records(recs, clock);
        if let Some(m) = &metrics {
            m.on_records(recs);
            m.set_span_export(exporter.stats());
        }
        Ok(())
    };
    let summary = ev_loop.run(snapshot, &stop, until(args.duration), &mut sink)?;
    // Every connection still followed ends with records; their spans skip the bounded queue.
    let last = ev_loop.end_all();
    let clock = ev_loop.clock;
    // One budget for the whole stop: the spans first, the last metrics export with what is left.
    let stop_by = std::time::Instant::now() + args.shutdown_timeout;
    let report = runtime.block_on(exporter.shutdown(&last, &clock, args.shutdown_timeout));
    if let Some(m) = &metrics {
        m.on_records(&last);
        m.set_span_export(report.stats);
    }
    if let Some(export) = otlp_metrics {
        let left = stop_by.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            warn!("OTLP metrics: no last export (--shutdown-timeout was spent on the spans)");
        } else {
            runtime.block_on(export.shutdown(left));
        }
    }
    report_stop(&summary, &engine, &format!("; export: {report}"));
    if let Some(t) = audit_thread {
        // `--duration` ends the loop without a signal: the audit thread stops on the same flag.
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = t.join();
    }
    Ok(())
}

/// The periodic audit of `run` (`--audit-interval`), on its own thread until `stop`; `None`, with
/// a warning saying why, when it cannot start (the rest of `run` goes on without it).
fn start_periodic_audit(args: &RunArgs, metrics: Metrics, stop: Arc<AtomicBool>) -> Option<std::thread::JoinHandle<()>> {
    let start = || -> Result<std::thread::JoinHandle<()>> {
        let mut facts = kernel::resolve_without_addresses().context("resolving kernel layout from BTF")?;
        facts.offsets.audit_state_mask = audit_state_mask(&facts);
        let walker = attach::AuditWalker::load(&facts.offsets).context("loading the audit iterator")?;
        let cfg = audit::periodic::PeriodicConfig {
            tables: facts.tables,
            netns: args.netns.clone(),
            interval: args.audit_interval,
            policy: audit::Policy {
                middlebox: audit::Middlebox::default_preset(),
                detect_within_s: audit::diagnose::DEFAULT_DETECT_WITHIN_S,
            },
            cgroup2: attach::cgroup2_mount(),
        };
        Ok(audit::periodic::spawn(walker, cfg, stop, move |r| metrics.set_at_risk(r))?)
    };
    match start() {
        Ok(t) => {
            info!("audit: every {:?}, published as keepalive.connections.at_risk", args.audit_interval);
            Some(t)
        }
        Err(e) => {
            warn!("periodic audit unavailable ({e:#}): keepalive.connections.at_risk is not published");
            None
        }
    }
}

/// The metrics of `run`, when `--metrics-listen` or an OTLP metrics export asks for them: binds the
/// HTTP server (before attaching, so that `/readyz` answers 503 meanwhile) and starts the OTLP
/// export. Must run inside the export runtime.
fn start_metrics(
    args: &RunArgs,
    resource: &[opentelemetry::KeyValue],
) -> Result<(Option<Metrics>, Option<keepalive_agent::metrics::otlp::OtlpExport>)> {
    let cfg = MetricsConfig::from_args(&args.metrics, &args.export, resource).context("configuring metrics")?;
    if cfg.listen.is_none() && cfg.otlp.is_none() {
        return Ok((None, None));
    }
    let metrics = Metrics::new(cfg.max_series, cfg.peer_labels, attach::cgroup2_mount());
    metrics.set_resource(resource.iter().map(|kv| (kv.key.to_string(), kv.value.to_string())).collect());
    if let Some(addr) = cfg.listen {
        let bound = keepalive_agent::metrics::http::serve(addr, metrics.clone())?;
        info!("metrics: serving http://{bound}/metrics, /healthz and /readyz");
    }
    let otlp = match &cfg.otlp {
        Some(c) => {
            let export = keepalive_agent::metrics::otlp::start(c, metrics.clone(), cfg.max_series)
                .context("configuring the OTLP metrics export")?;
            info!("metrics: exporting {}", export.description);
            Some(export)
        }
        None => None,
    };
    debug_attach_gate();
    Ok((Some(metrics), otlp))
}

/// Test hook: with `KEEPALIVE_DEBUG_ATTACH_GATE=PATH`, waits until PATH exists before attaching, so
/// that a test can see `/readyz` answer 503 before the programs are attached.
fn debug_attach_gate() {
    if let Some(path) = std::env::var_os("KEEPALIVE_DEBUG_ATTACH_GATE") {
        warn!("KEEPALIVE_DEBUG_ATTACH_GATE: waiting for {} before attaching", PathBuf::from(&path).display());
        while !std::path::Path::new(&path).exists() {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// States the audit iterator reports: ESTABLISHED, CLOSE_WAIT, and LISTEN (to tell settings
/// accepted sockets inherited), from the BTF state names.
fn audit_state_mask(facts: &KernelFacts) -> u32 {
    use keepalive_agent::event::TcpState::*;
    facts
        .tables
        .tcp_states
        .iter()
        .filter(|(v, s)| matches!(s, Established | CloseWait | Listen) && *v < 32)
        .fold(0u32, |m, (v, _)| m | (1 << v))
}

/// `audit`: one walk, one report; the exit status (0, or [`EXIT_PROBLEMS`] with `--fail-on`).
fn audit(args: AuditArgs) -> Result<i32> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("must run as root (loading the BPF iterator needs CAP_BPF and CAP_PERFMON)");
    }
    // No kernel addresses are needed: /proc/kallsyms is not read.
    let mut facts = kernel::resolve_without_addresses().context("resolving kernel layout from BTF")?;
    for note in &facts.notes {
        warn!("{note}");
    }
    facts.offsets.audit_state_mask = audit_state_mask(&facts);
    let mut walker = attach::AuditWalker::load(&facts.offsets).context("loading the audit iterator")?;
    let cgroup2 = attach::cgroup2_mount();
    let namespaces = attach::netns_paths(args.netns.as_deref());
    let paths = audit::HostPaths { proc_root: std::path::Path::new("/proc"), cgroup2: cgroup2.as_deref() };
    let found = audit::audit_host(&mut walker, &facts.tables, &namespaces, args.max_sockets, paths)
        .context("auditing sockets")?;
    drop(walker);
    let policy = audit::Policy {
        middlebox: args.idle_timeout.or(args.middlebox).unwrap_or_else(audit::Middlebox::default_preset),
        detect_within_s: args.detect_within,
    };
    let filter = audit::report::ReportFilter {
        pids: args.pid,
        ports: args.port,
        container: args.container,
        only_problems: args.only_problems,
    };
    let color = match args.color.as_str() {
        "always" => true,
        "never" => false,
        _ => std::io::stdout().is_terminal(),
    };
    let mut cgroups = keepalive_agent::container::CgroupResolver::new(cgroup2);
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let written = audit::report::write_report(&mut out, &found, &policy, &filter, args.format, color, &mut cgroups)
        .and_then(|o| out.flush().map(|()| o));
    let outcome = match written {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(0),
        Err(e) => return Err(e).context("writing the audit"),
    };
    let peak = keepalive_agent::privilege::own_status("VmHWM").map_or_else(|| "unknown".into(), |kib| format!("{kib} KiB"));
    info!(
        "audit: {} sockets reported, {} with problems (walk {:?}, owners {:?}, peak RSS {peak})",
        outcome.reported, outcome.problems, found.walk_time, found.owner_time
    );
    let fail = matches!((args.fail_on, outcome.worst), (Some(limit), Some(worst)) if worst >= limit);
    Ok(if fail { EXIT_PROBLEMS } else { 0 })
}

fn check(args: CheckArgs) -> Result<()> {
    println!("kernel: {}", std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim());
    print_capabilities()?;
    let (facts, probes) = match prepare(&args.attach, None) {
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
    println!("\n{:<16} {:<10} ATTACHED TO / WHAT IS MISSING", "HOOK", "METHOD");
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

/// `check`'s capability table: each capability the agent needs, whether this process has it, and
/// what it is for (what its absence costs).
fn print_capabilities() -> Result<()> {
    let have = privilege::effective()?;
    let release = privilege::kernel_release();
    let paranoid = privilege::perf_event_paranoid();
    println!("\n{:<20} {:<8} NEEDED FOR", "CAPABILITY", "STATE");
    for need in privilege::CAPABILITIES {
        let state = match (need.applies_to(&release), have.contains(&need.cap), need.required) {
            (false, _, _) => "unneeded",
            (true, true, _) => "ok",
            (true, false, true) => "MISSING",
            (true, false, false) => "missing",
        };
        let after = if need.kept { "kept after start-up" } else { "dropped after start-up" };
        let optional = if need.required { "" } else { " (optional)" };
        println!("{:<20} {:<8} {}{optional} ({after})", need.name(), state, need.used_for);
        if state.eq_ignore_ascii_case("missing") {
            let what = if need.required { "the agent cannot start" } else { "optional" };
            println!("{:<20} {:<8} {what}: without it {}", "", "", need.cost(paranoid));
        }
    }
    println!();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The clap error for `args`, which must be a rejected value of `flag`.
    fn rejected(args: &[&str], flag: &str) -> String {
        let e = Cli::try_parse_from(std::iter::once("keepalive-agent").chain(args.iter().copied())).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation, "{args:?}: {e}");
        assert_eq!(e.exit_code(), 2);
        let text = e.to_string();
        assert!(text.contains(flag), "{args:?}: {text}");
        text
    }

    #[test]
    fn seconds_are_finite_and_bounded() {
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("-0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("31536000"), Ok(Duration::from_secs(31_536_000)));
        for bad in ["-1", "NaN", "inf", "-inf", "1e300", "31536000.5", "", "abc"] {
            let e = parse_duration(bad).unwrap_err();
            assert!(e.contains("from 0 to 31536000"), "{bad}: {e}");
        }
        assert_eq!(parse_shutdown_timeout("3600"), Ok(Duration::from_secs(3600)));
        assert!(parse_shutdown_timeout("3601").unwrap_err().contains("from 0 to 3600"));
    }

    #[test]
    fn ringbuf_size_is_a_power_of_two_within_bounds() {
        let page = page_size();
        assert_eq!(parse_ringbuf_size(&page.to_string()), Ok(page));
        assert_eq!(parse_ringbuf_size("1073741824"), Ok(1 << 30));
        for bad in ["0", "5000", &(page / 2).to_string(), "2147483648", "-4096", "x"] {
            assert!(parse_ringbuf_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cgroup_must_be_a_cgroup2_directory() {
        assert!(parse_cgroup("/nonexistent-keepalive-test").unwrap_err().contains("/nonexistent-keepalive-test"));
        assert!(parse_cgroup("/proc/self/status").unwrap_err().contains("not a directory"));
        assert!(parse_cgroup("/proc").unwrap_err().contains("not a cgroup v2 directory"));
        if let Some(root) = attach::cgroup2_mount() {
            assert_eq!(parse_cgroup(root.to_str().unwrap()), Ok(root));
        }
    }

    #[test]
    fn netns_must_be_a_network_namespace() {
        assert_eq!(parse_netns("/proc/self/ns/net"), Ok(PathBuf::from("/proc/self/ns/net")));
        assert!(parse_netns("/proc/self/ns/uts").unwrap_err().contains("not a network namespace"));
        assert!(parse_netns("/proc/self/status").unwrap_err().contains("not a network namespace"));
        assert!(parse_netns("/nonexistent-keepalive-test").is_err());
    }

    #[test]
    fn clap_names_the_flag_of_every_bad_value() {
        rejected(&["trace", "--max-connections", "0"], "--max-connections");
        rejected(&["run", "--max-connections", "16777217"], "--max-connections");
        rejected(&["trace", "--max-connections", "-5"], "--max-connections");
        rejected(&["trace", "--duration", "-1"], "--duration");
        rejected(&["trace", "--duration", "nan"], "--duration");
        rejected(&["run", "--duration", "inf"], "--duration");
        rejected(&["run", "--shutdown-timeout", "-0.5"], "--shutdown-timeout");
        rejected(&["run", "--shutdown-timeout", "1e20"], "--shutdown-timeout");
        rejected(&["trace", "--port", "0"], "--port");
        rejected(&["trace", "--pid", "0"], "--pid");
        rejected(&["trace", "--pid", "4194305"], "--pid");
        rejected(&["check", "--ringbuf-size", "4097"], "--ringbuf-size");
        let e = rejected(&["trace", "--cgroup", "/nonexistent"], "--cgroup");
        assert!(e.contains("/nonexistent"), "{e}");
        rejected(&["run", "--netns", "/etc/hostname"], "--netns");
        rejected(&["run", "--otlp-queue-size", "0"], "--otlp-queue-size");
        rejected(&["audit", "--idle-timeout", "-5"], "--idle-timeout");
        rejected(&["audit", "--idle-timeout", "0"], "--idle-timeout");
        let e = rejected(&["audit", "--middlebox", "aws-alb"], "--middlebox");
        assert!(e.contains("unknown middlebox `aws-alb`") && e.contains("gcp-cloud-nat"), "{e}");
        rejected(&["audit", "--detect-within", "0"], "--detect-within");
        rejected(&["audit", "--container", "xyz"], "--container");
        rejected(&["audit", "--max-sockets", "0"], "--max-sockets");
        rejected(&["run", "--audit-interval", "-1"], "--audit-interval");
        rejected(&["run", "--audit-interval", "0.5"], "--audit-interval");
        rejected(&["run", "--audit-interval", "86401"], "--audit-interval");
        let e = Cli::try_parse_from(["k", "audit", "--idle-timeout", "2", "--middlebox", "aws-nlb"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::ArgumentConflict, "{e}");
        let cli = Cli::try_parse_from(["k", "audit", "--idle-timeout", "2", "--fail-on", "warning"]).unwrap();
        let Command::Audit(a) = cli.command else { panic!("not audit") };
        assert_eq!(a.idle_timeout.map(|m| m.timeout_s), Some(2.0));
        assert_eq!((a.fail_on, a.detect_within), (Some(audit::Severity::Warning), 900));
        // Good values still parse.
        let cli = Cli::try_parse_from(["k", "trace", "--max-connections", "1", "--duration", "0.25", "--port", "65535"]).unwrap();
        let Command::Trace(t) = cli.command else { panic!("not trace") };
        assert_eq!((t.max_connections, t.duration, t.port), (1, Some(Duration::from_millis(250)), vec![65535]));
        let cli = Cli::try_parse_from(["k", "run"]).unwrap();
        let Command::Run(r) = cli.command else { panic!("not run") };
        assert_eq!(r.shutdown_timeout, Duration::from_secs(5));
    }
}
