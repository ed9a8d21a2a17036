#!/bin/bash
# Session 18: the two layer schedules that closed the 6K cell (docs/accuracy.md section 6), run on
# every cell of the table where the defaults lost documents, then where they held.
#   apb:   anchor block/4 (default), whole passing blocks in layers 0-9, block/8 (default) after
#   spava: anchor n/16, whole virtual blocks in layers 0-9, n/32 after
set -e
cd "$(dirname "$0")/../../.."
OUT=docs/results/eval-table
COMMON="--config configs/tiny-cpu.yaml --model smollm2-135m-instruct --set model.dtype=bfloat16 --set decode.max_new_tokens=32 --samples 30 --set parallel.timeout_s=600"
A10="all,all,all,all,all,all,all,all,all,all"
APB="--methods apb --set method.passing_len=[$A10,null,null,null,null,null,null,null,null,null,null,null,null,null,null,null,null,null,null,null,null]"
SPAVA="--methods spava --set method.anchor_len=0.25 --set method.passing_len=[$A10,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25]"
cell() {  # method task length world
  local m=$1 t=$2 n=$3 w=$4 sizes
  if [ $m = apb ]; then sizes=$APB; tag=first10all; else sizes=$SPAVA; tag=a16-first10all-p32; fi
  local f=$OUT/$t-$n-w$w-$m-$tag.json
  [ -f $f ] && { echo "have $f"; return; }
  echo "== $f $(date +%T)"
  .venv/bin/apb eval $COMMON --tasks $t --world-size $w --lengths $n $sizes --json $f
}
cell spava passkey 8000 4
cell spava niah 4096 4
cell spava passkey 8000 8
cell apb niah 8000 8
cell spava niah 8000 4
cell apb niah 4096 4
cell apb niah 8000 4
cell spava niah 8000 8
cell apb passkey 8000 8
cell apb passkey 4096 4
cell spava passkey 4096 4
