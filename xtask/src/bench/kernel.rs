//! Part `kernel`: in-kernel cost of each agent program, from BPF run-time statistics
//! (`run_time_ns / run_cnt` over a window), next to reference programs on the same tracepoints:
//! (a) under timers that are not keep-alive timers (threads sleeping on socket timeouts, and TCP
//!     request/response traffic with its delayed-ACK and retransmit timers);
//! (b) under keep-alive load (connections probing every second).

use std::time::{Duration, Instant};

use anyhow::Result;
use log::info;

use super::agent::{Agent, Counts};
use super::bpf::{self, ProgDelta, ProgSample, RefKind, RefProg};
use super::load::{KaFarm, KeepAlive, RrLoad, Sleepers};
use super::report::{Section, Verdict};
use super::sys::NetNs;
use super::{Ctx, Mode, Part};

/// Target: average in-kernel cost of an invocation that is not ours.
pub const TARGET_NS: f64 = 50.0;

/// Tracepoint programs of the agent on the hot path (fire for everything, not only our sockets).
pub const HOT: &[&str] = &["timer_expire_entry", "timer_expire_exit", "tcp_probe", "inet_sock_set_state", "tcp_destroy_sock"];

/// Reference programs attached next to the agent's. The `tp_btf` ones are optional: a kernel that
/// refuses them is reported, not fatal.
pub fn attach_refs(kbtf: &bpf::KernelBtf) -> Result<(Vec<RefProg>, Vec<String>)> {
    let mut refs = vec![
        RefProg::attach(RefKind::Empty, "timer_expire_entry", kbtf)?,
        RefProg::attach(RefKind::ReadFilter, "timer_expire_entry", kbtf)?,
        RefProg::attach(RefKind::Empty, "timer_expire_exit", kbtf)?,
        RefProg::attach(RefKind::Empty, "tcp_probe", kbtf)?,
    ];
    let mut notes = Vec::new();
    for (kind, tp) in [(RefKind::BtfFilter, "timer_expire_entry"), (RefKind::BtfProbeFilter, "tcp_probe")] {
        match RefProg::attach(kind, tp, kbtf) {
            Ok(r) => refs.push(r),
            Err(e) => notes.push(format!("{kind:?} on {tp} not available here: {e:#}")),
        }
    }
    match bpf::btf_register_offset_accepted("timer_expire_entry", kbtf) {
        Ok(()) => notes.push(
            "The verifier accepts the `tp_btf` load with the offset added through a register holding a known \
             constant (what a Rust program reading offsets from a read-only global produces)."
                .into(),
        ),
        Err(e) => notes.push(format!(
            "The verifier refuses the `tp_btf` load with the offset added through a register (what a Rust \
             program reading offsets from a read-only global produces): {e:#}"
        )),
    }
    Ok((refs, notes))
}

/// One agent being measured, and how it was started.
pub struct Measured {
    pub mode: Mode,
    pub agent: Agent,
}

/// Agent programs (per mode) and reference programs over one window.
pub struct Window {
    pub secs: f64,
    /// Per mode, in the order given: that agent's programs.
    pub agents: Vec<(&'static str, Vec<ProgDelta>)>,
    pub refs: Vec<ProgDelta>,
    /// Records printed by the first agent.
    pub counts: Counts,
    /// Keep-alive timer expiries and answers on the whole host in the window (counting programs),
    /// ours and other processes' alike; None without the counters.
    pub host_ka: Option<(u64, u64)>,
}

/// The counting programs (keep-alive timer expiries, answers), attached after the agents so that
/// they never warm a cache line for them.
pub struct HostCounters {
    timers: bpf::CountProg,
    answers: bpf::CountProg,
}

impl HostCounters {
    pub fn attach(kbtf: &bpf::KernelBtf) -> Result<HostCounters> {
        Ok(HostCounters {
            timers: bpf::CountProg::attach(bpf::CountKind::KeepaliveTimers, kbtf)?,
            answers: bpf::CountProg::attach(bpf::CountKind::Answers, kbtf)?,
        })
    }

    /// Keep-alive timer expiries and answers counted so far.
    pub fn read(&self) -> Result<(u64, u64)> {
        Ok((self.timers.count()?, self.answers.count()?))
    }
}

impl Window {
    pub fn measure(agents: &[Measured], refs: &[RefProg], counters: Option<&HostCounters>, secs: u64) -> Result<Window> {
        let sample = || -> Result<(Vec<Vec<ProgSample>>, Vec<ProgSample>)> {
            let a = agents.iter().map(|m| Ok(bpf::process_bpf(m.agent.pid)?.progs)).collect::<Result<_>>()?;
            Ok((a, refs.iter().map(RefProg::sample).collect()))
        };
        let (a0, r0) = sample()?;
        let h0 = counters.map(HostCounters::read).transpose()?;
        let c0 = agents[0].agent.counts();
        let t0 = Instant::now();
        super::sys::sleep(Duration::from_secs(secs))?;
        let (a1, r1) = sample()?;
        let h1 = counters.map(HostCounters::read).transpose()?;
        let secs = t0.elapsed().as_secs_f64();
        let c1 = agents[0].agent.counts();
        let counts = c1.iter().map(|(k, v)| (k.clone(), v - c0.get(k).copied().unwrap_or(0))).collect();
        let agents = agents
            .iter()
            .zip(a0.iter().zip(a1.iter()))
            .map(|(m, (b, a))| (m.mode.name, bpf::deltas(b, a)))
            .collect();
        let host_ka = h0.zip(h1).map(|((t0, a0), (t1, a1))| (t1 - t0, a1 - a0));
        Ok(Window { secs, agents, refs: bpf::deltas(&r0, &r1), counts, host_ka })
    }

    /// Measures `secs` one-second slices (see [`Window::clean`]).
    pub fn slices(agents: &[Measured], refs: &[RefProg], counters: &HostCounters, secs: u64) -> Result<Vec<Window>> {
        (0..secs.max(1)).map(|_| Window::measure(agents, refs, Some(counters), 1)).collect()
    }

    /// Whether other processes' keep-alive work in this slice is too small to move the averages of
    /// the non-keep-alive firings by more than about a nanosecond (keep-alive runs cost ~1.5 µs).
    pub fn clean(&self) -> bool {
        let Some((timers, answers)) = self.host_ka else { return false };
        let runs = |tp: &str| self.agents.first().and_then(|(m, _)| self.prog(m, tp)).map_or(0, |p| p.runs);
        timers * 1000 <= runs("timer_expire_entry") && answers * 1000 <= runs("tcp_probe")
    }

    /// The sum of several windows (same agents, same programs).
    pub fn sum(ws: &[&Window]) -> Option<Window> {
        let first = ws.first()?;
        let mut out = Window {
            secs: 0.0,
            agents: first.agents.clone(),
            refs: first.refs.clone(),
            counts: Counts::new(),
            host_ka: first.host_ka.map(|_| (0, 0)),
        };
        for (_, progs) in out.agents.iter_mut() {
            progs.iter_mut().for_each(|p| (p.runs, p.run_time_ns) = (0, 0));
        }
        out.refs.iter_mut().for_each(|p| (p.runs, p.run_time_ns) = (0, 0));
        for w in ws {
            out.secs += w.secs;
            for ((_, acc), (_, add)) in out.agents.iter_mut().zip(&w.agents) {
                for (a, b) in acc.iter_mut().zip(add) {
                    a.runs += b.runs;
                    a.run_time_ns += b.run_time_ns;
                }
            }
            for (a, b) in out.refs.iter_mut().zip(&w.refs) {
                a.runs += b.runs;
                a.run_time_ns += b.run_time_ns;
            }
            for (k, v) in &w.counts {
                *out.counts.entry(k.clone()).or_default() += v;
            }
            if let (Some((t, a)), Some((wt, wa))) = (out.host_ka.as_mut(), w.host_ka) {
                *t += wt;
                *a += wa;
            }
        }
        Some(out)
    }

    /// The program of agent `mode` on `tracepoint` (raw or BTF-typed).
    pub fn prog(&self, mode: &str, tracepoint: &str) -> Option<&ProgDelta> {
        self.agents
            .iter()
            .find(|(m, _)| *m == mode)
            .and_then(|(_, progs)| progs.iter().find(|p| on_tracepoint(&p.attach, tracepoint)))
    }

    fn reference(&self, kind_label: &str, tracepoint: &str) -> Option<&ProgDelta> {
        self.refs.iter().find(|p| on_tracepoint(&p.attach, tracepoint) && p.name.starts_with(kind_label))
    }

    /// Markdown table of every program that ran (and every hot-path program).
    pub fn table(&self, s: &mut Section) {
        s.line("| Agent (`--attach`) | Program | Attached to | Runs/s | Average ns/run | CPU, % of one core |");
        s.line("|---|---|---|---|---|---|");
        let row = |s: &mut Section, who: &str, name: &str, attach: &str, p: &ProgDelta| {
            s.line(format!(
                "| {} | {} | {} | {:.0} | {} | {:.3} |",
                who,
                name,
                attach,
                p.runs as f64 / self.secs,
                p.avg_ns().map_or("–".into(), |v| format!("{v:.1}")),
                p.run_time_ns as f64 / self.secs / 1e7
            ));
        };
        for (mode, progs) in &self.agents {
            for p in progs.iter().filter(|p| p.runs > 0 || HOT.iter().any(|tp| on_tracepoint(&p.attach, tp))) {
                let name = if p.name.is_empty() { "(unnamed)" } else { &p.name };
                row(s, mode, &format!("`{name}`"), &p.attach, p);
            }
        }
        for p in &self.refs {
            row(s, "reference", &p.name, &p.attach, p);
        }
        s.line("Programs of the agents that did not run in the window are left out.\n");
    }
}

/// Which host count applies to a tracepoint's "ours" runs: keep-alive timer expiries for the timer
/// programs, answers for `tcp_probe`.
fn host_count(w: &Window, tracepoint: &str) -> Option<u64> {
    w.host_ka.map(|(timers, answers)| if tracepoint == "tcp_probe" { answers } else { timers })
}

/// Average cost of a program's runs that are not ours (`x`) and of ours (`y`), from two windows
/// with few (a) and many (b) of ours, `k` of them counted on the host by the counting programs:
/// `T = (R - k)·x + k·y` in both.
fn solve(ta: f64, ra: f64, ka: f64, tb: f64, rb: f64, kb: f64) -> Option<(f64, f64)> {
    let det = (ra - ka) * kb - (rb - kb) * ka;
    if kb <= 0.0 || det.abs() < 1e-9 {
        return None;
    }
    let x = (ta * kb - tb * ka) / det;
    Some((x, (tb - (rb - kb) * x) / kb))
}

/// Not-ours and ours average of agent `mode`'s program on `tracepoint`.
fn split_costs(wa: &Window, wb: &Window, mode: &str, tracepoint: &str) -> Option<(f64, f64)> {
    let (pa, pb) = (wa.prog(mode, tracepoint)?, wb.prog(mode, tracepoint)?);
    let (ka, kb) = (host_count(wa, tracepoint)?, host_count(wb, tracepoint)?);
    if ka > pa.runs || kb > pb.runs {
        return None;
    }
    solve(pa.run_time_ns as f64, pa.runs as f64, ka as f64, pb.run_time_ns as f64, pb.runs as f64, kb as f64)
}

fn on_tracepoint(attach: &str, tracepoint: &str) -> bool {
    attach == format!("raw_tp/{tracepoint}") || attach == format!("tp_btf/{tracepoint}")
}

/// Keep-alive timer runs in a window, from the records they produce (each run on a tracked
/// connection yields exactly one of these).
pub fn timer_runs(c: &Counts) -> u64 {
    ["probe", "idle", "suppressed", "busy", "timeout", "fin_wait2"]
        .iter()
        .map(|k| c.get(*k).copied().unwrap_or(0))
        .sum()
}

pub fn run(ctx: &Ctx) -> Result<Section> {
    let a = ctx.args;
    let ns = NetNs::new("kernel")?;
    ns.sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
    ns.sysctl("net.core.somaxconn", "65535")?;
    let stats = bpf::Stats::enable()?;
    let stats_how = stats.how();
    let kbtf = bpf::KernelBtf::load()?;
    let (refs, ref_notes) = attach_refs(&kbtf)?;
    // The answer program is attached the whole time (by default only while probes are out).
    let modes: Vec<super::Mode> = ctx.modes().into_iter().map(super::Mode::answers_always).collect();
    let mut agents = Vec::new();
    for mode in &modes {
        let mut cfg = ctx.agent_config(ns.path(), 65_536)?;
        cfg.extra_args = mode.args.clone();
        agents.push(Measured { mode: mode.clone(), agent: Agent::start(&cfg)? });
    }

    let mut notes = ref_notes;
    let counters = match HostCounters::attach(&kbtf) {
        Ok(c) => Some(c),
        Err(e) => {
            notes.push(format!("Counting programs unavailable ({e:#}): other processes' keep-alive timers are not separated out."));
            None
        }
    };

    // (a) timers that are not ours.
    info!("(a) {} sleeper threads + {} request/response connections", a.kernel_sleepers, a.kernel_rr_connections);
    let sleepers = Sleepers::start(&ns, a.kernel_sleepers)?;
    let rr = RrLoad::start(&ns, a.kernel_rr_connections, 64, true, false)?;
    super::sys::sleep(Duration::from_secs(2))?;
    let (w0, t0) = (sleepers.wakeups(), rr.total());
    // One-second slices: other processes' keep-alive connections come and go (test suites on a
    // shared machine); the slices in which they were quiet give the not-ours cost directly.
    let (wa, clean_secs, all_secs) = match &counters {
        Some(c) => {
            let slices = Window::slices(&agents, &refs, c, a.kernel_window_s)?;
            let clean: Vec<&Window> = slices.iter().filter(|w| w.clean()).collect();
            let all: Vec<&Window> = slices.iter().collect();
            let all_secs: f64 = slices.iter().map(|w| w.secs).sum();
            if clean.len() >= 3 {
                let clean_secs = clean.iter().map(|w| w.secs).sum();
                (Window::sum(&clean).expect("slices"), clean_secs, all_secs)
            } else {
                (Window::sum(&all).expect("slices"), 0.0, all_secs)
            }
        }
        None => {
            let w = Window::measure(&agents, &refs, None, a.kernel_window_s)?;
            let secs = w.secs;
            (w, 0.0, secs)
        }
    };
    let (wakeups, transactions) = (sleepers.wakeups() - w0, rr.total() - t0);
    rr.stop();
    sleepers.stop();

    let mut lost = 0;
    for m in agents {
        lost += m.agent.stop()?.lost;
    }
    // Reference programs off for (b): attached first, they would run first on each firing and take
    // the cold cache misses of sockets idle for a second in the agent's place.
    drop(refs);
    drop(counters);

    // (b) keep-alive load, one agent at a time (programs on the same tracepoint run one after the
    // other, and the first pays the cache misses).
    info!("(b) {} keep-alive connections probing every second", a.kernel_ka_connections);
    let farm = KaFarm::build(&ns, a.kernel_ka_connections, 4, KeepAlive { idle_s: 1, intvl_s: 1, cnt: 5 })?;
    let mut wbs = Vec::new();
    for mode in &modes {
        let mut cfg = ctx.agent_config(ns.path(), 65_536)?;
        cfg.extra_args = mode.args.clone();
        let m = Measured { mode: mode.clone(), agent: Agent::start(&cfg)? };
        let counters = HostCounters::attach(&kbtf).ok();
        super::sys::sleep(Duration::from_secs(3))?;
        wbs.push(Window::measure(std::slice::from_ref(&m), &[], counters.as_ref(), a.kernel_window_s)?);
        drop(counters);
        lost += m.agent.stop()?.lost;
    }
    farm.close();
    drop(stats);
    drop(ns);

    let mut s = Section::new(Part::Kernel, "2. In-kernel cost of each program");
    s.line("BPF run-time statistics (`run_time_ns / run_cnt` per program over the window) of the programs each agent");
    s.line("process holds, found through its own file descriptors (`/proc/<pid>/fdinfo`), never any other program.");
    s.line(format!("Statistics switched on with: {stats_how}."));
    if modes.len() > 1 {
        s.line("Two agents run side by side on the same load: the agent as shipped (`--attach auto`, which picks");
        s.line("BTF-typed tracepoints (`tp_btf`) where the kernel has them) and the agent restricted to raw tracepoints");
        s.line("(`--attach raw-tracepoint`, the fallback where a BTF-typed program does not load; the agent's minimum kernel, 5.8, has BTF-typed tracepoints; also the agent before BTF-typed programs");
        s.line("were added: the before/after of that change).");
    }
    s.line("Reference programs, hand-assembled by the bench, are attached to the same tracepoints: an empty program");
    s.line("(`r0 = 0; exit`: the floor of this measurement, what any program shows), one that does only the agent's");
    s.line("first filter step on a timer (`bpf_probe_read_kernel` of `timer->function`, compare with a constant), and");
    s.line("the same filters as BTF-typed programs, which load the field directly (verifier-checked, no helper call):");
    s.line("`timer->function` on `timer_expire_entry`, and `bpf_skc_to_tcp_sock` + `icsk_probes_out` on `tcp_probe`.");
    s.line("`run_time_ns` is measured with two `sched_clock()` reads around the program, so the empty program's");
    s.line("figure is mostly the cost of reading the clock on this machine; the tracepoint dispatch around the");
    s.line("program is not in it (the host overhead part measures the total).\n");
    for n in &notes {
        s.line(format!("- {n}"));
    }
    if !notes.is_empty() {
        s.line("");
    }

    s.line(format!(
        "### (a) Timers that are not keep-alive timers\n\n{} threads sleeping in `recv` with a 1 ms `SO_RCVTIMEO` \
         (each sleep a `timer_list` timer: {:.0} wake-ups/s) and {} TCP request/response connections \
         ({:.0} transactions/s; delayed-ACK and retransmit timers, and a `tcp_probe` per segment), {:.0} s. \
         \n",
        a.kernel_sleepers,
        wakeups as f64 / all_secs,
        a.kernel_rr_connections,
        transactions as f64 / all_secs,
        all_secs
    ));
    wa.table(&mut s);
    // The floor of each tracepoint: the empty program there, else the lowest empty-program figure.
    let any_floor = wa
        .refs
        .iter()
        .filter(|p| p.name.starts_with("empty"))
        .filter_map(ProgDelta::avg_ns)
        .fold(f64::INFINITY, f64::min);
    let wb_of = |mode: &str| wbs.iter().find(|w| w.agents.iter().any(|(m, _)| *m == mode));
    if let Some((timers, answers)) = wa.host_ka {
        if clean_secs > 0.0 {
            s.line(format!(
                "Other processes' keep-alive connections fire keep-alive timers and answers too, and for those the \
                 agent does its full work (~1.5 µs), which would be counted here as firings that are not its own. \
                 Two counting programs (attached after the agents, so they never warm a cache line for them) count \
                 them per one-second slice; the figures above and below are from the {clean_secs:.0} of {all_secs:.0} \
                 slices in which they were under 0.1 % of the firings ({:.1} keep-alive timers/s, {:.1} answers/s \
                 left, corrected for below).\n",
                timers as f64 / wa.secs,
                answers as f64 / wa.secs
            ));
        } else {
            s.line(format!(
                "**Other processes' keep-alive connections were active during all of (a)** ({:.0} keep-alive timer \
                 expiries/s and {:.0} answers/s, counted by two counting programs): the agent does its full work for \
                 those. They are separated below by solving `(runs − k)·x + k·y` over (a) and (b) for `x` (not \
                 ours) and `y` (ours), which assumes their keep-alive work costs what ours does in (b); re-run on a \
                 quieter machine for a direct figure.\n",
                timers as f64 / wa.secs,
                answers as f64 / wa.secs
            ));
        }
    }
    s.line("Cost above the floor: the agent program's average on firings that are not its own, minus the empty");
    s.line("program's on the same tracepoint — what the agent adds to each of them.\n");
    let mut head = "| Tracepoint | Runs/s | Floor (empty program) |".to_string();
    let mut rule = "|---|---|---|".to_string();
    for m in &modes {
        head.push_str(&format!(" `{0}`: average of all runs | `{0}`: not ours | `{0}`: above the floor |", m.name));
        rule.push_str("---|---|---|");
    }
    s.line(head);
    s.line(rule);
    for tp in HOT {
        let Some(first) = wa.prog(modes[0].name, tp) else { continue };
        if (first.runs as f64 / wa.secs) < 100.0 {
            continue;
        }
        let f = wa.reference("empty", tp).and_then(ProgDelta::avg_ns).unwrap_or(any_floor);
        let mut row = format!("| `{tp}` | {:.0} | {f:.1} ns |", first.runs as f64 / wa.secs);
        for (i, m) in modes.iter().enumerate() {
            match wa.prog(m.name, tp) {
                Some(p) => {
                    let avg = p.avg_ns().unwrap_or(f64::NAN);
                    let x = wb_of(m.name).and_then(|wb| split_costs(&wa, wb, m.name, tp)).map(|(x, _)| x);
                    let not_ours = x.unwrap_or(avg);
                    let kind = p.attach.split('/').next().unwrap_or("");
                    row.push_str(&format!(
                        " {avg:.1} ns ({kind}) | {} | {:.1} ns |",
                        x.map_or("–".to_string(), |x| format!("{x:.1} ns")),
                        not_ours - f
                    ));
                    let what = if i == 0 {
                        format!("`{tp}`, firings not ours (a), above the floor")
                    } else {
                        format!("`{tp}`, firings not ours (a), above the floor, `--attach {}`", m.name)
                    };
                    s.verdict(Verdict::new(
                        what,
                        format!("< {TARGET_NS:.0} ns/run"),
                        format!("{:.1} ns ({not_ours:.1} ns, of which {f:.1} ns is the floor; {kind})", not_ours - f),
                        Some(not_ours - f < TARGET_NS),
                    ));
                }
                None => row.push_str(" – | – | – |"),
            }
        }
        s.line(row);
    }
    s.line("");
    let floor = wa.reference("empty", "timer_expire_entry").and_then(ProgDelta::avg_ns);
    let filter_floor = wa.reference("read", "timer_expire_entry").and_then(ProgDelta::avg_ns);
    let btf_floor = wa.reference("tp_btf direct", "timer_expire_entry").and_then(ProgDelta::avg_ns);
    s.line(format!(
        "Reference programs on `timer_expire_entry`: empty {}, helper read-and-compare {}, `tp_btf` direct load \
         and compare {}.\n",
        floor.map_or("–".into(), |f| format!("{f:.1} ns")),
        filter_floor.map_or("–".into(), |f| format!("{f:.1} ns")),
        btf_floor.map_or("not available".into(), |f| format!("{f:.1} ns")),
    ));
    if let Some(f) = floor {
        s.verdict(Verdict::new("empty raw tracepoint program (the floor of this measurement)", "", format!("{f:.1} ns/run"), None));
    }

    s.line(format!(
        "### (b) Keep-alive load\n\n{} connections with keep-alive idle 1 s, interval 1 s (a probe per connection per \
         second, answered). Each agent measured alone for {} s (reference programs detached), so that no other \
         program warms the socket's cache lines for it:\n",
        a.kernel_ka_connections, a.kernel_window_s
    ));
    s.line("| Agent (`--attach`) | Program | Attached to | Runs/s | Average ns/run | CPU, % of one core |");
    s.line("|---|---|---|---|---|---|");
    for wb in &wbs {
        for (mode, progs) in &wb.agents {
            for p in progs.iter().filter(|p| p.runs > 0) {
                s.line(format!(
                    "| {} | `{}` | {} | {:.0} | {} | {:.3} |",
                    mode,
                    p.name,
                    p.attach,
                    p.runs as f64 / wb.secs,
                    p.avg_ns().map_or("–".into(), |v| format!("{v:.1}")),
                    p.run_time_ns as f64 / wb.secs / 1e7
                ));
            }
        }
    }
    s.line("");
    s.line("Per keep-alive probe: what each program spends on a keep-alive timer run (entry, exit) and on its");
    s.line("answer (`tcp_probe`), from the split above (`y`); without the counting programs, from the agent's own");
    s.line("records and the cost of the other runs in (a):\n");
    s.line("| Agent (`--attach`) | Keep-alive timer runs/s (host) | Answers/s (host) | Timer entry | Timer exit | Answer (`tcp_probe`) | Total per probe |");
    s.line("|---|---|---|---|---|---|---|");
    for (m, wb) in modes.iter().zip(&wbs) {
        let (timers, answers) = wb.host_ka.unwrap_or((timer_runs(&wb.counts), wb.counts.get("ack").copied().unwrap_or(0)));
        let ours = |tp: &str| -> Option<f64> {
            if let Some((_, y)) = split_costs(&wa, wb, m.name, tp) {
                return Some(y);
            }
            let k = if tp == "tcp_probe" { answers } else { timers };
            let pb = wb.prog(m.name, tp)?;
            let other = wa.prog(m.name, tp)?.avg_ns()?;
            (k > 0 && pb.runs >= k).then(|| (pb.run_time_ns as f64 - (pb.runs - k) as f64 * other) / k as f64)
        };
        let (e, x, t) = (ours("timer_expire_entry"), ours("timer_expire_exit"), ours("tcp_probe"));
        let f = |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{v:.0} ns"));
        let total = e.zip(x).zip(t).map(|((e, x), t)| e + x + t);
        s.line(format!(
            "| {} | {:.0} | {:.0} | {} | {} | {} | {} |",
            m.name,
            timers as f64 / wb.secs,
            answers as f64 / wb.secs,
            f(e),
            f(x),
            f(t),
            f(total)
        ));
        if let Some(total) = total {
            s.verdict(Verdict::new(
                format!("in-kernel cost per keep-alive probe and its answer (b), `--attach {}`", m.name),
                "",
                format!("{total:.0} ns"),
                None,
            ));
        }
    }
    s.line("");
    if lost > 0 {
        s.line(format!("The agents lost {lost} events during this part.\n"));
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn solve_separates_ours_from_the_rest() {
        // x = 10 ns for others, y = 1000 ns for ours.
        let (ra, ka, rb, kb) = (1000.0, 10.0, 600.0, 500.0);
        let ta = (ra - ka) * 10.0 + ka * 1000.0;
        let tb = (rb - kb) * 10.0 + kb * 1000.0;
        let (x, y) = solve(ta, ra, ka, tb, rb, kb).unwrap();
        assert!((x - 10.0).abs() < 1e-9 && (y - 1000.0).abs() < 1e-9, "{x} {y}");
        // No ours at all in (a): x is the plain average.
        let (x, _) = solve(990.0 * 10.0, 990.0, 0.0, tb, rb, kb).unwrap();
        assert!((x - 10.0).abs() < 1e-9);
        // Nothing of ours in (b): cannot tell.
        assert!(solve(ta, ra, ka, tb, rb, 0.0).is_none());
    }
}
