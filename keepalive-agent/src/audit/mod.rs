//! `keepalive-agent audit`: which connections will die silently, and why.
//!
//! One walk of every TCP socket on the host ([`crate::attach::AuditWalker`], a BPF `iter/tcp`
//! program run once per network namespace, nothing left attached), each ESTABLISHED and
//! CLOSE_WAIT socket turned into an [`AuditedSocket`] (effective keep-alive settings with their
//! source, idle times, the pending timer, what is in flight, the owning process and container),
//! then judged against a middlebox idle timeout and a dead-peer detection target
//! ([`diagnose::findings`], pure). [`audit_host`] is the library entry point (the `audit`
//! command, and the periodic walk of `run`); [`report`] prints the result.
//!
//! Minimum kernel: 5.9 (`iter/tcp` BPF iterators), with BTF.

pub mod diagnose;
pub mod middlebox;
pub mod model;
pub mod report;

use std::{
    collections::{BTreeMap, HashSet},
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
    /// Wall time of the kernel walk and of the `/proc` owner scan.
    pub walk_time: Duration,
    pub owner_time: Duration,
}

/// Walks `namespaces` with `walker`, converts every socket with `tables` (HZ, TCP states) and
/// finds each socket's owner under `proc_root` (normally `/proc`; `cgroup2`: the cgroup v2 mount
/// for the owners' cgroup ids).
pub fn audit_host(
    walker: &mut AuditWalker,
    tables: &DecodeTables,
    namespaces: &[PathBuf],
    proc_root: &Path,
    cgroup2: Option<&Path>,
) -> Result<Audit, AuditError> {
    trim_heap();
    let started = Instant::now();
    let mut conv = model::Converter::new(tables.hz, &tables.tcp_states, tables.af_inet6);
    let mut sockets = Vec::new();
    let walked = walker.walk(namespaces, |r| sockets.extend(conv.convert(r, None)))?;
    sockets.shrink_to_fit();
    let walk_time = started.elapsed();
    let wanted: HashSet<u64> = sockets.iter().map(|s| s.inode).filter(|&i| i != 0).collect();
    let scan = owners::scan(proc_root, &wanted, cgroup2);
    drop(wanted);
    for s in sockets.iter_mut().filter(|s| s.inode != 0) {
        s.owner = scan.holders.get(&s.inode).copied();
    }
    log::debug!(
        "audit: {} sockets from {} namespaces in {walk_time:?}; owners from {} processes ({} skipped)",
        sockets.len(),
        walked.len(),
        scan.processes,
        scan.skipped
    );
    Ok(Audit { sockets, namespaces: walked.len(), walk_time, owner_time: started.elapsed() - walk_time })
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

/// Sockets per diagnosis (every id present, 0 when none): what `run` publishes as
/// `keepalive.connections.at_risk{keepalive.diagnosis}`.
pub fn at_risk(sockets: &[AuditedSocket], policy: &Policy) -> BTreeMap<DiagnosisId, u64> {
    let mut out: BTreeMap<DiagnosisId, u64> = DiagnosisId::ALL.iter().map(|&d| (d, 0)).collect();
    for s in sockets {
        for d in diagnose::findings(s, policy) {
            *out.entry(d).or_default() += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::model::tests::{convert_all, record};

    #[test]
    fn at_risk_counts_every_id() {
        let mut idle = record();
        idle.lsndtime = 1_000_000 - 250 * 200;
        idle.lrcvtime = idle.lsndtime;
        idle.rcv_tstamp = idle.lsndtime;
        let sockets = convert_all(&[record(), idle]);
        let policy = Policy { middlebox: Middlebox::default_preset(), detect_within_s: 900 };
        let counts = at_risk(&sockets, &policy);
        assert_eq!(counts.len(), DiagnosisId::ALL.len());
        assert_eq!(counts[&DiagnosisId::KeepaliveOffIdle], 1);
        assert_eq!(counts.values().sum::<u64>(), 1);
    }
}
