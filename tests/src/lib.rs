//! Integration-test harness for keepalive.
//!
//! Tests run as root on the real kernel with the real `keepalive-agent` binary and real TCP
//! connections inside a network namespace the test creates (loopback addresses only).
//!
//! Pieces:
//! - [`Env`]: serialises tests (global lock), checks for root, creates a [`NetNs`] and a
//!   [`Cgroup`] (the test process is moved into it) and removes both on drop.
//! - [`agent::Agent`]: spawns the agent, waits for `ready`, collects its JSON events.
//! - [`tcp`]: servers and keep-alive clients inside the namespace.
//! - [`events`]: helpers to read the agent's JSON timeline.
//! - [`nginx`]: a real nginx in the namespace, and `ss -tnp` to see who holds a socket.
//! - [`churn`]: many short connections, and an agent whose output is counted, not kept.
//! - [`otlp`]: the OTLP receiver for `run` tests, and the spans the agent exports.
//! - [`audit`]: one `audit` run and its JSON, `ss -tnoi` in the namespace, a container-named cgroup.
//! - [`metrics`]: HTTP GET, Prometheus, promtool and rotel for the metrics tests.
//! - [`pki`]: certificates the TLS tests generate.
//! - [`privilege`]: running the agent as a non-root user with exactly a set of capabilities.
pub mod agent;
pub mod audit;
pub mod cgroup;
pub mod churn;
pub mod events;
pub mod metrics;
pub mod netns;
pub mod nginx;
pub mod otlp;
pub mod pki;
pub mod privilege;
pub mod tcp;

use std::process::Command;
use std::sync::{Mutex, MutexGuard};

use anyhow::{bail, Context as _, Result};

pub use agent::{agent_binary, Agent};
pub use cgroup::Cgroup;
pub use netns::NetNs;

/// Integration tests move the whole test process into a cgroup and share the namespace name
/// space: they must not run concurrently.
static SERIAL: Mutex<()> = Mutex::new(());

/// Takes the global test lock. A test that panicked while holding it does not poison the others.
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Panics with a clear message unless the process runs as root.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        panic!(
            "integration tests need root (euid is {euid}): they create network namespaces, \
             cgroups and nft rules and load eBPF programs"
        );
    }
}

/// Everything a test needs: the global lock, the agent binary, a fresh network namespace and a
/// cgroup holding the test process. Fields drop in declaration order: the process leaves the cgroup first, then the
/// namespace is deleted, then the lock is released.
pub struct Env {
    pub cgroup: Cgroup,
    pub ns: NetNs,
    _serial: MutexGuard<'static, ()>,
}

impl Env {
    pub fn new() -> Env {
        let serial = serial();
        require_root();
        // The agent binary is built (once) before anything the test times: a test that started a
        // server and then waited minutes for the build would find its connections timed out.
        agent::agent_binary();
        let ns = NetNs::new().expect("creating the test network namespace");
        let cgroup = Cgroup::new().expect("creating the test cgroup");
        Env {
            cgroup,
            ns,
            _serial: serial,
        }
    }
}

impl Default for Env {
    fn default() -> Env {
        Env::new()
    }
}

/// Runs a command, returns its stdout; fails with its stderr when it exits non-zero.
pub(crate) fn run_cmd(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Stops a child the test started: SIGTERM, up to `grace` to exit, then SIGKILL; reaps it.
pub fn terminate(child: &mut std::process::Child, grace: std::time::Duration) {
    // SAFETY: signalling our own child, not reaped yet (try_wait below reaps it).
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let deadline = std::time::Instant::now() + grace;
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The comm (thread name, as the kernel sees it) of the calling thread.
pub fn thread_comm() -> String {
    std::fs::read_to_string("/proc/thread-self/comm")
        .expect("reading /proc/thread-self/comm")
        .trim_end()
        .to_string()
}

/// The comm of the process (its main thread).
pub fn process_comm() -> String {
    std::fs::read_to_string("/proc/self/comm")
        .expect("reading /proc/self/comm")
        .trim_end()
        .to_string()
}

/// Raises the soft RLIMIT_NOFILE to at least `want` (up to the hard limit); returns the new soft
/// limit.
pub fn raise_nofile(want: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: lim is a valid rlimit out-parameter.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        panic!("getrlimit: {}", std::io::Error::last_os_error());
    }
    if lim.rlim_cur >= want {
        return lim.rlim_cur;
    }
    if lim.rlim_max < want {
        // Root may raise the hard limit too (up to fs.nr_open).
        lim.rlim_max = want;
    }
    lim.rlim_cur = want;
    // SAFETY: lim is a valid rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        panic!(
            "setrlimit(RLIMIT_NOFILE, {want}): {}",
            std::io::Error::last_os_error()
        );
    }
    want
}

/// Whether the running kernel names the keep-alive reset reason (`SK_RST_REASON_TCP_KEEPALIVE_TIMEOUT`
/// in its BTF; kernels before 6.10 have no reset reasons at all).
pub fn kernel_has_keepalive_reset_reason() -> bool {
    const NAME: &[u8] = b"SK_RST_REASON_TCP_KEEPALIVE_TIMEOUT\0";
    std::fs::read("/sys/kernel/btf/vmlinux")
        .map(|btf| btf.windows(NAME.len()).any(|w| w == NAME))
        .unwrap_or(false)
}
