#!/bin/sh
# Session 18: what the layer schedules of configs/smollm2-135m-cpu-{apb,spava}.yaml cost, beside ring
# and the default sizes, at the table's lengths (docs/accuracy.md section 7). SmolLM2 in bfloat16,
# 3 repeats, run from the repository root with nothing else running.
set -ex
OUT=docs/results/eval-table
for s in "4096 4" "8000 4" "8000 8"; do set -- $s
  L="--lengths $1 --world-size $2 --repeats 3"
  apb bench --config configs/tiny-cpu.yaml --model smollm2-135m-instruct --set model.dtype=bfloat16 $L \
    --methods full,ring,apb,spava --json $OUT/bench-schedules-$1-w$2-default.json
  apb bench --config configs/smollm2-135m-cpu-apb.yaml $L --methods apb --json $OUT/bench-schedules-$1-w$2-apb.json
  apb bench --config configs/smollm2-135m-cpu-spava.yaml $L --methods spava --json $OUT/bench-schedules-$1-w$2-spava.json
done
