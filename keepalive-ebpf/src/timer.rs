//! `tcp_keepalive_timer`, reached through `timer:timer_expire_entry` / `timer:timer_expire_exit`.
//!
//! Both tracepoints fire for every timer in the system; the programs leave at once unless the
//! timer's function is `tcp_keepalive_timer` (its address comes from `/proc/kallsyms`). The socket
//! is `timer - offsetof(keep-alive timer)` (`icsk_keepalive_timer`, or `sk_timer` on older kernels). The state read at entry and at exit tells what the
//! run did: a probe (`tcp_write_wakeup`: `icsk_probes_out` incremented), nothing due, suppressed by
//! data in flight, FIN_WAIT2 handling, or the connection killed.
//!
//! Minimum kernel: 5.2 (`baseclk` argument of timer_expire_entry), ring buffer 5.8.

use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::{btf_tracepoint, raw_tracepoint},
    programs::{BtfTracePointContext, RawTracePointContext},
    EbpfContext,
};
use keepalive_common::{
    EventKind, RawEvent, FLAG_KEEPOPEN_AFTER, FLAG_TIMER_PENDING,
};

use crate::{
    count_lost, off,
    read::{ctx_arg_scalar, fill_queues, fill_sock_lean, rd},
    EVENTS, TIMER_SCRATCH,
};

/// Whether the BTF-typed tracepoint's `struct timer_list *` argument is a keep-alive timer:
/// `timer->function` by a direct, verifier-checked load (the offset is `function`'s, from BTF;
/// the load is fault-safe), not a `bpf_probe_read_kernel` call, which every timer expiry in the
/// system would pay.
#[inline(always)]
fn is_keepalive_timer(ctx: &BtfTracePointContext) -> bool {
    let timer: *const u8 = ctx.arg(0);
    let off = off!(timer_function).off as usize;
    // SAFETY: `timer` is a BTF-typed `struct timer_list *`; see above.
    let function = unsafe { core::ptr::read_volatile(timer.wrapping_add(off) as *const u64) };
    function == off!(tcp_keepalive_timer)
}

/// `timer:timer_expire_entry` as a BTF-typed tracepoint (5.5+), filtered by
/// [`is_keepalive_timer`].
#[btf_tracepoint(function = "timer_expire_entry")]
pub fn btf_timer_expire_entry(ctx: BtfTracePointContext) -> i32 {
    if !is_keepalive_timer(&ctx) {
        return 0;
    }
    let timer = ctx_arg_scalar(ctx.as_ptr(), 0);
    let baseclk = ctx_arg_scalar(ctx.as_ptr(), 1);
    timer_enter(timer, baseclk);
    0
}

/// `timer:timer_expire_exit` as a BTF-typed tracepoint (pairs with [`btf_timer_expire_entry`]).
#[btf_tracepoint(function = "timer_expire_exit")]
pub fn btf_timer_expire_exit(ctx: BtfTracePointContext) -> i32 {
    // Cheap already: the per-CPU slot says whether a keep-alive run is in progress.
    if let Some(slot) = TIMER_SCRATCH.get_ptr(0) {
        // SAFETY: per-CPU slot.
        if unsafe { (*slot).sk } == 0 {
            // A keep-alive run whose entry was not seen here (one direct load per timer exit):
            // its event is lost, and counted.
            if is_keepalive_timer(&ctx) {
                crate::count_timer_unpaired();
            }
            return 0;
        }
    }
    timer_leave(Some(ctx_arg_scalar(ctx.as_ptr(), 0)));
    0
}

/// `timer:timer_expire_entry(struct timer_list *timer, unsigned long baseclk)`.
#[raw_tracepoint(tracepoint = "timer_expire_entry")]
pub fn timer_expire_entry(ctx: RawTracePointContext) -> i32 {
    let timer: u64 = ctx.arg(0);
    if rd(timer, off!(timer_function)) != off!(tcp_keepalive_timer) {
        return 0;
    }
    let baseclk: u64 = ctx.arg(1);
    timer_enter(timer, baseclk);
    0
}

/// Records the socket's state at the start of a `tcp_keepalive_timer` run on `timer`, at `jiffies`.
/// Shared by every strategy that reaches the timer (tracepoint, fentry, kprobe).
#[inline(always)]
pub fn timer_enter(timer: u64, jiffies: u64) {
    let Some(slot) = TIMER_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    let sk = timer - off!(sk_timer).off as u64;
    // SAFETY: per-CPU slot; timer callbacks do not nest on one CPU.
    let slot = unsafe { &mut *slot };
    if slot.sk != 0 {
        // The previous run's exit was not seen here: its event is lost, and counted.
        crate::count_timer_unpaired();
    }
    let ev = &mut slot.ev;
    crate::zero_event(ev);
    ev.kind = EventKind::Timer as u8;
    // SAFETY: plain helper call.
    ev.ts_ns = unsafe { bpf_ktime_get_ns() };
    fill_sock_lean(ev, sk);
    ev.jiffies = jiffies;
    fill_queues(ev, sk);
    // keepalive_time_elapsed(): min(now - lrcvtime, now - rcv_tstamp), in 32-bit jiffies.
    let now = jiffies as u32;
    let a = now.wrapping_sub(rd(sk, off!(icsk_ack_lrcvtime)) as u32);
    let b = now.wrapping_sub(rd(sk, off!(tp_rcv_tstamp)) as u32);
    ev.idle_jiffies = if a < b { a } else { b };
    slot.sk = sk;
}

/// `timer:timer_expire_exit(struct timer_list *timer)`.
#[raw_tracepoint(tracepoint = "timer_expire_exit")]
pub fn timer_expire_exit(ctx: RawTracePointContext) -> i32 {
    let timer: u64 = ctx.arg(0);
    timer_leave(Some(timer));
    0
}

/// Completes the event of the run in progress on this CPU and sends it. `timer`, when the strategy
/// knows it, must match the run's timer (`None`: kretprobe, which gets no arguments).
#[inline(always)]
pub fn timer_leave(timer: Option<u64>) {
    let Some(slot) = TIMER_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU slot.
    let slot = unsafe { &mut *slot };
    let sk = slot.sk;
    if sk == 0 {
        return;
    }
    if let Some(t) = timer {
        if sk + off!(sk_timer).off as u64 != t {
            // Not the run that entered: that run's exit was missed. Count it and free the slot,
            // so that the socket's later events are not taken as happening inside its timer.
            crate::count_timer_unpaired();
            slot.sk = 0;
            return;
        }
    }
    slot.sk = 0;
    let Some(mut entry) = EVENTS.reserve::<RawEvent>(0) else {
        count_lost(EventKind::Timer as u8);
        return;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` points to a reserved RawEvent-sized ring buffer record.
    unsafe {
        crate::copy_event(&mut *ev, &slot.ev);
        let ev = &mut *ev;
        ev.exit_ts_ns = bpf_ktime_get_ns();
        ev.new_state = rd(sk, off!(skc_state)) as u8;
        ev.probes_out_after = rd(sk, off!(icsk_probes_out)) as u8;
        ev.err = rd(sk, off!(sk_err)) as u32 as i32;
        let sk_flags = rd(sk, off!(sk_flags));
        if sk_flags & (1u64 << (off!(sock_keepopen_bit) & 63)) != 0 {
            ev.flags |= FLAG_KEEPOPEN_AFTER;
        }
        let t = sk + off!(sk_timer).off as u64;
        ev.timer_expires = rd(t, off!(timer_expires));
        if rd(t, off!(timer_pprev)) != 0 {
            ev.flags |= FLAG_TIMER_PENDING;
        }
    }
    crate::submit(entry);
}

/// Whether `sk`'s keep-alive timer is running on this CPU right now (for events the timer causes).
#[inline(always)]
pub fn in_timer(sk: u64) -> bool {
    match TIMER_SCRATCH.get_ptr(0) {
        // SAFETY: per-CPU slot.
        Some(slot) => unsafe { (*slot).sk == sk },
        None => false,
    }
}
