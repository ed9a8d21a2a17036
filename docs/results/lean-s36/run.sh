#!/bin/sh
# Session 36: each host's peak memory through a prefill with whole caches (the code before session
# 35, 55b8ab8) and with lean ones (b40c738), on a model whose K/V is most of a host's memory
# (make_model.py: Gemma-3-4B's 34 layers of 4 KV heads of 256, 29 of them sliding over 1024 keys).
# ring and apb at W = 2, 16K tokens, bfloat16 (auto on this AVX512-BF16 CPU), one timed run after
# the warm-up. Each code is installed in its own directory first:
#   git worktree add /tmp/wt-C C && .venv/bin/pip install --no-deps --no-build-isolation --target /tmp/s36/site-C /tmp/wt-C
# Run from a directory without apb/ in it (so the installed code is the one imported):
#   cd /tmp && sh /work/main/docs/results/lean-s36/run.sh /work/main
# (COMMITS="55b8ab8" runs one of them; session 36 ran them one at a time, b40c738 first)
REPO=$1
OUT=$REPO/docs/results/lean-s36
MODEL=/tmp/s36/gemma3-4b-kv
test -d $MODEL || $REPO/.venv/bin/python $OUT/make_model.py $MODEL
for c in ${COMMITS:-55b8ab8 b40c738}; do
  SITE=/tmp/s36/site-$c
  PYTHONPATH=$SITE PATH=$SITE/bin:$REPO/.venv/bin:$PATH apb bench --config $REPO/configs/tiny-cpu.yaml \
    --model $MODEL --methods ring,apb --lengths 16384 --world-size 2 --repeats 1 \
    --json $OUT/bench-$c.json > $OUT/bench-$c.txt 2>&1
done
