#!/bin/sh
# Session 24 (AMD EPYC, 2 cores, AVX2, no AMX: float32): the command at the new defaults
# (apb and spava share their anchor unless told not to), with the per-host anchors beside them
# (apb:unshared, spava:unshared), three runs. Run from the repository root:
#   sh docs/results/bench13/run-s24-defaults.sh; RUNS="d e f" sh docs/results/bench13/run-s24-defaults.sh
set -e
OUT=docs/results/bench13
APB=".venv/bin/apb"
C="--config configs/tiny-cpu.yaml --model bench-attn"
for run in ${RUNS:-a b c}; do  # RUNS="d e f": three more
  $APB bench $C --methods ring,apb,spava,apb:unshared,spava:unshared --lengths 32768 --world-size 8 --repeats 3 \
    --json $OUT/bench-attn-w8-32k-s24-defaults$run.json > $OUT/bench-attn-w8-32k-s24-defaults$run.txt 2>&1
done
