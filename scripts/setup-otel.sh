#!/usr/bin/env bash
# Set-up of the OTLP receivers the export tests run against (none built on the Rust opentelemetry
# crates): a Python venv with PyPI's `rotel` (bundles `rotel-agent`, an OTLP collector) and
# `grpcio` + `opentelemetry-proto` (for tests/otlp/receiver.py), pinned in tests/otlp/requirements.txt.
#
# Source this file and call `setup_otel`, or run it directly. Idempotent: the venv is rebuilt only when
# the requirements file changed (its hash is stamped in the venv) or an import fails.
#
# The venv lives at $KEEPALIVE_OTEL_VENV, default /opt/keepalive/otel-venv; the tests look there too.
# It also gets a `rotel-agent` symlink in its bin/ directory.

KEEPALIVE_OTEL_VENV_DEFAULT=/opt/keepalive/otel-venv

setup_otel() {
    local repo venv req stamp want sudo
    repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    venv="${KEEPALIVE_OTEL_VENV:-$KEEPALIVE_OTEL_VENV_DEFAULT}"
    req="$repo/tests/otlp/requirements.txt"
    stamp="$venv/.keepalive-requirements.sha256"
    if [ "$(id -u)" -ne 0 ]; then sudo=sudo; else sudo=; fi

    want="$(sha256sum "$req" | cut -d' ' -f1)"
    if [ -x "$venv/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] \
        && "$venv/bin/python" -c 'import grpc, rotel, opentelemetry.proto.collector.trace.v1' 2>/dev/null \
        && [ -x "$venv/bin/rotel-agent" ]; then
        printf 'setup: OTLP receiver venv present (%s)\n' "$venv" >&2
        return 0
    fi

    case "$venv" in
        /?*/?*) ;;
        *) printf 'setup: refusing venv path %s (want an absolute path two levels deep or more)\n' "$venv" >&2
           return 1 ;;
    esac
    if [ -e "$venv" ]; then
        # Only ever replace a venv (never whatever else the path may name).
        if [ ! -f "$venv/pyvenv.cfg" ]; then
            printf 'setup: %s exists and is not a Python venv; not touching it\n' "$venv" >&2
            return 1
        fi
        $sudo rm -rf "$venv"
    fi
    printf 'setup: creating OTLP receiver venv in %s\n' "$venv" >&2
    $sudo mkdir -p "$(dirname "$venv")"
    $sudo python3 -m venv "$venv"
    $sudo "$venv/bin/pip" install --quiet --disable-pip-version-check --no-input -r "$req"
    local agent
    agent="$("$venv/bin/python" -c 'import os, rotel; print(os.path.join(os.path.dirname(rotel.__file__), "rotel-agent"))')"
    [ -x "$agent" ] || { printf 'setup: rotel-agent not found at %s\n' "$agent" >&2; return 1; }
    $sudo ln -sf "$agent" "$venv/bin/rotel-agent"
    printf '%s\n' "$want" | $sudo tee "$stamp" >/dev/null
    printf 'setup: OTLP receiver venv ready: %s (rotel-agent %s)\n' "$venv" \
        "$("$venv/bin/rotel-agent" --version 2>/dev/null)" >&2
}

# Kubernetes manifest validation for tests/tests/manifests.rs: PyPI's `kubernetes-validate` (the
# Kubernetes OpenAPI schemas bundled), pinned, installed into the same venv (after setup_otel made
# it) without rebuilding it. Idempotent: installs only when the pinned version is missing.
KUBERNETES_VALIDATE_VERSION=1.37.0

setup_k8s_validate() {
    local venv sudo have
    venv="${KEEPALIVE_OTEL_VENV:-$KEEPALIVE_OTEL_VENV_DEFAULT}"
    if [ "$(id -u)" -ne 0 ]; then sudo=sudo; else sudo=; fi
    # `pip show` fails while the package is missing: that is not an error here (set -e, pipefail).
    have="$("$venv/bin/pip" show kubernetes-validate 2>/dev/null | sed -n 's/^Version: //p' || true)"
    if [ "$have" = "$KUBERNETES_VALIDATE_VERSION" ] && [ -x "$venv/bin/kubernetes-validate" ]; then
        printf 'setup: kubernetes-validate %s present (%s)\n' "$have" "$venv" >&2
        return 0
    fi
    printf 'setup: installing kubernetes-validate %s into %s\n' "$KUBERNETES_VALIDATE_VERSION" "$venv" >&2
    $sudo "$venv/bin/pip" install --quiet --disable-pip-version-check --no-input \
        "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -euo pipefail
    setup_otel
    setup_k8s_validate
fi
