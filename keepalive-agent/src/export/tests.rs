//! The exporter with the JSON-lines sink (no network).

use super::*;
use crate::event::TcpState;
use crate::timeline::RecordKind;
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
    ExportConfig::resolve(&ExportArgs::default(), &|_| None, &host).unwrap()
}

#[tokio::test]
async fn json_lines_with_open_connection_at_shutdown() {
    let buf = Shared::default();
    let mut ex = Exporter::with_json_writer(&cfg(), Box::new(buf.clone()));
    let clock = WallClock::with_offset_ns(1_000_000_000_000_000_000);
    let open = |id, ts| Record {
        ts_ns: ts,
        conn: view(id),
        kind: RecordKind::Opened {
            state: TcpState::Established,
            established: true,
        },
    };
    ex.on_records(&[open(1, 1_000), open(2, 2_000)], &clock);
    ex.on_records(
        &[Record {
            ts_ns: 5_000,
            conn: view(1),
            kind: RecordKind::Close {
                state: TcpState::Established,
            },
        }],
        &clock,
    );
    assert_eq!(ex.stats().spans_exported, 1);
    let report = ex
        .shutdown([view(2)].into_iter(), &clock, Duration::from_secs(1))
        .await;
    assert!(report.flushed);
    assert_eq!(report.open_connections_ended, 1);
    assert_eq!(report.stats.spans_exported, 2);
    assert_eq!(report.stats.spans_created, 2);
    let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["attributes"]["tcp.keepalive.connection.id"], 1);
    assert_eq!(lines[0]["end_unix_ns"], 1_000_000_000_000_005_000i64);
    assert_eq!(lines[1]["attributes"]["tcp.keepalive.incomplete"], true);
    assert_eq!(lines[1]["resource"]["service.name"], "keepalive-agent");
    assert_eq!(lines[1]["resource"]["host.name"], "h1");
}

#[test]
fn json_write_errors_are_counted() {
    let mut ex = Exporter::with_json_writer(&cfg(), Box::new(Broken));
    let clock = WallClock::with_offset_ns(0);
    ex.on_records(
        &[
            Record {
                ts_ns: 1,
                conn: view(1),
                kind: RecordKind::Opened {
                    state: TcpState::Established,
                    established: true,
                },
            },
            Record {
                ts_ns: 2,
                conn: view(1),
                kind: RecordKind::Close {
                    state: TcpState::Established,
                },
            },
        ],
        &clock,
    );
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
