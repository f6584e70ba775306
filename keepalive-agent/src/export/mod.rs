//! OpenTelemetry export of keep-alive timelines (`keepalive-agent run`).
//!
//! [`Exporter`] turns the timeline engine's [`Record`]s into spans ([`spans`], the span model
//! documented in README.md, "OpenTelemetry traces") and delivers them over OTLP/gRPC or OTLP/HTTP-protobuf
//! through a bounded, retrying pipeline ([`pipeline`]), or, with no endpoint configured, writes them
//! as JSON lines on stdout ([`json`]). Configuration comes from [`ExportArgs`] and the standard
//! `OTEL_*` variables ([`config`]).
//!
//! The event loop calls [`Exporter::on_records`] with each batch of records: it never waits on the
//! network. At exit, [`Exporter::shutdown`] ends the spans of connections still open and flushes
//! within a deadline.

pub mod config;
pub mod json;
pub mod pipeline;
pub mod spans;
pub mod tls;

use std::fmt;
use std::future::Future;
use std::io::Write;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use opentelemetry::KeyValue;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::trace::{SpanData, SpanExporter as _};

use crate::clock::{monotonic_now_ns, WallClock};
use crate::container::CgroupResolver;
use crate::timeline::Record;

pub use config::{ExportArgs, ExportConfig, Protocol, Target};
use pipeline::{Pipeline, PipelineConfig};
use spans::{FinishCounts, SpanModel};

/// Errors setting up the exporter.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// A flag or environment variable has a value we cannot use.
    #[error("{what}: {reason}")]
    Config { what: String, reason: String },
    /// The OTLP exporter could not be built.
    #[error("building the OTLP {protocol} exporter for {endpoint}")]
    Build {
        protocol: &'static str,
        endpoint: String,
        #[source]
        source: opentelemetry_otlp::ExporterBuildError,
    },
    /// OTLP export runs on tokio; `from_args` was called outside a runtime.
    #[error("the OTLP exporter must be created inside a tokio runtime")]
    NoRuntime,
}

impl ExportError {
    pub(crate) fn config(what: impl Into<String>, reason: impl Into<String>) -> Self {
        ExportError::Config {
            what: what.into(),
            reason: reason.into(),
        }
    }
}

/// Export counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ExportStats {
    /// Spans built from records (connection and episode spans).
    pub spans_created: u64,
    /// Spans the span policy did not export (`--spans problems`: healthy connections).
    pub spans_withheld: u64,
    /// Spans delivered: acknowledged by the collector, or written to stdout.
    pub spans_exported: u64,
    /// Spans dropped because the export queue was full.
    pub spans_dropped: u64,
    /// Spans dropped after their export failed for good (permanent error, retries exhausted,
    /// stdout write error).
    pub spans_failed: u64,
    /// Export attempts (requests, or writes) that failed.
    pub export_errors: u64,
    /// Export attempts that repeated a failed one.
    pub retries: u64,
    /// Spans waiting in the queue now.
    pub queued: u64,
}

impl fmt::Display for ExportStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} spans created, {} withheld by the span policy, {} exported, {} dropped (queue full), {} failed, {} export errors, {} retries, {} queued",
            self.spans_created,
            self.spans_withheld,
            self.spans_exported,
            self.spans_dropped,
            self.spans_failed,
            self.export_errors,
            self.retries,
            self.queued
        )
    }
}

/// What [`Exporter::shutdown`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ExportReport {
    /// Final counters.
    pub stats: ExportStats,
    /// Connection spans ended at shutdown because their connection was still open
    /// (`tcp.keepalive.incomplete = true`).
    pub open_connections_ended: u64,
    /// Episode spans ended at shutdown because probing was in progress.
    pub open_episodes_ended: u64,
    /// Spans neither delivered nor counted as failed when the deadline passed (lost).
    pub unsent: u64,
    /// Everything was delivered or definitively failed before the deadline.
    pub flushed: bool,
    /// Time the shutdown took.
    #[serde(serialize_with = "ser_duration_ms")]
    pub elapsed: Duration,
}

fn ser_duration_ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1e3)
}

impl fmt::Display for ExportReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}; {} open connections and {} open episodes ended at shutdown; {} spans unsent; {} in {:.0} ms",
            self.stats,
            self.open_connections_ended,
            self.open_episodes_ended,
            self.unsent,
            if self.flushed { "flushed" } else { "NOT flushed" },
            self.elapsed.as_secs_f64() * 1e3
        )
    }
}

/// Text kept for the next batch of JSON lines at most (a larger batch's buffer is shrunk to it).
const JSON_BUF_KEEP: usize = 1 << 20;

enum Sink {
    Json {
        out: Box<dyn Write + Send>,
        writer: json::SpanWriter,
        /// The batch's lines, written at once; reused from batch to batch.
        text: Vec<u8>,
        exported: u64,
        failed: u64,
        errors: u64,
        warned_at: Option<Instant>,
    },
    Otlp(Pipeline),
}

/// The exporter: span model plus delivery. See the module documentation.
pub struct Exporter {
    model: SpanModel,
    sink: Sink,
    resource: Vec<KeyValue>,
    description: String,
    buf: Vec<SpanData>,
    cgroups: Option<CgroupResolver>,
}

/// Span attribute: the container of the connection's process (from its cgroup path).
pub const CONTAINER_ID: &str = "container.id";
/// Span attribute: the Kubernetes pod of the connection's process (from the kubelet's cgroup naming).
pub const K8S_POD_UID: &str = "k8s.pod.uid";
/// Span attribute: that pod's QoS class (`Guaranteed`, `Burstable`, `BestEffort`).
pub const POD_QOS_CLASS: &str = "tcp.keepalive.pod.qos_class";

/// Adds [`CONTAINER_ID`], [`K8S_POD_UID`] and [`POD_QOS_CLASS`] to each span whose process cgroup
/// (`tcp.keepalive.process.cgroup_id`) `cgroups` resolves to a container or pod.
fn annotate(cgroups: &mut CgroupResolver, spans: &mut [SpanData]) {
    for span in spans {
        let id = span.attributes.iter().find(|kv| kv.key.as_str() == spans::names::CGROUP_ID).and_then(|kv| match kv.value {
            opentelemetry::Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        });
        let Some(info) = id.and_then(|id| cgroups.resolve(id)) else { continue };
        if let Some(c) = info.container_id {
            span.attributes.push(KeyValue::new(CONTAINER_ID, c));
        }
        if let Some(pod) = info.pod {
            span.attributes.push(KeyValue::new(K8S_POD_UID, pod.uid));
            span.attributes.push(KeyValue::new(POD_QOS_CLASS, pod.qos.name()));
        }
    }
}

impl fmt::Debug for Exporter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Exporter")
            .field("target", &self.description)
            .finish()
    }
}

impl Exporter {
    /// Builds the exporter from flags and the environment. With an OTLP endpoint it must be called
    /// inside a tokio runtime (it spawns the delivery task there); with none, spans go to stdout.
    pub fn from_args(args: &ExportArgs) -> Result<Exporter, ExportError> {
        Self::from_config(ExportConfig::from_args(args)?)
    }

    /// Builds the exporter from a resolved configuration.
    pub fn from_config(cfg: ExportConfig) -> Result<Exporter, ExportError> {
        match &cfg.target {
            Target::Stdout => Ok(Self::with_json_writer(&cfg, Box::new(std::io::stdout()))),
            Target::Otlp {
                protocol,
                endpoint,
                headers,
            } => {
                if tokio::runtime::Handle::try_current().is_err() {
                    return Err(ExportError::NoRuntime);
                }
                if cfg.tls.has_files() && !tls::is_https(endpoint) {
                    log::warn!("the TLS certificate settings are not used: the endpoint {endpoint} is not https://");
                }
                let build_err = |source| ExportError::Build {
                    protocol: protocol.name(),
                    endpoint: endpoint.clone(),
                    source,
                };
                let cause = CauseSlot::default();
                let mut exporter = match protocol {
                    Protocol::Grpc => {
                        let interceptor = MetadataInterceptor::new(headers)?;
                        let channel = cfg.tls.tonic_channel(endpoint, cfg.timeout)?;
                        opentelemetry_otlp::SpanExporter::builder()
                            .with_tonic()
                            .with_channel(channel)
                            .with_timeout(cfg.timeout)
                            .with_retry_policy(opentelemetry_otlp::RetryPolicy::disabled())
                            .with_interceptor(interceptor)
                            .build()
                            .map_err(build_err)?
                    }
                    Protocol::HttpProtobuf => {
                        let inner = cfg.tls.reqwest_client(cfg.timeout, tls::is_https(endpoint))?;
                        let client = HeaderClient::new(headers, inner, cause.clone())?;
                        opentelemetry_otlp::SpanExporter::builder()
                            .with_http()
                            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                            .with_endpoint(endpoint.clone())
                            .with_timeout(cfg.timeout)
                            .with_retry_policy(opentelemetry_otlp::RetryPolicy::disabled())
                            .with_http_client(client)
                            .build()
                            .map_err(build_err)?
                    }
                };
                exporter.set_resource(
                    &opentelemetry_sdk::Resource::builder_empty()
                        .with_attributes(cfg.resource.clone())
                        .build(),
                );
                let pipeline = Pipeline::start(
                    WithCause { inner: exporter, cause },
                    PipelineConfig {
                        queue_size: cfg.queue_size,
                        batch_size: cfg.batch_size,
                        batch_delay: cfg.batch_delay,
                        timeout: cfg.timeout,
                        retry_max: cfg.retry_max,
                        backoff_initial: Duration::from_secs(1),
                        backoff_max: Duration::from_secs(30),
                    },
                );
                Ok(Exporter {
                    model: SpanModel::with_policy(cfg.max_span_events, cfg.spans),
                    sink: Sink::Otlp(pipeline),
                    resource: cfg.resource.clone(),
                    description: format!(
                        "OTLP {} to {} (service.name {})",
                        protocol.name(),
                        endpoint,
                        cfg.service_name()
                    ),
                    buf: Vec::new(),
                    cgroups: None,
                })
            }
        }
    }

    /// An exporter writing JSON lines to `out` (what the stdout target uses; handy for files and
    /// tests).
    pub fn with_json_writer(cfg: &ExportConfig, out: Box<dyn Write + Send>) -> Exporter {
        Exporter {
            model: SpanModel::with_policy(cfg.max_span_events, cfg.spans),
            sink: Sink::Json {
                out,
                writer: json::SpanWriter::new(&cfg.resource),
                text: Vec::new(),
                exported: 0,
                failed: 0,
                errors: 0,
                warned_at: None,
            },
            resource: cfg.resource.clone(),
            description: format!("JSON lines (service.name {})", cfg.service_name()),
            buf: Vec::new(),
            cgroups: None,
        }
    }

    /// Spans get their process' container and pod ([`CONTAINER_ID`], [`K8S_POD_UID`],
    /// [`POD_QOS_CLASS`]) from `cgroups` (cgroup v2).
    pub fn with_cgroups(mut self, cgroups: CgroupResolver) -> Exporter {
        self.cgroups = Some(cgroups);
        self
    }

    /// The resource every span carries (`service.name` first); metrics carry it too.
    pub fn resource(&self) -> &[KeyValue] {
        &self.resource
    }

    /// Where spans go, for a start-up log line.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// Feeds a batch of records (in order). Finished spans are queued for export (or written, for
    /// JSON lines); this never waits on the network.
    pub fn on_records(&mut self, records: &[Record], clock: &WallClock) {
        // Resolved (and cached) while the process' cgroup still exists: a container's cgroup is
        // often gone by the time its connection's span ends.
        if let Some(c) = &mut self.cgroups {
            for p in records.iter().filter_map(crate::output::record_process) {
                // Only to fill the cache: no copy of the names (their strings) per record.
                c.resolve_ref(p.cgroup_id);
            }
        }
        self.model.on_records(records, clock, &mut self.buf);
        self.deliver();
    }

    fn deliver(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        if let Some(c) = &mut self.cgroups {
            annotate(c, &mut self.buf);
        }
        match &mut self.sink {
            Sink::Otlp(p) => {
                for span in self.buf.drain(..) {
                    p.submit(span);
                }
            }
            Sink::Json {
                out,
                writer,
                text,
                exported,
                failed,
                errors,
                warned_at,
            } => {
                let mut n = 0;
                text.clear();
                for span in self.buf.drain(..) {
                    match writer.write_line(&span, text) {
                        Ok(()) => n += 1,
                        Err(e) => {
                            *errors += 1;
                            *failed += 1;
                            warn_json_loss(warned_at, *failed, &e);
                        }
                    }
                }
                match out.write_all(text).and_then(|()| out.flush()) {
                    Ok(()) => *exported += n,
                    Err(e) => {
                        *errors += 1;
                        *failed += n;
                        warn_json_loss(warned_at, *failed, &e);
                    }
                }
                if text.capacity() > JSON_BUF_KEEP {
                    text.clear();
                    text.shrink_to(JSON_BUF_KEEP);
                }
            }
        }
    }

    /// Current counters.
    pub fn stats(&self) -> ExportStats {
        let created = self.model.spans_built;
        let withheld = self.model.spans_withheld;
        let stats = match &self.sink {
            Sink::Json {
                exported,
                failed,
                errors,
                ..
            } => ExportStats {
                spans_created: created,
                spans_exported: *exported,
                spans_failed: *failed,
                export_errors: *errors,
                ..Default::default()
            },
            Sink::Otlp(p) => otlp_stats(created, p.counters()),
        };
        ExportStats { spans_withheld: withheld, ..stats }
    }

    /// Stops the exporter: `last` are the engine's shutdown records
    /// ([`crate::timeline::engine::Engine::shutdown`]), which end every connection still open
    /// (`tcp.keepalive.incomplete = true`, outcome `open`) and every episode in progress (outcome
    /// `incomplete`); their spans are delivered with what is pending, outside the bounded queue (a
    /// stop never drops them; there are at most `--max-connections` of each). Waits at most
    /// `deadline` in all.
    pub async fn shutdown(mut self, last_records: &[Record], clock: &WallClock, deadline: Duration) -> ExportReport {
        let started = Instant::now();
        let mut last = std::mem::take(&mut self.buf);
        self.model.on_records(last_records, clock, &mut last);
        let leftover = self.model.finish(clock, monotonic_now_ns(), &mut last);
        let counts = FinishCounts {
            connections: self.model.ended_at_shutdown.connections + leftover,
            episodes: self.model.ended_at_shutdown.episodes,
        };
        match self.sink {
            Sink::Json { .. } => {
                let failed_before = self.stats().spans_failed;
                self.buf = last;
                self.deliver();
                let stats = self.stats();
                ExportReport {
                    stats,
                    open_connections_ended: counts.connections,
                    open_episodes_ended: counts.episodes,
                    unsent: 0,
                    flushed: stats.spans_failed == failed_before,
                    elapsed: started.elapsed(),
                }
            }
            Sink::Otlp(p) => {
                if let Some(c) = &mut self.cgroups {
                    annotate(c, &mut last);
                }
                let counters = p.counters().clone();
                let (unsent, finished) = p.shutdown(last, deadline).await;
                ExportReport {
                    stats: ExportStats { spans_withheld: self.model.spans_withheld, ..otlp_stats(self.model.spans_built, &counters) },
                    open_connections_ended: counts.connections,
                    open_episodes_ended: counts.episodes,
                    unsent,
                    flushed: finished && unsent == 0,
                    elapsed: started.elapsed(),
                }
            }
        }
    }
}

/// Warns that spans written as JSON lines were lost (`failed` so far), at most once per
/// [`pipeline::LOG_INTERVAL`].
fn warn_json_loss(warned_at: &mut Option<Instant>, failed: u64, e: &dyn fmt::Display) {
    if warned_at.is_none_or(|t| t.elapsed() >= pipeline::LOG_INTERVAL) {
        log::warn!("writing spans as JSON lines failed: {e} ({failed} spans lost so far)");
        *warned_at = Some(Instant::now());
    }
}

fn otlp_stats(created: u64, c: &pipeline::Counters) -> ExportStats {
    ExportStats {
        spans_created: created,
        spans_exported: c.exported.load(Relaxed),
        spans_dropped: c.dropped.load(Relaxed),
        spans_failed: c.failed.load(Relaxed),
        export_errors: c.export_errors.load(Relaxed),
        retries: c.retries.load(Relaxed),
        queued: c.queued.load(Relaxed),
        ..ExportStats::default()
    }
}

/// gRPC metadata from the resolved headers. Applied by an interceptor, which runs after the
/// exporter has added the metadata it read from `OTEL_EXPORTER_OTLP_HEADERS` itself, so that our
/// values (where a flag wins over the environment) replace those.
#[derive(Clone)]
pub(crate) struct MetadataInterceptor(
    Arc<
        Vec<(
            tonic::metadata::MetadataKey<tonic::metadata::Ascii>,
            tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
        )>,
    >,
);

impl MetadataInterceptor {
    pub(crate) fn new(headers: &[(String, String)]) -> Result<Self, ExportError> {
        let mut list = Vec::new();
        for (k, v) in headers {
            let key = tonic::metadata::MetadataKey::from_bytes(k.as_bytes()).map_err(|_| {
                ExportError::config("OTLP header", format!("`{k}` is not valid gRPC metadata"))
            })?;
            let value = v.parse().map_err(|_| {
                ExportError::config(
                    "OTLP header",
                    format!("the value of `{k}` is not valid gRPC metadata"),
                )
            })?;
            list.push((key, value));
        }
        Ok(MetadataInterceptor(Arc::new(list)))
    }
}

impl tonic::service::Interceptor for MetadataInterceptor {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        for (k, v) in self.0.iter() {
            req.metadata_mut().insert(k.clone(), v.clone());
        }
        Ok(req)
    }
}

/// The cause of the last failed HTTP request: the exporter reports a transport failure only as
/// "network error", so [`HeaderClient`] keeps the cause here and [`WithCause`] adds it to the
/// error the pipeline logs and classifies (a refused certificate is not retried).
pub(crate) type CauseSlot = Arc<std::sync::Mutex<Option<String>>>;

/// A span exporter whose failures carry the cause left in its [`CauseSlot`].
#[derive(Debug)]
struct WithCause<E> {
    inner: E,
    cause: CauseSlot,
}

impl<E: opentelemetry_sdk::trace::SpanExporter> opentelemetry_sdk::trace::SpanExporter for WithCause<E> {
    async fn export(&self, batch: Vec<SpanData>) -> opentelemetry_sdk::error::OTelSdkResult {
        use opentelemetry_sdk::error::OTelSdkError;
        let take = || self.cause.lock().unwrap_or_else(|p| p.into_inner()).take();
        take();
        match self.inner.export(batch).await {
            Err(OTelSdkError::InternalFailure(msg)) => Err(OTelSdkError::InternalFailure(match take() {
                Some(cause) => format!("{msg}: {cause}"),
                None => msg,
            })),
            other => other,
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource)
    }
}

/// HTTP client setting the resolved headers on every request, after (so over) those the exporter
/// read from the environment itself; the cause of a failed request goes to `cause`.
#[derive(Debug)]
pub(crate) struct HeaderClient {
    inner: reqwest::Client,
    headers: http::HeaderMap,
    cause: CauseSlot,
}

impl HeaderClient {
    /// `inner` from [`tls::TlsSettings::reqwest_client`]; `cause` receives the cause of each failed
    /// request (a metrics exporter can use the same client).
    pub(crate) fn new(headers: &[(String, String)], inner: reqwest::Client, cause: CauseSlot) -> Result<Self, ExportError> {
        let mut map = http::HeaderMap::new();
        for (k, v) in headers {
            let name = http::HeaderName::from_bytes(k.as_bytes()).map_err(|_| {
                ExportError::config("OTLP header", format!("`{k}` is not a valid header name"))
            })?;
            let value = http::HeaderValue::from_str(v).map_err(|_| {
                ExportError::config("OTLP header", format!("the value of `{k}` is not valid"))
            })?;
            map.insert(name, value);
        }
        Ok(HeaderClient {
            inner,
            headers: map,
            cause,
        })
    }
}

type HttpResult = Result<http::Response<bytes::Bytes>, opentelemetry_http::HttpError>;

impl opentelemetry_http::HttpClient for HeaderClient {
    // The trait is declared with `async_trait`; this is its expanded signature.
    fn send_bytes<'life0, 'async_trait>(
        &'life0 self,
        mut request: http::Request<bytes::Bytes>,
    ) -> Pin<Box<dyn Future<Output = HttpResult> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        for (k, v) in &self.headers {
            request.headers_mut().insert(k.clone(), v.clone());
        }
        Box::pin(async move {
            opentelemetry_http::HttpClient::send_bytes(&self.inner, request)
                .await
                .inspect_err(|e| {
                    // The whole chain: reqwest's own message ("error sending request") hides a
                    // refused certificate in its sources.
                    *self.cause.lock().unwrap_or_else(|p| p.into_inner()) = Some(tls::error_chain(e.as_ref()));
                })
        })
    }
}

#[cfg(test)]
mod tests;
