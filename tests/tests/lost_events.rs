//! A full ring buffer loses events, and the agent must say so and count every one of them.
//!
//! The agent runs with the smallest ring buffer (one page) and is stopped (SIGSTOP) while 200
//! keep-alive connections are set up, so the kernel side cannot reserve room for most of their
//! events. After SIGCONT the agent must report the loss while running and in its final summary,
//! and every event the kernel produced must be accounted for: received plus lost is at least what
//! the test generated.

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use keepalive_tests::{
    agent::{agent_binary, lost_event_reports, Agent},
    raise_nofile,
    tcp::{ClientSocket, Family, Keepalive, Server, ServerMode},
    Env,
};

/// Numbers in the agent's final `stopped: N kernel events, R records, L lost, ...` line.
fn summary_counts(stderr: &[String]) -> Option<(u64, u64)> {
    let line = stderr.iter().rev().find(|l| l.contains("stopped:"))?;
    let after = &line[line.find("stopped:")? + "stopped:".len()..];
    let number_before = |word: &str| -> Option<u64> {
        let i = after.find(word)?;
        after[..i].split_whitespace().next_back()?.parse().ok()
    };
    Some((number_before("kernel events")?, number_before("lost")?))
}

#[test]
fn full_ring_buffer_losses_are_counted_and_reported() {
    const N: usize = 200;
    raise_nofile(4096);
    let env = Env::new();
    let server = Server::start(&env.ns, Family::V4, ServerMode::Hold).unwrap();
    // Long idle time: no timer firing during the test, only setup events.
    let ka = Keepalive::new(600, 60, 5);
    let agent = Agent::start(&env, &["--ringbuf-size", "4096", "--no-snapshot"]);
    let pid = agent.process.pid() as libc::pid_t;

    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let mut clients = Vec::with_capacity(N);
    for s in ClientSocket::many(&env.ns, Family::V4, N).unwrap() {
        s.set_keepalive(&ka).unwrap();
        clients.push(s.connect(server.addr()).unwrap());
    }
    assert!(server.wait_accepted(N, Duration::from_secs(10)));
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);

    // The loss is reported while running (the agent checks its counters every second).
    let reported_live = {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if !lost_event_reports(&agent.stderr_lines()).is_empty() {
                break true;
            }
            if std::time::Instant::now() > deadline {
                break false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let (_, stderr) = agent.stop_full();
    drop(clients);
    assert!(reported_live, "no lost-event report while running:\n{}", stderr.join("\n"));
    let (received, lost) = summary_counts(&stderr)
        .unwrap_or_else(|| panic!("no final summary with counts:\n{}", stderr.join("\n")));
    assert!(lost > 0, "the final summary reports no loss:\n{}", stderr.join("\n"));
    // Each client connection produced at least 4 setsockopt events, SYN_SENT and ESTABLISHED.
    let generated = 6 * N as u64;
    assert!(
        received + lost >= generated,
        "{received} received + {lost} lost < {generated} generated: some events vanished uncounted"
    );
    assert!(
        stderr.iter().any(|l| l.contains("lost") && l.contains("Setsockopt")),
        "the loss is not broken down by event kind:\n{}",
        stderr.join("\n")
    );
}

/// An agent whose output nobody reads (`trace` into a pipe that fills, as behind a paused pager)
/// stands still in its write: its watchdog says so within seconds, naming the step, instead of
/// going silent.
#[test]
fn stalled_output_is_reported_with_its_step() {
    const N: usize = 400;
    raise_nofile(4096);
    let env = Env::new();
    let server = Server::start(&env.ns, Family::V4, ServerMode::Hold).unwrap();
    let mut child = Command::new(agent_binary())
        .args(["trace", "--format", "json", "--no-snapshot", "--netns"])
        .arg(env.ns.path())
        .arg("--cgroup")
        .arg(env.cgroup.path())
        .stdout(Stdio::piped()) // never read: the pipe fills
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[agent] {line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let mut wait_line = |what: &str, within: Duration| {
        let end = Instant::now() + within;
        while let Ok(line) = rx.recv_timeout(end.saturating_duration_since(Instant::now())) {
            let hit = line.contains(what);
            seen.push(line);
            if hit {
                return true;
            }
        }
        false
    };
    assert!(wait_line("ready", Duration::from_secs(60)), "agent not ready:\n{}", seen.join("\n"));
    // Each connection's records (open, settings) are a few hundred bytes of JSON: far more than
    // the pipe holds.
    let ka = Keepalive::new(600, 60, 5);
    let mut clients = Vec::with_capacity(N);
    for s in ClientSocket::many(&env.ns, Family::V4, N).unwrap() {
        s.set_keepalive(&ka).unwrap();
        clients.push(s.connect(server.addr()).unwrap());
    }
    let said = wait_line("event loop stalled", Duration::from_secs(20));
    let _ = child.kill();
    let _ = child.wait();
    drop(clients);
    assert!(said, "no stall reported:\n{}", seen.join("\n"));
    let line = seen.last().unwrap();
    assert!(line.contains("writing records to the output"), "the step is not named: {line}");
}
