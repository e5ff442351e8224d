#!/usr/bin/env bash
# The whole toy TGA pipeline from fixed seeds: venv, training, evaluation, shipping to builtin/.
#   tools/toy_tga/build.sh            (THREADS=1 by default; TGA_VARIANT picks what ships as builtin/tga)
set -euo pipefail
cd "$(dirname "$0")"
THREADS=${THREADS:-1}
TGA_VARIANT=${TGA_VARIANT:-tga_disc}
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q -r requirements.txt
fi
PY=.venv/bin/python
mkdir -p work
start=$(date +%s)
$PY train.py --work work --threads "$THREADS" --per-obj 300 --lm-steps 500 --safety-steps 500 \
  --clip-steps 1500 --s1-steps 200 --s2-steps 500 2>&1 | grep -v -i warn | tee work/train.log
echo "training wall time: $(( $(date +%s) - start )) s" | tee -a work/train.log
# held-out eval set: a generator seed never used in training (training uses 1000-5000)
$PY make_eval_set.py --seed 424242 --n 210 --out work/eval_seed424242
$PY evaluate.py --data work/eval_seed424242/items.jsonl --threads "$THREADS" \
  --models work/models/baseline,work/models/tga_paper,work/models/tga_disc \
  --clip work/models/clip --corpus work/models/corpus.txt --out work/eval.json 2>&1 | grep -v -i -E "warn|Loading weights"
$PY plots.py --eval work/eval.json --out ../../bench/toy_tga
$PY ship.py --models work/models --tga "$TGA_VARIANT" --dest ../../builtin
echo "total wall time: $(( $(date +%s) - start )) s"
