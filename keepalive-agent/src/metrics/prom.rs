//! Prometheus exposition of the metrics: the Prometheus text format (0.0.4), or OpenMetrics text
//! when the scraper's `Accept` asks for it, encoded by `prometheus-client` from [`super::visit`].
//!
//! Names and labels follow the OpenTelemetry → Prometheus compatibility rules: `.` becomes `_`,
//! counters get `_total`, a unit in braces adds nothing and `s` adds `_seconds`.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use super::{Desc, Kind, Metrics, Point};

/// Content type of the Prometheus text format.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Content type of OpenMetrics text.
pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The Prometheus name of an OpenTelemetry metric or attribute name (without the `_total` and
/// unit suffixes the encoder adds).
pub fn prom_name(otel: &str) -> String {
    otel.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' }).collect()
}

/// Whether an `Accept` header asks for OpenMetrics.
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| a.split(',').any(|part| part.trim().starts_with("application/openmetrics-text")))
}

#[derive(Debug)]
struct MetricsCollector(Metrics);

impl Collector for MetricsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // The resource as `target_info` (OpenTelemetry → Prometheus compatibility).
        let resource = self.0.resource();
        if !resource.is_empty() {
            let attrs = resource.iter().map(|(k, v)| (prom_name(k), v.as_str())).collect::<Vec<_>>();
            let mut metric = encoder.encode_descriptor("target_info", "Target metadata: the agent's resource attributes.", None, MetricType::Gauge)?;
            metric.encode_family(&attrs)?.encode_gauge(&1u64)?;
        }
        let mut result = Ok(());
        self.0.visit(&mut |desc, points| {
            if result.is_ok() {
                result = encode_metric(&mut encoder, desc, points);
            }
        });
        result
    }
}

fn encode_metric(encoder: &mut DescriptorEncoder, desc: &Desc, points: &[Point]) -> Result<(), std::fmt::Error> {
    let unit = (desc.unit == "s").then_some(Unit::Seconds);
    let kind = match desc.kind {
        Kind::Counter => MetricType::Counter,
        Kind::Gauge => MetricType::Gauge,
    };
    let name = prom_name(desc.name);
    let mut metric = encoder.encode_descriptor(&name, desc.help, unit.as_ref(), kind)?;
    for p in points {
        let labels: Vec<(String, &str)> = p.attrs.iter().map(|(k, v)| (prom_name(k), v.as_str())).collect();
        let mut series = metric.encode_family(&labels)?;
        match desc.kind {
            Kind::Counter => series.encode_counter::<NoLabelSet, _, f64>(&p.value, None)?,
            Kind::Gauge => series.encode_gauge(&p.value)?,
        }
    }
    Ok(())
}

/// The exposition of `metrics`: (content type, body).
pub fn render(metrics: &Metrics, openmetrics: bool) -> (&'static str, String) {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(MetricsCollector(metrics.clone())));
    let mut body = String::new();
    if openmetrics {
        // Writing to a String cannot fail, nor can our collector.
        let _ = prometheus_client::encoding::text::encode(&mut body, &registry);
        (OPENMETRICS_CONTENT_TYPE, body)
    } else {
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut body, &registry);
        (TEXT_CONTENT_TYPE, body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Process, TcpState};
    use crate::timeline::{ConnView, Record, RecordKind, TimeoutReason};

    fn record(kind: RecordKind) -> Record {
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"curl");
        Record {
            ts_ns: 1,
            conn: ConnView {
                id: 1,
                sk: 1,
                netns: 1,
                local: "127.0.0.1:1".parse().unwrap(),
                remote: "127.0.0.1:2".parse().unwrap(),
                process: Some(Process { pid: 1, tid: 1, comm, cgroup_id: 0 }),
                first_seen_ns: 0,
            },
            kind,
        }
    }

    #[test]
    fn names_and_labels_follow_the_otel_prometheus_rules() {
        let m = Metrics::new(100, false, None);
        m.on_records(&[
            record(RecordKind::Probe { n: 1 }),
            record(RecordKind::Timeout { reason: TimeoutReason::Keepalive, probes: 1, idle: None }),
            record(RecordKind::Close { state: TcpState::Established, closed_by: None, idle: None }),
        ]);
        let (ct, text) = render(&m, false);
        assert_eq!(ct, TEXT_CONTENT_TYPE);
        assert!(text.contains("# TYPE keepalive_connection_deaths_total counter"), "{text}");
        assert!(
            text.contains(r#"keepalive_connection_deaths_total{keepalive_death_cause="keepalive_timeout",process_executable_name="curl"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"keepalive_probes_total{process_executable_name="curl"} 1"#), "{text}");
        assert!(!text.contains("# EOF"), "{text}");
        assert!(!text.contains("target_info"), "no resource, no target_info: {text}");
        m.set_resource(vec![("service.name".into(), "svc".into()), ("host.name".into(), "h1".into())]);
        let (_, text) = render(&m, false);
        assert!(text.contains(r#"target_info{service_name="svc",host_name="h1"} 1"#), "{text}");
        let (ct, om) = render(&m, true);
        assert_eq!(ct, OPENMETRICS_CONTENT_TYPE);
        assert!(om.contains("# TYPE keepalive_connection_deaths counter"), "{om}");
        assert!(om.trim_end().ends_with("# EOF"), "{om}");
    }

    #[test]
    fn accept_negotiation() {
        assert!(wants_openmetrics(Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5")));
        assert!(!wants_openmetrics(Some("text/plain")));
        assert!(!wants_openmetrics(None));
    }
}
