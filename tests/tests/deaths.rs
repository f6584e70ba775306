//! Issue 14: every connection death explained, keep-alive or not, on the real kernel. Connections
//! without keep-alive die by retransmissions or by a reset after idle; nginx closes idle keep-alive
//! connections (who closed, after how long); the HTTP keep-alive reuse race, made deterministic,
//! and a real TLS server's goodbye to a client that left, which is not that race;
//! a spans exporter sees the same deaths; and 100,000 connections without keep-alive leave no
//! state. Root required.
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd as _;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keepalive_tests::churn::{number_before, run_clients, serve, ChurnAgent};
use keepalive_tests::events::{is_conn, kind, of_conn, of_kind, render, str_of, u64_of};
use keepalive_tests::metrics::wait_http;
use keepalive_tests::nginx::Nginx;
use keepalive_tests::otlp::{free_loopback_port, Span};
use keepalive_tests::tcp::{fmt_addr, setsockopt_int, Client, ClientSocket, Family, RecvEnd, Server, ServerMode};
use keepalive_tests::{kernel_has_keepalive_reset_reason, process_comm, thread_comm, Agent, Env};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);
/// nginx's `keepalive_timeout` in the nginx tests.
const NGINX_IDLE: Duration = Duration::from_secs(1);
/// Jiffy precision (up to 10 ms) twice, plus scheduling on a busy 2-core machine.
const SLACK_MS: u64 = 300;

fn ctx(evs: &[Value]) -> String {
    format!("connection events:\n{}", render(evs))
}

fn assert_near(what: &str, got: Option<u64>, want_ms: u64, evs: &[Value]) {
    let got = got.unwrap_or_else(|| panic!("{what}: missing\n{}", ctx(evs)));
    assert!(
        got.abs_diff(want_ms) <= SLACK_MS,
        "{what} = {got} ms, expected about {want_ms} ms\n{}",
        ctx(evs)
    );
}

/// The records of a death of a connection the agent does not follow: `config` (source `close`,
/// keep-alive off), the cause, `error` with `errno`, `close`, all under one id and with no `open`.
/// Returns the cause record.
fn assert_unfollowed_death<'a>(evs: &'a [Value], cause: &str, errno: &str) -> &'a Value {
    let names: Vec<&str> = evs.iter().map(kind).collect();
    assert_eq!(names, ["config", cause, "error", "close"], "{}", ctx(evs));
    assert!(evs.iter().all(|e| e["conn"] == evs[0]["conn"]), "one connection id\n{}", ctx(evs));
    assert_eq!((str_of(&evs[0], "source"), evs[0]["keepalive"].as_bool()), (Some("close"), Some(false)), "{}", ctx(evs));
    assert_eq!(str_of(&evs[2], "errno"), Some(errno), "{}", ctx(evs));
    &evs[1]
}

/// The names a connection of the test process can carry as its owner's `comm`: the thread that
/// used the socket (the death ran in its context) or the process (found holding it in `/proc`).
fn own_comms() -> [String; 2] {
    [thread_comm(), process_comm()]
}

/// Every record of the death names the test process, the client holding the socket, as its owner:
/// its pid, and the comm of the thread that used the socket or of the process.
fn assert_owned_by_this_process(evs: &[Value]) {
    let comms = own_comms();
    for e in evs {
        assert_eq!(u64_of(e, "pid"), Some(u64::from(std::process::id())), "the client's pid on {e}\n{}", ctx(evs));
        let comm = str_of(e, "comm").unwrap_or_else(|| panic!("no comm on {e}\n{}", ctx(evs)));
        assert!(comms.iter().any(|c| c == comm), "comm {comm:?}, expected one of {comms:?}\n{}", ctx(evs));
    }
}

/// The count the agent's final line gives of death owners found in `/proc`.
fn owners_found_in_proc(stderr: &[String]) -> u64 {
    stderr
        .iter()
        .rev()
        .find_map(|l| number_before(l, "owners of deaths not followed:", " found in /proc"))
        .unwrap_or(0)
}

/// Keep-alive off, data in flight, the peer vanishes (its segments dropped on the input hook) and
/// the retransmission timer gives up (`tcp_retries2` lowered in the namespace): `timeout` with
/// reason `retransmit`, its retransmissions and the idle time before the write, then `error`
/// ETIMEDOUT; the exporter's connection span says the same. The timer kills the connection in
/// softirq while the client blocks in `recv`: its owner, the test process, is found holding the
/// socket in `/proc`, and named by every record, the span and the death metric.
#[test]
fn retransmission_death_without_keepalive() {
    let env = Env::new();
    env.ns.exec(&["sysctl", "-qw", "net.ipv4.tcp_retries2=3"]).unwrap();
    let server = Server::start(&env.ns, Family::V4, ServerMode::Hold).unwrap();
    let agent = Agent::start(&env, &[]);
    let metrics = SocketAddr::from(([127, 0, 0, 1], free_loopback_port()));
    let exporter =
        Agent::start_run(&env, &["--otlp-batch-delay-ms", "100", "--metrics-listen", &metrics.to_string()], &[]);
    let mut client = connect(&env, server.addr());
    let connected = Instant::now();
    let (l, r) = (client.local(), client.remote());
    assert!(server.wait_accepted(1, Duration::from_secs(5)));
    std::thread::sleep(Duration::from_millis(1500));
    env.ns.drop_input_from_port(server.port()).unwrap();
    client.stream.write_all(&[0x42; 100]).unwrap();
    let idle_before_write = connected.elapsed().as_millis() as u64;
    let took = client.expect_etimedout(Duration::from_secs(60));
    agent.wait_for(WAIT, |e| is_conn(e, l, r) && kind(e) == "close").expect("the death's close");
    let (all, stderr) = agent.stop_full();
    let evs = of_conn(&all, l, r);
    let timeout = assert_unfollowed_death(&evs, "timeout", "ETIMEDOUT");
    assert_owned_by_this_process(&evs);
    assert!(owners_found_in_proc(&stderr) >= 1, "the owner was looked up in /proc:\n{}", stderr.join("\n"));
    assert_eq!(str_of(timeout, "reason"), Some("retransmit"), "{}", ctx(&evs));
    assert!(u64_of(timeout, "retransmits").is_some_and(|n| n >= 3), "tcp_retries2=3\n{}", ctx(&evs));
    // The kernel keeps when the first retransmission went out, not the write: idle runs to it, one
    // tail-loss probe and one initial retransmission timeout (200 ms minimum each) after the write.
    let idle_ms = u64_of(timeout, "idle_ms").unwrap();
    assert!(
        (idle_before_write.saturating_sub(SLACK_MS)..idle_before_write + 1000).contains(&idle_ms),
        "idle before the write = {idle_ms} ms, written after {idle_before_write} ms idle\n{}",
        ctx(&evs)
    );
    let since = idle_before_write + took.as_millis() as u64;
    assert_near("since the last data received", u64_of(timeout, "since_received_ms"), since, &evs);
    assert_eq!(str_of(&evs[3], "closed_by"), Some("none"), "{}", ctx(&evs));
    env.ns.restore().unwrap();

    assert!(exporter.wait_until(WAIT, |v| conn_span(v, l).is_some()), "no connection span for the death");
    let exe = wait_http(metrics, "/metrics", WAIT, |r| death_metric_exe(&r.body, "retransmit_timeout").is_some())
        .map(|r| death_metric_exe(&r.body, "retransmit_timeout").unwrap())
        .unwrap_or_else(|e| panic!("no retransmit_timeout death in the metrics: {e:#}"));
    let span = conn_span(&exporter.stop(), l).unwrap();
    assert_eq!(span.attr_str("tcp.keepalive.outcome"), Some("timeout"), "{:?}", span.attrs);
    assert_eq!(span.attr_str("tcp.keepalive.timeout.reason"), Some("retransmit"), "{:?}", span.attrs);
    assert_eq!(span.attr_str("error.type"), Some("retransmit_timeout"), "{:?}", span.attrs);
    assert_eq!(span.attr("tcp.keepalive.enabled").and_then(Value::as_bool), Some(false), "{:?}", span.attrs);
    assert!(span.attr("tcp.keepalive.idle_ms").is_some(), "{:?}", span.attrs);
    let comms = own_comms();
    assert_eq!(span.attr("process.pid").and_then(Value::as_i64), Some(i64::from(std::process::id())), "{:?}", span.attrs);
    let span_exe = span.attr_str("process.executable.name").unwrap_or_default();
    assert!(comms.iter().any(|c| c == span_exe), "span's process.executable.name {span_exe:?}, expected one of {comms:?}");
    assert!(comms.contains(&exe), "death metric's process_executable_name {exe:?}, expected one of {comms:?}");
}

/// The `process_executable_name` of the `keepalive_connection_deaths_total` series with `cause`
/// in a Prometheus exposition, if there is one with a non-zero value.
fn death_metric_exe(exposition: &str, cause: &str) -> Option<String> {
    let want = format!("keepalive_death_cause=\"{cause}\"");
    exposition.lines().find_map(|l| {
        let labels = l.strip_prefix("keepalive_connection_deaths_total{")?;
        let (labels, value) = labels.rsplit_once("} ")?;
        if !labels.contains(&want) || value.trim().parse::<f64>().ok()? <= 0.0 {
            return None;
        }
        let exe = labels.split_once("process_executable_name=\"")?.1;
        Some(exe.split_once('"')?.0.to_string())
    })
}

/// A connection closed by its application with data still unacknowledged, whose peer vanished:
/// the orphaned socket's retransmissions give up (`tcp_orphan_retries` lowered in the namespace).
/// The socket had no file any more: its death names no owner (never the task that happened to run
/// the timer or the segment).
#[test]
fn orphaned_connection_death_names_no_owner() {
    let env = Env::new();
    env.ns.exec(&["sysctl", "-qw", "net.ipv4.tcp_orphan_retries=1"]).unwrap();
    let server = Server::start(&env.ns, Family::V4, ServerMode::Hold).unwrap();
    let agent = Agent::start(&env, &[]);
    let mut client = connect(&env, server.addr());
    let (l, r) = (client.local(), client.remote());
    assert!(server.wait_accepted(1, Duration::from_secs(5)));
    env.ns.drop_input_from_port(server.port()).unwrap();
    client.stream.write_all(&[0x42; 100]).unwrap();
    drop(client);
    agent.wait_for(WAIT, |e| is_conn(e, l, r) && kind(e) == "close").expect("the orphan's death");
    let evs = of_conn(&agent.stop(), l, r);
    let timeout = assert_unfollowed_death(&evs, "timeout", "ETIMEDOUT");
    assert_eq!(str_of(timeout, "reason"), Some("retransmit"), "{}", ctx(&evs));
    assert_eq!(str_of(&evs[3], "state"), Some("FIN_WAIT1"), "closed with data in flight\n{}", ctx(&evs));
    assert!(evs.iter().all(|e| e.get("pid").is_none() && e.get("comm").is_none()), "no owner\n{}", ctx(&evs));
    env.ns.restore().unwrap();
}

/// A client in a process of its own (`cat` reading a socket that bash opened, keep-alive off)
/// whose peer vanishes while it waits for an answer: the retransmission timer kills the connection
/// in softirq and `cat`, told ETIMEDOUT, exits at once, closing the socket before a scan of `/proc`
/// could find it. Its close names it: every record of the death carries cat's pid and comm.
#[test]
fn owner_that_closes_at_once_is_named_by_its_close() {
    let env = Env::new();
    env.ns.exec(&["sysctl", "-qw", "net.ipv4.tcp_retries2=3"]).unwrap();
    let server = Server::start(&env.ns, Family::V4, ServerMode::Hold).unwrap();
    let agent = Agent::start(&env, &[]);
    let script = format!("exec 3<>/dev/tcp/127.0.0.1/{} && sleep 1 && printf hello >&3 && exec cat <&3", server.port());
    let mut child = Command::new("ip")
        .args(["netns", "exec", env.ns.name(), "bash", "-c", &script])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // `ip netns exec` and bash exec: the pid stays the child's.
    let pid = child.id();
    assert!(server.wait_accepted(1, Duration::from_secs(5)));
    env.ns.drop_input_from_port(server.port()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "cat never saw the death");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut said = String::new();
    child.stderr.take().unwrap().read_to_string(&mut said).unwrap();
    assert!(!status.success() && said.contains("timed out"), "cat: {status}, {said:?}");
    let remote = fmt_addr(server.addr());
    let to_server = |e: &Value| str_of(e, "remote") == Some(remote.as_str());
    agent.wait_for(WAIT, |e| to_server(e) && kind(e) == "close").expect("the death's close");
    let (all, stderr) = agent.stop_full();
    let evs: Vec<Value> = all.into_iter().filter(to_server).collect();
    assert_unfollowed_death(&evs, "timeout", "ETIMEDOUT");
    for e in &evs {
        assert_eq!((u64_of(e, "pid"), str_of(e, "comm")), (Some(u64::from(pid)), Some("cat")), "{e}\n{}", ctx(&evs));
    }
    let closed = stderr.iter().rev().find_map(|l| number_before(l, "owners of deaths not followed:", " closed the socket"));
    assert!(closed.is_some_and(|n| n >= 1), "named by its close:\n{}", stderr.join("\n"));
    env.ns.restore().unwrap();
}

/// A client without keep-alive connected from the test namespace.
fn connect(env: &Env, addr: SocketAddr) -> Client {
    ClientSocket::new(&env.ns, Family::V4).unwrap().connect(addr).unwrap()
}

fn conn_span(lines: &[Value], local: SocketAddr) -> Option<Span> {
    lines.iter().filter_map(|v| Span::from_json_line(v).ok()).find(|s| {
        s.name == "tcp.connection" && s.attr("network.local.port").and_then(Value::as_i64) == Some(i64::from(local.port()))
    })
}

/// A NAT or load balancer forgot the idle flow: the next write is answered with a reset after
/// 2 s of idle. `peer_reset` carries that idle time.
#[test]
fn peer_reset_after_idle_without_keepalive() {
    let env = Env::new();
    let server = Server::start(&env.ns, Family::V4, ServerMode::Hold).unwrap();
    let agent = Agent::start(&env, &[]);
    let mut client = connect(&env, server.addr());
    let connected = Instant::now();
    let (l, r) = (client.local(), client.remote());
    assert!(server.wait_accepted(1, Duration::from_secs(5)));
    std::thread::sleep(Duration::from_secs(2));
    env.ns.reset_input_to_port(server.port()).unwrap();
    let idle = connected.elapsed().as_millis() as u64;
    client.stream.write_all(b"hello").unwrap();
    match client.recv_end(Duration::from_secs(5)) {
        RecvEnd::Error(e) => assert_eq!(e.raw_os_error(), Some(libc::ECONNRESET), "{e}"),
        other => panic!("expected ECONNRESET, got {other:?}"),
    }
    agent.wait_for(WAIT, |e| is_conn(e, l, r) && kind(e) == "close").expect("the death's close");
    let evs = of_conn(&agent.stop(), l, r);
    let reset = assert_unfollowed_death(&evs, "peer_reset", "ECONNRESET");
    assert_owned_by_this_process(&evs);
    assert_near("idle before the reset", u64_of(reset, "idle_ms"), idle, &evs);
    assert!(u64_of(reset, "since_sent_ms").is_some_and(|s| s < SLACK_MS), "the write just went out\n{}", ctx(&evs));
    env.ns.restore().unwrap();
}

const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: keepalive-test\r\n\r\n";

/// Sends one request and reads its whole response (nginx answers `ok\n`).
fn request(stream: &mut TcpStream) {
    stream.write_all(REQUEST).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.ends_with(b"\r\n\r\nok\n") {
        let n = stream.read(&mut buf).expect("reading the response");
        assert!(n > 0, "nginx closed before answering: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
}

/// Waits until `ss` lists the connection from `local` in CLOSE_WAIT (the peer's FIN arrived).
fn wait_close_wait(env: &Env, local: SocketAddr, within: Duration) -> bool {
    wait_ss(env, "close-wait", &format!(" {} ", fmt_addr(local)), within)
}

/// Waits until `ss -Htn state STATE` in the test's namespace lists a line holding `needle` (each
/// line is searched with a space after it).
fn wait_ss(env: &Env, state: &str, needle: &str, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        let out = env.ns.exec(&["ss", "-Htn", "state", state]).unwrap_or_default();
        if out.lines().any(|l| format!("{l} ").contains(needle)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

fn nginx(env: &Env) -> Nginx {
    let port = keepalive_tests::otlp::free_loopback_port();
    Nginx::start_with_timeout(&env.ns, port, "off", 1, "1s").unwrap_or_else(|e| panic!("{e:#}"))
}

/// nginx (`keepalive_timeout 1s`) closes an idle keep-alive connection: the client's `close`
/// says `closed_by: peer` after about 1 s idle, nginx's side `local`. A client that closes first
/// (no keep-alive: `--all-closes`) says `local`, and nginx's side `peer`.
#[test]
fn who_closed_an_idle_connection() {
    let env = Env::new();
    let nginx = nginx(&env);
    let agent = Agent::start(&env, &["--all-closes"]);
    // Kept alive, idle until nginx closes it.
    let mut waits = connect(&env, nginx.addr());
    setsockopt_int(waits.stream.as_raw_fd(), libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1).unwrap();
    request(&mut waits.stream);
    assert!(matches!(waits.recv_end(Duration::from_secs(5)), RecvEnd::Eof), "nginx closes after 1 s");
    let (wl, wr) = (waits.local(), waits.remote());
    drop(waits);
    // No keep-alive, closed by the client 300 ms after its response.
    let mut quits = connect(&env, nginx.addr());
    request(&mut quits.stream);
    std::thread::sleep(Duration::from_millis(300));
    let (ql, qr) = (quits.local(), quits.remote());
    drop(quits);
    agent.wait_for(WAIT, |e| is_conn(e, qr, ql) && kind(e) == "close").expect("nginx's close of the second");
    let all = agent.stop();
    for (l, r, by, idle, who) in [
        (wl, wr, "peer", NGINX_IDLE.as_millis() as u64, "client kept alive"),
        (wr, wl, "local", NGINX_IDLE.as_millis() as u64, "nginx, idle timeout"),
        (ql, qr, "local", 300, "client closing first"),
        (qr, ql, "peer", 300, "nginx, client closed"),
    ] {
        let evs = of_conn(&all, l, r);
        let closes = of_kind(&evs, "close");
        assert_eq!(closes.len(), 1, "{who}\n{}", ctx(&evs));
        assert_eq!(str_of(closes[0], "closed_by"), Some(by), "{who}\n{}", ctx(&evs));
        assert_near(who, u64_of(closes[0], "idle_ms"), idle, &evs);
        for k in ["reuse_race", "peer_reset", "error", "timeout"] {
            assert!(of_kind(&evs, k).is_empty(), "{who}: no death\n{}", ctx(&evs));
        }
        if evs.len() == 1 {
            // A lone close: the socket ended in softirq after its application closed it (no file,
            // no owner).
            assert!(closes[0].get("pid").is_none(), "{who}: no owner\n{}", ctx(&evs));
        }
    }
    // The kept-alive client is followed (`open` ... `close`), the others are lone closes.
    assert_eq!(kind(&of_conn(&all, wl, wr)[0]), "open");
    assert_eq!(of_conn(&all, ql, qr).len(), 1);
}

/// The HTTP keep-alive reuse race, deterministically: the client writes its next request after
/// nginx's FIN arrived (its socket in CLOSE_WAIT, the FIN unread); nginx's time-wait socket answers
/// with a reset. The client reads end of file and its socket error is EPIPE. The agent reports
/// `reuse_race` on the client's connection (nginx's idle close time, the write's delay after the
/// FIN, the bytes), and nginx's reset with the kernel's reason. A connection reused in time
/// reports no race.
#[test]
fn http_keepalive_reuse_race() {
    let env = Env::new();
    let nginx = nginx(&env);
    let agent = Agent::start(&env, &["--all-closes"]);
    // Reused in time: the second request 100 ms after the first response.
    let mut in_time = connect(&env, nginx.addr());
    request(&mut in_time.stream);
    std::thread::sleep(Duration::from_millis(100));
    request(&mut in_time.stream);
    let (il, ir) = (in_time.local(), in_time.remote());
    drop(in_time);

    let mut late = connect(&env, nginx.addr());
    let (l, r) = (late.local(), late.remote());
    request(&mut late.stream);
    let answered = Instant::now();
    assert!(wait_close_wait(&env, l, Duration::from_secs(5)), "nginx's FIN never arrived");
    let fin_seen = Instant::now();
    std::thread::sleep(Duration::from_millis(300));
    late.stream.write_all(REQUEST).expect("the write after the FIN succeeds locally");
    let write_after = fin_seen.elapsed().as_millis() as u64;
    assert!(matches!(late.recv_end(Duration::from_secs(5)), RecvEnd::Eof), "the reader sees end of file first");
    let err = wait_socket_error(&late.stream, Duration::from_secs(5));
    assert_eq!(err, libc::EPIPE, "socket error after the reset");
    let peer_idle = (fin_seen - answered).as_millis() as u64;
    drop(late);

    agent.wait_for(WAIT, |e| is_conn(e, l, r) && kind(e) == "close").expect("the client's close");
    let reason_wanted = kernel_has_keepalive_reset_reason();
    agent.wait_for(WAIT, |e| is_conn(e, r, l) && kind(e) == "reset").expect("nginx's reset");
    let all = agent.stop();
    let evs = of_conn(&all, l, r);
    let race = assert_unfollowed_death(&evs, "reuse_race", "EPIPE");
    assert_owned_by_this_process(&evs);
    // nginx closed about 1 s after its response; the FIN was seen by polling, at most ~10 ms late.
    assert_near("nginx's idle close time", u64_of(race, "peer_idle_ms"), NGINX_IDLE.as_millis() as u64, &evs);
    assert!(peer_idle + 50 >= NGINX_IDLE.as_millis() as u64, "nginx closed after {peer_idle} ms");
    assert_near("the write after the FIN", u64_of(race, "write_after_ms"), write_after, &evs);
    assert_eq!(u64_of(race, "bytes"), Some(REQUEST.len() as u64), "{}", ctx(&evs));
    assert_eq!(str_of(&evs[3], "closed_by"), Some("peer"), "{}", ctx(&evs));

    let nginx_side = of_conn(&all, r, l);
    let reset = of_kind(&nginx_side, "reset").into_iter().next().unwrap();
    assert_eq!(reset["active"], false, "{}", ctx(&nginx_side));
    if reason_wanted {
        let reason = str_of(reset, "reason").unwrap_or("");
        assert!(
            ["tcp_timewait_socket", "tcp_abort_on_data"].contains(&reason),
            "reason {reason}\n{}",
            ctx(&nginx_side)
        );
    }
    let last = nginx_side.last().unwrap();
    assert_eq!(kind(last), "close", "{}", ctx(&nginx_side));
    // A time-wait socket has no file: no owner (never the client whose segment it answered).
    assert!(nginx_side.iter().all(|e| e.get("pid").is_none()), "{}", ctx(&nginx_side));

    let reused = of_conn(&all, il, ir);
    assert!(of_kind(&reused, "reuse_race").is_empty(), "reused in time: no race\n{}", ctx(&reused));
    assert_eq!(reused.iter().map(kind).collect::<Vec<_>>(), ["close"], "{}", ctx(&reused));
    assert_eq!(str_of(&reused[0], "closed_by"), Some("local"), "{}", ctx(&reused));
}

/// A real TLS server whose client went away: the client's FIN arrives, `openssl s_server` reads the
/// end of stream and answers with its close_notify alert, which the client's closed socket resets.
/// The server had read the FIN before it wrote (it knew the peer was gone): a `peer_reset`, not the
/// reuse race, which is a write on a connection whose FIN the application had not read
/// ([`http_keepalive_reuse_race`]).
#[test]
fn tls_goodbye_after_the_peer_left_is_no_reuse_race() {
    let env = Env::new();
    let pki = keepalive_tests::pki::Pki::generate().unwrap();
    let port = free_loopback_port();
    let agent = Agent::start(&env, &["--all-closes"]);
    let openssl = |args: &[&str]| {
        Command::new("ip")
            .args(["netns", "exec", env.ns.name(), "openssl"])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("openssl (Debian's openssl package)")
    };
    let listen = format!("127.0.0.1:{port}");
    let (cert, key) = (keepalive_tests::pki::s(&pki.server_cert), keepalive_tests::pki::s(&pki.server_key));
    let mut server = openssl(&["s_server", "-accept", &listen, "-cert", cert, "-key", key, "-quiet"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut client = loop {
        let out = env.ns.exec(&["ss", "-Htln"]).unwrap_or_default();
        if out.contains(&format!("{listen} ")) {
            break openssl(&["s_client", "-connect", &listen, "-quiet"]);
        }
        assert!(Instant::now() < deadline, "s_server never listened");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(wait_ss(&env, "established", &format!(":{port} "), Duration::from_secs(10)), "s_client never connected");
    // The handshake done, the client goes away (its kernel closes the socket: a FIN).
    std::thread::sleep(Duration::from_millis(800));
    client.kill().unwrap();
    client.wait().unwrap();
    let server_side = |e: &Value| e["local"].as_str() == Some(listen.as_str());
    agent.wait_for(WAIT, |e| server_side(e) && kind(e) == "close").expect("the server's close");
    let all = agent.stop();
    let _ = server.kill();
    let _ = server.wait();
    let evs: Vec<Value> = all.into_iter().filter(server_side).collect();
    let kinds: Vec<&str> = evs.iter().map(kind).collect();
    assert!(kinds.contains(&"peer_reset"), "the client's reset of the alert\n{}", ctx(&evs));
    assert!(!kinds.contains(&"reuse_race"), "the server had read the FIN: no race\n{}", ctx(&evs));
    let close = evs.iter().find(|e| kind(e) == "close").unwrap();
    assert_eq!(str_of(close, "state"), Some("CLOSE_WAIT"), "the FIN came first, then the write\n{}", ctx(&evs));
}

/// `SO_ERROR` of the socket once it is set (the reset may still be on its way), or 0.
fn wait_socket_error(stream: &TcpStream, within: Duration) -> i32 {
    let deadline = Instant::now() + within;
    loop {
        match stream.take_error() {
            Ok(Some(e)) => return e.raw_os_error().unwrap_or(-1),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => return 0,
            Err(e) => panic!("SO_ERROR: {e}"),
        }
    }
}

/// Churn of 100,000 connections without keep-alive, every close reported (`--all-closes`): the
/// engine follows none of them (0 connections tracked in the stop summary, no `open`, nothing
/// left for the stop) and reports each close by its state-free path; every client's close is
/// reported or counted lost.
#[test]
fn churn_without_keepalive_keeps_no_state() {
    const CONNECTIONS: usize = 100_000;
    let env = Env::new();
    let listener = env.ns.run(|| TcpListener::bind("127.0.0.1:0")).expect("listener in the namespace");
    let addr = listener.local_addr().unwrap();
    let agent = ChurnAgent::start(&env, addr.port(), &["--all-closes"]);
    let stop = Arc::new(AtomicBool::new(false));
    let accepted = Arc::new(AtomicUsize::new(0));
    let server = {
        let (stop, accepted) = (stop.clone(), accepted.clone());
        std::thread::spawn(move || serve(listener, stop, accepted))
    };
    let failures = run_clients(&env, addr, CONNECTIONS, 4, false, &agent.counted, "close");
    stop.store(true, Ordering::Relaxed);
    server.join().unwrap();
    assert!(failures.is_empty(), "client connections failed: {failures:?}");
    assert_eq!(accepted.load(Ordering::Relaxed), CONNECTIONS);
    let deadline = Instant::now() + Duration::from_secs(60);
    while (agent.counted.lock().unwrap().get("close") as usize) < CONNECTIONS && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let (counted, stderr) = agent.stop();
    let summary = stderr.iter().rev().find(|l| l.contains("stopped:")).expect("the stop summary");
    let number = |word: &str| number_before(summary, "stopped:", word).unwrap_or_else(|| panic!("no `{word}`: {summary}"));
    let (lost, tracked, closes) = (number(" lost"), number(" connections tracked"), number(" closes"));
    eprintln!("{:?}\n{summary}", counted.by_event);
    assert_eq!(tracked, 0, "no connection without keep-alive is followed: {summary}");
    assert_eq!(counted.by_event.keys().collect::<Vec<_>>(), ["close"], "only lone closes: {:?}", counted.by_event);
    let reported = counted.get("close");
    assert!(reported + lost >= CONNECTIONS as u64, "{reported} closes + {lost} lost < {CONNECTIONS}: {summary}");
    // Both ends of each connection close in the namespace: the servers' closes are counted too.
    assert!(closes >= reported, "{summary}");
}
