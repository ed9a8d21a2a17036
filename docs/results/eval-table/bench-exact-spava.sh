#!/bin/sh
# Session 19: what spava's exact layers cost on this machine (docs/accuracy.md section 8): ring
# beside spava at its defaults, then beside spava with 8 exact layers and passing n/32. SmolLM2 in
# bfloat16, W=4, 8,000 tokens, 3 repeats; from the repository root with nothing else running.
set -ex
OUT=docs/results/eval-table
L="--config configs/tiny-cpu.yaml --set model.dtype=bfloat16 --model smollm2-135m-instruct --lengths 8000 --world-size 4 --repeats 3"
.venv/bin/apb bench $L --methods ring,spava --json $OUT/bench-s19-8000-w4-spava-default.json
.venv/bin/apb bench $L --methods ring,spava --set method.exact_layers=8 --set method.passing_len=0.25 \
  --json $OUT/bench-s19-8000-w4-spava-exact8-p32.json
