#!/bin/bash
# Session 19: what the cost model predicts for the accurate settings of docs/accuracy.md section 7
# on a model and lengths this machine cannot run (Llama-3.1-8B, 32 layers, H100s): apb with its
# first quarter of layers exact (8, as 8 of SmolLM2's 30), apb and spava with whole passing blocks
# in the first third (11 layers), spava with 8 exact layers, against ring and the defaults. Run from
# the repository root.
set -e
OUT=docs/results/cost-exact-layers
SIM=".venv/bin/apb simulate --model llama-3.1-8b --device H100 --lengths 131072,524288,1048576 --world-sizes 8,32"
ALL11="all,all,all,all,all,all,all,all,all,all,all"
NULL21="null,null,null,null,null,null,null,null,null,null,null,null,null,null,null,null,null,null,null,null,null"
P32_21="0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25"
{
  echo "## defaults"; $SIM --methods ring,star,apb,spava --json $OUT/defaults.json
  echo "## star, apb and spava, exact_layers: 8"; $SIM --methods star,apb,spava --set method.exact_layers=8 --json $OUT/exact8.json
  echo "## apb, whole passing blocks in layers 0-10"
  $SIM --methods apb --set "method.passing_len=[$ALL11,$NULL21]" --json $OUT/apb-first11all.json
  echo "## spava, anchor n/16, whole virtual blocks in layers 0-10, n/32 after"
  $SIM --methods spava --set method.anchor_len=0.25 --set "method.passing_len=[$ALL11,$P32_21]" --json $OUT/spava-schedule.json
} | tee $OUT/simulate.txt
echo "## spava, exact_layers: 8, anchor n/16 (0.25 of a host's block at W=4), passing n/32" | tee -a $OUT/simulate.txt
$SIM --methods spava --set method.exact_layers=8 --set method.anchor_len=0.25 --set method.passing_len=0.25 \
  --json $OUT/spava-exact8-a16-p32.json | tee -a $OUT/simulate.txt
