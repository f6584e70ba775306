//! The `audit` socket walk: a BPF iterator (`iter/tcp`, kernel 5.9+) that writes one
//! [`AuditRecord`] per ESTABLISHED, CLOSE_WAIT or LISTEN TCP socket of the namespace it runs in
//! (the states come from `OFFSETS.audit_state_mask`), and one over every process's open files
//! (`iter/task_file`, 5.8+) that writes an [`AuditFileRecord`] per socket file: which process holds
//! which socket, without reading `/proc/PID/fd` link by link. Run on demand by
//! `keepalive-agent audit`; nothing stays attached. Listeners are reported so that the agent can
//! tell settings an accepted socket inherited from its listener.

use aya_ebpf::helpers::generated::{bpf_jiffies64, bpf_probe_read_kernel, bpf_seq_write};
use keepalive_common::{
    AuditFileRecord, AuditRecord, AUDIT_FILE_RECORD_SIZE, AUDIT_KEEPALIVE_TIMER_PENDING, AUDIT_RECORD_SIZE,
};

use crate::{
    off,
    read::{rd, read_addrs, read_settings},
    snapshot::{iter_sock, sock_inode, IterMeta, IterTcpCtx},
    AUDIT_SCRATCH,
};

/// Addresses, ports, namespace and state.
#[inline(always)]
fn fill_identity(r: &mut AuditRecord, sk: u64, net: u64) {
    r.sk = sk;
    r.family = read_addrs(sk, &mut r.saddr, &mut r.daddr) as u8;
    r.state = rd(sk, off!(skc_state)) as u8;
    r.sport = rd(sk, off!(skc_num)) as u16;
    r.dport = u16::from_be(rd(sk, off!(skc_dport)) as u16);
    r.netns = rd(net, off!(net_ns_inum)) as u32;
}

/// Keep-alive settings of the socket and its namespace, socket flags and the keep-alive timer.
#[inline(always)]
fn fill_keepalive(r: &mut AuditRecord, sk: u64, net: u64) {
    // FLAG_KEEPOPEN and FLAG_DEAD are AUDIT_KEEPOPEN and AUDIT_DEAD.
    let s = read_settings(sk, net);
    r.flags |= s.flags;
    r.keepalive_time = s.time;
    r.keepalive_intvl = s.intvl;
    r.keepalive_probes = s.probes;
    r.user_timeout_ms = s.user_timeout_ms;
    r.sysctl_time = s.sysctl_time;
    r.sysctl_intvl = s.sysctl_intvl;
    r.sysctl_probes = s.sysctl_probes;
    r.sysctl_retries2 = rd(net, off!(net_tcp_retries2)) as u8;
    let timer = sk + off!(sk_timer).off as u64;
    if rd(timer, off!(timer_pprev)) != 0 {
        r.flags |= AUDIT_KEEPALIVE_TIMER_PENDING;
    }
    r.keepalive_expires = rd(timer, off!(timer_expires));
}

/// What is in flight and queued, the retransmit timer, probes out and the activity timestamps.
#[inline(always)]
fn fill_activity(r: &mut AuditRecord, sk: u64) {
    r.packets_out = rd(sk, off!(tp_packets_out)) as u32;
    let write_seq = rd(sk, off!(tp_write_seq)) as u32;
    let snd_nxt = rd(sk, off!(tp_snd_nxt)) as u32;
    let snd_una = rd(sk, off!(tp_snd_una)) as u32;
    r.unsent = write_seq.wrapping_sub(snd_nxt);
    r.unacked = snd_nxt.wrapping_sub(snd_una);
    r.lsndtime = rd(sk, off!(tp_lsndtime)) as u32;
    r.rcv_tstamp = rd(sk, off!(tp_rcv_tstamp)) as u32;
    r.lrcvtime = rd(sk, off!(icsk_ack_lrcvtime)) as u32;
    r.probes_out = rd(sk, off!(icsk_probes_out)) as u8;
    r.icsk_pending = rd(sk, off!(icsk_pending)) as u8;
    r.retransmits = rd(sk, off!(icsk_retransmits)) as u8;
    r.backoff = rd(sk, off!(icsk_backoff)) as u8;
    r.retransmit_expires = rd(sk, off!(icsk_timeout));
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub fn audit_tcp(ctx: *mut IterTcpCtx) -> i32 {
    let sk = iter_sock(ctx);
    if sk == 0 {
        return 0;
    }
    // Time-wait and request sockets share only `sock_common`: the state is read first and
    // everything else only for full sockets in the wanted states.
    let state = rd(sk, off!(skc_state)) as u32;
    if state >= 32 || off!(audit_state_mask) & (1 << state) == 0 {
        return 0;
    }
    if rd(sk, off!(sk_protocol)) as u32 != off!(ipproto_tcp) {
        return 0;
    }
    let Some(r) = AUDIT_SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: per-CPU scratch slot.
    let r = unsafe { &mut *r };
    *r = AuditRecord::zeroed();
    // SAFETY: plain helper call.
    r.jiffies = unsafe { bpf_jiffies64() };
    let net = rd(sk, off!(skc_net));
    fill_identity(r, sk, net);
    fill_keepalive(r, sk, net);
    fill_activity(r, sk);
    r.sock_ino = sock_inode(sk);
    // SAFETY: `meta` and `meta->seq` are typed pointers the verifier knows; bpf_seq_write copies
    // AUDIT_RECORD_SIZE bytes from the scratch slot.
    unsafe {
        let seq = (*(*ctx).meta).seq;
        bpf_seq_write(seq, r as *const AuditRecord as *const _, AUDIT_RECORD_SIZE as u32);
    }
    0
}

/// `struct bpf_iter__task_file { struct bpf_iter_meta *meta; struct task_struct *task; u32 fd;
/// struct file *file; }`
#[repr(C)]
pub struct IterTaskFileCtx {
    meta: *const IterMeta,
    task: *const u8,
    _fd: u32,
    file: *const u8,
}

/// File type bits of `i_mode` and the socket type (uapi `S_IFMT`, `S_IFSOCK`).
const S_IFMT: u64 = 0o170000;
const S_IFSOCK: u64 = 0o140000;

/// A pointer slot of the context as a plain number (no arithmetic on typed context pointers).
#[inline(always)]
fn ctx_ptr(slot: *const *const u8) -> u64 {
    let mut v: u64 = 0;
    // SAFETY: reading one pointer-sized slot of the context into a local.
    unsafe { bpf_probe_read_kernel(&mut v as *mut u64 as *mut _, 8, slot as *const _) };
    v
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/task_file")]
pub fn audit_files(ctx: *mut IterTaskFileCtx) -> i32 {
    // SAFETY: taking the addresses of the context's slots, not reading through them.
    let (task, file) = unsafe { (ctx_ptr(core::ptr::addr_of!((*ctx).task)), ctx_ptr(core::ptr::addr_of!((*ctx).file))) };
    if task == 0 || file == 0 {
        return 0;
    }
    let inode = rd(file, off!(file_f_inode));
    if inode == 0 || rd(inode, off!(inode_i_mode)) & S_IFMT != S_IFSOCK {
        return 0;
    }
    let rec = AuditFileRecord { ino: rd(inode, off!(inode_i_ino)), tgid: rd(task, off!(task_tgid)) as u32, pad: 0 };
    // SAFETY: `meta->seq` is a typed pointer the verifier knows; the record is on the stack.
    unsafe {
        let seq = (*(*ctx).meta).seq;
        bpf_seq_write(seq, &rec as *const AuditFileRecord as *const _, AUDIT_FILE_RECORD_SIZE as u32);
    }
    0
}
