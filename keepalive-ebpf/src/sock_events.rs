//! Socket-level tracepoints: answers to probes, resets, errors, state changes, destruction.

use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, generated::bpf_skc_to_tcp_sock},
    macros::{btf_tracepoint, raw_tracepoint},
    maps::ring_buf::RingBufEntry,
    programs::{BtfTracePointContext, RawTracePointContext},
    EbpfContext,
};
use keepalive_common::{EventKind, RawEvent, FLAG_ACTIVE, FLAG_HAS_REASON, FLAG_IN_TIMER};

use crate::{
    count_lost, off,
    owner::{destroyed_by_owner, fill_close_owner},
    read::{ctx_arg_scalar, fill_common, fill_process, fill_sock, fill_times, is_tcp, keepalive_relevant, rd},
    timer::in_timer,
    EVENTS,
};

/// Reserves a record, fills the socket part and lets `f` add the rest.
#[inline(always)]
pub fn emit(kind: EventKind, sk: u64, f: impl FnOnce(&mut RawEvent)) {
    let Some(mut entry) = reserve(kind) else { return };
    // SAFETY: a reserved RawEvent-sized ring buffer record.
    let ev = unsafe { &mut *entry.as_mut_ptr() };
    fill_sock(ev, sk);
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
    *ev = RawEvent::zeroed();
    ev.kind = kind as u8;
    // SAFETY: plain helper call.
    ev.ts_ns = unsafe { bpf_ktime_get_ns() };
    Some(entry)
}

/// `tcp:tcp_probe` as a BTF-typed tracepoint (5.5+): `icsk_probes_out` is read by a direct,
/// verifier-checked load from the `tcp_sock` that `bpf_skc_to_tcp_sock` (a type check, no copy)
/// gives, instead of a `bpf_probe_read_kernel` call on every segment received.
#[btf_tracepoint(function = "tcp_probe")]
pub fn btf_tcp_probe(ctx: BtfTracePointContext) -> i32 {
    let sk: *mut core::ffi::c_void = ctx.arg(0);
    // SAFETY: `sk` is the tracepoint's BTF-typed socket; the helper checks its type.
    let tp = unsafe { bpf_skc_to_tcp_sock(sk) } as *const u8;
    if tp.is_null() {
        return 0;
    }
    let off = off!(icsk_probes_out).off as usize;
    // SAFETY: typed `struct tcp_sock *`; the offset is `icsk_probes_out`'s, from BTF.
    if unsafe { core::ptr::read_volatile(tp.wrapping_add(off)) } == 0 {
        return 0;
    }
    emit(EventKind::Ack, ctx_arg_scalar(ctx.as_ptr(), 0), |_| {});
    0
}

/// `tcp:tcp_probe(sk, skb)`, called at the top of `tcp_rcv_established` for every segment received
/// on an established socket. While `icsk_probes_out > 0` the segment is the peer's answer to our
/// keep-alive probes (`tcp_ack` is about to zero `icsk_probes_out`). Cost otherwise: one read.
#[raw_tracepoint(tracepoint = "tcp_probe")]
pub fn tcp_probe(ctx: RawTracePointContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    if rd(sk, off!(icsk_probes_out)) == 0 {
        return 0;
    }
    emit(EventKind::Ack, sk, |_| {});
    0
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
        let Some(mut entry) = reserve(EventKind::ResetSent) else { return 0 };
        // SAFETY: a reserved RawEvent-sized ring buffer record.
        let ev = unsafe { &mut *entry.as_mut_ptr() };
        fill_common(ev, sk);
        reset_fields(ev, false, has_reason.then_some(reason as u32));
        crate::submit(entry);
        return 0;
    }
    emit_reset(sk, skb == 0, has_reason.then_some(reason as u32));
    0
}

#[inline(always)]
fn reset_fields(ev: &mut RawEvent, active: bool, reason: Option<u32>) {
    if active {
        ev.flags |= FLAG_ACTIVE;
    }
    if let Some(r) = reason {
        ev.flags |= FLAG_HAS_REASON;
        ev.reason = r;
    }
}

/// Sends a `ResetSent` event (shared by the tracepoint and the direct strategies).
#[inline(always)]
pub fn emit_reset(sk: u64, active: bool, reason: Option<u32>) {
    emit(EventKind::ResetSent, sk, |ev| reset_fields(ev, active, reason));
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
    let old: u64 = ctx.arg(1);
    let new: u64 = ctx.arg(2);
    let new = new as u32;
    let syn_sent = new == off!(tcp_syn_sent);
    let close = new == off!(tcp_close);
    if !(syn_sent || close || new == off!(tcp_established)) {
        return 0;
    }
    if sk == 0 || !is_tcp(sk) {
        return 0;
    }
    // A connection killed by an error (timeouts, resets) has sk_err set before tcp_done() moves it
    // to CLOSE; the error report itself comes after the close.
    let err = if close { rd(sk, off!(sk_err)) as u32 } else { 0 };
    let followed = keepalive_relevant(sk);
    if !followed {
        let ended = (old as u32) < 32 && off!(conn_close_mask) & (1 << (old as u32)) != 0;
        if !close || !ended || (err == 0 && off!(report_all_closes) == 0) {
            return 0;
        }
    }
    emit(EventKind::State, sk, |ev| {
        ev.state = old as u8;
        ev.new_state = new as u8;
        if syn_sent {
            fill_process(ev);
        } else if close {
            ev.err = err as i32;
            fill_times(ev, sk);
            if !followed {
                fill_close_owner(ev, sk, err);
            }
        }
    });
    0
}

/// `tcp:tcp_destroy_sock(sk)`: the socket is freed; its address may be reused by another socket.
/// Reported for keep-alive-relevant sockets, and for others when their process closes them after
/// they died (with the process: [`destroyed_by_owner`]).
#[raw_tracepoint(tracepoint = "tcp_destroy_sock")]
pub fn tcp_destroy_sock(ctx: RawTracePointContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    if sk == 0 {
        return 0;
    }
    if keepalive_relevant(sk) {
        emit(EventKind::Destroy, sk, |_| {});
    } else if destroyed_by_owner(sk) {
        emit(EventKind::Destroy, sk, fill_process);
    }
    0
}
