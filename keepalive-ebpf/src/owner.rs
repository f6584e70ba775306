//! The process holding an accepted socket: `syscalls:sys_exit_accept4` and `syscalls:sys_exit_accept`
//! (classic tracepoints, in the acceptor's process context; they need tracefs to attach).
//!
//! An accepted socket becomes established in softirq context, long before any process holds it:
//! the `inet_sock_set_state` event cannot name its process. At the exit of `accept4(2)` /
//! `accept(2)` the new file descriptor is in the return value: `current->files->fdt->fd[ret]` is the
//! socket's file, its `private_data` the `struct socket`, whose `sk` is the connection. Every offset
//! comes from BTF; the descriptor is bounds-checked against `fdt->max_fds`, and the file must be the
//! socket's own (`socket->file == file`), so a descriptor closed and reused by another thread in
//! between is not misread. Only keep-alive-relevant TCP sockets produce an [`EventKind::Owner`]
//! event: a failed accept, a UNIX or UDP socket, or a TCP socket without keep-alive costs a few
//! reads. Accepts through io_uring (`IORING_OP_ACCEPT`) do not pass these tracepoints.
//!
//! Every `accept()` on the host passes these programs; most accept sockets without keep-alive
//! (a web server's). The descriptor table is only walked within
//! [`keepalive_common::ACCEPT_WINDOW_S`] of the last passive establishment of a
//! keep-alive-relevant socket ([`crate::mark_passive_keepalive`], from the state-change
//! tracepoint: `accept()` takes the socket's lock, which the softirq moving it to ESTABLISHED
//! holds, so the mark is always set before its `accept()` returns) or of the first accept after
//! the agent started; otherwise an accept costs a map read and a read of `jiffies`. (A TCP Fast
//! Open socket can be accepted before it is ESTABLISHED: its owner is named only inside a window
//! another socket opened.)
//!
//! The owner of a connection ending (a change to CLOSE, [`fill_close_owner`]): the current task
//! when the change runs in its process context, else, for a death, the socket's inode number for
//! the agent to look up in `/proc`, and the process that closes the dead socket
//! ([`destroyed_by_owner`]).

use aya_ebpf::{
    helpers::generated::bpf_get_current_task, macros::tracepoint, programs::TracePointContext,
};
use keepalive_common::{EventKind, Field, RawEvent, FLAG_OWNED};

use crate::{
    off,
    read::{fill_process, is_tcp, keepalive_relevant, rd},
    snapshot::sock_inode,
    sock_events::emit,
};

/// `ECONNABORTED` (uapi errno, stable ABI): the error `tcp_abort()` sets when another process
/// destroys the socket (`ss -K`, `bpf_sock_destroy`) with the socket locked in *its* context.
const ECONNABORTED: u32 = 103;

/// Names the owner of `sk`, whose change to CLOSE with socket error `err` is being reported.
///
/// A socket without a file (orphaned after `close()`, a kernel socket) has no owner: nothing is
/// set. With the socket locked by a process (`sk_lock.owned`, [`FLAG_OWNED`] already read into
/// `ev`), the change runs in that process's context (a syscall on the socket, or the backlog and
/// deferred timers it runs when it releases the lock; softirq never changes the state of a socket
/// a process owns): the current task is the owner, unless it is a kernel thread (`PF_KTHREAD`) or the
/// error is `tcp_abort()`'s (another process destroying it). Otherwise (softirq: a timer, a
/// segment received), a death (`err` set) carries the socket's inode for the agent to resolve.
#[inline(always)]
pub fn fill_close_owner(ev: &mut RawEvent, sk: u64, err: u32) {
    let ino = sock_inode(sk);
    if ino == 0 {
        return;
    }
    if ev.flags & FLAG_OWNED != 0 && err != ECONNABORTED && current_is_user_task() {
        fill_process(ev);
    } else if err != 0 {
        ev.sock_ino = ino;
        crate::await_owner(sk);
    }
}

/// Whether `sk`, not keep-alive-relevant, is being destroyed by the process that held it: already
/// CLOSE (killed earlier, or never connected) and locked by a user task: `close()` of its last
/// descriptor (`tcp_close` destroys a closed socket with the lock held). The process that learns
/// of a death in softirq usually closes the socket at once, before the agent could find it in
/// `/proc`: this names it (the agent matches it to the death by socket and addresses).
#[inline(always)]
pub fn destroyed_by_owner(sk: u64) -> bool {
    rd(sk, off!(skc_state)) as u32 == off!(tcp_close) && rd(sk, off!(sk_lock_owned)) != 0 && current_is_user_task()
}

/// `PF_KTHREAD` of `task_struct.flags`: a `#define`, absent from BTF, but ABI in practice: the
/// flags word is the 9th field of `/proc/PID/stat` and tools tell kernel threads by this bit
/// (systemd's `is_kernel_thread`). Unchanged since Linux 2.6.
const PF_KTHREAD: u64 = 0x0020_0000;

/// Whether the current task is a user task, not a kernel thread (an exiting process, whose address
/// space is already gone when its files are closed, is one). False when `task_struct.flags` is
/// absent from BTF.
#[inline(always)]
fn current_is_user_task() -> bool {
    let flags = off!(task_flags);
    if !flags.present() {
        return false;
    }
    // SAFETY: plain helper call.
    let task = unsafe { bpf_get_current_task() };
    rd(task, flags) & PF_KTHREAD == 0
}

/// A kernel pointer (BPF is a 64-bit target, and so is every kernel it runs on).
const PTR: Field = Field::new(0, 8);

#[tracepoint]
pub fn sys_exit_accept4(ctx: TracePointContext) -> u32 {
    on_accept_exit(&ctx);
    0
}

#[tracepoint]
pub fn sys_exit_accept(ctx: TracePointContext) -> u32 {
    on_accept_exit(&ctx);
    0
}

#[inline(always)]
fn on_accept_exit(ctx: &TracePointContext) {
    if !crate::accept_window_open() {
        return;
    }
    let ret_field = off!(sys_exit_ret);
    if ret_field.size != 8 {
        return;
    }
    // SAFETY: reads the record's `ret` slot (offset from BTF) with a probe read.
    let Ok(ret) = (unsafe { ctx.read_at::<i64>(ret_field.off as usize) }) else {
        return;
    };
    if ret < 0 {
        return;
    }
    let sk = accepted_sock(ret as u64);
    if sk == 0 || !is_tcp(sk) || !keepalive_relevant(sk) {
        return;
    }
    emit(EventKind::Owner, sk, fill_process);
}

/// The `struct sock` behind file descriptor `fd` of the current task, 0 if there is none.
#[inline(always)]
fn accepted_sock(fd: u64) -> u64 {
    // SAFETY: plain helper call.
    let task = unsafe { bpf_get_current_task() };
    let files = rd(task, off!(task_files));
    if files == 0 {
        return 0;
    }
    let fdt = rd(files, off!(files_fdt));
    if fdt == 0 || fd >= rd(fdt, off!(fdt_max_fds)) {
        return 0;
    }
    let table = rd(fdt, off!(fdt_fd));
    if table == 0 {
        return 0;
    }
    let file = rd(table + fd * PTR.size as u64, PTR);
    if file == 0 {
        return 0;
    }
    let sock = rd(file, off!(file_private_data));
    if sock == 0 || rd(sock, off!(socket_file)) != file {
        return 0;
    }
    rd(sock, off!(socket_sk))
}
