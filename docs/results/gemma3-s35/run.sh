#!/bin/sh
# The pretrained Gemma 3 270M (15 sliding layers over 512 keys, 3 global) at 8K, W = 2, in
# bfloat16 (auto on this AVX512-BF16 CPU), beside transformers' own forward: its speed under each
# method, and the K/V each host keeps now that a sliding layer keeps only its window.
# Run from the repository root: sh docs/results/gemma3-s35/run.sh
OUT=docs/results/gemma3-s35
.venv/bin/apb bench --config configs/tiny-cpu.yaml --model gemma3-270m --set model.dtype=bfloat16 \
  --methods full,ring,apb,spava --lengths 8192 --world-size 2 --repeats 2 --hf-baseline \
  --json $OUT/bench-w2-8k.json > $OUT/bench-w2-8k.txt 2>&1
