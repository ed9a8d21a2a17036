#!/bin/sh
# Session 26: projected against wall at W=2 with the projection from each rank's fastest clock per
# layer over the repeats (the issue asks them within 5% from 4K up; wall is the median run's).
# Run from the repository root: sh docs/results/bench13/run-s26-w2.sh
set -e
OUT=docs/results/bench13
.venv/bin/apb bench --config configs/tiny-cpu.yaml --model bench-attn --methods full,ring,apb,spava \
  --lengths 4096,8192,16384 --world-size 2 --repeats 3 \
  --json $OUT/bench-attn-w2-s26.json > $OUT/bench-attn-w2-s26.txt 2>&1
