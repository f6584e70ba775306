//! Part `overhead`: loopback TCP request/response throughput with and without the agent,
//! interleaved off/on/off/on/.../off in one run on one continuously running workload. Each "on"
//! window is compared with the mean of the two "off" windows around it, which cancels slow drift.
//! With the raw-tracepoint comparison on, "on" windows alternate between the agent as shipped and
//! other modes: off, auto, off, auto with the answer program always attached, off, raw, ...
//!
//! Windows of seconds cannot resolve 1 %: on this kind of VM the workload's throughput wanders by
//! several percent over seconds whatever runs (the neighbours of the VM on its physical cores), and
//! starting the agent takes a second. So the agent's in-path cost is also measured at a fine
//! grain: the bench takes the agent's own tracepoint programs (by id, from the agent it started),
//! lets the agent exit, and attaches and detaches those programs itself every few hundred
//! milliseconds for minutes (hundreds of on/off phases). The agent's user-space CPU is measured in
//! the coarse windows and added.

use std::time::{Duration, Instant};

use anyhow::Result;
use log::info;

use super::agent::Agent;
use super::bpf::{self, RefKind, RefProg};
use super::load::RrLoad;
use super::report::{mean_sd, t95, Section, Verdict};
use super::sys::{self, NetNs};
use super::{Ctx, Part};

/// Target: throughput lost to the agent.
const TARGET_PCT: f64 = 1.0;

struct Win {
    /// Index into the modes, None: agent off.
    mode: Option<usize>,
    rate: f64,
    busy_pct: f64,
    /// CPU time of the workload's own process (all threads, user + system) per transaction, µs.
    /// Unlike throughput it hardly moves when other jobs take CPU from the workload.
    cpu_us_per_tx: f64,
    agent_cpu_pct: Option<f64>,
}

struct Measure {
    rate: f64,
    busy_pct: f64,
    cpu_us_per_tx: f64,
}

fn window(rr: &RrLoad, secs: u64) -> Result<Measure> {
    let me = std::process::id();
    let (b0, t0) = sys::cpu_jiffies();
    let c0 = sys::process_cpu_s(me)?;
    let n0 = rr.total();
    let start = Instant::now();
    super::sys::sleep(Duration::from_secs(secs))?;
    let n1 = rr.total();
    let el = start.elapsed().as_secs_f64();
    let c1 = sys::process_cpu_s(me)?;
    let (b1, t1) = sys::cpu_jiffies();
    let busy = if t1 > t0 { 100.0 * (b1 - b0) as f64 / (t1 - t0) as f64 } else { f64::NAN };
    let tx = (n1 - n0).max(1) as f64;
    Ok(Measure { rate: tx / el, busy_pct: busy, cpu_us_per_tx: (c1 - c0) / tx * 1e6 })
}

/// `f` of each item `on` selects against the mean of `f` of its two neighbours, which must be
/// "off" (the interleaving puts an off window or phase on both sides of every on one).
fn neighbour_ratios<T>(items: &[T], on: impl Fn(&T) -> bool, f: impl Fn(&T) -> f64) -> Vec<f64> {
    (1..items.len().saturating_sub(1))
        .filter(|&i| on(&items[i]) && !on(&items[i - 1]) && !on(&items[i + 1]))
        .map(|i| f(&items[i]) / ((f(&items[i - 1]) + f(&items[i + 1])) / 2.0))
        .collect()
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// One phase of the fine interleaving.
struct Phase {
    on: bool,
    rate: f64,
    /// Workload process CPU time (`CLOCK_PROCESS_CPUTIME_ID`) per transaction, ns.
    cpu_ns_per_tx: f64,
}

/// CPU time of this process, all threads, ns.
fn own_cpu_ns() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: ts is a valid out-parameter.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 * 1e9 + ts.tv_nsec as f64
}

/// Off/on phases of `phase` each for `total`, the agent's programs attached in the on phases.
/// Counting starts `SETTLE` after each switch (the attach itself patches code).
fn toggle(rr: &RrLoad, progs: &mut bpf::AgentProgs, copies: usize, phase: Duration, total: Duration) -> Result<Vec<Phase>> {
    const SETTLE: Duration = Duration::from_millis(20);
    let end = Instant::now() + total;
    let mut on = false;
    let mut phases = Vec::new();
    // Until the time is up, and then to the end of an off phase: every on phase has off on both sides.
    while Instant::now() < end || !on {
        sys::check_interrupted()?;
        if on {
            progs.attach(copies)?;
        } else {
            progs.detach();
        }
        std::thread::sleep(SETTLE);
        let (n0, c0, t0) = (rr.total(), own_cpu_ns(), Instant::now());
        std::thread::sleep(phase);
        let (n1, c1, el) = (rr.total(), own_cpu_ns(), t0.elapsed().as_secs_f64());
        let tx = (n1 - n0).max(1) as f64;
        phases.push(Phase { on, rate: tx / el, cpu_ns_per_tx: (c1 - c0) / tx });
        on = !on;
    }
    progs.detach();
    Ok(phases)
}

/// Mean of `v` and the half-width of its 95 % interval from `BATCHES` batch means: neighbouring
/// ratios share an off phase and the machine's drift, so they are not independent; means of long
/// consecutive batches nearly are.
fn batch_ci(v: &[f64]) -> (f64, f64) {
    const BATCHES: usize = 10;
    if v.len() < 2 * BATCHES {
        let (m, sd) = mean_sd(v);
        return (m, t95(v.len().saturating_sub(1)) * sd / (v.len() as f64).sqrt());
    }
    let size = v.len() / BATCHES;
    let means: Vec<f64> = (0..BATCHES).map(|b| mean_sd(&v[b * size..(b + 1) * size]).0).collect();
    let (_, sd) = mean_sd(&means);
    (mean_sd(v).0, t95(BATCHES - 1) * sd / (BATCHES as f64).sqrt())
}

/// The agent as shipped (the answer program attached only while probes are outstanding: never in
/// this workload), the same with the answer program attached all the time (what a host pays while
/// keep-alive probes are out), and unless `--no-raw-comparison` the raw-tracepoint fallback with it.
fn overhead_modes(ctx: &Ctx) -> Vec<super::Mode> {
    use super::Mode;
    let mut v = vec![
        Mode { name: "auto", args: Vec::new() },
        Mode { name: "auto, answers always", args: Vec::new() }.answers_always(),
    ];
    if !ctx.args.no_raw_comparison {
        let args = vec!["--attach".to_string(), "raw-tracepoint".to_string()];
        v.push(Mode { name: "raw-tracepoint, answers always", args }.answers_always());
    }
    v
}

pub fn run(ctx: &Ctx) -> Result<Section> {
    let a = ctx.args;
    let modes = overhead_modes(ctx);
    let ns = NetNs::new("overhead")?;
    let rr = RrLoad::start(&ns, a.rr_connections, a.rr_message, true, !a.rr_no_pin)?;
    info!("request/response load on {} connections; warming up", a.rr_connections);
    super::sys::sleep(Duration::from_secs(3))?;
    let mut wins = Vec::new();
    let mut lost = 0;
    for rep in 0..a.overhead_reps {
        for (mi, mode) in modes.iter().enumerate() {
            let w = window(&rr, a.overhead_window_s)?;
            info!("rep {}: off {:.0} transactions/s, {:.2} µs CPU each", rep + 1, w.rate, w.cpu_us_per_tx);
            wins.push(Win { mode: None, rate: w.rate, busy_pct: w.busy_pct, cpu_us_per_tx: w.cpu_us_per_tx, agent_cpu_pct: None });
            let mut cfg = ctx.agent_config(ns.path(), 65_536)?;
            cfg.extra_args = mode.args.clone();
            let agent = Agent::start(&cfg)?;
            super::sys::sleep(Duration::from_secs(1))?;
            let c0 = sys::process_cpu_s(agent.pid)?;
            let t0 = Instant::now();
            let w = window(&rr, a.overhead_window_s)?;
            let cpu = (sys::process_cpu_s(agent.pid)? - c0) / t0.elapsed().as_secs_f64() * 100.0;
            info!(
                "rep {}: {} {:.0} transactions/s, {:.2} µs CPU each (agent {:.2} % CPU)",
                rep + 1,
                mode.name,
                w.rate,
                w.cpu_us_per_tx,
                cpu
            );
            wins.push(Win {
                mode: Some(mi),
                rate: w.rate,
                busy_pct: w.busy_pct,
                cpu_us_per_tx: w.cpu_us_per_tx,
                agent_cpu_pct: Some(cpu),
            });
            lost += agent.stop()?.lost;
            super::sys::sleep(Duration::from_secs(1))?;
        }
    }
    let w = window(&rr, a.overhead_window_s)?;
    wins.push(Win { mode: None, rate: w.rate, busy_pct: w.busy_pct, cpu_us_per_tx: w.cpu_us_per_tx, agent_cpu_pct: None });

    // Fine interleaving: the agent's own programs, attached and detached by the bench.
    let mut fine = Vec::new();
    for mode in &modes {
        let mut cfg = ctx.agent_config(ns.path(), 65_536)?;
        cfg.extra_args = mode.args.clone();
        let agent = Agent::start(&cfg)?;
        super::sys::sleep(Duration::from_secs(1))?;
        let mut progs = bpf::AgentProgs::borrow(agent.pid)?;
        lost += agent.stop()?.lost;
        info!("{}: toggling the agent's {} tracepoint programs every {} ms for {} s", mode.name, progs.attach_points().len(), a.overhead_phase_ms, a.overhead_toggle_s);
        let phases = toggle(&rr, &mut progs, a.overhead_copies.max(1), Duration::from_millis(a.overhead_phase_ms), Duration::from_secs(a.overhead_toggle_s))?;
        fine.push((mode.flags(), progs.attach_points(), phases));
    }

    // The agent's BPF time per transaction, measured directly (statistics on, one window per mode),
    // with empty programs on the same tracepoints for the measurement floor.
    let mut bpf_rows = Vec::new();
    {
        let _stats = bpf::Stats::enable()?;
        let kbtf = bpf::KernelBtf::load()?;
        let refs: Vec<RefProg> = ["timer_expire_entry", "timer_expire_exit", "tcp_probe"]
            .iter()
            .map(|tp| RefProg::attach(RefKind::Empty, tp, &kbtf))
            .collect::<Result<_>>()?;
        for mode in &modes {
            let mut cfg = ctx.agent_config(ns.path(), 65_536)?;
            cfg.extra_args = mode.args.clone();
            let agent = Agent::start(&cfg)?;
            super::sys::sleep(Duration::from_secs(1))?;
            let p0 = bpf::process_bpf(agent.pid)?.progs;
            let r0: Vec<_> = refs.iter().map(RefProg::sample).collect();
            let n0 = rr.total();
            super::sys::sleep(Duration::from_secs(a.overhead_window_s))?;
            let n1 = rr.total();
            let p1 = bpf::process_bpf(agent.pid)?.progs;
            let r1: Vec<_> = refs.iter().map(RefProg::sample).collect();
            lost += agent.stop()?.lost;
            let tx = (n1 - n0).max(1) as f64;
            let progs = bpf::deltas(&p0, &p1);
            let floors = bpf::deltas(&r0, &r1);
            let total_ns: u64 = progs.iter().map(|p| p.run_time_ns).sum();
            // Floor of each program: the empty program on its tracepoint (the cheapest one elsewhere).
            let min_floor = floors.iter().filter_map(bpf::ProgDelta::avg_ns).fold(f64::INFINITY, f64::min);
            let floor_ns: f64 = progs
                .iter()
                .map(|p| {
                    let tp = p.attach.rsplit('/').next().unwrap_or("");
                    let f = floors
                        .iter()
                        .find(|r| r.attach.rsplit('/').next() == Some(tp))
                        .and_then(bpf::ProgDelta::avg_ns)
                        .unwrap_or(min_floor);
                    p.runs as f64 * f
                })
                .sum();
            let runs: u64 = progs.iter().map(|p| p.runs).sum();
            bpf_rows.push((mode.flags(), runs as f64 / tx, total_ns as f64 / tx, (total_ns as f64 - floor_ns) / tx));
        }
    }
    rr.stop();
    drop(ns);

    // Noise floor: the same comparison between "off" windows (each off against its off neighbours).
    let offs: Vec<f64> = wins.iter().filter(|w| w.mode.is_none()).map(|w| w.rate).collect();
    let off_ratios: Vec<f64> =
        (1..offs.len().saturating_sub(1)).map(|i| offs[i] / ((offs[i - 1] + offs[i + 1]) / 2.0)).collect();
    let (om, osd) = mean_sd(&off_ratios);

    let mut s = Section::new(Part::Overhead, "3. Host overhead: loopback request/response with and without the agent");
    s.line(format!(
        "{} TCP connections in a network namespace on 127.0.0.1, each a client thread sending {} bytes and waiting \
         for {} bytes back and a server thread echoing (blocking sockets, `TCP_NODELAY`; clients with \
         `SO_KEEPALIVE`, default timing, so the agent tracks them). Both CPUs are saturated, so whatever the agent \
         costs shows as lost throughput. The workload runs throughout; the agent (`trace --format json`, all hooks, \
         filtered to the namespace) is started and stopped around the \"on\" windows, {} s each with 1 s settling \
         after each start: {}. Each on window is compared with the mean of the off windows on both sides.\n",
        a.rr_connections,
        a.rr_message,
        a.rr_message,
        a.overhead_window_s,
        if modes.len() > 1 {
            format!(
                "off, {}, off, ... × {} each, then off",
                modes.iter().map(|m| format!("`{}`", m.flags())).collect::<Vec<_>>().join(", off, "),
                a.overhead_reps
            )
        } else {
            format!("off/on × {} then off", a.overhead_reps)
        }
    ));
    s.line("| Window | Agent | Transactions/s | Workload CPU per transaction | Machine busy | Agent process CPU |");
    s.line("|---|---|---|---|---|---|");
    for (i, w) in wins.iter().enumerate() {
        s.line(format!(
            "| {} | {} | {:.0} | {:.2} µs | {:.0} % | {} |",
            i + 1,
            w.mode.map_or("off".to_string(), |m| format!("on (`{}`)", modes[m].name)),
            w.rate,
            w.cpu_us_per_tx,
            w.busy_pct,
            w.agent_cpu_pct.map_or(String::new(), |c| format!("{c:.2} %"))
        ));
    }
    s.line("");
    s.line("| Agent (`--attach`) | Pairs | Throughput with / without (mean) | Median | sd | Min | Max | Cost (95 % CI) |");
    s.line("|---|---|---|---|---|---|---|---|");
    for (mi, mode) in modes.iter().enumerate() {
        let r = neighbour_ratios(&wins, |w| w.mode == Some(mi), |w| w.rate);
        let (m, sd) = mean_sd(&r);
        let ci = t95(r.len().saturating_sub(1)) * sd / (r.len() as f64).sqrt();
        let cost = (1.0 - m) * 100.0;
        let (lo, hi) = (cost - ci * 100.0, cost + ci * 100.0);
        let min = r.iter().cloned().fold(f64::INFINITY, f64::min);
        let max = r.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        s.line(format!(
            "| `{}` | {} | {m:.4} | {:.4} | {sd:.4} | {min:.4} | {max:.4} | **{cost:.2} %** ({lo:.2} … {hi:.2} %) |",
            mode.name,
            r.len(),
            median(&r)
        ));
        s.verdict(Verdict::new(
            format!("throughput with the whole agent started and stopped (seconds-scale windows), `{}`", mode.flags()),
            "",
            format!(
                "{cost:.2} % (95 % CI {lo:.2} … {hi:.2} %; median {:.2} %)",
                (1.0 - median(&r)) * 100.0
            ),
            None,
        ));
    }
    s.line("");
    s.line("Second view, less sensitive to other jobs on the machine: the workload process's own CPU time (all its");
    s.line("threads, user + system, including the in-kernel TCP work and the agent's BPF programs that run in its");
    s.line("context, except what the kernel accounts as interrupt time) per transaction, on against off:\n");
    s.line("| Agent (`--attach`) | CPU per transaction, on / off (mean) | Median | sd | Extra CPU per transaction (95 % CI) |");
    s.line("|---|---|---|---|---|");
    let off_cpu: Vec<f64> = wins.iter().filter(|w| w.mode.is_none()).map(|w| w.cpu_us_per_tx).collect();
    let (off_cpu_m, _) = mean_sd(&off_cpu);
    for (mi, mode) in modes.iter().enumerate() {
        let r = neighbour_ratios(&wins, |w| w.mode == Some(mi), |w| w.cpu_us_per_tx);
        let (m, sd) = mean_sd(&r);
        let ci = t95(r.len().saturating_sub(1)) * sd / (r.len() as f64).sqrt();
        s.line(format!(
            "| `{}` | {m:.4} | {:.4} | {sd:.4} | {:+.2} % ({:+.2} … {:+.2} %), about {:+.0} ns of {:.2} µs |",
            mode.name,
            median(&r),
            (m - 1.0) * 100.0,
            (m - 1.0 - ci) * 100.0,
            (m - 1.0 + ci) * 100.0,
            (m - 1.0) * off_cpu_m * 1000.0,
            off_cpu_m
        ));
        s.verdict(Verdict::new(
            format!("workload CPU per transaction, agent on vs off, `{}`", mode.flags()),
            "",
            format!("{:+.2} % (95 % CI {:+.2} … {:+.2} %)", (m - 1.0) * 100.0, (m - 1.0 - ci) * 100.0, (m - 1.0 + ci) * 100.0),
            None,
        ));
    }
    s.line("");
    let cpu: Vec<f64> = wins.iter().filter_map(|w| w.agent_cpu_pct).collect();
    let (cpu_m, _) = mean_sd(&cpu);
    let ncpu = super::load::allowed_cpus().map(|c| c.len()).unwrap_or(1).max(1);
    // The agent's user space takes this share of a machine whose CPUs the workload saturates.
    let user_share = cpu_m / ncpu as f64;
    s.line(format!(
        "Fine interleaving, what the target is judged on. The windows above move by several percent whatever \
         runs (off against off below), over seconds: neighbours of this VM on its physical cores. So the agent's \
         cost in the workload's path is measured where that drift cancels: the bench starts the agent, takes its \
         tracepoint programs (by id: the same verified code the agent loaded, with its offsets and maps), lets the \
         agent exit, and attaches and detaches those programs itself, {} ms off, {} ms on, ... for {} s per mode \
         (counting starts 20 ms after each switch). Each on phase is compared with the off phases on both sides; \
         the 95 % interval comes from 10 batch means of consecutive phases (neighbouring phases share drift). The \
         agent's user space is not running then; its CPU, measured in the windows above ({cpu_m:.2} % of one core, \
         {user_share:.3} % of this {ncpu}-CPU machine), is added to give the total.\n",
        a.overhead_phase_ms, a.overhead_phase_ms, a.overhead_toggle_s
    ));
    if a.overhead_copies > 1 {
        s.line(format!(
            "**Amplified run (`--overhead-copies {0}`): each program is attached {0} times in the on phases; the \
             cost of the agent is the figures below divided by {0}.**\n",
            a.overhead_copies
        ));
    }
    s.line("| Agent (`--attach`) | Programs toggled | On phases | Throughput on / off (mean) | sd per phase | In-path cost (95 % CI) | Workload CPU per transaction, on / off | Total with user space |");
    s.line("|---|---|---|---|---|---|---|---|");
    for (name, points, phases) in &fine {
        let r = neighbour_ratios(phases, |p| p.on, |p| p.rate);
        let (m, ci) = batch_ci(&r);
        let (_, sd) = mean_sd(&r);
        let (cm, cci) = batch_ci(&neighbour_ratios(phases, |p| p.on, |p| p.cpu_ns_per_tx));
        let cost = (1.0 - m) * 100.0;
        let (lo, hi) = (cost - ci * 100.0, cost + ci * 100.0);
        let total_hi = hi + user_share;
        s.line(format!(
            "| `{name}` | {} | {} | {m:.4} | {:.2} % | **{cost:.2} %** ({lo:.2} … {hi:.2} %) | {:+.2} % ({:+.2} … {:+.2} %) | {:.2} % (≤ {total_hi:.2} %) |",
            points.iter().map(|p| format!("`{p}`")).collect::<Vec<_>>().join(", "),
            r.len(),
            sd * 100.0,
            (cm - 1.0) * 100.0,
            (cm - cci - 1.0) * 100.0,
            (cm + cci - 1.0) * 100.0,
            cost + user_share,
        ));
        let met = if a.overhead_copies > 1 {
            None
        } else if total_hi < TARGET_PCT {
            Some(true)
        } else if lo + user_share > TARGET_PCT {
            Some(false)
        } else {
            None
        };
        s.verdict(Verdict::new(
            format!("throughput cost of the agent (request/response), `{name}`"),
            format!("< {TARGET_PCT:.0} %"),
            format!(
                "{:.2} % (95 % CI up to {total_hi:.2} %): {cost:.2} % in the workload's path ({} on/off phases) + {user_share:.3} % user space{}",
                cost + user_share,
                r.len(),
                if met.is_none() { " — not resolved" } else { "" }
            ),
            met,
        ));
    }
    s.line("");
    s.line("Third view, free of the machine's noise: the agent's BPF programs' own run time per transaction, from");
    s.line("BPF run-time statistics in one extra window per mode (the workload's CPU per transaction is the mean of");
    s.line("the off windows). The raw figure includes the statistics' clock reads (the empty program's cost, see part");
    s.line("2, ~70–80 ns per run here), which are more than the tracepoint dispatch that calls a program costs (a");
    s.line("per-CPU recursion guard and an RCU read section), so it bounds programs plus dispatch from above;");
    s.line("\"above the floor\" subtracts the empty program's figure per run: what the programs themselves add.\n");
    s.line("| Agent (`--attach`) | Program runs per transaction | BPF time per transaction | Share of the workload's CPU | Above the floor | Share |");
    s.line("|---|---|---|---|---|---|");
    for (name, runs, raw, net) in &bpf_rows {
        s.line(format!(
            "| `{name}` | {runs:.2} | {raw:.0} ns | {:.2} % | {net:.0} ns | {:.2} % |",
            raw / (off_cpu_m * 1000.0) * 100.0,
            net / (off_cpu_m * 1000.0) * 100.0
        ));
        s.verdict(Verdict::new(
            format!("BPF time per transaction / workload CPU per transaction, `{name}`"),
            "< 1 %",
            format!(
                "{:.2} % with the statistics' clock reads ({raw:.0} ns of {off_cpu_m:.1} µs), {:.2} % above the floor",
                raw / (off_cpu_m * 1000.0) * 100.0,
                net / (off_cpu_m * 1000.0) * 100.0
            ),
            Some(raw / (off_cpu_m * 1000.0) * 100.0 < TARGET_PCT),
        ));
    }
    s.line("");
    s.line(format!(
        "Noise floor of this machine (each off window against the off windows around it): mean {om:.4}, sd {osd:.4}. \
         Agent process CPU while on: {cpu_m:.2} % of one core (user space; its BPF programs run in the workload's \
         context and show in the throughput). Events lost: {lost}.\n"
    ));
    s.verdict(Verdict::new("off-vs-off noise (sd of throughput ratios)", "", format!("{:.2} %", osd * 100.0), None));
    Ok(s)
}
