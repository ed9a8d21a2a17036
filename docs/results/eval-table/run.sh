#!/bin/sh
# The issue-10 accuracy table (docs/accuracy.md, section 0), one cell per command. Documents are
# seeded per task and length, so each cell holds the same documents as one `apb eval --tasks
# passkey,niah --lengths 4096,8000` run would. "8K" is 8,000 tokens: 8,192-token prompts plus the
# answer pass SmolLM2's 8,192 positions and are refused. Run from the repository root; about
# three hours on 2 cores.
set -x
OUT=docs/results/eval-table
COMMON="--config configs/tiny-cpu.yaml --model smollm2-135m-instruct --set model.dtype=bfloat16 --set decode.max_new_tokens=32 --samples 30"
apb eval $COMMON --tasks passkey --methods full,star,apb,spava --world-size 4 --lengths 4096 --json $OUT/passkey-4096-w4.json
apb eval $COMMON --tasks passkey --methods full,star,apb,spava --world-size 4 --lengths 8000 --json $OUT/passkey-8000-w4.json
apb eval $COMMON --tasks niah --methods full,star,apb,spava --world-size 4 --lengths 4096 --json $OUT/niah-4096-w4.json
apb eval $COMMON --tasks passkey --methods apb,spava --world-size 8 --lengths 8000 --json $OUT/passkey-8000-w8.json
# spava sizes (anchor_len: a fraction of n/W; passing_len: of a virtual block, about n/2W)
for size in 0.125 0.25 0.5; do
  apb eval $COMMON --tasks niah --methods spava --world-size 4 --lengths 4096 \
    --set method.anchor_len=$size --set method.passing_len=$size --json $OUT/niah-4096-w4-spava-$size.json
done
for size in 0.25 0.5; do
  apb eval $COMMON --tasks passkey --methods spava --world-size 4 --lengths 8000 \
    --set method.anchor_len=$size --set method.passing_len=$size --json $OUT/passkey-8000-w4-spava-$size.json
done
