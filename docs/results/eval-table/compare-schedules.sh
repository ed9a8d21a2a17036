#!/bin/sh
# Sessions 18-20: every cell (2K: session 20) of the table, the default sizes, apb with its first 8 layers exact
# (configs/smollm2-135m-cpu-apb.yaml), apb with whole passing blocks in layers 0-9 and spava's
# schedule (configs/smollm2-135m-cpu-spava.yaml), spava with 8 or 10 exact layers (and passing n/32),
# against full's answers on the same documents
# (docs/accuracy.md section 7). Output: compare-schedules.txt beside this file.
cd "$(dirname "$0")/../../.." || exit 1
E=docs/results/eval-table
{
  echo "run                                      method   task     length  right    full  net  agree  misses / gains vs full"
  # cell, and the cell holding full's answers (at W=8 the W=4 run's: full is one host)
  for c in "passkey-2048-w4 passkey-2048-w4" "niah-2048-w4 niah-2048-w4" "passkey-4096-w4 passkey-4096-w4" "passkey-6144-w4 passkey-6144-w4" "passkey-8000-w4 passkey-8000-w4" \
           "niah-4096-w4 niah-4096-w4" "niah-8000-w4 niah-8000-w4" "passkey-8000-w8 passkey-8000-w4" \
           "niah-8000-w8 niah-8000-w4"; do set -- $c
    runs=""  # the defaults, then each setting; those not run are left out
    for f in $E/$1 $E/$1-apb-first10all $E/$1-spava-a16-first10all-p32 $E/exact-layers/$1-apb-exact8 \
             $E/exact-layers/$1-spava-exact8 $E/exact-layers/$1-spava-exact10 $E/exact-layers/$1-spava-exact8-p32 \
             $E/exact-layers/$1-spava-exact8-a16-p32 $E/exact-layers/$1-spava-exact15; do
      [ -f $f.json.docs.jsonl ] && runs="$runs $f.json.docs.jsonl"
    done
    .venv/bin/apb compare $runs --reference $E/$2.json.docs.jsonl | sed 1d
  done
} > $E/compare-schedules.txt
cat $E/compare-schedules.txt
