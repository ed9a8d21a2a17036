#!/bin/sh
# Session 39: the bench-attn command at 502bc7b, on an AMD EPYC with 2 cores and
# AVX512-BF16 (bench-attn runs in float32, as in every session), nothing else running.
# Run from the repository root (OUT, APB and RUNS may be overridden):
#   sh docs/results/bench13/run-s39-issue.sh
OUT=${OUT:-docs/results/bench13}
APB=${APB:-.venv/bin/apb}
for run in ${RUNS:-a b c d e}; do
  $APB bench --config configs/tiny-cpu.yaml --model bench-attn --methods ring,apb,spava --lengths 32768 \
    --world-size 8 --repeats 3 --json $OUT/bench-attn-w8-32k-s39-$run.json > $OUT/bench-attn-w8-32k-s39-$run.txt 2>&1
done
