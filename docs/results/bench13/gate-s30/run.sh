#!/bin/sh
# Session 30: does a gate that lets one rank compute at a time make bench-attn's per-rank clocks
# steadier at W = 8 on this 2-core VM? (It does not: the spread is the VM's, not the co-running
# ranks'.) The gate is a temporary patch, not kept in the code: gate.patch (an flock held through
# each prefill and released around every wait for a message in parallel/comm.py).
#   base1: the code as it is;  gate1: with `git apply docs/results/bench13/gate-s30/gate.patch`
#   and APB_CPU_GATE=/tmp/s30/gate set for the run.
set -e
.venv/bin/apb bench --config configs/tiny-cpu.yaml --model bench-attn --methods ring,apb,spava --lengths 32768 \
  --world-size 8 --repeats 3 --json docs/results/bench13/gate-s30/base1.json > docs/results/bench13/gate-s30/base1.txt 2>&1
git apply docs/results/bench13/gate-s30/gate.patch
APB_CPU_GATE=/tmp/apb-gate .venv/bin/apb bench --config configs/tiny-cpu.yaml --model bench-attn --methods ring,apb,spava \
  --lengths 32768 --world-size 8 --repeats 3 --json docs/results/bench13/gate-s30/gate1.json \
  > docs/results/bench13/gate-s30/gate1.txt 2>&1
git apply -R docs/results/bench13/gate-s30/gate.patch
.venv/bin/python docs/results/bench13/gate-s30/spread.py > docs/results/bench13/gate-s30/spread.txt
