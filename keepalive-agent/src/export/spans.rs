//! The span model: timeline [`Record`]s in, finished OpenTelemetry spans ([`SpanData`]) out. Pure:
//! no I/O, no clock reads (the caller passes the [`WallClock`]).
//!
//! It formats the engine's records and keeps no model of its own: a connection's span state lives
//! from its first record to its last (`close` or `untracked`, which the engine emits for every
//! connection it stops following, including at shutdown), and an episode span is built from the
//! engine's `episode` record alone.
//!
//! - One trace per connection; its root span `tcp.connection` runs from the record that opened the
//!   connection (or, lacking one, `ConnView::first_seen_ns`) to its last record, and is produced then.
//! - One child span `tcp.keepalive.episode` per keep-alive episode, produced as soon as its
//!   `episode` record arrives (always before the connection's last record). The ids of the
//!   connection span are drawn when the connection is first seen, so an episode can name its parent
//!   long before the parent is exported.
//! - Every timestamp is a kernel event time converted with the [`WallClock`] current when the record
//!   arrived; the only exception is the end of spans ended by the agent's shutdown (the engine's
//!   shutdown records carry the stop time).
//!
//! - Span volume ([`SpanPolicy`]): by default a healthy connection (every episode answered by its
//!   first probe, no timeout, reset or error) exports no span at all; a connection with a problem
//!   exports its problem episodes as they end, the last healthy episode before each problem and at
//!   its end (at most one healthy episode span is held per connection), and its connection span.
//!   [`SpanPolicy::All`] exports every span.
//!
//! See the "OpenTelemetry traces" section of README.md for the user-facing description.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::SystemTime;

use opentelemetry::trace::{
    Event, SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{Array, InstrumentationScope, KeyValue, StringValue, Value};
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator, SpanData, SpanEvents, SpanLinks};

use crate::clock::WallClock;
use crate::event::{Process, SockSettings, TcpState};
use crate::timeline::{
    errno_name, ClosedBy, ConnView, Episode, EpisodeOutcome, Idle, Record, RecordKind, SettingsSource,
    TimeoutReason, UntrackReason,
};

/// Span, event and attribute names. Semantic-convention names where one exists; everything of our
/// own lives under `tcp.keepalive.`.
pub mod names {
    pub const SPAN_CONNECTION: &str = "tcp.connection";
    pub const SPAN_EPISODE: &str = "tcp.keepalive.episode";

    pub const EV_CONFIG: &str = "tcp.keepalive.config";
    pub const EV_PROBE: &str = "tcp.keepalive.probe";
    pub const EV_ACK: &str = "tcp.keepalive.ack";
    pub const EV_SUPPRESSED: &str = "tcp.keepalive.suppressed";
    pub const EV_FIN_WAIT2: &str = "tcp.keepalive.fin_wait2";
    pub const EV_TIMEOUT: &str = "tcp.keepalive.timeout";
    pub const EV_RESET: &str = "tcp.keepalive.reset";
    pub const EV_PEER_RESET: &str = "tcp.keepalive.peer_reset";
    pub const EV_ERROR: &str = "tcp.keepalive.error";
    pub const EV_CLOSE: &str = "tcp.keepalive.close";
    pub const EV_REUSE_RACE: &str = "tcp.keepalive.reuse_race";

    // OpenTelemetry semantic conventions.
    pub const NETWORK_TRANSPORT: &str = "network.transport";
    pub const NETWORK_TYPE: &str = "network.type";
    pub const NETWORK_LOCAL_ADDRESS: &str = "network.local.address";
    pub const NETWORK_LOCAL_PORT: &str = "network.local.port";
    pub const NETWORK_PEER_ADDRESS: &str = "network.peer.address";
    pub const NETWORK_PEER_PORT: &str = "network.peer.port";
    pub const PROCESS_PID: &str = "process.pid";
    pub const PROCESS_EXECUTABLE_NAME: &str = "process.executable.name";
    pub const ERROR_TYPE: &str = "error.type";

    // Ours.
    pub const CONNECTION_ID: &str = "tcp.keepalive.connection.id";
    pub const NETNS: &str = "tcp.keepalive.netns";
    pub const CGROUP_ID: &str = "tcp.keepalive.process.cgroup_id";
    pub const OPEN_STATE: &str = "tcp.keepalive.open.state";
    pub const FIRST_SEEN_SOURCE: &str = "tcp.keepalive.first_seen.source";
    pub const SNAPSHOT: &str = "tcp.keepalive.snapshot";
    pub const ENABLED: &str = "tcp.keepalive.enabled";
    pub const IDLE_S: &str = "tcp.keepalive.idle_s";
    pub const INTVL_S: &str = "tcp.keepalive.intvl_s";
    pub const CNT: &str = "tcp.keepalive.cnt";
    pub const USER_TIMEOUT_MS: &str = "tcp.keepalive.user_timeout_ms";
    pub const SETTINGS_SOURCE: &str = "tcp.keepalive.settings.source";
    pub const SETTINGS_OPTION: &str = "tcp.keepalive.settings.option";
    pub const SETTINGS_DEFAULTS: &str = "tcp.keepalive.settings.defaults";
    pub const SETTINGS_CHANGES: &str = "tcp.keepalive.settings.changes";
    pub const EPISODES: &str = "tcp.keepalive.episodes";
    pub const PROBES: &str = "tcp.keepalive.probes";
    pub const SUPPRESSED: &str = "tcp.keepalive.suppressed";
    pub const IDLE_REARMS: &str = "tcp.keepalive.idle_rearms";
    pub const BUSY_RETRIES: &str = "tcp.keepalive.busy_retries";
    pub const FIN_WAIT2: &str = "tcp.keepalive.fin_wait2";
    pub const OUTCOME: &str = "tcp.keepalive.outcome";
    pub const TIMEOUT_REASON: &str = "tcp.keepalive.timeout.reason";
    pub const RESET_REASON: &str = "tcp.keepalive.reset.reason";
    pub const RESET_ACTIVE: &str = "tcp.keepalive.reset.active";
    pub const ERRNO: &str = "tcp.keepalive.errno";
    pub const CLOSE_STATE: &str = "tcp.keepalive.close.state";
    pub const CLOSED_BY: &str = "tcp.keepalive.close.closed_by";
    pub const IDLE_MS: &str = "tcp.keepalive.idle_ms";
    pub const SINCE_RECEIVED_MS: &str = "tcp.keepalive.since_received_ms";
    pub const SINCE_SENT_MS: &str = "tcp.keepalive.since_sent_ms";
    pub const RETRANSMITS: &str = "tcp.keepalive.retransmits";
    pub const REUSE_PEER_IDLE_MS: &str = "tcp.keepalive.reuse_race.peer_idle_ms";
    pub const REUSE_WRITE_AFTER_MS: &str = "tcp.keepalive.reuse_race.write_after_ms";
    pub const REUSE_BYTES: &str = "tcp.keepalive.reuse_race.bytes";
    pub const INCOMPLETE: &str = "tcp.keepalive.incomplete";
    pub const UNTRACKED_REASON: &str = "tcp.keepalive.untracked.reason";
    pub const EPISODE_NUMBER: &str = "tcp.keepalive.episode.number";
    pub const EPISODE_OUTCOME: &str = "tcp.keepalive.episode.outcome";
    pub const EPISODE_PROBES: &str = "tcp.keepalive.episode.probes";
    pub const ACK_PRECISION: &str = "tcp.keepalive.ack.precision";
    pub const PROBE_N: &str = "tcp.keepalive.probe.n";
    pub const PACKETS_OUT: &str = "tcp.keepalive.packets_out";
    pub const UNSENT: &str = "tcp.keepalive.unsent_bytes";
}

use names::*;

/// Attribute counts at most, to allocate each span's attributes at once: the connection's
/// ([`conn_attrs`]), a process', settings', and what each span kind adds to the connection's
/// (including the container and pod attributes the exporter may add).
const CONN_ATTRS: usize = 8 + PROCESS_ATTRS;
const PROCESS_ATTRS: usize = 3;
const SETTINGS_ATTRS: usize = 8;
const EPISODE_SPAN_ATTRS: usize = 16;
const CONN_SPAN_ATTRS: usize = 40;

/// Events appended to a span, at most `limit`; the last few slots are kept for the events that say
/// how things ended (timeout, reset, error...), so that a flood of routine events (suppressed
/// firings, settings changes, probes) cannot push them out. What does not fit is counted in the
/// span's dropped-events count.
#[derive(Debug)]
struct Events {
    list: Vec<Event>,
    dropped: u32,
    limit: usize,
}

impl Events {
    fn new(limit: usize) -> Self {
        Self::with_capacity(limit, 0)
    }

    /// Room for `n` events (at most `limit`) allocated at once.
    fn with_capacity(limit: usize, n: usize) -> Self {
        Events {
            list: Vec::with_capacity(n.min(limit)),
            dropped: 0,
            limit,
        }
    }

    fn reserve(&self) -> usize {
        if self.limit >= 16 {
            8
        } else {
            self.limit / 2
        }
    }

    fn routine(&mut self, e: Event) {
        if self.list.len() < self.limit - self.reserve() {
            self.list.push(e);
        } else {
            self.dropped = self.dropped.saturating_add(1);
        }
    }

    fn important(&mut self, e: Event) {
        if self.list.len() < self.limit {
            self.list.push(e);
        } else {
            self.dropped = self.dropped.saturating_add(1);
        }
    }

    fn into_span_events(self) -> SpanEvents {
        let mut ev = SpanEvents::default();
        ev.events = self.list;
        ev.dropped_count = self.dropped;
        ev
    }
}

/// Counters of a connection span.
#[derive(Debug, Default)]
struct Counts {
    settings_changes: u64,
    probes: u64,
    episodes: u64,
    suppressed: u64,
    idle_rearms: u64,
    busy_retries: u64,
    fin_wait2: u64,
}

/// What ended a connection, from the records that said so.
#[derive(Debug, Default)]
struct Ending {
    timeout: Option<(TimeoutReason, u32)>,
    reset: Option<(String, bool)>,
    peer_reset: bool,
    /// (peer idle, write after the FIN, bytes) of a reuse race.
    reuse_race: Option<(u64, u64, u32)>,
    errno: Option<i32>,
    /// Who sent the first FIN, from the `close` record.
    closed_by: Option<ClosedBy>,
    /// Idle times of the death or of the close, whichever came last.
    idle: Option<Idle>,
}

/// A connection span being built: from the connection's first record to its last.
#[derive(Debug)]
struct ConnSpan {
    trace_id: TraceId,
    span_id: SpanId,
    start: SystemTime,
    view: ConnView,
    opened: Option<TcpState>,
    /// Source of the first settings seen: how the agent came to follow the connection.
    first_source: Option<SettingsSource>,
    settings: Option<(SockSettings, SettingsSource)>,
    counts: Counts,
    ending: Ending,
    events: Events,
    /// Its last episode ended `incomplete` (the engine stopped following the connection while
    /// probing): counted as ended by the shutdown only if the last record says so.
    incomplete_episode: bool,
    /// A problem was seen (a problem episode, a timeout, a reset or an error).
    problem: bool,
    /// With [`SpanPolicy::Problems`]: the last healthy episode, its span not built yet (most are
    /// never exported: building each would cost more than the rest of the record's path).
    held: Option<HeldEpisode>,
}

/// An episode and what its span takes from the connection at the time it ended.
#[derive(Debug)]
struct HeldEpisode {
    ep: Episode,
    view: ConnView,
    settings: Option<(SockSettings, SettingsSource)>,
}

impl HeldEpisode {
    /// Holds `ep` in place of the episode held, reusing its buffer of probe times (most episodes
    /// are healthy and replace the one before without ever being exported).
    fn replace(&mut self, ep: &Episode, view: ConnView, settings: Option<(SockSettings, SettingsSource)>) {
        let Episode { number, start_ns, end_ns, probes, outcome, probe_ts_ns, first_timed_probe } = ep;
        let held = &mut self.ep;
        (held.number, held.start_ns, held.end_ns, held.probes) = (*number, *start_ns, *end_ns, *probes);
        (held.outcome, held.first_timed_probe) = (*outcome, *first_timed_probe);
        held.probe_ts_ns.clone_from(probe_ts_ns);
        self.view = view;
        self.settings = settings;
    }
}

/// How a connection span ends: its last record.
enum Last {
    Close(TcpState),
    Untracked(UntrackReason),
    /// Left over when the model was finished (never expected: the engine ends every connection).
    Leftover,
}

/// Spans ended by the agent's shutdown rather than by the connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FinishCounts {
    /// Connection spans of connections still open (`untracked`, reason `shutdown`).
    pub connections: u64,
    /// Episode spans of episodes in progress (outcome `incomplete`).
    pub episodes: u64,
}

/// Which spans are exported (`--spans`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SpanPolicy {
    /// Only connections with a problem (an episode needing a second probe, a timeout, a reset, an
    /// error): their connection span, every problem episode, and the last healthy episode for
    /// context. Healthy connections are counted in the metrics only.
    #[default]
    Problems,
    /// Every connection span and every episode span.
    All,
}

/// Whether an episode is a problem: it needed more than one probe, or the connection died in it.
pub fn problem_episode(ep: &Episode) -> bool {
    ep.probes > 1 || matches!(ep.outcome, EpisodeOutcome::TimedOut(_) | EpisodeOutcome::Reset { .. })
}

/// Turns records into spans. See the module documentation.
#[derive(Debug)]
pub struct SpanModel {
    /// Boxed: a bucket holds the key and a pointer, so the table itself stays small enough to
    /// stay in cache; a connection's ~700-byte state inline made every lookup a cache miss.
    conns: HashMap<u64, Box<ConnSpan>, foldhash::fast::RandomState>,
    policy: SpanPolicy,
    /// Spans the policy did not export (healthy connections and the healthy episodes not kept).
    pub spans_withheld: u64,
    ids: RandomIdGenerator,
    scope: InstrumentationScope,
    max_events: usize,
    /// Spans produced so far.
    pub spans_built: u64,
    /// Spans ended by the agent's shutdown so far.
    pub ended_at_shutdown: FinishCounts,
}

impl SpanModel {
    /// `max_events`: events kept per span (at least 2); every span is exported
    /// ([`SpanPolicy::All`]).
    pub fn new(max_events: usize) -> Self {
        Self::with_policy(max_events, SpanPolicy::All)
    }

    /// A model exporting the spans `policy` selects.
    pub fn with_policy(max_events: usize, policy: SpanPolicy) -> Self {
        SpanModel {
            conns: HashMap::default(),
            policy,
            spans_withheld: 0,
            ids: RandomIdGenerator::default(),
            scope: InstrumentationScope::builder(env!("CARGO_PKG_NAME"))
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
            max_events: max_events.max(2),
            spans_built: 0,
            ended_at_shutdown: FinishCounts::default(),
        }
    }

    /// Connections whose last record has not come yet (at most the engine's tracked connections).
    pub fn open_connections(&self) -> usize {
        self.conns.len()
    }

    /// Processes a batch of records, appending the spans that finished to `out`.
    pub fn on_records(&mut self, records: &[Record], clock: &WallClock, out: &mut Vec<SpanData>) {
        for chunk in records.chunks(crate::prefetch::BATCH) {
            self.prefetch(chunk);
            for rec in chunk {
                self.on_record(rec, clock, out);
            }
        }
    }

    /// Asks for the states of `records`' connections to be brought into cache: looked up one
    /// after the other as the records come, each would be a cache miss of its own.
    fn prefetch(&self, records: &[Record]) {
        let mut last = None;
        for rec in records {
            if last != Some(rec.conn.id) {
                last = Some(rec.conn.id);
                if let Some(st) = self.conns.get(&rec.conn.id) {
                    crate::prefetch::prefetch::<ConnSpan>(&**st);
                }
            }
        }
    }

    /// Ends what is left at `stop_ns` (monotonic) with `tcp.keepalive.incomplete`; returns how many.
    /// The engine ends every connection at shutdown with records of its own, so nothing should be
    /// left: what is, is logged.
    pub fn finish(&mut self, clock: &WallClock, stop_ns: u64, out: &mut Vec<SpanData>) -> u64 {
        let mut ids: Vec<u64> = self.conns.keys().copied().collect();
        ids.sort_unstable();
        let n = ids.len() as u64;
        for id in ids {
            if let Some(st) = self.conns.remove(&id) {
                log::debug!("export: connection {id} had no last record; its span ends at the stop");
                self.close_connection(*st, clock.to_system_time(stop_ns), Last::Leftover, clock, out);
            }
        }
        n
    }

    fn emit(&mut self, span: SpanData, out: &mut Vec<SpanData>) {
        self.spans_built += 1;
        out.push(span);
    }

    fn state(&mut self, rec: &Record, clock: &WallClock) -> &mut ConnSpan {
        let start_ns = match rec.kind {
            RecordKind::Opened { .. } => rec.ts_ns,
            _ => rec.conn.first_seen_ns.min(rec.ts_ns),
        };
        let max_events = self.max_events;
        let ids = &self.ids;
        let st = self.conns.entry(rec.conn.id).or_insert_with(|| Box::new(ConnSpan {
            trace_id: ids.new_trace_id(),
            span_id: ids.new_span_id(),
            start: clock.to_system_time(start_ns),
            view: rec.conn,
            opened: None,
            first_source: None,
            settings: None,
            counts: Counts::default(),
            ending: Ending::default(),
            events: Events::new(max_events),
            incomplete_episode: false,
            problem: false,
            held: None,
        }));
        // The view is copied into every record; keep the latest (the owning process may become
        // known after the connection was first seen), but never forget a process once known.
        let process = rec.conn.process.or(st.view.process);
        st.view = rec.conn;
        st.view.process = process;
        st
    }

    fn on_record(&mut self, rec: &Record, clock: &WallClock, out: &mut Vec<SpanData>) {
        let at = clock.to_system_time(rec.ts_ns);
        let st = self.state(rec, clock);
        match &rec.kind {
            RecordKind::EpisodeEnd(ep) => {
                st.counts.episodes += 1;
                st.incomplete_episode = ep.outcome == EpisodeOutcome::Incomplete;
                self.route_episode(rec.conn.id, ep, clock, out);
            }
            RecordKind::Close { state, closed_by, idle } => {
                st.ending.closed_by = *closed_by;
                st.ending.idle = st.ending.idle.or(*idle);
                self.end_connection(rec.conn.id, at, Last::Close(*state), clock, out)
            }
            RecordKind::Untracked { reason, .. } => {
                if *reason == UntrackReason::Shutdown {
                    // The engine also ends an episode `incomplete` before untracking a connection
                    // for another reason (destroyed, reused, gone, keep-alive off): only those the
                    // shutdown ended count here.
                    let episodes = u64::from(st.incomplete_episode);
                    self.ended_at_shutdown.connections += 1;
                    self.ended_at_shutdown.episodes += episodes;
                }
                self.end_connection(rec.conn.id, at, Last::Untracked(*reason), clock, out)
            }
            kind => on_event(st, kind, at),
        }
    }

    fn end_connection(&mut self, id: u64, at: SystemTime, last: Last, clock: &WallClock, out: &mut Vec<SpanData>) {
        if let Some(st) = self.conns.remove(&id) {
            self.close_connection(*st, at, last, clock, out);
        }
    }

    /// An episode span, by the policy: exported, or held as the connection's last healthy episode.
    /// A problem episode is exported after the healthy episode held before it.
    fn route_episode(&mut self, id: u64, ep: &Episode, clock: &WallClock, out: &mut Vec<SpanData>) {
        let Some(st) = self.conns.get_mut(&id) else { return };
        let parent = (st.trace_id, st.span_id);
        let (view, settings) = (st.view, st.settings);
        if self.policy == SpanPolicy::All {
            let span = self.episode_span(parent, ep, &view, settings.as_ref(), clock);
            return self.emit(span, out);
        }
        if problem_episode(ep) {
            st.problem = true;
            let held = st.held.take();
            if let Some(h) = held {
                let span = self.episode_span(parent, &h.ep, &h.view, h.settings.as_ref(), clock);
                self.emit(span, out);
            }
            let span = self.episode_span(parent, ep, &view, settings.as_ref(), clock);
            self.emit(span, out);
        } else if let Some(h) = &mut st.held {
            h.replace(ep, view, settings);
            self.spans_withheld += 1;
        } else {
            st.held = Some(HeldEpisode { ep: ep.clone(), view, settings });
        }
    }

    /// The connection span and its held healthy episode, exported if the policy wants them.
    fn close_connection(&mut self, mut st: ConnSpan, at: SystemTime, last: Last, clock: &WallClock, out: &mut Vec<SpanData>) {
        let held = st.held.take();
        if self.policy == SpanPolicy::All || st.problem {
            if let Some(h) = held {
                let span = self.episode_span((st.trace_id, st.span_id), &h.ep, &h.view, h.settings.as_ref(), clock);
                self.emit(span, out);
            }
            let span = self.connection_span(st, at, last);
            self.emit(span, out);
        } else {
            self.spans_withheld += 1 + u64::from(held.is_some());
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn span(
        &self,
        trace_id: TraceId,
        span_id: SpanId,
        parent: SpanId,
        name: &'static str,
        (start, end): (SystemTime, SystemTime),
        attributes: Vec<KeyValue>,
        events: Events,
        status: Status,
    ) -> SpanData {
        SpanData {
            span_context: SpanContext::new(
                trace_id,
                span_id,
                TraceFlags::SAMPLED,
                false,
                TraceState::default(),
            ),
            parent_span_id: parent,
            parent_span_is_remote: false,
            span_kind: SpanKind::Internal,
            name: Cow::Borrowed(name),
            start_time: start,
            end_time: end.max(start),
            attributes,
            dropped_attributes_count: 0,
            events: events.into_span_events(),
            links: SpanLinks::default(),
            status,
            instrumentation_scope: self.scope.clone(),
        }
    }

    fn connection_span(&self, st: ConnSpan, end: SystemTime, last: Last) -> SpanData {
        let mut a = conn_attrs(&st.view, CONN_SPAN_ATTRS);
        if let Some(state) = st.opened {
            a.push(KeyValue::new(OPEN_STATE, state.name()));
        }
        if let Some(source) = st.first_source {
            a.push(KeyValue::new(FIRST_SEEN_SOURCE, source.name()));
        }
        a.push(KeyValue::new(SNAPSHOT, st.first_source == Some(SettingsSource::Snapshot)));
        if let Some((s, source)) = &st.settings {
            settings_attrs(s, *source, &mut a);
        }
        count_attrs(&st.counts, &mut a);
        ending_attrs(&st.ending, &mut a);
        let (outcome, status, error_type) = conn_outcome(&st.ending, &last);
        a.push(KeyValue::new(OUTCOME, outcome));
        if let Some(t) = error_type {
            a.push(KeyValue::new(ERROR_TYPE, t));
        }
        match last {
            Last::Close(state) => a.push(KeyValue::new(CLOSE_STATE, state.name())),
            Last::Untracked(reason) => {
                a.push(KeyValue::new(UNTRACKED_REASON, reason.name()));
                if reason == UntrackReason::Shutdown {
                    a.push(KeyValue::new(INCOMPLETE, true));
                }
            }
            Last::Leftover => a.push(KeyValue::new(INCOMPLETE, true)),
        }
        self.span(st.trace_id, st.span_id, SpanId::INVALID, SPAN_CONNECTION, (st.start, end), a, st.events, status)
    }

    /// The episode span of a connection (`parent`: its trace and span ids) from its `episode`
    /// record, with the connection's `view` and `settings` when the episode ended: probes, then
    /// the event that ended it.
    fn episode_span(
        &self,
        (trace_id, parent_id): (TraceId, SpanId),
        ep: &Episode,
        view: &ConnView,
        settings: Option<&(SockSettings, SettingsSource)>,
        clock: &WallClock,
    ) -> SpanData {
        let mut events = Events::with_capacity(self.max_events, ep.probe_ts_ns.len() + 1);
        for (i, ts) in ep.probe_ts_ns.iter().enumerate() {
            events.routine(probe_event(clock, *ts, ep.first_timed_probe + i as u32));
        }
        let end = clock.to_system_time(ep.end_ns);
        let mut a = conn_attrs(view, EPISODE_SPAN_ATTRS);
        a.push(KeyValue::new(EPISODE_NUMBER, i64::from(ep.number)));
        a.push(KeyValue::new(EPISODE_PROBES, i64::from(ep.probes)));
        if let Some((s, _)) = settings {
            effective_settings(s, &mut a);
        }
        a.push(KeyValue::new(EPISODE_OUTCOME, ep.outcome.name()));
        let status = episode_outcome(ep, end, &mut a, &mut events);
        let times = (clock.to_system_time(ep.start_ns), end);
        self.span(trace_id, self.ids.new_span_id(), parent_id, SPAN_EPISODE, times, a, events, status)
    }
}

/// A record that adds to the connection span (not an episode end, not its last record).
fn on_event(st: &mut ConnSpan, kind: &RecordKind, at: SystemTime) {
    match kind {
        RecordKind::Opened { state, .. } => st.opened = Some(*state),
        RecordKind::Config { settings, source, process } => {
            st.first_source.get_or_insert(*source);
            st.settings = Some((*settings, *source));
            st.counts.settings_changes += 1;
            let mut attrs = Vec::with_capacity(SETTINGS_ATTRS + PROCESS_ATTRS);
            settings_attrs(settings, *source, &mut attrs);
            if let Some(p) = process {
                process_attrs(p, &mut attrs);
            }
            st.events.routine(Event::new(EV_CONFIG, at, attrs, 0));
        }
        RecordKind::Probe { .. } | RecordKind::UnseenProbes { .. } => st.counts.probes += u64::from(kind.probes_reported()),
        RecordKind::Ack { .. } => {} // on the episode span
        RecordKind::Suppressed { packets_out, unsent } => {
            st.counts.suppressed += 1;
            let attrs = vec![
                KeyValue::new(PACKETS_OUT, i64::from(*packets_out)),
                KeyValue::new(UNSENT, i64::from(*unsent)),
            ];
            st.events.routine(Event::new(EV_SUPPRESSED, at, attrs, 0));
        }
        RecordKind::Idle { .. } => st.counts.idle_rearms += 1,
        RecordKind::Busy => st.counts.busy_retries += 1,
        RecordKind::FinWait2 => {
            st.counts.fin_wait2 += 1;
            st.events.important(Event::new(EV_FIN_WAIT2, at, Vec::new(), 0));
        }
        RecordKind::Timeout { reason, probes, idle } => {
            st.problem = true;
            st.ending.timeout = Some((*reason, *probes));
            st.ending.idle = idle.or(st.ending.idle);
            let mut attrs = timeout_attrs(*reason, *probes);
            attrs.extend(idle_attrs(*idle));
            st.events.important(Event::new(EV_TIMEOUT, at, attrs, 0));
        }
        RecordKind::Reset { reason, active, .. } => {
            st.problem = true;
            st.ending.reset = Some((reason.clone(), *active));
            let attrs = vec![KeyValue::new(RESET_REASON, reason.clone()), KeyValue::new(RESET_ACTIVE, *active)];
            st.events.important(Event::new(EV_RESET, at, attrs, 0));
        }
        RecordKind::PeerReset { idle } => {
            st.problem = true;
            st.ending.peer_reset = true;
            st.ending.idle = idle.or(st.ending.idle);
            st.events.important(Event::new(EV_PEER_RESET, at, idle_attrs(*idle), 0));
        }
        RecordKind::ReuseRace { peer_idle_ms, write_after_ms, bytes } => {
            st.problem = true;
            st.ending.reuse_race = Some((*peer_idle_ms, *write_after_ms, *bytes));
            let attrs = vec![
                KeyValue::new(REUSE_PEER_IDLE_MS, *peer_idle_ms as i64),
                KeyValue::new(REUSE_WRITE_AFTER_MS, *write_after_ms as i64),
                KeyValue::new(REUSE_BYTES, i64::from(*bytes)),
            ];
            st.events.important(Event::new(EV_REUSE_RACE, at, attrs, 0));
        }
        RecordKind::Error { errno, .. } => {
            st.problem = true;
            st.ending.errno = Some(*errno);
            let attrs = vec![KeyValue::new(ERRNO, errno_name(*errno))];
            st.events.important(Event::new(EV_ERROR, at, attrs, 0));
        }
        RecordKind::Close { .. } | RecordKind::Untracked { .. } | RecordKind::EpisodeEnd(_) => {}
    }
}

fn count_attrs(c: &Counts, a: &mut Vec<KeyValue>) {
    a.push(KeyValue::new(SETTINGS_CHANGES, c.settings_changes as i64));
    a.push(KeyValue::new(EPISODES, c.episodes as i64));
    a.push(KeyValue::new(PROBES, c.probes as i64));
    a.push(KeyValue::new(SUPPRESSED, c.suppressed as i64));
    a.push(KeyValue::new(IDLE_REARMS, c.idle_rearms as i64));
    a.push(KeyValue::new(BUSY_RETRIES, c.busy_retries as i64));
    a.push(KeyValue::new(FIN_WAIT2, c.fin_wait2 as i64));
}

fn ending_attrs(e: &Ending, a: &mut Vec<KeyValue>) {
    if let Some((reason, _)) = e.timeout {
        a.push(KeyValue::new(TIMEOUT_REASON, reason.name()));
    }
    if let Some((reason, active)) = &e.reset {
        a.push(KeyValue::new(RESET_REASON, reason.clone()));
        a.push(KeyValue::new(RESET_ACTIVE, *active));
    }
    if let Some(e) = e.errno {
        a.push(KeyValue::new(ERRNO, errno_name(e)));
    }
    if let Some(c) = e.closed_by {
        a.push(KeyValue::new(CLOSED_BY, c.name()));
    }
    a.extend(idle_attrs(e.idle));
}

fn timeout_attrs(reason: TimeoutReason, probes: u32) -> Vec<KeyValue> {
    let count = if reason == TimeoutReason::Retransmit { RETRANSMITS } else { EPISODE_PROBES };
    vec![
        KeyValue::new(TIMEOUT_REASON, reason.name()),
        KeyValue::new(count, i64::from(probes)),
    ]
}

/// The idle times of a death or a close (none when unknown).
fn idle_attrs(idle: Option<Idle>) -> Vec<KeyValue> {
    idle.map_or_else(Vec::new, |i| {
        vec![
            KeyValue::new(IDLE_MS, i.idle_ms as i64),
            KeyValue::new(SINCE_RECEIVED_MS, i.since_received_ms as i64),
            KeyValue::new(SINCE_SENT_MS, i.since_sent_ms as i64),
        ]
    })
}

/// The episode's status, its outcome attributes and the event that ended it (at `end`).
fn episode_outcome(ep: &Episode, end: SystemTime, a: &mut Vec<KeyValue>, events: &mut Events) -> Status {
    let probes = i64::from(ep.probes);
    let (event, status, error_type) = match ep.outcome {
        EpisodeOutcome::Answered(p) => {
            a.push(KeyValue::new(ACK_PRECISION, p.name()));
            let attrs = vec![KeyValue::new(EPISODE_PROBES, probes), KeyValue::new(ACK_PRECISION, p.name())];
            (Some(Event::new(EV_ACK, end, attrs, 0)), Status::Unset, None)
        }
        EpisodeOutcome::TimedOut(reason) => {
            a.push(KeyValue::new(TIMEOUT_REASON, reason.name()));
            let event = Event::new(EV_TIMEOUT, end, timeout_attrs(reason, ep.probes), 0);
            (Some(event), Status::error(timeout_message(reason, ep.probes)), Some(timeout_type(reason)))
        }
        EpisodeOutcome::Reset { by_peer } => {
            let name = if by_peer { EV_PEER_RESET } else { EV_RESET };
            let status = Status::error("connection reset while keep-alive probes were unanswered");
            (Some(Event::new(name, end, Vec::new(), 0)), status, Some(if by_peer { "peer_reset" } else { "reset" }))
        }
        EpisodeOutcome::Closed => (Some(Event::new(EV_CLOSE, end, Vec::new(), 0)), Status::Unset, None),
        EpisodeOutcome::Incomplete => {
            a.push(KeyValue::new(INCOMPLETE, true));
            (None, Status::Unset, None)
        }
    };
    if let Some(e) = event {
        events.important(e);
    }
    if let Some(t) = error_type {
        a.push(KeyValue::new(ERROR_TYPE, t));
    }
    status
}

fn probe_event(clock: &WallClock, ts: u64, n: u32) -> Event {
    Event::new(
        EV_PROBE,
        clock.to_system_time(ts),
        vec![KeyValue::new(PROBE_N, i64::from(n))],
        0,
    )
}

/// (`tcp.keepalive.outcome`, status, `error.type`) of a connection span.
fn conn_outcome(e: &Ending, last: &Last) -> (&'static str, Status, Option<String>) {
    if let Some((reason, probes)) = e.timeout {
        return (
            "timeout",
            Status::error(timeout_message(reason, probes)),
            Some(timeout_type(reason).into()),
        );
    }
    if let Some((peer_idle_ms, write_after_ms, bytes)) = e.reuse_race {
        let message = format!(
            "{bytes} bytes written {write_after_ms} ms after the peer closed the connection idle for {peer_idle_ms} ms"
        );
        return ("reuse_race", Status::error(message), Some("reuse_race".into()));
    }
    if e.peer_reset {
        return (
            "peer_reset",
            Status::error("connection reset by peer"),
            Some("peer_reset".into()),
        );
    }
    if let Some((reason, _)) = &e.reset {
        return (
            "reset",
            Status::error(format!("connection reset by this host ({reason})")),
            Some("reset".into()),
        );
    }
    if let Some(e) = e.errno {
        let name = errno_name(e);
        return (
            "error",
            Status::error(format!("socket error {name}")),
            Some(name),
        );
    }
    match last {
        Last::Close(_) => ("closed", Status::Unset, None),
        Last::Untracked(UntrackReason::Shutdown) | Last::Leftover => ("open", Status::Unset, None),
        Last::Untracked(_) => ("untracked", Status::Unset, None),
    }
}

fn timeout_type(reason: TimeoutReason) -> &'static str {
    match reason {
        TimeoutReason::Keepalive => "keepalive_timeout",
        TimeoutReason::UserTimeout => "user_timeout",
        TimeoutReason::Retransmit => "retransmit_timeout",
    }
}

fn timeout_message(reason: TimeoutReason, probes: u32) -> String {
    match reason {
        TimeoutReason::Keepalive => format!("keep-alive timeout: {probes} probes unanswered"),
        TimeoutReason::UserTimeout => {
            format!("TCP_USER_TIMEOUT expired with {probes} probes unanswered")
        }
        TimeoutReason::Retransmit => format!("retransmission timeout after {probes} retransmissions"),
    }
}

fn ip_kv(key: &'static str, addr: &SocketAddr) -> KeyValue {
    KeyValue::new(key, ip_text(addr.ip()))
}

/// An address as its `Display` text; IPv4 octets are written with `itoa` (`Display` goes through
/// the formatting machinery per octet, a fifth of the cost of an episode span's attributes).
fn ip_text(ip: IpAddr) -> String {
    let IpAddr::V4(v4) = ip else { return ip.to_string() };
    let mut text = String::with_capacity(15);
    let mut digits = itoa::Buffer::new();
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            text.push('.');
        }
        text.push_str(digits.format(octet));
    }
    text
}

/// Attributes of the connection, with room for `more` (both span kinds have them: an episode
/// arrives long before its parent, so it must be understandable alone).
fn conn_attrs(v: &ConnView, more: usize) -> Vec<KeyValue> {
    let mut a = Vec::with_capacity(CONN_ATTRS + more);
    a.push(KeyValue::new(NETWORK_TRANSPORT, "tcp"));
    // The engine uses 0.0.0.0:0 while it does not know the addresses (an option set before
    // connect); say nothing rather than something false.
    let known = |s: &SocketAddr| !(s.ip().is_unspecified() && s.port() == 0);
    if known(&v.local) || known(&v.remote) {
        a.push(KeyValue::new(
            NETWORK_TYPE,
            if v.local.is_ipv4() { "ipv4" } else { "ipv6" },
        ));
    }
    if known(&v.local) {
        a.push(ip_kv(NETWORK_LOCAL_ADDRESS, &v.local));
        a.push(KeyValue::new(NETWORK_LOCAL_PORT, i64::from(v.local.port())));
    }
    if known(&v.remote) {
        a.push(ip_kv(NETWORK_PEER_ADDRESS, &v.remote));
        a.push(KeyValue::new(NETWORK_PEER_PORT, i64::from(v.remote.port())));
    }
    a.push(KeyValue::new(CONNECTION_ID, v.id as i64));
    a.push(KeyValue::new(NETNS, i64::from(v.netns)));
    if let Some(p) = &v.process {
        process_attrs(p, &mut a);
    }
    a
}

fn process_attrs(p: &Process, a: &mut Vec<KeyValue>) {
    a.push(KeyValue::new(PROCESS_PID, i64::from(p.pid)));
    a.push(KeyValue::new(PROCESS_EXECUTABLE_NAME, p.comm_str().to_string()));
    a.push(KeyValue::new(CGROUP_ID, p.cgroup_id as i64));
}

fn effective_settings(s: &SockSettings, a: &mut Vec<KeyValue>) {
    a.push(KeyValue::new(ENABLED, s.keepalive));
    a.push(KeyValue::new(IDLE_S, i64::from(s.effective_idle_s())));
    a.push(KeyValue::new(INTVL_S, i64::from(s.effective_intvl_s())));
    a.push(KeyValue::new(CNT, i64::from(s.effective_cnt())));
    a.push(KeyValue::new(USER_TIMEOUT_MS, i64::from(s.user_timeout_ms)));
}

fn settings_attrs(s: &SockSettings, source: SettingsSource, a: &mut Vec<KeyValue>) {
    effective_settings(s, a);
    a.push(KeyValue::new(SETTINGS_SOURCE, source.name()));
    if let SettingsSource::Setsockopt(opt) = source {
        a.push(KeyValue::new(SETTINGS_OPTION, opt.name()));
    }
    let defaults: Vec<StringValue> = s.defaults().into_iter().map(StringValue::from).collect();
    a.push(KeyValue::new(
        SETTINGS_DEFAULTS,
        Value::Array(Array::String(defaults)),
    ));
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod held_tests {
    use super::*;
    use crate::timeline::AckPrecision;

    /// Holding an episode in place of another leaves exactly that episode, whatever was held.
    #[test]
    fn replacing_the_held_episode_keeps_nothing_of_the_one_before() {
        let view = |id| ConnView {
            id,
            sk: 1,
            netns: 2,
            local: "127.0.0.1:1".parse().unwrap(),
            remote: "127.0.0.1:2".parse().unwrap(),
            process: None,
            first_seen_ns: 3,
        };
        let old = Episode {
            number: 1,
            start_ns: 10,
            end_ns: 20,
            probes: 3,
            outcome: EpisodeOutcome::Answered(AckPrecision::Segment),
            probe_ts_ns: smallvec::smallvec![10, 11, 12],
            first_timed_probe: 2,
        };
        let new = Episode {
            number: 2,
            start_ns: 30,
            end_ns: 40,
            probes: 1,
            outcome: EpisodeOutcome::Answered(AckPrecision::NextFiring),
            probe_ts_ns: smallvec::smallvec![30],
            first_timed_probe: 1,
        };
        let mut held = HeldEpisode { ep: old, view: view(1), settings: Some((SockSettings::default(), SettingsSource::Snapshot)) };
        held.replace(&new, view(2), None);
        assert_eq!(held.ep, new);
        assert_eq!(held.view, view(2));
        assert_eq!(held.settings, None);
    }

    #[test]
    fn addresses_read_as_display_writes_them() {
        for ip in ["0.0.0.0", "127.0.0.1", "10.20.255.9", "255.255.255.255", "1.0.100.10", "::1", "fe80::1:2", "::ffff:1.2.3.4"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(ip_text(ip), ip.to_string());
        }
    }
}
