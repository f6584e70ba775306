//! Keep-alive socket options set through `setsockopt(2)`, seen by a `cgroup/setsockopt` program.
//!
//! The program is passive: it never changes the option and always returns 1 (returning 0 would make
//! `setsockopt` fail with EPERM for every process in the cgroup). Minimum kernel: 5.3.

use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::cgroup_sockopt, programs::SockoptContext};
use keepalive_common::{
    EventKind, RawEvent, SOL_SOCKET, SOL_TCP, SO_KEEPALIVE, TCP_KEEPCNT, TCP_KEEPIDLE,
    TCP_KEEPINTVL, TCP_USER_TIMEOUT,
};

use crate::{
    count_lost,
    read::{fill_process, fill_sock},
    EVENTS,
};

/// Kernels before 6.5 fail `setsockopt` with EFAULT when the option is longer than a page and a
/// cgroup program leaves `optlen` as is; 0 tells every kernel to use the caller's buffer unchanged.
const PAGE_SIZE: i32 = 4096;

#[cgroup_sockopt(setsockopt)]
pub fn setsockopt(ctx: SockoptContext) -> i32 {
    // SAFETY: the context pointer is valid for the program's run.
    let opt = unsafe { &mut *ctx.sockopt };
    if opt.optlen > PAGE_SIZE {
        opt.optlen = 0;
        return 1;
    }
    let level = opt.level;
    let optname = opt.optname;
    if !is_keepalive_option(level, optname) {
        return 1;
    }
    // SAFETY: reading the union fields the kernel provides for setsockopt.
    let (sk, optval, optval_end) = unsafe {
        (
            opt.__bindgen_anon_1.sk,
            opt.__bindgen_anon_2.optval as *const u8,
            opt.__bindgen_anon_3.optval_end as *const u8,
        )
    };
    if sk.is_null() {
        return 1;
    }
    // SAFETY: bounds checked against optval_end as the verifier requires.
    let value = unsafe {
        if optval.add(4) > optval_end {
            return 1;
        }
        core::ptr::read_unaligned(optval as *const i32)
    };
    // SAFETY: reading a field of the bpf_sock view.
    if unsafe { (*sk).protocol } != 6 {
        return 1;
    }
    let Some(mut entry) = EVENTS.reserve::<RawEvent>(0) else {
        count_lost(EventKind::Setsockopt as u8);
        return 1;
    };
    // SAFETY: reserved RawEvent-sized record.
    let ev = unsafe { &mut *entry.as_mut_ptr() };
    crate::zero_event(ev);
    // The kernel address of the socket is its identity: store it, then read it back from the record
    // as a plain number, which the verifier lets us use for BTF-offset reads.
    unsafe { core::ptr::write_volatile(&mut ev.sk, sk as u64) };
    let sk_addr = unsafe { core::ptr::read_volatile(&ev.sk) };
    fill_sockopt(ev, sk_addr, level, optname, value);
    if !crate::netns_wanted(ev.netns) {
        // `--netns`: another namespace (options are rare; the record is given back unsent).
        entry.discard(aya_ebpf::bindings::BPF_RB_NO_WAKEUP as u64);
        return 1;
    }
    crate::submit(entry);
    1
}

/// Fills a `Setsockopt` event for `sk` (shared with the fentry/kprobe strategies).
#[inline(always)]
pub fn fill_sockopt(ev: &mut RawEvent, sk: u64, level: i32, optname: i32, value: i32) {
    ev.kind = EventKind::Setsockopt as u8;
    // SAFETY: plain helper call.
    ev.ts_ns = unsafe { bpf_ktime_get_ns() };
    fill_sock(ev, sk);
    fill_process(ev);
    ev.level = level;
    ev.optname = optname;
    ev.optval = value;
}

/// Sends a `Setsockopt` event for `sk`.
#[inline(always)]
pub fn emit_sockopt(sk: u64, level: i32, optname: i32, value: i32) {
    if crate::netns_unwanted(sk) {
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<RawEvent>(0) else {
        count_lost(EventKind::Setsockopt as u8);
        return;
    };
    // SAFETY: reserved RawEvent-sized record.
    let ev = unsafe { &mut *entry.as_mut_ptr() };
    crate::zero_event(ev);
    fill_sockopt(ev, sk, level, optname, value);
    crate::submit(entry);
}

/// Whether `level`/`optname` is a keep-alive option.
#[inline(always)]
pub fn is_keepalive_option(level: i32, optname: i32) -> bool {
    (level == SOL_SOCKET && optname == SO_KEEPALIVE)
        || (level == SOL_TCP
            && (optname == TCP_KEEPIDLE
                || optname == TCP_KEEPINTVL
                || optname == TCP_KEEPCNT
                || optname == TCP_USER_TIMEOUT))
}
