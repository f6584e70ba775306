//! Every tracked connection carries a process that holds it: the accepting process for accepted
//! sockets (a real nginx, keep-alive set on its listener with `so_keepalive`), the holder found in
//! `/proc` for sockets that existed before the agent started. The process is the one `ss -tnp`
//! names, and `--pid` selects the connection. Root required; nginx-light installed.
use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::time::Duration;

use keepalive_tests::events::{is_conn, kind, of_conn, render, str_of, u64_of};
use keepalive_tests::nginx::{ss_processes, Nginx};
use keepalive_tests::tcp::{Client, Keepalive};
use keepalive_tests::{process_comm, Agent, Env};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);
const PORT: u16 = 18080;

fn ctx(evs: &[Value]) -> String {
    format!("connection events:\n{}", render(evs))
}

/// The agent reached `accept4`/`accept` (else accepted sockets cannot carry their process).
fn assert_accept_hook(agent: &Agent<'_>) {
    let lines = agent.stderr_lines();
    assert!(
        lines.iter().any(|l| l.starts_with("ready") && l.contains("accept_owner")),
        "the accept_owner hook is not attached (is tracefs mounted? scripts/setup.sh mounts it):\n{}",
        lines.join("\n")
    );
}

/// One HTTP/1.1 request and its response: the connection then idles in nginx's keep-alive state.
fn http_get(client: &mut Client) {
    client.stream.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    client.stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 1024];
    let n = client.stream.read(&mut buf).unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 200"), "nginx answered {text:?}");
}

/// The single process `ss -tnp` names for `local` → `remote`.
fn ss_owner(env: &Env, local: SocketAddr, remote: SocketAddr) -> (String, u32) {
    let procs = ss_processes(&env.ns, local, remote).unwrap();
    assert_eq!(procs.len(), 1, "ss -tnp names {procs:?} for {local} -> {remote}");
    procs[0].clone()
}

/// Every record carrying a pid carries `pid` and `comm`, and every record from the first one that
/// carries a pid on does.
fn assert_owner_from_first(evs: &[Value], pid: u32, comm: &str) {
    let first = evs
        .iter()
        .position(|e| e.get("pid").is_some())
        .unwrap_or_else(|| panic!("no record carries a pid\n{}", ctx(evs)));
    for e in &evs[first..] {
        assert_eq!(u64_of(e, "pid"), Some(u64::from(pid)), "{e}\n{}", ctx(evs));
        assert_eq!(str_of(e, "comm"), Some(comm), "{e}\n{}", ctx(evs));
    }
}

/// nginx's accepted socket (keep-alive inherited from the listener's `so_keepalive=1s:1s:2`): the
/// client goes silent, the worker's socket probes twice, times out and resets. Its records carry
/// the worker's pid and `nginx`, as `ss -tnp` names them, and `trace --pid WORKER` selects it
/// (and not the client's own keep-alive connection). Accepted within the window the agent opens at
/// start-up.
#[test]
fn accepted_socket_carries_the_accepting_worker() {
    accepted_socket_case(Duration::ZERO);
}

/// The same, accepted after the accept-owner window closed: opened by the first accept after the
/// agents started (a connection made and dropped at once), it closes 30 s later (no keep-alive
/// socket was passively established since, on a quiet host); the connection's own establishment
/// reopens it before nginx's `accept()` returns.
#[test]
fn accepted_socket_carries_the_worker_after_the_accept_window_closed() {
    accepted_socket_case(Duration::from_secs(keepalive_common::ACCEPT_WINDOW_S + 2));
}

/// The accepted-socket scenario, the client connecting `idle` after the agents are ready.
fn accepted_socket_case(idle: Duration) {
    let env = Env::new();
    let nginx = Nginx::start(&env.ns, PORT, "1s:1s:2", 1).unwrap();
    let workers = nginx.worker_pids();
    let worker = workers[0];
    assert_ne!(worker, nginx.master_pid());
    let all = Agent::start(&env, &[]);
    let by_pid = Agent::start(&env, &["--pid", &worker.to_string()]);
    assert_accept_hook(&all);
    if !idle.is_zero() {
        let addr = nginx.addr();
        env.ns.run(|| std::net::TcpStream::connect(addr)).unwrap();
        std::thread::sleep(idle);
    }

    let mut client = Client::connect(&env.ns, nginx.addr(), &Keepalive::new(600, 60, 5)).unwrap();
    http_get(&mut client);
    // The server's side of the connection: local is nginx, remote is the client.
    let (l, r) = (client.remote(), client.local());
    let (ss_name, ss_pid) = ss_owner(&env, l, r);
    assert_eq!((ss_name.as_str(), ss_pid), ("nginx", worker));

    env.ns.drop_from_port(client.local().port()).unwrap();
    let timed_out = |evs: &[Value]| evs.iter().any(|e| is_conn(e, l, r) && kind(e) == "close");
    assert!(all.wait_until(WAIT, timed_out), "no close\n{}", ctx(&of_conn(&all.events(), l, r)));
    assert!(by_pid.wait_until(WAIT, timed_out), "--pid {worker}: no close\n{}", render(&by_pid.events()));
    let evs = all.stop();
    let filtered = by_pid.stop();

    let server = of_conn(&evs, l, r);
    for k in ["probe", "timeout", "reset", "close"] {
        assert!(server.iter().any(|e| kind(e) == k), "no {k}\n{}", ctx(&server));
    }
    assert_owner_from_first(&server, worker, "nginx");
    // The connection became established before nginx accepted it: only what came before the
    // accept (open, config) may lack the process; every probe, the timeout and the reset have it.
    for e in server.iter().filter(|e| !matches!(kind(e), "open" | "config")) {
        assert_eq!(u64_of(e, "pid"), Some(u64::from(worker)), "{e}\n{}", ctx(&server));
    }

    // The client's own connection is the test process's (it called connect()).
    let client_side = of_conn(&evs, client.local(), client.remote());
    assert!(!client_side.is_empty(), "the client's keep-alive connection is not reported");
    assert_owner_from_first(&client_side, std::process::id(), &process_comm_or_thread(&client_side));

    // --pid WORKER: the worker's connection, from the accept on; nothing of the client's.
    let selected = of_conn(&filtered, l, r);
    for k in ["probe", "timeout", "reset", "close"] {
        assert!(selected.iter().any(|e| kind(e) == k), "--pid {worker}: no {k}\n{}", render(&filtered));
    }
    assert!(
        filtered.iter().filter(|e| e.get("local").is_some()).all(|e| u64_of(e, "pid") == Some(u64::from(worker))),
        "--pid {worker} let other records through\n{}",
        render(&filtered)
    );
}

/// The comm on a test-process record: the connecting thread's name or the process's.
fn process_comm_or_thread(evs: &[Value]) -> String {
    let comm = evs.iter().find_map(|e| str_of(e, "comm")).unwrap_or_default().to_string();
    assert!(!comm.is_empty(), "no comm\n{}", ctx(evs));
    comm
}

/// Keep-alive connections that exist before the agent starts, both sides: nginx's accepted socket
/// (two workers: the one `ss -tnp` names, not the master) and the client's. The snapshot reports
/// each with the process holding it.
#[test]
fn snapshot_reports_each_side_with_its_holder() {
    let env = Env::new();
    let nginx = Nginx::start(&env.ns, PORT, "30s:10s:3", 2).unwrap();
    let mut client = Client::connect(&env.ns, nginx.addr(), &Keepalive::new(600, 60, 5)).unwrap();
    http_get(&mut client);
    let (cl, cr) = (client.local(), client.remote());
    let (sl, sr) = (cr, cl);
    let server_holder = ss_owner(&env, sl, sr);
    let client_holder = ss_owner(&env, cl, cr);
    assert!(nginx.worker_pids().contains(&server_holder.1), "{server_holder:?}");
    assert_eq!(client_holder, (process_comm(), std::process::id()));

    let agent = Agent::start(&env, &[]);
    let opened = |l: SocketAddr, r: SocketAddr| move |evs: &[Value]| evs.iter().any(|e| is_conn(e, l, r) && kind(e) == "config");
    assert!(agent.wait_until(WAIT, opened(sl, sr)), "server side not reported\n{}", render(&agent.events()));
    assert!(agent.wait_until(WAIT, opened(cl, cr)), "client side not reported\n{}", render(&agent.events()));
    let evs = agent.stop();

    for ((l, r), (name, pid)) in [((sl, sr), &server_holder), ((cl, cr), &client_holder)] {
        let conn = of_conn(&evs, l, r);
        let snap = conn
            .iter()
            .position(|e| kind(e) == "config" && str_of(e, "source") == Some("snapshot"))
            .unwrap_or_else(|| panic!("no snapshot config\n{}", ctx(&conn)));
        assert_eq!(kind(&conn[0]), "open", "{}", ctx(&conn));
        for e in &conn[..=snap] {
            assert_eq!(u64_of(e, "pid"), Some(u64::from(*pid)), "{e}\n{}", ctx(&conn));
            assert_eq!(str_of(e, "comm"), Some(name.as_str()), "{e}\n{}", ctx(&conn));
        }
        assert_owner_from_first(&conn, *pid, name);
    }
}
