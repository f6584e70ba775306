//! `keepalive-agent run` metrics and health end to end: the real agent on the real kernel, real
//! keep-alive connections in the test's network namespace (loopback only), scraped by a real
//! Prometheus server (PromQL through its HTTP API), checked by `promtool`, pushed over OTLP to
//! tests/otlp/receiver.py and through rotel (neither built on the Rust OpenTelemetry crates), with
//! the cardinality cap, the bound counters, `/readyz` and `/healthz`, the span volume policy and bad settings.
//! Root, Debian's `prometheus` and the receiver venv (scripts/setup.sh) required.
use std::io::Read as _;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd as _, OwnedFd};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keepalive_tests::metrics::{http_get, promtool_check, sample_value, wait_http, Prometheus, Rotel};
use keepalive_tests::otlp::{export_report, free_loopback_port, of_conn, render, venv, Protocol, Receiver, Span};
use keepalive_tests::tcp::{Client, Family, Keepalive, Server, ServerMode};
use keepalive_tests::{agent_binary, process_comm, thread_comm, Agent, Env};
use serde_json::Value;

/// Upper bound for anything expected within a few keep-alive periods.
const WAIT: Duration = Duration::from_secs(20);
const SERVICE: &str = "keepalive-metrics-test";

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// A free `127.0.0.1` address for `--metrics-listen`.
fn listen_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_loopback_port()))
}

/// The names the test's connections can carry as `process.executable.name`: the comm of the thread
/// that set their options and connected, or of the test process.
fn own_comms() -> Vec<String> {
    vec![thread_comm(), process_comm()]
}

/// A keep-alive connection (idle 1 s, interval 1 s, 3 probes) whose peer vanishes: returns its
/// addresses once the kernel killed it (the client saw ETIMEDOUT).
fn dead_peer(env: &Env) -> (SocketAddr, SocketAddr) {
    let server = Server::start(&env.ns, Family::V4, ServerMode::Hold).unwrap();
    let mut client = Client::connect(&env.ns, server.addr(), &Keepalive::new(1, 1, 3)).unwrap();
    assert!(server.wait_accepted(1, Duration::from_secs(5)));
    env.ns.drop_from_port(server.port()).unwrap();
    client.expect_etimedout(Duration::from_secs(15));
    (client.local(), client.remote())
}

/// A keep-alive connection (idle 1 s, interval 1 s) to a live peer, open for `open` (the peer
/// answers every probe), then closed.
fn healthy(env: &Env, open: Duration) -> (SocketAddr, SocketAddr) {
    let server = Server::start(&env.ns, Family::V4, ServerMode::Echo).unwrap();
    let client = Client::connect(&env.ns, server.addr(), &Keepalive::new(1, 1, 3)).unwrap();
    let addrs = (client.local(), client.remote());
    std::thread::sleep(open);
    drop(client);
    addrs
}

/// Prometheus scrapes `run --metrics-listen`; after a dead peer and a healthy connection, PromQL
/// sees the death (cause keepalive_timeout), the probes and the answered episodes with the
/// workload's `process_executable_name`; `promtool check metrics` finds nothing to say; the
/// scraper that asks for OpenMetrics gets it.
#[test]
fn prometheus_scrapes_deaths_probes_and_answers() {
    let env = Env::new();
    let addr = listen_addr();
    let agent = Agent::start_run(&env, &["--metrics-listen", &addr.to_string()], &[]);
    let prom = Prometheus::start(addr, Duration::from_millis(500)).unwrap_or_else(|e| panic!("{e:#}"));
    dead_peer(&env);
    // About five answered probes; at least two are asked for below, so that one timer run lost
    // by the platform (its probe and answer reach no episode) still leaves enough.
    healthy(&env, Duration::from_millis(5500));
    let comms = own_comms().join("|");
    let exe = format!("process_executable_name=~\"{comms}\"");
    let q = |promql: &str, pred: &dyn Fn(f64) -> bool| {
        let r = prom.wait_query(promql, WAIT, |r| r.len() == 1 && pred(sample_value(&r[0])));
        r.unwrap_or_else(|e| {
            let stderr = agent.stderr_lines().join("\n");
            panic!("{e:#}\nagent's log:\n{stderr}\nprometheus log:\n{}", prom.log())
        })
    };
    q(r#"up{job="keepalive"}"#, &|v| v == 1.0);
    let deaths = q(&format!(r#"keepalive_connection_deaths_total{{keepalive_death_cause="keepalive_timeout",{exe}}}"#), &|v| v >= 1.0);
    assert_eq!(sample_value(&deaths[0]), 1.0, "one connection died: {deaths:?}");
    // Three unanswered probes killed the dead peer; the healthy connection had at least two answered.
    q(&format!("sum(keepalive_probes_total{{{exe}}})"), &|v| v >= 5.0);
    q(&format!(r#"sum(keepalive_episodes_total{{keepalive_episode_outcome="answered",{exe}}})"#), &|v| v >= 2.0);
    q(&format!(r#"sum(keepalive_episodes_total{{keepalive_episode_outcome="timeout",{exe}}})"#), &|v| v == 1.0);
    q(&format!("sum(keepalive_answers_total{{{exe}}})"), &|v| v >= 2.0);
    q("count(keepalive_agent_hooks)", &|v| v >= 4.0);
    q("keepalive_agent_events_received_total", &|v| v > 0.0);
    q(r#"target_info{service_name="keepalive-agent"}"#, &|v| v == 1.0);

    let text = http_get(addr, "/metrics", None).unwrap();
    assert!(text.content_type.starts_with("text/plain; version=0.0.4"), "{}", text.content_type);
    let (ok, out) = promtool_check(&text.body).unwrap();
    assert!(ok && out.trim().is_empty(), "promtool check metrics: {out}\n{}", text.body);
    let om = http_get(addr, "/metrics", Some("application/openmetrics-text;version=1.0.0,text/plain;q=0.5")).unwrap();
    assert!(om.content_type.starts_with("application/openmetrics-text"), "{}", om.content_type);
    assert!(om.body.trim_end().ends_with("# EOF"), "{}", om.body);
    assert!(om.body.contains("# TYPE keepalive_connection_deaths counter"), "{}", om.body);
    agent.stop();
}

/// `keepalive_probes_outstanding` in one scrape of `/metrics` at `addr`.
fn outstanding(addr: SocketAddr) -> f64 {
    let text = http_get(addr, "/metrics", None).unwrap().body;
    let line = text.lines().find(|l| l.starts_with("keepalive_probes_outstanding ")).unwrap_or_else(|| panic!("{text}"));
    line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{line}"))
}

/// The half-open gauge counts connections whose probes went unanswered for an interval, not
/// healthy ones: with `--probe-answers next-firing` (the packaged setting) a healthy peer's answer
/// is learnt only at the next timer firing, so every healthy keep-alive connection waited for one
/// most of the time; a dead peer shows from its second probe until it dies.
#[test]
fn outstanding_gauge_counts_unanswered_probes_only() {
    let env = Env::new();
    let addr = listen_addr();
    let agent = Agent::start_run(&env, &["--metrics-listen", &addr.to_string(), "--probe-answers", "next-firing"], &[]);
    wait_http(addr, "/readyz", Duration::from_secs(30), |r| r.status == 200)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", agent.stderr_lines().join("\n")));
    let server = Server::start(&env.ns, Family::V4, ServerMode::Echo).unwrap();
    let client = Client::connect(&env.ns, server.addr(), &Keepalive::new(1, 1, 3)).unwrap();
    let end = Instant::now() + Duration::from_millis(4500);
    let mut healthy = Vec::new();
    while Instant::now() < end {
        healthy.push(outstanding(addr));
        std::thread::sleep(Duration::from_millis(250));
    }
    drop(client);
    let probes = http_get(addr, "/metrics", None).unwrap().body;
    let probed: f64 = probes
        .lines()
        .filter(|l| l.starts_with("keepalive_probes_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(probed >= 2.0, "the healthy connection probed at least twice:\n{probes}");
    assert!(healthy.iter().all(|&v| v == 0.0), "a healthy connection counted as half-open: {healthy:?}");

    let mut dying = Vec::new();
    std::thread::scope(|s| {
        let done = s.spawn(|| dead_peer(&env));
        while !done.is_finished() {
            dying.push(outstanding(addr));
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    assert!(dying.contains(&1.0), "the dead peer never counted between its second probe and its death: {dying:?}");
    let after = Instant::now() + Duration::from_secs(3);
    while outstanding(addr) != 0.0 {
        assert!(Instant::now() < after, "still counted after the death");
        std::thread::sleep(Duration::from_millis(200));
    }
    agent.stop();
}

/// The value of the point of `metric` (a receiver "metric" object) whose attributes include
/// `want`.
fn points_with<'a>(metric: &'a Value, want: &[(&str, &str)]) -> Vec<&'a Value> {
    metric["points"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| want.iter().all(|(k, v)| p["attributes"][*k].as_str() == Some(*v)))
        .collect()
}

/// Total of `name`'s points with attributes `want` over every metric received (deltas add up to
/// the total; for cumulative sums use the last one).
fn received(metrics: &[Value], name: &str, want: &[(&str, &str)]) -> Vec<f64> {
    metrics
        .iter()
        .filter(|m| m["name"] == name)
        .flat_map(|m| points_with(m, want))
        .filter_map(|p| p["value"].as_f64())
        .collect()
}

/// After a dead peer, the receiver has the death (cause keepalive_timeout, the workload's
/// executable) in `temporality`, the probes as a monotonic sum, the connections gauge, and the
/// resource and headers the agent was given.
/// `context` is called only on failure: what else can tell where the death went (the agent's own
/// counters, the collector's log).
fn assert_otlp_metrics(receiver: &Receiver, temporality: &str, tag: Option<&str>, context: &dyn Fn() -> String) {
    let exe = own_comms();
    let death = |ms: &[Value]| {
        exe.iter()
            .map(|e| received(ms, "keepalive.connection.deaths", &[("keepalive.death.cause", "keepalive_timeout"), ("process.executable.name", e)]))
            .find(|v| !v.is_empty())
            .unwrap_or_default()
    };
    let got = receiver.wait_metrics(WAIT, |ms| {
        let v = death(ms);
        match temporality {
            "DELTA" => v.iter().sum::<f64>() >= 1.0,
            _ => v.last() == Some(&1.0),
        }
    });
    let metrics = receiver.metrics();
    let names: Vec<&str> = metrics.iter().filter_map(|m| m["name"].as_str()).collect();
    let deaths_seen: Vec<String> = metrics.iter().filter(|m| m["name"] == "keepalive.connection.deaths").map(|m| m["points"].to_string()).collect();
    // The facts last: a CI report keeps the head and the tail of a long message.
    assert!(
        got,
        "no keepalive_timeout death of {exe:?} received within {WAIT:?}\n{}\nmetrics received: {:?}\ndeath points received: {deaths_seen:?}",
        context(),
        names.iter().collect::<std::collections::BTreeSet<_>>(),
    );
    if temporality == "DELTA" {
        assert_eq!(death(&metrics).iter().sum::<f64>(), 1.0, "the deltas add up to one death");
    }
    let deaths = metrics.iter().find(|m| m["name"] == "keepalive.connection.deaths").unwrap();
    assert_eq!((deaths["data"].as_str(), deaths["temporality"].as_str(), deaths["monotonic"].as_bool()), (Some("sum"), Some(temporality), Some(true)), "{deaths}");
    assert_eq!(deaths["resource"]["service.name"], SERVICE, "{deaths}");
    let probes: f64 = received(&metrics, "keepalive.probes", &[]).into_iter().fold(0.0, |a, v| if temporality == "DELTA" { a + v } else { a.max(v) });
    assert!(probes >= 3.0, "probes: {probes}");
    let gauge = metrics.iter().find(|m| m["name"] == "keepalive.connections").expect("keepalive.connections");
    assert_eq!(gauge["data"], "gauge", "{gauge}");
    assert!(!points_with(gauge, &[("keepalive.enabled", "true")]).is_empty(), "{gauge}");
    if let Some(tag) = tag {
        let reqs = receiver.metric_requests();
        assert!(reqs.iter().all(|r| r["accepted"] == true && r["headers"]["x-keepalive-test"] == tag), "{reqs:?}");
    }
}

/// `run` pushes its metrics over OTLP to receiver.py; the HTTP variant asks for deltas through
/// `OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE`.
fn otlp_metrics_to_receiver(protocol: Protocol) {
    venv();
    let env = Env::new();
    let receiver = Receiver::start(0, 0);
    let tag = format!("metrics-{}-{}", std::process::id(), protocol.flag());
    let endpoint = receiver.endpoint(protocol);
    let flags = [
        "--otlp-endpoint", &endpoint, "--otlp-protocol", protocol.flag(), "--service-name", SERVICE,
        "--otlp-header", &format!("x-keepalive-test={tag}"), "--metrics-exporter", "otlp",
        "--metrics-export-interval-ms", "500",
    ];
    let (envs, temporality): (&[(&str, &str)], &str) = match protocol {
        Protocol::Grpc => (&[], "CUMULATIVE"),
        Protocol::HttpProtobuf => (&[("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE", "delta")], "DELTA"),
    };
    // The agent's own exposition too: on a failure, it tells whether the agent counted the death.
    let listen = listen_addr();
    let listen_flag = listen.to_string();
    let flags = [&flags[..], &["--metrics-listen", &listen_flag]].concat();
    let agent = Agent::start_run(&env, &flags, envs);
    let (local, remote) = dead_peer(&env);
    let died = Instant::now();
    assert_otlp_metrics(&receiver, temporality, Some(&tag), &|| {
        let own = http_get(listen, "/metrics", None).map(|r| r.body).unwrap_or_else(|e| format!("{e:#}"));
        let counted: Vec<&str> = own.lines().filter(|l| l.starts_with("keepalive_connection_deaths") || l.starts_with("keepalive_agent_events_lost") || l.starts_with("keepalive_probes_total")).collect();
        format!(
            "agent stderr:\n{}\nthe connection {local} -> {remote} died {:?} ago; the agent's own /metrics now: {counted:?}",
            agent.stderr_lines().join("\n"),
            died.elapsed()
        )
    });
    let reqs = receiver.metric_requests();
    assert!(reqs.iter().all(|r| r["protocol"] == protocol.receiver_name()), "{reqs:?}");
    agent.stop();
}

#[test]
fn otlp_metrics_to_python_receiver_over_grpc() {
    otlp_metrics_to_receiver(Protocol::Grpc);
}

#[test]
fn otlp_metrics_to_python_receiver_over_http() {
    otlp_metrics_to_receiver(Protocol::HttpProtobuf);
}

/// `run` pushes its metrics to rotel (an OTLP collector), which forwards them to receiver.py; the
/// agent's own counters say every point was delivered.
fn otlp_metrics_through_rotel(protocol: Protocol) {
    venv();
    let env = Env::new();
    let receiver = Receiver::start(0, 0);
    let rotel = Rotel::start(&receiver.endpoint(Protocol::Grpc)).unwrap_or_else(|e| panic!("{e:#}"));
    let port = match protocol {
        Protocol::Grpc => rotel.grpc_port,
        Protocol::HttpProtobuf => rotel.http_port,
    };
    let endpoint = format!("http://127.0.0.1:{port}");
    let addr = listen_addr();
    let flags = [
        "--otlp-endpoint", &endpoint, "--otlp-protocol", protocol.flag(), "--service-name", SERVICE,
        "--metrics-exporter", "otlp", "--metrics-export-interval-ms", "500", "--metrics-listen", &addr.to_string(),
    ];
    let agent = Agent::start_run(&env, &flags, &[]);
    dead_peer(&env);
    assert_otlp_metrics(&receiver, "CUMULATIVE", None, &|| {
        let own = http_get(addr, "/metrics", None).map(|r| r.body).unwrap_or_else(|e| format!("{e:#}"));
        let counted: Vec<&str> = own.lines().filter(|l| l.starts_with("keepalive_connection_deaths") || l.starts_with("keepalive_agent_")).collect();
        format!("the agent's own /metrics:\n{}\nrotel log:\n{}", counted.join("\n"), rotel.log())
    });
    let text = http_get(addr, "/metrics", None).unwrap().body;
    let value = |line: &str| -> f64 {
        text.lines().find(|l| l.starts_with(line)).and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok()).unwrap_or(-1.0)
    };
    assert!(value(r#"keepalive_agent_metric_points_total{keepalive_export_outcome="exported"}"#) > 0.0, "{text}\nrotel:\n{}", rotel.log());
    assert_eq!(value(r#"keepalive_agent_metric_points_total{keepalive_export_outcome="failed"}"#), 0.0, "{text}\nrotel:\n{}", rotel.log());
    agent.stop();
}

#[test]
fn otlp_metrics_through_rotel_over_grpc() {
    otlp_metrics_through_rotel(Protocol::Grpc);
}

#[test]
fn otlp_metrics_through_rotel_over_http() {
    otlp_metrics_through_rotel(Protocol::HttpProtobuf);
}

/// A process (Python, named `name` by `prctl(PR_SET_NAME)`) in the test namespace that makes one
/// keep-alive connection (idle 1 s, interval 1 s) to `addr` and holds it until its stdin closes.
fn keepalive_process(env: &Env, name: &str, addr: SocketAddr) -> std::process::Child {
    const SCRIPT: &str = "import ctypes, socket, sys\n\
        ctypes.CDLL(None).prctl(15, sys.argv[1].encode(), 0, 0, 0)\n\
        s = socket.socket()\n\
        s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)\n\
        for opt in (socket.TCP_KEEPIDLE, socket.TCP_KEEPINTVL): s.setsockopt(socket.IPPROTO_TCP, opt, 1)\n\
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)\n\
        s.connect((sys.argv[2], int(sys.argv[3])))\n\
        print('connected', flush=True)\n\
        sys.stdin.read()\n";
    let mut child = Command::new("nsenter")
        .arg(format!("--net={}", env.ns.path().display()))
        .arg(venv().join("bin/python"))
        .args(["-c", SCRIPT, name, &addr.ip().to_string(), &addr.port().to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = [0u8; 10];
    child.stdout.as_mut().unwrap().read_exact(&mut line).unwrap();
    assert_eq!(&line, b"connected\n", "{name}");
    child
}

/// Ten processes, each named differently, connect and probe against a cap of 4 series per metric:
/// every keep-alive metric holds at most 3 regular series plus the overflow series
/// `otel_metric_overflow="true"`, which counts the rest, so the totals stay exact and the series
/// (the metrics' memory) stay bounded.
#[test]
fn cardinality_cap_gives_the_overflow_series() {
    venv();
    let env = Env::new();
    let addr = listen_addr();
    let agent = Agent::start_run(&env, &["--metrics-listen", &addr.to_string(), "--metrics-max-series", "4"], &[]);
    let server = Server::start(&env.ns, Family::V4, ServerMode::Echo).unwrap();
    let children: Vec<_> = (0..10).map(|i| keepalive_process(&env, &format!("ka-proc-{i}"), server.addr())).collect();
    // Every connection probes at least twice.
    let overflow = r#"keepalive_probes_total{otel_metric_overflow="true"}"#;
    let total = |body: &str| -> f64 {
        body.lines().filter(|l| l.starts_with("keepalive_probes_total")).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
    };
    let r = wait_http(addr, "/metrics", WAIT, |r| r.body.contains(overflow) && total(&r.body) >= 20.0).unwrap_or_else(|e| panic!("{e:#}"));
    for family in ["keepalive_probes_total", "keepalive_answers_total", "keepalive_episodes_total"] {
        let series: Vec<&str> = r.body.lines().filter(|l| l.starts_with(family)).collect();
        // Ten processes fill the three regular series; the rest is in the overflow series.
        let named = series.iter().filter(|l| l.contains("process_executable_name=\"ka-proc-")).count();
        let overflowed = series.iter().filter(|l| l.contains("otel_metric_overflow=\"true\"")).count();
        assert_eq!((series.len(), named, overflowed), (4, 3, 1), "{family}: {series:#?}");
    }
    assert!(r.body.lines().any(|l| l.starts_with(overflow)), "{}", r.body);
    for mut child in children {
        drop(child.stdin.take());
        child.wait().unwrap();
    }
    agent.stop();
}

/// `run --max-connections 2` while five keep-alive connections probe: the three refused count in
/// `keepalive_agent_bound_hits_total{keepalive_bound="max_connections"}` once each, however many
/// of their timer runs come (they probe every second), every other bound is a
/// series at 0 (so an alert on any increase works from the first scrape), the agent warns, and its
/// stop line states the refusals.
#[test]
fn bound_hits_count_refused_connections() {
    let env = Env::new();
    let addr = listen_addr();
    let agent = Agent::start_run(&env, &["--metrics-listen", &addr.to_string(), "--max-connections", "2"], &[]);
    let server = Server::start(&env.ns, Family::V4, ServerMode::Echo).unwrap();
    let clients: Vec<Client> =
        (0..5).map(|_| Client::connect(&env.ns, server.addr(), &Keepalive::new(1, 1, 3)).unwrap()).collect();
    let value = |body: &str, bound: &str| -> Option<f64> {
        let key = format!("keepalive_agent_bound_hits_total{{keepalive_bound=\"{bound}\"");
        let line = body.lines().find(|l| l.starts_with(&key))?;
        line.rsplit(' ').next()?.parse().ok()
    };
    wait_http(addr, "/metrics", WAIT, |r| value(&r.body, "max_connections").is_some_and(|v| v >= 3.0))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", agent.stderr_lines().join("\n")));
    // Their probes go on; they are not counted again.
    std::thread::sleep(Duration::from_secs(3));
    let r = http_get(addr, "/metrics", None).unwrap();
    assert_eq!(value(&r.body, "max_connections"), Some(3.0), "{}", r.body);
    for bound in ["engine_hold", "owner_hold", "owner_lookups", "kernel_owner_table", "max_sockets"] {
        assert_eq!(value(&r.body, bound), Some(0.0), "{bound}:\n{}", r.body);
    }
    let (ok, out) = promtool_check(&r.body).unwrap();
    assert!(ok && out.trim().is_empty(), "promtool check metrics: {out}");
    drop(clients);
    let (_, stderr) = agent.stop_full();
    assert!(stderr.iter().any(|l| l.contains("WARN") && l.contains("--max-connections")), "no warning:\n{}", stderr.join("\n"));
    let stop = stderr.iter().find(|l| l.contains("stopped:")).unwrap_or_else(|| panic!("{}", stderr.join("\n")));
    let refused: u64 = stop.split(" refused by the cap").next().and_then(|h| h.rsplit(' ').next()?.parse().ok()).unwrap_or(0);
    assert_eq!(refused, 3, "{stop}");
}

/// `/readyz` answers 503 while the agent has not attached its programs (held back by the test
/// hook `KEEPALIVE_DEBUG_ATTACH_GATE`) and 200 once it printed `ready`.
#[test]
fn readyz_before_and_after_attach() {
    let env = Env::new();
    let addr = listen_addr();
    let gate = std::env::temp_dir().join(format!("keepalive-tests-gate-{}", std::process::id()));
    let _ = std::fs::remove_file(&gate);
    let gate_s = gate.to_str().unwrap().to_string();
    let flags = ["--metrics-listen".to_string(), addr.to_string()];
    let agent = std::thread::scope(|s| {
        let starting = s.spawn(|| Agent::start_run(&env, &strs(&flags), &[("KEEPALIVE_DEBUG_ATTACH_GATE", &gate_s)]));
        let before = wait_http(addr, "/readyz", Duration::from_secs(30), |_| true).unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(before.status, 503, "{before:?}");
        // Alive meanwhile, even past the heartbeat's 5 s: attaching is not a stall.
        std::thread::sleep(Duration::from_secs(6));
        let alive = http_get(addr, "/healthz", None).unwrap();
        assert_eq!(alive.status, 200, "{alive:?}");
        assert_eq!(http_get(addr, "/readyz", None).unwrap().status, 503);
        assert!(!starting.is_finished(), "the agent printed ready before the gate opened");
        std::fs::write(&gate, b"").unwrap();
        starting.join().unwrap()
    });
    let _ = std::fs::remove_file(&gate);
    let after = http_get(addr, "/readyz", None).unwrap();
    assert_eq!(after.status, 200, "{after:?}");
    let health = http_get(addr, "/healthz", None).unwrap();
    assert_eq!(health.status, 200, "{health:?}");
    agent.stop();
}

/// A pipe of one page whose read end the test holds: the agent's stdout.
fn small_pipe() -> (std::fs::File, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: a valid array of two fds.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: fds are ours and open.
    let (r, w) = unsafe { (std::fs::File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: F_SETPIPE_SZ on our pipe.
    unsafe { libc::fcntl(fds[1], libc::F_SETPIPE_SZ, 4096) };
    (r, w)
}

/// `/healthz` fails when the event loop stops draining the ring buffer, and recovers when it
/// drains again: the loop writes its spans (`--spans all`, JSON lines) to a stdout pipe that the
/// test stops reading, so the loop blocks on it while the HTTP server keeps answering.
#[test]
fn healthz_fails_when_the_event_loop_stalls() {
    let env = Env::new();
    let addr = listen_addr();
    let (mut stdout, writer) = small_pipe();
    let mut cmd = Command::new(agent_binary());
    cmd.env_remove("RUST_LOG")
        .args(["run", "--netns"])
        .arg(env.ns.path())
        .arg("--cgroup")
        .arg(env.cgroup.path())
        .args(["--spans", "all", "--metrics-listen", &addr.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::from(writer))
        .stderr(Stdio::null());
    for (k, _) in std::env::vars_os() {
        if k.to_str().is_some_and(|k| k.starts_with("OTEL_")) {
            cmd.env_remove(k);
        }
    }
    let mut child = cmd.spawn().unwrap();
    drop(cmd);
    let ready = wait_http(addr, "/readyz", Duration::from_secs(60), |r| r.status == 200);
    ready.unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(http_get(addr, "/healthz", None).unwrap().status, 200);

    // Thirty keep-alive connections opened and closed: thirty connection spans, far more than a
    // page of stdout.
    let server = Server::start(&env.ns, Family::V4, ServerMode::Echo).unwrap();
    let clients = Client::connect_many(&env.ns, server.addr(), &Keepalive::new(60, 1, 3), 30).unwrap();
    drop(clients);
    let stalled = wait_http(addr, "/healthz", Duration::from_secs(20), |r| r.status == 503);
    let stalled = stalled.unwrap_or_else(|e| panic!("{e:#}"));
    assert!(stalled.body.contains("stalled"), "{stalled:?}");

    // Reading stdout again unblocks the loop.
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        let _ = stdout.read_to_end(&mut all);
        all
    });
    let t = Instant::now();
    let back = wait_http(addr, "/healthz", Duration::from_secs(20), |r| r.status == 200);
    back.unwrap_or_else(|e| panic!("{e:#}"));
    assert!(t.elapsed() < Duration::from_secs(20));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let status = child.wait().unwrap();
    let out = String::from_utf8_lossy(&reader.join().unwrap()).into_owned();
    assert!(status.success(), "{status}");
    assert!(out.lines().filter(|l| l.contains("\"tcp.connection\"")).count() >= 30, "{out}");
}

/// The span volume policy on real connections: by default a healthy connection exports no span
/// and a dead peer its whole trace; with `--spans all` both export everything.
#[test]
fn span_policy_withholds_healthy_connections() {
    for policy in ["problems", "all"] {
        let env = Env::new();
        let agent = Agent::start_run(&env, &["--spans", policy], &[]);
        let (hl, hr) = healthy(&env, Duration::from_millis(3500));
        let (dl, dr) = dead_peer(&env);
        std::thread::sleep(Duration::from_millis(500));
        let (lines, stderr) = agent.stop_full();
        let all: Vec<Span> = lines.iter().map(|v| Span::from_json_line(v).unwrap_or_else(|e| panic!("{e:#}: {v}"))).collect();
        let healthy_spans = of_conn(&all, hl, hr);
        let dead_spans = of_conn(&all, dl, dr);
        let ctx = format!("--spans {policy}\nhealthy:\n{}\ndead peer:\n{}", render(&healthy_spans), render(&dead_spans));
        let count = |spans: &[Span], name: &str| spans.iter().filter(|s| s.name == name).count();
        assert_eq!(count(&dead_spans, "tcp.connection"), 1, "{ctx}");
        assert!(
            dead_spans.iter().any(|s| s.name == "tcp.keepalive.episode" && s.attr_str("tcp.keepalive.episode.outcome") == Some("timeout")),
            "{ctx}"
        );
        let withheld = stderr
            .iter()
            .rev()
            .find_map(|l| l.split_once(" withheld by the span policy").and_then(|(a, _)| a.rsplit(' ').next()?.parse::<u64>().ok()))
            .unwrap_or_else(|| panic!("no withheld count in the final line:\n{}", stderr.join("\n")));
        let report = export_report(&stderr).unwrap();
        if policy == "problems" {
            assert!(healthy_spans.is_empty(), "{ctx}");
            assert!(withheld >= 3, "the healthy connection's span and episodes are withheld ({withheld})\n{ctx}");
        } else {
            assert_eq!(count(&healthy_spans, "tcp.connection"), 1, "{ctx}");
            assert!(count(&healthy_spans, "tcp.keepalive.episode") >= 2, "{ctx}");
            assert_eq!(withheld, 0, "{ctx}");
        }
        assert_eq!(report["created"], report["exported"], "{report:?}");
    }
}

/// An address that cannot be bound, an unknown exporter and malformed variables stop the agent at
/// start-up with an error naming the flag or variable.
#[test]
fn bad_metrics_settings_stop_the_agent() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap().to_string();
    let endpoint = ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "http://127.0.0.1:4318");
    // (flags, variables, the flag or variable the error must name)
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (vec!["--metrics-listen", &taken_addr], vec![], "--metrics-listen"),
        (vec!["--metrics-listen", "localhost"], vec![], "--metrics-listen"),
        (vec!["--metrics-exporter", "statsd"], vec![], "--metrics-exporter"),
        (vec![], vec![("OTEL_METRICS_EXPORTER", "statsd")], "OTEL_METRICS_EXPORTER"),
        (vec![], vec![endpoint, ("OTEL_METRIC_EXPORT_INTERVAL", "soon")], "OTEL_METRIC_EXPORT_INTERVAL"),
        (vec![], vec![endpoint, ("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE", "often")], "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE"),
        (vec!["--metrics-max-series", "1"], vec![], "--metrics-max-series"),
        (vec!["--spans", "some"], vec![], "--spans"),
    ];
    for (args, envs, name) in cases {
        let mut cmd = Command::new(agent_binary());
        for (k, _) in std::env::vars_os() {
            if k.to_str().is_some_and(|k| k.starts_with("OTEL_")) {
                cmd.env_remove(k);
            }
        }
        let started = Instant::now();
        let out = cmd.args(["run", "--duration", "5"]).args(&args).envs(envs.iter().copied()).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} {envs:?}: the agent ran\n{stderr}");
        assert!(stderr.contains(name), "{args:?} {envs:?}: the error does not name {name}:\n{stderr}");
        assert!(!stderr.lines().any(|l| l.starts_with("ready")), "{args:?} {envs:?}: stopped only after attaching:\n{stderr}");
        assert!(started.elapsed() < Duration::from_secs(5), "{args:?}: took {:?}", started.elapsed());
    }
    drop(taken);
}
