#!/usr/bin/env bash
# The README's test command: installs the system packages the end-to-end suite needs when they
# are missing and this user can install them (root, or passwordless sudo), then runs the whole
# test suite. CI (.ci/run) calls exactly this.
#   - prometheus: the e2e test scrapes the server with a real Prometheus (Debian's package);
#   - python3 with venv: the e2e suite's clients (openai, pytest) live in a venv it creates under
#     target/e2e-venv from PyPI;
#   - g++: a CUDA kernel's host emulation (model/tests/sample_kernel_emulated.rs).
# Extra arguments go to `cargo test` (e.g. `tools/test.sh -p tga-model`).
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then missing+=(python3-venv); fi
# g++: model/tests/sample_kernel_emulated.rs builds a CUDA kernel for the host with it.
command -v c++ >/dev/null 2>&1 || missing+=(g++)
if [ ${#missing[@]} -gt 0 ]; then
    sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            sudo=(sudo -n)
        else
            echo "tools/test.sh: missing ${missing[*]} and cannot install them (not root, no sudo):" >&2
            echo "  apt-get install ${missing[*]}" >&2
            exit 1
        fi
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "tools/test.sh: missing ${missing[*]}; install them with your package manager" >&2
        exit 1
    fi
    echo "tools/test.sh: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -qq
    "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

exec cargo test --workspace "$@"
