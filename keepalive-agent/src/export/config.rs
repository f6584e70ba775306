//! Export configuration: command-line flags, the standard `OTEL_*` environment variables, the
//! configuration file's generic export keys ([`ExportFile`]), and how they combine (flags win over
//! the environment, which wins over the file; within each, the traces-specific setting wins over
//! the generic one).

use std::time::Duration;

use opentelemetry::KeyValue;

use super::tls::{Signal, TlsArgs, TlsSettings};
use super::ExportError;

/// OTLP transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    /// OTLP/gRPC (usual port 4317).
    #[value(name = "grpc")]
    Grpc,
    /// OTLP/HTTP with protobuf bodies (usual port 4318).
    #[value(name = "http/protobuf", alias = "http")]
    HttpProtobuf,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Grpc => "grpc",
            Protocol::HttpProtobuf => "http/protobuf",
        }
    }

    pub(crate) fn parse_env(var: &str, value: &str) -> Result<Protocol, ExportError> {
        match value.trim() {
            "grpc" => Ok(Protocol::Grpc),
            "http/protobuf" | "http" => Ok(Protocol::HttpProtobuf),
            "http/json" => Err(ExportError::config(
                var,
                "http/json is not supported; use grpc or http/protobuf",
            )),
            other => Err(ExportError::config(
                var,
                format!("unknown protocol `{other}` (grpc, http/protobuf)"),
            )),
        }
    }
}

/// A numeric export setting: its flag, the environment variables it falls back to (the first one
/// set wins), the range it accepts and its default. One table entry serves the flag's parser (clap
/// names the flag in its error) and the environment check (the error names the variable).
#[derive(Clone, Copy, Debug)]
pub struct Numeric {
    /// The flag, e.g. `--otlp-queue-size`.
    pub flag: &'static str,
    /// Variables consulted when the flag is absent, first match wins.
    pub vars: &'static [&'static str],
    /// Smallest accepted value.
    pub min: u64,
    /// Largest accepted value.
    pub max: u64,
    /// Value when neither the flag nor a variable is set.
    pub default: u64,
    /// Unit, for messages (`ms`, `spans`...).
    pub unit: &'static str,
}

impl Numeric {
    /// A clap parser accepting `min..=max` (clap's error names the flag and the range).
    pub fn parser<T>(&self) -> clap::builder::RangedU64ValueParser<T>
    where
        T: TryFrom<u64> + Clone + Send + Sync + 'static,
        <T as TryFrom<u64>>::Error: std::error::Error + Send + Sync + 'static,
    {
        clap::builder::RangedU64ValueParser::<T>::new().range(self.min..=self.max)
    }

    /// The accepted range in words.
    pub fn range_text(&self) -> String {
        match self.min {
            0 => format!("0 to {} {}", self.max, self.unit),
            1 => format!("positive, at most {} {}", self.max, self.unit),
            min => format!("{min} to {} {}", self.max, self.unit),
        }
    }

    /// The value and where it came from (the flag, a variable, or `None` for the default): the
    /// flag when given, else the first variable set, else the default. Out-of-range values are
    /// errors naming their source.
    pub(crate) fn resolve(&self, flag: Option<u64>, env: &Env) -> Result<(u64, Option<&'static str>), ExportError> {
        let (value, source) = match (flag, env.first(self.vars)) {
            (Some(v), _) => (v, self.flag),
            (None, Some((var, text))) => (parse_num(var, &text)?, var),
            (None, None) => return Ok((self.default, None)),
        };
        if !(self.min..=self.max).contains(&value) {
            return Err(ExportError::config(
                source,
                format!("{value} is out of range: must be {}", self.range_text()),
            ));
        }
        Ok((value, Some(source)))
    }
}

/// Timeout of one export request.
pub const TIMEOUT_MS: Numeric = Numeric {
    flag: "--otlp-timeout-ms",
    vars: &["OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT"],
    min: 1,
    max: 3_600_000,
    default: 10_000,
    unit: "ms",
};
/// Spans waiting for export. The upper bound keeps the queue's memory sane (and below tokio's
/// channel limit).
pub const QUEUE_SIZE: Numeric = Numeric {
    flag: "--otlp-queue-size",
    vars: &["OTEL_BSP_MAX_QUEUE_SIZE"],
    min: 1,
    max: 1_048_576,
    default: 2048,
    unit: "spans",
};
/// Spans per export request; never more than the queue holds.
pub const BATCH_SIZE: Numeric = Numeric {
    flag: "--otlp-batch-size",
    vars: &["OTEL_BSP_MAX_EXPORT_BATCH_SIZE"],
    min: 1,
    max: 1_048_576,
    default: 512,
    unit: "spans",
};
/// Longest wait before a partial batch is sent (0: send what is there at once).
pub const BATCH_DELAY_MS: Numeric = Numeric {
    flag: "--otlp-batch-delay-ms",
    vars: &["OTEL_BSP_SCHEDULE_DELAY"],
    min: 0,
    max: 3_600_000,
    default: 1000,
    unit: "ms",
};
/// How long one failing batch is retried (0: never retried).
pub const RETRY_MAX_S: Numeric = Numeric {
    flag: "--otlp-retry-max-s",
    vars: &[],
    min: 0,
    max: 86_400,
    default: 300,
    unit: "s",
};
/// Events per span; at least 2, the slots kept for the events that say how a connection ended.
pub const MAX_SPAN_EVENTS: Numeric = Numeric {
    flag: "--max-span-events",
    vars: &["OTEL_SPAN_EVENT_COUNT_LIMIT"],
    min: 2,
    max: 65_536,
    default: DEFAULT_MAX_SPAN_EVENTS as u64,
    unit: "events",
};

/// OpenTelemetry export options of `keepalive-agent run`.
///
/// Each option falls back to the standard OpenTelemetry environment variable named in its help;
/// a flag always wins over the environment. With no endpoint at all (no flag, no variable), spans
/// are written as JSON lines on stdout.
#[derive(clap::Args, Debug, Clone, Default)]
#[command(next_help_heading = "OpenTelemetry export")]
pub struct ExportArgs {
    /// OTLP endpoint base URL, e.g. http://127.0.0.1:4317 (grpc) or http://127.0.0.1:4318
    /// (http/protobuf, `/v1/traces` is appended). [env: OTEL_EXPORTER_OTLP_ENDPOINT]
    #[arg(long, value_name = "URL", value_parser = endpoint_flag)]
    pub otlp_endpoint: Option<String>,

    /// OTLP traces endpoint, used as given (no path appended); wins over --otlp-endpoint.
    /// [env: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT]
    #[arg(long, value_name = "URL", value_parser = endpoint_flag)]
    pub otlp_traces_endpoint: Option<String>,

    /// OTLP transport [default: http/protobuf]
    /// [env: OTEL_EXPORTER_OTLP_TRACES_PROTOCOL, OTEL_EXPORTER_OTLP_PROTOCOL]
    #[arg(long, value_enum, value_name = "PROTOCOL")]
    pub otlp_protocol: Option<Protocol>,

    /// Header (HTTP) or metadata (gRPC) sent with every export request; repeatable. Merged with the
    /// environment's, a flag winning for the same key.
    /// [env: OTEL_EXPORTER_OTLP_TRACES_HEADERS, OTEL_EXPORTER_OTLP_HEADERS, as k1=v1,k2=v2]
    #[arg(long = "otlp-header", value_name = "KEY=VALUE")]
    pub otlp_headers: Vec<String>,

    /// Timeout of one export request, in milliseconds, 1 to 3600000 [default: 10000]
    /// [env: OTEL_EXPORTER_OTLP_TRACES_TIMEOUT, OTEL_EXPORTER_OTLP_TIMEOUT]
    #[arg(long, value_name = "MS", value_parser = TIMEOUT_MS.parser::<u64>(), allow_negative_numbers = true)]
    pub otlp_timeout_ms: Option<u64>,

    /// Spans waiting for export at most, 1 to 1048576; when full, new spans are dropped (counted
    /// and logged) [default: 2048] [env: OTEL_BSP_MAX_QUEUE_SIZE]
    #[arg(long, value_name = "SPANS", value_parser = QUEUE_SIZE.parser::<usize>(), allow_negative_numbers = true)]
    pub otlp_queue_size: Option<usize>,

    /// Spans per export request at most, 1 to the queue size [default: 512, or the queue size if
    /// smaller] [env: OTEL_BSP_MAX_EXPORT_BATCH_SIZE]
    #[arg(long, value_name = "SPANS", value_parser = BATCH_SIZE.parser::<usize>(), allow_negative_numbers = true)]
    pub otlp_batch_size: Option<usize>,

    /// Longest wait before a partial batch is sent, in milliseconds, 0 to 3600000 [default: 1000]
    /// [env: OTEL_BSP_SCHEDULE_DELAY]
    #[arg(long, value_name = "MS", value_parser = BATCH_DELAY_MS.parser::<u64>(), allow_negative_numbers = true)]
    pub otlp_batch_delay_ms: Option<u64>,

    /// How long a failing batch is retried (exponential backoff) before it is dropped, in seconds,
    /// 0 (no retry) to 86400 [default: 300]
    #[arg(long, value_name = "SECONDS", value_parser = RETRY_MAX_S.parser::<u64>(), allow_negative_numbers = true)]
    pub otlp_retry_max_s: Option<u64>,

    /// Events kept per span at most, 2 to 65536; the excess is dropped and counted in the span's
    /// dropped-events count (totals stay exact in the `tcp.keepalive.*` counters)
    /// [default: 128] [env: OTEL_SPAN_EVENT_COUNT_LIMIT]
    #[arg(long, value_name = "EVENTS", value_parser = MAX_SPAN_EVENTS.parser::<usize>(), allow_negative_numbers = true)]
    pub max_span_events: Option<usize>,

    /// Which spans are exported: problems (connections with an episode needing a second probe, a
    /// timeout, a reset or an error: their connection span, problem episodes and last healthy
    /// episode; healthy connections only count in the metrics) or all [default: problems]
    #[arg(long, value_enum, value_name = "POLICY")]
    pub spans: Option<super::spans::SpanPolicy>,

    /// `service.name` of the exported resource [default: keepalive-agent] [env: OTEL_SERVICE_NAME]
    #[arg(long, value_name = "NAME")]
    pub service_name: Option<String>,

    /// Resource attribute added to every span's resource; repeatable, a flag winning for the same key.
    /// [env: OTEL_RESOURCE_ATTRIBUTES, as k1=v1,k2=v2]
    #[arg(long = "resource-attribute", value_name = "KEY=VALUE")]
    pub resource_attributes: Vec<String>,

    /// TLS to the collector (https:// endpoints).
    #[command(flatten)]
    pub tls: TlsArgs,

    /// The configuration file's generic keys shared by traces and metrics (not flags: they rank
    /// below every variable).
    #[arg(skip)]
    pub file: ExportFile,
}

/// The configuration file's export keys that both signals share (`export.protocol`,
/// `export.timeout_ms`, `[export.headers]`; the TLS keys are in
/// [`TlsFile`](super::tls::TlsFile)), kept apart from the
/// flags so that each signal ranks them below all of its variables: the traces below
/// `OTEL_EXPORTER_OTLP_TRACES_*` and the generic ones, the metrics push below
/// `OTEL_EXPORTER_OTLP_METRICS_*` and the generic ones. Empty without a file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportFile {
    pub protocol: Option<Protocol>,
    pub timeout_ms: Option<u64>,
    /// `[export.headers]`, in key order.
    pub headers: Vec<(String, String)>,
}

/// The protocol of a signal: the flags (`flags`, strongest first), else the first of the signal's
/// variables `vars` set, else the file's `export.protocol`, else HTTP/protobuf.
pub(crate) fn protocol_from(flags: &[Option<Protocol>], env: &Env, vars: &[&'static str], file: &ExportFile) -> Result<Protocol, ExportError> {
    if let Some(p) = flags.iter().find_map(|p| *p) {
        return Ok(p);
    }
    match env.first(vars) {
        Some((var, v)) => Protocol::parse_env(var, &v),
        None => Ok(file.protocol.unwrap_or(Protocol::HttpProtobuf)),
    }
}

/// The request timeout of a signal in milliseconds: `--otlp-timeout-ms`, else the first of
/// `numeric`'s variables, else the file's `export.timeout_ms`, else the default (range-checked,
/// the source named).
pub(crate) fn timeout_from(numeric: &Numeric, flag: Option<u64>, env: &Env, file: &ExportFile) -> Result<u64, ExportError> {
    match (flag, env.first(numeric.vars), file.timeout_ms) {
        (None, None, Some(ms)) => Ok(ms),
        _ => numeric.resolve(flag, env).map(|(ms, _)| ms),
    }
}

pub const DEFAULT_SERVICE_NAME: &str = "keepalive-agent";
pub const DEFAULT_MAX_SPAN_EVENTS: usize = 128;

/// Compression variables: the exporter crate reads them itself but ignores a value it does not
/// know without a word, so they are checked here first.
const COMPRESSION_VARS: &[&str] = &["OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "OTEL_EXPORTER_OTLP_COMPRESSION"];

/// Where spans go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// JSON lines on stdout (no endpoint configured).
    Stdout,
    Otlp {
        protocol: Protocol,
        /// The full URL requests go to (for HTTP, including `/v1/traces`).
        endpoint: String,
        /// Lower-case names, in the order they were resolved; later entries never repeat a key.
        headers: Vec<(String, String)>,
    },
}

/// The resolved export configuration.
#[derive(Clone, Debug)]
pub struct ExportConfig {
    pub target: Target,
    pub timeout: Duration,
    pub queue_size: usize,
    pub batch_size: usize,
    pub batch_delay: Duration,
    pub retry_max: Duration,
    pub max_span_events: usize,
    /// Which spans are exported.
    pub spans: super::spans::SpanPolicy,
    /// Resource attributes, `service.name` first.
    pub resource: Vec<KeyValue>,
    /// TLS settings (used by https:// endpoints; files checked even when unused).
    pub tls: TlsSettings,
}

/// The numeric part of [`ExportConfig`].
struct Limits {
    timeout: Duration,
    queue_size: usize,
    batch_size: usize,
    batch_delay: Duration,
    retry_max: Duration,
    max_span_events: usize,
}

/// The environment as a lookup function; empty variables count as unset, as the OpenTelemetry
/// specification asks.
pub(crate) struct Env<'a>(pub(crate) &'a dyn Fn(&str) -> Option<String>);

impl Env<'_> {
    pub(crate) fn get(&self, name: &str) -> Option<String> {
        (self.0)(name).filter(|v| !v.trim().is_empty())
    }

    /// The first of `names` that is set, with its value.
    pub(crate) fn first(&self, names: &[&'static str]) -> Option<(&'static str, String)> {
        names.iter().find_map(|n| self.get(n).map(|v| (*n, v)))
    }
}

impl ExportConfig {
    /// Resolves flags against the process environment.
    pub fn from_args(args: &ExportArgs) -> Result<ExportConfig, ExportError> {
        Self::resolve(args, &|name| std::env::var(name).ok(), &host_facts())
    }

    /// Resolves flags against an environment given as a lookup function (tests pass their own).
    /// Empty variables count as unset, as the OpenTelemetry specification asks.
    pub fn resolve(
        args: &ExportArgs,
        env: &dyn Fn(&str) -> Option<String>,
        host: &HostFacts,
    ) -> Result<ExportConfig, ExportError> {
        let env = Env(env);
        let protocol = resolve_protocol(args, &env)?;
        let tls = TlsSettings::resolve(&args.tls, Signal::Traces, env.0)?;
        let target = match pick_endpoint(args, &env) {
            None => Target::Stdout,
            Some(endpoint) => endpoint.into_target(protocol, args, &env, &tls)?,
        };
        check_compression(&env)?;
        let limits = resolve_limits(args, &env)?;
        let resource = resolve_resource(args, &env, host)?;
        Ok(ExportConfig {
            target,
            timeout: limits.timeout,
            queue_size: limits.queue_size,
            batch_size: limits.batch_size,
            batch_delay: limits.batch_delay,
            retry_max: limits.retry_max,
            max_span_events: limits.max_span_events,
            spans: args.spans.unwrap_or_default(),
            resource,
            tls,
        })
    }

    /// The resource's `service.name`.
    pub fn service_name(&self) -> String {
        self.resource
            .iter()
            .find(|kv| kv.key.as_str() == "service.name")
            .map(|kv| kv.value.as_str().into_owned())
            .unwrap_or_default()
    }
}

/// `--otlp-protocol`, else the traces-specific variable, else the generic one, else the file's,
/// else HTTP/protobuf.
fn resolve_protocol(args: &ExportArgs, env: &Env) -> Result<Protocol, ExportError> {
    protocol_from(&[args.otlp_protocol], env, &["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"], &args.file)
}

/// A configured endpoint before it is checked.
struct Endpoint {
    /// The flag or variable it came from.
    source: &'static str,
    url: String,
    /// A traces endpoint is used as given; a generic one gets `/v1/traces` for HTTP.
    signal_specific: bool,
}

impl Endpoint {
    /// Checks the URL (a scheme-less gRPC one gets its scheme from `INSECURE`), resolves the
    /// headers and builds the OTLP target.
    fn into_target(self, protocol: Protocol, args: &ExportArgs, env: &Env, tls: &TlsSettings) -> Result<Target, ExportError> {
        let url = tls.apply_scheme(self.source, self.url.trim(), protocol == Protocol::Grpc)?;
        let url = url.as_str();
        check_endpoint(self.source, url)?;
        let headers = resolve_headers(args, env)?;
        let endpoint = if self.signal_specific || protocol == Protocol::Grpc {
            url.to_string()
        } else {
            format!("{}/v1/traces", url.trim_end_matches('/'))
        };
        Ok(Target::Otlp { protocol, endpoint, headers })
    }
}

/// The endpoint: flags before variables; the traces-specific one before the generic one.
fn pick_endpoint(args: &ExportArgs, env: &Env) -> Option<Endpoint> {
    let ep = |source, url: String, signal_specific| Endpoint { source, url, signal_specific };
    if let Some(e) = nonempty(&args.otlp_traces_endpoint) {
        Some(ep("--otlp-traces-endpoint", e.to_string(), true))
    } else if let Some(e) = nonempty(&args.otlp_endpoint) {
        Some(ep("--otlp-endpoint", e.to_string(), false))
    } else if let Some(e) = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
        Some(ep("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", e, true))
    } else {
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT").map(|e| ep("OTEL_EXPORTER_OTLP_ENDPOINT", e, false))
    }
}

/// Export headers: the traces-specific variable (or else the generic one, or else the file's
/// table), then `--otlp-header` flags over them, keys lower-cased; each checked as an HTTP header.
fn resolve_headers(args: &ExportArgs, env: &Env) -> Result<Vec<(String, String)>, ExportError> {
    headers_from(&args.otlp_headers, env, &["OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS"], &args.file)
}

/// Export headers: the first of `vars` set (it replaces the file's `[export.headers]` table, else
/// used), then the `--otlp-header` values `flags` over them, keys lower-cased; each checked as an
/// HTTP header.
pub(crate) fn headers_from(flags: &[String], env: &Env, vars: &[&'static str], file: &ExportFile) -> Result<Vec<(String, String)>, ExportError> {
    let mut headers = Vec::new();
    match env.first(vars) {
        Some((var, v)) => {
            for (k, v) in parse_list(var, &v)? {
                set(&mut headers, k.to_ascii_lowercase(), v);
            }
        }
        None => {
            for (k, v) in &file.headers {
                set(&mut headers, k.to_ascii_lowercase(), v.clone());
            }
        }
    }
    for h in flags {
        let (k, v) = parse_pair("--otlp-header", h, false)?;
        set(&mut headers, k.to_ascii_lowercase(), v);
    }
    for (k, v) in &headers {
        check_header(k, v)?;
    }
    Ok(headers)
}

/// Rejects a compression variable the exporter would silently ignore (only gzip is built in).
fn check_compression(env: &Env) -> Result<(), ExportError> {
    for var in COMPRESSION_VARS {
        if let Some(v) = env.get(var) {
            if !["gzip", "none"].contains(&v.trim().to_ascii_lowercase().as_str()) {
                return Err(ExportError::config(
                    *var,
                    format!("unsupported compression `{}` (gzip, none)", v.trim()),
                ));
            }
        }
    }
    Ok(())
}

/// Timeout, queue, batch, retry and span-event limits, each range-checked with its source named.
/// A batch size given explicitly may not exceed the queue size; the default one is lowered to it.
fn resolve_limits(args: &ExportArgs, env: &Env) -> Result<Limits, ExportError> {
    let timeout_ms = timeout_from(&TIMEOUT_MS, args.otlp_timeout_ms, env, &args.file)?;
    let (queue_size, queue_src) = QUEUE_SIZE.resolve(args.otlp_queue_size.map(|v| v as u64), env)?;
    let (batch_size, batch_src) = BATCH_SIZE.resolve(args.otlp_batch_size.map(|v| v as u64), env)?;
    let batch_size = match batch_src {
        Some(src) if batch_size > queue_size => {
            return Err(ExportError::config(
                src,
                format!(
                    "{batch_size} is larger than the queue ({queue_size} spans, {}): a batch is taken from the queue",
                    queue_src.unwrap_or("the default")
                ),
            ))
        }
        _ => batch_size.min(queue_size),
    };
    let (batch_delay_ms, _) = BATCH_DELAY_MS.resolve(args.otlp_batch_delay_ms, env)?;
    let (retry_max_s, _) = RETRY_MAX_S.resolve(args.otlp_retry_max_s, env)?;
    let (max_span_events, _) = MAX_SPAN_EVENTS.resolve(args.max_span_events.map(|v| v as u64), env)?;
    // Every maximum fits in usize and in Duration.
    Ok(Limits {
        timeout: Duration::from_millis(timeout_ms),
        queue_size: queue_size as usize,
        batch_size: batch_size as usize,
        batch_delay: Duration::from_millis(batch_delay_ms),
        retry_max: Duration::from_secs(retry_max_s),
        max_span_events: max_span_events as usize,
    })
}

/// Resource: detected facts < OTEL_RESOURCE_ATTRIBUTES < --resource-attribute; service.name:
/// --service-name > --resource-attribute > OTEL_SERVICE_NAME > OTEL_RESOURCE_ATTRIBUTES > default.
fn resolve_resource(args: &ExportArgs, env: &Env, host: &HostFacts) -> Result<Vec<KeyValue>, ExportError> {
    let mut attrs: Vec<(String, String)> = Vec::new();
    if let Some(h) = &host.host_name {
        set(&mut attrs, "host.name".into(), h.clone());
    }
    if let Some(h) = &host.host_id {
        set(&mut attrs, "host.id".into(), h.clone());
    }
    set(&mut attrs, "os.type".into(), "linux".into());
    if let Some(v) = env.get("OTEL_RESOURCE_ATTRIBUTES") {
        for (k, v) in parse_list("OTEL_RESOURCE_ATTRIBUTES", &v)? {
            set(&mut attrs, k, v);
        }
    }
    let flag_attrs = args
        .resource_attributes
        .iter()
        .map(|a| parse_pair("--resource-attribute", a, true))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(s) = env.get("OTEL_SERVICE_NAME") {
        set(&mut attrs, "service.name".into(), s);
    }
    for (k, v) in flag_attrs {
        set(&mut attrs, k, v);
    }
    if let Some(s) = nonempty(&args.service_name) {
        set(&mut attrs, "service.name".into(), s.to_string());
    }
    let service = match attrs.iter().position(|(k, _)| k == "service.name") {
        Some(i) => attrs.remove(i).1,
        None => DEFAULT_SERVICE_NAME.to_string(),
    };
    let mut resource = vec![KeyValue::new("service.name", service)];
    resource.extend(attrs.into_iter().map(|(k, v)| KeyValue::new(k, v)));
    Ok(resource)
}

/// Facts about the host that go into the resource.
#[derive(Clone, Debug, Default)]
pub struct HostFacts {
    /// `gethostname(2)`.
    pub host_name: Option<String>,
    /// `/etc/machine-id` (the semantic conventions' `host.id` on Linux).
    pub host_id: Option<String>,
}

/// Reads [`HostFacts`] from this machine.
pub fn host_facts() -> HostFacts {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates on success when the
    // name fits (we reserve the last byte anyway).
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len() - 1) };
    let host_name = (rc == 0)
        .then(|| {
            let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
            String::from_utf8_lossy(&buf[..end]).into_owned()
        })
        .filter(|s| !s.is_empty());
    let host_id = std::fs::read_to_string("/etc/machine-id")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty());
    HostFacts { host_name, host_id }
}

pub(crate) fn nonempty(s: &Option<String>) -> Option<&str> {
    s.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

/// Sets `key` to `value`, replacing an earlier value of the same key in place.
fn set(list: &mut Vec<(String, String)>, key: String, value: String) {
    match list.iter_mut().find(|(k, _)| *k == key) {
        Some(e) => e.1 = value,
        None => list.push((key, value)),
    }
}

fn parse_num<T: std::str::FromStr>(var: &str, v: &str) -> Result<T, ExportError> {
    v.trim()
        .parse()
        .map_err(|_| ExportError::config(var, format!("`{v}` is not a non-negative integer")))
}

/// `KEY=VALUE` from a flag (taken literally) or, with `decode`, percent-decoded as in the
/// environment variables.
fn parse_pair(what: &str, s: &str, decode: bool) -> Result<(String, String), ExportError> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| ExportError::config(what, format!("`{s}` is not KEY=VALUE")))?;
    let k = k.trim();
    if k.is_empty() {
        return Err(ExportError::config(what, format!("`{s}` has an empty key")));
    }
    let v = if decode {
        percent_decode(what, v.trim())?
    } else {
        v.trim().to_string()
    };
    Ok((k.to_string(), v))
}

/// `k1=v1,k2=v2` as in `OTEL_RESOURCE_ATTRIBUTES` and `OTEL_EXPORTER_OTLP_HEADERS` (values
/// percent-encoded, surrounding whitespace ignored). Any malformed entry is an error: a daemon
/// should refuse a configuration it cannot honour rather than silently drop part of it.
fn parse_list(var: &str, s: &str) -> Result<Vec<(String, String)>, ExportError> {
    s.split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(|e| {
            let (k, v) = parse_pair(var, e, true)?;
            Ok((percent_decode(var, &k)?, v))
        })
        .collect()
}

/// Percent-decodes `s` (a value of `OTEL_RESOURCE_ATTRIBUTES` or `OTEL_EXPORTER_OTLP_HEADERS`).
/// `%` must start a two-digit hex escape: the crate passes malformed escapes through, this refuses them.
fn percent_decode(what: &str, s: &str) -> Result<String, ExportError> {
    let well_formed = s
        .split('%')
        .skip(1)
        .all(|rest| rest.get(..2).is_some_and(|h| h.bytes().all(|b| b.is_ascii_hexdigit())));
    if !well_formed {
        return Err(ExportError::config(what, format!("bad percent-encoding in `{s}`")));
    }
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(std::borrow::Cow::into_owned)
        .map_err(|_| ExportError::config(what, format!("`{s}` is not UTF-8 once decoded")))
}

/// `--otlp-*endpoint` flags, checked as the command line is parsed (a bad one is a usage error,
/// exit 2, like every other flag); empty means unset.
pub fn endpoint_flag(s: &str) -> Result<String, String> {
    match check_endpoint("", s) {
        _ if s.is_empty() => Ok(String::new()),
        Ok(()) => Ok(s.to_string()),
        Err(ExportError::Config { reason, .. }) => Err(reason),
        Err(e) => Err(e.to_string()),
    }
}

/// Checks an endpoint URL (`source` names the flag, variable or key in errors).
pub fn check_endpoint(source: &str, url: &str) -> Result<(), ExportError> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| ExportError::config(source, format!("invalid URL `{url}`: {e}")))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => {
            return Err(ExportError::config(
                source,
                format!("`{url}` needs an http:// or https:// scheme, e.g. http://127.0.0.1:4318"),
            ))
        }
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(ExportError::config(source, format!("`{url}` has no host")));
    }
    Ok(())
}

/// Checks one export header (name and value).
pub fn check_header(k: &str, v: &str) -> Result<(), ExportError> {
    http::HeaderName::from_bytes(k.as_bytes()).map_err(|_| {
        ExportError::config("OTLP header", format!("`{k}` is not a valid header name"))
    })?;
    http::HeaderValue::from_str(v).map_err(|_| {
        ExportError::config(
            "OTLP header",
            format!("the value of `{k}` is not a valid header value"),
        )
    })?;
    if k.ends_with("-bin") {
        return Err(ExportError::config(
            "OTLP header",
            format!("`{k}`: binary (-bin) metadata is not supported"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn resolve(args: &ExportArgs, env: &[(&str, &str)]) -> Result<ExportConfig, ExportError> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let host = HostFacts {
            host_name: Some("box1".into()),
            host_id: Some("abc".into()),
        };
        ExportConfig::resolve(args, &move |n| env.get(n).cloned(), &host)
    }

    fn otlp(c: &ExportConfig) -> (Protocol, &str, &[(String, String)]) {
        match &c.target {
            Target::Otlp {
                protocol,
                endpoint,
                headers,
            } => (*protocol, endpoint, headers),
            Target::Stdout => panic!("expected OTLP target"),
        }
    }

    fn res(c: &ExportConfig, key: &str) -> Option<String> {
        c.resource
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| kv.value.as_str().into_owned())
    }

    #[test]
    fn no_endpoint_means_stdout() {
        let c = resolve(
            &ExportArgs::default(),
            &[("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")],
        )
        .unwrap();
        assert_eq!(c.target, Target::Stdout);
        // An empty variable is unset.
        let c = resolve(
            &ExportArgs::default(),
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", "  ")],
        )
        .unwrap();
        assert_eq!(c.target, Target::Stdout);
        assert_eq!(c.queue_size, 2048);
        assert_eq!(c.max_span_events, 128);
    }

    #[test]
    fn generic_http_endpoint_gets_signal_path() {
        let c = resolve(
            &ExportArgs::default(),
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318/")],
        )
        .unwrap();
        assert_eq!(otlp(&c).0, Protocol::HttpProtobuf);
        assert_eq!(otlp(&c).1, "http://127.0.0.1:4318/v1/traces");
        // Traces-specific variable: used as given, and wins over the generic one.
        let c = resolve(
            &ExportArgs::default(),
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318"),
                (
                    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                    "http://127.0.0.1:9999/custom",
                ),
            ],
        )
        .unwrap();
        assert_eq!(otlp(&c).1, "http://127.0.0.1:9999/custom");
        // gRPC: no path appended.
        let c = resolve(
            &ExportArgs::default(),
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ],
        )
        .unwrap();
        assert_eq!(otlp(&c), (Protocol::Grpc, "http://127.0.0.1:4317", &[][..]));
    }

    #[test]
    fn schemeless_grpc_endpoint_follows_insecure() {
        let grpc = |extra: &[(&'static str, &'static str)]| {
            let mut env = vec![("OTEL_EXPORTER_OTLP_ENDPOINT", "127.0.0.1:4317"), ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")];
            env.extend_from_slice(extra);
            resolve(&ExportArgs::default(), &env).map(|c| otlp(&c).1.to_string())
        };
        // The specification's default (INSECURE=false) is TLS.
        assert_eq!(grpc(&[]).unwrap(), "https://127.0.0.1:4317");
        assert_eq!(grpc(&[("OTEL_EXPORTER_OTLP_INSECURE", "true")]).unwrap(), "http://127.0.0.1:4317");
        // The traces-specific variable wins over the generic one; the flag over both.
        assert_eq!(
            grpc(&[("OTEL_EXPORTER_OTLP_INSECURE", "true"), ("OTEL_EXPORTER_OTLP_TRACES_INSECURE", "false")]).unwrap(),
            "https://127.0.0.1:4317"
        );
        let args = ExportArgs {
            otlp_traces_endpoint: Some("localhost:4317".into()),
            otlp_protocol: Some(Protocol::Grpc),
            tls: TlsArgs { otlp_insecure: Some(true), ..Default::default() },
            ..Default::default()
        };
        let c = resolve(&args, &[("OTEL_EXPORTER_OTLP_INSECURE", "false")]).unwrap();
        assert_eq!(otlp(&c).1, "http://localhost:4317");
        // An explicit scheme is used as given.
        assert_eq!(grpc(&[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://h:1")]).unwrap(), "http://h:1");
    }

    #[test]
    fn flags_win_over_environment() {
        let args = ExportArgs {
            otlp_endpoint: Some("http://127.0.0.1:5000".into()),
            otlp_protocol: Some(Protocol::Grpc),
            otlp_headers: vec!["Authorization=Bearer flag".into(), "x-extra=a=b".into()],
            otlp_timeout_ms: Some(1500),
            service_name: Some("svc-flag".into()),
            resource_attributes: vec!["deployment.environment.name=prod".into()],
            otlp_queue_size: Some(7),
            ..Default::default()
        };
        let env = [
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "http://127.0.0.1:6000/v1/traces",
            ),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "authorization=Bearer%20env,x-tenant=t1",
            ),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "99"),
            ("OTEL_SERVICE_NAME", "svc-env"),
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "deployment.environment.name=dev,team=net",
            ),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "9"),
        ];
        let c = resolve(&args, &env).unwrap();
        let (p, e, h) = otlp(&c);
        assert_eq!(p, Protocol::Grpc);
        // A flag endpoint (even the generic one) beats any variable.
        assert_eq!(e, "http://127.0.0.1:5000");
        assert_eq!(
            h,
            &[
                ("authorization".to_string(), "Bearer flag".to_string()),
                ("x-tenant".to_string(), "t1".to_string()),
                ("x-extra".to_string(), "a=b".to_string()),
            ][..]
        );
        assert_eq!(c.timeout, Duration::from_millis(1500));
        assert_eq!(c.queue_size, 7);
        assert_eq!(c.service_name(), "svc-flag");
        assert_eq!(
            res(&c, "deployment.environment.name").as_deref(),
            Some("prod")
        );
        assert_eq!(res(&c, "team").as_deref(), Some("net"));
        assert_eq!(res(&c, "host.name").as_deref(), Some("box1"));
        assert_eq!(res(&c, "host.id").as_deref(), Some("abc"));
        assert_eq!(c.resource[0].key.as_str(), "service.name");
    }

    #[test]
    fn environment_alone() {
        let env = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://[::1]:4318"),
            ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "a=1"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "b=2"),
            ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "2500"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "1"),
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "service.name=from-attrs, host.name=override%2C1",
            ),
            ("OTEL_SPAN_EVENT_COUNT_LIMIT", "1000"),
        ];
        let c = resolve(&ExportArgs::default(), &env).unwrap();
        let (p, e, h) = otlp(&c);
        assert_eq!(
            (p, e),
            (Protocol::HttpProtobuf, "http://[::1]:4318/v1/traces")
        );
        // The traces-specific variable replaces the generic one entirely (as the spec says).
        assert_eq!(h, &[("a".to_string(), "1".to_string())][..]);
        assert_eq!(c.timeout, Duration::from_millis(2500));
        assert_eq!(c.service_name(), "from-attrs");
        assert_eq!(res(&c, "host.name").as_deref(), Some("override,1"));
        assert_eq!(c.max_span_events, 1000);
        // OTEL_SERVICE_NAME wins over service.name in OTEL_RESOURCE_ATTRIBUTES.
        let mut env2 = env.to_vec();
        env2.push(("OTEL_SERVICE_NAME", "svc"));
        assert_eq!(
            resolve(&ExportArgs::default(), &env2)
                .unwrap()
                .service_name(),
            "svc"
        );
        // ...and a --resource-attribute service.name flag wins over OTEL_SERVICE_NAME.
        let args = ExportArgs {
            resource_attributes: vec!["service.name=flagattr".into()],
            ..Default::default()
        };
        assert_eq!(resolve(&args, &env2).unwrap().service_name(), "flagattr");
        assert_eq!(
            resolve(&ExportArgs::default(), &[]).unwrap().service_name(),
            "keepalive-agent"
        );
    }

    #[test]
    fn rejects_bad_configuration() {
        let bad = |env: &[(&str, &str)]| {
            resolve(&ExportArgs::default(), env)
                .unwrap_err()
                .to_string()
        };
        assert!(bad(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "127.0.0.1:4317")]).contains("http://"));
        assert!(bad(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "ftp://collector:4317")]).contains("https://"));
        assert!(bad(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "https://collector:4318"), ("OTEL_EXPORTER_OTLP_INSECURE", "true")])
            .starts_with("OTEL_EXPORTER_OTLP_INSECURE"));
        assert!(bad(&[("OTEL_EXPORTER_OTLP_INSECURE", "yes")]).starts_with("OTEL_EXPORTER_OTLP_INSECURE"));
        assert!(bad(&[("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", "/nonexistent/ca.pem")])
            .starts_with("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE: cannot read /nonexistent/ca.pem"));
        assert!(bad(&[
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://h:1")
        ])
        .contains("not supported"));
        assert!(bad(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://h:1"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "novalue")
        ])
        .contains("OTEL_EXPORTER_OTLP_HEADERS"));
        assert!(bad(&[("OTEL_RESOURCE_ATTRIBUTES", "a=%zz")]).contains("percent"));
        assert!(bad(&[("OTEL_BSP_MAX_QUEUE_SIZE", "-1")]).contains("OTEL_BSP_MAX_QUEUE_SIZE"));
        assert!(bad(&[("OTEL_BSP_MAX_QUEUE_SIZE", "0")]).contains("positive"));
        let args = ExportArgs {
            otlp_endpoint: Some("http://h:1".into()),
            otlp_headers: vec!["bad header=x".into()],
            ..Default::default()
        };
        assert!(resolve(&args, &[])
            .unwrap_err()
            .to_string()
            .contains("header name"));
    }

    #[test]
    fn numeric_settings_are_range_checked_naming_their_source() {
        let bad = |args: &ExportArgs, env: &[(&str, &str)]| resolve(args, env).unwrap_err().to_string();
        let none = ExportArgs::default();
        for (var, value) in [
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "0"),
            ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "3600001"),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "1048577"),
            ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "0"),
            ("OTEL_BSP_SCHEDULE_DELAY", "99999999999"),
            ("OTEL_SPAN_EVENT_COUNT_LIMIT", "1"),
            ("OTEL_SPAN_EVENT_COUNT_LIMIT", "18446744073709551616"),
        ] {
            let e = bad(&none, &[(var, value)]);
            assert!(e.starts_with(var), "{var}={value}: {e}");
        }
        assert!(bad(&none, &[("OTEL_EXPORTER_OTLP_TIMEOUT", "0")]).contains("at most 3600000 ms"));
        // Flags are checked the same way when the struct is built by hand.
        let args = ExportArgs { otlp_retry_max_s: Some(86_401), ..Default::default() };
        assert!(bad(&args, &[]).starts_with("--otlp-retry-max-s"));
        // The traces-specific timeout is the one named when both are set.
        let e = bad(&none, &[("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "0"), ("OTEL_EXPORTER_OTLP_TIMEOUT", "5")]);
        assert!(e.starts_with("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT"), "{e}");
        // Boundaries are accepted.
        let c = resolve(
            &none,
            &[("OTEL_BSP_SCHEDULE_DELAY", "0"), ("OTEL_SPAN_EVENT_COUNT_LIMIT", "2"), ("OTEL_EXPORTER_OTLP_TIMEOUT", "1")],
        )
        .unwrap();
        assert_eq!((c.batch_delay, c.max_span_events, c.timeout), (Duration::ZERO, 2, Duration::from_millis(1)));
    }

    #[test]
    fn batch_never_exceeds_the_queue() {
        // An explicit batch larger than the queue is an error naming both.
        let args = ExportArgs { otlp_queue_size: Some(100), otlp_batch_size: Some(101), ..Default::default() };
        let e = resolve(&args, &[]).unwrap_err().to_string();
        assert!(e.starts_with("--otlp-batch-size") && e.contains("--otlp-queue-size"), "{e}");
        let e = resolve(&ExportArgs::default(), &[("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "4096")]).unwrap_err().to_string();
        assert!(e.starts_with("OTEL_BSP_MAX_EXPORT_BATCH_SIZE") && e.contains("2048"), "{e}");
        // The default batch is lowered to a small queue; equal sizes are fine.
        let args = ExportArgs { otlp_queue_size: Some(100), ..Default::default() };
        assert_eq!(resolve(&args, &[]).unwrap().batch_size, 100);
        let c = resolve(&ExportArgs::default(), &[("OTEL_BSP_MAX_QUEUE_SIZE", "64"), ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "64")]).unwrap();
        assert_eq!((c.queue_size, c.batch_size), (64, 64));
    }

    #[test]
    fn compression_variables_are_checked() {
        let e = resolve(&ExportArgs::default(), &[("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "zstd")]).unwrap_err();
        assert!(e.to_string().starts_with("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION"), "{e}");
        let e = resolve(&ExportArgs::default(), &[("OTEL_EXPORTER_OTLP_COMPRESSION", "gz")]).unwrap_err();
        assert!(e.to_string().starts_with("OTEL_EXPORTER_OTLP_COMPRESSION"), "{e}");
        for ok in ["gzip", "GZIP", "none", " None "] {
            resolve(&ExportArgs::default(), &[("OTEL_EXPORTER_OTLP_COMPRESSION", ok)]).unwrap();
        }
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("v", "a%20b%2C%e2%82%ac").unwrap(), "a b,\u{20ac}");
        assert_eq!(percent_decode("v", "plain").unwrap(), "plain");
        for bad in ["%", "%2", "x%g0", "%2%20"] {
            let e = percent_decode("OTEL_X", bad).unwrap_err().to_string();
            assert!(e.starts_with("OTEL_X") && e.contains("percent"), "{bad}: {e}");
        }
        assert!(percent_decode("OTEL_X", "%ff").unwrap_err().to_string().contains("UTF-8"));
    }

    #[test]
    fn clap_rejects_out_of_range_flags() {
        use clap::Parser;
        #[derive(Parser, Debug)]
        struct Cli {
            #[command(flatten)]
            export: ExportArgs,
        }
        for (flag, value) in [
            ("--otlp-timeout-ms", "0"),
            ("--otlp-queue-size", "0"),
            ("--otlp-batch-size", "0"),
            ("--otlp-batch-delay-ms", "3600001"),
            ("--otlp-retry-max-s", "-1"),
            ("--max-span-events", "1"),
        ] {
            let e = Cli::try_parse_from(["x", flag, value]).unwrap_err();
            assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation, "{flag} {value}");
            assert!(e.to_string().contains(flag), "{e}");
        }
        let cli = Cli::try_parse_from(["x", "--otlp-batch-delay-ms", "0", "--max-span-events", "65536"]).unwrap();
        assert_eq!((cli.export.otlp_batch_delay_ms, cli.export.max_span_events), (Some(0), Some(65536)));
    }

    #[test]
    fn clap_parses_the_flags() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            export: ExportArgs,
        }
        let cli = Cli::try_parse_from([
            "x",
            "--otlp-endpoint",
            "http://127.0.0.1:4317",
            "--otlp-protocol",
            "http/protobuf",
            "--otlp-header",
            "a=1",
            "--otlp-header",
            "b=2",
            "--resource-attribute",
            "k=v",
            "--otlp-queue-size",
            "10",
        ])
        .unwrap();
        assert_eq!(cli.export.otlp_protocol, Some(Protocol::HttpProtobuf));
        assert_eq!(cli.export.otlp_headers, vec!["a=1", "b=2"]);
        assert_eq!(cli.export.otlp_queue_size, Some(10));
        let cli = Cli::try_parse_from(["x", "--otlp-protocol", "grpc"]).unwrap();
        assert_eq!(cli.export.otlp_protocol, Some(Protocol::Grpc));
        // TLS flags: a bare --otlp-insecure means true.
        let cli = Cli::try_parse_from(["x", "--otlp-insecure", "--otlp-certificate", "/ca.pem"]).unwrap();
        assert_eq!((cli.export.tls.otlp_insecure, cli.export.tls.otlp_certificate), (Some(true), Some("/ca.pem".into())));
        let cli = Cli::try_parse_from(["x", "--otlp-insecure", "false"]).unwrap();
        assert_eq!(cli.export.tls.otlp_insecure, Some(false));
        assert!(Cli::try_parse_from(["x", "--otlp-insecure", "maybe"]).is_err());
        assert!(Cli::try_parse_from(["x", "--otlp-protocol", "http/json"]).is_err());
    }
}
