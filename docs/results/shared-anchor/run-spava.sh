#!/bin/sh
# Session 24: does splitting spava's anchor over the hosts (method.share_anchor, spava:shared)
# change any answer on a real model? SmolLM2-135M-Instruct, passkey at 4K, W=4, the same 15
# documents as run.sh, float32; compare.py diffs the answers document by document.
# Run from the repository root.
set -x
OUT=docs/results/shared-anchor
.venv/bin/apb eval --config configs/tiny-cpu.yaml --model smollm2-135m-instruct --set decode.max_new_tokens=32 \
  --samples 15 --tasks passkey --methods spava:unshared,spava:shared --world-size 4 --lengths 4096 \
  --json $OUT/passkey-4096-w4-spava.json
.venv/bin/python $OUT/compare.py passkey-4096-w4-spava.json spava:unshared,spava:shared > $OUT/compare-spava.txt
