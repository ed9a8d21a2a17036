#!/bin/sh
# Session 28: apb split's order on bench-attn (32K, W=8, apb alone): "old", the passing blocks chosen
# after the block attends itself, against "new", chosen before where they outweigh the shares
# (apb.methods.anchored.passing_first). Made with a temporary switch, not kept in the code: these
# three lines at the top of passing_first's body, with APB_AB_OLD_ORDER=1 set for the "old" runs:
#     import os
#     if os.environ.get('APB_AB_OLD_ORDER'):
#         return False
# Runs 1-3 old then new, runs 4-5 new then old (the machine drifted slower through runs 1-3).
# Summary: .venv/bin/python docs/results/bench13/ab-order-s28/summary.py > docs/results/bench13/ab-order-s28/summary.txt
for run in 1 2 3; do for mode in old new; do
  if [ $mode = old ]; then export APB_AB_OLD_ORDER=1; else unset APB_AB_OLD_ORDER; fi
  .venv/bin/apb bench --config configs/tiny-cpu.yaml --model bench-attn --methods apb --lengths 32768 \
    --world-size 8 --repeats 3 --json docs/results/bench13/ab-order-s28/ab-$mode-$run.json > docs/results/bench13/ab-order-s28/ab-$mode-$run.txt 2>&1
done; done
for run in 4 5; do for mode in new old; do
  if [ $mode = old ]; then export APB_AB_OLD_ORDER=1; else unset APB_AB_OLD_ORDER; fi
  .venv/bin/apb bench --config configs/tiny-cpu.yaml --model bench-attn --methods apb --lengths 32768 \
    --world-size 8 --repeats 3 --json docs/results/bench13/ab-order-s28/ab-$mode-$run.json > docs/results/bench13/ab-order-s28/ab-$mode-$run.txt 2>&1
done; done
