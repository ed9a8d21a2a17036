#!/bin/sh
# Session 26: the workers' allocator setting on the real checkpoint's shape, where the linear layers
# dominate: SmolLM2-135M-Instruct, 8K tokens, W=2, float32, off then on (one run each).
# Run from the repository root: sh docs/results/bench13/run-s26-retain-smollm2.sh
set -e
OUT=docs/results/bench13
C="--config configs/tiny-cpu.yaml --model smollm2-135m-instruct --set model.dtype=float32"
for mode in off on; do
  flag=$([ $mode = on ] && echo true || echo false)
  .venv/bin/apb bench $C --methods ring,apb,spava --lengths 8192 --world-size 2 --repeats 3 \
    --set parallel.retain_freed_memory=$flag \
    --json $OUT/smollm2-fp32-w2-s26-retain-$mode.json > $OUT/smollm2-fp32-w2-s26-retain-$mode.txt 2>&1
done
