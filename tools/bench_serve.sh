#!/usr/bin/env bash
# Serving benchmark of tga-serve on the bench-135m checkpoint with tga-loadtest:
# closed-loop concurrency 1, 4 and 16, text-only and with one 640x480 image each, plus the extra
# time of a diagnosed request (no caption pass) against the same request undiagnosed.
# Writes JSON/markdown reports under bench/serve/ and prints a summary table.
#
#   tools/bench_serve.sh            (generates bench/models/bench-135m with tools/.venv if absent)
#   SERVE_FLAGS="--weights checkpoint" OUT=bench/serve-bf16w WORKLOADS=text tools/bench_serve.sh
#
# Environment: SERVE_FLAGS (extra `tga-serve serve` flags), OUT (report directory, default
# bench/serve), WORKLOADS (default "text image"), PORT.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=bench/models/bench-135m
OUT=${OUT:-bench/serve}
WORKLOADS=${WORKLOADS:-text image}
read -r -a serve_flags <<<"${SERVE_FLAGS:-}"
PORT=${PORT:-8123}
mkdir -p "$OUT"
if [ ! -f "$MODEL/config.json" ]; then
    tools/.venv/bin/python tools/make_fixtures.py --bench-135m "$MODEL"
fi
export RUSTFLAGS="-C target-cpu=native"
export CARGO_TARGET_DIR=target/bench
cargo build --release -q -p tga-serve -p tga-loadtest
BIN=$CARGO_TARGET_DIR/release
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; load: $(cut -d' ' -f1-3 /proc/loadavg)"

"$BIN/tga-serve" serve --model "$MODEL" --port "$PORT" --max-num-seqs 16 ${serve_flags[@]+"${serve_flags[@]}"} \
    >"$OUT/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
    curl -sf "http://127.0.0.1:$PORT/ready" >/dev/null && break
    sleep 1
done
curl -sf "http://127.0.0.1:$PORT/ready" >/dev/null || { echo "server not ready"; cat "$OUT/server.log"; exit 1; }

run() { # name, loadtest flags...
    local name=$1
    shift
    "$BIN/tga-loadtest" run --url "http://127.0.0.1:$PORT" --seed 0 --warmup 1 \
        -o "$OUT/$name.json" --markdown "$OUT/$name.md" "$@" >"$OUT/$name.txt"
    echo "== $name"
    sed -n '1,40p' "$OUT/$name.txt"
}

has() { [[ " $WORKLOADS " == *" $1 "* ]]; }
for c in 1 4 16; do
    if has text; then run "text-c$c" -c "$c" -n $((c * 4)) --max-tokens 64 --image-ratio 0; fi
    if has image; then
        run "image-c$c" -c "$c" -n $((c * 2)) --max-tokens 64 --image-ratio 1 --image-size 640x480
    fi
done
# Issue 3's TTFT bound: own prefill + one decode step per request ahead (tools/ttft_bound.py).
for w in $WORKLOADS; do
    for c in 4 16; do
        python3 tools/ttft_bound.py "$OUT/$w-c1.json" "$OUT/$w-c$c.json"
    done
done
# Diagnosed vs plain, one at a time (lens + attention shares, no caption pass).
run "plain-text" -c 1 -n 8 --max-tokens 16 --image-ratio 0
run "diag-text" -c 1 -n 8 --max-tokens 16 --image-ratio 0 --diagnose-ratio 1
"$BIN/tga-loadtest" compare "$OUT/plain-text.json" "$OUT/diag-text.json"
if has image; then
    run "plain-image" -c 1 -n 4 --max-tokens 16 --image-ratio 1 --image-size 640x480
    run "diag-image" -c 1 -n 4 --max-tokens 16 --image-ratio 1 --image-size 640x480 --diagnose-ratio 1
    "$BIN/tga-loadtest" compare "$OUT/plain-image.json" "$OUT/diag-image.json"
fi
