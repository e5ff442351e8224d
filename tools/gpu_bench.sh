#!/usr/bin/env bash
# Issue 12's GPU benchmark of tga-serve: the 7B shape with random weights in bf16 on one GPU, and
# on the same GPU in the same run the ceilings and transformers as its peer. With the device tool,
# from the repository root, after tools/cuda_build.sh packed .cudabin/ (tga-serve.gz, parity.gz,
# tga-loadtest.gz):
#
#   run(command="bash tools/gpu_bench.sh", carry=[".cudabin"], timeout_s=500)
#
# The run keeps to BUDGET_S (400 s) on its own: every part has a timeout, clamped to what is left,
# and a part that runs out is reported as timed out (or skipped) while the script goes on.
#   T5a tools/gpu_check.sh (parity on CUDA, tiny servers cuda vs cpu): its summary, PASS/FAIL
#   stages: the model-level time of each stage of an image prompt (kernels test
#       image_prefill_stage_timing), as served and with each newer path switched off
#   T0  tools/gpu_peer.py: copy bandwidth, bf16 GEMM TFLOP/s; transformers on the same random
#       7B shapes: decode at batch 1 (context 512), batched decode (32, 64 sequences of 128
#       prompt tokens, 256 steps), TTFT of one 672×672 image (2,928 image tokens)
#   then `tga-serve serve --random-weights llava-v1.6-mistral-7b --device cuda --dtype auto`:
#   T1  tga-loadtest -c 1, 512-token prompts, 128 tokens: tok/s = 1 / TPOT p50, and its share of
#       copy bandwidth / bytes read per decode step (target ≥ 85 %)
#   T2  tga-loadtest -c 32 and -c 64, 128-token prompts, 256 tokens, --ignore-eos: output tok/s
#       (targets ≥ 3,500 and ≥ 6,000)
#   T3  TTFT of one 672×672 image request on the idle server (target ≤ 120 ms), T4 the same with
#       `diagnostics: {}` (≤ 1.15 × T3): tools/gpu_bench_http.py ttft, fresh images each request
#   T5b the same greedy request (128 prompt tokens, 32 out) 20 times one by one: one text (then 8
#       at once, reported: bf16 rows depend on the batch size)
#   T6  a second server with --kv-cache-memory for 4 image prompts: 64 image requests at once
#       (672×672, 96 to 160 tokens each: 6 to 10 new KV blocks per sequence against ~11 spare),
#       0 errors and tga_preemptions_total > 0
# Prompt lengths are made with the server's own /tokenize (the random models use builtin:tiny's
# tokenizer). Results in $OUT: bench.json, bench.md (targets, measured values, pass/fail,
# commands, nvidia-smi, versions), bench.log (this output), logs.tgz (server logs, loadtest
# reports, gpu_check's files, the peer's JSON). Exit status 0 when every target passes (in a
# dry run: when every part ran).
#
# Dry run on a machine without a GPU (exercises every step with builtin:tiny's shapes on the CPU):
#   NO_CUDA=1 SERVE=target/debug/tga-serve LOADTEST=target/debug/tga-loadtest \
#     KERNELS=$(ls -t target/debug/deps/kernels-* | grep -v '\.d$' | head -1) \
#     PY=tools/.venv/bin/python bash tools/gpu_bench.sh
# Variables: SERVE, LOADTEST, PARITY, KERNELS (binaries instead of .cudabin/*.gz), PY (python with torch
# and transformers), OUT (default /tmp/gpu_bench_out), BUDGET_S, NO_CUDA=1.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
# shellcheck source=tools/gpu_lib.sh
. tools/gpu_lib.sh
OUT=${OUT:-/tmp/gpu_bench_out}; mkdir -p "$OUT"
exec > >(tee -a "$OUT/bench.log") 2>&1
T_START=$(date +%s)
BUDGET_S=${BUDGET_S:-400}
DEADLINE=$(( T_START + BUDGET_S ))
W=/tmp/gpubench; rm -rf "$W"; mkdir -p "$W"
NO_CUDA=${NO_CUDA:-}
PY=$(gpu_python)
HTTP=(tools/gpu_bench_http.py)
SERVER_PID=""

# --- sizes: the issue's on the GPU; builtin:tiny's shapes and smaller runs in the dry run
if [ -z "$NO_CUDA" ]; then
  PRESET=llava-v1.6-mistral-7b DEVICE=cuda PEER_DTYPE=bf16
  PEER_ARGS=(--preset "$PRESET")
  SERVE_EXTRA=()
  T2_OUTPUT=256 T2_ROUNDS=2 T1_RUNS=3 TTFT_RUNS=5 T6_REQUESTS=64
else
  PRESET=tiny DEVICE=cpu PEER_DTYPE=f32
  PEER_ARGS=(--config fixtures/tiny-llava-next/config.json --copy-mib 64 --gemm-n 256
             --batch-steps 32 --decode-steps 32)
  SERVE_EXTRA=(--max-batch-tokens 2048)  # CUDA's default step budget (the CPU's is 16)
  T2_OUTPUT=32 T2_ROUNDS=1 T1_RUNS=2 TTFT_RUNS=2 T6_REQUESTS=16  # a debug build's image prefill takes seconds
fi
T1_CONTEXT=512 T1_OUTPUT=128 T2_PROMPT=128 T2_CONCURRENCY=(32 64) T2_TARGETS="32:3500 64:6000"
IMAGE=672 T6_SEQS=4 T6_MAX_TOKENS=uniform:96:160 RACE_TIMES=20 RACE_CONCURRENT=8
PORT=8791 T6_PORT=8792

# part NAME LIMIT CMD...: CMD under a timeout of LIMIT seconds, clamped to the time left before
# DEADLINE less a reserve for the report; its outcome (ok, failed, timeout, skipped) goes to
# parts.tsv, the command to commands.txt.
part() {
  local name=$1 limit=$2 left t0 rc status; shift 2
  left=$(( DEADLINE - 15 - $(date +%s) ))
  if [ "$left" -lt "$limit" ]; then limit=$left; fi
  printf '# %s (limit %ss)\n%s\n' "$name" "$limit" "$(printf '%q ' "$@")" >> "$W/commands.txt"
  if [ "$limit" -lt 5 ]; then
    printf '%s\tskipped\t-1\t0\t%s\n' "$name" "$limit" >> "$W/parts.tsv"
    echo "== $name: skipped, out of time"; return 124
  fi
  echo "== $name (limit ${limit}s): $*"
  t0=$(date +%s.%N)
  timeout -k 5 "$limit" "$@"; rc=$?
  case $rc in 0) status=ok ;; 124|137) status=timeout ;; *) status=failed ;; esac
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" \
    "$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')" "$limit" >> "$W/parts.tsv"
  echo "== $name: $status (rc $rc)"
  return $rc
}

# shellcheck disable=SC2317  # called by the EXIT trap
finish() {
  stop_server
  "$PY" "${HTTP[@]}" report --work "$W" --out "$OUT" ${NO_CUDA:+--dry-run} \
    --t2-targets "$T2_TARGETS" --t2-prompt "$T2_PROMPT" --t2-output "$T2_OUTPUT" \
    --t6-requests "$T6_REQUESTS" --image "${IMAGE}x$IMAGE" --total-s $(( $(date +%s) - T_START ))
  tar -C "$(dirname "$W")" --exclude='*.png' -czf "$OUT/logs.tgz" "$(basename "$W")" 2>/dev/null
  echo "RESULT: $(grep -c '| PASS |' "$OUT/bench.md" 2>/dev/null) targets pass, $(grep -c '| FAIL |' "$OUT/bench.md" 2>/dev/null) fail, in $(( $(date +%s) - T_START ))s"
  sed -n '/^## Targets/,/^## Ceilings/p' "$OUT/bench.md" 2>/dev/null | head -20
  sleep 1  # let tee finish bench.log
  if [ -n "$NO_CUDA" ]; then  # a dry run passes when every part ran; its figures mean nothing
    if [ -f "$OUT/bench.md" ] && ! cut -f2 "$W/parts.tsv" | grep -qv '^ok$'; then
      echo "DRY RUN PASS: every part ran"; exit 0
    fi
    echo "DRY RUN FAIL: a part did not run (parts.tsv)"; exit 1
  fi
  if [ -f "$OUT/bench.md" ] && ! grep -q '| FAIL |' "$OUT/bench.md"; then exit 0; fi
  exit 1
}
trap finish EXIT

# shellcheck disable=SC2317  # also called by finish
stop_server() {
  if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null; wait "$SERVER_PID" 2>/dev/null; fi
  SERVER_PID=""
}

# start_server LABEL PORT FLAGS...: tga-serve with the random 7B (or tiny) model in the
# background; waits for /ready as part "LABEL".
start_server() {
  local label=$1 port=$2 t0; shift 2
  printf '# %s\n%s\n' "$label server" "$(printf '%q ' "$SERVE" serve --random-weights "$PRESET" \
    --device "$DEVICE" --dtype auto --port "$port" "${SERVE_EXTRA[@]}" "$@")" >> "$W/commands.txt"
  t0=$(date +%s)
  RUST_LOG=info "$SERVE" serve --random-weights "$PRESET" --device "$DEVICE" --dtype auto \
    --port "$port" "${SERVE_EXTRA[@]}" "$@" > "$W/server_$label.log" 2>&1 &
  SERVER_PID=$!
  # shellcheck disable=SC2016  # $1 $2 are bash -c's arguments
  part "$label" 150 bash -c 'until curl -sf "$1/ready" > /dev/null; do kill -0 "$2" 2>/dev/null || exit 3; sleep 0.5; done' \
    _ "http://127.0.0.1:$port" "$SERVER_PID"
  local rc=$?
  READY_S=$(( $(date +%s) - t0 ))
  grep -E 'random weights drawn|KV cache|engine started|ERROR|panicked' "$W/server_$label.log" | head -8
  return $rc
}

loadtest() {  # loadtest NAME LIMIT ARGS...: a tga-loadtest run with its JSON report lt_NAME.json
  local name=$1 limit=$2 url; shift 2
  url=$(printf '%s\n' "$@" | grep -m1 '^http')  # the --url argument: /metrics around the run
  curl -s "$url/metrics" > "$W/metrics_before_$name.txt"
  part "$name" "$limit" "$LOADTEST" run --seed 0 --no-progress -o "$W/lt_$name.json" "$@" \
    > "$W/lt_$name.txt" 2>&1
  local rc=$?
  curl -s "$url/metrics" > "$W/metrics_after_$name.txt"
  sed -n '1,25p' "$W/lt_$name.txt"
  return $rc
}

# --- binaries (carried gzip-compressed) and the machine
if [ -z "${SERVE:-}" ] || [ -z "${LOADTEST:-}" ]; then
  gpu_unpack /tmp/tgabin tga-serve tga-loadtest || { echo "FAIL no .cudabin/tga-serve.gz or tga-loadtest.gz (run tools/cuda_build.sh)"; exit 1; }
  SERVE=/tmp/tgabin/tga-serve LOADTEST=/tmp/tgabin/tga-loadtest
fi
if [ -z "${PARITY:-}" ] && [ -f .cudabin/parity.gz ]; then gpu_unpack /tmp/tgabin parity && PARITY=/tmp/tgabin/parity; fi
PARITY=${PARITY:-$SERVE}  # gpu_check.sh runs it only on CUDA; a dry run may have none
GPU="" DRIVER=""
if [ -z "$NO_CUDA" ]; then
  nvidia-smi | tee "$W/nvidia-smi.txt"
  GPU=$(nvidia-smi --query-gpu=name,memory.total,compute_cap,clocks.max.sm --format=csv,noheader | head -1)
  DRIVER=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1)
  gpu_cuda_libs "$W/libs.txt" > "$W/libs_found.txt"  # not in a pipeline: it exports LD_LIBRARY_PATH
  cat "$W/libs_found.txt"; echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
fi
"$PY" - "$W/env.json" "$T_START" "$BUDGET_S" "$PRESET" "$DEVICE" "$GPU" "$DRIVER" \
  "$("$SERVE" --version 2>&1)" "$("$LOADTEST" --version 2>&1)" "$(nproc)" \
  "$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1)" "$(git rev-parse --short HEAD 2>/dev/null)" <<'PY'
import json, sys, time
keys = ["started", "budget_s", "preset", "device", "gpu", "driver", "tga_serve_version",
        "tga_loadtest_version", "nproc", "cpu", "commit"]
env = dict(zip(keys, sys.argv[2:]))
env["started_utc"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(int(env["started"])))
json.dump(env, open(sys.argv[1], "w"), indent=1)
PY

# --- T5a: tools/gpu_check.sh (its own files under $W/check; summary.txt read by the report)
part gpu_check 120 env OUT="$W/check" SERVE="$SERVE" PARITY="$PARITY" NO_CUDA="$NO_CUDA" PY="$PY" \
  bash tools/gpu_check.sh > "$W/check.log" 2>&1
grep -E '^(PASS|FAIL|INFO|RESULT)' "$W/check/summary.txt" 2>/dev/null

# --- T0: the ceilings and the transformers peer
part peer 130 env PYTHONUNBUFFERED=1 "$PY" tools/gpu_peer.py "${PEER_ARGS[@]}" --device "$DEVICE" \
  --dtype "$PEER_DTYPE" --json "$W/peer.json" --image-size "$IMAGE" --decode-context "$T1_CONTEXT" \
  --batches "$(IFS=,; echo "${T2_CONCURRENCY[*]}")" --batch-prompt "$T2_PROMPT" 2>&1 | tee "$W/peer.log"

# --- tga-serve: T1, T2, T3/T4, T5b on one server
URL=http://127.0.0.1:$PORT
if start_server serve "$PORT" --max-num-seqs 64 --max-waiting 256; then
  curl -s "$URL/v1/models" > "$W/models.json"
  "$PY" - "$W/server.json" "$W/models.json" "$W/server_serve.log" "$READY_S" <<'PY'
import json, re, sys
out, models, log, ready = sys.argv[1:5]
text = open(log).read()
line = lambda pat: next((re.sub(r"^\S+\s+", "", l) for l in text.splitlines() if re.search(pat, l)), None)
card = json.load(open(models))["data"][0]
dtype = re.search(r"random weights drawn.*?dtype=(\S+)", text)
json.dump({"card": card, "ready_s": int(ready), "kv_line": line(r"KV cache blocks="),
           "weights_line": line(r"random weights drawn"), "engine_line": line(r"engine started"),
           "dtype": dtype.group(1) if dtype else None}, open(out, "w"), indent=1)
PY
  part prompts 45 "$PY" "${HTTP[@]}" prompts --url "$URL" --tokens "$T1_CONTEXT" --count 4 \
    --out "$W/prompts_t1.jsonl"
  part prompts_t2 45 "$PY" "${HTTP[@]}" prompts --url "$URL" --tokens "$T2_PROMPT" --count 64 \
    --seed 100 --out "$W/prompts_t2.jsonl"
  loadtest t1 45 --url "$URL" --prompts "$W/prompts_t1.jsonl" -c 1 -n "$T1_RUNS" --warmup 1 \
    --max-tokens "$T1_OUTPUT" --ignore-eos
  for c in "${T2_CONCURRENCY[@]}"; do
    loadtest "t2_c$c" 50 --url "$URL" --prompts "$W/prompts_t2.jsonl" -c "$c" \
      -n $(( c * T2_ROUNDS )) --duration 25s --max-tokens "$T2_OUTPUT" --ignore-eos
  done
  part ttft 45 "$PY" "${HTTP[@]}" ttft --url "$URL" --size "$IMAGE" --runs "$TTFT_RUNS" \
    --out "$W/ttft.json"
  part race 45 "$PY" "${HTTP[@]}" race --url "$URL" --prompts "$W/prompts_t2.jsonl" \
    --times "$RACE_TIMES" --concurrent "$RACE_CONCURRENT" --max-tokens 32 --out "$W/race.json"
  curl -s "$URL/metrics" > "$W/metrics_serve.txt"
  part t6plan 30 "$PY" "${HTTP[@]}" t6plan --url "$URL" --size "$IMAGE" --seqs "$T6_SEQS" \
    --server-log "$W/server_serve.log" --out "$W/t6plan.json" --prompts-out "$W/prompts_t6.jsonl"
fi
stop_server

# --- T6: 64 image requests at once into a pool of about four image prompts
T6_BYTES=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["kv_cache_memory"])' "$W/t6plan.json" 2>/dev/null)
if [ -n "$T6_BYTES" ]; then
  T6_URL=http://127.0.0.1:$T6_PORT
  if start_server t6_start "$T6_PORT" --max-num-seqs 64 --max-waiting 256 --kv-cache-memory "$T6_BYTES"; then
    curl -s "$T6_URL/v1/models" > "$W/models_t6.json"
    sizes=""  # 4 synthetic variants of each listed size: one image per request
    for _ in $(seq 1 $(( (T6_REQUESTS + 3) / 4 ))); do sizes="$sizes${IMAGE}x$IMAGE,"; done
    loadtest t6 110 --url "$T6_URL" --prompts "$W/prompts_t6.jsonl" -c "$T6_REQUESTS" \
      -n "$T6_REQUESTS" --image-size "${sizes%,}" --max-tokens "$T6_MAX_TOKENS" --ignore-eos
    "$PY" "${HTTP[@]}" metrics --url "$T6_URL" --out "$W/t6_metrics.json"
  fi
  stop_server
else
  printf 't6\tskipped\t-1\t0\t0\n' >> "$W/parts.tsv"
fi
# --- where an image prompt's time goes, at the model level (no HTTP; last, so that the served
# targets above get the budget first): the kernels test binary's
# image_prefill_stage_timing, once as served, once with decode steps through CUDA graphs
# (TGA_CUDA_GRAPHS=1, not yet the default) and once per switch that restores an older path
# (cudarc's per-allocation events; the candle-ops prefill attention; the unfused norms/RoPE), so
# each change is measured side by side in this run.
if [ -z "${KERNELS:-}" ] && [ -f .cudabin/kernels.gz ]; then gpu_unpack /tmp/tgabin kernels && KERNELS=/tmp/tgabin/kernels; fi
if [ -n "${KERNELS:-}" ]; then
  for variant in served:- graphs:TGA_CUDA_GRAPHS=1 events:TGA_CUDA_EVENT_TRACKING=1 \
      candle_attention:TGA_PREFILL_KERNEL=0 unfused:TGA_FUSED_KERNELS=0; do
    name=${variant%%:*} envs=${variant#*:}
    [ "$envs" = - ] && envs=""
    # shellcheck disable=SC2086  # envs is one VAR=value word or empty
    part "stages_$name" 40 env TGA_TEST_DEVICE="$DEVICE" $envs "$KERNELS" --ignored --exact \
      image_prefill_stage_timing --nocapture --test-threads 1 > "$W/stages_$name.log" 2>&1
    grep -E '^ +[a-z_]+: |^prefill chunks|^decode batch' "$W/stages_$name.log"
  done
  # the attention kernels alone at the 7B's shape (µs, GB/s, TFLOP/s per layer); on the CPU (a
  # dry run) the op is its slow reference and the figures would mean nothing
  [ -z "$NO_CUDA" ] && part kernel_timing 40 env TGA_TEST_DEVICE="$DEVICE" "$KERNELS" --ignored --exact \
    paged_decode_timing paged_prefill_timing --nocapture --test-threads 1 \
    > "$W/kernel_timing.log" 2>&1
  grep -vsE '^(running|test |$)' "$W/kernel_timing.log" | head -30
else
  echo "== stages: no kernels test binary (.cudabin/kernels.gz or KERNELS=): not measured"
fi

"$PY" - "$W/parts.tsv" <<'PY'
import sys
for line in open(sys.argv[1]):
    print("part", line.rstrip().replace("\t", " "))
PY
exit 0  # the EXIT trap writes the report and sets the status
