#!/bin/sh
# Session 28: apb simulate for Llama-3.1-8B on H100s, the shared anchor and the split, with the
# cost formulas picking their slowest host at the device's rates (GEMM and attention
# efficiencies) instead of by FLOPs. Session 27's table (simulate-split-h100.txt, by FLOPs; its
# "apb" column was the broadcast, then the default) is kept beside it.
# Run from the repository root: sh docs/results/bench13/run-s28-simulate.sh
set -e
.venv/bin/apb simulate --model llama-3.1-8b --device H100 --methods ring,apb:shared,apb:split,spava \
  --lengths 16384,32768,65536,131072 --world-sizes 2,4,8 --json docs/results/bench13/simulate-split-h100-s28.json \
  > docs/results/bench13/simulate-split-h100-s28.txt
