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
            SettingsSource::Kernel => "kernel",
        }
    }
}

/// Why the kernel killed the connection from the keep-alive timer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeoutReason {
    /// `TCP_KEEPCNT` probes went unanswered.
    Keepalive,
    /// `TCP_USER_TIMEOUT` expired while probes were unanswered.
    UserTimeout,
}

impl TimeoutReason {
    pub fn name(self) -> &'static str {
        match self {
            TimeoutReason::Keepalive => "keepalive",
            TimeoutReason::UserTimeout => "user_timeout",
        }
    }
}

/// How a keep-alive episode (first probe → ...) ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EpisodeOutcome {
    /// The peer answered after `probes` probes.
    Answered,
    /// The keep-alive timer killed the connection.
    TimedOut(TimeoutReason),
    /// The connection was reset (by us or the peer) during the episode.
    Reset,
    /// The connection closed otherwise (application close, error).
    Closed,
}

/// A finished keep-alive episode: from the first probe to its outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Episode {
    /// Monotonic ns of the first probe.
    pub start_ns: u64,
    /// Monotonic ns of the outcome.
    pub end_ns: u64,
    pub probes: u32,
    pub outcome: EpisodeOutcome,
    /// Monotonic ns of each probe, in order.
    pub probe_ts_ns: Vec<u64>,
}

/// How precisely an answer to a probe was timed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckPrecision {
    /// The answering segment itself was seen (`tcp:tcp_probe`).
    Segment,
    /// Inferred at the next timer firing: the answer came at some time since the last probe.
    NextFiring,
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
    /// The keep-alive timer killed the connection.
    Timeout { reason: TimeoutReason, probes: u32 },
    /// This host reset the connection; `reason` lowercase kernel name (`tcp_keepalive_timeout`),
    /// `not_specified` where the kernel gives none.
    Reset { reason: String, active: bool },
    /// The peer reset the connection.
    PeerReset,
    /// A socket error (`errno` positive).
    Error { errno: i32 },
    /// The connection closed. `state` is the TCP state it left for CLOSE.
    Close { state: TcpState },
    /// A keep-alive episode ended (emitted right after the record that ended it).
    EpisodeEnd(Episode),
}

impl RecordKind {
    /// The JSON `event` name.
    pub fn name(&self) -> &'static str {
        match self {
            RecordKind::Opened { .. } => "open",
            RecordKind::Config { .. } => "config",
            RecordKind::Probe { .. } => "probe",
            RecordKind::Ack { .. } => "ack",
            RecordKind::Suppressed { .. } => "suppressed",
            RecordKind::Idle { .. } => "idle",
            RecordKind::Busy => "busy",
            RecordKind::FinWait2 => "fin_wait2",
            RecordKind::Timeout { .. } => "timeout",
            RecordKind::Reset { .. } => "reset",
            RecordKind::PeerReset => "peer_reset",
            RecordKind::Error { .. } => "error",
            RecordKind::Close { .. } => "close",
            RecordKind::EpisodeEnd(_) => "episode",
        }
    }
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
    /// Connections not tracked because the cap was reached.
    pub cap_rejected: u64,
    pub evicted_closed: u64,
    /// Pending (pre-connect) settings dropped because their socket was destroyed unconnected.
    pub pending_dropped: u64,
}
