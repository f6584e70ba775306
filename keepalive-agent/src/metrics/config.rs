//! Metrics options of `keepalive-agent run`: the `--metrics-*` flags and the standard
//! `OTEL_METRICS_EXPORTER`, `OTEL_EXPORTER_OTLP_METRICS_*` and `OTEL_METRIC_EXPORT_INTERVAL`
//! variables (a flag wins over the environment; the metrics-specific variable over the generic
//! one). The configuration file's generic export keys (`export.protocol`, `export.timeout_ms`,
//! `[export.headers]`, the TLS keys) come after every variable, the metrics-specific ones
//! included; its `[metrics]` keys are folded in by the layering as flags would be, under their own
//! variables.

use std::net::SocketAddr;
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry_sdk::metrics::Temporality;

use crate::export::config::{check_endpoint, headers_from, nonempty, protocol_from, timeout_from, Env, ExportArgs, Numeric, Protocol};
use crate::export::tls::{Signal, TlsSettings};
use crate::export::ExportError;

/// Series per metric (`--metrics-max-series`).
pub const MAX_SERIES: Numeric = Numeric {
    flag: "--metrics-max-series",
    vars: &[],
    min: 2,
    max: 1_000_000,
    default: super::store::DEFAULT_MAX_SERIES as u64,
    unit: "series",
};
/// Time between two OTLP metric exports.
pub const EXPORT_INTERVAL_MS: Numeric = Numeric {
    flag: "--metrics-export-interval-ms",
    vars: &["OTEL_METRIC_EXPORT_INTERVAL"],
    min: 100,
    max: 86_400_000,
    default: 60_000,
    unit: "ms",
};
/// Timeout of one metrics export request.
pub const METRICS_TIMEOUT_MS: Numeric = Numeric {
    flag: "--otlp-timeout-ms",
    vars: &["OTEL_EXPORTER_OTLP_METRICS_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT"],
    min: 1,
    max: 3_600_000,
    default: 10_000,
    unit: "ms",
};

/// The names `--metrics-exporter` (and the `metrics.exporter` key of the configuration file)
/// accept.
pub const EXPORTERS: [&str; 3] = ["otlp", "prometheus", "none"];

/// Metrics options of `keepalive-agent run`.
#[derive(clap::Args, Debug, Clone, Default)]
#[command(next_help_heading = "Metrics and health")]
pub struct MetricsArgs {
    /// Serve GET /metrics (Prometheus text, or OpenMetrics when asked), /healthz and /readyz on
    /// this address, e.g. `127.0.0.1:9464` or `[::]:9464`.
    #[arg(long, value_name = "ADDR:PORT", value_parser = listen_addr)]
    pub metrics_listen: Option<SocketAddr>,

    /// Series per metric at most, 2 to 1000000, the overflow series (otel.metric.overflow="true")
    /// included [default: 2000]
    #[arg(long, value_name = "N", value_parser = MAX_SERIES.parser::<usize>(), allow_negative_numbers = true)]
    pub metrics_max_series: Option<usize>,

    /// Label keep-alive metrics with the peer's address (network.peer.address): one series per
    /// peer and workload, within --metrics-max-series.
    #[arg(long)]
    pub metrics_peer_labels: bool,

    /// Where metrics are pushed: otlp, or none (prometheus: only the --metrics-listen endpoint)
    /// [default: otlp when --otlp-metrics-endpoint or OTEL_EXPORTER_OTLP_METRICS_ENDPOINT is set, else none] [env: OTEL_METRICS_EXPORTER]
    #[arg(long, value_name = "EXPORTER", value_parser = clap::builder::PossibleValuesParser::new(EXPORTERS))]
    pub metrics_exporter: Option<String>,

    /// OTLP metrics endpoint, used as given (no path appended); else --otlp-endpoint with
    /// /v1/metrics appended for http/protobuf. [env: OTEL_EXPORTER_OTLP_METRICS_ENDPOINT]
    #[arg(long, value_name = "URL", value_parser = crate::export::config::endpoint_flag)]
    pub otlp_metrics_endpoint: Option<String>,

    /// OTLP transport of metrics [default: --otlp-protocol, else http/protobuf]
    /// [env: OTEL_EXPORTER_OTLP_METRICS_PROTOCOL, OTEL_EXPORTER_OTLP_PROTOCOL]
    #[arg(long, value_enum, value_name = "PROTOCOL")]
    pub otlp_metrics_protocol: Option<Protocol>,

    /// Time between two OTLP metric exports, in milliseconds, 100 to 86400000 [default: 60000]
    /// [env: OTEL_METRIC_EXPORT_INTERVAL]
    #[arg(long, value_name = "MS", value_parser = EXPORT_INTERVAL_MS.parser::<u64>(), allow_negative_numbers = true)]
    pub metrics_export_interval_ms: Option<u64>,

    /// Aggregation temporality of exported sums: cumulative, delta or lowmemory [default:
    /// cumulative] [env: OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE]
    #[arg(long, value_name = "PREFERENCE", value_parser = parse_temporality_flag)]
    pub metrics_temporality: Option<Temporality>,
}

/// Resolved OTLP metrics export.
#[derive(Clone, Debug)]
pub struct OtlpMetrics {
    pub protocol: Protocol,
    /// The full URL (for HTTP, including `/v1/metrics`).
    pub endpoint: String,
    pub headers: Vec<(String, String)>,
    pub interval: Duration,
    pub timeout: Duration,
    pub temporality: Temporality,
    pub resource: Vec<KeyValue>,
    /// TLS for `https://` endpoints (`OTEL_EXPORTER_OTLP_METRICS_CERTIFICATE`... over the generic
    /// variables, the `--otlp-*` TLS flags over both).
    pub tls: TlsSettings,
}

/// Resolved metrics configuration.
#[derive(Clone, Debug)]
pub struct MetricsConfig {
    pub listen: Option<SocketAddr>,
    pub max_series: usize,
    pub peer_labels: bool,
    pub otlp: Option<OtlpMetrics>,
}

impl MetricsConfig {
    /// Resolves against the process environment; `resource` is the export's resource.
    pub fn from_args(args: &MetricsArgs, export: &ExportArgs, resource: &[KeyValue]) -> Result<Self, ExportError> {
        Self::resolve(args, export, resource, &|name| std::env::var(name).ok())
    }

    /// Resolves against an environment given as a lookup function.
    pub fn resolve(
        args: &MetricsArgs,
        export: &ExportArgs,
        resource: &[KeyValue],
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ExportError> {
        let env = Env(env);
        let (max_series, _) = MAX_SERIES.resolve(args.metrics_max_series.map(|v| v as u64), &env)?;
        let otlp = match (exporter(args, &env)?, endpoint(args, export, &env)) {
            (Exporter::Otlp(source), None) => {
                return Err(ExportError::config(
                    source,
                    "otlp needs an endpoint: --otlp-metrics-endpoint, --otlp-endpoint, OTEL_EXPORTER_OTLP_METRICS_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT",
                ))
            }
            (Exporter::Otlp(_), Some(ep)) => Some(otlp(args, export, &env, ep, resource)?),
            // Not configured: only a metrics-specific endpoint turns the push on.
            (Exporter::Default, Some(ep)) if ep.2 => Some(otlp(args, export, &env, ep, resource)?),
            _ => None,
        };
        Ok(MetricsConfig { listen: args.metrics_listen, max_series: max_series as usize, peer_labels: args.metrics_peer_labels, otlp })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Exporter {
    /// Named by this flag or variable.
    Otlp(&'static str),
    None,
    /// Not configured: OTLP when a metrics-specific endpoint is set.
    Default,
}

/// `--metrics-exporter`, else `OTEL_METRICS_EXPORTER` (a comma-separated list: `otlp`,
/// `prometheus`, `none`).
fn exporter(args: &MetricsArgs, env: &Env) -> Result<Exporter, ExportError> {
    let (source, value) = match (&args.metrics_exporter, env.get("OTEL_METRICS_EXPORTER")) {
        (Some(v), _) => ("--metrics-exporter", v.clone()),
        (None, Some(v)) => ("OTEL_METRICS_EXPORTER", v),
        (None, None) => return Ok(Exporter::Default),
    };
    let mut otlp = false;
    for name in value.split(',').map(|s| s.trim().to_ascii_lowercase()) {
        match name.as_str() {
            "otlp" => otlp = true,
            "prometheus" | "none" => {}
            other => {
                return Err(ExportError::config(source, format!("unknown metrics exporter `{other}` (otlp, prometheus, none)")))
            }
        }
    }
    Ok(if otlp { Exporter::Otlp(source) } else { Exporter::None })
}

/// The endpoint, its source and whether it is used as given (metrics-specific).
fn endpoint(args: &MetricsArgs, export: &ExportArgs, env: &Env) -> Option<(&'static str, String, bool)> {
    if let Some(e) = nonempty(&args.otlp_metrics_endpoint) {
        Some(("--otlp-metrics-endpoint", e.to_string(), true))
    } else if let Some(e) = env.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT") {
        Some(("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", e, true))
    } else if let Some(e) = nonempty(&export.otlp_endpoint) {
        Some(("--otlp-endpoint", e.to_string(), false))
    } else {
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT").map(|e| ("OTEL_EXPORTER_OTLP_ENDPOINT", e, false))
    }
}

fn otlp(
    args: &MetricsArgs,
    export: &ExportArgs,
    env: &Env,
    (source, url, as_given): (&'static str, String, bool),
    resource: &[KeyValue],
) -> Result<OtlpMetrics, ExportError> {
    let url = url.trim();
    check_endpoint(source, url)?;
    let protocol_vars = ["OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"];
    let protocol = protocol_from(&[args.otlp_metrics_protocol, export.otlp_protocol], env, &protocol_vars, &export.file)?;
    let endpoint = if as_given || protocol == Protocol::Grpc {
        url.to_string()
    } else {
        format!("{}/v1/metrics", url.trim_end_matches('/'))
    };
    let headers = headers_from(&export.otlp_headers, env, &["OTEL_EXPORTER_OTLP_METRICS_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS"], &export.file)?;
    let (interval, temporality) = push_timing(args, env)?;
    let timeout_ms = timeout_from(&METRICS_TIMEOUT_MS, export.otlp_timeout_ms, env, &export.file)?;
    let tls = TlsSettings::resolve(&export.tls, Signal::Metrics, &|name| env.get(name))?;
    Ok(OtlpMetrics { tls, protocol, endpoint, headers, interval, timeout: Duration::from_millis(timeout_ms), temporality, resource: resource.to_vec() })
}

/// The export interval and the temporality of an OTLP push, whether or not one is configured
/// (`keepalive-agent config` shows them either way).
pub fn push_timing_from(args: &MetricsArgs, env: &dyn Fn(&str) -> Option<String>) -> Result<(Duration, Temporality), ExportError> {
    push_timing(args, &Env(env))
}

fn push_timing(args: &MetricsArgs, env: &Env) -> Result<(Duration, Temporality), ExportError> {
    let (interval_ms, _) = EXPORT_INTERVAL_MS.resolve(args.metrics_export_interval_ms, env)?;
    let temporality = match (args.metrics_temporality, env.get("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE")) {
        (Some(t), _) => t,
        (None, Some(v)) => parse_temporality(&v)
            .map_err(|e| ExportError::config("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE", e))?,
        (None, None) => Temporality::Cumulative,
    };
    Ok((Duration::from_millis(interval_ms), temporality))
}

/// The name of a temporality preference, as [`parse_temporality`] reads it.
pub fn temporality_name(t: Temporality) -> &'static str {
    match t {
        Temporality::Delta => "delta",
        Temporality::LowMemory => "lowmemory",
        _ => "cumulative",
    }
}

/// `cumulative`, `delta` or `lowmemory`, any case (as the specification spells them).
pub fn parse_temporality(s: &str) -> Result<Temporality, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "cumulative" => Ok(Temporality::Cumulative),
        "delta" => Ok(Temporality::Delta),
        "lowmemory" => Ok(Temporality::LowMemory),
        other => Err(format!("unknown temporality preference `{other}` (cumulative, delta, lowmemory)")),
    }
}

fn parse_temporality_flag(s: &str) -> Result<Temporality, String> {
    parse_temporality(s)
}

/// `--metrics-listen`: an IP address and a port (no name is resolved: the address is bound as given).
fn listen_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|_| format!("`{s}` is not an IP address and a port, e.g. 127.0.0.1:9464, [::1]:9464 or 0.0.0.0:9464 (host names are not resolved)"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn resolve(args: &MetricsArgs, export: &ExportArgs, env: &[(&str, &str)]) -> Result<MetricsConfig, ExportError> {
        let env: HashMap<String, String> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        MetricsConfig::resolve(args, export, &[], &move |n| env.get(n).cloned())
    }

    #[test]
    fn no_endpoint_no_push() {
        let c = resolve(&MetricsArgs::default(), &ExportArgs::default(), &[]).unwrap();
        assert!(c.otlp.is_none());
        assert_eq!(c.max_series, 2000);
        let e = resolve(&MetricsArgs::default(), &ExportArgs::default(), &[("OTEL_METRICS_EXPORTER", "otlp")]).unwrap_err();
        assert!(e.to_string().contains("OTEL_METRICS_EXPORTER"), "{e}");
    }

    #[test]
    fn endpoints_protocols_and_intervals() {
        // A generic endpoint alone (configured for traces) does not start a metrics push.
        let generic = [("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318/")];
        assert!(resolve(&MetricsArgs::default(), &ExportArgs::default(), &generic).unwrap().otlp.is_none());
        let env = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318/"),
            ("OTEL_METRICS_EXPORTER", "otlp"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "500"),
            ("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE", "Delta"),
        ];
        let c = resolve(&MetricsArgs::default(), &ExportArgs::default(), &env).unwrap().otlp.unwrap();
        assert_eq!(c.endpoint, "http://127.0.0.1:4318/v1/metrics");
        assert_eq!(c.interval, Duration::from_millis(500));
        assert_eq!(c.temporality, Temporality::Delta);
        let env = [("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "http://127.0.0.1:4317"), ("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "grpc")];
        let c = resolve(&MetricsArgs::default(), &ExportArgs::default(), &env).unwrap().otlp.unwrap();
        assert_eq!((c.protocol, c.endpoint.as_str()), (Protocol::Grpc, "http://127.0.0.1:4317"));
        // OTEL_METRICS_EXPORTER=none wins over a configured endpoint.
        let env = [("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "http://127.0.0.1:4317"), ("OTEL_METRICS_EXPORTER", "none")];
        assert!(resolve(&MetricsArgs::default(), &ExportArgs::default(), &env).unwrap().otlp.is_none());
    }

    #[test]
    fn bad_values_name_their_variable() {
        let ep = ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "http://127.0.0.1:4318");
        for (env, name) in [
            (vec![("OTEL_METRICS_EXPORTER", "statsd")], "OTEL_METRICS_EXPORTER"),
            (vec![ep, ("OTEL_METRIC_EXPORT_INTERVAL", "ten")], "OTEL_METRIC_EXPORT_INTERVAL"),
            (vec![ep, ("OTEL_METRIC_EXPORT_INTERVAL", "5")], "OTEL_METRIC_EXPORT_INTERVAL"),
            (vec![ep, ("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE", "sometimes")], "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE"),
            (vec![ep, ("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "udp")], "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL"),
            (vec![ep, ("OTEL_EXPORTER_OTLP_METRICS_HEADERS", "novalue")], "OTEL_EXPORTER_OTLP_METRICS_HEADERS"),
            (vec![("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "ftp://x")], "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"),
        ] {
            let e = resolve(&MetricsArgs::default(), &ExportArgs::default(), &env).unwrap_err().to_string();
            assert!(e.contains(name), "{env:?}: {e}");
        }
    }
}

