#!/bin/sh
# Session 28: the command, nine times (RUNS="a b c d e f g h i" TAG=rounds), with the repeats
# in rounds over the methods (ring, apb, spava, ring, ...), the bench's order from this session; the
# three TAG=keys runs (a b c) were made before that change, with each method's repeats in a block,
# and spava's keys already in one copy; the three TAG=final runs (a b c) after apb split's reorder.
# Then the ratios over the runs:
#   .venv/bin/python docs/results/bench13/summary_s28.py docs/results/bench13/bench-attn-w8-32k-s28-rounds-*.json
# Run from the repository root: TAG=rounds RUNS="a b c" sh docs/results/bench13/run-s28-issue.sh
set -e
OUT=docs/results/bench13
for run in ${RUNS:-a b c}; do
  .venv/bin/apb bench --config configs/tiny-cpu.yaml --model bench-attn --methods ring,apb,spava --lengths 32768 \
    --world-size 8 --repeats 3 --json $OUT/bench-attn-w8-32k-s28-${TAG:-rounds}-$run.json \
    > $OUT/bench-attn-w8-32k-s28-${TAG:-rounds}-$run.txt 2>&1
done
