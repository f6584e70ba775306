//! A cgroup v2 directory owned by the test, holding the test process while it exists.
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// The mount point of the cgroup2 hierarchy, from `/proc/self/mountinfo`.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let info =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    for line in info.lines() {
        // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTS
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split_whitespace().next() != Some("cgroup2") {
            continue;
        }
        let mount = left
            .split_whitespace()
            .nth(4)
            .ok_or_else(|| anyhow!("bad mountinfo line: {line}"))?;
        return Ok(PathBuf::from(unescape_mountinfo(mount)));
    }
    bail!("no cgroup2 mount in /proc/self/mountinfo")
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The calling process's cgroup v2 path relative to the hierarchy root (the `0::` line of
/// `/proc/self/cgroup`), e.g. `/` or `/user.slice/x.scope`.
pub fn current_cgroup() -> Result<String> {
    let s = std::fs::read_to_string("/proc/self/cgroup").context("reading /proc/self/cgroup")?;
    s.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_string)
        .ok_or_else(|| anyhow!("no cgroup v2 (0::) line in /proc/self/cgroup:\n{s}"))
}

/// A fresh child of the process's current cgroup v2; the whole test process (all threads) is moved
/// into it. Drop moves the process back to where it was and removes the directory.
pub struct Cgroup {
    path: PathBuf,
    original: PathBuf,
}

impl Cgroup {
    pub fn new() -> Result<Cgroup> {
        let root = cgroup2_mount()?;
        let rel = current_cgroup()?;
        let original = root.join(rel.trim_start_matches('/'));
        let name = format!(
            "keepalive-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let path = original.join(name);
        std::fs::create_dir(&path).with_context(|| format!("mkdir {}", path.display()))?;
        let cg = Cgroup { path, original };
        move_pid(&cg.path, std::process::id())?;
        Ok(cg)
    }

    /// The cgroup directory (what the agent's `--cgroup` takes).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the process was before and goes back to.
    pub fn original(&self) -> &Path {
        &self.original
    }

    /// Process ids currently in the cgroup.
    pub fn procs(&self) -> Result<Vec<u32>> {
        read_procs(&self.path)
    }
}

fn read_procs(dir: &Path) -> Result<Vec<u32>> {
    let p = dir.join("cgroup.procs");
    let s = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    s.lines()
        .map(|l| {
            l.trim()
                .parse::<u32>()
                .with_context(|| format!("bad pid {l:?} in {}", p.display()))
        })
        .collect()
}

fn move_pid(dir: &Path, pid: u32) -> Result<()> {
    let p = dir.join("cgroup.procs");
    std::fs::write(&p, pid.to_string()).with_context(|| format!("writing {pid} to {}", p.display()))
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if let Err(e) = move_pid(&self.original, std::process::id()) {
            eprintln!("harness: moving the test process back: {e:#}");
        }
        // Anything still inside was started by this test (children inherit the cgroup): move it
        // out too, then remove the directory (it may stay busy for a moment after an exit).
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            for pid in read_procs(&self.path).unwrap_or_default() {
                let _ = move_pid(&self.original, pid);
            }
            match std::fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => {
                    eprintln!("harness: rmdir {}: {e}", self.path.display());
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::unescape_mountinfo;

    #[test]
    fn mountinfo_unescape() {
        assert_eq!(
            unescape_mountinfo("/sys/fs/cgroup/unified"),
            "/sys/fs/cgroup/unified"
        );
        assert_eq!(unescape_mountinfo("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(unescape_mountinfo("/x\\134y"), "/x\\y");
        assert_eq!(unescape_mountinfo("/trailing\\"), "/trailing\\");
    }
}
