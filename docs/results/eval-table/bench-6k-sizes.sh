#!/bin/sh
# Prefill time at 6K (the passkey setting), SmolLM2 in bfloat16, W=4, at the default sizes
# and at the sizes that close the 6K accuracy gap (docs/accuracy.md, section 6). Run from the
# repository root with nothing else running.
set -x
OUT=docs/results/eval-table
COMMON="--config configs/tiny-cpu.yaml --model smollm2-135m-instruct --set model.dtype=bfloat16 --world-size 4 --lengths 6144 --repeats 3"
apb bench $COMMON --methods full,ring,star,apb,spava --json $OUT/bench-6k-default.json
apb bench $COMMON --methods apb --set method.passing_len=1.0 --json $OUT/bench-6k-apb-p1.json
apb bench $COMMON --methods spava --set method.anchor_len=0.5 --set method.passing_len=all --json $OUT/bench-6k-spava-a8-pall.json
# whole passing blocks in the first 10 of SmolLM2's 30 layers, the default after
apb bench $COMMON --methods apb,spava --set "method.passing_len=[all,all,all,all,all,all,all,all,all,all,null,null,null,null,null,null,null,null,null,null,null,null,null,null,null,null,null,null,null,null]" --json $OUT/bench-6k-first10all.json
# spava's two other schedules (docs/accuracy.md section 6), with ring beside them
apb bench $COMMON --methods ring,spava --set "method.passing_len=[all,all,all,all,all,all,all,all,all,all,all,all,all,all,all,null,null,null,null,null,null,null,null,null,null,null,null,null,null,null]" --json $OUT/bench-6k-spava-first15all.json
apb bench $COMMON --methods spava --set method.anchor_len=0.25 --set "method.passing_len=[all,all,all,all,all,all,all,all,all,all,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25]" --json $OUT/bench-6k-spava-a16-first10all-p32.json
