#!/bin/sh
# Session 20: the niah 2K cell again with full and apb, now that every answer records its lead
# (`lead`), and `apb compare` printing each miss and gain with full's lead there. From the
# repository root; about 6 minutes on 2 cores.
set -ex
OUT=docs/results/eval-table/leads
.venv/bin/apb eval --config configs/tiny-cpu.yaml --model smollm2-135m-instruct --set model.dtype=bfloat16 \
  --set decode.max_new_tokens=32 --set parallel.timeout_s=600 --samples 30 --world-size 4 --lengths 2048 \
  --tasks niah --methods full,apb --json $OUT/niah-2048-w4.json
.venv/bin/apb compare $OUT/niah-2048-w4.json.docs.jsonl --reference $OUT/niah-2048-w4.json.docs.jsonl > $OUT/compare.txt
