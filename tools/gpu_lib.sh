# shellcheck shell=bash
# Functions shared by the scripts that run on a lent GPU machine (tools/gpu_check.sh,
# tools/gpu_bench.sh): source it, don't run it. Binaries come from .cudabin/ (packed by
# tools/cuda_build.sh); the CUDA runtime libraries from the machine (PyTorch's environment or a
# toolkit), never carried.

# gpu_unpack DIR NAME...: gunzip .cudabin/NAME.gz to DIR/NAME (executable) for each NAME; fails
# on the first one missing.
gpu_unpack() {
  local dir=$1 name; shift
  mkdir -p "$dir"
  for name in "$@"; do
    gunzip -c ".cudabin/$name.gz" > "$dir/$name" || return 1
    chmod +x "$dir/$name"
  done
}

# gpu_cuda_libs LIST: finds the CUDA 13 runtime libraries tga-serve links (cudart, nvrtc,
# curand, cublas, cublasLt; libcuda.so.1 where ldconfig has none), writes the candidates to the
# file LIST, prints where each was found and prepends their folders to LD_LIBRARY_PATH.
gpu_cuda_libs() {
  local list=$1 libdirs="" lib p
  find /opt /usr/local /usr/lib /usr/lib64 \( -name 'libcudart.so.13' -o -name 'libnvrtc.so.13' \
    -o -name 'libcurand.so.10' -o -name 'libcublas.so.13' -o -name 'libcublasLt.so.13' \) \
    -not -path '*/stubs/*' 2>/dev/null > "$list"
  for lib in libcudart.so.13 libnvrtc.so.13 libcurand.so.10 libcublas.so.13 libcublasLt.so.13; do
    p=$(grep "/$lib\$" "$list" | head -1)
    echo "LIB $lib -> ${p:-NOT FOUND}"
    if [ -n "$p" ]; then libdirs="$libdirs:$(dirname "$p")"; fi
  done
  if ! ldconfig -p | grep -q 'libcuda.so.1 '; then
    p=$(find /usr/local/nvidia /usr/lib /usr/lib64 -name libcuda.so.1 2>/dev/null | head -1)
    echo "LIB libcuda.so.1 -> ${p:-NOT FOUND}"
    if [ -n "$p" ]; then libdirs="$libdirs:$(dirname "$p")"; fi
  fi
  export LD_LIBRARY_PATH="${libdirs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
}

# gpu_python: the interpreter with PyTorch (the device machine's, else python3), or $PY.
gpu_python() {
  local py=${PY:-/opt/torch/.venv/bin/python3}
  [ -x "$py" ] || py=python3
  printf '%s\n' "$py"
}
