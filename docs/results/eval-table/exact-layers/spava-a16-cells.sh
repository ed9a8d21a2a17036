#!/bin/bash
# Session 19: spava with 8 exact layers, anchor n/16 and passing n/32 (no loss on niah 4K:
# spava-a16.sh) on the other cells of the table. Run from the repository root.
set -e
OUT=docs/results/eval-table/exact-layers
COMMON="--config configs/tiny-cpu.yaml --model smollm2-135m-instruct --set model.dtype=bfloat16 --set decode.max_new_tokens=32 --set parallel.timeout_s=600"
for s in "niah 8000 4" "passkey 8000 4" "niah 8000 8" "passkey 8000 8" "passkey 6144 4"; do set -- $s
  f=$OUT/$1-$2-w$3-spava-exact8-a16-p32.json; [ -f $f ] && continue
  echo "== $f $(date +%T)"
  .venv/bin/apb eval $COMMON --samples 30 --tasks $1 --lengths $2 --world-size $3 --methods spava \
    --set method.exact_layers=8 --set method.anchor_len=0.25 --set method.passing_len=0.25 --json $f
done
