//! The periodic audit of `run`: the same walk as `keepalive-agent audit` every `--audit-interval`,
//! on a thread of its own (a walk of 100,000 sockets takes a few hundred milliseconds: the event
//! loop must not wait for it), published as `keepalive.connections.at_risk{keepalive.diagnosis}`
//! per workload.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use super::{audit_host, diagnose, DiagnosisId, HostPaths, Policy};
use crate::{
    attach::{self, AuditWalker},
    container::CgroupResolver,
    event::{comm_str, DecodeTables},
    metrics::store::Workload,
};

/// Most sockets one periodic walk audits (as `audit --max-sockets`' default).
pub const MAX_SOCKETS: usize = 1_048_576;

/// What one periodic walk found.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AtRisk {
    /// Sockets per (diagnosis, workload); only pairs with at least one socket.
    pub series: Vec<(DiagnosisId, Workload, u64)>,
    /// Sockets audited, and past the bound.
    pub sockets: usize,
    pub over_limit: u64,
    /// Wall time of the whole walk (kernel walk, owners, diagnoses).
    pub duration: Duration,
}

/// A socket's owner as counted: its process name and cgroup id.
type OwnerKey = Option<([u8; 16], u64)>;

/// Sockets per diagnosis and workload (process name, container, pod: the workload attributes of
/// the keep-alive metrics), for `keepalive.connections.at_risk`.
pub fn at_risk_by_workload(
    sockets: &[super::AuditedSocket],
    policy: &Policy,
    cgroups: &mut CgroupResolver,
) -> Vec<(DiagnosisId, Workload, u64)> {
    let mut counts: HashMap<(DiagnosisId, OwnerKey), u64> = HashMap::new();
    for s in sockets {
        for id in diagnose::findings(s, policy) {
            *counts.entry((id, s.owner.map(|o| (o.comm, o.cgroup_id)))).or_default() += 1;
        }
    }
    let mut out: Vec<(DiagnosisId, Workload, u64)> = counts
        .into_iter()
        .map(|((id, owner), n)| {
            let cgroup = owner.and_then(|(_, cg)| cgroups.resolve(cg));
            let workload = Workload {
                executable: owner.map(|(comm, _)| comm_str(&comm).to_string()),
                container_id: cgroup.as_ref().and_then(|c| c.container_id.clone()),
                pod_uid: cgroup.and_then(|c| c.pod).map(|p| p.uid),
                peer: None,
            };
            (id, workload, n)
        })
        .collect();
    out.sort_by(|a, b| (a.0, &a.1.executable, &a.1.container_id).cmp(&(b.0, &b.1.executable, &b.1.container_id)));
    out
}

/// What the periodic audit needs besides the loaded walker.
pub struct PeriodicConfig {
    pub tables: DecodeTables,
    /// Only this namespace (`run --netns`), else every one.
    pub netns: Option<PathBuf>,
    pub interval: Duration,
    pub policy: Policy,
    pub cgroup2: Option<PathBuf>,
}

/// Starts the periodic audit: a walk right away, then every `cfg.interval`, each handed to
/// `publish`, until `stop` is set. A walk that fails is logged and retried at the next interval.
pub fn spawn(
    mut walker: AuditWalker,
    cfg: PeriodicConfig,
    stop: Arc<AtomicBool>,
    mut publish: impl FnMut(AtRisk) + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("keepalive-audit".into()).spawn(move || {
        let mut cgroups = CgroupResolver::new(cfg.cgroup2.clone());
        let mut next = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            if Instant::now() < next {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            next += cfg.interval;
            let started = Instant::now();
            let paths = HostPaths { proc_root: std::path::Path::new("/proc"), cgroup2: cfg.cgroup2.as_deref() };
            let namespaces = attach::netns_paths(cfg.netns.as_deref());
            match audit_host(&mut walker, &cfg.tables, &namespaces, MAX_SOCKETS, paths) {
                Ok(audit) => {
                    let series = at_risk_by_workload(&audit.sockets, &cfg.policy, &mut cgroups);
                    let at_risk = AtRisk {
                        series,
                        sockets: audit.sockets.len(),
                        over_limit: audit.over_limit,
                        duration: started.elapsed(),
                    };
                    log::debug!("periodic audit: {} sockets in {:?}", at_risk.sockets, at_risk.duration);
                    publish(at_risk);
                }
                Err(e) => log::warn!("periodic audit failed: {e}"),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::model::tests::{convert_all, record};
    use crate::owners::Holder;

    #[test]
    fn series_per_diagnosis_and_workload() {
        let mut idle = record();
        idle.lsndtime = 1_000_000 - 250 * 200;
        idle.lrcvtime = idle.lsndtime;
        idle.rcv_tstamp = idle.lsndtime;
        let mut sockets = convert_all(&[idle, idle, idle, record()]);
        let comm = |s: &str| crate::owners::comm_from(s.as_bytes());
        sockets[0].owner = Some(Holder { pid: 1, comm: comm("redis-server"), cgroup_id: 0 });
        sockets[1].owner = Some(Holder { pid: 2, comm: comm("redis-server"), cgroup_id: 0 });
        let policy = Policy { middlebox: super::super::Middlebox::default_preset(), detect_within_s: 900 };
        let series = at_risk_by_workload(&sockets, &policy, &mut CgroupResolver::new(None));
        assert_eq!(series.len(), 2, "{series:?}");
        let redis = series.iter().find(|s| s.1.executable.as_deref() == Some("redis-server")).unwrap();
        assert_eq!((redis.0, redis.2), (DiagnosisId::KeepaliveOffIdle, 2));
        let unknown = series.iter().find(|s| s.1.executable.is_none()).unwrap();
        assert_eq!(unknown.2, 1, "the healthy socket counts nowhere");
    }
}
