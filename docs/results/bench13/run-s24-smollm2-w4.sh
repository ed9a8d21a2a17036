#!/bin/sh
# Session 24 (AMD EPYC, 2 cores, float32): SmolLM2-135M-Instruct (the real checkpoint) at 8K over
# W=4 hosts, the anchor shared (the new defaults of apb and spava) beside recomputed on every host.
# Run from the repository root: sh docs/results/bench13/run-s24-smollm2-w4.sh
set -e
OUT=docs/results/bench13
.venv/bin/apb bench --config configs/tiny-cpu.yaml --model smollm2-135m-instruct --set model.dtype=float32 \
  --methods ring,apb,spava,apb:unshared,spava:unshared --lengths 8192 --world-size 4 --repeats 3 \
  --json $OUT/smollm2-fp32-w4-s24.json > $OUT/smollm2-fp32-w4-s24.txt 2>&1
