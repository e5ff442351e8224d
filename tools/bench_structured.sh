#!/usr/bin/env bash
# Structured outputs' cost (issue 14): decode tok/s of bench-135m served over HTTP, with and
# without a JSON-schema `response_format`, at 1 and 16 concurrent streams, run in alternation
# ($ROUNDS rounds of each pair) against one server so that both sides see the same host load.
# Every request asks for exactly $TOKENS tokens (`ignore_eos`; the schema's string field keeps the
# grammar open, and a request the grammar ends early is counted with the tokens it had).
#
#   tools/bench_structured.sh          # results under bench/structured/, summary on stdout
#
# Environment: THREADS (default 2), ROUNDS (default 3), TOKENS (default 64), OUT (default
# bench/structured), PORT (default 8125).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
MODEL=bench/models/bench-135m
OUT=${OUT:-bench/structured}
ROUNDS=${ROUNDS:-3}
TOKENS=${TOKENS:-64}
PORT=${PORT:-8125}
THREADS=${THREADS:-2}
export RAYON_NUM_THREADS=$THREADS
export RUSTFLAGS="${RUSTFLAGS:-} -C target-cpu=native"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target/bench}
mkdir -p "$OUT"
if [[ ! -f $MODEL/config.json ]]; then
    tools/.venv/bin/python tools/make_fixtures.py --bench-135m "$MODEL"
fi
cargo build --release -q -p tga-serve -p tga-loadtest
BIN=$CARGO_TARGET_DIR/release
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; load: $(cut -d' ' -f1-3 /proc/loadavg)"

cat >"$OUT/schema.json" <<'EOF'
{"type": "json_schema", "json_schema": {"name": "answer", "strict": true, "schema": {
  "type": "object",
  "properties": {"answer": {"type": "string"}, "confidence": {"type": "number"}},
  "required": ["answer", "confidence"], "additionalProperties": false}}}
EOF

"$BIN/tga-serve" serve --model "$MODEL" --port "$PORT" --max-num-seqs 16 >"$OUT/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
    curl -sf "http://127.0.0.1:$PORT/ready" >/dev/null && break
    sleep 1
done
curl -sf "http://127.0.0.1:$PORT/ready" >/dev/null || { cat "$OUT/server.log"; exit 1; }

run() { # label, concurrency, extra flags...
    local label=$1 c=$2
    shift 2
    "$BIN/tga-loadtest" run --url "http://127.0.0.1:$PORT" --seed 0 -c "$c" -n $((c * 3)) \
        --max-tokens "$TOKENS" --ignore-eos --prompt-words 32 --label "$label" \
        -o "$OUT/$label.json" "$@" >"$OUT/$label.txt"
}
# One warm-up of each (the grammar compiler's caches, the allocator).
run warmup-free 2
run warmup-schema 2 --response-format "@$OUT/schema.json"
for round in $(seq 1 "$ROUNDS"); do
    for c in 1 16; do
        run "free-c$c-r$round" "$c"
        run "schema-c$c-r$round" "$c" --response-format "@$OUT/schema.json"
    done
done
kill $server
wait $server 2>/dev/null || true
trap - EXIT

python3 - "$OUT" "$ROUNDS" <<'EOF'
import json, sys, statistics
out, rounds = sys.argv[1], int(sys.argv[2])
def load(label):
    r = json.load(open(f"{out}/{label}.json"))
    assert r["requests"]["failed"] == 0, (label, r["requests"])
    return r["throughput"]["output_tokens_per_s"], r["latency_ms"]["tpot"]["p50"]
print("| streams | round | free tok/s | schema tok/s | tok/s schema / free | free TPOT p50 ms | schema TPOT p50 ms |")
print("|---|---|---|---|---|---|---|")
for c in (1, 16):
    ratios, tpots = [], []
    for k in range(1, rounds + 1):
        (free, free_tpot), (schema, schema_tpot) = load(f"free-c{c}-r{k}"), load(f"schema-c{c}-r{k}")
        ratios.append(schema / free)
        tpots.append(schema_tpot / free_tpot)
        print(f"| {c} | {k} | {free:.1f} | {schema:.1f} | {schema / free:.3f} | {free_tpot:.1f} | {schema_tpot:.1f} |")
    print(f"| {c} | median of the rounds | | | {statistics.median(ratios):.3f} | | TPOT ratio {statistics.median(tpots):.3f} |")
EOF
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
