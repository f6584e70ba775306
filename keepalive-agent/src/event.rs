//! Typed events: what the decoder makes of a kernel [`keepalive_common::RawEvent`], and what the
//! timeline engine consumes. Nothing here knows which attach method produced an event.

use std::net::SocketAddr;

/// A TCP state, mapped from the kernel's enum values (read from BTF by name, not assumed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TcpState {
    Established,
    SynSent,
    SynRecv,
    FinWait1,
    FinWait2,
    TimeWait,
    Close,
    CloseWait,
    LastAck,
    Listen,
    Closing,
    NewSynRecv,
    BoundInactive,
    Unknown(u8),
}

impl TcpState {
    /// The kernel's name without the `TCP_` prefix, e.g. `ESTABLISHED`.
    pub fn name(self) -> &'static str {
        match self {
            TcpState::Established => "ESTABLISHED",
            TcpState::SynSent => "SYN_SENT",
            TcpState::SynRecv => "SYN_RECV",
            TcpState::FinWait1 => "FIN_WAIT1",
            TcpState::FinWait2 => "FIN_WAIT2",
            TcpState::TimeWait => "TIME_WAIT",
            TcpState::Close => "CLOSE",
            TcpState::CloseWait => "CLOSE_WAIT",
            TcpState::LastAck => "LAST_ACK",
            TcpState::Listen => "LISTEN",
            TcpState::Closing => "CLOSING",
            TcpState::NewSynRecv => "NEW_SYN_RECV",
            TcpState::BoundInactive => "BOUND_INACTIVE",
            TcpState::Unknown(_) => "UNKNOWN",
        }
    }

    /// Maps a kernel enum member name (`TCP_ESTABLISHED`) to a state.
    pub fn from_kernel_name(name: &str) -> Option<TcpState> {
        Some(match name.strip_prefix("TCP_").unwrap_or(name) {
            "ESTABLISHED" => TcpState::Established,
            "SYN_SENT" => TcpState::SynSent,
            "SYN_RECV" => TcpState::SynRecv,
            "FIN_WAIT1" => TcpState::FinWait1,
            "FIN_WAIT2" => TcpState::FinWait2,
            "TIME_WAIT" => TcpState::TimeWait,
            "CLOSE" => TcpState::Close,
            "CLOSE_WAIT" => TcpState::CloseWait,
            "LAST_ACK" => TcpState::LastAck,
            "LISTEN" => TcpState::Listen,
            "CLOSING" => TcpState::Closing,
            "NEW_SYN_RECV" => TcpState::NewSynRecv,
            "BOUND_INACTIVE" => TcpState::BoundInactive,
            _ => return None,
        })
    }
}

/// The process that caused an event (set only where the kernel ran in process context).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Process {
    pub pid: u32,
    pub tid: u32,
    /// Task name, NUL-padded (see [`Process::comm_str`]).
    pub comm: [u8; 16],
    pub cgroup_id: u64,
}

impl Process {
    pub fn comm_str(&self) -> &str {
        comm_str(&self.comm)
    }
}

/// A NUL-padded kernel task name as text (invalid UTF-8 is cut at the first bad byte).
pub fn comm_str(comm: &[u8; 16]) -> &str {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    match std::str::from_utf8(&comm[..end]) {
        Ok(s) => s,
        Err(e) => std::str::from_utf8(&comm[..e.valid_up_to()]).unwrap_or(""),
    }
}

/// Keep-alive settings as the socket holds them: `None` means the value is not set on the socket and
/// the namespace's sysctl default applies (the decoder fills `*_default` with that default).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SockSettings {
    /// `SO_KEEPALIVE` (SOCK_KEEPOPEN).
    pub keepalive: bool,
    pub idle_s: Option<u32>,
    pub intvl_s: Option<u32>,
    pub cnt: Option<u32>,
    /// `TCP_USER_TIMEOUT` in ms (0: unset).
    pub user_timeout_ms: u32,
    /// The namespace's `net.ipv4.tcp_keepalive_{time,intvl,probes}`.
    pub idle_default_s: u32,
    pub intvl_default_s: u32,
    pub cnt_default: u32,
}

impl SockSettings {
    pub fn effective_idle_s(&self) -> u32 {
        self.idle_s.unwrap_or(self.idle_default_s)
    }
    pub fn effective_intvl_s(&self) -> u32 {
        self.intvl_s.unwrap_or(self.intvl_default_s)
    }
    pub fn effective_cnt(&self) -> u32 {
        self.cnt.unwrap_or(self.cnt_default)
    }

    /// Which of `idle_s`, `intvl_s`, `cnt` come from the namespace's sysctls (not set on the socket).
    pub fn defaults(&self) -> Vec<&'static str> {
        [("idle_s", self.idle_s), ("intvl_s", self.intvl_s), ("cnt", self.cnt)]
            .into_iter()
            .filter(|(_, v)| v.is_none())
            .map(|(n, _)| n)
            .collect()
    }

    /// Whether keep-alive matters for a socket with these settings (`SO_KEEPALIVE` or
    /// `TCP_USER_TIMEOUT`).
    pub fn relevant(&self) -> bool {
        self.keepalive || self.user_timeout_ms > 0
    }

    /// Whether the kernel side reports the close and destruction of a socket with these settings
    /// whatever happens (`SO_KEEPALIVE`, `TCP_USER_TIMEOUT` or any keep-alive value set on it).
    pub fn reported_by_kernel(&self) -> bool {
        self.relevant() || self.has_socket_values()
    }

    /// Whether any of `TCP_KEEPIDLE`, `TCP_KEEPINTVL`, `TCP_KEEPCNT` is set on the socket itself.
    pub fn has_socket_values(&self) -> bool {
        self.idle_s.is_some() || self.intvl_s.is_some() || self.cnt.is_some()
    }

    /// The namespace defaults of `d` in place of these, when these were never read (all 0).
    pub fn with_defaults_from(mut self, d: &SockSettings) -> SockSettings {
        if self.idle_default_s == 0 && self.intvl_default_s == 0 && self.cnt_default == 0 {
            self.idle_default_s = d.idle_default_s;
            self.intvl_default_s = d.intvl_default_s;
            self.cnt_default = d.cnt_default;
        }
        self
    }
}

/// What a socket says about its last activity, read when it closes or receives a reset (jiffies
/// precision: 1 to 10 ms).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SockTimes {
    /// Since the last data segment was sent (`lsndtime`; a retransmission is a send).
    pub since_sent_ms: u64,
    /// Since the last data segment was received (`icsk_ack.lrcvtime`).
    pub since_data_ms: u64,
    /// Since the last acknowledgment was received (`rcv_tstamp`; a FIN carries one).
    pub since_ack_ms: u64,
    /// Retransmissions by the retransmission timer (`icsk_retransmits`).
    pub retransmits: u32,
    /// Bytes written and not acknowledged by the peer (`write_seq - snd_una`).
    pub unacked: u32,
    /// Since the first retransmission of the data now unacknowledged (`retrans_stamp`; the write
    /// itself came one retransmission timeout or more before); `None` when nothing is
    /// retransmitted (or the kernel lacks the fields).
    pub retransmitting_ms: Option<u64>,
    /// Bytes received and not read by the application (`rcv_nxt - copied_seq`), the peer's FIN
    /// counting one until the application read the end of stream; `None` where the kernel lacks
    /// the fields.
    pub unread: Option<u32>,
}

/// A keep-alive socket option as passed to `setsockopt(2)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SockOpt {
    KeepAlive,
    KeepIdle,
    KeepIntvl,
    KeepCnt,
    UserTimeout,
}

impl SockOpt {
    pub fn name(self) -> &'static str {
        match self {
            SockOpt::KeepAlive => "SO_KEEPALIVE",
            SockOpt::KeepIdle => "TCP_KEEPIDLE",
            SockOpt::KeepIntvl => "TCP_KEEPINTVL",
            SockOpt::KeepCnt => "TCP_KEEPCNT",
            SockOpt::UserTimeout => "TCP_USER_TIMEOUT",
        }
    }
}

/// One run of `tcp_keepalive_timer`: the socket as it was at entry and what changed by exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimerFiring {
    pub state_before: TcpState,
    pub state_after: TcpState,
    /// SOCK_KEEPOPEN at entry.
    pub keepopen: bool,
    /// SOCK_DEAD at entry (orphan).
    pub dead: bool,
    /// Socket owned by a process at entry: the kernel only re-armed the timer.
    pub owned: bool,
    pub probes_before: u8,
    pub probes_after: u8,
    /// Segments in flight, unacknowledged, at entry.
    pub packets_out: u32,
    /// Bytes queued but not yet sent, at entry.
    pub unsent: u32,
    /// Time since the last segment was received, at entry.
    pub idle_ms: u64,
    pub settings: SockSettings,
    /// `sk_err` at exit when the run closed the connection (ETIMEDOUT when the timer killed it);
    /// 0 when the connection is still open (the kernel side does not read it then).
    pub err_after: i32,
    /// When the timer fires next, if it was re-armed (ms after entry).
    pub next_in_ms: Option<u64>,
}

/// What the kernel reported. `ts_ns` is CLOCK_MONOTONIC from the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventBody {
    Timer(TimerFiring),
    /// A segment arrived while `probes` keep-alive probes were outstanding.
    Ack { probes: u8 },
    /// The socket sent a reset. `reason`: the kernel's `sk_rst_reason` name, lowercase without the
    /// `SK_RST_REASON_` prefix (None on kernels without reasons). `active`: `tcp_send_active_reset`.
    ResetSent { active: bool, reason: Option<String>, state: TcpState },
    /// The peer reset the connection. `times`: the socket's last activity, read at the reset.
    ResetReceived { state: TcpState, times: SockTimes },
    /// A socket error was reported; `errno` positive (e.g. 110 = ETIMEDOUT).
    Error { errno: i32, state: TcpState },
    /// State change (only to SYN_SENT, ESTABLISHED and CLOSE are reported). `err`: `sk_err` at a
    /// change to CLOSE (positive errno, 0 if none): the kernel sets it before closing a connection
    /// it kills and reports the error only after the close. `times`: the socket's last activity,
    /// read at a change to CLOSE (zero otherwise). Changes to CLOSE of sockets without keep-alive
    /// come only for deaths (`err` set), or for every connection with `--all-closes`.
    State {
        old: TcpState,
        new: TcpState,
        settings: SockSettings,
        process: Option<Process>,
        err: i32,
        times: SockTimes,
    },
    /// `setsockopt(2)` of a keep-alive option (value as passed by the caller). `settings`: the
    /// socket's settings and its namespace's sysctls as read just before the option applies.
    Setsockopt { option: SockOpt, value: i32, state: TcpState, process: Process, settings: SockSettings },
    /// A socket that existed when the agent started.
    Snapshot {
        state: TcpState,
        settings: SockSettings,
        /// `icsk_probes_out`: keep-alive probes unanswered when `packets_out` and `unsent` are 0,
        /// zero-window probes otherwise.
        probes_out: u8,
        /// Segments in flight, unacknowledged.
        packets_out: u32,
        /// Bytes queued but not yet sent.
        unsent: u32,
    },
    /// The socket was destroyed; its identity may be reused.
    Destroy,
    /// A process that holds the socket: the one that accepted it, or one found holding a socket of
    /// the start-up snapshot (then delivered just before that socket's [`EventBody::Snapshot`]).
    Owner { process: Process },
}

/// A decoded kernel event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// CLOCK_MONOTONIC nanoseconds when the kernel saw it.
    pub ts_ns: u64,
    /// Kernel address of the socket: its identity while it lives.
    pub sk: u64,
    /// Network namespace inode.
    pub netns: u32,
    /// Local and remote address; `None` while unknown (e.g. setsockopt before connect).
    pub addrs: Option<(SocketAddr, SocketAddr)>,
    /// Happened inside a `tcp_keepalive_timer` run on this socket; the [`EventBody::Timer`] event of
    /// that run arrives after it (it is emitted at timer exit).
    pub in_timer: bool,
    pub body: EventBody,
}

/// Kernel facts the decoder needs to turn raw values into typed ones; built from BTF at start-up
/// (see `kernel::facts`), or by hand in tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeTables {
    /// CONFIG_HZ: jiffies per second.
    pub hz: u32,
    /// Kernel TCP state value → state (from the BTF enum members named `TCP_*`).
    pub tcp_states: Vec<(u8, TcpState)>,
    /// `enum sk_rst_reason` value → lowercase name without `SK_RST_REASON_` (empty on kernels
    /// without reset reasons).
    pub reset_reasons: Vec<(u32, String)>,
    /// `AF_INET` and `AF_INET6` values.
    pub af_inet: u8,
    pub af_inet6: u8,
}

impl DecodeTables {
    /// Tables with Linux's usual values, for tests that need no kernel.
    pub fn linux_defaults() -> Self {
        let names = [
            (1, "ESTABLISHED"),
            (2, "SYN_SENT"),
            (3, "SYN_RECV"),
            (4, "FIN_WAIT1"),
            (5, "FIN_WAIT2"),
            (6, "TIME_WAIT"),
            (7, "CLOSE"),
            (8, "CLOSE_WAIT"),
            (9, "LAST_ACK"),
            (10, "LISTEN"),
            (11, "CLOSING"),
            (12, "NEW_SYN_RECV"),
            (13, "BOUND_INACTIVE"),
        ];
        DecodeTables {
            hz: 250,
            tcp_states: names
                .iter()
                .map(|&(v, n)| (v, TcpState::from_kernel_name(n).expect("known name")))
                .collect(),
            reset_reasons: vec![
                (0, "not_specified".into()),
                (14, "tcp_state".into()),
                (15, "tcp_keepalive_timeout".into()),
            ],
            af_inet: 2,
            af_inet6: 10,
        }
    }
}
