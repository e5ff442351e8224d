#!/usr/bin/env bash
# Build tga-serve with `--features cuda` on a machine without a GPU or a CUDA toolkit, and pack the
# binaries for a lent GPU machine (tools/gpu_check.sh and tools/gpu_bench.sh run them there).
#
#   tools/cuda_build.sh              toolchain + stub + links, cargo builds, .cudabin/*.gz
#   tools/cuda_build.sh --toolchain  only the steps before cargo (then `. tools/cuda/env.sh`)
#   tools/cuda_build.sh --stub DIR   only write the stub libcuda.so (+ cuda_stub.c, syms.txt) to DIR
#   tools/cuda_build.sh --check      CI: clippy over the workspace with `--features tga-serve/cuda`
#                                    (every target, -D warnings) in the workspace's target; see below
#
# Idempotent: each step is skipped when its result is already there. It sets up, under tools/cuda/
# (ignored by git):
#   py/    the CUDA 13.0 PyPI wheels (pinned below, as in shared/docs/CANDLE.md), pip --target;
#          they form a toolchain under py/nvidia/cu13 (nvcc, cicc, headers, libraries)
#   stub/  cuda_stub.c + syms.txt: every `cu*` function cudarc's driver bindings declare (taken
#          from the cudarc version in Cargo.lock), each a dummy returning 999
#   link/  libcuda.so (that stub, soname libcuda.so.1: it only satisfies the linker; the driver's
#          real libcuda.so.1 is used at run time) and unversioned .so links to the wheel libraries
#   env.sh the variables below, to source for manual cargo commands
# then builds with CARGO_TARGET_DIR=target/cuda (kept apart from the CPU build) and
# CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90} (H100/H200), strips the binaries and gzips them into
# .cudabin/ (excluded through .git/info/exclude): the stripped binaries together exceed the device
# tool's 64 MiB limit on carried files, gzipped tga-serve and parity are about 31 MB (kernels, the
# paged attention test, about as much as parity). tga-loadtest
# (for tools/gpu_bench.sh) needs no CUDA: it is a plain release build, made in the same target
# directory so that it shares the dependencies built there, and packed beside them (a few MB).
#
# Takes about 25 minutes on 2 cores from a cold target/cuda (candle's CUDA kernels dominate).
#
# --check is what CI runs so that the CUDA code cannot rot between GPU runs: every Rust line behind
# the `cuda` feature is type-checked and linted, and every PTX kernel (candle's and
# model/cuda/*.cu, which model/build.rs compiles) is compiled by nvcc. It installs only the
# compiler wheels (no cuBLAS/cuRAND: nothing is linked) and sets NVCC to tools/nvcc_ci.sh, which
# runs the real nvcc for everything except candle's statically linked GGUF/MoE objects
# (mmq_*, mmvq_gguf, moe_*: quantized kernels tga-serve never calls, ~10 of the 12 minutes
# candle-kernels' build script takes on 2 cores); for those it writes an empty object, which is
# harmless because `cargo clippy` links nothing. It checks in the workspace's own target directory
# (or $CARGO_TARGET_DIR), so every dependency the `cuda` feature does not change is reused from
# CI's earlier clippy phase: after it, 82 s here (21 units: candle-*, cudarc, the build scripts and
# our crates; candle-kernels' build script 34 s, ours 8 s), where a separate directory took 13.5
# minutes from cold.
# Needs python3 with venv (or tools/.venv), gcc, strip, gzip, cargo and network for the wheels.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
T=$ROOT/tools/cuda
# The compiler's wheels (enough for --check), then the libraries a linked build needs.
COMPILER_WHEELS=(nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88
                 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85)
WHEELS=("${COMPILER_WHEELS[@]}" nvidia-cuda-nvrtc==13.0.88 nvidia-curand==10.4.0.35
        nvidia-cublas==13.0.2.14)
LIBS=(libcudart.so.13 libnvrtc.so.13 libcurand.so.10 libcublas.so.13 libcublasLt.so.13)

log() { printf '== %s\n' "$*" >&2; }
die() { printf 'cuda_build.sh: %s\n' "$*" >&2; exit 1; }

# --- the cudarc driver bindings whose symbols the stub must export
cudarc_mod_rs() {
  local ver f
  ver=$(awk '/^name = "cudarc"$/ {getline; gsub(/[^0-9A-Za-z.+-]/, "", $3); print $3; exit}' Cargo.lock)
  [ -n "$ver" ] || die "no cudarc in Cargo.lock"
  f=$(compgen -G "${CARGO_HOME:-$HOME/.cargo}/registry/src/*/cudarc-$ver/src/driver/sys/mod.rs" | head -1 || true)
  if [ -z "$f" ]; then
    log "cudarc $ver not in the cargo registry: cargo fetch"
    cargo fetch --locked >&2
    f=$(compgen -G "${CARGO_HOME:-$HOME/.cargo}/registry/src/*/cudarc-$ver/src/driver/sys/mod.rs" | head -1 || true)
  fi
  [ -n "$f" ] || die "cudarc-$ver/src/driver/sys/mod.rs not found under ${CARGO_HOME:-$HOME/.cargo}/registry/src"
  printf '%s\n' "$f"
}

# --- stub libcuda.so into $1 (cuda_stub.c, syms.txt, libcuda.so); skipped when syms.txt is unchanged
make_stub() {
  local dir=$1 src tmp n
  mkdir -p "$dir"
  src=$(cudarc_mod_rs)
  tmp=$(mktemp)
  grep -oE '\bfn cu[A-Za-z0-9_]*' "$src" | sed 's/^fn //' | LC_ALL=C sort -u > "$tmp"
  n=$(wc -l < "$tmp")
  [ "$n" -gt 100 ] || { rm -f "$tmp"; die "only $n cu* functions found in $src"; }
  if [ -f "$dir/libcuda.so" ] && cmp -s "$tmp" "$dir/syms.txt"; then
    rm -f "$tmp"; log "stub libcuda.so up to date ($n symbols, $src)"; return
  fi
  mv "$tmp" "$dir/syms.txt"; chmod 644 "$dir/syms.txt"
  sed 's/.*/int &(void){return 999;}/' "$dir/syms.txt" > "$dir/cuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$dir/libcuda.so" "$dir/cuda_stub.c"
  log "stub libcuda.so: $n symbols from $src"
}

# toolchain [--compiler-only]: the compiler-only form skips the library wheels, the stub and the links.
toolchain() {
  local py missing w d lib wheels=("${WHEELS[@]}")
  if [ "${1:-}" = --compiler-only ]; then wheels=("${COMPILER_WHEELS[@]}"); fi
  mkdir -p "$T/py" "$T/link" "$T/stub"
  # 1. wheels: one dist-info directory per pinned version (nvidia_cuda_nvcc-13.0.88.dist-info)
  missing=()
  for w in "${wheels[@]}"; do
    d="$(printf '%s' "${w%%==*}" | tr - _)-${w##*==}.dist-info"
    [ -d "$T/py/$d" ] || missing+=("$w")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    # A venv's pip: Debian's python3 has none of its own (and refuses system installs).
    if [ -x tools/.venv/bin/python ]; then py=tools/.venv/bin/python
    else
      [ -x "$T/venv/bin/python" ] || python3 -m venv "$T/venv"
      py=$T/venv/bin/python
    fi
    log "pip install --target tools/cuda/py ${missing[*]}"
    "$py" -m pip install --quiet --no-deps --upgrade --target "$T/py" "${wheels[@]}"
  else
    log "CUDA wheels present (${#wheels[@]})"
  fi
  CUDA_HOME=$T/py/nvidia/cu13
  if [ ! -x "$CUDA_HOME/bin/nvcc" ] || [ ! -x "$CUDA_HOME/nvvm/bin/cicc" ]; then die "no nvcc/cicc under $CUDA_HOME"; fi
  if [ "${1:-}" = --compiler-only ]; then
    export CUDA_HOME CUDA_PATH=$CUDA_HOME
    export PATH=$CUDA_HOME/bin:$CUDA_HOME/nvvm/bin:$PATH
    export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
    log "$(nvcc --version | tail -2 | head -1); CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP"
    return
  fi
  # 2. stub libcuda.so
  make_stub "$T/stub"
  if ! cmp -s "$T/stub/libcuda.so" "$T/link/libcuda.so"; then cp "$T/stub/libcuda.so" "$T/link/libcuda.so"; fi
  # 3. unversioned links (libcudart.so -> .../libcudart.so.13, ...)
  for lib in "${LIBS[@]}"; do
    [ -e "$CUDA_HOME/lib/$lib" ] || die "missing $CUDA_HOME/lib/$lib"
    if [ "$(readlink -f "$T/link/${lib%.so.*}.so")" != "$(readlink -f "$CUDA_HOME/lib/$lib")" ]; then
      ln -sfn "../py/nvidia/cu13/lib/$lib" "$T/link/${lib%.so.*}.so"
    fi
  done
  # 4. environment (also written to tools/cuda/env.sh for manual use)
  export CUDA_HOME CUDA_PATH=$CUDA_HOME
  export PATH=$CUDA_HOME/bin:$CUDA_HOME/nvvm/bin:$PATH
  export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
  export RUSTFLAGS="-L native=$T/link"
  export LIBRARY_PATH=$T/link${LIBRARY_PATH:+:$LIBRARY_PATH}
  export CARGO_TARGET_DIR=$ROOT/target/cuda
  cat > "$T/env.sh" <<EOF
# source me (written by tools/cuda_build.sh): CUDA 13.0 toolchain from PyPI wheels, no GPU needed
export CUDA_HOME=$CUDA_HOME CUDA_PATH=$CUDA_HOME
export PATH=\$CUDA_HOME/bin:\$CUDA_HOME/nvvm/bin:\$PATH
export CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-90}
export RUSTFLAGS="-L native=$T/link"
export LIBRARY_PATH=$T/link\${LIBRARY_PATH:+:\$LIBRARY_PATH}
export CARGO_TARGET_DIR=$ROOT/target/cuda
EOF
  log "$(nvcc --version | tail -2 | head -1); CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP; CARGO_TARGET_DIR=$CARGO_TARGET_DIR"
}

pack() {  # $1 binary, $2 name in .cudabin/
  strip -o ".cudabin/$2.tmp" "$1"
  gzip -c ".cudabin/$2.tmp" > ".cudabin/$2.gz.tmp"
  rm -f ".cudabin/$2.tmp"
  mv ".cudabin/$2.gz.tmp" ".cudabin/$2.gz"
}

case "${1:-}" in
  --stub) [ $# -eq 2 ] || die "usage: $0 --stub DIR"; make_stub "$2"; exit 0 ;;
  --toolchain) toolchain; exit 0 ;;
  --check)
    toolchain --compiler-only
    export TGA_REAL_NVCC=$CUDA_HOME/bin/nvcc NVCC=$ROOT/tools/nvcc_ci.sh
    log "cargo clippy --locked --workspace --all-targets --features tga-serve/cuda -- -D warnings"
    cargo clippy --locked --workspace --all-targets --features tga-serve/cuda -- -D warnings
    exit 0 ;;
  "") ;;
  *) die "usage: $0 [--toolchain | --check | --stub DIR]" ;;
esac

toolchain
t0=$(date +%s)
log "cargo build --release --locked -p tga-serve --bin tga-serve --features cuda"
cargo build --release --locked -p tga-serve --bin tga-serve --features cuda
log "cargo build --release --locked -p tga-loadtest --bin tga-loadtest (no CUDA in it)"
cargo build --release --locked -p tga-loadtest --bin tga-loadtest
# build_test NAME: the tga-model integration test binary NAME, built for CUDA; prints its path.
build_test() {
  local name=$1 msgs exe
  log "cargo test --release --locked -p tga-model --features cuda --test $name --no-run"
  msgs=$(mktemp)
  cargo test --release --locked -p tga-model --features cuda --test "$name" --no-run \
    --message-format=json-render-diagnostics > "$msgs"
  exe=$(python3 - "$msgs" "$name" <<'PY'
import json, sys
exe = None
for line in open(sys.argv[1]):
    try: m = json.loads(line)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == sys.argv[2] and m.get("executable"):
        exe = m["executable"]
print(exe or "")
PY
  ) || exe=""
  rm -f "$msgs"
  if [ -z "$exe" ]; then  # fall back to the newest test binary
    exe=$(find "$CARGO_TARGET_DIR/release/deps" -maxdepth 1 -type f -executable -name "$name-*" -printf '%T@ %p\n' \
      | sort -rn | head -1 | cut -d' ' -f2-)
  fi
  if [ -z "$exe" ] || [ ! -x "$exe" ]; then die "$name test binary not found"; fi
  printf '%s\n' "$exe"
}
parity=$(build_test parity)
kernels=$(build_test kernels)
log "built in $(( $(date +%s) - t0 ))s: $CARGO_TARGET_DIR/release/tga-serve, $parity, $kernels"

mkdir -p .cudabin
pack "$CARGO_TARGET_DIR/release/tga-serve" tga-serve
pack "$parity" parity
pack "$kernels" kernels
pack "$CARGO_TARGET_DIR/release/tga-loadtest" tga-loadtest
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.cudabin/' "$exclude" 2>/dev/null || echo '/.cudabin/' >> "$exclude"
ls -l .cudabin/tga-serve.gz .cudabin/parity.gz .cudabin/kernels.gz .cudabin/tga-loadtest.gz >&2
total=$(du -cb .cudabin | tail -1 | cut -f1)
[ "$total" -lt $(( 60 * 1024 * 1024 )) ] || log "WARNING: .cudabin/ is $total bytes; the device tool carries 64 MiB in all"
log "done; on a lent GPU: run(command=\"bash tools/gpu_check.sh\", carry=[\".cudabin\"], timeout_s=420)"
log "      or run(command=\"bash tools/gpu_bench.sh\", carry=[\".cudabin\"], timeout_s=500)"
