//! Span building from record sequences (pure: no network, fixed clock).

use super::*;
use crate::event::SockOpt;
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

fn healthy() -> Vec<Record> {
    let ep1 = Episode {
        start_ns: T0 + 10 * S,
        end_ns: T0 + 10 * S + 200_000,
        probes: 1,
        outcome: EpisodeOutcome::Answered,
        probe_ts_ns: vec![T0 + 10 * S],
    };
    let ep2 = Episode {
        start_ns: T0 + 20 * S,
        end_ns: T0 + 24 * S,
        probes: 2,
        outcome: EpisodeOutcome::Answered,
        probe_ts_ns: vec![T0 + 20 * S, T0 + 22 * S],
    };
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
                state: TcpState::FinWait1,
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
                probes: 3,
            },
        ),
        rec(
            2,
            end,
            RecordKind::EpisodeEnd(Episode {
                start_ns: probes[0],
                end_ns: end,
                probes: 3,
                outcome: EpisodeOutcome::TimedOut(TimeoutReason::Keepalive),
                probe_ts_ns: probes.clone(),
            }),
        ),
        rec(
            2,
            end,
            RecordKind::Reset {
                reason: "tcp_keepalive_timeout".into(),
                active: true,
            },
        ),
        rec(
            2,
            end,
            RecordKind::Error {
                errno: libc::ETIMEDOUT,
            },
        ),
        rec(
            2,
            end + 10_000,
            RecordKind::Close {
                state: TcpState::Established,
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
            rec(3, T0 + S, RecordKind::PeerReset),
            rec(
                3,
                T0 + S,
                RecordKind::Close {
                    state: TcpState::Established,
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
                },
            ),
            rec(
                4,
                T0 + S,
                RecordKind::Close {
                    state: TcpState::SynSent,
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

#[test]
fn episode_end_after_close_in_a_later_batch() {
    let mut m = SpanModel::new(128);
    let mut out = Vec::new();
    m.on_records(
        &[
            rec(
                5,
                T0,
                RecordKind::Opened {
                    state: TcpState::Established,
                    established: true,
                },
            ),
            rec(5, T0 + S, RecordKind::Probe { n: 1 }),
            rec(
                5,
                T0 + 2 * S,
                RecordKind::Close {
                    state: TcpState::Established,
                },
            ),
        ],
        &clock(),
        &mut out,
    );
    assert_eq!(out.len(), 1);
    let conn = out.pop().unwrap();
    m.on_records(
        &[rec(
            5,
            T0 + 2 * S,
            RecordKind::EpisodeEnd(Episode {
                start_ns: T0 + S,
                end_ns: T0 + 2 * S,
                probes: 1,
                outcome: EpisodeOutcome::Closed,
                probe_ts_ns: vec![T0 + S],
            }),
        )],
        &clock(),
        &mut out,
    );
    assert_eq!(out.len(), 1);
    let ep = &out[0];
    assert_eq!(ep.span_context.trace_id(), conn.span_context.trace_id());
    assert_eq!(ep.parent_span_id, conn.span_context.span_id());
    assert_eq!(s(ep, "tcp.keepalive.episode.outcome"), "closed");
    // Other stragglers for a closed connection do not open a new span.
    out.clear();
    m.on_records(
        &[rec(5, T0 + 3 * S, RecordKind::Error { errno: 104 })],
        &clock(),
        &mut out,
    );
    assert!(out.is_empty());
    assert_eq!(m.open_connections(), 0);
}

#[test]
fn close_and_episode_end_in_one_batch_count_the_episode() {
    let mut m = SpanModel::new(128);
    let mut out = Vec::new();
    let mut recs = vec![
        rec(
            6,
            T0,
            RecordKind::Opened {
                state: TcpState::Established,
                established: true,
            },
        ),
        rec(6, T0 + S, RecordKind::Probe { n: 1 }),
        rec(
            6,
            T0 + 2 * S,
            RecordKind::Close {
                state: TcpState::Established,
            },
        ),
    ];
    recs.push(rec(
        6,
        T0 + 2 * S,
        RecordKind::EpisodeEnd(Episode {
            start_ns: T0 + S,
            end_ns: T0 + 2 * S,
            probes: 1,
            outcome: EpisodeOutcome::Closed,
            probe_ts_ns: vec![T0 + S],
        }),
    ));
    m.on_records(&recs, &clock(), &mut out);
    assert_eq!(out.len(), 2);
    assert_eq!(out[0].name, "tcp.keepalive.episode");
    assert_eq!(
        event_names(&out[0]),
        ["tcp.keepalive.probe", "tcp.keepalive.close"]
    );
    assert_eq!(i(&out[1], "tcp.keepalive.episodes"), 1);
}

#[test]
fn shutdown_ends_open_connections_and_episodes() {
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
    // The engine also reports a connection this model never saw a record for.
    let mut unseen = view(8);
    unseen.first_seen_ns = T0 - S;
    let counts = m.finish(
        [view(7), unseen].into_iter(),
        &clock(),
        T0 + 3 * S,
        &mut out,
    );
    assert_eq!(
        counts,
        FinishCounts {
            connections: 2,
            episodes: 1
        }
    );
    assert_eq!(out.len(), 3);
    let (ep, conn7, conn8) = (&out[0], &out[1], &out[2]);
    assert_eq!(ep.parent_span_id, conn7.span_context.span_id());
    assert_eq!(s(ep, "tcp.keepalive.episode.outcome"), "incomplete");
    assert!(b(ep, "tcp.keepalive.incomplete"));
    assert_eq!(i(ep, "tcp.keepalive.episode.probes"), 2);
    assert_eq!(ep.start_time, wall(T0 + S));
    assert_eq!(ep.end_time, wall(T0 + 3 * S));
    assert_eq!(
        event_names(ep),
        ["tcp.keepalive.probe", "tcp.keepalive.probe"]
    );
    assert_eq!(ep.status, Status::Unset);

    assert!(b(conn7, "tcp.keepalive.incomplete"));
    assert!(b(conn7, "tcp.keepalive.snapshot"));
    assert_eq!(s(conn7, "tcp.keepalive.first_seen.source"), "snapshot");
    assert_eq!(s(conn7, "tcp.keepalive.outcome"), "open");
    assert_eq!(conn7.end_time, wall(T0 + 3 * S));
    assert_eq!(conn7.status, Status::Unset);
    assert_eq!(i(conn8, "tcp.keepalive.connection.id"), 8);
    assert_eq!(conn8.start_time, wall(T0 - S));
    assert!(b(conn8, "tcp.keepalive.incomplete"));
    assert_eq!(m.open_connections(), 0);
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
    recs.push(rec(9, T0 + 200 * S, RecordKind::PeerReset));
    recs.push(rec(
        9,
        T0 + 200 * S,
        RecordKind::Close {
            state: TcpState::Established,
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
        state: TcpState::Established,
    };
    let mut out = Vec::new();
    m.on_records(&[r, c], &clock(), &mut out);
    assert_eq!(s(&out[0], "network.type"), "ipv6");
    assert_eq!(s(&out[0], "network.peer.address"), "::1");
    assert!(attr(&out[0].attributes, "process.pid").is_none());
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
    m.finish(std::iter::empty(), &clock(), T0 + S, &mut out);
    assert_eq!(out.len(), 1);
    for key in ["network.type", "network.local.address", "network.peer.port"] {
        assert!(attr(&out[0].attributes, key).is_none(), "{key}");
    }
    assert_eq!(s(&out[0], "network.transport"), "tcp");
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
