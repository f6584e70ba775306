//! Part `hostload`: a host workload (nginx serving a small static file to `wrk`, on loopback in a
//! namespace the bench creates) with and without the agent, measured by CPU accounting: the
//! agent's process time plus its BPF programs' run time, over the machine's busy CPU time (all
//! CPUs, non-idle, from `/proc/stat`) in the same window. Throughput windows on a VM swing by
//! ±20 % and cannot resolve 1 %; the CPU the agent itself spends can. Two workloads: a new
//! connection per request (`Connection: close`) and keep-alive requests. The agent runs as a
//! fleet would: `run` with its default options (the whole host, no namespace filter), and
//! `run --all-closes` as information.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use log::info;

use super::agent::{Agent, AgentCommand, Usage};
use super::bpf;
use super::report::{Section, Verdict};
use super::sys::{self, NetNs};
use super::{Ctx, Part};

/// Targets of the cost issue: the agent's share of the machine's busy CPU time.
const TARGET_CLOSE_PCT: f64 = 0.5;
const TARGET_KEEPALIVE_PCT: f64 = 0.1;

const ADDR: &str = "127.0.0.1:8080";

/// The two workloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Workload {
    /// `Connection: close`: one connection per request.
    Close,
    /// Keep-alive requests on long-lived connections.
    KeepAlive,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Close => "new connection per request",
            Workload::KeepAlive => "keep-alive requests",
        }
    }
}

/// How the agent runs in a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Without,
    Run,
    RunAllCloses,
}

impl Mode {
    const ALL: [Mode; 3] = [Mode::Without, Mode::Run, Mode::RunAllCloses];

    fn name(self) -> &'static str {
        match self {
            Mode::Without => "without the agent",
            Mode::Run => "`run` (defaults)",
            Mode::RunAllCloses => "`run --all-closes`",
        }
    }
}

/// nginx in the namespace, serving a directory the bench wrote; stopped and removed on drop.
struct Nginx {
    child: Child,
    dir: PathBuf,
}

/// The configuration the bench writes: one worker, loopback only, no logs, every path inside `dir`.
fn nginx_conf(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "worker_processes 1;\ndaemon off;\nmaster_process on;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  \
         fastcgi_temp_path {d}/fastcgi;\n  keepalive_requests 100000000;\n  keepalive_timeout 60s;\n  \
         server {{\n    listen {ADDR} backlog=4096;\n    root {d}/www;\n  }}\n}}\n"
    )
}

impl Nginx {
    fn start(ns: &NetNs) -> Result<Nginx> {
        let dir = std::env::temp_dir().join(format!("ka-bench-nginx-{}", std::process::id()));
        fs::create_dir_all(dir.join("www")).with_context(|| format!("creating {}", dir.display()))?;
        fs::write(dir.join("www/index.html"), "<html><body>".to_string() + &"keepalive ".repeat(60) + "</body></html>\n")?;
        fs::write(dir.join("nginx.conf"), nginx_conf(&dir))?;
        let child = Command::new("ip")
            .args(["netns", "exec", ns.name(), "nginx", "-e"])
            .arg(dir.join("error.log"))
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting nginx")?;
        let mut nginx = Nginx { child, dir };
        nginx.wait_listening(ns)?;
        Ok(nginx)
    }

    /// Waits until nginx accepts on [`ADDR`] (or fails with what it said).
    fn wait_listening(&mut self, ns: &NetNs) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                let log = fs::read_to_string(self.dir.join("error.log")).unwrap_or_default();
                bail!("nginx exited ({status}): {}", log.trim());
            }
            let addr = ADDR.parse().expect("valid address");
            if ns.run(|| Ok(std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()))? {
                return Ok(());
            }
            sys::sleep(Duration::from_millis(100))?;
        }
        bail!("nginx did not listen on {ADDR} within 10 s")
    }

    /// Child processes (the workers) of the master.
    fn workers(&self) -> Vec<i32> {
        let pid = self.child.id();
        fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let workers = self.workers();
        // SAFETY: signalling our own unreaped child (SIGTERM: nginx's fast shutdown, workers too).
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        sys::wait_or_kill(&mut self.child, Duration::from_secs(10));
        for w in workers {
            // Only if the master was killed before its workers stopped (ESRCH otherwise).
            // SAFETY: kill has no memory preconditions.
            unsafe { libc::kill(w, libc::SIGKILL) };
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// One of the agent's programs over windows: what it cost per request.
#[derive(Debug, Clone, Default)]
struct ProgCost {
    name: String,
    attach: String,
    runs: u64,
    run_time_ns: u64,
    /// Its runs × the empty program's average on its hook (`None`: no reference there in some
    /// window, e.g. one that failed to attach).
    floor_ns: Option<f64>,
}

/// One wrk run, and what the machine and the agent used meanwhile.
#[derive(Debug, Clone, Default)]
struct Win {
    secs: f64,
    /// Non-idle CPU time of the whole machine, seconds.
    busy_s: f64,
    agent_cpu_s: f64,
    agent_bpf_ns: u64,
    /// The statistics' own cost in `agent_bpf_ns`: the agent's runs × an empty program's average on
    /// the same tracepoints (see the observers part).
    agent_bpf_floor_ns: f64,
    requests: f64,
    errors: u64,
    /// The agent's programs, one entry each.
    progs: Vec<ProgCost>,
}

impl Win {
    fn add(&mut self, o: &Win) {
        for p in &o.progs {
            match self.progs.iter_mut().find(|q| q.name == p.name && q.attach == p.attach) {
                Some(q) => {
                    q.runs += p.runs;
                    q.run_time_ns += p.run_time_ns;
                    q.floor_ns = q.floor_ns.zip(p.floor_ns).map(|(a, b)| a + b);
                }
                None => self.progs.push(p.clone()),
            }
        }
        self.secs += o.secs;
        self.busy_s += o.busy_s;
        self.agent_cpu_s += o.agent_cpu_s;
        self.agent_bpf_ns += o.agent_bpf_ns;
        self.agent_bpf_floor_ns += o.agent_bpf_floor_ns;
        self.requests += o.requests;
        self.errors += o.errors;
    }

    /// The agent's share of the machine's busy time, percent.
    fn agent_pct(&self) -> f64 {
        (self.agent_cpu_s + self.agent_bpf_ns as f64 / 1e9) / self.busy_s * 100.0
    }

    /// [`Win::agent_pct`] with the BPF time above the statistics' floor.
    fn agent_pct_above_floor(&self) -> f64 {
        let bpf = (self.agent_bpf_ns as f64 - self.agent_bpf_floor_ns).max(0.0);
        (self.agent_cpu_s + bpf / 1e9) / self.busy_s * 100.0
    }
}

/// Requests per second and socket errors from wrk's output.
fn parse_wrk(text: &str) -> Result<(f64, u64)> {
    let rps = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no Requests/sec in wrk's output: {}", text.trim()))?;
    let errors = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Socket errors:"))
        .map(|v| v.split(',').filter_map(|f| f.split_whitespace().last()?.parse::<u64>().ok()).sum())
        .unwrap_or(0);
    Ok((rps, errors))
}

/// Runs wrk for `secs`; the agent (if any) and the machine are sampled around it.
fn window(ctx: &Ctx, ns: &NetNs, wl: Workload, agent: Option<&Agent>, kbtf: Option<&bpf::KernelBtf>, secs: u64) -> Result<Win> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(ctx.args.hostload_connections);
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns.name(), "wrk", "-t", &threads.to_string()])
        .args(["-c", &ctx.args.hostload_connections.to_string(), "-d", &format!("{secs}s")]);
    if wl == Workload::Close {
        cmd.args(["-H", "Connection: close"]);
    }
    cmd.arg(format!("http://{ADDR}/index.html")).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let refs = match (agent, kbtf) {
        (Some(a), Some(k)) => super::observers::floor_refs(a.pid, k, ctx.cgroup.map(|c| c.path())),
        _ => Vec::new(),
    };
    let r0: Vec<bpf::ProgSample> = refs.iter().map(bpf::RefProg::sample).collect();
    let u0 = agent.map(|a| Usage::sample(a.pid)).transpose()?;
    let (b0, _) = sys::cpu_jiffies();
    let t0 = Instant::now();
    let mut child = cmd.spawn().context("starting wrk")?;
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if let Err(e) = sys::sleep(Duration::from_millis(50)) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
    }
    let (b1, _) = sys::cpu_jiffies();
    let elapsed = t0.elapsed().as_secs_f64();
    let u1 = agent.map(|a| Usage::sample(a.pid)).transpose()?;
    let r1: Vec<bpf::ProgSample> = refs.iter().map(bpf::RefProg::sample).collect();
    drop(refs);
    let out = child.wait_with_output().context("reading wrk's output")?;
    let (rps, errors) = parse_wrk(&String::from_utf8_lossy(&out.stdout))?;
    let usage = u0.zip(u1).map(|(a, b)| b.since(&a));
    let ref_deltas = bpf::deltas(&r0, &r1);
    let progs = usage.as_ref().map_or_else(Vec::new, |u| {
        let cost = |p: &bpf::ProgDelta| ProgCost {
            name: p.name.clone(),
            attach: p.attach.clone(),
            runs: p.runs,
            run_time_ns: p.run_time_ns,
            floor_ns: super::observers::floor_per_run(p, &ref_deltas).map(|avg| avg * p.runs as f64),
        };
        u.progs.iter().filter(|p| p.runs > 0).map(cost).collect()
    });
    Ok(Win {
        secs: elapsed,
        busy_s: (b1 - b0) as f64 / sys::clk_tck(),
        agent_cpu_s: usage.as_ref().map_or(0.0, |u| u.cpu_s),
        agent_bpf_ns: usage.as_ref().map_or(0, |u| u.bpf_ns()),
        // The programs' floors, as the observers part sums them (`observers::floor`).
        agent_bpf_floor_ns: progs.iter().filter_map(|p| p.floor_ns).sum(),
        requests: rps * secs as f64,
        errors,
        progs,
    })
}

/// One window in `mode`: starts the agent if the mode has one, measures, stops it.
fn mode_window(ctx: &Ctx, ns: &NetNs, wl: Workload, mode: Mode) -> Result<(Win, u64)> {
    let secs = ctx.args.hostload_window_s;
    if mode == Mode::Without {
        return Ok((window(ctx, ns, wl, None, None, secs)?, 0));
    }
    let out = std::env::temp_dir().join(format!("ka-bench-hostload-{}.jsonl", std::process::id()));
    let mut cfg = ctx.agent_config(ns.path(), 65_536)?;
    cfg.command = AgentCommand::Run;
    cfg.netns = None;
    cfg.max_connections = 65_536;
    cfg.stdout_file = Some(out.clone());
    if mode == Mode::RunAllCloses {
        cfg.extra_args.push("--all-closes".into());
    }
    let res = (|| {
        let agent = Agent::start(&cfg)?;
        settle(ns)?;
        let kbtf = bpf::KernelBtf::load().map_err(|e| log::warn!("no empty reference programs (no floor): {e:#}")).ok();
        let w = window(ctx, ns, wl, Some(&agent), kbtf.as_ref(), secs)?;
        Ok((w, agent.stop()?.lost))
    })();
    let _ = fs::remove_file(&out);
    res
}

/// Lets a freshly started agent reach its steady state: the accept-owner programs walk every
/// accepted socket's descriptor table for [`keepalive_common::ACCEPT_WINDOW_S`] after the first
/// accept following the agent's start (sockets queued before it), then only near passive
/// keep-alive establishments, which this nginx (no `so_keepalive`) never makes. One connection
/// opens that window, which closes before the measurement.
fn settle(ns: &NetNs) -> Result<()> {
    sys::sleep(Duration::from_secs(2))?;
    let addr: std::net::SocketAddr = ADDR.parse().expect("valid address");
    ns.run(|| std::net::TcpStream::connect(addr).map(drop).context("connecting to nginx"))?;
    sys::sleep(Duration::from_secs(keepalive_common::ACCEPT_WINDOW_S + 2))
}

/// Per workload and mode, the sum of its windows, and lost events.
type Results = Vec<(Workload, Vec<(Mode, Win, u64)>)>;

pub fn run(ctx: &Ctx) -> Result<Section> {
    if ctx.args.hostload_window_s == 0 || ctx.args.hostload_connections == 0 {
        bail!("--hostload-window-s and --hostload-connections must be at least 1");
    }
    let ns = NetNs::new("hostload")?;
    ns.sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
    ns.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
    ns.sysctl("net.core.somaxconn", "4096")?;
    let _stats = bpf::Stats::enable()?;
    let nginx = Nginx::start(&ns)?;
    let mut results: Results = Vec::new();
    for wl in [Workload::Close, Workload::KeepAlive] {
        info!("hostload: {} ({} rounds of {} s windows)", wl.name(), ctx.args.hostload_reps, ctx.args.hostload_window_s);
        let mut acc: Vec<(Mode, Win, u64)> = Mode::ALL.iter().map(|&m| (m, Win::default(), 0)).collect();
        // Interleaved rounds: slow drifts of the machine's load hit every mode alike.
        for _ in 0..ctx.args.hostload_reps.max(1) {
            for (mode, win, lost) in acc.iter_mut() {
                let (w, l) = mode_window(ctx, &ns, wl, *mode)?;
                win.add(&w);
                *lost += l;
            }
        }
        results.push((wl, acc));
    }
    drop(nginx);
    drop(ns);
    Ok(section(ctx, &results))
}

fn section(ctx: &Ctx, results: &Results) -> Section {
    let a = ctx.args;
    let mut s = Section::new(Part::Hostload, "7. Host workloads by CPU accounting: nginx + wrk");
    s.line(format!(
        "nginx (one worker, a static file of 700 bytes, access log off) in a network namespace the bench creates, \
         loaded by `wrk -c {}` on loopback in the same namespace, in windows of {} s, {} interleaved rounds of \
         (without the agent, `run`, `run --all-closes`) per workload. The agent runs as a fleet runs it: `run` with \
         its default options (every namespace of the host, default span policy, no endpoint: JSON lines to a file; \
         its setsockopt program on the bench's cgroup), measured in its steady state: each start is followed by one \
         connection and {} s of idle, the window after the first accept in which the accept-owner programs walk \
         every accepted socket (sockets queued at start; afterwards only near passive keep-alive establishments, \
         which this nginx never makes). Its cost = (agent process user + system, from its \
         threads' `schedstat` run time, + its BPF programs' run time) / the machine's busy CPU time (all CPUs, non-idle, from \
         `/proc/stat`) over the same window. BPF run time with statistics on includes \
         the statistics' own two clock reads per run: an empty program attached after the agent's on each of its \
         hooks (each tracepoint; the bench's cgroup, by a `cgroup/setsockopt` program returning 1; the classic \
         syscall tracepoints of the accept-owner hook, by a perf event) measures that floor, and \"above the floor\" subtracts the agent's runs × the empty program's \
         average (what its programs cost with statistics off); the target is judged on that, as the in-kernel targets are. \
         By its definition this accounting leaves out the kernel's work to call each program (the tracepoint's \
         dispatch, the cgroup hook's copy of the option), which is outside the programs' run time; only the \
         throughput ratios, information here, would show it. The agent watches the whole host, so whatever else runs on the machine \
         (other builds and tests on a shared machine) is in both the agent's work and the busy time; \
         the load before the part started is recorded above. Requests/s are information (throughput windows \
         swing by ±20 % here).\n",
        a.hostload_connections, a.hostload_window_s, a.hostload_reps, keepalive_common::ACCEPT_WINDOW_S + 2
    ));
    s.line("| Workload | Agent | Requests/s | Machine busy | Agent process | Agent BPF (of which the statistics' floor) | Agent cost, % of busy | Above the floor | Lost |");
    s.line("|---|---|---|---|---|---|---|---|---|");
    for (wl, modes) in results {
        for (mode, w, lost) in modes {
            let agent = *mode != Mode::Without;
            s.line(format!(
                "| {} | {} | {:.0}{} | {:.0} % of {} CPUs | {} | {} | {} | {} | {} |",
                wl.name(),
                mode.name(),
                w.requests / w.secs,
                if w.errors > 0 { format!(" ({} socket errors)", w.errors) } else { String::new() },
                w.busy_s / w.secs / sys_cpus() * 100.0,
                sys_cpus(),
                if agent { format!("{:.2} ms/s", w.agent_cpu_s / w.secs * 1e3) } else { "–".into() },
                if agent {
                    format!("{:.2} ms/s ({:.2})", w.agent_bpf_ns as f64 / w.secs / 1e6, w.agent_bpf_floor_ns / w.secs / 1e6)
                } else {
                    "–".into()
                },
                if agent { format!("{:.3} %", w.agent_pct()) } else { "–".into() },
                if agent { format!("{:.3} %", w.agent_pct_above_floor()) } else { "–".into() },
                if agent { lost.to_string() } else { "–".into() },
            ));
        }
    }
    s.line("");
    program_tables(&mut s, results);
    verdicts(&mut s, results);
    s
}

/// Per program, for `run` with its defaults: what each costs a request, so that the figure above
/// says which program bounds it.
fn program_tables(s: &mut Section, results: &Results) {
    for (wl, modes) in results {
        let Some((_, w, _)) = modes.iter().find(|(m, _, _)| *m == Mode::Run) else { continue };
        if w.requests <= 0.0 || w.progs.is_empty() {
            continue;
        }
        s.line(format!("Per program, `run` (defaults), {} (BPF statistics; \"floor\": the empty program's average on the same hook):\n", wl.name()));
        s.line("| Program | Attached to | Runs per request | ns per run (of which the floor) | ns above the floor per request |");
        s.line("|---|---|---|---|---|");
        let mut progs = w.progs.clone();
        progs.sort_by_key(|p| std::cmp::Reverse(p.run_time_ns));
        for p in &progs {
            let per_run = p.run_time_ns as f64 / p.runs as f64;
            let (floor, above) = match p.floor_ns {
                Some(f) => (format!("{:.0}", f / p.runs as f64), (p.run_time_ns as f64 - f).max(0.0)),
                None => ("no reference".to_string(), p.run_time_ns as f64),
            };
            s.line(format!(
                "| `{}` | {} | {:.2} | {per_run:.0} ({floor}) | {:.0} |",
                p.name,
                if p.attach.is_empty() { "detached" } else { &p.attach },
                p.runs as f64 / w.requests,
                above / w.requests
            ));
        }
        s.line("");
    }
}

fn sys_cpus() -> f64 {
    std::thread::available_parallelism().map_or(1, |n| n.get()) as f64
}

fn verdicts(s: &mut Section, results: &Results) {
    for (wl, modes) in results {
        let find = |m: Mode| modes.iter().find(|(mm, _, _)| *mm == m);
        let target = if *wl == Workload::Close { TARGET_CLOSE_PCT } else { TARGET_KEEPALIVE_PCT };
        if let Some((_, w, lost)) = find(Mode::Run) {
            // Judged as the in-kernel targets are: BPF time above the statistics' floor (with the
            // statistics off, as a fleet runs, their clock reads are not there).
            s.verdict(Verdict::new(
                format!("agent (`run`) CPU over the machine's busy CPU, {}", wl.name()),
                "",
                format!("{:.3} %", w.agent_pct()),
                None,
            ));
            s.verdict(Verdict::new(
                format!("the same, BPF time above the statistics' floor (what the programs cost with statistics off), {}", wl.name()),
                format!("≤ {target} %"),
                format!("{:.3} %", w.agent_pct_above_floor()),
                Some(w.agent_pct_above_floor() <= target),
            ));
            s.verdict(Verdict::new(format!("lost events, `run`, {}", wl.name()), "0", lost.to_string(), Some(*lost == 0)));
        }
        if let Some((_, w, _)) = find(Mode::RunAllCloses) {
            s.verdict(Verdict::new(
                format!("agent (`run --all-closes`) CPU over busy CPU, {}", wl.name()),
                "",
                format!("{:.3} %", w.agent_pct()),
                None,
            ));
        }
        if let (Some((_, off, _)), Some((_, on, _))) = (find(Mode::Without), find(Mode::Run)) {
            let (r0, r1) = (off.requests / off.secs, on.requests / on.secs);
            s.verdict(Verdict::new(
                format!("requests/s with `run` / without, {}", wl.name()),
                "",
                format!("{:.0} / {:.0} ({:+.1} %)", r1, r0, (r1 / r0 - 1.0) * 100.0),
                None,
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wrk_output() {
        let text = "Running 8s test @ http://127.0.0.1:8080/index.html\n  2 threads and 16 connections\n\
  Thread Stats   Avg      Stdev     Max   +/- Stdev\n    Latency   1.02ms  300.00us   5.00ms   70.00%\n\
  120000 requests in 8.00s, 100.00MB read\n  Socket errors: connect 0, read 3, write 0, timeout 2\n\
Requests/sec:  15000.25\nTransfer/sec:     12.50MB\n";
        let (rps, errors) = parse_wrk(text).unwrap();
        assert!((rps - 15000.25).abs() < 1e-9);
        assert_eq!(errors, 5);
        assert!(parse_wrk("nothing").is_err());
    }

    #[test]
    fn agent_share_of_busy_time() {
        let w = Win {
            secs: 10.0,
            busy_s: 20.0,
            agent_cpu_s: 0.05,
            agent_bpf_ns: 50_000_000,
            agent_bpf_floor_ns: 30_000_000.0,
            requests: 1.0,
            ..Win::default()
        };
        assert!((w.agent_pct() - 0.5).abs() < 1e-9);
        assert!((w.agent_pct_above_floor() - 0.35).abs() < 1e-9);
    }

    #[test]
    fn windows_add_up_per_program() {
        let prog = |name: &str, runs, floor_ns| ProgCost { name: name.into(), attach: "tp_btf/x".into(), runs, run_time_ns: runs * 100, floor_ns };
        let mut sum = Win::default();
        sum.add(&Win { progs: vec![prog("a", 10, Some(600.0)), prog("b", 5, None)], ..Win::default() });
        sum.add(&Win { progs: vec![prog("a", 20, Some(1200.0)), prog("c", 1, Some(1.0))], ..Win::default() });
        let runs: Vec<(&str, u64, u64, Option<f64>)> =
            sum.progs.iter().map(|p| (p.name.as_str(), p.runs, p.run_time_ns, p.floor_ns)).collect();
        assert_eq!(runs, [("a", 30, 3000, Some(1800.0)), ("b", 5, 500, None), ("c", 1, 100, Some(1.0))]);
    }

    #[test]
    fn nginx_config_stays_in_its_directory() {
        let c = nginx_conf(Path::new("/tmp/x"));
        assert!(c.contains("listen 127.0.0.1:8080"));
        assert!(c.contains("pid /tmp/x/nginx.pid;"));
        assert!(c.contains("root /tmp/x/www;"));
    }
}
