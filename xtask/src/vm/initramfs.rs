//! The guest's initramfs: busybox, `ip`, `nft`, util-linux `setpriv` and `nsenter`, the binaries
//! under test with the shared libraries they need (found with `ldd`), the kernel modules for
//! nftables, the init script and the commands; written as a gzip-compressed cpio "newc" archive.
//!
//! Guest layout:
//! - /init, /bin/busybox and its applets (as symlinks), /bin/sh (dash), /usr/sbin/{ip,nft},
//!   /usr/bin/{setpriv,nsenter}
//! - /etc/passwd and /etc/group with root and nobody/nogroup (the least-privilege tests run the
//!   agent as nobody)
//! - /usr/local/bin/<name>: the binaries under test
//! - /lib/modules/<release>/: the selected modules, with a modules.dep and modules.alias
//!   restricted to them (busybox modprobe is /sbin/modprobe, which the kernel calls on demand)
//! - /vmtest/commands.list, /vmtest/commands/<name>, /vmtest/command-timeout,
//!   /vmtest/modules.load, /vmtest/probe-functions

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, ensure, Context, Result};

use super::cpio;
use super::guest::{GuestCommand, INIT_SCRIPT, PROBED_FUNCTIONS};
use super::host::{find_program, run};
use super::kernels::Kernel;
use super::modules;

/// Everything that goes into a guest besides the kernel's own modules.
#[derive(Debug)]
pub struct Payload {
    /// (name in /usr/local/bin, host path)
    pub executables: Vec<(String, PathBuf)>,
    pub commands: Vec<GuestCommand>,
    /// Per-command limit enforced inside the guest, in seconds (0: none).
    pub command_timeout: u64,
    /// Module name patterns shipped in the image (with dependencies).
    pub shipped_modules: Vec<String>,
    /// Module name patterns loaded by init before the commands run (with dependencies).
    pub preloaded_modules: Vec<String>,
}

/// Host programs copied into every guest.
#[derive(Debug)]
pub struct HostTools {
    busybox: PathBuf,
    /// Applet paths relative to / as `busybox --list-full` prints them ("bin/sh").
    applets: Vec<String>,
    /// (guest path, host path) of real programs that take the place of busybox applets.
    programs: Vec<(&'static str, PathBuf)>,
}

const SETUP_HINT: &str = "run scripts/setup.sh";

/// The guest's users: root, and nobody (65534, Debian's numbers) for the least-privilege tests.
const GUEST_PASSWD: &str =
    "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n";
const GUEST_GROUP: &str = "root:x:0:\nnogroup:x:65534:\n";

impl HostTools {
    pub fn locate() -> Result<HostTools> {
        let busybox = find_program("busybox")
            .with_context(|| format!("busybox-static is needed ({SETUP_HINT})"))?;
        let list = run(Command::new(&busybox).arg("--list-full"))?;
        let applets = list
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect();
        // Debian's busybox shell runs its own applets before searching PATH (it is built with
        // FEATURE_SH_STANDALONE), so `ip` in a script would be busybox's reduced `ip` whatever
        // PATH says. The guest's /bin/sh is therefore the host's dash, which honours PATH.
        let programs = vec![
            (
                "bin/sh",
                find_program("dash").context("dash (Debian's /bin/sh) is needed")?,
            ),
            (
                "usr/sbin/ip",
                find_program("ip").with_context(|| format!("iproute2 is needed ({SETUP_HINT})"))?,
            ),
            (
                "usr/sbin/nft",
                find_program("nft")
                    .with_context(|| format!("nftables is needed ({SETUP_HINT})"))?,
            ),
            // Busybox's applets of these names lack the options the least-privilege tests use
            // (setpriv --reuid/--bounding-set, nsenter --net=PATH).
            (
                "usr/bin/setpriv",
                find_program("setpriv")
                    .with_context(|| format!("util-linux setpriv is needed ({SETUP_HINT})"))?,
            ),
            (
                "usr/bin/nsenter",
                find_program("nsenter")
                    .with_context(|| format!("util-linux nsenter is needed ({SETUP_HINT})"))?,
            ),
        ];
        Ok(HostTools {
            busybox,
            applets,
            programs,
        })
    }
}

/// The archive written for one kernel.
#[derive(Debug)]
pub struct Initramfs {
    pub path: PathBuf,
    pub entries: usize,
    pub uncompressed_bytes: u64,
    pub compressed_bytes: u64,
    pub preloaded_modules: usize,
    pub shipped_modules: usize,
}

pub fn build(
    kernel: &Kernel,
    tools: &HostTools,
    payload: &Payload,
    out: &Path,
) -> Result<Initramfs> {
    let mut tree = Tree::default();
    tree.data("init", INIT_SCRIPT.as_bytes().to_vec(), 0o755)?;
    for dir in [
        "proc",
        "sys",
        "dev",
        "tmp",
        "run",
        "root",
        "mnt",
        "var/tmp",
        "usr/local/sbin",
    ] {
        tree.dir(dir)?;
    }
    tree.symlink("var/run", "../run")?;
    tree.data("etc/passwd", GUEST_PASSWD.as_bytes().to_vec(), 0o644)?;
    tree.data("etc/group", GUEST_GROUP.as_bytes().to_vec(), 0o644)?;
    tree.data(
        "etc/hosts",
        b"127.0.0.1 localhost\n::1 localhost\n".to_vec(),
        0o644,
    )?;
    tree.data(
        "etc/nsswitch.conf",
        b"passwd: files\ngroup: files\nhosts: files\n".to_vec(),
        0o644,
    )?;

    // Real programs replace the busybox applets of the same name.
    tree.executable("bin/busybox", &tools.busybox)?;
    let base_name = |path: &str| path.rsplit('/').next().unwrap_or(path).to_string();
    let replaced: BTreeSet<String> = tools
        .programs
        .iter()
        .map(|(guest, _)| base_name(guest))
        .collect();
    for (guest, host) in &tools.programs {
        tree.executable(guest, host)?;
    }
    for applet in &tools.applets {
        if applet != "bin/busybox" && !replaced.contains(&base_name(applet)) {
            tree.symlink(applet, "/bin/busybox")?;
        }
    }

    for (name, host) in &payload.executables {
        tree.executable(&format!("usr/local/bin/{name}"), host)?;
    }

    let modules = add_modules(&mut tree, kernel, payload)?;

    let mut list = String::new();
    for command in &payload.commands {
        tree.data(
            &format!("vmtest/commands/{}", command.name),
            command.file_contents().into_bytes(),
            0o755,
        )?;
        list.push_str(&command.name);
        list.push('\n');
    }
    tree.data("vmtest/commands.list", list.into_bytes(), 0o644)?;
    tree.data(
        "vmtest/command-timeout",
        format!("{}\n", payload.command_timeout).into_bytes(),
        0o644,
    )?;
    tree.data(
        "vmtest/probe-functions",
        (PROBED_FUNCTIONS.join("\n") + "\n").into_bytes(),
        0o644,
    )?;

    let (entries, uncompressed_bytes) = tree.write_gzip(out)?;
    let compressed_bytes = fs::metadata(out)
        .with_context(|| format!("stat {}", out.display()))?
        .len();
    Ok(Initramfs {
        path: out.to_path_buf(),
        entries,
        uncompressed_bytes,
        compressed_bytes,
        preloaded_modules: modules.0,
        shipped_modules: modules.1,
    })
}

/// Adds the selected modules and the guest's module index; returns (preloaded, shipped) counts.
fn add_modules(tree: &mut Tree, kernel: &Kernel, payload: &Payload) -> Result<(usize, usize)> {
    let selection = modules::select(
        &kernel.modules_dir(),
        &payload.shipped_modules,
        &payload.preloaded_modules,
    )?;
    let guest_dir = format!("lib/modules/{}", kernel.release);
    let (preloaded, shipped) = (selection.preload.len(), selection.shipped.len());
    for (rel, data) in selection.shipped {
        tree.data(&format!("{guest_dir}/{rel}"), data, 0o644)?;
    }
    tree.data(
        &format!("{guest_dir}/modules.dep"),
        selection.dep_file.into_bytes(),
        0o644,
    )?;
    tree.data(
        &format!("{guest_dir}/modules.alias"),
        selection.alias_file.into_bytes(),
        0o644,
    )?;
    let load_list: String = selection
        .preload
        .iter()
        .map(|rel| format!("/{guest_dir}/{rel}\n"))
        .collect();
    tree.data("vmtest/modules.load", load_list.into_bytes(), 0o644)?;
    Ok((preloaded, shipped))
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    Dir,
    HostFile { source: PathBuf, mode: u32 },
    Data { data: Vec<u8>, mode: u32 },
    Symlink(String),
}

impl Node {
    fn describe(&self) -> String {
        match self {
            Node::Dir => "a directory".to_string(),
            Node::HostFile { source, .. } => format!("a copy of {}", source.display()),
            Node::Data { data, .. } => format!("{} generated bytes", data.len()),
            Node::Symlink(target) => format!("a symlink to {target}"),
        }
    }
}

/// The archive's contents, keyed by path relative to / ; sorted order puts parents first.
#[derive(Debug, Default)]
struct Tree {
    nodes: BTreeMap<String, Node>,
}

impl Tree {
    fn dir(&mut self, path: &str) -> Result<()> {
        self.insert(path, Node::Dir)
    }

    fn data(&mut self, path: &str, data: Vec<u8>, mode: u32) -> Result<()> {
        self.insert(path, Node::Data { data, mode })
    }

    fn symlink(&mut self, path: &str, target: &str) -> Result<()> {
        self.insert(path, Node::Symlink(target.to_string()))
    }

    /// A host file (symlinks resolved) stored with permission bits `mode`.
    fn file(&mut self, path: &str, host: &Path, mode: u32) -> Result<()> {
        let source =
            fs::canonicalize(host).with_context(|| format!("resolving {}", host.display()))?;
        ensure!(
            source.is_file(),
            "{} is not a regular file",
            source.display()
        );
        self.insert(path, Node::HostFile { source, mode })
    }

    /// A host executable plus every shared library `ldd` says it loads, at the same paths.
    fn executable(&mut self, path: &str, host: &Path) -> Result<()> {
        let meta = fs::metadata(host).with_context(|| format!("stat {}", host.display()))?;
        ensure!(
            meta.permissions().mode() & 0o111 != 0,
            "{} is not executable",
            host.display()
        );
        self.file(path, host, 0o755)?;
        for lib in shared_libraries(host)? {
            let guest = lib
                .to_str()
                .with_context(|| format!("non-UTF-8 path {}", lib.display()))?;
            self.file(guest, &lib, 0o755)?;
        }
        Ok(())
    }

    fn insert(&mut self, path: &str, node: Node) -> Result<()> {
        let path = path.trim_start_matches('/');
        ensure!(
            !path.is_empty()
                && path
                    .split('/')
                    .all(|c| !c.is_empty() && c != "." && c != ".."),
            "bad guest path {path:?}"
        );
        for (end, _) in path.match_indices('/') {
            let parent = &path[..end];
            match self.nodes.get(parent) {
                None => {
                    self.nodes.insert(parent.to_string(), Node::Dir);
                }
                Some(Node::Dir) => {}
                Some(_) => bail!("{path}: {parent} is not a directory in the image"),
            }
        }
        match self.nodes.get(path) {
            None => {
                self.nodes.insert(path.to_string(), node);
                Ok(())
            }
            Some(existing) if *existing == node => Ok(()),
            Some(existing) => bail!(
                "{path} added twice, as {} and as {}",
                existing.describe(),
                node.describe()
            ),
        }
    }

    /// Writes the archive through `gzip -1` (much faster than an unoptimised in-process
    /// compressor; the guest's boot time barely depends on the level), atomically.
    fn write_gzip(&self, out: &Path) -> Result<(usize, u64)> {
        let tmp = out.with_extension("partial");
        let file = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut gzip = Command::new("gzip")
            .args(["-1", "-n", "-c"])
            .stdin(Stdio::piped())
            .stdout(file)
            .spawn()
            .context("starting gzip")?;
        let stdin = BufWriter::with_capacity(1 << 20, gzip.stdin.take().expect("piped stdin"));
        let written = self.write_cpio(stdin, &tmp);
        let status = gzip.wait().context("waiting for gzip")?;
        let size = written?;
        ensure!(status.success(), "gzip failed: {status}");
        fs::rename(&tmp, out)
            .with_context(|| format!("renaming {} to {}", tmp.display(), out.display()))?;
        Ok((self.nodes.len(), size))
    }

    /// Writes the cpio archive to `out` (and closes it); returns its size.
    fn write_cpio(&self, out: impl Write, shown_as: &Path) -> Result<u64> {
        let mut writer = cpio::Writer::new(out);
        for (path, node) in &self.nodes {
            let result = match node {
                Node::Dir => writer.directory(path, 0o755),
                Node::Symlink(target) => writer.symlink(path, target),
                Node::Data { data, mode } => {
                    writer.file(path, *mode, data.len() as u64, &mut data.as_slice())
                }
                Node::HostFile { source, mode } => {
                    let mut f = File::open(source)
                        .with_context(|| format!("opening {}", source.display()))?;
                    let len = f.metadata()?.len();
                    writer.file(path, *mode, len, &mut f)
                }
            };
            result.with_context(|| format!("writing {path} to {}", shown_as.display()))?;
        }
        let (mut out, size) = writer.finish()?;
        out.flush()?;
        Ok(size)
    }
}

/// Shared libraries (and the program loader) a dynamically linked executable needs.
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .context("running ldd")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        if stdout.contains("not a dynamic executable")
            || stderr.contains("not a dynamic executable")
        {
            return Ok(Vec::new());
        }
        bail!("ldd {} failed: {}", binary.display(), stderr.trim());
    }
    parse_ldd(&stdout).with_context(|| format!("ldd {}", binary.display()))
}

fn parse_ldd(output: &str) -> Result<Vec<PathBuf>> {
    let mut libs = BTreeSet::new();
    for line in output.lines().map(str::trim) {
        if line.is_empty() || line == "statically linked" {
            continue;
        }
        let path = match line.split_once("=>") {
            Some((name, rest)) => {
                let rest = rest.trim();
                if rest.starts_with("not found") {
                    bail!("library {} not found", name.trim());
                }
                rest.split_whitespace().next()
            }
            None => line.split_whitespace().next(),
        };
        // linux-vdso.so.1 (0x...) has no path: the kernel provides it.
        if let Some(path) = path.filter(|p| p.starts_with('/')) {
            libs.insert(PathBuf::from(path));
        }
    }
    Ok(libs.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_yields_libraries_and_loader() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd5a3f2000)\n\
                   \tlibmnl.so.0 => /lib/x86_64-linux-gnu/libmnl.so.0 (0x00007f0c1a2b1000)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f0c1a0d0000)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f0c1a2e9000)\n";
        assert_eq!(
            parse_ldd(out).unwrap(),
            [
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib/x86_64-linux-gnu/libmnl.so.0",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
        assert!(parse_ldd("\tlibfoo.so.1 => not found\n").is_err());
        assert!(parse_ldd("\tstatically linked\n").unwrap().is_empty());
    }

    #[test]
    fn tree_creates_parents_and_refuses_conflicts() {
        let mut tree = Tree::default();
        tree.data("a/b/c", b"x".to_vec(), 0o644).unwrap();
        assert_eq!(tree.nodes.keys().collect::<Vec<_>>(), ["a", "a/b", "a/b/c"]);
        tree.data("/a/b/c", b"x".to_vec(), 0o644).unwrap();
        assert!(tree.data("a/b/c", b"y".to_vec(), 0o644).is_err());
        assert!(tree.data("a/b/c/d", b"y".to_vec(), 0o644).is_err());
        assert!(tree.data("a/../etc", b"y".to_vec(), 0o644).is_err());
        tree.symlink("l", "/a").unwrap();
        assert!(tree.dir("l").is_err());
    }

    #[test]
    fn real_dynamic_binary_brings_its_loader() {
        let ip = find_program("ip").expect("iproute2 installed by scripts/setup.sh");
        let libs = shared_libraries(&ip).unwrap();
        assert!(
            libs.iter()
                .any(|l| l.to_string_lossy().contains("ld-linux")),
            "{libs:?}"
        );
        assert!(
            libs.iter().any(|l| l.to_string_lossy().contains("libc.so")),
            "{libs:?}"
        );
    }
}
