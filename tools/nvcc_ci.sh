#!/usr/bin/env bash
# NVCC for `tools/cuda_build.sh --check` (CI's clippy of the `cuda` feature; nothing is linked).
# Runs the real nvcc ($TGA_REAL_NVCC) for everything, PTX kernels included, except the objects of
# candle-kernels' statically linked GGUF/MoE library (mmq_*.cu, mmvq_gguf.cu, moe_*.cu): tga-serve
# never calls them and they are most of that crate's build time, so for those it writes an empty
# object file that `nvcc --lib` can archive. A real build (tools/cuda_build.sh) compiles them all.
set -euo pipefail
real=${TGA_REAL_NVCC:?set TGA_REAL_NVCC to the real nvcc}
compile=0 out="" skip=0 prev=""
for a in "$@"; do
    case $a in
        -c) compile=1 ;;
        */mmq_*.cu | mmq_*.cu | */mmvq_gguf.cu | mmvq_gguf.cu | */moe_*.cu | moe_*.cu) skip=1 ;;
    esac
    if [ "$prev" = "-o" ]; then out=$a; fi
    prev=$a
done
if [ "$compile" = 1 ] && [ "$skip" = 1 ] && [ -n "$out" ]; then
    exec gcc -c -x c /dev/null -o "$out"
fi
exec "$real" "$@"
