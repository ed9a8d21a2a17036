#!/bin/sh
# Session 18: what the accurate settings cost, beside ring and the default sizes (docs/accuracy.md
# section 7): apb with its first 8 layers exact (method.exact_layers, configs/smollm2-135m-cpu-apb.yaml),
# apb with whole passing blocks in layers 0-9, spava's schedule (configs/smollm2-135m-cpu-spava.yaml).
# SmolLM2 in bfloat16, 3 repeats, every row of a length in one run; from the repository root with
# nothing else running.
set -ex
OUT=docs/results/eval-table
A10="all,all,all,all,all,all,all,all,all,all"
FIRST10="[$A10,null,null,null,null,null,null,null,null,null,null,null,null,null,null,null,null,null,null,null,null]"
for s in "6144 4" "8000 4"; do set -- $s
  L="--model smollm2-135m-instruct --lengths $1 --world-size $2 --repeats 3"
  apb bench --config configs/tiny-cpu.yaml --set model.dtype=bfloat16 $L --methods ring,apb,spava \
    --json $OUT/bench-schedules-$1-w$2-default.json
  apb bench --config configs/smollm2-135m-cpu-apb.yaml $L --methods apb --json $OUT/bench-schedules-$1-w$2-apb-exact8.json
  apb bench --config configs/tiny-cpu.yaml --set model.dtype=bfloat16 $L --methods apb \
    --set "method.passing_len=$FIRST10" --json $OUT/bench-schedules-$1-w$2-apb-first10all.json
  apb bench --config configs/smollm2-135m-cpu-spava.yaml $L --methods spava --json $OUT/bench-schedules-$1-w$2-spava.json
done
# the 6K exact-layers row ran slower than the same setting at 8K in the run above (wall 9.8 s vs
# 7.8 s: the evaluation stopped before it may still have been exiting); again, with ring beside it
L="--model smollm2-135m-instruct --lengths 6144 --world-size 4 --repeats 3"
apb bench --config configs/tiny-cpu.yaml --set model.dtype=bfloat16 $L --methods ring,apb --json $OUT/bench-schedules-6144-w4-rerun-default.json
apb bench --config configs/smollm2-135m-cpu-apb.yaml $L --methods apb --json $OUT/bench-schedules-6144-w4-rerun-apb-exact8.json
apb bench --config configs/tiny-cpu.yaml --set model.dtype=bfloat16 $L --methods apb \
  --set "method.passing_len=$FIRST10" --json $OUT/bench-schedules-6144-w4-rerun-apb-first10all.json
