#!/bin/sh
# Session 21: the variable-tracking cells at 4K and 8K (n = 30, W = 4): SmolLM2-135M does not follow the
# task (docs/accuracy.md, "What this does not show"), so accuracy measures the model; the
# agreement with full's tokens still measures the methods. Run from the repository root.
set -x
OUT=docs/results/eval-table
COMMON="--config configs/tiny-cpu.yaml --model smollm2-135m-instruct --set model.dtype=bfloat16 --set decode.max_new_tokens=32 --samples 30 --set parallel.timeout_s=600"
[ -f $OUT/vt-4096-w4.json ] || .venv/bin/apb eval $COMMON --tasks vt --methods full,star,apb,spava --world-size 4 --lengths 4096 --json $OUT/vt-4096-w4.json
.venv/bin/apb eval $COMMON --tasks vt --methods full,star,apb,spava --world-size 4 --lengths 8000 --json $OUT/vt-8000-w4.json
# the accurate settings on the one cell they had not run (every method answers all 30 there at its defaults)
X=$OUT/exact-layers
.venv/bin/apb eval $COMMON --tasks passkey --methods apb --world-size 4 --lengths 4096 --set method.exact_layers=8 --json $X/passkey-4096-w4-apb-exact8.json
.venv/bin/apb eval $COMMON --tasks passkey --methods spava --world-size 4 --lengths 4096 --set method.exact_layers=8 \
  --set method.anchor_len=0.25 --set method.passing_len=0.25 --json $X/passkey-4096-w4-spava-exact8-a16-p32.json
# vt at W=8, 8K (apb and spava; full is one host: its W=4 answers are the reference)
.venv/bin/apb eval $COMMON --tasks vt --methods apb,spava --world-size 8 --lengths 8000 --json $OUT/vt-8000-w8.json
