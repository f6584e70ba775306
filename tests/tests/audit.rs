//! `keepalive-agent audit` on real sockets in a test namespace: one test per diagnosis plus a
//! healthy keep-alive connection that gets none; idle times and timers against `ss -tnoi`;
//! effective defaults equal to the namespace's sysctls; the owner of an accepted socket (an nginx
//! worker) and of a socket in a container cgroup; JSON key order; `--fail-on` exit codes; bad
//! input. `--idle-timeout 2` keeps them fast. Root required.
use std::io::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use keepalive_tests::audit::{diagnosis_ids, find, run_audit, ss_sockets, wait_until, AuditRun, ContainerCgroup, SsSocket};
use keepalive_tests::nginx::{self, Nginx};
use keepalive_tests::tcp::{fmt_addr, setsockopt_int, Client, ClientSocket, Family, Keepalive, Server, ServerMode};
use keepalive_tests::{process_comm, Env, NetNs};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

/// `audit --netns NS --format json ARGS`, which must exit with `status`.
fn audit(ns: &NetNs, args: &[&str], status: i32) -> (AuditRun, Vec<Value>) {
    let path = ns.path().to_str().unwrap();
    let mut all = vec!["--netns", path, "--format", "json"];
    all.extend_from_slice(args);
    let run = run_audit(&all);
    assert_eq!(run.status, Some(status), "audit {all:?}\nstdout:\n{}\nstderr:\n{}", run.stdout, run.stderr);
    let sockets = run.sockets();
    (run, sockets)
}

/// The object of `local` -> `remote`, which the audit must report.
fn socket(sockets: &[Value], local: SocketAddr, remote: SocketAddr) -> Value {
    find(sockets, local, remote)
        .unwrap_or_else(|| panic!("{local} -> {remote} not reported:\n{}", pretty(sockets)))
        .clone()
}

fn pretty(sockets: &[Value]) -> String {
    sockets.iter().map(|s| s.to_string()).collect::<Vec<_>>().join("\n")
}

/// A client without keep-alive connected to `addr`.
fn plain_client(ns: &NetNs, addr: SocketAddr) -> Client {
    ClientSocket::new(ns, Family::V4).unwrap().connect(addr).unwrap()
}

#[test]
fn healthy_keepalive_connection_gets_no_diagnosis() {
    let env = Env::new();
    let server = Server::start(&env.ns, Family::V4, ServerMode::Hold).unwrap();
    let client = Client::connect(&env.ns, server.addr(), &Keepalive::new(1, 1, 3)).unwrap();
    let (_, sockets) = audit(&env.ns, &["--idle-timeout", "2"], 0);
    let s = socket(&sockets, client.local(), client.remote());
    assert_eq!(diagnosis_ids(&s), Vec::<String>::new(), "{s}");
    assert_eq!(s["state"], "ESTABLISHED");
    assert_eq!(s["keepalive"], true);
    assert_eq!(s["keepalive_source"], "socket");
    for (key, value) in [("keepalive_idle", 1), ("keepalive_intvl", 1)] {
        assert_eq!(s[format!("{key}_s")], value, "{s}");
        assert_eq!(s[format!("{key}_source")], "socket", "{s}");
    }
    assert_eq!((s["keepalive_cnt"].clone(), s["keepalive_cnt_source"].clone()), (3.into(), "socket".into()));
    assert_eq!(s["dead_peer_detection_s"], 4);
    assert_eq!(s["timer"], "keepalive");
    assert_eq!(s["pid"], std::process::id());
    assert_eq!(s["comm"], process_comm());
    assert_eq!(s["netns"], env.ns.inode());
    // Listeners are only used for inheritance, not reported.
    assert!(sockets.iter().all(|s| s["state"] != "LISTEN"), "{}", pretty(&sockets));
}

#[test]
fn keepalive_off_idle() {
    let env = Env::new();
    let server = Server::start(&env.ns, Family::V4, ServerMode::Hold).unwrap();
    let client = plain_client(&env.ns, server.addr());
    // Idle for less than half the middlebox timeout: nothing yet.
    let (_, sockets) = audit(&env.ns, &["--idle-timeout", "60"], 0);
    assert!(diagnosis_ids(&socket(&sockets, client.local(), client.remote())).is_empty(), "{}", pretty(&sockets));
    // Idle for half the middlebox timeout: diagnosed.
    std::thread::sleep(Duration::from_millis(1100));
    let (_, sockets) = audit(&env.ns, &["--idle-timeout", "2"], 0);
    let s = socket(&sockets, client.local(), client.remote());
    assert_eq!(diagnosis_ids(&s), ["keepalive_off_idle"], "{s}");
    let d = &s["diagnoses"][0];
    assert_eq!(d["severity"], "warning");
    assert!(d["message"].as_str().unwrap().contains("keep-alive off"), "{d}");
    assert!(d["fix"].as_str().unwrap().contains("TCP_KEEPIDLE=1"), "{d}");
    assert_eq!(s["keepalive"], false);
    assert_eq!(s["keepalive_source"], Value::Null);
    assert!(s["idle_send_ms"].as_u64().unwrap() >= 1000 && s["idle_recv_ms"].as_u64().unwrap() >= 1000, "{s}");
}

#[test]
fn keepalive_too_late_and_slow_dead_peer_detection() {
    let env = Env::new();
    let server = Server::start(&env.ns, Family::V4, ServerMode::Hold).unwrap();
    let late = Client::connect(&env.ns, server.addr(), &Keepalive::new(5, 1, 3)).unwrap();
    let slow = Client::connect(&env.ns, server.addr(), &Keepalive::new(1, 2, 3)).unwrap();
    let (_, sockets) = audit(&env.ns, &["--idle-timeout", "2", "--detect-within", "5"], 0);
    let s = socket(&sockets, late.local(), late.remote());
    // 5 + 1 × 3 = 8 s > 5 s too.
    assert_eq!(diagnosis_ids(&s), ["keepalive_too_late", "slow_dead_peer_detection"], "{s}");
    assert!(s["diagnoses"][0]["message"].as_str().unwrap().contains("after 5 s idle (set on the socket)"), "{s}");
    let s = socket(&sockets, slow.local(), slow.remote());
    assert_eq!(diagnosis_ids(&s), ["slow_dead_peer_detection"], "{s}");
    assert!(s["diagnoses"][0]["message"].as_str().unwrap().contains("1 + 2 × 3 = 7 s"), "{s}");
    // Within the default target (15 min) nothing is slow.
    let (_, sockets) = audit(&env.ns, &["--idle-timeout", "2"], 0);
    assert_eq!(diagnosis_ids(&socket(&sockets, slow.local(), slow.remote())), Vec::<String>::new());
}

#[test]
fn probes_unanswered_with_the_death_time() {
    let env = Env::new();
    let server = Server::start(&env.ns, Family::V4, ServerMode::Hold).unwrap();
    let client = Client::connect(&env.ns, server.addr(), &Keepalive::new(1, 1, 8)).unwrap();
    env.ns.drop_from_port(server.port()).unwrap();
    let mut found = Value::Null;
    wait_until(WAIT, || {
        let (_, sockets) = audit(&env.ns, &["--idle-timeout", "60", "--port", &server.port().to_string()], 0);
        found = socket(&sockets, client.local(), client.remote());
        found["probes_out"].as_u64().unwrap_or(0) >= 2
    })
    .unwrap_or_else(|e| panic!("{e}: {found}"));
    assert_eq!(diagnosis_ids(&found), ["probes_unanswered"], "{found}");
    assert_eq!(found["timer"], "keepalive");
    let d = &found["diagnoses"][0];
    assert_eq!(d["severity"], "error");
    let message = d["message"].as_str().unwrap();
    assert!(message.contains(&format!("{} of 8 keep-alive probes unanswered", found["probes_out"])), "{message}");
    // Death: the next firing, then one interval per probe still allowed.
    let left = 8 - found["probes_out"].as_i64().unwrap();
    let death_s = (found["timer_expires_ms"].as_i64().unwrap().max(0) + left * 1000) as f64 / 1000.0;
    assert!(message.contains(&format!("declared dead in ~{death_s:.1} s")), "{message} (expected {death_s:.1})");
    // ss counts the same probes on the same timer (one or two more may have gone out since).
    let ss = ss_of(&ss_sockets(&env.ns).unwrap(), client.local(), client.remote());
    let timer = ss.timer.clone().unwrap_or_else(|| panic!("ss shows no timer: {ss:?}"));
    assert_eq!(timer.name, "keepalive", "{ss:?}");
    let out = found["probes_out"].as_u64().unwrap();
    assert!((out..=out + 2).contains(&u64::from(timer.count)), "audit {out} probes, ss {timer:?}");
}

#[test]
fn stuck_without_user_timeout() {
    let env = Env::new();
    let server = Server::start(&env.ns, Family::V4, ServerMode::Hold).unwrap();
    let mut stuck = Client::connect(&env.ns, server.addr(), &Keepalive::new(30, 5, 3)).unwrap();
    let mut guarded = Client::connect(&env.ns, server.addr(), &Keepalive::new(30, 5, 3).user_timeout(60_000)).unwrap();
    // The server's ACKs vanish: the clients retransmit their data.
    env.ns.drop_from_port(server.port()).unwrap();
    stuck.stream.write_all(b"hello").unwrap();
    guarded.stream.write_all(b"hello").unwrap();
    let mut found = (Value::Null, Value::Null);
    wait_until(WAIT, || {
        let (_, sockets) = audit(&env.ns, &["--idle-timeout", "60"], 0);
        found = (socket(&sockets, stuck.local(), stuck.remote()), socket(&sockets, guarded.local(), guarded.remote()));
        [&found.0, &found.1].iter().all(|s| s["retransmits"].as_u64().unwrap_or(0) >= 1)
    })
    .unwrap_or_else(|e| panic!("{e}: {found:?}"));
    let (s, g) = found;
    assert_eq!(diagnosis_ids(&s), ["stuck_without_user_timeout"], "{s}");
    assert_eq!(s["timer"], "retransmit");
    assert_eq!(s["unacked_bytes"], 5);
    assert!(s["packets_out"].as_u64().unwrap() >= 1, "{s}");
    assert!(s["diagnoses"][0]["message"].as_str().unwrap().contains("(tcp_retries2=15)"), "{s}");
    assert_eq!(diagnosis_ids(&g), Vec::<String>::new(), "TCP_USER_TIMEOUT set: {g}");
    assert_eq!(g["user_timeout_ms"], 60_000);
}

#[test]
fn close_wait_idle() {
    let env = Env::new();
    let server = Server::start(&env.ns, Family::V4, ServerMode::Hold).unwrap();
    let client = plain_client(&env.ns, server.addr());
    let (local, remote) = (client.local(), client.remote());
    assert!(server.wait_accepted(1, WAIT));
    // The peer closes; the server (Hold) never does: its socket stays in CLOSE_WAIT.
    drop(client);
    std::thread::sleep(Duration::from_millis(2200));
    let (_, sockets) = audit(&env.ns, &["--idle-timeout", "2", "--only-problems"], 0);
    let s = socket(&sockets, remote, local);
    assert_eq!(s["state"], "CLOSE_WAIT");
    assert_eq!(diagnosis_ids(&s), ["close_wait_idle"], "{s}");
    assert!(s["diagnoses"][0]["fix"].as_str().unwrap().contains(&format!("pid {}", std::process::id())), "{s}");
    assert!(sockets.iter().all(|s| !diagnosis_ids(s).is_empty()), "--only-problems:\n{}", pretty(&sockets));
}

/// The `ss -tnoi` line of `local` -> `remote`.
fn ss_of(ss: &[SsSocket], local: SocketAddr, remote: SocketAddr) -> SsSocket {
    let (l, r) = (fmt_addr(local), fmt_addr(remote));
    ss.iter().find(|s| s.local == l && s.remote == r).unwrap_or_else(|| panic!("ss lists no {l} -> {r}: {ss:?}")).clone()
}

/// `value` lies in `[low - slack, high + slack]`.
fn between(value: i64, a: u64, b: u64, slack: u64, what: &str) {
    let (low, high) = (a.min(b) as i64 - slack as i64, a.max(b) as i64 + slack as i64);
    assert!((low..=high).contains(&value), "{what}: audit {value} not within ss's [{low}, {high}]");
}

#[test]
fn idle_times_and_timers_match_ss() {
    let env = Env::new();
    let server = Server::start(&env.ns, Family::V4, ServerMode::Hold).unwrap();
    let ka = Client::connect(&env.ns, server.addr(), &Keepalive::new(30, 5, 3)).unwrap();
    let mut rt = Client::connect(&env.ns, server.addr(), &Keepalive::new(30, 5, 3)).unwrap();
    std::thread::sleep(Duration::from_millis(600));
    env.ns.drop_from_port(server.port()).unwrap();
    rt.stream.write_all(b"x").unwrap();
    // ss before and after: the audit's values lie between (idle grows, timers run down) as long
    // as no segment went out or came in and no timer fired in between. Retransmissions back off
    // (and fire late on a busy machine): retry until a window holds none.
    let clients = [&ka, &rt];
    let mut attempts = 0;
    let (before, sockets, after) = loop {
        std::thread::sleep(Duration::from_millis(300));
        let before = ss_sockets(&env.ns).unwrap();
        let (_, sockets) = audit(&env.ns, &["--idle-timeout", "60"], 0);
        let after = ss_sockets(&env.ns).unwrap();
        let quiet = clients.iter().all(|c| {
            let (b, a) = (ss_of(&before, c.local(), c.remote()), ss_of(&after, c.local(), c.remote()));
            let (tb, ta) = (b.timer.as_ref(), a.timer.as_ref());
            tb.map(|t| t.count) == ta.map(|t| t.count) && tb.is_some_and(|t| t.expires_ms > 0) && a.lastsnd_ms >= b.lastsnd_ms
        });
        attempts += 1;
        if quiet || attempts == 6 {
            break (before, sockets, after);
        }
    };
    let jiffy = 10;
    for client in clients {
        let (l, r) = (client.local(), client.remote());
        let (b, a, s) = (ss_of(&before, l, r), ss_of(&after, l, r), socket(&sockets, l, r));
        let ctx = format!("{s}\nss before {b:?}\nss after {a:?}\n(attempt {attempts})");
        let idle_send = s["idle_send_ms"].as_i64().unwrap();
        between(idle_send, b.lastsnd_ms.unwrap(), a.lastsnd_ms.unwrap(), jiffy, &format!("lastsnd {ctx}"));
        let lastrcv = |x: &SsSocket| x.lastrcv_ms.unwrap().min(x.lastack_ms.unwrap());
        between(s["idle_recv_ms"].as_i64().unwrap(), lastrcv(&b), lastrcv(&a), jiffy, &format!("lastrcv/lastack {ctx}"));
        let (tb, ta) = (b.timer.clone().unwrap(), a.timer.clone().unwrap());
        let name = match s["timer"].as_str().unwrap() {
            "retransmit" | "loss_probe" | "reorder_timeout" => "on",
            "zero_window_probe" => "persist",
            other => other,
        };
        assert_eq!((name, name), (tb.name.as_str(), ta.name.as_str()), "{ctx}");
        let res = tb.resolution_ms.max(ta.resolution_ms);
        // inet_diag clamps an overdue timer to 0 (jiffies_delta_to_msecs); the audit says how late it
        // is (negative) when the softirq has not run it yet, as on a loaded machine.
        let expires = s["timer_expires_ms"].as_i64().unwrap();
        let expires = if tb.expires_ms.min(ta.expires_ms) == 0 { expires.max(0) } else { expires };
        between(expires, tb.expires_ms, ta.expires_ms, jiffy + res, &format!("timer {ctx}"));
        let count = if name == "on" { &s["retransmits"] } else { &s["probes_out"] };
        assert_eq!(count.as_u64().unwrap(), u64::from(tb.count), "{ctx}");
    }
    assert_eq!(socket(&sockets, ka.local(), ka.remote())["timer"], "keepalive");
    assert_eq!(socket(&sockets, rt.local(), rt.remote())["timer"], "retransmit");
}

#[test]
fn effective_defaults_are_the_namespace_sysctls() {
    let env = Env::new();
    for (k, v) in [("net.ipv4.tcp_keepalive_time", "123"), ("net.ipv4.tcp_keepalive_intvl", "7"), ("net.ipv4.tcp_keepalive_probes", "4")] {
        env.ns.exec(&["sysctl", "-q", "-w", &format!("{k}={v}")]).unwrap();
    }
    let server = Server::start(&env.ns, Family::V4, ServerMode::Hold).unwrap();
    let sock = ClientSocket::new(&env.ns, Family::V4).unwrap();
    setsockopt_int(sock.raw_fd(), libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1).unwrap();
    setsockopt_int(sock.raw_fd(), libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 9).unwrap();
    let client = sock.connect(server.addr()).unwrap();
    let (_, sockets) = audit(&env.ns, &["--idle-timeout", "600"], 0);
    let s = socket(&sockets, client.local(), client.remote());
    let got: Vec<(Value, Value)> = [
        ("keepalive_idle_s", "keepalive_idle_source"),
        ("keepalive_intvl_s", "keepalive_intvl_source"),
        ("keepalive_cnt", "keepalive_cnt_source"),
    ]
    .iter()
    .map(|(v, src)| (s[*v].clone(), s[*src].clone()))
    .collect();
    assert_eq!(
        got,
        [(123.into(), "sysctl".into()), (9.into(), "socket".into()), (4.into(), "sysctl".into())],
        "{s}"
    );
    // 123 + 9 × 4
    assert_eq!(s["dead_peer_detection_s"], 159);
    // Judged against a shorter middlebox timeout, the sysctl's 123 s comes too late, and says so.
    let (_, sockets) = audit(&env.ns, &["--idle-timeout", "60"], 0);
    let s = socket(&sockets, client.local(), client.remote());
    assert_eq!(diagnosis_ids(&s), ["keepalive_too_late"], "{s}");
    assert!(s["diagnoses"][0]["message"].as_str().unwrap().contains("the namespace's net.ipv4.tcp_keepalive_time"), "{s}");
}

#[test]
fn accepted_socket_owned_by_the_nginx_worker_with_inherited_settings() {
    let env = Env::new();
    let nginx = Nginx::start(&env.ns, 18081, "30s:5s:4", 1).unwrap();
    let client = plain_client(&env.ns, nginx.addr());
    let workers = nginx.worker_pids();
    let port = nginx.addr().port().to_string();
    // First the fact the audit must report: the worker holds the accepted socket (ss -tnp). On a
    // loaded machine the worker may accept late; waiting on audits instead would spend the wait
    // on the agent's start-ups.
    let mut held_by = Vec::new();
    wait_until(WAIT, || {
        held_by = nginx::ss_processes(&env.ns, client.remote(), client.local()).unwrap_or_default();
        held_by.iter().any(|(_, pid)| *pid == workers[0])
    })
    .unwrap_or_else(|e| panic!("{e}: nginx's worker {} does not hold the accepted socket; ss -tnp: {held_by:?}", workers[0]));
    let (_, sockets) = audit(&env.ns, &["--idle-timeout", "600", "--port", &port, "--pid", &workers[0].to_string()], 0);
    let Some(found) = find(&sockets, client.remote(), client.local()).cloned() else {
        let (_, all) = audit(&env.ns, &["--idle-timeout", "600", "--port", &port], 0);
        panic!(
            "the accepted socket, held by {held_by:?} (ss -tnp), is not reported with --pid {}; without --pid: {:?}",
            workers[0],
            find(&all, client.remote(), client.local())
        );
    };
    let s = found;
    assert_eq!(s["pid"], workers[0], "{s}");
    assert_eq!(s["comm"], "nginx");
    assert_eq!(s["keepalive_source"], "inherited", "{s}");
    for (k, v) in [("keepalive_idle_s", 30), ("keepalive_intvl_s", 5), ("keepalive_cnt", 4)] {
        assert_eq!(s[k], v, "{s}");
    }
    for k in ["keepalive_idle_source", "keepalive_intvl_source", "keepalive_cnt_source"] {
        assert_eq!(s[k], "inherited", "{s}");
    }
    // The client's own socket: the test process, keep-alive off.
    let (_, sockets) = audit(&env.ns, &["--idle-timeout", "600", "--port", &port], 0);
    let c = socket(&sockets, client.local(), client.remote());
    assert_eq!((c["pid"].clone(), c["keepalive"].clone()), (std::process::id().into(), false.into()), "{c}");
}

#[test]
fn socket_in_a_container_cgroup_carries_the_container_id() {
    let env = Env::new();
    let server = Server::start(&env.ns, Family::V4, ServerMode::Hold).unwrap();
    let mut container = ContainerCgroup::new(env.cgroup.path()).unwrap();
    let pid = container.spawn_holder(&env.ns, server.addr()).unwrap();
    assert!(server.wait_accepted(1, WAIT), "the holder did not connect");
    let short = &container.id[..12];
    let mut found = Vec::new();
    wait_until(WAIT, || {
        found = audit(&env.ns, &["--idle-timeout", "600", "--container", short], 0).1;
        found.len() == 1 && found[0]["pid"] == pid
    })
    .unwrap_or_else(|e| panic!("{e}: {}", pretty(&found)));
    let s = &found[0];
    assert_eq!(s["container_id"], container.id.as_str(), "{s}");
    assert!(s["cgroup"].as_str().unwrap().ends_with(&format!("docker-{}.scope", container.id)), "{s}");
    assert_eq!(s["comm"], "sleep");
    assert_eq!(s["remote"], fmt_addr(server.addr()));
    // The text summary groups by owner and container.
    let ns = env.ns.path().to_str().unwrap();
    let run = run_audit(&["--netns", ns, "--idle-timeout", "600", "--color", "never"]);
    let line = run.stdout.lines().find(|l| l.starts_with(&format!("{pid}/sleep"))).unwrap_or_else(|| panic!("{}", run.stdout));
    assert!(line.contains(short), "{line}");
}

/// Every key of a socket object, in order (the README's contract).
const KEYS: [&str; 33] = [
    "netns", "local", "remote", "state", "pid", "comm", "cgroup", "container_id", "pod_uid", "pod_qos", "keepalive", "keepalive_source",
    "keepalive_idle_s", "keepalive_idle_source", "keepalive_intvl_s", "keepalive_intvl_source", "keepalive_cnt",
    "keepalive_cnt_source", "user_timeout_ms", "idle_send_ms", "idle_recv_ms", "timer", "timer_expires_ms",
    "probes_out", "retransmits", "packets_out", "unacked_bytes", "unsent_bytes", "dead_peer_detection_s", "orphan",
    "inode", "idle_timeout_s", "diagnoses",
];

#[test]
fn json_keys_are_stable_and_fail_on_sets_the_exit_status() {
    let env = Env::new();
    let server = Server::start(&env.ns, Family::V4, ServerMode::Hold).unwrap();
    let client = plain_client(&env.ns, server.addr());
    std::thread::sleep(Duration::from_millis(1100));
    // A warning (keepalive_off_idle) and no error.
    let (run, sockets) = audit(&env.ns, &["--idle-timeout", "2", "--fail-on", "warning"], 3);
    let line = run.stdout.lines().find(|l| l.contains(&format!("\"local\":\"{}\"", client.local()))).unwrap();
    let mut keys: Vec<(usize, &str)> = KEYS.iter().map(|k| (line.find(&format!("\"{k}\":")).unwrap_or(usize::MAX), *k)).collect();
    keys.sort();
    assert_eq!(keys.iter().map(|(_, k)| *k).collect::<Vec<_>>(), KEYS, "{line}");
    assert_eq!(socket(&sockets, client.local(), client.remote()).as_object().unwrap().len(), KEYS.len());
    let d = &socket(&sockets, client.local(), client.remote())["diagnoses"][0];
    assert_eq!(d.as_object().unwrap().keys().collect::<Vec<_>>().len(), 4);
    for k in ["\"id\":", "\"severity\":", "\"message\":", "\"fix\":"] {
        assert!(d.to_string().contains(k), "{d}");
    }
    // Bounded: past --max-sockets, counted and said.
    let (run, bounded) = audit(&env.ns, &["--idle-timeout", "600", "--max-sockets", "1"], 0);
    assert_eq!(bounded.len(), 1, "{}", run.stdout);
    assert!(run.stderr.contains("1 sockets past the bound of 1 were not audited (--max-sockets)"), "{}", run.stderr);
    audit(&env.ns, &["--idle-timeout", "2", "--fail-on", "error"], 0);
    audit(&env.ns, &["--idle-timeout", "2"], 0);
    audit(&env.ns, &["--idle-timeout", "600", "--fail-on", "warning"], 0);
}

#[test]
fn bad_input_names_the_flag_and_exits_2() {
    for (args, flag, words) in [
        (&["--middlebox", "aws-alb"][..], "--middlebox", "unknown middlebox `aws-alb`"),
        (&["--idle-timeout", "-5"][..], "--idle-timeout", "above 0"),
        (&["--idle-timeout", "0"][..], "--idle-timeout", "above 0"),
        (&["--detect-within", "-1"][..], "--detect-within", "-1"),
        (&["--fail-on", "fatal"][..], "--fail-on", "fatal"),
        (&["--container", "not-hex"][..], "--container", "hexadecimal"),
        (&["--max-sockets", "0"][..], "--max-sockets", "0"),
    ] {
        let run = run_audit(args);
        assert_eq!(run.status, Some(2), "{args:?}: {}", run.stderr);
        assert!(run.stderr.contains(flag) && run.stderr.contains(words), "{args:?}: {}", run.stderr);
        assert!(run.stdout.is_empty(), "{args:?}: {}", run.stdout);
    }
}


/// `--middlebox conntrack` takes this host's established-flow timeout when `nf_conntrack` is
/// loaded, and is refused naming the flag when it is not.
#[test]
fn conntrack_preset_is_this_hosts_timeout() {
    let env = Env::new();
    let sysctl = std::path::Path::new("/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_established");
    let ns = env.ns.path().to_str().unwrap();
    match std::fs::read_to_string(sysctl) {
        Ok(text) => {
            let run = run_audit(&["--netns", ns, "--middlebox", "conntrack", "--color", "never"]);
            assert_eq!(run.status, Some(0), "{}", run.stderr);
            let want = format!("middlebox idle timeout: {} s (conntrack: this host's {})", text.trim(), sysctl.display());
            assert!(run.stdout.contains(&want), "{want}\n{}", run.stdout);
        }
        Err(_) => {
            let run = run_audit(&["--netns", ns, "--middlebox", "conntrack"]);
            assert_eq!(run.status, Some(2), "{}", run.stderr);
            assert!(run.stderr.contains("--middlebox") && run.stderr.contains("nf_conntrack"), "{}", run.stderr);
        }
    }
}

/// The value of the Prometheus sample whose line starts with `name{` and holds every one of
/// `labels` (`key="value"`), if there is one.
fn sample(exposition: &str, name: &str, labels: &[&str]) -> Option<f64> {
    exposition
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .find(|l| labels.iter().all(|want| l.contains(want)))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// `run --audit-interval 1` with metrics: the walk repeats and `keepalive.connections.at_risk`
/// counts the test's connection under its diagnosis and workload, every other diagnosis at 0.
#[test]
fn run_publishes_connections_at_risk_every_interval() {
    let env = Env::new();
    let server = Server::start(&env.ns, Family::V4, ServerMode::Hold).unwrap();
    // Keep-alive after 300 s: too late for the default 240 s middlebox.
    let _late = Client::connect(&env.ns, server.addr(), &Keepalive::new(300, 10, 3)).unwrap();
    let addr = SocketAddr::from(([127, 0, 0, 1], keepalive_tests::otlp::free_loopback_port()));
    let agent = keepalive_tests::Agent::start_run(&env, &["--metrics-listen", &addr.to_string(), "--audit-interval", "1"], &[]);
    let audits = |body: &str| sample(body, "keepalive_agent_audits_total", &[]).unwrap_or(0.0);
    let r = keepalive_tests::metrics::wait_http(addr, "/metrics", WAIT, |r| audits(&r.body) >= 2.0)
        .unwrap_or_else(|e| panic!("{e:#}\nagent stderr:\n{}", agent.stderr_lines().join("\n")));
    let comm = format!("process_executable_name=\"{}\"", process_comm());
    let late = sample(&r.body, "keepalive_connections_at_risk", &["keepalive_diagnosis=\"keepalive_too_late\"", &comm]);
    assert_eq!(late, Some(1.0), "{}", r.body);
    for id in ["keepalive_off_idle", "stuck_without_user_timeout", "probes_unanswered", "close_wait_idle", "slow_dead_peer_detection"] {
        let v = sample(&r.body, "keepalive_connections_at_risk", &[&format!("keepalive_diagnosis=\"{id}\"")]);
        assert_eq!(v, Some(0.0), "{id}: {}", r.body);
    }
    assert!(sample(&r.body, "keepalive_agent_audit_sockets", &[]) >= Some(2.0), "{}", r.body);
    assert!(sample(&r.body, "keepalive_agent_audit_duration_seconds", &[]).is_some(), "{}", r.body);
    let stderr = agent.stderr_lines();
    assert!(stderr.iter().any(|l| l.contains("audit: every 1s")), "{}", stderr.join("\n"));
}
