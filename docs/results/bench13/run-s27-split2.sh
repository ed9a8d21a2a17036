#!/bin/sh
# Session 27, second part: the linear-bound Llama-3.1-8B layer shape at W=4, and SmolLM2's shape at
# W=8 again with the split run before the broadcast (the first W=8 run had it after, and a worker's
# peak memory can carry what an earlier row left in its heap).
# Run from the repository root: sh docs/results/bench13/run-s27-split2.sh
set -e
OUT=docs/results/bench13
C="--config configs/tiny-cpu.yaml"
.venv/bin/apb bench $C --model bench-llama8b-2layer --set model.dtype=float32 --methods ring,apb:shared,apb:split,spava \
  --lengths 8192 --world-size 4 --repeats 3 \
  --json $OUT/bench-llama8b-8k-w4-s27-split.json > $OUT/bench-llama8b-8k-w4-s27-split.txt 2>&1
.venv/bin/apb bench $C --model bench-smollm2 --set model.dtype=float32 --methods apb:split,apb:shared \
  --lengths 8192 --world-size 8 --repeats 3 \
  --json $OUT/bench-smollm2-8k-w8-s27-split-b.json > $OUT/bench-smollm2-8k-w8-s27-split-b.txt 2>&1
