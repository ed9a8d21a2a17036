#!/usr/bin/env bash
# Session 31: the bfloat16 rule with many hosts: every method at W = 8 and 13, 3,000 tokens, on
# tiny-gpt-oss and tiny-deepseek-v3 (each host reports its tokens' experts at their positions).
# Run from the repo root: bash docs/results/verify-moe-s31/wide.sh
set -u
HERE=docs/results/verify-moe-s31
PY=${PY:-.venv/bin/python}
mkdir -p $HERE/wide
for W in 8 13; do
  for m in tiny-gpt-oss tiny-deepseek-v3; do
    $PY -m apb verify --model $m --methods full,ring,ulysses,star,apb,spava --world-size $W --prompt-len 3000 \
      --query-len 16 --dtype bfloat16 --tokens 3 --set parallel.timeout_s=120 --json $HERE/wide/$m-w$W.json \
      > $HERE/wide/$m-w$W.txt 2> $HERE/wide/$m-w$W.log
  done
done
