//! Running host programs.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Runs a command to completion; its stdout on success, an error with its stderr otherwise.
pub fn run(command: &mut Command) -> Result<String> {
    Ok(String::from_utf8_lossy(&run_bytes(command)?).into_owned())
}

/// Like `run`, with stdout as bytes.
pub fn run_bytes(command: &mut Command) -> Result<Vec<u8>> {
    let shown = format!("{command:?}");
    let out = command
        .output()
        .with_context(|| format!("starting {shown}"))?;
    if !out.status.success() {
        bail!(
            "{shown} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

/// A program in PATH or in the usual sbin directories (absent from a non-root PATH).
pub fn find_program(name: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .with_context(|| format!("{name} not found in PATH"))
}
