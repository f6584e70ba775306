//! keepalive eBPF programs: the tracepoint path.
//!
//! Reaches the four kernel functions keep-alive depends on without kprobes or fentry:
//! - `tcp_keepalive_timer`: `timer:timer_expire_entry/exit` filtered on the timer's function
//!   ([`timer`]);
//! - `tcp_write_wakeup` (the probe): `icsk_probes_out` read at timer entry and exit ([`timer`]); the
//!   answer: `tcp:tcp_probe` while probes are outstanding ([`sock_events`]);
//! - `tcp_send_active_reset`: `tcp:tcp_send_reset` with no incoming skb ([`sock_events`]);
//! - setsockopt of keep-alive options: `cgroup/setsockopt` ([`sockopt`]);
//! plus socket errors, state changes, destruction ([`sock_events`]), the process that accepted a
//! socket ([`owner`]), an `iter/tcp` start-up snapshot ([`snapshot`]) and the `audit` command's
//! `iter/tcp` socket walk ([`audit`]).
//!
//! Every kernel struct offset comes from the read-only global [`OFFSETS`], filled by the agent from
//! the running kernel's BTF before load. Programs are passive: they only read.
#![no_std]
#![no_main]
// `atomic_xadd`: the BPF target has no compare-and-swap, so `AtomicU64::fetch_add` is not offered;
// the intrinsic lowers to the BPF atomic add (`lock xadd`, every kernel).
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod read;
mod audit;
mod direct;
mod owner;
mod snapshot;
mod sock_events;
mod sockopt;
mod timer;

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, PerCpuArray, RingBuf},
};
use aya_ebpf::helpers::generated::bpf_jiffies64;
use keepalive_common::{
    AuditRecord, Offsets, RawEvent, ACCEPT_MARK_AT_START, ACCEPT_MARK_REFRESH_S, ACCEPT_WINDOW_S, AWAIT_OWNER_MAX,
    LOST_SLOTS,
};

/// Kernel layout, resolved from BTF by the agent (`EbpfLoader::set_global`).
#[unsafe(no_mangle)]
static OFFSETS: Offsets = unsafe { core::mem::zeroed() };

/// Bytes of [`EVENTS`], set by the agent with the map's size (`EbpfLoader::override_global`), so
/// that [`submit`] does not ask the kernel for a number that never changes. 0 (not set: the audit
/// loader, which sends no events) makes every power of two a wake-up mark.
#[unsafe(no_mangle)]
static RING_BYTES: u64 = 0;

/// Events to user space. The agent sets the size at load time.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(8 * 1024 * 1024, 0);

/// Events that did not fit in [`EVENTS`], per CPU, per event kind.
#[map]
static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(LOST_SLOTS, 0);

/// Sockets not followed whose death was reported without an owner (it came in softirq), until
/// they are destroyed: only their destruction is checked for the owner's context ([`owner`]), so
/// that closing any other socket costs one lookup, not an event. An entry per dying socket, removed
/// at its destruction; a full table is counted ([`keepalive_common::LOST_SLOT_AWAIT_OWNER`]).
#[map]
static AWAIT_OWNER: HashMap<u64, u8> = HashMap::with_max_entries(AWAIT_OWNER_MAX, 0);

/// `jiffies` when a keep-alive-relevant socket was last passively established, or
/// [`ACCEPT_MARK_AT_START`] (written by the agent before attaching): the accept-owner programs
/// only walk the descriptor table within [`keepalive_common::ACCEPT_WINDOW_S`] of it ([`owner`]).
/// `jiffies`, not `bpf_ktime_get_ns`: reading the clock source costs more than the rest of the
/// check on a VM, and the window needs no precision.
#[map]
static ACCEPT_MARK: Array<u64> = Array::with_max_entries(1, 0);

/// Marks now as the time a keep-alive-relevant socket was passively established; written at most
/// once per [`keepalive_common::ACCEPT_MARK_REFRESH_S`].
#[inline(always)]
pub(crate) fn mark_passive_keepalive() {
    let Some(mark) = ACCEPT_MARK.get_ptr_mut(0) else { return };
    // SAFETY: plain helper call (5.5+).
    let now = unsafe { bpf_jiffies64() };
    let refresh = ACCEPT_MARK_REFRESH_S * off!(hz) as u64;
    // SAFETY: `mark` points into the array's value; a race between CPUs only moves the mark by
    // the refresh interval.
    unsafe {
        let at = core::ptr::read_volatile(mark);
        if at == ACCEPT_MARK_AT_START || now.wrapping_sub(at) >= refresh {
            core::ptr::write_volatile(mark, now);
        }
    }
}

/// Whether a keep-alive-relevant socket was passively established within
/// [`keepalive_common::ACCEPT_WINDOW_S`] (the first call after the agent started opens it).
#[inline(always)]
pub(crate) fn accept_window_open() -> bool {
    let Some(mark) = ACCEPT_MARK.get_ptr_mut(0) else { return true };
    // SAFETY: plain helper call (5.5+); `mark` points into the array's value.
    unsafe {
        let now = bpf_jiffies64();
        let at = core::ptr::read_volatile(mark);
        if at == ACCEPT_MARK_AT_START {
            core::ptr::write_volatile(mark, now);
            return true;
        }
        now.wrapping_sub(at) < ACCEPT_WINDOW_S * off!(hz) as u64
    }
}

/// How many sockets [`AWAIT_OWNER`] holds (index 0): while none, a destroyed socket is not looked
/// up (the common case; the lookup is the larger part of the destroy program's cost). Raised
/// before an insertion and lowered after a removal, so a socket in the table is never missed.
#[map]
static AWAIT_OWNER_COUNT: Array<u64> = Array::with_max_entries(1, 0);

/// `EEXIST` (uapi errno): the socket is in the table already.
const EEXIST: i32 = 17;

/// Adds `delta` to [`AWAIT_OWNER_COUNT`] atomically.
#[inline(always)]
fn await_count_add(delta: u64) {
    use core::intrinsics::{atomic_xadd, AtomicOrdering};
    if let Some(count) = AWAIT_OWNER_COUNT.get_ptr_mut(0) {
        // SAFETY: `count` points into the array's value, aligned; updated only atomically. The
        // previous value is not used (a plain atomic add, no fetch).
        let _ = unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(count, delta) };
    }
}

/// Remembers `sk`, dead without an owner, until its destruction.
#[inline(always)]
pub(crate) fn await_owner(sk: u64) {
    await_count_add(1);
    // BPF_NOEXIST: a socket already waiting is counted once.
    if let Err(e) = AWAIT_OWNER.insert(&sk, &1, aya_ebpf::bindings::BPF_NOEXIST as u64) {
        await_count_add(u64::MAX);
        if e != -EEXIST {
            bump_lost(keepalive_common::LOST_SLOT_AWAIT_OWNER);
        }
    }
}

/// Whether any socket awaits its owner ([`AWAIT_OWNER_COUNT`] above 0).
#[inline(always)]
pub(crate) fn owners_awaited() -> bool {
    let Some(count) = AWAIT_OWNER_COUNT.get_ptr(0) else { return false };
    // SAFETY: `count` points into the array's value.
    unsafe { core::ptr::read_volatile(count) != 0 }
}

/// Whether `sk`, being destroyed, was awaiting its owner (and forgets it).
#[inline(always)]
pub(crate) fn awaited_owner(sk: u64) -> bool {
    if !owners_awaited() {
        return false;
    }
    // SAFETY: the value is not kept past this call.
    if unsafe { AWAIT_OWNER.get(&sk) }.is_none() {
        return false;
    }
    if AWAIT_OWNER.remove(&sk).is_ok() {
        await_count_add(u64::MAX);
    }
    true
}

/// Per-CPU state of the `tcp_keepalive_timer` run in progress on this CPU (timer callbacks do not
/// nest on a CPU): the socket and what its entry read, which the run may change. The event itself
/// is built at timer exit.
#[repr(C)]
pub struct TimerScratch {
    /// The socket whose keep-alive timer is running on this CPU, 0 if none.
    pub sk: u64,
    /// Monotonic time at entry.
    pub ts_ns: u64,
    /// The timer base's clock at entry (jiffies).
    pub jiffies: u64,
    /// `FLAG_OWNED` at entry.
    pub flags: u32,
    /// `sk_state` at entry.
    pub state: u8,
    /// `icsk_probes_out` at entry.
    pub probes_out: u8,
    pub _pad: [u8; 2],
}

#[map]
static TIMER_SCRATCH: PerCpuArray<TimerScratch> = PerCpuArray::with_max_entries(1, 0);

/// A BTF-typed pointer stored and loaded back as a plain number ([`read::arg_number`]).
#[map]
static LAUNDER: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Scratch space for building one event outside the ring buffer (snapshot iterator).
#[map]
static EVENT_SCRATCH: PerCpuArray<RawEvent> = PerCpuArray::with_max_entries(1, 0);

/// Scratch space for building one audit record (`audit_tcp` iterator).
#[map]
static AUDIT_SCRATCH: PerCpuArray<AuditRecord> = PerCpuArray::with_max_entries(1, 0);

/// Reads one field of the global [`OFFSETS`] so the loader's value is used, not the zero
/// initializer (the verifier sees the frozen read-only map and folds it to a constant).
macro_rules! off {
    ($field:ident) => {{
        #[allow(unused_unsafe)]
        // SAFETY: reading a plain global.
        let v = unsafe { core::ptr::read_volatile(core::ptr::addr_of!($crate::OFFSETS.$field)) };
        v
    }};
}
pub(crate) use off;

/// Whether events of network namespace `netns` are sent: [`Offsets::only_netns`] (the agent's
/// `--netns`) is 0 or `netns`.
#[inline(always)]
pub(crate) fn netns_wanted(netns: u32) -> bool {
    let only = off!(only_netns);
    only == 0 || only == netns
}

/// Whether the socket at `sk` is in a network namespace whose events are not sent (`--netns`);
/// its namespace is read only while such a filter is set.
#[inline(always)]
pub(crate) fn netns_unwanted(sk: u64) -> bool {
    let only = off!(only_netns);
    only != 0 && read::rd(read::rd(sk, off!(skc_net)), off!(net_ns_inum)) as u32 != only
}

/// Submits a ring-buffer record, waking the agent when the pending data crosses a sixteenth of
/// the ring, and again at each power of two above that (an eighth, a quarter, a half).
///
/// Waking the reader on every record costs an interrupt per event (an IPI, a trap to the
/// hypervisor in a VM) and a context switch in the agent; the agent polls at least every 100 ms
/// anyway, which bounds the added latency. Only the record that crosses a mark wakes: keep-alive
/// timers fire in bursts (the timer wheel rounds their expiry), and waking on every record above
/// the mark sent an IPI per record for the rest of each burst while the agent, already awake,
/// drained (measured: ~280 IPIs/s at 5,000 connections, half the answer program's run time). A
/// crossing is judged from the data pending without this record; another CPU's record reserved
/// in between can hide it, and the next mark, or the poll, then wakes the agent.
#[inline(always)]
pub(crate) fn submit<T>(entry: aya_ebpf::maps::ring_buf::RingBufEntry<T>) {
    use aya_ebpf::bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP};
    let pending = EVENTS.query(BPF_RB_AVAIL_DATA as u64);
    // SAFETY: reading a plain global.
    let size = unsafe { core::ptr::read_volatile(core::ptr::addr_of!(RING_BYTES)) };
    let rec = keepalive_common::ring_record_bytes(core::mem::size_of::<T>());
    let flags = if keepalive_common::ring_wake_crosses_mark(pending, rec, size / 16) {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    entry.submit(flags as u64);
}

/// Zeroes an event with 8-byte stores. `*ev = RawEvent::zeroed()` compiles to a call of the
/// BPF `memset`, which stores a byte at a time (192 iterations; it showed in profiles).
#[inline(always)]
pub(crate) fn zero_event(ev: &mut RawEvent) {
    let words = ev as *mut RawEvent as *mut u64;
    for i in 0..WORDS {
        // SAFETY: RawEvent is 8-byte aligned, a multiple of 8 bytes, and all-zero is valid;
        // volatile keeps the compiler from turning the loop back into a memset call.
        unsafe { core::ptr::write_volatile(words.add(i), 0) };
    }
}

/// [`RawEvent`] in 8-byte words.
const WORDS: usize = keepalive_common::RAW_EVENT_SIZE / 8;
const _: () = assert!(keepalive_common::RAW_EVENT_SIZE % 8 == 0 && core::mem::align_of::<RawEvent>() == 8);

/// Counts an event lost because the ring buffer was full.
#[inline(always)]
pub(crate) fn count_lost(kind: u8) {
    bump_lost(kind as u32);
}

/// Counts a keep-alive setting the kprobe strategy's in-flight map lost
/// ([`keepalive_common::LOST_SLOT_INFLIGHT`]).
#[inline(always)]
pub(crate) fn count_lost_inflight() {
    bump_lost(keepalive_common::LOST_SLOT_INFLIGHT);
}

/// Counts a keep-alive timer run seen by only one of its programs
/// ([`keepalive_common::LOST_SLOT_TIMER_UNPAIRED`]).
#[inline(always)]
pub(crate) fn count_timer_unpaired() {
    bump_lost(keepalive_common::LOST_SLOT_TIMER_UNPAIRED);
}

#[inline(always)]
fn bump_lost(index: u32) {
    if let Some(slot) = LOST.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *slot += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
