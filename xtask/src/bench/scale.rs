//! Part `scale`: many keep-alive connections probing every second, watched by the agent (the same
//! connections watched by other observers: part `observers`).

use std::time::{Duration, Instant};

use anyhow::Result;
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

pub fn run(ctx: &Ctx) -> Result<Section> {
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
    Ok(s)
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
