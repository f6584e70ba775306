//! Project automation, run as `cargo xtask <command>`.

mod bench;
mod package;
mod vm;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "keepalive project automation")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot Debian kernels in QEMU (TCG) and run test binaries and commands inside each of them.
    VmTest(vm::VmTestArgs),
    /// Measure the agent's cost and scale on this machine; writes BENCHMARKS.md.
    Bench(bench::BenchArgs),
    /// Build the Debian package (release binary, systemd unit, default configuration, man pages,
    /// completions) into target/debian/; prints the .deb's path.
    Package(package::PackageArgs),
}

fn main() -> Result<ExitCode> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp(None)
        .format_target(false)
        .init();
    let cli = Cli::parse();
    let workspace = workspace_root()?;
    match cli.command {
        Command::VmTest(args) => {
            let all_passed = vm::run(&workspace, args)?;
            Ok(if all_passed {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Package(args) => {
            package::run(&workspace, args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(args) => {
            let all_met = bench::run(&workspace, args)?;
            Ok(if all_met { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
    }
}

/// The workspace root: the parent of this crate's manifest directory.
fn workspace_root() -> Result<PathBuf> {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map(PathBuf::from)
        .context("xtask manifest directory has no parent")
}
