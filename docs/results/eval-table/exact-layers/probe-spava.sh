#!/bin/bash
# Session 19: spava with exact layers on the documents its 8-exact-layer run missed: which setting
# answers them. Run from the repository root; output beside this file (h0-spava-*, ...).
set -e
OUT=docs/results/eval-table/exact-layers
COMMON="--config configs/tiny-cpu.yaml --model smollm2-135m-instruct --set model.dtype=bfloat16 --set decode.max_new_tokens=32 --set parallel.timeout_s=600 --methods spava"
H0="--data docs/results/eval-table/passkey-6144-host0-needles.jsonl --world-size 4"
for s in "exact8 --set method.exact_layers=8" \
         "exact10 --set method.exact_layers=10" \
         "exact8-a16 --set method.exact_layers=8 --set method.anchor_len=0.25" \
         "exact8-p32 --set method.exact_layers=8 --set method.passing_len=0.25"; do
  set -- $s; tag=$1; shift
  f=$OUT/h0-spava-$tag.json; [ -f $f ] && continue
  echo "== $f $(date +%T)"
  .venv/bin/apb eval $COMMON $H0 "$@" --json $f
done
