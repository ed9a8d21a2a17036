#!/bin/sh
# Session 26: five more runs of the command, the report now holding every repeat's per-rank
# layer clocks (rank_layer_cpu_s_by_repeat), so the projection can be compared three ways: the median
# run's clocks, each rank's fastest per layer, each rank's median per layer (clock_estimators.py).
# Run from the repository root: sh docs/results/bench13/run-s26-clocks.sh
set -e
OUT=docs/results/bench13
C="--config configs/tiny-cpu.yaml --model bench-attn"
for run in ${RUNS:-f g h i j}; do
  .venv/bin/apb bench $C --methods ring,apb,spava --lengths 32768 --world-size 8 --repeats 3 \
    --json $OUT/bench-attn-w8-32k-s26-clocks$run.json > $OUT/bench-attn-w8-32k-s26-clocks$run.txt 2>&1
done
