#!/bin/sh
# Session 23, with spava's local part as one causal call (a trial, reverted after ab_spava_call.sh): W=2, where causal calls are a larger
# share of spava's pairs (45% at 8K), on bench-attn (4K-16K) and SmolLM2-135M's real shape (8K,
# float32: what auto picks on this AMD EPYC). Compare with the session-22 files of the same names
# (bench-attn-w2-s22-epyc.json, smollm2-fp32-w2-s22-epyc.json).
# Run from the repository root: sh docs/results/bench13/run-s23-w2.sh
set -e
OUT=docs/results/bench13
APB=".venv/bin/apb"
C="--config configs/tiny-cpu.yaml"
$APB bench $C --model bench-attn --methods ring,apb,spava --lengths 4096,8192,16384 --world-size 2 --repeats 3 \
  --json $OUT/bench-attn-w2-s23.json > $OUT/bench-attn-w2-s23.txt 2>&1
$APB bench $C --model smollm2-135m-instruct --set model.dtype=float32 --methods ring,apb,spava --lengths 8192 \
  --world-size 2 --repeats 3 --json $OUT/smollm2-fp32-w2-s23.json > $OUT/smollm2-fp32-w2-s23.txt 2>&1
