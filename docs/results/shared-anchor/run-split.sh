#!/bin/sh
# Session 27: does splitting apb's anchor over hosts 0..W-2 (method.share_anchor: split, apb's
# default now) change any answer on a real model? SmolLM2-135M-Instruct, passkey at 4K, W=4, the
# same 15 documents as run.sh, float32; compare.py diffs the answers document by document.
# Run from the repository root.
set -x
OUT=docs/results/shared-anchor
.venv/bin/apb eval --config configs/tiny-cpu.yaml --model smollm2-135m-instruct --set decode.max_new_tokens=32 \
  --samples 15 --tasks passkey --methods apb:unshared,apb:split --world-size 4 --lengths 4096 \
  --json $OUT/passkey-4096-w4-apb-split.json
.venv/bin/python $OUT/compare.py passkey-4096-w4-apb-split.json apb:unshared,apb:split > $OUT/compare-apb-split.txt
