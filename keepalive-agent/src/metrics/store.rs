//! The metric values: keep-alive counters counted from the engine's [`Record`]s, with workload
//! attributes and a cardinality cap per metric, and the agent's own counters and gauges.
//!
//! Memory is bounded whatever the workload: at most `max_series - 1` workloads are told apart, and each
//! keep-alive counter holds at most `max_series - 1` series plus the overflow series
//! (`otel.metric.overflow = "true"`) that counts everything past the cap.

use std::net::IpAddr;

use crate::container::CgroupResolver;
use crate::kernel::progstats::KindCounts;
use crate::event::comm_str;
use crate::export::ExportStats;
use crate::timeline::{AckPrecision, ConnView, DeathCause, EpisodeOutcome, Record, RecordKind};

/// Default of `--metrics-max-series`.
pub const DEFAULT_MAX_SERIES: usize = 2_000;

/// Workload id of the overflow series.
const OVERFLOW: u32 = u32::MAX;

/// A keep-alive counter: its OpenTelemetry name, help, and the attribute that tells its series
/// apart (with its values, indexed by the series' value index).
#[derive(Debug)]
pub struct Family {
    /// OpenTelemetry name (`keepalive.connection.deaths`).
    pub name: &'static str,
    /// Unit, as an OpenTelemetry annotation (`{probe}`): no Prometheus suffix.
    pub unit: &'static str,
    pub help: &'static str,
    /// The attribute and its values, for counters that have one.
    pub attribute: Option<(&'static str, &'static [&'static str])>,
}

/// `keepalive.probes`.
pub const PROBES: Family = Family { name: "keepalive.probes", unit: "{probe}", help: "Keep-alive probes sent.", attribute: None };
/// `keepalive.answers`: value index = [`precision_index`].
pub const ANSWERS: Family = Family {
    name: "keepalive.answers",
    unit: "{probe}",
    help: "Keep-alive probes answered, by how precisely the answer was timed.",
    attribute: Some(("keepalive.answer.precision", &["segment", "next_firing", "at_end"])),
};
/// `keepalive.episodes`: value index = [`outcome_index`].
pub const EPISODES: Family = Family {
    name: "keepalive.episodes",
    unit: "{episode}",
    help: "Keep-alive episodes (first probe to outcome) ended, by outcome.",
    attribute: Some(("keepalive.episode.outcome", &["answered", "timeout", "reset", "closed", "incomplete"])),
};
/// `keepalive.suppressed`.
pub const SUPPRESSED: Family = Family {
    name: "keepalive.suppressed",
    unit: "{firing}",
    help: "Keep-alive timer firings that could not probe (data in flight or queued).",
    attribute: None,
};
/// `keepalive.connection.deaths`: value index = [`death_index`].
pub const DEATHS: Family = Family {
    name: "keepalive.connection.deaths",
    unit: "{connection}",
    help: "Connections that died, by cause (the engine's record that explains the death).",
    attribute: Some(("keepalive.death.cause", &["keepalive_timeout", "user_timeout", "retransmit_timeout", "peer_reset", "reuse_race", "reset_sent", "error"])),
};

/// The keep-alive counters, in [`Store::counters`] order.
pub const FAMILIES: [&Family; 5] = [&PROBES, &ANSWERS, &EPISODES, &SUPPRESSED, &DEATHS];
const I_PROBES: usize = 0;
const I_ANSWERS: usize = 1;
const I_EPISODES: usize = 2;
const I_SUPPRESSED: usize = 3;
const I_DEATHS: usize = 4;

/// Value index of a precision in [`ANSWERS`].
pub fn precision_index(p: AckPrecision) -> u8 {
    match p {
        AckPrecision::Segment => 0,
        AckPrecision::NextFiring => 1,
        AckPrecision::AtEnd => 2,
    }
}

/// Value index of an outcome in [`EPISODES`].
pub fn outcome_index(o: EpisodeOutcome) -> u8 {
    match o {
        EpisodeOutcome::Answered(_) => 0,
        EpisodeOutcome::TimedOut(_) => 1,
        EpisodeOutcome::Reset { .. } => 2,
        EpisodeOutcome::Closed => 3,
        EpisodeOutcome::Incomplete => 4,
    }
}

/// Value index of a cause of death in [`DEATHS`] (the engine's [`RecordKind::death_cause`]).
pub fn death_index(cause: DeathCause) -> u8 {
    match cause {
        DeathCause::KeepaliveTimeout => 0,
        DeathCause::UserTimeout => 1,
        DeathCause::RetransmitTimeout => 2,
        DeathCause::PeerReset => 3,
        DeathCause::ReuseRace => 4,
        DeathCause::ResetSent => 5,
        DeathCause::Error => 6,
    }
}

/// Counts per workload: one cell per (counter, attribute value), [`CELLS`] in all; a counter's
/// cells start at its [`OFFSETS`] entry.
type Cells = [u64; CELLS];
/// First cell of each counter of [`FAMILIES`], from the number of values of each (computed, so
/// that a value added to an attribute moves the counters after it).
const OFFSETS: [usize; FAMILIES.len()] = offsets();
const CELLS: usize = OFFSETS[FAMILIES.len() - 1] + width(FAMILIES[FAMILIES.len() - 1]);

/// The cells of counter `f`: one per value of its attribute, or one.
const fn width(f: &Family) -> usize {
    match f.attribute {
        Some((_, values)) => values.len(),
        None => 1,
    }
}

const fn offsets() -> [usize; FAMILIES.len()] {
    let mut out = [0; FAMILIES.len()];
    let mut i = 1;
    while i < FAMILIES.len() {
        out[i] = out[i - 1] + width(FAMILIES[i - 1]);
        i += 1;
    }
    out
}

/// The series bookkeeping of one keep-alive counter (its counts are in the workloads' cells).
#[derive(Debug, Default, Clone, Copy)]
struct Cap {
    /// Regular series held (non-zero cells).
    series: usize,
    /// Counted in the overflow series (`Some` once the cap was hit).
    overflow: Option<u64>,
}

/// The series of one keep-alive counter, as [`Store::counters`] hands them out.
#[derive(Clone, Copy)]
pub struct Series<'a> {
    store: &'a Store,
    family: usize,
}

impl<'a> Series<'a> {
    /// Every regular series, by workload: (workload, value index, count).
    pub fn iter(&self) -> impl Iterator<Item = (u32, u8, u64)> + 'a {
        let (off, n) = (OFFSETS[self.family], width(FAMILIES[self.family]));
        self.store.cells.iter().enumerate().flat_map(move |(w, cells)| {
            (0..n).filter(move |&v| cells[off + v] != 0).map(move |v| (w as u32, v as u8, cells[off + v]))
        })
    }

    /// The overflow series' count, once the cap was hit.
    pub fn overflow(&self) -> Option<u64> {
        self.store.caps[self.family].overflow
    }

    /// Regular series held.
    pub fn len(&self) -> usize {
        self.store.caps[self.family].series
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The attributes of one workload: who holds the connections a series counts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Workload {
    /// `process.executable.name` (the task name the kernel reported).
    pub executable: Option<String>,
    /// `container.id`, from the process' cgroup path.
    pub container_id: Option<String>,
    /// `k8s.pod.uid`, from the process' cgroup path.
    pub pod_uid: Option<String>,
    /// `network.peer.address`, only with per-peer labels on.
    pub peer: Option<String>,
}

impl Workload {
    /// The attributes that are known, as (OpenTelemetry name, value).
    pub fn attributes(&self) -> impl Iterator<Item = (&'static str, &str)> {
        [
            ("process.executable.name", &self.executable),
            ("container.id", &self.container_id),
            ("k8s.pod.uid", &self.pod_uid),
            ("network.peer.address", &self.peer),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_deref().map(|v| (k, v)))
    }
}

/// What tells workloads apart on the event path (cheap to compare and hash).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct WorkloadKey {
    comm: [u8; 16],
    cgroup_id: u64,
    known: bool,
    peer: Option<IpAddr>,
}

/// Workloads seen, at most `max`; past it, connections of new workloads count in the overflow series.
struct Workloads {
    ids: foldhash::HashMap<WorkloadKey, u32>,
    /// The last key looked up and its id: a connection's records come in runs.
    last: Option<(WorkloadKey, u32)>,
    labels: Vec<Workload>,
    max: usize,
    resolver: CgroupResolver,
    peer_labels: bool,
}

impl Workloads {
    fn id(&mut self, conn: &ConnView) -> u32 {
        let key = WorkloadKey {
            comm: conn.process.map(|p| p.comm).unwrap_or_default(),
            cgroup_id: conn.process.map_or(0, |p| p.cgroup_id),
            known: conn.process.is_some(),
            peer: self.peer_labels.then(|| conn.remote.ip()),
        };
        if let Some((k, id)) = self.last {
            if k == key {
                return id;
            }
        }
        let id = self.lookup(key);
        self.last = Some((key, id));
        id
    }

    fn lookup(&mut self, key: WorkloadKey) -> u32 {
        if let Some(&id) = self.ids.get(&key) {
            return id;
        }
        if self.labels.len() >= self.max {
            return OVERFLOW;
        }
        let cgroup = self.resolver.resolve(key.cgroup_id);
        let workload = Workload {
            executable: key.known.then(|| comm_str(&key.comm).to_string()),
            container_id: cgroup.as_ref().and_then(|c| c.container_id.clone()),
            pod_uid: cgroup.and_then(|c| c.pod).map(|p| p.uid),
            peer: key.peer.map(|ip| ip.to_string()),
        };
        let id = self.labels.len() as u32;
        self.labels.push(workload);
        self.ids.insert(key, id);
        id
    }
}

/// Kernel events lost, per event kind, by cause.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lost {
    /// The ring buffer was full.
    pub ringbuf_full: KindCounts,
    /// The kernel skipped a program run (recursion on one CPU); zero where it does not count them.
    pub skipped_run: KindCounts,
    /// Keep-alive timer runs seen at their entry or their exit only (timer events).
    pub unpaired_timer_run: u64,
    /// Keep-alive settings the kprobe path's in-flight `setsockopt` map lost (setsockopt events).
    pub inflight_map: u64,
}

/// How often each bound on the agent's state was hit (`keepalive.agent.bound.hits`): what was
/// then refused, reordered, waited for or left out is in [`BoundHits::points`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BoundHits {
    /// Connections refused by `--max-connections`, each once (also
    /// `keepalive.agent.connections.refused`).
    pub max_connections: u64,
    /// Events the engine handled out of order: holding them behind their timer run's event
    /// would have passed its bound (64 per socket, `--max-connections` sockets).
    pub engine_hold: u64,
    /// Times the records held for deaths' owner lookups filled their bound and the loop waited
    /// for the lookup instead of draining the ring buffer.
    pub owner_hold: u64,
    /// Deaths reported without an owner: more sockets to look up at once than one scan takes.
    pub owner_lookups: u64,
    /// Deaths whose socket the kernel's owner table had no room to remember (looked up in
    /// `/proc` only).
    pub kernel_owner_table: u64,
    /// Sockets a periodic audit left out (`--max-sockets`), summed over audits.
    pub max_sockets: u64,
}

impl BoundHits {
    /// (value of `keepalive.bound`, hits), every bound, hit or not.
    pub fn points(&self) -> [(&'static str, u64); 6] {
        [
            ("max_connections", self.max_connections),
            ("engine_hold", self.engine_hold),
            ("owner_hold", self.owner_hold),
            ("owner_lookups", self.owner_lookups),
            ("kernel_owner_table", self.kernel_owner_table),
            ("max_sockets", self.max_sockets),
        ]
    }
}

/// The agent's own health, set by the event loop (see [`super::Recorder`]).
#[derive(Clone, Debug, Default)]
pub struct AgentValues {
    pub events: u64,
    pub decode_errors: u64,
    pub records: u64,
    pub bounds: BoundHits,
    pub lost: Lost,
    /// Followed connections with keep-alive on / off (only `TCP_USER_TIMEOUT`).
    pub connections: [u64; 2],
    pub outstanding: u64,
    pub export: ExportStats,
    /// Whether `export` is meaningful (`run` exports spans).
    pub exports_spans: bool,
    /// Hooks attached: (hook, method).
    pub hooks: Vec<(&'static str, &'static str)>,
    /// Per program: (name, run count, run time ns), when `kernel.bpf_stats_enabled` is on.
    pub programs: Vec<(String, u64, u64)>,
}

/// Metric points sent over OTLP, for the agent's own metrics (nothing is queued, so nothing is
/// dropped: a failed push is counted and the next one sends the values again).
#[derive(Clone, Copy, Debug, Default)]
pub struct PointStats {
    pub exported: u64,
    pub failed: u64,
}

/// All metric values. One instance sits behind a mutex in [`super::Metrics`].
pub struct Store {
    /// Per workload id (at most `max_series - 1`).
    cells: Vec<Cells>,
    caps: [Cap; 5],
    /// Regular series per counter at most.
    max: usize,
    workloads: Workloads,
    pub agent: AgentValues,
    pub points: PointStats,
    /// Resource attributes, for the Prometheus exposition's `target_info`.
    pub resource: Vec<(String, String)>,
    /// The last periodic audit (`run --audit-interval`), and how many walks were made.
    pub at_risk: Option<crate::audit::periodic::AtRisk>,
    pub audits: u64,
}

impl Store {
    /// `max_series`: series per metric, the overflow series included (at least 2);
    /// `peer_labels`: add `network.peer.address`.
    pub fn new(max_series: usize, peer_labels: bool, resolver: CgroupResolver) -> Self {
        let max = max_series.max(2);
        Store {
            cells: Vec::new(),
            caps: [Cap::default(); 5],
            max: max - 1,
            workloads: Workloads { ids: Default::default(), last: None, labels: Vec::new(), max: max - 1, resolver, peer_labels },
            agent: AgentValues::default(),
            points: PointStats::default(),
            resource: Vec::new(),
            at_risk: None,
            audits: 0,
        }
    }

    /// Counts one record (records of a connection in order).
    pub fn count(&mut self, r: &Record) {
        let (family, value) = match &r.kind {
            RecordKind::Probe { .. } | RecordKind::UnseenProbes { .. } => (I_PROBES, 0),
            RecordKind::Ack { precision, .. } => (I_ANSWERS, precision_index(*precision)),
            RecordKind::Suppressed { .. } => (I_SUPPRESSED, 0),
            RecordKind::EpisodeEnd(ep) => (I_EPISODES, outcome_index(ep.outcome)),
            // One record explains each death (the reset and error a keep-alive timeout also
            // causes do not).
            kind => match kind.death_cause() {
                Some(cause) => (I_DEATHS, death_index(cause)),
                None => return,
            },
        };
        // Probes only the kernel's counter saw count too (one record, several probes).
        let n = u64::from(r.kind.probes_reported()).max(1);
        let w = self.workloads.id(&r.conn);
        self.add(w, family, value, n);
    }

    /// `n` more in counter `family`'s series (`workload`, `value`), or in its overflow series when
    /// that would be a series past the cap.
    fn add(&mut self, workload: u32, family: usize, value: u8, n: u64) {
        let cap = &mut self.caps[family];
        if workload != OVERFLOW {
            let w = workload as usize;
            if w >= self.cells.len() {
                self.cells.resize(w + 1, [0; CELLS]);
            }
            let cell = &mut self.cells[w][OFFSETS[family] + usize::from(value)];
            if *cell != 0 {
                *cell += n;
                return;
            }
            if cap.series < self.max {
                cap.series += 1;
                *cell = n;
                return;
            }
        }
        *cap.overflow.get_or_insert(0) += n;
    }

    /// The keep-alive counters, in [`FAMILIES`] order.
    pub fn counters(&self) -> impl Iterator<Item = (&'static Family, Series<'_>)> {
        FAMILIES.into_iter().enumerate().map(move |(family, f)| (f, Series { store: self, family }))
    }

    /// A workload's attributes (`None` for the overflow id).
    pub fn workload(&self, id: u32) -> Option<&Workload> {
        self.workloads.labels.get(id as usize)
    }

    /// Regular series one metric may have (past them, the overflow series).
    pub fn max_series(&self) -> usize {
        self.max
    }

    /// Workloads told apart so far.
    pub fn workloads(&self) -> usize {
        self.workloads.labels.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Process, TcpState};
    use crate::timeline::{Episode, TimeoutReason};

    fn conn(id: u64, comm: &str) -> ConnView {
        let mut c = [0u8; 16];
        c[..comm.len()].copy_from_slice(comm.as_bytes());
        ConnView {
            id,
            sk: id,
            netns: 1,
            local: "127.0.0.1:1000".parse().unwrap(),
            remote: "127.0.0.1:2000".parse().unwrap(),
            process: Some(Process { pid: 1, tid: 1, comm: c, cgroup_id: 0 }),
            first_seen_ns: 0,
        }
    }

    fn rec(c: ConnView, kind: RecordKind) -> Record {
        Record { ts_ns: 1, conn: c, kind }
    }

    fn episode(outcome: EpisodeOutcome) -> RecordKind {
        RecordKind::EpisodeEnd(Episode {
            number: 1,
            start_ns: 0,
            end_ns: 1,
            probes: 1,
            outcome,
            probe_ts_ns: smallvec::smallvec![0],
            first_timed_probe: 1,
        })
    }

    fn store() -> Store {
        Store::new(DEFAULT_MAX_SERIES, false, CgroupResolver::new(None))
    }

    fn total(s: &Store, f: &Family, value: u8) -> u64 {
        let (_, series) = s.counters().find(|(g, _)| g.name == f.name).unwrap();
        series.iter().filter(|(_, v, _)| *v == value).map(|(_, _, c)| c).sum()
    }

    #[test]
    fn a_keepalive_death_counts_once_with_its_cause() {
        let mut s = store();
        let c = conn(1, "curl");
        for kind in [
            RecordKind::Probe { n: 1 },
            RecordKind::Probe { n: 2 },
            // Probes 3 and 4 only the kernel's probe counter saw: they count too.
            RecordKind::UnseenProbes { first: 3, last: 4 },
            RecordKind::Timeout { reason: TimeoutReason::Keepalive, probes: 4, idle: None },
            episode(EpisodeOutcome::TimedOut(TimeoutReason::Keepalive)),
            RecordKind::Reset { reason: "tcp_keepalive_timeout".into(), active: true, death: false },
            RecordKind::Error { errno: 110, death: false },
            RecordKind::Close { state: TcpState::Established, closed_by: None, idle: None },
        ] {
            s.count(&rec(c, kind));
        }
        assert_eq!(total(&s, &PROBES, 0), 4);
        assert_eq!(total(&s, &DEATHS, 0), 1);
        assert_eq!(total(&s, &DEATHS, 2) + total(&s, &DEATHS, 4), 0);
        assert_eq!(total(&s, &EPISODES, 1), 1);
        assert_eq!(s.workload(0).unwrap().executable.as_deref(), Some("curl"));
    }

    #[test]
    fn answers_suppressed_and_peer_resets() {
        let mut s = store();
        let c = conn(2, "app");
        s.count(&rec(c, RecordKind::Ack { probes: 1, precision: AckPrecision::NextFiring }));
        s.count(&rec(c, episode(EpisodeOutcome::Answered(AckPrecision::NextFiring))));
        s.count(&rec(c, RecordKind::Suppressed { packets_out: 1, unsent: 0 }));
        s.count(&rec(c, RecordKind::PeerReset { idle: None }));
        s.count(&rec(c, RecordKind::Error { errno: 104, death: false }));
        assert_eq!(total(&s, &ANSWERS, 1), 1);
        assert_eq!(total(&s, &EPISODES, 0), 1);
        assert_eq!(total(&s, &SUPPRESSED, 0), 1);
        assert_eq!(total(&s, &DEATHS, 3), 1);
        assert_eq!(total(&s, &DEATHS, 4), 0);
    }

    /// Every value of every counter has a cell of its own: an answer found at the close is counted
    /// as such and nowhere else (the cells were laid out by hand once, and a new value ran into the
    /// next counter's first cell).
    #[test]
    fn every_value_has_its_own_cell() {
        let mut s = store();
        let c = conn(3, "app");
        s.count(&rec(c, RecordKind::Ack { probes: 1, precision: AckPrecision::AtEnd }));
        assert_eq!(total(&s, &ANSWERS, 2), 1);
        assert_eq!(total(&s, &EPISODES, 0), 0);
        s.count(&rec(c, episode(EpisodeOutcome::Answered(AckPrecision::AtEnd))));
        assert_eq!((total(&s, &ANSWERS, 2), total(&s, &EPISODES, 0)), (1, 1));
        let cells: usize = FAMILIES.iter().map(|f| width(f)).sum();
        assert_eq!(CELLS, cells);
        for (i, f) in FAMILIES.iter().enumerate().skip(1) {
            assert_eq!(OFFSETS[i], OFFSETS[i - 1] + width(FAMILIES[i - 1]), "{}", f.name);
        }
    }

    #[test]
    fn series_past_the_cap_go_to_the_overflow_series() {
        let mut s = Store::new(4, false, CgroupResolver::new(None));
        for i in 0..10u64 {
            s.count(&rec(conn(i, &format!("p{i}")), RecordKind::Probe { n: 1 }));
        }
        let (_, probes) = s.counters().next().unwrap();
        assert_eq!(probes.len(), 3);
        assert_eq!(probes.overflow(), Some(7));
        assert_eq!(s.workloads(), 3);
        // A known workload keeps counting in its own series.
        s.count(&rec(conn(20, "p0"), RecordKind::Probe { n: 1 }));
        let (_, probes) = s.counters().next().unwrap();
        assert_eq!(probes.iter().map(|(_, _, c)| c).sum::<u64>(), 4);
    }
}
