#!/usr/bin/env bash
# Benchmarks of the paged KV cache (issue 11) on bench-135m, for bench/RESULTS.md:
#   (a) inter-token latency of 8 decoding text streams (7 rounds of 192 tokens) while five
#       640x640 image requests (~2,950 prompt tokens each) arrive about every 4 s, with whole prefill (--max-batch-tokens 8192) and chunked
#       prefill (the CPU default 256, and 64), against the same 8 streams with no images (the
#       idle decode step);
#   (b) batched decode tok/s with the paged cache against the contiguous cache it replaced: the
#       criterion `llava` decode group of this tree and of commit $BASE (the last one with the
#       contiguous cache), built side by side and run in alternation ($ROUNDS rounds each);
#   (c) sequences a fixed budget holds with mixed lengths, paged vs the old doubling buffers
#       (tools/kv_capacity.py, from the allocation rules of both).
#
#   tools/bench_kv.sh                 # all three
#   PARTS="a c" tools/bench_kv.sh     # a subset
#
# Environment: THREADS (default 2), BASE (default 664895d), ROUNDS (default 2), OUT (default
# bench/kv), PORT (default 8124).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
MODEL=bench/models/bench-135m
OUT=${OUT:-bench/kv}
PARTS=${PARTS:-a b c}
BASE=${BASE:-664895d}
ROUNDS=${ROUNDS:-2}
PORT=${PORT:-8124}
THREADS=${THREADS:-2}
export RAYON_NUM_THREADS=$THREADS
export RUSTFLAGS="${RUSTFLAGS:-} -C target-cpu=native"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target/bench}
mkdir -p "$OUT"
has() { [[ " $PARTS " == *" $1 "* ]]; }
if [[ ! -f $MODEL/config.json ]]; then
    tools/.venv/bin/python tools/make_fixtures.py --bench-135m "$MODEL"
fi
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; load: $(cut -d' ' -f1-3 /proc/loadavg)"

if has a; then
    cargo build --release -q -p tga-serve -p tga-loadtest
    BIN=$CARGO_TARGET_DIR/release
    run_server() { # label, serve flags...
        local label=$1
        shift
        "$BIN/tga-serve" serve --model "$MODEL" --port "$PORT" --max-num-seqs 16 "$@" \
            >"$OUT/server-$label.log" 2>&1 &
        server=$!
        for _ in $(seq 1 120); do
            curl -sf "http://127.0.0.1:$PORT/ready" >/dev/null && return 0
            sleep 1
        done
        echo "server not ready"
        cat "$OUT/server-$label.log"
        exit 1
    }
    streams() { # name, requests, flags: 8 closed-loop text streams of 192 tokens
        "$BIN/tga-loadtest" run --url "http://127.0.0.1:$PORT" --seed 0 -c 8 -n "$2" \
            --max-tokens 192 --ignore-eos --image-ratio 0 --label "$1" -o "$OUT/$1.json" "${@:3}" \
            >"$OUT/$1.txt"
    }
    images() { # name: image requests arriving ~one per 2 s while the streams run
        sleep 2
        "$BIN/tga-loadtest" run --url "http://127.0.0.1:$PORT" --seed 1 -r 0.5 -n 8 \
            --max-tokens 8 --image-ratio 1 --image-size 640x640 --no-metrics \
            --label "$1" -o "$OUT/$1.json" >"$OUT/$1.txt"
    }
    for mode in whole:8192 chunked256:256 chunked64:64 chunked16:16; do
        label=${mode%%:*}
        run_server "$label" --max-batch-tokens "${mode##*:}"
        streams "idle-$label" 16
        images "images-$label" &
        imgs=$!
        # The server also counts the image requests: no count comparison here.
        streams "streams-$label" 56 --no-metrics
        wait "$imgs" || true
        kill "$server"
        wait "$server" 2>/dev/null || true
    done
    python3 - "$OUT" <<'EOF'
import json, sys
out = sys.argv[1]
print("| --max-batch-tokens | idle ITL p50 | ITL p50 / p90 / p99 / max under images | p99 / idle p50 | image TTFT p50 | stream tok/s |")
print("|---|---|---|---|---|---|")
for label in ["whole", "chunked256", "chunked64", "chunked16"]:
    idle = json.load(open(f"{out}/idle-{label}.json"))["latency_ms"]["itl"]
    run = json.load(open(f"{out}/streams-{label}.json"))
    busy = run["latency_ms"]["itl"]
    img = json.load(open(f"{out}/images-{label}.json"))["latency_ms"]["ttft"]
    tps = run["throughput"]["output_tokens_per_s"] if "output_tokens_per_s" in run["throughput"] else list(run["throughput"].values())[1]
    print(f"| {label} | {idle['p50']:.1f} ms | {busy['p50']:.1f} / {busy['p90']:.1f} / {busy['p99']:.1f} / {busy['max']:.0f} ms | "
          f"{busy['p99'] / idle['p50']:.1f}x | {img['p50'] / 1e3:.2f} s | {tps:.0f} |")
EOF
fi

if has b; then
    # The contiguous cache's tree, built beside this one.
    # Its own target dir (seeded with this one's dependencies): two trees of the same
    # workspace in one target dir would take each other's crates for fresh.
    old=$ROOT/target/kv-base-tree
    old_target=$CARGO_TARGET_DIR-base
    if [[ ! -d $old ]]; then git worktree add -f --detach "$old" "$BASE" >/dev/null; fi
    cargo bench -q -p tga-model --bench llava --no-run
    if [[ ! -d $old_target ]]; then
        mkdir -p "$old_target"
        cp -a "$CARGO_TARGET_DIR/release" "$old_target/"
        rm -rf "$old_target"/release/.fingerprint/tga-*
    fi
    (cd "$old" && CARGO_TARGET_DIR=$old_target cargo bench -q -p tga-model --bench llava --no-run)
    : >"$OUT/decode.txt"
    for round in $(seq 1 "$ROUNDS"); do
        for tree in "$old" "$ROOT"; do
            name=$([[ $tree == "$ROOT" ]] && echo paged || echo contiguous)
            target=$([[ $tree == "$ROOT" ]] && echo "$CARGO_TARGET_DIR" || echo "$old_target")
            (cd "$tree" && CARGO_TARGET_DIR=$target cargo bench -q -p tga-model --bench llava -- decode/batch 2>&1) |
                sed -n "s/^\(decode\/batch_[0-9]*\).*time: *\[[^ ]* [^ ]* \([^ ]*\) \([^ ]*\).*/$name \1 \2 \3/p" \
                    >>"$OUT/decode.txt"
        done
    done
    python3 - "$OUT/decode.txt" <<'EOF'
import collections, sys
unit = {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}
t = collections.defaultdict(list)
for line in open(sys.argv[1]):
    name, bench, value, u = line.split()
    t[(name, bench)].append(float(value) * unit[u])
print("| batch | contiguous step | paged step | paged tok/s / contiguous |")
print("|---|---|---|---|")
for b in sorted({k[1] for k in t}, key=lambda s: int(s.split("_")[-1])):
    c = sum(t[("contiguous", b)]) / len(t[("contiguous", b)])
    p = sum(t[("paged", b)]) / len(t[("paged", b)])
    print(f"| {b.split('_')[-1]} | {c * 1e3:.2f} ms | {p * 1e3:.2f} ms | {100 * c / p:.1f} % |")
EOF
fi

if has c; then
    python3 tools/kv_capacity.py
fi
