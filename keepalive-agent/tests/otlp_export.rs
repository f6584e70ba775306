//! The OTLP exporter against receivers not built on the Rust opentelemetry crates: the Python
//! receiver in tests/otlp/receiver.py (grpcio + opentelemetry-proto, stdlib HTTP server) and PyPI's
//! `rotel` collector. Both come from the venv made by scripts/setup-otel.sh
//! (`$KEEPALIVE_OTEL_VENV`, default /opt/keepalive/otel-venv).
//!
//! Synthetic timeline records, ordered as the engine orders them (healthy connection, dead peer,
//! connection still open at shutdown and ended by the engine's shutdown records) go through
//! `Exporter`; the tests assert what the receiver got: span tree, names, attributes,
//! status, exact timestamps, headers; that episodes arrive before their connection closes; how
//! errors are retried; and that a collector down for a while costs bounded memory, counted drops,
//! and that delivery resumes once it is back. Loopback addresses only; every process started here
//! is stopped by a guard.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use keepalive_agent::clock::WallClock;
use keepalive_agent::event::{Process, SockOpt, SockSettings, TcpState};
use keepalive_agent::export::config::HostFacts;
use keepalive_agent::export::{ExportArgs, ExportConfig, Exporter, Protocol};
use keepalive_agent::timeline::{
    AckPrecision, ConnView, Episode, EpisodeOutcome, Record, RecordKind, SettingsSource,
    TimeoutReason, UntrackReason,
};

const OFFSET: i128 = 1_790_000_000_000_000_000; // wall = monotonic + OFFSET (a fixed clock)
const S: u64 = 1_000_000_000;

/// Base of the synthetic timelines: a minute ago on the monotonic clock, so that records lie in the
/// past when the exporter stops (as they do for real).
fn t0() -> u64 {
    static T: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *T.get_or_init(|| {
        keepalive_agent::clock::monotonic_now_ns()
            .checked_sub(60 * S)
            .expect("uptime over a minute")
    })
}

mod otlp;
use otlp::{free_port, scratch_dir, venv, Proc, Receiver};

/// Exporter configuration from flags only (the process environment is ignored so that a developer's
/// `OTEL_*` variables cannot change what the tests check).
fn config(endpoint: &str, protocol: Protocol, extra: impl FnOnce(&mut ExportArgs)) -> ExportConfig {
    let mut args = ExportArgs {
        otlp_endpoint: Some(endpoint.into()),
        otlp_protocol: Some(protocol),
        otlp_headers: vec!["x-keepalive-test=abc".into()],
        service_name: Some("keepalive-test".into()),
        resource_attributes: vec!["deployment.environment.name=ci".into()],
        otlp_batch_delay_ms: Some(50),
        otlp_timeout_ms: Some(3000),
        // Every span: these tests are about delivery.
        spans: Some(keepalive_agent::export::spans::SpanPolicy::All),
        ..Default::default()
    };
    extra(&mut args);
    let host = HostFacts {
        host_name: Some("test-host".into()),
        host_id: None,
    };
    ExportConfig::resolve(&args, &|_| None, &host).unwrap()
}

fn clock() -> WallClock {
    WallClock::with_offset_ns(OFFSET)
}

fn wall_ns(mono: u64) -> u64 {
    (mono as i128 + OFFSET) as u64
}

fn view(id: u64) -> ConnView {
    let mut comm = [0u8; 16];
    comm[..6].copy_from_slice(b"client");
    ConnView {
        id,
        sk: 0xffff_0000_0000_0000 + id,
        netns: 4026531840,
        local: format!("127.0.0.1:{}", 20000 + id % 40000).parse().unwrap(),
        remote: "127.0.0.1:8080".parse().unwrap(),
        process: Some(Process {
            pid: 1000 + id as u32,
            tid: 1000 + id as u32,
            comm,
            cgroup_id: 5,
        }),
        first_seen_ns: t0(),
    }
}

fn settings(idle: u32, intvl: u32, cnt: u32) -> SockSettings {
    SockSettings {
        keepalive: true,
        idle_s: Some(idle),
        intvl_s: Some(intvl),
        cnt: Some(cnt),
        user_timeout_ms: 0,
        idle_default_s: 7200,
        intvl_default_s: 75,
        cnt_default: 9,
    }
}

fn r(id: u64, ts: u64, kind: RecordKind) -> Record {
    Record {
        ts_ns: ts,
        conn: view(id),
        kind,
    }
}

fn opened(id: u64, idle: u32, intvl: u32, cnt: u32) -> Vec<Record> {
    vec![
        r(
            id,
            t0(),
            RecordKind::Opened {
                state: TcpState::Established,
                established: true,
            },
        ),
        r(
            id,
            t0() + 1_000_000,
            RecordKind::Config {
                settings: settings(idle, intvl, cnt),
                source: SettingsSource::Setsockopt(SockOpt::KeepAlive),
                process: view(id).process,
            },
        ),
    ]
}

/// Healthy connection 1: one answered episode (idle 5 s, interval 2 s)...
fn healthy_first_episode() -> Vec<Record> {
    let mut v = opened(1, 5, 2, 3);
    v.push(r(1, t0() + 5 * S, RecordKind::Probe { n: 1 }));
    v.push(r(
        1,
        t0() + 5 * S + 300_000,
        RecordKind::Ack {
            probes: 1,
            precision: AckPrecision::Segment,
        },
    ));
    v.push(r(
        1,
        t0() + 5 * S + 300_000,
        RecordKind::EpisodeEnd(Episode {
            number: 1,
            start_ns: t0() + 5 * S,
            end_ns: t0() + 5 * S + 300_000,
            probes: 1,
            outcome: EpisodeOutcome::Answered(AckPrecision::Segment),
            probe_ts_ns: [t0() + 5 * S].as_slice().into(),
            first_timed_probe: 1,
        }),
    ));
    v
}

/// ...then a suppressed firing and a normal close.
fn healthy_rest() -> Vec<Record> {
    vec![
        r(
            1,
            t0() + 10 * S,
            RecordKind::Suppressed {
                packets_out: 1,
                unsent: 0,
            },
        ),
        r(
            1,
            t0() + 12 * S,
            RecordKind::Close {
                state: TcpState::FinWait1, closed_by: None, idle: None,
            },
        ),
    ]
}

/// Connection 2, dead peer: idle 1 s, 3 probes 1 s apart, keep-alive timeout.
fn dead_peer() -> Vec<Record> {
    let probes: Vec<u64> = (0..3).map(|k| t0() + (1 + k) * S).collect();
    let end = t0() + 4 * S;
    let mut v = opened(2, 1, 1, 3);
    for (k, ts) in probes.iter().enumerate() {
        v.push(r(2, *ts, RecordKind::Probe { n: k as u32 + 1 }));
    }
    // As the engine orders a dead peer: timeout, episode end, then the reset, error and close the
    // timer run caused.
    v.push(r(
        2,
        end,
        RecordKind::Timeout {
            reason: TimeoutReason::Keepalive,
            probes: 3, idle: None,
        },
    ));
    v.push(r(
        2,
        end,
        RecordKind::EpisodeEnd(Episode {
            number: 1,
            start_ns: probes[0],
            end_ns: end,
            probes: 3,
            outcome: EpisodeOutcome::TimedOut(TimeoutReason::Keepalive),
            probe_ts_ns: probes.as_slice().into(),
            first_timed_probe: 1,
        }),
    ));
    v.push(r(
        2,
        end,
        RecordKind::Reset {
            reason: "tcp_keepalive_timeout".into(),
            active: true,
            death: false,
        },
    ));
    v.push(r(
        2,
        end,
        RecordKind::Error {
            errno: libc::ETIMEDOUT,
            death: false,
        },
    ));
    v.push(r(
        2,
        end + 50_000,
        RecordKind::Close {
            state: TcpState::Established, closed_by: None, idle: None,
        },
    ));
    v
}

/// Connection 3: probing when the agent stops.
fn still_probing() -> Vec<Record> {
    let mut v = opened(3, 2, 1, 5);
    v.push(r(3, t0() + 2 * S, RecordKind::Probe { n: 1 }));
    v.push(r(3, t0() + 3 * S, RecordKind::Probe { n: 2 }));
    v
}

/// When the agent stops (monotonic).
fn stop_ns() -> u64 {
    t0() + 50 * S
}

/// What `Engine::shutdown` emits for connection 3 at the stop: its episode ends `incomplete`, then
/// the connection is untracked (reason `shutdown`).
fn still_probing_at_shutdown() -> Vec<Record> {
    let probes = vec![t0() + 2 * S, t0() + 3 * S];
    vec![
        r(
            3,
            stop_ns(),
            RecordKind::EpisodeEnd(Episode {
                number: 1,
                start_ns: probes[0],
                end_ns: stop_ns(),
                probes: 2,
                outcome: EpisodeOutcome::Incomplete,
                probe_ts_ns: probes.as_slice().into(),
                first_timed_probe: 1,
            }),
        ),
        r(
            3,
            stop_ns(),
            RecordKind::Untracked {
                reason: UntrackReason::Shutdown,
                state: TcpState::Established,
            },
        ),
    ]
}

fn attrs(span: &Value) -> &serde_json::Map<String, Value> {
    span["attributes"].as_object().unwrap()
}

fn find<'a>(spans: &'a [Value], name: &str, conn: u64) -> Vec<&'a Value> {
    spans
        .iter()
        .filter(|s| s["name"] == name && s["attributes"]["tcp.keepalive.connection.id"] == conn)
        .collect()
}

fn event_names(span: &Value) -> Vec<String> {
    span["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect()
}

async fn deliver_span_tree(protocol: Protocol) -> Result<()> {
    let rx = Receiver::start(0, 0, &[])?;
    let mut ex = Exporter::from_config(config(&rx.endpoint(protocol), protocol, |_| {}))?;
    let clock = clock();

    // The episode of a connection that is still open arrives on its own.
    ex.on_records(&healthy_first_episode(), &clock);
    let early = rx.wait_spans(1, Duration::from_secs(20)).await?;
    assert_eq!(early.len(), 1);
    assert_eq!(early[0]["name"], "tcp.keepalive.episode");

    ex.on_records(&still_probing(), &clock);
    ex.on_records(&dead_peer(), &clock);
    ex.on_records(&healthy_rest(), &clock);
    ex.on_records(&still_probing_at_shutdown(), &clock);
    let report = ex.shutdown(&[], &clock, Duration::from_secs(10)).await;
    assert!(report.flushed, "{report}");
    assert_eq!(report.open_connections_ended, 1);
    assert_eq!(report.open_episodes_ended, 1);
    assert_eq!(report.stats.spans_created, 6);
    assert_eq!(report.stats.spans_exported, 6);
    assert_eq!(
        report.stats.spans_dropped + report.stats.spans_failed + report.unsent,
        0
    );

    let spans = rx.wait_spans(6, Duration::from_secs(10)).await?;
    assert_eq!(spans.len(), 6, "{spans:#?}");
    let proto = if protocol == Protocol::Grpc {
        "grpc"
    } else {
        "http"
    };
    for s in &spans {
        assert_eq!(s["protocol"], proto);
        assert_eq!(s["kind"], "SPAN_KIND_INTERNAL");
        assert_eq!(s["resource"]["service.name"], "keepalive-test");
        assert_eq!(s["resource"]["host.name"], "test-host");
        assert_eq!(s["resource"]["os.type"], "linux");
        assert_eq!(s["resource"]["deployment.environment.name"], "ci");
        assert_eq!(s["scope"]["name"], "keepalive-agent");
        assert_eq!(s["trace_id"].as_str().unwrap().len(), 32);
        let a = attrs(s);
        assert_eq!(a["network.transport"], "tcp");
        assert_eq!(a["network.type"], "ipv4");
        assert_eq!(a["network.peer.address"], "127.0.0.1");
        assert_eq!(a["network.peer.port"], 8080);
        assert_eq!(a["network.local.address"], "127.0.0.1");
        assert_eq!(a["process.executable.name"], "client");
    }
    for req in rx.lines("request") {
        assert_eq!(req["headers"]["x-keepalive-test"], "abc", "{req}");
    }

    // The tree: one trace per connection, episodes are children of their connection span.
    let mut traces = HashMap::new();
    for conn in 1..=3u64 {
        let c = find(&spans, "tcp.connection", conn);
        assert_eq!(c.len(), 1, "connection {conn}");
        let c = c[0];
        assert_eq!(c["parent_span_id"], "");
        assert_eq!(attrs(c)["process.pid"], 1000 + conn);
        for e in find(&spans, "tcp.keepalive.episode", conn) {
            assert_eq!(e["trace_id"], c["trace_id"]);
            assert_eq!(e["parent_span_id"], c["span_id"]);
        }
        assert!(traces
            .insert(c["trace_id"].as_str().unwrap().to_string(), conn)
            .is_none());
        assert_eq!(c["start_time_unix_nano"], wall_ns(t0()));
    }

    // Healthy.
    let c1 = find(&spans, "tcp.connection", 1)[0];
    assert_eq!(c1["status"]["code"], "STATUS_CODE_UNSET");
    assert_eq!(c1["end_time_unix_nano"], wall_ns(t0() + 12 * S));
    assert_eq!(attrs(c1)["tcp.keepalive.outcome"], "closed");
    assert_eq!(attrs(c1)["tcp.keepalive.episodes"], 1);
    assert_eq!(attrs(c1)["tcp.keepalive.idle_s"], 5);
    assert_eq!(attrs(c1)["tcp.keepalive.intvl_s"], 2);
    assert_eq!(attrs(c1)["tcp.keepalive.cnt"], 3);
    assert_eq!(
        event_names(c1),
        ["tcp.keepalive.config", "tcp.keepalive.suppressed"]
    );
    assert_eq!(c1["events"][1]["time_unix_nano"], wall_ns(t0() + 10 * S));
    let e1 = find(&spans, "tcp.keepalive.episode", 1);
    assert_eq!(e1.len(), 1);
    assert_eq!(e1[0]["status"]["code"], "STATUS_CODE_UNSET");
    assert_eq!(attrs(e1[0])["tcp.keepalive.episode.outcome"], "answered");
    assert_eq!(attrs(e1[0])["tcp.keepalive.ack.precision"], "segment");
    assert_eq!(e1[0]["start_time_unix_nano"], wall_ns(t0() + 5 * S));
    assert_eq!(e1[0]["end_time_unix_nano"], wall_ns(t0() + 5 * S + 300_000));
    assert_eq!(
        event_names(e1[0]),
        ["tcp.keepalive.probe", "tcp.keepalive.ack"]
    );

    // Dead peer.
    let c2 = find(&spans, "tcp.connection", 2)[0];
    assert_eq!(c2["status"]["code"], "STATUS_CODE_ERROR");
    assert_eq!(
        c2["status"]["message"],
        "keep-alive timeout: 3 probes unanswered"
    );
    assert_eq!(attrs(c2)["error.type"], "keepalive_timeout");
    assert_eq!(
        attrs(c2)["tcp.keepalive.reset.reason"],
        "tcp_keepalive_timeout"
    );
    assert_eq!(attrs(c2)["tcp.keepalive.errno"], "ETIMEDOUT");
    let e2 = find(&spans, "tcp.keepalive.episode", 2);
    assert_eq!(e2.len(), 1);
    let e2 = e2[0];
    assert_eq!(e2["status"]["code"], "STATUS_CODE_ERROR");
    assert_eq!(attrs(e2)["tcp.keepalive.episode.probes"], 3);
    assert_eq!(
        event_names(e2),
        [
            "tcp.keepalive.probe",
            "tcp.keepalive.probe",
            "tcp.keepalive.probe",
            "tcp.keepalive.timeout",
        ]
    );
    // Probe spacing is the configured interval (1 s), to the nanosecond: kernel times, not ours.
    let probe_t: Vec<u64> = e2["events"].as_array().unwrap()[..3]
        .iter()
        .map(|e| e["time_unix_nano"].as_u64().unwrap())
        .collect();
    assert_eq!(
        probe_t,
        [
            wall_ns(t0() + S),
            wall_ns(t0() + 2 * S),
            wall_ns(t0() + 3 * S)
        ]
    );
    assert_eq!(e2["events"][1]["attributes"]["tcp.keepalive.probe.n"], 2);

    // Still open at shutdown.
    let c3 = find(&spans, "tcp.connection", 3)[0];
    assert_eq!(attrs(c3)["tcp.keepalive.incomplete"], true);
    assert_eq!(attrs(c3)["tcp.keepalive.outcome"], "open");
    assert_eq!(attrs(c3)["tcp.keepalive.untracked.reason"], "shutdown");
    assert_eq!(attrs(c3)["tcp.keepalive.episodes"], 1);
    assert_eq!(c3["end_time_unix_nano"], wall_ns(stop_ns()));
    let e3 = find(&spans, "tcp.keepalive.episode", 3);
    assert_eq!(e3.len(), 1);
    let e3 = e3[0];
    assert_eq!(attrs(e3)["tcp.keepalive.episode.outcome"], "incomplete");
    assert_eq!(attrs(e3)["tcp.keepalive.incomplete"], true);
    assert_eq!(attrs(e3)["tcp.keepalive.episode.probes"], 2);
    assert_eq!(e3["status"]["code"], "STATUS_CODE_UNSET");
    assert_eq!(
        event_names(e3),
        ["tcp.keepalive.probe", "tcp.keepalive.probe"]
    );
    assert_eq!(e3["start_time_unix_nano"], wall_ns(t0() + 2 * S));
    assert_eq!(e3["end_time_unix_nano"], wall_ns(stop_ns()));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_delivers_the_span_tree() -> Result<()> {
    deliver_span_tree(Protocol::Grpc).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_protobuf_delivers_the_span_tree() -> Result<()> {
    deliver_span_tree(Protocol::HttpProtobuf).await
}

/// Retryable refusals (gRPC UNAVAILABLE, HTTP 503) are retried and the spans delivered; permanent
/// ones (gRPC INVALID_ARGUMENT, HTTP 400) are not retried and the spans counted as failed. This
/// checks our reading of the real exporter's errors.
async fn refusals(protocol: Protocol, transient: bool) -> Result<()> {
    let fail: &[&str] = match (protocol, transient) {
        (Protocol::Grpc, true) => &["--fail-first", "2", "--fail-grpc-code", "UNAVAILABLE"],
        (Protocol::Grpc, false) => &["--fail-first", "1", "--fail-grpc-code", "INVALID_ARGUMENT"],
        (Protocol::HttpProtobuf, true) => &["--fail-first", "2", "--fail-http-status", "503"],
        (Protocol::HttpProtobuf, false) => &["--fail-first", "1", "--fail-http-status", "400"],
    };
    let rx = Receiver::start(0, 0, fail)?;
    let mut ex = Exporter::from_config(config(&rx.endpoint(protocol), protocol, |_| {}))?;
    ex.on_records(&dead_peer(), &clock());
    let report = ex.shutdown(&[], &clock(), Duration::from_secs(15)).await;
    let requests = rx.lines("request");
    let s = report.stats;
    assert_eq!(s.spans_created, 2);
    if transient {
        assert_eq!(
            (s.export_errors, s.retries, s.spans_exported, s.spans_failed),
            (2, 2, 2, 0),
            "{report}"
        );
        assert_eq!(requests.len(), 3);
        assert_eq!(rx.spans().len(), 2);
    } else {
        assert_eq!(
            (s.export_errors, s.retries, s.spans_exported, s.spans_failed),
            (1, 0, 0, 2),
            "{report}"
        );
        assert_eq!(requests.len(), 1);
        assert!(rx.spans().is_empty());
    }
    assert!(report.flushed);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_refusals() -> Result<()> {
    refusals(Protocol::Grpc, true).await?;
    refusals(Protocol::Grpc, false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_refusals() -> Result<()> {
    refusals(Protocol::HttpProtobuf, true).await?;
    refusals(Protocol::HttpProtobuf, false).await
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

/// Many short connections: one span each.
fn churn(from: u64, n: u64) -> Vec<Record> {
    let mut v = Vec::with_capacity(n as usize * 3);
    for id in from..from + n {
        v.extend(opened(id, 5, 2, 3));
        v.push(r(
            id,
            t0() + S,
            RecordKind::Close {
                state: TcpState::Established, closed_by: None, idle: None,
            },
        ));
    }
    v
}

/// The collector is down for a while: the exporter keeps going with a bounded queue, counts its
/// drops and failed attempts, then delivers once the collector is up.
async fn collector_down_then_up(protocol: Protocol) -> Result<()> {
    // One at a time: the memory check reads the whole process's RSS.
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _serial = SERIAL.lock().await;
    let (grpc, http) = (free_port(), free_port());
    let endpoint = match protocol {
        Protocol::Grpc => format!("http://127.0.0.1:{grpc}"),
        Protocol::HttpProtobuf => format!("http://127.0.0.1:{http}"),
    };
    let mut ex = Exporter::from_config(config(&endpoint, protocol, |a| {
        a.otlp_queue_size = Some(256);
        a.otlp_batch_size = Some(64);
        a.otlp_timeout_ms = Some(1000);
    }))?;
    let clock = clock();

    // ~3 s of traffic with nobody listening: 60k spans, far beyond the queue.
    let rss_before = rss_bytes();
    let mut slowest = Duration::ZERO;
    let mut next = 100;
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(3) || next < 60_100 {
        let batch = churn(next, 500);
        next += 500;
        let call = Instant::now();
        ex.on_records(&batch, &clock);
        slowest = slowest.max(call.elapsed());
        let s = ex.stats();
        assert!(s.queued <= 256, "queue grew to {}", s.queued);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let during = ex.stats();
    let rss_growth = rss_bytes().saturating_sub(rss_before);
    assert_eq!(during.spans_exported, 0);
    assert!(
        during.spans_dropped >= during.spans_created - 256 - 64,
        "{during}"
    );
    assert!(during.export_errors >= 2, "{during}");
    assert!(during.retries >= 1, "{during}");
    // The event path never waited on the network (500 records → 500 spans per call).
    assert!(
        slowest < Duration::from_millis(500),
        "on_records took {slowest:?}"
    );
    // Bounded memory: 60k spans held would be well over 100 MB.
    assert!(rss_growth < 48 << 20, "RSS grew by {} MB", rss_growth >> 20);

    // The collector comes up: what is queued gets through, then new spans flow again.
    let rx = Receiver::start(grpc, http, &[])?;
    let t = Instant::now();
    loop {
        let s = ex.stats();
        if s.queued == 0
            && s.spans_exported > 0
            && s.spans_exported + s.spans_dropped + s.spans_failed == s.spans_created
        {
            break;
        }
        if t.elapsed() > Duration::from_secs(45) {
            bail!("no recovery after 45 s: {s}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let recovered = ex.stats();
    ex.on_records(&churn(1_000_000, 10), &clock);
    let report = ex.shutdown(&[], &clock, Duration::from_secs(10)).await;
    let s = report.stats;
    assert!(report.flushed, "{report}");
    assert_eq!(s.spans_exported, recovered.spans_exported + 10, "{report}");
    assert_eq!(
        s.spans_exported + s.spans_dropped + s.spans_failed,
        s.spans_created,
        "{report}"
    );
    let got = rx
        .wait_spans(s.spans_exported as usize, Duration::from_secs(10))
        .await?;
    assert_eq!(got.len() as u64, s.spans_exported);
    // The last ten came after the recovery.
    let late = got
        .iter()
        .filter(|v| v["attributes"]["tcp.keepalive.connection.id"].as_u64() >= Some(1_000_000))
        .count();
    assert_eq!(late, 10);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_collector_down_then_up() -> Result<()> {
    collector_down_then_up(Protocol::Grpc).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_collector_down_then_up() -> Result<()> {
    collector_down_then_up(Protocol::HttpProtobuf).await
}

/// Through a real collector: exporter → rotel (OTLP/HTTP in) → OTLP/gRPC → receiver.py.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_rotel_collector() -> Result<()> {
    let rx = Receiver::start(0, 0, &[])?;
    let (rgrpc, rhttp) = (free_port(), free_port());
    let dir = scratch_dir("rotel");
    let child = Command::new(venv()?.join("bin/rotel-agent"))
        .arg("start")
        .args(["--otlp-grpc-endpoint", &format!("127.0.0.1:{rgrpc}")])
        .args(["--otlp-http-endpoint", &format!("127.0.0.1:{rhttp}")])
        .args(["--exporter", "otlp", "--otlp-exporter-protocol", "grpc"])
        .args([
            "--otlp-exporter-endpoint",
            &format!("http://127.0.0.1:{}", rx.grpc),
        ])
        .args([
            "--otlp-exporter-compression",
            "none",
            "--batch-timeout",
            "100ms",
        ])
        .args(["--pid-file", dir.join("rotel.pid").to_str().unwrap()])
        .args(["--log-file", dir.join("rotel.log").to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting rotel-agent")?;
    let _rotel = Proc { child, dir };
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", rhttp)).is_err()
        || std::net::TcpStream::connect(("127.0.0.1", rgrpc)).is_err()
    {
        if t.elapsed() > Duration::from_secs(20) {
            bail!("rotel-agent not listening after 20 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let endpoint = format!("http://127.0.0.1:{rhttp}");
    let mut ex = Exporter::from_config(config(&endpoint, Protocol::HttpProtobuf, |_| {}))?;
    ex.on_records(&dead_peer(), &clock());
    ex.on_records(&healthy_first_episode(), &clock());
    ex.on_records(&healthy_rest(), &clock());
    let report = ex.shutdown(&[], &clock(), Duration::from_secs(10)).await;
    assert!(report.flushed, "{report}");
    assert_eq!(report.stats.spans_exported, 4);

    let spans = rx.wait_spans(4, Duration::from_secs(20)).await?;
    assert_eq!(spans.len(), 4);
    let c2 = find(&spans, "tcp.connection", 2)[0];
    let e2 = find(&spans, "tcp.keepalive.episode", 2)[0];
    assert_eq!(e2["parent_span_id"], c2["span_id"]);
    assert_eq!(e2["trace_id"], c2["trace_id"]);
    assert_eq!(c2["status"]["code"], "STATUS_CODE_ERROR");
    assert_eq!(event_names(e2).len(), 4);
    assert_eq!(e2["events"][0]["time_unix_nano"], wall_ns(t0() + S));
    assert_eq!(c2["resource"]["service.name"], "keepalive-test");
    let c1 = find(&spans, "tcp.connection", 1)[0];
    assert_eq!(
        find(&spans, "tcp.keepalive.episode", 1)[0]["parent_span_id"],
        c1["span_id"]
    );
    assert_eq!(c1["end_time_unix_nano"], wall_ns(t0() + 12 * S));
    Ok(())
}
