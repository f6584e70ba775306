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
    EventKind, RawEvent, FLAG_KEEPOPEN, FLAG_KEEPOPEN_AFTER, FLAG_OWNED, FLAG_TIMER_PENDING,
};

use crate::{
    count_lost, off,
    read::{arg_number, fill_queues, fill_sock_lean_unowned, rd, Mem, Probe, Typed},
    TimerScratch, EVENTS, TIMER_SCRATCH,
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
    btf_timer_enter::<Probe>(&ctx)
}

/// [`btf_timer_expire_entry`] reading the socket with plain loads ([`Typed`]: `bpf_rdonly_cast`,
/// 6.2+).
#[btf_tracepoint(function = "timer_expire_entry")]
pub fn btf_timer_expire_entry_cast(ctx: BtfTracePointContext) -> i32 {
    btf_timer_enter::<Typed>(&ctx)
}

#[inline(always)]
fn btf_timer_enter<M: Mem>(ctx: &BtfTracePointContext) -> i32 {
    if !is_keepalive_timer(ctx) {
        return 0;
    }
    let timer = arg_number(ctx.as_ptr(), 0, ctx.arg(0));
    // `baseclk` is a plain number: a direct load of the context.
    let baseclk: u64 = ctx.arg(1);
    timer_enter_with::<M>(timer, baseclk);
    0
}

/// `timer:timer_expire_exit` as a BTF-typed tracepoint (pairs with [`btf_timer_expire_entry`]).
#[btf_tracepoint(function = "timer_expire_exit")]
pub fn btf_timer_expire_exit(ctx: BtfTracePointContext) -> i32 {
    btf_timer_exit::<Probe>(&ctx)
}

/// [`btf_timer_expire_exit`] reading the socket with plain loads (pairs with
/// [`btf_timer_expire_entry_cast`]).
#[btf_tracepoint(function = "timer_expire_exit")]
pub fn btf_timer_expire_exit_cast(ctx: BtfTracePointContext) -> i32 {
    btf_timer_exit::<Typed>(&ctx)
}

#[inline(always)]
fn btf_timer_exit<M: Mem>(ctx: &BtfTracePointContext) -> i32 {
    let Some(slot) = TIMER_SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: per-CPU slot.
    let slot = unsafe { &mut *slot };
    // Cheap already: the per-CPU slot says whether a keep-alive run is in progress.
    if slot.sk == 0 {
        // A keep-alive run whose entry was not seen here (one direct load per timer exit):
        // its event is lost, and counted.
        if is_keepalive_timer(ctx) {
            crate::count_timer_unpaired();
        }
        return 0;
    }
    let ptr: *const u8 = ctx.arg(0);
    let timer = arg_number(ctx.as_ptr(), 0, ptr);
    // SAFETY: `ptr` is the BTF-typed `struct timer_list *`: direct, fault-safe loads.
    let (expires, pprev) = unsafe {
        (
            core::ptr::read_volatile(ptr.wrapping_add(off!(timer_expires).off as usize) as *const u64),
            core::ptr::read_volatile(ptr.wrapping_add(off!(timer_pprev).off as usize) as *const u64),
        )
    };
    timer_leave_slot::<M>(slot, Some(timer), Some((expires, pprev)));
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

/// Records the start of a `tcp_keepalive_timer` run on `timer`, at `jiffies`.
/// Shared by every strategy that reaches the timer (tracepoint, fentry, kprobe).
///
/// Reads at entry only what the run may change: the state and the probe count before it, and
/// whether the owner held the socket (the run then only re-arms). Everything else is read at exit
/// ([`timer_leave`]), from cache lines the kernel's timer has just touched: read here, at the
/// start of the run, each of the socket's lines cost this program a cache miss (5,000 sockets'
/// lines are not in cache a second later), about 100 ns each on the machine it was measured on.
#[inline(always)]
pub fn timer_enter(timer: u64, jiffies: u64) {
    timer_enter_with::<Probe>(timer, jiffies);
}

/// [`timer_enter`] with reads of `M`.
#[inline(always)]
fn timer_enter_with<M: Mem>(timer: u64, jiffies: u64) {
    let Some(slot) = TIMER_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU slot; timer callbacks do not nest on one CPU.
    let slot = unsafe { &mut *slot };
    let sk = timer - off!(sk_timer).off as u64;
    if slot.sk != 0 {
        // The previous run's exit was not seen here: its event is lost, and counted.
        crate::count_timer_unpaired();
    }
    // SAFETY: plain helper call.
    slot.ts_ns = unsafe { bpf_ktime_get_ns() };
    slot.jiffies = jiffies;
    let base = M::base(sk);
    slot.state = M::rd(base, off!(skc_state)) as u8;
    slot.probes_out = M::rd(base, off!(icsk_probes_out)) as u8;
    slot.flags = if M::rd(base, off!(sk_lock_owned)) != 0 { FLAG_OWNED } else { 0 };
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
    timer_leave_slot::<Probe>(unsafe { &mut *slot }, timer, None);
}

/// [`timer_leave`] with the slot; `timer_fields`: the timer's `expires` and `entry.pprev` when the
/// caller loaded them directly (BTF-typed program).
///
/// The socket is read here, after the run. A run that killed an orphan socket may have freed it
/// (`sock_put` at the end of the run); TCP sockets come from a `SLAB_TYPESAFE_BY_RCU` cache, so
/// the memory is still a socket's, with the values it had, unless it was reused in the
/// microseconds since on this CPU.
#[inline(always)]
fn timer_leave_slot<M: Mem>(slot: &mut TimerScratch, timer: Option<u64>, timer_fields: Option<(u64, u64)>) {
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
    if crate::netns_unwanted(sk) {
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<RawEvent>(0) else {
        count_lost(EventKind::Timer as u8);
        return;
    };
    // SAFETY: `entry` is a reserved RawEvent-sized ring buffer record.
    let ev = unsafe { &mut *entry.as_mut_ptr() };
    crate::zero_event(ev);
    ev.kind = EventKind::Timer as u8;
    // Whether the owner held the socket is the entry's reading (the run only re-arms then).
    fill_sock_lean_unowned::<M>(ev, sk);
    let base = M::base(sk);
    // What fill_sock_lean_unowned read is the state after the run; the entry's is the state before.
    (ev.new_state, ev.probes_out_after) = (ev.state, ev.probes_out);
    if ev.flags & FLAG_KEEPOPEN != 0 {
        ev.flags |= FLAG_KEEPOPEN_AFTER;
    }
    (ev.state, ev.probes_out) = (slot.state, slot.probes_out);
    ev.flags |= slot.flags;
    (ev.ts_ns, ev.jiffies) = (slot.ts_ns, slot.jiffies);
    // What is in flight or queued. The kernel probes only with neither (`packets_out == 0` and
    // `write_seq == snd_nxt`, checked under the socket lock before the probe, which queues no
    // data), so a run that probed had both 0: `packets_out`, `write_seq` and `snd_nxt` are read
    // only on the other runs (measured: ~60 ns less per probe).
    if ev.probes_out_after != ev.probes_out.wrapping_add(1) {
        fill_queues::<M>(ev, base);
    }
    // keepalive_time_elapsed(): min(now - lrcvtime, now - rcv_tstamp), in 32-bit jiffies.
    let now = ev.jiffies as u32;
    let a = now.wrapping_sub(M::rd(base, off!(icsk_ack_lrcvtime)) as u32);
    let b = now.wrapping_sub(M::rd(base, off!(tp_rcv_tstamp)) as u32);
    ev.idle_jiffies = if a < b { a } else { b };
    // `sk_err` only where the run ended the connection (ETIMEDOUT); nothing reads it on the runs
    // that leave the connection open, and its cache line is one the kernel's timer does not touch.
    if u32::from(ev.new_state) == off!(tcp_close) {
        ev.err = M::rd(base, off!(sk_err)) as u32 as i32;
    }
    let (expires, pprev) = match timer_fields {
        Some(f) => f,
        None => {
            let t = sk + off!(sk_timer).off as u64;
            (rd(t, off!(timer_expires)), rd(t, off!(timer_pprev)))
        }
    };
    ev.timer_expires = expires;
    if pprev != 0 {
        ev.flags |= FLAG_TIMER_PENDING;
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
