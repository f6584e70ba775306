//! Host plumbing for the benchmarks: the machine's description, /proc readers, and guards that
//! undo what the bench changes (network namespace, cgroup, file limit).

use std::fs;
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use log::{debug, warn};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// SIGINT/SIGTERM set a flag instead of killing the bench, so that [`sleep`] returns an error and
/// every guard (namespaces, cgroup, agent, sysctls) is undone on the way out.
pub fn install_interrupt_handler() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe).
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

/// Sleeps `d`, in short steps; fails as soon as the bench is interrupted.
pub fn sleep(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    loop {
        if INTERRUPTED.load(Ordering::Relaxed) {
            bail!("interrupted");
        }
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(Duration::from_millis(100)));
    }
}

/// Waits up to `timeout` for `child` to exit (after it was asked to), then kills and reaps it.
pub fn wait_or_kill(child: &mut std::process::Child, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Fails if the bench was interrupted.
pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(())
}

/// What the report says about the machine.
#[derive(Debug, Clone)]
pub struct Machine {
    pub cpu_model: String,
    pub cpus: usize,
    pub kernel: String,
    pub memory_mib: u64,
    pub clocksource: String,
    pub hz: Option<u32>,
}

impl Machine {
    pub fn describe() -> Machine {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name").map(|r| r.trim_start_matches([' ', '\t', ':']).to_string()))
            .unwrap_or_else(|| "unknown".into());
        let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let kernel = format!(
            "{} {}",
            fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
            fs::read_to_string("/proc/sys/kernel/version").unwrap_or_default().trim()
        );
        let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_mib = meminfo_kib(&meminfo, "MemTotal").unwrap_or(0) / 1024;
        let clocksource =
            fs::read_to_string("/sys/devices/system/clocksource/clocksource0/current_clocksource")
                .unwrap_or_default()
                .trim()
                .to_string();
        Machine { cpu_model, cpus, kernel, memory_mib, clocksource, hz: kernel_hz() }
    }
}

/// CONFIG_HZ from the kernel config, when it is readable.
fn kernel_hz() -> Option<u32> {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let text = fs::read_to_string(format!("/boot/config-{}", release.trim())).ok()?;
    text.lines().find_map(|l| l.strip_prefix("CONFIG_HZ=")?.parse().ok())
}

fn meminfo_kib(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(key)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// 1-, 5- and 15-minute load averages.
pub fn loadavg() -> (f64, f64, f64) {
    let s = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut it = s.split_whitespace().map(|v| v.parse::<f64>().unwrap_or(f64::NAN));
    (
        it.next().unwrap_or(f64::NAN),
        it.next().unwrap_or(f64::NAN),
        it.next().unwrap_or(f64::NAN),
    )
}

/// Busy and total jiffies of all CPUs (`/proc/stat`), to tell how busy the machine was.
pub fn cpu_jiffies() -> (u64, u64) {
    let s = fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = s.lines().find(|l| l.starts_with("cpu ")) else {
        return (0, 0);
    };
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// Share of all CPUs busy over `d`, in percent (from `/proc/stat`).
pub fn busy_pct(d: Duration) -> f64 {
    let (b0, t0) = cpu_jiffies();
    std::thread::sleep(d);
    let (b1, t1) = cpu_jiffies();
    if t1 > t0 {
        100.0 * (b1 - b0) as f64 / (t1 - t0) as f64
    } else {
        f64::NAN
    }
}

/// Clock ticks per second of `/proc/<pid>/stat` times.
pub fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if v > 0 {
        v as f64
    } else {
        100.0
    }
}

/// A `timeval` (as in a child's rusage) in seconds.
pub fn timeval_s(t: libc::timeval) -> f64 {
    t.tv_sec as f64 + t.tv_usec as f64 / 1e6
}

/// CPU time (user + system) a process used so far, in seconds.
pub fn process_cpu_s(pid: u32) -> Result<f64> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("/proc/{pid}/stat"))?;
    // The command name may hold spaces: fields start after the last ')'.
    let rest = s.rsplit_once(')').map(|(_, r)| r).ok_or_else(|| anyhow!("bad /proc/{pid}/stat"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state(3) ... utime is field 14, stime 15 (1-based in proc(5)) → index 11, 12.
    let utime: u64 = f.get(11).and_then(|v| v.parse().ok()).ok_or_else(|| anyhow!("no utime"))?;
    let stime: u64 = f.get(12).and_then(|v| v.parse().ok()).ok_or_else(|| anyhow!("no stime"))?;
    Ok((utime + stime) as f64 / clk_tck())
}

/// CPU time a process's live threads used so far, in seconds, to the nanosecond: the sum of
/// `/proc/<pid>/task/*/schedstat` (first field, the scheduler's `sum_exec_runtime`: user + system).
/// `/proc/<pid>/stat` counts in clock ticks (10 ms here), too coarse for a few ms per second over
/// a short window; threads that exited are missing here but not there.
pub fn process_cpu_precise_s(pid: u32) -> Result<f64> {
    let dir = format!("/proc/{pid}/task");
    let mut ns = 0u64;
    for entry in fs::read_dir(&dir).with_context(|| dir.clone())? {
        let Ok(entry) = entry else { continue };
        // A thread may exit between the listing and the read.
        let Ok(text) = fs::read_to_string(entry.path().join("schedstat")) else { continue };
        ns += text.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    }
    Ok(ns as f64 / 1e9)
}

/// Memory figures of a process from `/proc/<pid>/status`, in KiB.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcMem {
    pub vm_rss: u64,
    pub vm_hwm: u64,
    pub rss_anon: u64,
    pub rss_file: u64,
    pub rss_shmem: u64,
}

pub fn process_mem(pid: u32) -> Result<ProcMem> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).with_context(|| format!("/proc/{pid}/status"))?;
    let get = |k: &str| meminfo_kib(&s, k).unwrap_or(0);
    Ok(ProcMem {
        vm_rss: get("VmRSS"),
        vm_hwm: get("VmHWM"),
        rss_anon: get("RssAnon"),
        rss_file: get("RssFile"),
        rss_shmem: get("RssShmem"),
    })
}

/// Raises this process's open-file soft limit towards `want` (never above the hard limit, which
/// needs CAP_SYS_RESOURCE to raise). Returns the limit now in force.
pub fn raise_nofile(want: u64) -> Result<u64> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        bail!("getrlimit: {}", std::io::Error::last_os_error());
    }
    if lim.rlim_cur >= want {
        return Ok(lim.rlim_cur);
    }
    let nr_open: u64 = fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1 << 20);
    let want = want.min(nr_open);
    // Try the hard limit too; without CAP_SYS_RESOURCE settle for the current hard limit.
    let new = libc::rlimit { rlim_cur: want, rlim_max: lim.rlim_max.max(want) };
    // SAFETY: valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } == 0 {
        return Ok(want);
    }
    let new = libc::rlimit { rlim_cur: want.min(lim.rlim_max), rlim_max: lim.rlim_max };
    // SAFETY: valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } != 0 {
        bail!("setrlimit(RLIMIT_NOFILE, {}): {}", new.rlim_cur, std::io::Error::last_os_error());
    }
    Ok(new.rlim_cur)
}

/// Runs a command, fails with its stderr when it fails; returns stdout.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A network namespace the bench creates (`ip netns add`), with `lo` up; deleted on drop.
pub struct NetNs {
    name: String,
    path: PathBuf,
}

impl NetNs {
    pub fn new(tag: &str) -> Result<NetNs> {
        let name = format!("ka-bench-{tag}-{}", std::process::id());
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = NetNs { path: Path::new("/run/netns").join(&name), name };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, argv: &[&str]) -> Result<String> {
        run(Command::new("ip").args(["netns", "exec", &self.name]).args(argv))
    }

    /// Sets a (namespaced) sysctl inside the namespace; it disappears with the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.exec(&["sysctl", "-q", "-w", &format!("{key}={value}")]).map(|_| ())
    }

    /// Runs `f` on a thread that joined the namespace; sockets it creates live in the namespace.
    pub fn run<R: Send, F: FnOnce() -> Result<R> + Send>(&self, f: F) -> Result<R> {
        let path = self.path.clone();
        std::thread::scope(|s| {
            s.spawn(move || {
                enter_netns(&path)?;
                f()
            })
            .join()
            .map_err(|_| anyhow!("thread in the namespace panicked"))?
        })
    }
}

/// Moves the calling thread into the network namespace at `path`.
pub fn enter_netns(path: &Path) -> Result<()> {
    let f = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: a valid namespace fd; affects only the calling thread.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns({}): {}", path.display(), std::io::Error::last_os_error());
    }
    Ok(())
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = run(Command::new("ip").args(["netns", "del", &self.name])) {
            warn!("removing network namespace {}: {e:#}", self.name);
        } else {
            debug!("removed network namespace {}", self.name);
        }
    }
}

/// The cgroup2 mount point (from `/proc/self/mountinfo`; never assumed).
pub fn cgroup2_mount() -> Result<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    for line in info.lines() {
        let Some((left, right)) = line.split_once(" - ") else { continue };
        if right.split_whitespace().next() != Some("cgroup2") {
            continue;
        }
        if let Some(m) = left.split_whitespace().nth(4) {
            return Ok(PathBuf::from(m.replace("\\040", " ")));
        }
    }
    bail!("no cgroup2 hierarchy is mounted")
}

/// A cgroup v2 directory the bench creates and moves itself into, so that the agent's
/// `cgroup/setsockopt` program is attached there and never to the root. On drop the process goes
/// back to its previous cgroup and the directory is removed.
pub struct Cgroup {
    path: PathBuf,
    previous: PathBuf,
}

impl Cgroup {
    pub fn enter(tag: &str) -> Result<Cgroup> {
        let mount = cgroup2_mount()?;
        let own = fs::read_to_string("/proc/self/cgroup")?;
        let rel = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .ok_or_else(|| anyhow!("no cgroup v2 line in /proc/self/cgroup"))?;
        let previous = mount.join(rel.trim_start_matches('/'));
        let path = mount.join(format!("keepalive-bench-{tag}-{}", std::process::id()));
        fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        let cg = Cgroup { path, previous };
        fs::write(cg.path.join("cgroup.procs"), std::process::id().to_string())
            .with_context(|| format!("moving the bench into {}", cg.path.display()))?;
        Ok(cg)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let me = std::process::id().to_string();
        if let Err(e) = fs::write(self.previous.join("cgroup.procs"), &me) {
            warn!("moving back to {}: {e}", self.previous.display());
        }
        // Children (agent, ss) have exited by now; the directory empties once they are reaped.
        for _ in 0..50 {
            match fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
        warn!("could not remove {}", self.path.display());
    }
}
