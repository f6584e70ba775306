//! Least privilege: the Linux capabilities the agent needs, checked at start-up, reported by
//! `keepalive-agent check`, and dropped once start-up is over.
//!
//! [`CAPABILITIES`] is the one list (README.md, "Least privilege", the systemd unit and the
//! DaemonSet copy it). Each entry says what the capability is for, what its absence costs, and
//! whether it is kept after start-up. The agent runs as any user holding these capabilities
//! (ambient capabilities for a non-root user, or root); it never needs full root.
//!
//! Capabilities are per thread: [`drop_after_start_up`] must run while the process has a single
//! thread (it checks, and warns otherwise), so that every thread started later inherits the
//! reduced sets.

use std::fmt;

use caps::{CapSet, Capability, CapsHashSet};

/// Errors reading or changing the capability sets.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    /// Capabilities the agent needs are missing (named, with what each is for).
    #[error("missing capabilities: {}; grant them (ambient capabilities for a non-root user, e.g. \
             AmbientCapabilities= in a systemd unit) or run as root", describe_missing(.0))]
    Missing(Vec<&'static CapNeed>),
    /// `capget`/`capset` failed.
    #[error("{call}: {source}")]
    Caps {
        call: &'static str,
        #[source]
        source: caps::errors::CapsError,
    },
}

/// Why the agent needs a capability.
#[derive(Debug, PartialEq, Eq)]
pub struct CapNeed {
    pub cap: Capability,
    /// What it is used for.
    pub used_for: &'static str,
    /// What its absence costs: for a required one, why the agent refuses to start; for an
    /// optional one, what is missing from the timelines.
    pub without: &'static str,
    /// The agent refuses to start without it (else it starts and warns).
    pub required: bool,
    /// Kept after start-up (later work needs it), or dropped once the programs are attached and
    /// the snapshot is taken.
    pub kept: bool,
    /// Needed only on kernels older than this `(major, minor)`; `None`: on every kernel.
    pub before_kernel: Option<(u32, u32)>,
    /// Also what `perf_event_open(2)` needs where `kernel.perf_event_paranoid` is above 2
    /// (Debian's default; see [`perf_event_open_needs_sys_admin`]): its absence then costs
    /// [`PERF_EVENT_COST`] too.
    pub perf_event_open: bool,
}

/// The capabilities the agent needs, in the order `check` lists them (measured on Linux 6.18 and
/// on Debian's 6.1 and 6.12 by running the agent as `nobody` with ambient capabilities and
/// removing each one, every attach method in turn: tests/tests/privilege.rs, in `cargo xtask
/// vm-test`; README.md, "Least privilege"). On Linux 5.8+ (the agent's minimum: BPF ring buffer)
/// CAP_BPF and CAP_PERFMON replace CAP_SYS_ADMIN for loading tracing programs and CAP_NET_ADMIN
/// allows the cgroup attachment; CAP_SYS_ADMIN is needed for `setns(CLONE_NEWNET)`, which no
/// narrower capability allows, and, on Debian's kernels at their default
/// `kernel.perf_event_paranoid=3`, for `perf_event_open(2)`; it is optional (it also implies the
/// BPF ones, so granting it hides their absence).
pub const CAPABILITIES: &[CapNeed] = &[
    CapNeed {
        cap: Capability::CAP_BPF,
        used_for: "creating BPF maps and loading the programs; attaching the probe-answer program on demand",
        without: "no BPF map can be created",
        required: true,
        kept: true,
        before_kernel: None,
        perf_event_open: false,
    },
    CapNeed {
        cap: Capability::CAP_PERFMON,
        used_for: "loading tracing programs (tracepoints, kernel memory reads); attaching the probe-answer program on demand",
        without: "no tracing program loads: the keep-alive timer cannot be reached",
        required: true,
        kept: true,
        before_kernel: None,
        perf_event_open: false,
    },
    CapNeed {
        cap: Capability::CAP_NET_ADMIN,
        used_for: "attaching the cgroup setsockopt program",
        without: "keep-alive settings are not seen as applications set them",
        required: true,
        kept: false,
        before_kernel: None,
        perf_event_open: false,
    },
    CapNeed {
        cap: Capability::CAP_SYS_PTRACE,
        used_for: "reading other users' /proc/PID/fd links (owners of connections found at start-up) and /proc/PID/ns/net (namespaces to walk)",
        without: "connections found at start-up carry no owner process, and other users' network namespaces are not walked",
        required: true,
        kept: true,
        before_kernel: None,
        perf_event_open: false,
    },
    CapNeed {
        cap: Capability::CAP_DAC_READ_SEARCH,
        used_for: "listing other users' /proc/PID/fd, reading the ids of syscall tracepoints in tracefs (root-only), and opening cgroup directories by handle (container and pod attribution, all along)",
        without: "accepted connections carry no owner process (the accept hook cannot attach), nor do connections found at start-up; records, spans and metrics carry no cgroup path, container or pod",
        required: true,
        kept: true,
        before_kernel: None,
        perf_event_open: false,
    },
    CapNeed {
        cap: Capability::CAP_SYSLOG,
        used_for: "reading kernel symbol addresses in /proc/kallsyms (tcp_keepalive_timer) with kernel.kptr_restrict=0 and perf_event_paranoid above 1",
        without: "the keep-alive timer's address reads as 0 and the timer cannot be recognised",
        required: true,
        kept: false,
        before_kernel: None,
        perf_event_open: false,
    },
    CapNeed {
        cap: Capability::CAP_SYS_RESOURCE,
        used_for: "raising RLIMIT_MEMLOCK for BPF maps (kernels before 5.11 charge them to it)",
        without: "map creation fails once the memlock limit (often 64 KiB or 8 MiB) is reached",
        required: true,
        kept: false,
        before_kernel: Some((5, 11)),
        perf_event_open: false,
    },
    CapNeed {
        cap: Capability::CAP_SYS_ADMIN,
        used_for: "entering other network namespaces (setns) to walk their sockets: the start-up snapshot and the periodic reconciliation; perf_event_open(2) (kprobes, the accept hook's tracepoints) where kernel.perf_event_paranoid is 3 (Debian's default)",
        without: "only the agent's own network namespace is walked: connections of other namespaces that predate the agent are reported from their first keep-alive event on (without owner or settings), and their missed closes are not reconciled",
        required: false,
        kept: true,
        before_kernel: None,
        perf_event_open: true,
    },
];

/// What CAP_SYS_ADMIN's absence also costs where `perf_event_open(2)` needs it.
pub const PERF_EVENT_COST: &str = "kernel.perf_event_paranoid is above 2 (Debian's default 3), so perf_event_open(2) is refused: \
     --attach kprobe cannot start and the accept hook's tracepoints (tp/syscalls) cannot attach (with the sysctl at 2, CAP_PERFMON suffices)";

/// `kernel.perf_event_paranoid`, if readable.
pub fn perf_event_paranoid() -> Option<i32> {
    std::fs::read_to_string("/proc/sys/kernel/perf_event_paranoid").ok()?.trim().parse().ok()
}

/// Whether `perf_event_open(2)` (kprobes and tracefs tracepoints are attached through it; fentry,
/// raw and BTF tracepoints, iterators and cgroup programs are not) needs CAP_SYS_ADMIN rather than
/// CAP_PERFMON at this `kernel.perf_event_paranoid`. Upstream Linux knows levels up to 2; Debian's
/// kernels add a level 3, their default, at which only CAP_SYS_ADMIN may call it (measured on
/// Debian 6.1 and 6.12: EACCES with CAP_PERFMON alone at 3, attached at 2).
pub fn perf_event_open_needs_sys_admin(paranoid: Option<i32>) -> bool {
    paranoid.is_some_and(|p| p > 2)
}

/// Added to an error of `perf_event_open(2)` (`message`): when it was refused (EACCES) at a
/// `kernel.perf_event_paranoid` above 2 while CAP_SYS_ADMIN is not effective, says so; else empty.
pub fn perf_event_hint(message: &str) -> String {
    let lacks_sys_admin = effective().is_ok_and(|have| !have.contains(&Capability::CAP_SYS_ADMIN));
    let paranoid = perf_event_paranoid();
    if message.contains("Permission denied") && lacks_sys_admin && perf_event_open_needs_sys_admin(paranoid) {
        format!(
            " (kernel.perf_event_paranoid is {}: perf_event_open(2) needs CAP_SYS_ADMIN; grant it or set the sysctl to 2)",
            paranoid.unwrap_or_default()
        )
    } else {
        String::new()
    }
}

impl CapNeed {
    /// `CAP_BPF` etc.
    pub fn name(&self) -> String {
        self.cap.to_string()
    }

    /// What its absence costs on this host, at `kernel.perf_event_paranoid` `paranoid`.
    pub fn cost(&self, paranoid: Option<i32>) -> String {
        if self.perf_event_open && perf_event_open_needs_sys_admin(paranoid) {
            format!("{}; and {PERF_EVENT_COST}", self.without)
        } else {
            self.without.to_string()
        }
    }

    /// Whether this kernel (`release`, e.g. `6.1.0-26-amd64`) needs it.
    pub fn applies_to(&self, release: &str) -> bool {
        match (self.before_kernel, kernel_version(release)) {
            (None, _) => true,
            (Some(limit), Some(v)) => v < limit,
            (Some(_), None) => true,
        }
    }
}

impl fmt::Display for CapNeed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (for {}; without it {})", self.cap, self.used_for, self.without)
    }
}

fn describe_missing(m: &[&CapNeed]) -> String {
    m.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

/// `(major, minor)` of a kernel release string.
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut it = release.trim().split(|c: char| !c.is_ascii_digit());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// The running kernel's release (`/proc/sys/kernel/osrelease`).
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string()
}

/// The calling thread's effective capabilities.
pub fn effective() -> Result<CapsHashSet, PrivilegeError> {
    caps::read(None, CapSet::Effective).map_err(|source| PrivilegeError::Caps { call: "capget(effective)", source })
}

/// Entries of [`CAPABILITIES`] this kernel needs that `have` lacks.
pub fn missing(have: &CapsHashSet, release: &str) -> Vec<&'static CapNeed> {
    CAPABILITIES.iter().filter(|n| n.applies_to(release) && !have.contains(&n.cap)).collect()
}

/// Fails, naming each one, when a required capability this kernel needs is not effective; returns
/// the optional ones missing (the caller warns).
pub fn require() -> Result<Vec<&'static CapNeed>, PrivilegeError> {
    let (required, optional): (Vec<_>, Vec<_>) = missing(&effective()?, &kernel_release()).into_iter().partition(|n| n.required);
    if required.is_empty() {
        Ok(optional)
    } else {
        Err(PrivilegeError::Missing(required))
    }
}

/// On kernels that charge BPF memory to RLIMIT_MEMLOCK (before 5.11), raises it to unlimited
/// (needs CAP_SYS_RESOURCE when the hard limit is lower). Later kernels account BPF memory to the
/// memory cgroup instead, and nothing is done.
pub fn raise_memlock() -> std::io::Result<()> {
    if kernel_version(&kernel_release()).is_some_and(|v| v >= (5, 11)) {
        return Ok(());
    }
    let lim = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: a valid rlimit struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// What [`drop_after_start_up`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Dropped {
    /// Effective capabilities kept, sorted.
    pub kept: Vec<Capability>,
    /// Capabilities given up, sorted.
    pub dropped: Vec<Capability>,
}

impl fmt::Display for Dropped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |v: &[Capability]| {
            if v.is_empty() {
                "none".to_string()
            } else {
                v.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
            }
        };
        write!(f, "kept {}; dropped {}", list(&self.kept), list(&self.dropped))
    }
}

/// After start-up (programs loaded and attached, snapshot taken): keeps in the effective and
/// permitted sets only the capabilities marked `kept` in [`CAPABILITIES`] (those the process has),
/// and empties the inheritable and ambient sets. Root's other capabilities are dropped too.
/// Capabilities are per thread: threads started before must drop theirs themselves
/// ([`drop_all_in_this_thread`]); threads started after inherit the kept set.
pub fn drop_after_start_up() -> Result<Dropped, PrivilegeError> {
    if let Some(n) = thread_count().filter(|&n| n > 1) {
        // `run`'s export threads dropped all of theirs as they started (`drop_all_in_this_thread`).
        log::debug!("{n} threads exist while dropping capabilities: this thread's are dropped");
    }
    let have = caps::read(None, CapSet::Permitted).map_err(|source| PrivilegeError::Caps { call: "capget(permitted)", source })?;
    let keep: CapsHashSet = CAPABILITIES.iter().filter(|n| n.kept && have.contains(&n.cap)).map(|n| n.cap).collect();
    let set = |set: CapSet, value: &CapsHashSet, call| caps::set(None, set, value).map_err(|source| PrivilegeError::Caps { call, source });
    // Ambient first (an ambient capability must stay permitted and inheritable), then the rest;
    // effective before permitted (it must remain a subset).
    caps::clear(None, CapSet::Ambient).map_err(|source| PrivilegeError::Caps { call: "prctl(PR_CAP_AMBIENT_CLEAR_ALL)", source })?;
    set(CapSet::Inheritable, &CapsHashSet::new(), "capset(inheritable)")?;
    set(CapSet::Effective, &keep, "capset(effective)")?;
    set(CapSet::Permitted, &keep, "capset(permitted)")?;
    let mut kept: Vec<Capability> = keep.iter().copied().collect();
    let mut dropped: Vec<Capability> = have.difference(&keep).copied().collect();
    kept.sort_by_key(|c| c.index());
    dropped.sort_by_key(|c| c.index());
    Ok(Dropped { kept, dropped })
}

/// Drops every capability of the calling thread (effective, permitted, inheritable, ambient): for
/// threads that only do network I/O (the export runtime's), started while the main thread still
/// holds what attaching needs. A failure is logged, not fatal (the thread then keeps what it had).
pub fn drop_all_in_this_thread() {
    let none = CapsHashSet::new();
    let r = caps::clear(None, CapSet::Ambient)
        .and_then(|_| caps::set(None, CapSet::Inheritable, &none))
        .and_then(|_| caps::set(None, CapSet::Effective, &none))
        .and_then(|_| caps::set(None, CapSet::Permitted, &none));
    if let Err(e) = r {
        log::warn!("could not drop the capabilities of thread {:?}: {e}", std::thread::current().name());
    }
}

/// Threads of this process (`Threads:` of /proc/self/status).
fn thread_count() -> Option<usize> {
    own_status("Threads").and_then(|n| usize::try_from(n).ok())
}

/// A number of this process's /proc/self/status (`VmHWM` in KiB, `Threads`), `None` where absent.
/// `VmHWM` is this image's own peak: unlike `getrusage`'s `ru_maxrss`, it does not include the
/// memory of the process that spawned it before `exec`.
pub fn own_status(key: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_status_reads_numbers_and_units() {
        assert!(own_status("Threads").is_some_and(|n| n >= 1));
        assert!(own_status("VmHWM").is_some_and(|kib| kib > 0));
        assert_eq!(own_status("NoSuchKey"), None);
    }

    #[test]
    fn kernel_versions() {
        assert_eq!(kernel_version("6.1.0-26-amd64"), Some((6, 1)));
        assert_eq!(kernel_version("5.10.226"), Some((5, 10)));
        assert_eq!(kernel_version("6.18.44-fc-v669\n"), Some((6, 18)));
        assert_eq!(kernel_version("garbage"), None);
        let memlock = CAPABILITIES.iter().find(|n| n.cap == Capability::CAP_SYS_RESOURCE).unwrap();
        assert!(memlock.applies_to("5.10.0"));
        assert!(!memlock.applies_to("5.11.0"));
        assert!(!memlock.applies_to("6.12.57+deb13-amd64"));
    }

    /// The systemd unit and the DaemonSet take their set from packaging/capabilities: it grants every
    /// required capability (the optional CAP_SYS_ADMIN is left to the operator).
    #[test]
    fn packaged_set_grants_every_required_capability() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/capabilities");
        let text = std::fs::read_to_string(path).unwrap();
        let listed: Vec<&str> = text.split_whitespace().collect();
        for need in CAPABILITIES.iter().filter(|n| n.required) {
            assert!(listed.contains(&need.name().as_str()), "{} is required but not in {path}", need.name());
        }
    }

    #[test]
    fn missing_names_each_capability_and_its_use() {
        let have: CapsHashSet = [Capability::CAP_BPF, Capability::CAP_NET_ADMIN].into_iter().collect();
        let m = missing(&have, "6.1.0");
        let names: Vec<String> = m.iter().map(|n| n.name()).collect();
        assert!(names.contains(&"CAP_PERFMON".to_string()), "{names:?}");
        assert!(!names.contains(&"CAP_BPF".to_string()));
        assert!(!names.contains(&"CAP_SYS_RESOURCE".to_string()), "not needed on 6.1");
        let text = PrivilegeError::Missing(m).to_string();
        assert!(text.contains("CAP_PERFMON (for loading tracing programs"), "{text}");
        assert!(text.contains("without it no tracing program loads"), "{text}");
        let all: CapsHashSet = CAPABILITIES.iter().map(|n| n.cap).collect();
        assert!(missing(&all, "5.4.0").is_empty());
    }

    /// Debian's level 3 of kernel.perf_event_paranoid adds to what CAP_SYS_ADMIN's absence costs.
    #[test]
    fn perf_event_paranoid_above_two_costs_more_without_cap_sys_admin() {
        assert!(!perf_event_open_needs_sys_admin(Some(2)));
        assert!(!perf_event_open_needs_sys_admin(None));
        assert!(perf_event_open_needs_sys_admin(Some(3)));
        let admin = CAPABILITIES.iter().find(|n| n.cap == Capability::CAP_SYS_ADMIN).unwrap();
        assert_eq!(admin.cost(Some(2)), admin.without);
        let cost = admin.cost(Some(3));
        assert!(cost.starts_with(admin.without) && cost.contains("--attach kprobe cannot start"), "{cost}");
        assert!(CAPABILITIES.iter().filter(|n| n.perf_event_open).all(|n| !n.required), "only an optional one");
        let bpf = CAPABILITIES.iter().find(|n| n.cap == Capability::CAP_BPF).unwrap();
        assert_eq!(bpf.cost(Some(3)), bpf.without);
        assert_eq!(perf_event_hint("no such file"), "");
    }

    #[test]
    fn the_list_has_no_duplicates_and_keeps_what_later_work_needs() {
        let mut seen = std::collections::HashSet::new();
        assert!(CAPABILITIES.iter().all(|n| seen.insert(n.cap)));
        let kept: Vec<_> = CAPABILITIES.iter().filter(|n| n.kept).map(|n| n.cap).collect();
        assert!(kept.contains(&Capability::CAP_BPF) && kept.contains(&Capability::CAP_PERFMON));
        assert!(!kept.contains(&Capability::CAP_NET_ADMIN));
        // open_by_handle_at(2) of cgroup directories, for every new cgroup id (container attribution).
        assert!(kept.contains(&Capability::CAP_DAC_READ_SEARCH));
    }
}
