#!/bin/sh
# Session 20: what the accurate settings cost on this machine at 8K, W=4 (SmolLM2 in bfloat16, 3
# repeats), each run with ring beside it so its speedup, the cost model's ideal at the run's sizes
# and their ratio come from one run: the defaults; apb with 8 exact layers
# (configs/smollm2-135m-cpu-apb.yaml); spava with 8 exact layers, anchor n/16, passing n/32
# (configs/smollm2-135m-cpu-spava-exact.yaml). From the repository root with nothing else running.
set -ex
OUT=docs/results/eval-table/exact-layers
L="--model smollm2-135m-instruct --lengths 8000 --world-size 4 --repeats 3"
apb bench --config configs/tiny-cpu.yaml --set model.dtype=bfloat16 $L --methods ring,apb,spava --json $OUT/bench-8000-w4-default.json
apb bench --config configs/smollm2-135m-cpu-apb.yaml $L --methods ring,apb --json $OUT/bench-8000-w4-apb-exact8.json
apb bench --config configs/smollm2-135m-cpu-spava-exact.yaml $L --methods ring,spava --json $OUT/bench-8000-w4-spava-exact8-a16-p32.json
