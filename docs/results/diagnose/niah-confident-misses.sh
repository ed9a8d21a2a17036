#!/bin/bash
# Session 20: the misses of the accurate settings where full was sure of its answer (full-margins.sh:
# margin > 1): niah 4K document 0 under spava (8 exact layers, anchor n/16, passing n/32; margin
# +2.39) and niah 8K document 19 under apb (8 exact layers; +1.32). W=4, bfloat16 as in the table.
set -e
OUT=docs/results/diagnose
COMMON="--config configs/tiny-cpu.yaml --set model.name_or_path=smollm2-135m-instruct --set model.dtype=bfloat16 --set decode.max_new_tokens=32 --set parallel.timeout_s=600 --world-size 4"
f=$OUT/niah4k-doc0-spava-exact8-a16-p32
[ -f $f.json ] || .venv/bin/apb diagnose $COMMON --task niah --length 4096 --index 0 --method spava \
  --set method.exact_layers=8 --set method.anchor_len=0.25 --set method.passing_len=0.25 --json $f.json > $f.txt 2>&1
f=$OUT/niah4k-doc0-spava
[ -f $f.json ] || .venv/bin/apb diagnose $COMMON --task niah --length 4096 --index 0 --method spava --json $f.json > $f.txt 2>&1
f=$OUT/niah8k-doc19-apb-exact8
[ -f $f.json ] || .venv/bin/apb diagnose $COMMON --data docs/results/eval-table/niah-8000-docs-19-20.jsonl --id niah-8000-19 \
  --method apb --set method.exact_layers=8 --json $f.json > $f.txt 2>&1
