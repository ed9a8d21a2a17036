#!/bin/sh
# Session 21: the variable-tracking cell at 4K (n = 30, W = 4): SmolLM2-135M does not follow the
# task (docs/accuracy.md, "What this does not show"), so accuracy measures the model; the
# agreement with full's tokens still measures the methods. Run from the repository root.
set -x
OUT=docs/results/eval-table
COMMON="--config configs/tiny-cpu.yaml --model smollm2-135m-instruct --set model.dtype=bfloat16 --set decode.max_new_tokens=32 --samples 30 --set parallel.timeout_s=600"
.venv/bin/apb eval $COMMON --tasks vt --methods full,star,apb,spava --world-size 4 --lengths 4096 --json $OUT/vt-4096-w4.json
