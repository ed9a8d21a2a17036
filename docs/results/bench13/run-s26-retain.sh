#!/bin/sh
# Session 26: the issue's command with the workers' allocator keeping freed memory (on:
# parallel.retain_freed_memory, apb.runtime.allocator; opt-in after run-s26-retain-smollm2.sh) and with the C library's defaults
# (off), alternating, four runs each. Run from the repository root: sh docs/results/bench13/run-s26-retain.sh
# then: .venv/bin/python docs/results/bench13/retain_summary.py > docs/results/bench13/retain_summary.txt
set -e
OUT=docs/results/bench13
C="--config configs/tiny-cpu.yaml --model bench-attn"
for run in ${RUNS:-1 2 3 4}; do
  for mode in off on; do
    flag=$([ $mode = on ] && echo true || echo false)
    .venv/bin/apb bench $C --methods ring,apb,spava --lengths 32768 --world-size 8 --repeats 3 \
      --set parallel.retain_freed_memory=$flag \
      --json $OUT/bench-attn-w8-32k-s26-retain-$mode$run.json > $OUT/bench-attn-w8-32k-s26-retain-$mode$run.txt 2>&1
  done
done
