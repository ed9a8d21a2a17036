#!/bin/sh
# decode.py on the code before session 37 (b9ac86a) and after it (AFTER, default HEAD), at 4K and
# 16K, alternating, plus transformers' own sdpa at each length, from outside the checkout (so that
# the installed copy is the one imported). Usage, from any directory without an apb/ folder:
#   sh REPO/docs/results/decode-s37/run.sh REPO [AFTER] > REPO/docs/results/decode-s37/decode.jsonl
set -eu
REPO=$1
AFTER=${2:-HEAD}
PY=$REPO/.venv/bin/python
for c in b9ac86a "$AFTER"; do
  site=/tmp/apb-site-$c
  if [ ! -d "$site" ]; then
    git -C "$REPO" worktree add -f "/tmp/apb-wt-$c" "$c" --detach >/dev/null 2>&1
    "$PY" -m pip install -q --no-deps --no-build-isolation --target "$site" "/tmp/apb-wt-$c" >/dev/null 2>&1
    git -C "$REPO" worktree remove --force "/tmp/apb-wt-$c"
  fi
done
for n in 4096 16384; do
  for round in 1 2; do
    for c in b9ac86a "$AFTER"; do
      PYTHONPATH=/tmp/apb-site-$c "$PY" "$REPO/docs/results/decode-s37/decode.py" "$n" --label "$c" 2>/dev/null
    done
  done
  PYTHONPATH=/tmp/apb-site-$AFTER "$PY" "$REPO/docs/results/decode-s37/decode.py" "$n" --impl sdpa --label "$AFTER" 2>/dev/null
done
