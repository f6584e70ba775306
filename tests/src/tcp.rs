//! TCP servers and keep-alive clients inside a test network namespace (loopback only).
use std::io::{self, Read as _, Write as _};
use std::mem;
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener,
    TcpStream,
};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::NetNs;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// The family of `addr`.
    pub fn of(addr: &SocketAddr) -> Family {
        if addr.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }

    /// The loopback address: 127.0.0.1 or ::1. The only addresses tests use.
    pub fn loopback(self) -> IpAddr {
        match self {
            Family::V4 => IpAddr::V4(Ipv4Addr::LOCALHOST),
            Family::V6 => IpAddr::V6(Ipv6Addr::LOCALHOST),
        }
    }

    fn domain(self) -> libc::c_int {
        match self {
            Family::V4 => libc::AF_INET,
            Family::V6 => libc::AF_INET6,
        }
    }
}

/// Keep-alive settings applied with setsockopt: SO_KEEPALIVE=1, TCP_KEEPIDLE, TCP_KEEPINTVL,
/// TCP_KEEPCNT and, when set, TCP_USER_TIMEOUT.
#[derive(Clone, Copy, Debug)]
pub struct Keepalive {
    pub idle_s: i32,
    pub intvl_s: i32,
    pub cnt: i32,
    pub user_timeout_ms: Option<u32>,
}

impl Keepalive {
    pub fn new(idle_s: i32, intvl_s: i32, cnt: i32) -> Keepalive {
        Keepalive {
            idle_s,
            intvl_s,
            cnt,
            user_timeout_ms: None,
        }
    }

    pub fn user_timeout(mut self, ms: u32) -> Keepalive {
        self.user_timeout_ms = Some(ms);
        self
    }
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// `setsockopt(fd, level, name, &val)` for an int option, from the calling thread.
pub fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    val: libc::c_int,
) -> io::Result<()> {
    // SAFETY: val lives across the call; the length matches.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&val as *const libc::c_int).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// Applies `ka` to the socket `fd` from the calling thread (that thread's pid/comm is what a
/// cgroup/setsockopt program sees).
pub fn set_keepalive(fd: RawFd, ka: &Keepalive) -> io::Result<()> {
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, ka.idle_s)?;
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, ka.intvl_s)?;
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, ka.cnt)?;
    if let Some(ms) = ka.user_timeout_ms {
        setsockopt_int(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_USER_TIMEOUT,
            ms as libc::c_int,
        )?;
    }
    Ok(())
}

/// A TCP socket in the *calling thread's* network namespace.
fn new_tcp_socket(family: Family) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd =
        cvt(unsafe { libc::socket(family.domain(), libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: fd was just returned by socket(2) and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; all-zero is a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in.
            let sin = unsafe {
                &mut *(&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>()
            };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr = libc::in_addr {
                s_addr: u32::from_ne_bytes(a.ip().octets()),
            };
            mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in6.
            let sin6 = unsafe {
                &mut *(&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr = libc::in6_addr {
                s6_addr: a.ip().octets(),
            };
            sin6.sin6_flowinfo = a.flowinfo();
            sin6.sin6_scope_id = a.scope_id();
            mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

fn assert_loopback(addr: &SocketAddr) {
    assert!(
        addr.ip().is_loopback(),
        "tests use loopback addresses only, not {addr}"
    );
}

/// A client socket created in the test namespace, not yet connected: set options (from whichever
/// thread should be seen doing it), then connect.
pub struct ClientSocket {
    fd: OwnedFd,
}

impl ClientSocket {
    pub fn new(ns: &NetNs, family: Family) -> io::Result<ClientSocket> {
        ns.run(|| new_tcp_socket(family))
            .map(|fd| ClientSocket { fd })
    }

    /// `n` sockets created in the namespace in one go.
    pub fn many(ns: &NetNs, family: Family, n: usize) -> io::Result<Vec<ClientSocket>> {
        ns.run(|| {
            (0..n)
                .map(|_| new_tcp_socket(family).map(|fd| ClientSocket { fd }))
                .collect()
        })
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// setsockopt from the calling thread.
    pub fn set_keepalive(&self, ka: &Keepalive) -> io::Result<()> {
        set_keepalive(self.raw_fd(), ka)
    }

    /// Blocking connect to `addr` (a loopback address in the namespace).
    pub fn connect(self, addr: SocketAddr) -> io::Result<Client> {
        assert_loopback(&addr);
        let (ss, len) = sockaddr(&addr);
        // SAFETY: ss/len describe a valid sockaddr for the socket's family.
        cvt(unsafe {
            libc::connect(
                self.raw_fd(),
                (&ss as *const libc::sockaddr_storage).cast(),
                len,
            )
        })?;
        let stream = TcpStream::from(self.fd);
        let local = stream.local_addr()?;
        let remote = stream.peer_addr()?;
        Ok(Client {
            stream,
            local,
            remote,
        })
    }
}

/// A connected client.
pub struct Client {
    pub stream: TcpStream,
    local: SocketAddr,
    remote: SocketAddr,
}

/// What a blocking receive ended with.
#[derive(Debug)]
pub enum RecvEnd {
    /// The connection failed with this errno (e.g. ETIMEDOUT after a keep-alive death).
    Error(io::Error),
    /// Orderly end of stream.
    Eof,
    /// Data arrived.
    Data(usize),
    /// Nothing happened before the timeout.
    TimedOut,
}

impl Client {
    /// Socket created in the namespace, `ka` set from the calling thread, then connected.
    pub fn connect(ns: &NetNs, addr: SocketAddr, ka: &Keepalive) -> io::Result<Client> {
        let sock = ClientSocket::new(ns, Family::of(&addr))?;
        sock.set_keepalive(ka)?;
        sock.connect(addr)
    }

    /// `n` clients like [`Client::connect`], their sockets created in the namespace in one go.
    pub fn connect_many(ns: &NetNs, addr: SocketAddr, ka: &Keepalive, n: usize) -> io::Result<Vec<Client>> {
        ClientSocket::many(ns, Family::of(&addr), n)?
            .into_iter()
            .map(|s| {
                s.set_keepalive(ka)?;
                s.connect(addr)
            })
            .collect()
    }

    pub fn local(&self) -> SocketAddr {
        self.local
    }

    pub fn remote(&self) -> SocketAddr {
        self.remote
    }

    pub fn raw_fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    /// Applies keep-alive settings to the connected socket from the calling thread.
    pub fn set_keepalive(&self, ka: &Keepalive) -> io::Result<()> {
        set_keepalive(self.raw_fd(), ka)
    }

    /// Blocks in recv for at most `timeout`.
    pub fn recv_end(&mut self, timeout: Duration) -> RecvEnd {
        self.stream
            .set_read_timeout(Some(timeout))
            .expect("SO_RCVTIMEO");
        let mut buf = [0u8; 4096];
        let r = self.stream.read(&mut buf);
        self.stream.set_read_timeout(None).expect("SO_RCVTIMEO");
        match r {
            Ok(0) => RecvEnd::Eof,
            Ok(n) => RecvEnd::Data(n),
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => RecvEnd::TimedOut,
            Err(e) => RecvEnd::Error(e),
        }
    }

    /// Blocks in recv for at most `within` and asserts that it fails with `ETIMEDOUT` (the kernel
    /// gave up on the connection: keep-alive or user timeout); returns how long that took.
    pub fn expect_etimedout(&mut self, within: Duration) -> Duration {
        let t0 = Instant::now();
        let end = self.recv_end(within);
        let elapsed = t0.elapsed();
        match end {
            RecvEnd::Error(e) => assert_eq!(e.raw_os_error(), Some(libc::ETIMEDOUT), "recv failed with {e}"),
            other => panic!("expected recv to fail with ETIMEDOUT, got {other:?} after {elapsed:?}"),
        }
        elapsed
    }

    /// Closes with an RST (SO_LINGER 0) instead of a FIN.
    pub fn abort(self) {
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: linger lives across the call; the length matches.
        unsafe {
            libc::setsockopt(
                self.raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                mem::size_of::<libc::linger>() as libc::socklen_t,
            );
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerMode {
    /// Echo what arrives; on end of stream, close the sending side (FIN) too.
    Echo,
    /// Accept and keep the connection open without reading (the kernel still answers probes).
    Hold,
}

struct Accepted {
    streams: Mutex<Vec<TcpStream>>,
    cv: Condvar,
}

/// A listener on the namespace's loopback, port chosen by the kernel, with an accept thread.
pub struct Server {
    addr: SocketAddr,
    listener_fd: RawFd,
    stop: Arc<AtomicBool>,
    accepted: Arc<Accepted>,
    accept_thread: Option<JoinHandle<()>>,
    echo_threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Server {
    pub fn start(ns: &NetNs, family: Family, mode: ServerMode) -> io::Result<Server> {
        let listener = ns.run(|| -> io::Result<TcpListener> {
            let fd = new_tcp_socket(family)?;
            setsockopt_int(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
            let (ss, len) = sockaddr(&SocketAddr::new(family.loopback(), 0));
            // SAFETY: valid sockaddr for the family.
            cvt(unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&ss as *const libc::sockaddr_storage).cast(),
                    len,
                )
            })?;
            // SAFETY: listen on our socket; a large backlog for the scale test.
            cvt(unsafe { libc::listen(fd.as_raw_fd(), 4096) })?;
            Ok(TcpListener::from(fd))
        })?;
        let addr = listener.local_addr()?;
        let listener_fd = listener.as_raw_fd();
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(Accepted {
            streams: Mutex::new(Vec::new()),
            cv: Condvar::new(),
        });
        let echo_threads = Arc::new(Mutex::new(Vec::new()));
        let accept_thread = {
            let (stop, accepted, echo_threads) =
                (stop.clone(), accepted.clone(), echo_threads.clone());
            std::thread::Builder::new()
                .name("ka-accept".into())
                .spawn(move || accept_loop(listener, mode, &stop, &accepted, &echo_threads))?
        };
        Ok(Server {
            addr,
            listener_fd,
            stop,
            accepted,
            accept_thread: Some(accept_thread),
            echo_threads,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Keep-alive on the listener: connections accepted afterwards inherit it (the kernel copies
    /// the listener's settings into each new socket and starts its keep-alive timer), as servers
    /// such as PostgreSQL's `tcp_keepalives_*` have both ends of a connection probing.
    pub fn set_keepalive(&self, ka: &Keepalive) -> io::Result<()> {
        set_keepalive(self.listener_fd, ka)
    }

    pub fn accepted(&self) -> usize {
        self.accepted.streams.lock().unwrap().len()
    }

    /// Waits until at least `n` connections were accepted.
    pub fn wait_accepted(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut streams = self.accepted.streams.lock().unwrap();
        while streams.len() < n {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            streams = self
                .accepted
                .cv
                .wait_timeout(streams, deadline - now)
                .unwrap()
                .0;
        }
        true
    }
}

fn accept_loop(
    listener: TcpListener,
    mode: ServerMode,
    stop: &AtomicBool,
    accepted: &Accepted,
    echo_threads: &Mutex<Vec<JoinHandle<()>>>,
) {
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                if mode == ServerMode::Echo {
                    match stream.try_clone() {
                        Ok(s) => {
                            let h = std::thread::Builder::new()
                                .name("ka-echo".into())
                                .spawn(move || echo(s));
                            match h {
                                Ok(h) => echo_threads.lock().unwrap().push(h),
                                Err(e) => eprintln!("harness: spawning echo thread: {e}"),
                            }
                        }
                        Err(e) => eprintln!("harness: cloning accepted stream: {e}"),
                    }
                }
                accepted.streams.lock().unwrap().push(stream);
                accepted.cv.notify_all();
            }
            Err(_) if stop.load(Ordering::SeqCst) => return,
            Err(e)
                if e.kind() == io::ErrorKind::Interrupted
                    || e.kind() == io::ErrorKind::ConnectionAborted => {}
            Err(e) => {
                eprintln!("harness: accept on {:?}: {e}", listener.local_addr());
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn echo(mut s: TcpStream) {
    let mut buf = [0u8; 16384];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = s.shutdown(Shutdown::Write);
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Shutting a listening socket down wakes a blocked accept() (EINVAL) on Linux.
        // SAFETY: the listener is still open (owned by the accept thread until it returns).
        unsafe { libc::shutdown(self.listener_fd, libc::SHUT_RDWR) };
        if let Some(t) = self.accept_thread.take() {
            let _ = t.join();
        }
        for s in self.accepted.streams.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
        for t in self.echo_threads.lock().unwrap().drain(..) {
            let _ = t.join();
        }
    }
}

/// Formats an address the way the agent does: `127.0.0.1:5432` or `[::1]:5432`.
pub fn fmt_addr(a: SocketAddr) -> String {
    match a {
        SocketAddr::V4(a) => SocketAddrV4::new(*a.ip(), a.port()).to_string(),
        SocketAddr::V6(a) => SocketAddrV6::new(*a.ip(), a.port(), 0, 0).to_string(),
    }
}
