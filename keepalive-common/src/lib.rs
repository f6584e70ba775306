//! Types shared by the eBPF programs (`keepalive-ebpf`) and the agent (`keepalive-agent`).
//!
//! Everything here is `#[repr(C)]` plain data: the kernel side writes [`RawEvent`]s into a BPF ring
//! buffer (or an iterator's seq file) and the agent reads them back byte for byte. The agent hands
//! the programs an [`Offsets`] value as a read-only global before loading them: every kernel struct
//! offset and enum value the programs use is resolved from the running kernel's BTF, none is
//! compiled in.
//!
//! The `user` feature adds the `aya::Pod` impls the agent needs; the eBPF side builds `no_std`
//! without it.
#![no_std]

/// Where one field of a kernel struct lives, relative to the start of the object the program holds
/// a pointer to (for example `struct sock`, which is also the start of `tcp_sock`).
///
/// `size == 0` means the field does not exist on this kernel; reading it yields 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Field {
    /// Byte offset from the start of the containing object.
    pub off: u32,
    /// Size in bytes: 1, 2, 4, 8 or 16 (addresses). 0: absent.
    pub size: u32,
}

impl Field {
    pub const ABSENT: Field = Field { off: 0, size: 0 };

    pub const fn new(off: u32, size: u32) -> Self {
        Field { off, size }
    }

    pub const fn present(&self) -> bool {
        self.size != 0
    }
}

/// Kernel layout facts resolved at start-up from BTF (and `/proc/kallsyms` for addresses), handed to
/// every program as the read-only global `OFFSETS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Offsets {
    /// Address of `tcp_keepalive_timer` (the function of `sk->sk_timer`), from `/proc/kallsyms`.
    pub tcp_keepalive_timer: u64,
    /// Address of `jiffies_64` (or `jiffies`) from `/proc/kallsyms`, 0 when not listed
    /// (CONFIG_KALLSYMS_ALL off). Used by the fentry/kprobe timer programs, which get no `baseclk`.
    pub jiffies_addr: u64,

    // struct timer_list
    /// `timer_list.function`.
    pub timer_function: Field,
    /// `timer_list.expires` (jiffies).
    pub timer_expires: Field,
    /// `timer_list.entry.pprev`: non-NULL while the timer is pending.
    pub timer_pprev: Field,

    // struct sock / sock_common (offsets from the start of struct sock)
    /// The keep-alive timer embedded in the socket: `inet_connection_sock.icsk_keepalive_timer`
    /// where the kernel has it (2025, also in stable kernels), else `sock.sk_timer`.
    pub sk_timer: Field,
    pub skc_family: Field,
    pub skc_state: Field,
    /// Local port, host byte order.
    pub skc_num: Field,
    /// Remote port, network byte order.
    pub skc_dport: Field,
    pub skc_rcv_saddr: Field,
    pub skc_daddr: Field,
    pub skc_v6_rcv_saddr: Field,
    pub skc_v6_daddr: Field,
    /// `sock_common.skc_net` (a `possible_net_t`, i.e. a `struct net *`).
    pub skc_net: Field,
    pub sk_protocol: Field,
    pub sk_flags: Field,
    pub sk_err: Field,
    /// `sock.sk_lock.owned`: the socket is owned by a process (the timer only re-arms).
    pub sk_lock_owned: Field,

    // struct inet_connection_sock
    pub icsk_probes_out: Field,
    pub icsk_user_timeout: Field,
    pub icsk_ack_lrcvtime: Field,

    // struct tcp_sock
    pub tp_packets_out: Field,
    pub tp_write_seq: Field,
    pub tp_snd_nxt: Field,
    pub tp_rcv_tstamp: Field,
    pub tp_keepalive_time: Field,
    pub tp_keepalive_intvl: Field,
    pub tp_keepalive_probes: Field,

    // struct net
    /// `net.ns.inum`: the network namespace's inode number.
    pub net_ns_inum: Field,
    pub net_keepalive_time: Field,
    pub net_keepalive_intvl: Field,
    pub net_keepalive_probes: Field,

    // enum values
    /// Bit number of `SOCK_KEEPOPEN` in `sk_flags` (enum sock_flags).
    pub sock_keepopen_bit: u32,
    /// Bit number of `SOCK_DEAD` in `sk_flags`.
    pub sock_dead_bit: u32,
    pub tcp_established: u32,
    pub tcp_syn_sent: u32,
    pub tcp_close: u32,
    pub tcp_listen: u32,
    /// `IPPROTO_TCP`.
    pub ipproto_tcp: u32,
    /// `AF_INET6` (addresses are read from the v6 fields).
    pub af_inet6: u32,
    /// 1 when the `tcp_send_reset` tracepoint carries a third argument (the reset reason, 6.10+).
    pub reset_has_reason: u32,
    /// 1 + the index of the parameter named `reason` of `tcp_send_active_reset` in its BTF
    /// prototype (6.10+; `(sk, priority, reason)` upstream, `(sk, reason)` in some stable kernels),
    /// 0 when it has none.
    pub active_reset_reason_arg: u32,
    /// CONFIG_HZ, for the fentry/kprobe setsockopt programs that report applied values.
    pub hz: u32,
    /// Bit `1 << state` set for the TCP states the start-up snapshot reports (full, connected
    /// sockets: not LISTEN, SYN_SENT, CLOSE, TIME_WAIT or request sockets). Set by the loader from the
    /// BTF state names.
    pub snapshot_state_mask: u32,

    // Process attribution of accepted sockets and of sockets found by the start-up snapshot.
    // All optional: a field absent on this kernel (`size == 0`) disables only that attribution.
    /// `sock.sk_socket` (the `struct socket` of a socket with a file).
    pub sk_socket: Field,
    /// `socket.sk`.
    pub socket_sk: Field,
    /// `socket.file`: the file back-pointer, to check that a file's `private_data` is its socket.
    pub socket_file: Field,
    /// `file.private_data` (the `struct socket` of a socket file).
    pub file_private_data: Field,
    /// `file.f_inode`.
    pub file_f_inode: Field,
    /// `inode.i_ino`: what `/proc/PID/fd/N` shows as `socket:[INODE]`.
    pub inode_i_ino: Field,
    /// `task_struct.files`.
    pub task_files: Field,
    /// `files_struct.fdt`.
    pub files_fdt: Field,
    /// `fdtable.max_fds`.
    pub fdt_max_fds: Field,
    /// `fdtable.fd` (an array of `struct file *`).
    pub fdt_fd: Field,
    /// `syscall_trace_exit.ret`: the return value in the record of a `syscalls:sys_exit_*`
    /// tracepoint.
    pub sys_exit_ret: Field,

    // Deaths of any connection (issue 14). Optional: a field absent on this kernel (`size == 0`)
    // leaves only that fact out of the death records.
    /// `tcp_sock.lsndtime`: jiffies (32 bits) of the last data segment sent.
    pub tp_lsndtime: Field,
    /// `tcp_sock.snd_una`: first byte not acknowledged by the peer.
    pub tp_snd_una: Field,
    /// `tcp_sock.retrans_stamp`: time (ms of `tcp_mstamp`) of the first retransmission of the
    /// data now unacknowledged, 0 while nothing is retransmitted.
    pub tp_retrans_stamp: Field,
    /// `tcp_sock.tcp_mstamp`: the socket's clock, µs (refreshed by the retransmission timer).
    pub tp_tcp_mstamp: Field,
    /// `inet_connection_sock.icsk_retransmits`: retransmissions by the retransmission timer.
    pub icsk_retransmits: Field,
    /// `TCP_TIME_WAIT`: a reset sent by a socket in this state comes from an `inet_timewait_sock`,
    /// read through its `sock_common` part only.
    pub tcp_time_wait: u32,
    /// `TCP_NEW_SYN_RECV`: a request socket (`sock_common` part only).
    pub tcp_new_syn_recv: u32,
    /// Bit `1 << state` set for the states whose change to CLOSE ends an established connection
    /// (ESTABLISHED, FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT, LAST_ACK, CLOSING). Set by the loader.
    pub conn_close_mask: u32,
    /// 1: report the close of every connection (`--all-closes`), not only deaths (a close with
    /// `sk_err` set) of connections without keep-alive.
    pub report_all_closes: u32,
    /// `inet_sock.inet_sport` (network order): the local port of a full socket, still set after
    /// `inet_put_port()` cleared `skc_num` on the way to CLOSE (the state-change tracepoint fires
    /// after that).
    pub inet_sport: Field,

    // `audit` socket walk (the `audit_tcp` and `audit_files` iterators). Appended: the fields
    // above keep their places. `tp_lsndtime`, `tp_snd_una` and `icsk_retransmits` above serve it too.
    /// Bit `1 << state` set for the TCP states the audit iterator reports (ESTABLISHED,
    /// CLOSE_WAIT, and LISTEN to tell inherited settings). Set by the loader from BTF state names.
    pub audit_state_mask: u32,
    /// BTF type id of `struct tcp_sock` in the kernel's BTF, for `bpf_rdonly_cast` (0: unknown;
    /// the programs that need it are then not loaded). Also keeps the layout free of holes.
    pub tcp_sock_btf_id: u32,
    /// `inet_connection_sock.icsk_pending`: which event the retransmit timer is armed for
    /// (`ICSK_TIME_*`).
    pub icsk_pending: Field,
    /// When the retransmit timer fires: `icsk_timeout` (before 6.15) or
    /// `icsk_retransmit_timer.expires` (since), jiffies.
    pub icsk_timeout: Field,
    /// `inet_connection_sock.icsk_backoff`.
    pub icsk_backoff: Field,
    /// `net.ipv4.sysctl_tcp_retries2` of the namespace.
    pub net_tcp_retries2: Field,
    /// `task_struct.tgid` (the process id), for the `audit_files` iterator.
    pub task_tgid: Field,
    /// `inode.i_mode` (file type and permissions), for the `audit_files` iterator.
    pub inode_i_mode: Field,

    // The owner of a death (issue 14). Appended: the fields above keep their places.
    /// `task_struct.flags` (`PF_*`): `PF_KTHREAD` marks a kernel thread, which never owns a
    /// connection (a worker that releases a file for someone else). Absent: a death is never
    /// attributed to the current task, only through the socket's inode.
    pub task_flags: Field,

    // Accepted sockets (issue 10). Appended: the fields above keep their places.
    /// `TCP_SYN_RECV`: a passively opened socket leaves it for ESTABLISHED before `accept()` can
    /// return it (the state-change tracepoint marks a keep-alive one, [`ACCEPT_WINDOW_S`]).
    pub tcp_syn_recv: u32,
    /// Explicit padding (keeps the layout free of implicit holes).
    pub accept_pad: u32,

    // Which segments answer a probe. Appended: the fields above keep their places. Optional: with
    // any absent, every segment received while probes are out counts as the answer (as before).
    /// `tcp_sock.rcv_wup`: `rcv_nxt` at the last window update; a segment that ends before it is
    /// wholly old (the peer's own keep-alive probe: one byte before `rcv_nxt`) and is dropped.
    pub tp_rcv_wup: Field,
    /// `TCP_SKB_CB(skb)->end_seq`, from the start of `struct sk_buff` (`cb` plus the member's
    /// offset in `struct tcp_skb_cb`; the loader adds them).
    pub skb_end_seq: Field,
    /// `TCP_SKB_CB(skb)->ack_seq`, from the start of `struct sk_buff`.
    pub skb_ack_seq: Field,
    /// `TCP_SKB_CB(skb)->tcp_flags` (the header's flag byte; 2 bytes on current kernels), from the
    /// start of `struct sk_buff`.
    pub skb_tcp_flags: Field,

    // Whether the application read the peer's FIN before a reset (optional: without them, a reset
    // after the peer's FIN with data unacknowledged is the reuse race, as before). Appended.
    /// `tcp_sock.rcv_nxt`: the next sequence number expected (a FIN received counts one).
    pub tp_rcv_nxt: Field,
    /// `tcp_sock.copied_seq`: the next sequence number the application reads (reading the end of
    /// stream counts the FIN).
    pub tp_copied_seq: Field,

    // The namespace filter (`--netns`). Appended: the fields above keep their places.
    /// Inode of the only network namespace whose events are sent (0: every namespace). Set by the
    /// loader from `--netns`: events of other namespaces then cost no ring-buffer record and no
    /// work in the agent.
    pub only_netns: u32,
    /// Explicit padding (keeps the layout free of implicit holes).
    pub only_netns_pad: u32,
}

/// How long, in seconds, after a keep-alive-relevant socket was passively established (or the
/// first accept after the agent started) the accept-owner programs look at the sockets `accept()`
/// returns. Outside that window, on a host whose listeners have no keep-alive (most web servers),
/// an accept costs a map read and a read of `jiffies` instead of a walk of the descriptor table.
/// A keep-alive socket left in an accept queue longer than this is not named by its accept (its
/// process then comes from a `setsockopt` or from the owner lookups at its end).
pub const ACCEPT_WINDOW_S: u64 = 30;

/// The window's mark is rewritten at most this often, in seconds (it is one cache line that the
/// state changes of every CPU would otherwise write).
pub const ACCEPT_MARK_REFRESH_S: u64 = 1;

/// The mark as the agent writes it before attaching: the window opens at the first accept (so a
/// keep-alive socket already waiting in an accept queue is named).
pub const ACCEPT_MARK_AT_START: u64 = u64::MAX;

impl Offsets {
    /// Whether every offset the accept-owner programs need was found.
    pub const fn accept_owner_ready(&self) -> bool {
        self.task_files.present()
            && self.files_fdt.present()
            && self.fdt_max_fds.present()
            && self.fdt_fd.present()
            && self.file_private_data.present()
            && self.socket_sk.present()
            && self.socket_file.present()
            && self.sys_exit_ret.size == 8
    }

    /// Whether the start-up snapshot can read each socket's inode number.
    pub const fn socket_inode_ready(&self) -> bool {
        self.sk_socket.present() && self.socket_file.present() && self.file_f_inode.present() && self.inode_i_ino.present()
    }
}

/// What produced a [`RawEvent`].
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// One run of `tcp_keepalive_timer` on a socket: state read at timer entry and at timer exit.
    Timer = 1,
    /// A segment arrived while keep-alive probes were outstanding (`tcp:tcp_probe` with
    /// `icsk_probes_out > 0`): the peer answered.
    Ack = 2,
    /// The socket sent a reset (`tcp:tcp_send_reset`); `FLAG_ACTIVE` when it was
    /// `tcp_send_active_reset` (no incoming skb).
    ResetSent = 3,
    /// A reset arrived from the peer (`tcp:tcp_receive_reset`); carries the socket's idle times
    /// and `unacked`, like a change to CLOSE.
    ResetReceived = 4,
    /// `sock:inet_sk_error_report`: a socket error was reported (`err` holds `sk_err`).
    Error = 5,
    /// `sock:inet_sock_set_state` to SYN_SENT, ESTABLISHED or CLOSE (`state` old, `new_state` new).
    /// A change to CLOSE carries the socket's idle times (`since_*_jiffies`), `retransmits`,
    /// `unacked` and `retransmitting_ms`; it is reported for sockets without keep-alive too when
    /// `sk_err` is set (a death), or for every connection with `Offsets::report_all_closes`.
    /// A change to CLOSE of a socket without keep-alive that still has a file names its owner:
    /// `FLAG_PROCESS` when the change ran in the owner's process context (the socket locked by its
    /// process), else, for a death, `sock_ino` for the agent to find the process holding it.
    State = 6,
    /// `cgroup/setsockopt` saw a keep-alive option.
    Setsockopt = 7,
    /// `iter/tcp` start-up snapshot of one existing socket.
    Snapshot = 8,
    /// `tcp:tcp_destroy_sock`: the socket is gone; its address may be reused. Reported for
    /// keep-alive-relevant sockets, and, with `FLAG_PROCESS`, for others that their process
    /// closes once they are CLOSE (after a death): the owner of that death.
    Destroy = 9,
    /// The process holding the socket: the one that accepted it (`syscalls:sys_exit_accept4`,
    /// `syscalls:sys_exit_accept`), or, for a socket found by the start-up snapshot, one found in
    /// `/proc/PID/fd` (made by the agent, never by the kernel side). Carries `FLAG_PROCESS`.
    Owner = 10,
}

impl EventKind {
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Timer,
            2 => Self::Ack,
            3 => Self::ResetSent,
            4 => Self::ResetReceived,
            5 => Self::Error,
            6 => Self::State,
            7 => Self::Setsockopt,
            8 => Self::Snapshot,
            9 => Self::Destroy,
            10 => Self::Owner,
            _ => return None,
        })
    }
}

/// Number of event kinds, for per-kind counters (index = kind value).
pub const EVENT_KINDS: usize = 11;

/// `SOCK_KEEPOPEN` was set (at timer entry / at the event).
pub const FLAG_KEEPOPEN: u32 = 1 << 0;
/// `SOCK_DEAD` was set (orphaned socket).
pub const FLAG_DEAD: u32 = 1 << 1;
/// The socket was owned by a process: the timer only re-armed itself 50 ms later.
pub const FLAG_OWNED: u32 = 1 << 2;
/// The keep-alive timer was pending when the event was read (timer exit: it was re-armed).
pub const FLAG_TIMER_PENDING: u32 = 1 << 3;
/// `reason` holds a kernel `enum sk_rst_reason` value.
pub const FLAG_HAS_REASON: u32 = 1 << 4;
/// The reset was active (`tcp_send_active_reset`: no incoming segment).
pub const FLAG_ACTIVE: u32 = 1 << 5;
/// `pid`, `tid`, `comm` and `cgroup_id` describe the process that caused the event.
pub const FLAG_PROCESS: u32 = 1 << 6;
/// `SOCK_KEEPOPEN` at timer exit.
pub const FLAG_KEEPOPEN_AFTER: u32 = 1 << 7;
/// The event happened inside a run of `tcp_keepalive_timer` on the same socket (a reset, error or
/// close caused by the timer). The [`EventKind::Timer`] record of that run, emitted at timer exit,
/// follows it in the ring buffer: the agent orders the timer's classification first.
pub const FLAG_IN_TIMER: u32 = 1 << 8;

/// One event from the kernel. Fixed size; fields that do not apply to a kind are 0.
///
/// Times: `ts_ns` is `bpf_ktime_get_ns()` (CLOCK_MONOTONIC). Jiffies values
/// (`jiffies`, `timer_expires`, keep-alive times) are converted with the kernel's HZ in user space.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawEvent {
    /// Monotonic time of the event (timer entry for [`EventKind::Timer`]).
    pub ts_ns: u64,
    /// `rcv_nxt - copied_seq` at a close or a reset received: bytes received that the application
    /// has not read, the peer's FIN counting one until the application read the end of stream;
    /// `u32::MAX` where the kernel lacks the fields. 0 on other events.
    pub unread: u32,
    /// Unused, 0 (with `unread`, what was the time at timer exit: no reader needed it, and the
    /// clock read cost ~70 ns on every keep-alive timer run).
    pub reserved: u32,
    /// Kernel address of the `struct sock`: the socket's identity while it lives.
    pub sk: u64,
    /// `bpf_get_current_cgroup_id()` with `FLAG_PROCESS`.
    pub cgroup_id: u64,
    /// Jiffies when the event was read (timer: the timer base clock at expiry).
    pub jiffies: u64,
    /// `sk_timer.expires` after the event (timer exit; snapshot: as found).
    pub timer_expires: u64,
    /// Local address (IPv4 in the first 4 bytes, network order).
    pub saddr: [u8; 16],
    /// Remote address.
    pub daddr: [u8; 16],
    /// Task name with `FLAG_PROCESS`.
    pub comm: [u8; 16],
    /// `FLAG_*` bits.
    pub flags: u32,
    /// Network namespace inode number.
    pub netns: u32,
    /// Process id (tgid) with `FLAG_PROCESS`.
    pub pid: u32,
    /// Thread id with `FLAG_PROCESS`.
    pub tid: u32,
    /// `tp->keepalive_time` in jiffies (0: the namespace's sysctl applies).
    pub keepalive_time: u32,
    /// `tp->keepalive_intvl` in jiffies (0: sysctl).
    pub keepalive_intvl: u32,
    /// `net.ipv4.tcp_keepalive_time` of the socket's namespace, jiffies.
    pub sysctl_time: u32,
    /// `net.ipv4.tcp_keepalive_intvl` of the socket's namespace, jiffies.
    pub sysctl_intvl: u32,
    /// `icsk_user_timeout` in milliseconds (0: unset).
    pub user_timeout_ms: u32,
    /// `tp->packets_out`: segments in flight, unacknowledged.
    pub packets_out: u32,
    /// `write_seq - snd_nxt`: bytes queued but not yet sent.
    pub unsent: u32,
    /// Jiffies since the last segment was received (`max(rcv_tstamp, lrcvtime)`), at timer entry.
    pub idle_jiffies: u32,
    /// `sk_err` (error, timer exit) or errno.
    pub err: i32,
    /// Reset reason (`enum sk_rst_reason`) with `FLAG_HAS_REASON`.
    pub reason: u32,
    /// setsockopt: level.
    pub level: i32,
    /// setsockopt: option name.
    pub optname: i32,
    /// setsockopt: the value passed (an int).
    pub optval: i32,
    /// Local port (host order).
    pub sport: u16,
    /// Remote port (host order).
    pub dport: u16,
    /// [`EventKind`] value.
    pub kind: u8,
    /// Address family (`AF_INET`, `AF_INET6`).
    pub family: u8,
    /// TCP state at the event (timer entry; old state for [`EventKind::State`]).
    pub state: u8,
    /// TCP state after (timer exit; new state for [`EventKind::State`]).
    pub new_state: u8,
    /// `icsk_probes_out` at the event (timer entry).
    pub probes_out: u8,
    /// `icsk_probes_out` at timer exit.
    pub probes_out_after: u8,
    /// `tp->keepalive_probes` (0: sysctl).
    pub keepalive_probes: u8,
    /// `net.ipv4.tcp_keepalive_probes` of the socket's namespace.
    pub sysctl_probes: u8,
    /// Inode number of the socket's file ([`EventKind::Snapshot`], and an [`EventKind::State`]
    /// death without `FLAG_PROCESS`; 0 when the socket has no file or the kernel lacks the
    /// offsets): the `INODE` of `socket:[INODE]` in `/proc/PID/fd`.
    pub sock_ino: u64,
    /// Jiffies since the last data segment was sent (`lsndtime`), at a close or a reset received.
    pub since_sent_jiffies: u32,
    /// Jiffies since the last data segment was received (`icsk_ack.lrcvtime`), same events.
    pub since_data_jiffies: u32,
    /// Jiffies since the last acknowledgment was received (`rcv_tstamp`), same events.
    pub since_ack_jiffies: u32,
    /// `icsk_retransmits`, same events.
    pub retransmits: u32,
    /// `write_seq - snd_una`: bytes written and not acknowledged by the peer, same events.
    pub unacked: u32,
    /// ms since the first retransmission of the data now unacknowledged (`tcp_mstamp -
    /// retrans_stamp`), `u32::MAX` when nothing is retransmitted or the kernel lacks the fields.
    pub retransmitting_ms: u32,
}

impl RawEvent {
    pub const fn zeroed() -> Self {
        RawEvent {
            ts_ns: 0,
            unread: 0,
            reserved: 0,
            sk: 0,
            cgroup_id: 0,
            jiffies: 0,
            timer_expires: 0,
            saddr: [0; 16],
            daddr: [0; 16],
            comm: [0; 16],
            flags: 0,
            netns: 0,
            pid: 0,
            tid: 0,
            keepalive_time: 0,
            keepalive_intvl: 0,
            sysctl_time: 0,
            sysctl_intvl: 0,
            user_timeout_ms: 0,
            packets_out: 0,
            unsent: 0,
            idle_jiffies: 0,
            err: 0,
            reason: 0,
            level: 0,
            optname: 0,
            optval: 0,
            sport: 0,
            dport: 0,
            kind: 0,
            family: 0,
            state: 0,
            new_state: 0,
            probes_out: 0,
            probes_out_after: 0,
            keepalive_probes: 0,
            sysctl_probes: 0,
            sock_ino: 0,
            since_sent_jiffies: 0,
            since_data_jiffies: 0,
            since_ack_jiffies: 0,
            retransmits: 0,
            unacked: 0,
            retransmitting_ms: 0,
        }
    }
}

/// Helper number the eBPF programs call in place of the kfunc `bpf_rdonly_cast` (Linux 6.2+): the
/// loader rewrites each such call into a call of the kfunc by its BTF id (the object format has no
/// kfunc relocation the loader library resolves). Far above any helper number, so an unrewritten
/// call is refused by the verifier, never taken for a helper.
pub const KFUNC_MARK_RDONLY_CAST: u32 = 0x7fff_0001;

/// Size of one [`RawEvent`] record in bytes.
pub const RAW_EVENT_SIZE: usize = core::mem::size_of::<RawEvent>();

/// The short record of an answer to a keep-alive probe ([`EventKind::Ack`]): all the answer
/// program knows, in 24 bytes instead of a [`RawEvent`]'s 192. That program runs on every segment
/// received while probes are out, and each record's bytes are stores in the kernel and cache lines
/// the agent reads on another CPU. `ts_ns` and `sk` sit at a [`RawEvent`]'s offsets, so a reader
/// that only wants the socket reads either record the same way; the length tells them apart.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawAck {
    /// Monotonic time the segment was received.
    pub ts_ns: u64,
    /// Network namespace inode number.
    pub netns: u32,
    /// `icsk_probes_out` when the answer came.
    pub probes_out: u8,
    /// [`EventKind::Ack`].
    pub kind: u8,
    /// Zero.
    pub pad: [u8; 2],
    /// Kernel address of the `struct sock`.
    pub sk: u64,
}

/// Size of one [`RawAck`] record in bytes.
pub const RAW_ACK_SIZE: usize = core::mem::size_of::<RawAck>();
const _: () = assert!(
    RAW_ACK_SIZE == 24
        && core::mem::offset_of!(RawAck, ts_ns) == core::mem::offset_of!(RawEvent, ts_ns)
        && core::mem::offset_of!(RawAck, sk) == core::mem::offset_of!(RawEvent, sk)
);

/// Bytes a record of `size` bytes takes in a BPF ring buffer: its 8-byte header and the record,
/// rounded up to 8.
pub const fn ring_record_bytes(size: usize) -> u64 {
    ((size as u64 + 8) + 7) & !7
}

/// Whether the record just reserved (`rec` bytes, included in the `pending` bytes not yet
/// consumed) takes the pending data to `first` (a power of two, as BPF ring sizes and their
/// fractions are) or to a power of two above it: the highest bit set of the pending size grew,
/// which is exactly when `pending ^ before > before`. The eBPF programs wake the agent only then.
pub const fn ring_wake_crosses_mark(pending: u64, rec: u64, first: u64) -> bool {
    let before = pending.saturating_sub(rec);
    pending >= first && (pending ^ before) > before
}

/// Size of the per-CPU `LOST` counter array. Slots `0..EVENT_KINDS`: events dropped because the
/// ring buffer was full, per [`EventKind`] value (index 0 is unused); then
/// [`LOST_SLOT_INFLIGHT`], [`LOST_SLOT_AWAIT_OWNER`], [`LOST_SLOT_TIMER_UNPAIRED`].
pub const LOST_SLOTS: u32 = EVENT_KINDS as u32 + 3;

/// Slot of the `LOST` array counting keep-alive settings (`Setsockopt` events) the kprobe
/// strategy could not report because its in-flight map lost the call's entry: the insert failed,
/// or the thread's previous call left its entry behind (its kretprobe never ran).
pub const LOST_SLOT_INFLIGHT: u32 = EVENT_KINDS as u32;

/// Slot of the `LOST` array counting deaths of connections not followed whose socket could not be
/// remembered until its destruction (the bounded table of sockets awaiting their owner's close was
/// full): their owner is only looked up in `/proc`.
pub const LOST_SLOT_AWAIT_OWNER: u32 = EVENT_KINDS as u32 + 1;

/// Slot of the `LOST` array counting `tcp_keepalive_timer` runs whose event could not be made
/// because one half of the run was not seen on the CPU: a timer entry found the previous run's
/// state still waiting for its exit, a timer exit named another timer than the entry it follows,
/// or (BTF-typed exit) a keep-alive timer's exit found no entry at all. Each is a timer event
/// lost (the kernel's probe counter shows the probes among them).
pub const LOST_SLOT_TIMER_UNPAIRED: u32 = EVENT_KINDS as u32 + 2;

/// Entries of the eBPF table of sockets whose death was reported without an owner, kept until the
/// socket is destroyed (see `LOST_SLOT_AWAIT_OWNER`).
pub const AWAIT_OWNER_MAX: u32 = 4096;

// Socket option constants (uapi, stable ABI).
pub const SOL_SOCKET: i32 = 1;
pub const SO_KEEPALIVE: i32 = 9;
pub const SOL_TCP: i32 = 6;
pub const TCP_KEEPIDLE: i32 = 4;
pub const TCP_KEEPINTVL: i32 = 5;
pub const TCP_KEEPCNT: i32 = 6;
pub const TCP_USER_TIMEOUT: i32 = 18;

/// [`AuditRecord::flags`]: `SOCK_KEEPOPEN` is set (SO_KEEPALIVE on); the bit of [`FLAG_KEEPOPEN`].
pub const AUDIT_KEEPOPEN: u32 = FLAG_KEEPOPEN;
/// [`AuditRecord::flags`]: `SOCK_DEAD` is set (orphaned socket); the bit of [`FLAG_DEAD`].
pub const AUDIT_DEAD: u32 = FLAG_DEAD;
/// [`AuditRecord::flags`]: the keep-alive timer (`sk_timer` / `icsk_keepalive_timer`) is pending.
pub const AUDIT_KEEPALIVE_TIMER_PENDING: u32 = 1 << 2;

/// One socket as the `audit_tcp` iterator (`iter/tcp`, kernel 5.9+) found it: everything the
/// `audit` command needs to tell its effective keep-alive settings, its idle times, its pending
/// timer and what it has in flight. Jiffies values are raw; the agent converts them with HZ
/// against [`AuditRecord::jiffies`], read in the same program run.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AuditRecord {
    /// Kernel address of the `struct sock`.
    pub sk: u64,
    /// Inode number of the socket's file (0: no file, e.g. orphaned or not yet accepted).
    pub sock_ino: u64,
    /// `bpf_jiffies64()` when the socket was read.
    pub jiffies: u64,
    /// Expiry of the keep-alive timer, jiffies (meaningful with [`AUDIT_KEEPALIVE_TIMER_PENDING`]).
    pub keepalive_expires: u64,
    /// Expiry of the retransmit timer (`icsk_timeout`), jiffies.
    pub retransmit_expires: u64,
    /// Local address (IPv4 in the first 4 bytes, network order).
    pub saddr: [u8; 16],
    /// Remote address.
    pub daddr: [u8; 16],
    /// `AUDIT_*` bits.
    pub flags: u32,
    /// Network namespace inode number.
    pub netns: u32,
    /// `tp->keepalive_time`, jiffies (0: the namespace's sysctl applies).
    pub keepalive_time: u32,
    /// `tp->keepalive_intvl`, jiffies (0: sysctl).
    pub keepalive_intvl: u32,
    /// `net.ipv4.tcp_keepalive_time` of the namespace, jiffies.
    pub sysctl_time: u32,
    /// `net.ipv4.tcp_keepalive_intvl` of the namespace, jiffies.
    pub sysctl_intvl: u32,
    /// `icsk_user_timeout`, ms (0: unset).
    pub user_timeout_ms: u32,
    /// `tp->packets_out`: segments in flight.
    pub packets_out: u32,
    /// `write_seq - snd_nxt`: bytes queued, not yet sent.
    pub unsent: u32,
    /// `snd_nxt - snd_una`: bytes sent, not yet acknowledged.
    pub unacked: u32,
    /// `tp->lsndtime`: jiffies (low 32 bits) of the last data sent.
    pub lsndtime: u32,
    /// `tp->rcv_tstamp`: jiffies (low 32 bits) of the last ACK received.
    pub rcv_tstamp: u32,
    /// `icsk_ack.lrcvtime`: jiffies (low 32 bits) of the last data received.
    pub lrcvtime: u32,
    /// Local port (host order).
    pub sport: u16,
    /// Remote port (host order).
    pub dport: u16,
    /// Address family.
    pub family: u8,
    /// Kernel TCP state value.
    pub state: u8,
    /// `icsk_probes_out`: keep-alive or zero-window probes unanswered.
    pub probes_out: u8,
    /// `tp->keepalive_probes` (0: sysctl).
    pub keepalive_probes: u8,
    /// `net.ipv4.tcp_keepalive_probes` of the namespace.
    pub sysctl_probes: u8,
    /// `icsk_pending` (`ICSK_TIME_*`, 0: the retransmit timer is idle).
    pub icsk_pending: u8,
    /// `icsk_retransmits`.
    pub retransmits: u8,
    /// `icsk_backoff`.
    pub backoff: u8,
    /// `net.ipv4.tcp_retries2` of the namespace.
    pub sysctl_retries2: u8,
    /// Explicit padding to a multiple of 8 bytes.
    pub pad: [u8; 7],
}

impl AuditRecord {
    pub const fn zeroed() -> Self {
        // SAFETY: plain integers and arrays; all-zero is a valid value.
        unsafe { core::mem::zeroed() }
    }
}

/// Size of one [`AuditRecord`] in bytes.
pub const AUDIT_RECORD_SIZE: usize = core::mem::size_of::<AuditRecord>();
// No implicit padding: the kernel side and the agent agree byte for byte.
const _: () = assert!(AUDIT_RECORD_SIZE == 144);

/// One socket file a process holds, from the `audit_files` iterator (`iter/task_file`, kernel
/// 5.8+): the inode number `/proc/PID/fd/N` shows as `socket:[INODE]`, and the process.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AuditFileRecord {
    pub ino: u64,
    /// Process id (`tgid`).
    pub tgid: u32,
    /// Explicit padding to 16 bytes.
    pub pad: u32,
}

/// Size of one [`AuditFileRecord`] in bytes.
pub const AUDIT_FILE_RECORD_SIZE: usize = core::mem::size_of::<AuditFileRecord>();
const _: () = assert!(AUDIT_FILE_RECORD_SIZE == 16);

#[cfg(feature = "user")]
mod user {
    unsafe impl aya::Pod for super::AuditFileRecord {}
    unsafe impl aya::Pod for super::AuditRecord {}
    // SAFETY: plain `#[repr(C)]` integer structs without padding holes that matter to the kernel.
    unsafe impl aya::Pod for super::Offsets {}
    unsafe impl aya::Pod for super::Field {}
    unsafe impl aya::Pod for super::RawEvent {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::{ring_record_bytes, ring_wake_crosses_mark, RAW_EVENT_SIZE};

    #[test]
    fn a_record_takes_its_header_and_is_rounded_to_eight() {
        assert_eq!(ring_record_bytes(1), 16);
        assert_eq!(ring_record_bytes(8), 16);
        assert_eq!(ring_record_bytes(9), 24);
        assert_eq!(ring_record_bytes(RAW_EVENT_SIZE) % 8, 0);
    }

    /// Filling a ring record by record wakes once per mark (1/16, 1/8, 1/4 and 1/2 of the ring),
    /// at the record that reaches it, never below the first mark or between marks.
    #[test]
    fn only_the_record_that_reaches_a_mark_wakes() {
        let size: u64 = 8 << 20;
        let first = size / 16;
        let rec = ring_record_bytes(RAW_EVENT_SIZE);
        let mut pending = 0;
        let mut wakes = Vec::new();
        while pending + rec <= size {
            pending += rec;
            if ring_wake_crosses_mark(pending, rec, first) {
                wakes.push(pending);
            }
        }
        assert_eq!(wakes.len(), 4, "{wakes:?}");
        for (w, mark) in wakes.iter().zip([first, first * 2, first * 4, first * 8]) {
            assert!(*w >= mark && *w - rec < mark, "wake at {w} for mark {mark}");
        }
    }

    #[test]
    fn a_record_exactly_on_a_mark_wakes_and_the_next_does_not() {
        assert!(ring_wake_crosses_mark(1024, 16, 1024));
        assert!(!ring_wake_crosses_mark(1040, 16, 1024));
        assert!(!ring_wake_crosses_mark(1008, 16, 1024));
        // A record larger than what was pending (the ring was empty) below the first mark.
        assert!(!ring_wake_crosses_mark(16, 16, 1024));
    }
}
