#!/bin/bash
# Sessions 18-19: apb and spava with method.exact_layers (the first N layers exact by a head-sharded exchange,
# balanced; docs/accuracy.md section 7), on the table's documents. Run from the repository root.
set -e
OUT=docs/results/eval-table/exact-layers
COMMON="--config configs/tiny-cpu.yaml --model smollm2-135m-instruct --set model.dtype=bfloat16 --set decode.max_new_tokens=32 --set parallel.timeout_s=600"
# the two host-0 needle documents of the 6K cell (2 and 29): which N answers both
for s in "apb 6" "apb 8" "apb 10" "star 10"; do set -- $s
  f=$OUT/h0-$1-exact$2.json; [ -f $f ] && continue
  .venv/bin/apb eval $COMMON --data docs/results/eval-table/passkey-6144-host0-needles.jsonl --world-size 4 \
    --methods $1 --set method.exact_layers=$2 --json $f
done
# 30 documents per cell, apb with its first 8 layers exact
for s in "passkey 6144 4" "passkey 8000 4" "niah 4096 4" "passkey 8000 8" "niah 8000 4" "niah 8000 8"; do set -- $s
  f=$OUT/$1-$2-w$3-apb-exact8.json; [ -f $f ] && continue
  echo "== $f $(date +%T)"
  .venv/bin/apb eval $COMMON --samples 30 --tasks $1 --lengths $2 --world-size $3 --methods apb \
    --set method.exact_layers=8 --json $f
done
# session 19: spava with its first 8 layers exact (default sizes in the others) on four cells:
# passkey holds (one miss at 6K, a host-0 needle), niah 4K loses 3. Then 10 exact layers on the
# 6K cell (they answer that needle: probe-spava.sh); then 8 exact layers with passing n/32 in the
# other layers (which also answers it), niah first
for s in "passkey 6144 4 8" "passkey 8000 4 8" "niah 4096 4 8" "passkey 6144 4 10"; do set -- $s
  f=$OUT/$1-$2-w$3-spava-exact$4.json; [ -f $f ] && continue
  echo "== $f $(date +%T)"
  .venv/bin/apb eval $COMMON --samples 30 --tasks $1 --lengths $2 --world-size $3 --methods spava \
    --set method.exact_layers=$4 --json $f
done
for s in "niah 4096 4" "niah 8000 4" "niah 8000 8" "passkey 8000 4" "passkey 6144 4" "passkey 8000 8"; do set -- $s
  f=$OUT/$1-$2-w$3-spava-exact8-p32.json; [ -f $f ] && continue
  echo "== $f $(date +%T)"
  .venv/bin/apb eval $COMMON --samples 30 --tasks $1 --lengths $2 --world-size $3 --methods spava \
    --set method.exact_layers=8 --set method.passing_len=0.25 --json $f
done
