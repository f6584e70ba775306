//! Processes holding the sockets found by the start-up snapshot.
//!
//! A socket that existed before the agent started has no event that names its process (its
//! `connect()` or `accept()` happened earlier). The snapshot records carry the inode number of the
//! socket's file; the agent scans `/proc/PID/fd` once, as `ss -p` does, for links `socket:[INODE]`
//! and puts an [`EventKind::Owner`] record in front of each snapshot record whose socket a process
//! holds, so that the engine opens the connection with its process.
//!
//! When several processes hold the socket (a server that forked after accepting, a descriptor
//! passed over a UNIX socket), the one with the lowest pid is reported: processes are scanned in
//! pid order and the scan stops once every wanted socket has a holder. `tid` is the pid (no thread
//! is known), `comm` is the process's name (`/proc/PID/comm`), `cgroup_id` the inode of its cgroup
//! v2 directory (0 when unknown). Processes that vanish or cannot be read during the scan are
//! skipped. The table built holds at most one entry per snapshot socket.
//!
//! The same scan names the owners of deaths of connections the agent does not follow
//! ([`DeathOwners`]): the kernel side reports such a death in softirq (a timer, a segment received)
//! with its socket's inode, while the application still holds the socket (it learns of the error
//! afterwards). The event loop holds the records from the first such death on, at most one scan
//! per [`DEATH_SCAN_INTERVAL`], and puts an `Owner` record in front of each death whose socket a
//! process still holds: the engine gives the death's records that process. A death in its owner's
//! process context carries the process already; a socket without a file has no owner.

use std::{
    collections::{HashMap, HashSet},
    ffi::OsStr,
    mem::offset_of,
    os::unix::{ffi::OsStrExt as _, fs::MetadataExt as _},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use keepalive_common::{EventKind, RawEvent, FLAG_PROCESS, RAW_EVENT_SIZE};
use log::{debug, info};

use crate::decode::{raw_from_bytes, raw_to_bytes};

/// A process found holding a socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    /// Process name, NUL-padded as the kernel's `comm`.
    pub comm: [u8; 16],
    /// Inode of the process's cgroup v2 directory (`bpf_get_current_cgroup_id()`), 0 if unknown.
    pub cgroup_id: u64,
}

/// What a scan of `/proc` found.
#[derive(Debug, Default)]
pub struct Scan {
    /// Socket inode → the holder with the lowest pid.
    pub holders: HashMap<u64, Holder>,
    /// Processes whose descriptors were read.
    pub processes: usize,
    /// Processes skipped because they vanished or their descriptors could not be read.
    pub skipped: usize,
}

/// The inode of a `/proc/PID/fd/N` link target of the form `socket:[INODE]`.
pub fn socket_inode(target: &[u8]) -> Option<u64> {
    let digits = target.strip_prefix(b"socket:[")?.strip_suffix(b"]")?;
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// A `/proc` entry name that is a pid.
fn pid_of(name: &OsStr) -> Option<u32> {
    let b = name.as_bytes();
    if b.is_empty() || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(b).ok()?.parse().ok()
}

/// A `/proc/PID/comm` line as a kernel `comm` (at most 15 bytes, NUL-padded).
pub fn comm_from(text: &[u8]) -> [u8; 16] {
    let text = text.strip_suffix(b"\n").unwrap_or(text);
    let mut comm = [0u8; 16];
    let n = text.len().min(15);
    comm[..n].copy_from_slice(&text[..n]);
    comm
}

/// The cgroup v2 path of a process, from its `/proc/PID/cgroup` (the `0::PATH` line).
pub fn cgroup2_path(text: &str) -> Option<&str> {
    text.lines().find_map(|l| l.strip_prefix("0::"))
}

/// Scans the processes under `proc_root` (normally `/proc`), in pid order, for descriptors that
/// are sockets with an inode in `wanted`. Stops once every wanted inode has a holder.
pub fn scan(proc_root: &Path, wanted: &HashSet<u64>, cgroup2: Option<&Path>) -> Scan {
    let mut out = Scan::default();
    if wanted.is_empty() {
        return out;
    }
    let mut pids: Vec<u32> = match std::fs::read_dir(proc_root) {
        Ok(rd) => rd.flatten().filter_map(|e| pid_of(&e.file_name())).collect(),
        Err(e) => {
            info!("cannot list {}: {e}; the sockets looked up are reported without their process", proc_root.display());
            return out;
        }
    };
    pids.sort_unstable();
    for pid in pids {
        let dir = proc_root.join(pid.to_string());
        let Ok(fds) = std::fs::read_dir(dir.join("fd")) else {
            out.skipped += 1;
            continue;
        };
        out.processes += 1;
        let mut holder = None;
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else { continue };
            let Some(ino) = socket_inode(target.as_os_str().as_bytes()) else { continue };
            if !wanted.contains(&ino) || out.holders.contains_key(&ino) {
                continue;
            }
            let h = *holder.get_or_insert_with(|| read_holder(&dir, pid, cgroup2));
            out.holders.insert(ino, h);
        }
        if out.holders.len() == wanted.len() {
            break;
        }
    }
    out
}

/// The holder `pid`: its name and cgroup, read from its `/proc` directory `dir`.
pub fn read_holder(dir: &Path, pid: u32, cgroup2: Option<&Path>) -> Holder {
    let comm = std::fs::read(dir.join("comm")).map(|t| comm_from(&t)).unwrap_or([0; 16]);
    let cgroup_id = cgroup2
        .and_then(|root| {
            let text = std::fs::read_to_string(dir.join("cgroup")).ok()?;
            let rel = cgroup2_path(&text)?.trim_start_matches('/');
            std::fs::metadata(root.join(rel)).ok().map(|m| m.ino())
        })
        .unwrap_or(0);
    Holder { pid, comm, cgroup_id }
}

/// An `Owner` record for the socket of snapshot record `snap`.
fn owner_record(snap: &RawEvent, h: &Holder) -> RawEvent {
    let mut ev = *snap;
    ev.kind = EventKind::Owner as u8;
    ev.flags |= FLAG_PROCESS;
    ev.pid = h.pid;
    ev.tid = h.pid;
    ev.comm = h.comm;
    ev.cgroup_id = h.cgroup_id;
    ev
}

/// Puts an `Owner` record in front of every snapshot record (raw, as [`crate::attach::Probes::snapshot`]
/// returns them) whose socket some process under `proc_root` holds. Records that do not decode
/// are left as they are (the event loop reports them).
pub fn attribute_snapshot(records: Vec<Vec<u8>>, proc_root: &Path, cgroup2: Option<&Path>) -> Vec<Vec<u8>> {
    let inode = |bytes: &[u8]| raw_from_bytes(bytes).ok().map(|r| r.sock_ino).filter(|&i| i != 0);
    let wanted: HashSet<u64> = records.iter().filter_map(|r| inode(r)).collect();
    let found = scan(proc_root, &wanted, cgroup2);
    debug!(
        "start-up snapshot: {} of {} sockets have a holding process ({} processes read, {} skipped)",
        found.holders.len(),
        wanted.len(),
        found.processes,
        found.skipped
    );
    with_owners(records, |_, bytes| inode(bytes).and_then(|i| found.holders.get(&i)))
}

/// `records` with an `Owner` record in front of each one for which `owner_of(index, record)` names
/// a holder.
fn with_owners<'h>(records: Vec<Vec<u8>>, owner_of: impl Fn(usize, &[u8]) -> Option<&'h Holder>) -> Vec<Vec<u8>> {
    let mut out = Vec::with_capacity(records.len() + 16);
    for (i, bytes) in records.into_iter().enumerate() {
        if let Some(h) = owner_of(i, &bytes) {
            if let Ok(raw) = raw_from_bytes(&bytes) {
                out.push(raw_to_bytes(&owner_record(&raw, h)));
            }
        }
        out.push(bytes);
    }
    out
}

/// Least time between two scans of `/proc` for the owners of deaths: bounds the agent's cost in a
/// storm of deaths (a scan reads every process's descriptors).
pub const DEATH_SCAN_INTERVAL: Duration = Duration::from_millis(200);

/// How long a death waits before its owner is looked up: time for the process that learns of the
/// error to close the socket, which names it ([`EventKind::Destroy`] with `FLAG_PROCESS`) without
/// a scan (a scan would no longer find it).
pub const DEATH_HOLD: Duration = Duration::from_millis(100);

/// Most sockets one scan looks up; the deaths of further sockets in the same scan are reported
/// without their owner and counted ([`DeathOwnerStats::dropped`]).
pub const MAX_DEATH_INODES: usize = 1024;

/// The socket inode of a raw ring-buffer record that asks for its owner: a change to CLOSE
/// (a death) of a socket with a file, reported outside its owner's process context (no
/// `FLAG_PROCESS`). Reads three fields in place: called for every record the event loop drains.
pub fn death_inode(bytes: &[u8]) -> Option<u64> {
    if bytes.len() != RAW_EVENT_SIZE || bytes[offset_of!(RawEvent, kind)] != EventKind::State as u8 {
        return None;
    }
    let flags = u32::from_ne_bytes(bytes[offset_of!(RawEvent, flags)..][..4].try_into().ok()?);
    let ino = u64::from_ne_bytes(bytes[offset_of!(RawEvent, sock_ino)..][..8].try_into().ok()?);
    (flags & FLAG_PROCESS == 0 && ino != 0).then_some(ino)
}

/// The processes that closed sockets after their deaths in `batch` (raw records in ring-buffer
/// order; `is_death` tells the deaths): for the index of each death record, the process of the first `Destroy` with
/// `FLAG_PROCESS` after it on the same socket, with the same namespace and addresses. A change of
/// state on the socket in between (another death: the address was reused) forgets the death.
fn closers(batch: &[Vec<u8>], is_death: impl Fn(&[u8]) -> bool) -> HashMap<usize, Holder> {
    let mut dying: HashMap<u64, (usize, RawEvent)> = HashMap::new();
    let mut out = HashMap::new();
    for (i, bytes) in batch.iter().enumerate() {
        let Ok(raw) = raw_from_bytes(bytes) else { continue };
        if is_death(bytes) {
            dying.insert(raw.sk, (i, raw));
            continue;
        }
        match EventKind::from_u8(raw.kind) {
            Some(EventKind::Destroy) => {
                let Some((d, death)) = dying.remove(&raw.sk) else { continue };
                if raw.flags & FLAG_PROCESS != 0 && same_connection(&death, &raw) {
                    out.insert(d, Holder { pid: raw.pid, comm: raw.comm, cgroup_id: raw.cgroup_id });
                }
            }
            Some(EventKind::State) => {
                dying.remove(&raw.sk);
            }
            _ => {}
        }
    }
    out
}

/// Whether two records of one socket address describe the same connection.
fn same_connection(a: &RawEvent, b: &RawEvent) -> bool {
    (a.netns, a.family, a.saddr, a.daddr, a.sport, a.dport) == (b.netns, b.family, b.saddr, b.daddr, b.sport, b.dport)
}

/// What the lookups of deaths' owners did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeathOwnerStats {
    /// Scans of `/proc`.
    pub scans: u64,
    /// Deaths whose owner closed the socket before the lookup (named by the close).
    pub closed: u64,
    /// Deaths whose owner a scan found.
    pub found: u64,
    /// Deaths whose socket no process held at the scan (closed in between), or that could not be
    /// read: reported without an owner.
    pub not_found: u64,
    /// Deaths not looked up (more than [`MAX_DEATH_INODES`] sockets for one scan): reported
    /// without an owner.
    pub dropped: u64,
}

/// The owners of deaths reported with their socket's inode (see the module documentation): one
/// bounded scan of `/proc` per batch of such deaths, at most one per interval.
#[derive(Debug)]
pub struct DeathOwners {
    /// Only deaths in this network namespace (inode) are looked up.
    only_netns: Option<u32>,
    proc_root: PathBuf,
    cgroup2: Option<PathBuf>,
    interval: Duration,
    max_inodes: usize,
    last_scan: Option<Instant>,
    stats: DeathOwnerStats,
}

impl DeathOwners {
    /// Lookups in `proc_root` (normally `/proc`), cgroups under the cgroup2 mount `cgroup2`, with
    /// [`DEATH_SCAN_INTERVAL`] and [`MAX_DEATH_INODES`].
    pub fn new(proc_root: PathBuf, cgroup2: Option<PathBuf>) -> Self {
        Self::with_limits(proc_root, cgroup2, DEATH_SCAN_INTERVAL, MAX_DEATH_INODES)
    }

    /// Lookups with another interval between scans and bound of sockets per scan.
    pub fn with_limits(proc_root: PathBuf, cgroup2: Option<PathBuf>, interval: Duration, max_inodes: usize) -> Self {
        let stats = DeathOwnerStats::default();
        DeathOwners { only_netns: None, proc_root, cgroup2, interval, max_inodes, last_scan: None, stats }
    }

    /// Only deaths in network namespace `netns` (inode) are looked up (`--netns`); `None`: all.
    pub fn only_netns(mut self, netns: Option<u32>) -> Self {
        self.only_netns = netns;
        self
    }

    /// The socket inode of a raw record whose owner is to be looked up: [`death_inode`], in the
    /// namespace looked at.
    pub fn wanted(&self, bytes: &[u8]) -> Option<u64> {
        let ino = death_inode(bytes)?;
        let netns = u32::from_ne_bytes(bytes[offset_of!(RawEvent, netns)..][..4].try_into().ok()?);
        self.only_netns.is_none_or(|ns| ns == netns).then_some(ino)
    }

    pub fn stats(&self) -> DeathOwnerStats {
        self.stats
    }

    /// How long after `now` the next scan may run (zero: now).
    pub fn wait_before_scan(&self, now: Instant) -> Duration {
        self.last_scan.map_or(Duration::ZERO, |t| (t + self.interval).saturating_duration_since(now))
    }

    /// Names the owners of the deaths in `batch` (raw records in ring-buffer order) and returns the
    /// batch with an `Owner` record in front of each death whose owner is known: the process that
    /// closed the socket later in the batch (`closers`), else one holding it now, found by one
    /// scan at `now` of at most `max_inodes` sockets (no scan when none is left to look up).
    pub fn attribute(&mut self, batch: Vec<Vec<u8>>, now: Instant) -> Vec<Vec<u8>> {
        let deaths: Vec<(usize, u64)> =
            batch.iter().enumerate().filter_map(|(i, r)| self.wanted(r).map(|ino| (i, ino))).collect();
        if deaths.is_empty() {
            return batch;
        }
        let mut owners = closers(&batch, |r| self.wanted(r).is_some());
        self.stats.closed += owners.len() as u64;
        let mut wanted = HashSet::new();
        let mut looked_up = Vec::new();
        for &(i, ino) in deaths.iter().filter(|(i, _)| !owners.contains_key(i)) {
            if wanted.len() < self.max_inodes || wanted.contains(&ino) {
                wanted.insert(ino);
                looked_up.push((i, ino));
            } else {
                self.stats.dropped += 1;
            }
        }
        if !wanted.is_empty() {
            self.last_scan = Some(now);
            self.stats.scans += 1;
            let found = scan(&self.proc_root, &wanted, self.cgroup2.as_deref());
            for (i, ino) in looked_up {
                match found.holders.get(&ino) {
                    Some(h) => {
                        owners.entry(i).or_insert(*h);
                        self.stats.found += 1;
                    }
                    None => self.stats.not_found += 1,
                }
            }
            debug!(
                "owners of deaths: {} of {} named ({} sockets looked up in /proc: {} processes read, {} skipped)",
                owners.len(),
                deaths.len(),
                wanted.len(),
                found.processes,
                found.skipped
            );
        }
        with_owners(batch, |i, _| owners.get(&i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use crate::kernel::hz::tests::TempDir;

    #[test]
    fn parses_socket_links_only() {
        assert_eq!(socket_inode(b"socket:[12345]"), Some(12345));
        assert_eq!(socket_inode(b"socket:[18446744073709551615]"), Some(u64::MAX));
        for bad in [
            &b"socket:[]"[..],
            b"socket:[12a]",
            b"socket:[12",
            b"pipe:[12345]",
            b"anon_inode:[eventpoll]",
            b"/dev/null",
            b"socket:[99999999999999999999]",
        ] {
            assert_eq!(socket_inode(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn comm_and_cgroup_lines() {
        assert_eq!(&comm_from(b"nginx\n")[..6], b"nginx\0");
        let long = comm_from(b"a-very-long-process-name\n");
        assert_eq!(&long[..15], b"a-very-long-pro");
        assert_eq!(long[15], 0);
        assert_eq!(cgroup2_path("12:cpu:/x\n0::/system.slice/nginx.service\n"), Some("/system.slice/nginx.service"));
        assert_eq!(cgroup2_path("12:cpu:/x\n"), None);
    }

    /// A fake /proc: pid 30 and pid 7 hold socket 100, pid 30 holds 200, pid 12 holds nothing
    /// wanted, `self` and a file are not pids, pid 40 has no readable fd directory.
    fn fake_proc(root: &Path) {
        let proc_ = |pid: &str, comm: &str, links: &[&str]| {
            let dir = root.join(pid);
            std::fs::create_dir_all(dir.join("fd")).unwrap();
            std::fs::write(dir.join("comm"), format!("{comm}\n")).unwrap();
            std::fs::write(dir.join("cgroup"), "0::/\n").unwrap();
            for (i, l) in links.iter().enumerate() {
                symlink(l, dir.join("fd").join(i.to_string())).unwrap();
            }
        };
        proc_("30", "worker", &["/dev/null", "socket:[100]", "socket:[200]"]);
        proc_("7", "master", &["socket:[100]", "pipe:[5]"]);
        proc_("12", "other", &["socket:[300]"]);
        proc_("self", "x", &["socket:[200]"]);
        std::fs::create_dir_all(root.join("40")).unwrap();
        std::fs::write(root.join("uptime"), "1 1\n").unwrap();
    }

    #[test]
    fn scan_reports_the_lowest_pid_and_skips_what_it_cannot_read() {
        let dir = TempDir::new("owners-scan");
        fake_proc(dir.0.as_path());
        let wanted: HashSet<u64> = [100, 200, 400].into();
        let s = scan(dir.0.as_path(), &wanted, Some(dir.0.as_path()));
        assert_eq!(s.holders.len(), 2);
        let h100 = s.holders[&100];
        assert_eq!((h100.pid, &h100.comm[..7]), (7, &b"master\0"[..]));
        assert_eq!(h100.cgroup_id, std::fs::metadata(dir.0.as_path()).unwrap().ino());
        assert_eq!(s.holders[&200].pid, 30);
        assert_eq!((s.processes, s.skipped), (3, 1));
        // Nothing wanted: nothing read.
        let none = scan(dir.0.as_path(), &HashSet::new(), None);
        assert_eq!((none.processes, none.holders.len()), (0, 0));
    }

    #[test]
    fn owner_records_go_in_front_of_their_snapshot_records() {
        let dir = TempDir::new("owners-records");
        fake_proc(dir.0.as_path());
        let snap = |sk: u64, ino: u64| {
            let mut r = RawEvent::zeroed();
            r.kind = EventKind::Snapshot as u8;
            r.sk = sk;
            r.sock_ino = ino;
            r.netns = 5;
            raw_to_bytes(&r)
        };
        let records = vec![snap(1, 200), snap(2, 0), snap(3, 999), vec![1, 2, 3], snap(4, 100)];
        let out = attribute_snapshot(records.clone(), dir.0.as_path(), None);
        let kinds: Vec<(u8, u64)> = out
            .iter()
            .map(|b| raw_from_bytes(b).map(|r| (r.kind, r.sk)).unwrap_or((0, 0)))
            .collect();
        let (o, s) = (EventKind::Owner as u8, EventKind::Snapshot as u8);
        assert_eq!(kinds, [(o, 1), (s, 1), (s, 2), (s, 3), (0, 0), (o, 4), (s, 4)]);
        let owner = raw_from_bytes(&out[0]).unwrap();
        assert_eq!((owner.pid, owner.tid, owner.netns, owner.flags & FLAG_PROCESS), (30, 30, 5, FLAG_PROCESS));
        assert_eq!(&owner.comm[..7], b"worker\0");
        assert_eq!(owner.cgroup_id, 0);
        assert_eq!(raw_from_bytes(&out[5]).unwrap().pid, 7);
    }

    /// A raw state-change record of socket `sk` with socket inode `ino` and `flags`.
    fn death(sk: u64, ino: u64, flags: u32) -> Vec<u8> {
        let mut r = RawEvent::zeroed();
        r.kind = EventKind::State as u8;
        r.sk = sk;
        r.sock_ino = ino;
        r.flags = flags;
        r.netns = 5;
        raw_to_bytes(&r)
    }

    #[test]
    fn death_inode_only_for_state_records_without_a_process() {
        assert_eq!(death_inode(&death(1, 100, 0)), Some(100));
        assert_eq!(death_inode(&death(1, 0, 0)), None);
        assert_eq!(death_inode(&death(1, 100, FLAG_PROCESS)), None, "the owner is known already");
        let mut snap = raw_from_bytes(&death(1, 100, 0)).unwrap();
        snap.kind = EventKind::Snapshot as u8;
        assert_eq!(death_inode(&raw_to_bytes(&snap)), None);
        assert_eq!(death_inode(&death(1, 100, 0)[1..]), None, "short record");
    }

    /// One scan per batch: owners in front of the deaths whose socket a process holds, in order;
    /// the deaths of other sockets counted not found; past the bound, not looked up; records that
    /// ask nothing untouched; the next scan not before the interval.
    #[test]
    fn death_owners_one_bounded_scan_per_batch() {
        let dir = TempDir::new("owners-deaths");
        fake_proc(dir.0.as_path());
        let interval = Duration::from_secs(10);
        let mut owners = DeathOwners::with_limits(dir.0.clone(), None, interval, 2);
        let t0 = Instant::now();
        assert_eq!(owners.wait_before_scan(t0), Duration::ZERO);
        let other = death(9, 200, FLAG_PROCESS);
        let batch = vec![death(1, 200, 0), other.clone(), death(2, 999, 0), death(3, 100, 0), death(4, 200, 0)];
        let out = owners.attribute(batch, t0);
        let kinds: Vec<(u8, u64)> = out.iter().map(|b| raw_from_bytes(b).map(|r| (r.kind, r.sk)).unwrap()).collect();
        let (o, s) = (EventKind::Owner as u8, EventKind::State as u8);
        // Inodes 200 and 999 fill the bound of 2: socket 3 (inode 100) is not looked up.
        assert_eq!(kinds, [(o, 1), (s, 1), (s, 9), (s, 2), (s, 3), (o, 4), (s, 4)]);
        let owner = raw_from_bytes(&out[0]).unwrap();
        assert_eq!((owner.pid, owner.netns, owner.flags & FLAG_PROCESS), (30, 5, FLAG_PROCESS));
        assert_eq!(&owner.comm[..7], b"worker\0");
        assert_eq!(out[2], other);
        assert_eq!(owners.stats(), DeathOwnerStats { scans: 1, closed: 0, found: 2, not_found: 1, dropped: 1 });
        assert_eq!(owners.wait_before_scan(t0 + Duration::from_secs(4)), Duration::from_secs(6));
        assert_eq!(owners.wait_before_scan(t0 + interval), Duration::ZERO);
        // Nothing to look up: no scan.
        let plain = vec![other.clone(), death(5, 0, 0)];
        assert_eq!(owners.attribute(plain.clone(), t0 + interval), plain);
        assert_eq!(owners.stats().scans, 1);
    }

    /// A raw record of `kind` on socket `sk` (ports 40000 -> `dport`), from process `pid` if any.
    fn record(kind: EventKind, sk: u64, dport: u16, pid: Option<u32>) -> Vec<u8> {
        let mut r = RawEvent::zeroed();
        r.kind = kind as u8;
        r.sk = sk;
        r.netns = 5;
        (r.sport, r.dport) = (40000, dport);
        if let Some(pid) = pid {
            (r.flags, r.pid, r.tid, r.comm) = (FLAG_PROCESS, pid, pid + 1, comm_from(b"closer"));
        }
        raw_to_bytes(&r)
    }

    /// The process that closes a dead socket (its `Destroy` with the process, later in the batch,
    /// same socket and addresses) names the owner without a scan; a close of another connection on
    /// the same address (other port, or after another state change), or without a process, does
    /// not; deaths of a namespace not looked at are left alone.
    #[test]
    fn the_closing_process_names_the_owner() {
        let dir = TempDir::new("owners-closers");
        fake_proc(dir.0.as_path());
        let mut owners = DeathOwners::with_limits(dir.0.clone(), None, Duration::ZERO, 16);
        let dead = |sk: u64, ino: u64| {
            let mut r = raw_from_bytes(&record(EventKind::State, sk, 80, None)).unwrap();
            r.sock_ino = ino;
            raw_to_bytes(&r)
        };
        let batch = vec![
            dead(1, 501),
            record(EventKind::Error, 1, 80, None),
            record(EventKind::Destroy, 1, 80, Some(55)),
            dead(2, 502),
            record(EventKind::Destroy, 2, 81, Some(66)),
            dead(3, 503),
            record(EventKind::State, 3, 80, Some(9)),
            record(EventKind::Destroy, 3, 80, Some(77)),
            dead(4, 504),
            record(EventKind::Destroy, 4, 80, None),
        ];
        let out = owners.attribute(batch.clone(), Instant::now());
        assert_eq!(out.len(), batch.len() + 1);
        let owner = raw_from_bytes(&out[0]).unwrap();
        assert_eq!((owner.kind, owner.sk, owner.pid, &owner.comm[..7]), (EventKind::Owner as u8, 1, 55, &b"closer\0"[..]));
        assert_eq!(out[1..], batch[..]);
        assert_eq!(owners.stats(), DeathOwnerStats { scans: 1, closed: 1, found: 0, not_found: 3, dropped: 0 });
        // Everything named by closes: no scan.
        let out = owners.attribute(batch[..3].to_vec(), Instant::now());
        assert_eq!((out.len(), owners.stats().scans, owners.stats().closed), (4, 1, 2));
        // Another namespace: not looked up.
        let mut elsewhere = DeathOwners::with_limits(dir.0.clone(), None, Duration::ZERO, 16).only_netns(Some(6));
        assert_eq!(elsewhere.wanted(&batch[0]), None);
        assert_eq!(elsewhere.attribute(batch.clone(), Instant::now()), batch);
        assert_eq!(elsewhere.stats(), DeathOwnerStats::default());
        assert_eq!(owners.only_netns(Some(5)).wanted(&batch[0]), Some(501));
    }
}
