//! Runs the kernel skipped: each program's `recursion_misses` counter.
//!
//! The kernel does not run a BPF program that would re-enter itself on the same CPU (for example
//! `inet_sock_set_state` fired from a softirq while the program is running in process context on
//! that CPU); it counts the skipped run in the program's `recursion_misses` (`struct
//! bpf_prog_info`, Linux 5.12+, shown by `bpftool prog show`). Every skipped run of one of our
//! programs may be a lost event, so the agent reads the counters and reports their increase per
//! event kind next to the ring-buffer losses.
//!
//! aya 0.14's `ProgramInfo` does not expose the field: [`read_prog_stats`] issues
//! `BPF_OBJ_GET_INFO_BY_FD` itself with a `bpf_prog_info` prefix that ends with it. A kernel with a
//! shorter `bpf_prog_info` copies less and says so in `info_len`; the counter is then unknown.

use std::{
    mem::{offset_of, size_of},
    os::fd::{AsRawFd as _, BorrowedFd},
};

use keepalive_common::{EventKind, EVENT_KINDS};

/// `BPF_OBJ_GET_INFO_BY_FD` (uapi `enum bpf_cmd`).
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

/// The start of uapi `struct bpf_prog_info`, up to and including `recursion_misses` (fields are
/// only ever appended to it, so this prefix is stable ABI).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct ProgInfoPrefix {
    pub type_: u32,
    pub id: u32,
    pub tag: [u8; 8],
    pub jited_prog_len: u32,
    pub xlated_prog_len: u32,
    pub jited_prog_insns: u64,
    pub xlated_prog_insns: u64,
    pub load_time: u64,
    pub created_by_uid: u32,
    pub nr_map_ids: u32,
    pub map_ids: u64,
    pub name: [u8; 16],
    pub ifindex: u32,
    /// `gpl_compatible:1` and padding.
    pub bitfield: u32,
    pub netns_dev: u64,
    pub netns_ino: u64,
    pub nr_jited_ksyms: u32,
    pub nr_jited_func_lens: u32,
    pub jited_ksyms: u64,
    pub jited_func_lens: u64,
    pub btf_id: u32,
    pub func_info_rec_size: u32,
    pub func_info: u64,
    pub nr_func_info: u32,
    pub nr_line_info: u32,
    pub line_info: u64,
    pub jited_line_info: u64,
    pub nr_jited_line_info: u32,
    pub line_info_rec_size: u32,
    pub jited_line_info_rec_size: u32,
    pub nr_prog_tags: u32,
    pub prog_tags: u64,
    /// Linux 5.1+, with `kernel.bpf_stats_enabled`.
    pub run_time_ns: u64,
    /// Linux 5.1+, with `kernel.bpf_stats_enabled`.
    pub run_cnt: u64,
    /// Linux 5.12+.
    pub recursion_misses: u64,
}

/// `bpf_attr` for `BPF_OBJ_GET_INFO_BY_FD` (the `info` member of the union).
#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// What one program's info says about its runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProgStats {
    /// Kernel program id (as `bpftool prog show` lists it).
    pub id: u32,
    /// Runs skipped because the program was already running on that CPU; `None` before Linux 5.12.
    pub recursion_misses: Option<u64>,
}

/// Reading a program's info failed.
#[derive(Debug, thiserror::Error)]
#[error("bpf(BPF_OBJ_GET_INFO_BY_FD, fd {fd}, info_len {len}): {source}")]
pub struct ProgStatsError {
    pub fd: i32,
    pub len: usize,
    #[source]
    pub source: std::io::Error,
}

/// The program stats of `info` when the kernel filled `info_len` bytes of it.
pub fn parse_prog_info(info: &ProgInfoPrefix, info_len: usize) -> ProgStats {
    let end = offset_of!(ProgInfoPrefix, recursion_misses) + size_of::<u64>();
    ProgStats { id: info.id, recursion_misses: (info_len >= end).then_some(info.recursion_misses) }
}

/// `BPF_OBJ_GET_INFO_BY_FD` on the program `fd`.
pub fn read_prog_stats(fd: BorrowedFd<'_>) -> Result<ProgStats, ProgStatsError> {
    let mut info = ProgInfoPrefix::default();
    let len = size_of::<ProgInfoPrefix>();
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: len as u32,
        info: &mut info as *mut ProgInfoPrefix as u64,
    };
    // SAFETY: `attr` points at a zeroed buffer of `info_len` bytes that outlives the call; the
    // kernel writes at most `info_len` bytes into it and updates `attr.info_len`.
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_OBJ_GET_INFO_BY_FD, &mut attr as *mut InfoAttr, size_of::<InfoAttr>())
    };
    if rc < 0 {
        return Err(ProgStatsError { fd: fd.as_raw_fd(), len, source: std::io::Error::last_os_error() });
    }
    Ok(parse_prog_info(&info, attr.info_len as usize))
}

/// The event kind a program of ours produces (its skipped runs are counted against it); `None`
/// for programs that produce no live events (the start-up snapshot iterator).
pub fn kind_of_program(name: &str) -> Option<EventKind> {
    Some(match name {
        n if n.contains("keepalive_timer") || n.contains("timer_expire") => EventKind::Timer,
        "btf_tcp_probe" | "btf_tcp_probe_cast" | "tcp_probe" => EventKind::Ack,
        n if n.contains("send_reset") || n.contains("active_reset") => EventKind::ResetSent,
        "tcp_receive_reset" => EventKind::ResetReceived,
        "inet_sk_error_report" => EventKind::Error,
        "btf_inet_sock_set_state" | "inet_sock_set_state" => EventKind::State,
        "btf_tcp_destroy_sock" | "tcp_destroy_sock" => EventKind::Destroy,
        n if n.starts_with("sys_exit_accept") => EventKind::Owner,
        n if n == "setsockopt" || n.contains("set_keepalive") || n.contains("tcp_setsockopt") => {
            EventKind::Setsockopt
        }
        _ => return None,
    })
}

/// Per event kind counts (index = [`EventKind`] value, 0 unused), as the `LOST` map holds them.
pub type KindCounts = [u64; EVENT_KINDS];

/// One watched program: its name, the kind of event it produces and its counter when the agent
/// attached it.
#[derive(Debug)]
struct Watched {
    name: &'static str,
    kind: EventKind,
    baseline: u64,
}

/// The skipped runs of the agent's programs since they were attached.
#[derive(Debug, Default)]
pub struct SkippedRuns {
    watched: Vec<Watched>,
    /// Why skipped runs are not counted: the kernel has no `recursion_misses` (before 5.12), or
    /// a program's info could not be read.
    unsupported: Option<String>,
}

/// Reads one program's stats by name: `None` when no such program is loaded.
pub trait ReadStats: Fn(&str) -> Option<Result<ProgStats, ProgStatsError>> {}
impl<F: Fn(&str) -> Option<Result<ProgStats, ProgStatsError>>> ReadStats for F {}

impl SkippedRuns {
    /// Takes the baseline of each of the programs `names` that produces events, read with `read`
    /// (e.g. [`read_prog_stats`] on the program's fd). Counting is off
    /// ([`SkippedRuns::unsupported`]) when some program's counter cannot be read.
    pub fn baseline(names: impl IntoIterator<Item = &'static str>, read: impl ReadStats) -> Self {
        let mut out = SkippedRuns::default();
        for name in names {
            let Some(kind) = kind_of_program(name) else { continue };
            match read(name) {
                Some(Ok(ProgStats { recursion_misses: Some(n), .. })) => {
                    out.watched.push(Watched { name, kind, baseline: n })
                }
                Some(Ok(_)) => {
                    out.unsupported = Some("bpf_prog_info has no recursion_misses before Linux 5.12".into());
                }
                Some(Err(e)) => out.unsupported = Some(format!("program {name}: {e}")),
                None => {}
            }
        }
        out
    }

    /// Why skipped runs are not counted, if they are not.
    pub fn unsupported(&self) -> Option<&str> {
        self.unsupported.as_deref()
    }

    /// Skipped runs since the baseline, per event kind, read with `read`. `Ok(None)` when they
    /// are not counted (see [`SkippedRuns::unsupported`]).
    pub fn counts(&self, read: impl ReadStats) -> Result<Option<KindCounts>, ProgStatsError> {
        if self.unsupported.is_some() {
            return Ok(None);
        }
        let mut out = [0u64; EVENT_KINDS];
        for w in &self.watched {
            let Some(stats) = read(w.name) else { continue };
            let now = stats?.recursion_misses.unwrap_or(w.baseline);
            out[w.kind as usize] += now.saturating_sub(w.baseline);
        }
        Ok(Some(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_matches_the_uapi_layout() {
        // Offsets of uapi struct bpf_prog_info (include/uapi/linux/bpf.h).
        assert_eq!(offset_of!(ProgInfoPrefix, name), 64);
        assert_eq!(offset_of!(ProgInfoPrefix, netns_dev), 88);
        assert_eq!(offset_of!(ProgInfoPrefix, btf_id), 128);
        assert_eq!(offset_of!(ProgInfoPrefix, prog_tags), 184);
        assert_eq!(offset_of!(ProgInfoPrefix, run_time_ns), 192);
        assert_eq!(offset_of!(ProgInfoPrefix, run_cnt), 200);
        assert_eq!(offset_of!(ProgInfoPrefix, recursion_misses), 208);
        assert_eq!(size_of::<ProgInfoPrefix>(), 216);
        assert_eq!(size_of::<InfoAttr>(), 16);
    }

    #[test]
    fn recursion_misses_only_when_the_kernel_filled_it() {
        let info = ProgInfoPrefix { id: 7, recursion_misses: 5848, ..Default::default() };
        assert_eq!(parse_prog_info(&info, 216), ProgStats { id: 7, recursion_misses: Some(5848) });
        // A newer kernel's longer struct is truncated to what we asked for: info_len is ours.
        assert_eq!(parse_prog_info(&info, 216).recursion_misses, Some(5848));
        // 5.1 .. 5.11: bpf_prog_info ends with run_cnt.
        assert_eq!(parse_prog_info(&info, 208), ProgStats { id: 7, recursion_misses: None });
        assert_eq!(parse_prog_info(&info, 0).recursion_misses, None);
    }

    #[test]
    fn every_event_program_has_a_kind() {
        use crate::attach::{Strategy, PLAN};
        for hook in PLAN {
            for st in hook.strategies {
                for name in st.programs() {
                    let kind = kind_of_program(name);
                    if matches!(st, Strategy::Iter { .. }) {
                        assert_eq!(kind, None, "{name}");
                    } else {
                        assert!(kind.is_some(), "program {name} of hook {} has no event kind", hook.name);
                    }
                }
            }
        }
        assert_eq!(kind_of_program("inet_sock_set_state"), Some(EventKind::State));
        assert_eq!(kind_of_program("timer_expire_exit"), Some(EventKind::Timer));
        assert_eq!(kind_of_program("kretprobe_do_tcp_setsockopt"), Some(EventKind::Setsockopt));
        assert_eq!(kind_of_program("tcp_send_reset"), Some(EventKind::ResetSent));
    }

    #[test]
    fn reads_a_real_program_or_names_the_call() {
        // An fd that is not a BPF program: the error names the call and the fd.
        let f = std::fs::File::open("/dev/null").unwrap();
        use std::os::fd::AsFd as _;
        let err = read_prog_stats(f.as_fd()).unwrap_err();
        assert!(err.to_string().contains("BPF_OBJ_GET_INFO_BY_FD"), "{err}");
    }

    #[test]
    fn skipped_runs_since_the_baseline_summed_per_kind() {
        use std::cell::Cell;
        let misses = Cell::new([0u64, 5, 2, 0]);
        let index = |name: &str| ["inet_sock_set_state", "timer_expire_entry", "timer_expire_exit", "snapshot_tcp"].iter().position(|n| *n == name);
        let read = |name: &str| Some(Ok(ProgStats { id: 1, recursion_misses: Some(misses.get()[index(name)?]) }));
        let names = ["inet_sock_set_state", "timer_expire_entry", "timer_expire_exit", "snapshot_tcp", "not_loaded"];
        let read_loaded = |name: &str| if name == "not_loaded" { None } else { read(name) };
        let skipped = SkippedRuns::baseline(names, read_loaded);
        assert_eq!(skipped.unsupported(), None);
        assert_eq!(skipped.counts(read_loaded).unwrap(), Some([0; EVENT_KINDS]));
        misses.set([7, 6, 4, 9]);
        let counts = skipped.counts(read_loaded).unwrap().unwrap();
        assert_eq!(counts[EventKind::State as usize], 7);
        // Entry and exit programs of the timer add up; the snapshot iterator is not watched.
        assert_eq!(counts[EventKind::Timer as usize], 1 + 2);
        assert_eq!(counts.iter().sum::<u64>(), 10);
        // A failed read is the caller's to report.
        let failing = |_: &str| Some(Err(ProgStatsError { fd: 3, len: 216, source: std::io::Error::from_raw_os_error(libc::EBADF) }));
        assert!(skipped.counts(failing).is_err());
    }

    #[test]
    fn not_counted_without_the_field_or_on_error() {
        let old_kernel = |_: &str| Some(Ok(ProgStats { id: 1, recursion_misses: None }));
        let s = SkippedRuns::baseline(["inet_sock_set_state"], old_kernel);
        assert!(s.unsupported().unwrap().contains("5.12"), "{:?}", s.unsupported());
        assert_eq!(s.counts(old_kernel).unwrap(), None);
        let failing = |_: &str| Some(Err(ProgStatsError { fd: 3, len: 216, source: std::io::Error::from_raw_os_error(libc::EPERM) }));
        let s = SkippedRuns::baseline(["tcp_destroy_sock"], failing);
        assert!(s.unsupported().unwrap().contains("BPF_OBJ_GET_INFO_BY_FD"), "{:?}", s.unsupported());
    }
}
