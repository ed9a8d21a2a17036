#!/bin/sh
# Session 27: apb's anchor split over the hosts (method.share_anchor: split, `apb:split`) beside
# apb's default (host 1 computes the anchor and broadcasts it), on bench-attn (attention
# dominates) at the shape, and on two shapes where the linear layers dominate:
# bench-smollm2 (SmolLM2-135M's shape) and bench-llama8b-2layer (Llama-3.1-8B's layer, 2 layers).
# (The *-all.* reports come from the first version, which split the anchor over all W hosts; this
# script's split is over hosts 0..W-2. The reports were made while apb's default was the
# broadcast, so their "apb" rows are what `apb:shared` names now, and the script says so.)
# Run from the repository root: sh docs/results/bench13/run-s27-split.sh
set -e
OUT=docs/results/bench13
C="--config configs/tiny-cpu.yaml"
for run in ${RUNS:-a b}; do
  .venv/bin/apb bench $C --model bench-attn --methods ring,apb:shared,apb:split,spava --lengths 32768 --world-size 8 \
    --repeats 3 --json $OUT/bench-attn-w8-32k-s27-split-$run.json > $OUT/bench-attn-w8-32k-s27-split-$run.txt 2>&1
done
for w in 2 4 8; do
  .venv/bin/apb bench $C --model bench-smollm2 --set model.dtype=float32 --methods ring,apb:shared,apb:split,spava \
    --lengths 8192 --world-size $w --repeats 3 \
    --json $OUT/bench-smollm2-8k-w$w-s27-split.json > $OUT/bench-smollm2-8k-w$w-s27-split.txt 2>&1
done
.venv/bin/apb bench $C --model bench-llama8b-2layer --set model.dtype=float32 --methods ring,apb:shared,apb:split,spava \
  --lengths 8192 --world-size 4 --repeats 3 \
  --json $OUT/bench-llama8b-8k-w4-s27-split.json > $OUT/bench-llama8b-8k-w4-s27-split.txt 2>&1
