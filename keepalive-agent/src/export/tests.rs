//! The exporter with the JSON-lines sink (no network).

use super::*;
use crate::event::TcpState;
use crate::timeline::{ConnView, Episode, EpisodeOutcome, RecordKind, UntrackReason};
use std::sync::Mutex;

#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl Write for Shared {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Broken;

impl Write for Broken {
    fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
        Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn view(id: u64) -> ConnView {
    ConnView {
        id,
        sk: 1,
        netns: 1,
        local: "127.0.0.1:1000".parse().unwrap(),
        remote: "127.0.0.1:2000".parse().unwrap(),
        process: None,
        first_seen_ns: 1_000,
    }
}

fn cfg() -> ExportConfig {
    let host = config::HostFacts {
        host_name: Some("h1".into()),
        host_id: None,
    };
    // Every span (these tests are about delivery; the span policy has its own tests).
    let args = ExportArgs { spans: Some(spans::SpanPolicy::All), ..ExportArgs::default() };
    ExportConfig::resolve(&args, &|_| None, &host).unwrap()
}

fn record(id: u64, ts_ns: u64, kind: RecordKind) -> Record {
    Record {
        ts_ns,
        conn: view(id),
        kind,
    }
}

fn opened(id: u64, ts_ns: u64) -> Record {
    let kind = RecordKind::Opened {
        state: TcpState::Established,
        established: true,
    };
    record(id, ts_ns, kind)
}

fn lines(buf: &Shared) -> Vec<serde_json::Value> {
    let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test]
async fn json_lines_with_open_connection_at_shutdown() {
    let buf = Shared::default();
    let mut ex = Exporter::with_json_writer(&cfg(), Box::new(buf.clone()));
    let clock = WallClock::with_offset_ns(1_000_000_000_000_000_000);
    ex.on_records(
        &[
            opened(1, 1_000),
            opened(2, 2_000),
            record(2, 3_000, RecordKind::Probe { n: 1 }),
        ],
        &clock,
    );
    let close = RecordKind::Close {
        state: TcpState::Established, closed_by: None, idle: None,
    };
    ex.on_records(&[record(1, 5_000, close)], &clock);
    assert_eq!(ex.stats().spans_exported, 1);
    // What `Engine::shutdown` emits for connection 2 (probing), fed like any records: the episode
    // ends `incomplete`, then the connection is untracked (reason `shutdown`), at the stop.
    let incomplete = Episode {
        number: 1,
        start_ns: 3_000,
        end_ns: 9_000,
        probes: 1,
        outcome: EpisodeOutcome::Incomplete,
        probe_ts_ns: smallvec::smallvec![3_000],
        first_timed_probe: 1,
    };
    let untracked = RecordKind::Untracked {
        reason: UntrackReason::Shutdown,
        state: TcpState::Established,
    };
    ex.on_records(
        &[
            record(2, 9_000, RecordKind::EpisodeEnd(incomplete)),
            record(2, 9_000, untracked),
        ],
        &clock,
    );
    assert_eq!(ex.stats().spans_exported, 3);
    let report = ex.shutdown(&[], &clock, Duration::from_secs(1)).await;
    assert!(report.flushed);
    assert_eq!(report.open_connections_ended, 1);
    assert_eq!(report.open_episodes_ended, 1);
    assert_eq!(report.stats.spans_exported, 3);
    assert_eq!(report.stats.spans_created, 3);
    let lines = lines(&buf);
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["attributes"]["tcp.keepalive.connection.id"], 1);
    assert_eq!(lines[0]["end_unix_ns"], 1_000_000_000_000_005_000i64);
    assert_eq!(lines[1]["name"], "tcp.keepalive.episode");
    assert_eq!(lines[1]["parent_span_id"], lines[2]["span_id"]);
    assert_eq!(
        lines[1]["attributes"]["tcp.keepalive.episode.outcome"],
        "incomplete"
    );
    assert_eq!(lines[1]["attributes"]["tcp.keepalive.incomplete"], true);
    assert_eq!(lines[1]["attributes"]["tcp.keepalive.episode.probes"], 1);
    assert_eq!(lines[1]["end_unix_ns"], 1_000_000_000_000_009_000i64);
    assert_eq!(lines[2]["attributes"]["tcp.keepalive.connection.id"], 2);
    assert_eq!(lines[2]["attributes"]["tcp.keepalive.incomplete"], true);
    assert_eq!(lines[2]["attributes"]["tcp.keepalive.outcome"], "open");
    assert_eq!(
        lines[2]["attributes"]["tcp.keepalive.untracked.reason"],
        "shutdown"
    );
    assert_eq!(lines[2]["end_unix_ns"], 1_000_000_000_000_009_000i64);
    assert_eq!(lines[2]["resource"]["service.name"], "keepalive-agent");
    assert_eq!(lines[2]["resource"]["host.name"], "h1");
}

/// A connection whose last record never came (the engine always sends one) is still ended by the
/// exporter's shutdown, and counted with the connections the shutdown ended.
#[tokio::test]
async fn shutdown_ends_and_counts_leftovers() {
    let buf = Shared::default();
    let mut ex = Exporter::with_json_writer(&cfg(), Box::new(buf.clone()));
    let clock = WallClock::with_offset_ns(1_000_000_000_000_000_000);
    ex.on_records(&[opened(3, 1_000)], &clock);
    assert_eq!(ex.stats().spans_created, 0);
    let report = ex.shutdown(&[], &clock, Duration::from_secs(1)).await;
    assert!(report.flushed);
    assert_eq!(report.open_connections_ended, 1);
    assert_eq!(report.open_episodes_ended, 0);
    assert_eq!(report.stats.spans_exported, 1);
    let lines = lines(&buf);
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["attributes"]["tcp.keepalive.connection.id"], 3);
    assert_eq!(lines[0]["attributes"]["tcp.keepalive.incomplete"], true);
    assert_eq!(lines[0]["attributes"]["tcp.keepalive.outcome"], "open");
    assert!(lines[0]["end_unix_ns"].as_i64() > lines[0]["start_unix_ns"].as_i64());
}

#[test]
fn json_write_errors_are_counted() {
    let mut ex = Exporter::with_json_writer(&cfg(), Box::new(Broken));
    let clock = WallClock::with_offset_ns(0);
    let close = RecordKind::Close {
        state: TcpState::Established, closed_by: None, idle: None,
    };
    ex.on_records(&[opened(1, 1), record(1, 2, close)], &clock);
    let s = ex.stats();
    assert_eq!(
        (s.spans_exported, s.spans_failed, s.export_errors),
        (0, 1, 1)
    );
}

#[test]
fn otlp_needs_a_runtime() {
    let args = ExportArgs {
        otlp_endpoint: Some("http://127.0.0.1:4318".into()),
        ..Default::default()
    };
    assert!(matches!(
        Exporter::from_args(&args),
        Err(ExportError::NoRuntime)
    ));
}

#[test]
fn exporter_is_send_and_help_names_the_variables() {
    fn is_send<T: Send>() {}
    is_send::<Exporter>();
    use clap::{CommandFactory, Parser};
    /// Runs the agent.
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        export: ExportArgs,
    }
    let help = Cli::command().render_long_help().to_string();
    // The flattened options do not replace the command's own description.
    assert!(help.starts_with("Runs the agent"), "{help}");
    for var in [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        "OTEL_EXPORTER_OTLP_HEADERS",
        "OTEL_SERVICE_NAME",
        "OTEL_RESOURCE_ATTRIBUTES",
    ] {
        assert!(help.contains(var), "help lacks {var}:\n{help}");
    }
    if std::env::var_os("KEEPALIVE_PRINT_HELP").is_some() {
        eprintln!("{help}");
    }
}

#[tokio::test]
async fn spans_carry_the_container_and_pod_of_their_process_cgroup() {
    use std::sync::atomic::{AtomicBool, Ordering};
    const UID: &str = "0b7c3a52-6f1e-4d8a-9c2b-1e2f3a4b5c6d";
    let id = "ab".repeat(32);
    // The cgroup exists only until the connection's first record: it must be resolved then.
    let exists = Arc::new(AtomicBool::new(true));
    let (e, path) = (exists.clone(), format!("/kubepods/burstable/pod{UID}/{id}"));
    let lookup = Box::new(move |cg: u64| (cg == 5 && e.load(Ordering::Relaxed)).then(|| path.clone()));
    let buf = Shared::default();
    let mut ex = Exporter::with_json_writer(&cfg(), Box::new(buf.clone())).with_cgroups(CgroupResolver::with_lookup(lookup, 16));
    let clock = WallClock::with_offset_ns(1_000_000_000_000_000_000);
    let in_cgroup = |id, ts, kind, cgroup_id| {
        let mut r = record(id, ts, kind);
        r.conn.process = Some(crate::event::Process { pid: 7, tid: 7, comm: [0; 16], cgroup_id });
        r
    };
    ex.on_records(&[in_cgroup(1, 1_000, opened(1, 1_000).kind, 5), in_cgroup(2, 1_000, opened(2, 1_000).kind, 6)], &clock);
    exists.store(false, Ordering::Relaxed);
    let close = || RecordKind::Close { state: TcpState::Established, closed_by: None, idle: None };
    ex.on_records(&[in_cgroup(1, 5_000, close(), 5), in_cgroup(2, 5_000, close(), 6)], &clock);
    ex.shutdown(&[], &clock, Duration::from_secs(1)).await;
    let lines = lines(&buf);
    let span = |conn: i64| lines.iter().find(|l| l["attributes"]["tcp.keepalive.connection.id"] == conn).unwrap()["attributes"].clone();
    let a = span(1);
    assert_eq!((a[CONTAINER_ID].as_str(), a[K8S_POD_UID].as_str()), (Some(id.as_str()), Some(UID)), "{a}");
    assert_eq!(a[POD_QOS_CLASS], "Burstable", "{a}");
    // A cgroup that resolves to nothing adds nothing.
    let a = span(2);
    assert!(a.get(CONTAINER_ID).is_none() && a.get(K8S_POD_UID).is_none() && a.get(POD_QOS_CLASS).is_none(), "{a}");
}
