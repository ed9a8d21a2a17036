#!/bin/bash
# Session 19: spava on niah 4K keeps missing documents 0, 6 and 9 with exact layers (apb answers
# them; spava answers another key's number or a digit off). With 8 exact layers and passing n/32,
# add the anchor of its schedule (n/16, as apb's block/4 at W=4); then more exact layers (15, the
# rest at the defaults). Run from the repository root.
set -e
OUT=docs/results/eval-table/exact-layers
COMMON="--config configs/tiny-cpu.yaml --model smollm2-135m-instruct --set model.dtype=bfloat16 --set decode.max_new_tokens=32 --set parallel.timeout_s=600"
CELL="--samples 30 --tasks niah --lengths 4096 --world-size 4 --methods spava"
for s in "exact8-a16-p32 --set method.exact_layers=8 --set method.anchor_len=0.25 --set method.passing_len=0.25" \
         "exact15 --set method.exact_layers=15"; do
  set -- $s; tag=$1; shift
  f=$OUT/niah-4096-w4-spava-$tag.json; [ -f $f ] && continue
  echo "== $f $(date +%T)"
  .venv/bin/apb eval $COMMON $CELL "$@" --json $f
done
