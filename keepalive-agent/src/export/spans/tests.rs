//! Span building from record sequences (pure: no network, fixed clock).

use super::*;
use crate::event::{Event, EventBody, SockOpt, TimerFiring};
use crate::timeline::engine::{Engine, EngineConfig};
use crate::timeline::{AckPrecision, ProbeTimes};
use opentelemetry::trace::SpanId;

const OFFSET: i128 = 1_700_000_000_000_000_000; // wall = mono + OFFSET
const S: u64 = 1_000_000_000;
const MS: u64 = 1_000_000;
const T0: u64 = 5_000 * S;

fn clock() -> WallClock {
    WallClock::with_offset_ns(OFFSET)
}

fn wall(mono: u64) -> SystemTime {
    clock().to_system_time(mono)
}

fn process() -> Process {
    let mut comm = [0u8; 16];
    comm[..4].copy_from_slice(b"curl");
    Process {
        pid: 4242,
        tid: 4243,
        comm,
        cgroup_id: 77,
    }
}

fn view(id: u64) -> ConnView {
    ConnView {
        id,
        sk: 0xffff_8880_dead_beef,
        netns: 4026531840,
        local: "127.0.0.1:40000".parse().unwrap(),
        remote: "127.0.0.1:8080".parse().unwrap(),
        process: Some(process()),
        first_seen_ns: T0,
    }
}

fn settings(idle: u32, intvl: u32, cnt: u32) -> SockSettings {
    SockSettings {
        keepalive: true,
        idle_s: Some(idle),
        intvl_s: Some(intvl),
        cnt: None,
        user_timeout_ms: 0,
        idle_default_s: 7200,
        intvl_default_s: 75,
        cnt_default: cnt,
    }
}

fn rec(id: u64, ts: u64, kind: RecordKind) -> Record {
    Record {
        ts_ns: ts,
        conn: view(id),
        kind,
    }
}

fn attr<'a>(kvs: &'a [KeyValue], key: &str) -> Option<&'a Value> {
    kvs.iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| &kv.value)
}

fn s(span: &SpanData, key: &str) -> String {
    attr(&span.attributes, key)
        .unwrap_or_else(|| panic!("{} lacks {key}", span.name))
        .as_str()
        .into_owned()
}

fn i(span: &SpanData, key: &str) -> i64 {
    match attr(&span.attributes, key) {
        Some(Value::I64(v)) => *v,
        other => panic!("{} {key}: {other:?}", span.name),
    }
}

fn b(span: &SpanData, key: &str) -> bool {
    match attr(&span.attributes, key) {
        Some(Value::Bool(v)) => *v,
        other => panic!("{} {key}: {other:?}", span.name),
    }
}

fn event_names(span: &SpanData) -> Vec<&str> {
    span.events.iter().map(|e| e.name.as_ref()).collect()
}

/// Episode `number` of a connection, as the engine ends it: every probe timed (the first at the
/// episode's start), ended at `end_ns` with `outcome`.
fn episode(number: u32, probe_ts_ns: &[u64], end_ns: u64, outcome: EpisodeOutcome) -> Episode {
    Episode {
        number,
        start_ns: probe_ts_ns[0],
        end_ns,
        probes: probe_ts_ns.len() as u32,
        outcome,
        probe_ts_ns: probe_ts_ns.into(),
        first_timed_probe: 1,
    }
}

fn opened(id: u64, ts: u64) -> Record {
    rec(
        id,
        ts,
        RecordKind::Opened {
            state: TcpState::Established,
            established: true,
        },
    )
}

/// The connection span of connection `id` among `spans` (exactly one).
fn conn_span(spans: &[SpanData], id: u64) -> &SpanData {
    let found: Vec<&SpanData> = spans
        .iter()
        .filter(|s| s.name == SPAN_CONNECTION && i(s, CONNECTION_ID) == id as i64)
        .collect();
    assert_eq!(found.len(), 1, "connection spans of {id}: {found:#?}");
    found[0]
}

fn episode_spans(spans: &[SpanData], id: u64) -> Vec<&SpanData> {
    spans
        .iter()
        .filter(|s| s.name == SPAN_EPISODE && i(s, CONNECTION_ID) == id as i64)
        .collect()
}

fn healthy() -> Vec<Record> {
    let ep1 = episode(
        1,
        &[T0 + 10 * S],
        T0 + 10 * S + 200_000,
        EpisodeOutcome::Answered(AckPrecision::Segment),
    );
    let ep2 = episode(
        2,
        &[T0 + 20 * S, T0 + 22 * S],
        T0 + 24 * S,
        EpisodeOutcome::Answered(AckPrecision::NextFiring),
    );
    vec![
        rec(
            1,
            T0,
            RecordKind::Opened {
                state: TcpState::Established,
                established: true,
            },
        ),
        rec(
            1,
            T0 + MS,
            RecordKind::Config {
                settings: settings(10, 2, 9),
                source: SettingsSource::Setsockopt(SockOpt::KeepIdle),
                process: Some(process()),
            },
        ),
        rec(
            1,
            T0 + 5 * S,
            RecordKind::Idle {
                idle_ms: 5000,
                next_in_ms: Some(5000),
            },
        ),
        rec(1, T0 + 10 * S, RecordKind::Probe { n: 1 }),
        rec(
            1,
            T0 + 10 * S + 200_000,
            RecordKind::Ack {
                probes: 1,
                precision: AckPrecision::Segment,
            },
        ),
        rec(1, T0 + 10 * S + 200_000, RecordKind::EpisodeEnd(ep1)),
        rec(1, T0 + 20 * S, RecordKind::Probe { n: 1 }),
        rec(1, T0 + 22 * S, RecordKind::Probe { n: 2 }),
        rec(
            1,
            T0 + 24 * S,
            RecordKind::Ack {
                probes: 2,
                precision: AckPrecision::NextFiring,
            },
        ),
        rec(1, T0 + 24 * S, RecordKind::EpisodeEnd(ep2)),
        rec(
            1,
            T0 + 30 * S,
            RecordKind::Suppressed {
                packets_out: 2,
                unsent: 100,
            },
        ),
        rec(
            1,
            T0 + 40 * S,
            RecordKind::Close {
                state: TcpState::FinWait1, closed_by: None, idle: None,
            },
        ),
    ]
}

fn dead_peer() -> Vec<Record> {
    let probes = vec![T0 + 2 * S, T0 + 3 * S, T0 + 4 * S];
    let end = T0 + 5 * S;
    vec![
        rec(
            2,
            T0,
            RecordKind::Opened {
                state: TcpState::Established,
                established: true,
            },
        ),
        rec(
            2,
            T0 + MS,
            RecordKind::Config {
                settings: settings(2, 1, 3),
                source: SettingsSource::Setsockopt(SockOpt::KeepCnt),
                process: Some(process()),
            },
        ),
        rec(2, probes[0], RecordKind::Probe { n: 1 }),
        rec(2, probes[1], RecordKind::Probe { n: 2 }),
        rec(2, probes[2], RecordKind::Probe { n: 3 }),
        // As the engine orders a dead peer: timeout, episode end, then the reset, error and close
        // the timer run caused.
        rec(
            2,
            end,
            RecordKind::Timeout {
                reason: TimeoutReason::Keepalive,
                probes: 3, idle: None,
            },
        ),
        rec(
            2,
            end,
            RecordKind::EpisodeEnd(episode(
                1,
                &probes,
                end,
                EpisodeOutcome::TimedOut(TimeoutReason::Keepalive),
            )),
        ),
        rec(
            2,
            end,
            RecordKind::Reset {
                reason: "tcp_keepalive_timeout".into(),
                active: true,
                death: false,
            },
        ),
        rec(
            2,
            end,
            RecordKind::Error {
                errno: libc::ETIMEDOUT,
                death: false,
            },
        ),
        rec(
            2,
            end + 10_000,
            RecordKind::Close {
                state: TcpState::Established, closed_by: None, idle: None,
            },
        ),
    ]
}

fn run_one_by_one(model: &mut SpanModel, records: &[Record]) -> Vec<(usize, SpanData)> {
    let mut out = Vec::new();
    for (n, r) in records.iter().enumerate() {
        let mut batch = Vec::new();
        model.on_records(std::slice::from_ref(r), &clock(), &mut batch);
        out.extend(batch.into_iter().map(|s| (n, s)));
    }
    out
}

#[test]
fn healthy_connection() {
    let mut m = SpanModel::new(128);
    let records = healthy();
    let spans = run_one_by_one(&mut m, &records);
    assert_eq!(spans.len(), 3);
    // Episodes are produced as soon as they end, long before the connection closes.
    assert_eq!(spans[0].0, 5);
    assert_eq!(spans[1].0, 9);
    assert_eq!(spans[2].0, 11);
    let (ep1, ep2, conn) = (&spans[0].1, &spans[1].1, &spans[2].1);

    assert_eq!(conn.name, "tcp.connection");
    assert_eq!(conn.parent_span_id, SpanId::INVALID);
    assert_eq!(conn.span_kind, SpanKind::Internal);
    assert_eq!(conn.start_time, wall(T0));
    assert_eq!(conn.end_time, wall(T0 + 40 * S));
    assert_eq!(conn.status, Status::Unset);
    assert_eq!(s(conn, "network.transport"), "tcp");
    assert_eq!(s(conn, "network.type"), "ipv4");
    assert_eq!(s(conn, "network.local.address"), "127.0.0.1");
    assert_eq!(i(conn, "network.local.port"), 40000);
    assert_eq!(s(conn, "network.peer.address"), "127.0.0.1");
    assert_eq!(i(conn, "network.peer.port"), 8080);
    assert_eq!(i(conn, "process.pid"), 4242);
    assert_eq!(s(conn, "process.executable.name"), "curl");
    assert_eq!(i(conn, "tcp.keepalive.connection.id"), 1);
    assert_eq!(i(conn, "tcp.keepalive.idle_s"), 10);
    assert_eq!(i(conn, "tcp.keepalive.intvl_s"), 2);
    assert_eq!(i(conn, "tcp.keepalive.cnt"), 9);
    assert!(b(conn, "tcp.keepalive.enabled"));
    assert_eq!(s(conn, "tcp.keepalive.settings.source"), "setsockopt");
    assert_eq!(s(conn, "tcp.keepalive.settings.option"), "TCP_KEEPIDLE");
    assert_eq!(
        attr(&conn.attributes, "tcp.keepalive.settings.defaults"),
        Some(&Value::Array(Array::String(vec!["cnt".into()])))
    );
    assert_eq!(i(conn, "tcp.keepalive.episodes"), 2);
    assert_eq!(i(conn, "tcp.keepalive.probes"), 3);
    assert_eq!(i(conn, "tcp.keepalive.suppressed"), 1);
    assert_eq!(i(conn, "tcp.keepalive.idle_rearms"), 1);
    assert_eq!(s(conn, "tcp.keepalive.outcome"), "closed");
    assert_eq!(s(conn, "tcp.keepalive.close.state"), "FIN_WAIT1");
    assert_eq!(s(conn, "tcp.keepalive.open.state"), "ESTABLISHED");
    assert!(!b(conn, "tcp.keepalive.snapshot"));
    assert_eq!(s(conn, "tcp.keepalive.first_seen.source"), "setsockopt");
    assert!(attr(&conn.attributes, "tcp.keepalive.incomplete").is_none());
    assert!(attr(&conn.attributes, "error.type").is_none());
    // The kernel's socket address is never exported.
    assert!(conn
        .attributes
        .iter()
        .all(|kv| !kv.value.as_str().contains("dead")));
    assert_eq!(
        event_names(conn),
        ["tcp.keepalive.config", "tcp.keepalive.suppressed"]
    );
    assert_eq!(conn.events[0].timestamp, wall(T0 + MS));
    assert_eq!(conn.events[1].timestamp, wall(T0 + 30 * S));
    assert_eq!(
        attr(&conn.events[0].attributes, "process.pid"),
        Some(&Value::I64(4242))
    );

    for (n, ep) in [ep1, ep2].into_iter().enumerate() {
        assert_eq!(ep.name, "tcp.keepalive.episode");
        assert_eq!(ep.span_context.trace_id(), conn.span_context.trace_id());
        assert_eq!(ep.parent_span_id, conn.span_context.span_id());
        assert_ne!(ep.span_context.span_id(), conn.span_context.span_id());
        assert_eq!(ep.status, Status::Unset);
        assert_eq!(s(ep, "tcp.keepalive.episode.outcome"), "answered");
        assert_eq!(i(ep, "tcp.keepalive.episode.number"), n as i64 + 1);
        assert_eq!(s(ep, "network.peer.address"), "127.0.0.1");
        assert_eq!(i(ep, "tcp.keepalive.intvl_s"), 2);
    }
    assert_ne!(ep1.span_context.span_id(), ep2.span_context.span_id());
    assert_eq!(ep1.start_time, wall(T0 + 10 * S));
    assert_eq!(ep1.end_time, wall(T0 + 10 * S + 200_000));
    assert_eq!(s(ep1, "tcp.keepalive.ack.precision"), "segment");
    assert_eq!(
        event_names(ep1),
        ["tcp.keepalive.probe", "tcp.keepalive.ack"]
    );
    assert_eq!(i(ep2, "tcp.keepalive.episode.probes"), 2);
    assert_eq!(s(ep2, "tcp.keepalive.ack.precision"), "next_firing");
    assert_eq!(
        event_names(ep2),
        [
            "tcp.keepalive.probe",
            "tcp.keepalive.probe",
            "tcp.keepalive.ack"
        ]
    );
    let probe_times: Vec<SystemTime> = ep2.events.iter().take(2).map(|e| e.timestamp).collect();
    assert_eq!(probe_times, [wall(T0 + 20 * S), wall(T0 + 22 * S)]);
    assert_eq!(
        attr(&ep2.events[1].attributes, "tcp.keepalive.probe.n"),
        Some(&Value::I64(2))
    );
    assert_eq!(m.open_connections(), 0);
    assert_eq!(m.spans_built, 3);
}

#[test]
fn dead_peer_connection() {
    let mut m = SpanModel::new(128);
    let mut out = Vec::new();
    m.on_records(&dead_peer(), &clock(), &mut out);
    assert_eq!(out.len(), 2);
    let (ep, conn) = (&out[0], &out[1]);
    assert_eq!(ep.name, "tcp.keepalive.episode");
    assert_eq!(ep.parent_span_id, conn.span_context.span_id());
    assert_eq!(
        ep.status,
        Status::Error {
            description: "keep-alive timeout: 3 probes unanswered".into()
        }
    );
    assert_eq!(s(ep, "error.type"), "keepalive_timeout");
    assert_eq!(s(ep, "tcp.keepalive.episode.outcome"), "timeout");
    assert_eq!(s(ep, "tcp.keepalive.timeout.reason"), "keepalive");
    assert_eq!(i(ep, "tcp.keepalive.episode.probes"), 3);
    assert_eq!(
        event_names(ep),
        [
            "tcp.keepalive.probe",
            "tcp.keepalive.probe",
            "tcp.keepalive.probe",
            "tcp.keepalive.timeout",
        ]
    );
    // Probe spacing is the configured interval, exactly as the kernel timed it.
    let t: Vec<SystemTime> = ep.events.iter().take(3).map(|e| e.timestamp).collect();
    assert_eq!(
        t[1].duration_since(t[0]).unwrap(),
        std::time::Duration::from_secs(1)
    );
    assert_eq!(
        t[2].duration_since(t[1]).unwrap(),
        std::time::Duration::from_secs(1)
    );
    assert_eq!(ep.start_time, wall(T0 + 2 * S));
    assert_eq!(ep.end_time, wall(T0 + 5 * S));

    assert_eq!(conn.name, "tcp.connection");
    assert!(
        matches!(&conn.status, Status::Error { description } if description.contains("3 probes"))
    );
    assert_eq!(s(conn, "tcp.keepalive.outcome"), "timeout");
    assert_eq!(s(conn, "error.type"), "keepalive_timeout");
    assert_eq!(
        s(conn, "tcp.keepalive.reset.reason"),
        "tcp_keepalive_timeout"
    );
    assert_eq!(s(conn, "tcp.keepalive.errno"), "ETIMEDOUT");
    assert_eq!(
        event_names(conn),
        [
            "tcp.keepalive.config",
            "tcp.keepalive.timeout",
            "tcp.keepalive.reset",
            "tcp.keepalive.error"
        ]
    );
    assert_eq!(conn.end_time, wall(T0 + 5 * S + 10_000));
}

#[test]
fn peer_reset_and_plain_error_status() {
    let mut m = SpanModel::new(128);
    let mut out = Vec::new();
    m.on_records(
        &[
            rec(
                3,
                T0,
                RecordKind::Opened {
                    state: TcpState::Established,
                    established: true,
                },
            ),
            rec(3, T0 + S, RecordKind::PeerReset { idle: None }),
            rec(
                3,
                T0 + S,
                RecordKind::Close {
                    state: TcpState::Established, closed_by: None, idle: None,
                },
            ),
            rec(
                4,
                T0,
                RecordKind::Opened {
                    state: TcpState::SynSent,
                    established: false,
                },
            ),
            rec(
                4,
                T0 + S,
                RecordKind::Error {
                    errno: libc::ECONNREFUSED,
                    death: false,
                },
            ),
            rec(
                4,
                T0 + S,
                RecordKind::Close {
                    state: TcpState::SynSent, closed_by: None, idle: None,
                },
            ),
        ],
        &clock(),
        &mut out,
    );
    assert_eq!(out.len(), 2);
    assert_eq!(
        out[0].status,
        Status::Error {
            description: "connection reset by peer".into()
        }
    );
    assert_eq!(s(&out[0], "error.type"), "peer_reset");
    assert_eq!(s(&out[1], "tcp.keepalive.outcome"), "error");
    assert_eq!(s(&out[1], "error.type"), "ECONNREFUSED");
    assert_eq!(s(&out[1], "tcp.keepalive.open.state"), "SYN_SENT");
}

/// Every connection's last record (`close`, or `untracked` whatever the reason) ends its span and
/// frees it: the model holds nothing afterwards and has nothing left to finish. The engine ends the
/// episode in progress just before (`closed` for a close, else `incomplete`).
#[test]
fn last_record_frees_the_connection() {
    let untracked = [
        (UntrackReason::Destroyed, "destroyed"),
        (UntrackReason::Reused, "reused"),
        (UntrackReason::KeepaliveOff, "keepalive_off"),
        (UntrackReason::Gone, "gone"),
        (UntrackReason::Shutdown, "shutdown"),
    ];
    let close = (
        RecordKind::Close {
            state: TcpState::FinWait1, closed_by: None, idle: None,
        },
        None,
    );
    let lasts = std::iter::once(close).chain(untracked.map(|(reason, name)| {
        let kind = RecordKind::Untracked {
            reason,
            state: TcpState::Established,
        };
        (kind, Some((reason, name)))
    }));
    for (k, (last, untracked)) in lasts.enumerate() {
        let id = 20 + k as u64;
        let end = T0 + 3 * S;
        let outcome = match untracked {
            None => EpisodeOutcome::Closed,
            Some(_) => EpisodeOutcome::Incomplete,
        };
        let mut m = SpanModel::new(128);
        let mut out = Vec::new();
        let before_last = [
            opened(id, T0),
            rec(
                id,
                T0 + MS,
                RecordKind::Config {
                    settings: settings(1, 1, 5),
                    source: SettingsSource::Setsockopt(SockOpt::KeepAlive),
                    process: Some(process()),
                },
            ),
            rec(id, T0 + S, RecordKind::Probe { n: 1 }),
            rec(id, T0 + 2 * S, RecordKind::Probe { n: 2 }),
            rec(
                id,
                end,
                RecordKind::EpisodeEnd(episode(1, &[T0 + S, T0 + 2 * S], end, outcome)),
            ),
        ];
        m.on_records(&before_last, &clock(), &mut out);
        assert_eq!(m.open_connections(), 1, "{last:?}");
        assert_eq!(
            out.len(),
            1,
            "the episode comes before the connection's end"
        );
        m.on_records(&[rec(id, end, last.clone())], &clock(), &mut out);
        assert_eq!(m.open_connections(), 0, "{last:?}");
        assert_eq!(m.finish(&clock(), end + S, &mut out), 0, "{last:?}");
        assert_eq!(out.len(), 2, "{last:?}");
        assert_eq!(m.spans_built, 2);
        let (ep, conn) = (&out[0], &out[1]);
        assert_eq!(ep.parent_span_id, conn.span_context.span_id());
        assert_eq!(ep.span_context.trace_id(), conn.span_context.trace_id());
        assert_eq!(ep.end_time, wall(end));
        assert_eq!(ep.status, Status::Unset);
        assert_eq!(i(ep, "tcp.keepalive.episode.probes"), 2);
        assert_eq!(conn.start_time, wall(T0));
        assert_eq!(conn.end_time, wall(end));
        assert_eq!(conn.status, Status::Unset);
        assert_eq!(i(conn, "tcp.keepalive.episodes"), 1);
        assert_eq!(i(conn, "tcp.keepalive.probes"), 2);
        assert!(attr(&conn.attributes, "error.type").is_none());
        match untracked {
            None => {
                assert_eq!(s(ep, "tcp.keepalive.episode.outcome"), "closed");
                assert_eq!(
                    event_names(ep),
                    [
                        "tcp.keepalive.probe",
                        "tcp.keepalive.probe",
                        "tcp.keepalive.close"
                    ]
                );
                assert!(attr(&ep.attributes, "tcp.keepalive.incomplete").is_none());
                assert_eq!(s(conn, "tcp.keepalive.outcome"), "closed");
                assert_eq!(s(conn, "tcp.keepalive.close.state"), "FIN_WAIT1");
                assert!(attr(&conn.attributes, "tcp.keepalive.untracked.reason").is_none());
                assert!(attr(&conn.attributes, "tcp.keepalive.incomplete").is_none());
                assert_eq!(m.ended_at_shutdown, FinishCounts::default());
            }
            Some((reason, name)) => {
                assert_eq!(s(ep, "tcp.keepalive.episode.outcome"), "incomplete");
                assert_eq!(
                    event_names(ep),
                    ["tcp.keepalive.probe", "tcp.keepalive.probe"]
                );
                assert!(b(ep, "tcp.keepalive.incomplete"));
                assert_eq!(s(conn, "tcp.keepalive.untracked.reason"), name);
                assert!(attr(&conn.attributes, "tcp.keepalive.close.state").is_none());
                // Only the shutdown leaves a connection open; the others ended it, or stopped
                // following it for good.
                let shutdown = reason == UntrackReason::Shutdown;
                let outcome = if shutdown { "open" } else { "untracked" };
                assert_eq!(s(conn, "tcp.keepalive.outcome"), outcome);
                assert_eq!(
                    attr(&conn.attributes, "tcp.keepalive.incomplete"),
                    shutdown.then_some(&Value::Bool(true)),
                    "{name}"
                );
                // An episode cut short by a destroy, a reuse... was not ended by the shutdown.
                let by_shutdown = FinishCounts {
                    connections: 1,
                    episodes: 1,
                };
                let expected = if shutdown {
                    by_shutdown
                } else {
                    FinishCounts::default()
                };
                assert_eq!(m.ended_at_shutdown, expected, "{name}");
            }
        }
    }
}

/// An episode span comes from the `episode` record alone (no probe record needed): its timed
/// probes numbered from `first_timed_probe`, then the event its outcome implies, at its end.
#[test]
fn episode_span_from_its_record_alone() {
    let probe_ts = [T0 + S, T0 + 2 * S];
    let end = T0 + 2 * S + 300_000;
    let reset_msg = "connection reset while keep-alive probes were unanswered";
    let error = |m: &str| Status::error(m.to_string());
    let cases = [
        (
            EpisodeOutcome::Answered(AckPrecision::Segment),
            Some("tcp.keepalive.ack"),
            Status::Unset,
            None,
        ),
        (
            EpisodeOutcome::Answered(AckPrecision::NextFiring),
            Some("tcp.keepalive.ack"),
            Status::Unset,
            None,
        ),
        (
            EpisodeOutcome::TimedOut(TimeoutReason::Keepalive),
            Some("tcp.keepalive.timeout"),
            error("keep-alive timeout: 4 probes unanswered"),
            Some("keepalive_timeout"),
        ),
        (
            EpisodeOutcome::TimedOut(TimeoutReason::UserTimeout),
            Some("tcp.keepalive.timeout"),
            error("TCP_USER_TIMEOUT expired with 4 probes unanswered"),
            Some("user_timeout"),
        ),
        (
            EpisodeOutcome::Reset { by_peer: true },
            Some("tcp.keepalive.peer_reset"),
            error(reset_msg),
            Some("peer_reset"),
        ),
        (
            EpisodeOutcome::Reset { by_peer: false },
            Some("tcp.keepalive.reset"),
            error(reset_msg),
            Some("reset"),
        ),
        (
            EpisodeOutcome::Closed,
            Some("tcp.keepalive.close"),
            Status::Unset,
            None,
        ),
        (EpisodeOutcome::Incomplete, None, Status::Unset, None),
    ];
    for (outcome, ending, status, error_type) in cases {
        // The second episode, found under way by the start-up snapshot (at T0) after 2 probes:
        // probes 3 and 4 are timed.
        let ep = Episode {
            number: 2,
            start_ns: T0,
            end_ns: end,
            probes: 4,
            outcome,
            probe_ts_ns: ProbeTimes::from_slice(&probe_ts),
            first_timed_probe: 3,
        };
        let mut m = SpanModel::new(128);
        let mut out = Vec::new();
        m.on_records(
            &[opened(12, T0), rec(12, end, RecordKind::EpisodeEnd(ep))],
            &clock(),
            &mut out,
        );
        assert_eq!(out.len(), 1, "{outcome:?}");
        let span = &out[0];
        assert_eq!(span.name, "tcp.keepalive.episode");
        assert_eq!(span.start_time, wall(T0));
        assert_eq!(span.end_time, wall(end));
        assert_eq!(span.status, status, "{outcome:?}");
        assert_eq!(i(span, "tcp.keepalive.episode.number"), 2);
        assert_eq!(i(span, "tcp.keepalive.episode.probes"), 4);
        assert_eq!(s(span, "tcp.keepalive.episode.outcome"), outcome.name());
        assert_eq!(
            attr(&span.attributes, "error.type").map(|v| v.as_str().into_owned()),
            error_type.map(String::from),
            "{outcome:?}"
        );
        let mut names = vec!["tcp.keepalive.probe", "tcp.keepalive.probe"];
        names.extend(ending);
        assert_eq!(event_names(span), names, "{outcome:?}");
        for (k, e) in span.events.iter().take(2).enumerate() {
            assert_eq!(e.timestamp, wall(probe_ts[k]));
            assert_eq!(
                attr(&e.attributes, "tcp.keepalive.probe.n"),
                Some(&Value::I64(3 + k as i64))
            );
        }
        if ending.is_some() {
            assert_eq!(span.events[2].timestamp, wall(end));
        }
        assert_eq!(
            attr(&span.attributes, "tcp.keepalive.incomplete"),
            (outcome == EpisodeOutcome::Incomplete).then_some(&Value::Bool(true)),
            "{outcome:?}"
        );
        match outcome {
            EpisodeOutcome::Answered(p) => {
                assert_eq!(s(span, "tcp.keepalive.ack.precision"), p.name());
                assert_eq!(
                    attr(&span.events[2].attributes, "tcp.keepalive.episode.probes"),
                    Some(&Value::I64(4))
                );
            }
            EpisodeOutcome::TimedOut(r) => {
                assert_eq!(s(span, "tcp.keepalive.timeout.reason"), r.name());
            }
            _ => assert!(attr(&span.attributes, "tcp.keepalive.ack.precision").is_none()),
        }
        assert_eq!(m.open_connections(), 1);
    }
}

#[test]
fn episode_end_then_close_in_one_batch_count_the_episode() {
    let mut m = SpanModel::new(128);
    let mut out = Vec::new();
    let recs = [
        opened(6, T0),
        rec(6, T0 + S, RecordKind::Probe { n: 1 }),
        // As the engine orders a close during an episode: the episode's end, then the close.
        rec(
            6,
            T0 + 2 * S,
            RecordKind::EpisodeEnd(episode(1, &[T0 + S], T0 + 2 * S, EpisodeOutcome::Closed)),
        ),
        rec(
            6,
            T0 + 2 * S,
            RecordKind::Close {
                state: TcpState::Established, closed_by: None, idle: None,
            },
        ),
    ];
    m.on_records(&recs, &clock(), &mut out);
    assert_eq!(out.len(), 2);
    assert_eq!(out[0].name, "tcp.keepalive.episode");
    assert_eq!(out[0].parent_span_id, out[1].span_context.span_id());
    assert_eq!(
        event_names(&out[0]),
        ["tcp.keepalive.probe", "tcp.keepalive.close"]
    );
    assert_eq!(out[1].name, "tcp.connection");
    assert_eq!(i(&out[1], "tcp.keepalive.episodes"), 1);
    assert_eq!(m.open_connections(), 0);
}

/// At shutdown the engine ends an episode in progress `incomplete` and every connection with
/// `untracked` (reason `shutdown`), at the stop time: the model makes the incomplete episode and the
/// `open` connection spans from those records, and has nothing left to finish.
#[test]
fn shutdown_records_end_open_connections_and_episodes() {
    let stop = T0 + 3 * S;
    let mut m = SpanModel::new(128);
    let mut out = Vec::new();
    m.on_records(
        &[
            rec(
                7,
                T0,
                RecordKind::Opened {
                    state: TcpState::Established,
                    established: false,
                },
            ),
            rec(
                7,
                T0,
                RecordKind::Config {
                    settings: settings(1, 1, 5),
                    source: SettingsSource::Snapshot,
                    process: None,
                },
            ),
            rec(7, T0 + S, RecordKind::Probe { n: 1 }),
            rec(7, T0 + 2 * S, RecordKind::Probe { n: 2 }),
        ],
        &clock(),
        &mut out,
    );
    assert!(out.is_empty());
    let shutdown = |id| {
        rec(
            id,
            stop,
            RecordKind::Untracked {
                reason: UntrackReason::Shutdown,
                state: TcpState::Established,
            },
        )
    };
    let incomplete = episode(1, &[T0 + S, T0 + 2 * S], stop, EpisodeOutcome::Incomplete);
    // Connection 8's only record is its last: its span starts when the engine first saw it.
    let mut unseen = shutdown(8);
    unseen.conn.first_seen_ns = T0 - S;
    m.on_records(
        &[
            rec(7, stop, RecordKind::EpisodeEnd(incomplete)),
            shutdown(7),
            unseen,
        ],
        &clock(),
        &mut out,
    );
    assert_eq!(
        m.ended_at_shutdown,
        FinishCounts {
            connections: 2,
            episodes: 1
        }
    );
    assert_eq!(m.open_connections(), 0);
    assert_eq!(m.finish(&clock(), stop + S, &mut out), 0);
    assert_eq!(out.len(), 3);
    let (ep, conn7, conn8) = (&out[0], &out[1], &out[2]);
    assert_eq!(ep.parent_span_id, conn7.span_context.span_id());
    assert_eq!(s(ep, "tcp.keepalive.episode.outcome"), "incomplete");
    assert!(b(ep, "tcp.keepalive.incomplete"));
    assert_eq!(i(ep, "tcp.keepalive.episode.probes"), 2);
    assert_eq!(ep.start_time, wall(T0 + S));
    assert_eq!(ep.end_time, wall(stop));
    assert_eq!(
        event_names(ep),
        ["tcp.keepalive.probe", "tcp.keepalive.probe"]
    );
    assert_eq!(ep.status, Status::Unset);

    assert!(b(conn7, "tcp.keepalive.incomplete"));
    assert!(b(conn7, "tcp.keepalive.snapshot"));
    assert_eq!(s(conn7, "tcp.keepalive.first_seen.source"), "snapshot");
    assert_eq!(s(conn7, "tcp.keepalive.outcome"), "open");
    assert_eq!(s(conn7, "tcp.keepalive.untracked.reason"), "shutdown");
    assert_eq!(i(conn7, "tcp.keepalive.episodes"), 1);
    assert_eq!(conn7.end_time, wall(stop));
    assert_eq!(conn7.status, Status::Unset);
    assert_eq!(i(conn8, "tcp.keepalive.connection.id"), 8);
    assert_eq!(conn8.start_time, wall(T0 - S));
    assert_eq!(conn8.end_time, wall(stop));
    assert!(b(conn8, "tcp.keepalive.incomplete"));
    assert_eq!(s(conn8, "tcp.keepalive.outcome"), "open");
}

#[test]
fn event_limit_keeps_the_ending() {
    let mut m = SpanModel::new(16);
    let mut recs = vec![rec(
        9,
        T0,
        RecordKind::Opened {
            state: TcpState::Established,
            established: true,
        },
    )];
    for k in 0..100 {
        recs.push(rec(
            9,
            T0 + k * S,
            RecordKind::Suppressed {
                packets_out: 1,
                unsent: 0,
            },
        ));
    }
    recs.push(rec(9, T0 + 200 * S, RecordKind::PeerReset { idle: None }));
    recs.push(rec(
        9,
        T0 + 200 * S,
        RecordKind::Close {
            state: TcpState::Established, closed_by: None, idle: None,
        },
    ));
    let mut out = Vec::new();
    m.on_records(&recs, &clock(), &mut out);
    let conn = &out[0];
    assert_eq!(conn.events.len(), 9);
    assert_eq!(conn.events.dropped_count, 92);
    assert_eq!(event_names(conn).last(), Some(&"tcp.keepalive.peer_reset"));
    assert_eq!(i(conn, "tcp.keepalive.suppressed"), 100);
}

#[test]
fn ipv6_and_unknown_process() {
    let mut m = SpanModel::new(128);
    let mut r = rec(
        10,
        T0,
        RecordKind::Opened {
            state: TcpState::Established,
            established: true,
        },
    );
    r.conn.local = "[::1]:1234".parse().unwrap();
    r.conn.remote = "[::1]:80".parse().unwrap();
    r.conn.process = None;
    let mut c = r.clone();
    c.ts_ns = T0 + S;
    c.kind = RecordKind::Close {
        state: TcpState::Established, closed_by: None, idle: None,
    };
    let mut out = Vec::new();
    m.on_records(&[r, c], &clock(), &mut out);
    assert_eq!(s(&out[0], "network.type"), "ipv6");
    assert_eq!(s(&out[0], "network.peer.address"), "::1");
    assert!(attr(&out[0].attributes, "process.pid").is_none());
}

/// The view only grows (the engine learns the process and the addresses once): the connection
/// span takes the last record's, and keeps a process seen on any record before it.
#[test]
fn view_from_the_last_record_and_a_process_never_forgotten() {
    let mut m = SpanModel::new(128);
    let mut first = rec(12, T0, RecordKind::Opened { state: TcpState::Established, established: true });
    first.conn.local = "0.0.0.0:0".parse().unwrap();
    first.conn.remote = "0.0.0.0:0".parse().unwrap();
    first.conn.process = None;
    let probe = rec(12, T0 + S, RecordKind::Probe { n: 1 });
    let mut last = rec(12, T0 + 2 * S, RecordKind::Close { state: TcpState::Established, closed_by: None, idle: None });
    last.conn.process = None;
    let mut out = Vec::new();
    m.on_records(&[first, probe, last], &clock(), &mut out);
    let span = conn_span(&out, 12);
    assert_eq!(i(span, "network.peer.port"), 8080);
    assert_eq!(s(span, "network.local.address"), "127.0.0.1");
    assert_eq!(i(span, "process.pid"), 4242);
}

#[test]
fn unknown_addresses_are_not_reported() {
    let mut m = SpanModel::new(128);
    let mut r = rec(
        11,
        T0,
        RecordKind::Opened {
            state: TcpState::Established,
            established: true,
        },
    );
    r.conn.local = "0.0.0.0:0".parse().unwrap();
    r.conn.remote = "0.0.0.0:0".parse().unwrap();
    let mut out = Vec::new();
    m.on_records(&[r], &clock(), &mut out);
    // No last record came (never expected from the engine): `finish` ends the leftover at the stop.
    assert_eq!(m.finish(&clock(), T0 + S, &mut out), 1);
    assert_eq!(m.open_connections(), 0);
    assert_eq!(out.len(), 1);
    for key in ["network.type", "network.local.address", "network.peer.port"] {
        assert!(attr(&out[0].attributes, key).is_none(), "{key}");
    }
    assert_eq!(s(&out[0], "network.transport"), "tcp");
    assert_eq!(out[0].end_time, wall(T0 + S));
    assert_eq!(s(&out[0], "tcp.keepalive.outcome"), "open");
    assert!(b(&out[0], "tcp.keepalive.incomplete"));
    assert!(attr(&out[0].attributes, "tcp.keepalive.untracked.reason").is_none());
}

#[test]
fn json_line_of_a_span() {
    let mut m = SpanModel::new(128);
    let mut out = Vec::new();
    m.on_records(&dead_peer(), &clock(), &mut out);
    let resource = [
        KeyValue::new("service.name", "svc"),
        KeyValue::new("host.name", "h"),
    ];
    let ep = crate::export::json::span_json(&out[0], &resource);
    let conn = crate::export::json::span_json(&out[1], &resource);
    assert_eq!(ep["parent_span_id"], conn["span_id"]);
    assert_eq!(ep["trace_id"], conn["trace_id"]);
    assert_eq!(conn["parent_span_id"], serde_json::Value::Null);
    assert_eq!(conn["trace_id"].as_str().unwrap().len(), 32);
    assert_eq!(conn["span_id"].as_str().unwrap().len(), 16);
    assert_eq!(conn["name"], "tcp.connection");
    assert_eq!(conn["status"]["code"], "error");
    assert_eq!(conn["attributes"]["network.peer.port"], 8080);
    assert_eq!(
        conn["attributes"]["tcp.keepalive.settings.defaults"],
        serde_json::json!(["cnt"])
    );
    assert_eq!(conn["resource"]["service.name"], "svc");
    let start = (T0 as i128 + OFFSET) as i64;
    assert_eq!(conn["start_unix_ns"], start);
    assert_eq!(conn["start"], crate::clock::rfc3339(start as i128));
    assert_eq!(ep["events"][0]["name"], "tcp.keepalive.probe");
    assert_eq!(
        ep["events"][0]["time_unix_ns"],
        (T0 + 2 * S) as i64 + OFFSET as i64
    );
    assert_eq!(ep["duration_ms"], 3000.0);
    assert_eq!(conn["scope"]["name"], "keepalive-agent");
}

// A real engine's records. Event fixtures after the engine's own tests (timeline::engine).

const NETNS: u32 = 4026531840;
const SK_A: u64 = 0xffff_8880_0a00_0800;
const SK_B: u64 = 0xffff_8880_0a00_1000;
const SK_C: u64 = 0xffff_8880_0a00_1800;
const SK_D: u64 = 0xffff_8880_0a00_2000;

fn event(ts_ns: u64, sk: u64, body: EventBody) -> Event {
    let local = SocketAddr::new([127, 0, 0, 1].into(), 40000 + (sk >> 11) as u16 % 1000);
    Event {
        ts_ns,
        sk,
        netns: NETNS,
        addrs: Some((local, "127.0.0.1:8080".parse().unwrap())),
        in_timer: false,
        body,
    }
}

/// The namespace's sysctls, nothing set on the socket.
fn sysctls() -> SockSettings {
    SockSettings {
        idle_default_s: 7200,
        intvl_default_s: 75,
        cnt_default: 9,
        ..Default::default()
    }
}

/// `SO_KEEPALIVE` only: the kernel side follows the socket for that alone.
fn keepalive_only() -> SockSettings {
    SockSettings {
        keepalive: true,
        ..sysctls()
    }
}

fn keepalive_values() -> SockSettings {
    SockSettings {
        keepalive: true,
        idle_s: Some(1),
        intvl_s: Some(1),
        cnt: Some(3),
        ..sysctls()
    }
}

fn state_change(ts: u64, sk: u64, old: TcpState, new: TcpState, settings: SockSettings) -> Event {
    let body = EventBody::State {
        old,
        new,
        settings,
        process: None,
        err: 0, times: Default::default(),
    };
    event(ts, sk, body)
}

fn established(ts: u64, sk: u64, settings: SockSettings) -> Event {
    state_change(ts, sk, TcpState::SynSent, TcpState::Established, settings)
}

fn closed(ts: u64, sk: u64) -> Event {
    state_change(ts, sk, TcpState::Established, TcpState::Close, sysctls())
}

/// A keep-alive timer run that sent a probe (`icsk_probes_out` `before` → `before + 1`).
fn probe_sent(ts: u64, sk: u64, settings: SockSettings, before: u8) -> Event {
    let firing = TimerFiring {
        state_before: TcpState::Established,
        state_after: TcpState::Established,
        keepopen: settings.keepalive,
        dead: false,
        owned: false,
        probes_before: before,
        probes_after: before + 1,
        packets_out: 0,
        unsent: 0,
        idle_ms: 1000,
        settings,
        err_after: 0,
        next_in_ms: Some(1000),
    };
    event(ts, sk, EventBody::Timer(firing))
}

/// `setsockopt(SO_KEEPALIVE, 0)`; `read`: the socket's settings just before.
fn keepalive_switched_off(ts: u64, sk: u64, read: SockSettings) -> Event {
    let body = EventBody::Setsockopt {
        option: SockOpt::KeepAlive,
        value: 0,
        state: TcpState::Established,
        process: process(),
        settings: read,
    };
    event(ts, sk, body)
}

/// A connection found by the start-up snapshot, `probes_out` keep-alive probes unanswered.
fn snapshot(ts: u64, sk: u64, settings: SockSettings, probes_out: u8) -> Event {
    let body = EventBody::Snapshot {
        state: TcpState::Established,
        settings,
        probes_out,
        packets_out: 0,
        unsent: 0,
    };
    event(ts, sk, body)
}

/// An engine whose records go straight into a span model, checked after every event: the model
/// holds exactly the connections the engine follows, no more.
struct EngineRun {
    engine: Engine,
    model: SpanModel,
    records: Vec<Record>,
    spans: Vec<SpanData>,
}

impl EngineRun {
    fn new() -> Self {
        EngineRun {
            engine: Engine::new(EngineConfig {
                max_connections: 16,
            }),
            model: SpanModel::new(128),
            records: Vec::new(),
            spans: Vec::new(),
        }
    }

    fn feed(&mut self, events: &[Event]) {
        for ev in events {
            let mut recs = Vec::new();
            self.engine.handle(ev, &mut recs);
            self.take(recs, ev);
        }
    }

    fn take(&mut self, recs: Vec<Record>, after: &dyn std::fmt::Debug) {
        self.model.on_records(&recs, &clock(), &mut self.spans);
        self.records.extend(recs);
        assert_eq!(
            self.model.open_connections(),
            self.engine.tracked(),
            "after {after:?}"
        );
    }

    fn shutdown(&mut self, stop_ns: u64) {
        let mut recs = Vec::new();
        self.engine.shutdown(stop_ns, &mut recs);
        self.take(recs, &"the shutdown");
        assert_eq!(self.engine.tracked(), 0);
    }

    /// The connection ids seen in records (the engine numbers connections as it first sees them).
    fn ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.records.iter().map(|r| r.conn.id).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// The id of the `nth` connection (0-based) seen on socket `sk`.
    fn id(&self, sk: u64, nth: usize) -> u64 {
        let mut ids: Vec<u64> = self
            .records
            .iter()
            .filter(|r| r.conn.sk == sk)
            .map(|r| r.conn.id)
            .collect();
        ids.dedup();
        ids[nth]
    }

    /// Every connection's records end with exactly one last record.
    fn assert_one_last_record_each(&self) {
        for id in self.ids() {
            let kinds: Vec<&RecordKind> = self
                .records
                .iter()
                .filter(|r| r.conn.id == id)
                .map(|r| &r.kind)
                .collect();
            let lasts = kinds.iter().filter(|k| k.is_last()).count();
            assert_eq!(lasts, 1, "connection {id}: {kinds:?}");
            assert!(
                kinds.last().unwrap().is_last(),
                "connection {id}: {kinds:?}"
            );
        }
    }
}

/// Issue 9, item 5: connections the engine stops following without a close (keep-alive switched
/// off before the close, destroyed with the close missed, socket reused, gone from a socket walk)
/// leave nothing in the span model, while the agent runs.
#[test]
fn engine_run_leaves_nothing_in_the_model() {
    let mut run = EngineRun::new();
    run.feed(&[
        // A: SO_KEEPALIVE only, one probe out, then switched off before the close.
        established(T0, SK_A, keepalive_only()),
        probe_sent(T0 + S, SK_A, keepalive_only(), 0),
        keepalive_switched_off(T0 + 2 * S, SK_A, keepalive_only()),
        // B: two probes out, then destroyed: its close was never seen.
        established(T0, SK_B, keepalive_values()),
        probe_sent(T0 + S, SK_B, keepalive_values(), 0),
        probe_sent(T0 + 2 * S, SK_B, keepalive_values(), 1),
        event(T0 + 3 * S, SK_B, EventBody::Destroy),
        // C: its socket becomes a new connection (the close was missed); the new one closes.
        established(T0, SK_C, keepalive_values()),
        established(T0 + 4 * S, SK_C, keepalive_values()),
        closed(T0 + 5 * S, SK_C),
        // D: not found by a walk of the kernel's sockets (below).
        established(T0, SK_D, keepalive_values()),
        // What the kernel side may still report of A after that: nothing to follow.
        closed(T0 + 6 * S, SK_A),
        event(T0 + 6 * S, SK_A, EventBody::Destroy),
    ]);
    assert_eq!(run.engine.tracked(), 1);
    let mut gone = Vec::new();
    run.engine.reconcile(T0 + 7 * S, |c| c.sk != SK_D, &mut gone);
    run.take(gone, &"the socket walk");

    assert_eq!(run.model.open_connections(), 0);
    assert_eq!(run.engine.tracked(), 0);
    run.assert_one_last_record_each();
    // A's close reaches the engine only with `--all-closes` (keep-alive was off): a lone `close`
    // of a connection not followed, with an id of its own.
    assert_eq!(run.ids().len(), 6, "A, B, C twice, D, A's close");
    let (a, b_, c_old, c_new, d) = (
        run.id(SK_A, 0),
        run.id(SK_B, 0),
        run.id(SK_C, 0),
        run.id(SK_C, 1),
        run.id(SK_D, 0),
    );

    // A: the settings as switched off, the episode cut short, the connection no longer followed.
    let conn = conn_span(&run.spans, a);
    assert_eq!(s(conn, "tcp.keepalive.untracked.reason"), "keepalive_off");
    assert_eq!(s(conn, "tcp.keepalive.outcome"), "untracked");
    assert!(!b(conn, "tcp.keepalive.enabled"));
    assert_eq!(s(conn, "tcp.keepalive.settings.option"), "SO_KEEPALIVE");
    assert_eq!(conn.end_time, wall(T0 + 2 * S));
    assert!(attr(&conn.attributes, "tcp.keepalive.incomplete").is_none());
    let eps = episode_spans(&run.spans, a);
    assert_eq!(eps.len(), 1);
    assert_eq!(s(eps[0], "tcp.keepalive.episode.outcome"), "incomplete");
    assert_eq!(i(eps[0], "tcp.keepalive.episode.probes"), 1);
    assert_eq!(eps[0].parent_span_id, conn.span_context.span_id());

    // B: destroyed while probing.
    let conn = conn_span(&run.spans, b_);
    assert_eq!(s(conn, "tcp.keepalive.untracked.reason"), "destroyed");
    assert_eq!(s(conn, "tcp.keepalive.outcome"), "untracked");
    assert_eq!(conn.end_time, wall(T0 + 3 * S));
    let eps = episode_spans(&run.spans, b_);
    assert_eq!(eps.len(), 1);
    assert_eq!(s(eps[0], "tcp.keepalive.episode.outcome"), "incomplete");
    assert_eq!(i(eps[0], "tcp.keepalive.episode.probes"), 2);
    assert_eq!(
        event_names(eps[0]),
        ["tcp.keepalive.probe", "tcp.keepalive.probe"]
    );

    // C, D.
    assert_eq!(
        s(
            conn_span(&run.spans, c_old),
            "tcp.keepalive.untracked.reason"
        ),
        "reused"
    );
    assert_eq!(
        s(conn_span(&run.spans, c_new), "tcp.keepalive.outcome"),
        "closed"
    );
    assert_eq!(
        s(conn_span(&run.spans, d), "tcp.keepalive.untracked.reason"),
        "gone"
    );
    assert_eq!(conn_span(&run.spans, d).end_time, wall(T0 + 7 * S));
    assert_eq!(run.spans.len(), 8, "5 connections, A's lone close, 2 episodes");
    assert_eq!(run.model.spans_built, 8);

    // None of that was the shutdown's doing, and the shutdown finds nothing left.
    assert_eq!(run.model.ended_at_shutdown, FinishCounts::default());
    run.shutdown(T0 + 8 * S);
    assert_eq!(run.spans.len(), 8);
    assert_eq!(run.model.finish(&clock(), T0 + 8 * S, &mut run.spans), 0);
    assert_eq!(run.spans.len(), 8);
}

/// The engine's shutdown records end an episode in progress, found under way by the snapshot, with
/// its exact probe count, and leave every connection's span `open`.
#[test]
fn engine_shutdown_gives_incomplete_episode_and_open_connections() {
    let mut run = EngineRun::new();
    run.feed(&[
        // Two probes unanswered when the agent started, a third seen.
        snapshot(T0, SK_A, keepalive_values(), 2),
        probe_sent(T0 + S, SK_A, keepalive_values(), 2),
        established(T0 + S, SK_B, keepalive_values()),
    ]);
    assert!(run.spans.is_empty());
    let stop = T0 + 3 * S;
    run.shutdown(stop);
    run.assert_one_last_record_each();
    assert_eq!(run.model.open_connections(), 0);
    assert_eq!(run.model.finish(&clock(), stop + S, &mut run.spans), 0);
    assert_eq!(
        run.model.ended_at_shutdown,
        FinishCounts {
            connections: 2,
            episodes: 1
        }
    );
    assert_eq!(run.spans.len(), 3);
    let (a, b_) = (run.id(SK_A, 0), run.id(SK_B, 0));

    let eps = episode_spans(&run.spans, a);
    assert_eq!(eps.len(), 1);
    let ep = eps[0];
    assert_eq!(s(ep, "tcp.keepalive.episode.outcome"), "incomplete");
    assert!(b(ep, "tcp.keepalive.incomplete"));
    assert_eq!(i(ep, "tcp.keepalive.episode.probes"), 3);
    assert_eq!(i(ep, "tcp.keepalive.episode.number"), 1);
    assert_eq!(ep.start_time, wall(T0));
    assert_eq!(ep.end_time, wall(stop));
    assert_eq!(ep.status, Status::Unset);
    // Only the third probe was timed, and it is numbered as such.
    assert_eq!(event_names(ep), ["tcp.keepalive.probe"]);
    assert_eq!(ep.events[0].timestamp, wall(T0 + S));
    assert_eq!(
        attr(&ep.events[0].attributes, "tcp.keepalive.probe.n"),
        Some(&Value::I64(3))
    );

    let conn = conn_span(&run.spans, a);
    assert_eq!(ep.parent_span_id, conn.span_context.span_id());
    assert_eq!(s(conn, "tcp.keepalive.outcome"), "open");
    assert!(b(conn, "tcp.keepalive.incomplete"));
    assert_eq!(s(conn, "tcp.keepalive.untracked.reason"), "shutdown");
    assert!(b(conn, "tcp.keepalive.snapshot"));
    assert_eq!(i(conn, "tcp.keepalive.episodes"), 1);
    assert_eq!(conn.start_time, wall(T0));
    assert_eq!(conn.end_time, wall(stop));
    assert_eq!(conn.status, Status::Unset);

    let conn = conn_span(&run.spans, b_);
    assert_eq!(s(conn, "tcp.keepalive.outcome"), "open");
    assert!(b(conn, "tcp.keepalive.incomplete"));
    assert_eq!(i(conn, "tcp.keepalive.episodes"), 0);
    assert_eq!(conn.start_time, wall(T0 + S));
    assert_eq!(conn.end_time, wall(stop));
    assert!(episode_spans(&run.spans, b_).is_empty());
}

/// `--spans problems`: the records of [`healthy`] without its second episode (the one that needed
/// two probes): every episode answered by its first probe, closed normally.
fn truly_healthy() -> Vec<Record> {
    healthy()
        .into_iter()
        .filter(|r| !(T0 + 20 * S..=T0 + 24 * S).contains(&r.ts_ns))
        .collect()
}

#[test]
fn problem_policy_withholds_a_healthy_connection() {
    let mut m = SpanModel::with_policy(128, SpanPolicy::Problems);
    let spans = run_one_by_one(&mut m, &truly_healthy());
    assert!(spans.is_empty(), "{spans:#?}");
    assert_eq!((m.spans_built, m.spans_withheld), (0, 2), "its episode and connection spans");
    assert_eq!(m.open_connections(), 0);
    // `--spans all` exports both.
    let mut all = SpanModel::with_policy(128, SpanPolicy::All);
    assert_eq!(run_one_by_one(&mut all, &truly_healthy()).len(), 2);
    assert_eq!(all.spans_withheld, 0);
}

#[test]
fn problem_policy_exports_a_problem_with_its_last_healthy_episode() {
    let mut m = SpanModel::with_policy(128, SpanPolicy::Problems);
    let records = healthy();
    let spans = run_one_by_one(&mut m, &records);
    let second = records.iter().position(|r| matches!(&r.kind, RecordKind::EpisodeEnd(e) if e.number == 2)).unwrap();
    let at: Vec<(usize, &str, i64)> = spans
        .iter()
        .map(|(n, s)| (*n, s.name.as_ref(), attr(&s.attributes, EPISODE_NUMBER).map_or(0, |v| v.as_str().parse().unwrap_or(0))))
        .collect();
    // The healthy episode held since it ended comes out with the problem episode (two probes),
    // then the connection span at the close.
    assert_eq!(at.len(), 3, "{at:?}");
    assert_eq!((at[0].0, at[1].0), (second, second), "{at:?}");
    let episodes = episode_spans(&spans.iter().map(|(_, s)| s.clone()).collect::<Vec<_>>(), 1)
        .iter()
        .map(|s| i(s, EPISODE_NUMBER))
        .collect::<Vec<_>>();
    assert_eq!(episodes, [1, 2]);
    assert_eq!(spans[2].1.name, SPAN_CONNECTION);
    assert_eq!(m.spans_withheld, 0);

    let mut dead = SpanModel::with_policy(128, SpanPolicy::Problems);
    let spans: Vec<SpanData> = run_one_by_one(&mut dead, &dead_peer()).into_iter().map(|(_, s)| s).collect();
    assert_eq!(episode_spans(&spans, 2).len(), 1);
    conn_span(&spans, 2);
}

#[test]
fn problem_policy_holds_one_healthy_episode_per_connection() {
    let mut m = SpanModel::with_policy(128, SpanPolicy::Problems);
    let mut records = dead_peer();
    let close = records.pop().unwrap();
    // A peer reset ends the connection after ten healthy episodes (one probe, answered).
    records.retain(|r| !matches!(r.kind, RecordKind::Timeout { .. } | RecordKind::EpisodeEnd(_) | RecordKind::Reset { .. } | RecordKind::Error { .. }));
    for n in 1..=10u32 {
        let t = T0 + u64::from(n) * 10 * S;
        let ep = episode(n, &[t], t + MS, EpisodeOutcome::Answered(AckPrecision::Segment));
        records.push(rec(2, t + MS, RecordKind::EpisodeEnd(ep)));
    }
    let mut out = Vec::new();
    m.on_records(&records, &clock(), &mut out);
    assert!(out.is_empty(), "healthy so far: {out:#?}");
    assert_eq!(m.spans_withheld, 9, "one healthy episode held, the nine before it withheld");
    m.on_records(&[rec(2, T0 + 200 * S, RecordKind::PeerReset { idle: None }), close], &clock(), &mut out);
    let numbers: Vec<i64> = episode_spans(&out, 2).iter().map(|s| i(s, EPISODE_NUMBER)).collect();
    assert_eq!(numbers, [10], "the last healthy episode, for context");
    assert_eq!(s(conn_span(&out, 2), OUTCOME), "peer_reset");
}

/// Issue 14: the death of a connection the engine does not follow is a connection span of its own,
/// of zero length at the death, made of that group of records alone (no `open`, no episode), and
/// nothing of it stays in the model.
#[test]
fn deaths_of_connections_not_followed_are_spans_of_their_own() {
    use crate::event::SockTimes;
    let mut run = EngineRun::new();
    let death = |ts, sk, old, err, times| {
        event(ts, sk, EventBody::State { old, new: TcpState::Close, settings: sysctls(), process: None, err, times })
    };
    let retransmitted = SockTimes {
        since_sent_ms: 800,
        since_data_ms: 12_000,
        since_ack_ms: 12_000,
        retransmits: 3,
        unacked: 100,
        retransmitting_ms: Some(7_000),
        unread: None,
    };
    let raced = SockTimes { since_sent_ms: 100, since_data_ms: 1_300, since_ack_ms: 300, unacked: 77, ..Default::default() };
    run.feed(&[
        death(T0, SK_A, TcpState::Established, 110, retransmitted),
        death(T0 + S, SK_B, TcpState::CloseWait, 32, raced),
    ]);
    assert_eq!(run.model.open_connections(), 0);
    run.assert_one_last_record_each();
    let (a, b_) = (run.id(SK_A, 0), run.id(SK_B, 0));

    let conn = conn_span(&run.spans, a);
    assert_eq!((conn.start_time, conn.end_time), (wall(T0), wall(T0)));
    assert_eq!(s(conn, "tcp.keepalive.outcome"), "timeout");
    assert_eq!(s(conn, "tcp.keepalive.timeout.reason"), "retransmit");
    assert_eq!(s(conn, "error.type"), "retransmit_timeout");
    assert_eq!(s(conn, "tcp.keepalive.settings.source"), "close");
    assert!(!b(conn, "tcp.keepalive.enabled"));
    assert_eq!(i(conn, "tcp.keepalive.idle_ms"), 5_000);
    assert!(attr(&conn.attributes, "tcp.keepalive.open.state").is_none());
    assert_eq!(event_names(conn), ["tcp.keepalive.config", "tcp.keepalive.timeout", "tcp.keepalive.error"]);
    assert!(episode_spans(&run.spans, a).is_empty());

    let conn = conn_span(&run.spans, b_);
    assert_eq!(s(conn, "tcp.keepalive.outcome"), "reuse_race");
    assert_eq!(s(conn, "error.type"), "reuse_race");
    assert_eq!(s(conn, "tcp.keepalive.close.closed_by"), "peer");
    let race = conn.events.iter().find(|e| e.name == "tcp.keepalive.reuse_race").expect("the race event");
    let bytes = race.attributes.iter().find(|kv| kv.key.as_str() == "tcp.keepalive.reuse_race.bytes");
    assert_eq!(bytes.map(|kv| kv.value.clone()), Some(Value::I64(77)));
    assert_eq!(run.spans.len(), 2);
}
