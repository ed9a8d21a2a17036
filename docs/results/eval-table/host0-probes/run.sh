#!/bin/sh
# Session 17: the two 6K passkey documents whose needle sits on host 0 (documents 2 and 29 of the
# 6K cell), apb at W=4 under settings that might bring them back. Answers (doc 2: 93751, doc 29:
# 45488) are in each *.docs.jsonl; only passing (near) whole blocks answers both. A trial
# compressor scoring the block's own heavy hitters plus the query's attention (not kept in the
# code) also answered "93." and "4.". Run from the repository root.
OUT=docs/results/eval-table/host0-probes
COMMON="--config configs/tiny-cpu.yaml --model smollm2-135m-instruct --set model.dtype=bfloat16 --set decode.max_new_tokens=32 --set parallel.timeout_s=600"
D="--data docs/results/eval-table/passkey-6144-host0-needles.jsonl --world-size 4"
for s in "p05 --set method.passing_len=0.5" "p075 --set method.passing_len=0.75" "p1 --set method.passing_len=1.0" \
         "snapkv --set method.compressor=snapkv" "pool1 --set method.pool_width=1" "fp32 --set model.dtype=float32"; do
  set -- $s; name=$1; shift
  apb eval $COMMON $D --methods apb "$@" --json $OUT/h0-$name.json
done
apb eval $COMMON $D --methods spava --set method.anchor_len=0.5 --set method.passing_len=all --json $OUT/h0-spava-a8-pall.json
apb eval $COMMON $D --methods spava --set method.anchor_len=1.0 --set method.passing_len=all --json $OUT/h0-spava-a4-pall.json
# which layers need whole passing blocks: apb with passing_len a per-layer list (1.0 = the whole
# block, 0.125 = the default block/8; 0.5 and 0.75 where named), and a linear schedule
L() { python3 -c "import sys; lo, hi, v = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]; print('[' + ','.join(v if lo <= i < hi else '0.125' for i in range(30)) + ']')" "$@"; }
for s in "first1 0 1 1.0" "first2 0 2 1.0" "first3 0 3 1.0" "first5 0 5 1.0" "first7 0 7 1.0" "early 0 10 1.0" \
         "early20 0 20 1.0" "mid 10 20 1.0" "late 20 30 1.0" "l5to9 5 10 1.0" "first10half 0 10 0.5" "first10q 0 10 0.75"; do
  set -- $s
  apb eval $COMMON $D --methods apb --set "method.passing_len=$(L $2 $3 $4)" --json $OUT/h0-$1.json
done
apb eval $COMMON $D --methods apb --set 'method.passing_len={linear: [1.0, 0.125]}' --json $OUT/h0-lin-down.json
