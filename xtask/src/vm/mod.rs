//! `cargo xtask vm-test`: boot Debian kernels in QEMU (TCG) with an initramfs holding the
//! binaries under test, run commands inside each guest and report a kernel × command matrix.

mod cpio;
mod guest;
mod host;
mod initramfs;
mod kernels;
mod modinfo;
mod modules;
mod qemu;
mod report;
mod results;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use clap::Args;

use guest::GuestCommand;
use initramfs::{HostTools, Initramfs, Payload};
use kernels::{Kernel, KernelCache, KernelSpec};
use qemu::{VmConfig, VmFiles, VmOutcome};
use results::GuestReport;

const AGENT_BINARY: &str = "keepalive-agent";

#[derive(Args, Debug)]
pub struct VmTestArgs {
    /// Kernels to boot: 6.1, 6.12 (newest Debian package of the series), all (= 6.1,6.12), or an
    /// exact package name such as linux-image-6.1.0-56-amd64. Repeatable or comma-separated.
    #[arg(
        long = "kernel",
        value_name = "KERNEL",
        value_delimiter = ',',
        default_value = "all"
    )]
    kernels: Vec<String>,

    /// Cache directory for kernel packages, initramfs images and serial logs
    /// [default: <workspace>/.vm-cache].
    #[arg(long, value_name = "DIR")]
    cache: Option<PathBuf>,

    /// Wall-clock limit for each VM (boot, all commands, power-off), in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 600)]
    timeout: u64,

    /// Limit for each command inside the guest, in seconds (0: none but the VM's --timeout). A
    /// command over its limit is killed with everything it started, and the next one runs.
    #[arg(long, value_name = "SECS", default_value_t = 0)]
    command_timeout: u64,

    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 2048)]
    memory: u32,

    /// Guest vCPUs.
    #[arg(long, value_name = "N", default_value_t = 2)]
    cpus: u32,

    /// A binary to copy to /usr/local/bin in the guest (with its shared libraries):
    /// PATH, or NAME=PATH to rename it. Repeatable.
    #[arg(long = "bin", value_name = "[NAME=]PATH")]
    bins: Vec<String>,

    /// The agent binary to ship [default: the newer of target/{release,debug}/keepalive-agent, if built].
    #[arg(long, value_name = "PATH", conflicts_with = "no_agent")]
    agent: Option<PathBuf>,

    /// Do not ship the agent binary.
    #[arg(long)]
    no_agent: bool,

    /// Ship binaries with their debug info (by default they are copied with `strip --strip-debug`:
    /// a debug build of the agent shrinks from ~110 MB to ~15 MB, which the guest unpacks faster).
    #[arg(long)]
    keep_debug: bool,

    /// Extra kernel modules to ship and load at boot (with dependencies); a trailing * matches a
    /// prefix. nf_tables is always loaded and nft_* always shipped. Repeatable.
    #[arg(long = "module", value_name = "NAME")]
    modules: Vec<String>,

    /// A command to run in the guest, as NAME=COMMAND (a /bin/sh command line, run from /root
    /// with the binaries in PATH; PASS when it exits 0). Repeatable; commands run in the order
    /// given, after the --run commands comes the trailing command, then the self-test.
    #[arg(long = "run", value_name = "NAME=COMMAND")]
    runs: Vec<String>,

    /// Also run the built-in self-test (smoke: uname and BTF; netns-nft: loopback TCP in a netns
    /// and an nft drop rule). It is what runs when no command is given.
    #[arg(long)]
    self_test: bool,

    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,

    /// A command to run in the guest, named "command" (its words are joined with spaces).
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<String>,
}

/// What happened for one kernel.
pub struct KernelRun {
    /// What `--kernel` asked for ("6.1", or the package name).
    pub requested: String,
    pub outcome: Result<BootRun>,
}

pub struct BootRun {
    pub kernel: Kernel,
    pub config: BTreeMap<String, String>,
    pub fetch_time: Duration,
    pub initramfs: Initramfs,
    pub build_time: Duration,
    pub files: VmFiles,
    pub vm: VmOutcome,
    pub guest: GuestReport,
}

/// Runs the matrix and prints the report; true when every command passed on every kernel.
pub fn run(workspace: &Path, args: VmTestArgs) -> Result<bool> {
    let cache_dir = args
        .cache
        .clone()
        .unwrap_or_else(|| workspace.join(".vm-cache"));
    fs::create_dir_all(&cache_dir).with_context(|| format!("creating {}", cache_dir.display()))?;
    let specs = KernelSpec::parse_list(&args.kernels)?;
    let mut payload = payload(workspace, &args)?;
    if !args.keep_debug {
        payload.executables =
            stripped_copies(payload.executables, &cache_dir.join("runs").join("bin"))?;
    }
    let config = VmConfig {
        memory_mib: args.memory,
        cpus: args.cpus,
        timeout: Duration::from_secs(args.timeout),
    };
    let tools = HostTools::locate()?;
    let cache = KernelCache::new(&cache_dir)?;

    let mut runs = Vec::new();
    for spec in &specs {
        let requested = match spec {
            KernelSpec::Series(s) | KernelSpec::Package(s) => s.clone(),
        };
        let outcome = run_kernel(spec, &cache, &cache_dir, &tools, &payload, &config);
        if let Err(e) = &outcome {
            log::error!("{requested}: {e:#}");
        }
        runs.push(KernelRun { requested, outcome });
    }
    report::print(&runs, &payload.commands, &config);
    if let Some(path) = &args.json {
        let value = report::to_json(&runs, &payload.commands, &config);
        fs::write(path, serde_json::to_string_pretty(&value)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(report::all_passed(&runs, &payload.commands))
}

fn run_kernel(
    spec: &KernelSpec,
    cache: &KernelCache,
    cache_dir: &Path,
    tools: &HostTools,
    payload: &Payload,
    config: &VmConfig,
) -> Result<BootRun> {
    let started = Instant::now();
    let package = cache.resolve(spec)?;
    let kernel = cache.get(&package)?;
    if let KernelSpec::Series(series) = spec {
        cache.prune_series(series, &package)?;
    }
    let fetch_time = started.elapsed();
    let config_map = kernel.config()?;

    let run_dir = cache_dir.join("runs").join(&package);
    fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let started = Instant::now();
    let initramfs = initramfs::build(&kernel, tools, payload, &run_dir.join("initrd.gz"))
        .with_context(|| format!("building the initramfs for {package}"))?;
    let build_time = started.elapsed();
    log::info!(
        "{package}: initramfs {} entries ({} modules shipped, {} loaded at boot), {:.1} MiB ({:.1} MiB uncompressed) in {:.1} s",
        initramfs.entries,
        initramfs.shipped_modules,
        initramfs.preloaded_modules,
        mib(initramfs.compressed_bytes),
        mib(initramfs.uncompressed_bytes),
        build_time.as_secs_f64()
    );

    let files = VmFiles {
        kernel: kernel.vmlinuz(),
        initrd: initramfs.path.clone(),
        console_log: run_dir.join("console.log"),
        results_log: run_dir.join("results.log"),
        qemu_log: run_dir.join("qemu.log"),
    };
    log::info!(
        "{package}: booting (console: {})",
        files.console_log.display()
    );
    let vm = qemu::boot(&files, config)?;
    let results = fs::read_to_string(&files.results_log).unwrap_or_default();
    let guest = GuestReport::parse(&results);
    log::info!(
        "{package}: VM ended after {:.1} s ({:?})",
        vm.elapsed.as_secs_f64(),
        vm.exit
    );
    Ok(BootRun {
        kernel,
        config: config_map,
        fetch_time,
        initramfs,
        build_time,
        files,
        vm,
        guest,
    })
}

fn payload(workspace: &Path, args: &VmTestArgs) -> Result<Payload> {
    let mut executables = Vec::new();
    if !args.no_agent {
        match args.agent.clone().or_else(|| newest_agent(workspace)) {
            Some(path) => {
                ensure!(path.is_file(), "agent {} is not a file", path.display());
                log::info!("shipping agent {}", path.display());
                executables.push((AGENT_BINARY.to_string(), path));
            }
            None => log::warn!("no {AGENT_BINARY} binary under target/: not shipping the agent"),
        }
    }
    for bin in &args.bins {
        let (name, path) = match bin.split_once('=') {
            Some((name, path)) => (name.to_string(), PathBuf::from(path)),
            None => {
                let path = PathBuf::from(bin);
                let name = path
                    .file_name()
                    .with_context(|| format!("--bin {bin}: no file name"))?;
                (name.to_string_lossy().into_owned(), path)
            }
        };
        ensure!(
            !name.is_empty() && !name.contains('/'),
            "--bin {bin}: bad name {name:?}"
        );
        ensure!(
            path.is_file(),
            "--bin {bin}: {} is not a file",
            path.display()
        );
        ensure!(
            !executables.iter().any(|(n, _)| *n == name),
            "two binaries are named {name}"
        );
        executables.push((name, path));
    }

    let mut commands = args
        .runs
        .iter()
        .map(|r| GuestCommand::parse_named(r))
        .collect::<Result<Vec<_>>>()?;
    if !args.command.is_empty() {
        commands.push(GuestCommand::new("command", &args.command.join(" "))?);
    }
    if args.self_test || commands.is_empty() {
        commands.extend(guest::self_test());
    }
    guest::ensure_unique(&commands)?;

    let mut shipped_modules: Vec<String> = modules::DEFAULT_SHIPPED
        .iter()
        .map(|s| s.to_string())
        .collect();
    shipped_modules.extend(args.modules.iter().cloned());
    let mut preloaded_modules: Vec<String> = modules::DEFAULT_PRELOADED
        .iter()
        .map(|s| s.to_string())
        .collect();
    preloaded_modules.extend(args.modules.iter().cloned());
    Ok(Payload {
        executables,
        commands,
        command_timeout: args.command_timeout,
        shipped_modules,
        preloaded_modules,
    })
}

/// Copies of the executables without debug info (symbols stay, so backtraces keep function
/// names). Files `strip` does not understand (scripts) are shipped as they are.
fn stripped_copies(
    executables: Vec<(String, PathBuf)>,
    dir: &Path,
) -> Result<Vec<(String, PathBuf)>> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut copies = Vec::new();
    for (name, source) in executables {
        let copy = dir.join(&name);
        match host::run(
            Command::new("strip")
                .arg("--strip-debug")
                .arg("-o")
                .arg(&copy)
                .arg(&source),
        ) {
            Ok(_) => copies.push((name, copy)),
            Err(e) => {
                log::info!("shipping {} unstripped: {e:#}", source.display());
                copies.push((name, source));
            }
        }
    }
    Ok(copies)
}

/// The most recently built agent binary under the target directory, if any.
fn newest_agent(workspace: &Path) -> Option<PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace.join("target"), PathBuf::from);
    ["release", "debug"]
        .iter()
        .map(|profile| target.join(profile).join(AGENT_BINARY))
        .filter_map(|path| Some((fs::metadata(&path).ok()?.modified().ok()?, path)))
        .max_by_key(|(modified, _)| *modified)
        .map(|(_, path)| path)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}
