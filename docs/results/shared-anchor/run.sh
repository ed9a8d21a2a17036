#!/bin/sh
# Session 23: does a shared anchor change any answer on a real model? SmolLM2-135M-Instruct,
# passkey at 4K, W=4, 15 documents, float32 (what auto picks on the AMD EPYC machine), star and
# apb with and without method.share_anchor; compare.py diffs the answers document by document.
# Run from the repository root.
set -x
OUT=docs/results/shared-anchor
.venv/bin/apb eval --config configs/tiny-cpu.yaml --model smollm2-135m-instruct --set decode.max_new_tokens=32 \
  --samples 15 --tasks passkey --methods apb,apb:shared,star,star:shared --world-size 4 --lengths 4096 \
  --json $OUT/passkey-4096-w4.json
.venv/bin/python $OUT/compare.py > $OUT/compare.txt
