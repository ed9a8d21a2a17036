#!/bin/sh
# Session 23, with spava's local part as one causal call (a trial, reverted after ab_spava_call.sh; commit "spava: the local part of a
# layer in one causal call"): the W=8 32K bench on bench-attn again, three runs, with apb:shared.
# Run from the repository root: sh docs/results/bench13/run-s23-fused.sh
set -e
OUT=docs/results/bench13
APB=".venv/bin/apb"
C="--config configs/tiny-cpu.yaml --model bench-attn"
for run in a b c; do
  $APB bench $C --methods ring,apb,apb:shared,spava --lengths 32768 --world-size 8 --repeats 3 \
    --json $OUT/bench-attn-w8-32k-s23-fused$run.json > $OUT/bench-attn-w8-32k-s23-fused$run.txt 2>&1
done
