//! A network namespace owned by the test, and nft rules inside it to make a peer vanish.
use std::fs::File;
use std::io::Write as _;
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use anyhow::{bail, Context as _, Result};

use crate::run_cmd;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// nft table (family inet) the harness creates inside the namespace, and only there.
pub const NFT_TABLE: &str = "keepalive_test";

/// `ip netns add` guard: a fresh namespace with `lo` up; deleted on drop.
pub struct NetNs {
    name: String,
    path: PathBuf,
    /// Ports with an nft rule of the harness (dropped or reset).
    dropped: Mutex<Vec<u16>>,
}

impl NetNs {
    pub fn new() -> Result<NetNs> {
        let name = format!(
            "ka-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        run_cmd(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = NetNs {
            path: Path::new("/run/netns").join(&name),
            name,
            dropped: Mutex::new(Vec::new()),
        };
        if !ns.path.exists() {
            bail!(
                "ip netns add {} did not create {}",
                ns.name,
                ns.path.display()
            );
        }
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/NAME`, what the agent's `--netns` takes.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The namespace's inode number (what `/proc/<pid>/ns/net` links to as `net:[INODE]`).
    pub fn inode(&self) -> u64 {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::metadata(&self.path).expect("stat netns").ino()
    }

    /// Runs `argv` inside the namespace (`ip netns exec NAME argv...`), returns stdout.
    pub fn exec(&self, argv: &[&str]) -> Result<String> {
        run_cmd(
            Command::new("ip")
                .args(["netns", "exec", &self.name])
                .args(argv),
        )
    }

    /// Runs `f` on a thread that joined the namespace (`setns(CLONE_NEWNET)`; a network namespace
    /// is per thread). Sockets created by `f` belong to the namespace for their whole life and can
    /// be used from any thread afterwards. A panic in `f` is propagated.
    pub fn run<R: Send, F: FnOnce() -> R + Send>(&self, f: F) -> R {
        let path = self.path.clone();
        std::thread::scope(|s| {
            let handle = std::thread::Builder::new()
                .name("ka-netns".into())
                .spawn_scoped(s, move || {
                    let file = File::open(&path)
                        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
                    // SAFETY: setns on a valid namespace fd; affects only this thread.
                    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        panic!(
                            "setns({}): {}",
                            path.display(),
                            std::io::Error::last_os_error()
                        );
                    }
                    drop(file);
                    f()
                })
                .expect("spawning the netns thread");
            match handle.join() {
                Ok(r) => r,
                Err(e) => std::panic::resume_unwind(e),
            }
        })
    }

    fn nft(&self, script: &str) -> Result<()> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning nft")?;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(script.as_bytes())
            .context("writing nft script")?;
        let out = child.wait_with_output().context("waiting for nft")?;
        if !out.status.success() {
            bail!(
                "nft -f - failed ({}): {}\nscript:\n{script}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Makes the peer listening on `port` vanish: every TCP segment sent *from* `port` inside the
    /// namespace is dropped (output hook), so the other side's probes and data reach it but no
    /// answer ever comes back. Applies to IPv4 and IPv6.
    pub fn drop_from_port(&self, port: u16) -> Result<()> {
        let script = format!(
            "add table inet {NFT_TABLE}\n\
             add chain inet {NFT_TABLE} out {{ type filter hook output priority 0; policy accept; }}\n\
             add rule inet {NFT_TABLE} out tcp sport {port} drop\n"
        );
        self.nft(&script)?;
        self.dropped.lock().unwrap().push(port);
        Ok(())
    }

    /// Makes the peer listening on `port` vanish for its clients while it still receives: every
    /// TCP segment *from* `port` is dropped on the input hook, after it left the peer. A sender with
    /// data in flight then retransmits until its retransmission timer gives up (a drop on output
    /// would fail the peer's transmit locally instead). Applies to IPv4 and IPv6.
    pub fn drop_input_from_port(&self, port: u16) -> Result<()> {
        self.input_rule(port, &format!("tcp sport {port} drop"))
    }

    /// Loses one direction of the connections to the peer listening on `port`: every TCP segment
    /// *to* `port` is dropped on the input hook, while the peer's own segments still arrive (a
    /// one-way loss, or a peer whose host stopped receiving). Applies to IPv4 and IPv6.
    pub fn drop_input_to_port(&self, port: u16) -> Result<()> {
        self.input_rule(port, &format!("tcp dport {port} drop"))
    }

    /// Emulates a NAT or load balancer that forgot the flows to `port`: every TCP segment *to*
    /// `port` is answered with a reset on the input hook (`reject with tcp reset`), before the peer
    /// sees it. Applies to IPv4 and IPv6.
    pub fn reset_input_to_port(&self, port: u16) -> Result<()> {
        self.input_rule(port, &format!("tcp dport {port} reject with tcp reset"))
    }

    /// Adds `rule` to the harness's input chain (created if needed), for `port`.
    fn input_rule(&self, port: u16, rule: &str) -> Result<()> {
        let script = format!(
            "add table inet {NFT_TABLE}\n\
             add chain inet {NFT_TABLE} in {{ type filter hook input priority 0; policy accept; }}\n\
             add rule inet {NFT_TABLE} in {rule}\n"
        );
        self.nft(&script)?;
        self.dropped.lock().unwrap().push(port);
        Ok(())
    }

    /// Removes every drop rule (deletes the harness's nft table); the peer is reachable again.
    pub fn restore(&self) -> Result<()> {
        let mut dropped = self.dropped.lock().unwrap();
        if dropped.is_empty() {
            return Ok(());
        }
        self.nft(&format!("delete table inet {NFT_TABLE}\n"))?;
        dropped.clear();
        Ok(())
    }

    /// `nft list ruleset` inside the namespace.
    pub fn nft_ruleset(&self) -> Result<String> {
        self.exec(&["nft", "list", "ruleset"])
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = self.restore() {
            eprintln!("harness: restoring nft in {}: {e:#}", self.name);
        }
        if let Err(e) = run_cmd(Command::new("ip").args(["netns", "delete", &self.name])) {
            eprintln!("harness: deleting netns {}: {e:#}", self.name);
        }
    }
}
