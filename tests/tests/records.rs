//! The engine's records are complete and right on the real kernel: effective settings in a fresh
//! namespace, zero-window probes that are not keep-alive, keep-alive switched off before the close
//! (the engine and the exporter end the connection and hold nothing), an answer learnt only at the
//! close, and every connection still open ending with a record when the agent stops. Root required.
use std::io::Write as _;
use std::net::SocketAddr;
use std::os::fd::AsRawFd as _;
use std::time::Duration;

use keepalive_tests::events::{is_conn, kind, of_conn, of_kind, render, str_of, u64_of};
use keepalive_tests::otlp::Span;
use keepalive_tests::tcp::{setsockopt_int, Client, ClientSocket, Family, Keepalive, Server, ServerMode};
use keepalive_tests::{Agent, Env};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);

fn ctx(evs: &[Value]) -> String {
    format!("connection events:\n{}", render(evs))
}

/// The last record of a connection is its only `close` or `untracked`, and nothing follows it.
fn assert_ends_once(evs: &[Value]) -> &Value {
    let ends: Vec<usize> =
        evs.iter().enumerate().filter(|(_, e)| matches!(kind(e), "close" | "untracked")).map(|(i, _)| i).collect();
    assert_eq!(ends.len(), 1, "one last record per connection\n{}", ctx(evs));
    assert_eq!(ends[0], evs.len() - 1, "nothing after the last record\n{}", ctx(evs));
    &evs[ends[0]]
}

/// A Go client (`net.Dial`) sets `SO_KEEPALIVE`, `TCP_KEEPINTVL` and `TCP_KEEPIDLE` on the connected
/// socket and leaves the count at the namespace's default. In a fresh namespace whose sysctls are not
/// the kernel's defaults, `config` carries the namespace's real values, never a placeholder.
#[test]
fn settings_left_to_a_fresh_namespace_are_its_sysctls() {
    let env = Env::new();
    for (k, v) in [("tcp_keepalive_probes", "4"), ("tcp_keepalive_time", "600"), ("tcp_keepalive_intvl", "30")] {
        env.ns.exec(&["sysctl", "-qw", &format!("net.ipv4.{k}={v}")]).unwrap();
    }
    let server = Server::start(&env.ns, Family::V4, ServerMode::Hold).unwrap();
    let agent = Agent::start(&env, &[]);
    let client = ClientSocket::new(&env.ns, Family::V4).unwrap().connect(server.addr()).unwrap();
    let fd = client.stream.as_raw_fd();
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1).unwrap();
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 15).unwrap();
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 15).unwrap();
    let (l, r) = (client.local(), client.remote());
    let last_config = |e: &Value| is_conn(e, l, r) && kind(e) == "config" && str_of(e, "option") == Some("TCP_KEEPIDLE");
    let c = agent.wait_for(WAIT, last_config).unwrap_or_else(|| panic!("no config\n{}", ctx(&of_conn(&agent.events(), l, r))));
    assert_eq!((u64_of(&c, "idle_s"), u64_of(&c, "intvl_s"), u64_of(&c, "cnt")), (Some(15), Some(15), Some(4)), "{c}");
    assert_eq!(c["defaults"], serde_json::json!(["cnt"]), "{c}");
    // Every config of the connection, including the first (SO_KEEPALIVE alone), has the namespace's
    // values for what the socket does not set.
    let evs = of_conn(&agent.stop(), l, r);
    for c in of_kind(&evs, "config") {
        assert_eq!(u64_of(c, "cnt"), Some(4), "{c}\n{}", ctx(&evs));
    }
    let first = of_kind(&evs, "config")[0];
    assert_eq!((u64_of(first, "idle_s"), u64_of(first, "intvl_s")), (Some(600), Some(30)), "{first}");
}

/// Fills the peer's receive window (the server never reads) until the socket blocks.
fn fill_window(client: &mut Client) -> usize {
    client.stream.set_nonblocking(true).unwrap();
    let chunk = [0x5a_u8; 65536];
    let mut sent = 0;
    for _ in 0..4096 {
        match client.stream.write(&chunk) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("write: {e}"),
        }
    }
    sent
}

/// `icsk_probes_out` also counts zero-window probes (the persist timer), and the peer answers
/// them: neither is keep-alive. With the answer program always attached, the connection shows
/// suppressed keep-alive firings (data queued) and no probe, answer or episode.
#[test]
fn zero_window_probes_are_not_keepalive_answers() {
    let env = Env::new();
    let server = Server::start(&env.ns, Family::V4, ServerMode::Hold).unwrap();
    let agent = Agent::start(&env, &["--probe-answers", "always"]);
    let mut client = Client::connect(&env.ns, server.addr(), &Keepalive::new(1, 1, 3)).unwrap();
    let (l, r) = (client.local(), client.remote());
    assert!(server.wait_accepted(1, Duration::from_secs(5)));
    let sent = fill_window(&mut client);
    assert!(sent > 0);
    // The persist timer probes the zero window (0.2 s, 0.4 s, 0.8 s...); keep-alive fires every second.
    agent
        .wait_for(WAIT, |e| is_conn(e, l, r) && kind(e) == "suppressed" && u64_of(e, "unsent").is_some_and(|u| u > 0))
        .unwrap_or_else(|| panic!("no suppressed firing\n{}", ctx(&of_conn(&agent.events(), l, r))));
    std::thread::sleep(Duration::from_secs(4));
    let probes_out = env.ns.exec(&["ss", "-tnoi", "state", "established", "src", &l.to_string()]).unwrap_or_default();
    drop(client);
    let evs = of_conn(&agent.stop(), l, r);
    for k in ["probe", "ack", "episode", "timeout"] {
        assert!(of_kind(&evs, k).is_empty(), "unexpected {k}: zero-window probing is not keep-alive\n{}\nss: {probes_out}", ctx(&evs));
    }
    assert!(of_kind(&evs, "suppressed").len() >= 3, "{}", ctx(&evs));
    assert_ends_once(&evs);
}

fn conn_spans(spans: &[Span], local: SocketAddr) -> Vec<&Span> {
    spans
        .iter()
        .filter(|s| s.name == "tcp.connection" && s.attr_i64("network.local.port") == Some(i64::from(local.port())))
        .collect()
}

/// A client with only `SO_KEEPALIVE` set (the namespace's sysctls apply), connected.
fn plain_keepalive_client(env: &Env, server: &Server) -> Client {
    let client = ClientSocket::new(&env.ns, Family::V4).unwrap().connect(server.addr()).unwrap();
    setsockopt_int(client.stream.as_raw_fd(), libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1).unwrap();
    client
}

fn exported_conn_span(agent: &Agent<'_>, local: SocketAddr) -> bool {
    agent.wait_until(WAIT, |spans| {
        let spans: Vec<Span> = spans.iter().filter_map(|v| Span::from_json_line(v).ok()).collect();
        !conn_spans(&spans, local).is_empty()
    })
}

/// Keep-alive switched off before the close. With nothing else set on the socket the kernel side
/// stops reporting it, so the engine ends it there (`untracked`, reason `keepalive_off`); with
/// keep-alive values still set on the socket it is followed to its `close`. Either way nothing about
/// it is left: no record after its last, no `shutdown` ending when the agent stops, and the
/// exporter's connection span is out at once (not at the agent's stop).
#[test]
fn keepalive_switched_off_before_close_leaves_nothing() {
    let env = Env::new();
    let server = Server::start(&env.ns, Family::V4, ServerMode::Echo).unwrap();
    let tracer = Agent::start(&env, &[]);
    let exporter = Agent::start_run(&env, &["--otlp-batch-delay-ms", "100", "--spans", "all"], &[]);
    let plain = plain_keepalive_client(&env, &server);
    let tuned = Client::connect(&env.ns, server.addr(), &Keepalive::new(1, 1, 3)).unwrap();
    let (pl, pr) = (plain.local(), plain.remote());
    let (tl, tr) = (tuned.local(), tuned.remote());
    // Answered probes on the tuned one first, so that an episode may be open when keep-alive goes off.
    tracer.wait_for(WAIT, |e| is_conn(e, tl, tr) && kind(e) == "episode").expect("an answered episode");
    tracer.wait_for(WAIT, |e| is_conn(e, pl, pr) && kind(e) == "config").expect("the plain client followed");
    for c in [&plain, &tuned] {
        setsockopt_int(c.stream.as_raw_fd(), libc::SOL_SOCKET, libc::SO_KEEPALIVE, 0).unwrap();
    }
    let untracked = tracer
        .wait_for(WAIT, |e| is_conn(e, pl, pr) && kind(e) == "untracked")
        .unwrap_or_else(|| panic!("no untracked record\n{}", ctx(&of_conn(&tracer.events(), pl, pr))));
    assert_eq!(str_of(&untracked, "reason"), Some("keepalive_off"), "{untracked}");
    // The exporter ends the plain connection's span now, long before the agent stops.
    assert!(exported_conn_span(&exporter, pl), "the connection span is exported when keep-alive goes off");
    std::thread::sleep(Duration::from_millis(1500));
    drop(plain);
    drop(tuned);
    tracer.wait_for(WAIT, |e| is_conn(e, tl, tr) && kind(e) == "close").expect("the tuned client's close");
    assert!(exported_conn_span(&exporter, tl), "the tuned connection's span is exported at its close");
    let all = tracer.stop();
    let evs = of_conn(&all, pl, pr);
    let last = assert_ends_once(&evs);
    assert_eq!(str_of(last, "reason"), Some("keepalive_off"), "{}", ctx(&evs));
    let config_off = evs.iter().rev().find(|e| kind(e) == "config").unwrap();
    assert_eq!(config_off["keepalive"], false, "{}", ctx(&evs));
    let evs = of_conn(&all, tl, tr);
    assert_eq!(kind(assert_ends_once(&evs)), "close", "{}", ctx(&evs));
    let spans: Vec<Span> = exporter.stop().iter().filter_map(|v| Span::from_json_line(v).ok()).collect();
    for (l, want) in [(pl, Some("keepalive_off")), (tl, None)] {
        let conn = conn_spans(&spans, l);
        assert_eq!(conn.len(), 1, "one connection span for {l}");
        assert_eq!(conn[0].attr_str("tcp.keepalive.untracked.reason"), want);
        assert_eq!(conn[0].attr_bool("tcp.keepalive.incomplete"), None, "not ended by the stop");
    }
}

/// When the agent stops, every connection it still follows ends with a record: an episode in
/// progress `incomplete` with its probes, then `untracked` with reason `shutdown`.
/// An answer no timer run saw, then the close: with `--probe-answers next-firing` nothing runs on
/// received segments and an answer is learnt at the next timer run; a connection that ends before
/// that run had its probe answered all the same (`ack` with precision `at_end`, the episode
/// `answered`), not left unanswered until the close.
#[test]
fn answer_learnt_at_the_close() {
    let env = Env::new();
    let server = Server::start(&env.ns, Family::V4, ServerMode::Echo).unwrap();
    let agent = Agent::start(&env, &["--probe-answers", "next-firing"]);
    // The probe after 1 s idle, answered at once; the next run would come 1 s after the answer.
    let client = Client::connect(&env.ns, server.addr(), &Keepalive::new(1, 5, 9)).unwrap();
    let (l, r) = (client.local(), client.remote());
    agent.wait_for(WAIT, |e| is_conn(e, l, r) && kind(e) == "probe").expect("a probe");
    std::thread::sleep(Duration::from_millis(200));
    drop(client);
    agent.wait_for(WAIT, |e| is_conn(e, l, r) && kind(e) == "close").expect("the close");
    let all = agent.stop();
    let evs = of_conn(&all, l, r);
    assert_ends_once(&evs);
    let probes = of_kind(&evs, "probe");
    let ep = of_kind(&evs, "episode");
    assert_eq!((probes.len(), ep.len()), (1, 1), "{}", ctx(&evs));
    assert_eq!(str_of(ep[0], "outcome"), Some("answered"), "{}", ctx(&evs));
    let ack = of_kind(&evs, "ack");
    assert_eq!(ack.len(), 1, "{}", ctx(&evs));
    assert_eq!(str_of(ack[0], "precision"), Some("at_end"), "{}", ctx(&evs));
}

#[test]
fn stop_ends_every_open_connection_with_a_record() {
    let env = Env::new();
    let server = Server::start(&env.ns, Family::V4, ServerMode::Hold).unwrap();
    let agent = Agent::start(&env, &[]);
    let healthy = Client::connect(&env.ns, server.addr(), &Keepalive::new(600, 1, 3)).unwrap();
    let probing = Client::connect(&env.ns, server.addr(), &Keepalive::new(1, 5, 9)).unwrap();
    assert!(server.wait_accepted(2, Duration::from_secs(5)));
    env.ns.drop_from_port(server.port()).unwrap();
    let (pl, pr) = (probing.local(), probing.remote());
    agent.wait_for(WAIT, |e| is_conn(e, pl, pr) && kind(e) == "probe").expect("a probe");
    let all = agent.stop();
    for c in [&healthy, &probing] {
        let evs = of_conn(&all, c.local(), c.remote());
        let last = assert_ends_once(&evs);
        assert_eq!((kind(last), str_of(last, "reason")), ("untracked", Some("shutdown")), "{}", ctx(&evs));
    }
    let evs = of_conn(&all, pl, pr);
    let ep = of_kind(&evs, "episode");
    assert_eq!(ep.len(), 1, "{}", ctx(&evs));
    assert_eq!(str_of(ep[0], "outcome"), Some("incomplete"));
    assert_eq!(u64_of(ep[0], "probes"), Some(of_kind(&evs, "probe").len() as u64), "{}", ctx(&evs));
    env.ns.restore().unwrap();
}
