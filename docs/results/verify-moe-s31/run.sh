#!/usr/bin/env bash
# Session 31: apb verify in bfloat16 on models with experts, every exact method at W = 2-4 and
# 280-2,000 tokens. TAG=old runs a wheel of the commit before the routing-aware rule (d342f80),
# installed with `pip install --no-deps --target SITE`, given as SITE=...; TAG=new this tree.
# Run from the repo root: TAG=new bash docs/results/verify-moe-s31/run.sh
set -u
HERE=docs/results/verify-moe-s31
PY=${PY:-.venv/bin/python}
MODEL4=${MODEL4:-/tmp/gpt-oss-4l}
[ -d "$MODEL4" ] || $PY $HERE/make_model.py "$MODEL4"
mkdir -p $HERE/$TAG
run() {  # model tag W lengths
  if [ -n "${SITE:-}" ]; then
    (cd /tmp && PYTHONPATH=$SITE $OLDPWD/$PY -m apb verify --model $1 --methods full,ring,ulysses,apb:uncompressed,spava:uncompressed \
      --world-size $3 --prompt-len $4 --query-len 8 --dtype bfloat16 --tokens 3 --json $OLDPWD/$HERE/$TAG/$2-w$3.json)
  else
    $PY -m apb verify --model $1 --methods full,ring,ulysses,apb:uncompressed,spava:uncompressed \
      --world-size $3 --prompt-len $4 --query-len 8 --dtype bfloat16 --tokens 3 --json $HERE/$TAG/$2-w$3.json
  fi > $HERE/$TAG/$2-w$3.txt 2> $HERE/$TAG/$2-w$3.log
}
for W in 2 3 4; do
  run tiny-gpt-oss gpt-oss $W 280,1000,2000
  run tiny-deepseek-v3 deepseek-v3 $W 280,1000,2000
  run $MODEL4 gpt-oss-4l $W 280,1000,2000
done
