//! `Exporter::from_args` with the standard `OTEL_*` variables set in the process: a flag wins over
//! the environment even where the OTLP crate reads the variables itself (headers), and values only
//! in the environment still apply. This test binary holds one test, because it sets process
//! environment variables before any other thread could read them.

mod otlp;

use std::time::Duration;

use anyhow::Result;
use otlp::{free_port, Receiver};

use keepalive_agent::clock::WallClock;
use keepalive_agent::event::TcpState;
use keepalive_agent::export::{ExportArgs, Exporter, Protocol};
use keepalive_agent::timeline::{ConnView, Record, RecordKind};

fn records(id: u64) -> Vec<Record> {
    let conn = ConnView {
        id,
        sk: 1,
        netns: 1,
        local: "127.0.0.1:30000".parse().unwrap(),
        remote: "127.0.0.1:30001".parse().unwrap(),
        process: None,
        first_seen_ns: 1_000,
    };
    vec![
        Record {
            ts_ns: 1_000,
            conn,
            kind: RecordKind::Opened {
                state: TcpState::Established,
                established: true,
            },
        },
        Record {
            ts_ns: 2_000,
            conn,
            kind: RecordKind::Close {
                state: TcpState::Established, closed_by: None, idle: None,
            },
        },
    ]
}

#[test]
fn flags_win_over_the_environment() -> Result<()> {
    let dead = free_port();
    // Set before the runtime and any other thread exist.
    for (k, v) in [
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            format!("http://127.0.0.1:{dead}"),
        ),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc".to_string()),
        (
            "OTEL_EXPORTER_OTLP_HEADERS",
            "x-keepalive-test=from-env,x-env-only=e%20v".to_string(),
        ),
        ("OTEL_SERVICE_NAME", "svc-env".to_string()),
        (
            "OTEL_RESOURCE_ATTRIBUTES",
            "team=net,deployment.environment.name=dev".to_string(),
        ),
    ] {
        std::env::set_var(k, v);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        for protocol in [Protocol::Grpc, Protocol::HttpProtobuf] {
            let rx = Receiver::start(0, 0, &[])?;
            let args = ExportArgs {
                otlp_endpoint: Some(rx.endpoint(protocol)),
                otlp_protocol: Some(protocol),
                otlp_headers: vec!["x-keepalive-test=from-flag".into()],
                service_name: Some("svc-flag".into()),
                resource_attributes: vec!["deployment.environment.name=ci".into()],
                otlp_batch_delay_ms: Some(50),
                // Every span: these tests are about delivery.
                spans: Some(keepalive_agent::export::spans::SpanPolicy::All),
                ..Default::default()
            };
            let mut ex = Exporter::from_args(&args)?;
            assert!(
                ex.description().contains(&rx.endpoint(protocol)),
                "{}",
                ex.description()
            );
            let clock = WallClock::measure();
            ex.on_records(&records(1), &clock);
            let report = ex
                .shutdown(&[], &clock, Duration::from_secs(10))
                .await;
            assert!(report.flushed, "{protocol:?}: {report}");
            assert_eq!(report.stats.spans_exported, 1);
            let spans = rx.wait_spans(1, Duration::from_secs(10)).await?;
            let requests = rx.lines("request");
            assert_eq!(requests.len(), 1, "{protocol:?}");
            let h = &requests[0]["headers"];
            assert_eq!(h["x-keepalive-test"], "from-flag", "{protocol:?}: {h}");
            assert_eq!(h["x-env-only"], "e v", "{protocol:?}: {h}");
            let res = &spans[0]["resource"];
            assert_eq!(res["service.name"], "svc-flag");
            assert_eq!(res["team"], "net");
            assert_eq!(res["deployment.environment.name"], "ci");
        }
        Ok(())
    })
}
