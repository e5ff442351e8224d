#!/usr/bin/env bash
# RUSTC_WRAPPER of tools/fuzz_ci.sh: compiles our crates (tga-model, tga-serve, the fuzz targets of
# tga-fuzz) with the coverage instrumentation `cargo fuzz build` gives every crate (the flags of
# cargo-fuzz 0.13.2's project.rs, less the sanitizer: libFuzzer's SanitizerCoverage with inline
# 8-bit counters, the PC table, compare tracing and stack depth; `--cfg fuzzing`), and every other
# crate exactly as the workspace build does, so that those are the workspace's own artifacts in
# target/debug and are not built again. Build scripts are never instrumented (they run without
# libFuzzer).
#
# cargo does not see these flags; tools/fuzz_ci.sh gives the instrumented packages profile
# settings of their own (opt-level 3, line tables), so their artifacts never share a name with
# the workspace's uninstrumented ones.
rustc=$1
shift
case "${CARGO_PKG_NAME:-}" in
    tga-model | tga-serve | tga-fuzz)
        case " $* " in
            *" --crate-name build_script_"*) ;;
            *)
                exec "$rustc" "$@" \
                    -Cpasses=sancov-module \
                    -Cllvm-args=-sanitizer-coverage-level=4 \
                    -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
                    -Cllvm-args=-sanitizer-coverage-pc-table \
                    -Cllvm-args=-sanitizer-coverage-trace-compares \
                    -Cllvm-args=-sanitizer-coverage-stack-depth \
                    -Cllvm-args=-simplifycfg-branch-fold-threshold=0 \
                    --cfg fuzzing
                ;;
        esac
        ;;
esac
exec "$rustc" "$@"
