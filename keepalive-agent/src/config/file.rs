//! The TOML configuration file of `keepalive-agent run`: its schema and its loading.
//!
//! Every table denies unknown keys, and every value is checked with the same rules as the flag it
//! stands for (the same parser functions, the same ranges), during deserialisation: an error then
//! carries the TOML span of the offending key or value, which [`load`] turns into
//! `FILE:LINE:COLUMN: key `a.b`: why`.
//!
//! Adding a table (e.g. `[metrics]`) is one struct here, one field of [`FileConfig`], and its
//! rows in `layers::SETTINGS`.

use std::{collections::BTreeMap, path::{Path, PathBuf}, time::Duration};

use keepalive_agent::{attach, export::config as export, metrics::config as metrics};
use opentelemetry_sdk::metrics::Temporality;
use serde::{Deserialize, Deserializer};

/// The whole file. Every table and key is optional; absent keys fall through to the defaults.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// `[attach]`.
    #[serde(default)]
    pub attach: AttachFile,
    /// `[filter]`.
    #[serde(default)]
    pub filter: FilterFile,
    /// `[limits]`.
    #[serde(default)]
    pub limits: LimitsFile,
    /// `[export]`.
    #[serde(default)]
    pub export: ExportFile,
    /// `[metrics]`.
    #[serde(default)]
    pub metrics: MetricsFile,
}

/// `[attach]`: the options every attaching command shares (`--attach`, `--cgroup`...).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachFile {
    /// `--attach`.
    #[serde(default, deserialize_with = "de::method")]
    pub method: Option<attach::Method>,
    /// `--probe-answers`.
    #[serde(default, deserialize_with = "de::answers")]
    pub probe_answers: Option<attach::Answers>,
    /// `--cgroup`.
    #[serde(default, deserialize_with = "de::cgroup")]
    pub cgroup: Option<PathBuf>,
    /// `--ringbuf-size`.
    #[serde(default, deserialize_with = "de::ringbuf_size")]
    pub ringbuf_size: Option<u32>,
    /// `--no-snapshot`.
    #[serde(default)]
    pub no_snapshot: Option<bool>,
    /// `--all-closes`.
    #[serde(default)]
    pub all_closes: Option<bool>,
}

/// `[filter]`: which connections are followed.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterFile {
    /// `--netns`.
    #[serde(default, deserialize_with = "de::netns")]
    pub netns: Option<PathBuf>,
}

/// `[limits]`: sizes and times.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    /// `--max-connections`.
    #[serde(default, deserialize_with = "de::max_connections")]
    pub max_connections: Option<usize>,
    /// `--shutdown-timeout`, in seconds.
    #[serde(default, deserialize_with = "de::shutdown_timeout")]
    pub shutdown_timeout: Option<Duration>,
    /// `--duration`, in seconds.
    #[serde(default, deserialize_with = "de::duration")]
    pub duration: Option<Duration>,
}

/// `[export]`: the OpenTelemetry export (`--otlp-*`, `--service-name`...).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportFile {
    /// `--otlp-endpoint` (HTTP: `/v1/traces` appended).
    #[serde(default, deserialize_with = "de::endpoint")]
    pub endpoint: Option<String>,
    /// `--otlp-traces-endpoint` (used as given).
    #[serde(default, deserialize_with = "de::endpoint")]
    pub traces_endpoint: Option<String>,
    /// `--otlp-protocol`.
    #[serde(default, deserialize_with = "de::protocol")]
    pub protocol: Option<export::Protocol>,
    /// Header name → value (secrets: `config` never prints the values).
    #[serde(default, deserialize_with = "de::headers")]
    pub headers: Option<BTreeMap<String, String>>,
    /// `--otlp-timeout-ms`.
    #[serde(default, deserialize_with = "de::timeout_ms")]
    pub timeout_ms: Option<u64>,
    /// `--otlp-queue-size`.
    #[serde(default, deserialize_with = "de::queue_size")]
    pub queue_size: Option<usize>,
    /// `--otlp-batch-size`.
    #[serde(default, deserialize_with = "de::batch_size")]
    pub batch_size: Option<usize>,
    /// `--otlp-batch-delay-ms`.
    #[serde(default, deserialize_with = "de::batch_delay_ms")]
    pub batch_delay_ms: Option<u64>,
    /// `--otlp-retry-max-s`.
    #[serde(default, deserialize_with = "de::retry_max_s")]
    pub retry_max_s: Option<u64>,
    /// `--max-span-events`.
    #[serde(default, deserialize_with = "de::max_span_events")]
    pub max_span_events: Option<usize>,
    /// `--otlp-certificate` (a readable file).
    #[serde(default, deserialize_with = "de::pem_file")]
    pub certificate: Option<PathBuf>,
    /// `--otlp-client-certificate`.
    #[serde(default, deserialize_with = "de::pem_file")]
    pub client_certificate: Option<PathBuf>,
    /// `--otlp-client-key`.
    #[serde(default, deserialize_with = "de::pem_file")]
    pub client_key: Option<PathBuf>,
    /// `--otlp-insecure`.
    #[serde(default)]
    pub insecure: Option<bool>,
    /// `--spans`.
    #[serde(default, deserialize_with = "de::spans")]
    pub spans: Option<keepalive_agent::export::spans::SpanPolicy>,
    /// `--service-name`.
    #[serde(default, deserialize_with = "de::service_name")]
    pub service_name: Option<String>,
    /// Resource attribute → value, added to every span's resource.
    #[serde(default, deserialize_with = "de::resource_attributes")]
    pub resource_attributes: Option<BTreeMap<String, String>>,
}

/// `[metrics]`: the metrics endpoint and push (`--metrics-*`, `--otlp-metrics-*`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsFile {
    /// `--metrics-listen`.
    #[serde(default, deserialize_with = "de::listen")]
    pub listen: Option<std::net::SocketAddr>,
    /// `--metrics-max-series`.
    #[serde(default, deserialize_with = "de::max_series")]
    pub max_series: Option<usize>,
    /// `--metrics-peer-labels`.
    #[serde(default)]
    pub peer_labels: Option<bool>,
    /// `--metrics-exporter`.
    #[serde(default, deserialize_with = "de::exporter")]
    pub exporter: Option<String>,
    /// `--otlp-metrics-endpoint` (used as given).
    #[serde(default, deserialize_with = "de::endpoint")]
    pub endpoint: Option<String>,
    /// `--otlp-metrics-protocol`.
    #[serde(default, deserialize_with = "de::protocol")]
    pub protocol: Option<export::Protocol>,
    /// `--metrics-export-interval-ms`.
    #[serde(default, deserialize_with = "de::export_interval_ms")]
    pub export_interval_ms: Option<u64>,
    /// `--metrics-temporality`.
    #[serde(default, deserialize_with = "de::temporality")]
    pub temporality: Option<Temporality>,
    /// `--audit-interval`, in seconds (0: off).
    #[serde(default, deserialize_with = "de::audit_interval")]
    pub audit_interval: Option<Duration>,
}

/// A configuration file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The file cannot be read.
    #[error("reading the configuration file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Not TOML.
    #[error("{path}:{line}:{column}: TOML syntax: {message}")]
    Syntax { path: PathBuf, line: usize, column: usize, message: String },
    /// Unknown key, wrong type or bad value; `key` is the dotted path (`export.queue_size`).
    #[error("{path}:{line}:{column}: key `{key}`: {message}")]
    Invalid { path: PathBuf, line: usize, column: usize, key: String, message: String },
}

/// Reads and checks the file at `path`.
pub fn load(path: &Path) -> Result<FileConfig, FileError> {
    let text = std::fs::read_to_string(path).map_err(|source| FileError::Read { path: path.to_path_buf(), source })?;
    parse(path, &text)
}

/// Parses `text` (the contents of `path`, named in errors).
pub fn parse(path: &Path, text: &str) -> Result<FileConfig, FileError> {
    let at = |err: &toml::de::Error| err.span().map_or((1, 1), |s| line_column(text, s.start));
    let de = toml::Deserializer::parse(text).map_err(|e| {
        let (line, column) = at(&e);
        FileError::Syntax { path: path.to_path_buf(), line, column, message: e.message().trim().to_string() }
    })?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let (line, column) = at(e.inner());
        let message = e.inner().message().trim().to_string();
        FileError::Invalid { path: path.to_path_buf(), line, column, key: e.path().to_string(), message }
    })
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (before.matches('\n').count() + 1, before[line_start..].chars().count() + 1)
}

/// `deserialize_with` functions: each reads the TOML value and checks it with the rule of the flag
/// it stands for.
mod de {
    use super::*;
    use serde::de::Error as _;

    type Res<T, E> = Result<Option<T>, E>;

    /// Why the exporter's check refused a value (the key is named by the caller).
    fn reason(e: keepalive_agent::export::ExportError) -> String {
        match e {
            keepalive_agent::export::ExportError::Config { reason, .. } => reason,
            other => other.to_string(),
        }
    }

    /// A string checked by a flag's parser.
    fn text<'de, D: Deserializer<'de>, T>(d: D, parse: fn(&str) -> Result<T, String>) -> Res<T, D::Error> {
        let s = String::deserialize(d)?;
        parse(&s).map(Some).map_err(D::Error::custom)
    }

    /// A number of seconds (integer or float) checked by a flag's parser.
    fn seconds<'de, D: Deserializer<'de>>(d: D, parse: fn(&str) -> Result<Duration, String>) -> Res<Duration, D::Error> {
        let v = f64::deserialize(d)?;
        parse(&v.to_string()).map(Some).map_err(D::Error::custom)
    }

    /// An integer in `min..=max`.
    fn ranged<'de, D: Deserializer<'de>, T: TryFrom<u64>>(d: D, min: u64, max: u64, what: &str) -> Res<T, D::Error> {
        let v = i64::deserialize(d)?;
        u64::try_from(v)
            .ok()
            .filter(|v| (min..=max).contains(v))
            .and_then(|v| T::try_from(v).ok())
            .map(Some)
            .ok_or_else(|| D::Error::custom(format!("{v} is out of range: must be {what}")))
    }

    /// An export setting of the numeric table (same range as its flag and variables).
    fn numeric<'de, D: Deserializer<'de>, T: TryFrom<u64>>(d: D, n: &export::Numeric) -> Res<T, D::Error> {
        ranged(d, n.min, n.max, &n.range_text())
    }

    /// One of a clap value enum's names.
    fn value_enum<'de, D: Deserializer<'de>, T: clap::ValueEnum>(d: D) -> Res<T, D::Error> {
        let s = String::deserialize(d)?;
        T::from_str(&s, false).map(Some).map_err(|_| {
            let names: Vec<String> =
                T::value_variants().iter().filter_map(T::to_possible_value).map(|p| p.get_name().to_string()).collect();
            D::Error::custom(format!("unknown value `{s}` (one of: {})", names.join(", ")))
        })
    }

    /// A table of `KEY = "value"` pairs; keys may not hold `=` (they travel as `KEY=VALUE`).
    fn pairs<'de, D: Deserializer<'de>>(d: D) -> Res<BTreeMap<String, String>, D::Error> {
        let map = BTreeMap::<String, String>::deserialize(d)?;
        match map.keys().find(|k| k.trim().is_empty() || k.contains('=')) {
            Some(k) => Err(D::Error::custom(format!("`{k}` is not a valid name (empty, or holds `=`)"))),
            None => Ok(Some(map)),
        }
    }

    pub fn method<'de, D: Deserializer<'de>>(d: D) -> Res<attach::Method, D::Error> {
        value_enum(d)
    }
    pub fn answers<'de, D: Deserializer<'de>>(d: D) -> Res<attach::Answers, D::Error> {
        value_enum(d)
    }
    pub fn protocol<'de, D: Deserializer<'de>>(d: D) -> Res<export::Protocol, D::Error> {
        value_enum(d)
    }
    pub fn cgroup<'de, D: Deserializer<'de>>(d: D) -> Res<PathBuf, D::Error> {
        text(d, crate::parse_cgroup)
    }
    pub fn netns<'de, D: Deserializer<'de>>(d: D) -> Res<PathBuf, D::Error> {
        text(d, crate::parse_netns)
    }
    pub fn ringbuf_size<'de, D: Deserializer<'de>>(d: D) -> Res<u32, D::Error> {
        let v = i64::deserialize(d)?;
        crate::parse_ringbuf_size(&v.to_string()).map(Some).map_err(D::Error::custom)
    }
    pub fn max_connections<'de, D: Deserializer<'de>>(d: D) -> Res<usize, D::Error> {
        ranged(d, 1, crate::MAX_CONNECTIONS, &format!("from 1 to {}", crate::MAX_CONNECTIONS))
    }
    pub fn shutdown_timeout<'de, D: Deserializer<'de>>(d: D) -> Res<Duration, D::Error> {
        seconds(d, crate::parse_shutdown_timeout)
    }
    pub fn duration<'de, D: Deserializer<'de>>(d: D) -> Res<Duration, D::Error> {
        seconds(d, crate::parse_duration)
    }
    pub fn endpoint<'de, D: Deserializer<'de>>(d: D) -> Res<String, D::Error> {
        text(d, |s| export::check_endpoint("endpoint", s.trim()).map(|()| s.trim().to_string()).map_err(reason))
    }
    pub fn headers<'de, D: Deserializer<'de>>(d: D) -> Res<BTreeMap<String, String>, D::Error> {
        let map = pairs(d)?.unwrap_or_default();
        let map: BTreeMap<String, String> = map.into_iter().map(|(k, v)| (k.to_ascii_lowercase(), v)).collect();
        for (k, v) in &map {
            export::check_header(k, v).map_err(|e| D::Error::custom(reason(e)))?;
        }
        Ok(Some(map))
    }
    pub fn resource_attributes<'de, D: Deserializer<'de>>(d: D) -> Res<BTreeMap<String, String>, D::Error> {
        pairs(d)
    }
    pub fn service_name<'de, D: Deserializer<'de>>(d: D) -> Res<String, D::Error> {
        text(d, |s| if s.trim().is_empty() { Err("must not be empty".into()) } else { Ok(s.trim().to_string()) })
    }
    pub fn timeout_ms<'de, D: Deserializer<'de>>(d: D) -> Res<u64, D::Error> {
        numeric(d, &export::TIMEOUT_MS)
    }
    pub fn queue_size<'de, D: Deserializer<'de>>(d: D) -> Res<usize, D::Error> {
        numeric(d, &export::QUEUE_SIZE)
    }
    pub fn batch_size<'de, D: Deserializer<'de>>(d: D) -> Res<usize, D::Error> {
        numeric(d, &export::BATCH_SIZE)
    }
    pub fn batch_delay_ms<'de, D: Deserializer<'de>>(d: D) -> Res<u64, D::Error> {
        numeric(d, &export::BATCH_DELAY_MS)
    }
    pub fn retry_max_s<'de, D: Deserializer<'de>>(d: D) -> Res<u64, D::Error> {
        numeric(d, &export::RETRY_MAX_S)
    }
    pub fn max_span_events<'de, D: Deserializer<'de>>(d: D) -> Res<usize, D::Error> {
        numeric(d, &export::MAX_SPAN_EVENTS)
    }
    /// A file the agent can open (the TLS files are read at start-up; this names the key).
    pub fn pem_file<'de, D: Deserializer<'de>>(d: D) -> Res<PathBuf, D::Error> {
        text(d, |s| match std::fs::File::open(s) {
            Ok(_) => Ok(PathBuf::from(s)),
            Err(e) => Err(format!("{s}: {e}")),
        })
    }
    pub fn spans<'de, D: Deserializer<'de>>(d: D) -> Res<keepalive_agent::export::spans::SpanPolicy, D::Error> {
        value_enum(d)
    }
    pub fn listen<'de, D: Deserializer<'de>>(d: D) -> Res<std::net::SocketAddr, D::Error> {
        text(d, |s| s.parse().map_err(|e| format!("`{s}` is not an ADDR:PORT: {e}")))
    }
    pub fn max_series<'de, D: Deserializer<'de>>(d: D) -> Res<usize, D::Error> {
        numeric(d, &metrics::MAX_SERIES)
    }
    pub fn exporter<'de, D: Deserializer<'de>>(d: D) -> Res<String, D::Error> {
        text(d, |s| match metrics::EXPORTERS.contains(&s) {
            true => Ok(s.to_string()),
            false => Err(format!("unknown value `{s}` (one of: {})", metrics::EXPORTERS.join(", "))),
        })
    }
    pub fn export_interval_ms<'de, D: Deserializer<'de>>(d: D) -> Res<u64, D::Error> {
        numeric(d, &metrics::EXPORT_INTERVAL_MS)
    }
    pub fn audit_interval<'de, D: Deserializer<'de>>(d: D) -> Res<Duration, D::Error> {
        seconds(d, crate::parse_audit_interval)
    }
    pub fn temporality<'de, D: Deserializer<'de>>(d: D) -> Res<Temporality, D::Error> {
        text(d, metrics::parse_temporality)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        parse(Path::new("/etc/k.toml"), text).unwrap_err().to_string()
    }

    #[test]
    fn every_key_parses() {
        let text = r#"
[attach]
method = "raw-tracepoint"
probe_answers = "always"
cgroup = "/proc/../sys/fs/cgroup"
ringbuf_size = 65536
no_snapshot = true
[limits]
max_connections = 10
shutdown_timeout = 1
duration = 0.5
[export]
endpoint = "http://127.0.0.1:4317"
traces_endpoint = "http://127.0.0.1:4318/v1/traces"
protocol = "grpc"
headers = { Authorization = "Bearer x" }
timeout_ms = 1
queue_size = 5
batch_size = 5
batch_delay_ms = 0
retry_max_s = 0
max_span_events = 2
certificate = "/proc/self/status"
client_certificate = "/proc/self/status"
client_key = "/proc/self/status"
insecure = true
spans = "all"
service_name = "svc"
resource_attributes = { "k8s.cluster.name" = "c1" }
[metrics]
listen = "[::1]:9464"
max_series = 10
peer_labels = true
exporter = "otlp"
endpoint = "http://127.0.0.1:4318/v1/metrics"
protocol = "http/protobuf"
export_interval_ms = 100
temporality = "Delta"
audit_interval = 0
"#;
        // The cgroup check needs a cgroup2 mount; drop the key where there is none.
        let text = match keepalive_agent::attach::cgroup2_mount() {
            Some(root) => text.replace("/proc/../sys/fs/cgroup", root.to_str().unwrap()),
            None => text.replace("cgroup = \"/proc/../sys/fs/cgroup\"\n", ""),
        };
        let f = parse(Path::new("k.toml"), &text).unwrap();
        assert_eq!(f.attach.method, Some(attach::Method::RawTracepoint));
        assert_eq!(f.attach.probe_answers, Some(attach::Answers::Always));
        assert_eq!((f.attach.ringbuf_size, f.attach.no_snapshot), (Some(65536), Some(true)));
        assert_eq!(f.limits.max_connections, Some(10));
        assert_eq!(f.limits.shutdown_timeout, Some(Duration::from_secs(1)));
        assert_eq!(f.limits.duration, Some(Duration::from_millis(500)));
        assert_eq!(f.export.protocol, Some(export::Protocol::Grpc));
        // Header names are lower-cased as the exporter sends them.
        assert_eq!(f.export.headers.unwrap().get("authorization").map(String::as_str), Some("Bearer x"));
        assert_eq!((f.export.queue_size, f.export.batch_delay_ms, f.export.max_span_events), (Some(5), Some(0), Some(2)));
        assert_eq!(f.export.service_name.as_deref(), Some("svc"));
        assert_eq!(f.export.spans, Some(keepalive_agent::export::spans::SpanPolicy::All));
        assert_eq!((f.export.certificate.as_deref(), f.export.insecure), (Some(Path::new("/proc/self/status")), Some(true)));
        assert!(f.export.client_certificate.is_some() && f.export.client_key.is_some());
        let m = &f.metrics;
        assert_eq!((m.listen, m.max_series, m.peer_labels), (Some("[::1]:9464".parse().unwrap()), Some(10), Some(true)));
        assert_eq!((m.exporter.as_deref(), m.endpoint.as_deref()), (Some("otlp"), Some("http://127.0.0.1:4318/v1/metrics")));
        assert_eq!((m.protocol, m.export_interval_ms, m.temporality), (Some(export::Protocol::HttpProtobuf), Some(100), Some(Temporality::Delta)));
        // An empty file is all defaults.
        let f = parse(Path::new("k.toml"), "").unwrap();
        assert!(f.attach.method.is_none() && f.export.endpoint.is_none());
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let e = err("[attach]\nmethod = \"auto\"\nmethd = \"auto\"\n");
        assert!(e.starts_with("/etc/k.toml:3:1: key `attach.methd`: unknown field `methd`"), "{e}");
        let e = err("# comment\n[limits]\nmax_connections = \"many\"\n");
        assert!(e.starts_with("/etc/k.toml:3:19: key `limits.max_connections`: invalid type: string"), "{e}");
        let e = err("[export]\nqueue_size = 0\n");
        assert!(e.starts_with("/etc/k.toml:2:14: key `export.queue_size`: 0 is out of range: must be positive, at most 1048576 spans"), "{e}");
        let e = err("\n\n[metric]\n");
        assert!(e.starts_with("/etc/k.toml:3:2: key `metric`: unknown field `metric`"), "{e}");
        let e = err("[limits]\nduration = -1\n");
        assert!(e.contains(":2:12: key `limits.duration`: must be a number of seconds from 0 to 31536000"), "{e}");
        let e = err("[limits]\nduration = nan\n");
        assert!(e.contains("key `limits.duration`"), "{e}");
        let e = err("[attach]\nringbuf_size = 5000\n");
        assert!(e.contains(":2:16: key `attach.ringbuf_size`: 5000 is not a power of two"), "{e}");
        let e = err("[attach]\nno_snapshot = \"yes\"\n");
        assert!(e.contains("key `attach.no_snapshot`: invalid type: string \"yes\", expected a boolean"), "{e}");
        let e = err("[attach]\ncgroup = \"/nonexistent-keepalive\"\n");
        assert!(e.contains("key `attach.cgroup`: /nonexistent-keepalive"), "{e}");
        let e = err("[filter]\nnetns = \"/proc/self/ns/uts\"\n");
        assert!(e.contains("key `filter.netns`") && e.contains("not a network namespace"), "{e}");
        let e = err("[attach]\nmethod = \"fast\"\n");
        assert!(e.contains("key `attach.method`: unknown value `fast` (one of: auto, fentry"), "{e}");
        let e = err("[export]\nendpoint = \"127.0.0.1:4318\"\n");
        assert!(e.contains("key `export.endpoint`: `127.0.0.1:4318` needs an http:// or https:// scheme"), "{e}");
        let e = err("[export.headers]\n\"bad name\" = \"x\"\n");
        assert!(e.contains("key `export.headers`") && e.contains("not a valid header name"), "{e}");
        let e = err("[export]\nservice_name = \" \"\n");
        assert!(e.contains("key `export.service_name`: must not be empty"), "{e}");
        let e = err("[export]\ncertificate = \"/nonexistent/ca.pem\"\n");
        assert!(e.contains(":2:15: key `export.certificate`: /nonexistent/ca.pem: No such file"), "{e}");
        let e = err("[export]\nspans = \"some\"\n");
        assert!(e.contains("key `export.spans`: unknown value `some` (one of: problems, all)"), "{e}");
        // [metrics]: the flags' rules.
        let e = err("[metrics]\nlisten = \"9464\"\n");
        assert!(e.contains(":2:10: key `metrics.listen`: `9464` is not an ADDR:PORT"), "{e}");
        let e = err("[metrics]\nmax_series = 1\n");
        assert!(e.contains("key `metrics.max_series`: 1 is out of range: must be 2 to 1000000 series"), "{e}");
        let e = err("[metrics]\nexporter = \"statsd\"\n");
        assert!(e.contains("key `metrics.exporter`: unknown value `statsd` (one of: otlp, prometheus, none)"), "{e}");
        let e = err("[metrics]\nendpoint = \"ftp://x\"\n");
        assert!(e.contains("key `metrics.endpoint`") && e.contains("scheme"), "{e}");
        let e = err("[metrics]\nexport_interval_ms = 99\n");
        assert!(e.contains("key `metrics.export_interval_ms`: 99 is out of range: must be 100 to 86400000 ms"), "{e}");
        let e = err("[metrics]\ntemporality = \"sometimes\"\n");
        assert!(e.contains("key `metrics.temporality`: unknown temporality preference `sometimes`"), "{e}");
        assert_eq!(parse(Path::new("k.toml"), "[metrics]\naudit_interval = 0\n").unwrap().metrics.audit_interval, Some(Duration::ZERO));
        let e = err("[metrics]\naudit_interval = 0.5\n");
        assert!(e.contains(":2:18: key `metrics.audit_interval`: must be 0 (off) or a number of seconds from 1 to 86400"), "{e}");
        let e = err("[metrics]\npeer_labels = 1\n");
        assert!(e.contains("key `metrics.peer_labels`: invalid type: integer `1`, expected a boolean"), "{e}");
        let e = err("[metrics]\nlisten_addr = \"x\"\n");
        assert!(e.contains(":2:1: key `metrics.listen_addr`: unknown field"), "{e}");
        let e = err("[export\n");
        assert!(e.starts_with("/etc/k.toml:1:8: TOML syntax"), "{e}");
    }

    #[test]
    fn line_and_column_count_characters() {
        assert_eq!(line_column("ab\ncd", 0), (1, 1));
        assert_eq!(line_column("ab\ncd", 4), (2, 2));
        assert_eq!(line_column("é=1\nx", 3), (1, 3));
    }
}
