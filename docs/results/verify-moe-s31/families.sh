#!/usr/bin/env bash
# Session 31: apb verify in bfloat16 at W = 2, 600 tokens, on four more families with experts
# (make_family.py), every method. TAG=old on a wheel of d342f80 (SITE=...), TAG=new on this tree.
# Run from the repo root: TAG=new bash docs/results/verify-moe-s31/families.sh
set -u
HERE=docs/results/verify-moe-s31
PY=${PY:-.venv/bin/python}
mkdir -p $HERE/families-$TAG
for k in qwen2_moe mixtral olmoe qwen3_moe; do
  [ -d /tmp/m-$k ] || $PY $HERE/make_family.py $k /tmp/m-$k
  args="verify --model /tmp/m-$k --methods full,ring,ulysses,apb,spava --world-size 2 --prompt-len 600 --query-len 8
        --dtype bfloat16 --tokens 3 --json $PWD/$HERE/families-$TAG/$k.json"
  if [ -n "${SITE:-}" ]; then (cd /tmp && PYTHONPATH=$SITE $OLDPWD/$PY -m apb $args); else $PY -m apb $args; fi \
    > $HERE/families-$TAG/$k.txt 2> $HERE/families-$TAG/$k.log
done
