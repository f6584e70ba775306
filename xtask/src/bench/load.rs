//! Workloads, all inside a network namespace the bench created, on loopback addresses only:
//! - [`RrLoad`]: TCP request/response over many persistent connections (one blocking thread per
//!   socket), counting transactions;
//! - [`Sleepers`]: threads that sleep on a socket receive timeout, each sleep a kernel
//!   `timer_list` timer that is not a keep-alive timer;
//! - [`KaFarm`]: many idle connections with keep-alive probing every second.

use std::io::{self, Read as _, Write as _};
use std::mem::size_of;
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use log::info;

use super::sys::NetNs;

fn check(r: libc::c_int, what: &str) -> io::Result<libc::c_int> {
    if r < 0 {
        let e = io::Error::last_os_error();
        Err(io::Error::new(e.kind(), format!("{what}: {e}")))
    } else {
        Ok(r)
    }
}

fn setsockopt_int(fd: RawFd, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: valid fd and a pointer to an int of the size passed.
    let r = unsafe {
        libc::setsockopt(fd, level, name, (&value as *const i32).cast(), size_of::<i32>() as u32)
    };
    check(r, "setsockopt").map(|_| ())
}

fn sockaddr(addr: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(addr.ip().octets()) },
        sin_zero: [0; 8],
    }
}

fn tcp_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2).
    let fd = check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) }, "socket")?;
    // SAFETY: a new fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A listening socket with a deep backlog (std's is fixed).
pub fn listen(addr: SocketAddrV4, backlog: i32) -> io::Result<std::net::TcpListener> {
    let fd = tcp_socket()?;
    setsockopt_int(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    let sa = sockaddr(addr);
    // SAFETY: valid sockaddr of the size passed.
    check(
        unsafe { libc::bind(fd.as_raw_fd(), (&sa as *const libc::sockaddr_in).cast(), size_of::<libc::sockaddr_in>() as u32) },
        "bind",
    )?;
    // SAFETY: plain listen(2).
    check(unsafe { libc::listen(fd.as_raw_fd(), backlog) }, "listen")?;
    Ok(std::net::TcpListener::from(fd))
}

/// Keep-alive settings set with `setsockopt(2)` before `connect(2)`, as careful clients do.
#[derive(Debug, Clone, Copy)]
pub struct KeepAlive {
    pub idle_s: i32,
    pub intvl_s: i32,
    pub cnt: i32,
}

/// `socket`, keep-alive options (if any), `connect`.
pub fn connect(addr: SocketAddrV4, ka: Option<KeepAlive>) -> io::Result<TcpStream> {
    let fd = tcp_socket()?;
    let raw = fd.as_raw_fd();
    if let Some(ka) = ka {
        setsockopt_int(raw, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
        setsockopt_int(raw, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, ka.idle_s)?;
        setsockopt_int(raw, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, ka.intvl_s)?;
        setsockopt_int(raw, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, ka.cnt)?;
    }
    let sa = sockaddr(addr);
    // SAFETY: valid sockaddr of the size passed.
    check(
        unsafe { libc::connect(raw, (&sa as *const libc::sockaddr_in).cast(), size_of::<libc::sockaddr_in>() as u32) },
        "connect",
    )?;
    Ok(TcpStream::from(fd))
}

/// A counter on its own cache line, written by one thread.
#[repr(align(64))]
#[derive(Default)]
struct Counter(AtomicU64);

/// CPUs this process may run on (`sched_getaffinity`).
pub fn allowed_cpus() -> io::Result<Vec<usize>> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills at most size_of::<cpu_set_t>() bytes.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    check(unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) }, "sched_getaffinity")?;
    Ok((0..libc::CPU_SETSIZE as usize).filter(|&c| unsafe { libc::CPU_ISSET(c, &set) }).collect())
}

/// Pins the calling thread to one CPU.
pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
    // SAFETY: as above; pid 0 is the calling thread.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    unsafe { libc::CPU_SET(cpu, &mut set) };
    check(unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) }, "sched_setaffinity")?;
    Ok(())
}

/// TCP request/response: `conns` client threads each send `msg` bytes and wait for `msg` bytes
/// back, `conns` server threads echo. With `pin`, the two threads of connection `i` are pinned to
/// the `i`-th allowed CPU (round robin): every transaction then stays on one CPU (loopback delivers
/// in the sender's softirq), which takes the scheduler's cross-CPU wake-up and migration decisions —
/// the largest source of run-to-run noise on a small VM — out of the measurement.
pub struct RrLoad {
    stop: Arc<AtomicBool>,
    counters: Arc<Vec<Counter>>,
    threads: Vec<JoinHandle<()>>,
    clients: Vec<TcpStream>,
}

impl RrLoad {
    pub fn start(ns: &NetNs, conns: usize, msg: usize, keepalive: bool, pin: bool) -> Result<RrLoad> {
        let cpus = if pin { allowed_cpus().context("CPUs to pin the workload to")? } else { Vec::new() };
        let cpu_of = |i: usize| (!cpus.is_empty()).then(|| cpus[i % cpus.len()]);
        let pairs = ns.run(|| {
            let listener = listen(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0), 1024)?;
            let addr = match listener.local_addr()? {
                std::net::SocketAddr::V4(a) => a,
                a => bail!("unexpected listener address {a}"),
            };
            let mut pairs = Vec::with_capacity(conns);
            for _ in 0..conns {
                // Default keep-alive timing (2 h idle): tracked by the agent, timer never due.
                let ka = keepalive.then_some(KeepAlive { idle_s: 7200, intvl_s: 75, cnt: 9 });
                let c = connect(addr, ka)?;
                let (s, _) = listener.accept()?;
                c.set_nodelay(true)?;
                s.set_nodelay(true)?;
                pairs.push((c, s));
            }
            Ok(pairs)
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let counters: Arc<Vec<Counter>> = Arc::new((0..conns).map(|_| Counter::default()).collect());
        let mut threads = Vec::new();
        let mut clients = Vec::new();
        for (i, (c, s)) in pairs.into_iter().enumerate() {
            clients.push(c.try_clone()?);
            let cpu = cpu_of(i);
            let mut s = s;
            threads.push(std::thread::spawn(move || {
                if let Some(cpu) = cpu {
                    let _ = pin_current_thread(cpu);
                }
                let mut buf = vec![0u8; msg];
                while s.read_exact(&mut buf).is_ok() {
                    if s.write_all(&buf).is_err() {
                        break;
                    }
                }
            }));
            let stop = stop.clone();
            let counters = counters.clone();
            let mut c = c;
            threads.push(std::thread::spawn(move || {
                if let Some(cpu) = cpu {
                    let _ = pin_current_thread(cpu);
                }
                let req = vec![0x5au8; msg];
                let mut resp = vec![0u8; msg];
                while !stop.load(Ordering::Relaxed) {
                    if c.write_all(&req).is_err() || c.read_exact(&mut resp).is_err() {
                        break;
                    }
                    counters[i].0.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        Ok(RrLoad { stop, counters, threads, clients })
    }

    /// Transactions completed so far.
    pub fn total(&self) -> u64 {
        self.counters.iter().map(|c| c.0.load(Ordering::Relaxed)).sum()
    }

    pub fn stop(self) {
        drop(self);
    }
}

impl Drop for RrLoad {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for c in &self.clients {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Threads sleeping in `recv` with a 1 ms `SO_RCVTIMEO`: each sleep arms a `timer_list` timer
/// (`schedule_timeout`) that expires, about HZ firings a second per thread.
pub struct Sleepers {
    stop: Arc<AtomicBool>,
    wakeups: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
}

impl Sleepers {
    pub fn start(ns: &NetNs, threads: usize) -> Result<Sleepers> {
        let sockets = ns.run(|| {
            (0..threads)
                .map(|_| -> Result<UdpSocket> {
                    let s = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))?;
                    s.set_read_timeout(Some(Duration::from_millis(1)))?;
                    Ok(s)
                })
                .collect::<Result<Vec<_>>>()
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let wakeups = Arc::new(AtomicU64::new(0));
        let threads = sockets
            .into_iter()
            .map(|s| {
                let stop = stop.clone();
                let wakeups = wakeups.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 64];
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let _ = s.recv(&mut buf);
                        n += 1;
                        if n.is_multiple_of(64) {
                            wakeups.fetch_add(64, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        Ok(Sleepers { stop, wakeups, threads })
    }

    pub fn wakeups(&self) -> u64 {
        self.wakeups.load(Ordering::Relaxed)
    }

    pub fn stop(self) {
        drop(self);
    }
}

impl Drop for Sleepers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Most client sockets one holder process keeps (the open-file hard limit here may be as low as
/// 20,000 and cannot always be raised).
pub const PER_HOLDER: usize = 15_000;

/// Many idle keep-alive connections: clients with `SO_KEEPALIVE` and the given timing (set before
/// connect), each holder's connections made evenly over one idle time so that their timers are
/// spread over it ([`holder_main`]). Servers listen on 127.0.0.1, 127.0.0.2... port 9000 (so that
/// ephemeral ports never run out) and never accept: an established connection waiting in the accept queue is a full TCP
/// socket that answers probes, and holds no file descriptor. Clients live in holder processes
/// (this binary, `bench --holder-*`), at most [`PER_HOLDER`] each, so that no process needs more
/// file descriptors than the hard limit allows.
pub struct KaFarm {
    _listeners: Vec<std::net::TcpListener>,
    holders: Vec<Holder>,
    pub connect_s: f64,
}

struct Holder {
    child: std::process::Child,
}

impl KaFarm {
    pub fn build(ns: &NetNs, n: usize, listeners: usize, ka: KeepAlive) -> Result<KaFarm> {
        let ls = ns.run(|| {
            (0..listeners.max(1))
                .map(|i| Ok(listen(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 1 + i as u8), 9000), 65535)?))
                .collect::<Result<Vec<_>>>()
        })?;
        let targets: Vec<String> = ls
            .iter()
            .map(|l| l.local_addr().map(|a| a.to_string()))
            .collect::<io::Result<_>>()?;
        let exe = std::env::current_exe().context("locating the bench binary")?;
        let started = Instant::now();
        let mut farm = KaFarm { _listeners: ls, holders: Vec::new(), connect_s: 0.0 };
        let mut offset = 0;
        while offset < n {
            let count = PER_HOLDER.min(n - offset);
            let mut child = std::process::Command::new(&exe)
                .args(["bench", "--holder-netns"])
                .arg(ns.path())
                .arg("--holder-targets")
                .arg(targets.join(","))
                .arg("--holder-count")
                .arg(count.to_string())
                .arg("--holder-offset")
                .arg(offset.to_string())
                .arg("--holder-keepalive")
                .arg(format!("{},{},{}", ka.idle_s, ka.intvl_s, ka.cnt))
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .context("starting a connection holder")?;
            let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
            farm.holders.push(Holder { child });
            let mut line = String::new();
            io::BufRead::read_line(&mut io::BufReader::new(stdout), &mut line)?;
            if line.trim() != format!("ready {count}") {
                bail!("connection holder failed (said {:?})", line.trim());
            }
            super::sys::check_interrupted()?;
            offset += count;
        }
        farm.connect_s = started.elapsed().as_secs_f64();
        info!("{n} keep-alive connections established in {:.1} s ({} holder processes)", farm.connect_s, farm.holders.len());
        Ok(farm)
    }

    /// Closes everything (the holders reset their connections and exit).
    pub fn close(self) {
        drop(self);
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        // Closing its stdin tells the holder to reset its connections and exit.
        drop(self.child.stdin.take());
        super::sys::wait_or_kill(&mut self.child, Duration::from_secs(30));
    }
}

/// Options of a holder process (hidden `bench --holder-*` flags).
#[derive(Debug, Clone)]
pub struct HolderArgs {
    pub netns: std::path::PathBuf,
    pub targets: Vec<SocketAddrV4>,
    pub count: usize,
    pub offset: usize,
    pub ka: KeepAlive,
}

/// When connection `i` of `count` is due, from the first: evenly over `idle_s` seconds.
fn connect_due(i: usize, count: usize, idle_s: i32) -> Duration {
    Duration::from_secs(idle_s.max(0) as u64).mul_f64(i as f64 / count.max(1) as f64)
}

/// The holder process: connect `count` clients from inside the namespace, say `ready COUNT`, keep
/// them until stdin closes, then reset them all.
pub fn holder_main(h: &HolderArgs) -> Result<()> {
    super::sys::raise_nofile(h.count as u64 + 64)?;
    super::sys::enter_netns(&h.netns)?;
    if h.targets.is_empty() {
        bail!("no targets");
    }
    let mut clients = Vec::with_capacity(h.count);
    let started = Instant::now();
    for i in 0..h.count {
        // Connections made in one burst have their keep-alive timers in phase: thousands of probes
        // in one timer tick overflow the loopback's per-CPU backlog (`net.core.netdev_max_backlog`,
        // 1000) and a third of them are dropped unanswered (the agent reports those episodes as
        // problems). Spread over one idle time, the timers fire in every tick of it.
        if let Some(wait) = connect_due(i, h.count, h.ka.idle_s).checked_sub(started.elapsed()) {
            std::thread::sleep(wait);
        }
        let addr = h.targets[(h.offset + i) % h.targets.len()];
        clients.push(connect(addr, Some(h.ka)).with_context(|| format!("connection {} to {addr}", h.offset + i))?);
    }
    println!("ready {}", clients.len());
    io::stdout().flush()?;
    let mut buf = [0u8; 64];
    while matches!(io::stdin().read(&mut buf), Ok(n) if n > 0) {}
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    for c in &clients {
        // SAFETY: valid fd and struct of the size passed.
        unsafe {
            libc::setsockopt(
                c.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                size_of::<libc::linger>() as u32,
            )
        };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_spread_over_one_idle_time() {
        assert_eq!(connect_due(0, 4, 1), Duration::ZERO);
        assert_eq!(connect_due(2, 4, 1), Duration::from_millis(500));
        assert_eq!(connect_due(3, 4, 2), Duration::from_millis(1500));
        assert_eq!(connect_due(1, 2, -1), Duration::ZERO);
    }

    #[test]
    fn sockaddr_is_network_order() {
        let sa = sockaddr(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 2), 9000));
        assert_eq!(sa.sin_port, 9000u16.to_be());
        assert_eq!(sa.sin_addr.s_addr.to_ne_bytes(), [127, 0, 0, 2]);
    }
}
