#!/bin/sh
# Session 38: gather-mode decode (decode-s37/decode.py) on a random Llama-3.2-1B-shaped model cut
# to 2 layers (llama1b_shape.py), at 4K and 16K, bfloat16: the code before the head-size-64 rule
# (BEFORE) and after it (AFTER), alternated, plus transformers' own sdpa. Usage, from any
# directory without an apb/ folder:
#   sh REPO/docs/results/decode-s38/run_d64.sh REPO BEFORE AFTER > REPO/docs/results/decode-s38/decode_d64.jsonl
set -eu
REPO=$1 BEFORE=$2 AFTER=$3
PY=$REPO/.venv/bin/python
MODEL=/tmp/apb-llama1b-2layer
[ -d $MODEL ] || "$PY" "$REPO/docs/results/decode-s38/llama1b_shape.py" $MODEL >&2
. "$REPO/docs/results/install-commit.sh"
for c in "$BEFORE" "$AFTER"; do install_commit "$REPO" "$c"; done
for n in 4096 16384; do
  for round in 1 2; do
    for c in "$BEFORE" "$AFTER"; do
      PYTHONPATH=/tmp/apb-site-$c "$PY" "$REPO/docs/results/decode-s37/decode.py" "$n" --model $MODEL --label "$c" 2>/dev/null
    done
    PYTHONPATH=/tmp/apb-site-$AFTER "$PY" "$REPO/docs/results/decode-s37/decode.py" "$n" --model $MODEL --impl sdpa \
      --label "$AFTER" 2>/dev/null
  done
done
