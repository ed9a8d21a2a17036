#!/bin/sh
# Session 24 (AMD EPYC, 2 cores, AVX2, no AMX: float32): the W=8 32K bench on bench-attn
# with spava's anchor split over the hosts (method.share_anchor, 'spava:shared') beside the
# defaults and apb:shared, three runs. Run from the repository root:
#   sh docs/results/bench13/run-s24-split.sh
set -e
OUT=docs/results/bench13
APB=".venv/bin/apb"
C="--config configs/tiny-cpu.yaml --model bench-attn"
for run in a b c; do
  $APB bench $C --methods ring,apb,apb:shared,spava,spava:shared --lengths 32768 --world-size 8 --repeats 3 \
    --json $OUT/bench-attn-w8-32k-s24-split$run.json > $OUT/bench-attn-w8-32k-s24-split$run.txt 2>&1
done
