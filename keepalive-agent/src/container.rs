//! Process → container attribution from the cgroup the kernel reported.
//!
//! The kernel gives a cgroup id (`bpf_get_current_cgroup_id()`), which on cgroup v2 is the id of
//! the cgroup's kernfs node: its directory's inode number, and also the cgroup directory's file
//! handle. [`CgroupResolver`] maps it to the directory's path under the cgroup2 mount in O(1),
//! with `open_by_handle_at(2)` on that handle (never a walk of the hierarchy: it runs on the event
//! thread), keeps a bounded cache of the answers, and extracts a container id from the usual
//! runtime naming schemes (Docker, containerd/CRI, CRI-O, Podman, Kubernetes pods).

use std::{
    collections::HashMap,
    ffi::CString,
    fs::File,
    io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
};

/// What a cgroup id resolved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupInfo {
    /// Path relative to the cgroup2 mount, starting with `/`.
    pub path: String,
    /// 64-hex-digit container id, when the path follows a known runtime's naming.
    pub container_id: Option<String>,
    /// The Kubernetes pod (UID, QoS class), when the path follows the kubelet's naming.
    pub pod: Option<crate::k8s::Pod>,
}

/// Extracts a container id from a cgroup path (the naming schemes of [`crate::k8s`]).
pub fn container_id_from_path(path: &str) -> Option<String> {
    crate::k8s::parse_cgroup_path(path).container_id
}

/// How many answers [`CgroupResolver`] keeps by default.
const DEFAULT_CACHE: usize = 4096;

/// Counters of a [`CgroupResolver`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CgroupStats {
    /// Ids looked up in the kernel (cache misses).
    pub lookups: u64,
    /// Lookups that found no cgroup (removed, or not a cgroup of this hierarchy).
    pub not_found: u64,
    /// Answers dropped because the cache was full (it is emptied when it reaches its bound).
    pub evicted: u64,
}

/// Maps cgroup ids to paths, with a bounded cache.
pub struct CgroupResolver {
    lookup: Box<dyn FnMut(u64) -> Option<String> + Send>,
    cache: HashMap<u64, Option<CgroupInfo>, foldhash::fast::RandomState>,
    max_cache: usize,
    stats: CgroupStats,
}

/// Asks `lookup` for the cgroup `id` and parses its path, counting the lookup in `stats`.
fn lookup_uncached(lookup: &mut (dyn FnMut(u64) -> Option<String> + Send), stats: &mut CgroupStats, id: u64) -> Option<CgroupInfo> {
    stats.lookups += 1;
    let found = lookup(id).map(|path| {
        let a = crate::k8s::parse_cgroup_path(&path);
        CgroupInfo { container_id: a.container_id, pod: a.pod, path }
    });
    if found.is_none() {
        stats.not_found += 1;
    }
    found
}

impl CgroupResolver {
    /// A resolver over the cgroup2 hierarchy mounted at `root` (`None`, or a hierarchy whose
    /// directories cannot be opened by handle: resolves nothing, said once in the log).
    pub fn new(root: Option<PathBuf>) -> Self {
        let lookup: Box<dyn FnMut(u64) -> Option<String> + Send> = match root.map(|r| ByHandle::open(&r)) {
            Some(Ok(h)) => Box::new(move |id| h.path_of(id)),
            Some(Err(e)) => {
                log::warn!("cgroup paths unavailable: {e}");
                Box::new(|_| None)
            }
            None => Box::new(|_| None),
        };
        Self::with_lookup(lookup, DEFAULT_CACHE)
    }

    /// A resolver asking `lookup` for the path (relative to the mount, starting with `/`) of the
    /// ids it has not cached, keeping at most `max_cache` answers.
    pub fn with_lookup(lookup: Box<dyn FnMut(u64) -> Option<String> + Send>, max_cache: usize) -> Self {
        CgroupResolver { lookup, cache: HashMap::default(), max_cache: max_cache.max(1), stats: CgroupStats::default() }
    }

    /// The cgroup `id` names, if it can be found.
    pub fn resolve(&mut self, id: u64) -> Option<CgroupInfo> {
        self.resolve_ref(id).cloned()
    }

    /// [`CgroupResolver::resolve`] without a copy (per record in `trace`: the cache hit is the
    /// common case).
    pub fn resolve_ref(&mut self, id: u64) -> Option<&CgroupInfo> {
        if id == 0 {
            return None;
        }
        if self.cache.len() >= self.max_cache && !self.cache.contains_key(&id) {
            self.stats.evicted += self.cache.len() as u64;
            log::debug!("cgroup cache full ({} entries): emptied; {:?}", self.cache.len(), self.stats);
            self.cache.clear();
        }
        // One hash lookup on a hit (the common case).
        let (lookup, stats) = (&mut self.lookup, &mut self.stats);
        self.cache.entry(id).or_insert_with(|| lookup_uncached(lookup, stats, id)).as_ref()
    }

    /// What the resolver did so far.
    pub fn stats(&self) -> CgroupStats {
        self.stats
    }
}

/// Opening cgroup directories by file handle failed.
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    #[error("open({path}): {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("name_to_handle_at({path}): {source}")]
    NameToHandle {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("name_to_handle_at({path}) gave a {bytes}-byte handle, not the 8-byte cgroup id")]
    NotCgroupId { path: PathBuf, bytes: u32 },
}

/// `struct file_handle` with room for a kernfs handle (the 64-bit node id).
#[repr(C)]
struct KernfsHandle {
    handle_bytes: u32,
    handle_type: i32,
    f_handle: [u8; 8],
}

/// Resolves a cgroup id to its directory with `open_by_handle_at(2)` (needs
/// CAP_DAC_READ_SEARCH; kernfs file handles: Linux 4.13+; 64-bit ids: 5.5+).
struct ByHandle {
    root: PathBuf,
    mount: File,
    handle_type: i32,
}

impl ByHandle {
    /// Checks that the hierarchy at `root` hands out 8-byte handles and learns their type.
    fn open(root: &Path) -> Result<ByHandle, HandleError> {
        let mount = File::open(root).map_err(|source| HandleError::Open { path: root.to_path_buf(), source })?;
        let name_err = |source| HandleError::NameToHandle { path: root.to_path_buf(), source };
        let c = CString::new(root.as_os_str().as_bytes()).map_err(|e| name_err(io::Error::other(e)))?;
        let mut h = KernfsHandle { handle_bytes: 8, handle_type: 0, f_handle: [0; 8] };
        let mut mount_id: libc::c_int = 0;
        // SAFETY: `h` has room for `handle_bytes` bytes of handle; `c` is NUL-terminated.
        let rc = unsafe {
            libc::name_to_handle_at(libc::AT_FDCWD, c.as_ptr(), (&mut h as *mut KernfsHandle).cast(), &mut mount_id, 0)
        };
        if rc != 0 {
            return Err(name_err(io::Error::last_os_error()));
        }
        if h.handle_bytes != 8 {
            return Err(HandleError::NotCgroupId { path: root.to_path_buf(), bytes: h.handle_bytes });
        }
        Ok(ByHandle { root: root.to_path_buf(), mount, handle_type: h.handle_type })
    }

    /// The path of cgroup `id` relative to the mount (`/` for the root), if it still exists.
    fn path_of(&self, id: u64) -> Option<String> {
        let mut h = KernfsHandle { handle_bytes: 8, handle_type: self.handle_type, f_handle: id.to_ne_bytes() };
        // SAFETY: a valid handle buffer and mount fd; the returned fd is owned below.
        let fd = unsafe {
            libc::open_by_handle_at(
                self.mount.as_raw_fd(),
                (&mut h as *mut KernfsHandle).cast(),
                libc::O_PATH | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return None;
        }
        // SAFETY: `fd` was just opened and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let target = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).ok()?;
        relative_cgroup_path(&self.root, &target)
    }
}

/// `target` (a directory under the cgroup2 mount `root`) as a path relative to the mount,
/// starting with `/`; `None` when it is elsewhere or was removed.
fn relative_cgroup_path(root: &Path, target: &Path) -> Option<String> {
    let rel = target.strip_prefix(root).ok()?;
    let path = format!("/{}", rel.display());
    (!path.ends_with(" (deleted)")).then_some(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f4e5d6c7b8a99887766554433221100ffeeddccbbaa00112233445566778899";

    #[test]
    fn recognises_runtime_naming() {
        assert_eq!(
            container_id_from_path(&format!("/system.slice/docker-{ID}.scope")).as_deref(),
            Some(ID)
        );
        assert_eq!(
            container_id_from_path(&format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234.slice/cri-containerd-{ID}.scope"
            ))
            .as_deref(),
            Some(ID)
        );
        assert_eq!(container_id_from_path(&format!("/docker/{ID}")).as_deref(), Some(ID));
        assert_eq!(container_id_from_path(&format!("/machine.slice/libpod-{ID}.scope")).as_deref(), Some(ID));
        assert_eq!(container_id_from_path("/user.slice/user-0.slice/session-1.scope"), None);
        assert_eq!(container_id_from_path("/docker/abc"), None);
    }

    #[test]
    fn resolves_the_own_cgroup_by_id() {
        use std::os::unix::fs::MetadataExt as _;
        let root = crate::attach::cgroup2_mount().expect("a cgroup2 hierarchy is mounted on the test machine");
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let rel = own.lines().find_map(|l| l.strip_prefix("0::")).expect("a cgroup v2 entry in /proc/self/cgroup");
        let dir = root.join(rel.trim_start_matches('/'));
        let id = std::fs::metadata(&dir).unwrap().ino();
        let mut r = CgroupResolver::new(Some(root.clone()));
        let info = r.resolve(id).unwrap_or_else(|| panic!("cgroup {id} ({}) not resolved", dir.display()));
        assert_eq!(info.path, if rel == "/" { "/".to_string() } else { rel.to_string() });
        let root_id = std::fs::metadata(&root).unwrap().ino();
        assert_eq!(r.resolve(root_id).map(|i| i.path).as_deref(), Some("/"));
        // An id that names no cgroup: not found, counted.
        assert_eq!(r.resolve(u64::MAX - 1), None);
        assert_eq!(r.stats().not_found, 1);
    }

    #[test]
    fn caches_answers_within_a_bound_and_counts_evictions() {
        use std::sync::{atomic::{AtomicU64, Ordering}, Arc};
        let calls = Arc::new(AtomicU64::new(0));
        let c = calls.clone();
        let mut r = CgroupResolver::with_lookup(
            Box::new(move |id| {
                c.fetch_add(1, Ordering::Relaxed);
                (id % 2 == 0).then(|| format!("/system.slice/docker-{ID}.scope"))
            }),
            2,
        );
        let info = r.resolve(2).unwrap();
        assert_eq!(info.container_id.as_deref(), Some(ID));
        assert_eq!(r.resolve(2), Some(info));
        assert_eq!(r.resolve(3), None);
        assert_eq!(r.resolve(3), None, "a negative answer is cached too");
        assert_eq!(calls.load(Ordering::Relaxed), 2);
        assert_eq!(r.resolve(0), None, "id 0: no process, never looked up");
        assert_eq!(r.stats(), CgroupStats { lookups: 2, not_found: 1, evicted: 0 });
        // A third id does not fit: the cache is emptied and the drop counted.
        assert!(r.resolve(4).is_some());
        assert_eq!(r.stats().evicted, 2);
        assert!(r.resolve(2).is_some());
        assert_eq!(calls.load(Ordering::Relaxed), 4);
        assert!(r.cache.len() <= 2);
    }

    #[test]
    fn paths_relative_to_the_mount() {
        let root = Path::new("/sys/fs/cgroup/unified");
        assert_eq!(relative_cgroup_path(root, root).as_deref(), Some("/"));
        assert_eq!(
            relative_cgroup_path(root, Path::new("/sys/fs/cgroup/unified/system.slice/a.scope")).as_deref(),
            Some("/system.slice/a.scope")
        );
        assert_eq!(relative_cgroup_path(root, Path::new("/tmp/x")), None);
        assert_eq!(relative_cgroup_path(root, Path::new("/sys/fs/cgroup/unified/gone (deleted)")), None);
    }
}
