#!/bin/sh
# The issue-10 accuracy table, one cell per command (documents are seeded per task and length,
# so each cell holds the same documents as one `apb eval --tasks passkey,niah,vt --lengths
# 4096,8192` run would). Run from the repository root; about 3 hours on 2 cores.
set -x
OUT=docs/results/eval-table
COMMON="--config configs/tiny-cpu.yaml --model smollm2-135m-instruct --set model.dtype=bfloat16 --set decode.max_new_tokens=32 --samples 30"
apb eval $COMMON --tasks passkey --methods full,star,apb,spava --world-size 4 --lengths 4096 --json $OUT/passkey-4096-w4.json
apb eval $COMMON --tasks passkey --methods full,star,apb,spava --world-size 4 --lengths 8192 --json $OUT/passkey-8192-w4.json
apb eval $COMMON --tasks niah --methods full,star,apb,spava --world-size 4 --lengths 4096 --json $OUT/niah-4096-w4.json
apb eval $COMMON --tasks niah --methods full,star,apb,spava --world-size 4 --lengths 8192 --json $OUT/niah-8192-w4.json
apb eval $COMMON --tasks passkey --methods apb,spava --world-size 8 --lengths 8192 --json $OUT/passkey-8192-w8.json
