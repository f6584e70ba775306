//! `cargo xtask vm-test`: boot Debian kernels in QEMU (TCG) with an initramfs holding the
//! binaries under test and run things inside each guest.
//!
//! Two modes:
//! - the matrix (the default, without `--run`, a trailing command or `--self-test`): builds the
//!   agent and the integration tests in release, then for each kernel (each guest, booted once,
//!   and the host's own kernel) and each attach method checks whether the kernel supports the
//!   method and, if it does, runs every scenario under it; prints a kernel × method × scenario
//!   matrix, writes it as JSON (`<cache>/matrix.json`, and `--json`), and with `--update-readme`
//!   regenerates the README's compatibility table from it (see [`matrix`], [`readme`]);
//! - commands: the `--run` commands (and the trailing one, and with `--self-test` the built-in
//!   smoke and network checks) in every guest, reported as a kernel × command matrix.
//!
//! The 1000-connection scenario runs on the host only unless `--scenario scale` asks for it:
//! under TCG it passes, but it once crashed the guest kernel while the fentry trampoline was
//! patched with 1000 timers firing (see [`matrix::SCENARIOS`]).

mod artifacts;
mod cpio;
mod guest;
mod host;
mod hostrun;
mod initramfs;
mod kernels;
mod matrix;
mod modinfo;
mod modules;
mod qemu;
mod readme;
mod report;
mod report_matrix;
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
use matrix::{KernelResult, Method, Place};
use qemu::{VmConfig, VmFiles, VmOutcome};
use results::GuestReport;

const AGENT_BINARY: &str = "keepalive-agent";

/// Defaults that depend on the mode (commands, matrix).
const COMMANDS_VM_TIMEOUT: u64 = 600;
const MATRIX_VM_TIMEOUT: u64 = 2400;
const MATRIX_COMMAND_TIMEOUT: u64 = 600;

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

    /// Wall-clock limit for each VM (boot, all commands, power-off), in seconds [default: 600;
    /// matrix: 2400].
    #[arg(long, value_name = "SECS")]
    timeout: Option<u64>,

    /// Limit for each command inside the guest (and, in the matrix, each check or scenario on the
    /// host), in seconds (0: none but the VM's --timeout). A command over its limit is killed with
    /// everything it started, and the next one runs [default: 0; matrix: 300].
    #[arg(long, value_name = "SECS")]
    command_timeout: Option<u64>,

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

    /// The agent binary to ship [default: the newer of target/{release,debug}/keepalive-agent, if
    /// built; matrix: built with `cargo build --release`].
    #[arg(long, value_name = "PATH", conflicts_with = "no_agent")]
    agent: Option<PathBuf>,

    /// Matrix: an integration test binary already built, as TARGET=PATH (TARGET: keepalive or
    /// privilege, the file under tests/tests/) or PATH (the keepalive one). Repeatable [default:
    /// the targets the scenarios need, built with `cargo test --release -p keepalive-tests --test
    /// TARGET --no-run`].
    #[arg(long = "test-bin", value_name = "[TARGET=]PATH")]
    test_bins: Vec<String>,

    /// Matrix: attach methods to try (comma-separated or repeated) [default: all].
    #[arg(long = "method", value_name = "METHOD", value_delimiter = ',', value_enum)]
    methods: Vec<Method>,

    /// Matrix: scenarios to run, by short name (healthy, dead-v4, dead-v6, user-timeout,
    /// suppressed, snapshot, settings, one-way, scale, priv-dead, priv-missing, priv-snapshot) or test
    /// name, or `all` [default: all; scale runs on the host only unless named].
    #[arg(long = "scenario", value_name = "NAME", value_delimiter = ',')]
    scenarios: Vec<String>,

    /// Matrix: how many times a failed scenario runs again (a pass after a failure is reported
    /// as FLAKY, which does not fail the run).
    #[arg(long, value_name = "N", default_value_t = 1)]
    retries: u32,

    /// Matrix: skip the host's own kernel.
    #[arg(long, conflicts_with = "no_vm")]
    no_host: bool,

    /// Matrix: only the host's own kernel (no VM).
    #[arg(long)]
    no_vm: bool,

    /// Matrix: regenerate the README's compatibility table from this run.
    #[arg(long)]
    update_readme: bool,

    /// Only regenerate the README's compatibility table from the latest matrix JSON
    /// (<cache>/matrix.json, or --json PATH), without running anything.
    #[arg(long, conflicts_with_all = ["update_readme", "runs", "self_test", "command"])]
    readme_only: bool,

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

    /// Also write the results as JSON to this file (the matrix is always written to
    /// <cache>/matrix.json too).
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

impl VmTestArgs {
    /// Whether this is a commands run rather than the matrix.
    fn commands_mode(&self) -> bool {
        !self.runs.is_empty() || !self.command.is_empty() || self.self_test
    }
}

/// Runs what the arguments ask for and prints the report; true when everything passed.
pub fn run(workspace: &Path, args: VmTestArgs) -> Result<bool> {
    let cache_dir = args
        .cache
        .clone()
        .unwrap_or_else(|| workspace.join(".vm-cache"));
    fs::create_dir_all(&cache_dir).with_context(|| format!("creating {}", cache_dir.display()))?;
    if args.readme_only {
        let source = args
            .json
            .clone()
            .unwrap_or_else(|| cache_dir.join(MATRIX_JSON));
        let text = fs::read_to_string(&source).with_context(|| {
            format!("reading {} (run `cargo xtask vm-test` first)", source.display())
        })?;
        let matrix: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("parsing {}", source.display()))?;
        readme::update_file(&workspace.join("README.md"), &matrix)?;
        return Ok(true);
    }
    if args.commands_mode() {
        ensure!(
            !args.update_readme,
            "--update-readme goes with the matrix (no --run, command or --self-test)"
        );
        run_commands(workspace, &cache_dir, args)
    } else {
        run_matrix(workspace, &cache_dir, args)
    }
}

/// Where the latest matrix JSON is kept, under the cache directory.
const MATRIX_JSON: &str = "matrix.json";

/// The matrix: see the module documentation.
fn run_matrix(workspace: &Path, cache_dir: &Path, args: VmTestArgs) -> Result<bool> {
    let started = Instant::now();
    let methods: Vec<Method> = if args.methods.is_empty() {
        Method::ALL.to_vec()
    } else {
        let mut m = args.methods.clone();
        m.sort();
        m.dedup();
        m
    };
    let scenarios = matrix::select_scenarios(&args.scenarios)?;
    let specs = if args.no_vm {
        Vec::new()
    } else {
        KernelSpec::parse_list(&args.kernels)?
    };
    let command_timeout = args.command_timeout.unwrap_or(MATRIX_COMMAND_TIMEOUT);
    let config = VmConfig {
        memory_mib: args.memory,
        cpus: args.cpus,
        timeout: Duration::from_secs(args.timeout.unwrap_or(MATRIX_VM_TIMEOUT)),
    };

    ensure!(!args.no_agent, "the matrix needs the agent (--no-agent is for commands)");
    let build_started = Instant::now();
    let agent = match &args.agent {
        Some(p) => p.clone(),
        None => artifacts::build_agent(workspace)?,
    };
    ensure!(agent.is_file(), "agent {} is not a file", agent.display());
    let tests = test_binaries(workspace, &args.test_bins, &scenarios)?;
    let build_seconds = build_started.elapsed().as_secs_f64();
    log::info!("agent {}, tests {tests:?}", agent.display());

    let mut kernels: Vec<KernelResult> = Vec::new();
    if !args.no_host {
        let host = hostrun::HostRun {
            agent: &agent,
            tests: &tests,
            methods: &methods,
            scenarios: &scenarios,
            command_timeout: Duration::from_secs(command_timeout),
            retries: args.retries,
            log_dir: cache_dir.join("runs").join("host"),
        }
        .run();
        log::info!("{}", report_matrix::summary_line(&host));
        kernels.push(host);
    }

    if !specs.is_empty() {
        let mut executables = vec![(AGENT_BINARY.to_string(), agent.clone())];
        executables.extend(
            tests
                .iter()
                .map(|(target, path)| (matrix::guest_test_binary(target), path.clone())),
        );
        if !args.keep_debug {
            executables = stripped_copies(executables, &cache_dir.join("runs").join("bin"))?;
        }
        let mut payload = base_payload(&args, executables)?;
        payload.commands = matrix::guest_commands(&methods, &scenarios, args.retries)?;
        payload.command_timeout = command_timeout;
        let tools = HostTools::locate()?;
        let cache = KernelCache::new(cache_dir)?;
        for spec in &specs {
            let label = match spec {
                KernelSpec::Series(s) | KernelSpec::Package(s) => s.clone(),
            };
            let kernel_started = Instant::now();
            let result = match run_kernel(spec, &cache, cache_dir, &tools, &payload, &config) {
                Ok(boot) => report_matrix::from_boot(&label, &boot, &methods, &scenarios),
                Err(e) => {
                    log::error!("{label}: {e:#}");
                    KernelResult::failed(
                        &label,
                        Place::Vm,
                        format!("{e:#}"),
                        kernel_started.elapsed().as_secs_f64(),
                    )
                }
            };
            log::info!("{}", report_matrix::summary_line(&result));
            kernels.push(result);
        }
    }

    let timings = report_matrix::Timings {
        build_seconds,
        total_seconds: started.elapsed().as_secs_f64(),
        vm_cpus: args.cpus,
    };
    report_matrix::print(&kernels, &scenarios, &timings);
    let value = report_matrix::to_json(&kernels, &scenarios, &methods, &timings);
    let latest = cache_dir.join(MATRIX_JSON);
    report_matrix::write_json(&latest, &value)?;
    println!();
    println!("matrix JSON: {}", latest.display());
    if let Some(path) = &args.json {
        report_matrix::write_json(path, &value)?;
    }
    if args.update_readme {
        readme::update_file(&workspace.join("README.md"), &value)?;
    }
    let passed = report_matrix::all_passed(&kernels);
    println!("{}", if passed { "matrix: PASS" } else { "matrix: FAIL" });
    Ok(passed)
}

/// The test binary of each target the scenarios need: those given with `--test-bin`, the others
/// built; each checked to hold its scenarios' tests (a renamed test must not pass as "0 run").
fn test_binaries(
    workspace: &Path,
    given: &[String],
    scenarios: &[matrix::Scenario],
) -> Result<Vec<(String, PathBuf)>> {
    let targets = matrix::test_targets(scenarios);
    let mut found: Vec<(String, PathBuf)> = Vec::new();
    for value in given {
        let (target, path) = match value.split_once('=') {
            Some((t, p)) => (t.to_string(), PathBuf::from(p)),
            None => (matrix::KEEPALIVE_TARGET.to_string(), PathBuf::from(value)),
        };
        ensure!(
            targets.contains(&target.as_str()),
            "--test-bin {value}: no selected scenario is in target {target:?} (targets: {targets:?})"
        );
        ensure!(path.is_file(), "--test-bin {value}: {} is not a file", path.display());
        found.push((target, path));
    }
    let missing: Vec<&str> = targets
        .iter()
        .copied()
        .filter(|t| !found.iter().any(|(f, _)| f == t))
        .collect();
    found.extend(artifacts::build_tests(workspace, &missing)?);
    for (target, path) in &found {
        let available = artifacts::list_tests(path)?;
        let wanted: Vec<&str> = scenarios
            .iter()
            .filter(|s| s.target == target)
            .map(|s| s.test)
            .collect();
        artifacts::ensure_tests_exist(&available, &wanted)
            .with_context(|| format!("test binary {} ({target})", path.display()))?;
    }
    Ok(found)
}

/// The `--run` commands (and the trailing one, and the self-test) in every guest.
fn run_commands(workspace: &Path, cache_dir: &Path, args: VmTestArgs) -> Result<bool> {
    let cache_dir = cache_dir.to_path_buf();
    let specs = KernelSpec::parse_list(&args.kernels)?;
    let mut payload = payload(workspace, &args)?;
    if !args.keep_debug {
        payload.executables =
            stripped_copies(payload.executables, &cache_dir.join("runs").join("bin"))?;
    }
    let config = VmConfig {
        memory_mib: args.memory,
        cpus: args.cpus,
        timeout: Duration::from_secs(args.timeout.unwrap_or(COMMANDS_VM_TIMEOUT)),
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

/// The modules (default ones and `--module`) and no commands yet.
fn base_payload(args: &VmTestArgs, executables: Vec<(String, PathBuf)>) -> Result<Payload> {
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
        commands: Vec::new(),
        command_timeout: args.command_timeout.unwrap_or(0),
        shipped_modules,
        preloaded_modules,
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
    let mut payload = base_payload(args, executables)?;
    payload.commands = commands;
    Ok(payload)
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
