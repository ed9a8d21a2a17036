#!/bin/sh
# Session 28: session 27 measured apb's split 2-4% slower than the broadcast on SmolLM2's shape at
# W=8 (two runs, each method's repeats in a block) where the ideal ties. Again, with the repeats in
# rounds (apb:shared, apb:split, apb:shared, ...), so a slow spell falls on both, twice.
# Then TAG=gatherfirst, after the split waited for the gather before choosing its passing block.
# Run from the repository root: [TAG=gatherfirst] sh docs/results/bench13/run-s28-smollm2-w8.sh
set -e
OUT=docs/results/bench13
for run in ${RUNS:-a b}; do
  .venv/bin/apb bench --config configs/tiny-cpu.yaml --model bench-smollm2 --set model.dtype=float32 \
    --methods apb:shared,apb:split --lengths 8192 --world-size 8 --repeats 3 \
    --json $OUT/bench-smollm2-8k-w8-s28-${TAG:-rounds}-$run.json > $OUT/bench-smollm2-8k-w8-s28-${TAG:-rounds}-$run.txt 2>&1
done
