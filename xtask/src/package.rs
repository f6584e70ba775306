//! `cargo xtask package`: the Debian package of the agent, built with `dpkg-deb` (no other tool).
//!
//! Contents: the release binary (`/usr/bin/keepalive-agent`, debug info stripped), the systemd unit
//! (`packaging/keepalive-agent.service`, with the capability set of `packaging/capabilities`), the
//! commented default configuration (`/etc/keepalive-agent/config.toml`, a conffile), man pages and
//! bash/zsh/fish completions generated from the agent's clap definitions (its hidden `generate`
//! subcommand), and the copyright file. `cargo build --release` runs first; it does nothing when
//! `target/release` is up to date.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _, Result};
use log::info;

const PACKAGE: &str = "keepalive-agent";
const UNIT: &str = "keepalive-agent.service";
const CONFFILE: &str = "/etc/keepalive-agent/config.toml";

#[derive(clap::Args)]
pub struct PackageArgs {
    /// Directory for the .deb (default: target/debian).
    #[arg(long, value_name = "DIR")]
    out_dir: Option<PathBuf>,
}

/// Builds the package; returns the .deb's path (also printed on stdout).
pub fn run(workspace: &Path, args: PackageArgs) -> Result<PathBuf> {
    let binary = build_release(workspace)?;
    let out_dir = args.out_dir.unwrap_or_else(|| workspace.join("target/debian"));
    let arch = command_output(Command::new("dpkg").arg("--print-architecture"))?;
    let version = env!("CARGO_PKG_VERSION");
    let root = out_dir.join(format!("{PACKAGE}_{version}_{arch}"));
    if root.exists() {
        fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
    }
    stage_files(workspace, &binary, &root)?;
    write_control(&root, version, &arch, &binary)?;
    let deb = out_dir.join(format!("{PACKAGE}_{version}_{arch}.deb"));
    run_cmd(Command::new("dpkg-deb").args(["--root-owner-group", "-Zxz", "--build"]).arg(&root).arg(&deb))?;
    info!("built {}", deb.display());
    println!("{}", deb.display());
    Ok(deb)
}

/// `cargo build --release -p keepalive-agent`: the binary's path.
fn build_release(workspace: &Path) -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    run_cmd(Command::new(cargo).current_dir(workspace).args(["build", "--release", "-p", PACKAGE, "--bin", PACKAGE]))?;
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace.join("target"), |d| workspace.join(d));
    Ok(target.join("release").join(PACKAGE))
}

/// Everything under the package root but DEBIAN/.
fn stage_files(workspace: &Path, binary: &Path, root: &Path) -> Result<()> {
    let bin = root.join("usr/bin").join(PACKAGE);
    install(binary, &bin, 0o755)?;
    run_cmd(Command::new("strip").arg("--strip-debug").arg(&bin))?;
    let packaging = workspace.join("packaging");
    let caps = fs::read_to_string(packaging.join("capabilities")).context("reading packaging/capabilities")?;
    let caps = caps.split_whitespace().collect::<Vec<_>>().join(" ");
    if caps.is_empty() {
        bail!("packaging/capabilities is empty");
    }
    let unit = fs::read_to_string(packaging.join(UNIT)).with_context(|| format!("reading packaging/{UNIT}"))?;
    write(&root.join("lib/systemd/system").join(UNIT), &unit.replace("@CAPABILITIES@", &caps), 0o644)?;
    install(&packaging.join("config.toml"), &root.join(CONFFILE.trim_start_matches('/')), 0o644)?;
    generated_docs(&bin, root)?;
    let copyright = format!(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\nUpstream-Name: keepalive\n\nFiles: *\nLicense: {}\n",
        env!("CARGO_PKG_LICENSE")
    );
    write(&root.join("usr/share/doc").join(PACKAGE).join("copyright"), &copyright, 0o644)
}

/// Man pages (gzipped) and shell completions, from the staged binary's `generate` subcommand.
fn generated_docs(bin: &Path, root: &Path) -> Result<()> {
    let gen = root.parent().unwrap_or(root).join(format!("{PACKAGE}-generated"));
    if gen.exists() {
        fs::remove_dir_all(&gen)?;
    }
    run_cmd(Command::new(bin).arg("generate").arg("--out-dir").arg(&gen))?;
    let man_dir = root.join("usr/share/man/man1");
    fs::create_dir_all(&man_dir)?;
    for entry in fs::read_dir(gen.join("man1"))? {
        let page = entry?.path();
        let name = page.file_name().context("man page without a name")?.to_string_lossy().into_owned();
        let gz = man_dir.join(format!("{name}.gz"));
        let out = fs::File::create(&gz).with_context(|| format!("creating {}", gz.display()))?;
        run_cmd(Command::new("gzip").args(["-9", "-n", "-c"]).arg(&page).stdout(out))?;
    }
    let completions = gen.join("completions");
    install(&completions.join(PACKAGE.to_string() + ".bash"), &root.join("usr/share/bash-completion/completions").join(PACKAGE), 0o644)?;
    install(&completions.join(format!("_{PACKAGE}")), &root.join("usr/share/zsh/vendor-completions").join(format!("_{PACKAGE}")), 0o644)?;
    install(&completions.join(format!("{PACKAGE}.fish")), &root.join("usr/share/fish/vendor_completions.d").join(format!("{PACKAGE}.fish")), 0o644)?;
    fs::remove_dir_all(&gen)?;
    Ok(())
}

/// DEBIAN/: control, conffiles and the maintainer scripts (systemd reload and stop only: the
/// service is not enabled or started by installing; see the README).
fn write_control(root: &Path, version: &str, arch: &str, binary: &Path) -> Result<()> {
    let installed_kib = dir_size(root)?.div_ceil(1024);
    let glibc = glibc_requirement(binary)?;
    let control = format!(
        "Package: {PACKAGE}\nVersion: {version}\nArchitecture: {arch}\nMaintainer: keepalive developers <keepalive@localhost>\n\
         Installed-Size: {installed_kib}\nDepends: libc6 (>= {glibc})\nSection: net\nPriority: optional\n\
         Description: makes TCP keep-alive visible (eBPF agent)\n \
         Per-connection keep-alive timelines from the live kernel (probes, answers, timeouts,\n \
         resets), exported as OpenTelemetry traces or JSON lines. Needs Linux 5.8+ with BTF.\n"
    );
    let debian = root.join("DEBIAN");
    write(&debian.join("control"), &control, 0o644)?;
    write(&debian.join("conffiles"), &format!("{CONFFILE}\n"), 0o644)?;
    let reload = "if [ -d /run/systemd/system ]; then systemctl --system daemon-reload >/dev/null || true; fi\n";
    write(&debian.join("postinst"), &format!("#!/bin/sh\nset -e\n{reload}exit 0\n"), 0o755)?;
    let stop = format!(
        "if [ -d /run/systemd/system ] && [ \"$1\" = remove ]; then systemctl stop {UNIT} >/dev/null 2>&1 || true; fi\n"
    );
    write(&debian.join("prerm"), &format!("#!/bin/sh\nset -e\n{stop}exit 0\n"), 0o755)?;
    write(&debian.join("postrm"), &format!("#!/bin/sh\nset -e\n{reload}exit 0\n"), 0o755)
}

/// The newest `GLIBC_x.y` symbol version the binary refers to (its libc6 dependency).
fn glibc_requirement(binary: &Path) -> Result<String> {
    let bytes = fs::read(binary).with_context(|| format!("reading {}", binary.display()))?;
    let mut best: Option<(u32, u32)> = None;
    for at in memchr_all(&bytes, b"GLIBC_2.") {
        let digits = |s: &[u8]| s.iter().take_while(|b| b.is_ascii_digit()).count();
        let rest = &bytes[at + 8..];
        let n = digits(rest);
        let minor: u32 = std::str::from_utf8(&rest[..n]).ok().and_then(|s| s.parse().ok()).unwrap_or(0);
        best = best.max(Some((2, minor)));
    }
    let (major, minor) = best.context("the binary refers to no GLIBC_2.x symbol version")?;
    Ok(format!("{major}.{minor}"))
}

/// Offsets of every occurrence of `needle` in `hay`.
fn memchr_all<'a>(hay: &'a [u8], needle: &'a [u8]) -> impl Iterator<Item = usize> + 'a {
    hay.windows(needle.len()).enumerate().filter(move |(_, w)| *w == needle).map(|(i, _)| i)
}

fn dir_size(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let md = entry.metadata()?;
        total += if md.is_dir() { dir_size(&entry.path())? } else { md.len() };
    }
    Ok(total)
}

fn install(from: &Path, to: &Path, mode: u32) -> Result<()> {
    let bytes = fs::read(from).with_context(|| format!("reading {}", from.display()))?;
    write_bytes(to, &bytes, mode)
}

fn write(to: &Path, text: &str, mode: u32) -> Result<()> {
    write_bytes(to, text.as_bytes(), mode)
}

fn write_bytes(to: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(dir) = to.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
    }
    fs::write(to, bytes).with_context(|| format!("writing {}", to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode)).with_context(|| format!("chmod {}", to.display()))
}

fn run_cmd(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn command_output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}
