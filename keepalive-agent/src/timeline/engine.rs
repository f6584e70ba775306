//! The timeline engine: decoded [`Event`]s in, [`Record`]s out.
//!
//! A pure state machine (no I/O, no clock): everything it knows comes from the events, and the
//! timestamps it writes are the events' own. It follows the connections for which keep-alive
//! matters and turns the kernel's raw facts (a timer run, a segment, a reset, a state change) into
//! the connection's keep-alive history: settings, idle firings, probes, answers, timeouts, resets,
//! close.
//!
//! # Which sockets are tracked
//!
//! A connection is tracked once keep-alive is seen to matter for it: `SO_KEEPALIVE` on or
//! `TCP_USER_TIMEOUT` set when it becomes established (or in the start-up snapshot), a keep-alive
//! `setsockopt` on it, or a keep-alive timer run on it. Other sockets are ignored, except for two
//! small per-socket notes kept until the socket is established or gone: the process that called
//! `connect()` (from the SYN_SENT state change, or an `Owner` event just before the death of a
//! connection not followed, which its close takes) and keep-alive options set before `connect()`.
//! Listening sockets are never tracked: their accepted children are, when they inherit keep-alive.
//!
//! Everything is bounded by [`EngineConfig::max_connections`]: tracked connections, pre-connect
//! notes and reordering buffers each hold at most that many sockets.
//!
//! # Ending
//!
//! Every connection the engine follows ends with exactly one last record: `Close` when its close
//! was seen, else `Untracked` with the reason the engine stopped following it (socket destroyed or
//! reused with the close missed, keep-alive switched off, not found by a socket walk
//! ([`Engine::reconcile`]), agent shutdown ([`Engine::shutdown`])). An episode still open then
//! ends first (`closed` or `incomplete`). Consumers free a connection's state on its last record and
//! need no model of their own.
//!
//! # Ordering
//!
//! The kernel side emits the [`EventBody::Timer`] event of a timer run at timer exit, so the
//! reset, error and close the run caused (flagged [`Event::in_timer`]) reach the engine first. The
//! engine holds those back per socket and replays them after the timer event, so that a dead
//! peer reads: timeout, reset, error, close. The owner, woken inside the run by its error, can
//! close the socket on another CPU before the timer event is sent: events of that socket within
//! 100 ms of the held ones are held behind them. A timer event that never comes (ring buffer full)
//! is given up after about a second ([`Engine::release_stale_held`]), or at once by a later event.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::{Ipv4Addr, SocketAddr};

use crate::event::{Event, EventBody, Process, SockOpt, SockSettings, SockTimes, TcpState, TimerFiring};


use super::packed::{PackedAddrs, PackedSettings};
use super::table::{Keyed, SkTable};
use super::types::{
    AckPrecision, ClosedBy, ConnView, EngineStats, Episode, EpisodeOutcome, Idle, ProbeTimes, Record,
    RecordKind, SettingsSource, TimeoutReason, UntrackReason, MAX_PROBE_TIMES,
};

/// `ETIMEDOUT`, `ECONNRESET`, `EPIPE` (Linux errno values, positive as the events carry them).
const ETIMEDOUT: i32 = libc::ETIMEDOUT;
const ECONNRESET: i32 = libc::ECONNRESET;
const EPIPE: i32 = libc::EPIPE;

/// Hasher for socket addresses (`sk`): kernel pointers whose low bits are always zero and whose
/// high bits barely vary. One folded 64×64→128 multiply spreads every input bit over the whole
/// hash, low bits (bucket index) and high bits (control byte) alike.
#[derive(Clone, Copy, Default)]
pub struct SkHasher(u64);

impl Hasher for SkHasher {
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }

    #[inline]
    fn write_u64(&mut self, x: u64) {
        const K: u64 = 0x9e37_79b9_7f4a_7c15;
        let p = u128::from(x ^ self.0) * u128::from(K);
        self.0 = (p as u64) ^ ((p >> 64) as u64);
    }

    #[inline]
    fn write_u32(&mut self, x: u32) {
        self.write_u64(u64::from(x));
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(b));
        }
    }
}

type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<SkHasher>>;

/// Refused sockets remembered so that each counts once (about 1 MiB at most).
const MAX_REFUSED: usize = 65_536;

/// Engine limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EngineConfig {
    /// Most connections tracked at once; also the bound of each per-socket side table.
    pub max_connections: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_connections: 65_536,
        }
    }
}

/// How long after the first held event of a timer run an event from outside the run is taken to
/// have overtaken the run's timer event (a run lasts microseconds; a descheduled virtual CPU can
/// stretch it to milliseconds) rather than to follow a timer event that was lost.
const RUN_GRACE_NS: u64 = 100_000_000;

/// Most events held for one socket's timer run (the run's own, and those that overtook it).
pub const MAX_HELD_PER_SOCKET: usize = 64;

// Which fields of a connection's settings were actually learned (not guessed).
const KNOWN_KEEPALIVE: u8 = 1 << 0;
const KNOWN_IDLE: u8 = 1 << 1;
const KNOWN_INTVL: u8 = 1 << 2;
const KNOWN_CNT: u8 = 1 << 3;
const KNOWN_USER_TIMEOUT: u8 = 1 << 4;
const KNOWN_DEFAULTS: u8 = 1 << 5;
const KNOWN_ALL: u8 = (1 << 6) - 1;

/// How far (ns) the last segment received may seem to precede a probe and still be its answer:
/// the kernel's receive time is a jiffy (1-10 ms) and the probe's time the timer run's start.
const ANSWER_SLACK_NS: u64 = 20_000_000;

/// A keep-alive episode in progress.
#[derive(Debug)]
struct OpenEpisode {
    start_ns: u64,
    /// Probes sent, exact (counted by the engine: `icsk_probes_out` is 8 bits and wraps).
    probes: u32,
    /// Number of the probe `probe_ts_ns[0]` times.
    first_timed_probe: u32,
    /// Times of the probes seen, at most [`MAX_PROBE_TIMES`]; the first ones without an
    /// allocation of their own (most episodes end after one probe).
    probe_ts_ns: ProbeTimes,
}

impl OpenEpisode {
    fn new(start_ns: u64, probes_before: u32) -> Self {
        OpenEpisode {
            start_ns,
            probes: probes_before,
            probe_ts_ns: ProbeTimes::new(),
            first_timed_probe: probes_before + 1,
        }
    }

    /// Counts one more probe, sent at `ts`; returns its number.
    fn probe(&mut self, ts: u64) -> u32 {
        self.probes = self.probes.saturating_add(1);
        if self.probe_ts_ns.len() < MAX_PROBE_TIMES {
            self.probe_ts_ns.push(ts);
        }
        self.probes
    }

    fn last_probe_ns(&self) -> u64 {
        self.probe_ts_ns.last().copied().unwrap_or(self.start_ns)
    }
}

/// A tracked connection. Every tracked connection pays for this struct (and the table's slack
/// around it, see [`SkTable`]), so it holds its facts packed; [`Conn::view`] unpacks the identity
/// that every record carries.
#[derive(Debug)]
struct Conn {
    /// Engine-assigned id (see [`ConnView::id`]).
    id: u64,
    sk: u64,
    first_seen_ns: u64,
    /// Boxed: episodes are short and rare next to connections.
    episode: Option<Box<OpenEpisode>>,
    /// The owning process, valid when `has_process`.
    process: Process,
    addrs: PackedAddrs,
    netns: u32,
    settings: PackedSettings,
    /// Episodes ended so far (numbers the next one).
    episodes: u32,
    /// The last socket error reported for this connection (to report each error once).
    last_errno: i32,
    state: TcpState,
    /// `KNOWN_*` bits: fields of `settings` read from the kernel or set by a seen setsockopt. The
    /// others are guesses (a connection first seen through one setsockopt), silently replaced by
    /// the kernel's values at the first timer run.
    known: u8,
    has_process: bool,
    addrs_known: bool,
    /// A record already said why the connection died (timeout, reset, error...).
    died: bool,
}

impl Keyed for Conn {
    fn key(&self) -> u64 {
        self.sk
    }
}

impl Conn {
    /// The identity and context copied into each of the connection's records.
    #[inline]
    fn view(&self) -> ConnView {
        ConnView {
            id: self.id,
            sk: self.sk,
            netns: self.netns,
            local: self.addrs.local(),
            remote: self.addrs.remote(),
            process: self.process(),
            first_seen_ns: self.first_seen_ns,
        }
    }

    fn process(&self) -> Option<Process> {
        self.has_process.then_some(self.process)
    }

    /// The owning process, unless one is known already.
    fn learn_process(&mut self, process: Option<Process>) {
        if let (false, Some(p)) = (self.has_process, process) {
            self.process = p;
            self.has_process = true;
        }
    }

    fn settings(&self) -> SockSettings {
        self.settings.unpack()
    }

    fn set_settings(&mut self, s: &SockSettings) {
        self.settings = PackedSettings::from(s);
    }
}

/// The placeholder of [`Conn::process`] while no process is known.
const NO_PROCESS: Process = Process { pid: 0, tid: 0, comm: [0; 16], cgroup_id: 0 };

/// What is remembered about a socket not (yet) tracked.
#[derive(Debug, Default)]
struct Pending {
    /// The process that called `connect()`.
    connect_process: Option<Process>,
    /// The last keep-alive option set before `connect()`, and by whom.
    option: Option<(SockOpt, Process)>,
    /// When the note was made (monotonic ns), for [`PENDING_MAX_AGE_NS`].
    since_ns: u64,
}

/// How long a note about a socket not tracked is kept: longer than any `connect()` takes (the
/// default SYN retries give up after about 127 s). Older notes are of sockets whose destruction
/// was missed; they are forgotten when the table is full, at most once a second
/// ([`Engine::pending_slot`]).
const PENDING_MAX_AGE_NS: u64 = 600_000_000_000;

/// The timeline state machine. See the module documentation.
pub struct Engine {
    cap: usize,
    next_id: u64,
    conns: SkTable<Conn>,
    pending: FastMap<u64, Pending>,
    /// `in_timer` events waiting for their timer event, per socket.
    held: FastMap<u64, Vec<Event>>,
    /// Sockets the cap refused, so that each counts once in `cap_rejected` however many of its
    /// events come; forgotten when tracked or destroyed, all of it at [`MAX_REFUSED`] (then a
    /// socket still refused counts again).
    refused: FastMap<u64, ()>,
    /// When `pending` was last rid of notes older than [`PENDING_MAX_AGE_NS`].
    pending_purged_ns: u64,
    stats: EngineStats,
    cap_rejected_reported: u64,
    /// Connections tracked since the engine started (ids also number unfollowed deaths).
    opened: u64,
}

/// States in which a socket is a connection keep-alive can apply to.
fn is_connection(state: TcpState) -> bool {
    matches!(
        state,
        TcpState::Established
            | TcpState::FinWait1
            | TcpState::FinWait2
            | TcpState::CloseWait
            | TcpState::LastAck
            | TcpState::Closing
    )
}

fn same_effective(a: &SockSettings, b: &SockSettings) -> bool {
    a.keepalive == b.keepalive
        && a.effective_idle_s() == b.effective_idle_s()
        && a.effective_intvl_s() == b.effective_intvl_s()
        && a.effective_cnt() == b.effective_cnt()
        && a.user_timeout_ms == b.user_timeout_ms
}

/// Applies a setsockopt value the kernel accepts; `None` for one it rejects with EINVAL (nothing
/// changes on the socket then). Returns the `KNOWN_*` bit learned.
fn apply_option(s: &mut SockSettings, option: SockOpt, value: i32) -> Option<u8> {
    // Ranges from the kernel: MAX_TCP_KEEPIDLE, MAX_TCP_KEEPINTVL (32767 s), MAX_TCP_KEEPCNT (127).
    let ranged = |max: i32| (1..=max).contains(&value).then_some(value as u32);
    Some(match option {
        SockOpt::KeepAlive => {
            s.keepalive = value != 0;
            KNOWN_KEEPALIVE
        }
        SockOpt::KeepIdle => {
            s.idle_s = Some(ranged(32767)?);
            KNOWN_IDLE
        }
        SockOpt::KeepIntvl => {
            s.intvl_s = Some(ranged(32767)?);
            KNOWN_INTVL
        }
        SockOpt::KeepCnt => {
            s.cnt = Some(ranged(127)?);
            KNOWN_CNT
        }
        SockOpt::UserTimeout => {
            if value < 0 {
                return None;
            }
            s.user_timeout_ms = value as u32;
            KNOWN_USER_TIMEOUT
        }
    })
}

/// Where settings read when a connection is first seen came from, when no setsockopt explains them:
/// `read_as` (where they were read) when values are set on the socket, else the sysctl defaults.
fn read_source(s: &SockSettings, read_as: SettingsSource) -> SettingsSource {
    if s.has_socket_values() {
        read_as
    } else {
        SettingsSource::Default
    }
}

/// `mine` with the fields not in `known` replaced by the kernel's (`read`).
fn merge_unknown(mine: &SockSettings, known: u8, read: &SockSettings) -> SockSettings {
    let mut m = *mine;
    let unknown = !known;
    if unknown & KNOWN_KEEPALIVE != 0 {
        m.keepalive = read.keepalive;
    }
    if unknown & KNOWN_IDLE != 0 {
        m.idle_s = read.idle_s;
    }
    if unknown & KNOWN_INTVL != 0 {
        m.intvl_s = read.intvl_s;
    }
    if unknown & KNOWN_CNT != 0 {
        m.cnt = read.cnt;
    }
    if unknown & KNOWN_USER_TIMEOUT != 0 {
        m.user_timeout_ms = read.user_timeout_ms;
    }
    if unknown & KNOWN_DEFAULTS != 0 {
        m.idle_default_s = read.idle_default_s;
        m.intvl_default_s = read.intvl_default_s;
        m.cnt_default = read.cnt_default;
    }
    m
}

/// Appends the connection's record of `kind`, written where it lies in `out` (a 232-byte record
/// built aside and then copied in costs a copy per record).
#[inline]
fn emit(out: &mut Vec<Record>, ts_ns: u64, conn: &Conn, kind: RecordKind) {
    out.reserve(1);
    out.spare_capacity_mut()[0].write(Record { ts_ns, conn: conn.view(), kind });
    // SAFETY: the first slot past `len` exists (reserved) and was just initialised.
    unsafe { out.set_len(out.len() + 1) };
}

/// Marks `kind` as the connection's death when it is the first record to explain it: an active
/// reset or an error with no timeout, peer reset or race before them (`death: true`, counted as
/// `reset_sent` / `error`). Every death record marks the connection as dead.
fn note_death(conn: &mut Conn, kind: &mut RecordKind) {
    if let RecordKind::Reset { active: true, death, .. } | RecordKind::Error { death, .. } = kind {
        *death = !conn.died;
    }
    if kind.death_cause().is_some() {
        conn.died = true;
    }
}

/// Ends the connection's open episode, if any, with `outcome` at `ts_ns`.
fn end_episode(out: &mut Vec<Record>, ts_ns: u64, conn: &mut Conn, outcome: EpisodeOutcome) {
    if let Some(ep) = conn.episode.take() {
        let ep = *ep;
        conn.episodes += 1;
        let episode = Episode {
            number: conn.episodes,
            start_ns: ep.start_ns,
            end_ns: ts_ns.max(ep.start_ns),
            probes: ep.probes,
            outcome,
            probe_ts_ns: ep.probe_ts_ns,
            first_timed_probe: ep.first_timed_probe,
        };
        emit(out, ts_ns, conn, RecordKind::EpisodeEnd(episode));
    }
}

/// The answer to the open episode's probes, at `at`: `ack` then the episode's end.
fn answered(out: &mut Vec<Record>, at: u64, conn: &mut Conn, precision: AckPrecision) {
    let Some(ep) = &conn.episode else { return };
    let kind = RecordKind::Ack {
        probes: ep.probes,
        precision,
    };
    emit(out, at, conn, kind);
    end_episode(out, at, conn, EpisodeOutcome::Answered(precision));
}

fn note_addrs(conn: &mut Conn, ev: &Event) {
    if !conn.addrs_known {
        if let Some((local, remote)) = &ev.addrs {
            conn.addrs = PackedAddrs::new(local, remote);
            conn.addrs_known = true;
        }
    }
}

impl Engine {
    pub fn new(cfg: EngineConfig) -> Self {
        Engine {
            cap: cfg.max_connections,
            next_id: 1,
            conns: SkTable::new(),
            pending: FastMap::default(),
            held: FastMap::default(),
            refused: FastMap::default(),
            pending_purged_ns: 0,
            stats: EngineStats::default(),
            cap_rejected_reported: 0,
            opened: 0,
        }
    }

    pub fn stats(&self) -> EngineStats {
        EngineStats {
            tracked: self.conns.len() as u64,
            opened: self.opened,
            ..self.stats
        }
    }

    /// Connections waiting for an answer to a keep-alive probe (an episode is open). O(tracked).
    pub fn awaiting_answer(&self) -> usize {
        self.conns.values().filter(|c| c.episode.is_some()).count()
    }

    /// Connections whose keep-alive probes went unanswered for a whole probe interval: the open
    /// episode holds a second probe (the kernel probes again only when no answer reset its count).
    /// Unlike [`Engine::awaiting_answer`], not raised by a healthy peer whose answer the engine
    /// learns only at the next timer firing (`--probe-answers next-firing`, or an answer that came
    /// before the on-demand hook attached), nor by a probe sent a moment ago. A connection whose
    /// count is 1 (or whose `TCP_USER_TIMEOUT` is shorter than an interval) dies at the next
    /// firing without a second probe and is never counted. O(tracked).
    pub fn unanswered_probes(&self) -> usize {
        self.conns.values().filter(|c| c.episode.as_ref().is_some_and(|e| e.probes >= 2)).count()
    }

    /// Connections tracked now with keep-alive on, and with it off (followed for
    /// `TCP_USER_TIMEOUT` alone). O(tracked). Read-only, for the metrics' gauges.
    pub fn keepalive_split(&self) -> (usize, usize) {
        let on = self.conns.values().filter(|c| c.settings.keepalive()).count();
        (on, self.conns.len() - on)
    }

    /// Connections tracked now.
    pub fn tracked(&self) -> usize {
        self.conns.len()
    }

    /// The connections tracked now (not closed), in no particular order.
    pub fn open_connections(&self) -> impl Iterator<Item = ConnView> + '_ {
        self.conns.values().map(Conn::view)
    }

    /// How many sockets the cap refused since the previous call (each refusal counts: a socket
    /// refused at several events counts several times).
    pub fn cap_hit_since_last_check(&mut self) -> u64 {
        let n = self.stats.cap_rejected - self.cap_rejected_reported;
        self.cap_rejected_reported = self.stats.cap_rejected;
        n
    }

    /// Replays events held back for a timer record that has not come `max_wait_ns` after the first
    /// of them (`now_ns` in the events' clock): the timer record was lost (a full ring buffer), and
    /// the reset, error and close it would have preceded must not wait for the socket's
    /// destruction. A timer run lasts microseconds; callers use about a second. Call it regularly
    /// (the agent does every second) and with the events' own times.
    pub fn release_stale_held(&mut self, now_ns: u64, max_wait_ns: u64, out: &mut Vec<Record>) {
        if self.held.is_empty() {
            return;
        }
        let stale: Vec<u64> = self
            .held
            .iter()
            .filter(|(_, evs)| evs.first().is_some_and(|e| now_ns.saturating_sub(e.ts_ns) > max_wait_ns))
            .map(|(sk, _)| *sk)
            .collect();
        for sk in stale {
            if let Some(evs) = self.held.remove(&sk) {
                evs.iter().for_each(|e| self.process(e, out));
            }
        }
    }

    /// Stops following every connection whose socket a walk of the kernel's keep-alive sockets,
    /// started at `walk_start_ns`, did not find (`alive(conn)` is false): its close and destruction
    /// were both missed. Connections first seen after the walk started are kept. Each gets an
    /// `untracked` record with reason `gone`, at `walk_start_ns`.
    pub fn reconcile(&mut self, walk_start_ns: u64, alive: impl Fn(&ConnView) -> bool, out: &mut Vec<Record>) {
        let mut gone: Vec<(u64, u64)> = self
            .conns
            .values()
            .filter(|c| c.first_seen_ns < walk_start_ns && !alive(&c.view()))
            .map(|c| (c.id, c.sk))
            .collect();
        gone.sort_unstable();
        for (_, sk) in gone {
            // What its last timer run was held behind explains its end better than `gone`.
            if let Some(evs) = self.held.remove(&sk) {
                evs.iter().for_each(|e| self.process(e, out));
            }
            self.untrack(sk, walk_start_ns, UntrackReason::Gone, out);
        }
    }

    /// Ends every connection at agent shutdown (`stop_ns`, monotonic): an episode in progress ends
    /// `incomplete`, then the connection gets an `untracked` record with reason `shutdown`. Held
    /// events are replayed first. The engine is empty afterwards.
    pub fn shutdown(&mut self, stop_ns: u64, out: &mut Vec<Record>) {
        self.release_stale_held(u64::MAX, 0, out);
        let mut sks: Vec<(u64, u64)> = self.conns.values().map(|c| (c.id, c.sk)).collect();
        sks.sort_unstable();
        for (_, sk) in sks {
            self.untrack(sk, stop_ns, UntrackReason::Shutdown, out);
        }
        self.pending.clear();
        self.refused.clear();
    }

    /// Asks for the state of the connection on socket `sk` to be brought into cache: called for
    /// a batch of events before they are handled, so that their connections' cache misses overlap
    /// instead of coming one after the other. Changes nothing.
    pub fn prefetch(&self, sk: u64) {
        self.conns.prefetch(sk);
    }

    /// Consumes one event; appends the records it causes to `out`.
    pub fn handle(&mut self, ev: &Event, out: &mut Vec<Record>) {
        self.stats.events += 1;
        let is_timer = matches!(ev.body, EventBody::Timer(_));
        if ev.in_timer && !is_timer {
            if self.hold_in_run(ev) {
                return;
            }
            // No room to hold it back: handle it now, out of order rather than not at all.
            self.stats.unordered += 1;
        } else if !self.held.is_empty() {
            if !is_timer && self.hold_behind_run(ev) {
                return;
            }
            if let Some(held) = self.held.remove(&ev.sk) {
                if is_timer {
                    self.process(ev, out);
                    held.iter().for_each(|h| self.process(h, out));
                } else {
                    // The timer event of that run was lost: replay what was held, in order.
                    held.iter().for_each(|h| self.process(h, out));
                    self.process(ev, out);
                }
                return;
            }
        }
        self.process(ev, out);
    }

    /// Holds `ev`, an event from outside the timer run whose events are held for `ev.sk`, behind
    /// them when it came within [`RUN_GRACE_NS`] of the first (at most [`MAX_HELD_PER_SOCKET`]):
    /// the owner, woken inside the run by the error it set, can close the socket on another CPU
    /// before the run's timer event is sent, which its program does only after the run returned.
    /// Later, the timer event was lost. Whether it was held.
    fn hold_behind_run(&mut self, ev: &Event) -> bool {
        let Some(held) = self.held.get_mut(&ev.sk) else { return false };
        let recent = held.first().is_some_and(|h| ev.ts_ns.saturating_sub(h.ts_ns) < RUN_GRACE_NS);
        if !recent {
            return false;
        }
        if held.len() < MAX_HELD_PER_SOCKET {
            held.push(ev.clone());
            return true;
        }
        self.stats.unordered += 1;
        false
    }

    /// Holds `ev`, an event sent from inside a timer run, until the run's timer event: with the
    /// socket's other held events (at most [`MAX_HELD_PER_SOCKET`]), or as the first for its
    /// socket while fewer sockets than the connection cap hold events. Whether it was held.
    fn hold_in_run(&mut self, ev: &Event) -> bool {
        if let Some(held) = self.held.get_mut(&ev.sk) {
            if held.len() >= MAX_HELD_PER_SOCKET {
                return false;
            }
            held.push(ev.clone());
            return true;
        }
        if self.held.len() < self.cap {
            self.held.insert(ev.sk, vec![ev.clone()]);
            return true;
        }
        false
    }

    fn process(&mut self, ev: &Event, out: &mut Vec<Record>) {
        match &ev.body {
            EventBody::Timer(t) => self.on_timer(ev, t, out),
            EventBody::Ack { .. } => {
                // Only an answer while a keep-alive episode is open: `icsk_probes_out` also counts
                // zero-window probes, whose answers are not ours.
                if let Some(conn) = self.conns.get_mut(&ev.sk) {
                    note_addrs(conn, ev);
                    answered(out, ev.ts_ns, conn, AckPrecision::Segment);
                }
            }
            EventBody::ResetSent { active, reason, state } => {
                let reason = reason.clone().unwrap_or_else(|| "not_specified".to_owned());
                let kind = RecordKind::Reset { reason, active: *active, death: false };
                if self.conns.contains_key(&ev.sk) {
                    self.on_reset(ev, *state, kind, out);
                } else if *state == TcpState::TimeWait || *state == TcpState::Close && !*active {
                    // A segment arrived after the close. An active reset of a closed socket is
                    // this host aborting its own close (unread data, zero linger): its close tells.
                    self.unfollowed_reset(ev, *state, kind, out);
                }
            }
            EventBody::ResetReceived { state, times } => {
                // A connection not followed is reported at its close, which carries the same facts.
                let kind = reset_received_kind(*state, times);
                if let Some(conn) = self.conns.get_mut(&ev.sk) {
                    answer_before_end(out, ev.ts_ns, conn, times);
                }
                self.on_reset(ev, *state, kind, out)
            }
            EventBody::Error { errno, state } => {
                if let Some(conn) = self.conns.get_mut(&ev.sk) {
                    note_addrs(conn, ev);
                    conn.state = *state;
                    conn.last_errno = *errno;
                    let mut kind = RecordKind::Error { errno: *errno, death: false };
                    note_death(conn, &mut kind);
                    emit(out, ev.ts_ns, conn, kind);
                }
            }
            EventBody::State {
                old,
                new,
                settings,
                process,
                err,
                times,
            } => {
                if *new == TcpState::Close {
                    self.on_close(ev, *old, *err, settings, *process, times, out);
                } else {
                    self.on_state(ev, *new, settings, *process, out);
                }
            }
            EventBody::Setsockopt {
                option,
                value,
                state,
                process,
                settings,
            } => self.on_setsockopt(ev, *option, *value, *state, process, settings, out),
            EventBody::Snapshot {
                state,
                settings,
                probes_out,
                packets_out,
                unsent,
            } => {
                let keepalive_probes = if *packets_out == 0 && *unsent == 0 { *probes_out } else { 0 };
                self.on_snapshot(ev, *state, settings, keepalive_probes, out)
            }
            EventBody::Destroy => {
                self.drop_pending(ev.sk);
                self.forget_refused(ev.sk);
                self.untrack(ev.sk, ev.ts_ns, UntrackReason::Destroyed, out);
            }
            EventBody::Owner { process } => self.on_owner(ev, process),
        }
    }

    /// A process holding the socket (it accepted it, holds a socket of the start-up snapshot, or
    /// holds a socket whose death follows): the connection's process from now on, unless it
    /// already has one. A socket not tracked yet keeps it in its pending note, which the
    /// connection takes when it becomes tracked, or the close of a connection not followed.
    fn on_owner(&mut self, ev: &Event, process: &Process) {
        if let Some(conn) = self.conns.get_mut(&ev.sk) {
            note_addrs(conn, ev);
            conn.learn_process(Some(*process));
        } else if let Some(p) = self.pending_slot(ev) {
            p.connect_process.get_or_insert(*process);
        }
    }

    /// A reset sent or received: the record, and the end of the episode it cut short.
    fn on_reset(&mut self, ev: &Event, state: TcpState, kind: RecordKind, out: &mut Vec<Record>) {
        if let Some(conn) = self.conns.get_mut(&ev.sk) {
            note_addrs(conn, ev);
            conn.state = state;
            let by_peer = matches!(kind, RecordKind::PeerReset { .. } | RecordKind::ReuseRace { .. });
            let mut kind = kind;
            note_death(conn, &mut kind);
            emit(out, ev.ts_ns, conn, kind);
            end_episode(out, ev.ts_ns, conn, EpisodeOutcome::Reset { by_peer });
        }
    }

    /// Stops following `sk` (if tracked) without a close: its episode ends `incomplete`, then an
    /// `untracked` record with `reason`.
    fn untrack(&mut self, sk: u64, ts_ns: u64, reason: UntrackReason, out: &mut Vec<Record>) {
        if let Some(mut conn) = self.conns.remove(&sk) {
            let ts = ts_ns.max(conn.first_seen_ns);
            end_episode(out, ts, &mut conn, EpisodeOutcome::Incomplete);
            let kind = RecordKind::Untracked { reason, state: conn.state };
            emit(out, ts, &conn, kind);
            self.stats.untracked += 1;
        }
    }

    /// Forgets the pending note of `sk` (counting a keep-alive option it held as dropped); returns
    /// the process it named.
    fn drop_pending(&mut self, sk: u64) -> Option<Process> {
        let p = self.pending.remove(&sk)?;
        if p.option.is_some() {
            self.stats.pending_dropped += 1;
        }
        p.connect_process
    }

    /// Counts `sk` in `cap_rejected` unless it was refused already.
    fn refuse(&mut self, sk: u64) {
        if self.refused.len() >= MAX_REFUSED {
            self.refused.clear();
        }
        if self.refused.insert(sk, ()).is_none() {
            self.stats.cap_rejected += 1;
        }
    }

    /// Forgets that `sk` was refused (it is tracked now, or destroyed).
    fn forget_refused(&mut self, sk: u64) {
        if !self.refused.is_empty() {
            self.refused.remove(&sk);
        }
    }

    /// The pending note for `ev`'s socket, created if there is room (a refusal counts against the cap).
    fn pending_slot(&mut self, ev: &Event) -> Option<&mut Pending> {
        let full = |e: &Self| e.pending.len() >= e.cap && !e.pending.contains_key(&ev.sk);
        if full(self) && ev.ts_ns.saturating_sub(self.pending_purged_ns) >= 1_000_000_000 {
            self.pending_purged_ns = ev.ts_ns;
            let (before, cutoff) = (self.pending.len(), ev.ts_ns.saturating_sub(PENDING_MAX_AGE_NS));
            self.pending.retain(|_, p| p.since_ns >= cutoff);
            self.stats.pending_expired += (before - self.pending.len()) as u64;
        }
        if full(self) {
            self.refuse(ev.sk);
            return None;
        }
        Some(self.pending.entry(ev.sk).or_insert_with(|| Pending { since_ns: ev.ts_ns, ..Pending::default() }))
    }

    /// Starts tracking `sk` (not tracked now) and emits `Opened`; `None` when the cap refuses it.
    fn open(
        &mut self,
        ev: &Event,
        state: TcpState,
        settings: SockSettings,
        known: u8,
        process: Option<Process>,
        out: &mut Vec<Record>,
    ) -> Option<&mut Conn> {
        if self.conns.len() >= self.cap {
            self.refuse(ev.sk);
            return None;
        }
        self.forget_refused(ev.sk);
        self.opened += 1;
        let view = self.new_view(ev, process);
        let conn = self.conns.insert(Conn {
            id: view.id,
            sk: ev.sk,
            first_seen_ns: view.first_seen_ns,
            episode: None,
            process: process.unwrap_or(NO_PROCESS),
            addrs: PackedAddrs::new(&view.local, &view.remote),
            netns: view.netns,
            settings: PackedSettings::from(&settings),
            episodes: 0,
            last_errno: 0,
            state,
            known,
            has_process: process.is_some(),
            addrs_known: ev.addrs.is_some(),
            died: false,
        });
        let established = state == TcpState::Established;
        emit(
            out,
            ev.ts_ns,
            conn,
            RecordKind::Opened { state, established },
        );
        Some(conn)
    }

    /// A fresh identity for the connection of `ev` (a new id, never reused).
    fn new_view(&mut self, ev: &Event, process: Option<Process>) -> ConnView {
        let unspecified = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0);
        let (local, remote) = ev.addrs.unwrap_or((unspecified, unspecified));
        let id = self.next_id;
        self.next_id += 1;
        ConnView {
            id,
            sk: ev.sk,
            netns: ev.netns,
            local,
            remote,
            process,
            first_seen_ns: ev.ts_ns,
        }
    }

    /// Starts tracking a connection whose settings were just read from the kernel (established,
    /// timer): `Opened`, then one `Config` attributed to a pre-connect setsockopt if there was one.
    fn open_with_read_settings(
        &mut self,
        ev: &Event,
        state: TcpState,
        settings: &SockSettings,
        process: Option<Process>,
        read_as: SettingsSource,
        out: &mut Vec<Record>,
    ) -> Option<&mut Conn> {
        let pending = if self.pending.is_empty() {
            None
        } else {
            self.pending.remove(&ev.sk)
        };
        let (connect_process, option) = match pending {
            Some(p) => (p.connect_process, p.option),
            None => (None, None),
        };
        let (source, config_process) = match option {
            Some((opt, by)) => (SettingsSource::Setsockopt(opt), Some(by)),
            None => (read_source(settings, read_as), None),
        };
        let process = connect_process.or(process).or(config_process);
        let conn = self.open(ev, state, *settings, KNOWN_ALL, process, out)?;
        let kind = RecordKind::Config {
            settings: *settings,
            source,
            process: config_process,
        };
        emit(out, ev.ts_ns, conn, kind);
        Some(conn)
    }

    /// Whether `ev` predates the tracked connection on its socket (it was first seen by the
    /// start-up snapshot taken after the event was queued).
    fn older_than_tracked(&self, ev: &Event) -> bool {
        self.conns.get(&ev.sk).is_some_and(|c| ev.ts_ns <= c.first_seen_ns)
    }

    fn on_state(
        &mut self,
        ev: &Event,
        new: TcpState,
        settings: &SockSettings,
        process: Option<Process>,
        out: &mut Vec<Record>,
    ) {
        match new {
            TcpState::Established => {
                if self.older_than_tracked(ev) {
                    // Keep the connection; learn what the older event knows.
                    if let Some(conn) = self.conns.get_mut(&ev.sk) {
                        note_addrs(conn, ev);
                        conn.learn_process(process);
                    }
                    return;
                }
                // A tracked socket becoming established again: its close was missed and the
                // address is a new connection.
                self.untrack(ev.sk, ev.ts_ns, UntrackReason::Reused, out);
                let has_option = !self.pending.is_empty()
                    && self.pending.get(&ev.sk).is_some_and(|p| p.option.is_some());
                if settings.relevant() || has_option {
                    self.open_with_read_settings(ev, new, settings, process, SettingsSource::Established, out);
                } else if !self.pending.is_empty() {
                    self.pending.remove(&ev.sk);
                }
            }
            TcpState::SynSent => {
                if self.older_than_tracked(ev) {
                    return;
                }
                self.untrack(ev.sk, ev.ts_ns, UntrackReason::Reused, out);
                if let Some(process) = process {
                    if let Some(p) = self.pending_slot(ev) {
                        p.connect_process = Some(process);
                    }
                }
            }
            _ => {
                if let Some(conn) = self.conns.get_mut(&ev.sk) {
                    note_addrs(conn, ev);
                    conn.state = new;
                }
            }
        }
    }

    /// The connection closed: a retransmission death (the keep-alive timer's deaths come from the
    /// timer run), the error that killed it (the kernel reports it after the close, when the
    /// connection is no longer tracked; older kernels before it), its episode, then `close` with
    /// who closed and the idle time. A connection not followed is reported by [`Self::unfollowed_close`],
    /// with its owner: `process` (the close ran in its context), else the owner note (`Owner`) of
    /// the socket.
    #[allow(clippy::too_many_arguments)]
    fn on_close(
        &mut self,
        ev: &Event,
        old: TcpState,
        err: i32,
        settings: &SockSettings,
        process: Option<Process>,
        times: &SockTimes,
        out: &mut Vec<Record>,
    ) {
        let noted = if self.pending.is_empty() { None } else { self.drop_pending(ev.sk) };
        let Some(mut conn) = self.conns.remove(&ev.sk) else {
            self.unfollowed_close(ev, old, err, settings, process.or(noted), times, out);
            return;
        };
        note_addrs(&mut conn, ev);
        answer_before_end(out, ev.ts_ns, &mut conn, times);
        if err == ETIMEDOUT && !ev.in_timer && !conn.died {
            let mut kind = retransmit_timeout(times);
            note_death(&mut conn, &mut kind);
            emit(out, ev.ts_ns, &conn, kind);
            end_episode(out, ev.ts_ns, &mut conn, EpisodeOutcome::TimedOut(TimeoutReason::Retransmit));
        }
        if err != 0 && conn.last_errno != err {
            let mut kind = RecordKind::Error { errno: err, death: false };
            note_death(&mut conn, &mut kind);
            emit(out, ev.ts_ns, &conn, kind);
        }
        end_episode(out, ev.ts_ns, &mut conn, EpisodeOutcome::Closed);
        emit(out, ev.ts_ns, &conn, close_kind(old, times));
        self.stats.closed += 1;
    }

    /// The close of a connection the engine does not follow (the kernel reports it only for a
    /// death, or for every close with `--all-closes`): a self-contained group under a new id, no
    /// state kept, with `owner` (the process holding the socket) when known. A death: `config`
    /// (the settings at the death), its cause, `error`, `close`; a plain close: `close` alone.
    #[allow(clippy::too_many_arguments)]
    fn unfollowed_close(
        &mut self,
        ev: &Event,
        old: TcpState,
        err: i32,
        settings: &SockSettings,
        owner: Option<Process>,
        times: &SockTimes,
        out: &mut Vec<Record>,
    ) {
        if !is_connection(old) || err == 0 && settings.reported_by_kernel() {
            // A connect or handshake that failed (no connection died), or the plain close of a
            // keep-alive socket the engine did not take (the cap): not a close `--all-closes` asks for.
            return;
        }
        let view = self.new_view(ev, owner);
        let mut push = |kind| out.push(Record { ts_ns: ev.ts_ns, conn: view, kind });
        if err == 0 {
            self.stats.unfollowed_closes += 1;
            push(close_kind(old, times));
            return;
        }
        self.stats.unfollowed_deaths += 1;
        push(RecordKind::Config { settings: *settings, source: SettingsSource::Close, process: None });
        let cause = unfollowed_cause(old, err, ev.in_timer, settings, times);
        let death = cause.is_none();
        if let Some(cause) = cause {
            push(cause);
        }
        push(RecordKind::Error { errno: err, death });
        push(close_kind(old, times));
    }

    /// A reset sent by a time-wait or closed socket the engine does not follow, answering a segment
    /// that arrived after the close (`tcp_timewait_socket`, `tcp_abort_on_data`...): `reset` then
    /// `close` (the time-wait socket is gone with it), under a new id.
    fn unfollowed_reset(&mut self, ev: &Event, state: TcpState, kind: RecordKind, out: &mut Vec<Record>) {
        self.stats.unfollowed_resets += 1;
        let view = self.new_view(ev, None);
        out.push(Record { ts_ns: ev.ts_ns, conn: view, kind });
        // A time-wait socket exists only on the side that sent the first FIN (or both, at once).
        let closed_by = (state == TcpState::TimeWait).then_some(ClosedBy::Local);
        let close = RecordKind::Close { state, closed_by, idle: None };
        out.push(Record { ts_ns: ev.ts_ns, conn: view, kind: close });
    }

    #[allow(clippy::too_many_arguments)]
    fn on_setsockopt(
        &mut self,
        ev: &Event,
        option: SockOpt,
        value: i32,
        state: TcpState,
        process: &Process,
        read: &SockSettings,
        out: &mut Vec<Record>,
    ) {
        if self.conns.contains_key(&ev.sk) {
            self.setsockopt_tracked(ev, option, value, process, read, out);
            return;
        }
        let mut settings = *read;
        if apply_option(&mut settings, option, value).is_none() {
            return; // rejected by the kernel: nothing changes
        }
        if ev.addrs.is_none() || matches!(state, TcpState::Close | TcpState::SynSent) {
            // Before connect(): reported once the connection is established.
            if let Some(p) = self.pending_slot(ev) {
                p.option = Some((option, *process));
            }
            return;
        }
        if !is_connection(state) || !settings.reported_by_kernel() {
            // A listener (its children are seen when established), a dying socket, or keep-alive
            // switched off on a socket we never followed.
            return;
        }
        let Some(conn) = self.open(ev, state, settings, KNOWN_ALL, Some(*process), out) else {
            return;
        };
        let source = SettingsSource::Setsockopt(option);
        let kind = RecordKind::Config { settings, source, process: Some(*process) };
        emit(out, ev.ts_ns, conn, kind);
    }

    /// A keep-alive option set on a tracked connection: the new settings, and the end of following
    /// it when keep-alive is now off entirely (the kernel side no longer reports its close).
    fn setsockopt_tracked(
        &mut self,
        ev: &Event,
        option: SockOpt,
        value: i32,
        process: &Process,
        read: &SockSettings,
        out: &mut Vec<Record>,
    ) {
        let Some(conn) = self.conns.get_mut(&ev.sk) else { return };
        note_addrs(conn, ev);
        // Settings as the kernel holds them just before this option (read by the program).
        let mine = conn.settings();
        let mut settings = merge_unknown(&mine, conn.known & !KNOWN_DEFAULTS, read).with_defaults_from(&mine);
        let Some(_) = apply_option(&mut settings, option, value) else {
            return;
        };
        conn.set_settings(&settings);
        conn.known = KNOWN_ALL;
        conn.learn_process(Some(*process));
        let source = SettingsSource::Setsockopt(option);
        let kind = RecordKind::Config { settings, source, process: Some(*process) };
        emit(out, ev.ts_ns, conn, kind);
        if !settings.reported_by_kernel() {
            self.untrack(ev.sk, ev.ts_ns, UntrackReason::KeepaliveOff, out);
        }
    }

    fn on_snapshot(
        &mut self,
        ev: &Event,
        state: TcpState,
        settings: &SockSettings,
        keepalive_probes_out: u8,
        out: &mut Vec<Record>,
    ) {
        if self.conns.contains_key(&ev.sk) {
            return; // already seen live: live events are newer than the snapshot
        }
        if !settings.relevant() || !is_connection(state) {
            return;
        }
        let owner = self.pending.remove(&ev.sk).and_then(|p| p.connect_process);
        let Some(conn) = self.open(ev, state, *settings, KNOWN_ALL, owner, out) else {
            return;
        };
        let kind = RecordKind::Config {
            settings: *settings,
            source: SettingsSource::Snapshot,
            process: None,
        };
        emit(out, ev.ts_ns, conn, kind);
        if keepalive_probes_out > 0 {
            // An episode under way: its earlier probes are counted, not timed.
            conn.episode = Some(Box::new(OpenEpisode::new(ev.ts_ns, u32::from(keepalive_probes_out))));
        }
    }

    /// The tracked connection a timer run concerns, opened now if keep-alive is on and it was not
    /// followed yet.
    fn timer_conn(&mut self, ev: &Event, t: &TimerFiring, out: &mut Vec<Record>) -> Option<&mut Conn> {
        if !self.conns.contains_key(&ev.sk) {
            let orphan_fin_wait2 = t.state_before == TcpState::FinWait2 && t.dead;
            if !t.keepopen || !is_connection(t.state_before) || orphan_fin_wait2 {
                return None;
            }
            return self.open_with_read_settings(ev, t.state_before, &t.settings, None, SettingsSource::Kernel, out);
        }
        let conn = self.conns.get_mut(&ev.sk)?;
        note_addrs(conn, ev);
        Some(conn)
    }

    fn on_timer(&mut self, ev: &Event, t: &TimerFiring, out: &mut Vec<Record>) {
        let ts = ev.ts_ns;
        let Some(conn) = self.timer_conn(ev, t, out) else { return };
        if t.owned {
            // The owner may be inside setsockopt right now: settings read here can be stale.
            emit(out, ts, conn, RecordKind::Busy);
            return;
        }
        if t.state_before == TcpState::Listen {
            return;
        }
        conn.state = t.state_after;
        if t.state_before == TcpState::FinWait2 && t.dead {
            emit(out, ts, conn, RecordKind::FinWait2);
            return;
        }
        reconcile_settings(out, ts, conn, &t.settings);
        if !t.keepopen || matches!(t.state_before, TcpState::Close | TcpState::SynSent) {
            return;
        }
        if t.probes_before == 0 {
            infer_answer(out, ts, conn, t);
        }
        self.stats.unreported_probes += u64::from(classify_firing(out, ts, conn, t));
    }
}

/// The record of a reset received in `state`: the reuse race when data written after the peer's
/// FIN (CLOSE_WAIT) was never acknowledged and the application had not read that FIN (it wrote
/// on a connection it did not know was closed), a peer reset otherwise: an application that read
/// the end of stream and then wrote (a TLS close_notify, a goodbye) knew.
fn reset_received_kind(state: TcpState, times: &SockTimes) -> RecordKind {
    if state == TcpState::CloseWait && times.unacked > 0 && times.unread != Some(0) {
        reuse_race(times)
    } else {
        RecordKind::PeerReset { idle: Some(idle_of(times)) }
    }
}

/// The reuse race from the socket's clocks at the reset: the FIN's acknowledgment is the last
/// one received (`since_ack`), the response before it the last data received (`since_data`), and
/// the write the last data sent (`since_sent`).
fn reuse_race(times: &SockTimes) -> RecordKind {
    RecordKind::ReuseRace {
        peer_idle_ms: times.since_data_ms.saturating_sub(times.since_ack_ms),
        write_after_ms: times.since_ack_ms.saturating_sub(times.since_sent_ms),
        bytes: times.unacked,
    }
}

/// Idle times from the socket's clocks. Idle is the time without data either way before what
/// ended the connection: before the write still unacknowledged (its first retransmission
/// `retransmitting_ms` ago while retransmitted, else its send, the last) when there is one, else
/// up to now.
fn idle_of(t: &SockTimes) -> Idle {
    let write_ago = t.retransmitting_ms.or((t.unacked > 0).then_some(t.since_sent_ms));
    let idle_ms = match write_ago {
        Some(w) => t.since_data_ms.saturating_sub(w),
        None => t.since_data_ms.min(t.since_sent_ms),
    };
    Idle { idle_ms, since_received_ms: t.since_data_ms, since_sent_ms: t.since_sent_ms }
}

/// The retransmission timer gave up (`probes`: its retransmissions).
fn retransmit_timeout(times: &SockTimes) -> RecordKind {
    RecordKind::Timeout { reason: TimeoutReason::Retransmit, probes: times.retransmits, idle: Some(idle_of(times)) }
}

/// The `close` of a connection that left `old` for CLOSE.
fn close_kind(old: TcpState, times: &SockTimes) -> RecordKind {
    RecordKind::Close { state: old, closed_by: ClosedBy::from_state(old), idle: Some(idle_of(times)) }
}

/// What killed a connection the engine did not follow, from the socket error set at its close.
fn unfollowed_cause(old: TcpState, err: i32, in_timer: bool, s: &SockSettings, times: &SockTimes) -> Option<RecordKind> {
    match err {
        ETIMEDOUT if in_timer => {
            let reason = if s.user_timeout_ms > 0 { TimeoutReason::UserTimeout } else { TimeoutReason::Keepalive };
            Some(RecordKind::Timeout { reason, probes: 0, idle: Some(idle_of(times)) })
        }
        ETIMEDOUT => Some(retransmit_timeout(times)),
        // tcp_reset(): EPIPE in CLOSE_WAIT, ECONNRESET in the other connection states.
        EPIPE if old == TcpState::CloseWait => Some(reset_received_kind(old, times)),
        ECONNRESET => Some(reset_received_kind(old, times)),
        _ => None,
    }
}

/// Settings read at a timer run against the connection's: a `config` record (source `kernel`) when
/// they changed without a setsockopt we saw (bpf_setsockopt, in-kernel users, sysctl).
fn reconcile_settings(out: &mut Vec<Record>, ts: u64, conn: &mut Conn, read: &SockSettings) {
    let packed = PackedSettings::from(read);
    if conn.known == KNOWN_ALL && packed == conn.settings {
        return; // the usual firing: nothing changed, nothing guessed
    }
    let mine = merge_unknown(&conn.settings(), conn.known, read);
    let changed = !same_effective(&mine, read);
    conn.settings = packed;
    conn.known = KNOWN_ALL;
    if changed {
        let kind = RecordKind::Config {
            settings: *read,
            source: SettingsSource::Kernel,
            process: None,
        };
        emit(out, ts, conn, kind);
    }
}

/// `icsk_probes_out` went back to 0 since the last probe while an episode is open: an answer we
/// did not see, unless it is the 8-bit counter wrapping after 256 probes (a long
/// `TCP_USER_TIMEOUT`). The kernel's idle time counts from the last segment received
/// (`rcv_tstamp`, set by that answer unless later traffic moved it): the answer came then, to the
/// jiffy, and not before the last probe. A last segment older than the last probe means no answer.
/// At the connection's end (its close, a reset received), the answer to the open episode's probes
/// that no timer firing saw yet: the socket's last acknowledgment (`rcv_tstamp`, `times`) came
/// after the last probe. Each probe goes out at least an interval after the last segment received
/// (or it is not sent), so an acknowledgment after it is an answer (`tcp_ack` zeroed the probe
/// count then). A reset does not move `rcv_tstamp`; a FIN acknowledges, and a peer that closes
/// after a probe has answered it. Without this, an answer that came before the answer hook was
/// attached (`on-demand`) or with no hook (`next-firing`) read as a probe unanswered until the end.
fn answer_before_end(out: &mut Vec<Record>, ts: u64, conn: &mut Conn, times: &SockTimes) {
    let Some(ep) = &conn.episode else { return };
    let last_probe = ep.last_probe_ns();
    let acked_at = ts.saturating_sub(times.since_ack_ms.saturating_mul(1_000_000));
    if acked_at.saturating_add(ANSWER_SLACK_NS) < last_probe {
        return;
    }
    answered(out, acked_at.clamp(last_probe, ts), conn, AckPrecision::AtEnd);
}

fn infer_answer(out: &mut Vec<Record>, ts: u64, conn: &mut Conn, t: &TimerFiring) {
    let Some(ep) = &conn.episode else { return };
    let last_probe = ep.last_probe_ns();
    let received_at = ts.saturating_sub(t.idle_ms.saturating_mul(1_000_000));
    if received_at.saturating_add(ANSWER_SLACK_NS) < last_probe {
        return; // the counter wrapped: nothing was received since the probes began
    }
    answered(out, received_at.clamp(last_probe, ts), conn, AckPrecision::NextFiring);
}

/// Probes behind the kernel's 8-bit `icsk_probes_out` that can be lost timer runs: a difference
/// of this or more is not a plausible loss (the counter wrapped, or zero-window probes counted
/// there) and is left alone.
const MAX_UNSEEN_PROBES: u8 = 128;

/// Probes the kernel's counter shows before this run that the episode has not counted: timer
/// runs that sent them reached no record (lost before the agent read them). The episode takes the
/// kernel's count, so later probes carry their true numbers; returns how many it was behind
/// (within [`MAX_UNSEEN_PROBES`]).
fn catch_up_with_kernel(ep: &mut OpenEpisode, probes_before: u8) -> u32 {
    let behind = probes_before.wrapping_sub(ep.probes as u8);
    if behind == 0 || behind >= MAX_UNSEEN_PROBES {
        return 0;
    }
    ep.probes = ep.probes.saturating_add(u32::from(behind));
    // The times are a run of consecutive probes: they start again at the next one.
    ep.probe_ts_ns.clear();
    ep.first_timed_probe = ep.probes + 1;
    u32::from(behind)
}

/// Probes the kernel's counter shows at a run of a connection with no episode open: the episode's
/// first probes, whose runs reached no record, when the engine was following the connection
/// before the first of them can have gone out (the idle time, counted from the last segment
/// received, ended after the connection was first seen). Otherwise they went out before the agent
/// saw the connection (it started mid-episode), and 0 is returned. Within [`MAX_UNSEEN_PROBES`].
fn first_probes_unseen(first_seen_ns: u64, ts: u64, t: &TimerFiring) -> u32 {
    let last_received = ts.saturating_sub(t.idle_ms.saturating_mul(1_000_000));
    let first_probe_earliest = last_received + u64::from(t.settings.effective_idle_s()) * 1_000_000_000;
    let watched = first_seen_ns.saturating_add(ANSWER_SLACK_NS) <= first_probe_earliest;
    if watched && t.probes_before < MAX_UNSEEN_PROBES {
        u32::from(t.probes_before)
    } else {
        0
    }
}

/// What the timer run did: killed the connection, could not probe (data in flight), probed, or
/// only re-armed. Probes the kernel sent that no record reported ([`catch_up_with_kernel`]) come
/// first, as one `unseen_probes` record; returns how many.
fn classify_firing(out: &mut Vec<Record>, ts: u64, conn: &mut Conn, t: &TimerFiring) -> u32 {
    // With data in flight or queued the timer cannot probe, and the counter may be counting
    // zero-window probes: only a run that could probe compares it with the episode.
    let could_probe = t.packets_out == 0 && t.unsent == 0 && t.probes_before > 0;
    let unreported = match conn.episode.as_deref_mut() {
        Some(ep) if could_probe => catch_up_with_kernel(ep, t.probes_before),
        None if could_probe => first_probes_unseen(conn.first_seen_ns, ts, t),
        _ => 0,
    };
    if unreported > 0 {
        let last = conn.episode.as_ref().map_or(unreported, |ep| ep.probes);
        emit(out, ts, conn, RecordKind::UnseenProbes { first: last + 1 - unreported, last });
    }
    if t.state_after == TcpState::Close {
        let reason = if t.settings.user_timeout_ms > 0 {
            TimeoutReason::UserTimeout
        } else {
            TimeoutReason::Keepalive
        };
        let probes = conn.episode.as_ref().map_or(u32::from(t.probes_before), |ep| ep.probes);
        conn.died = true;
        emit(out, ts, conn, RecordKind::Timeout { reason, probes, idle: None });
        end_episode(out, ts, conn, EpisodeOutcome::TimedOut(reason));
    } else if t.packets_out > 0 || t.unsent > 0 {
        let kind = RecordKind::Suppressed {
            packets_out: t.packets_out,
            unsent: t.unsent,
        };
        emit(out, ts, conn, kind);
    } else if t.probes_after == t.probes_before.wrapping_add(1) {
        // A probe went out (the counter is 8 bits: 255 → 0 is a probe too).
        let ep = conn.episode.get_or_insert_with(|| Box::new(OpenEpisode::new(ts, u32::from(t.probes_before))));
        let n = ep.probe(ts);
        emit(out, ts, conn, RecordKind::Probe { n });
    } else {
        let kind = RecordKind::Idle {
            idle_ms: t.idle_ms,
            next_in_ms: t.next_in_ms,
        };
        emit(out, ts, conn, kind);
    }
    unreported
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::timeline::types::DeathCause;

    const A: u64 = 0xffff_8880_0a00_0800;
    const B: u64 = 0xffff_8880_0a00_1000;
    const C: u64 = 0xffff_8880_0a00_1800;
    const D: u64 = 0xffff_8880_0a00_2000;
    const E: u64 = 0xffff_8880_0a00_2800;
    const NETNS: u32 = 4026531840;
    const S: u64 = 1_000_000_000;
    /// What a close event without socket times (the fixtures' default) reads as.
    const ZERO_IDLE: Idle = Idle { idle_ms: 0, since_received_ms: 0, since_sent_ms: 0 };

    fn addrs(port: u16) -> Option<(SocketAddr, SocketAddr)> {
        Some((
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port),
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 8080),
        ))
    }

    fn ev(ts_ns: u64, sk: u64, body: EventBody) -> Event {
        Event {
            ts_ns,
            sk,
            netns: NETNS,
            addrs: addrs(40000),
            in_timer: false,
            body,
        }
    }

    fn in_timer(mut e: Event) -> Event {
        e.in_timer = true;
        e
    }

    fn process(pid: u32, name: &str) -> Process {
        let mut comm = [0u8; 16];
        comm[..name.len()].copy_from_slice(name.as_bytes());
        Process {
            pid,
            tid: pid,
            comm,
            cgroup_id: 1,
        }
    }

    fn defaults() -> SockSettings {
        SockSettings {
            idle_default_s: 7200,
            intvl_default_s: 75,
            cnt_default: 9,
            ..Default::default()
        }
    }

    /// Keep-alive on with idle 1 s, interval 1 s, 3 probes.
    fn ka() -> SockSettings {
        SockSettings {
            keepalive: true,
            idle_s: Some(1),
            intvl_s: Some(1),
            cnt: Some(3),
            ..defaults()
        }
    }

    fn state(ts: u64, sk: u64, old: TcpState, new: TcpState, settings: SockSettings) -> Event {
        ev(
            ts,
            sk,
            EventBody::State {
                old,
                new,
                settings,
                process: None,
                err: 0, times: Default::default(),
            },
        )
    }

    fn established(ts: u64, sk: u64, settings: SockSettings) -> Event {
        state(ts, sk, TcpState::SynSent, TcpState::Established, settings)
    }

    fn close(ts: u64, sk: u64) -> Event {
        state(ts, sk, TcpState::Established, TcpState::Close, ka())
    }

    /// A close whose socket last received an acknowledgment `since_ack_ms` before it.
    fn close_acked(ts: u64, sk: u64, since_ack_ms: u64) -> Event {
        let mut e = close(ts, sk);
        if let EventBody::State { times, .. } = &mut e.body {
            times.since_ack_ms = since_ack_ms;
        }
        e
    }

    /// A reset received by a socket that last received an acknowledgment `since_ack_ms` before it.
    fn reset_acked(ts: u64, sk: u64, since_ack_ms: u64) -> Event {
        let times = SockTimes { since_ack_ms, since_data_ms: since_ack_ms, ..Default::default() };
        ev(ts, sk, EventBody::ResetReceived { state: TcpState::Established, times })
    }

    fn firing(settings: SockSettings, before: u8, after: u8) -> TimerFiring {
        TimerFiring {
            state_before: TcpState::Established,
            state_after: TcpState::Established,
            keepopen: settings.keepalive,
            dead: false,
            owned: false,
            probes_before: before,
            probes_after: after,
            packets_out: 0,
            unsent: 0,
            idle_ms: 1000,
            settings,
            err_after: 0,
            next_in_ms: Some(1000),
        }
    }

    fn timer(ts: u64, sk: u64, t: TimerFiring) -> Event {
        ev(ts, sk, EventBody::Timer(t))
    }

    /// The active reset the keep-alive timer sends when it gives up, seen during the timer run.
    fn keepalive_reset(ts: u64, sk: u64) -> Event {
        in_timer(ev(
            ts,
            sk,
            EventBody::ResetSent {
                active: true,
                reason: Some("tcp_keepalive_timeout".into()),
                state: TcpState::Established,
            },
        ))
    }

    /// An engine following `sk`, whose probes 1 to 3 (at 1, 2 and 3 s) went unanswered.
    fn three_probes_unanswered(sk: u64) -> Engine {
        let mut e = engine();
        feed(&mut e, &[established(0, sk, ka())]);
        feed(&mut e, &[probe(S, sk, 0, 1), probe(2 * S, sk, 1, 2), probe(3 * S, sk, 2, 3)]);
        e
    }

    /// A change to CLOSE with the socket's error already set (`tcp_done_with_error`, 6.10+).
    fn close_with_err(ts: u64, sk: u64, errno: i32) -> Event {
        let mut closed = close(ts, sk);
        if let EventBody::State { err, .. } = &mut closed.body {
            *err = errno;
        }
        closed
    }

    fn probe(ts: u64, sk: u64, before: u8, after: u8) -> Event {
        timer(ts, sk, firing(ka(), before, after))
    }

    fn setsockopt(
        ts: u64,
        sk: u64,
        option: SockOpt,
        value: i32,
        st: TcpState,
        p: Process,
    ) -> Event {
        let mut e = ev(
            ts,
            sk,
            EventBody::Setsockopt {
                option,
                value,
                state: st,
                process: p,
                settings: defaults(),
            },
        );
        if matches!(st, TcpState::Close | TcpState::SynSent) {
            e.addrs = None;
        }
        e
    }

    fn engine() -> Engine {
        Engine::new(EngineConfig {
            max_connections: 16,
        })
    }

    /// Feeds events, returns the records they caused.
    fn feed(e: &mut Engine, events: &[Event]) -> Vec<Record> {
        let mut out = Vec::new();
        for ev in events {
            e.handle(ev, &mut out);
        }
        out
    }

    fn kinds(records: &[Record]) -> Vec<RecordKind> {
        records.iter().map(|r| r.kind.clone()).collect()
    }

    fn names(records: &[Record]) -> Vec<&'static str> {
        records.iter().map(|r| r.kind.name()).collect()
    }

    fn episode(r: &Record) -> &Episode {
        match &r.kind {
            RecordKind::EpisodeEnd(ep) => ep,
            k => panic!("not an episode: {k:?}"),
        }
    }

    /// What every tracked connection costs besides the table's slack (see `table.rs`), and what
    /// a connection with probes out adds: the budget of 256 bytes per connection rests on these.
    #[test]
    fn per_connection_sizes() {
        assert!(std::mem::size_of::<Conn>() <= 144, "Conn is {} bytes", std::mem::size_of::<Conn>());
        assert!(std::mem::size_of::<OpenEpisode>() <= 48, "OpenEpisode is {} bytes", std::mem::size_of::<OpenEpisode>());
    }

    #[test]
    fn healthy_probe_answered_then_close() {
        let mut e = engine();
        let out = feed(&mut e, &[established(S, A, ka())]);
        assert_eq!(
            kinds(&out),
            vec![
                RecordKind::Opened {
                    state: TcpState::Established,
                    established: true
                },
                RecordKind::Config {
                    settings: ka(),
                    source: SettingsSource::Established,
                    process: None
                },
            ]
        );
        let id = out[0].conn.id;
        assert_eq!(out[0].conn.local, addrs(40000).unwrap().0);
        assert_eq!(out[0].conn.first_seen_ns, S);

        let out = feed(
            &mut e,
            &[
                probe(2 * S, A, 0, 1),
                ev(2 * S + 300, A, EventBody::Ack { probes: 1 }),
            ],
        );
        assert_eq!(names(&out), ["probe", "ack", "episode"]);
        assert_eq!(out[0].kind, RecordKind::Probe { n: 1 });
        assert_eq!(
            out[1].kind,
            RecordKind::Ack {
                probes: 1,
                precision: AckPrecision::Segment
            }
        );
        assert_eq!(
            *episode(&out[2]),
            Episode {
                number: 1,
                first_timed_probe: 1,
                start_ns: 2 * S,
                end_ns: 2 * S + 300,
                probes: 1,
                outcome: EpisodeOutcome::Answered(AckPrecision::Segment),
                probe_ts_ns: smallvec::smallvec![2 * S],
            }
        );
        assert!(out
            .iter()
            .all(|r| r.conn.id == id && r.conn.first_seen_ns == S));

        // The next firing sees probes_out 0 and no episode: just idle, no inferred answer.
        let out = feed(&mut e, &[probe(3 * S, A, 0, 0), close(4 * S, A)]);
        assert_eq!(
            kinds(&out),
            vec![
                RecordKind::Idle {
                    idle_ms: 1000,
                    next_in_ms: Some(1000)
                },
                RecordKind::Close {
                    state: TcpState::Established, closed_by: None, idle: Some(ZERO_IDLE),
                },
            ]
        );
        assert_eq!(out[1].ts_ns, 4 * S);
        assert_eq!(e.tracked(), 0);
        let st = e.stats();
        assert_eq!(
            (st.events, st.tracked, st.closed, st.cap_rejected),
            (5, 0, 1, 0)
        );
    }

    /// A connection this host aborts (`ss -K`, `tcp_abort`: an active reset, then ECONNABORTED) dies
    /// of the reset (`reset_sent`); one killed by an error nothing explained (an ICMP
    /// `EHOSTUNREACH`) dies of the error; the records after the death are not deaths again.
    #[test]
    fn abort_and_unexplained_error_are_deaths_once() {
        let mut e = engine();
        feed(&mut e, &[established(0, A, ka()), established(0, B, ka())]);
        let reset = ev(S, A, EventBody::ResetSent { active: true, reason: Some("not_specified".into()), state: TcpState::Established });
        let aborted = ev(S, A, EventBody::Error { errno: libc::ECONNABORTED, state: TcpState::Close });
        let out = feed(&mut e, &[reset, aborted, close(S, A)]);
        let causes: Vec<_> = out.iter().filter_map(|r| r.kind.death_cause()).collect();
        assert_eq!(causes, [DeathCause::ResetSent], "{:?}", names(&out));
        let unreachable = ev(2 * S, B, EventBody::Error { errno: libc::EHOSTUNREACH, state: TcpState::Established });
        let out = feed(&mut e, &[unreachable, close(3 * S, B)]);
        let causes: Vec<_> = out.iter().filter_map(|r| r.kind.death_cause()).collect();
        assert_eq!(causes, [DeathCause::Error], "{:?}", names(&out));
        // A keep-alive death counts once: the timeout, not the reset and error that follow it.
        feed(&mut e, &[established(4 * S, C, ka())]);
        let death = TimerFiring { state_after: TcpState::Close, ..firing(ka(), 3, 3) };
        let out = feed(&mut e, &[
            in_timer(ev(5 * S, C, EventBody::ResetSent { active: true, reason: Some("tcp_keepalive_timeout".into()), state: TcpState::Established })),
            timer(5 * S, C, death),
        ]);
        let out = [out, feed(&mut e, &[ev(5 * S, C, EventBody::Error { errno: libc::ETIMEDOUT, state: TcpState::Close }), close(5 * S, C)])].concat();
        let causes: Vec<_> = out.iter().filter_map(|r| r.kind.death_cause()).collect();
        assert_eq!(causes, [DeathCause::KeepaliveTimeout], "{:?}", names(&out));
    }

    /// The owner learns of the keep-alive death inside the timer run (its `recv` wakes with
    /// ETIMEDOUT) and closes the socket on another CPU: that destruction can reach the ring buffer
    /// before the run's timer event, which its program sends only after the run returned. It is
    /// held with the run's events, and the death is still the keep-alive timeout, reported once,
    /// with no connection opened again by the late timer event.
    #[test]
    fn owner_close_before_the_killing_runs_timer_event() {
        let mut e = three_probes_unanswered(A);
        let t4 = 4 * S;
        let death = TimerFiring { state_after: TcpState::Close, err_after: 110, ..firing(ka(), 3, 3) };
        // Linux 6.10+ order: the close carries the error, reported after it.
        let held = [
            keepalive_reset(t4 + 10, A),
            in_timer(close_with_err(t4 + 20, A, 110)),
            in_timer(ev(t4 + 30, A, EventBody::Error { errno: 110, state: TcpState::Close })),
        ];
        assert!(feed(&mut e, &held).is_empty());
        let destroyed = ev(t4 + 5_000, A, EventBody::Destroy);
        assert!(feed(&mut e, &[destroyed]).is_empty(), "held with the run's events until its timer event");
        let out = feed(&mut e, &[timer(t4, A, death)]);
        assert_eq!(names(&out), ["timeout", "episode", "reset", "error", "close"]);
        let causes: Vec<_> = out.iter().filter_map(|r| r.kind.death_cause()).collect();
        assert_eq!(causes, [DeathCause::KeepaliveTimeout]);
        assert_eq!((e.tracked(), e.held.len()), (0, 0));

        // A timer event that never comes: the run's events and the destruction still come out, in
        // order, once they are stale.
        feed(&mut e, &[established(10 * S, B, ka()), probe(11 * S, B, 0, 1)]);
        assert!(feed(&mut e, &[keepalive_reset(12 * S, B), ev(12 * S + 5_000, B, EventBody::Destroy)]).is_empty());
        let mut out = Vec::new();
        e.release_stale_held(14 * S, S, &mut out);
        assert_eq!(names(&out), ["reset", "episode", "untracked"]);
        assert_eq!(e.tracked(), 0);
    }

    /// Holding events behind a timer run is bounded (per socket, and in sockets by the connection
    /// cap); an event past a bound is handled at once, out of order, and counted.
    #[test]
    fn holding_past_its_bounds_is_counted() {
        let mut e = Engine::new(EngineConfig { max_connections: 1 });
        feed(&mut e, &[established(0, A, ka())]);
        let errors: Vec<Event> = (0..MAX_HELD_PER_SOCKET as u64 + 1)
            .map(|i| in_timer(ev(S + i, A, EventBody::Error { errno: 104, state: TcpState::Established })))
            .collect();
        let out = feed(&mut e, &errors);
        assert_eq!((names(&out), e.stats().unordered), (vec!["error"], 1), "the 65th of one run");
        // One overtaking them: the held ones are replayed, then it.
        let behind = ev(S + 1_000, A, EventBody::Error { errno: 32, state: TcpState::Established });
        let n = MAX_HELD_PER_SOCKET + 1;
        assert_eq!((feed(&mut e, &[behind]).len(), e.stats().unordered), (n, 2));
        assert!(e.held.is_empty());

        // A second socket holding events would pass the cap of one.
        assert!(feed(&mut e, &[in_timer(ev(2 * S, A, EventBody::Error { errno: 104, state: TcpState::Established }))]).is_empty());
        feed(&mut e, &[keepalive_reset(2 * S, B)]);
        assert_eq!((e.held.len(), e.stats().unordered), (1, 3));
    }

    /// Notes about sockets not tracked (an option set before `connect()`) whose destruction was
    /// missed do not fill the table for good: once full, notes older than ten minutes are
    /// forgotten to make room; recent ones are kept.
    #[test]
    fn old_notes_of_sockets_not_tracked_make_room() {
        let mut e = Engine::new(EngineConfig { max_connections: 2 });
        let p = process(1, "p");
        let note = |ts, sk| setsockopt(ts, sk, SockOpt::KeepAlive, 1, TcpState::Close, p);
        feed(&mut e, &[note(S, 0x10), note(500 * S, 0x20), note(501 * S, 0x30)]);
        assert_eq!((e.pending.len(), e.stats().cap_rejected, e.stats().pending_expired), (2, 1, 0));
        feed(&mut e, &[note(602 * S, 0x40)]);
        assert!(e.pending.contains_key(&0x20) && e.pending.contains_key(&0x40));
        assert_eq!((e.pending.len(), e.stats().cap_rejected, e.stats().pending_expired), (2, 1, 1));
    }

    /// A connection the walk found gone while events of its last timer run were held: they are
    /// replayed before its `untracked` record, so that its end keeps its cause.
    #[test]
    fn reconcile_replays_what_was_held() {
        let mut e = three_probes_unanswered(A);
        assert!(feed(&mut e, &[keepalive_reset(4 * S, A)]).is_empty());
        let mut out = Vec::new();
        e.reconcile(5 * S, |_| false, &mut out);
        assert_eq!(names(&out), ["reset", "episode", "untracked"]);
        assert!(e.held.is_empty());
    }

    /// Linux 6.10+ (`tcp_done_with_error`): the connection is closed with `sk_err` already set and
    /// the error is reported only after the close. The error is reported once, before the close.
    #[test]
    fn error_set_before_close_is_reported_once_before_the_close() {
        let mut e = three_probes_unanswered(A);
        let t4 = 4 * S;
        let reset = keepalive_reset(t4 + 10, A);
        let closed = in_timer(close_with_err(t4 + 20, A, 110));
        let late_error = in_timer(ev(
            t4 + 30,
            A,
            EventBody::Error { errno: 110, state: TcpState::Close },
        ));
        let death = TimerFiring {
            state_after: TcpState::Close,
            err_after: 110,
            ..firing(ka(), 3, 3)
        };
        let out = feed(&mut e, &[reset, closed, late_error, timer(t4, A, death)]);
        assert_eq!(names(&out), ["timeout", "episode", "reset", "error", "close"]);
        assert_eq!(out[3].kind, RecordKind::Error { errno: 110, death: false });
        assert_eq!(e.tracked(), 0);

        // An error reported before the close (older kernels) is not repeated by the close.
        feed(&mut e, &[established(10 * S, B, ka())]);
        let closed = close_with_err(10 * S + 20, B, 104);
        let out = feed(
            &mut e,
            &[ev(10 * S + 10, B, EventBody::Error { errno: 104, state: TcpState::Established }), closed],
        );
        assert_eq!(names(&out), ["error", "close"]);
    }

    /// The start-up snapshot is taken after the programs are attached: a connection established in
    /// between is in the snapshot and its (older) ESTABLISHED event is still in the ring buffer.
    #[test]
    fn events_older_than_the_snapshot_do_not_reopen_the_connection() {
        let mut e = engine();
        let snap = ev(
            10 * S,
            A,
            EventBody::Snapshot {
                state: TcpState::Established,
                settings: ka(),
                probes_out: 0,
                packets_out: 0,
                unsent: 0,
            },
        );
        let out = feed(&mut e, &[snap]);
        assert_eq!(names(&out), ["open", "config"]);
        let out = feed(&mut e, &[established(9 * S, A, ka())]);
        assert!(out.is_empty(), "{out:?}");
        assert_eq!(e.tracked(), 1);
        let out = feed(&mut e, &[probe(11 * S, A, 0, 1)]);
        assert_eq!(out[0].conn.id, 1);
        // A later ESTABLISHED on the same socket is a new connection (the close was missed): the
        // old one's episode and the old one end first.
        let out = feed(&mut e, &[established(20 * S, A, ka())]);
        assert_eq!(names(&out), ["episode", "untracked", "open", "config"]);
        assert_eq!(episode(&out[0]).outcome, EpisodeOutcome::Incomplete);
        assert_eq!(out[1].kind, RecordKind::Untracked { reason: UntrackReason::Reused, state: TcpState::Established });
        assert_eq!((out[1].conn.id, out[2].conn.id), (1, 2));
    }

    /// The timer record of a killing run is lost: the held reset and close come out after a while
    /// instead of waiting for the socket's destruction.
    #[test]
    fn held_events_are_released_when_their_timer_record_never_comes() {
        let mut e = engine();
        feed(&mut e, &[established(0, A, ka())]);
        let reset = keepalive_reset(S, A);
        let out = feed(&mut e, &[reset, in_timer(close(S + 10, A))]);
        assert!(out.is_empty());
        let mut out = Vec::new();
        e.release_stale_held(S + S / 2, S, &mut out);
        assert!(out.is_empty(), "released too early: {out:?}");
        e.release_stale_held(2 * S + 1, S, &mut out);
        assert_eq!(names(&out), ["reset", "close"]);
        assert_eq!(e.tracked(), 0);
    }

    #[test]
    fn a_probe_only_the_kernel_counted_is_counted_and_later_probes_keep_their_numbers() {
        let mut e = engine();
        feed(&mut e, &[established(0, A, ka())]);
        // The run that sent probe 2 reached no record: the next one finds the counter at 2.
        let out = feed(&mut e, &[probe(S, A, 0, 1), probe(3 * S, A, 2, 3)]);
        let unseen = RecordKind::UnseenProbes { first: 2, last: 2 };
        assert_eq!(kinds(&out), vec![RecordKind::Probe { n: 1 }, unseen, RecordKind::Probe { n: 3 }]);
        assert_eq!(out.iter().map(|r| r.kind.probes_reported()).sum::<u32>(), 3);
        assert_eq!(e.stats().unreported_probes, 1);
        let death = TimerFiring { state_after: TcpState::Close, err_after: 110, ..firing(ka(), 3, 3) };
        let out = feed(&mut e, &[timer(4 * S, A, death)]);
        assert!(matches!(out[0].kind, RecordKind::Timeout { probes: 3, .. }), "{out:?}");
        let ep = episode(&out[1]);
        assert_eq!((ep.probes, ep.first_timed_probe, ep.probe_ts_ns.to_vec()), (3, 3, vec![3 * S]));
        // The last probe's run lost: the killing run reports it before the timeout.
        let mut e = engine();
        feed(&mut e, &[established(0, C, ka())]);
        feed(&mut e, &[probe(S, C, 0, 1), probe(2 * S, C, 1, 2)]);
        let death = TimerFiring { state_after: TcpState::Close, err_after: 110, ..firing(ka(), 3, 3) };
        let out = feed(&mut e, &[timer(4 * S, C, death)]);
        assert_eq!(out[0].kind, RecordKind::UnseenProbes { first: 3, last: 3 });
        assert!(matches!(out[1].kind, RecordKind::Timeout { probes: 3, .. }), "{out:?}");
        // The episode's first probe lost: its second run finds the counter at 1 and no episode.
        let mut e = engine();
        feed(&mut e, &[established(0, A, ka())]);
        // Idle 2 s at the second run: the last segment came at 1 s, the first probe at 2 s.
        let second = TimerFiring { idle_ms: 2000, ..firing(ka(), 1, 2) };
        let out = feed(&mut e, &[timer(3 * S, A, second)]);
        let expected = [RecordKind::UnseenProbes { first: 1, last: 1 }, RecordKind::Probe { n: 2 }];
        assert_eq!(kinds(&out), expected);
        assert_eq!(e.stats().unreported_probes, 1);
        // A connection first seen with probes already out (the agent started mid-episode): they
        // went out before it was followed, nothing was lost.
        let mut e = engine();
        feed(&mut e, &[established(5 * S / 2, B, ka())]);
        let out = feed(&mut e, &[timer(3 * S, B, second)]);
        assert_eq!(kinds(&out), [RecordKind::Probe { n: 2 }]);
        assert_eq!(e.stats().unreported_probes, 0);
        // A counter far ahead (wrapped, or zero-window probes) is not taken for losses.
        let mut e = engine();
        feed(&mut e, &[established(0, B, ka())]);
        feed(&mut e, &[probe(S, B, 0, 1), probe(2 * S, B, 200, 201)]);
        assert_eq!(e.stats().unreported_probes, 0);
    }

    #[test]
    fn dead_peer_timeout_reset_error_close_in_order() {
        let mut e = engine();
        feed(&mut e, &[established(0, A, ka())]);
        let mut out = feed(&mut e, &[probe(S, A, 0, 1)]);
        // One probe out: an answer may still come.
        assert_eq!((e.awaiting_answer(), e.unanswered_probes()), (1, 0));
        out.extend(feed(&mut e, &[probe(2 * S, A, 1, 2), probe(3 * S, A, 2, 3)]));
        // The kernel probed again: the first went unanswered for a whole interval.
        assert_eq!((e.awaiting_answer(), e.unanswered_probes()), (1, 1));
        assert_eq!(
            kinds(&out),
            vec![
                RecordKind::Probe { n: 1 },
                RecordKind::Probe { n: 2 },
                RecordKind::Probe { n: 3 }
            ]
        );

        // The fourth run kills the connection. Its reset, error and close are seen during the run,
        // the timer event itself at the run's exit.
        let t4 = 4 * S;
        let reset = keepalive_reset(t4 + 10, A);
        let error = in_timer(ev(
            t4 + 20,
            A,
            EventBody::Error {
                errno: 110,
                state: TcpState::Established,
            },
        ));
        let closed = in_timer(close(t4 + 30, A));
        let out = feed(&mut e, &[reset, error, closed]);
        assert!(out.is_empty(), "held back until the timer event: {out:?}");
        assert_eq!(e.tracked(), 1);

        let death = TimerFiring {
            state_after: TcpState::Close,
            err_after: 110,
            ..firing(ka(), 3, 3)
        };
        let out = feed(
            &mut e,
            &[timer(t4, A, death), ev(t4 + 100, A, EventBody::Destroy)],
        );
        assert_eq!(
            names(&out),
            ["timeout", "episode", "reset", "error", "close"]
        );
        assert_eq!(e.unanswered_probes(), 0);
        assert_eq!(
            out[0].kind,
            RecordKind::Timeout {
                reason: TimeoutReason::Keepalive,
                probes: 3, idle: None,
            }
        );
        assert_eq!(
            *episode(&out[1]),
            Episode {
                number: 1,
                first_timed_probe: 1,
                start_ns: S,
                end_ns: t4,
                probes: 3,
                outcome: EpisodeOutcome::TimedOut(TimeoutReason::Keepalive),
                probe_ts_ns: smallvec::smallvec![S, 2 * S, 3 * S],
            }
        );
        assert_eq!(
            out[2].kind,
            RecordKind::Reset {
                reason: "tcp_keepalive_timeout".into(),
                active: true,
                death: false,
            }
        );
        assert_eq!(out[3].kind, RecordKind::Error { errno: 110, death: false });
        assert_eq!(
            out[4].kind,
            RecordKind::Close {
                state: TcpState::Established, closed_by: None, idle: Some(ZERO_IDLE),
            }
        );
        assert_eq!(
            out.iter().map(|r| r.ts_ns).collect::<Vec<_>>(),
            [t4, t4, t4 + 10, t4 + 20, t4 + 30]
        );
        assert_eq!(e.tracked(), 0);
        assert!(e.held.is_empty());
        assert_eq!(e.stats().closed, 1);
    }

    #[test]
    fn user_timeout() {
        let mut e = engine();
        let uto = SockSettings {
            user_timeout_ms: 1500,
            ..ka()
        };
        let out = feed(&mut e, &[established(0, A, uto)]);
        assert_eq!(names(&out), ["open", "config"]);
        let death = TimerFiring {
            state_after: TcpState::Close,
            ..firing(uto, 1, 1)
        };
        let out = feed(
            &mut e,
            &[timer(S, A, firing(uto, 0, 1)), timer(2 * S, A, death)],
        );
        assert_eq!(names(&out), ["probe", "timeout", "episode"]);
        assert_eq!(
            out[1].kind,
            RecordKind::Timeout {
                reason: TimeoutReason::UserTimeout,
                probes: 1, idle: None,
            }
        );
        assert_eq!(
            episode(&out[2]).outcome,
            EpisodeOutcome::TimedOut(TimeoutReason::UserTimeout)
        );

        // TCP_USER_TIMEOUT alone (keep-alive off) is enough to track the connection.
        let only_uto = SockSettings {
            user_timeout_ms: 1500,
            ..defaults()
        };
        let out = feed(&mut e, &[established(3 * S, B, only_uto)]);
        assert_eq!(names(&out), ["open", "config"]);
    }

    #[test]
    fn suppressed_while_data_in_flight_or_queued() {
        let mut e = engine();
        feed(&mut e, &[established(0, A, ka())]);
        let out = feed(
            &mut e,
            &[
                timer(
                    S,
                    A,
                    TimerFiring {
                        packets_out: 2,
                        ..firing(ka(), 0, 0)
                    },
                ),
                timer(
                    2 * S,
                    A,
                    TimerFiring {
                        unsent: 100,
                        ..firing(ka(), 0, 0)
                    },
                ),
            ],
        );
        assert_eq!(
            kinds(&out),
            vec![
                RecordKind::Suppressed {
                    packets_out: 2,
                    unsent: 0
                },
                RecordKind::Suppressed {
                    packets_out: 0,
                    unsent: 100
                },
            ]
        );
    }

    #[test]
    fn idle_busy_and_orphan_fin_wait2() {
        let mut e = engine();
        feed(&mut e, &[established(0, A, ka())]);
        let idle = TimerFiring {
            idle_ms: 400,
            next_in_ms: Some(600),
            ..firing(ka(), 0, 0)
        };
        let busy = TimerFiring {
            owned: true,
            next_in_ms: Some(50),
            ..firing(ka(), 0, 0)
        };
        let orphan = TimerFiring {
            state_before: TcpState::FinWait2,
            state_after: TcpState::FinWait2,
            dead: true,
            ..firing(ka(), 0, 0)
        };
        let out = feed(
            &mut e,
            &[
                timer(S, A, idle),
                timer(2 * S, A, busy),
                timer(3 * S, A, orphan),
            ],
        );
        assert_eq!(
            kinds(&out),
            vec![
                RecordKind::Idle {
                    idle_ms: 400,
                    next_in_ms: Some(600)
                },
                RecordKind::Busy,
                RecordKind::FinWait2,
            ]
        );
        // A timer run on a socket whose keep-alive is off does nothing.
        let off = SockSettings {
            keepalive: false,
            ..ka()
        };
        let out = feed(&mut e, &[timer(4 * S, A, firing(off, 0, 0))]);
        assert_eq!(
            names(&out),
            ["config"],
            "only the settings change is reported"
        );
    }

    #[test]
    fn answer_inferred_at_next_firing() {
        let mut e = engine();
        feed(&mut e, &[established(0, A, ka())]);
        let out = feed(
            &mut e,
            &[
                probe(S, A, 0, 1),
                probe(2 * S, A, 1, 2),
                probe(3 * S, A, 0, 0),
            ],
        );
        assert_eq!(names(&out), ["probe", "probe", "ack", "episode", "idle"]);
        assert_eq!(
            out[2].kind,
            RecordKind::Ack {
                probes: 2,
                precision: AckPrecision::NextFiring
            }
        );
        // The answer is dated from the idle time at that firing (1 s: at 2 s), not the firing.
        assert_eq!(out[2].ts_ns, 2 * S);
        let ep = episode(&out[3]);
        assert_eq!((ep.start_ns, ep.end_ns, ep.probes), (S, 2 * S, 2));
        assert_eq!(ep.outcome, EpisodeOutcome::Answered(AckPrecision::NextFiring));

        // Answered, and already idle long enough for a new episode in the same run.
        let out = feed(&mut e, &[probe(4 * S, A, 0, 1), probe(5 * S, A, 0, 1)]);
        assert_eq!(names(&out), ["probe", "ack", "episode", "probe"]);
        assert_eq!(episode(&out[2]).probe_ts_ns.to_vec(), vec![4 * S]);
        // Idle 1 s at 5 s would date the answer at 4 s: never before the probe it answers.
        assert_eq!(out[1].ts_ns, 4 * S);
        assert_eq!(e.conns.get(&A).unwrap().episode.as_ref().unwrap().start_ns, 5 * S);
        assert_eq!(e.awaiting_answer(), 1);
        // One probe out, its answer not known yet: waiting, not unanswered.
        assert_eq!(e.unanswered_probes(), 0);
        let mut late = firing(ka(), 0, 0);
        late.idle_ms = 1_010; // a little longer than since the probe (jiffy rounding): clamped
        let out = feed(&mut e, &[probe(6 * S, A, 0, 1), timer(7 * S, A, late)]);
        assert_eq!(names(&out), ["ack", "episode", "probe", "ack", "episode", "idle"]);
        assert_eq!(out[3].ts_ns, 6 * S);
        assert_eq!(e.awaiting_answer(), 0);
    }

    /// A Go client in a fresh network namespace: `SO_KEEPALIVE`, `TCP_KEEPINTVL` and
    /// `TCP_KEEPIDLE` on the connected socket, the count left at the namespace's default. No other
    /// event from that namespace came before: the sysctls travel with the setsockopt event.
    #[test]
    fn defaults_of_a_fresh_namespace_come_with_the_option() {
        let mut e = engine();
        let go = process(7, "client");
        let mut ns = SockSettings { idle_default_s: 600, intvl_default_s: 30, cnt_default: 4, ..Default::default() };
        let opt = |ts, o, v, read: SockSettings| {
            let mut ev = setsockopt(ts, A, o, v, TcpState::Established, go);
            if let EventBody::Setsockopt { settings, .. } = &mut ev.body {
                *settings = read;
            }
            ev
        };
        let first = opt(S, SockOpt::KeepAlive, 1, ns);
        ns.keepalive = true;
        let second = opt(S + 1, SockOpt::KeepIntvl, 15, ns);
        ns.intvl_s = Some(15);
        let third = opt(S + 2, SockOpt::KeepIdle, 15, ns);
        let out = feed(&mut e, &[first, second, third]);
        assert_eq!(names(&out), ["open", "config", "config", "config"]);
        let RecordKind::Config { settings, .. } = &out[3].kind else { panic!() };
        assert_eq!(
            (settings.effective_idle_s(), settings.effective_intvl_s(), settings.effective_cnt()),
            (15, 15, 4)
        );
        assert_eq!(settings.defaults(), ["cnt"]);
    }

    /// Keep-alive switched off before the close: the kernel side no longer reports the socket, so
    /// the engine stops following it there, with a record, and holds nothing.
    #[test]
    fn keepalive_switched_off_ends_following() {
        let mut e = engine();
        let p = process(3, "app");
        let plain = SockSettings { keepalive: true, ..defaults() };
        feed(&mut e, &[established(0, A, plain), timer(S, A, firing(plain, 0, 1))]);
        let mut off = setsockopt(2 * S, A, SockOpt::KeepAlive, 0, TcpState::Established, p);
        if let EventBody::Setsockopt { settings, .. } = &mut off.body {
            *settings = plain;
        }
        let out = feed(&mut e, &[off]);
        assert_eq!(names(&out), ["config", "episode", "untracked"]);
        assert_eq!(episode(&out[1]).outcome, EpisodeOutcome::Incomplete);
        assert_eq!(out[2].kind, RecordKind::Untracked { reason: UntrackReason::KeepaliveOff, state: TcpState::Established });
        assert_eq!((e.tracked(), e.pending.len(), e.held.len()), (0, 0, 0));
        // With TCP_KEEPIDLE set on the socket the kernel side still reports it: still followed.
        feed(&mut e, &[established(3 * S, B, ka())]);
        let mut off = setsockopt(4 * S, B, SockOpt::KeepAlive, 0, TcpState::Established, p);
        if let EventBody::Setsockopt { settings, .. } = &mut off.body {
            *settings = ka();
        }
        assert_eq!(names(&feed(&mut e, &[off])), ["config"]);
        assert_eq!(e.tracked(), 1);
        // SO_KEEPALIVE=0 on a socket never followed opens nothing.
        let off = setsockopt(5 * S, C, SockOpt::KeepAlive, 0, TcpState::Established, p);
        assert!(feed(&mut e, &[off]).is_empty());
    }

    /// A walk of the kernel's sockets ends the connections it no longer finds (close and destroy
    /// both missed), but not those first seen after the walk began.
    #[test]
    fn reconcile_ends_connections_the_walk_does_not_find() {
        let mut e = engine();
        feed(&mut e, &[established(0, A, ka()), established(S, B, ka()), established(5 * S, C, ka())]);
        let mut out = Vec::new();
        e.reconcile(4 * S, |c| c.sk == B, &mut out);
        assert_eq!(kinds(&out), [RecordKind::Untracked { reason: UntrackReason::Gone, state: TcpState::Established }]);
        assert_eq!((out[0].conn.sk, out[0].ts_ns), (A, 4 * S));
        assert_eq!(e.tracked(), 2);
    }

    /// At shutdown every connection ends: its episode `incomplete` with the probes seen (and those
    /// counted by the snapshot), then `untracked` with reason `shutdown`.
    #[test]
    fn shutdown_ends_every_connection_and_episode() {
        let mut e = engine();
        let snap = ev(
            S,
            B,
            EventBody::Snapshot { state: TcpState::Established, settings: ka(), probes_out: 2, packets_out: 0, unsent: 0 },
        );
        feed(&mut e, &[established(0, A, ka()), probe(S, A, 0, 1), snap]);
        let mut out = Vec::new();
        e.shutdown(9 * S, &mut out);
        assert_eq!(names(&out), ["episode", "untracked", "episode", "untracked"]);
        let (a, b) = (episode(&out[0]), episode(&out[2]));
        assert_eq!((a.outcome, a.probes, a.end_ns), (EpisodeOutcome::Incomplete, 1, 9 * S));
        assert_eq!((b.probes, b.probe_ts_ns.len()), (2, 0));
        assert!(out.iter().filter(|r| r.kind.is_last()).all(|r| matches!(r.kind, RecordKind::Untracked { reason: UntrackReason::Shutdown, .. })));
        assert_eq!(e.tracked(), 0);
        assert_eq!(e.stats().untracked, 2);
    }

    /// `icsk_probes_out` is 8 bits: under a long `TCP_USER_TIMEOUT` the 256th probe wraps it to 0.
    /// Nothing was received since the probes began (the idle time says so): not an answer, and
    /// the probes keep counting.
    #[test]
    fn probe_counter_wrap_is_not_an_answer() {
        let mut e = engine();
        let mut ut = ka();
        ut.user_timeout_ms = 600_000;
        feed(&mut e, &[established(0, A, ut)]);
        let mut events = Vec::new();
        for i in 0..256u32 {
            let mut f = firing(ut, i as u8, (i as u8).wrapping_add(1));
            f.idle_ms = u64::from(i) * 1000 + 1000;
            events.push(timer(S + u64::from(i) * S, A, f));
        }
        let out = feed(&mut e, &events);
        assert!(out.iter().all(|r| matches!(r.kind, RecordKind::Probe { .. })), "{:?}", names(&out));
        assert_eq!(out.last().unwrap().kind, RecordKind::Probe { n: 256 });
        // The counter now reads 0 and the last segment received is 257 s old.
        let mut f = firing(ut, 0, 1);
        f.idle_ms = 257_000;
        let out = feed(&mut e, &[timer(257 * S, A, f)]);
        assert_eq!(kinds(&out), [RecordKind::Probe { n: 257 }]);
        let ep = e.conns.get(&A).unwrap().episode.as_ref().unwrap();
        assert_eq!((ep.probes, ep.probe_ts_ns.len()), (257, MAX_PROBE_TIMES));
        // The timeout reports every probe, and the episode keeps the first probe times only.
        let death = TimerFiring { state_after: TcpState::Close, ..firing(ut, 1, 1) };
        let out = feed(&mut e, &[timer(258 * S, A, death)]);
        assert_eq!(out[0].kind, RecordKind::Timeout { reason: TimeoutReason::UserTimeout, probes: 257, idle: None });
        let ep = episode(&out[1]);
        assert_eq!((ep.probes, ep.probe_ts_ns.len(), ep.probe_ts_ns[0]), (257, MAX_PROBE_TIMES, S));
    }

    /// `icsk_probes_out` also counts zero-window probes: a segment answering those is no keep-alive
    /// answer, and a snapshot of a socket probing a zero window has no keep-alive episode.
    #[test]
    fn zero_window_probes_are_not_keepalive() {
        let mut e = engine();
        feed(&mut e, &[established(0, A, ka())]);
        // Data queued behind a zero window: the keep-alive timer is suppressed, an answer comes.
        let mut f = firing(ka(), 3, 3);
        f.unsent = 1000;
        let out = feed(&mut e, &[timer(S, A, f), ev(2 * S, A, EventBody::Ack { probes: 3 })]);
        assert_eq!(names(&out), ["suppressed"]);
        let snap = ev(
            3 * S,
            B,
            EventBody::Snapshot { state: TcpState::Established, settings: ka(), probes_out: 4, packets_out: 0, unsent: 512 },
        );
        let out = feed(&mut e, &[snap, ev(4 * S, B, EventBody::Ack { probes: 4 })]);
        assert_eq!(names(&out), ["open", "config"]);
        assert_eq!(e.awaiting_answer(), 0);
    }

    #[test]
    fn setsockopt_before_connect_reported_at_established() {
        let mut e = engine();
        let curl = process(4242, "curl");
        let out = feed(
            &mut e,
            &[
                setsockopt(S, A, SockOpt::KeepAlive, 1, TcpState::Close, curl),
                setsockopt(S + 1, A, SockOpt::KeepIdle, 30, TcpState::Close, curl),
                ev(
                    S + 2,
                    A,
                    EventBody::State {
                        old: TcpState::Close,
                        new: TcpState::SynSent,
                        settings: defaults(),
                        process: Some(curl),
                        err: 0, times: Default::default(),
                    },
                ),
            ],
        );
        assert!(out.is_empty(), "{out:?}");
        assert_eq!(e.tracked(), 0);

        let read = SockSettings {
            keepalive: true,
            idle_s: Some(30),
            ..defaults()
        };
        let out = feed(&mut e, &[established(S + 3, A, read)]);
        assert_eq!(
            kinds(&out),
            vec![
                RecordKind::Opened {
                    state: TcpState::Established,
                    established: true
                },
                RecordKind::Config {
                    settings: read,
                    source: SettingsSource::Setsockopt(SockOpt::KeepIdle),
                    process: Some(curl),
                },
            ]
        );
        assert!(out.iter().all(|r| r.conn.process == Some(curl)));
        assert!(e.pending.is_empty());

        // The first timer run agrees with what was read: no kernel-side change reported.
        let out = feed(&mut e, &[timer(40 * S, A, firing(read, 0, 0))]);
        assert_eq!(names(&out), ["idle"]);
    }

    #[test]
    fn setsockopt_on_connected_socket() {
        let mut e = engine();
        let app = process(7, "app");
        // A connection without keep-alive: ignored, but its namespace's defaults are learned.
        assert!(feed(&mut e, &[established(0, A, defaults())]).is_empty());
        let out = feed(
            &mut e,
            &[setsockopt(
                S,
                A,
                SockOpt::KeepAlive,
                1,
                TcpState::Established,
                app,
            )],
        );
        let set = SockSettings {
            keepalive: true,
            ..defaults()
        };
        assert_eq!(
            kinds(&out),
            vec![
                RecordKind::Opened {
                    state: TcpState::Established,
                    established: true
                },
                RecordKind::Config {
                    settings: set,
                    source: SettingsSource::Setsockopt(SockOpt::KeepAlive),
                    process: Some(app),
                },
            ]
        );
        let out = feed(
            &mut e,
            &[
                setsockopt(2 * S, A, SockOpt::KeepCnt, 5, TcpState::Established, app),
                setsockopt(
                    2 * S,
                    A,
                    SockOpt::UserTimeout,
                    9000,
                    TcpState::Established,
                    app,
                ),
                // Rejected by the kernel (EINVAL): nothing changes, nothing reported.
                setsockopt(2 * S, A, SockOpt::KeepIdle, 0, TcpState::Established, app),
            ],
        );
        let set = SockSettings {
            cnt: Some(5),
            user_timeout_ms: 9000,
            ..set
        };
        assert_eq!(names(&out), ["config", "config"]);
        assert_eq!(
            out[1].kind,
            RecordKind::Config {
                settings: set,
                source: SettingsSource::Setsockopt(SockOpt::UserTimeout),
                process: Some(app),
            }
        );
        // The kernel agrees at the timer: nothing to report but the firing.
        let out = feed(&mut e, &[timer(3 * S, A, firing(set, 0, 0))]);
        assert_eq!(names(&out), ["idle"]);

        // Listeners are not tracked.
        let mut l = setsockopt(4 * S, B, SockOpt::KeepAlive, 1, TcpState::Listen, app);
        l.addrs = Some((
            addrs(80).unwrap().0,
            SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0),
        ));
        assert!(feed(&mut e, &[l]).is_empty());
        assert_eq!(e.tracked(), 1);
    }

    #[test]
    fn settings_changed_by_the_kernel() {
        let mut e = engine();
        feed(&mut e, &[established(0, A, ka())]);
        let changed = SockSettings {
            idle_s: Some(10),
            ..ka()
        };
        let out = feed(
            &mut e,
            &[
                timer(S, A, firing(changed, 0, 0)),
                timer(2 * S, A, firing(changed, 0, 0)),
            ],
        );
        assert_eq!(names(&out), ["config", "idle", "idle"]);
        assert_eq!(
            out[0].kind,
            RecordKind::Config {
                settings: changed,
                source: SettingsSource::Kernel,
                process: None
            }
        );
        // Same effective values, written differently (explicit value equal to the default): no change.
        let explicit = SockSettings {
            cnt: Some(9),
            ..defaults()
        };
        let implicit = SockSettings {
            cnt: None,
            ..defaults()
        };
        assert!(same_effective(&explicit, &implicit));
    }

    #[test]
    fn timer_on_untracked_keepalive_socket_starts_tracking() {
        let mut e = engine();
        let out = feed(
            &mut e,
            &[timer(
                S,
                A,
                firing(
                    SockSettings {
                        keepalive: true,
                        ..defaults()
                    },
                    0,
                    1,
                ),
            )],
        );
        assert_eq!(
            names(&out),
            ["open", "config", "probe"],
            "seen first at a timer run (e.g. bpf_setsockopt)"
        );
        assert!(matches!(
            out[1].kind,
            RecordKind::Config {
                source: SettingsSource::Default,
                ..
            }
        ));
        // Without keep-alive, or on a listener, a timer run is not a reason to track.
        let listener = TimerFiring {
            state_before: TcpState::Listen,
            ..firing(ka(), 0, 0)
        };
        let off = firing(defaults(), 0, 0);
        assert!(feed(&mut e, &[timer(S, B, listener), timer(S, C, off)]).is_empty());
        assert_eq!(e.tracked(), 1);
    }

    #[test]
    fn snapshot_with_probes_out() {
        let mut e = engine();
        let snap = |sk, st, settings, probes_out| {
            ev(
                S,
                sk,
                EventBody::Snapshot {
                    state: st,
                    settings,
                    probes_out,
                    packets_out: 0,
                    unsent: 0,
                },
            )
        };
        let out = feed(&mut e, &[snap(A, TcpState::Established, ka(), 2)]);
        assert_eq!(
            kinds(&out),
            vec![
                RecordKind::Opened {
                    state: TcpState::Established,
                    established: true
                },
                RecordKind::Config {
                    settings: ka(),
                    source: SettingsSource::Snapshot,
                    process: None
                },
            ]
        );
        let death = TimerFiring {
            state_after: TcpState::Close,
            ..firing(ka(), 3, 3)
        };
        let out = feed(&mut e, &[probe(2 * S, A, 2, 3), timer(3 * S, A, death)]);
        assert_eq!(names(&out), ["probe", "timeout", "episode"]);
        assert_eq!(
            *episode(&out[2]),
            Episode {
                number: 1,
                // Probes 1 and 2 went out before the snapshot: counted, not timed.
                first_timed_probe: 3,
                start_ns: S,
                end_ns: 3 * S,
                probes: 3,
                outcome: EpisodeOutcome::TimedOut(TimeoutReason::Keepalive),
                probe_ts_ns: smallvec::smallvec![2 * S],
            }
        );
        // Not tracked: no keep-alive, listeners, or a socket seen live already.
        let out = feed(
            &mut e,
            &[
                snap(B, TcpState::Established, defaults(), 0),
                snap(C, TcpState::Listen, ka(), 0),
                snap(A, TcpState::Established, ka(), 0),
            ],
        );
        assert!(out.is_empty(), "{out:?}");
        // A snapshot in FIN_WAIT1 is tracked but not established.
        let out = feed(&mut e, &[snap(B, TcpState::FinWait1, ka(), 0)]);
        assert_eq!(
            out[0].kind,
            RecordKind::Opened {
                state: TcpState::FinWait1,
                established: false
            }
        );
    }

    #[test]
    fn cap_limits_connections_and_pending() {
        let mut e = Engine::new(EngineConfig { max_connections: 2 });
        let out = feed(
            &mut e,
            &[
                established(0, A, ka()),
                established(0, B, ka()),
                established(0, C, ka()),
            ],
        );
        assert_eq!(names(&out), ["open", "config", "open", "config"]);
        assert_eq!(e.tracked(), 2);
        assert_eq!(e.stats().cap_rejected, 1);
        assert_eq!(e.cap_hit_since_last_check(), 1);
        assert_eq!(e.cap_hit_since_last_check(), 0);
        // Events of the refused connection are ignored, and it counts once.
        assert!(feed(&mut e, &[ev(S, C, EventBody::Ack { probes: 1 }), established(S, C, ka())]).is_empty());
        assert_eq!(e.stats().cap_rejected, 1);

        // A close frees a slot.
        let out = feed(&mut e, &[close(S, A), established(2 * S, C, ka())]);
        assert_eq!(names(&out), ["close", "open", "config"]);
        assert_eq!(e.open_connections().count(), 2);

        // The pending table is capped too.
        let p = process(1, "p");
        let more = [0x10u64, 0x20, 0x30]
            .map(|sk| setsockopt(3 * S, sk, SockOpt::KeepAlive, 1, TcpState::Close, p));
        feed(&mut e, &more);
        assert_eq!(e.pending.len(), 2);
        assert_eq!(e.cap_hit_since_last_check(), 1);
        assert_eq!(e.stats().cap_rejected, 2);
    }

    #[test]
    fn sk_reuse_starts_a_fresh_connection() {
        let mut e = engine();
        let first = feed(&mut e, &[established(0, A, ka()), probe(S, A, 0, 1)]);
        let old_id = first[0].conn.id;
        // The close of the first connection was missed; the same sk is now a new connection.
        let out = feed(
            &mut e,
            &[established(2 * S, A, ka()), probe(3 * S, A, 0, 0)],
        );
        assert_eq!(
            names(&out),
            ["episode", "untracked", "open", "config", "idle"],
            "the old connection ends, its episode is not carried over: {out:?}"
        );
        assert_eq!((out[0].conn.id, out[1].conn.id), (old_id, old_id));
        assert_eq!(episode(&out[0]).outcome, EpisodeOutcome::Incomplete);
        let out = out[2..].to_vec();
        let new_id = out[0].conn.id;
        assert_ne!(new_id, old_id);
        assert!(out
            .iter()
            .all(|r| r.conn.id == new_id && r.conn.first_seen_ns == 2 * S));
        assert_eq!(e.tracked(), 1);
        // Ids are never reused, even after a clean close.
        let out = feed(&mut e, &[close(4 * S, A), established(5 * S, A, ka())]);
        assert_eq!(out[0].conn.id, new_id);
        assert!(out[1].conn.id > new_id);
    }

    #[test]
    fn untracked_sockets_are_ignored() {
        let mut e = engine();
        let p = process(9, "nc");
        let connect = ev(
            0,
            A,
            EventBody::State {
                old: TcpState::Close,
                new: TcpState::SynSent,
                settings: defaults(),
                process: Some(p),
                err: 0, times: Default::default(),
            },
        );
        let out = feed(
            &mut e,
            &[
                connect,
                established(S, A, defaults()),
                timer(2 * S, A, firing(defaults(), 0, 0)),
                ev(3 * S, A, EventBody::Ack { probes: 1 }),
                ev(
                    3 * S,
                    A,
                    EventBody::ResetReceived {
                        state: TcpState::Established,
                        times: Default::default(),
                    },
                ),
                ev(
                    3 * S,
                    A,
                    EventBody::Error {
                        errno: 104,
                        state: TcpState::Established,
                    },
                ),
                close(4 * S, A),
                ev(5 * S, A, EventBody::Destroy),
            ],
        );
        assert!(out.is_empty(), "{out:?}");
        assert_eq!(e.tracked(), 0);
        assert!(
            e.pending.is_empty(),
            "the connect note is dropped at ESTABLISHED"
        );
        assert_eq!(e.stats().events, 8);
    }

    #[test]
    fn syn_sent_process_attached_when_tracked() {
        let mut e = engine();
        let p = process(11, "ssh");
        let connect = ev(
            0,
            A,
            EventBody::State {
                old: TcpState::Close,
                new: TcpState::SynSent,
                settings: ka(),
                process: Some(p),
                err: 0, times: Default::default(),
            },
        );
        let out = feed(&mut e, &[connect, established(S, A, ka())]);
        assert_eq!(names(&out), ["open", "config"]);
        assert!(out.iter().all(|r| r.conn.process == Some(p)));
        assert!(matches!(
            out[1].kind,
            RecordKind::Config { process: None, .. }
        ));
    }

    #[test]
    fn destroy_cleans_up() {
        let mut e = engine();
        let p = process(1, "p");
        // Pending settings of a socket that never connected.
        feed(
            &mut e,
            &[setsockopt(0, A, SockOpt::KeepAlive, 1, TcpState::Close, p)],
        );
        assert_eq!(e.pending.len(), 1);
        assert!(feed(&mut e, &[ev(S, A, EventBody::Destroy)]).is_empty());
        assert!(e.pending.is_empty());
        assert_eq!(e.stats().pending_dropped, 1);

        // A tracked connection whose close was missed: ended by its destruction, with a record.
        feed(&mut e, &[established(0, B, ka())]);
        let out = feed(&mut e, &[ev(S, B, EventBody::Destroy)]);
        assert_eq!(
            kinds(&out),
            [RecordKind::Untracked { reason: UntrackReason::Destroyed, state: TcpState::Established }]
        );
        assert_eq!(e.tracked(), 0);
        assert_eq!(e.stats().untracked, 1);

        // Events held for a timer event that never came are replayed, not lost.
        feed(&mut e, &[established(0, C, ka())]);
        let held = in_timer(ev(
            S,
            C,
            EventBody::ResetReceived {
                state: TcpState::Established,
                times: Default::default(),
            },
        ));
        assert!(feed(&mut e, &[held]).is_empty());
        let out = feed(&mut e, &[ev(2 * S, C, EventBody::Destroy)]);
        assert_eq!(names(&out), ["peer_reset", "untracked"]);
        assert!(e.held.is_empty());
        assert_eq!(e.tracked(), 0);
    }

    #[test]
    fn held_events_replayed_when_timer_event_lost() {
        let mut e = engine();
        feed(&mut e, &[established(0, A, ka()), probe(S, A, 0, 1)]);
        let reset = in_timer(ev(
            2 * S,
            A,
            EventBody::ResetSent {
                active: true,
                reason: None,
                state: TcpState::Established,
            },
        ));
        assert!(feed(&mut e, &[reset]).is_empty());
        let out = feed(&mut e, &[close(3 * S, A)]);
        assert_eq!(names(&out), ["reset", "episode", "close"]);
        assert_eq!(
            out[0].kind,
            RecordKind::Reset {
                reason: "not_specified".into(),
                active: true,
                // The timer record that would have explained it was lost: the reset is the death.
                death: true,
            }
        );
        assert_eq!(out[0].kind.death_cause(), Some(DeathCause::ResetSent));
        assert_eq!(episode(&out[1]).outcome, EpisodeOutcome::Reset { by_peer: false });
    }

    /// An answer no timer firing saw (it came before the on-demand hook attached, or with
    /// `next-firing`), then the end: the socket's last acknowledgment, after the probe, is the
    /// answer, dated from it; the episode is answered, not cut short by the close or the reset.
    #[test]
    fn answer_seen_only_at_the_end() {
        let mut e = engine();
        feed(&mut e, &[established(0, A, ka()), established(0, B, ka())]);
        // Acknowledged 1.5 s before a close 2 s after the probe: 0.5 s after it.
        let out = feed(&mut e, &[probe(S, A, 0, 1), close_acked(3 * S, A, 1500)]);
        assert_eq!(names(&out), ["probe", "ack", "episode", "close"]);
        assert_eq!(out[1].kind, RecordKind::Ack { probes: 1, precision: AckPrecision::AtEnd });
        assert_eq!(out[1].ts_ns, S + S / 2);
        let ep = episode(&out[2]);
        assert_eq!((ep.outcome, ep.end_ns), (EpisodeOutcome::Answered(AckPrecision::AtEnd), S + S / 2));
        // A reset after the answer: answered, then the reset.
        let out = feed(&mut e, &[probe(S, B, 0, 1), reset_acked(2 * S, B, 999)]);
        assert_eq!(names(&out), ["probe", "ack", "episode", "peer_reset"]);
        assert_eq!(episode(&out[2]).outcome, EpisodeOutcome::Answered(AckPrecision::AtEnd));
    }

    #[test]
    fn episode_ends_on_peer_reset_and_on_close() {
        let mut e = engine();
        feed(&mut e, &[established(0, A, ka()), established(0, B, ka())]);
        let out = feed(
            &mut e,
            &[
                probe(S, A, 0, 1),
                // Nothing received since before the probe (idle 1 s before it).
                reset_acked(2 * S, A, 2000),
                probe(S, B, 0, 1),
                close_acked(2 * S, B, 2000),
            ],
        );
        assert_eq!(
            names(&out),
            [
                "probe",
                "peer_reset",
                "episode",
                "probe",
                "episode",
                "close"
            ]
        );
        assert_eq!(episode(&out[2]).outcome, EpisodeOutcome::Reset { by_peer: true });
        // The episode ends before the connection's last record.
        assert_eq!(episode(&out[4]).outcome, EpisodeOutcome::Closed);
        assert_eq!(out[4].conn.sk, B);
    }

    #[test]
    fn connect_failure_drops_pending_settings() {
        let mut e = engine();
        let p = process(1, "p");
        let failed = state(S, A, TcpState::SynSent, TcpState::Close, defaults());
        feed(
            &mut e,
            &[
                setsockopt(0, A, SockOpt::KeepIdle, 5, TcpState::Close, p),
                failed,
            ],
        );
        assert!(e.pending.is_empty());
        assert_eq!(e.stats().pending_dropped, 1);
    }

    #[test]
    fn sk_hasher_spreads_aligned_pointers() {
        use std::hash::BuildHasher;
        let build = BuildHasherDefault::<SkHasher>::default();
        let mut low = std::collections::HashSet::new();
        let mut high = std::collections::HashSet::new();
        for i in 0..4096u64 {
            let h = build.hash_one(0xffff_8880_0000_0000u64 + i * 2048);
            low.insert(h & 4095);
            high.insert(h >> 57);
        }
        // Random hashes would fill ~63% of 4096 buckets and all 128 control values.
        assert!(low.len() > 2400, "low bits poorly spread: {}", low.len());
        assert_eq!(high.len(), 128);
    }

    fn owner(ts: u64, sk: u64, p: Process) -> Event {
        ev(ts, sk, EventBody::Owner { process: p })
    }

    fn pids(records: &[Record]) -> Vec<Option<u32>> {
        records.iter().map(|r| r.conn.process.map(|p| p.pid)).collect()
    }

    /// An accepted socket: established in softirq (no process), then the acceptor's `Owner`. No
    /// record of its own; every later record carries the acceptor, and a second holder does not
    /// replace it.
    #[test]
    fn owner_of_a_tracked_connection_is_on_every_later_record() {
        let mut e = engine();
        let out = feed(&mut e, &[established(S, A, ka())]);
        assert_eq!(names(&out), ["open", "config"]);
        assert_eq!(pids(&out), [None, None]);
        let worker = process(4242, "nginx");
        assert!(feed(&mut e, &[owner(S + 1, A, worker)]).is_empty());
        let out = feed(
            &mut e,
            &[owner(S + 2, A, process(1, "other")), probe(2 * S, A, 0, 1), close(3 * S, A)],
        );
        assert!(!out.is_empty());
        assert!(out.iter().all(|r| r.conn.process == Some(worker)), "{out:?}");
        assert_eq!(e.open_connections().count(), 0);
    }

    /// The owner of a socket not tracked yet is remembered until it becomes tracked.
    #[test]
    fn owner_before_tracking_is_taken_when_tracked() {
        let mut e = engine();
        let worker = process(7, "nginx");
        assert!(feed(&mut e, &[owner(S, A, worker)]).is_empty());
        let out = feed(&mut e, &[probe(2 * S, A, 0, 1)]);
        assert_eq!(names(&out)[0], "open");
        assert!(out.iter().all(|r| r.conn.process == Some(worker)), "{out:?}");
        // Gone before it was tracked: the note goes with it, a new socket at the address has none.
        feed(&mut e, &[owner(3 * S, B, worker), ev(4 * S, B, EventBody::Destroy)]);
        let out = feed(&mut e, &[established(5 * S, B, ka())]);
        assert_eq!(pids(&out), [None, None]);
    }

    /// The start-up snapshot delivers a socket's owner just before the socket: the snapshot's
    /// records carry it.
    #[test]
    fn owner_delivered_before_the_snapshot_is_on_its_records() {
        let mut e = engine();
        let holder = process(99, "redis-server");
        let snap = ev(
            S,
            A,
            EventBody::Snapshot {
                state: TcpState::Established,
                settings: ka(),
                probes_out: 0,
                packets_out: 0,
                unsent: 0,
            },
        );
        let out = feed(&mut e, &[owner(S, A, holder), snap]);
        assert_eq!(names(&out), ["open", "config"]);
        assert_eq!(pids(&out), [Some(99), Some(99)]);
        assert_eq!(out[0].conn.process.unwrap().comm_str(), "redis-server");
    }
    /// A close event (to CLOSE from `old`) with the socket error and times the kernel side reads.
    fn closed_with(ts: u64, sk: u64, old: TcpState, err: i32, settings: SockSettings, times: SockTimes) -> Event {
        ev(ts, sk, EventBody::State { old, new: TcpState::Close, settings, process: None, err, times })
    }

    fn reset_received(ts: u64, sk: u64, state: TcpState, times: SockTimes) -> Event {
        ev(ts, sk, EventBody::ResetReceived { state, times })
    }

    /// A connection idle 5 s before a write that was retransmitted 3 times over 7 s.
    fn retransmitted() -> SockTimes {
        SockTimes {
            since_sent_ms: 800,
            since_data_ms: 12_000,
            since_ack_ms: 12_000,
            retransmits: 3,
            unacked: 100,
            retransmitting_ms: Some(7_000),
            unread: None,
        }
    }

    /// A keep-alive HTTP connection: response 1.3 s ago, the peer's FIN 0.3 s ago (not read), 77
    /// bytes written 0.1 s ago.
    fn raced() -> SockTimes {
        SockTimes {
            since_sent_ms: 100,
            since_data_ms: 1_300,
            since_ack_ms: 300,
            retransmits: 0,
            unacked: 77,
            retransmitting_ms: None,
            unread: Some(1),
        }
    }

    fn race_kind() -> RecordKind {
        RecordKind::ReuseRace { peer_idle_ms: 1_000, write_after_ms: 200, bytes: 77 }
    }

    /// Issue 14: a connection without keep-alive dies by retransmissions: one self-contained group
    /// (settings at the death, the cause with the idle time before the write, error, close) under a
    /// new id, no `open`, nothing kept.
    #[test]
    fn retransmission_death_of_a_connection_not_followed() {
        let mut e = engine();
        let out = feed(&mut e, &[closed_with(5 * S, A, TcpState::Established, 110, defaults(), retransmitted())]);
        assert_eq!(names(&out), ["config", "timeout", "error", "close"]);
        assert!(out.iter().all(|r| r.conn.id == out[0].conn.id && r.ts_ns == 5 * S));
        assert_eq!(
            out[0].kind,
            RecordKind::Config { settings: defaults(), source: SettingsSource::Close, process: None }
        );
        let idle = Idle { idle_ms: 5_000, since_received_ms: 12_000, since_sent_ms: 800 };
        assert_eq!(
            out[1].kind,
            RecordKind::Timeout { reason: TimeoutReason::Retransmit, probes: 3, idle: Some(idle) }
        );
        assert_eq!(out[1].kind.death_cause(), Some(DeathCause::RetransmitTimeout));
        assert_eq!(out[2].kind, RecordKind::Error { errno: 110, death: false });
        assert_eq!(
            out[3].kind,
            RecordKind::Close { state: TcpState::Established, closed_by: None, idle: Some(idle) }
        );
        // The error report that follows the close, and the destruction: nothing (nothing kept).
        let later = feed(&mut e, &[ev(5 * S + 1, A, EventBody::Error { errno: 110, state: TcpState::Close }), ev(5 * S + 2, A, EventBody::Destroy)]);
        assert!(later.is_empty(), "{later:?}");
        let st = e.stats();
        assert_eq!((st.tracked, st.opened, st.unfollowed_deaths, st.closed), (0, 0, 1, 0));
        // A second death on the same socket address is another connection.
        let again = feed(&mut e, &[closed_with(9 * S, A, TcpState::Established, 110, defaults(), retransmitted())]);
        assert_ne!(again[0].conn.id, out[0].conn.id);
    }

    /// A followed connection whose retransmissions give up (data in flight: keep-alive silent) gets
    /// the same `timeout`, then its error and close; a keep-alive timer death is unchanged.
    #[test]
    fn retransmission_death_of_a_followed_connection() {
        let mut e = engine();
        feed(&mut e, &[established(0, A, ka())]);
        let out = feed(&mut e, &[closed_with(20 * S, A, TcpState::Established, 110, ka(), retransmitted())]);
        assert_eq!(names(&out), ["timeout", "error", "close"]);
        assert!(matches!(out[0].kind, RecordKind::Timeout { reason: TimeoutReason::Retransmit, probes: 3, .. }));
        assert_eq!(e.stats().closed, 1);
        assert_eq!(e.stats().unfollowed_deaths, 0);
    }

    /// Issue 14: a reset received carries the idle time, followed or not.
    #[test]
    fn peer_reset_carries_the_idle_time() {
        let mut e = engine();
        let idle_30s = SockTimes { since_sent_ms: 30_000, since_data_ms: 30_000, since_ack_ms: 30_000, ..Default::default() };
        let idle = Some(Idle { idle_ms: 30_000, since_received_ms: 30_000, since_sent_ms: 30_000 });
        feed(&mut e, &[established(0, A, ka())]);
        let out = feed(
            &mut e,
            &[
                reset_received(30 * S, A, TcpState::Established, idle_30s),
                closed_with(30 * S + 1, A, TcpState::Established, 104, ka(), idle_30s),
            ],
        );
        assert_eq!(names(&out), ["peer_reset", "error", "close"]);
        assert_eq!(out[0].kind, RecordKind::PeerReset { idle });
        // Not followed: the reset itself says nothing; the close carries the death.
        let out = feed(
            &mut e,
            &[
                reset_received(40 * S, B, TcpState::Established, idle_30s),
                closed_with(40 * S + 1, B, TcpState::Established, 104, defaults(), idle_30s),
            ],
        );
        assert_eq!(names(&out), ["config", "peer_reset", "error", "close"]);
        assert_eq!(out[1].kind, RecordKind::PeerReset { idle });
        assert_eq!(out[1].kind.death_cause(), Some(DeathCause::PeerReset));
    }

    /// Issue 14: data written in CLOSE_WAIT (after the peer's FIN) and reset: the reuse race with
    /// the peer's idle close time, the write's delay after it and the bytes; EPIPE; closed by the
    /// peer. Without unacknowledged data it is a plain peer reset.
    #[test]
    fn reuse_race_followed_and_not() {
        let mut e = engine();
        feed(&mut e, &[established(0, A, ka())]);
        let out = feed(
            &mut e,
            &[
                reset_received(2 * S, A, TcpState::CloseWait, raced()),
                closed_with(2 * S + 1, A, TcpState::CloseWait, 32, ka(), raced()),
            ],
        );
        assert_eq!(names(&out), ["reuse_race", "error", "close"]);
        assert_eq!(out[0].kind, race_kind());
        assert_eq!(out[1].kind, RecordKind::Error { errno: 32, death: false });
        // Idle before the write: the peer's idle close time and the write's delay after it.
        let idle = Idle { idle_ms: 1_200, since_received_ms: 1_300, since_sent_ms: 100 };
        assert_eq!(
            out[2].kind,
            RecordKind::Close { state: TcpState::CloseWait, closed_by: Some(ClosedBy::Peer), idle: Some(idle) }
        );

        let out = feed(&mut e, &[closed_with(3 * S, B, TcpState::CloseWait, 32, defaults(), raced())]);
        assert_eq!(names(&out), ["config", "reuse_race", "error", "close"]);
        assert_eq!(out[1].kind, race_kind());
        assert_eq!(out[1].kind.death_cause(), Some(DeathCause::ReuseRace));

        let nothing_written = SockTimes { unacked: 0, ..raced() };
        let out = feed(&mut e, &[closed_with(4 * S, C, TcpState::CloseWait, 32, defaults(), nothing_written)]);
        assert_eq!(names(&out), ["config", "peer_reset", "error", "close"]);

        // The application read the end of stream, then wrote (a TLS server's close_notify to a
        // client that went away): it knew the peer had closed, no race.
        let knew = SockTimes { unread: Some(0), ..raced() };
        let out = feed(&mut e, &[closed_with(5 * S, D, TcpState::CloseWait, 32, defaults(), knew)]);
        assert_eq!(names(&out), ["config", "peer_reset", "error", "close"]);
        // Without the fields (older kernels' BTF lacking them), as before: the race.
        let unknown = SockTimes { unread: None, ..raced() };
        let out = feed(&mut e, &[closed_with(6 * S, E, TcpState::CloseWait, 32, defaults(), unknown)]);
        assert_eq!(names(&out), ["config", "reuse_race", "error", "close"]);
    }

    /// Issue 14: who sent the first FIN, from the state left for CLOSE, with the idle time at the
    /// close; a connection not followed closes alone (the kernel sends its close only with
    /// `--all-closes`), a keep-alive socket the engine did not take and a failed connect do not.
    #[test]
    fn closed_by_and_closes_of_connections_not_followed() {
        let mut e = engine();
        let idle = SockTimes { since_sent_ms: 1_010, since_data_ms: 1_005, since_ack_ms: 1_005, ..Default::default() };
        feed(&mut e, &[established(0, A, ka()), established(0, B, ka())]);
        let out = feed(
            &mut e,
            &[
                closed_with(S, A, TcpState::LastAck, 0, ka(), idle),
                closed_with(S, B, TcpState::FinWait2, 0, ka(), idle),
            ],
        );
        let idle_close = Some(Idle { idle_ms: 1_005, since_received_ms: 1_005, since_sent_ms: 1_010 });
        assert_eq!(
            kinds(&out),
            [
                RecordKind::Close { state: TcpState::LastAck, closed_by: Some(ClosedBy::Peer), idle: idle_close },
                RecordKind::Close { state: TcpState::FinWait2, closed_by: Some(ClosedBy::Local), idle: idle_close },
            ]
        );
        let out = feed(&mut e, &[closed_with(2 * S, C, TcpState::Closing, 0, defaults(), idle)]);
        assert_eq!(
            kinds(&out),
            [RecordKind::Close { state: TcpState::Closing, closed_by: Some(ClosedBy::Local), idle: idle_close }]
        );
        let out = feed(
            &mut e,
            &[
                closed_with(3 * S, A, TcpState::Established, 0, ka(), idle),
                closed_with(3 * S, B, TcpState::SynSent, 111, defaults(), idle),
            ],
        );
        assert!(out.is_empty(), "{out:?}");
        let st = e.stats();
        assert_eq!((st.tracked, st.closed, st.unfollowed_closes, st.unfollowed_deaths), (0, 2, 1, 0));
    }

    /// Issue 14: the reset a time-wait socket sends for data arriving after the close, with the
    /// kernel's reason: `reset` then `close` (the time-wait socket is gone with it). A reset from a
    /// live socket not followed says nothing by itself (its close does).
    #[test]
    fn reset_sent_by_a_time_wait_socket() {
        let mut e = engine();
        let reset = |ts, sk, state| {
            ev(ts, sk, EventBody::ResetSent { active: false, reason: Some("tcp_timewait_socket".into()), state })
        };
        let out = feed(&mut e, &[reset(S, A, TcpState::TimeWait)]);
        assert_eq!(
            kinds(&out),
            [
                RecordKind::Reset { reason: "tcp_timewait_socket".into(), active: false, death: false },
                RecordKind::Close { state: TcpState::TimeWait, closed_by: Some(ClosedBy::Local), idle: None },
            ]
        );
        assert_eq!(out[0].conn.id, out[1].conn.id);
        assert!(feed(&mut e, &[reset(2 * S, B, TcpState::Established), reset(2 * S, C, TcpState::Listen)]).is_empty());
        // A closed socket answering data after its close (abort on data) is reported; one that
        // aborts its own close (an active reset: unread data, zero linger) is not.
        let closed = |active, reason: &str| {
            ev(3 * S, B, EventBody::ResetSent { active, reason: Some(reason.into()), state: TcpState::Close })
        };
        assert_eq!(names(&feed(&mut e, &[closed(false, "tcp_abort_on_data")])), ["reset", "close"]);
        assert!(feed(&mut e, &[closed(true, "tcp_abort_on_linger")]).is_empty());
        assert_eq!((e.stats().unfollowed_resets, e.stats().tracked), (2, 0));
    }

    /// Issue 14: the death of a connection not followed names its owner: the process of the close
    /// event (it ran in the owner's context), else the owner note delivered just before it (the
    /// agent's lookup by inode), which the close takes; without either, no owner. A followed
    /// connection keeps its own process.
    #[test]
    fn death_of_a_connection_not_followed_names_its_owner() {
        let mut e = engine();
        let client = process(4242, "client");
        let in_context = |ts, sk, p: Process| {
            let mut c = closed_with(ts, sk, TcpState::Established, 104, defaults(), SockTimes::default());
            if let EventBody::State { process, .. } = &mut c.body {
                *process = Some(p);
            }
            c
        };
        let out = feed(&mut e, &[in_context(S, A, client)]);
        assert_eq!(names(&out), ["config", "peer_reset", "error", "close"]);
        assert_eq!(pids(&out), [Some(4242); 4]);
        assert_eq!(out[0].conn.process.unwrap().comm_str(), "client");
        // Looked up: the owner note, then the death.
        let out = feed(&mut e, &[owner(2 * S, B, process(77, "worker")), closed_with(2 * S, B, TcpState::Established, 110, defaults(), retransmitted())]);
        assert_eq!(names(&out), ["config", "timeout", "error", "close"]);
        assert_eq!(pids(&out), [Some(77); 4]);
        // The note went with the death: the next death on that address has no owner.
        let out = feed(&mut e, &[closed_with(3 * S, B, TcpState::Established, 110, defaults(), retransmitted())]);
        assert_eq!(pids(&out), [None; 4]);
        // The process of the close event comes before a note.
        let out = feed(&mut e, &[owner(4 * S, C, process(1, "other")), in_context(4 * S, C, client)]);
        assert_eq!(pids(&out), [Some(4242); 4]);
        assert_eq!(e.stats().tracked, 0);
        // A followed connection's own process is kept.
        feed(&mut e, &[owner(5 * S, A, client), established(5 * S, A, ka())]);
        let out = feed(&mut e, &[in_context(6 * S, A, process(9, "killer"))]);
        assert!(!out.is_empty() && pids(&out).iter().all(|p| *p == Some(4242)), "{out:?}");
    }
}
