#!/bin/sh
# Session 38: decode-s37/decode.py on the two shapes session 37 could not time end to end: the real
# Gemma 3 270M (sliding layers of window 512, one KV head of 256 for 4 query heads: the grouped row)
# and bench-llama8b-2layer (Llama-3.1-8B's layer, 32 query heads over 8 KV heads of 128, random
# weights). Each on the code before session 37 (b9ac86a) and at AFTER (default HEAD), alternating,
# plus transformers' own sdpa, at 4K and 16K, bfloat16, the machine's threads. Usage, from any
# directory without an apb/ folder:
#   sh REPO/docs/results/decode-s38/run.sh REPO [AFTER] > REPO/docs/results/decode-s38/decode.jsonl
set -eu
REPO=$1
AFTER=${2:-HEAD}
PY=$REPO/.venv/bin/python
. "$REPO/docs/results/install-commit.sh"
for c in b9ac86a "$AFTER"; do install_commit "$REPO" "$c"; done
for model in gemma3-270m bench-llama8b-2layer; do
  for n in 4096 16384; do
    for round in 1 2; do
      for c in b9ac86a "$AFTER"; do
        PYTHONPATH=/tmp/apb-site-$c "$PY" "$REPO/docs/results/decode-s37/decode.py" "$n" --model $model --label "$c" 2>/dev/null
      done
      PYTHONPATH=/tmp/apb-site-$AFTER "$PY" "$REPO/docs/results/decode-s37/decode.py" "$n" --model $model --impl sdpa \
        --label "$AFTER" 2>/dev/null
    done
  done
done
