#!/usr/bin/env bash
# CUDA check of tga-serve on a lent GPU machine, with the binaries tools/cuda_build.sh packed into
# .cudabin/ (tga-serve.gz, parity.gz). With the device tool, from the repository root:
#
#   run(command="bash tools/gpu_check.sh", carry=[".cudabin"], timeout_s=420)
#
# (about 30 s on an H200 with the machine warm; the first call also waits for the machine). It
#   1. shows the GPU (nvidia-smi) and finds the CUDA 13 runtime libraries (cudart, nvrtc, curand,
#      cublas, cublasLt) on the machine, in its PyTorch environment or a toolkit; none are carried;
#   2. runs the parity tests on CUDA (TGA_TEST_DEVICE=cuda, f32 models against the transformers
#      references in fixtures/);
#   3. starts the server with the built-in tiny model on cuda, then on cpu, sends each the same
#      greedy requests (text and image chat with logprobs, /v1/safety/diagnose on both, 4
#      concurrent requests against the same ones one at a time) and compares the answers;
#   4. the same in bf16 on cuda (parity with bf16 tolerances; the server with --dtype bf16 must
#      answer every request; its texts against f32's are reported, not required).
# Results in $OUT: summary.txt (PASS/FAIL lines), gpu.log (everything), parity_cuda.log,
# parity_cuda_bf16.log, kernels_cuda.log (the paged attention kernel against its reference), server_cuda.log, server_cuda-bf16.log, server_cpu.log, compare.txt,
# compare_bf16.txt, responses.tgz (requests and responses).
# Exit status 0 when the parity tests pass on CUDA and the greedy texts on CUDA equal the CPU's.
# Variables: SERVE=/path PARITY=/path KERNELS=/path use these binaries instead of .cudabin/*.gz; NO_CUDA=1
# skips the CUDA parts (a dry run of the script with a CPU build); PY=python interpreter.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
# shellcheck source=tools/gpu_lib.sh
. tools/gpu_lib.sh
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu.log") 2>&1
T0=$(date +%s)
W=/tmp/gpuwork; rm -rf "$W"; mkdir -p "$W/cuda" "$W/cpu"
NO_CUDA=${NO_CUDA:-}
PIDS=()
SUMMARY=$OUT/summary.txt; : > "$SUMMARY"
FAIL=0
note() { echo "$*" | tee -a "$SUMMARY"; }
check() {  # check NAME CONDITION-EXIT-STATUS...
  local name=$1; shift
  if "$@"; then note "PASS $name"; else note "FAIL $name"; FAIL=1; fi
}
# shellcheck disable=SC2317  # called by the EXIT trap
finish() {
  for p in ${PIDS[@]+"${PIDS[@]}"}; do kill "$p" 2>/dev/null; done
  tar -C "$(dirname "$W")" -czf "$OUT/responses.tgz" "$(basename "$W")" 2>/dev/null
  note "RESULT $([ "$FAIL" = 0 ] && echo PASS || echo FAIL) in $(( $(date +%s) - T0 ))s"
  sleep 1  # let tee finish gpu.log
}
trap finish EXIT
set -x

# --- binaries (carried gzip-compressed: stripped, they exceed the device tool's 64 MiB limit)
if [ -z "${SERVE:-}" ] || [ -z "${PARITY:-}" ]; then
  gpu_unpack /tmp/tgabin tga-serve parity || { note "FAIL no .cudabin/tga-serve.gz or parity.gz (run tools/cuda_build.sh)"; FAIL=1; exit 1; }
  SERVE=/tmp/tgabin/tga-serve PARITY=/tmp/tgabin/parity
fi
chmod +x "$SERVE" "$PARITY"
PY=$(gpu_python)
uname -m; nproc
if [ -z "$NO_CUDA" ]; then
  nvidia-smi
  note "GPU $(nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv,noheader | head -1)"
fi

# --- CUDA runtime libraries: take them from the machine (PyTorch env / toolkit), don't carry them
gpu_cuda_libs "$W/libs.txt"
ldd "$SERVE" | grep -E 'not found|cuda|cublas|nvrtc|curand'
# shellcheck disable=SC2016  # $1 $2 are bash -c's arguments
check "libraries resolved (ldd: nothing 'not found')" \
  bash -c '! ldd "$1" | grep -q "not found" && ! ldd "$2" | grep -q "not found"' _ "$SERVE" "$PARITY"

# --- parity tests on CUDA (f32 models against the transformers references)
export TGA_FIXTURES=$PWD/fixtures
if [ -z "$NO_CUDA" ]; then
  t=$(date +%s)
  TGA_TEST_DEVICE=cuda timeout 240 "$PARITY" --test-threads 1 --nocapture > "$OUT/parity_cuda.log" 2>&1
  rc=$?
  echo "PARITY CUDA rc=$rc in $(( $(date +%s) - t ))s"
  grep -vE '^\s*[0-9]+: ' "$OUT/parity_cuda.log" | head -150
  grep -E 'max \|diff\|' "$OUT/parity_cuda.log" | sed 's/^test [a-z_]* \.\.\. /  /' >> "$SUMMARY"
  check "parity tests on CUDA: $(grep -E '^test result' "$OUT/parity_cuda.log" | tail -1)" test "$rc" = 0
  check "parity ran on the GPU (Cuda device in the test output)" grep -q 'Cuda {' "$OUT/parity_cuda.log"
  # bf16 compute (how GPUs serve): bf16 tolerances, first greedy token (model/tests/parity.rs)
  t=$(date +%s)
  TGA_TEST_DEVICE=cuda TGA_TEST_DTYPE=bf16 timeout 240 "$PARITY" --test-threads 1 --nocapture \
    > "$OUT/parity_cuda_bf16.log" 2>&1
  rc=$?
  echo "PARITY CUDA bf16 rc=$rc in $(( $(date +%s) - t ))s"
  grep -vE '^\s*[0-9]+: ' "$OUT/parity_cuda_bf16.log" | head -150
  grep -E 'max \|diff\|' "$OUT/parity_cuda_bf16.log" | sed 's/^test [a-z_0-9]* \.\.\. /  /' >> "$SUMMARY"
  check "bf16 parity tests on CUDA: $(grep -E '^test result' "$OUT/parity_cuda_bf16.log" | tail -1)" test "$rc" = 0
  # the paged decode attention kernel against its Rust reference (model/tests/kernels.rs)
  if [ -n "${KERNELS:-}" ] || gpu_unpack /tmp/tgabin kernels; then
    KERNELS=${KERNELS:-/tmp/tgabin/kernels}
    t=$(date +%s)
    # CUDA graphs in a process of their own: a capture fault could leave the context unusable
    # for every test after it.
    TGA_TEST_DEVICE=cuda timeout 240 "$KERNELS" --test-threads 1 --nocapture \
      --skip decode_graphs_equal_eager_steps > "$OUT/kernels_cuda.log" 2>&1
    rc=$?
    echo "KERNELS CUDA rc=$rc in $(( $(date +%s) - t ))s"
    head -150 "$OUT/kernels_cuda.log"
    grep -E 'max \|diff\|' "$OUT/kernels_cuda.log" >> "$SUMMARY"
    check "kernels on CUDA (attention, fused ops, sampler): $(grep -E '^test result' "$OUT/kernels_cuda.log" | tail -1)" test "$rc" = 0
    TGA_TEST_DEVICE=cuda timeout 60 "$KERNELS" --test-threads 1 --nocapture --exact \
      decode_graphs_equal_eager_steps > "$OUT/graphs_cuda.log" 2>&1
    rc=$?
    grep -E '^graphs:|panicked|decode graph' "$OUT/graphs_cuda.log" | head -5 | tee -a "$SUMMARY"
    check "decode steps as CUDA graphs, replay equal to eager: $(grep -E '^test result' "$OUT/graphs_cuda.log" | tail -1)" test "$rc" = 0
  else
    note "FAIL no .cudabin/kernels.gz (run tools/cuda_build.sh)"; FAIL=1
  fi
fi

# --- helper scripts
cat > "$W/requests.py" <<'PYEOF'
import base64, json, sys
model, img, d = sys.argv[1:4]
uri = "data:image/png;base64," + base64.b64encode(open(img, "rb").read()).decode()
text = {"model": model, "max_tokens": 16, "temperature": 0, "stream": False, "logprobs": True, "top_logprobs": 2,
        "messages": [{"role": "user", "content": "Tell me a short story about a robot."}]}
image = {"model": model, "max_tokens": 16, "temperature": 0, "stream": False, "logprobs": True, "top_logprobs": 2,
         "messages": [{"role": "user", "content": [
             {"type": "image_url", "image_url": {"url": uri}},
             {"type": "text", "text": "What is in this image?"}]}]}
diag_text = dict(text, diagnostics={"lens": "final_norm", "refusal_tokens": "apology"})
diag_image = dict(image, diagnostics={"lens": "final_norm", "refusal_tokens": "apology"})
for name, body in [("chat_text", text), ("chat_image", image),
                   ("diag_text", diag_text), ("diag_image", diag_image)]:
    json.dump(body, open(f"{d}/{name}.req.json", "w"))
PYEOF

# 4 concurrent greedy requests of different lengths (batched decode) against the same one at a time
cat > "$W/concurrent.py" <<'PYEOF'
import json, sys, threading, urllib.request
base, model, d = sys.argv[1:4]
prompts = ["Hi.", "Count from one to ten, please, slowly and clearly.",
           "Write a haiku about the sea and the wind and the night sky over the harbour.",
           "Why?" * 20]
def ask(p):
    body = {"model": model, "max_tokens": 12, "temperature": 0, "stream": False,
            "messages": [{"role": "user", "content": p}]}
    req = urllib.request.Request(base + "/v1/chat/completions", json.dumps(body).encode(),
                                 {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.load(r)["choices"][0]["message"]["content"]
seq = [ask(p) for p in prompts]
par = [None] * len(prompts)
def worker(i): par[i] = ask(prompts[i])
ts = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
[t.start() for t in ts]; [t.join() for t in ts]
json.dump({"sequential": seq, "concurrent": par}, open(f"{d}/concurrent.json", "w"), indent=1)
print("sequential:", seq); print("concurrent:", par)
print("CONCURRENT==SEQUENTIAL:", seq == par)
PYEOF

# cuda against cpu: greedy texts must be equal; numbers are reported (largest difference)
cat > "$W/compare.py" <<'PYEOF'
import json, sys, os
W = sys.argv[1]
SKIP = {"id", "created", "request_id", "elapsed_ms", "duration_ms", "timestamp", "device"}
def load(dev, name):
    p = f"{W}/{dev}/{name}"
    if not os.path.exists(p): return None, None
    s = open(p).read()
    status = None
    if name.endswith(".out"):
        s, _, tail = s.partition("\nHTTP ")
        status = tail.split(" ")[0] if tail else None
    try: return json.loads(s), status
    except Exception: return s, status
def walk(a, b, path, st):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in set(a) | set(b):
            if k in SKIP: continue
            if k not in a or k not in b: st["mismatch"].append(f"{path}.{k}: only in one"); continue
            walk(a[k], b[k], f"{path}.{k}", st)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b): st["mismatch"].append(f"{path}: len {len(a)} vs {len(b)}"); return
        for i, (x, y) in enumerate(zip(a, b)): walk(x, y, f"{path}[{i}]", st)
    elif isinstance(a, bool) or isinstance(b, bool) or isinstance(a, str) or a is None or b is None:
        if a != b: st["mismatch"].append(f"{path}: {a!r} vs {b!r}"[:300])
    elif isinstance(a, (int, float)) and isinstance(b, (int, float)):
        d = abs(a - b)
        if d > st["max"][0]: st["max"] = (d, path, a, b)
    elif a != b:
        st["mismatch"].append(f"{path}: {a!r} vs {b!r}"[:300])
def txt(x):
    if isinstance(x, dict):
        if "choices" in x: return x["choices"][0]["message"]["content"]
        if "answer" in x: return x["answer"]
    return None
ok = True
for name in ["chat_text.out", "chat_image.out", "diag_text.out", "diag_image.out", "concurrent.json"]:
    (a, sa), (b, sb) = load("cuda", name), load("cpu", name)
    st = {"max": (0.0, None, None, None), "mismatch": []}
    walk(a, b, name, st)
    if name == "concurrent.json":
        equal = isinstance(a, dict) and a == b
        print(f"== {name}: cuda={a!r}\n   cpu={b!r}\n   equal={equal}")
    else:
        equal = sa == sb == "200" and txt(a) is not None and txt(a) == txt(b)
        print(f"== {name}: HTTP cuda={sa} cpu={sb} text cuda={txt(a)!r} cpu={txt(b)!r} equal={equal}")
    ok &= equal
    print(f"   max |numeric diff| {st['max'][0]:.3e} at {st['max'][1]} ({st['max'][2]} vs {st['max'][3]})")
    print(f"   {len(st['mismatch'])} non-numeric mismatches")
    for m in st["mismatch"][:15]: print("    ", m)
print("GREEDY cuda==cpu:", ok)
sys.exit(0 if ok else 1)
PYEOF

# --- server on each device: same requests, greedy
IMG=fixtures/images/photo_120x160.png
run_server() {  # $1 = cuda|cpu|cuda-bf16 (label; the device is the part before '-'), $2 = port
  local label=$1 port=$2 d=$W/$1 base=http://127.0.0.1:$2 pid t r model dev=${1%%-*} flags=()
  # The CUDA label is the f32 parity mode (`--dtype auto` would serve bf16 on the GPU and the
  # comparison with the CPU would measure bf16 rounding).
  case $label in cuda) flags=(--dtype f32) ;; cuda-bf16) flags=(--dtype bf16) ;; esac
  mkdir -p "$d"
  t=$(date +%s)
  RUST_LOG=info "$SERVE" serve --device "$dev" --port "$port" "${flags[@]}" > "$OUT/server_$label.log" 2>&1 &
  pid=$!; PIDS+=("$pid")
  for _ in $(seq 1 120); do curl -sf "$base/ready" > "$d/ready.json" && break; sleep 0.5; done
  echo "SERVER $label ready after $(( $(date +%s) - t ))s"; cat "$d/ready.json"; echo
  check "server $label ready" grep -q ready "$d/ready.json"
  if [ "$dev" = cuda ]; then
    check "server $label: model on the GPU (device=cuda in its log)" grep -q 'device=cuda' "$OUT/server_$label.log"
  fi
  curl -s -m 30 "$base/v1/models" > "$d/models.json"; cat "$d/models.json"; echo
  model=$("$PY" -c 'import json,sys;print(json.load(open(sys.argv[1]))["data"][0]["id"])' "$d/models.json")
  "$PY" "$W/requests.py" "$model" "$IMG" "$d"
  for r in chat_text chat_image; do
    curl -s -m 60 -w '\nHTTP %{http_code} %{time_total}s\n' -H 'content-type: application/json' \
      -d @"$d/$r.req.json" "$base/v1/chat/completions" > "$d/$r.out"; cut -c1-1500 "$d/$r.out"
  done
  for r in diag_text diag_image; do
    curl -s -m 60 -w '\nHTTP %{http_code} %{time_total}s\n' -H 'content-type: application/json' \
      -d @"$d/$r.req.json" "$base/v1/safety/diagnose" > "$d/$r.out"; cut -c1-1500 "$d/$r.out"
  done
  "$PY" "$W/concurrent.py" "$base" "$model" "$d" > "$d/concurrent.out" 2>&1; cat "$d/concurrent.out"
  if [ "$label" = cuda-bf16 ]; then
    # bf16 rounding differs between batch shapes, so a near-tie may flip: reported, not required.
    note "INFO $label: concurrent answers equal sequential ones: $(grep -c 'CONCURRENT==SEQUENTIAL: True' "$d/concurrent.out")"
    for r in chat_text chat_image diag_text diag_image; do
      check "$label: $r answered (HTTP 200)" grep -q '^HTTP 200 ' "$d/$r.out"
    done
  else
    check "$dev: concurrent answers equal sequential ones" grep -q 'CONCURRENT==SEQUENTIAL: True' "$d/concurrent.out"
  fi
  curl -s -m 10 "$base/metrics" > "$d/metrics.txt"; head -40 "$d/metrics.txt"
  kill "$pid"; wait "$pid"; echo "SERVER $label exit=$?"
  tail -30 "$OUT/server_$label.log"
}
if [ -z "$NO_CUDA" ]; then run_server cuda 8765; run_server cuda-bf16 8767; fi
run_server cpu 8766

if [ -z "$NO_CUDA" ]; then
  "$PY" "$W/compare.py" "$W" > "$OUT/compare.txt" 2>&1
  rc=$?
  cat "$OUT/compare.txt"
  check "greedy outputs on CUDA equal the CPU's (compare.txt)" test "$rc" = 0
  # bf16 against f32 on the same GPU: reported only (bf16 may flip a near-tie of a random model).
  mkdir -p "$W/cmp16"; ln -sfn "$W/cuda-bf16" "$W/cmp16/cuda"; ln -sfn "$W/cuda" "$W/cmp16/cpu"
  "$PY" "$W/compare.py" "$W/cmp16" > "$OUT/compare_bf16.txt" 2>&1
  note "INFO bf16 vs f32 on CUDA: $(grep -c 'equal=True' "$OUT/compare_bf16.txt") of 5 outputs equal (compare_bf16.txt)"
fi
exit "$FAIL"
