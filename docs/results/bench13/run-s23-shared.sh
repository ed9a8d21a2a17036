#!/bin/sh
# Session 23 (AMD EPYC, 2 cores, AVX2, no AMX: float32): the W=8 32K bench on bench-attn
# with the anchor computed once and sent (method.share_anchor, the ':shared' variants) beside the
# defaults, three runs. Run from the repository root: sh docs/results/bench13/run-s23-shared.sh
set -e
OUT=docs/results/bench13
APB=".venv/bin/apb"
C="--config configs/tiny-cpu.yaml --model bench-attn"
for run in a b c; do
  $APB bench $C --methods ring,apb,apb:shared,spava,star,star:shared --lengths 32768 --world-size 8 --repeats 3 \
    --json $OUT/bench-attn-w8-32k-s23-shared$run.json > $OUT/bench-attn-w8-32k-s23-shared$run.txt 2>&1
done
