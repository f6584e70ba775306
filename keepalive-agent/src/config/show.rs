//! `keepalive-agent config`: the effective configuration of `run`, one `key = value  # source`
//! line per setting, grouped in the file's tables (the output is itself a valid configuration
//! file). Header values are secrets and never printed. A setting without a value is a comment line
//! saying what its absence means.

use std::io::Write;

use std::time::Duration;

use clap::ArgMatches;
use keepalive_agent::export::{ExportConfig, ExportError, Target};
use keepalive_agent::metrics::config::{self as metrics, MetricsConfig};
use opentelemetry_sdk::metrics::Temporality;

use super::layers::{env_sets, given, list_keys, long_flag, Layered, Source};
use crate::RunArgs;

/// Printed instead of a header's value.
pub const REDACTED: &str = "<redacted>";

/// The resolved metrics settings `config` prints.
pub struct Metrics {
    config: MetricsConfig,
    /// The OTLP push's interval and temporality, also when no push is configured.
    interval: Duration,
    temporality: Temporality,
}

impl Metrics {
    /// Resolves the metrics settings of `args` as `run` does (`export` for the resource).
    pub fn resolve(args: &RunArgs, export: &ExportConfig, env: &dyn Fn(&str) -> Option<String>) -> Result<Metrics, ExportError> {
        let config = MetricsConfig::resolve(&args.metrics, &args.export, &export.resource, env)?;
        let (interval, temporality) = metrics::push_timing_from(&args.metrics, env)?;
        Ok(Metrics { config, interval, temporality })
    }
}

/// Writes the effective configuration of `run`: `layered` (the file folded into the arguments)
/// with `export` and `metrics` resolved from it.
pub fn write_config(
    out: &mut dyn Write,
    layered: &Layered,
    export: &ExportConfig,
    metrics: &Metrics,
    matches: &ArgMatches,
    env: &dyn Fn(&str) -> Option<String>,
) -> std::io::Result<()> {
    let file = layered.file.as_ref().map_or("none".to_string(), |p| p.display().to_string());
    writeln!(out, "# effective configuration of `keepalive-agent run` (file: {file})")?;
    writeln!(out, "# precedence: flag, then environment (OTEL_*), then file, then default")?;
    let a = &layered.args;
    let line = |out: &mut dyn Write, key: &str, value: Option<String>| write_line(out, key, value, layered.source(key));
    writeln!(out, "\n[attach]")?;
    line(out, "attach.method", Some(quoted(&enum_name(&a.attach.attach))))?;
    line(out, "attach.probe_answers", Some(quoted(&enum_name(&a.attach.probe_answers))))?;
    line(out, "attach.cgroup", a.attach.cgroup.as_ref().map(|p| quoted(&p.display().to_string())))?;
    line(out, "attach.ringbuf_size", Some(a.attach.ringbuf_size.to_string()))?;
    line(out, "attach.no_snapshot", Some(a.attach.no_snapshot.to_string()))?;
    line(out, "attach.all_closes", Some(a.attach.all_closes.to_string()))?;
    writeln!(out, "\n[filter]")?;
    line(out, "filter.netns", a.netns.as_ref().map(|p| quoted(&p.display().to_string())))?;
    writeln!(out, "\n[limits]")?;
    line(out, "limits.max_connections", Some(a.max_connections.to_string()))?;
    line(out, "limits.shutdown_timeout", Some(seconds(a.shutdown_timeout)))?;
    line(out, "limits.duration", a.duration.map(seconds))?;
    writeln!(out, "\n[export]")?;
    let (endpoint, protocol, headers) = match &export.target {
        Target::Stdout => (None, None, &[][..]),
        Target::Otlp { protocol, endpoint, headers } => (Some(quoted(endpoint)), Some(quoted(protocol.name())), &headers[..]),
    };
    line(out, "export.endpoint", endpoint)?;
    line(out, "export.protocol", protocol)?;
    line(out, "export.timeout_ms", Some(export.timeout.as_millis().to_string()))?;
    line(out, "export.queue_size", Some(export.queue_size.to_string()))?;
    line(out, "export.batch_size", Some(export.batch_size.to_string()))?;
    line(out, "export.batch_delay_ms", Some(export.batch_delay.as_millis().to_string()))?;
    line(out, "export.retry_max_s", Some(export.retry_max.as_secs().to_string()))?;
    line(out, "export.max_span_events", Some(export.max_span_events.to_string()))?;
    let tls = &export.tls;
    let pem = |f: Option<&keepalive_agent::export::tls::PemFile>| f.map(|f| quoted(&f.path.display().to_string()));
    line(out, "export.certificate", pem(tls.ca.as_ref()))?;
    line(out, "export.client_certificate", pem(tls.client.as_ref().map(|(c, _)| c)))?;
    line(out, "export.client_key", pem(tls.client.as_ref().map(|(_, k)| k)))?;
    line(out, "export.insecure", Some(tls.insecure().to_string()))?;
    line(out, "export.spans", Some(quoted(&enum_name(&export.spans))))?;
    line(out, "export.service_name", Some(quoted(&export.service_name())))?;
    for (k, _) in headers {
        let source = pair_source(layered, matches, env, "export.headers", "otlp_headers", k);
        writeln!(out, "headers.{} = {}  # {source}", quoted(k), quoted(REDACTED))?;
    }
    for kv in export.resource.iter().skip(1) {
        let k = kv.key.as_str();
        let source = pair_source(layered, matches, env, "export.resource_attributes", "resource_attributes", k);
        writeln!(out, "resource_attributes.{} = {}  # {source}", quoted(k), quoted(&kv.value.as_str()))?;
    }
    write_metrics(out, layered, metrics, env)
}

/// The `[metrics]` table. The push's endpoint and protocol fall back to the generic export ones
/// (`export.endpoint`, `export.protocol`), whose source is then shown (for the protocol, as the
/// metrics see it: see [`generic_protocol_for_metrics`]).
fn write_metrics(out: &mut dyn Write, layered: &Layered, metrics: &Metrics, env: &dyn Fn(&str) -> Option<String>) -> std::io::Result<()> {
    let line = |out: &mut dyn Write, key: &str, value: Option<String>| write_line(out, key, value, layered.source(key));
    let or_generic = |key: &str, generic: &str| match (layered.source(key), &metrics.config.otlp) {
        (Source::Default, Some(_)) if generic == "export.protocol" => generic_protocol_for_metrics(layered, env),
        (Source::Default, Some(_)) => layered.source(generic),
        (source, _) => source,
    };
    let c = &metrics.config;
    writeln!(out, "\n[metrics]")?;
    line(out, "metrics.listen", c.listen.map(|a| quoted(&a.to_string())))?;
    line(out, "metrics.max_series", Some(c.max_series.to_string()))?;
    line(out, "metrics.peer_labels", Some(c.peer_labels.to_string()))?;
    line(out, "metrics.exporter", Some(quoted(if c.otlp.is_some() { "otlp" } else { "none" })))?;
    let push = c.otlp.as_ref();
    write_line(out, "metrics.endpoint", push.map(|p| quoted(&p.endpoint)), or_generic("metrics.endpoint", "export.endpoint"))?;
    write_line(out, "metrics.protocol", push.map(|p| quoted(p.protocol.name())), or_generic("metrics.protocol", "export.protocol"))?;
    line(out, "metrics.export_interval_ms", Some(metrics.interval.as_millis().to_string()))?;
    line(out, "metrics.temporality", Some(quoted(metrics::temporality_name(metrics.temporality))))?;
    line(out, "metrics.audit_interval", Some(seconds(layered.args.audit_interval)))
}

/// Where the metrics push's protocol came from when no metrics-specific setting gives it: the
/// source of `export.protocol`, except that a traces-specific variable does not apply to the
/// metrics; the generic variable, else the file's `export.protocol` (kept for the metrics under the
/// traces variable), else the default, does.
fn generic_protocol_for_metrics(layered: &Layered, env: &dyn Fn(&str) -> Option<String>) -> Source {
    match layered.source("export.protocol") {
        Source::Env(var) if var.contains("_TRACES_") => {
            let vars = super::layers::SETTINGS.iter().find(|s| s.key == "export.protocol").map_or(&[][..], |s| s.vars);
            match vars.iter().find(|v| !v.contains("_TRACES_") && env_sets(env, v)) {
                Some(generic) => Source::Env(generic),
                None if layered.args.export.file.protocol.is_some() => Source::File,
                None => Source::Default,
            }
        }
        source => source,
    }
}

/// One `key = value  # source` line, or a comment saying what the absence of `key` means.
fn write_line(out: &mut dyn Write, key: &str, value: Option<String>, source: Source) -> std::io::Result<()> {
    let name = key.rsplit('.').next().unwrap_or(key);
    match value {
        Some(v) => writeln!(out, "{name} = {v}  # {source}"),
        None => writeln!(out, "# {name} is not set: {}  # {source}", unset_meaning(key)),
    }
}

/// What the absence of the optional setting `key` means.
fn unset_meaning(key: &str) -> &'static str {
    match key {
        "attach.cgroup" => "the cgroup v2 root, every process",
        "filter.netns" => "every network namespace",
        "limits.duration" => "until SIGINT or SIGTERM",
        "export.endpoint" => "spans are written as JSON lines on stdout",
        "export.protocol" => "no endpoint",
        "export.certificate" => "the system's trust store",
        "export.client_certificate" | "export.client_key" => "no client certificate",
        "metrics.listen" => "no /metrics, /healthz or /readyz endpoint",
        "metrics.endpoint" | "metrics.protocol" => "metrics are not pushed",
        _ => "default",
    }
}

/// Where the entry `key` of a merged table (headers, resource attributes) came from: the flag
/// when one of its `KEY=VALUE` values names it, else the layer that set the table, else (for the
/// resource) the host.
fn pair_source(
    layered: &Layered,
    matches: &ArgMatches,
    env: &dyn Fn(&str) -> Option<String>,
    table: &str,
    flag_id: &str,
    key: &str,
) -> Source {
    let flag_keys = || matches.get_raw(flag_id).into_iter().flatten().filter_map(|v| v.to_str()?.split_once('=')).map(|(k, _)| k.trim().to_ascii_lowercase());
    if given(matches, flag_id) && flag_keys().any(|k| k.eq_ignore_ascii_case(key)) {
        return Source::Flag(long_flag(flag_id));
    }
    let table_source = super::layers::SETTINGS.iter().find(|s| s.key == table).and_then(|s| {
        let var = s.vars.iter().copied().find(|v| env_sets(env, v))?;
        env(var).filter(|list| list_keys(list).any(|k| k.eq_ignore_ascii_case(key))).map(|_| Source::Env(var))
    });
    if let Some(s) = table_source {
        return s;
    }
    match (table, key) {
        ("export.resource_attributes", "host.name" | "host.id" | "os.type") if !file_has(layered, key) => Source::Detected,
        ("export.resource_attributes", "k8s.node.name") if env_sets(env, keepalive_agent::k8s::NODE_NAME_VAR) => {
            Source::Env(keepalive_agent::k8s::NODE_NAME_VAR)
        }
        _ => Source::File,
    }
}

/// Whether the file's resource attributes hold `key` (they were folded into the flags' list).
fn file_has(layered: &Layered, key: &str) -> bool {
    layered.source("export.resource_attributes") != Source::Default
        && layered.args.export.resource_attributes.iter().any(|a| a.split_once('=').is_some_and(|(k, _)| k.trim() == key))
}

/// A TOML string.
fn quoted(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// A clap value enum's name as typed on the command line.
fn enum_name<T: clap::ValueEnum>(v: &T) -> String {
    v.to_possible_value().map_or_else(|| "?".to_string(), |p| p.get_name().to_string())
}

/// Seconds as a TOML number.
fn seconds(d: std::time::Duration) -> String {
    toml::Value::Float(d.as_secs_f64()).to_string()
}
