#!/bin/bash
# Session 19: the two niah 8K documents apb misses at W=8 with 8 exact layers (19 and 20; every
# approximate setting misses 20): how many exact layers answer them. Run from the repository root.
set -e
OUT=docs/results/eval-table/exact-layers
COMMON="--config configs/tiny-cpu.yaml --model smollm2-135m-instruct --set model.dtype=bfloat16 --set decode.max_new_tokens=32 --set parallel.timeout_s=600"
D="--data docs/results/eval-table/niah-8000-docs-19-20.jsonl --world-size 8 --methods apb"
for n in 12 16; do
  f=$OUT/niah8k-19-20-w8-apb-exact$n.json; [ -f $f ] && continue
  echo "== $f $(date +%T)"
  .venv/bin/apb eval $COMMON $D --set method.exact_layers=$n --json $f
done
# full itself on them in float32 (is full's right answer on 20 the bfloat16 floor's luck?)
f=$OUT/niah8k-19-20-full-float32.json
[ -f $f ] || .venv/bin/apb eval --config configs/tiny-cpu.yaml --model smollm2-135m-instruct --set model.dtype=float32 \
  --set decode.max_new_tokens=32 --set parallel.timeout_s=600 --data docs/results/eval-table/niah-8000-docs-19-20.jsonl \
  --world-size 1 --methods full --json $f
