//! Export configuration: command-line flags, the standard `OTEL_*` environment variables, and how
//! they combine (flags win over the environment; within each, the traces-specific setting wins over
//! the generic one).

use std::time::Duration;

use opentelemetry::KeyValue;

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

    fn parse_env(var: &str, value: &str) -> Result<Protocol, ExportError> {
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
    #[arg(long, value_name = "URL")]
    pub otlp_endpoint: Option<String>,

    /// OTLP traces endpoint, used as given (no path appended); wins over --otlp-endpoint.
    /// [env: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT]
    #[arg(long, value_name = "URL")]
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

    /// Timeout of one export request, in milliseconds [default: 10000]
    /// [env: OTEL_EXPORTER_OTLP_TRACES_TIMEOUT, OTEL_EXPORTER_OTLP_TIMEOUT]
    #[arg(long, value_name = "MS")]
    pub otlp_timeout_ms: Option<u64>,

    /// Spans waiting for export at most; when full, new spans are dropped (counted and logged)
    /// [default: 2048] [env: OTEL_BSP_MAX_QUEUE_SIZE]
    #[arg(long, value_name = "SPANS")]
    pub otlp_queue_size: Option<usize>,

    /// Spans per export request at most [default: 512] [env: OTEL_BSP_MAX_EXPORT_BATCH_SIZE]
    #[arg(long, value_name = "SPANS")]
    pub otlp_batch_size: Option<usize>,

    /// Longest wait before a partial batch is sent, in milliseconds [default: 1000]
    /// [env: OTEL_BSP_SCHEDULE_DELAY]
    #[arg(long, value_name = "MS")]
    pub otlp_batch_delay_ms: Option<u64>,

    /// How long a failing batch is retried (exponential backoff) before it is dropped, in seconds
    /// [default: 300]
    #[arg(long, value_name = "SECONDS")]
    pub otlp_retry_max_s: Option<u64>,

    /// Events kept per span at most; the excess is dropped and counted in the span's
    /// dropped-events count (totals stay exact in the `tcp.keepalive.*` counters)
    /// [default: 128] [env: OTEL_SPAN_EVENT_COUNT_LIMIT]
    #[arg(long, value_name = "EVENTS")]
    pub max_span_events: Option<usize>,

    /// `service.name` of the exported resource [default: keepalive-agent] [env: OTEL_SERVICE_NAME]
    #[arg(long, value_name = "NAME")]
    pub service_name: Option<String>,

    /// Resource attribute added to every span's resource; repeatable, a flag winning for the same key.
    /// [env: OTEL_RESOURCE_ATTRIBUTES, as k1=v1,k2=v2]
    #[arg(long = "resource-attribute", value_name = "KEY=VALUE")]
    pub resource_attributes: Vec<String>,
}

pub const DEFAULT_SERVICE_NAME: &str = "keepalive-agent";
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_QUEUE: usize = 2048;
const DEFAULT_BATCH: usize = 512;
const DEFAULT_BATCH_DELAY: Duration = Duration::from_millis(1000);
const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(300);
pub const DEFAULT_MAX_SPAN_EVENTS: usize = 128;

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
    /// Resource attributes, `service.name` first.
    pub resource: Vec<KeyValue>,
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
        let env = |name: &str| env(name).filter(|v| !v.trim().is_empty());
        // The first of (name, value) that is set.
        let first = |names: &[&'static str]| names.iter().find_map(|n| env(n).map(|v| (*n, v)));

        let protocol = match args.otlp_protocol {
            Some(p) => p,
            None => match first(&[
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                "OTEL_EXPORTER_OTLP_PROTOCOL",
            ]) {
                Some((var, v)) => Protocol::parse_env(var, &v)?,
                None => Protocol::HttpProtobuf,
            },
        };

        // Endpoint: flags before variables; the traces-specific one before the generic one. A
        // traces endpoint is used as given; a generic one gets `/v1/traces` for HTTP.
        let endpoint = if let Some(e) = nonempty(&args.otlp_traces_endpoint) {
            Some(("--otlp-traces-endpoint", e.to_string(), true))
        } else if let Some(e) = nonempty(&args.otlp_endpoint) {
            Some(("--otlp-endpoint", e.to_string(), false))
        } else if let Some(e) = env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
            Some(("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", e, true))
        } else {
            env("OTEL_EXPORTER_OTLP_ENDPOINT").map(|e| ("OTEL_EXPORTER_OTLP_ENDPOINT", e, false))
        };

        let target = match endpoint {
            None => Target::Stdout,
            Some((source, url, signal_specific)) => {
                let url = url.trim();
                check_endpoint(source, url)?;
                let endpoint = if signal_specific || protocol == Protocol::Grpc {
                    url.to_string()
                } else {
                    format!("{}/v1/traces", url.trim_end_matches('/'))
                };
                let mut headers = Vec::new();
                if let Some((var, v)) = first(&[
                    "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
                    "OTEL_EXPORTER_OTLP_HEADERS",
                ]) {
                    for (k, v) in parse_list(var, &v)? {
                        set(&mut headers, k.to_ascii_lowercase(), v);
                    }
                }
                for h in &args.otlp_headers {
                    let (k, v) = parse_pair("--otlp-header", h, false)?;
                    set(&mut headers, k.to_ascii_lowercase(), v);
                }
                for (k, v) in &headers {
                    check_header(k, v)?;
                }
                Target::Otlp {
                    protocol,
                    endpoint,
                    headers,
                }
            }
        };

        let timeout = match args.otlp_timeout_ms {
            Some(ms) => Duration::from_millis(ms),
            None => match first(&[
                "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
                "OTEL_EXPORTER_OTLP_TIMEOUT",
            ]) {
                Some((var, v)) => Duration::from_millis(parse_num(var, &v)?),
                None => DEFAULT_TIMEOUT,
            },
        };
        if timeout.is_zero() {
            return Err(ExportError::config("export timeout", "must be positive"));
        }
        let queue_size = pick(
            args.otlp_queue_size,
            &env,
            "OTEL_BSP_MAX_QUEUE_SIZE",
            DEFAULT_QUEUE,
        )?;
        let batch_size = pick(
            args.otlp_batch_size,
            &env,
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
            DEFAULT_BATCH,
        )?;
        if queue_size == 0 || batch_size == 0 {
            return Err(ExportError::config("queue/batch size", "must be positive"));
        }
        let batch_delay = Duration::from_millis(pick(
            args.otlp_batch_delay_ms,
            &env,
            "OTEL_BSP_SCHEDULE_DELAY",
            DEFAULT_BATCH_DELAY.as_millis() as u64,
        )?);
        let retry_max = args
            .otlp_retry_max_s
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_RETRY_MAX);
        let max_span_events = pick(
            args.max_span_events,
            &env,
            "OTEL_SPAN_EVENT_COUNT_LIMIT",
            DEFAULT_MAX_SPAN_EVENTS,
        )?;

        // Resource: detected facts < OTEL_RESOURCE_ATTRIBUTES < --resource-attribute; service.name:
        // --service-name > --resource-attribute > OTEL_SERVICE_NAME > OTEL_RESOURCE_ATTRIBUTES > default.
        let mut attrs: Vec<(String, String)> = Vec::new();
        if let Some(h) = &host.host_name {
            set(&mut attrs, "host.name".into(), h.clone());
        }
        if let Some(h) = &host.host_id {
            set(&mut attrs, "host.id".into(), h.clone());
        }
        set(&mut attrs, "os.type".into(), "linux".into());
        if let Some(v) = env("OTEL_RESOURCE_ATTRIBUTES") {
            for (k, v) in parse_list("OTEL_RESOURCE_ATTRIBUTES", &v)? {
                set(&mut attrs, k, v);
            }
        }
        let env_service = env("OTEL_SERVICE_NAME");
        let flag_attrs = args
            .resource_attributes
            .iter()
            .map(|a| parse_pair("--resource-attribute", a, true))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(s) = env_service {
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

        Ok(ExportConfig {
            target,
            timeout,
            queue_size,
            batch_size,
            batch_delay,
            retry_max,
            max_span_events,
            resource,
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

fn nonempty(s: &Option<String>) -> Option<&str> {
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

fn pick<T: std::str::FromStr>(
    flag: Option<T>,
    env: &dyn Fn(&str) -> Option<String>,
    var: &str,
    default: T,
) -> Result<T, ExportError> {
    match flag {
        Some(v) => Ok(v),
        None => match env(var) {
            Some(v) => parse_num(var, &v),
            None => Ok(default),
        },
    }
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

fn percent_decode(what: &str, s: &str) -> Result<String, ExportError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| {
                    ExportError::config(what, format!("bad percent-encoding in `{s}`"))
                })?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out)
        .map_err(|_| ExportError::config(what, format!("`{s}` is not UTF-8 once decoded")))
}

fn check_endpoint(source: &str, url: &str) -> Result<(), ExportError> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| ExportError::config(source, format!("invalid URL `{url}`: {e}")))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(ExportError::config(
                source,
                format!("`{url}`: TLS is not built into this agent; use an http:// endpoint (e.g. a local collector)"),
            ))
        }
        _ => {
            return Err(ExportError::config(
                source,
                format!("`{url}` needs an http:// scheme, e.g. http://127.0.0.1:4318"),
            ))
        }
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(ExportError::config(source, format!("`{url}` has no host")));
    }
    Ok(())
}

fn check_header(k: &str, v: &str) -> Result<(), ExportError> {
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
        assert!(bad(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "https://collector:4317")]).contains("TLS"));
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
        assert!(Cli::try_parse_from(["x", "--otlp-protocol", "http/json"]).is_err());
    }
}
