#!/bin/bash
# Session 20: niah 8K document 20, which every approximate setting of the table misses (each answers
# another key's number; full answers it in bfloat16 and float32). One diagnosis per setting, W=4,
# bfloat16 as in the table. Run from the repository root; about 3 minutes each on 2 cores.
set -e
OUT=docs/results/diagnose
COMMON="--config configs/tiny-cpu.yaml --set model.name_or_path=smollm2-135m-instruct --set model.dtype=bfloat16 --set decode.max_new_tokens=32 --set parallel.timeout_s=600"
D="--data docs/results/eval-table/niah-8000-docs-19-20.jsonl --id niah-8000-20 --world-size 4"
run() {  # name, method, overrides...
  local name=$1 method=$2; shift 2
  f=$OUT/niah8k-doc20-$name; [ -f $f.json ] && return
  echo "== $f $(date +%T)"
  .venv/bin/apb diagnose $COMMON $D --method $method "$@" --json $f.json > $f.txt 2>&1
}
run apb apb
run apb-exact8 apb --set method.exact_layers=8
run spava-exact8-a16-p32 spava --set method.exact_layers=8 --set method.anchor_len=0.25 --set method.passing_len=0.25
run star star
