//! The OTLP delivery pipeline: a bounded queue between the event loop and a worker task that
//! batches spans, exports them, and retries failed batches with exponential backoff.
//!
//! - [`Pipeline::submit`] never waits: when the queue is full the span is dropped and counted.
//! - The worker holds at most one batch besides the queue, so memory is bounded by
//!   `queue_size + batch_size` spans whatever the collector does.
//! - A failed export is retried with backoff (1 s doubling to 30 s, ±20 % jitter) for at most
//!   `retry_max`; then the batch is dropped and counted. Errors the OTLP specification calls
//!   permanent (HTTP 4xx other than 429, gRPC INVALID_ARGUMENT, UNAUTHENTICATED...) are not retried.
//! - Drops and failures are logged with counts, at most once per [`LOG_INTERVAL`] (the first failure
//!   of a streak at once); recovery is logged too.
//! - [`Pipeline::shutdown`] stops accepting spans, shortens backoffs, and waits for the worker to
//!   drain the queue until the deadline; what is left then is reported as unsent.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use opentelemetry_sdk::error::OTelSdkError;
use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Minimum time between two warnings of the same kind.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Pipeline tuning.
#[derive(Clone, Debug)]
pub struct PipelineConfig {
    pub queue_size: usize,
    pub batch_size: usize,
    /// Longest wait for a batch to fill.
    pub batch_delay: Duration,
    /// Timeout of one export attempt.
    pub timeout: Duration,
    /// How long one batch is retried before it is dropped.
    pub retry_max: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

/// Shared counters (the event loop reads them through `Exporter::stats`).
#[derive(Debug, Default)]
pub struct Counters {
    /// Spans accepted into the queue.
    pub accepted: AtomicU64,
    /// Spans the collector acknowledged.
    pub exported: AtomicU64,
    /// Spans dropped because the queue was full.
    pub dropped: AtomicU64,
    /// Spans dropped after their export failed for good (permanent error or retries exhausted).
    pub failed: AtomicU64,
    /// Export attempts that failed.
    pub export_errors: AtomicU64,
    /// Export attempts that repeated a failed one.
    pub retries: AtomicU64,
    /// Spans in the queue now.
    pub queued: AtomicU64,
}

/// Is a failed export worth retrying? The exporter reports errors as text only; this reads the
/// gRPC code or HTTP status out of `opentelemetry-otlp` 0.33's messages and follows the OTLP
/// specification's retry rules. Anything not recognised is retried (bounded by `retry_max`), so a
/// change of wording can only cost a few pointless retries, never lose retries.
pub fn retryable(err: &OTelSdkError) -> bool {
    match err {
        OTelSdkError::AlreadyShutdown => false,
        OTelSdkError::Timeout(_) => true,
        OTelSdkError::InternalFailure(msg) => retryable_message(msg),
    }
}

fn retryable_message(msg: &str) -> bool {
    if super::tls::is_permanent_tls_error(msg) {
        return false;
    }
    if let Some(rest) = msg.split("gRPC code: ").nth(1) {
        let code: String = rest
            .chars()
            .take_while(char::is_ascii_alphanumeric)
            .collect();
        // OTLP/gRPC: retryable codes. RESOURCE_EXHAUSTED is retryable only with RetryInfo, which we
        // cannot see; backing off is the polite choice. UNKNOWN covers transport oddities.
        return matches!(
            code.as_str(),
            "Cancelled"
                | "DeadlineExceeded"
                | "ResourceExhausted"
                | "Aborted"
                | "OutOfRange"
                | "Unavailable"
                | "DataLoss"
                | "Unknown"
        );
    }
    if let Some(rest) = msg.split("status code: ").nth(1) {
        let status: String = rest.chars().take_while(char::is_ascii_digit).collect();
        return matches!(status.as_str(), "429" | "502" | "503" | "504");
    }
    if msg.contains("exceeding the configured limit") {
        return false;
    }
    true
}

/// The running pipeline.
pub struct Pipeline {
    tx: mpsc::Sender<SpanData>,
    stop: watch::Sender<bool>,
    worker: JoinHandle<()>,
    counters: Arc<Counters>,
}

impl Pipeline {
    /// Starts the worker on the current tokio runtime.
    pub fn start<E: SpanExporter + 'static>(exporter: E, cfg: PipelineConfig) -> Pipeline {
        let (tx, rx) = mpsc::channel(cfg.queue_size.max(1));
        let (stop, stop_rx) = watch::channel(false);
        let counters = Arc::new(Counters::default());
        let worker = tokio::spawn(run(exporter, rx, cfg, counters.clone(), stop_rx));
        Pipeline {
            tx,
            stop,
            worker,
            counters,
        }
    }

    pub fn counters(&self) -> &Arc<Counters> {
        &self.counters
    }

    /// Queues a span, or drops it (counted) when the queue is full. Never waits.
    pub fn submit(&self, span: SpanData) {
        // Count before sending: the worker may take the span and decrement at once.
        self.counters.queued.fetch_add(1, Relaxed);
        match self.tx.try_send(span) {
            Ok(()) => {
                self.counters.accepted.fetch_add(1, Relaxed);
            }
            Err(_) => {
                self.counters.queued.fetch_sub(1, Relaxed);
                self.counters.dropped.fetch_add(1, Relaxed);
            }
        }
    }

    /// Queues `last` (waiting for room until the deadline), then lets the worker drain the queue
    /// until `deadline` passes. Returns (spans not delivered nor definitively failed, whether the
    /// worker finished in time).
    pub async fn shutdown(self, last: Vec<SpanData>, deadline: Duration) -> (u64, bool) {
        let end = Instant::now() + deadline;
        let Pipeline {
            tx,
            stop,
            mut worker,
            counters,
        } = self;
        let _ = stop.send(true);
        let mut not_queued = 0u64;
        for span in last {
            counters.queued.fetch_add(1, Relaxed);
            match tokio::time::timeout_at(end, tx.send(span)).await {
                Ok(Ok(())) => {
                    counters.accepted.fetch_add(1, Relaxed);
                }
                _ => {
                    counters.queued.fetch_sub(1, Relaxed);
                    not_queued += 1;
                }
            }
        }
        drop(tx);
        let finished = match tokio::time::timeout_at(end, &mut worker).await {
            Ok(_) => true,
            Err(_) => {
                worker.abort();
                let _ = worker.await;
                false
            }
        };
        let accepted = counters.accepted.load(Relaxed);
        let settled = counters.exported.load(Relaxed) + counters.failed.load(Relaxed);
        (accepted.saturating_sub(settled) + not_queued, finished)
    }
}

/// Rate-limited reporting of drops and export failures.
struct Reporter {
    queue_size: usize,
    dropped_logged: u64,
    drops_logged_at: Option<Instant>,
    /// First failure of the current streak, attempts failed since the last warning, last error.
    failing_since: Option<Instant>,
    streak_errors: u64,
    unlogged_errors: u64,
    unlogged_failed_spans: u64,
    last_error: String,
    errors_logged_at: Option<Instant>,
}

impl Reporter {
    fn due(at: Option<Instant>) -> bool {
        at.is_none_or(|t| t.elapsed() >= LOG_INTERVAL)
    }

    fn drops(&mut self, c: &Counters) {
        let total = c.dropped.load(Relaxed);
        if total > self.dropped_logged && Self::due(self.drops_logged_at) {
            log::warn!(
                "OTLP export: queue full ({} spans): dropped {} spans since the last report ({} in all)",
                self.queue_size,
                total - self.dropped_logged,
                total
            );
            self.dropped_logged = total;
            self.drops_logged_at = Some(Instant::now());
        }
    }

    fn failure(&mut self, err: &str, retrying: Option<Duration>, gave_up: u64) {
        let first = self.failing_since.is_none();
        self.failing_since.get_or_insert_with(Instant::now);
        self.streak_errors += 1;
        self.unlogged_errors += 1;
        self.unlogged_failed_spans += gave_up;
        self.last_error = err.to_string();
        if first || Self::due(self.errors_logged_at) {
            let what = match retrying {
                Some(d) => format!("retrying in {:.1}s", d.as_secs_f64()),
                None => "not retrying".to_string(),
            };
            log::warn!(
                "OTLP export failed ({} attempts failed since the last report, {} spans dropped after failures): \
                 {}; {what}",
                self.unlogged_errors,
                self.unlogged_failed_spans,
                self.last_error
            );
            self.unlogged_errors = 0;
            self.unlogged_failed_spans = 0;
            self.errors_logged_at = Some(Instant::now());
        }
    }

    fn success(&mut self) {
        if let Some(since) = self.failing_since.take() {
            log::info!(
                "OTLP export recovered after {} failed attempts over {:.1}s",
                self.streak_errors,
                since.elapsed().as_secs_f64()
            );
            self.streak_errors = 0;
            self.unlogged_errors = 0;
            self.unlogged_failed_spans = 0;
        }
    }
}

fn jitter(d: Duration) -> Duration {
    // ±20 %, from the standard library's randomly keyed hasher (no RNG dependency needed).
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(d.as_nanos() as u64);
    let r = (h.finish() % 4001) as f64 / 10000.0; // 0.0 ..= 0.4
    d.mul_f64(0.8 + r)
}

async fn run<E: SpanExporter>(
    exporter: E,
    mut rx: mpsc::Receiver<SpanData>,
    cfg: PipelineConfig,
    c: Arc<Counters>,
    mut stop: watch::Receiver<bool>,
) {
    let mut rep = Reporter {
        queue_size: cfg.queue_size,
        dropped_logged: 0,
        drops_logged_at: None,
        failing_since: None,
        streak_errors: 0,
        unlogged_errors: 0,
        unlogged_failed_spans: 0,
        last_error: String::new(),
        errors_logged_at: None,
    };
    let mut batch: Vec<SpanData> = Vec::with_capacity(cfg.batch_size);
    loop {
        // Wait for the first span, reporting drops now and then while idle.
        let first = tokio::select! {
            s = rx.recv() => s,
            _ = tokio::time::sleep(LOG_INTERVAL) => {
                rep.drops(&c);
                continue;
            }
        };
        let Some(first) = first else { break };
        c.queued.fetch_sub(1, Relaxed);
        batch.push(first);
        let flush_at = Instant::now() + cfg.batch_delay;
        while batch.len() < cfg.batch_size {
            let next = if is_stopping(&stop) {
                // Stopping: take what is there, do not wait.
                rx.try_recv().ok()
            } else {
                tokio::select! {
                    s = rx.recv() => s,
                    _ = tokio::time::sleep_until(flush_at) => None,
                    _ = stop.changed() => continue, // re-check: stopping now
                }
            };
            match next {
                Some(s) => {
                    c.queued.fetch_sub(1, Relaxed);
                    batch.push(s);
                }
                None => break,
            }
        }
        export_batch(
            &exporter,
            std::mem::take(&mut batch),
            &cfg,
            &c,
            &mut stop,
            &mut rep,
        )
        .await;
        batch = Vec::with_capacity(cfg.batch_size);
        rep.drops(&c);
    }
    rep.drops(&c);
    let _ = exporter.shutdown();
}

/// Shutdown has begun (or the pipeline was dropped without one).
fn is_stopping(stop: &watch::Receiver<bool>) -> bool {
    *stop.borrow() || stop.has_changed().is_err()
}

async fn export_batch<E: SpanExporter>(
    exporter: &E,
    batch: Vec<SpanData>,
    cfg: &PipelineConfig,
    c: &Counters,
    stop: &mut watch::Receiver<bool>,
    rep: &mut Reporter,
) {
    let n = batch.len() as u64;
    let started = Instant::now();
    let mut delay = cfg.backoff_initial;
    let mut attempt = 0u32;
    loop {
        if attempt > 0 {
            c.retries.fetch_add(1, Relaxed);
        }
        attempt += 1;
        let result = match tokio::time::timeout(
            cfg.timeout + Duration::from_secs(1),
            exporter.export(batch.clone()),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(OTelSdkError::Timeout(cfg.timeout)),
        };
        let err = match result {
            Ok(()) => {
                c.exported.fetch_add(n, Relaxed);
                rep.success();
                return;
            }
            Err(e) => e,
        };
        c.export_errors.fetch_add(1, Relaxed);
        let stopping = is_stopping(stop);
        let wait = if stopping {
            delay.min(Duration::from_millis(200))
        } else {
            jitter(delay)
        };
        if !retryable(&err) {
            c.failed.fetch_add(n, Relaxed);
            rep.failure(&format!("{err} (permanent: {n} spans dropped)"), None, n);
            return;
        }
        if started.elapsed() + wait > cfg.retry_max {
            c.failed.fetch_add(n, Relaxed);
            rep.failure(
                &format!(
                    "{err} (gave up after {attempt} attempts over {:.0}s: {n} spans dropped)",
                    started.elapsed().as_secs_f64()
                ),
                None,
                n,
            );
            return;
        }
        rep.failure(&err.to_string(), Some(wait), 0);
        rep.drops(c);
        if stopping {
            tokio::time::sleep(wait).await;
        } else {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                // Shutdown began: retry at once, then with short pauses.
                _ = stop.changed() => {}
            }
        }
        delay = (delay * 2).min(cfg.backoff_max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_sdk::error::OTelSdkResult;
    use std::sync::Mutex;

    #[test]
    fn classification_follows_otlp_rules() {
        let f = |m: &str| retryable(&OTelSdkError::InternalFailure(m.to_string()));
        assert!(f(
            "TonicTracesClient export failed with gRPC code: Unavailable: transport error"
        ));
        assert!(f(
            "TonicTracesClient export failed with gRPC code: DeadlineExceeded"
        ));
        assert!(!f(
            "TonicTracesClient export failed with gRPC code: InvalidArgument"
        ));
        assert!(!f(
            "TonicTracesClient export failed with gRPC code: Unauthenticated: nope"
        ));
        assert!(f("HTTP export failed with status code: 503"));
        assert!(f("HTTP export failed with status code: 429"));
        assert!(!f("HTTP export failed with status code: 400"));
        assert!(!f("HTTP export failed with status code: 401"));
        assert!(f("HTTP export failed: network error"));
        assert!(f("something new"));
        assert!(retryable(&OTelSdkError::Timeout(Duration::from_secs(1))));
        assert!(!retryable(&OTelSdkError::AlreadyShutdown));
    }

    /// A fake collector: fails while `down` is set, records what it accepted.
    #[derive(Debug, Clone, Default)]
    struct Fake {
        down: Arc<std::sync::atomic::AtomicBool>,
        permanent: Arc<std::sync::atomic::AtomicBool>,
        got: Arc<Mutex<Vec<String>>>,
        calls: Arc<AtomicU64>,
    }

    impl SpanExporter for Fake {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            self.calls.fetch_add(1, Relaxed);
            if self.permanent.load(Relaxed) {
                return Err(OTelSdkError::InternalFailure(
                    "HTTP export failed with status code: 400".into(),
                ));
            }
            if self.down.load(Relaxed) {
                return Err(OTelSdkError::InternalFailure(
                    "HTTP export failed: network error".into(),
                ));
            }
            self.got
                .lock()
                .unwrap()
                .extend(batch.into_iter().map(|s| s.name.into_owned()));
            Ok(())
        }
    }

    fn span(name: String) -> SpanData {
        use opentelemetry::trace::{SpanContext, SpanId, SpanKind, Status, TraceId};
        SpanData {
            span_context: SpanContext::new(
                TraceId::from(1u128),
                SpanId::from(1u64),
                Default::default(),
                false,
                Default::default(),
            ),
            parent_span_id: SpanId::INVALID,
            parent_span_is_remote: false,
            span_kind: SpanKind::Internal,
            name: name.into(),
            start_time: std::time::UNIX_EPOCH,
            end_time: std::time::UNIX_EPOCH,
            attributes: vec![],
            dropped_attributes_count: 0,
            events: Default::default(),
            links: Default::default(),
            status: Status::Unset,
            instrumentation_scope: Default::default(),
        }
    }

    fn cfg() -> PipelineConfig {
        PipelineConfig {
            queue_size: 8,
            batch_size: 4,
            batch_delay: Duration::from_millis(20),
            timeout: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
            backoff_initial: Duration::from_millis(10),
            backoff_max: Duration::from_millis(40),
        }
    }

    #[tokio::test]
    async fn outage_drops_beyond_queue_then_delivers() {
        let fake = Fake::default();
        fake.down.store(true, Relaxed);
        let p = Pipeline::start(fake.clone(), cfg());
        for i in 0..100 {
            p.submit(span(format!("s{i}")));
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let c = p.counters().clone();
        // Bounded: the queue plus the batch in the worker's hands.
        assert!(c.queued.load(Relaxed) <= 8);
        assert!(
            c.dropped.load(Relaxed) >= 100 - 8 - 4,
            "dropped {}",
            c.dropped.load(Relaxed)
        );
        assert!(c.export_errors.load(Relaxed) >= 2);
        assert!(c.retries.load(Relaxed) >= 1);
        assert_eq!(c.exported.load(Relaxed), 0);
        fake.down.store(false, Relaxed);
        let (unsent, finished) = p
            .shutdown(vec![span("last".into())], Duration::from_secs(5))
            .await;
        assert!(finished);
        assert_eq!(unsent, 0);
        let got = fake.got.lock().unwrap().clone();
        assert_eq!(c.exported.load(Relaxed) as usize, got.len());
        assert_eq!(c.exported.load(Relaxed) + c.dropped.load(Relaxed), 101);
        // The first spans were kept (the queue drops new spans when full), and `last` came through.
        assert_eq!(got[0], "s0");
        assert_eq!(got.last().unwrap(), "last");
    }

    #[tokio::test]
    async fn permanent_errors_are_not_retried() {
        let fake = Fake::default();
        fake.permanent.store(true, Relaxed);
        let p = Pipeline::start(fake.clone(), cfg());
        for i in 0..3 {
            p.submit(span(format!("s{i}")));
        }
        let c = p.counters().clone();
        let (unsent, finished) = p.shutdown(vec![], Duration::from_secs(5)).await;
        assert!(finished);
        assert_eq!(unsent, 0);
        assert_eq!(c.failed.load(Relaxed), 3);
        assert_eq!(c.retries.load(Relaxed), 0);
        assert_eq!(c.export_errors.load(Relaxed), fake.calls.load(Relaxed));
    }

    #[tokio::test]
    async fn retries_give_up_after_retry_max() {
        let fake = Fake::default();
        fake.down.store(true, Relaxed);
        let p = Pipeline::start(
            fake.clone(),
            PipelineConfig {
                retry_max: Duration::from_millis(100),
                ..cfg()
            },
        );
        p.submit(span("a".into()));
        tokio::time::sleep(Duration::from_millis(400)).await;
        let c = p.counters().clone();
        assert_eq!(c.failed.load(Relaxed), 1);
        assert!(c.retries.load(Relaxed) >= 2);
        let (unsent, finished) = p.shutdown(vec![], Duration::from_secs(1)).await;
        assert!(finished);
        assert_eq!(unsent, 0);
    }

    #[tokio::test]
    async fn shutdown_respects_the_deadline_while_the_collector_is_down() {
        let fake = Fake::default();
        fake.down.store(true, Relaxed);
        let p = Pipeline::start(fake.clone(), cfg());
        for i in 0..5 {
            p.submit(span(format!("s{i}")));
        }
        let t = Instant::now();
        let (unsent, finished) = p
            .shutdown(vec![span("x".into())], Duration::from_millis(300))
            .await;
        let took = t.elapsed();
        assert!(!finished);
        assert_eq!(unsent, 6);
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(2),
            "took {took:?}"
        );
    }
}
