//! Least privilege: the agent runs as `nobody` with exactly the capabilities `keepalive-agent
//! check` declares (ambient capabilities through util-linux `setpriv`), follows a dead peer to the
//! end, and holds only the capabilities it keeps after start-up in every thread; without any one
//! required capability it refuses to start, naming it (an optional one is named in a warning).
//! Root required (to set the test up and hand out the capabilities).
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use keepalive_tests::events::{is_conn, kind, of_conn, of_kind, render, str_of, u64_of};
use keepalive_tests::privilege::{agent_for_nobody, cap_number, declared, setpriv_args, thread_masks, Declared};
use keepalive_tests::tcp::{Client, Family, Keepalive, Server, ServerMode};
use keepalive_tests::agent::forced_attach;
use keepalive_tests::{Agent, Env};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);

/// Whether this kernel's `perf_event_paranoid` level (Debian's default 3) lets only CAP_SYS_ADMIN
/// call perf_event_open(2), which kprobes and tracefs tracepoints are attached through.
fn perf_event_open_needs_sys_admin() -> bool {
    let level = std::fs::read_to_string("/proc/sys/kernel/perf_event_paranoid").unwrap();
    level.trim().parse::<i32>().unwrap() > 2
}

/// Whether the agent cannot start without CAP_SYS_ADMIN here: kprobes forced where
/// perf_event_open(2) needs it.
fn kprobes_need_sys_admin() -> bool {
    perf_event_open_needs_sys_admin() && forced_attach().as_deref() == Some("kprobe")
}

const PERF_HINT: &str = "perf_event_open(2) needs CAP_SYS_ADMIN; grant it or set the sysctl to 2";

/// The capabilities this kernel needs, as `check` declares them.
fn needed() -> Vec<Declared> {
    let all = declared().unwrap_or_else(|e| panic!("{e:#}"));
    all.into_iter().filter(|d| d.state != "unneeded").collect()
}

fn names(caps: &[Declared]) -> Vec<&str> {
    caps.iter().map(|d| d.name.as_str()).collect()
}

fn mask(caps: impl Iterator<Item = String>) -> u64 {
    caps.map(|n| 1u64 << cap_number(&n).unwrap_or_else(|| panic!("unknown capability {n}"))).fold(0, |a, b| a | b)
}

fn status_field(pid: u32, field: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines().find_map(|l| l.strip_prefix(field)).unwrap_or_default().trim().to_string()
}

fn wait_event(agent: &Agent<'_>, l: SocketAddr, r: SocketAddr, k: &str) -> Value {
    agent
        .wait_for(WAIT, |e| is_conn(e, l, r) && kind(e) == k)
        .unwrap_or_else(|| panic!("no {k} event within {WAIT:?}\n{}", render(&of_conn(&agent.events(), l, r))))
}

#[test]
fn dead_peer_as_nobody_with_exactly_the_declared_capabilities() {
    let caps = needed();
    let env = Env::new();
    let wrapper = setpriv_args(&names(&caps));
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let server = Server::start(&env.ns, Family::V4, ServerMode::Hold).unwrap();
    let agent = Agent::start_wrapped(&env, &wrapper, agent_for_nobody(), &[]);
    let pid = agent.pid();
    assert!(status_field(pid, "Uid:").starts_with("65534"), "runs as nobody: {}", status_field(pid, "Uid:"));

    // Start-up is over: every thread holds exactly the capabilities kept, none inheritable/ambient.
    let kept = mask(caps.iter().filter(|d| d.kept).map(|d| d.name.clone()));
    assert!(kept & (1 << cap_number("CAP_BPF").unwrap()) != 0);
    for (field, want) in [("CapEff", kept), ("CapPrm", kept), ("CapInh", 0), ("CapAmb", 0)] {
        for (thread, got) in thread_masks(pid, field).unwrap() {
            assert_eq!(got, want, "{field} of thread {thread}: {got:#x}, expected {want:#x}");
        }
    }
    let stderr = agent.stderr_lines();
    assert!(stderr.iter().any(|l| l.contains("capabilities after start-up: kept")), "{stderr:?}");
    assert!(!stderr.iter().any(|l| l.contains("is missing")), "{stderr:?}");

    // The dead-peer scenario of tests/keepalive.rs.
    let ka = Keepalive::new(1, 1, 3);
    let mut client = Client::connect(&env.ns, server.addr(), &ka).unwrap();
    let (l, r) = (client.local(), client.remote());
    assert!(server.wait_accepted(1, Duration::from_secs(5)));
    env.ns.drop_from_port(server.port()).unwrap();
    wait_event(&agent, l, r, "probe");
    // With a probe outstanding the probe-answer program is attached on demand, after the drop:
    // the kept capabilities allow it.
    assert!(
        agent.wait_links(Duration::from_secs(5), |links| links.iter().any(|t| t == "tcp_probe")),
        "tcp_probe not attached on demand: {:?}\n{}",
        agent.linked_tracepoints(),
        agent.stderr_lines().join("\n")
    );
    client.expect_etimedout(Duration::from_secs(15));
    wait_event(&agent, l, r, "close");
    let (events, stderr) = agent.stop_full();
    let evs = of_conn(&events, l, r);
    let ctx = render(&evs);
    let probes: Vec<u64> = of_kind(&evs, "probe").iter().filter_map(|e| u64_of(e, "probe")).collect();
    assert_eq!(probes, vec![1, 2, 3], "{ctx}");
    let config = evs.iter().find(|e| kind(e) == "config" && str_of(e, "source") == Some("setsockopt"));
    assert!(config.is_some(), "the setsockopt hook saw the settings\n{ctx}");
    let timeout = evs.iter().find(|e| kind(e) == "timeout").unwrap_or_else(|| panic!("no timeout\n{ctx}"));
    assert_eq!((str_of(timeout, "reason"), u64_of(timeout, "probes")), (Some("keepalive"), Some(3)), "{timeout}");
    let error = evs.iter().find(|e| kind(e) == "error").unwrap_or_else(|| panic!("no error\n{ctx}"));
    assert_eq!(str_of(error, "errno"), Some("ETIMEDOUT"), "{error}");
    assert!(evs.iter().any(|e| kind(e) == "close"), "{ctx}");
    let complaints: Vec<&String> =
        stderr.iter().filter(|l| l.contains("cannot attach") || l.contains("Operation not permitted") || l.contains("EPERM")).collect();
    assert!(complaints.is_empty(), "permission trouble after the drop: {complaints:#?}");
}

/// `trace --duration 0.5` and `check` run as nobody with every needed capability but `without`
/// (with the attach method the tests force, if any: `KEEPALIVE_TEST_ATTACH`).
fn run_without(env: &Env, caps: &[Declared], without: &str) -> (std::process::Output, std::process::Output) {
    let rest: Vec<&str> = names(caps).into_iter().filter(|n| *n != without).collect();
    let wrapper = setpriv_args(&rest);
    let forced = forced_attach();
    let attach: Vec<&str> = forced.as_deref().map(|m| vec!["--attach", m]).unwrap_or_default();
    let run = |args: &[&str]| {
        Command::new(&wrapper[0])
            .args(&wrapper[1..])
            .arg(agent_for_nobody())
            .args(args)
            .args(&attach)
            .output()
            .unwrap()
    };
    let (ns, cg) = (env.ns.path().to_str().unwrap().to_string(), env.cgroup.path().to_str().unwrap().to_string());
    let trace = run(&["trace", "--duration", "0.5", "--netns", &ns, "--cgroup", &cg]);
    let check = run(&["check", "--cgroup", &cg]);
    (trace, check)
}

#[test]
fn each_missing_capability_is_named() {
    let caps = needed();
    let env = Env::new();
    assert!(caps.len() >= 4, "{caps:?}");
    for cap in &caps {
        let (trace, check) = run_without(&env, &caps, &cap.name);
        let err = String::from_utf8_lossy(&trace.stderr);
        let check_out = String::from_utf8_lossy(&check.stdout);
        let row = check_out
            .lines()
            .find(|l| l.starts_with(&format!("{} ", cap.name)))
            .unwrap_or_else(|| panic!("check does not list {}:\n{check_out}", cap.name));
        if cap.name == "CAP_SYS_ADMIN" && kprobes_need_sys_admin() {
            // Optional elsewhere, but kprobes cannot attach without it: a clear refusal.
            assert_eq!(trace.status.code(), Some(1), "without {}: {err}", cap.name);
            assert!(err.contains("--attach kprobe cannot reach keepalive_timer") && err.contains(PERF_HINT), "{err}");
            let check_err = String::from_utf8_lossy(&check.stderr);
            assert!(check_err.contains(PERF_HINT) || check_out.contains(PERF_HINT), "{check_out}{check_err}");
            assert_ne!(check.status.code(), Some(0), "{check_out}");
        } else if cap.required {
            assert_eq!(trace.status.code(), Some(1), "without {}: {err}", cap.name);
            assert!(err.contains(&format!("missing capabilities: {} (for ", cap.name)), "without {}: {err}", cap.name);
            assert!(row.contains("MISSING"), "{row}");
            assert!(check_out.contains("the agent cannot start: without it"), "{check_out}");
            assert_ne!(check.status.code(), Some(0), "check succeeds without {}", cap.name);
        } else {
            assert_eq!(trace.status.code(), Some(0), "without the optional {}: {err}", cap.name);
            assert!(err.contains(&format!("capability {} is missing: ", cap.name)), "without {}: {err}", cap.name);
            assert!(row.contains("missing"), "{row}");
            assert_eq!(check.status.code(), Some(0), "{check_out}");
            if cap.name == "CAP_SYS_ADMIN" && perf_event_open_needs_sys_admin() {
                // The accept hook's tracepoints go through perf_event_open(2): lost, and said why.
                assert!(err.contains("hook accept_owner: not reachable") && err.contains(PERF_HINT), "{err}");
                assert!(check_out.contains("perf_event_open(2) is refused"), "{check_out}");
            }
        }
    }
}

/// Without the optional CAP_SYS_ADMIN the start-up snapshot still covers the agent's own network
/// namespace (no `setns` is needed there), with the owner process found as `nobody` (CAP_SYS_PTRACE,
/// CAP_DAC_READ_SEARCH), while another namespace's older connections are only seen from their first
/// keep-alive event on, and the warning names the capability.
#[test]
fn snapshot_without_cap_sys_admin() {
    let caps = needed();
    let rest: Vec<&str> = names(&caps).into_iter().filter(|n| *n != "CAP_SYS_ADMIN").collect();
    let env = Env::new();
    if kprobes_need_sys_admin() {
        // No agent can start with kprobes here without CAP_SYS_ADMIN (each_missing_capability_is_named
        // checks the refusal); the snapshot has nothing to show.
        let (trace, _) = run_without(&env, &caps, "CAP_SYS_ADMIN");
        assert!(String::from_utf8_lossy(&trace.stderr).contains(PERF_HINT), "{trace:?}");
        return;
    }
    let server = Server::start(&env.ns, Family::V4, ServerMode::Hold).unwrap();
    let ka = Keepalive::new(1, 1, 5);
    let client = Client::connect(&env.ns, server.addr(), &ka).unwrap();
    let (l, r) = (client.local(), client.remote());
    let snapshot_config = |evs: &[Value]| evs.iter().find(|e| kind(e) == "config" && str_of(e, "source") == Some("snapshot")).cloned();

    // Inside the test namespace (nsenter keeps the host's mounts, unlike `ip netns exec`).
    let mut inside = vec!["nsenter".to_string(), format!("--net={}", env.ns.path().display())];
    inside.extend(setpriv_args(&rest));
    let inside: Vec<&str> = inside.iter().map(String::as_str).collect();
    let agent = Agent::start_wrapped(&env, &inside, agent_for_nobody(), &[]);
    wait_event(&agent, l, r, "probe");
    let (events, stderr) = agent.stop_full();
    assert!(stderr.iter().any(|l| l.contains("capability CAP_SYS_ADMIN is missing")), "{stderr:?}");
    let evs = of_conn(&events, l, r);
    let c = snapshot_config(&evs).unwrap_or_else(|| panic!("no snapshot of the agent's own namespace\n{}", render(&evs)));
    assert_eq!(u64_of(&c, "pid"), Some(u64::from(std::process::id())), "owner found as nobody: {c}");

    // From the host's namespace the test namespace needs setns: no snapshot, the connection is
    // picked up at its next keep-alive event.
    let outside = setpriv_args(&rest);
    let outside: Vec<&str> = outside.iter().map(String::as_str).collect();
    let agent = Agent::start_wrapped(&env, &outside, agent_for_nobody(), &[]);
    wait_event(&agent, l, r, "probe");
    let evs = of_conn(&agent.stop(), l, r);
    assert!(snapshot_config(&evs).is_none(), "a snapshot of another namespace without CAP_SYS_ADMIN\n{}", render(&evs));
    drop(client);
}
