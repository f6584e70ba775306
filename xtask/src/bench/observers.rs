//! Part `observers`: the same keep-alive connections (idle 1 s, interval 1 s, peers answering, in a
//! namespace the bench creates) watched one observer at a time: `ss -tnoi` once a second (what
//! people do today), `keepalive-agent trace --format json` to a file, and `keepalive-agent run`
//! (default span policy, no endpoint: JSON lines to a file). Each observer is measured over the
//! same window length after a warm-up: process user + system time, the agent's BPF run time (and
//! the empty-program floor of the statistics on the same tracepoints), what it saw, lost events.
//! At several sizes (default 5,000 and 20,000 connections), so that growth per connection shows.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use log::{info, warn};

use super::agent::{self, Agent, AgentCommand, Counts, Usage};
use super::bpf::{self, KernelBtf, ProgDelta, RefKind, RefProg};
use super::kernel::{HostCounters, HOT};
use super::load::{KaFarm, KeepAlive};
use super::report::{Section, Verdict};
use super::sys::{self, NetNs};
use super::{Ctx, Part};

/// Targets of the cost issue, at the first size (5,000 connections by default).
const TARGET_BPF_MS_S: f64 = 2.5;
const TARGET_BPF_US_PER_PROBE: f64 = 0.5;
const TARGET_TRACE_MS_S: f64 = 10.0;
const TARGET_RUN_MS_S: f64 = 5.0;
const TARGET_VS_SS: f64 = 10.0;
const TARGET_LINEAR: f64 = 0.2;

/// One `ss -tnoi` run.
#[derive(Debug, Default, Clone, Copy)]
struct SsRun {
    cpu_s: f64,
    wall_s: f64,
    sockets: u64,
    keepalive: u64,
    probing: u64,
}

/// Runs `ss -tnoi` in the namespace; CPU from the child's rusage (`ip netns exec` execs `ss`, so
/// the child is `ss` itself).
fn ss_once(ns: &NetNs) -> Result<SsRun> {
    let start = Instant::now();
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns.name(), "ss", "-tnoi"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("running ss")?;
    let mut out = Vec::new();
    child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?.read_to_end(&mut out)?;
    let mut status = 0;
    // SAFETY: zeroed rusage is a valid out-buffer.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: reaping our own child (std's handle is not used to wait afterwards).
    let r = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut ru) };
    if r < 0 {
        bail!("wait4: {}", std::io::Error::last_os_error());
    }
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        bail!("ss failed (status {status})");
    }
    let mut run = parse_ss(&String::from_utf8_lossy(&out));
    run.cpu_s = sys::timeval_s(ru.ru_utime) + sys::timeval_s(ru.ru_stime);
    run.wall_s = start.elapsed().as_secs_f64();
    Ok(run)
}

/// Counts sockets, keep-alive timers and timers with probes outstanding in `ss -tnoi` output
/// (`timer:(keepalive,571ms,0)`: the last number is `icsk_probes_out`).
fn parse_ss(text: &str) -> SsRun {
    let mut r = SsRun::default();
    for line in text.lines() {
        if !line.starts_with(char::is_whitespace) && !line.starts_with("State") && !line.is_empty() {
            r.sockets += 1;
        }
        if let Some(p) = line.find("timer:(keepalive,") {
            r.keepalive += 1;
            let rest = &line[p + "timer:(keepalive,".len()..];
            let inner = rest.split(')').next().unwrap_or("");
            let probes: u64 = inner.rsplit(',').next().and_then(|v| v.trim().parse().ok()).unwrap_or(0);
            if probes > 0 {
                r.probing += 1;
            }
        }
    }
    r
}

/// One observer over one window.
#[derive(Debug, Clone, Default)]
struct Row {
    name: &'static str,
    secs: f64,
    /// Process user + system, seconds (for `ss`: the sum over its runs).
    cpu_s: f64,
    /// The agent's programs; None for `ss`.
    bpf: Option<Bpf>,
    /// Keep-alive timer expiries and answers on the host in the window (counting programs).
    host_ka: Option<(u64, u64)>,
    /// What the observer itself reported.
    saw: String,
    /// Lost events (the agent's exit summary); None for `ss`.
    lost: Option<u64>,
    /// The agent's final summary line, kept when it lost events.
    stopped_line: Option<String>,
    /// Probes the agent printed for the bench's namespace in the window (`trace` only).
    printed_probes: Option<u64>,
}

#[derive(Debug, Clone, Default)]
pub(super) struct Bpf {
    run_time_ns: u64,
    runs: u64,
    /// Σ over the agent's tracepoint programs of runs × the empty program's average on the same
    /// tracepoint (the cost of the statistics and dispatch alone).
    pub(super) floor_ns: f64,
    /// Programs whose tracepoint had no empty reference (their runs get no floor).
    unfloored: Vec<String>,
}

impl Row {
    fn ms_s(&self) -> f64 {
        self.cpu_s / self.secs * 1e3
    }
    fn bpf_ms_s(&self) -> f64 {
        self.bpf.as_ref().map_or(0.0, |b| b.run_time_ns as f64 / self.secs / 1e6)
    }
    fn bpf_above_ms_s(&self) -> f64 {
        self.bpf.as_ref().map_or(0.0, |b| (b.run_time_ns as f64 - b.floor_ns) / self.secs / 1e6)
    }
    /// Everything the observer costs: process + BPF, ms/s.
    fn total_ms_s(&self) -> f64 {
        self.ms_s() + self.bpf_ms_s()
    }
    /// Keep-alive probes in the window (host keep-alive timer expiries).
    fn probes(&self) -> Option<u64> {
        self.host_ka.map(|(t, _)| t).filter(|&t| t > 0)
    }
    fn bpf_above_us_per_probe(&self) -> Option<f64> {
        let b = self.bpf.as_ref()?;
        Some((b.run_time_ns as f64 - b.floor_ns) / self.probes()? as f64 / 1e3)
    }
    /// The same per probe the agent printed (the bench's own connections only).
    fn bpf_above_us_per_printed_probe(&self) -> Option<f64> {
        let b = self.bpf.as_ref()?;
        let n = self.printed_probes.filter(|&n| n > 0)?;
        Some((b.run_time_ns as f64 - b.floor_ns) / n as f64 / 1e3)
    }
}

/// All observers at one size.
struct Size {
    n: usize,
    rows: Vec<Row>,
}

impl Size {
    fn row(&self, name: &str) -> Option<&Row> {
        self.rows.iter().find(|r| r.name == name)
    }
}

/// The tracepoint of an agent program's attach point (`raw_tp/NAME` or `tp_btf/NAME`).
fn tracepoint_of(attach: &str) -> Option<&str> {
    let first = attach.split(" + ").next()?;
    first.strip_prefix("raw_tp/").or_else(|| first.strip_prefix("tp_btf/"))
}

/// A file the agent writes to, removed on drop.
struct OutFile(PathBuf);

impl Drop for OutFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn host_ka(c: Option<&HostCounters>) -> Result<Option<(u64, u64)>> {
    c.map(HostCounters::read).transpose()
}

fn ka_delta(a: Option<(u64, u64)>, b: Option<(u64, u64)>) -> Option<(u64, u64)> {
    a.zip(b).map(|((t0, a0), (t1, a1))| (t1 - t0, a1 - a0))
}

/// `ss -tnoi` once a second for the window.
fn observe_ss(ns: &NetNs, counters: Option<&HostCounters>, secs: u64) -> Result<Row> {
    info!("observer ss -tnoi: once a second for {secs} s");
    let h0 = host_ka(counters)?;
    let start = Instant::now();
    let mut runs = Vec::new();
    for i in 0..secs {
        runs.push(ss_once(ns)?);
        if let Some(rest) = Duration::from_secs(i + 1).checked_sub(start.elapsed()) {
            sys::sleep(rest)?;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let host_ka = ka_delta(h0, host_ka(counters)?);
    let k = runs.len().max(1) as f64;
    let ka: u64 = runs.iter().map(|r| r.keepalive).sum();
    let probing: u64 = runs.iter().map(|r| r.probing).sum();
    let sockets = runs.iter().map(|r| r.sockets).max().unwrap_or(0);
    let wall = runs.iter().map(|r| r.wall_s).sum::<f64>() / k;
    Ok(Row {
        name: "ss -tnoi",
        secs,
        cpu_s: runs.iter().map(|r| r.cpu_s).sum(),
        bpf: None,
        host_ka,
        saw: format!(
            "{sockets} sockets and {:.0} keep-alive timers per poll ({} polls, {:.0} ms wall each); a probe outstanding in {probing} of {ka} timer snapshots; no probe or answer as such",
            ka as f64 / k,
            runs.len(),
            wall * 1e3
        ),
        lost: None,
        stopped_line: None,
        printed_probes: None,
    })
}

/// The classic (perf) tracepoints the agent's attach plan uses (its accept-owner hook): their
/// links name no tracepoint, so the bench knows them.
const PERF_TRACEPOINTS: [(&str, &str); 2] = [("syscalls", "sys_exit_accept4"), ("syscalls", "sys_exit_accept")];

/// Empty reference programs on every tracepoint the agent's programs use, and on every hot-path
/// tracepoint (the answer program is attached only while probes are out), attached after the
/// agent's so that the agent's programs run first and keep their cache misses; likewise on the
/// agent's cgroup (`cgroup`, the cgroup the agent was given) and classic tracepoints when it has
/// programs there.
pub(super) fn floor_refs(pid: u32, kbtf: &KernelBtf, cgroup: Option<&Path>) -> Vec<RefProg> {
    let attached: Vec<String> = bpf::process_bpf(pid).map(|b| b.progs.into_iter().map(|p| p.attach).collect()).unwrap_or_default();
    let mut tps: Vec<&str> = attached.iter().filter_map(|a| tracepoint_of(a)).chain(HOT.iter().copied()).collect();
    tps.sort();
    tps.dedup();
    let has = |key: &str| attached.iter().any(|a| floor_key(a) == Some(key));
    let mut refs: Vec<Result<RefProg>> = tps.iter().map(|tp| RefProg::attach(RefKind::Empty, tp, kbtf)).collect();
    if let (true, Some(cg)) = (has("cgroup"), cgroup) {
        refs.push(RefProg::attach_cgroup_setsockopt(cg));
    }
    if has("perf") {
        refs.extend(PERF_TRACEPOINTS.iter().map(|(cat, name)| RefProg::attach_perf_tracepoint(cat, name)));
    }
    refs.into_iter()
        .filter_map(|r| r.map_err(|e| warn!("no empty reference program there: {e:#}")).ok())
        .collect()
}

/// Gives a program that was detached when the window ended (the on-demand answer program) the
/// attach point it had when the window began, else the hot-path tracepoint its name contains.
fn name_detached(progs: &mut [ProgDelta], before: &[bpf::ProgSample]) {
    for p in progs.iter_mut().filter(|p| p.attach.is_empty()) {
        if let Some(b) = before.iter().find(|b| b.name == p.name && !b.attach.is_empty()) {
            p.attach = b.attach.clone();
        } else if let Some(tp) = HOT.iter().find(|tp| p.name.contains(*tp)) {
            p.attach = format!("raw_tp/{tp}");
        }
    }
}

/// The floor of the agent's programs: each tracepoint program's runs × the empty program's
/// average on its tracepoint.
pub(super) fn floor(progs: &[ProgDelta], refs: &[ProgDelta]) -> Bpf {
    let mut b = Bpf {
        run_time_ns: progs.iter().map(|p| p.run_time_ns).sum(),
        runs: progs.iter().map(|p| p.runs).sum(),
        ..Default::default()
    };
    for p in progs.iter().filter(|p| p.runs > 0) {
        match floor_per_run(p, refs) {
            Some(avg) => b.floor_ns += p.runs as f64 * avg,
            None => b.unfloored.push(format!("`{}` ({})", p.name, if p.attach.is_empty() { "detached" } else { &p.attach })),
        }
    }
    b
}

/// The empty reference programs' average run time where `p` is attached (`None`: detached, or no
/// reference there). Several references under one key (`perf`: one per classic tracepoint) are
/// averaged over their runs.
pub(super) fn floor_per_run(p: &ProgDelta, refs: &[ProgDelta]) -> Option<f64> {
    let key = floor_key(&p.attach)?;
    let (ns, runs) = refs
        .iter()
        .filter(|r| floor_key(&r.attach) == Some(key))
        .fold((0, 0), |(ns, runs), r| (ns + r.run_time_ns, runs + r.runs));
    (runs > 0).then(|| ns as f64 / runs as f64)
}

/// What a program's floor is looked up by: its tracepoint, or the kind of hook for the hooks whose
/// links name no tracepoint (`cgroup`, `perf`).
fn floor_key(attach: &str) -> Option<&str> {
    let first = attach.split(" + ").next()?;
    tracepoint_of(first).or(matches!(first, "cgroup" | "perf").then_some(first))
}

/// The agent (`trace` or `run`) writing to a file, over the window.
/// The observer's name in summary rows.
fn short_name(name: &str) -> &'static str {
    if name.contains("trace") {
        "trace"
    } else if name.contains("next-firing") {
        "run --probe-answers next-firing"
    } else {
        "run"
    }
}

/// The agent observers: command, extra arguments, the name in the report.
const AGENT_OBSERVERS: [(AgentCommand, &[&str], &str); 3] = [
    (AgentCommand::Trace, &[], "keepalive-agent trace --format json"),
    (AgentCommand::Run, &[], "keepalive-agent run"),
    // The packaged configuration's setting (packaging/config.toml): no program on received segments.
    (AgentCommand::Run, &["--probe-answers", "next-firing"], "keepalive-agent run --probe-answers next-firing"),
];

fn observe_agent(ctx: &Ctx, ns: &NetNs, kbtf: &KernelBtf, n: usize, observer: (AgentCommand, &[&str], &'static str)) -> Result<Row> {
    let a = ctx.args;
    let (command, extra, name) = observer;
    info!("observer {name}: {} s warm-up, {} s window", a.observer_warmup_s, a.observer_window_s);
    let out = OutFile(std::env::temp_dir().join(format!("ka-bench-observer-{}-{n}.jsonl", std::process::id())));
    let mut cfg = ctx.agent_config(ns.path(), (n + n / 4).max(65_536))?;
    cfg.command = command;
    cfg.extra_args = extra.iter().map(|s| s.to_string()).collect();
    cfg.stdout_file = Some(out.0.clone());
    let agent = Agent::start(&cfg)?;
    sys::sleep(Duration::from_secs(a.observer_warmup_s))?;
    let refs = floor_refs(agent.pid, kbtf, ctx.cgroup.map(|c| c.path()));
    let counters = HostCounters::attach(kbtf).map_err(|e| warn!("no host keep-alive counters: {e:#}")).ok();
    let (u0, r0, h0, off0) = (Usage::sample(agent.pid)?, refs.iter().map(RefProg::sample).collect::<Vec<_>>(), host_ka(counters.as_ref())?, agent::file_len(&out.0));
    sys::sleep(Duration::from_secs(a.observer_window_s))?;
    let (u1, r1, h1, off1) = (Usage::sample(agent.pid)?, refs.iter().map(RefProg::sample).collect::<Vec<_>>(), host_ka(counters.as_ref())?, agent::file_len(&out.0));
    drop(counters);
    drop(refs);
    let mut usage = u1.since(&u0);
    name_detached(&mut usage.progs, &u0.progs);
    let stop = agent.stop()?;
    let (counts, lines) = agent::count_file(&out.0, off0, off1)?;
    let saw = saw(command, &counts, lines, &stop, usage.secs);
    Ok(Row {
        name,
        secs: usage.secs,
        cpu_s: usage.cpu_s,
        bpf: Some(floor(&usage.progs, &bpf::deltas(&r0, &r1))),
        host_ka: ka_delta(h0, h1),
        saw,
        lost: Some(stop.lost),
        stopped_line: (stop.lost > 0).then(|| stop.stopped_line.clone()),
        printed_probes: (command == AgentCommand::Trace).then(|| get(&counts, "probe")),
    })
}

fn get(c: &Counts, k: &str) -> u64 {
    c.get(k).copied().unwrap_or(0)
}

/// What the agent's output says it saw in the window.
fn saw(command: AgentCommand, counts: &Counts, lines: u64, stop: &agent::StopReport, secs: f64) -> String {
    match command {
        AgentCommand::Trace => format!(
            "{} probes and {} answers printed ({:.0}/s and {:.0}/s), {lines} lines in all",
            get(counts, "probe"),
            get(counts, "ack"),
            get(counts, "probe") as f64 / secs,
            get(counts, "ack") as f64 / secs
        ),
        AgentCommand::Run => format!(
            "{lines} span lines in the window (default policy: healthy connections make none); whole run: {} kernel events, {} records (exit summary)",
            stop.kernel_events, stop.records
        ),
    }
}

/// Builds `n` connections and measures every observer on them, one after the other.
fn measure(ctx: &Ctx, n: usize) -> Result<Size> {
    let a = ctx.args;
    let ns = NetNs::new("observers")?;
    ns.sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
    ns.sysctl("net.core.somaxconn", "65535")?;
    ns.sysctl("net.ipv4.tcp_max_syn_backlog", "65535")?;
    let _stats = bpf::Stats::enable()?;
    let kbtf = KernelBtf::load()?;
    let farm = KaFarm::build(&ns, n, (n / 16_000 + 1).max(4), KeepAlive { idle_s: 1, intvl_s: 1, cnt: 5 })?;
    info!("{n} connections: warming up, every connection probing");
    sys::sleep(Duration::from_secs(a.observer_warmup_s))?;
    let mut rows = Vec::new();
    {
        let counters = HostCounters::attach(&kbtf).map_err(|e| warn!("no host keep-alive counters: {e:#}")).ok();
        rows.push(observe_ss(&ns, counters.as_ref(), a.observer_window_s)?);
    }
    for observer in AGENT_OBSERVERS {
        rows.push(observe_agent(ctx, &ns, &kbtf, n, observer)?);
    }
    farm.close();
    drop(ns);
    Ok(Size { n, rows })
}

pub fn run(ctx: &Ctx) -> Result<Section> {
    let a = ctx.args;
    if a.observer_connections.is_empty() || a.observer_connections.contains(&0) {
        bail!("--observer-connections takes one or more connection counts above 0 (got {:?})", a.observer_connections);
    }
    if a.observer_window_s == 0 {
        bail!("--observer-window-s must be at least 1");
    }
    let mut sizes = Vec::new();
    for &n in &ctx.args.observer_connections {
        sizes.push(measure(ctx, n)?);
    }
    let mut s = Section::new(Part::Observers, "5. Observers: `ss -tnoi`, `trace`, `run` over the same sockets");
    describe(&mut s, ctx);
    for size in &sizes {
        table(&mut s, size);
    }
    if sizes.len() > 1 {
        growth(&mut s, &sizes);
    }
    verdicts(&mut s, &sizes);
    Ok(s)
}

fn describe(s: &mut Section, ctx: &Ctx) {
    let a = ctx.args;
    s.line(format!(
        "Keep-alive connections in a network namespace the bench creates (idle 1 s, interval 1 s, count 5, set \
         before `connect()`; servers that never accept, so peers answer every probe from the accept queue), made \
         once per size, evenly over one idle time (connections made in one burst would probe in phase, and the \
         loopback's per-CPU backlog would drop a third of the probes), and watched by one observer at a time, each for {} s after {} s of warm-up:\n\n\
         - `ss -tnoi` in the namespace once a second: CPU of the `ss` processes from their rusage (user + system, \
           the kernel's socket dump included), per second of wall time;\n\
         - `keepalive-agent trace --format json --netns NS` writing to a file;\n\
         - `keepalive-agent run --netns NS` with its default span policy and no endpoint (JSON lines to a file);\n\
         - the same with `--probe-answers next-firing`, the packaged configuration's setting: no program on \
           received segments, answers timed at the next timer firing.\n\n\
         Agent process: user + system over the window, from its threads' scheduler run time \
         (`/proc/<pid>/task/*/schedstat`, nanoseconds; `/proc/<pid>/stat` counts 10 ms ticks, too coarse here). BPF: run time of the agent's programs \
         (statistics through a `BPF_ENABLE_STATS` fd, programs found through the agent's own fds). The floor: an \
         empty program attached after the agent's on each tracepoint the agent uses; its average run time × the \
         agent program's runs is what the statistics and the dispatch cost by themselves, and \"above the floor\" \
         subtracts it. Probes: keep-alive timer expiries on the host in the window (a counting program on \
         `timer_expire_entry`; every expiry here sends a probe), answers: segments received while a probe is out \
         (`tcp_probe`). These host counts include other processes' keep-alive connections (on a shared machine, \
         other test suites'), which the agent's programs handle too: the \"sees\" column gives what the agent \
         printed for the bench's namespace. Lost events: the agent's exit summary.\n",
        a.observer_window_s, a.observer_warmup_s
    ));
}

fn table(s: &mut Section, size: &Size) {
    let n = size.n;
    s.line(format!("### {n} connections\n"));
    s.line("| Observer | user+sys | BPF | BPF above floor | BPF per probe+answer above floor | total per connection | lost | sees |");
    s.line("|---|---|---|---|---|---|---|---|");
    for r in &size.rows {
        let (bpf, above, per) = match &r.bpf {
            Some(b) => (
                format!("{:.2} ms/s ({:.0} runs/s; floor {:.2} ms/s)", r.bpf_ms_s(), b.runs as f64 / r.secs, b.floor_ns / r.secs / 1e6),
                format!("{:.2} ms/s", r.bpf_above_ms_s()),
                r.bpf_above_us_per_probe().map_or("–".into(), |v| format!("{v:.2} µs per host probe"))
                    + &r.bpf_above_us_per_printed_probe().map_or(String::new(), |v| format!("; {v:.2} µs per printed probe")),
            ),
            None => ("–".into(), "–".into(), "–".into()),
        };
        let probes = r.host_ka.map_or(String::new(), |(t, a)| format!(" [host: {:.0} probes/s, {:.0} answers/s]", t as f64 / r.secs, a as f64 / r.secs));
        s.line(format!(
            "| `{}` | {:.1} ms/s | {bpf} | {above} | {per} | {:.2} µs/s | {} | {}{probes} |",
            r.name,
            r.ms_s(),
            r.total_ms_s() * 1e3 / n as f64,
            r.lost.map_or("–".into(), |l| l.to_string()),
            r.saw.replace('|', "/")
        ));
    }
    s.line("");
    for r in &size.rows {
        if let Some(line) = &r.stopped_line {
            s.line(format!("`{}` lost events; its summary: \"{}\"\n", r.name, line.replace('|', "/")));
        }
    }
    let unfloored: Vec<&String> = size.rows.iter().filter_map(|r| r.bpf.as_ref()).flat_map(|b| &b.unfloored).collect();
    if !unfloored.is_empty() {
        s.line(format!("Programs that ran without a floor reference (counted in full): {}.\n", dedup(unfloored).join(", ")));
    }
    if let (Some(ss), true) = (size.row("ss -tnoi"), size.rows.len() > 1) {
        for r in size.rows.iter().filter(|r| r.bpf.is_some()) {
            s.line(format!(
                "- `{}`: {:.1}× cheaper than `ss -tnoi` once a second (process + BPF: {:.2} ms/s against {:.1} ms/s).",
                r.name,
                ss.ms_s() / r.total_ms_s(),
                r.total_ms_s(),
                ss.ms_s()
            ));
        }
        s.line("");
    }
}

fn dedup(v: Vec<&String>) -> Vec<String> {
    let mut out: Vec<String> = v.into_iter().cloned().collect();
    out.sort();
    out.dedup();
    out
}

/// Cost per connection at each size against the first size's.
fn growth(s: &mut Section, sizes: &[Size]) {
    let first = &sizes[0];
    s.line(format!("Cost per connection (process + BPF), against {} connections:\n", first.n));
    s.line("| Observer | ".to_string() + &sizes.iter().map(|z| format!("{} conns", z.n)).collect::<Vec<_>>().join(" | ") + " | ratio |");
    s.line("|---|".to_string() + &"---|".repeat(sizes.len() + 1));
    for r0 in &first.rows {
        let per = |z: &Size| z.row(r0.name).map(|r| r.total_ms_s() * 1e3 / z.n as f64);
        let cells: Vec<String> = sizes.iter().map(|z| per(z).map_or("–".into(), |v| format!("{v:.2} µs/s"))).collect();
        let last = sizes.last().and_then(per);
        let ratio = last.zip(per(first)).map_or("–".into(), |(l, f)| format!("{:.2}", l / f));
        s.line(format!("| `{}` | {} | {ratio} |", r0.name, cells.join(" | ")));
    }
    s.line("");
}

fn met(ok: bool) -> Option<bool> {
    Some(ok)
}

fn verdicts(s: &mut Section, sizes: &[Size]) {
    let Some(first) = sizes.first() else { return };
    let n = first.n;
    let ss = first.row("ss -tnoi");
    for r in first.rows.iter().filter(|r| r.bpf.is_some()) {
        let short = short_name(r.name);
        s.verdict(Verdict::new(
            format!("{short}: in-kernel above the floor, {n} connections"),
            format!("≤ {TARGET_BPF_MS_S} ms/s"),
            format!("{:.2} ms/s ({:.2} ms/s with the floor)", r.bpf_above_ms_s(), r.bpf_ms_s()),
            met(r.bpf_above_ms_s() <= TARGET_BPF_MS_S),
        ));
        if let Some(per) = r.bpf_above_us_per_probe() {
            let own = r.bpf_above_us_per_printed_probe().map_or(String::new(), |v| format!(" ({v:.2} µs per probe printed for the bench's namespace)"));
            s.verdict(Verdict::new(
                format!("{short}: in-kernel per probe+answer above the floor, {n} connections"),
                format!("≤ {TARGET_BPF_US_PER_PROBE} µs"),
                format!("{per:.2} µs per host probe{own}"),
                met(per <= TARGET_BPF_US_PER_PROBE),
            ));
        }
        let target = if short == "trace" { TARGET_TRACE_MS_S } else { TARGET_RUN_MS_S };
        s.verdict(Verdict::new(
            format!("{short}: user+sys, {n} connections"),
            format!("≤ {target} ms/s"),
            format!("{:.1} ms/s", r.ms_s()),
            met(r.ms_s() <= target),
        ));
        if let Some(ss) = ss {
            let x = ss.ms_s() / r.total_ms_s();
            s.verdict(Verdict::new(
                format!("{short}: cheaper than ss -tnoi once a second (process + BPF), {n} connections"),
                format!("≥ {TARGET_VS_SS}×"),
                format!("{x:.1}× ({:.2} vs {:.1} ms/s)", r.total_ms_s(), ss.ms_s()),
                met(x >= TARGET_VS_SS),
            ));
        }
    }
    for z in sizes {
        for r in z.rows.iter().filter(|r| r.lost.is_some()) {
            let short = short_name(r.name);
            let lost = r.lost.unwrap_or(0);
            s.verdict(Verdict::new(format!("{short}: lost events, {} connections", z.n), "0", lost.to_string(), met(lost == 0)));
        }
    }
    if let Some(last) = sizes.last().filter(|_| sizes.len() > 1) {
        for r in first.rows.iter().filter(|r| r.bpf.is_some()) {
            let Some(l) = last.row(r.name) else { continue };
            let ratio = (l.total_ms_s() / last.n as f64) / (r.total_ms_s() / n as f64);
            let short = short_name(r.name);
            s.verdict(Verdict::new(
                format!("{short}: cost per connection, {} vs {n} connections", last.n),
                format!("within {:.0} %", TARGET_LINEAR * 100.0),
                format!("×{ratio:.2}"),
                met((ratio - 1.0).abs() <= TARGET_LINEAR),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ss_output() {
        let text = "State Recv-Q Send-Q Local Address:Port Peer Address:Port Process\n\
ESTAB 0 0 127.0.0.1:40000 127.0.0.1:9000 timer:(keepalive,571ms,0)\n\
\t cubic wscale:7,7 rto:201 rtt:0.02/0.01\n\
ESTAB 0 0 127.0.0.1:40002 127.0.0.1:9000 timer:(keepalive,1.2sec,2)\n\
\t cubic wscale:7,7\n\
ESTAB 0 0 127.0.0.1:9000 127.0.0.1:40000\n\
\t cubic\n";
        let r = parse_ss(text);
        assert_eq!(r.sockets, 3);
        assert_eq!(r.keepalive, 2);
        assert_eq!(r.probing, 1);
    }

    #[test]
    fn tracepoint_of_attach_points() {
        assert_eq!(tracepoint_of("raw_tp/timer_expire_entry"), Some("timer_expire_entry"));
        assert_eq!(tracepoint_of("tp_btf/tcp_probe + tp_btf/tcp_probe"), Some("tcp_probe"));
        assert_eq!(tracepoint_of("cgroup"), None);
    }

    fn delta(name: &str, attach: &str, runs: u64, ns: u64) -> ProgDelta {
        ProgDelta { name: name.into(), attach: attach.into(), runs, run_time_ns: ns }
    }

    #[test]
    fn floor_is_runs_times_the_empty_average() {
        let progs = [
            delta("a", "raw_tp/timer_expire_entry", 1000, 100_000),
            delta("b", "tp_btf/timer_expire_entry", 10, 5_000),
            delta("c", "cgroup", 5, 1_000),
            delta("d", "", 0, 0),
        ];
        let refs = [delta("empty", "raw_tp/timer_expire_entry", 100, 2_000)];
        let b = floor(&progs, &refs);
        assert_eq!(b.run_time_ns, 106_000);
        assert_eq!(b.runs, 1015);
        assert!((b.floor_ns - 1010.0 * 20.0).abs() < 1e-9);
        assert_eq!(b.unfloored, vec!["`c` (cgroup)".to_string()]);
    }

    #[test]
    fn cgroup_and_perf_hooks_have_their_own_floor() {
        let refs = [
            delta("empty", "raw_tp/inet_sock_set_state", 10, 500),
            delta("empty", "cgroup", 4, 200),
            // One per classic tracepoint, averaged over their runs.
            delta("empty", "perf", 3, 90),
            delta("empty", "perf", 1, 70),
        ];
        assert_eq!(floor_per_run(&delta("setsockopt", "cgroup", 7, 700), &refs), Some(50.0));
        assert_eq!(floor_per_run(&delta("sys_exit_accept", "perf", 7, 700), &refs), Some(40.0));
        assert_eq!(floor_per_run(&delta("x", "tp_btf/inet_sock_set_state + tp_btf/x", 1, 1), &refs), Some(50.0));
        assert_eq!(floor_per_run(&delta("x", "", 1, 1), &refs), None);
        assert_eq!(floor_per_run(&delta("x", "netns", 1, 1), &refs), None);
        assert_eq!(floor_per_run(&delta("setsockopt", "cgroup", 7, 700), &refs[..1]), None);
    }

    #[test]
    fn per_probe_above_the_floor() {
        let r = Row {
            name: "x",
            secs: 2.0,
            cpu_s: 0.01,
            bpf: Some(Bpf { run_time_ns: 3_000_000, runs: 0, floor_ns: 1_000_000.0, unfloored: Vec::new() }),
            host_ka: Some((4000, 4000)),
            ..Default::default()
        };
        assert!((r.ms_s() - 5.0).abs() < 1e-9);
        assert!((r.bpf_ms_s() - 1.5).abs() < 1e-9);
        assert!((r.bpf_above_ms_s() - 1.0).abs() < 1e-9);
        assert!((r.bpf_above_us_per_probe().unwrap() - 0.5).abs() < 1e-9);
        assert!((r.total_ms_s() - 6.5).abs() < 1e-9);
    }
}
