//! Direct strategies: fentry/fexit (BPF trampoline, 5.5+; argument and return helpers 5.17+) and
//! kprobe/kretprobe programs on the kernel functions themselves. They produce the same events as
//! the tracepoint path, more cheaply (no filtering of every timer in the system) and more precisely
//! (setsockopt values as the kernel applied them, active resets only).
//!
//! Reached functions:
//! - `tcp_keepalive_timer(struct timer_list *)`: the timer run (entry and exit);
//! - `tcp_send_active_reset(struct sock *, gfp_t[, enum sk_rst_reason])`: active resets;
//! - `tcp_set_keepalive(struct sock *, int)`: every SO_KEEPALIVE change of a TCP socket, from
//!   `setsockopt(2)`, `sock_set_keepalive()` (in-kernel users) or `bpf_setsockopt`;
//! - `do_tcp_setsockopt(struct sock *, int level, int optname, sockptr_t, unsigned int)`: every
//!   SOL_TCP option from `setsockopt(2)` and `bpf_setsockopt`; seen at exit, when it succeeded, with
//!   the value the socket now holds.
//!
//! Arguments are read with `bpf_get_func_arg` (fentry/fexit) or from the saved registers (kprobe):
//! plain numbers, on which the verifier allows our BTF-offset arithmetic.

use aya_ebpf::{
    helpers::generated::{bpf_get_current_pid_tgid, bpf_get_func_arg, bpf_get_func_ret},
    macros::{fentry, fexit, kprobe, kretprobe, map},
    maps::LruHashMap,
    programs::{FEntryContext, FExitContext, ProbeContext, RetProbeContext},
    EbpfContext,
};
use keepalive_common::{
    SOL_SOCKET, SOL_TCP, SO_KEEPALIVE, TCP_KEEPCNT, TCP_KEEPIDLE, TCP_KEEPINTVL,
    TCP_USER_TIMEOUT,
};

use crate::{
    count_lost_inflight, off,
    read::rd,
    sock_events::emit_reset,
    sockopt::{emit_sockopt, is_keepalive_option},
    timer::{timer_enter, timer_leave},
};

/// The `n`th argument of the traced function, as a number (0 when unavailable).
#[inline(always)]
fn func_arg<C: EbpfContext>(ctx: &C, n: u32) -> u64 {
    let mut v: u64 = 0;
    // SAFETY: helper writes one u64.
    unsafe { bpf_get_func_arg(ctx.as_ptr(), n, &mut v) };
    v
}

/// The traced function's return value (fexit).
#[inline(always)]
fn func_ret<C: EbpfContext>(ctx: &C) -> u64 {
    let mut v: u64 = 0;
    // SAFETY: helper writes one u64.
    unsafe { bpf_get_func_ret(ctx.as_ptr(), &mut v) };
    v
}

/// `v`, through a volatile stack copy (an optimisation barrier).
#[inline(always)]
fn copy_volatile(v: u64) -> u64 {
    let mut slot = v;
    // SAFETY: reading and writing a local.
    unsafe {
        core::ptr::write_volatile(&mut slot, v);
        core::ptr::read_volatile(&slot)
    }
}

/// Current jiffies for the timer programs that get no `baseclk`: `jiffies_64` when kallsyms lists
/// it, else the timer's own expiry (it has just expired, so it is at most a few ticks behind).
#[inline(always)]
fn jiffies_for(timer: u64) -> u64 {
    let addr = off!(jiffies_addr);
    if addr != 0 {
        let j = rd(addr, keepalive_common::Field::new(0, 8));
        if j != 0 {
            return j;
        }
    }
    rd(timer, off!(timer_expires))
}

// ---- tcp_keepalive_timer ----

#[fentry(function = "tcp_keepalive_timer")]
pub fn fentry_tcp_keepalive_timer(ctx: FEntryContext) -> i32 {
    let timer = func_arg(&ctx, 0);
    timer_enter(timer, jiffies_for(timer));
    0
}

#[fexit(function = "tcp_keepalive_timer")]
pub fn fexit_tcp_keepalive_timer(ctx: FExitContext) -> i32 {
    timer_leave(Some(func_arg(&ctx, 0)));
    0
}

#[kprobe]
pub fn kprobe_tcp_keepalive_timer(ctx: ProbeContext) -> u32 {
    let timer: u64 = ctx.arg(0).unwrap_or(0);
    if timer != 0 {
        timer_enter(timer, jiffies_for(timer));
    }
    0
}

#[kretprobe]
pub fn kretprobe_tcp_keepalive_timer(_ctx: RetProbeContext) -> u32 {
    timer_leave(None);
    0
}

// ---- tcp_send_active_reset ----

#[fentry(function = "tcp_send_active_reset")]
pub fn fentry_tcp_send_active_reset(ctx: FEntryContext) -> i32 {
    let sk = func_arg(&ctx, 0);
    let arg = off!(active_reset_reason_arg);
    let reason = if arg != 0 { func_arg(&ctx, arg - 1) as u32 } else { 0 };
    if sk != 0 {
        emit_reset(sk, true, arg != 0, reason);
    }
    0
}

#[kprobe]
pub fn kprobe_tcp_send_active_reset(ctx: ProbeContext) -> u32 {
    let sk: u64 = ctx.arg(0).unwrap_or(0);
    let arg = off!(active_reset_reason_arg);
    let has_reason = arg != 0;
    // Constant-index reads through volatile copies: a variable index makes LLVM compute
    // `ctx + offset`, which the verifier refuses ("dereference of modified ctx ptr").
    let a1 = copy_volatile(ctx.arg::<u64>(1).unwrap_or(0));
    let a2 = copy_volatile(ctx.arg::<u64>(2).unwrap_or(0));
    let reason: u64 = match arg {
        2 => a1,
        3 => a2,
        _ => 0,
    };
    if sk != 0 {
        emit_reset(sk, true, has_reason, reason as u32);
    }
    0
}

// ---- SO_KEEPALIVE: tcp_set_keepalive(sk, val) ----

#[fentry(function = "tcp_set_keepalive")]
pub fn fentry_tcp_set_keepalive(ctx: FEntryContext) -> i32 {
    let sk = func_arg(&ctx, 0);
    let val = func_arg(&ctx, 1) as i32;
    if sk != 0 {
        emit_sockopt(sk, SOL_SOCKET, SO_KEEPALIVE, val);
    }
    0
}

#[kprobe]
pub fn kprobe_tcp_set_keepalive(ctx: ProbeContext) -> u32 {
    let sk: u64 = ctx.arg(0).unwrap_or(0);
    let val: u64 = ctx.arg(1).unwrap_or(0);
    if sk != 0 {
        emit_sockopt(sk, SOL_SOCKET, SO_KEEPALIVE, val as i32);
    }
    0
}

// ---- SOL_TCP options: do_tcp_setsockopt(sk, level, optname, optval, optlen) ----

/// The value `optname` now has on `sk`, in setsockopt units.
#[inline(always)]
fn applied_value(sk: u64, optname: i32) -> i32 {
    let hz = off!(hz);
    let hz = if hz == 0 { 1 } else { hz };
    match optname {
        TCP_KEEPIDLE => (rd(sk, off!(tp_keepalive_time)) as u32 / hz) as i32,
        TCP_KEEPINTVL => (rd(sk, off!(tp_keepalive_intvl)) as u32 / hz) as i32,
        TCP_KEEPCNT => rd(sk, off!(tp_keepalive_probes)) as i32,
        TCP_USER_TIMEOUT => rd(sk, off!(icsk_user_timeout)) as i32,
        _ => 0,
    }
}

#[fexit(function = "do_tcp_setsockopt")]
pub fn fexit_do_tcp_setsockopt(ctx: FExitContext) -> i32 {
    let optname = func_arg(&ctx, 2) as i32;
    if !is_keepalive_option(SOL_TCP, optname) || func_ret(&ctx) as i32 != 0 {
        return 0;
    }
    let sk = func_arg(&ctx, 0);
    if sk != 0 {
        emit_sockopt(sk, SOL_TCP, optname, applied_value(sk, optname));
    }
    0
}

/// In-flight `do_tcp_setsockopt` calls seen by the kprobe, by thread: (sk, optname). The call may
/// sleep (it takes the socket lock), so per-CPU storage would not do. An LRU map: an entry whose
/// kretprobe never ran (kretprobe instances exhausted) cannot fill the map for good, it is evicted
/// first. Lost settings are counted in [`keepalive_common::LOST_SLOT_INFLIGHT`]: a failed insert,
/// and an entry the same thread left behind (its call's return was missed). Evicting the entry of
/// a call still in flight (more than 4096 sleeping calls at once) is the one loss it cannot see.
#[map]
static SOCKOPT_INFLIGHT: LruHashMap<u64, [u64; 2]> = LruHashMap::with_max_entries(4096, 0);

#[kprobe]
pub fn kprobe_do_tcp_setsockopt(ctx: ProbeContext) -> u32 {
    let optname: u64 = ctx.arg(2).unwrap_or(0);
    if !is_keepalive_option(SOL_TCP, optname as i32) {
        return 0;
    }
    let sk: u64 = ctx.arg(0).unwrap_or(0);
    // SAFETY: plain helper call.
    let tid = unsafe { bpf_get_current_pid_tgid() };
    if SOCKOPT_INFLIGHT.get_ptr(&tid).is_some() {
        // A thread runs one setsockopt at a time: this entry's return was never seen.
        count_lost_inflight();
    }
    if SOCKOPT_INFLIGHT.insert(&tid, &[sk, optname], 0).is_err() {
        count_lost_inflight();
    }
    0
}

#[kretprobe]
pub fn kretprobe_do_tcp_setsockopt(ctx: RetProbeContext) -> u32 {
    // SAFETY: plain helper call.
    let tid = unsafe { bpf_get_current_pid_tgid() };
    // SAFETY: the value is copied out before the entry is removed.
    let Some(&[sk, optname]) = (unsafe { SOCKOPT_INFLIGHT.get(&tid) }) else {
        return 0;
    };
    let _ = SOCKOPT_INFLIGHT.remove(&tid);
    let ret: i64 = ctx.ret();
    if ret == 0 && sk != 0 {
        let optname = optname as i32;
        emit_sockopt(sk, SOL_TCP, optname, applied_value(sk, optname));
    }
    0
}
