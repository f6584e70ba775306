//! The client and agent plumbing of the churn tests (tests/tests/churn.rs with keep-alive,
//! tests/tests/deaths.rs without): short client connections to a server that closes at once, and
//! an agent whose stdout is counted as it arrives rather than kept (hundreds of thousands of JSON
//! records would not fit a test's memory budget as parsed values).

use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader, Read as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    agent::{agent_binary, forced_attach, ready_timeout, STOP_TIMEOUT},
    events::str_of,
    Env,
};

/// Records that end a connection's story while the agent runs: its close, or the engine's end of a
/// connection whose close was missed (`untracked` with reason `destroyed`, `reused` or `gone`).
/// `untracked:shutdown` (still followed when the agent stopped) is counted apart.
pub const ENDS: &[&str] = &["close", "untracked:destroyed", "untracked:reused", "untracked:gone"];

/// What the agent printed, counted per event name for the connections to the test's server.
#[derive(Default)]
pub struct Counted {
    pub by_event: HashMap<String, u64>,
    pub other_lines: u64,
}

impl Counted {
    pub fn get(&self, event: &str) -> u64 {
        self.by_event.get(event).copied().unwrap_or(0)
    }

    pub fn ends(&self) -> u64 {
        ENDS.iter().map(|e| self.get(e)).sum()
    }
}

/// The agent, its stdout counted by a reader thread and its stderr kept.
pub struct ChurnAgent {
    child: Child,
    pub counted: Arc<Mutex<Counted>>,
    stderr: Arc<Mutex<Vec<String>>>,
    readers: Vec<JoinHandle<()>>,
}

impl ChurnAgent {
    /// `trace --format json --netns NS --cgroup CG --no-snapshot` (plus `--attach` when the tests
    /// force a method, and `extra`), counting the records whose remote port is `server_port`.
    pub fn start(env: &Env, server_port: u16, extra: &[&str]) -> ChurnAgent {
        let mut cmd = Command::new(agent_binary());
        cmd.args(["trace", "--format", "json", "--no-snapshot", "--max-connections", "1000000"])
            .args(["--ringbuf-size", "67108864"])
            .arg("--netns")
            .arg(env.ns.path())
            .arg("--cgroup")
            .arg(env.cgroup.path());
        if let Some(m) = forced_attach() {
            cmd.args(["--attach", &m]);
        }
        cmd.args(extra);
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawning the agent");
        let counted = Arc::new(Mutex::new(Counted::default()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().unwrap();
        let c = counted.clone();
        let out_reader = std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let v: Option<Value> = serde_json::from_str(&line).ok();
                let mut c = c.lock().unwrap();
                match v.as_ref().and_then(|v| Some((str_of(v, "event")?, remote_port(v)?))) {
                    Some((ev, port)) if port == server_port => {
                        let key = match str_of(v.as_ref().unwrap(), "reason") {
                            Some(reason) if ev == "untracked" => format!("untracked:{reason}"),
                            _ => ev.to_string(),
                        };
                        *c.by_event.entry(key).or_default() += 1
                    }
                    Some(_) => {}
                    None => c.other_lines += 1,
                }
            }
        });
        let err = child.stderr.take().unwrap();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let e = stderr.clone();
        let err_reader = std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                eprintln!("[agent] {line}");
                if line.starts_with("ready") {
                    let _ = ready_tx.send(());
                }
                e.lock().unwrap().push(line);
            }
        });
        let mut agent = ChurnAgent { child, counted, stderr, readers: vec![out_reader, err_reader] };
        if ready_rx.recv_timeout(ready_timeout()).is_err() {
            let _ = agent.child.kill();
            panic!("agent not ready:\n{}", agent.stderr.lock().unwrap().join("\n"));
        }
        agent
    }

    /// SIGINT, wait for the exit (the final drain and summary), join the readers.
    pub fn stop(mut self) -> (Counted, Vec<String>) {
        // SAFETY: signalling our own child, not reaped yet.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGINT) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("agent did not stop within {STOP_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        for r in self.readers.drain(..) {
            r.join().unwrap();
        }
        let stderr = std::mem::take(&mut *self.stderr.lock().unwrap());
        assert!(status.success(), "agent exited with {status}:\n{}", stderr.join("\n"));
        let counted = std::mem::take(&mut *self.counted.lock().unwrap());
        (counted, stderr)
    }
}

impl Drop for ChurnAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn remote_port(v: &Value) -> Option<u16> {
    str_of(v, "remote")?.parse::<SocketAddr>().ok().map(|a| a.port())
}

/// One client connection: socket, `SO_KEEPALIVE` before connect when `keepalive`, read to the
/// server's end of stream, close.
pub fn one_connection(addr: SocketAddr, keepalive: bool) -> std::io::Result<()> {
    let SocketAddr::V4(a) = addr else { unreachable!("IPv4 server") };
    // SAFETY: plain socket(2); owned at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by socket(2).
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let one = libc::c_int::from(keepalive);
    // SAFETY: setsockopt with a valid int option.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_KEEPALIVE,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
        sin_zero: [0; 8],
    };
    // SAFETY: a valid sockaddr_in of its size.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&sin as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut s = TcpStream::from(fd);
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut buf = [0u8; 16];
    while s.read(&mut buf)? > 0 {}
    Ok(())
}

/// Most connections the clients may be ahead of the agent's `open` records: a burst as fast as
/// the clients can go outruns a debug-build agent on two shared cores, and the ring buffer then
/// drops most events (counted, but the test is about what is lost otherwise). 20,000 connections
/// are about 30 MB of kernel events; the agent runs with a 64 MB ring buffer.
pub const AHEAD: usize = 20_000;

/// Holds a client while it is more than [`AHEAD`] connections ahead of the agent's `open`
/// records (`opened`), for at most 2 s (opens lost to a full ring buffer never arrive).
pub fn wait_for_agent(done: usize, opened: impl Fn() -> usize) {
    let deadline = Instant::now() + Duration::from_secs(2);
    while done > opened() + AHEAD && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Accepts and closes at once until `stop`.
pub fn serve(listener: TcpListener, stop: Arc<AtomicBool>, accepted: Arc<AtomicUsize>) {
    listener.set_nonblocking(true).unwrap();
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((s, _)) => {
                drop(s);
                accepted.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let mut pfd = libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut pfd, 1, 50) };
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// The number right before `word` in `line` after `after` (e.g. `12 lost`).
pub fn number_before(line: &str, after: &str, word: &str) -> Option<u64> {
    let rest = &line[line.find(after)? + after.len()..];
    let i = rest.find(word)?;
    rest[..i].split_whitespace().next_back()?.trim_start_matches('(').parse().ok()
}


/// Runs `connections` client connections (`keepalive`: see [`one_connection`]) to `addr` from
/// `threads` threads in the namespace, never more than [`AHEAD`] ahead of the agent's records
/// named `paced_by` (`open` for followed connections, `close` for others); returns the first
/// failures.
pub fn run_clients(
    env: &Env,
    addr: SocketAddr,
    connections: usize,
    threads: usize,
    keepalive: bool,
    counted: &Mutex<Counted>,
    paced_by: &str,
) -> Vec<String> {
    let done = AtomicUsize::new(0);
    let pace = || {
        let n = done.fetch_add(1, Ordering::Relaxed);
        if n.is_multiple_of(256) {
            wait_for_agent(n, || counted.lock().unwrap().get(paced_by) as usize);
        }
    };
    // Threads created by a thread of the namespace live in it too.
    env.ns.run(|| {
        std::thread::scope(|s| {
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    s.spawn(|| {
                        (0..connections / threads)
                            .filter_map(|_| {
                                pace();
                                one_connection(addr, keepalive).err().map(|e| e.to_string())
                            })
                            .take(5)
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            workers.into_iter().flat_map(|w| w.join().unwrap()).collect()
        })
    })
}
