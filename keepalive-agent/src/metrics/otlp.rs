//! OTLP export of the metrics with the `opentelemetry_sdk` metrics SDK and the `opentelemetry-otlp`
//! exporter: one observable instrument per metric of [`super::visit`], collected by a
//! `ManualReader` and exported every interval by a task on the export runtime (the same runtime
//! as the span pipeline; the SDK's own periodic reader runs on a thread of its own, outside tokio,
//! where the gRPC and async HTTP clients cannot run).
//!
//! The SDK applies the temporality preference (cumulative sums, or deltas it computes itself).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use opentelemetry::metrics::MeterProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::exporter::PushMetricExporter as _;
use opentelemetry_sdk::metrics::reader::MetricReader;
use opentelemetry_sdk::metrics::{InstrumentKind, ManualReader, Pipeline, SdkMeterProvider, Stream, Temporality};

use super::config::OtlpMetrics;
use super::{Desc, Kind, Metrics, Point};
use crate::export::config::Protocol;
use crate::export::{tls, CauseSlot, ExportError, HeaderClient, MetadataInterceptor};

/// A [`ManualReader`] the provider and the export task share.
#[derive(Debug, Clone)]
struct SharedReader(Arc<ManualReader>);

impl MetricReader for SharedReader {
    fn register_pipeline(&self, pipeline: Weak<Pipeline>) {
        self.0.register_pipeline(pipeline)
    }
    fn collect(&self, rm: &mut ResourceMetrics) -> OTelSdkResult {
        self.0.collect(rm)
    }
    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }
    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }
    fn temporality(&self, kind: InstrumentKind) -> Temporality {
        self.0.temporality(kind)
    }
}

/// The points of every metric, taken once per collection; the callbacks read their own.
type Snapshot = Arc<Mutex<HashMap<&'static str, Vec<Point>>>>;

/// The running OTLP metrics export.
pub struct OtlpExport {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
    pub description: String,
}

impl OtlpExport {
    /// Exports one last time and stops, waiting at most `deadline`.
    pub async fn shutdown(self, deadline: Duration) {
        let _ = self.stop.send(());
        if tokio::time::timeout(deadline, self.task).await.is_err() {
            log::warn!("OTLP metrics: the last export did not finish within {} ms", deadline.as_millis());
        }
    }
}

/// Everything one export needs.
struct Exporting {
    reader: SharedReader,
    provider: SdkMeterProvider,
    exporter: opentelemetry_otlp::MetricExporter,
    snapshot: Snapshot,
    /// Metrics with an instrument already.
    registered: HashSet<&'static str>,
    metrics: Metrics,
    timeout: Duration,
    max_series: usize,
    warned_at: Option<Instant>,
}

/// Builds the exporter and starts the export task on the current tokio runtime.
pub fn start(cfg: &OtlpMetrics, metrics: Metrics, max_series: usize) -> Result<OtlpExport, ExportError> {
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(ExportError::NoRuntime);
    }
    let exporter = build_exporter(cfg)?;
    let reader = SharedReader(Arc::new(ManualReader::builder().with_temporality(cfg.temporality).build()));
    // Our store caps series already; the SDK's own cap is set above it so it never cuts in.
    let limit = max_series + 1;
    let provider = SdkMeterProvider::builder()
        .with_reader(reader.clone())
        .with_resource(opentelemetry_sdk::Resource::builder_empty().with_attributes(cfg.resource.clone()).build())
        .with_view(move |_: &opentelemetry_sdk::metrics::Instrument| Stream::builder().with_cardinality_limit(limit).build().ok())
        .build();
    let mut state = Exporting {
        reader,
        provider,
        exporter,
        snapshot: Snapshot::default(),
        registered: HashSet::new(),
        metrics,
        timeout: cfg.timeout,
        max_series,
        warned_at: None,
    };
    let (stop, mut stopped) = tokio::sync::oneshot::channel();
    let interval = cfg.interval;
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let last = tokio::select! {
                _ = tick.tick() => false,
                _ = &mut stopped => true,
            };
            state.export_once().await;
            if last {
                let _ = state.provider.shutdown();
                break;
            }
        }
    });
    let description = format!(
        "OTLP metrics {} to {} every {} ms ({:?})",
        cfg.protocol.name(),
        cfg.endpoint,
        cfg.interval.as_millis(),
        cfg.temporality
    );
    Ok(OtlpExport { stop, task, description })
}

fn build_exporter(cfg: &OtlpMetrics) -> Result<opentelemetry_otlp::MetricExporter, ExportError> {
    let build_err = |source| ExportError::Build { protocol: cfg.protocol.name(), endpoint: cfg.endpoint.clone(), source };
    match cfg.protocol {
        Protocol::Grpc => opentelemetry_otlp::MetricExporter::builder()
            .with_tonic()
            .with_channel(cfg.tls.tonic_channel(&cfg.endpoint, cfg.timeout)?)
            .with_timeout(cfg.timeout)
            .with_temporality(cfg.temporality)
            .with_interceptor(MetadataInterceptor::new(&cfg.headers)?)
            .build()
            .map_err(build_err),
        Protocol::HttpProtobuf => opentelemetry_otlp::MetricExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(cfg.endpoint.clone())
            .with_timeout(cfg.timeout)
            .with_temporality(cfg.temporality)
            .with_http_client(HeaderClient::new(
                &cfg.headers,
                cfg.tls.reqwest_client(cfg.timeout, tls::is_https(&cfg.endpoint))?,
                CauseSlot::default(),
            )?)
            .build()
            .map_err(build_err),
    }
}

impl Exporting {
    /// Takes a snapshot of every metric, registers instruments for metrics seen the first time,
    /// collects and exports; counts the points delivered or failed.
    async fn export_once(&mut self) {
        let mut points = 0u64;
        let mut fresh: Vec<Desc> = Vec::new();
        {
            let mut snap = self.snapshot.lock().unwrap_or_else(|e| e.into_inner());
            snap.clear();
            self.metrics.visit(&mut |desc, pts| {
                points += pts.len().min(self.max_series) as u64;
                snap.insert(desc.name, pts.to_vec());
                if !self.registered.contains(desc.name) {
                    fresh.push(*desc);
                }
            });
        }
        for desc in fresh {
            self.register(desc);
        }
        let mut rm = ResourceMetrics::default();
        if let Err(e) = self.reader.collect(&mut rm) {
            self.warn(&format!("collecting: {e}"));
            self.metrics.count_points(0, points);
            return;
        }
        match tokio::time::timeout(self.timeout, self.exporter.export(&rm)).await {
            Ok(Ok(())) => self.metrics.count_points(points, 0),
            Ok(Err(e)) => {
                self.metrics.count_points(0, points);
                self.warn(&format!("{points} points not delivered: {e}"));
            }
            Err(_) => {
                self.metrics.count_points(0, points);
                self.warn(&format!("{points} points not delivered: timed out"));
            }
        }
    }

    fn register(&mut self, desc: Desc) {
        self.registered.insert(desc.name);
        let meter = self.provider.meter("keepalive-agent");
        let snap = Arc::clone(&self.snapshot);
        let name = desc.name;
        let observe = move |obs: &dyn opentelemetry::metrics::AsyncInstrument<f64>| {
            let snap = snap.lock().unwrap_or_else(|e| e.into_inner());
            for p in snap.get(name).into_iter().flatten() {
                let attrs: Vec<KeyValue> = p.attrs.iter().map(|(k, v)| KeyValue::new(*k, v.clone())).collect();
                obs.observe(p.value, &attrs);
            }
        };
        match desc.kind {
            Kind::Counter => {
                meter.f64_observable_counter(name).with_unit(desc.unit).with_description(desc.help).with_callback(observe).build();
            }
            Kind::Gauge => {
                meter.f64_observable_gauge(name).with_unit(desc.unit).with_description(desc.help).with_callback(observe).build();
            }
        }
    }

    fn warn(&mut self, what: &str) {
        if self.warned_at.is_none_or(|t| t.elapsed() >= crate::export::pipeline::LOG_INTERVAL) {
            log::warn!("OTLP metrics export: {what}");
            self.warned_at = Some(Instant::now());
        }
    }
}
