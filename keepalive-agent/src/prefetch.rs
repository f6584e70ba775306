//! Software prefetch: bringing a table entry into cache before it is used.
//!
//! The agent's per-connection state (engine, span model) is spread over the heap, and a healthy
//! connection's records come once a keep-alive interval: each record's first touch of its
//! connection's state misses in cache, and one after the other those misses are most of a
//! record's cost. Asking for the lines of a whole batch first lets the CPU fetch them in parallel.
//! A prefetch is only a hint: it never faults and never changes what the program computes.

/// Entries fetched together before any of them is used: enough lookups to keep the CPU's
/// outstanding misses busy, few enough that the first entries are still in cache when their turn
/// comes. The event loop stages this many ring-buffer records, the span model takes its records
/// in chunks of this many.
pub const BATCH: usize = 16;

/// Asks for the cache lines of `*p` (all `size_of::<T>()` bytes) to be loaded.
#[inline(always)]
pub fn prefetch<T>(p: *const T) {
    let base = p.cast::<u8>();
    let mut off = 0;
    while off < std::mem::size_of::<T>() {
        line(base.wrapping_add(off));
        off += 64;
    }
}

#[inline(always)]
fn line(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 is a hint; it does not fault, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast());
    }
    #[cfg(target_arch = "aarch64")]
    // SAFETY: PRFM is a hint; it does not fault, whatever the address.
    unsafe {
        std::arch::asm!("prfm pldl1keep, [{0}]", in(reg) p, options(nostack, readonly, preserves_flags));
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let _ = p;
}
