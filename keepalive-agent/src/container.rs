//! Process → container attribution from the cgroup the kernel reported.
//!
//! The kernel gives a cgroup id (`bpf_get_current_cgroup_id()`), which on cgroup v2 is the inode
//! number of the cgroup's directory. [`CgroupResolver`] maps it to the directory's path under the
//! cgroup2 mount (walking the hierarchy once per unknown id, with a bounded cache) and extracts a
//! container id from the usual runtime naming schemes (Docker, containerd/CRI, CRI-O, Podman,
//! Kubernetes pods).

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

/// What a cgroup id resolved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupInfo {
    /// Path relative to the cgroup2 mount, starting with `/`.
    pub path: String,
    /// 64-hex-digit container id, when the path follows a known runtime's naming.
    pub container_id: Option<String>,
}

/// Extracts a container id from a cgroup path.
pub fn container_id_from_path(path: &str) -> Option<String> {
    for seg in path.rsplit('/') {
        let s = seg.strip_suffix(".scope").unwrap_or(seg);
        for prefix in ["docker-", "cri-containerd-", "crio-", "libpod-", "containerd-", ""] {
            if let Some(id) = s.strip_prefix(prefix) {
                if id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Some(id.to_ascii_lowercase());
                }
            }
        }
    }
    None
}

/// Maps cgroup ids to paths, with a bounded cache.
pub struct CgroupResolver {
    root: Option<PathBuf>,
    cache: HashMap<u64, Option<CgroupInfo>>,
    max_cache: usize,
    max_walk: usize,
}

impl CgroupResolver {
    /// A resolver over the cgroup2 hierarchy mounted at `root` (`None`: resolves nothing).
    pub fn new(root: Option<PathBuf>) -> Self {
        CgroupResolver { root, cache: HashMap::new(), max_cache: 4096, max_walk: 100_000 }
    }

    /// The cgroup `id` names, if it can be found.
    pub fn resolve(&mut self, id: u64) -> Option<CgroupInfo> {
        if id == 0 {
            return None;
        }
        if let Some(hit) = self.cache.get(&id) {
            return hit.clone();
        }
        let found = self.root.as_deref().and_then(|root| self.walk(root, id));
        if self.cache.len() >= self.max_cache {
            self.cache.clear();
        }
        self.cache.insert(id, found.clone());
        found
    }

    fn walk(&self, root: &Path, id: u64) -> Option<CgroupInfo> {
        let mut stack = vec![root.to_path_buf()];
        let mut seen = 0;
        while let Some(dir) = stack.pop() {
            seen += 1;
            if seen > self.max_walk {
                return None;
            }
            let Ok(md) = std::fs::metadata(&dir) else { continue };
            if md.ino() == id {
                let rel = dir.strip_prefix(root).ok()?;
                let path = format!("/{}", rel.display());
                let container_id = container_id_from_path(&path);
                return Some(CgroupInfo { path, container_id });
            }
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            for e in entries.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    stack.push(e.path());
                }
            }
        }
        None
    }
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
    fn resolves_a_directory_by_inode() {
        let dir = std::env::temp_dir().join(format!("keepalive-cg-test-{}", std::process::id()));
        let leaf = dir.join(format!("docker-{ID}.scope"));
        std::fs::create_dir_all(&leaf).unwrap();
        let ino = std::fs::metadata(&leaf).unwrap().ino();
        let mut r = CgroupResolver::new(Some(dir.clone()));
        let info = r.resolve(ino).expect("found");
        assert_eq!(info.path, format!("/docker-{ID}.scope"));
        assert_eq!(info.container_id.as_deref(), Some(ID));
        assert_eq!(r.resolve(0), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
