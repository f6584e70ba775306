//! Start-up snapshot of existing TCP sockets through a BPF iterator (`iter/tcp`, kernel 5.9+).
//!
//! The agent reads the iterator's file: one [`RawEvent`] of kind `Snapshot` per keep-alive-relevant
//! full socket (listeners, TIME_WAIT and request sockets are skipped), with the inode number of the
//! socket's file, by which the agent finds a process holding it in `/proc/PID/fd`.

use aya_ebpf::helpers::{bpf_ktime_get_ns, generated::bpf_seq_write, generated::bpf_probe_read_kernel};
use keepalive_common::{EventKind, RawEvent, RAW_EVENT_SIZE};

use crate::{
    off,
    read::{fill_queues, fill_sock, keepalive_relevant, rd},
    EVENT_SCRATCH,
};

/// `struct bpf_iter__tcp { struct bpf_iter_meta *meta; struct sock_common *sk_common; uid_t uid; }`
#[repr(C)]
pub struct IterTcpCtx {
    pub(crate) meta: *const IterMeta,
    sk_common: *const u8,
}

/// `struct bpf_iter_meta { struct seq_file *seq; u64 session_id; u64 seq_num; }`
#[repr(C)]
pub struct IterMeta {
    pub(crate) seq: *mut aya_ebpf::bindings::seq_file,
}

/// Inode number of the socket's file (`sk->sk_socket->file->f_inode->i_ino`, what `sock_i_ino`
/// reads), 0 when the socket has no file (not yet accepted, orphaned) or an offset is absent.
#[inline(always)]
pub(crate) fn sock_inode(sk: u64) -> u64 {
    let socket = rd(sk, off!(sk_socket));
    if socket == 0 {
        return 0;
    }
    let file = rd(socket, off!(socket_file));
    if file == 0 {
        return 0;
    }
    let inode = rd(file, off!(file_f_inode));
    if inode == 0 {
        return 0;
    }
    rd(inode, off!(inode_i_ino))
}

/// The socket of an `iter/tcp` context as a plain number (0 at the end of the walk). Read with a
/// probe read: the verifier forbids offset arithmetic on the typed context pointer.
#[inline(always)]
pub(crate) fn iter_sock(ctx: *mut IterTcpCtx) -> u64 {
    let mut sk: u64 = 0;
    // SAFETY: reading the context's second pointer slot into a local.
    unsafe {
        bpf_probe_read_kernel(
            &mut sk as *mut u64 as *mut _,
            8,
            core::ptr::addr_of!((*ctx).sk_common) as *const _,
        )
    };
    sk
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub fn snapshot_tcp(ctx: *mut IterTcpCtx) -> i32 {
    let sk = iter_sock(ctx);
    if sk == 0 {
        return 0;
    }
    let state = rd(sk, off!(skc_state)) as u32;
    if state >= 32 || off!(snapshot_state_mask) & (1 << state) == 0 {
        return 0;
    }
    if !keepalive_relevant(sk) {
        return 0;
    }
    let Some(ev) = EVENT_SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: per-CPU scratch slot.
    let ev = unsafe { &mut *ev };
    crate::zero_event(ev);
    ev.kind = EventKind::Snapshot as u8;
    // SAFETY: plain helper call.
    ev.ts_ns = unsafe { bpf_ktime_get_ns() };
    fill_sock(ev, sk);
    fill_queues::<crate::read::Probe>(ev, sk);
    ev.sock_ino = sock_inode(sk);
    // SAFETY: `meta` and `meta->seq` are typed pointers the verifier knows; bpf_seq_write copies
    // RAW_EVENT_SIZE bytes from the scratch slot.
    unsafe {
        let meta = (*ctx).meta;
        let seq = (*meta).seq;
        bpf_seq_write(seq, ev as *const RawEvent as *const _, RAW_EVENT_SIZE as u32);
    }
    0
}
