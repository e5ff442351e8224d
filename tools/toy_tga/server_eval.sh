#!/usr/bin/env bash
# The product's own CLI on the shipped files (retrieval off: the server has none yet), then the
# Python comparison (scores from records.jsonl, greedy parity). SERVER=/tmp/tga-serve-base by default.
set -euo pipefail
cd "$(dirname "$0")"
SERVER=${SERVER:-/tmp/tga-serve-base}
DATA=${DATA:-work/eval_seed424242/items.jsonl}
B=../../builtin
for m in baseline tga; do
  $SERVER eval --data "$DATA" --model $B/$m --vision-tower $B/clip --template llava_llama_2 \
    --out work/server-eval-$m "$@"
  .venv/bin/python compare_server.py --data "$DATA" --server-out work/server-eval-$m --model $B/$m \
    --clip $B/clip --n 60 --out work/server-eval-$m/compare.json 2>&1 | grep -v -i -E "warn|Loading weights" | tail -3
done
