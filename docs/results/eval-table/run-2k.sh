#!/bin/sh
# Session 20: the 2K cells (issue 10: "2K too if time allows"), W=4, 30 documents each, the four
# methods at their defaults, then apb with 8 exact layers (configs/smollm2-135m-cpu-apb.yaml) and
# spava with 8 exact layers, anchor n/16, passing n/32 (configs/smollm2-135m-cpu-spava-exact.yaml).
# From the repository root; about half an hour on 2 cores.
set -ex
OUT=docs/results/eval-table
COMMON="--model smollm2-135m-instruct --set model.dtype=bfloat16 --set decode.max_new_tokens=32 --set parallel.timeout_s=600 --samples 30 --world-size 4 --lengths 2048"
for t in passkey niah; do
  f=$OUT/$t-2048-w4.json
  [ -f $f ] || apb eval --config configs/tiny-cpu.yaml $COMMON --tasks $t --methods full,star,apb,spava --json $f
  f=$OUT/exact-layers/$t-2048-w4-apb-exact8.json
  [ -f $f ] || apb eval --config configs/smollm2-135m-cpu-apb.yaml $COMMON --tasks $t --methods apb --json $f
  f=$OUT/exact-layers/$t-2048-w4-spava-exact8-a16-p32.json
  [ -f $f ] || apb eval --config configs/smollm2-135m-cpu-spava-exact.yaml $COMMON --tasks $t --methods spava --json $f
done
