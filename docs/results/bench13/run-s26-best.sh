#!/bin/sh
# Session 26 (AMD EPYC, 2 cores, AVX2, no AMX: float32): the command with the projection
# from each rank's fastest clock per layer over the repeats, five runs. These five reports come from
# the commit that made that the projection: in them projected_s is the fastest-of projection and
# projected_median_run_s the median run's (the projection before and after it; later reports call
# them projected_fastest_s and projected_s). Run from the repository root:
#   sh docs/results/bench13/run-s26-best.sh
# then: .venv/bin/python docs/results/bench13/shared_summary.py s26-best > docs/results/bench13/best_summary.txt
set -e
OUT=docs/results/bench13
APB=".venv/bin/apb"
C="--config configs/tiny-cpu.yaml --model bench-attn"
for run in ${RUNS:-a b c d e}; do
  $APB bench $C --methods ring,apb,spava --lengths 32768 --world-size 8 --repeats 3 \
    --json $OUT/bench-attn-w8-32k-s26-best$run.json > $OUT/bench-attn-w8-32k-s26-best$run.txt 2>&1
done
