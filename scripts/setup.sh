#!/usr/bin/env bash
# Idempotent set-up of everything keepalive needs on a fresh Debian 12 machine (run as root).
# Installs: apt packages (LLVM 22 for bpf-linker, nftables and iproute2 for the tests, nginx-light
# for the accepted-socket tests and the hostload benchmark, wrk for the hostload benchmark, QEMU and busybox for the kernel matrix, python3-venv for the OTLP
# receivers; systemd (systemd-analyze) and binutils (strip) for the Debian package and its test), the nightly rust-src component, and bpf-linker built against Debian's LLVM 22; mounts
# tracefs where it is not (the accept_owner hook's syscalls tracepoints need it).
set -euo pipefail

log() { printf 'setup: %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
    SUDO=sudo
else
    SUDO=
fi

APT_PACKAGES=(
    llvm-22-dev libclang-22-dev libpolly-22-dev zlib1g-dev libzstd-dev libxml2-dev
    nftables iproute2 procps nginx-light wrk
    qemu-system-x86 busybox-static cpio
    python3-venv prometheus
    systemd binutils
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing apt packages: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    log "apt packages present"
fi

# Classic tracepoints (syscalls:sys_exit_accept4) are found through tracefs; systemd mounts it at
# boot, minimal containers and VMs may not.
if [ -d /sys/kernel/tracing ] && [ -z "$(ls -A /sys/kernel/tracing 2>/dev/null)" ] \
    && [ -z "$(ls -A /sys/kernel/debug/tracing 2>/dev/null)" ]; then
    log "mounting tracefs at /sys/kernel/tracing"
    $SUDO mount -t tracefs nodev /sys/kernel/tracing
else
    log "tracefs present"
fi

if ! rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^rust-src'; then
    log "adding rust-src to the nightly toolchain"
    rustup component add rust-src --toolchain nightly
else
    log "nightly rust-src present"
fi

BPF_LINKER_VERSION=0.13.0
if ! command -v bpf-linker >/dev/null 2>&1 || ! bpf-linker --version 2>/dev/null | grep -q "$BPF_LINKER_VERSION"; then
    log "building bpf-linker $BPF_LINKER_VERSION against LLVM 22 (a few minutes)"
    LLVM_PREFIX=/usr/lib/llvm-22 cargo install --locked bpf-linker --version "$BPF_LINKER_VERSION" \
        --no-default-features --features llvm-22
else
    log "bpf-linker present: $(bpf-linker --version)"
fi
# OTLP receivers for the export tests (a pinned Python venv; see scripts/setup-otel.sh).
# shellcheck source=scripts/setup-otel.sh
. "$(dirname "${BASH_SOURCE[0]}")/setup-otel.sh"
setup_otel
setup_k8s_validate

log "done"
