#!/bin/sh
# Session 27: the issue's command with apb's new default (the anchor split over hosts 0..W-2), twice.
# Run from the repository root: sh docs/results/bench13/run-s27-issue.sh
set -e
OUT=docs/results/bench13
for run in ${RUNS:-a b}; do
  .venv/bin/apb bench --config configs/tiny-cpu.yaml --model bench-attn --methods ring,apb,spava --lengths 32768 \
    --world-size 8 --repeats 3 --json $OUT/bench-attn-w8-32k-s27-issue-$run.json > $OUT/bench-attn-w8-32k-s27-issue-$run.txt 2>&1
done
