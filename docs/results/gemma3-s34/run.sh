#!/bin/sh
# Session 34: the pretrained Gemma 3 270M (`gemma3-270m`, fetched from PyPI) through `apb verify`
# and `apb eval`. Run from a directory without apb/ (the installed package is what runs), with
# R=<repository root>; about 90 minutes on 2 cores (AMD EPYC with AVX512-BF16: model.dtype auto
# is bfloat16 there).
set -x
R=${R:-$(cd "$(dirname "$0")/../../.." && pwd)}
OUT=$R/docs/results/gemma3-s34
CFG="--config $R/configs/tiny-cpu.yaml --model gemma3-270m"
M=full,ring,ulysses,star,apb,apb:uncompressed,spava,spava:uncompressed
# every method against transformers' eager float32 forward: W = 2 and 4 at 4,000 tokens (sliding
# windows inside a host), W = 8 at 4,000 (hosts of 500 tokens, under the 512 window), W = 3 at
# 2,001; bfloat16 at W = 2 against eager bfloat16's floor
for W in 2 4 8; do
  apb verify $CFG --methods $M --world-size $W --prompt-len 4000 --dtype float32 --tokens 8 \
    --json $OUT/verify-w$W-4000.json > $OUT/verify-w$W-4000.txt 2>&1
done
apb verify $CFG --methods $M --world-size 3 --prompt-len 2001 --dtype float32 --tokens 8 \
  --json $OUT/verify-w3-2001.json > $OUT/verify-w3-2001.txt 2>&1
apb verify $CFG --methods $M --world-size 2 --prompt-len 1500 --dtype bfloat16 --tokens 8 \
  --json $OUT/verify-w2-1500-bf16.json > $OUT/verify-w2-1500-bf16.txt 2>&1
# passkey (code style: the model has no chat template) at W = 4, bfloat16, greedy
E="$CFG --tasks passkey --world-size 4 --set decode.max_new_tokens=16 --samples 30"
apb eval $E --methods full,star,apb,spava --lengths 4096 --json $OUT/passkey-4096-w4.json
apb eval $E --methods apb --set method.query_positions=anchor --lengths 4096 --json $OUT/passkey-4096-w4-apb-anchor.json
apb eval $E --methods full,star,apb,spava --lengths 8192 --json $OUT/passkey-8192-w4.json
apb eval $E --methods apb --set method.query_positions=anchor --lengths 8192 --json $OUT/passkey-8192-w4-apb-anchor.json
date
