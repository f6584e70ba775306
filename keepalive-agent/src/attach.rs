//! Loading the eBPF programs and attaching them according to the attach plan.
//!
//! The plan is data ([`PLAN`]): for each hook — a fact the agent needs from the kernel — the
//! strategies that can reach it, in order of preference. [`attach`] walks the table once at
//! start-up, keeps the first strategy that loads and attaches, and records why the others were not
//! used. A hook that nothing reaches is reported with what the user will not see; the agent runs
//! with the rest.

use std::{
    fs::File,
    io::Read as _,
    path::{Path, PathBuf},
};

use aya::{
    maps::{MapData, PerCpuArray, RingBuf},
    programs::{
        BtfTracePoint, CgroupAttachMode, CgroupSockopt, FEntry, FExit, Iter, KProbe, RawTracePoint,
        TracePoint,
    },
    Btf, Ebpf, EbpfLoader,
};
use keepalive_common::{AuditRecord, Offsets, AUDIT_FILE_RECORD_SIZE, AUDIT_RECORD_SIZE, LOST_SLOTS, RAW_EVENT_SIZE};
use log::{debug, info, warn};

use crate::kernel::progstats::{read_prog_stats, KindCounts, ProgStatsError, SkippedRuns};

/// The compiled eBPF object (built by build.rs).
pub(crate) static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/keepalive"));

/// Where a direct (fentry/kprobe) program runs relative to the kernel function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum At {
    Entry,
    Exit,
}

/// Attach-method families, for `--attach` and reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Method {
    /// Best available for each hook: fentry, then kprobe, then tracepoint.
    Auto,
    /// BPF trampoline (fentry/fexit): cheapest, needs BTF and a kernel that allows it.
    Fentry,
    /// kprobe/kretprobe (needs CONFIG_KPROBES).
    Kprobe,
    /// Tracepoints (BTF-typed first, then raw), cgroup and iterator programs only.
    Tracepoint,
    /// Like `tracepoint`, but raw tracepoints only (no BTF-typed ones): what `auto` falls back to
    /// where a BTF-typed program does not load or attach (every kernel the agent runs on, 5.8+, has
    /// BTF-typed tracepoints, 5.5+), and a way to exercise that path anywhere.
    #[value(name = "raw-tracepoint")]
    RawTracepoint,
}

/// A way to reach a hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// fentry/fexit programs: (program, kernel function, entry or exit), all must attach.
    Fentry(&'static [(&'static str, &'static str, At)]),
    /// kprobe/kretprobe programs: (program, kernel function, entry or exit), all must attach.
    Kprobe(&'static [(&'static str, &'static str, At)]),
    /// BTF-typed tracepoints (tp_btf, 5.5+): (program, tracepoint) pairs that must all attach.
    /// Cheaper than raw tracepoints where the program dereferences its arguments (direct loads).
    BtfTracepoints(&'static [(&'static str, &'static str)]),
    /// [`Strategy::BtfTracepoints`] whose programs read the socket by plain loads through the
    /// kfunc `bpf_rdonly_cast` (Linux 6.2+), instead of a helper call per field. Tried only
    /// where the kernel's BTF has the kfunc and `struct tcp_sock` ([`crate::kfunc`]).
    TypedBtfTracepoints(&'static [(&'static str, &'static str)]),
    /// Raw tracepoints: (program, tracepoint) pairs that must all attach.
    RawTracepoints(&'static [(&'static str, &'static str)]),
    /// Classic (perf) tracepoints, e.g. `syscalls:sys_exit_accept4`: (program, category, name)
    /// triples that must all attach. They need tracefs mounted (the event's id is read there).
    Tracepoints(&'static [(&'static str, &'static str, &'static str)]),
    /// A `cgroup/setsockopt` program on the agent's cgroup (the cgroup2 root by default).
    CgroupSockopt(&'static str),
    /// A BPF iterator program over `target` (e.g. `tcp`), run once at start-up.
    Iter { program: &'static str, target: &'static str },
}

impl Strategy {
    /// Short name for reports (`tracepoint`, `cgroup`, `iterator`).
    pub fn kind(&self) -> &'static str {
        match self {
            Strategy::Fentry(_) => "fentry",
            Strategy::Kprobe(_) => "kprobe",
            Strategy::BtfTracepoints(_)
            | Strategy::TypedBtfTracepoints(_)
            | Strategy::RawTracepoints(_)
            | Strategy::Tracepoints(_) => "tracepoint",
            Strategy::CgroupSockopt(_) => "cgroup",
            Strategy::Iter { .. } => "iterator",
        }
    }

    /// The programs it loads.
    pub fn programs(&self) -> Vec<&'static str> {
        match *self {
            Strategy::Fentry(p) | Strategy::Kprobe(p) => p.iter().map(|(n, _, _)| *n).collect(),
            Strategy::BtfTracepoints(p) | Strategy::TypedBtfTracepoints(p) | Strategy::RawTracepoints(p) => {
                p.iter().map(|(n, _)| *n).collect()
            }
            Strategy::Tracepoints(p) => p.iter().map(|(n, _, _)| *n).collect(),
            Strategy::CgroupSockopt(n) => vec![n],
            Strategy::Iter { program, .. } => vec![program],
        }
    }

    /// The `--attach` family it belongs to.
    pub fn method(&self) -> Method {
        match self {
            Strategy::Fentry(_) => Method::Fentry,
            Strategy::Kprobe(_) => Method::Kprobe,
            _ => Method::Tracepoint,
        }
    }

    /// What it attaches to, for reports.
    pub fn describe(&self) -> String {
        let direct = |progs: &[(&str, &str, At)], entry: &str, exit: &str| {
            progs
                .iter()
                .map(|(_, f, at)| format!("{}/{f}", if *at == At::Entry { entry } else { exit }))
                .collect::<Vec<_>>()
                .join(" + ")
        };
        match self {
            Strategy::Fentry(p) => direct(p, "fentry", "fexit"),
            Strategy::Kprobe(p) => direct(p, "kprobe", "kretprobe"),
            Strategy::BtfTracepoints(pairs) => pairs
                .iter()
                .map(|(_, tp)| format!("tp_btf/{tp}"))
                .collect::<Vec<_>>()
                .join(" + "),
            Strategy::TypedBtfTracepoints(pairs) => format!(
                "{} (socket read by plain loads, bpf_rdonly_cast)",
                pairs.iter().map(|(_, tp)| format!("tp_btf/{tp}")).collect::<Vec<_>>().join(" + ")
            ),
            Strategy::RawTracepoints(pairs) => pairs
                .iter()
                .map(|(_, tp)| format!("raw_tp/{tp}"))
                .collect::<Vec<_>>()
                .join(" + "),
            Strategy::Tracepoints(triples) => triples
                .iter()
                .map(|(_, cat, tp)| format!("tp/{cat}/{tp}"))
                .collect::<Vec<_>>()
                .join(" + "),
            Strategy::CgroupSockopt(_) => "cgroup/setsockopt".to_string(),
            Strategy::Iter { target, .. } => format!("iter/{target}"),
        }
    }
}

/// One fact the agent needs from the kernel, and the strategies that reach it, best first.
#[derive(Debug)]
pub struct Hook {
    /// Short name (`keepalive_timer`).
    pub name: &'static str,
    /// The kernel function(s) whose behaviour the hook observes.
    pub reaches: &'static str,
    /// What the user does not see when no strategy attaches.
    pub without: &'static str,
    /// Attached only while the agent waits for answers to keep-alive probes (with
    /// `--probe-answers on-demand`, the default): loaded and test-attached at start-up, then
    /// detached until needed. For hooks on hot paths (every segment received).
    pub on_demand: bool,
    pub strategies: &'static [Strategy],
}

/// The attach plan. Strategies are tried in order; the first that loads and attaches wins.
pub const PLAN: &[Hook] = &[
    Hook {
        name: "keepalive_timer",
        reaches: "tcp_keepalive_timer, tcp_write_wakeup (probes via icsk_probes_out)",
        without: "no timer firings: no probes, suppressed firings, idle re-arms or keep-alive timeouts",
        on_demand: false,
        strategies: &[
            Strategy::Fentry(&[
                ("fentry_tcp_keepalive_timer", "tcp_keepalive_timer", At::Entry),
                ("fexit_tcp_keepalive_timer", "tcp_keepalive_timer", At::Exit),
            ]),
            Strategy::Kprobe(&[
                ("kprobe_tcp_keepalive_timer", "tcp_keepalive_timer", At::Entry),
                ("kretprobe_tcp_keepalive_timer", "tcp_keepalive_timer", At::Exit),
            ]),
            Strategy::TypedBtfTracepoints(&[
                ("btf_timer_expire_entry_cast", "timer_expire_entry"),
                ("btf_timer_expire_exit_cast", "timer_expire_exit"),
            ]),
            Strategy::BtfTracepoints(&[
                ("btf_timer_expire_entry", "timer_expire_entry"),
                ("btf_timer_expire_exit", "timer_expire_exit"),
            ]),
            Strategy::RawTracepoints(&[
            ("timer_expire_entry", "timer_expire_entry"),
            ("timer_expire_exit", "timer_expire_exit"),
        ]),
        ],
    },
    Hook {
        name: "probe_answer",
        reaches: "tcp_rcv_established (segments received while probes are out; attached on demand)",
        without: "answers to probes only inferred at the next timer firing (one interval late)",
        on_demand: true,
        strategies: &[
            Strategy::TypedBtfTracepoints(&[("btf_tcp_probe_cast", "tcp_probe")]),
            Strategy::BtfTracepoints(&[("btf_tcp_probe", "tcp_probe")]),
            Strategy::RawTracepoints(&[("tcp_probe", "tcp_probe")]),
        ],
    },
    Hook {
        name: "active_reset",
        reaches: "tcp_send_active_reset, tcp_v4/v6_send_reset",
        without: "no reset events (the timeout itself is still seen)",
        on_demand: false,
        strategies: &[
            Strategy::Fentry(&[("fentry_tcp_send_active_reset", "tcp_send_active_reset", At::Entry)]),
            Strategy::Kprobe(&[("kprobe_tcp_send_active_reset", "tcp_send_active_reset", At::Entry)]),
            Strategy::RawTracepoints(&[("tcp_send_reset", "tcp_send_reset")]),
        ],
    },
    Hook {
        name: "peer_reset",
        reaches: "tcp_reset (reset received)",
        without: "no peer_reset events",
        on_demand: false,
        strategies: &[Strategy::RawTracepoints(&[("tcp_receive_reset", "tcp_receive_reset")])],
    },
    Hook {
        name: "socket_error",
        reaches: "sk_error_report (ETIMEDOUT, ECONNRESET...)",
        without: "no error events",
        on_demand: false,
        strategies: &[Strategy::RawTracepoints(&[(
            "inet_sk_error_report",
            "inet_sk_error_report",
        )])],
    },
    Hook {
        name: "lifecycle",
        reaches: "tcp_set_state (connect, established, close), tcp_v4_destroy_sock",
        without: "no open/close events; settings made before connect are not reported",
        on_demand: false,
        strategies: &[
            Strategy::BtfTracepoints(&[
                ("btf_inet_sock_set_state", "inet_sock_set_state"),
                ("btf_tcp_destroy_sock", "tcp_destroy_sock"),
            ]),
            Strategy::RawTracepoints(&[
                ("inet_sock_set_state", "inet_sock_set_state"),
                ("tcp_destroy_sock", "tcp_destroy_sock"),
            ]),
        ],
    },
    Hook {
        name: "setsockopt",
        reaches: "tcp_set_keepalive (SO_KEEPALIVE), do_tcp_setsockopt (TCP_KEEPIDLE/INTVL/CNT, TCP_USER_TIMEOUT)",
        without: "no process attribution of settings; changes still seen at the next timer firing",
        on_demand: false,
        strategies: &[
            Strategy::Fentry(&[
                ("fentry_tcp_set_keepalive", "tcp_set_keepalive", At::Entry),
                ("fexit_do_tcp_setsockopt", "do_tcp_setsockopt", At::Exit),
            ]),
            Strategy::Kprobe(&[
                ("kprobe_tcp_set_keepalive", "tcp_set_keepalive", At::Entry),
                ("kprobe_do_tcp_setsockopt", "do_tcp_setsockopt", At::Entry),
                ("kretprobe_do_tcp_setsockopt", "do_tcp_setsockopt", At::Exit),
            ]),
            Strategy::CgroupSockopt("setsockopt"),
        ],
    },
    Hook {
        name: ACCEPT_OWNER,
        reaches: "accept4(2), accept(2) (the process that accepted a keep-alive socket)",
        without: "accepted connections carry no pid/comm until a setsockopt names a process; --pid cannot select them",
        on_demand: false,
        strategies: &[Strategy::Tracepoints(&[
            ("sys_exit_accept4", "syscalls", "sys_exit_accept4"),
            ("sys_exit_accept", "syscalls", "sys_exit_accept"),
        ])],
    },
    Hook {
        name: "snapshot",
        reaches: "all TCP sockets at start-up (bpf_iter_tcp)",
        without: "connections opened before the agent started are seen only from their next timer firing",
        on_demand: false,
        strategies: &[Strategy::Iter { program: "snapshot_tcp", target: "tcp" }],
    },
];

/// Where the keep-alive timer is reached by fentry or kprobe, whose programs get no tick argument
/// and read `jiffies` through its address: says that the tick is approximated when `/proc/kallsyms`
/// lacks it (`CONFIG_KALLSYMS_ALL` off). The tracepoints get the tick as an argument.
fn warn_tick_approximated(hook: &Hook, st: &Strategy, offsets: &Offsets) {
    if hook.name == CORE_HOOK && offsets.jiffies_addr == 0 && matches!(st, Strategy::Fentry(_) | Strategy::Kprobe(_)) {
        warn!(
            "hook {}: jiffies is not in /proc/kallsyms (CONFIG_KALLSYMS_ALL off): the {} timer programs approximate \
             the current tick by the timer's expiry",
            hook.name,
            st.kind()
        );
    }
}

/// An attach error of `perf_event_open(2)` (kprobes, tracefs tracepoints), naming CAP_SYS_ADMIN
/// when the kernel's `perf_event_paranoid` level requires it (Debian's default).
fn perf_event_error(message: String) -> String {
    let hint = crate::privilege::perf_event_hint(&message);
    message + &hint
}

/// Name of the hook that attributes accepted sockets to the accepting process.
pub const ACCEPT_OWNER: &str = "accept_owner";

/// Why `hook` cannot work on this kernel whatever the strategy (offsets it reads are absent from
/// BTF), if so.
fn unmet(hook: &Hook, offsets: &Offsets) -> Option<&'static str> {
    (hook.name == ACCEPT_OWNER && !offsets.accept_owner_ready())
        .then_some("kernel BTF lacks task_struct.files, fdtable, file/socket or syscall_trace_exit.ret")
}

/// The mounted tracefs (what aya looks for: a non-empty `/sys/kernel/tracing` or
/// `/sys/kernel/debug/tracing`).
fn tracefs_mounted() -> bool {
    ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .iter()
        .any(|p| std::fs::read_dir(p).is_ok_and(|mut d| d.next().is_some()))
}

/// The hook this tool exists for: when the chosen `--attach` method (or, with `auto`, every method)
/// cannot reach it, the agent stops ([`AttachError::CoreHook`]) instead of running without it.
pub const CORE_HOOK: &str = "keepalive_timer";

/// Errors while loading or attaching.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("--attach {method} cannot reach {hook}, the hook this tool exists for: {reasons}{hint}")]
    CoreHook {
        method: String,
        hook: &'static str,
        /// Each strategy tried and the kernel's answer.
        reasons: String,
        /// What to try instead, if anything.
        hint: &'static str,
    },
    #[error("the eBPF object is empty: the agent was built with AYA_BUILD_SKIP")]
    NoObject,
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("no cgroup v2 hierarchy is mounted (looked in {0})")]
    NoCgroup2(String),
    #[error("opening cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading the start-up snapshot: {0}")]
    Snapshot(String),
    #[error("audit socket walk: {0}")]
    Audit(String),
    #[error("no hook could be attached")]
    NothingAttached,
}

/// Options for [`attach`].
#[derive(Debug, Clone)]
pub struct AttachOptions {
    /// Ring buffer size in bytes (a power of two, multiple of the page size).
    pub ringbuf_bytes: u32,
    /// cgroup v2 directory for the setsockopt program; `None`: the cgroup2 root.
    pub cgroup: Option<PathBuf>,
    /// Skip the `snapshot` hook.
    pub no_snapshot: bool,
    /// Restrict every hook that has strategies of this family to them.
    pub method: Method,
    /// When [`Hook::on_demand`] hooks are attached.
    pub answers: Answers,
}

/// When the `probe_answer` hook (a program on every received segment) is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Answers {
    /// Only while some tracked connection has a keep-alive probe unanswered: hosts pay nothing per
    /// segment while no probe is outstanding. An answer that comes before the hook is attached
    /// (most answers on a healthy network) is taken from the socket's last-ACK time at the next
    /// timer firing (`next_firing` precision: the kernel's jiffies).
    #[value(name = "on-demand")]
    OnDemand,
    /// All the time: every answer seen as it arrives (`segment` precision), at the cost of one
    /// program run per segment received on every TCP connection of the host.
    Always,
    /// Never: every answer is taken from the socket's last-ACK time at the probing socket's next
    /// timer firing (`next_firing` precision: the kernel's jiffies; reported up to one probe
    /// interval later). Nothing runs on received segments, even while probes are outstanding:
    /// the cost of following answers is the timer runs of the sockets that probe, which the agent
    /// pays anyway. The setting for fleets (metrics and spans do not need answers the instant they
    /// arrive).
    #[value(name = "next-firing")]
    NextFiring,
}

/// The strategies of `hook` to try under `method`: with a specific method, the hook's strategies of
/// that family when it has any (hooks with no alternative keep theirs).
pub fn strategies_for(hook: &Hook, method: Method) -> Vec<Strategy> {
    let fits = |s: &Strategy| match method {
        Method::Auto => true,
        Method::RawTracepoint => {
            s.method() == Method::Tracepoint && !matches!(s, Strategy::BtfTracepoints(_) | Strategy::TypedBtfTracepoints(_))
        }
        m => s.method() == m,
    };
    let all = hook.strategies.iter().copied();
    if !hook.strategies.iter().any(fits) {
        return all.collect();
    }
    all.filter(fits).collect()
}

/// What happened to one hook.
#[derive(Debug, Clone)]
pub struct HookOutcome {
    pub hook: &'static Hook,
    /// The strategy that attached, if any.
    pub chosen: Option<Strategy>,
    /// Strategies tried before it, and why each was not used.
    pub rejected: Vec<(Strategy, String)>,
}

impl HookOutcome {
    /// One line for `check` and the start-up log.
    pub fn summary(&self) -> String {
        let mut s = match &self.chosen {
            Some(st) => format!("{:<16} {:<10} {}", self.hook.name, st.kind(), st.describe()),
            None => format!("{:<16} {:<10} {}", self.hook.name, "NONE", self.hook.without),
        };
        for (st, why) in &self.rejected {
            s.push_str(&format!("\n{:<16} {:<10} not used: {} ({why})", "", st.kind(), st.describe()));
        }
        s
    }
}

/// Loaded and attached programs. Dropping it detaches everything (nothing is pinned).
pub struct Probes {
    ebpf: Ebpf,
    pub events: RingBuf<MapData>,
    lost: PerCpuArray<MapData, u64>,
    pub outcomes: Vec<HookOutcome>,
    snapshot_ready: bool,
    /// On-demand hooks: the strategy that loaded, and its links while attached.
    on_demand: Vec<(Strategy, Option<Vec<TpLink>>)>,
    /// Baseline of every event program's skipped-run counter, taken once all are loaded.
    skipped: SkippedRuns,
}

/// A link of a tracepoint program, kept to detach it again.
enum TpLink {
    Btf(&'static str, aya::programs::tp_btf::BtfTracePointLinkId),
    Raw(&'static str, aya::programs::raw_trace_point::RawTracePointLinkId),
}

/// The cgroup2 mount point, from `/proc/self/mountinfo`.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    parse_cgroup2_mount(&text)
}

fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (pre, post) = line.split_once(" - ")?;
        let fstype = post.split_whitespace().next()?;
        if fstype != "cgroup2" {
            return None;
        }
        pre.split_whitespace().nth(4).map(PathBuf::from)
    })
}

/// Loads the object with the kernel's offsets and attaches every hook it can.
pub fn attach(offsets: &Offsets, opts: &AttachOptions) -> Result<Probes, AttachError> {
    if EBPF_OBJECT.is_empty() {
        return Err(AttachError::NoObject);
    }
    let btf = Btf::from_sys_fs().ok();
    let mut object = EBPF_OBJECT.to_vec();
    let mut offsets = *offsets;
    // The typed strategies' kfunc calls, rewritten where the kernel has the kfunc.
    let typed = crate::kfunc::prepare_rdonly_cast(&mut object, btf.as_ref(), &mut offsets);
    if let Err(why) = &typed {
        debug!("typed socket reads unavailable: {why}");
    }
    let ring_bytes = u64::from(opts.ringbuf_bytes);
    let mut ebpf = EbpfLoader::new()
        .btf(btf.as_ref())
        .override_global("OFFSETS", &offsets, true)
        .override_global("RING_BYTES", &ring_bytes, true)
        .map_max_entries("EVENTS", opts.ringbuf_bytes)
        .load(&object)?;
    open_accept_window(&mut ebpf);
    let cgroup = match &opts.cgroup {
        Some(p) => Some(p.clone()),
        None => cgroup2_mount(),
    };
    let mut outcomes = Vec::new();
    let mut snapshot_ready = false;
    let mut on_demand = Vec::new();
    for hook in PLAN {
        let mut outcome = HookOutcome { hook, chosen: None, rejected: Vec::new() };
        let deferred = hook.on_demand && opts.answers == Answers::OnDemand;
        if opts.no_snapshot && hook.name == "snapshot" {
            continue;
        }
        if hook.on_demand && opts.answers == Answers::NextFiring {
            info!("hook {}: not attached (--probe-answers next-firing): {}", hook.name, hook.without);
            continue;
        }
        if let Some(why) = unmet(hook, &offsets) {
            warn!("hook {}: {why}: {}", hook.name, hook.without);
            outcome.rejected.extend(hook.strategies.iter().map(|st| (*st, why.to_string())));
            outcomes.push(outcome);
            continue;
        }
        for st in strategies_for(hook, opts.method) {
            let st = &st;
            let attempt = try_strategy(&mut ebpf, st, btf.as_ref(), cgroup.as_deref(), &typed);
            if attempt.is_err() {
                // Never leave half a strategy attached (e.g. an entry program without its exit).
                unload(&mut ebpf, st);
            }
            match attempt {
                Ok(links) => {
                    outcome.chosen = Some(*st);
                    if matches!(st, Strategy::Iter { .. }) {
                        snapshot_ready = true;
                    }
                    if deferred {
                        // It attaches here (proven); detached until probes are outstanding.
                        detach_links(&mut ebpf, links);
                        on_demand.push((*st, None));
                    }
                    break;
                }
                Err(why) => {
                    debug!("hook {}: {} failed: {why}", hook.name, st.describe());
                    outcome.rejected.push((*st, why));
                }
            }
        }
        match &outcome.chosen {
            Some(st) if deferred => info!(
                "hook {}: {} via {}, attached only while keep-alive probes are unanswered (--probe-answers on-demand)",
                hook.name,
                st.kind(),
                st.describe()
            ),
            Some(st) => {
                info!("hook {}: {} via {}", hook.name, st.kind(), st.describe());
                warn_tick_approximated(hook, st, &offsets);
            }
            None if hook.name == CORE_HOOK => {
                // Without it the agent has nothing to say: stop, whatever the method. Dropping
                // `ebpf` unloads whatever was loaded so far.
                let hint = if opts.method == Method::Auto { "" } else { " (--attach auto picks what this kernel allows)" };
                return Err(AttachError::CoreHook {
                    method: method_name(opts.method),
                    hook: hook.name,
                    reasons: rejections(&outcome),
                    hint,
                });
            }
            None => warn!(
                "hook {}: not reachable on this kernel ({}): {}",
                hook.name,
                rejections(&outcome),
                hook.without
            ),
        }
        outcomes.push(outcome);
    }
    if outcomes.iter().all(|o| o.chosen.is_none()) {
        return Err(AttachError::NothingAttached);
    }
    let events = RingBuf::try_from(ebpf.take_map("EVENTS").ok_or(AttachError::Map {
        name: "EVENTS",
        source: aya::maps::MapError::InvalidName { name: "EVENTS".into() },
    })?)
    .map_err(|source| AttachError::Map { name: "EVENTS", source })?;
    let lost = PerCpuArray::try_from(ebpf.take_map("LOST").ok_or(AttachError::Map {
        name: "LOST",
        source: aya::maps::MapError::InvalidName { name: "LOST".into() },
    })?)
    .map_err(|source| AttachError::Map { name: "LOST", source })?;
    let skipped = skipped_runs_baseline(&ebpf, &outcomes);
    Ok(Probes { ebpf, events, lost, outcomes, snapshot_ready, on_demand, skipped })
}

/// Sets the accept-owner programs' mark to [`keepalive_common::ACCEPT_MARK_AT_START`]: their
/// window ([`keepalive_common::ACCEPT_WINDOW_S`]) opens at the first accept, so that a keep-alive
/// socket already waiting in an accept queue is named by its `accept()`. A failure is only logged:
/// the window then opens at the next passive keep-alive establishment.
fn open_accept_window(ebpf: &mut Ebpf) {
    let r = ebpf
        .map_mut("ACCEPT_MARK")
        .ok_or_else(|| "map missing".to_string())
        .and_then(|m| aya::maps::Array::<_, u64>::try_from(m).map_err(|e| e.to_string()))
        .and_then(|mut a| a.set(0, keepalive_common::ACCEPT_MARK_AT_START, 0).map_err(|e| e.to_string()));
    if let Err(e) = r {
        warn!("ACCEPT_MARK: cannot open the accept-owner window at start-up ({e}): keep-alive sockets accepted before the next one is established are not named by their accept");
    }
}

/// The skipped-run baseline of the programs of every chosen strategy, on-demand ones included
/// (they stay loaded while detached, so their counter only grows while attached).
fn skipped_runs_baseline(ebpf: &Ebpf, outcomes: &[HookOutcome]) -> SkippedRuns {
    let programs = outcomes.iter().filter_map(|o| o.chosen).flat_map(|st| st.programs());
    let skipped = SkippedRuns::baseline(programs, |name| program_fd(ebpf, name).map(read_prog_stats));
    if let Some(why) = skipped.unsupported() {
        warn!("runs of the agent's programs the kernel skips (recursion on one CPU) cannot be counted: {why}");
    }
    skipped
}

/// The fd of the loaded program `name`.
fn program_fd<'a>(ebpf: &'a Ebpf, name: &str) -> Option<std::os::fd::BorrowedFd<'a>> {
    use std::os::fd::AsFd as _;
    Some(ebpf.program(name)?.fd().ok()?.as_fd())
}

/// The `--attach` spelling of `m`.
fn method_name(m: Method) -> String {
    use clap::ValueEnum as _;
    m.to_possible_value().map_or_else(|| format!("{m:?}"), |v| v.get_name().to_string())
}

/// Every strategy tried for a hook, and why it was not used.
fn rejections(outcome: &HookOutcome) -> String {
    let tried: Vec<String> = outcome.rejected.iter().map(|(st, why)| format!("{}: {why}", st.describe())).collect();
    if tried.is_empty() {
        "no strategy to try".to_string()
    } else {
        tried.join("; ")
    }
}

/// Detaches the links of an on-demand strategy (errors only logged: the program stays loaded).
fn detach_links(ebpf: &mut Ebpf, links: Vec<TpLink>) {
    for link in links {
        let r = match link {
            TpLink::Btf(prog, id) => ebpf
                .program_mut(prog)
                .and_then(|p| <&mut BtfTracePoint>::try_from(p).ok())
                .map(|p| p.detach(id)),
            TpLink::Raw(prog, id) => ebpf
                .program_mut(prog)
                .and_then(|p| <&mut RawTracePoint>::try_from(p).ok())
                .map(|p| p.detach(id)),
        };
        if let Some(Err(e)) = r {
            warn!("detaching an on-demand program: {}", error_chain(&e));
        }
    }
}

/// Attaches the loaded tracepoint programs of `st` (at start-up, and again for on-demand hooks);
/// on failure detaches what it attached.
fn attach_loaded(ebpf: &mut Ebpf, st: &Strategy) -> Result<Vec<TpLink>, String> {
    let mut links = Vec::new();
    let result = (|| {
        match *st {
            Strategy::BtfTracepoints(pairs) | Strategy::TypedBtfTracepoints(pairs) => {
                for (prog, tp) in pairs {
                    let p: &mut BtfTracePoint = ebpf
                        .program_mut(prog)
                        .ok_or_else(|| format!("program {prog} missing"))?
                        .try_into()
                        .map_err(|e| format!("{prog}: {e}"))?;
                    links.push(TpLink::Btf(prog, p.attach().map_err(|e| format!("attaching {prog} to {tp}: {}", error_chain(&e)))?));
                }
            }
            Strategy::RawTracepoints(pairs) => {
                for (prog, tp) in pairs {
                    let p: &mut RawTracePoint = ebpf
                        .program_mut(prog)
                        .ok_or_else(|| format!("program {prog} missing"))?
                        .try_into()
                        .map_err(|e| format!("{prog}: {e}"))?;
                    links.push(TpLink::Raw(prog, p.attach(tp).map_err(|e| format!("attaching {prog} to {tp}: {}", error_chain(&e)))?));
                }
            }
            _ => return Err(format!("{} is not a tracepoint strategy", st.describe())),
        }
        Ok(())
    })();
    match result {
        Ok(()) => Ok(links),
        Err(e) => {
            detach_links(ebpf, links);
            Err(e)
        }
    }
}

fn try_strategy(
    ebpf: &mut Ebpf,
    st: &Strategy,
    btf: Option<&Btf>,
    cgroup: Option<&Path>,
    typed: &Result<(), String>,
) -> Result<Vec<TpLink>, String> {
    match *st {
        Strategy::TypedBtfTracepoints(pairs) => {
            typed.clone()?;
            try_strategy(ebpf, &Strategy::BtfTracepoints(pairs), btf, cgroup, typed)
        }
        Strategy::Fentry(progs) => {
            let btf = btf.ok_or("kernel BTF unavailable")?;
            for &(prog, func, at) in progs {
                let p = ebpf.program_mut(prog).ok_or_else(|| format!("program {prog} missing from the object"))?;
                match at {
                    At::Entry => {
                        let p: &mut FEntry = p.try_into().map_err(|e| format!("{prog}: {e}"))?;
                        p.load(func, btf).map_err(|e| explain_load("fentry", prog, &e))?;
                        p.attach().map_err(|e| format!("attaching {prog}: {}", error_chain(&e)))?;
                    }
                    At::Exit => {
                        let p: &mut FExit = p.try_into().map_err(|e| format!("{prog}: {e}"))?;
                        p.load(func, btf).map_err(|e| explain_load("fentry", prog, &e))?;
                        p.attach().map_err(|e| format!("attaching {prog}: {}", error_chain(&e)))?;
                    }
                }
            }
            Ok(Vec::new())
        }
        Strategy::Kprobe(progs) => {
            if !Path::new("/sys/bus/event_source/devices/kprobe").exists() {
                return Err("this kernel has no kprobes (CONFIG_KPROBES is off)".into());
            }
            for &(prog, func, _) in progs {
                let p: &mut KProbe = ebpf
                    .program_mut(prog)
                    .ok_or_else(|| format!("program {prog} missing from the object"))?
                    .try_into()
                    .map_err(|e| format!("{prog}: {e}"))?;
                p.load().map_err(|e| format!("loading {prog}: {}", error_chain(&e)))?;
                p.attach(func, 0).map_err(|e| perf_event_error(format!("attaching {prog} to {func}: {}", error_chain(&e))))?;
            }
            Ok(Vec::new())
        }
        Strategy::BtfTracepoints(pairs) => {
            let btf = btf.ok_or("kernel BTF unavailable")?;
            for (prog, tp) in pairs {
                let p: &mut BtfTracePoint = ebpf
                    .program_mut(prog)
                    .ok_or_else(|| format!("program {prog} missing from the object"))?
                    .try_into()
                    .map_err(|e| format!("{prog}: {e}"))?;
                p.load(tp, btf).map_err(|e| format!("loading {prog}: {}", error_chain(&e)))?;
            }
            attach_loaded(ebpf, st)
        }
        Strategy::RawTracepoints(pairs) => {
            for (prog, _) in pairs {
                let p: &mut RawTracePoint = ebpf
                    .program_mut(prog)
                    .ok_or_else(|| format!("program {prog} missing from the object"))?
                    .try_into()
                    .map_err(|e| format!("{prog}: {e}"))?;
                p.load().map_err(|e| format!("loading {prog}: {}", error_chain(&e)))?;
            }
            attach_loaded(ebpf, st)
        }
        Strategy::Tracepoints(triples) => {
            if !tracefs_mounted() {
                return Err("tracefs is not mounted (mount -t tracefs nodev /sys/kernel/tracing)".into());
            }
            for &(prog, category, name) in triples {
                let p: &mut TracePoint = ebpf
                    .program_mut(prog)
                    .ok_or_else(|| format!("program {prog} missing from the object"))?
                    .try_into()
                    .map_err(|e| format!("{prog}: {e}"))?;
                p.load().map_err(|e| format!("loading {prog}: {}", error_chain(&e)))?;
                p.attach(category, name)
                    .map_err(|e| perf_event_error(format!("attaching {prog} to {category}:{name}: {}", error_chain(&e))))?;
            }
            Ok(Vec::new())
        }
        Strategy::CgroupSockopt(prog) => {
            let path = cgroup.ok_or("no cgroup v2 hierarchy is mounted")?;
            let file = File::open(path).map_err(|e| format!("opening {}: {e}", path.display()))?;
            let p: &mut CgroupSockopt = ebpf
                .program_mut(prog)
                .ok_or_else(|| format!("program {prog} missing from the object"))?
                .try_into()
                .map_err(|e| format!("{prog}: {e}"))?;
            p.load().map_err(|e| format!("loading {prog}: {}", error_chain(&e)))?;
            // Through a BPF link (5.7+) the program joins whatever else is attached there; the
            // link flags must be 0, which is what `Single` maps to.
            p.attach(file, CgroupAttachMode::Single)
                .map_err(|e| format!("attaching {prog} to {}: {}", path.display(), error_chain(&e)))?;
            Ok(Vec::new())
        }
        Strategy::Iter { program, target } => {
            load_iter(ebpf, program, target, btf.ok_or("kernel BTF unavailable")?)?;
            Ok(Vec::new())
        }
    }
}

/// Detaches and unloads every program of `st` (those never loaded are skipped).
fn unload(ebpf: &mut Ebpf, st: &Strategy) {
    use aya::programs::Program;
    for name in st.programs() {
        let Some(p) = ebpf.program_mut(name) else { continue };
        let _ = match p {
            Program::FEntry(p) => p.unload(),
            Program::FExit(p) => p.unload(),
            Program::KProbe(p) => p.unload(),
            Program::RawTracePoint(p) => p.unload(),
            Program::TracePoint(p) => p.unload(),
            Program::BtfTracePoint(p) => p.unload(),
            Program::CgroupSockopt(p) => p.unload(),
            Program::Iter(p) => p.unload(),
            _ => Ok(()),
        };
    }
}

/// Why a direct strategy's program did not load, in the user's terms.
fn explain_load(st_kind: &str, prog: &str, e: &dyn std::error::Error) -> String {
    let chain = error_chain(e);
    if st_kind == "fentry" && chain.contains("Operation not permitted") {
        format!("loading {prog}: the kernel refused the BPF trampoline program (EPERM before verification): fentry/fexit is not allowed here")
    } else {
        format!("loading {prog}: {chain}")
    }
}

/// `e` and its sources, joined.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        s.push_str(": ");
        s.push_str(&src.to_string());
        cur = src.source();
    }
    s
}

/// The network namespaces the start-up snapshot walks: `only`, or every namespace some process
/// lives in plus those kept by bind mounts under /run/netns, one path per namespace.
pub fn netns_paths(only: Option<&Path>) -> Vec<PathBuf> {
    use std::os::unix::fs::MetadataExt as _;
    if let Some(p) = only {
        return vec![p.to_path_buf()];
    }
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/run/netns") {
        candidates.extend(rd.flatten().map(|e| e.path()));
    }
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            if e.file_name().to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())) {
                candidates.push(e.path().join("ns/net"));
            }
        }
    }
    let mut seen = std::collections::HashSet::new();
    candidates
        .into_iter()
        .filter(|p| std::fs::metadata(p).map(|m| seen.insert(m.ino())).unwrap_or(false))
        .collect()
}

/// Runs `f` with the calling thread in the network namespace at `path`, then moves it back. The
/// outer error is about entering; failing to come back is an error inside `Ok` (`Err(Err(..))`
/// would be ambiguous), reported by the caller.
fn in_netns<T>(path: &Path, f: impl FnOnce() -> T) -> std::io::Result<Result<T, std::io::Error>> {
    use std::os::fd::AsRawFd as _;
    use std::os::unix::fs::MetadataExt as _;
    let home = File::open("/proc/thread-self/ns/net")?;
    let target = File::open(path)?;
    // Already there: no setns, which needs CAP_SYS_ADMIN (optional, see crate::privilege).
    let (h, t) = (home.metadata()?, target.metadata()?);
    if (h.dev(), h.ino()) == (t.dev(), t.ino()) {
        return Ok(Ok(f()));
    }
    // SAFETY: valid namespace fds; network namespaces are per thread.
    if unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let out = f();
    // SAFETY: as above.
    if unsafe { libc::setns(home.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Ok(Err(std::io::Error::last_os_error()));
    }
    Ok(Ok(out))
}

/// Runs `f` in each of `namespaces` (a TCP iterator walks the sockets of the namespace it is
/// created in) and returns the inode numbers of those entered; a namespace that vanished meanwhile
/// is skipped. `err` makes the error of failing to come back.
fn each_netns(
    namespaces: &[PathBuf],
    err: fn(String) -> AttachError,
    mut f: impl FnMut() -> Result<(), AttachError>,
) -> Result<Vec<u32>, AttachError> {
    use std::os::unix::fs::MetadataExt as _;
    let mut walked = Vec::new();
    for ns in namespaces {
        let Ok(inode) = std::fs::metadata(ns).map(|m| m.ino() as u32) else {
            continue;
        };
        match in_netns(ns, &mut f) {
            Ok(Ok(r)) => {
                r?;
                walked.push(inode);
            }
            Ok(Err(e)) => {
                return Err(err(format!("could not return to the agent's network namespace after {}: {e}", ns.display())))
            }
            Err(e) => debug!("walk of {}: {e}", ns.display()),
        }
    }
    Ok(walked)
}

/// Runs the loaded `iter` program `program` once and reads all it writes, which must be whole
/// records of `record_size` bytes.
fn read_iter(ebpf: &mut Ebpf, program: &str, record_size: usize) -> Result<Vec<u8>, String> {
    let mut file = open_iter(ebpf, program)?;
    let mut buf = Vec::new();
    file.read_to_end(&mut buf).map_err(|e| format!("reading the {program} iterator: {e}"))?;
    if buf.len() % record_size != 0 {
        return Err(format!("{program} returned {} bytes, not a multiple of the record size {record_size}", buf.len()));
    }
    Ok(buf)
}

/// Creates an iterator of the loaded `iter` program `program` in the calling thread's namespace
/// and returns the file to read it from.
fn open_iter(ebpf: &mut Ebpf, program: &str) -> Result<File, String> {
    let p: &mut Iter = ebpf
        .program_mut(program)
        .ok_or_else(|| format!("program {program} missing"))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| e.to_string())?;
    let link_id = p.attach().map_err(|e| error_chain(&e))?;
    let link = p.take_link(link_id).map_err(|e| error_chain(&e))?;
    link.into_file().map_err(|e| error_chain(&e))
}

impl Probes {
    /// Runs the start-up snapshot iterator in each of `namespaces` (a TCP iterator walks the
    /// sockets of the namespace it is created in) and returns the raw records (none when the
    /// snapshot hook is not attached). A namespace that vanished meanwhile is skipped.
    pub fn snapshot(&mut self, namespaces: &[PathBuf]) -> Result<Vec<Vec<u8>>, AttachError> {
        Ok(self.walk(namespaces)?.0)
    }

    /// Whether the socket walk ([`Probes::walk`]) is available (the `iter/tcp` program loaded).
    pub fn can_walk(&self) -> bool {
        self.snapshot_ready
    }

    /// Walks the keep-alive sockets of each of `namespaces` with the snapshot iterator: the raw
    /// records, and the inode numbers of the namespaces actually walked (a namespace that vanished
    /// meanwhile is skipped and not listed).
    pub fn walk(&mut self, namespaces: &[PathBuf]) -> Result<(Vec<Vec<u8>>, Vec<u32>), AttachError> {
        if !self.snapshot_ready {
            return Ok((Vec::new(), Vec::new()));
        }
        let mut out = Vec::new();
        let walked = each_netns(namespaces, AttachError::Snapshot, || {
            out.extend(self.snapshot_here()?);
            Ok(())
        })?;
        Ok((out, walked))
    }

    /// The snapshot of the calling thread's network namespace.
    fn snapshot_here(&mut self) -> Result<Vec<Vec<u8>>, AttachError> {
        let buf = read_iter(&mut self.ebpf, "snapshot_tcp", RAW_EVENT_SIZE).map_err(AttachError::Snapshot)?;
        Ok(buf.chunks_exact(RAW_EVENT_SIZE).map(<[u8]>::to_vec).collect())
    }

    /// The `LOST` counters summed over CPUs: events lost because the ring buffer was full, per
    /// event kind, then `LOST_SLOT_INFLIGHT` (see `keepalive_common::LOST_SLOTS`).
    pub fn lost_counts(&self) -> [u64; LOST_SLOTS as usize] {
        let mut out = [0u64; LOST_SLOTS as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            if let Ok(values) = self.lost.get(&(i as u32), 0) {
                *slot = values.iter().sum();
            }
        }
        out
    }

    /// Runs of the agent's programs the kernel skipped since they were attached (recursion on the
    /// same CPU), per event kind; `Ok(None)` before Linux 5.12.
    pub fn skipped_runs(&self) -> Result<Option<KindCounts>, ProgStatsError> {
        self.skipped.counts(|name| program_fd(&self.ebpf, name).map(read_prog_stats))
    }

    /// (program name, kernel program id) of every loaded program (for the run counts of the
    /// metrics).
    pub fn program_ids(&self) -> Vec<(String, u32)> {
        self.ebpf.programs().filter_map(|(name, p)| Some((name.to_string(), p.info().ok()?.id()))).collect()
    }

    /// Hooks that attached.
    pub fn attached(&self) -> impl Iterator<Item = &HookOutcome> {
        self.outcomes.iter().filter(|o| o.chosen.is_some())
    }

    /// Whether there are on-demand hooks (loaded, attached only when wanted).
    pub fn has_on_demand(&self) -> bool {
        !self.on_demand.is_empty()
    }

    /// Whether the on-demand hooks are attached now.
    pub fn on_demand_attached(&self) -> bool {
        self.on_demand.iter().any(|(_, links)| links.is_some())
    }

    /// Attaches (`on`) or detaches the on-demand hooks. A failure to attach is returned (the hook
    /// stays detached and the caller may retry later).
    pub fn set_on_demand(&mut self, on: bool) -> Result<(), String> {
        let mut first_err = None;
        for (st, links) in self.on_demand.iter_mut() {
            match (on, links.is_some()) {
                (true, false) => match attach_loaded(&mut self.ebpf, st) {
                    Ok(l) => *links = Some(l),
                    Err(e) => {
                        first_err.get_or_insert(e);
                    }
                },
                (false, true) => detach_links(&mut self.ebpf, links.take().unwrap_or_default()),
                _ => {}
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

/// The `audit` socket walk: the eBPF object loaded with only the `audit_tcp` iterator program
/// (`iter/tcp`, kernel 5.9+). Nothing is attached between walks: each walk creates an iterator
/// link per namespace, reads it to the end and drops it. Dropping the walker unloads the program.
pub struct AuditWalker {
    ebpf: Ebpf,
    /// Why the `audit_files` iterator is not available, if it is not (the owners are then found
    /// in `/proc`).
    files_unavailable: Option<String>,
}

impl AuditWalker {
    /// Loads the object with `offsets` and the audit iterator program.
    pub fn load(offsets: &Offsets) -> Result<AuditWalker, AttachError> {
        if EBPF_OBJECT.is_empty() {
            return Err(AttachError::NoObject);
        }
        // The event ring is not used by the walk: the smallest size the kernel accepts.
        // SAFETY: sysconf has no preconditions.
        let page = u32::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        // One parse of the kernel's BTF serves the loader and the iterator.
        let btf = Btf::from_sys_fs().map_err(|e| AttachError::Audit(format!("kernel BTF: {}", error_chain(&e))))?;
        let mut ebpf = EbpfLoader::new()
            .btf(Some(&btf))
            .override_global("OFFSETS", offsets, true)
            .map_max_entries("EVENTS", page)
            .load(EBPF_OBJECT)?;
        load_iter(&mut ebpf, AUDIT_PROGRAM, "tcp", &btf).map_err(AttachError::Audit)?;
        let files_unavailable = if offsets.task_tgid.present() && offsets.inode_i_mode.present() && offsets.socket_inode_ready() {
            load_iter(&mut ebpf, AUDIT_FILES_PROGRAM, "task_file", &btf).err()
        } else {
            Some("kernel BTF lacks task_struct.tgid, inode.i_mode or file.f_inode".into())
        };
        if let Some(why) = &files_unavailable {
            info!("audit: {AUDIT_FILES_PROGRAM} unavailable ({why}): socket owners come from /proc");
        }
        Ok(AuditWalker { ebpf, files_unavailable })
    }

    /// Every socket file some process holds, as (socket inode, process id), from one run of the
    /// `audit_files` iterator (`iter/task_file`, 5.8+) over all tasks; `None` when that iterator
    /// is unavailable here.
    pub fn socket_files(&mut self) -> Result<Option<Vec<(u64, u32)>>, AttachError> {
        if self.files_unavailable.is_some() {
            return Ok(None);
        }
        let buf = read_iter(&mut self.ebpf, AUDIT_FILES_PROGRAM, AUDIT_FILE_RECORD_SIZE).map_err(AttachError::Audit)?;
        let ino = |c: &[u8]| u64::from_ne_bytes(c[..8].try_into().expect("8 bytes"));
        let tgid = |c: &[u8]| u32::from_ne_bytes(c[8..12].try_into().expect("4 bytes"));
        Ok(Some(buf.chunks_exact(AUDIT_FILE_RECORD_SIZE).map(|c| (ino(c), tgid(c))).collect()))
    }

    /// Walks every TCP socket of each of `namespaces` (see [`netns_paths`]), handing each record
    /// to `sink` as it is read (nothing is kept here); returns the inode numbers of the namespaces
    /// walked. Within a namespace, listeners come first (the kernel walks its listening hash
    /// before the established one).
    pub fn walk(&mut self, namespaces: &[PathBuf], mut sink: impl FnMut(&AuditRecord)) -> Result<Vec<u32>, AttachError> {
        each_netns(namespaces, AttachError::Audit, || self.walk_here(&mut sink))
    }

    /// Runs the iterator in the calling thread's namespace. Reads in fixed chunks: memory does not
    /// grow with the number of sockets.
    fn walk_here(&mut self, sink: &mut impl FnMut(&AuditRecord)) -> Result<(), AttachError> {
        let mut file = open_iter(&mut self.ebpf, AUDIT_PROGRAM).map_err(AttachError::Audit)?;
        let mut buf = vec![0u8; 64 * AUDIT_RECORD_SIZE * 8];
        let mut filled = 0;
        loop {
            let n = file
                .read(&mut buf[filled..])
                .map_err(|e| AttachError::Audit(format!("reading the audit iterator: {e}")))?;
            if n == 0 {
                break;
            }
            filled += n;
            let whole = filled - filled % AUDIT_RECORD_SIZE;
            buf[..whole].chunks_exact(AUDIT_RECORD_SIZE).for_each(|c| sink(&audit_record_from(c)));
            buf.copy_within(whole..filled, 0);
            filled -= whole;
        }
        if filled != 0 {
            return Err(AttachError::Audit(format!(
                "the audit iterator ended with {filled} bytes, less than a record ({AUDIT_RECORD_SIZE})"
            )));
        }
        Ok(())
    }
}

/// The programs of the `audit` walk: sockets, and the socket files processes hold.
const AUDIT_PROGRAM: &str = "audit_tcp";
const AUDIT_FILES_PROGRAM: &str = "audit_files";

/// Loads the `iter` program `program` over `target`; the reason when it cannot be.
fn load_iter(ebpf: &mut Ebpf, program: &str, target: &str, btf: &Btf) -> Result<(), String> {
    let p: &mut Iter = ebpf
        .program_mut(program)
        .ok_or_else(|| format!("program {program} missing from the object"))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| e.to_string())?;
    p.load(target, btf).map_err(|e| format!("loading {program}: {}", error_chain(&e)))
}

/// One record from its bytes (`chunk` holds exactly [`AUDIT_RECORD_SIZE`] bytes).
fn audit_record_from(chunk: &[u8]) -> AuditRecord {
    // SAFETY: AuditRecord is plain `#[repr(C)]` integers (no invalid bit patterns) and `chunk`
    // has its size; the read is unaligned.
    unsafe { std::ptr::read_unaligned(chunk.as_ptr() as *const AuditRecord) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_layout() {
        let mi = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                  32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n\
                  41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(parse_cgroup2_mount(mi), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        assert_eq!(parse_cgroup2_mount("31 23 0:28 / /x rw - tmpfs tmpfs rw\n"), None);
    }

    #[test]
    fn attach_method_restricts_only_hooks_with_alternatives() {
        let timer = PLAN.iter().find(|h| h.name == "keepalive_timer").unwrap();
        let answer = PLAN.iter().find(|h| h.name == "probe_answer").unwrap();
        let kinds = |h, m| strategies_for(h, m).iter().map(|s| s.kind()).collect::<Vec<_>>();
        assert_eq!(kinds(timer, Method::Auto), ["fentry", "kprobe", "tracepoint", "tracepoint", "tracepoint"]);
        assert_eq!(kinds(timer, Method::Kprobe), ["kprobe"]);
        assert_eq!(kinds(timer, Method::Tracepoint), ["tracepoint", "tracepoint", "tracepoint"]);
        let typed_first = strategies_for(timer, Method::Tracepoint);
        assert!(matches!(typed_first[0], Strategy::TypedBtfTracepoints(_)), "{typed_first:?}");
        assert_eq!(kinds(answer, Method::Fentry), ["tracepoint", "tracepoint", "tracepoint"]);
        let raw = strategies_for(timer, Method::RawTracepoint);
        assert!(matches!(raw.as_slice(), [Strategy::RawTracepoints(_)]), "{raw:?}");
        let snapshot = PLAN.iter().find(|h| h.name == "snapshot").unwrap();
        assert_eq!(kinds(snapshot, Method::RawTracepoint), ["iterator"]);
        let setsockopt = PLAN.iter().find(|h| h.name == "setsockopt").unwrap();
        assert_eq!(kinds(setsockopt, Method::Tracepoint), ["cgroup"]);
    }

    #[test]
    fn accept_owner_is_optional_and_needs_its_offsets() {
        let hook = PLAN.iter().find(|h| h.name == ACCEPT_OWNER).unwrap();
        assert!(matches!(hook.strategies, [Strategy::Tracepoints(_)]));
        assert_eq!(hook.strategies[0].describe(), "tp/syscalls/sys_exit_accept4 + tp/syscalls/sys_exit_accept");
        assert_eq!(hook.strategies[0].programs(), ["sys_exit_accept4", "sys_exit_accept"]);
        // Forcing a method keeps the hook's only strategy.
        assert_eq!(strategies_for(hook, Method::Fentry).len(), 1);
        assert_eq!(strategies_for(hook, Method::RawTracepoint).len(), 1);
        let mut o = Offsets::default();
        assert!(unmet(hook, &o).is_some());
        let f = keepalive_common::Field::new(8, 8);
        (o.task_files, o.files_fdt, o.fdt_max_fds, o.fdt_fd) = (f, f, keepalive_common::Field::new(0, 4), f);
        (o.file_private_data, o.socket_sk, o.socket_file) = (f, f, f);
        assert!(unmet(hook, &o).is_some(), "syscall_trace_exit.ret missing");
        o.sys_exit_ret = keepalive_common::Field::new(16, 8);
        assert_eq!(unmet(hook, &o), None);
        let timer = PLAN.iter().find(|h| h.name == "keepalive_timer").unwrap();
        assert_eq!(unmet(timer, &Offsets::default()), None);
    }

    #[test]
    fn every_hook_has_a_strategy_and_unique_name() {
        let mut names: Vec<_> = PLAN.iter().map(|h| h.name).collect();
        assert!(PLAN.iter().all(|h| !h.strategies.is_empty()));
        names.sort();
        names.dedup();
        assert_eq!(names.len(), PLAN.len());
    }
}
