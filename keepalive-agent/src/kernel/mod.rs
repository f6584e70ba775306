//! Kernel facts resolved at start-up from the running kernel: struct offsets and enum values from
//! BTF (`/sys/kernel/btf/vmlinux`), the address of `tcp_keepalive_timer` from `/proc/kallsyms`, and
//! `CONFIG_HZ` from the kernel config. Nothing about the kernel's layout is compiled in.
//!
//! Offsets into `struct sock`, `struct inet_connection_sock` and `struct tcp_sock` are all relative
//! to the start of the socket: `tcp_sock` starts with an `inet_connection_sock`, which starts with an
//! `inet_sock`, which starts with a `sock`. That chain is checked, not assumed.

pub mod btf;
pub mod hz;
pub mod kallsyms;
pub mod progstats;

use std::ffi::CStr;
use std::io;
use std::path::Path;

use keepalive_common::{Field, Offsets};

use crate::event::{DecodeTables, TcpState};
pub use btf::BtfError;
use btf::{pick_anonymous_enum, BtfErrorKind, EnumInfo, KernelBtf};
pub use hz::HzError;
pub use kallsyms::KallsymsError;

/// Default location of the kernel's BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";
/// Default location of the kernel symbol table.
pub const KALLSYMS: &str = "/proc/kallsyms";
/// The function of the keep-alive timer of TCP sockets (`icsk->icsk_keepalive_timer`, or
/// `sk->sk_timer` on kernels without that field).
pub const KEEPALIVE_TIMER_SYMBOL: &str = "tcp_keepalive_timer";
/// BTF typedef of the `tcp:tcp_send_reset` tracepoint's raw prototype.
const SEND_RESET_TRACE_TYPEDEF: &str = "btf_trace_tcp_send_reset";

/// Resolving kernel facts failed; each variant says which file and which struct, field, enum or
/// symbol.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(transparent)]
    Btf(#[from] BtfError),
    #[error(transparent)]
    Kallsyms(#[from] KallsymsError),
    #[error(transparent)]
    Hz(#[from] HzError),
    #[error("uname(2) failed: {0}")]
    Uname(io::Error),
}

/// Everything the eBPF programs and the decoder need to know about the running kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelFacts {
    pub offsets: Offsets,
    pub tables: DecodeTables,
    /// Optional fields/enums absent on this kernel, as human-readable notes (e.g. "tcp_send_reset
    /// has no reset reason argument (kernel < 6.10)").
    pub notes: Vec<String>,
    /// `uname -r`.
    pub kernel_release: String,
}

/// The BTF-derived part of [`KernelFacts`] (no root needed: `/sys/kernel/btf/vmlinux` is
/// world-readable). `offsets.tcp_keepalive_timer` is 0 here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BtfFacts {
    pub offsets: Offsets,
    /// Kernel TCP state value → state.
    pub tcp_states: Vec<(u8, TcpState)>,
    /// `enum sk_rst_reason` value → lowercase name without `SK_RST_REASON_`.
    pub reset_reasons: Vec<(u32, String)>,
    pub notes: Vec<String>,
}

/// Resolves all facts from the standard locations.
pub fn resolve_default() -> Result<KernelFacts, KernelError> {
    resolve(Path::new(VMLINUX_BTF), Path::new(KALLSYMS))
}

/// Resolves all facts from the given BTF and kallsyms files (HZ from the system's config).
pub fn resolve(btf_path: &Path, kallsyms_path: &Path) -> Result<KernelFacts, KernelError> {
    let kernel_release = kernel_release()?;
    let BtfFacts { mut offsets, tcp_states, reset_reasons, notes } = resolve_btf(btf_path)?;
    offsets.tcp_keepalive_timer = kallsyms::lookup(kallsyms_path, KEEPALIVE_TIMER_SYMBOL)?;
    offsets.jiffies_addr = match kallsyms::lookup_data(kallsyms_path, "jiffies_64")? {
        Some(a) => a,
        None => kallsyms::lookup_data(kallsyms_path, "jiffies")?.unwrap_or(0),
    };
    // Without `jiffies` (CONFIG_KALLSYMS_ALL off) the fentry/kprobe timer programs approximate the
    // tick; the attach plan says so where it picks one of them.
    let hz = hz::detect(&hz::HzSources::system(&kernel_release))?;
    offsets.hz = hz;
    let tables =
        DecodeTables { hz, tcp_states, reset_reasons, af_inet: libc::AF_INET as u8, af_inet6: libc::AF_INET6 as u8 };
    log::debug!("kernel {kernel_release}: HZ {hz}, {} = {:#x}", KEEPALIVE_TIMER_SYMBOL, offsets.tcp_keepalive_timer);
    Ok(KernelFacts { offsets, tables, notes, kernel_release })
}

/// The facts that need no kernel addresses (BTF offsets and HZ, no `/proc/kallsyms`): enough for
/// the `audit` socket walk, which attaches to no kernel function. `offsets.tcp_keepalive_timer`
/// and `offsets.jiffies_addr` are 0.
pub fn resolve_without_addresses() -> Result<KernelFacts, KernelError> {
    let kernel_release = kernel_release()?;
    let btf = KernelBtf::from_file_mapped(Path::new(VMLINUX_BTF))?;
    let BtfFacts { mut offsets, tcp_states, reset_reasons, notes } = resolve_from(&btf)?;
    drop(btf);
    let hz = hz::detect(&hz::HzSources::system(&kernel_release))?;
    offsets.hz = hz;
    let tables =
        DecodeTables { hz, tcp_states, reset_reasons, af_inet: libc::AF_INET as u8, af_inet6: libc::AF_INET6 as u8 };
    Ok(KernelFacts { offsets, tables, notes, kernel_release })
}

/// `CONFIG_HZ` of the running kernel (see [`hz`](mod@hz) for the sources tried).
pub fn hz() -> Result<u32, KernelError> {
    Ok(hz::detect(&hz::HzSources::system(&kernel_release()?))?)
}

/// The running kernel's release, as `uname -r` prints it.
pub fn kernel_release() -> Result<String, KernelError> {
    // SAFETY: utsname is plain old data; uname fills it with NUL-terminated strings.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut uts) } != 0 {
        return Err(KernelError::Uname(io::Error::last_os_error()));
    }
    // SAFETY: `release` is NUL-terminated within its array after a successful uname.
    let release = unsafe { CStr::from_ptr(uts.release.as_ptr()) };
    Ok(release.to_string_lossy().into_owned())
}

/// How a field's size is checked.
#[derive(Clone, Copy, Debug)]
enum Shape {
    /// Read as an integer or address: 1, 2, 4, 8 or 16 bytes.
    Scalar,
    /// The embedded `struct timer_list`.
    TimerList,
}

/// Where one [`Offsets`] field comes from.
struct FieldSpec {
    strukt: &'static str,
    /// Member paths, tried in order (the first that exists wins).
    paths: &'static [&'static str],
    slot: fn(&mut Offsets) -> &mut Field,
    /// `None`: required. `Some(note)`: optional; the note explains what its absence means.
    absent_note: Option<&'static str>,
    shape: Shape,
}

const fn req(strukt: &'static str, paths: &'static [&'static str], slot: fn(&mut Offsets) -> &mut Field) -> FieldSpec {
    FieldSpec { strukt, paths, slot, absent_note: None, shape: Shape::Scalar }
}

const NO_IPV6: &str = "kernel built without CONFIG_IPV6: IPv6 addresses are not read";

/// Every [`Offsets`] field resolved from BTF.
const FIELDS: &[FieldSpec] = &[
    // struct timer_list (offsets from the start of the timer)
    req("timer_list", &["function"], |o| &mut o.timer_function),
    req("timer_list", &["expires"], |o| &mut o.timer_expires),
    req("timer_list", &["entry.pprev"], |o| &mut o.timer_pprev),
    // struct sock
    FieldSpec {
        strukt: "inet_connection_sock",
        paths: &["icsk_keepalive_timer", "icsk_inet.sk.sk_timer"],
        slot: |o| &mut o.sk_timer,
        absent_note: None,
        shape: Shape::TimerList,
    },
    req("sock", &["__sk_common.skc_family"], |o| &mut o.skc_family),
    req("sock", &["__sk_common.skc_state"], |o| &mut o.skc_state),
    req("sock", &["__sk_common.skc_num"], |o| &mut o.skc_num),
    req("sock", &["__sk_common.skc_dport"], |o| &mut o.skc_dport),
    req("sock", &["__sk_common.skc_rcv_saddr"], |o| &mut o.skc_rcv_saddr),
    req("sock", &["__sk_common.skc_daddr"], |o| &mut o.skc_daddr),
    FieldSpec {
        strukt: "sock",
        paths: &["__sk_common.skc_v6_rcv_saddr"],
        slot: |o| &mut o.skc_v6_rcv_saddr,
        absent_note: Some(NO_IPV6),
        shape: Shape::Scalar,
    },
    FieldSpec {
        strukt: "sock",
        paths: &["__sk_common.skc_v6_daddr"],
        slot: |o| &mut o.skc_v6_daddr,
        absent_note: Some(NO_IPV6),
        shape: Shape::Scalar,
    },
    req("sock", &["__sk_common.skc_net.net"], |o| &mut o.skc_net),
    req("sock", &["sk_protocol"], |o| &mut o.sk_protocol),
    // `sk_flags` is a macro for `__sk_common.skc_flags` on current kernels, a member on old ones.
    req("sock", &["sk_flags", "__sk_common.skc_flags"], |o| &mut o.sk_flags),
    req("sock", &["sk_err"], |o| &mut o.sk_err),
    req("sock", &["sk_lock.owned"], |o| &mut o.sk_lock_owned),
    // struct inet_connection_sock
    req("inet_connection_sock", &["icsk_probes_out"], |o| &mut o.icsk_probes_out),
    req("inet_connection_sock", &["icsk_user_timeout"], |o| &mut o.icsk_user_timeout),
    req("inet_connection_sock", &["icsk_ack.lrcvtime"], |o| &mut o.icsk_ack_lrcvtime),
    // struct tcp_sock
    req("tcp_sock", &["packets_out"], |o| &mut o.tp_packets_out),
    req("tcp_sock", &["write_seq"], |o| &mut o.tp_write_seq),
    req("tcp_sock", &["snd_nxt"], |o| &mut o.tp_snd_nxt),
    req("tcp_sock", &["rcv_tstamp"], |o| &mut o.tp_rcv_tstamp),
    req("tcp_sock", &["keepalive_time"], |o| &mut o.tp_keepalive_time),
    req("tcp_sock", &["keepalive_intvl"], |o| &mut o.tp_keepalive_intvl),
    req("tcp_sock", &["keepalive_probes"], |o| &mut o.tp_keepalive_probes),
    // struct net (offsets from the start of the namespace)
    req("net", &["ns.inum"], |o| &mut o.net_ns_inum),
    req("net", &["ipv4.sysctl_tcp_keepalive_time"], |o| &mut o.net_keepalive_time),
    req("net", &["ipv4.sysctl_tcp_keepalive_intvl"], |o| &mut o.net_keepalive_intvl),
    req("net", &["ipv4.sysctl_tcp_keepalive_probes"], |o| &mut o.net_keepalive_probes),
    // Process attribution (optional: without them, accepted and pre-existing sockets have no pid).
    owner("socket", &["file"], |o| &mut o.socket_file, NO_OWNER),
    owner("sock", &["sk_socket"], |o| &mut o.sk_socket, NO_SNAPSHOT_OWNER),
    owner("file", &["f_inode"], |o| &mut o.file_f_inode, NO_SNAPSHOT_OWNER),
    owner("inode", &["i_ino"], |o| &mut o.inode_i_ino, NO_SNAPSHOT_OWNER),
    owner("socket", &["sk"], |o| &mut o.socket_sk, NO_ACCEPT_OWNER),
    owner("file", &["private_data"], |o| &mut o.file_private_data, NO_ACCEPT_OWNER),
    owner("task_struct", &["files"], |o| &mut o.task_files, NO_ACCEPT_OWNER),
    owner("files_struct", &["fdt"], |o| &mut o.files_fdt, NO_ACCEPT_OWNER),
    owner("fdtable", &["max_fds"], |o| &mut o.fdt_max_fds, NO_ACCEPT_OWNER),
    owner("fdtable", &["fd"], |o| &mut o.fdt_fd, NO_ACCEPT_OWNER),
    owner("syscall_trace_exit", &["ret"], |o| &mut o.sys_exit_ret, NO_ACCEPT_OWNER),
    // Death facts (optional: without one, death records lack only that fact).
    owner("tcp_sock", &["lsndtime"], |o| &mut o.tp_lsndtime, NO_SINCE_SENT),
    owner("tcp_sock", &["snd_una"], |o| &mut o.tp_snd_una, NO_UNACKED),
    owner("tcp_sock", &["retrans_stamp"], |o| &mut o.tp_retrans_stamp, NO_RETRANSMITTING),
    owner("tcp_sock", &["tcp_mstamp"], |o| &mut o.tp_tcp_mstamp, NO_RETRANSMITTING),
    owner("inet_connection_sock", &["icsk_retransmits"], |o| &mut o.icsk_retransmits, NO_RETRANSMITS),
    owner("inet_sock", &["inet_sport"], |o| &mut o.inet_sport, NO_CLOSE_PORT),
    // `audit` (optional: each absent field leaves one column of `audit` empty, the rest works;
    // `lsndtime`, `snd_una` and `icsk_retransmits` above serve it too).
    owner("inet_connection_sock", &["icsk_pending"], |o| &mut o.icsk_pending, NO_AUDIT_TIMER),
    // `icsk_timeout` was folded into the retransmit timer's own expiry in 6.15.
    owner(
        "inet_connection_sock",
        &["icsk_timeout", "icsk_retransmit_timer.expires"],
        |o| &mut o.icsk_timeout,
        NO_AUDIT_TIMER,
    ),
    owner("inet_connection_sock", &["icsk_backoff"], |o| &mut o.icsk_backoff, NO_AUDIT_TIMER),
    owner("net", &["ipv4.sysctl_tcp_retries2"], |o| &mut o.net_tcp_retries2, NO_AUDIT_RETRIES2),
    owner("task_struct", &["tgid"], |o| &mut o.task_tgid, NO_AUDIT_FILES),
    owner("inode", &["i_mode"], |o| &mut o.inode_i_mode, NO_AUDIT_FILES),
    // The owner of a death in its own process context (optional: else found in /proc).
    owner("task_struct", &["flags"], |o| &mut o.task_flags, NO_DEATH_OWNER_TASK),
    // Which segments answer a probe (optional: else every segment received while probes are out
    // counts). The `tcp_skb_cb` members are offsets in `sk_buff.cb` until [`rebase_skb_cb`].
    owner("tcp_sock", &["rcv_wup"], |o| &mut o.tp_rcv_wup, NO_ANSWER_CHECK),
    owner("tcp_skb_cb", &["end_seq"], |o| &mut o.skb_end_seq, NO_ANSWER_CHECK),
    owner("tcp_skb_cb", &["ack_seq"], |o| &mut o.skb_ack_seq, NO_ANSWER_CHECK),
    owner("tcp_skb_cb", &["tcp_flags"], |o| &mut o.skb_tcp_flags, NO_ANSWER_CHECK),
    // Whether the application had read the peer's FIN when a reset came (optional).
    owner("tcp_sock", &["rcv_nxt"], |o| &mut o.tp_rcv_nxt, NO_UNREAD),
    owner("tcp_sock", &["copied_seq"], |o| &mut o.tp_copied_seq, NO_UNREAD),
];

const NO_UNREAD: &str = "a reset after the peer's FIN, with data written and not acknowledged, reads as the reuse race \
     even where the application had read the end of stream before writing (a TLS close_notify, a goodbye message)";

const NO_ANSWER_CHECK: &str = "every segment received while keep-alive probes are out counts as their answer, \
     the peer's own keep-alive probes included (a connection that only receives could look answered)";

/// Makes the `tcp_skb_cb` member offsets offsets from the start of `struct sk_buff` (the control
/// block is its `cb` array), or absent when `cb` is missing or too small to hold them.
fn rebase_skb_cb(btf: &KernelBtf, o: &mut Offsets, notes: &mut Vec<String>) -> Result<(), BtfError> {
    let fields = [&mut o.skb_end_seq, &mut o.skb_ack_seq, &mut o.skb_tcp_flags];
    let cb = btf.member("sk_buff", "cb")?;
    let fits = |f: &Field, size: u64| u64::from(f.off) + u64::from(f.size) <= size;
    match cb {
        Some(cb) if fields.iter().all(|f| fits(f, cb.size)) => {
            let base = u32::try_from(cb.offset).unwrap_or(u32::MAX);
            for f in fields.into_iter().filter(|f| f.present()) {
                f.off = f.off.saturating_add(base);
            }
        }
        _ => {
            notes.push(format!("struct sk_buff has no cb holding struct tcp_skb_cb ({NO_ANSWER_CHECK})"));
            for f in fields {
                *f = Field::ABSENT;
            }
        }
    }
    Ok(())
}

const NO_DEATH_OWNER_TASK: &str = "owners of deaths are always looked up in /proc (slower; a quick close escapes it)";

const NO_SINCE_SENT: &str = "deaths and closes carry no time since the last segment sent";
const NO_UNACKED: &str = "reuse races carry no byte count";
const NO_RETRANSMITTING: &str = "retransmission deaths carry no idle time before the write";
const NO_CLOSE_PORT: &str = "closes of connections not followed carry local port 0";
const NO_RETRANSMITS: &str = "retransmission deaths carry no retransmission count";

const NO_AUDIT_FILES: &str = "audit finds the processes holding sockets in /proc (slower)";
const NO_AUDIT_TIMER: &str = "audit cannot tell a retransmit or zero-window-probe timer";
const NO_AUDIT_RETRIES2: &str = "audit assumes net.ipv4.tcp_retries2 = 15";

const NO_OWNER: &str = "accepted sockets and sockets found at start-up are reported without their process";
const NO_SNAPSHOT_OWNER: &str = "sockets found at start-up are reported without their process";
const NO_ACCEPT_OWNER: &str = "accepted sockets are reported without their process";

/// An optional field (process attribution, `audit` columns): its absence is a note, not an error.
const fn owner(
    strukt: &'static str,
    paths: &'static [&'static str],
    slot: fn(&mut Offsets) -> &mut Field,
    absent_note: &'static str,
) -> FieldSpec {
    FieldSpec { strukt, paths, slot, absent_note: Some(absent_note), shape: Shape::Scalar }
}

/// Resolves the BTF-derived facts from the BTF file at `btf_path`.
pub fn resolve_btf(btf_path: &Path) -> Result<BtfFacts, KernelError> {
    let btf = KernelBtf::from_file(btf_path)?;
    Ok(resolve_from(&btf)?)
}

fn resolve_from(btf: &KernelBtf) -> Result<BtfFacts, BtfError> {
    let mut offsets = Offsets::default();
    let mut notes = Vec::new();

    // tcp_sock / inet_connection_sock offsets are used as offsets from the start of struct sock.
    btf.check_embedded_at_zero("tcp_sock", "inet_connection_sock")?;
    btf.check_embedded_at_zero("inet_connection_sock", "inet_sock")?;
    btf.check_embedded_at_zero("inet_sock", "sock")?;

    let timer_list_size = btf.struct_size("timer_list")?;
    for spec in FIELDS {
        let field = resolve_field(btf, spec, timer_list_size, &mut notes)?;
        *(spec.slot)(&mut offsets) = field;
    }
    rebase_skb_cb(btf, &mut offsets, &mut notes)?;

    // enum sock_flags: bit numbers in sk_flags.
    let sock_flags =
        btf.named_enum("sock_flags")?.ok_or_else(|| btf.err(BtfErrorKind::EnumNotFound("sock_flags".into())))?;
    let flag_bits = u64::from(offsets.sk_flags.size) * 8;
    offsets.sock_keepopen_bit = enum_u32(btf, &sock_flags, "SOCK_KEEPOPEN", flag_bits)?;
    offsets.sock_dead_bit = enum_u32(btf, &sock_flags, "SOCK_DEAD", flag_bits)?;

    // TCP states: the anonymous enum with TCP_ESTABLISHED and TCP_LISTEN (other anonymous enums
    // have TCP_-prefixed members too: TCP_NO_QUEUE, TCP_MIB_*...).
    let anonymous = btf.anonymous_enums()?;
    let states = pick_anonymous_enum(&anonymous, &["TCP_ESTABLISHED", "TCP_LISTEN"], |n| n.starts_with("TCP_"))
        .map_err(|k| btf.err(k))?;
    let mut tcp_states = Vec::new();
    for (name, _) in &states.members {
        let Some(state) = name.strip_prefix("TCP_").and_then(TcpState::from_kernel_name) else {
            continue;
        };
        let value = enum_u32(btf, states, name, 256)?;
        tcp_states.push((value as u8, state));
    }
    tcp_states.sort_by_key(|&(v, _)| v);
    offsets.tcp_established = enum_u32(btf, states, "TCP_ESTABLISHED", 256)?;
    offsets.tcp_syn_sent = enum_u32(btf, states, "TCP_SYN_SENT", 256)?;
    offsets.tcp_syn_recv = enum_u32(btf, states, "TCP_SYN_RECV", 256)?;
    offsets.tcp_close = enum_u32(btf, states, "TCP_CLOSE", 256)?;
    offsets.tcp_listen = enum_u32(btf, states, "TCP_LISTEN", 256)?;
    offsets.tcp_time_wait = enum_u32(btf, states, "TCP_TIME_WAIT", 256)?;
    offsets.tcp_new_syn_recv = enum_u32(btf, states, "TCP_NEW_SYN_RECV", 256)?;
    offsets.conn_close_mask = conn_close_mask(&tcp_states);
    log::debug!("BTF: TCP states {tcp_states:?}");

    let ipproto =
        pick_anonymous_enum(&anonymous, &["IPPROTO_TCP"], |n| n.starts_with("IPPROTO_")).map_err(|k| btf.err(k))?;
    offsets.ipproto_tcp = enum_u32(btf, ipproto, "IPPROTO_TCP", 256)?;
    // uapi ABI constants, not in BTF.
    offsets.af_inet6 = libc::AF_INET6 as u32;

    // Reset reasons (6.10+).
    let reset_reasons = match btf.named_enum("sk_rst_reason")? {
        Some(e) => {
            let mut reasons = Vec::with_capacity(e.members.len());
            for (name, _) in &e.members {
                let value = enum_u32(btf, &e, name, 1 << 32)?;
                let short = name.strip_prefix("SK_RST_REASON_").unwrap_or(name);
                reasons.push((value, short.to_ascii_lowercase()));
            }
            reasons.sort();
            reasons
        }
        None => {
            notes.push("enum sk_rst_reason is absent (kernel < 6.10): resets carry no reason".into());
            Vec::new()
        }
    };
    log::debug!("BTF: {} reset reasons", reset_reasons.len());

    // tcp_send_active_reset(sk, priority) before 6.10, (sk, priority, reason) since, and
    // (sk, reason) in stable kernels that dropped `priority` (Debian's 6.12): find it by name.
    offsets.active_reset_reason_arg = match btf.func_param_index("tcp_send_active_reset", "reason")? {
        Some(i) => i as u32 + 1,
        None => 0,
    };

    // tcp:tcp_send_reset: (ctx, sk, skb) before 6.10, (ctx, sk, skb, reason) since.
    offsets.reset_has_reason = match btf.typedef_func_proto_params(SEND_RESET_TRACE_TYPEDEF)? {
        Some(4) => 1,
        Some(3) => {
            notes.push("tcp_send_reset has no reset reason argument (kernel < 6.10)".into());
            0
        }
        Some(n) => {
            return Err(btf.err(BtfErrorKind::BadTypedef {
                name: SEND_RESET_TRACE_TYPEDEF.into(),
                detail: format!("{n} parameters, expected 3 (ctx, sk, skb) or 4 (ctx, sk, skb, reason)"),
            }))
        }
        None => {
            return Err(btf.err(BtfErrorKind::BadTypedef {
                name: SEND_RESET_TRACE_TYPEDEF.into(),
                detail: "not found: this kernel has no tcp:tcp_send_reset tracepoint".into(),
            }))
        }
    };
    log::debug!(
        "BTF: SOCK_KEEPOPEN bit {}, SOCK_DEAD bit {}, IPPROTO_TCP {}, reset_has_reason {}",
        offsets.sock_keepopen_bit,
        offsets.sock_dead_bit,
        offsets.ipproto_tcp,
        offsets.reset_has_reason
    );
    for note in &notes {
        log::debug!("BTF note: {note}");
    }
    Ok(BtfFacts { offsets, tcp_states, reset_reasons, notes })
}

/// Bit `1 << value` for each state whose change to CLOSE ends an established connection.
fn conn_close_mask(tcp_states: &[(u8, TcpState)]) -> u32 {
    use TcpState::*;
    tcp_states
        .iter()
        .filter(|(v, s)| *v < 32 && matches!(s, Established | FinWait1 | FinWait2 | CloseWait | LastAck | Closing))
        .fold(0u32, |m, (v, _)| m | (1 << v))
}

fn resolve_field(
    btf: &KernelBtf,
    spec: &FieldSpec,
    timer_list_size: u64,
    notes: &mut Vec<String>,
) -> Result<Field, BtfError> {
    let mut found = None;
    for path in spec.paths {
        let loc = match btf.member(spec.strukt, path) {
            // An optional field's whole struct may be missing (e.g. `syscall_trace_exit` without
            // CONFIG_FTRACE_SYSCALLS): absent too.
            Err(e) if spec.absent_note.is_some() && matches!(*e.kind, BtfErrorKind::StructNotFound(_)) => None,
            r => r?,
        };
        if let Some(loc) = loc {
            found = Some((*path, loc));
            break;
        }
    }
    let Some((path, loc)) = found else {
        let path = spec.paths.join(" or ");
        return match spec.absent_note {
            Some(why) => {
                notes.push(format!("struct {} has no {path} ({why})", spec.strukt));
                log::debug!("BTF: {}.{path}: absent", spec.strukt);
                Ok(Field::ABSENT)
            }
            None => Err(btf.err(BtfErrorKind::MemberNotFound { strukt: spec.strukt.into(), path })),
        };
    };
    let size_ok = match spec.shape {
        Shape::Scalar => matches!(loc.size, 1 | 2 | 4 | 8 | 16),
        Shape::TimerList => loc.size == timer_list_size,
    };
    if !size_ok {
        let expected = match spec.shape {
            Shape::Scalar => "1, 2, 4, 8 or 16 bytes".to_string(),
            Shape::TimerList => format!("sizeof(struct timer_list) = {timer_list_size}"),
        };
        return Err(btf.err(BtfErrorKind::UnexpectedSize {
            strukt: spec.strukt.into(),
            path: path.into(),
            size: loc.size,
            expected,
        }));
    }
    let off = u32::try_from(loc.offset).map_err(|_| {
        btf.err(BtfErrorKind::OffsetRange { strukt: spec.strukt.into(), path: path.into(), offset: loc.offset })
    })?;
    log::debug!("BTF: {}.{path}: offset {off}, size {}", spec.strukt, loc.size);
    Ok(Field::new(off, loc.size as u32))
}

/// The value of enum member `member`, which must be in `0..limit`.
fn enum_u32(btf: &KernelBtf, e: &EnumInfo, member: &str, limit: u64) -> Result<u32, BtfError> {
    let value = e.require(member).map_err(|k| btf.err(k))?;
    if value < 0 || value >= i128::from(limit) {
        return Err(btf.err(BtfErrorKind::EnumValueRange {
            enum_name: e.display_name(),
            member: member.into(),
            value,
            target: format!("0..{limit}"),
        }));
    }
    Ok(value as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::os::unix::fs::PermissionsExt;

    /// The kernel's BTF, when this process may read it (it is normally world-readable).
    fn vmlinux() -> Option<&'static Path> {
        let path = Path::new(VMLINUX_BTF);
        match std::fs::metadata(path) {
            Ok(m) if m.permissions().mode() & 0o004 != 0 => Some(path),
            Ok(_) => {
                eprintln!("{VMLINUX_BTF} is not world-readable: skipping real-kernel checks");
                None
            }
            Err(e) => {
                eprintln!("{VMLINUX_BTF}: {e}: skipping real-kernel checks");
                None
            }
        }
    }

    fn real_facts() -> Option<BtfFacts> {
        Some(resolve_btf(vmlinux()?).expect("resolving this kernel's BTF"))
    }

    #[test]
    fn real_kernel_offsets_are_sane() {
        let Some(facts) = real_facts() else { return };
        let o = &facts.offsets;
        // sock_common starts the sock: addrpair (8) + hash (4) + portpair (4), then the family.
        assert_eq!(o.skc_family, Field::new(16, 2));
        assert_eq!(o.skc_state, Field::new(18, 1));
        assert_eq!(o.skc_daddr, Field::new(0, 4));
        assert_eq!(o.skc_rcv_saddr, Field::new(4, 4));
        assert_eq!(o.skc_dport, Field::new(12, 2));
        assert_eq!(o.skc_num, Field::new(14, 2));
        assert_eq!(o.skc_v6_daddr.size, 16);
        assert_eq!(o.skc_v6_rcv_saddr.size, 16);
        assert_eq!(o.skc_net.size, std::mem::size_of::<usize>() as u32);
        assert_eq!(o.icsk_probes_out.size, 1);
        assert_eq!(o.tp_keepalive_probes.size, 1);
        assert_eq!(o.tp_keepalive_time.size, 4);
        assert_eq!(o.sk_err.size, 4);
        assert_eq!(o.sk_flags.size, std::mem::size_of::<usize>() as u32);
        assert_eq!(o.net_ns_inum.size, 4);
        // Death facts.
        assert_eq!((o.tp_lsndtime.size, o.tp_snd_una.size, o.tp_retrans_stamp.size), (4, 4, 4));
        assert_eq!(o.tp_tcp_mstamp.size, 8);
        assert!(o.icsk_retransmits.present());
        assert_eq!(o.inet_sport.size, 2);
        let mask = [1, 4, 5, 8, 9, 11].iter().fold(0u32, |m, v| m | (1 << v));
        assert_eq!((o.conn_close_mask, o.tcp_time_wait, o.tcp_new_syn_recv), (mask, 6, 12));
        // The timer: its fields lie inside the embedded timer_list.
        let btf = KernelBtf::from_file(Path::new(VMLINUX_BTF)).unwrap();
        let timer_size = btf.struct_size("timer_list").unwrap() as u32;
        assert_eq!(o.sk_timer.size, timer_size);
        for f in [o.timer_function, o.timer_expires, o.timer_pprev] {
            assert!(f.off + f.size <= timer_size, "{f:?} outside timer_list ({timer_size} bytes)");
        }
        assert_eq!(o.timer_function.size, std::mem::size_of::<usize>() as u32);
        // tcp_sock fields come after the sock and the inet/icsk parts.
        let sock_size = btf.struct_size("sock").unwrap() as u32;
        let icsk_size = btf.struct_size("inet_connection_sock").unwrap() as u32;
        assert!(o.icsk_probes_out.off >= sock_size && o.icsk_probes_out.off < icsk_size);
        for f in [o.tp_packets_out, o.tp_write_seq, o.tp_snd_nxt, o.tp_keepalive_probes] {
            assert!(f.off >= icsk_size, "{f:?} inside inet_connection_sock");
        }
        // The keep-alive timer: `icsk_keepalive_timer` where the kernel has it (a 2025 change, also
        // backported to stable kernels), else `sk->sk_timer`.
        match btf.member("inet_connection_sock", "icsk_keepalive_timer").unwrap() {
            Some(m) => assert_eq!(o.sk_timer.off as u64, m.offset, "{m:?}"),
            None => assert!(o.sk_timer.off + o.sk_timer.size <= sock_size),
        }
        // Enum values.
        assert_eq!(o.tcp_established, 1);
        assert_eq!(o.tcp_syn_sent, 2);
        assert_eq!(o.tcp_syn_recv, 3);
        assert_eq!(o.tcp_close, 7);
        assert_eq!(o.tcp_listen, 10);
        assert_eq!(o.ipproto_tcp, 6);
        assert_eq!(o.af_inet6, 10);
        assert!(o.sock_keepopen_bit < 64 && o.sock_dead_bit < 64);
        assert_ne!(o.sock_keepopen_bit, o.sock_dead_bit);
        assert!(facts.tcp_states.contains(&(1, TcpState::Established)));
        assert!(facts.tcp_states.contains(&(7, TcpState::Close)));
        assert!(facts.tcp_states.contains(&(10, TcpState::Listen)));
        // Only the TCP state enum's members, each once.
        let mut values: Vec<u8> = facts.tcp_states.iter().map(|&(v, _)| v).collect();
        values.dedup();
        assert_eq!(values.len(), facts.tcp_states.len());
        assert_eq!(o.tcp_keepalive_timer, 0, "BTF alone does not give addresses");
    }

    /// What the answer program checks segments with: the control block's members rebased onto
    /// the `sk_buff`, and `rcv_wup`.
    #[test]
    fn real_kernel_answer_check_offsets() {
        let Some(facts) = real_facts() else { return };
        let o = &facts.offsets;
        let btf = KernelBtf::from_file(Path::new(VMLINUX_BTF)).unwrap();
        let cb = btf.member("sk_buff", "cb").unwrap().unwrap();
        // The control block's members, rebased onto the sk_buff: `end_seq` is its second word.
        assert_eq!(o.skb_end_seq, Field::new(cb.offset as u32 + 4, 4));
        assert_eq!(o.skb_ack_seq.size, 4);
        assert!(u64::from(o.skb_ack_seq.off) < cb.offset + cb.size, "{:?}", o.skb_ack_seq);
        assert!(matches!(o.skb_tcp_flags.size, 1 | 2), "{:?}", o.skb_tcp_flags);
        assert_eq!(o.tp_rcv_wup.size, 4);
        assert!(!facts.notes.iter().any(|n| n.contains("tcp_skb_cb") || n.contains("rcv_wup")), "{:?}", facts.notes);
    }

    /// Kernel-version-specific expectations for the 6.18 development kernel.
    #[test]
    fn real_kernel_reset_reasons() {
        let Some(facts) = real_facts() else { return };
        let release = kernel_release().unwrap();
        if facts.offsets.reset_has_reason == 1 {
            assert!(!facts.reset_reasons.is_empty());
            assert!(facts.reset_reasons.iter().any(|(_, n)| n == "not_specified"));
        } else {
            assert!(facts.notes.iter().any(|n| n.contains("tcp_send_reset")));
        }
        // The function and the tracepoint gained the reason together (6.10).
        assert_eq!(facts.offsets.active_reset_reason_arg != 0, facts.offsets.reset_has_reason == 1);
        if release.starts_with("6.18") {
            assert_eq!(facts.offsets.reset_has_reason, 1);
            assert!(facts.reset_reasons.contains(&(15, "tcp_keepalive_timeout".to_string())));
            assert!(facts.reset_reasons.contains(&(0, "not_specified".to_string())));
            // IPv6 is configured here: nothing is absent.
            assert!(facts.notes.is_empty(), "{:?}", facts.notes);
            assert_eq!(facts.tcp_states, DecodeTables::linux_defaults().tcp_states);
        }
    }

    /// The TCP state enum must agree with its uapi mirror `BPF_TCP_*` (a different enum of the same
    /// BTF): an independent check that the right anonymous enum was chosen.
    #[test]
    fn tcp_states_match_bpf_uapi_mirror() {
        let Some(path) = vmlinux() else { return };
        let facts = resolve_btf(path).unwrap();
        let btf = KernelBtf::from_file(path).unwrap();
        let anon = btf.anonymous_enums().unwrap();
        let mirror = anon.iter().find(|e| e.value("BPF_TCP_ESTABLISHED").is_some()).expect("BPF_TCP_* enum in BTF");
        for (value, state) in &facts.tcp_states {
            if let Some(v) = mirror.value(&format!("BPF_TCP_{}", state.name())) {
                assert_eq!(v, i128::from(*value), "{}", state.name());
            }
        }
    }

    /// Cross-check against bpftool's raw BTF dump when bpftool is installed (it is optional).
    #[test]
    fn offsets_match_bpftool() {
        let Some(path) = vmlinux() else { return };
        let out = match std::process::Command::new("bpftool")
            .args(["btf", "dump", "file"])
            .arg(path)
            .args(["format", "raw"])
            .output()
        {
            Ok(out) if out.status.success() => out,
            Ok(out) => panic!("bpftool failed: {}", String::from_utf8_lossy(&out.stderr)),
            Err(e) => {
                eprintln!("bpftool not available ({e}): skipping cross-check");
                return;
            }
        };
        let text = String::from_utf8(out.stdout).unwrap();
        let facts = resolve_btf(path).unwrap();
        let o = &facts.offsets;
        let sock = bpftool_struct_members(&text, "sock");
        let tcp = bpftool_struct_members(&text, "tcp_sock");
        let icsk = bpftool_struct_members(&text, "inet_connection_sock");
        let timer = bpftool_struct_members(&text, "timer_list");
        let ipv4 = bpftool_struct_members(&text, "netns_ipv4");
        let net = bpftool_struct_members(&text, "net");
        match icsk.get("icsk_keepalive_timer") {
            Some(&bits) => assert_eq!(bits, o.sk_timer.off * 8),
            None => assert_eq!(sock["sk_timer"], o.sk_timer.off * 8),
        }
        assert_eq!(sock["sk_err"], o.sk_err.off * 8);
        assert_eq!(sock["sk_protocol"], o.sk_protocol.off * 8);
        assert_eq!(icsk["icsk_probes_out"], o.icsk_probes_out.off * 8);
        assert_eq!(icsk["icsk_user_timeout"], o.icsk_user_timeout.off * 8);
        assert_eq!(tcp["keepalive_probes"], o.tp_keepalive_probes.off * 8);
        assert_eq!(tcp["write_seq"], o.tp_write_seq.off * 8);
        assert_eq!(timer["function"], o.timer_function.off * 8);
        assert_eq!(timer["expires"], o.timer_expires.off * 8);
        assert_eq!(net["ipv4"] + ipv4["sysctl_tcp_keepalive_probes"], o.net_keepalive_probes.off * 8);
    }

    /// Member name → bit offset of `struct name` in `bpftool btf dump ... format raw` output.
    fn bpftool_struct_members(raw: &str, name: &str) -> HashMap<String, u32> {
        let header = format!("STRUCT '{name}' size=");
        let mut lines = raw.lines();
        let head = lines.find(|l| l.contains(&header)).unwrap_or_else(|| panic!("no {header}"));
        let vlen: usize = head.split("vlen=").nth(1).unwrap().trim().parse().unwrap();
        lines
            .take(vlen)
            .map(|l| {
                let l = l.trim();
                let member = l.split('\'').nth(1).unwrap().to_string();
                let bits = l.split("bits_offset=").nth(1).unwrap();
                let bits: u32 = bits.split_whitespace().next().unwrap().parse().unwrap();
                (member, bits)
            })
            .collect()
    }

    /// The `audit` iterator's fields on this kernel: all present, the retransmit timer's expiry
    /// inside `inet_connection_sock`, sizes as the kernel declares them.
    #[test]
    fn real_kernel_audit_offsets() {
        let Some(facts) = real_facts() else { return };
        let o = &facts.offsets;
        let btf = KernelBtf::from_file(Path::new(VMLINUX_BTF)).unwrap();
        let icsk_size = btf.struct_size("inet_connection_sock").unwrap() as u32;
        for f in [o.icsk_pending, o.icsk_retransmits, o.icsk_backoff, o.tp_snd_una, o.tp_lsndtime, o.net_tcp_retries2, o.task_tgid] {
            assert!(f.present(), "{o:?}");
        }
        assert_eq!(o.icsk_timeout.size, std::mem::size_of::<usize>() as u32);
        assert!(o.icsk_timeout.off < icsk_size);
        let expected = match btf.member("inet_connection_sock", "icsk_timeout").unwrap() {
            Some(m) => m.offset,
            None => {
                let timer = btf.member("inet_connection_sock", "icsk_retransmit_timer").unwrap().unwrap();
                timer.offset + u64::from(o.timer_expires.off)
            }
        };
        assert_eq!(u64::from(o.icsk_timeout.off), expected);
        assert_eq!(o.tp_snd_una.size, 4);
        assert_eq!(o.tp_lsndtime.size, 4);
        assert_eq!(o.net_tcp_retries2.size, 1);
        assert_eq!((o.task_tgid.size, o.inode_i_mode.size), (4, 2));
    }

    /// The death owner's field on this kernel: `task_struct.flags`, an `unsigned int`.
    #[test]
    fn real_kernel_death_owner_offsets() {
        let Some(facts) = real_facts() else { return };
        assert_eq!(facts.offsets.task_flags.size, 4, "{:?}", facts.offsets);
    }

    /// The mapped BTF gives the same facts as the parsed one.
    #[test]
    fn mapped_btf_gives_the_same_facts() {
        let Some(path) = vmlinux() else { return };
        let mapped = resolve_from(&KernelBtf::from_file_mapped(path).unwrap()).unwrap();
        assert_eq!(mapped, resolve_btf(path).unwrap());
    }

    #[test]
    fn missing_btf_file_names_the_path() {
        let missing = Path::new("/nonexistent/keepalive/vmlinux");
        let err = resolve_btf(missing).unwrap_err();
        assert!(matches!(err, KernelError::Btf(_)), "{err}");
        assert!(err.to_string().contains("/nonexistent/keepalive/vmlinux"), "{err}");
        let err = resolve(missing, Path::new(KALLSYMS)).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/keepalive/vmlinux"), "{err}");
    }

    #[test]
    fn missing_kallsyms_names_the_path() {
        let Some(path) = vmlinux() else { return };
        let err = resolve(path, Path::new("/nonexistent/kallsyms")).unwrap_err();
        assert!(matches!(err, KernelError::Kallsyms(KallsymsError::Read { .. })), "{err}");
        assert!(err.to_string().contains("/nonexistent/kallsyms"), "{err}");
    }

    /// The whole resolution: succeeds as root (addresses visible), and otherwise fails saying that
    /// addresses are hidden.
    #[test]
    fn full_resolution() {
        if vmlinux().is_none() {
            return;
        }
        let result = resolve_default();
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        match result {
            Ok(facts) => {
                assert!(root, "addresses should be hidden from non-root");
                assert!(facts.offsets.tcp_keepalive_timer != 0);
                #[cfg(target_arch = "x86_64")]
                assert!(facts.offsets.tcp_keepalive_timer >= 0xffff_8000_0000_0000, "not a kernel address");
                let osrelease = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
                assert_eq!(facts.kernel_release, osrelease.trim());
                assert_eq!(facts.tables.hz, hz().unwrap());
                assert!(hz::HZ_CANDIDATES.contains(&facts.tables.hz));
                assert_eq!(facts.tables.af_inet, 2);
                assert_eq!(facts.tables.af_inet6, 10);
                assert_eq!(facts.offsets, {
                    let mut o = resolve_btf(Path::new(VMLINUX_BTF)).unwrap().offsets;
                    o.tcp_keepalive_timer = facts.offsets.tcp_keepalive_timer;
                    o.jiffies_addr = facts.offsets.jiffies_addr;
                    o.hz = facts.tables.hz;
                    o
                });
                assert_eq!(facts.offsets.hz, facts.tables.hz);
            }
            Err(KernelError::Kallsyms(KallsymsError::Hidden { .. })) if !root => {}
            Err(e) => panic!("resolution failed (root: {root}): {e}"),
        }
    }

    #[test]
    fn this_kernel_hz() {
        // The development machine is configured with HZ=250; elsewhere any Linux value will do.
        let hz = hz().expect("HZ");
        assert!(hz::HZ_CANDIDATES.contains(&hz), "{hz}");
        if kernel_release().unwrap().ends_with("-fc-v657") {
            assert_eq!(hz, 250);
        }
    }
}
