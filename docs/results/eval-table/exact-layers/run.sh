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
# session 19: spava with its first 10 layers exact (default sizes in the others; 8 missed a
# host-0 needle at 6K that 10 answers: probe-spava.sh), then with 8 where time allowed
for n in 10 8; do
  for s in "passkey 6144 4" "passkey 8000 4" "niah 4096 4" "niah 8000 4" "passkey 8000 8" "niah 8000 8"; do set -- $s
    f=$OUT/$1-$2-w$3-spava-exact$n.json; [ -f $f ] && continue
    echo "== $f $(date +%T)"
    .venv/bin/apb eval $COMMON --samples 30 --tasks $1 --lengths $2 --world-size $3 --methods spava \
      --set method.exact_layers=$n --json $f
  done
done
