//! Reading kernel memory at BTF-resolved offsets.

use aya_ebpf::helpers::{
    bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
    generated::{bpf_jiffies64, bpf_probe_read_kernel},
};
use keepalive_common::{
    Field, RawEvent, FLAG_DEAD, FLAG_KEEPOPEN, FLAG_OWNED, FLAG_PROCESS,
};

use crate::off;

/// Reads the field `f` of the object at `base` (1 to 8 bytes, zero-extended). 0 when the field is
/// absent on this kernel or the read fails.
#[inline(always)]
pub fn rd(base: u64, f: Field) -> u64 {
    let mut v: u64 = 0;
    let size = f.size;
    if size == 0 || size > 8 {
        return 0;
    }
    // SAFETY: bpf_probe_read_kernel faults safely; `size` is bounded by 8 = size_of(v).
    let r = unsafe {
        bpf_probe_read_kernel(
            &mut v as *mut u64 as *mut _,
            size,
            (base + f.off as u64) as *const _,
        )
    };
    if r != 0 {
        return 0;
    }
    v
}

/// Copies `N` bytes of the field `f` of `base` into `dst` (zeros when absent).
#[inline(always)]
pub fn rd_bytes<const N: usize>(base: u64, f: Field, dst: &mut [u8; N]) {
    if f.size as usize != N {
        return;
    }
    // SAFETY: `dst` holds exactly N bytes.
    unsafe {
        bpf_probe_read_kernel(
            dst.as_mut_ptr() as *mut _,
            N as u32,
            (base + f.off as u64) as *const _,
        )
    };
}

/// How a program reads a socket: [`Probe`] by `bpf_probe_read_kernel` from its address (any
/// kernel, any program), [`Typed`] by plain loads from a pointer the verifier knows to be a
/// `struct tcp_sock` (`bpf_rdonly_cast`, a kfunc of Linux 6.2+): no helper call per field, and
/// the loads' cache misses overlap. Typed loads are fault-safe (the JIT gives them an exception
/// entry), as the helper is.
pub trait Mem {
    /// The base the fields of the socket at `sk` are read from.
    fn base(sk: u64) -> u64;
    /// The field `f` of the object at `base` (a base from [`Mem::base`], an object reached from it
    /// by a pointer field read with this `Mem`, or, for [`Typed`], a BTF-typed argument of the
    /// program, such as the `skb` of `tcp_probe`).
    fn rd(base: u64, f: Field) -> u64;
    /// Whether [`Head::read`] reads ahead (helper calls) or [`Head::get_with`] reads each field.
    const BLOCK_HEAD: bool;
}

/// Reads with `bpf_probe_read_kernel`.
pub struct Probe;

impl Mem for Probe {
    #[inline(always)]
    fn base(sk: u64) -> u64 {
        sk
    }
    #[inline(always)]
    fn rd(base: u64, f: Field) -> u64 {
        rd(base, f)
    }
    const BLOCK_HEAD: bool = true;
}

/// Reads with plain loads through `bpf_rdonly_cast(sk, <struct tcp_sock>)`. Only programs on a
/// strategy that requires the kfunc use it: the loader rewrites [`RDONLY_CAST_MARK`] calls into
/// the kfunc's, or leaves them, and such a program is then refused and the plan moves on.
pub struct Typed;

/// Helper number the loader rewrites into a call of the kfunc `bpf_rdonly_cast`.
pub const RDONLY_CAST_MARK: u32 = keepalive_common::KFUNC_MARK_RDONLY_CAST;

impl Mem for Typed {
    #[inline(always)]
    fn base(sk: u64) -> u64 {
        // SAFETY: a call the loader turns into `bpf_rdonly_cast(obj, btf_id)` (btf_id a
        // constant to the verifier: a read-only global), which only retypes the pointer.
        unsafe {
            let cast: unsafe extern "C" fn(u64, u32) -> u64 = core::mem::transmute(RDONLY_CAST_MARK as usize);
            cast(sk, off!(tcp_sock_btf_id))
        }
    }
    #[inline(always)]
    fn rd(base: u64, f: Field) -> u64 {
        // SAFETY: typed, fault-safe loads at a BTF offset, of the field's size.
        unsafe { load_sized((base as *const u8).wrapping_add(f.off as usize), f.size) }
    }
    const BLOCK_HEAD: bool = false;
}

/// A load of `size` bytes (1, 2, 4 or 8) at `p`, zero-extended; 0 for any other size. `size` is a
/// constant to the verifier (a read-only global): only its arm is kept.
///
/// # Safety
/// `p` must be valid for a load of `size` bytes, aligned to it: memory the verifier lets the
/// program read directly (a typed kernel pointer, or the program's stack).
#[inline(always)]
unsafe fn load_sized(p: *const u8, size: u32) -> u64 {
    match size {
        1 => core::ptr::read_volatile(p) as u64,
        2 => core::ptr::read_volatile(p as *const u16) as u64,
        4 => core::ptr::read_volatile(p as *const u32) as u64,
        8 => core::ptr::read_volatile(p as *const u64),
        _ => 0,
    }
}

/// Whether `sk` is a TCP socket.
#[inline(always)]
pub fn is_tcp(sk: u64) -> bool {
    rd(sk, off!(sk_protocol)) as u32 == off!(ipproto_tcp)
}

/// Fills identity, addresses, namespace, state and keep-alive settings of `sk` into `ev`, with
/// the namespace's keep-alive sysctls (settings records: setsockopt, snapshot).
#[inline(always)]
pub fn fill_sock(ev: &mut RawEvent, sk: u64) {
    fill_sock_with::<Probe>(ev, sk, true, true);
}

/// [`fill_sock`] for the frequent events (timer runs, state changes): the namespace's sysctls
/// only where the socket's own value is unset ([`read_settings_with`]); 0 otherwise.
#[inline(always)]
pub fn fill_sock_lean(ev: &mut RawEvent, sk: u64) {
    fill_sock_with::<Probe>(ev, sk, false, true);
}

/// [`fill_sock_lean`] without whether the owner holds the socket ([`FLAG_OWNED`]): for the timer's
/// exit, whose entry read it before the run.
#[inline(always)]
pub fn fill_sock_lean_unowned<M: Mem>(ev: &mut RawEvent, sk: u64) {
    fill_sock_with::<M>(ev, sk, false, false);
}

#[inline(always)]
fn fill_sock_with<M: Mem>(ev: &mut RawEvent, sk: u64, all_sysctls: bool, owned: bool) {
    let base = M::base(sk);
    let net = fill_common_with::<M>(ev, sk, base);
    if ev.sport == 0 {
        // On the way to CLOSE, inet_put_port() cleared skc_num before the state-change tracepoint.
        ev.sport = u16::from_be(M::rd(base, off!(inet_sport)) as u16);
    }
    fill_settings::<M>(ev, base, net, all_sysctls, owned);
}

/// Fills what `struct sock_common` holds (identity, addresses, namespace, state): all a program
/// may read of a time-wait or request socket, whose `struct sock *` is really an
/// `inet_timewait_sock` or a `request_sock`. Returns the namespace (`struct net *`).
///
/// The fields sit in the first bytes of `struct sock_common` on every kernel: they are read with
/// one `bpf_probe_read_kernel` of [`HEAD`] bytes (a helper call costs the same on a cached line),
/// each field taken from there where BTF put it inside, read on its own otherwise.
#[inline(always)]
pub fn fill_common(ev: &mut RawEvent, sk: u64) -> u64 {
    fill_common_with::<Probe>(ev, sk, sk)
}

/// [`fill_common`] of the socket at address `sk`, read from `base` ([`Mem::base`] of `sk`).
#[inline(always)]
fn fill_common_with<M: Mem>(ev: &mut RawEvent, sk: u64, base: u64) -> u64 {
    let head = Head::read_with::<M>(base);
    ev.sk = sk;
    ev.family = read_addrs_in::<M>(&head, base, &mut ev.saddr, &mut ev.daddr) as u8;
    ev.state = head.get_with::<M>(base, off!(skc_state)) as u8;
    ev.sport = head.get_with::<M>(base, off!(skc_num)) as u16;
    ev.dport = u16::from_be(head.get_with::<M>(base, off!(skc_dport)) as u16);
    let net = head.get_with::<M>(base, off!(skc_net));
    ev.netns = M::rd(net, off!(net_ns_inum)) as u32;
    net
}

/// Bytes of an object read at once by [`Head::read`].
pub const HEAD: usize = 64;

/// The first [`HEAD`] bytes of an object, read with one helper call.
pub struct Head {
    words: [u64; HEAD / 8],
}

impl Head {
    /// Reads the first [`HEAD`] bytes at `base` (zeros if the read fails: the helper clears
    /// its destination then; no zeroing before it, which the compiler makes a byte-wise
    /// `memset` call).
    #[inline(always)]
    pub fn read(base: u64) -> Head {
        Self::read_with::<Probe>(base)
    }

    /// [`Head::read`]; nothing read ahead where `M` reads each field by a plain load.
    #[inline(always)]
    pub fn read_with<M: Mem>(base: u64) -> Head {
        if !M::BLOCK_HEAD {
            return Head { words: [0; HEAD / 8] };
        }
        let mut words = core::mem::MaybeUninit::<[u64; HEAD / 8]>::uninit();
        let p = words.as_mut_ptr() as *mut u64;
        // SAFETY: `words` holds exactly HEAD bytes; the helper takes uninitialised memory and
        // faults safely, zeroing it on failure.
        unsafe {
            bpf_probe_read_kernel(p as *mut _, HEAD as u32, base as *const _);
            Head { words: words.assume_init() }
        }
    }

    /// The field `f` of the object at `base`: from the bytes read when it lies inside them and is
    /// naturally aligned (the verifier requires aligned stack loads; C fields are), else with
    /// [`rd`]. The offset and size are constants to the verifier (read-only globals), so only
    /// one of the two paths is kept.
    ///
    /// With `M` reading each field by a plain load ([`Head::read_with`] read nothing ahead), that
    /// load.
    #[inline(always)]
    pub fn get_with<M: Mem>(&self, base: u64, f: Field) -> u64 {
        if !M::BLOCK_HEAD {
            return M::rd(base, f);
        }
        let (off, size) = (f.off as usize, f.size as usize);
        if !matches!(size, 1 | 2 | 4 | 8) || off + size > HEAD || off % size != 0 {
            return rd(base, f);
        }
        let p = (self.words.as_ptr() as *const u8).wrapping_add(off);
        // SAFETY: inside `words` and aligned to `size` (checked above; `words` is 8-aligned).
        unsafe { load_sized(p, f.size) }
    }
}

/// The socket's idle times (jiffies since the last data sent, data received, acknowledgment
/// received), its retransmissions, the bytes the peer has not acknowledged, and how long ago the
/// data now unacknowledged was first retransmitted: what a death or a close is explained with.
#[inline(always)]
pub fn fill_times(ev: &mut RawEvent, sk: u64) {
    // SAFETY: plain helper call (5.5+). tcp_jiffies32 is the low 32 bits of jiffies.
    let now = unsafe { bpf_jiffies64() } as u32;
    ev.since_sent_jiffies = now.wrapping_sub(rd(sk, off!(tp_lsndtime)) as u32);
    ev.since_data_jiffies = now.wrapping_sub(rd(sk, off!(icsk_ack_lrcvtime)) as u32);
    ev.since_ack_jiffies = now.wrapping_sub(rd(sk, off!(tp_rcv_tstamp)) as u32);
    ev.retransmits = rd(sk, off!(icsk_retransmits)) as u32;
    let write_seq = rd(sk, off!(tp_write_seq)) as u32;
    ev.unacked = write_seq.wrapping_sub(rd(sk, off!(tp_snd_una)) as u32);
    ev.unread = if off!(tp_rcv_nxt).present() && off!(tp_copied_seq).present() {
        (rd(sk, off!(tp_rcv_nxt)) as u32).wrapping_sub(rd(sk, off!(tp_copied_seq)) as u32)
    } else {
        u32::MAX
    };
    let stamp = rd(sk, off!(tp_retrans_stamp)) as u32;
    ev.retransmitting_ms = if stamp == 0 || !off!(tp_tcp_mstamp).present() {
        u32::MAX
    } else {
        // retrans_stamp is ms of tcp_mstamp (µs) unless the connection negotiated µs timestamps.
        ((rd(sk, off!(tp_tcp_mstamp)) / 1000) as u32).wrapping_sub(stamp)
    };
}

/// Reads the local and remote addresses of `sk` (IPv4 in the first 4 bytes, network order) and
/// returns its address family.
#[inline(always)]
pub fn read_addrs(sk: u64, saddr: &mut [u8; 16], daddr: &mut [u8; 16]) -> u32 {
    read_addrs_in::<Probe>(&Head::read(sk), sk, saddr, daddr)
}

/// [`read_addrs`] with the socket's first bytes already read.
#[inline(always)]
fn read_addrs_in<M: Mem>(head: &Head, sk: u64, saddr: &mut [u8; 16], daddr: &mut [u8; 16]) -> u32 {
    let family = head.get_with::<M>(sk, off!(skc_family)) as u32;
    if family == off!(af_inet6) {
        rd_bytes(sk, off!(skc_v6_rcv_saddr), saddr);
        rd_bytes(sk, off!(skc_v6_daddr), daddr);
    } else {
        let s = head.get_with::<M>(sk, off!(skc_rcv_saddr)) as u32;
        let d = head.get_with::<M>(sk, off!(skc_daddr)) as u32;
        saddr[..4].copy_from_slice(&s.to_ne_bytes());
        daddr[..4].copy_from_slice(&d.to_ne_bytes());
    }
    family
}

/// Keep-alive settings of a socket and of its namespace, as the kernel holds them (jiffies).
pub struct Settings {
    /// `FLAG_KEEPOPEN` and `FLAG_DEAD`.
    pub flags: u32,
    pub time: u32,
    pub intvl: u32,
    pub probes: u8,
    pub user_timeout_ms: u32,
    pub sysctl_time: u32,
    pub sysctl_intvl: u32,
    pub sysctl_probes: u8,
}

/// Reads the keep-alive settings of `sk` and of its namespace `net`.
#[inline(always)]
pub fn read_settings(sk: u64, net: u64) -> Settings {
    read_settings_with::<Probe>(sk, net, true)
}

/// [`read_settings`]; with `all_sysctls` false, the namespace's values only where the socket has
/// none of its own (the only case they take effect, and the only case the kernel's timer reads
/// them: otherwise their cache line is one only the agent would touch).
#[inline(always)]
pub fn read_settings_with<M: Mem>(sk: u64, net: u64, all_sysctls: bool) -> Settings {
    let sk_flags = M::rd(sk, off!(sk_flags));
    let mut flags = 0;
    if sk_flags & (1u64 << (off!(sock_keepopen_bit) & 63)) != 0 {
        flags |= FLAG_KEEPOPEN;
    }
    if sk_flags & (1u64 << (off!(sock_dead_bit) & 63)) != 0 {
        flags |= FLAG_DEAD;
    }
    let time = M::rd(sk, off!(tp_keepalive_time));
    let intvl = M::rd(sk, off!(tp_keepalive_intvl));
    let probes = M::rd(sk, off!(tp_keepalive_probes));
    let (mut sysctl_time, mut sysctl_intvl, mut sysctl_probes) = (0, 0, 0);
    if all_sysctls || time == 0 || intvl == 0 || probes == 0 {
        sysctl_time = M::rd(net, off!(net_keepalive_time));
        sysctl_intvl = M::rd(net, off!(net_keepalive_intvl));
        sysctl_probes = M::rd(net, off!(net_keepalive_probes));
    }
    Settings {
        flags,
        time: time as u32,
        intvl: intvl as u32,
        probes: probes as u8,
        user_timeout_ms: M::rd(sk, off!(icsk_user_timeout)) as u32,
        sysctl_time: sysctl_time as u32,
        sysctl_intvl: sysctl_intvl as u32,
        sysctl_probes: sysctl_probes as u8,
    }
}

/// Keep-alive settings of the socket and of its namespace, and the socket flags.
#[inline(always)]
pub fn fill_settings<M: Mem>(ev: &mut RawEvent, sk: u64, net: u64, all_sysctls: bool, owned: bool) {
    let s = read_settings_with::<M>(sk, net, all_sysctls);
    ev.flags |= s.flags;
    if owned && M::rd(sk, off!(sk_lock_owned)) != 0 {
        ev.flags |= FLAG_OWNED;
    }
    ev.keepalive_time = s.time;
    ev.keepalive_intvl = s.intvl;
    ev.keepalive_probes = s.probes;
    ev.user_timeout_ms = s.user_timeout_ms;
    ev.sysctl_time = s.sysctl_time;
    ev.sysctl_intvl = s.sysctl_intvl;
    ev.sysctl_probes = s.sysctl_probes;
    ev.probes_out = M::rd(sk, off!(icsk_probes_out)) as u8;
}

/// Whether keep-alive matters on `sk`: SO_KEEPALIVE on, or any keep-alive value or
/// TCP_USER_TIMEOUT set on the socket. Cheap filter for state changes and destruction.
#[inline(always)]
pub fn keepalive_relevant(sk: u64) -> bool {
    let sk_flags = rd(sk, off!(sk_flags));
    sk_flags & (1u64 << (off!(sock_keepopen_bit) & 63)) != 0
        || rd(sk, off!(icsk_user_timeout)) != 0
        || rd(sk, off!(tp_keepalive_time)) != 0
        || rd(sk, off!(tp_keepalive_intvl)) != 0
        || rd(sk, off!(tp_keepalive_probes)) != 0
}

/// Fills what the socket has in flight (`packets_out`) and queued but unsent (`write_seq - snd_nxt`):
/// keep-alive cannot probe while either is non-zero, and `icsk_probes_out` then counts zero-window
/// probes, not keep-alive probes.
#[inline(always)]
pub fn fill_queues<M: Mem>(ev: &mut RawEvent, sk: u64) {
    ev.packets_out = M::rd(sk, off!(tp_packets_out)) as u32;
    let write_seq = M::rd(sk, off!(tp_write_seq)) as u32;
    let snd_nxt = M::rd(sk, off!(tp_snd_nxt)) as u32;
    ev.unsent = write_seq.wrapping_sub(snd_nxt);
}

/// Records the current process (pid, tid, comm, cgroup) in `ev`.
#[inline(always)]
pub fn fill_process(ev: &mut RawEvent) {
    let pid_tgid = bpf_get_current_pid_tgid();
    ev.pid = (pid_tgid >> 32) as u32;
    ev.tid = pid_tgid as u32;
    if let Ok(comm) = bpf_get_current_comm() {
        ev.comm = comm;
    }
    // SAFETY: plain helper call.
    ev.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    ev.flags |= FLAG_PROCESS;
}

/// The pointer argument `ptr` (the `n`th) of a BTF-typed program (tp_btf) as a plain number, for
/// offset arithmetic and `bpf_probe_read_kernel`: the verifier forbids arithmetic on the pointer
/// itself. It is stored in a per-CPU slot and loaded back (a map value loads as a number; storing
/// a pointer there needs CAP_PERFMON, which BTF-typed programs need anyway): a store and a load,
/// where [`ctx_arg_scalar`] costs a helper call. A program that interrupted this one between the
/// two on this CPU could have replaced the slot's value: the value is compared with the pointer,
/// and the context read instead if they differ.
#[inline(always)]
pub fn arg_number(ctx: *mut core::ffi::c_void, n: usize, ptr: *const u8) -> u64 {
    if let Some(slot) = crate::LAUNDER.get_ptr_mut(0) {
        // SAFETY: plain stores and loads of this CPU's slot; volatile keeps the load.
        let v = unsafe {
            core::ptr::write_volatile(slot as *mut *const u8, ptr);
            core::ptr::read_volatile(slot)
        };
        if v == ptr as u64 {
            return v;
        }
    }
    ctx_arg_scalar(ctx, n)
}

/// The `n`th argument of a BTF-typed program (tp_btf), as a plain number: the verifier types the
/// context slot as a kernel pointer and forbids offset arithmetic on it, so it is copied out with a
/// probe read instead of loaded. See [`arg_number`], which is cheaper.
#[inline(always)]
pub fn ctx_arg_scalar(ctx: *mut core::ffi::c_void, n: usize) -> u64 {
    let mut v: u64 = 0;
    // SAFETY: reads one u64 slot of the context into a local.
    unsafe {
        bpf_probe_read_kernel(
            &mut v as *mut u64 as *mut _,
            8,
            (ctx as *const u64).wrapping_add(n) as *const _,
        )
    };
    v
}
