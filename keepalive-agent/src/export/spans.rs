//! The span model: timeline [`Record`]s in, finished OpenTelemetry spans ([`SpanData`]) out. Pure:
//! no I/O, no clock reads (the caller passes the [`WallClock`] and, at shutdown, the stop time).
//!
//! - One trace per connection; its root span `tcp.connection` runs from the record that opened the
//!   connection (or, lacking one, `ConnView::first_seen_ns`) to its `Close`, and is produced when the
//!   batch holding the `Close` has been processed (so an `EpisodeEnd` emitted right after the
//!   `Close` still counts).
//! - One child span `tcp.keepalive.episode` per keep-alive episode, produced as soon as its
//!   `EpisodeEnd` arrives. The ids of the connection span are drawn when the connection is first
//!   seen, so an episode can name its parent long before the parent is exported.
//! - Every timestamp is a kernel event time converted with the [`WallClock`] current when the record
//!   arrived; the only exception is the end of spans still open when the agent stops (their end is
//!   the stop time, and they carry `tcp.keepalive.incomplete = true`).
//!
//! See `the "OpenTelemetry traces" section of README.md for the user-facing description.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::SystemTime;

use opentelemetry::trace::{
    Event, SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{Array, InstrumentationScope, KeyValue, StringValue, Value};
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator, SpanData, SpanEvents, SpanLinks};

use crate::clock::WallClock;
use crate::event::{Process, SockSettings, TcpState};
use crate::timeline::{
    AckPrecision, ConnView, Episode, EpisodeOutcome, Record, RecordKind, SettingsSource,
    TimeoutReason,
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
    pub const INCOMPLETE: &str = "tcp.keepalive.incomplete";
    pub const EPISODE_NUMBER: &str = "tcp.keepalive.episode.number";
    pub const EPISODE_OUTCOME: &str = "tcp.keepalive.episode.outcome";
    pub const EPISODE_PROBES: &str = "tcp.keepalive.episode.probes";
    pub const ACK_PRECISION: &str = "tcp.keepalive.ack.precision";
    pub const PROBE_N: &str = "tcp.keepalive.probe.n";
    pub const PACKETS_OUT: &str = "tcp.keepalive.packets_out";
    pub const UNSENT: &str = "tcp.keepalive.unsent_bytes";
}

use names::*;

/// Closed connections remembered so that a late `EpisodeEnd` still finds its parent span.
const TOMBSTONES: usize = 1024;

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
        Events {
            list: Vec::new(),
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

/// An episode that started (a probe was seen) and has not ended yet.
#[derive(Debug)]
struct OpenEpisode {
    start_ns: u64,
    /// Probes seen so far (for an episode still open at shutdown).
    probes: Vec<u64>,
    /// The records that ended it (ack, timeout, reset, error, close), as episode events.
    outcome: Vec<Event>,
    ack_precision: Option<AckPrecision>,
}

#[derive(Debug)]
struct ConnState {
    trace_id: TraceId,
    span_id: SpanId,
    start: SystemTime,
    view: ConnView,
    opened: Option<TcpState>,
    /// Source of the first settings seen: how the agent came to follow the connection.
    first_source: Option<SettingsSource>,
    settings: Option<(SockSettings, SettingsSource)>,
    settings_changes: u64,
    events: Events,
    probes: u64,
    episodes: u64,
    suppressed: u64,
    idle_rearms: u64,
    busy_retries: u64,
    fin_wait2: u64,
    timeout: Option<(TimeoutReason, u32)>,
    reset: Option<(String, bool)>,
    peer_reset: bool,
    errno: Option<i32>,
    close: Option<(SystemTime, TcpState)>,
    episode: Option<OpenEpisode>,
}

/// What a late `EpisodeEnd` needs of a connection whose span is already gone.
#[derive(Debug, Clone)]
struct Tombstone {
    trace_id: TraceId,
    span_id: SpanId,
    view: ConnView,
    settings: Option<(SockSettings, SettingsSource)>,
    episodes: u64,
}

/// Counts of what [`SpanModel::finish`] ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FinishCounts {
    pub connections: u64,
    pub episodes: u64,
}

/// Turns records into spans. See the module documentation.
#[derive(Debug)]
pub struct SpanModel {
    conns: HashMap<u64, ConnState>,
    closing: Vec<u64>,
    tombs: HashMap<u64, Tombstone>,
    tomb_order: VecDeque<u64>,
    ids: RandomIdGenerator,
    scope: InstrumentationScope,
    max_events: usize,
    /// Spans produced so far.
    pub spans_built: u64,
}

impl SpanModel {
    /// `max_events`: events kept per span (at least 2).
    pub fn new(max_events: usize) -> Self {
        SpanModel {
            conns: HashMap::new(),
            closing: Vec::new(),
            tombs: HashMap::new(),
            tomb_order: VecDeque::new(),
            ids: RandomIdGenerator::default(),
            scope: InstrumentationScope::builder(env!("CARGO_PKG_NAME"))
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
            max_events: max_events.max(2),
            spans_built: 0,
        }
    }

    /// Connections being tracked (spans not yet produced).
    pub fn open_connections(&self) -> usize {
        self.conns.len()
    }

    /// Processes a batch of records, appending the spans that finished to `out`.
    pub fn on_records(&mut self, records: &[Record], clock: &WallClock, out: &mut Vec<SpanData>) {
        for rec in records {
            self.on_record(rec, clock, out);
        }
        for id in std::mem::take(&mut self.closing) {
            if let Some(st) = self.conns.remove(&id) {
                self.bury(&st);
                let span = self.connection_span(st, None);
                self.emit(span, out);
            }
        }
    }

    /// Ends every connection still open: those the engine reports (`open`) and those this model
    /// tracks. Their spans end at `stop` (monotonic ns) and carry `tcp.keepalive.incomplete`; an
    /// episode in progress becomes an incomplete episode span with the probes seen so far.
    pub fn finish(
        &mut self,
        open: impl Iterator<Item = ConnView>,
        clock: &WallClock,
        stop_ns: u64,
        out: &mut Vec<SpanData>,
    ) -> FinishCounts {
        // Close records still pending in this model are finished normally first.
        self.on_records(&[], clock, out);
        for view in open {
            if !self.tombs.contains_key(&view.id) {
                self.state(&view, view.first_seen_ns, clock);
            }
        }
        let stop = clock.to_system_time(stop_ns);
        let mut counts = FinishCounts::default();
        let mut ids: Vec<u64> = self.conns.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            let Some(mut st) = self.conns.remove(&id) else {
                continue;
            };
            if let Some(ep) = st.episode.take() {
                st.episodes += 1;
                let span = self.incomplete_episode_span(&st, ep, stop, clock);
                self.emit(span, out);
                counts.episodes += 1;
            }
            let span = self.connection_span(st, Some(stop));
            self.emit(span, out);
            counts.connections += 1;
        }
        counts
    }

    fn emit(&mut self, span: SpanData, out: &mut Vec<SpanData>) {
        self.spans_built += 1;
        out.push(span);
    }

    fn bury(&mut self, st: &ConnState) {
        let id = st.view.id;
        self.tombs.insert(
            id,
            Tombstone {
                trace_id: st.trace_id,
                span_id: st.span_id,
                view: st.view,
                settings: st.settings,
                episodes: st.episodes,
            },
        );
        self.tomb_order.push_back(id);
        while self.tomb_order.len() > TOMBSTONES {
            if let Some(old) = self.tomb_order.pop_front() {
                self.tombs.remove(&old);
            }
        }
    }

    fn state(&mut self, view: &ConnView, start_ns: u64, clock: &WallClock) -> &mut ConnState {
        let max_events = self.max_events;
        let ids = &self.ids;
        let st = self.conns.entry(view.id).or_insert_with(|| ConnState {
            trace_id: ids.new_trace_id(),
            span_id: ids.new_span_id(),
            start: clock.to_system_time(start_ns),
            view: *view,
            opened: None,
            first_source: None,
            settings: None,
            settings_changes: 0,
            events: Events::new(max_events),
            probes: 0,
            episodes: 0,
            suppressed: 0,
            idle_rearms: 0,
            busy_retries: 0,
            fin_wait2: 0,
            timeout: None,
            reset: None,
            peer_reset: false,
            errno: None,
            close: None,
            episode: None,
        });
        // The view is copied into every record; keep the latest (the owning process may become
        // known after the connection was first seen), but never forget a process once known.
        let process = view.process.or(st.view.process);
        st.view = *view;
        st.view.process = process;
        st
    }

    fn on_record(&mut self, rec: &Record, clock: &WallClock, out: &mut Vec<SpanData>) {
        let id = rec.conn.id;
        if !self.conns.contains_key(&id) && self.tombs.contains_key(&id) {
            // The connection span is already out: only a late episode end still matters.
            if let RecordKind::EpisodeEnd(ep) = &rec.kind {
                let mut tomb = self.tombs[&id].clone();
                tomb.episodes += 1;
                if let Some(t) = self.tombs.get_mut(&id) {
                    t.episodes = tomb.episodes;
                }
                let span = self.episode_span(&tomb, ep, Vec::new(), None, clock);
                self.emit(span, out);
            } else {
                log::debug!(
                    "export: record `{}` for connection {id} after its close; ignored",
                    rec.kind.name()
                );
            }
            return;
        }
        let start_ns = match rec.kind {
            RecordKind::Opened { .. } => rec.ts_ns,
            _ => rec.conn.first_seen_ns.min(rec.ts_ns),
        };
        let at = clock.to_system_time(rec.ts_ns);
        let max_events = self.max_events;
        let st = self.state(&rec.conn, start_ns, clock);
        // What to do once `st` is no longer borrowed.
        let mut closed = false;
        let mut episode_end = None;
        match &rec.kind {
            RecordKind::Opened { state, .. } => {
                // `established` is `state == ESTABLISHED`: nothing more to say.
                st.opened = Some(*state);
            }
            RecordKind::Config {
                settings,
                source,
                process,
            } => {
                st.first_source.get_or_insert(*source);
                st.settings = Some((*settings, *source));
                st.settings_changes += 1;
                let mut attrs = settings_attrs(settings, *source);
                if let Some(p) = process {
                    attrs.extend(process_attrs(p));
                }
                st.events.routine(Event::new(EV_CONFIG, at, attrs, 0));
            }
            RecordKind::Probe { n } => {
                st.probes += 1;
                if *n <= 1 || st.episode.is_none() {
                    if st.episode.is_some() {
                        log::debug!("export: connection {id}: probe 1 while an episode was open; restarting it");
                    }
                    st.episode = Some(OpenEpisode {
                        start_ns: rec.ts_ns,
                        probes: Vec::new(),
                        outcome: Vec::new(),
                        ack_precision: None,
                    });
                }
                if let Some(ep) = &mut st.episode {
                    if ep.probes.len() < max_events {
                        ep.probes.push(rec.ts_ns);
                    }
                }
            }
            RecordKind::Ack { probes, precision } => {
                let e = Event::new(
                    EV_ACK,
                    at,
                    vec![
                        KeyValue::new(EPISODE_PROBES, i64::from(*probes)),
                        KeyValue::new(ACK_PRECISION, precision_name(*precision)),
                    ],
                    0,
                );
                match &mut st.episode {
                    Some(ep) => {
                        ep.ack_precision = Some(*precision);
                        push_capped(&mut ep.outcome, e);
                    }
                    None => st.events.routine(e),
                }
            }
            RecordKind::Suppressed {
                packets_out,
                unsent,
            } => {
                st.suppressed += 1;
                st.events.routine(Event::new(
                    EV_SUPPRESSED,
                    at,
                    vec![
                        KeyValue::new(PACKETS_OUT, i64::from(*packets_out)),
                        KeyValue::new(UNSENT, i64::from(*unsent)),
                    ],
                    0,
                ));
            }
            RecordKind::Idle { .. } => st.idle_rearms += 1,
            RecordKind::Busy => st.busy_retries += 1,
            RecordKind::FinWait2 => {
                st.fin_wait2 += 1;
                st.events
                    .important(Event::new(EV_FIN_WAIT2, at, Vec::new(), 0));
            }
            RecordKind::Timeout { reason, probes } => {
                st.timeout = Some((*reason, *probes));
                let attrs = vec![
                    KeyValue::new(TIMEOUT_REASON, reason.name()),
                    KeyValue::new(EPISODE_PROBES, i64::from(*probes)),
                ];
                terminal_event(st, EV_TIMEOUT, at, attrs);
            }
            RecordKind::Reset { reason, active } => {
                st.reset = Some((reason.clone(), *active));
                let attrs = vec![
                    KeyValue::new(RESET_REASON, reason.clone()),
                    KeyValue::new(RESET_ACTIVE, *active),
                ];
                terminal_event(st, EV_RESET, at, attrs);
            }
            RecordKind::PeerReset => {
                st.peer_reset = true;
                terminal_event(st, EV_PEER_RESET, at, Vec::new());
            }
            RecordKind::Error { errno } => {
                st.errno = Some(*errno);
                terminal_event(
                    st,
                    EV_ERROR,
                    at,
                    vec![KeyValue::new(ERRNO, errno_name(*errno))],
                );
            }
            RecordKind::Close { state } => {
                if let Some(ep) = &mut st.episode {
                    push_capped(
                        &mut ep.outcome,
                        Event::new(
                            EV_CLOSE,
                            at,
                            vec![KeyValue::new(CLOSE_STATE, state.name())],
                            0,
                        ),
                    );
                }
                if st.close.is_none() {
                    st.close = Some((at, *state));
                    closed = true;
                }
            }
            RecordKind::EpisodeEnd(ep) => {
                st.episodes += 1;
                let (outcome, precision) = match st.episode.take() {
                    Some(o) => (o.outcome, o.ack_precision),
                    None => (Vec::new(), None),
                };
                let parent = Tombstone {
                    trace_id: st.trace_id,
                    span_id: st.span_id,
                    view: st.view,
                    settings: st.settings,
                    episodes: st.episodes,
                };
                episode_end = Some((parent, ep, outcome, precision));
            }
        }
        if closed {
            self.closing.push(id);
        }
        if let Some((parent, ep, outcome, precision)) = episode_end {
            let span = self.episode_span(&parent, ep, outcome, precision, clock);
            self.emit(span, out);
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

    fn connection_span(&self, st: ConnState, stopped_at: Option<SystemTime>) -> SpanData {
        let mut a = conn_attrs(&st.view);
        if let Some(state) = st.opened {
            a.push(KeyValue::new(OPEN_STATE, state.name()));
        }
        if let Some(source) = st.first_source {
            a.push(KeyValue::new(FIRST_SEEN_SOURCE, source.name()));
        }
        a.push(KeyValue::new(
            SNAPSHOT,
            st.first_source == Some(SettingsSource::Snapshot),
        ));
        if let Some((s, source)) = &st.settings {
            a.extend(settings_attrs(s, *source));
        }
        a.push(KeyValue::new(SETTINGS_CHANGES, st.settings_changes as i64));
        a.push(KeyValue::new(EPISODES, st.episodes as i64));
        a.push(KeyValue::new(PROBES, st.probes as i64));
        a.push(KeyValue::new(SUPPRESSED, st.suppressed as i64));
        a.push(KeyValue::new(IDLE_REARMS, st.idle_rearms as i64));
        a.push(KeyValue::new(BUSY_RETRIES, st.busy_retries as i64));
        a.push(KeyValue::new(FIN_WAIT2, st.fin_wait2 as i64));
        if let Some((reason, _)) = st.timeout {
            a.push(KeyValue::new(TIMEOUT_REASON, reason.name()));
        }
        if let Some((reason, active)) = &st.reset {
            a.push(KeyValue::new(RESET_REASON, reason.clone()));
            a.push(KeyValue::new(RESET_ACTIVE, *active));
        }
        if let Some(e) = st.errno {
            a.push(KeyValue::new(ERRNO, errno_name(e)));
        }
        let (outcome, status, error_type) = conn_outcome(&st, stopped_at.is_some());
        a.push(KeyValue::new(OUTCOME, outcome));
        if let Some(t) = error_type {
            a.push(KeyValue::new(ERROR_TYPE, t));
        }
        let end = match (stopped_at, st.close) {
            (Some(stop), _) => {
                a.push(KeyValue::new(INCOMPLETE, true));
                stop
            }
            (None, Some((at, state))) => {
                a.push(KeyValue::new(CLOSE_STATE, state.name()));
                at
            }
            (None, None) => st.start,
        };
        self.span(
            st.trace_id,
            st.span_id,
            SpanId::INVALID,
            SPAN_CONNECTION,
            (st.start, end),
            a,
            st.events,
            status,
        )
    }

    fn episode_span(
        &self,
        parent: &Tombstone,
        ep: &Episode,
        outcome_events: Vec<Event>,
        precision: Option<AckPrecision>,
        clock: &WallClock,
    ) -> SpanData {
        let mut events = Events::new(self.max_events);
        for (i, ts) in ep.probe_ts_ns.iter().enumerate() {
            events.routine(probe_event(clock, *ts, i as u32 + 1));
        }
        for e in outcome_events {
            events.important(e);
        }
        let mut a = conn_attrs(&parent.view);
        a.push(KeyValue::new(EPISODE_NUMBER, parent.episodes as i64));
        a.push(KeyValue::new(EPISODE_PROBES, i64::from(ep.probes)));
        if let Some((s, _)) = &parent.settings {
            a.extend(effective_settings(s));
        }
        let (outcome, status, error_type) = match &ep.outcome {
            EpisodeOutcome::Answered => ("answered", Status::Unset, None),
            EpisodeOutcome::Closed => ("closed", Status::Unset, None),
            EpisodeOutcome::Reset => (
                "reset",
                Status::error("connection reset while keep-alive probes were unanswered"),
                Some("reset"),
            ),
            EpisodeOutcome::TimedOut(reason) => {
                a.push(KeyValue::new(TIMEOUT_REASON, reason.name()));
                (
                    "timeout",
                    Status::error(timeout_message(*reason, ep.probes)),
                    Some(timeout_type(*reason)),
                )
            }
        };
        a.push(KeyValue::new(EPISODE_OUTCOME, outcome));
        if let (EpisodeOutcome::Answered, Some(p)) = (&ep.outcome, precision) {
            a.push(KeyValue::new(ACK_PRECISION, precision_name(p)));
        }
        if let Some(t) = error_type {
            a.push(KeyValue::new(ERROR_TYPE, t));
        }
        let times = (
            clock.to_system_time(ep.start_ns),
            clock.to_system_time(ep.end_ns),
        );
        self.span(
            parent.trace_id,
            self.ids.new_span_id(),
            parent.span_id,
            SPAN_EPISODE,
            times,
            a,
            events,
            status,
        )
    }

    fn incomplete_episode_span(
        &self,
        st: &ConnState,
        ep: OpenEpisode,
        stop: SystemTime,
        clock: &WallClock,
    ) -> SpanData {
        let mut events = Events::new(self.max_events);
        for (i, ts) in ep.probes.iter().enumerate() {
            events.routine(probe_event(clock, *ts, i as u32 + 1));
        }
        for e in ep.outcome {
            events.important(e);
        }
        let mut a = conn_attrs(&st.view);
        a.push(KeyValue::new(EPISODE_NUMBER, st.episodes as i64));
        a.push(KeyValue::new(EPISODE_PROBES, ep.probes.len() as i64));
        if let Some((s, _)) = &st.settings {
            a.extend(effective_settings(s));
        }
        a.push(KeyValue::new(EPISODE_OUTCOME, "incomplete"));
        a.push(KeyValue::new(INCOMPLETE, true));
        let times = (clock.to_system_time(ep.start_ns), stop);
        self.span(
            st.trace_id,
            self.ids.new_span_id(),
            st.span_id,
            SPAN_EPISODE,
            times,
            a,
            events,
            Status::Unset,
        )
    }
}

/// Adds a terminal event (timeout, reset, error) to the connection span and, when an episode is in
/// progress, to the episode too (it is what ended it).
fn terminal_event(st: &mut ConnState, name: &'static str, at: SystemTime, attrs: Vec<KeyValue>) {
    if let Some(ep) = &mut st.episode {
        push_capped(&mut ep.outcome, Event::new(name, at, attrs.clone(), 0));
    }
    st.events.important(Event::new(name, at, attrs, 0));
}

/// Outcome events of one episode: a handful at most (ack, or timeout + reset + error + close).
fn push_capped(list: &mut Vec<Event>, e: Event) {
    if list.len() < 8 {
        list.push(e);
    }
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
fn conn_outcome(st: &ConnState, stopped: bool) -> (&'static str, Status, Option<String>) {
    if let Some((reason, probes)) = st.timeout {
        return (
            "timeout",
            Status::error(timeout_message(reason, probes)),
            Some(timeout_type(reason).into()),
        );
    }
    if st.peer_reset {
        return (
            "peer_reset",
            Status::error("connection reset by peer"),
            Some("peer_reset".into()),
        );
    }
    if let Some((reason, _)) = &st.reset {
        return (
            "reset",
            Status::error(format!("connection reset by this host ({reason})")),
            Some("reset".into()),
        );
    }
    if let Some(e) = st.errno {
        let name = errno_name(e);
        return (
            "error",
            Status::error(format!("socket error {name}")),
            Some(name),
        );
    }
    if stopped {
        ("open", Status::Unset, None)
    } else {
        ("closed", Status::Unset, None)
    }
}

fn timeout_type(reason: TimeoutReason) -> &'static str {
    match reason {
        TimeoutReason::Keepalive => "keepalive_timeout",
        TimeoutReason::UserTimeout => "user_timeout",
    }
}

fn timeout_message(reason: TimeoutReason, probes: u32) -> String {
    match reason {
        TimeoutReason::Keepalive => format!("keep-alive timeout: {probes} probes unanswered"),
        TimeoutReason::UserTimeout => {
            format!("TCP_USER_TIMEOUT expired with {probes} probes unanswered")
        }
    }
}

fn precision_name(p: AckPrecision) -> &'static str {
    match p {
        AckPrecision::Segment => "segment",
        AckPrecision::NextFiring => "next_firing",
    }
}

fn ip_kv(key: &'static str, addr: &SocketAddr) -> KeyValue {
    KeyValue::new(key, addr.ip().to_string())
}

/// Attributes of the connection, on both span kinds (an episode arrives long before its parent, so
/// it must be understandable alone).
fn conn_attrs(v: &ConnView) -> Vec<KeyValue> {
    let mut a = vec![KeyValue::new(NETWORK_TRANSPORT, "tcp")];
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
        a.extend(process_attrs(p));
    }
    a
}

fn process_attrs(p: &Process) -> Vec<KeyValue> {
    vec![
        KeyValue::new(PROCESS_PID, i64::from(p.pid)),
        KeyValue::new(PROCESS_EXECUTABLE_NAME, p.comm_str().to_string()),
        KeyValue::new(CGROUP_ID, p.cgroup_id as i64),
    ]
}

fn effective_settings(s: &SockSettings) -> Vec<KeyValue> {
    vec![
        KeyValue::new(ENABLED, s.keepalive),
        KeyValue::new(IDLE_S, i64::from(s.effective_idle_s())),
        KeyValue::new(INTVL_S, i64::from(s.effective_intvl_s())),
        KeyValue::new(CNT, i64::from(s.effective_cnt())),
        KeyValue::new(USER_TIMEOUT_MS, i64::from(s.user_timeout_ms)),
    ]
}

fn settings_attrs(s: &SockSettings, source: SettingsSource) -> Vec<KeyValue> {
    let mut a = effective_settings(s);
    a.push(KeyValue::new(SETTINGS_SOURCE, source.name()));
    if let SettingsSource::Setsockopt(opt) = source {
        a.push(KeyValue::new(SETTINGS_OPTION, opt.name()));
    }
    let defaults: Vec<StringValue> = [("idle_s", s.idle_s), ("intvl_s", s.intvl_s), ("cnt", s.cnt)]
        .iter()
        .filter(|(_, v)| v.is_none())
        .map(|(n, _)| StringValue::from(*n))
        .collect();
    a.push(KeyValue::new(
        SETTINGS_DEFAULTS,
        Value::Array(Array::String(defaults)),
    ));
    a
}

pub use crate::output::errno_name;

#[cfg(test)]
mod tests;
