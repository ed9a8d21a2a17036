#!/bin/sh
# Session 18: every cell of the table, the default sizes, apb with its first 8 layers exact
# (configs/smollm2-135m-cpu-apb.yaml), apb with whole passing blocks in layers 0-9 and spava's
# schedule (configs/smollm2-135m-cpu-spava.yaml), against full's answers on the same documents
# (docs/accuracy.md section 7). Output: compare-schedules.txt beside this file.
cd "$(dirname "$0")/../../.." || exit 1
E=docs/results/eval-table
APB=".venv/bin/apb"
cell() {  # reference cell, then the runs to compare with it (those not run are left out)
  ref=$1; shift
  runs=""
  for f in "$@"; do [ -f "$f" ] && runs="$runs $f"; done
  $APB compare $runs --reference $E/$ref.json.docs.jsonl | sed 1d
}
X=$E/exact-layers
{
  echo "run                                      method   task     length  right    full  net  agree  misses / gains vs full"
  cell passkey-4096-w4 $E/passkey-4096-w4.json.docs.jsonl $E/passkey-4096-w4-apb-first10all.json.docs.jsonl \
    $E/passkey-4096-w4-spava-a16-first10all-p32.json.docs.jsonl \
    $X/passkey-4096-w4-apb-exact8.json.docs.jsonl
  cell passkey-6144-w4 $E/passkey-6144-w4.json.docs.jsonl $E/passkey-6144-w4-apb-first10all.json.docs.jsonl \
    $E/passkey-6144-w4-spava-a16-first10all-p32.json.docs.jsonl \
    $X/passkey-6144-w4-apb-exact8.json.docs.jsonl
  cell passkey-8000-w4 $E/passkey-8000-w4.json.docs.jsonl $E/passkey-8000-w4-apb-first10all.json.docs.jsonl \
    $E/passkey-8000-w4-spava-a16-first10all-p32.json.docs.jsonl \
    $X/passkey-8000-w4-apb-exact8.json.docs.jsonl
  cell niah-4096-w4 $E/niah-4096-w4.json.docs.jsonl $E/niah-4096-w4-apb-first10all.json.docs.jsonl \
    $E/niah-4096-w4-spava-a16-first10all-p32.json.docs.jsonl \
    $X/niah-4096-w4-apb-exact8.json.docs.jsonl
  cell niah-8000-w4 $E/niah-8000-w4.json.docs.jsonl $E/niah-8000-w4-apb-first10all.json.docs.jsonl \
    $E/niah-8000-w4-spava-a16-first10all-p32.json.docs.jsonl \
    $X/niah-8000-w4-apb-exact8.json.docs.jsonl
  # W=8: full is one host, so its answers are the W=4 run's
  cell passkey-8000-w4 $E/passkey-8000-w8.json.docs.jsonl $E/passkey-8000-w8-apb-first10all.json.docs.jsonl \
    $E/passkey-8000-w8-spava-a16-first10all-p32.json.docs.jsonl \
    $X/passkey-8000-w8-apb-exact8.json.docs.jsonl
  cell niah-8000-w4 $E/niah-8000-w8.json.docs.jsonl $E/niah-8000-w8-apb-first10all.json.docs.jsonl \
    $E/niah-8000-w8-spava-a16-first10all-p32.json.docs.jsonl \
    $X/niah-8000-w8-apb-exact8.json.docs.jsonl
} > $E/compare-schedules.txt
cat $E/compare-schedules.txt
