//! Socket-level tracepoints: answers to probes, resets, errors, state changes, destruction.

use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, generated::bpf_skc_to_tcp_sock},
    macros::{btf_tracepoint, raw_tracepoint},
    maps::ring_buf::RingBufEntry,
    programs::{BtfTracePointContext, RawTracePointContext},
    EbpfContext,
};
use keepalive_common::{EventKind, Field, RawAck, RawEvent, FLAG_ACTIVE, FLAG_HAS_REASON, FLAG_IN_TIMER};

use crate::{
    count_lost, off,
    owner::{destroyed_by_owner, fill_close_owner},
    read::{arg_number, fill_common, fill_process, fill_sock_lean, fill_times, is_tcp, keepalive_relevant, rd, Mem, Probe, Typed},
    timer::in_timer,
    EVENTS,
};

/// Reserves a record, fills the socket part and lets `f` add the rest.
#[inline(always)]
pub fn emit(kind: EventKind, sk: u64, f: impl FnOnce(&mut RawEvent)) {
    if crate::netns_unwanted(sk) {
        return;
    }
    let Some(mut entry) = reserve(kind) else { return };
    // SAFETY: a reserved RawEvent-sized ring buffer record.
    let ev = unsafe { &mut *entry.as_mut_ptr() };
    fill_sock_lean(ev, sk);
    if in_timer(sk) {
        ev.flags |= FLAG_IN_TIMER;
    }
    f(ev);
    crate::submit(entry);
}

/// Reserves a zeroed record with its kind and time; counts it lost when the ring buffer is full.
/// (No closure taking another closure here: the closure's environment type would reach the
/// object's BTF with a zero-sized member past its end, which the kernel rejects.)
#[inline(always)]
fn reserve(kind: EventKind) -> Option<RingBufEntry<RawEvent>> {
    let Some(mut entry) = EVENTS.reserve::<RawEvent>(0) else {
        count_lost(kind as u8);
        return None;
    };
    // SAFETY: a reserved RawEvent-sized ring buffer record.
    let ev = unsafe { &mut *entry.as_mut_ptr() };
    crate::zero_event(ev);
    ev.kind = kind as u8;
    // SAFETY: plain helper call.
    ev.ts_ns = unsafe { bpf_ktime_get_ns() };
    Some(entry)
}

/// The socket argument `n` of a BTF-typed tracepoint as a typed `struct tcp_sock *` (by
/// `bpf_skc_to_tcp_sock`, a type check, no copy), for direct, verifier-checked loads; `None` when it
/// is not a full TCP socket.
#[inline(always)]
fn typed_tcp_sock(ctx: &BtfTracePointContext, n: usize) -> Option<*const u8> {
    let sk: *mut core::ffi::c_void = ctx.arg(n);
    // SAFETY: `sk` is the tracepoint's BTF-typed socket; the helper checks its type.
    let tp = unsafe { bpf_skc_to_tcp_sock(sk) } as *const u8;
    (!tp.is_null()).then_some(tp)
}

/// `tcp:tcp_probe` as a BTF-typed tracepoint (5.5+): `icsk_probes_out` is read by a direct,
/// verifier-checked load from the `tcp_sock` that `bpf_skc_to_tcp_sock` (a type check, no copy)
/// gives, instead of a `bpf_probe_read_kernel` call on every segment received.
#[btf_tracepoint(function = "tcp_probe")]
pub fn btf_tcp_probe(ctx: BtfTracePointContext) -> i32 {
    let Some(tp) = typed_tcp_sock(&ctx, 0) else { return 0 };
    let off = off!(icsk_probes_out).off as usize;
    // SAFETY: typed `struct tcp_sock *`; the offset is `icsk_probes_out`'s, from BTF.
    let probes = unsafe { core::ptr::read_volatile(tp.wrapping_add(off)) };
    if probes == 0 || !answers::<Typed>(tp as u64, ctx.arg(1)) {
        return 0;
    }
    // The namespace by two more direct loads: `skc_net.net` (typed `struct net *`), `ns.inum`.
    // SAFETY: typed loads at BTF offsets; a NULL `net` would read as 0 (fault-safe loads).
    let netns = unsafe {
        let net = core::ptr::read_volatile(tp.wrapping_add(off!(skc_net).off as usize) as *const *const u8);
        core::ptr::read_volatile(net.wrapping_add(off!(net_ns_inum).off as usize) as *const u32)
    };
    emit_ack(arg_number(ctx.as_ptr(), 0, tp), probes, netns);
    0
}

/// [`btf_tcp_probe`] without the type-checking helper call: `tcp_probe` fires only in
/// `tcp_rcv_established`, on TCP sockets, so the socket is retyped as a `struct tcp_sock` with
/// `bpf_rdonly_cast` (kfunc, 6.2+; the verifier turns the call into a register copy) and read with
/// plain loads.
#[btf_tracepoint(function = "tcp_probe")]
pub fn btf_tcp_probe_cast(ctx: BtfTracePointContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    let tp = Typed::base(sk);
    let probes = Typed::rd(tp, off!(icsk_probes_out)) as u8;
    if probes == 0 || !answers::<Typed>(tp, ctx.arg(1)) {
        return 0;
    }
    let netns = Typed::rd(Typed::rd(tp, off!(skc_net)), off!(net_ns_inum)) as u32;
    emit_ack(arg_number(ctx.as_ptr(), 0, ctx.arg(0)), probes, netns);
    0
}

/// `tcp:tcp_probe(sk, skb)`, called at the top of `tcp_rcv_established` for every segment received
/// on an established socket. While `icsk_probes_out > 0` the segment is the peer's answer to our
/// keep-alive probes (`tcp_ack` is about to zero `icsk_probes_out`). Cost otherwise: one read.
#[raw_tracepoint(tracepoint = "tcp_probe")]
pub fn tcp_probe(ctx: RawTracePointContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    let probes = rd(sk, off!(icsk_probes_out)) as u8;
    if probes == 0 || !answers::<Probe>(sk, ctx.arg(1)) {
        return 0;
    }
    emit_ack(sk, probes, rd(rd(sk, off!(skc_net)), off!(net_ns_inum)) as u32);
    0
}

/// `TCPHDR_*` flag bits of `tcp_skb_cb.tcp_flags`.
const TCPHDR_SYN: u64 = 0x02;
const TCPHDR_RST: u64 = 0x04;
const TCPHDR_ACK: u64 = 0x10;

/// Whether the segment `skb`, received by the socket `tp` while its probes are out, is one that
/// `tcp_ack` will take as their answer (it zeroes `icsk_probes_out` then): an ACK without RST or
/// SYN, not wholly before the receive window (`end_seq` not before `rcv_wup`; the peer's own
/// keep-alive probe is one byte before it and is dropped with a duplicate ACK), acknowledging
/// neither less than `snd_una` nor more than `snd_nxt`. Anything else received then is not an
/// answer: the peer's probes on a connection whose own probes get no answer (one way lost), a
/// reset (reported as such), a stale duplicate. Sequence numbers compare modulo 2^32, as the
/// kernel's `before()`. Where the kernel's BTF lacks one of the offsets, every segment counts, as
/// before (the agent warns at start-up, naming the missing field). Reads `skb`'s control block
/// (filled by the receive path just before; through `M` as the socket is: plain loads of the typed
/// argument, or helper reads) and three `tcp_sock` fields `tcp_ack` reads next: run only while
/// probes are out.
#[inline(always)]
fn answers<M: Mem>(tp: u64, skb: u64) -> bool {
    // Each offset by a volatile read (`off!`): a plain read of the global would be folded into
    // its compile-time value, all absent.
    let ready = off!(tp_rcv_wup).size != 0
        && off!(tp_snd_una).size != 0
        && off!(skb_end_seq).size != 0
        && off!(skb_ack_seq).size != 0
        && off!(skb_tcp_flags).size != 0;
    if !ready {
        return true;
    }
    let before = |a: u64, b: u64| ((a as u32).wrapping_sub(b as u32) as i32) < 0;
    let flags = M::rd(skb, off!(skb_tcp_flags));
    if flags & (TCPHDR_RST | TCPHDR_SYN) != 0 || flags & TCPHDR_ACK == 0 {
        return false;
    }
    if before(M::rd(skb, off!(skb_end_seq)), M::rd(tp, off!(tp_rcv_wup))) {
        return false;
    }
    let ack = M::rd(skb, off!(skb_ack_seq));
    !before(ack, M::rd(tp, off!(tp_snd_una))) && !before(M::rd(tp, off!(tp_snd_nxt)), ack)
}

/// Sends an `Ack` record ([`RawAck`], 24 bytes): the socket, the time, the probes it answers and
/// the namespace (for the agent's namespace filter), nothing else. The connection is followed
/// already (an answer only counts within an episode the agent opened from a timer event, which
/// carried the rest), so the socket is not read again: this program runs on every segment received
/// while probes are out.
#[inline(always)]
fn emit_ack(sk: u64, probes: u8, netns: u32) {
    if !crate::netns_wanted(netns) {
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<RawAck>(0) else {
        count_lost(EventKind::Ack as u8);
        return;
    };
    // SAFETY: plain helper call.
    let ts_ns = unsafe { bpf_ktime_get_ns() };
    let ack = RawAck { ts_ns, netns, probes_out: probes, kind: EventKind::Ack as u8, pad: [0; 2], sk };
    // SAFETY: a reserved RawAck-sized ring buffer record; three 8-byte stores.
    unsafe { core::ptr::write_volatile(entry.as_mut_ptr(), ack) };
    crate::submit(entry);
}

/// `tcp:tcp_send_reset(sk, skb[, reason])`: `skb == NULL` is `tcp_send_active_reset`. The reason
/// argument exists from 6.10 (`OFFSETS.reset_has_reason`, from the tracepoint's BTF prototype).
#[raw_tracepoint(tracepoint = "tcp_send_reset")]
pub fn tcp_send_reset(ctx: RawTracePointContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    if sk == 0 {
        return 0;
    }
    let skb: u64 = ctx.arg(1);
    let has_reason = off!(reset_has_reason) != 0;
    let reason: u64 = if has_reason { ctx.arg(2) } else { 0 };
    let state = rd(sk, off!(skc_state)) as u32;
    if state == off!(tcp_time_wait) || state == off!(tcp_new_syn_recv) {
        // An inet_timewait_sock or a request_sock: only its sock_common part may be read.
        if crate::netns_unwanted(sk) {
            return 0;
        }
        let Some(mut entry) = reserve(EventKind::ResetSent) else { return 0 };
        // SAFETY: a reserved RawEvent-sized ring buffer record.
        let ev = unsafe { &mut *entry.as_mut_ptr() };
        fill_common(ev, sk);
        reset_fields(ev, false, has_reason, reason as u32);
        crate::submit(entry);
        return 0;
    }
    emit_reset(sk, skb == 0, has_reason, reason as u32);
    0
}

#[inline(always)]
fn reset_fields(ev: &mut RawEvent, active: bool, has_reason: bool, reason: u32) {
    if active {
        ev.flags |= FLAG_ACTIVE;
    }
    if has_reason {
        ev.flags |= FLAG_HAS_REASON;
        ev.reason = reason;
    }
}

/// Sends a `ResetSent` event (shared by the tracepoint and the direct strategies); `reason` only
/// when `has_reason`. (Not an `Option<u32>`: `None` leaves its payload undefined, and LLVM may
/// spill that undefined register, which the verifier rejects: `R8 !read_ok`, seen on 6.1.)
#[inline(always)]
pub fn emit_reset(sk: u64, active: bool, has_reason: bool, reason: u32) {
    emit(EventKind::ResetSent, sk, |ev| reset_fields(ev, active, has_reason, reason));
}

/// `tcp:tcp_receive_reset(sk)`: the peer reset the connection.
#[raw_tracepoint(tracepoint = "tcp_receive_reset")]
pub fn tcp_receive_reset(ctx: RawTracePointContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    if sk == 0 {
        return 0;
    }
    emit(EventKind::ResetReceived, sk, |ev| fill_times(ev, sk));
    0
}

/// `sock:inet_sk_error_report(sk)`: `sk_err` was set (ETIMEDOUT after a keep-alive death).
#[raw_tracepoint(tracepoint = "inet_sk_error_report")]
pub fn inet_sk_error_report(ctx: RawTracePointContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    if sk == 0 || !is_tcp(sk) {
        return 0;
    }
    emit(EventKind::Error, sk, |ev| {
        ev.err = rd(sk, off!(sk_err)) as u32 as i32;
    });
    0
}

/// `sock:inet_sock_set_state(sk, oldstate, newstate)`: reported for keep-alive-relevant TCP
/// sockets entering SYN_SENT (process context: `connect()`), ESTABLISHED or CLOSE (with `sk_err`
/// and the socket's idle times). For other TCP sockets only the end of an established connection
/// is reported, and only when it is a death (`sk_err` set) or `report_all_closes` is on: one read
/// of `sk_err` per connection, no per-connection state. Their change to CLOSE names the socket's
/// owner ([`fill_close_owner`]: the current task in its process context, else the socket's inode);
/// the agent knows the owner of the connections it follows from their start.
#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: RawTracePointContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    let (old, new): (u64, u64) = (ctx.arg(1), ctx.arg(2));
    let Some(close) = wanted_transition(new as u32) else { return 0 };
    if sk == 0 || !is_tcp(sk) {
        return 0;
    }
    // A connection killed by an error (timeouts, resets) has sk_err set before tcp_done() moves it
    // to CLOSE; the error report itself comes after the close.
    let err = if close { rd(sk, off!(sk_err)) as u32 } else { 0 };
    let followed = keepalive_relevant(sk);
    if !followed && !unfollowed_end_wanted(close, old as u32, err) {
        return 0;
    }
    emit_state(sk, old as u32, new as u32, err, followed);
    0
}

/// `sock:inet_sock_set_state` as a BTF-typed tracepoint (5.5+), the same filters as
/// [`inet_sock_set_state`] by direct, verifier-checked loads from the typed socket instead of
/// `bpf_probe_read_kernel` calls: this program runs on every state change of every TCP socket of
/// the host (a new connection per request makes about ten), so its filters are its cost.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn btf_inet_sock_set_state(ctx: BtfTracePointContext) -> i32 {
    let (old, new): (u64, u64) = (ctx.arg(1), ctx.arg(2));
    let Some(close) = wanted_transition(new as u32) else { return 0 };
    let Some(tp) = typed_tcp_sock(&ctx, 0) else { return 0 };
    let err = if close { load_u32(tp, off!(sk_err)).unwrap_or_else(|| rd(tp as u64, off!(sk_err)) as u32) } else { 0 };
    let followed = relevant_typed(tp);
    if !followed && !unfollowed_end_wanted(close, old as u32, err) {
        return 0;
    }
    emit_state(arg_number(ctx.as_ptr(), 0, tp), old as u32, new as u32, err, followed);
    0
}

/// Whether a move to `new` is one the agent reports (SYN_SENT, ESTABLISHED, CLOSE); `Some(true)`
/// for CLOSE.
#[inline(always)]
fn wanted_transition(new: u32) -> Option<bool> {
    let close = new == off!(tcp_close);
    (close || new == off!(tcp_syn_sent) || new == off!(tcp_established)).then_some(close)
}

/// For a socket that is not keep-alive-relevant: whether its move is the end of an established
/// connection worth a record (a death, or any close with `report_all_closes`).
#[inline(always)]
fn unfollowed_end_wanted(close: bool, old: u32, err: u32) -> bool {
    let ended = old < 32 && off!(conn_close_mask) & (1 << old) != 0;
    close && ended && (err != 0 || off!(report_all_closes) != 0)
}

#[inline(always)]
fn emit_state(sk: u64, old: u32, new: u32, err: u32, followed: bool) {
    if followed && old == off!(tcp_syn_recv) && new == off!(tcp_established) {
        crate::mark_passive_keepalive();
    }
    emit(EventKind::State, sk, |ev| {
        ev.state = old as u8;
        ev.new_state = new as u8;
        if new == off!(tcp_syn_sent) {
            fill_process(ev);
        } else if new == off!(tcp_close) {
            ev.err = err as i32;
            fill_times(ev, sk);
            if !followed {
                fill_close_owner(ev, sk, err);
            }
        }
    });
}

/// [`keepalive_relevant`] by direct loads from a BTF-typed `struct tcp_sock *` (each load only
/// where the field has the size this code loads; a probe read otherwise).
#[inline(always)]
fn relevant_typed(tp: *const u8) -> bool {
    let base = tp as u64;
    let flags = load_u64(tp, off!(sk_flags)).unwrap_or_else(|| rd(base, off!(sk_flags)));
    if flags & (1u64 << (off!(sock_keepopen_bit) & 63)) != 0 {
        return true;
    }
    let u32_or_read = |f: Field| load_u32(tp, f).map_or_else(|| rd(base, f), u64::from);
    u32_or_read(off!(icsk_user_timeout)) != 0
        || u32_or_read(off!(tp_keepalive_time)) != 0
        || u32_or_read(off!(tp_keepalive_intvl)) != 0
        || load_u8(tp, off!(tp_keepalive_probes)).map_or_else(|| rd(base, off!(tp_keepalive_probes)), u64::from) != 0
}

/// A direct load of the 4-byte field `f` of a BTF-typed object; `None` when the field is not 4
/// bytes on this kernel. The size test is on the loader's constant, so the verifier only sees the
/// load this kernel's layout allows.
#[inline(always)]
fn load_u32(p: *const u8, f: Field) -> Option<u32> {
    // SAFETY: a typed load at a BTF offset, checked by the verifier against the type.
    (f.size == 4).then(|| unsafe { core::ptr::read_volatile(p.wrapping_add(f.off as usize) as *const u32) })
}

/// [`load_u32`] for an 8-byte field.
#[inline(always)]
fn load_u64(p: *const u8, f: Field) -> Option<u64> {
    // SAFETY: as in load_u32.
    (f.size == 8).then(|| unsafe { core::ptr::read_volatile(p.wrapping_add(f.off as usize) as *const u64) })
}

/// [`load_u32`] for a 1-byte field.
#[inline(always)]
fn load_u8(p: *const u8, f: Field) -> Option<u8> {
    // SAFETY: as in load_u32.
    (f.size == 1).then(|| unsafe { core::ptr::read_volatile(p.wrapping_add(f.off as usize)) })
}

/// `tcp:tcp_destroy_sock(sk)`: the socket is freed; its address may be reused by another socket.
/// Reported for keep-alive-relevant sockets, and for others when their process closes them after
/// they died without an owner (with the process: [`destroyed_by_owner`]; only sockets in the
/// `AWAIT_OWNER` table are checked: one lookup per destroyed socket).
#[raw_tracepoint(tracepoint = "tcp_destroy_sock")]
pub fn tcp_destroy_sock(ctx: RawTracePointContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    if sk != 0 {
        on_destroy(sk, keepalive_relevant(sk));
    }
    0
}

/// `tcp:tcp_destroy_sock` as a BTF-typed tracepoint (5.5+): the relevance filter by direct loads.
#[btf_tracepoint(function = "tcp_destroy_sock")]
pub fn btf_tcp_destroy_sock(ctx: BtfTracePointContext) -> i32 {
    let Some(tp) = typed_tcp_sock(&ctx, 0) else { return 0 };
    let relevant = relevant_typed(tp);
    // The socket as a number only when there may be something to report (this program runs at
    // every socket's destruction, nearly always with nothing).
    if relevant || crate::owners_awaited() {
        on_destroy(arg_number(ctx.as_ptr(), 0, tp), relevant);
    }
    0
}

/// The destruction of `sk` (`relevant`: keep-alive-relevant), shared by both strategies. A socket
/// that died without an owner is checked for its owner's context only after the table lookup says
/// so: that is rare, so it reads the socket with probe reads.
#[inline(always)]
fn on_destroy(sk: u64, relevant: bool) {
    if relevant {
        emit(EventKind::Destroy, sk, |_| {});
    } else if crate::awaited_owner(sk) && destroyed_by_owner(sk) {
        emit(EventKind::Destroy, sk, fill_process);
    }
}
