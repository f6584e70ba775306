//! Parts `scale` and `polling`: many keep-alive connections probing every second, watched by the
//! agent; then the same connections watched the way people do today, `ss -tnoi` once a second.

use std::io::Read as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use log::info;

use super::agent::{Agent, Counts};
use super::bpf::{self, ProgDelta};
use super::kernel::timer_runs;
use super::load::{KaFarm, KeepAlive};
use super::report::{bytes, Section, Verdict};
use super::sys::{self, NetNs};
use super::{Ctx, Part};

const GLIBC_TUNABLES: &str = "glibc.malloc.mmap_threshold=131072:glibc.malloc.trim_threshold=131072";

/// Target: user-space memory per tracked connection.
const TARGET_BYTES_PER_CONN: f64 = 512.0;

fn diff(a: &Counts, b: &Counts) -> Counts {
    b.iter().map(|(k, v)| (k.clone(), v - a.get(k).copied().unwrap_or(0))).collect()
}

fn get(c: &Counts, k: &str) -> u64 {
    c.get(k).copied().unwrap_or(0)
}

/// One `ss -tnoi` run.
#[derive(Debug, Default, Clone, Copy)]
struct SsRun {
    cpu_s: f64,
    wall_s: f64,
    sockets: u64,
    keepalive: u64,
    probing: u64,
}

fn tv(t: libc::timeval) -> f64 {
    t.tv_sec as f64 + t.tv_usec as f64 / 1e6
}

/// Runs `ss -tnoi` in the namespace; CPU from the child's rusage.
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
    run.cpu_s = tv(ru.ru_utime) + tv(ru.ru_stime);
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

struct Setup {
    ns: NetNs,
    farm: KaFarm,
    agent: Agent,
    mem0: sys::ProcMem,
    _stats: bpf::Stats,
}

fn setup(ctx: &Ctx, n: usize) -> Result<Setup> {
    let ns = NetNs::new("scale")?;
    ns.sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
    ns.sysctl("net.core.somaxconn", "65535")?;
    ns.sysctl("net.ipv4.tcp_max_syn_backlog", "65535")?;
    let stats = bpf::Stats::enable()?;
    let mut cfg = ctx.agent_config(ns.path(), (n + n / 4).max(65_536))?;
    // glibc keeps freed memory (start-up: BTF parsing, snapshot) for reuse, which would absorb the
    // engine's growth and hide it from RSS; a fixed mmap threshold and eager trimming make RSS
    // growth follow live memory.
    cfg.env.push(("GLIBC_TUNABLES".into(), GLIBC_TUNABLES.into()));
    let agent = Agent::start(&cfg)?;
    super::sys::sleep(Duration::from_secs(2))?;
    let mem0 = sys::process_mem(agent.pid)?;
    let listeners = (n / 16_000 + 1).max(4);
    let farm = KaFarm::build(&ns, n, listeners, KeepAlive { idle_s: 1, intvl_s: 1, cnt: 5 })?;
    info!("warming up: every connection probing");
    super::sys::sleep(Duration::from_secs(5))?;
    Ok(Setup { ns, farm, agent, mem0, _stats: stats })
}

struct Polling {
    runs: Vec<SsRun>,
    secs: f64,
    agent_cpu_s: f64,
    agent_bpf_ns: u64,
    counts: Counts,
}

fn poll(st: &Setup, secs: u64) -> Result<Polling> {
    info!("polling with ss -tnoi once a second for {secs} s");
    let cpu0 = sys::process_cpu_s(st.agent.pid)?;
    let b0 = bpf::process_bpf(st.agent.pid)?.progs;
    let c0 = st.agent.counts();
    let start = Instant::now();
    let mut runs = Vec::new();
    for i in 0..secs {
        runs.push(ss_once(&st.ns)?);
        let next = Duration::from_secs(i + 1);
        if let Some(rest) = next.checked_sub(start.elapsed()) {
            super::sys::sleep(rest)?;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let agent_cpu_s = sys::process_cpu_s(st.agent.pid)? - cpu0;
    let b1 = bpf::process_bpf(st.agent.pid)?.progs;
    let agent_bpf_ns = bpf::deltas(&b0, &b1).iter().map(|d| d.run_time_ns).sum();
    Ok(Polling { runs, secs, agent_cpu_s, agent_bpf_ns, counts: diff(&c0, &st.agent.counts()) })
}

fn polling_section(p: &Polling, n: usize) -> Section {
    let mut s = Section::new(Part::Polling, "5. Against polling: `ss -tnoi` once a second");
    let k = p.runs.len().max(1) as f64;
    let ss_cpu: f64 = p.runs.iter().map(|r| r.cpu_s).sum();
    let ss_wall: f64 = p.runs.iter().map(|r| r.wall_s).sum::<f64>() / k;
    let ka: u64 = p.runs.iter().map(|r| r.keepalive).sum();
    let probing: u64 = p.runs.iter().map(|r| r.probing).sum();
    let sockets = p.runs.iter().map(|r| r.sockets).max().unwrap_or(0);
    let probes = get(&p.counts, "probe");
    let acks = get(&p.counts, "ack");
    let ss_cpu_per_s = ss_cpu / p.secs;
    let agent_cpu_per_s = (p.agent_cpu_s + p.agent_bpf_ns as f64 / 1e9) / p.secs;
    s.line(format!(
        "The same {n} connections, while the agent runs, are also listed with `ip netns exec NS ss -tnoi` once a \
         second for {:.0} s ({} runs), which is what people do today. CPU of `ss` from its rusage (user + system, \
         including the kernel's socket dump); CPU of the agent from `/proc/<pid>/stat` plus its BPF programs' run \
         time.\n",
        p.secs,
        p.runs.len()
    ));
    s.line("| | `ss -tnoi` every second | agent |");
    s.line("|---|---|---|");
    s.line(format!(
        "| CPU per second of watching | {:.1} ms ({:.2} % of one core; {:.0} ms wall per run) | {:.1} ms ({:.2} %: {:.1} ms process + {:.1} ms BPF) |",
        ss_cpu_per_s * 1e3,
        ss_cpu_per_s * 100.0,
        ss_wall * 1e3,
        agent_cpu_per_s * 1e3,
        agent_cpu_per_s * 100.0,
        p.agent_cpu_s / p.secs * 1e3,
        p.agent_bpf_ns as f64 / 1e6 / p.secs
    ));
    s.line(format!(
        "| What it sees | {} sockets per snapshot; {:.0} keep-alive timers per snapshot; {} timer snapshots with a probe outstanding (of {}) | {} probes and {} answers, each with its time ({:.0}/s and {:.0}/s) |",
        sockets,
        ka as f64 / k,
        probing,
        ka,
        probes,
        acks,
        probes as f64 / p.secs,
        acks as f64 / p.secs
    ));
    s.line("");
    s.line(format!(
        "Every connection sent a probe every second and had it answered within microseconds (loopback), so a \
         snapshot almost never catches one outstanding: `ss` saw {probing} of the {probes} probes the agent \
         reported, never when one was sent or answered, and would miss a dead peer's probes until the connection \
         is gone. It shows a timer's next expiry and the probe count at the instant of the poll, nothing in between.\n"
    ));
    s.verdict(Verdict::new(
        "CPU per second, ss -tnoi once a second vs agent",
        "",
        format!("ss {:.1} ms/s vs agent {:.1} ms/s ({n} connections)", ss_cpu_per_s * 1e3, agent_cpu_per_s * 1e3),
        None,
    ));
    s.verdict(Verdict::new(
        "probes seen, ss vs agent",
        "",
        format!("ss {probing} vs agent {probes} over {:.0} s", p.secs),
        None,
    ));
    s
}

pub fn run(ctx: &Ctx, with_polling: bool) -> Result<Vec<Section>> {
    let a = ctx.args;
    let n = a.connections;
    let st = setup(ctx, n)?;
    let tracked = get(&st.agent.counts(), "open");

    info!("measuring for {} s", a.scale_window_s);
    let cpu0 = sys::process_cpu_s(st.agent.pid)?;
    let b0 = bpf::process_bpf(st.agent.pid)?.progs;
    let c0 = st.agent.counts();
    let start = Instant::now();
    super::sys::sleep(Duration::from_secs(a.scale_window_s))?;
    let secs = start.elapsed().as_secs_f64();
    let cpu = sys::process_cpu_s(st.agent.pid)? - cpu0;
    let bpf_now = bpf::process_bpf(st.agent.pid)?;
    let progs: Vec<ProgDelta> = bpf::deltas(&b0, &bpf_now.progs);
    let counts = diff(&c0, &st.agent.counts());
    let mem1 = sys::process_mem(st.agent.pid)?;

    let polling = if with_polling { Some(poll(&st, a.poll_s)?) } else { None };

    let Setup { ns, farm, agent, mem0, _stats } = st;
    let connect_s = farm.connect_s;
    let stop = agent.stop()?;
    farm.close();
    drop(ns);

    let mut s = Section::new(Part::Scale, "4. Scale: keep-alive connections probing every second");
    s.line(format!(
        "{n} client connections in a network namespace (servers on 127.0.0.1–127.0.0.{} port 9000 that never \
         accept: the server ends wait, established, in the accept queues; clients in holder processes of at most \
         15,000 sockets each, because the open-file hard limit here is 20,000 and cannot be raised), each with `SO_KEEPALIVE`, `TCP_KEEPIDLE` 1, `TCP_KEEPINTVL` 1, `TCP_KEEPCNT` 5 set \
         before `connect()`: every connection sends a probe every second and gets it answered. The agent runs \
         `trace --format json` (all hooks, filtered to the namespace, output read and counted by the bench) and \
         was started before the connections were made ({:.1} s to connect them all). Measured over {:.0} s after \
         5 s of warm-up. The agent runs with `GLIBC_TUNABLES={GLIBC_TUNABLES}` so that its RSS growth \
         follows live memory (see the memory rows).\n",
        (n / 16_000 + 1).max(4),
        connect_s,
        secs
    ));
    let kernel_events = timer_runs(&counts) + get(&counts, "ack");
    let records: u64 = counts.values().sum();
    let bpf_ns: u64 = progs.iter().map(|p| p.run_time_ns).sum();
    let per_conn = (mem1.rss_anon.saturating_sub(mem0.rss_anon)) as f64 * 1024.0 / n as f64;
    s.line("| Measure | Value |");
    s.line("|---|---|");
    s.line(format!("| Connections tracked by the agent | {tracked} of {n} |"));
    s.line(format!(
        "| Kernel events handled | {:.0}/s ({:.0} keep-alive timer runs/s, {:.0} answers/s) |",
        kernel_events as f64 / secs,
        timer_runs(&counts) as f64 / secs,
        get(&counts, "ack") as f64 / secs
    ));
    s.line(format!(
        "| Records printed | {:.0}/s ({:.0} probes/s) |",
        records as f64 / secs,
        get(&counts, "probe") as f64 / secs
    ));
    s.line(format!(
        "| Lost events (whole run) | {} (agent: \"{}\") |",
        stop.lost,
        stop.stopped_line.replace('|', "/")
    ));
    s.line(format!(
        "| Agent CPU (process, user + system) | {:.1} % of one core ({:.1} µs per kernel event) |",
        cpu / secs * 100.0,
        cpu / kernel_events.max(1) as f64 * 1e6
    ));
    s.line(format!(
        "| Agent BPF programs, in kernel | {:.1} % of one core ({:.0} ns per kernel event) |",
        bpf_ns as f64 / secs / 1e7,
        bpf_ns as f64 / kernel_events.max(1) as f64
    ));
    s.line(format!("| Agent peak RSS (VmHWM) | {} |", bytes(stop.vm_hwm_kib as f64 * 1024.0)));
    s.line(format!(
        "| Agent RSS before connections → during | {} → {} (anonymous {} → {}; file-backed {} → {}: the binary and the ring buffer mapping; shared {} → {}) |",
        bytes(mem0.vm_rss as f64 * 1024.0),
        bytes(mem1.vm_rss as f64 * 1024.0),
        bytes(mem0.rss_anon as f64 * 1024.0),
        bytes(mem1.rss_anon as f64 * 1024.0),
        bytes(mem0.rss_file as f64 * 1024.0),
        bytes(mem1.rss_file as f64 * 1024.0),
        bytes(mem0.rss_shmem as f64 * 1024.0),
        bytes(mem1.rss_shmem as f64 * 1024.0)
    ));
    s.line(format!("| User-space memory per tracked connection (anonymous RSS growth / connections) | {per_conn:.0} B |"));
    let maps_total: u64 = bpf_now.maps.iter().map(|m| m.memlock).sum();
    s.line(format!(
        "| Kernel map memory (all agent maps, fixed) | {} — per connection: 0 B (no per-connection map) |",
        bytes(maps_total as f64)
    ));
    s.line("");
    s.line("Agent maps (fdinfo of the agent's map fds):\n");
    s.line("| Map | Type | Key | Value | Entries | Kernel memory |");
    s.line("|---|---|---|---|---|---|");
    for m in &bpf_now.maps {
        s.line(format!(
            "| {} | {} | {} | {} | {} | {} |",
            if m.name.is_empty() { "?" } else { &m.name },
            map_type(m.map_type),
            m.key_size,
            m.value_size,
            m.max_entries,
            bytes(m.memlock as f64)
        ));
    }
    s.line("");
    s.line("Agent programs at this load:\n");
    s.line("| Program | Attached to | Runs/s | Average ns/run | CPU, % of one core |");
    s.line("|---|---|---|---|---|");
    for p in &progs {
        s.line(format!(
            "| `{}` | {} | {:.0} | {} | {:.3} |",
            p.name,
            p.attach,
            p.runs as f64 / secs,
            p.avg_ns().map_or("–".into(), |v| format!("{v:.1}")),
            p.run_time_ns as f64 / secs / 1e7
        ));
    }
    s.line("");
    if !stop.lost_warnings.is_empty() {
        s.line("Agent warnings about lost events:\n");
        for w in stop.lost_warnings.iter().take(10) {
            s.line(format!("    {w}"));
        }
        s.line("");
    }
    s.verdict(Verdict::new(
        format!("lost events, {n} connections probing every second"),
        "0",
        stop.lost.to_string(),
        Some(stop.lost == 0),
    ));
    s.verdict(Verdict::new(
        "events handled / agent CPU / peak RSS",
        "",
        format!(
            "{:.0}/s, {:.1} % of a core + {:.1} % in BPF, {}",
            kernel_events as f64 / secs,
            cpu / secs * 100.0,
            bpf_ns as f64 / secs / 1e7,
            bytes(stop.vm_hwm_kib as f64 * 1024.0)
        ),
        None,
    ));
    s.verdict(Verdict::new(
        "user-space memory per tracked connection (RSS growth)",
        "≤ 512 B",
        format!("{per_conn:.0} B"),
        Some(per_conn <= TARGET_BYTES_PER_CONN),
    ));
    s.verdict(Verdict::new("kernel map memory per tracked connection", "", format!("0 B (fixed {} in all)", bytes(maps_total as f64)), None));
    let mut out = vec![s];
    if let Some(p) = polling {
        out.push(polling_section(&p, n));
    }
    Ok(out)
}

/// Part `polling` alone: builds the scale setup, polls, reports the comparison.
pub fn run_polling_only(ctx: &Ctx) -> Result<Section> {
    let n = ctx.args.connections;
    let st = setup(ctx, n)?;
    let p = poll(&st, ctx.args.poll_s)?;
    let Setup { ns, farm, agent, .. } = st;
    agent.stop()?;
    farm.close();
    drop(ns);
    Ok(polling_section(&p, n))
}

fn map_type(t: u32) -> String {
    match t {
        1 => "hash".into(),
        2 => "array".into(),
        5 => "percpu_hash".into(),
        6 => "percpu_array".into(),
        27 => "ringbuf".into(),
        t => t.to_string(),
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
}
