use which::which;

/// Rebuild when bpf-linker changes (aya-template does the same).
fn main() {
    let bpf_linker = which("bpf-linker").expect("bpf-linker not found: run scripts/setup.sh");
    println!("cargo:rerun-if-changed={}", bpf_linker.to_str().unwrap());
}
