//! `keepalive-agent audit`: which connections will die silently, and why.
//!
//! One walk of every TCP socket on the host ([`crate::attach::AuditWalker`], a BPF `iter/tcp`
//! program run once per network namespace, nothing left attached), each ESTABLISHED and
//! CLOSE_WAIT socket turned into an [`AuditedSocket`] (effective keep-alive settings with their
//! source, idle times, the pending timer, what is in flight, the owning process and container),
//! then judged against a middlebox idle timeout and a dead-peer detection target
//! ([`diagnose::findings`], pure). [`audit_host`] is the library entry point (the `audit`
//! command, and the periodic walk of `run`, [`periodic`]); [`report`] prints the result.
//!
//! Minimum kernel: 5.9 (`iter/tcp` BPF iterators), with BTF.

pub mod diagnose;
pub mod middlebox;
pub mod model;
pub mod periodic;
pub mod report;

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::{attach::AuditWalker, event::DecodeTables, owners};
pub use diagnose::{Diagnosis, DiagnosisId, Policy, Severity};
pub use middlebox::Middlebox;
pub use model::AuditedSocket;

/// The audit failed.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error(transparent)]
    Walk(#[from] crate::attach::AttachError),
}

/// One audit of the host.
#[derive(Debug, Default)]
pub struct Audit {
    /// ESTABLISHED and CLOSE_WAIT sockets (listeners are only used to tell inherited settings).
    pub sockets: Vec<AuditedSocket>,
    /// Network namespaces walked.
    pub namespaces: usize,
    /// Sockets found past the `max_sockets` bound of [`audit_host`], not audited.
    pub over_limit: u64,
    /// Wall time of the kernel walk and of the `/proc` owner scan.
    pub walk_time: Duration,
    pub owner_time: Duration,
}

/// Where [`audit_host`] looks for what it needs besides the kernel.
#[derive(Clone, Copy, Debug)]
pub struct HostPaths<'a> {
    /// Normally `/proc`: the owners' names and cgroups (and their sockets where the kernel has no
    /// `iter/task_file`).
    pub proc_root: &'a Path,
    /// The cgroup v2 mount, for the owners' cgroup ids.
    pub cgroup2: Option<&'a Path>,
}

/// Walks `namespaces` with `walker`, converts every socket with `tables` (HZ, TCP states), at most
/// `max_sockets` of them (the others are counted in [`Audit::over_limit`]), and finds each
/// socket's owner.
pub fn audit_host(
    walker: &mut AuditWalker,
    tables: &DecodeTables,
    namespaces: &[PathBuf],
    max_sockets: usize,
    paths: HostPaths<'_>,
) -> Result<Audit, AuditError> {
    let HostPaths { proc_root, cgroup2 } = paths;
    trim_heap();
    let started = Instant::now();
    let mut conv = model::Converter::new(tables.hz, &tables.tcp_states, tables.af_inet6);
    let mut sockets = Vec::new();
    let mut over_limit = 0u64;
    let walked = walker.walk(namespaces, |r| {
        if let Some(s) = conv.convert(r, None) {
            if sockets.len() < max_sockets {
                sockets.push(s);
            } else {
                over_limit += 1;
            }
        }
    })?;
    if over_limit > 0 {
        log::warn!("audit: {over_limit} sockets past the bound of {max_sockets} were not audited (--max-sockets)");
    }
    sockets.shrink_to_fit();
    let walk_time = started.elapsed();
    let wanted: HashSet<u64> = sockets.iter().map(|s| s.inode).filter(|&i| i != 0).collect();
    let holders = match walker.socket_files()? {
        Some(files) => holders_of(&wanted, &files, proc_root, cgroup2),
        None => {
            let scan = owners::scan(proc_root, &wanted, cgroup2);
            log::debug!("audit: owners from {} processes in /proc ({} skipped)", scan.processes, scan.skipped);
            scan.holders
        }
    };
    drop(wanted);
    for s in sockets.iter_mut().filter(|s| s.inode != 0) {
        s.owner = holders.get(&s.inode).copied();
    }
    log::debug!("audit: {} sockets from {} namespaces in {walk_time:?}", sockets.len(), walked.len());
    Ok(Audit { sockets, namespaces: walked.len(), over_limit, walk_time, owner_time: started.elapsed() - walk_time })
}

/// Socket inode → its holder with the lowest pid, for the inodes in `wanted`, from the socket
/// files every process holds (`files`: inode, pid); each holder's name and cgroup read once from
/// `proc_root`. A process that exited since is left out.
pub fn holders_of(
    wanted: &HashSet<u64>,
    files: &[(u64, u32)],
    proc_root: &Path,
    cgroup2: Option<&Path>,
) -> HashMap<u64, owners::Holder> {
    let mut lowest: HashMap<u64, u32> = HashMap::new();
    for &(ino, pid) in files.iter().filter(|(ino, _)| wanted.contains(ino)) {
        let e = lowest.entry(ino).or_insert(pid);
        *e = (*e).min(pid);
    }
    let mut processes: HashMap<u32, Option<owners::Holder>> = HashMap::new();
    lowest
        .into_iter()
        .filter_map(|(ino, pid)| {
            let h = *processes.entry(pid).or_insert_with(|| {
                let dir = proc_root.join(pid.to_string());
                dir.exists().then(|| owners::read_holder(&dir, pid, cgroup2))
            });
            h.map(|h| (ino, h))
        })
        .collect()
}

/// Gives the heap's free pages back to the kernel (glibc keeps them): the BTF parsed at start-up
/// is freed by now, and the walk's peak RSS should not sit on top of it.
fn trim_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holders_are_the_lowest_pid_of_wanted_sockets() {
        let dir = crate::kernel::hz::tests::TempDir::new("audit-holders");
        for (pid, comm) in [(7, "redis-server"), (9, "worker")] {
            std::fs::create_dir_all(dir.0.join(pid.to_string())).unwrap();
            std::fs::write(dir.0.join(format!("{pid}/comm")), format!("{comm}\n")).unwrap();
        }
        let wanted: HashSet<u64> = [100, 200, 300].into();
        // 300 is held by a process that exited (no /proc directory); 400 is not wanted.
        let files = [(100, 9), (100, 7), (200, 9), (300, 11), (400, 7)];
        let h = holders_of(&wanted, &files, &dir.0, None);
        assert_eq!(h.len(), 2);
        assert_eq!((h[&100].pid, h[&200].pid), (7, 9));
        assert_eq!(crate::event::comm_str(&h[&100].comm), "redis-server");
    }
}
