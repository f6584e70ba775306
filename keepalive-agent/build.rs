//! Builds the eBPF programs (`keepalive-ebpf`) for `bpfel-unknown-none` with the nightly toolchain
//! and bpf-linker, and places the object in OUT_DIR for `include_bytes_aligned!`.
//!
//! `AYA_BUILD_SKIP=1` skips the eBPF build (for working on pure user-space code); an empty object is
//! written instead and loading it fails at run time with a clear error.
//!
//! `KEEPALIVE_EBPF_TOOLCHAIN` names the rustup toolchain for the eBPF build (default `nightly`):
//! its LLVM must be the one bpf-linker was built against (LLVM 22), which the newest nightly stops
//! being when Rust moves to the next LLVM (the container image pins one, see deploy/Containerfile).
use anyhow::{anyhow, Context as _};
use aya_build::Toolchain;

fn main() -> anyhow::Result<()> {
    let out_dir = std::env::var_os("OUT_DIR").ok_or_else(|| anyhow!("OUT_DIR not set"))?;
    let skip = std::env::var("AYA_BUILD_SKIP")
        .map(|v| v == "1" || v.eq_ignore_ascii_case("true"))
        .unwrap_or(false);
    if skip {
        let obj = std::path::Path::new(&out_dir).join("keepalive");
        if !obj.exists() {
            std::fs::write(&obj, b"").context("writing placeholder eBPF object")?;
        }
        println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
        return Ok(());
    }
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("MetadataCommand::exec")?;
    let ebpf_package = packages
        .into_iter()
        .find(|cargo_metadata::Package { name, .. }| name.as_str() == "keepalive-ebpf")
        .ok_or_else(|| anyhow!("keepalive-ebpf package not found"))?;
    let cargo_metadata::Package { name, manifest_path, .. } = ebpf_package;
    let root_dir = manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {manifest_path}"))?
        .as_str();
    println!("cargo:rerun-if-env-changed=KEEPALIVE_EBPF_TOOLCHAIN");
    let toolchain = std::env::var("KEEPALIVE_EBPF_TOOLCHAIN").ok().filter(|t| !t.is_empty());
    aya_build::build_ebpf(
        [aya_build::Package { name: name.as_str(), root_dir, ..Default::default() }],
        toolchain.as_deref().map_or(Toolchain::Nightly, Toolchain::Custom),
    )
}
