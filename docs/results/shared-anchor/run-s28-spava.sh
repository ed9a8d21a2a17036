#!/bin/sh
# Session 28: spava's keys in one copy for both virtual blocks (block 1's a prefix of block 2's):
# the same attention in another order of keys. Does any answer move on a real model?
# SmolLM2-135M-Instruct, passkey at 4K, W=4, the same 15 documents as run-spava.sh (session 24),
# float32. Compared within this run (spava with and without its split anchor, as session 24 did)
# and against session 24's answers from the code before (spava:shared there is spava's default
# here).
# Run from the repository root.
set -x
OUT=docs/results/shared-anchor
.venv/bin/apb eval --config configs/tiny-cpu.yaml --model smollm2-135m-instruct --set decode.max_new_tokens=32 \
  --samples 15 --tasks passkey --methods spava:unshared,spava --world-size 4 --lengths 4096 \
  --json $OUT/passkey-4096-w4-spava-s28.json
.venv/bin/python $OUT/compare.py passkey-4096-w4-spava-s28.json spava:unshared,spava \
  spava:shared@passkey-4096-w4-spava.json,spava spava:unshared@passkey-4096-w4-spava.json,spava:unshared \
  > $OUT/compare-spava-s28.txt
