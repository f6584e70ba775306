//! What the timeline engine emits: one [`Record`] per change in a connection's keep-alive history.
//! The terminal/JSON output and the OpenTelemetry exporter both consume these.

use std::net::SocketAddr;

use crate::event::{Process, SockOpt, SockSettings, TcpState};

/// Where a connection's keep-alive settings came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SettingsSource {
    /// `setsockopt(2)` by a process (the option that changed).
    Setsockopt(SockOpt),
    /// Read from the socket when the agent started (`iter/tcp`).
    Snapshot,
    /// Read from the socket when it became established (inherited from a listener or set before).
    Established,
    /// Nothing set on the socket: the namespace's sysctl defaults.
    Default,
    /// Read from the socket when a connection the engine did not follow died (it carries no
    /// `open`: see [`RecordKind::Close`]).
    Close,
    /// Read from the socket at a timer firing: changed without a `setsockopt` we saw
    /// (bpf_setsockopt, an in-kernel user), or a connection first seen at its timer.
    Kernel,
}

impl SettingsSource {
    pub fn name(self) -> &'static str {
        match self {
            SettingsSource::Setsockopt(_) => "setsockopt",
            SettingsSource::Snapshot => "snapshot",
            SettingsSource::Established => "established",
            SettingsSource::Default => "default",
            SettingsSource::Close => "close",
            SettingsSource::Kernel => "kernel",
        }
    }
}

/// Why the kernel killed the connection with a timeout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeoutReason {
    /// `TCP_KEEPCNT` probes went unanswered (the keep-alive timer).
    Keepalive,
    /// `TCP_USER_TIMEOUT` expired while probes were unanswered (the keep-alive timer).
    UserTimeout,
    /// The retransmission timer gave up on data in flight (`net.ipv4.tcp_retries2`, or
    /// `TCP_USER_TIMEOUT` while data was in flight); also the zero-window probe timer.
    Retransmit,
}

impl TimeoutReason {
    pub fn name(self) -> &'static str {
        match self {
            TimeoutReason::Keepalive => "keepalive",
            TimeoutReason::UserTimeout => "user_timeout",
            TimeoutReason::Retransmit => "retransmit",
        }
    }
}

/// Who sent a connection's first FIN, from the state it left for CLOSE: FIN_WAIT1, FIN_WAIT2 or
/// CLOSING (this host), CLOSE_WAIT or LAST_ACK (the peer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClosedBy {
    Local,
    Peer,
}

impl ClosedBy {
    /// Who closed a connection that left `state` for CLOSE; `None` when no FIN was sent (a reset,
    /// an abort) or the state says nothing (TIME_WAIT: either side may have sent it first).
    pub fn from_state(state: TcpState) -> Option<ClosedBy> {
        match state {
            TcpState::FinWait1 | TcpState::FinWait2 | TcpState::Closing => Some(ClosedBy::Local),
            TcpState::CloseWait | TcpState::LastAck => Some(ClosedBy::Peer),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ClosedBy::Local => "local",
            ClosedBy::Peer => "peer",
        }
    }
}

/// How long a connection had been idle, read from its socket at a death or a close (jiffy
/// precision).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Idle {
    /// Idle before what ended the connection: no data either way for this long. When a write
    /// was never acknowledged, from the last data received to that write (answered by a reset),
    /// or to its first retransmission (a retransmission death: the kernel keeps no earlier time;
    /// the write came a tail-loss probe and an initial retransmission timeout, 0.2 s or more
    /// each, before); otherwise up to the event.
    pub idle_ms: u64,
    /// Since the last data segment received (acknowledgments and FINs do not count).
    pub since_received_ms: u64,
    /// Since the last data segment sent (retransmissions count).
    pub since_sent_ms: u64,
}

/// Why a connection died, for counting deaths (`keepalive.connection.deaths`); see
/// [`RecordKind::death_cause`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeathCause {
    /// The keep-alive timer's probes went unanswered.
    KeepaliveTimeout,
    /// `TCP_USER_TIMEOUT` expired while keep-alive probes were unanswered.
    UserTimeout,
    /// The retransmission timer gave up.
    RetransmitTimeout,
    /// A reset arrived from the peer.
    PeerReset,
    /// A request was written after the peer had closed the connection, and the peer reset it.
    ReuseRace,
    /// This host reset the connection, nothing else having killed it first (an abort: `ss -K`,
    /// `tcp_abort`, a disconnect with data in flight).
    ResetSent,
    /// A socket error killed the connection, nothing else having explained it first (an ICMP
    /// error such as `EHOSTUNREACH`, or an error whose cause the kernel did not report).
    Error,
}

impl DeathCause {
    pub fn name(self) -> &'static str {
        match self {
            DeathCause::KeepaliveTimeout => "keepalive_timeout",
            DeathCause::UserTimeout => "user_timeout",
            DeathCause::RetransmitTimeout => "retransmit_timeout",
            DeathCause::PeerReset => "peer_reset",
            DeathCause::ReuseRace => "reuse_race",
            DeathCause::ResetSent => "reset_sent",
            DeathCause::Error => "error",
        }
    }
}

/// How a keep-alive episode (first probe → ...) ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EpisodeOutcome {
    /// The peer answered (seen on the segment, or inferred at the next timer run).
    Answered(AckPrecision),
    /// The keep-alive timer killed the connection.
    TimedOut(TimeoutReason),
    /// The connection was reset during the episode: by the peer, or by this host.
    Reset { by_peer: bool },
    /// The connection closed otherwise (application close, error).
    Closed,
    /// The episode was still open when the agent stopped following the connection (agent
    /// shutdown, or the connection left the engine without a close: see [`UntrackReason`]).
    Incomplete,
}

impl EpisodeOutcome {
    /// The name used in JSON (`outcome`) and span attributes.
    pub fn name(self) -> &'static str {
        match self {
            EpisodeOutcome::Answered(_) => "answered",
            EpisodeOutcome::TimedOut(_) => "timeout",
            EpisodeOutcome::Reset { .. } => "reset",
            EpisodeOutcome::Closed => "closed",
            EpisodeOutcome::Incomplete => "incomplete",
        }
    }
}

/// Most probe times an episode keeps (the first ones); the probe count stays exact beyond it
/// (a long `TCP_USER_TIMEOUT` can make an episode send thousands of probes).
pub const MAX_PROBE_TIMES: usize = 128;

/// Times of an episode's probes: the first three without an allocation of their own (most
/// episodes end after one probe; an allocation per episode showed in profiles).
pub type ProbeTimes = smallvec::SmallVec<[u64; 3]>;

/// A finished keep-alive episode: from the first probe to its outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Episode {
    /// 1 for the connection's first episode (as seen by the agent).
    pub number: u32,
    /// Monotonic ns of the first probe (of the snapshot, for an episode under way at start-up).
    pub start_ns: u64,
    /// Monotonic ns of the outcome.
    pub end_ns: u64,
    /// Probes sent in the episode, exact (including probes sent before the agent started).
    pub probes: u32,
    pub outcome: EpisodeOutcome,
    /// Monotonic ns of each probe seen, in order, at most [`MAX_PROBE_TIMES`]. The first one is
    /// probe number [`Episode::first_timed_probe`].
    pub probe_ts_ns: ProbeTimes,
    /// Number (1-based) of the probe `probe_ts_ns[0]` is the time of: greater than 1 when the
    /// episode was found under way by the start-up snapshot.
    pub first_timed_probe: u32,
}

/// How precisely an answer to a probe was timed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckPrecision {
    /// The answering segment itself was seen (`tcp:tcp_probe`).
    Segment,
    /// Inferred at the next timer firing: the answer came at some time since the last probe.
    NextFiring,
    /// Inferred at the connection's end (its close, or a reset received) before any timer firing
    /// saw it: the socket's last acknowledgment (`rcv_tstamp`) came after the last probe.
    AtEnd,
}

impl AckPrecision {
    pub fn name(self) -> &'static str {
        match self {
            AckPrecision::Segment => "segment",
            AckPrecision::NextFiring => "next_firing",
            AckPrecision::AtEnd => "at_end",
        }
    }
}

/// Why the engine stopped following a connection without seeing it close. Every connection's last
/// record is either [`RecordKind::Close`] or [`RecordKind::Untracked`] with one of these.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UntrackReason {
    /// The socket was destroyed and its close was never seen (an event the kernel skipped or a
    /// full ring buffer lost).
    Destroyed,
    /// The socket's kernel address became a new connection: the old one's close was missed.
    Reused,
    /// Keep-alive and `TCP_USER_TIMEOUT` were switched off: the connection is no longer followed.
    KeepaliveOff,
    /// A walk of the kernel's sockets no longer finds it among keep-alive sockets (its close and
    /// its destruction were both missed, or keep-alive was switched off unseen).
    Gone,
    /// The agent is stopping.
    Shutdown,
}

impl UntrackReason {
    pub fn name(self) -> &'static str {
        match self {
            UntrackReason::Destroyed => "destroyed",
            UntrackReason::Reused => "reused",
            UntrackReason::KeepaliveOff => "keepalive_off",
            UntrackReason::Gone => "gone",
            UntrackReason::Shutdown => "shutdown",
        }
    }

    /// Whether the connection really ended (as opposed to no longer being followed).
    pub fn connection_ended(self) -> bool {
        matches!(self, UntrackReason::Destroyed | UntrackReason::Reused | UntrackReason::Gone)
    }
}

/// One change in a connection's timeline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordKind {
    /// The agent starts tracking the connection (first seen: established, snapshot, settings...).
    Opened { state: TcpState, established: bool },
    /// Keep-alive settings (effective values) and where they came from.
    Config { settings: SockSettings, source: SettingsSource, process: Option<Process> },
    /// A keep-alive probe went out (`tcp_write_wakeup`); `n` is 1-based within the episode.
    Probe { n: u32 },
    /// Probes `first..=last` of the episode that the kernel's probe counter shows but whose timer
    /// runs reached no record (the kernel's event never arrived, counted or not): found at the
    /// next timer run of the connection, dated there. They count as probes everywhere (metrics,
    /// spans), with no time of their own.
    UnseenProbes { first: u32, last: u32 },
    /// The peer answered after `probes` probes.
    Ack { probes: u32, precision: AckPrecision },
    /// The timer fired but could not probe: data in flight or queued. Keep-alive is silent.
    Suppressed { packets_out: u32, unsent: u32 },
    /// The timer fired before the idle time was reached and re-armed itself.
    Idle { idle_ms: u64, next_in_ms: Option<u64> },
    /// The socket was locked by its owner: the timer retried 50 ms later.
    Busy,
    /// The timer handled an orphaned FIN_WAIT2 socket (it is the FIN_WAIT2 timer then).
    FinWait2,
    /// A timer killed the connection: the keep-alive timer (`probes` unanswered), or the
    /// retransmission timer ([`TimeoutReason::Retransmit`]: `probes` holds the retransmissions,
    /// and `idle` what the socket said at the death).
    Timeout { reason: TimeoutReason, probes: u32, idle: Option<Idle> },
    /// This host reset the connection; `reason` lowercase kernel name (`tcp_keepalive_timeout`),
    /// `not_specified` where the kernel gives none.
    Reset { reason: String, active: bool, death: bool },
    /// The peer reset the connection; `idle` read from the socket at the reset.
    PeerReset { idle: Option<Idle> },
    /// The HTTP keep-alive reuse race: data was written after the peer's FIN had arrived (the
    /// socket was in CLOSE_WAIT), and the peer answered with a reset. `peer_idle_ms`: how long
    /// the connection had been idle (since the last data received) when the peer closed it;
    /// `write_after_ms`: how long after the peer's FIN the write came; `bytes`: bytes written
    /// and never acknowledged.
    ReuseRace { peer_idle_ms: u64, write_after_ms: u64, bytes: u32 },
    /// A socket error (`errno` positive).
    Error { errno: i32, death: bool },
    /// The connection closed. `state` is the TCP state it left for CLOSE; `closed_by` who sent
    /// the first FIN (`None`: no FIN, a reset or an abort); `idle` read from the socket at the
    /// close (`None` where the kernel event carried none). The connection's last record.
    ///
    /// A connection the engine did not follow (no keep-alive) has no `open`: its death (a close
    /// with a socket error) comes as `config` (source `close`), the cause (`timeout`,
    /// `peer_reset`, `reuse_race`), `error` and `close`, all at the close; its plain close (with
    /// `--all-closes`) as a lone `close`; a reset sent by its time-wait or closed socket as
    /// `reset` then `close`. Each such group has its own connection id.
    Close { state: TcpState, closed_by: Option<ClosedBy>, idle: Option<Idle> },
    /// The engine stopped following the connection without seeing its close; `state` is the last
    /// TCP state it knew. The connection's last record.
    Untracked { reason: UntrackReason, state: TcpState },
    /// A keep-alive episode ended (emitted right after the record that ended it, and before the
    /// connection's last record).
    EpisodeEnd(Episode),
}

impl RecordKind {
    /// The JSON `event` name.
    pub fn name(&self) -> &'static str {
        match self {
            RecordKind::Opened { .. } => "open",
            RecordKind::Config { .. } => "config",
            RecordKind::Probe { .. } => "probe",
            RecordKind::UnseenProbes { .. } => "unseen_probes",
            RecordKind::Ack { .. } => "ack",
            RecordKind::Suppressed { .. } => "suppressed",
            RecordKind::Idle { .. } => "idle",
            RecordKind::Busy => "busy",
            RecordKind::FinWait2 => "fin_wait2",
            RecordKind::Timeout { .. } => "timeout",
            RecordKind::Reset { .. } => "reset",
            RecordKind::PeerReset { .. } => "peer_reset",
            RecordKind::ReuseRace { .. } => "reuse_race",
            RecordKind::Error { .. } => "error",
            RecordKind::Close { .. } => "close",
            RecordKind::Untracked { .. } => "untracked",
            RecordKind::EpisodeEnd(_) => "episode",
        }
    }

    /// The death this record reports, if it is one (the record that explains why a connection
    /// died; `error` and `close` follow it).
    pub fn death_cause(&self) -> Option<DeathCause> {
        Some(match self {
            RecordKind::Timeout { reason: TimeoutReason::Keepalive, .. } => DeathCause::KeepaliveTimeout,
            RecordKind::Timeout { reason: TimeoutReason::UserTimeout, .. } => DeathCause::UserTimeout,
            RecordKind::Timeout { reason: TimeoutReason::Retransmit, .. } => DeathCause::RetransmitTimeout,
            RecordKind::PeerReset { .. } => DeathCause::PeerReset,
            RecordKind::ReuseRace { .. } => DeathCause::ReuseRace,
            RecordKind::Reset { death: true, .. } => DeathCause::ResetSent,
            RecordKind::Error { death: true, .. } => DeathCause::Error,
            _ => return None,
        })
    }

    /// The keep-alive probes this record reports: 1 for a probe, the whole range for probes only
    /// the kernel's counter saw, 0 otherwise.
    pub fn probes_reported(&self) -> u32 {
        match self {
            RecordKind::Probe { .. } => 1,
            RecordKind::UnseenProbes { first, last } => last.saturating_sub(*first) + 1,
            _ => 0,
        }
    }

    /// Whether this is a connection's last record.
    pub fn is_last(&self) -> bool {
        matches!(self, RecordKind::Close { .. } | RecordKind::Untracked { .. })
    }

    /// Hands the kind's own fields, in their stable order, to `sink`: the one description of a
    /// record's fields that the JSON and text printers both format.
    pub fn fields<S: FieldSink>(&self, sink: &mut S) -> Result<(), S::Error> {
        use FieldValue as V;
        match self {
            RecordKind::Opened { state, established } => {
                sink.field("state", V::Str(state.name()))?;
                sink.field("established", V::Bool(*established))
            }
            RecordKind::Config { settings, source, .. } => config_fields(settings, *source, sink),
            RecordKind::Probe { n } => sink.field("probe", V::U64(u64::from(*n))),
            RecordKind::UnseenProbes { first, last } => {
                sink.field("first_probe", V::U64(u64::from(*first)))?;
                sink.field("last_probe", V::U64(u64::from(*last)))
            }
            RecordKind::Ack { probes, precision } => {
                sink.field("probes", V::U64(u64::from(*probes)))?;
                sink.field("precision", V::Str(precision.name()))
            }
            RecordKind::Suppressed { packets_out, unsent } => {
                sink.field("packets_out", V::U64(u64::from(*packets_out)))?;
                sink.field("unsent", V::U64(u64::from(*unsent)))
            }
            RecordKind::Idle { idle_ms, next_in_ms } => {
                sink.field("idle_ms", V::U64(*idle_ms))?;
                sink.field("next_in_ms", V::OptU64(*next_in_ms))
            }
            RecordKind::Busy | RecordKind::FinWait2 => Ok(()),
            RecordKind::PeerReset { idle } => idle_fields(*idle, sink),
            RecordKind::ReuseRace { peer_idle_ms, write_after_ms, bytes } => {
                sink.field("peer_idle_ms", V::U64(*peer_idle_ms))?;
                sink.field("write_after_ms", V::U64(*write_after_ms))?;
                sink.field("bytes", V::U64(u64::from(*bytes)))
            }
            RecordKind::Timeout { reason, probes, idle } => {
                sink.field("reason", V::Str(reason.name()))?;
                let key = if *reason == TimeoutReason::Retransmit { "retransmits" } else { "probes" };
                sink.field(key, V::U64(u64::from(*probes)))?;
                idle_fields(*idle, sink)
            }
            RecordKind::Reset { reason, active, death } => {
                sink.field("reason", V::Str(reason))?;
                sink.field("active", V::Bool(*active))?;
                death_field(*death, sink)
            }
            RecordKind::Error { errno, death } => {
                sink.field("errno", V::Str(&errno_name(*errno)))?;
                sink.field("errno_num", V::I64(i64::from(*errno)))?;
                death_field(*death, sink)
            }
            RecordKind::Close { state, closed_by, idle } => {
                sink.field("state", V::Str(state.name()))?;
                sink.field("closed_by", V::Str(closed_by.map_or("none", ClosedBy::name)))?;
                idle_fields(*idle, sink)
            }
            RecordKind::Untracked { reason, state } => {
                sink.field("reason", V::Str(reason.name()))?;
                sink.field("state", V::Str(state.name()))
            }
            RecordKind::EpisodeEnd(ep) => {
                sink.field("outcome", V::Str(ep.outcome.name()))?;
                sink.field("probes", V::U64(u64::from(ep.probes)))?;
                sink.field("episode", V::U64(u64::from(ep.number)))?;
                let duration_ms = ep.end_ns.saturating_sub(ep.start_ns) as f64 / 1e6;
                sink.field("duration_ms", V::F64(duration_ms))
            }
        }
    }
}

/// `idle_ms`, `since_received_ms`, `since_sent_ms` (JSON `null` when unknown).
fn idle_fields<S: FieldSink>(idle: Option<Idle>, sink: &mut S) -> Result<(), S::Error> {
    use FieldValue as V;
    sink.field("idle_ms", V::OptU64(idle.map(|i| i.idle_ms)))?;
    sink.field("since_received_ms", V::OptU64(idle.map(|i| i.since_received_ms)))?;
    sink.field("since_sent_ms", V::OptU64(idle.map(|i| i.since_sent_ms)))
}

/// `death: true` on the reset or error that killed a connection when nothing before explained it
/// (absent otherwise).
fn death_field<S: FieldSink>(death: bool, sink: &mut S) -> Result<(), S::Error> {
    if death {
        sink.field("death", FieldValue::Bool(true))?;
    }
    Ok(())
}

fn config_fields<S: FieldSink>(s: &SockSettings, source: SettingsSource, sink: &mut S) -> Result<(), S::Error> {
    use FieldValue as V;
    sink.field("keepalive", V::Bool(s.keepalive))?;
    sink.field("idle_s", V::U64(u64::from(s.effective_idle_s())))?;
    sink.field("intvl_s", V::U64(u64::from(s.effective_intvl_s())))?;
    sink.field("cnt", V::U64(u64::from(s.effective_cnt())))?;
    sink.field("user_timeout_ms", V::U64(u64::from(s.user_timeout_ms)))?;
    sink.field("source", V::Str(source.name()))?;
    if let SettingsSource::Setsockopt(opt) = source {
        sink.field("option", V::Str(opt.name()))?;
    }
    sink.field("defaults", V::Strs(&s.defaults()))
}

/// Symbolic name of an errno value (`ETIMEDOUT`), or the number as text for one the C library
/// does not name.
pub fn errno_name(errno: i32) -> String {
    match nix::errno::Errno::from_raw(errno) {
        nix::errno::Errno::UnknownErrno => errno.to_string(),
        e => format!("{e:?}"),
    }
}

/// One value of a record field, as [`RecordKind::fields`] hands it out.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum FieldValue<'a> {
    U64(u64),
    I64(i64),
    F64(f64),
    Bool(bool),
    Str(&'a str),
    /// A list of names (may be empty).
    Strs(&'a [&'static str]),
    /// A number or JSON `null` (text output leaves it out).
    OptU64(Option<u64>),
}

/// Receives a record's fields in order (see [`RecordKind::fields`]).
pub trait FieldSink {
    type Error;
    fn field(&mut self, key: &'static str, value: FieldValue<'_>) -> Result<(), Self::Error>;
}

/// Identity and context of a tracked connection, copied into every record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnView {
    /// Engine-assigned id, unique for the agent's lifetime (never reused, unlike `sk`).
    pub id: u64,
    pub sk: u64,
    pub netns: u32,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// The process that owns the connection, where known (connect, setsockopt).
    pub process: Option<Process>,
    /// Monotonic ns when tracking started.
    pub first_seen_ns: u64,
}

/// One timeline change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// CLOCK_MONOTONIC ns from the kernel event that caused it.
    pub ts_ns: u64,
    pub conn: ConnView,
    pub kind: RecordKind,
}

/// Engine health, for reporting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub events: u64,
    /// Connections tracked now.
    pub tracked: u64,
    /// Connections tracked since the engine started.
    pub opened: u64,
    /// Connections not tracked because the cap was reached, each once (see `Engine::refuse`).
    pub cap_rejected: u64,
    /// Notes about sockets not tracked (an option set before `connect()`, an owner) forgotten
    /// after ten minutes: their sockets' destruction was missed.
    pub pending_expired: u64,
    /// Connections that ended with a `close` record.
    pub closed: u64,
    /// Connections that ended with an `untracked` record (close not seen, or no longer followed).
    pub untracked: u64,
    /// Pending (pre-connect) settings dropped because their socket was destroyed unconnected.
    pub pending_dropped: u64,
    /// Deaths of connections the engine did not follow (no keep-alive), each reported as a
    /// self-contained group of records.
    pub unfollowed_deaths: u64,
    /// Plain closes of connections the engine did not follow (`--all-closes`).
    pub unfollowed_closes: u64,
    /// Resets sent by time-wait or closed sockets the engine did not follow.
    pub unfollowed_resets: u64,
    /// Probes that only the kernel's probe counter showed: the timer runs that sent them reached
    /// no record, whether or not the kernel side also counted the run as lost (unpaired). Later
    /// probes keep their true numbers.
    pub unreported_probes: u64,
    /// Events handled at once, out of order, because holding them until their timer run's event
    /// would have passed a bound (sockets holding events: the connection cap; events per socket:
    /// 64): a death's records may then show its cause after it.
    pub unordered: u64,
}
