#!/usr/bin/env bash
# CI's fuzz phase (fuzz/README.md, "In CI"): builds the five cargo-fuzz targets of fuzz/ with
# libFuzzer and coverage instrumentation, runs each for FUZZ_SECONDS (default 60) from the
# committed seeds and dictionaries, and fails on any crash, panic, OOM (-rss_limit_mb) or input
# slower than -timeout. Prints executions, edges and corpus size per target.
#
# The build is `cargo build` of the fuzz crate into the workspace's target directory, not `cargo
# fuzz build`: cargo-fuzz passes its flags in RUSTFLAGS and builds with `--target`, so every
# dependency is built again, instrumented, in release with one codegen unit (a cold build took
# 42 minutes with ASan on a 2-core machine). Here tools/fuzz_rustc.sh adds cargo-fuzz's
# instrumentation to our crates only, and the dependencies are the workspace build's own
# artifacts (same profile: opt-level 3), so only tga-model, tga-serve, the targets, libFuzzer and
# a few crates are compiled. No sanitizer: outside `unsafe` code Rust is memory-safe, and our
# unsafe code is the model's compute (mapped weights, CPU kernels), which the targets do not run;
# ASan would cost every execution several times over and need every crate rebuilt. Panics,
# assertion failures (debug assertions and overflow checks are on), OOMs and timeouts are caught
# without it. `cargo fuzz run` with ASan remains the local tool (fuzz/README.md).
#
# Environment: FUZZ_SECONDS (per target), FUZZ_TARGETS (a subset, space-separated),
# FUZZ_LANES (targets run at once; default: the CPU count, at most 2), CARGO_TARGET_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
seconds=${FUZZ_SECONDS:-60}
read -r -a targets <<<"${FUZZ_TARGETS:-request image anyres_geometry diagnostics sse}"
cpus=$(nproc)
lanes=${FUZZ_LANES:-$((cpus < 2 ? cpus : 2))}
target_dir=${CARGO_TARGET_DIR:-$root/target}
work=$target_dir/fuzz-ci
export CARGO_TERM_COLOR=never

build_started=$SECONDS
# The workspace's dev profile (Cargo.toml) for every dependency; opt-level 3 and line tables (for
# readable crash backtraces) for the instrumented packages, which also keeps their artifact
# names apart from the workspace's.
profile=(
    --config 'profile.dev.debug="line-tables-only"'
    --config 'profile.dev.package."*".opt-level=3'
    --config 'profile.dev.package."*".debug=false'
)
for package in tga-model tga-serve tga-fuzz; do
    profile+=(--config "profile.dev.package.$package.opt-level=3"
        --config "profile.dev.package.$package.debug=\"line-tables-only\"")
done
bins=()
for t in "${targets[@]}"; do bins+=(--bin "$t"); done
RUSTC_WRAPPER="$root/tools/fuzz_rustc.sh" cargo build --locked --manifest-path fuzz/Cargo.toml \
    --target-dir "$target_dir" "${profile[@]}" "${bins[@]}"
build_took=$((SECONDS - build_started))
echo "fuzz targets built in ${build_took} s"

rm -rf "$work"
mkdir -p "$work"

# run TARGET: libFuzzer for $seconds; new inputs go to $work/corpus/TARGET (the committed seeds
# are read, never written), failures to $work/artifacts/TARGET/.
run() {
    local t=$1
    local args=(
        -max_total_time="$seconds" -timeout=60 -rss_limit_mb=4096
        -print_final_stats=1 -artifact_prefix="$work/artifacts/$t/"
    )
    [ -f "fuzz/dict/$t.dict" ] && args+=(-dict="fuzz/dict/$t.dict")
    mkdir -p "$work/corpus/$t" "$work/artifacts/$t"
    local corpora=("$work/corpus/$t")
    [ -d "fuzz/seeds/$t" ] && corpora+=("fuzz/seeds/$t")
    local status=0
    "$target_dir/debug/$t" "${args[@]}" "${corpora[@]}" >"$work/$t.log" 2>&1 || status=$?
    echo "$status" >"$work/$t.status"
}

run_started=$SECONDS
pending=("${targets[@]}")
while [ ${#pending[@]} -gt 0 ]; do
    batch=("${pending[@]:0:lanes}")
    pending=("${pending[@]:lanes}")
    echo "fuzzing ${batch[*]} (${seconds} s each, ${#batch[@]} at once)"
    for t in "${batch[@]}"; do run "$t" & done
    wait
done
run_took=$((SECONDS - run_started))

failed=0
printf '%-16s %6s %10s %8s %7s %7s %7s  %s\n' target seconds executions exec/s edges features corpus result
for t in "${targets[@]}"; do
    log=$work/$t.log
    status=$(cat "$work/$t.status")
    # libFuzzer's final stats and its last status line (`#N DONE cov: E ft: F corp: C/...`).
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
    last=$(grep -E '^#[0-9]+' "$log" | tail -n 1 || true)
    edges=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
    features=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
    corpus=$(sed -n 's/.* corp: \([0-9]*\).*/\1/p' <<<"$last")
    result=ok
    found=$(find "$work/artifacts/$t" -type f | head -n 1)
    if [ "$status" -ne 0 ] || [ -n "$found" ] || [ -z "$execs" ]; then
        result="FAILED (exit $status${found:+, $found})"
        failed=1
    fi
    printf '%-16s %6s %10s %8s %7s %7s %7s  %s\n' "$t" "$seconds" "${execs:-?}" "${rate:-?}" \
        "${edges:-?}" "${features:-?}" "${corpus:-?}" "$result"
done
echo "build ${build_took} s, fuzzing ${run_took} s (${#targets[@]} targets, ${lanes} at once)"
if [ "$failed" -ne 0 ]; then
    for t in "${targets[@]}"; do
        if [ "$(cat "$work/$t.status")" -ne 0 ] || [ -n "$(find "$work/artifacts/$t" -type f)" ]; then
            echo
            echo "== $t: the end of libFuzzer's output ($work/$t.log)"
            tail -n 60 "$work/$t.log"
            for artifact in "$work/artifacts/$t"/*; do
                [ -f "$artifact" ] || continue
                echo "== $artifact (base64; replay: cargo fuzz run $t <file>)"
                head -c 4096 "$artifact" | base64
            done
        fi
    done
    exit 1
fi
