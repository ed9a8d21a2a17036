#!/bin/sh
# Prefill time of spava at the sizes of the accuracy sweep, on SmolLM2 in bfloat16 at 4K, W=4,
# nothing else running (docs/accuracy.md, section 0). Run from the repository root.
set -x
OUT=docs/results/eval-table
COMMON="--config configs/tiny-cpu.yaml --model smollm2-135m-instruct --set model.dtype=bfloat16 --world-size 4 --lengths 4096 --repeats 3"
apb bench $COMMON --methods full,spava --json $OUT/bench-spava-default.json
for s in "0.25 a16-p32" "0.5 a8-p16"; do set -- $s
  apb bench $COMMON --methods spava --set method.anchor_len=$1 --set method.passing_len=$1 --json $OUT/bench-spava-$2.json
done
