//! Fleet metrics and health of `keepalive-agent run` (README.md, "Metrics and health").
//!
//! Keep-alive metrics are counted from the timeline engine's [`Record`]s in one place
//! ([`store::Store::count`]); gauges come from the engine's own counters. [`Metrics`] is the shared
//! handle: the event loop feeds it ([`Metrics::on_records`], and [`Recorder`] once per turn of the
//! loop: heartbeat, engine gauges, lost events), and the exposition reads it: `GET /metrics`
//! ([`http`], [`prom`]) and OTLP ([`otlp`]). [`visit`] is the one description of every metric
//! (name, unit, kind, attributes) that both expositions render.

pub mod config;
pub mod http;
pub mod otlp;
pub mod programs;
pub mod prom;
pub mod store;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use keepalive_common::{EventKind, EVENT_KINDS};

use crate::container::CgroupResolver;
use crate::export::ExportStats;
use crate::runtime::{LoopObserver, LoopSummary};
use crate::kernel::progstats::KindCounts;
use crate::timeline::engine::Engine;
use crate::timeline::Record;
use store::{BoundHits, Store};

/// How long `/healthz` accepts no heartbeat from the event loop (it beats at least every 100 ms
/// while it drains the ring buffer).
pub const HEALTH_STALE: Duration = Duration::from_secs(5);

/// Least time between two refreshes of the engine gauges (the look is O(tracked connections)).
const GAUGE_INTERVAL: Duration = Duration::from_secs(1);

/// Whether the agent is alive and ready, for `/healthz` and `/readyz`.
#[derive(Debug)]
pub struct Health {
    started: Instant,
    /// Milliseconds since `started` of the event loop's last turn.
    beat_ms: AtomicU64,
    ready: AtomicBool,
}

impl Health {
    fn new() -> Self {
        Health { started: Instant::now(), beat_ms: AtomicU64::new(0), ready: AtomicBool::new(false) }
    }

    /// The event loop is alive (called once per turn of the loop).
    pub fn beat(&self) {
        self.beat_ms.store(self.started.elapsed().as_millis() as u64, Relaxed);
    }

    /// Time since the last heartbeat (since start-up before the first one).
    pub fn since_beat(&self) -> Duration {
        let now = self.started.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.beat_ms.load(Relaxed)))
    }

    /// Every hook the attach plan could reach is attached; the event loop is about to start (its
    /// heartbeat is measured from now).
    pub fn set_ready(&self) {
        self.beat();
        self.ready.store(true, Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Relaxed)
    }
}

/// State shared by the event loop and the exposition.
struct Shared {
    store: Mutex<Store>,
    health: Health,
}

/// Handle on the metrics (cheap to clone).
#[derive(Clone)]
pub struct Metrics {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// `max_series`: series per metric, overflow series included; `peer_labels`: label keep-alive
    /// metrics with the peer address; container ids are read below `cgroup_root` (the cgroup2 mount).
    pub fn new(max_series: usize, peer_labels: bool, cgroup_root: Option<std::path::PathBuf>) -> Self {
        let store = Store::new(max_series, peer_labels, CgroupResolver::new(cgroup_root));
        Metrics { shared: Arc::new(Shared { store: Mutex::new(store), health: Health::new() }) }
    }

    /// Counts a batch of records (one lock per batch).
    pub fn on_records(&self, records: &[Record]) {
        let mut store = self.store();
        for r in records {
            store.count(r);
        }
    }

    /// The exporter's span counters, after a batch went through it.
    pub fn set_span_export(&self, stats: ExportStats) {
        let mut store = self.store();
        store.agent.export = stats;
        store.agent.exports_spans = true;
    }

    /// The resource attributes (`service.name`, `host.name`...): OTLP carries them as the
    /// resource, the Prometheus exposition as `target_info`.
    pub fn set_resource(&self, resource: Vec<(String, String)>) {
        self.store().resource = resource;
    }

    /// The resource attributes set by [`Metrics::set_resource`].
    pub fn resource(&self) -> Vec<(String, String)> {
        self.store().resource.clone()
    }

    /// The result of a periodic audit (`keepalive.connections.at_risk`).
    pub fn set_at_risk(&self, at_risk: crate::audit::periodic::AtRisk) {
        let mut store = self.store();
        store.agent.bounds.max_sockets += at_risk.over_limit;
        store.at_risk = Some(at_risk);
        store.audits += 1;
    }

    /// The hooks attached, with their method (`keepalive.agent.hooks`).
    pub fn set_hooks(&self, hooks: Vec<(&'static str, &'static str)>) {
        self.store().agent.hooks = hooks;
    }


    pub fn health(&self) -> &Health {
        &self.shared.health
    }

    /// A recorder for the event loop; `programs` names the agent's BPF programs by kernel program
    /// id (for their run counts and times, see [`programs`]).
    pub fn recorder(&self, programs: HashMap<u32, String>) -> Recorder {
        Recorder { metrics: self.clone(), last_gauges: None, programs }
    }

    fn store(&self) -> MutexGuard<'_, Store> {
        // A panic while holding the lock leaves counters that are still valid numbers.
        self.shared.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Renders every metric through `sink` (see [`visit`]).
    pub fn visit(&self, sink: &mut dyn FnMut(&Desc, &[Point])) {
        visit(&self.store(), sink);
    }

    /// Counts metric points an OTLP export delivered or lost.
    pub fn count_points(&self, exported: u64, failed: u64) {
        let mut store = self.store();
        store.points.exported += exported;
        store.points.failed += failed;
    }
}

/// Feeds the loop's own state to the metrics, once per turn of the event loop.
pub struct Recorder {
    metrics: Metrics,
    last_gauges: Option<Instant>,
    programs: HashMap<u32, String>,
}

impl LoopObserver for Recorder {
    fn tick(&mut self, engine: &Engine, summary: &LoopSummary) {
        self.metrics.shared.health.beat();
        let now = Instant::now();
        if self.last_gauges.is_some_and(|t| now.duration_since(t) < GAUGE_INTERVAL) {
            return;
        }
        self.last_gauges = Some(now);
        let (on, off) = engine.keepalive_split();
        let outstanding = engine.unanswered_probes() as u64;
        let stats = engine.stats();
        let programs = if programs::stats_enabled() { programs::program_stats(&self.programs) } else { Vec::new() };
        let mut store = self.metrics.store();
        let a = &mut store.agent;
        a.connections = [on as u64, off as u64];
        a.outstanding = outstanding;
        a.bounds = BoundHits {
            max_connections: stats.cap_rejected,
            engine_hold: stats.unordered,
            owner_hold: summary.held_full,
            owner_lookups: summary.death_owners.dropped,
            kernel_owner_table: summary.death_owners_unawaited,
            max_sockets: a.bounds.max_sockets,
        };
        a.events = summary.events;
        a.decode_errors = summary.decode_errors;
        a.records = summary.records;
        a.lost.ringbuf_full = summary.lost;
        a.lost.skipped_run = summary.skipped.unwrap_or_default();
        a.lost.unpaired_timer_run = summary.timer_unpaired;
        a.lost.inflight_map = summary.inflight_lost;
        a.programs = programs;
    }
}

/// Whether a metric is a monotonic sum or a gauge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

/// A metric as OpenTelemetry names it.
#[derive(Clone, Copy, Debug)]
pub struct Desc {
    pub name: &'static str,
    /// UCUM unit; annotations in braces (`{probe}`) give no Prometheus suffix.
    pub unit: &'static str,
    pub help: &'static str,
    pub kind: Kind,
}

/// One series: attributes (OpenTelemetry names) and value.
#[derive(Clone, Debug, PartialEq)]
pub struct Point {
    pub attrs: Vec<(&'static str, String)>,
    pub value: f64,
}

fn point(attrs: &[(&'static str, &str)], value: u64) -> Point {
    Point { attrs: attrs.iter().map(|(k, v)| (*k, v.to_string())).collect(), value: value as f64 }
}

const fn desc(name: &'static str, unit: &'static str, kind: Kind, help: &'static str) -> Desc {
    Desc { name, unit, help, kind }
}

/// Every metric with its series, in a stable order: the one description the Prometheus and the
/// OTLP exposition both render.
pub fn visit(store: &Store, sink: &mut dyn FnMut(&Desc, &[Point])) {
    visit_keepalive(store, sink);
    visit_at_risk(store, sink);
    visit_agent(store, sink);
}

fn visit_keepalive(store: &Store, sink: &mut dyn FnMut(&Desc, &[Point])) {
    for (family, series) in store.counters() {
        let mut points: Vec<Point> = series
            .iter()
            .map(|(w, v, count)| {
                let mut attrs: Vec<(&'static str, String)> = Vec::new();
                if let Some((key, values)) = family.attribute {
                    attrs.push((key, values[v as usize].to_string()));
                }
                if let Some(wl) = store.workload(w) {
                    attrs.extend(wl.attributes().map(|(k, v)| (k, v.to_string())));
                }
                Point { attrs, value: count as f64 }
            })
            .collect();
        if let Some(n) = series.overflow() {
            points.push(point(&[("otel.metric.overflow", "true")], n));
        }
        sink(&desc(family.name, family.unit, Kind::Counter, family.help), &points);
    }
    let a = &store.agent;
    sink(
        &desc("keepalive.connections", "{connection}", Kind::Gauge, "Connections followed now, by whether keep-alive is on (off: followed for TCP_USER_TIMEOUT)."),
        &[point(&[("keepalive.enabled", "true")], a.connections[0]), point(&[("keepalive.enabled", "false")], a.connections[1])],
    );
    sink(
        &desc("keepalive.probes.outstanding", "{connection}", Kind::Gauge, "Connections whose keep-alive probes went unanswered for a whole interval now (a second probe is out: half-open suspects)."),
        &[point(&[], a.outstanding)],
    );
}

/// `keepalive.connections.at_risk` per diagnosis and workload (every diagnosis present, 0 when no
/// socket has it; workload series past the series cap go to the overflow series), and what the periodic
/// audit costs; nothing before the first audit.
fn visit_at_risk(store: &Store, sink: &mut dyn FnMut(&Desc, &[Point])) {
    let Some(r) = &store.at_risk else { return };
    let mut points = Vec::new();
    let mut overflow = None;
    for id in crate::audit::DiagnosisId::ALL {
        let series: Vec<_> = r.series.iter().filter(|(d, _, _)| *d == id).collect();
        if series.is_empty() {
            points.push(point(&[("keepalive.diagnosis", id.name())], 0));
        }
        for (_, w, n) in series {
            if points.len() >= store.max_series() {
                *overflow.get_or_insert(0) += n;
                continue;
            }
            let mut attrs = vec![("keepalive.diagnosis", id.name().to_string())];
            attrs.extend(w.attributes().map(|(k, v)| (k, v.to_string())));
            points.push(Point { attrs, value: *n as f64 });
        }
    }
    if let Some(n) = overflow {
        points.push(point(&[("otel.metric.overflow", "true")], n));
    }
    sink(
        &desc("keepalive.connections.at_risk", "{connection}", Kind::Gauge, "Connections the last periodic audit diagnosed (run --audit-interval), by diagnosis and workload: what will die silently, and why."),
        &points,
    );
    sink(&desc("keepalive.agent.audit.duration", "s", Kind::Gauge, "Wall time of the last periodic audit."), &[Point { attrs: Vec::new(), value: r.duration.as_secs_f64() }]);
    sink(&desc("keepalive.agent.audit.sockets", "{socket}", Kind::Gauge, "Sockets the last periodic audit examined."), &[point(&[], r.sockets as u64)]);
    sink(&desc("keepalive.agent.audits", "{audit}", Kind::Counter, "Periodic audits made."), &[point(&[], store.audits)]);
}

fn visit_agent(store: &Store, sink: &mut dyn FnMut(&Desc, &[Point])) {
    let a = &store.agent;
    let mut unpaired: KindCounts = [0; EVENT_KINDS];
    unpaired[EventKind::Timer as usize] = a.lost.unpaired_timer_run;
    let mut inflight: KindCounts = [0; EVENT_KINDS];
    inflight[EventKind::Setsockopt as usize] = a.lost.inflight_map;
    let causes = [
        ("ringbuf_full", &a.lost.ringbuf_full),
        ("skipped_run", &a.lost.skipped_run),
        ("unpaired_timer_run", &unpaired),
        ("inflight_map", &inflight),
    ];
    let lost: Vec<Point> =
        causes
            .into_iter()
            .flat_map(|(cause, counts)| {
                counts.iter().enumerate().filter(|(_, n)| **n > 0).map(move |(kind, n)| {
                    let kind = EventKind::from_u8(kind as u8).map_or_else(|| kind.to_string(), |k| format!("{k:?}").to_ascii_lowercase());
                    Point { attrs: vec![("keepalive.event.kind", kind), ("keepalive.loss.cause", cause.to_string())], value: *n as f64 }
                })
            })
            .collect();
    sink(&desc("keepalive.agent.events.lost", "{event}", Kind::Counter, "Kernel events lost, by event kind and cause."), &lost);
    let counter = |name, help, v| (desc(name, "{event}", Kind::Counter, help), vec![point(&[], v)]);
    for (d, p) in [
        counter("keepalive.agent.events.received", "Kernel events read from the ring buffer.", a.events),
        counter("keepalive.agent.decode.errors", "Kernel events that could not be decoded.", a.decode_errors),
        counter("keepalive.agent.records", "Timeline records the engine produced.", a.records),
    ] {
        sink(&d, &p);
    }
    sink(
        &desc("keepalive.agent.connections.refused", "{connection}", Kind::Counter, "Connections not followed because --max-connections was reached."),
        &[point(&[], a.bounds.max_connections)],
    );
    let hits: Vec<Point> = a.bounds.points().iter().map(|(b, n)| point(&[("keepalive.bound", b)], *n)).collect();
    sink(
        &desc("keepalive.agent.bound.hits", "{hit}", Kind::Counter, "Times a bound on the agent's state was hit, by bound: what it then refused, reordered, waited for or left out (README, \"Bounds\")."),
        &hits,
    );
    if a.exports_spans {
        let e = &a.export;
        let outcomes = [
            ("created", e.spans_created),
            ("withheld", e.spans_withheld),
            ("exported", e.spans_exported),
            ("dropped", e.spans_dropped),
            ("failed", e.spans_failed),
        ];
        let points: Vec<Point> = outcomes.iter().map(|(o, n)| point(&[("keepalive.export.outcome", o)], *n)).collect();
        sink(&desc("keepalive.agent.spans", "{span}", Kind::Counter, "Spans built (created) or not exported by the span policy (withheld), and what became of those built (exported, dropped: queue full, failed)."), &points);
        sink(&desc("keepalive.agent.export.queue.size", "{span}", Kind::Gauge, "Spans waiting for export now."), &[point(&[], e.queued)]);
    }
    let p = &store.points;
    let points = [("exported", p.exported), ("failed", p.failed)].map(|(o, n)| point(&[("keepalive.export.outcome", o)], n));
    sink(&desc("keepalive.agent.metric.points", "{point}", Kind::Counter, "Metric points sent over OTLP, by outcome."), &points);
    let hooks: Vec<Point> = a.hooks.iter().map(|(h, m)| point(&[("keepalive.hook", h), ("keepalive.attach.method", m)], 1)).collect();
    sink(&desc("keepalive.agent.hooks", "{hook}", Kind::Gauge, "Hooks attached (1), with the method that reached them."), &hooks);
    if !a.programs.is_empty() {
        let runs: Vec<Point> = a.programs.iter().map(|(n, c, _)| point(&[("keepalive.program", n)], *c)).collect();
        sink(&desc("keepalive.agent.program.runs", "{run}", Kind::Counter, "Runs of each BPF program (kernel.bpf_stats_enabled=1)."), &runs);
        let time: Vec<Point> = a
            .programs
            .iter()
            .map(|(n, _, ns)| Point { attrs: vec![("keepalive.program", n.clone())], value: *ns as f64 / 1e9 })
            .collect();
        sink(&desc("keepalive.agent.program.run.time", "s", Kind::Counter, "Time spent in each BPF program (kernel.bpf_stats_enabled=1)."), &time);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_described_once_with_its_gauges() {
        let m = Metrics::new(10, false, None);
        let mut names = Vec::new();
        m.visit(&mut |d, _| names.push(d.name));
        let mut sorted = names.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), names.len(), "{names:?}");
        for n in ["keepalive.probes", "keepalive.connection.deaths", "keepalive.connections", "keepalive.probes.outstanding", "keepalive.agent.events.lost"] {
            assert!(names.contains(&n), "{n} missing: {names:?}");
        }
    }

    /// Every bound is a series from the start (0 until hit), fed from the loop's summary, the
    /// engine and the audits; the in-flight map's losses are a cause of lost events.
    #[test]
    fn bound_hits_and_inflight_losses_are_exposed() {
        use crate::timeline::engine::EngineConfig;
        let m = Metrics::new(10, false, None);
        let mut summary = LoopSummary { held_full: 2, death_owners_unawaited: 4, inflight_lost: 5, ..LoopSummary::default() };
        summary.death_owners.dropped = 3;
        let engine = Engine::new(EngineConfig::default());
        m.recorder(HashMap::new()).tick(&engine, &summary);
        for _ in 0..2 {
            m.set_at_risk(crate::audit::periodic::AtRisk { over_limit: 7, ..Default::default() });
        }
        let (mut hits, mut lost) = (Vec::new(), Vec::new());
        m.visit(&mut |d, p| match d.name {
            "keepalive.agent.bound.hits" => hits = p.iter().map(|p| (p.attrs[0].1.clone(), p.value)).collect(),
            "keepalive.agent.events.lost" => lost = p.to_vec(),
            _ => {}
        });
        let want = [
            ("max_connections", 0.0),
            ("engine_hold", 0.0),
            ("owner_hold", 2.0),
            ("owner_lookups", 3.0),
            ("kernel_owner_table", 4.0),
            ("max_sockets", 14.0),
        ]
        .map(|(b, n)| (b.to_string(), n));
        assert_eq!(hits, want);
        let attrs: Vec<(&str, String)> = [("keepalive.event.kind", "setsockopt"), ("keepalive.loss.cause", "inflight_map")]
            .map(|(k, v)| (k, v.to_string()))
            .to_vec();
        assert_eq!(lost, [Point { attrs, value: 5.0 }]);
    }

    #[test]
    fn at_risk_series_are_capped_with_an_overflow_series() {
        use crate::audit::{periodic::AtRisk, DiagnosisId};
        use store::Workload;
        let m = Metrics::new(8, false, None);
        let wl = |i: usize| Workload { executable: Some(format!("p{i}")), ..Workload::default() };
        let series = (0..10).map(|i| (DiagnosisId::KeepaliveOffIdle, wl(i), 1)).collect();
        m.set_at_risk(AtRisk { series, sockets: 10, ..AtRisk::default() });
        let mut at_risk = Vec::new();
        m.visit(&mut |d, p| {
            if d.name == "keepalive.connections.at_risk" {
                at_risk = p.to_vec();
            }
        });
        // 7 workload series (the cap), the 3 others in the overflow series, and the 5 diagnoses no
        // socket has at 0.
        assert_eq!(at_risk.len(), 7 + 1 + 5, "{at_risk:?}");
        let overflow = at_risk.iter().find(|p| p.attrs.iter().any(|(k, _)| *k == "otel.metric.overflow")).unwrap();
        assert_eq!(overflow.value, 3.0);
        let total: f64 = at_risk.iter().map(|p| p.value).sum();
        assert_eq!(total, 10.0);
    }

    #[test]
    fn health_goes_stale_without_heartbeat() {
        let h = Health::new();
        assert!(!h.is_ready());
        h.beat();
        assert!(h.since_beat() < HEALTH_STALE);
        h.set_ready();
        assert!(h.is_ready());
    }
}
