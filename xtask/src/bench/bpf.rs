//! The little of the `bpf(2)` syscall the bench needs, without the eBPF toolchain:
//! - turning on run-time statistics (`BPF_ENABLE_STATS`, undone when the fd closes; the
//!   `kernel.bpf_stats_enabled` sysctl is left as it was),
//! - reading the agent's programs, links and maps from `/proc/<pid>/fdinfo` (so only what the
//!   agent process holds is ever looked at) and their names by id,
//! - loading the reference programs that give the floor: an empty raw tracepoint program, one that
//!   only does the agent's first filter step (read `timer->function` with a helper, compare), and
//!   the same filters as BTF-typed (`tp_btf`) programs with direct loads. They are hand-assembled
//!   (a dozen instructions), attached with `BPF_RAW_TRACEPOINT_OPEN`, never pinned, and detached
//!   when their fds close. The agent's other two kinds of hook get an empty reference program as
//!   well: a `cgroup/setsockopt` program returning 1 (the call goes on untouched) on the bench's own
//!   cgroup through a BPF link, and a tracepoint program on the classic (perf) syscall tracepoints
//!   through a perf event.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs;
use std::path::Path;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};

use anyhow::{anyhow, bail, Context as _, Result};

const BPF_MAP_CREATE: i64 = 0;
const BPF_MAP_LOOKUP_ELEM: i64 = 1;
const BPF_PROG_LOAD: i64 = 5;
const BPF_PROG_GET_FD_BY_ID: i64 = 13;
const BPF_MAP_GET_FD_BY_ID: i64 = 14;
const BPF_OBJ_GET_INFO_BY_FD: i64 = 15;
const BPF_RAW_TRACEPOINT_OPEN: i64 = 17;
const BPF_ENABLE_STATS: i64 = 32;
const BPF_LINK_CREATE: i64 = 28;
const BPF_PROG_TYPE_TRACEPOINT: u32 = 5;
const BPF_PROG_TYPE_CGROUP_SOCKOPT: u32 = 25;
/// `attach_type` (and `expected_attach_type`) of a cgroup setsockopt program.
const BPF_CGROUP_SETSOCKOPT: u32 = 22;
const BPF_STATS_RUN_TIME: u32 = 0;
const BPF_PROG_TYPE_RAW_TRACEPOINT: u32 = 17;
const BPF_PROG_TYPE_TRACING: u32 = 26;
/// `expected_attach_type` of a BTF-typed raw tracepoint (`tp_btf`).
const BPF_TRACE_RAW_TP: u32 = 23;
/// `bpf_probe_read_kernel` helper id.
const BPF_FUNC_PROBE_READ_KERNEL: i32 = 113;
/// `bpf_skc_to_tcp_sock` helper id.
const BPF_FUNC_SKC_TO_TCP_SOCK: i32 = 137;
/// `bpf_map_lookup_elem` helper id.
const BPF_FUNC_MAP_LOOKUP_ELEM: i32 = 1;
const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
/// `src_reg` of a `ld_imm64` that loads a map by fd.
const BPF_PSEUDO_MAP_FD: u8 = 1;

/// A zeroed `union bpf_attr` large enough for every command used here.
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Attr {
        Attr([0; 128])
    }
    fn u32(&mut self, off: usize, v: u32) -> &mut Self {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64(&mut self, off: usize, v: u64) -> &mut Self {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
}

fn sys_bpf(cmd: i64, attr: &mut Attr) -> std::io::Result<i64> {
    // SAFETY: `attr` is a valid, fully initialised buffer of the size passed.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.0.as_mut_ptr(), attr.0.len() as u32) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn owned(fd: i64) -> OwnedFd {
    // SAFETY: the kernel just returned this new fd; nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(fd as RawFd) }
}

/// Run-time statistics of BPF programs, on while this value lives.
pub enum Stats {
    /// `BPF_ENABLE_STATS`: on while the fd is open (also undone if the bench dies).
    Fd(#[allow(dead_code)] OwnedFd),
    /// Fallback: the sysctl, set to 1 and restored to `previous` on drop.
    Sysctl { previous: String },
    /// Already on (sysctl was 1): nothing to undo.
    AlreadyOn,
}

const STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl Stats {
    pub fn enable() -> Result<Stats> {
        let previous = fs::read_to_string(STATS_SYSCTL).context(STATS_SYSCTL)?.trim().to_string();
        if previous == "1" {
            return Ok(Stats::AlreadyOn);
        }
        let mut a = Attr::new();
        a.u32(0, BPF_STATS_RUN_TIME);
        match sys_bpf(BPF_ENABLE_STATS, &mut a) {
            Ok(fd) => Ok(Stats::Fd(owned(fd))),
            Err(e) => {
                log::info!("BPF_ENABLE_STATS failed ({e}); using the {STATS_SYSCTL} sysctl");
                fs::write(STATS_SYSCTL, "1").context("enabling kernel.bpf_stats_enabled")?;
                Ok(Stats::Sysctl { previous })
            }
        }
    }

    pub fn how(&self) -> &'static str {
        match self {
            Stats::Fd(_) => "BPF_ENABLE_STATS fd (kernel.bpf_stats_enabled untouched)",
            Stats::Sysctl { .. } => "kernel.bpf_stats_enabled=1, restored afterwards",
            Stats::AlreadyOn => "kernel.bpf_stats_enabled was already 1",
        }
    }
}

impl Drop for Stats {
    fn drop(&mut self) {
        if let Stats::Sysctl { previous } = self {
            if let Err(e) = fs::write(STATS_SYSCTL, previous.as_bytes()) {
                log::warn!("restoring kernel.bpf_stats_enabled to {previous}: {e}");
            }
        }
    }
}

/// `key:\tvalue` lines of an fdinfo file.
fn fdinfo(pid: u32, fd: &str) -> Option<BTreeMap<String, String>> {
    let text = fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).ok()?;
    Some(
        text.lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect(),
    )
}

fn num(m: &BTreeMap<String, String>, k: &str) -> u64 {
    m.get(k).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// Counters of one program at one moment.
#[derive(Debug, Clone, Default)]
pub struct ProgSample {
    pub id: u32,
    pub name: String,
    /// Where it is attached (`raw_tp/timer_expire_entry`, `cgroup`...), from the process's links.
    pub attach: String,
    pub run_time_ns: u64,
    pub run_cnt: u64,
}

/// One map the agent holds.
#[derive(Debug, Clone, Default)]
pub struct MapSample {
    pub name: String,
    pub map_type: u32,
    pub key_size: u64,
    pub value_size: u64,
    pub max_entries: u64,
    /// Kernel memory charged for the map (fdinfo `memlock`).
    pub memlock: u64,
}

/// BPF objects held by process `pid`, through its own file descriptors.
#[derive(Debug, Clone, Default)]
pub struct ProcBpf {
    pub progs: Vec<ProgSample>,
    pub maps: Vec<MapSample>,
}

/// A link's type, tracepoint name (if any) and attach type, from its fdinfo.
type LinkInfo = (String, Option<String>, Option<String>);

pub fn process_bpf(pid: u32) -> Result<ProcBpf> {
    let dir = format!("/proc/{pid}/fd");
    let mut progs: BTreeMap<u32, ProgSample> = BTreeMap::new();
    let mut attach: BTreeMap<u32, Vec<LinkInfo>> = BTreeMap::new();
    let mut types: BTreeMap<u32, u64> = BTreeMap::new();
    let mut maps = Vec::new();
    for entry in fs::read_dir(&dir).with_context(|| dir.clone())? {
        let Ok(entry) = entry else { continue };
        let fd = entry.file_name().to_string_lossy().into_owned();
        let Ok(target) = fs::read_link(entry.path()) else { continue };
        let target = target.to_string_lossy();
        let Some(info) = fdinfo(pid, &fd) else { continue };
        match &*target {
            "anon_inode:bpf-prog" => {
                let id = num(&info, "prog_id") as u32;
                types.insert(id, num(&info, "prog_type"));
                progs.insert(
                    id,
                    ProgSample {
                        id,
                        name: prog_name(id).unwrap_or_default(),
                        attach: String::new(),
                        run_time_ns: num(&info, "run_time_ns"),
                        run_cnt: num(&info, "run_cnt"),
                    },
                );
            }
            "anon_inode:bpf_link" => {
                let id = num(&info, "prog_id") as u32;
                let kind = info.get("link_type").cloned().unwrap_or_default();
                attach.entry(id).or_default().push((kind, info.get("tp_name").cloned(), info.get("attach_type").cloned()));
            }
            "anon_inode:bpf-map" => {
                let id = num(&info, "map_id") as u32;
                maps.push(MapSample {
                    name: map_name(id).unwrap_or_default(),
                    map_type: num(&info, "map_type") as u32,
                    key_size: num(&info, "key_size"),
                    value_size: num(&info, "value_size"),
                    max_entries: num(&info, "max_entries"),
                    memlock: num(&info, "memlock"),
                });
            }
            _ => {}
        }
    }
    for (id, p) in progs.iter_mut() {
        if let Some(links) = attach.get(id) {
            let btf_typed = types.get(id) == Some(&u64::from(BPF_PROG_TYPE_TRACING));
            let names: Vec<String> = links
                .iter()
                .map(|(kind, tp, attach_type)| match (kind.as_str(), tp) {
                    // A BTF-typed tracepoint program (tp_btf) attaches through a raw tracepoint link.
                    ("raw_tracepoint", Some(tp)) if btf_typed => format!("tp_btf/{tp}"),
                    ("raw_tracepoint", Some(tp)) => format!("raw_tp/{tp}"),
                    ("tracing", _) => format!("tracing/{}", attach_type.as_deref().unwrap_or("?")),
                    (k, _) => k.to_string(),
                })
                .collect();
            p.attach = names.join(" + ");
        }
    }
    Ok(ProcBpf { progs: progs.into_values().collect(), maps })
}

/// `bpf_prog_info.name` (offset 64) or `bpf_map_info.name` (offset 24) of an object by id.
fn obj_name(get_cmd: i64, id: u32, name_off: usize) -> Result<String> {
    let mut a = Attr::new();
    a.u32(0, id);
    let fd = owned(sys_bpf(get_cmd, &mut a).with_context(|| format!("get fd by id {id}"))?);
    let mut info = [0u8; 256];
    let mut a = Attr::new();
    a.u32(0, fd.as_raw_fd() as u32).u32(4, info.len() as u32).u64(8, info.as_mut_ptr() as u64);
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut a).context("BPF_OBJ_GET_INFO_BY_FD")?;
    let raw = &info[name_off..name_off + 16];
    let end = raw.iter().position(|&b| b == 0).unwrap_or(16);
    Ok(String::from_utf8_lossy(&raw[..end]).into_owned())
}

fn prog_name(id: u32) -> Result<String> {
    obj_name(BPF_PROG_GET_FD_BY_ID, id, 64)
}

fn map_name(id: u32) -> Result<String> {
    obj_name(BPF_MAP_GET_FD_BY_ID, id, 24)
}

/// One eBPF instruction.
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn { code, regs: dst | (src << 4), off, imm }
}

/// `r0 = 0; exit`: the cheapest program there is.
const EMPTY: &[Insn] = &[insn(0xb7, 0, 0, 0, 0), insn(0x95, 0, 0, 0, 0)];

/// The agent's filter on a timer tracepoint, and nothing else: read the first argument (the
/// `timer_list`), `bpf_probe_read_kernel` 8 bytes at `function_off` (`timer_list.function`),
/// compare with a 64-bit constant, return.
fn read_filter(function_off: i32) -> Vec<Insn> {
    vec![
        insn(0x79, 6, 1, 0, 0),            // r6 = *(u64 *)(r1 + 0)        timer
        insn(0xbf, 1, 10, 0, 0),           // r1 = r10
        insn(0x07, 1, 0, 0, -8),           // r1 += -8                      dst on the stack
        insn(0xb7, 2, 0, 0, 8),            // r2 = 8                        size
        insn(0xbf, 3, 6, 0, 0),            // r3 = r6
        insn(0x07, 3, 0, 0, function_off), // r3 += off                     &timer->function
        insn(0x85, 0, 0, 0, BPF_FUNC_PROBE_READ_KERNEL),
        insn(0x79, 1, 10, -8, 0),          // r1 = *(u64 *)(r10 - 8)
        insn(0x18, 2, 0, 0, 0x1234_5678),  // r2 = 0xffffffff12345678 (ld_imm64, 2 slots)
        insn(0x00, 0, 0, 0, -1),
        insn(0x1d, 1, 2, 0, 0),            // if r1 == r2 goto +0
        insn(0xb7, 0, 0, 0, 0),            // r0 = 0
        insn(0x95, 0, 0, 0, 0),            // exit
    ]
}

/// The same filter in a BTF-typed tracepoint program (`tp_btf`): the argument is a typed pointer,
/// so `timer->function` is a plain load the verifier checks against BTF (no helper call).
/// `via_register`: add the offset through a register holding a known constant, as Rust programs
/// must (the offset comes from a read-only global, not an instruction immediate), instead of the
/// load's immediate offset that C with CO-RE produces.
fn btf_filter(function_off: i32, via_register: bool) -> Vec<Insn> {
    let mut v = vec![insn(0x79, 1, 1, 0, 0)]; // r1 = *(u64 *)(r1 + 0)   timer (typed)
    if via_register {
        v.push(insn(0xb7, 3, 0, 0, function_off)); // r3 = off
        v.push(insn(0x0f, 1, 3, 0, 0)); // r1 += r3
        v.push(insn(0x79, 1, 1, 0, 0)); // r1 = *(u64 *)(r1 + 0)
    } else {
        v.push(insn(0x79, 1, 1, function_off as i16, 0)); // r1 = *(u64 *)(r1 + off)
    }
    v.extend_from_slice(&[
        insn(0x18, 2, 0, 0, 0x1234_5678), // r2 = 0xffffffff12345678
        insn(0x00, 0, 0, 0, -1),
        insn(0x1d, 1, 2, 0, 0), // if r1 == r2 goto +0
        insn(0xb7, 0, 0, 0, 0), // r0 = 0
        insn(0x95, 0, 0, 0, 0), // exit
    ]);
    v
}

/// The agent's filter on `tcp_probe` as a `tp_btf` program: `bpf_skc_to_tcp_sock(sk)` (a type
/// check, no memory copy), then a direct load of `icsk_probes_out`.
fn btf_probe_filter(probes_out_off: i32) -> Vec<Insn> {
    vec![
        insn(0x79, 1, 1, 0, 0), // r1 = *(u64 *)(r1 + 0)   sk (typed)
        insn(0x85, 0, 0, 0, BPF_FUNC_SKC_TO_TCP_SOCK),
        insn(0x15, 0, 0, 1, 0), // if r0 == 0 goto +1
        insn(0x71, 0, 0, probes_out_off as i16, 0), // r0 = *(u8 *)(r0 + off)
        insn(0xb7, 0, 0, 0, 0), // r0 = 0
        insn(0x95, 0, 0, 0, 0), // exit
    ]
}

/// Kernel BTF facts the reference programs need.
#[derive(Debug, Clone, Copy)]
pub struct KernelBtf {
    /// `offsetof(struct timer_list, function)`.
    pub timer_function_off: i32,
    /// `offsetof(struct inet_connection_sock, icsk_probes_out)` (also from `struct tcp_sock`,
    /// which starts with it).
    pub icsk_probes_out_off: i32,
}

fn member_offset(btf: &btf_rs::Btf, strukt: &str, member: &str) -> Result<i32> {
    let types = btf.resolve_types_by_name(strukt).map_err(|e| anyhow!("BTF {strukt}: {e}"))?;
    for t in types {
        if let btf_rs::Type::Struct(st) = t {
            for m in &st.members {
                if btf.resolve_name(m).map(|n| n == member).unwrap_or(false) {
                    return Ok((m.bit_offset() / 8) as i32);
                }
            }
        }
    }
    bail!("struct {strukt} has no member `{member}` in the kernel BTF")
}

impl KernelBtf {
    pub fn load() -> Result<KernelBtf> {
        let btf = btf_rs::Btf::from_file("/sys/kernel/btf/vmlinux").map_err(|e| anyhow!("reading kernel BTF: {e}"))?;
        Ok(KernelBtf {
            timer_function_off: member_offset(&btf, "timer_list", "function")?,
            icsk_probes_out_off: member_offset(&btf, "inet_connection_sock", "icsk_probes_out")?,
        })
    }
}

/// BTF id of the `btf_trace_<tracepoint>` typedef a `tp_btf` program attaches through.
fn tp_btf_id(tracepoint: &str) -> Result<u32> {
    let btf = btf_rs::Btf::from_file("/sys/kernel/btf/vmlinux").map_err(|e| anyhow!("reading kernel BTF: {e}"))?;
    let name = format!("btf_trace_{tracepoint}");
    btf.resolve_ids_by_name(&name)
        .map_err(|e| anyhow!("BTF {name}: {e}"))?
        .into_iter()
        .next()
        .ok_or_else(|| anyhow!("no BTF type {name}"))
}

/// A one-slot per-CPU counter map the counting programs increment.
pub struct Counter {
    fd: OwnedFd,
}

impl Counter {
    fn new() -> Result<Counter> {
        let mut a = Attr::new();
        a.u32(0, BPF_MAP_TYPE_PERCPU_ARRAY).u32(4, 4).u32(8, 8).u32(12, 1);
        Ok(Counter { fd: owned(sys_bpf(BPF_MAP_CREATE, &mut a).context("creating a counter map")?) })
    }

    /// Sum over CPUs.
    pub fn read(&self) -> Result<u64> {
        let ncpu = possible_cpus()?;
        let key = 0u32;
        let mut values = vec![0u64; ncpu];
        let mut a = Attr::new();
        a.u32(0, self.fd.as_raw_fd() as u32)
            .u64(8, &key as *const u32 as u64)
            .u64(16, values.as_mut_ptr() as u64);
        sys_bpf(BPF_MAP_LOOKUP_ELEM, &mut a).context("reading a counter map")?;
        Ok(values.iter().sum())
    }
}

/// Number of possible CPUs (`/sys/devices/system/cpu/possible`, e.g. `0-1`).
fn possible_cpus() -> Result<usize> {
    let text = fs::read_to_string("/sys/devices/system/cpu/possible").context("possible CPUs")?;
    let mut n = 0;
    for part in text.trim().split(',') {
        n += match part.split_once('-') {
            Some((a, b)) => b.parse::<usize>()? - a.parse::<usize>()? + 1,
            None => 1,
        };
    }
    Ok(n)
}

/// Addresses of the keep-alive timer functions (`tcp_keepalive_timer`, and
/// `icsk_keepalive_timer` where a kernel has it) from `/proc/kallsyms`.
pub fn keepalive_timer_addrs() -> Result<Vec<u64>> {
    let text = fs::read_to_string("/proc/kallsyms").context("/proc/kallsyms")?;
    let addrs: Vec<u64> = text
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let addr = f.next()?;
            let _kind = f.next()?;
            let name = f.next()?;
            matches!(name, "tcp_keepalive_timer" | "icsk_keepalive_timer")
                .then(|| u64::from_str_radix(addr, 16).ok())
                .flatten()
        })
        .filter(|&a| a != 0)
        .collect();
    if addrs.is_empty() {
        bail!("no keep-alive timer function in /proc/kallsyms (addresses hidden?)");
    }
    Ok(addrs)
}

fn ld_imm64(dst: u8, src: u8, v: u64) -> [Insn; 2] {
    [insn(0x18, dst, src, 0, v as u32 as i32), insn(0x00, 0, 0, 0, (v >> 32) as u32 as i32)]
}

/// `tp_btf` on `timer_expire_entry`: counts keep-alive timer expiries (function is one of `addrs`).
fn ka_count(function_off: i32, addrs: &[u64], map_fd: RawFd) -> Vec<Insn> {
    let a1 = addrs[0];
    let a2 = *addrs.get(1).unwrap_or(&a1);
    let mut v = vec![
        insn(0x79, 6, 1, 0, 0),                  // 0: r6 = timer (typed)
        insn(0x79, 2, 6, function_off as i16, 0), // 1: r2 = timer->function
    ];
    v.extend(ld_imm64(3, 0, a1)); // 2-3
    v.push(insn(0x1d, 2, 3, 3, 0)); // 4: if r2 == r3 goto 8
    v.extend(ld_imm64(3, 0, a2)); // 5-6
    v.push(insn(0x5d, 2, 3, 10, 0)); // 7: if r2 != r3 goto 18
    v.extend(count_tail(map_fd)); // 8..19
    v
}

/// `tp_btf` on `tcp_probe`: counts segments received while keep-alive probes are out (answers).
fn ack_count(probes_out_off: i32, map_fd: RawFd) -> Vec<Insn> {
    let mut v = vec![
        insn(0x79, 1, 1, 0, 0), // 0: r1 = sk (typed)
        insn(0x85, 0, 0, 0, BPF_FUNC_SKC_TO_TCP_SOCK), // 1
        insn(0x15, 0, 0, 12, 0), // 2: if r0 == 0 goto 15
        insn(0x71, 2, 0, probes_out_off as i16, 0), // 3: r2 = icsk_probes_out
        insn(0x15, 2, 0, 10, 0), // 4: if r2 == 0 goto 15
    ];
    v.extend(count_tail(map_fd)); // 5..16
    v
}

/// Increments slot 0 of the per-CPU counter, returns 0 (12 instructions; the last two are the
/// `r0 = 0; exit` that the callers' jumps land on).
fn count_tail(map_fd: RawFd) -> Vec<Insn> {
    let mut v = vec![
        insn(0x62, 10, 0, -4, 0), // *(u32 *)(r10 - 4) = 0   key
        insn(0xbf, 2, 10, 0, 0),  // r2 = r10
        insn(0x07, 2, 0, 0, -4),  // r2 += -4
    ];
    v.extend(ld_imm64(1, BPF_PSEUDO_MAP_FD, map_fd as u64)); // r1 = map
    v.extend([
        insn(0x85, 0, 0, 0, BPF_FUNC_MAP_LOOKUP_ELEM),
        insn(0x15, 0, 0, 3, 0), // if r0 == 0 goto exit
        insn(0x79, 1, 0, 0, 0), // r1 = *(u64 *)r0
        insn(0x07, 1, 0, 0, 1), // r1 += 1
        insn(0x7b, 0, 1, 0, 0), // *(u64 *)r0 = r1
        insn(0xb7, 0, 0, 0, 0), // r0 = 0
        insn(0x95, 0, 0, 0, 0), // exit
    ]);
    v
}

/// A counting program attached to a tracepoint; detached on drop.
pub struct CountProg {
    counter: Counter,
    _prog: OwnedFd,
    _link: OwnedFd,
}

/// What a [`CountProg`] counts.
#[derive(Debug, Clone, Copy)]
pub enum CountKind {
    /// Keep-alive timer expiries on the whole host (`timer_expire_entry`).
    KeepaliveTimers,
    /// Segments received while keep-alive probes are out: answers (`tcp_probe`).
    Answers,
}

impl CountProg {
    pub fn attach(kind: CountKind, kbtf: &KernelBtf) -> Result<CountProg> {
        let counter = Counter::new()?;
        let fd = counter.fd.as_raw_fd();
        let (tp, insns, name): (&str, Vec<Insn>, &[u8]) = match kind {
            CountKind::KeepaliveTimers => {
                ("timer_expire_entry", ka_count(kbtf.timer_function_off, &keepalive_timer_addrs()?, fd), b"kab_kacount")
            }
            CountKind::Answers => ("tcp_probe", ack_count(kbtf.icsk_probes_out_off, fd), b"kab_ackcount"),
        };
        let prog = load(&insns, name, Some(tp_btf_id(tp)?)).with_context(|| format!("loading the {kind:?} counter"))?;
        let mut a = Attr::new();
        a.u64(0, 0).u32(8, prog.as_raw_fd() as u32);
        let link = owned(sys_bpf(BPF_RAW_TRACEPOINT_OPEN, &mut a).with_context(|| format!("attaching the {kind:?} counter"))?);
        Ok(CountProg { counter, _prog: prog, _link: link })
    }

    pub fn count(&self) -> Result<u64> {
        self.counter.read()
    }
}

/// A reference program attached by the bench; detached on drop.
pub struct RefProg {
    pub label: String,
    /// Where it is attached, as [`process_bpf`] names the agent's programs there (`raw_tp/NAME`,
    /// `tp_btf/NAME`, `cgroup`, `perf`).
    attach: String,
    prog: OwnedFd,
    /// The BPF link, or for a classic tracepoint the perf event the program is set on.
    _link: OwnedFd,
}

/// Which reference program.
#[derive(Debug, Clone, Copy)]
pub enum RefKind {
    Empty,
    /// Raw tracepoint: `bpf_probe_read_kernel` of `timer->function`, compare.
    ReadFilter,
    /// `tp_btf`: direct, BTF-checked load of `timer->function`, compare.
    BtfFilter,
    /// `tp_btf` on `tcp_probe`: `bpf_skc_to_tcp_sock`, direct load of `icsk_probes_out`.
    BtfProbeFilter,
}

impl RefProg {
    pub fn attach(kind: RefKind, tracepoint: &str, kbtf: &KernelBtf) -> Result<RefProg> {
        let insns = match kind {
            RefKind::Empty => EMPTY.to_vec(),
            RefKind::ReadFilter => read_filter(kbtf.timer_function_off),
            RefKind::BtfFilter => btf_filter(kbtf.timer_function_off, false),
            RefKind::BtfProbeFilter => btf_probe_filter(kbtf.icsk_probes_out_off),
        };
        let btf_id = match kind {
            RefKind::BtfFilter | RefKind::BtfProbeFilter => Some(tp_btf_id(tracepoint)?),
            _ => None,
        };
        let prog = load(&insns, kind_name(kind), btf_id).with_context(|| format!("loading the {kind:?} reference program"))?;
        let tp = CString::new(tracepoint).map_err(|_| anyhow!("bad tracepoint name"))?;
        let mut a = Attr::new();
        // A tp_btf program attaches to the tracepoint it was loaded for: no name.
        a.u64(0, if btf_id.is_some() { 0 } else { tp.as_ptr() as u64 }).u32(8, prog.as_raw_fd() as u32);
        let link = owned(
            sys_bpf(BPF_RAW_TRACEPOINT_OPEN, &mut a)
                .with_context(|| format!("attaching the {kind:?} reference program to {tracepoint}"))?,
        );
        let label = match kind {
            RefKind::Empty => "empty program (floor)".to_string(),
            RefKind::ReadFilter => "read + compare only (floor of the timer filter)".to_string(),
            RefKind::BtfFilter => "tp_btf direct load + compare (the filter without a helper call)".to_string(),
            RefKind::BtfProbeFilter => "tp_btf skc_to_tcp_sock + direct load of icsk_probes_out".to_string(),
        };
        let attach = format!("{}/{tracepoint}", if btf_id.is_some() { "tp_btf" } else { "raw_tp" });
        Ok(RefProg { label, attach, prog, _link: link })
    }

    /// An empty `cgroup/setsockopt` program (`r0 = 1`: the call goes on as if it were not there) on
    /// `cgroup` through a BPF link (5.7+): like the agent's, it joins the programs attached there
    /// and runs after them. The floor of the agent's `setsockopt` program on the same cgroup.
    pub fn attach_cgroup_setsockopt(cgroup: &Path) -> Result<RefProg> {
        let insns = [insn(0xb7, 0, 0, 0, 1), insn(0x95, 0, 0, 0, 0)];
        let prog = load_as(&insns, b"kab_empty_sopt", BPF_PROG_TYPE_CGROUP_SOCKOPT, BPF_CGROUP_SETSOCKOPT, None)
            .context("loading the empty cgroup/setsockopt reference program")?;
        let dir = fs::File::open(cgroup).with_context(|| format!("opening {}", cgroup.display()))?;
        let mut a = Attr::new();
        a.u32(0, prog.as_raw_fd() as u32).u32(4, dir.as_raw_fd() as u32).u32(8, BPF_CGROUP_SETSOCKOPT);
        let link = owned(
            sys_bpf(BPF_LINK_CREATE, &mut a)
                .with_context(|| format!("attaching the empty cgroup/setsockopt reference program to {}", cgroup.display()))?,
        );
        Ok(RefProg { label: "empty program (floor)".into(), attach: "cgroup".into(), prog, _link: link })
    }

    /// An empty program on the classic (perf) tracepoint `category:name`, set on a perf event of
    /// that tracepoint (`PERF_EVENT_IOC_SET_BPF`; the program runs on every CPU, whichever CPU the
    /// event was opened on). The floor of the agent's programs on classic tracepoints.
    pub fn attach_perf_tracepoint(category: &str, name: &str) -> Result<RefProg> {
        let id = tracepoint_id(category, name)?;
        let prog = load_as(EMPTY, b"kab_empty_perf", BPF_PROG_TYPE_TRACEPOINT, 0, None)
            .with_context(|| format!("loading the empty reference program for {category}:{name}"))?;
        let event = perf_tracepoint_event(id).with_context(|| format!("perf_event_open of {category}:{name}"))?;
        // SAFETY: an ioctl on the perf event fd just opened, with a program fd as its argument.
        if unsafe { libc::ioctl(event.as_raw_fd(), PERF_EVENT_IOC_SET_BPF, prog.as_raw_fd()) } < 0 {
            bail!("PERF_EVENT_IOC_SET_BPF on {category}:{name}: {}", std::io::Error::last_os_error());
        }
        Ok(RefProg { label: "empty program (floor)".into(), attach: "perf".into(), prog, _link: event })
    }
}

/// `_IOW('$', 8, __u32)`.
const PERF_EVENT_IOC_SET_BPF: libc::c_ulong = 0x4004_2408;
/// `perf_event_open` flag: close-on-exec.
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;

/// The id of tracepoint `category:name`, from tracefs (mounted where the kernel puts it, or under
/// debugfs).
fn tracepoint_id(category: &str, name: &str) -> Result<u64> {
    let paths = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"].map(|d| format!("{d}/events/{category}/{name}/id"));
    let text = paths
        .iter()
        .find_map(|p| fs::read_to_string(p).ok())
        .with_context(|| format!("no tracepoint id at {} (tracefs not mounted?)", paths.join(" or ")))?;
    text.trim().parse().with_context(|| format!("tracepoint id of {category}:{name}: {text:?}"))
}

/// A perf event counting tracepoint `id` on CPU 0 for every process, enabled, one sample per hit
/// (what a BPF program on a classic tracepoint is set on).
fn perf_tracepoint_event(id: u64) -> Result<OwnedFd> {
    // struct perf_event_attr, first version (64 bytes): type, size, config, sample_period,
    // sample_type, read_format, flags, wakeup_events.
    let mut attr = Attr::new();
    attr.u32(0, 2 /* PERF_TYPE_TRACEPOINT */)
        .u32(4, 64)
        .u64(8, id)
        .u64(16, 1)
        .u64(24, 1 << 10 /* PERF_SAMPLE_RAW */)
        .u32(48, 1);
    // SAFETY: a zeroed attr of the size it declares; pid -1, cpu 0, no group, close-on-exec.
    let fd = unsafe {
        libc::syscall(libc::SYS_perf_event_open, attr.0.as_ptr(), -1 as libc::pid_t, 0, -1, PERF_FLAG_FD_CLOEXEC)
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(owned(fd))
}

fn kind_name(kind: RefKind) -> &'static [u8] {
    match kind {
        RefKind::Empty => b"kab_empty",
        RefKind::ReadFilter => b"kab_readfilter",
        RefKind::BtfFilter => b"kab_btffilter",
        RefKind::BtfProbeFilter => b"kab_btfprobe",
    }
}

/// Loads a program; raw tracepoint, or `tp_btf` for the tracepoint whose typedef is `btf_id`.
fn load(insns: &[Insn], name: &[u8], btf_id: Option<u32>) -> Result<OwnedFd> {
    match btf_id {
        Some(_) => load_as(insns, name, BPF_PROG_TYPE_TRACING, BPF_TRACE_RAW_TP, btf_id),
        None => load_as(insns, name, BPF_PROG_TYPE_RAW_TRACEPOINT, 0, None),
    }
}

/// Loads a program of `prog_type` (with its `expected_attach_type`, and `attach_btf_id` if any).
fn load_as(insns: &[Insn], name: &[u8], prog_type: u32, expected_attach: u32, btf_id: Option<u32>) -> Result<OwnedFd> {
    let mut bytes = Vec::with_capacity(insns.len() * 8);
    for i in insns {
        bytes.push(i.code);
        bytes.push(i.regs);
        bytes.extend_from_slice(&i.off.to_le_bytes());
        bytes.extend_from_slice(&i.imm.to_le_bytes());
    }
    let license = CString::new("GPL").expect("no NUL");
    let mut log = vec![0u8; 64 * 1024];
    let mut a = Attr::new();
    a.u32(0, prog_type)
        .u32(4, insns.len() as u32)
        .u64(8, bytes.as_ptr() as u64)
        .u64(16, license.as_ptr() as u64)
        .u32(24, 1)
        .u32(28, log.len() as u32)
        .u64(32, log.as_mut_ptr() as u64);
    a.0[48..48 + name.len().min(15)].copy_from_slice(&name[..name.len().min(15)]);
    a.u32(68, expected_attach);
    if let Some(id) = btf_id {
        a.u32(108, id);
    }
    match sys_bpf(BPF_PROG_LOAD, &mut a) {
        Ok(fd) => Ok(owned(fd)),
        Err(e) => {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            let text = String::from_utf8_lossy(&log[..end]);
            let tail: Vec<&str> = text.lines().rev().take(4).collect();
            bail!("{e}; verifier: {}", tail.into_iter().rev().collect::<Vec<_>>().join(" / "))
        }
    }
}

/// Whether the verifier takes the `tp_btf` filter with the offset added through a register (what a
/// Rust program reading offsets from a global produces). `Err` carries the verifier's answer.
pub fn btf_register_offset_accepted(tracepoint: &str, kbtf: &KernelBtf) -> Result<()> {
    let id = tp_btf_id(tracepoint)?;
    load(&btf_filter(kbtf.timer_function_off, true), b"kab_btfreg", Some(id)).map(drop)
}

impl RefProg {
    /// Current counters, from this process's own fdinfo.
    pub fn sample(&self) -> ProgSample {
        let info = fdinfo(std::process::id(), &self.prog.as_raw_fd().to_string()).unwrap_or_default();
        ProgSample {
            id: num(&info, "prog_id") as u32,
            name: self.label.clone(),
            attach: self.attach.clone(),
            run_time_ns: num(&info, "run_time_ns"),
            run_cnt: num(&info, "run_cnt"),
        }
    }
}

/// Per-program activity over a window: `after - before`, matched by program id.
#[derive(Debug, Clone)]
pub struct ProgDelta {
    pub name: String,
    pub attach: String,
    pub runs: u64,
    pub run_time_ns: u64,
}

impl ProgDelta {
    pub fn avg_ns(&self) -> Option<f64> {
        (self.runs > 0).then(|| self.run_time_ns as f64 / self.runs as f64)
    }
}

pub fn deltas(before: &[ProgSample], after: &[ProgSample]) -> Vec<ProgDelta> {
    after
        .iter()
        .map(|a| {
            let b = before.iter().find(|b| b.id == a.id);
            ProgDelta {
                name: a.name.clone(),
                attach: a.attach.clone(),
                runs: a.run_cnt - b.map_or(0, |b| b.run_cnt),
                run_time_ns: a.run_time_ns - b.map_or(0, |b| b.run_time_ns),
            }
        })
        .collect()
}

/// One of the agent's tracepoint programs, held by the bench through its own fd
/// (`BPF_PROG_GET_FD_BY_ID`), so that it outlives the agent's links and the bench can attach and
/// detach it itself.
struct Borrowed {
    prog: OwnedFd,
    /// Tracepoint name for a raw tracepoint program; `None` for `tp_btf` (attached to the
    /// tracepoint it was loaded for).
    raw_tp: Option<CString>,
    attach: String,
}

/// The agent's tracepoint programs (raw and BTF-typed), taken from an agent process the bench
/// started: the same verified code on the same tracepoints, attached and detached by the bench many
/// times a second (`BPF_RAW_TRACEPOINT_OPEN`, link fd closed to detach). Nothing is pinned; the
/// programs are freed when this value and the agent are gone.
pub struct AgentProgs {
    progs: Vec<Borrowed>,
    links: Vec<OwnedFd>,
}

impl AgentProgs {
    /// The programs process `pid` has attached to tracepoints (its links, as [`process_bpf`] reads
    /// them: `tp_btf/NAME` or `raw_tp/NAME`).
    pub fn borrow(pid: u32) -> Result<AgentProgs> {
        let mut progs = Vec::new();
        for p in process_bpf(pid)?.progs {
            for attach in p.attach.split(" + ") {
                let raw_tp = match attach.split_once('/') {
                    Some(("tp_btf", _)) => None,
                    Some(("raw_tp", tp)) => Some(CString::new(tp).map_err(|_| anyhow!("bad tracepoint name"))?),
                    _ => continue,
                };
                let mut a = Attr::new();
                a.u32(0, p.id);
                let prog = owned(sys_bpf(BPF_PROG_GET_FD_BY_ID, &mut a).with_context(|| format!("BPF_PROG_GET_FD_BY_ID {}", p.id))?);
                progs.push(Borrowed { prog, raw_tp, attach: attach.to_string() });
            }
        }
        if progs.is_empty() {
            bail!("process {pid} has no programs attached to tracepoints");
        }
        Ok(AgentProgs { progs, links: Vec::new() })
    }

    /// Where each program attaches (`tp_btf/tcp_probe`...).
    pub fn attach_points(&self) -> Vec<String> {
        self.progs.iter().map(|p| p.attach.clone()).collect()
    }

    /// Attaches every program `copies` times (no-op if attached). More than one copy multiplies the
    /// programs' cost on the tracepoints (each link is one more call), which makes it measurable
    /// against noise; the cost of one is then the slope.
    pub fn attach(&mut self, copies: usize) -> Result<()> {
        if !self.links.is_empty() {
            return Ok(());
        }
        for p in self.progs.iter().flat_map(|p| std::iter::repeat_n(p, copies)) {
            let mut a = Attr::new();
            a.u64(0, p.raw_tp.as_ref().map_or(0, |n| n.as_ptr() as u64)).u32(8, p.prog.as_raw_fd() as u32);
            match sys_bpf(BPF_RAW_TRACEPOINT_OPEN, &mut a) {
                Ok(fd) => self.links.push(owned(fd)),
                Err(e) => {
                    self.links.clear();
                    return Err(e).with_context(|| format!("attaching the agent's program to {}", p.attach));
                }
            }
        }
        Ok(())
    }

    /// Detaches every program.
    pub fn detach(&mut self) {
        self.links.clear();
    }
}
