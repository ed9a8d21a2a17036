#!/bin/sh
# decode.py on the code before session 37 (b9ac86a) and after it (AFTER, default HEAD), at 4K and
# 16K, alternating, plus transformers' own sdpa at each length, from outside the checkout (so that
# the installed copy is the one imported). Usage, from any directory without an apb/ folder:
#   sh REPO/docs/results/decode-s37/run.sh REPO [AFTER] > REPO/docs/results/decode-s37/decode.jsonl
set -eu
REPO=$1
AFTER=${2:-HEAD}
PY=$REPO/.venv/bin/python
. "$REPO/docs/results/install-commit.sh"
for c in b9ac86a "$AFTER"; do install_commit "$REPO" "$c"; done
for n in 4096 16384; do
  for round in 1 2; do
    for c in b9ac86a "$AFTER"; do
      PYTHONPATH=/tmp/apb-site-$c "$PY" "$REPO/docs/results/decode-s37/decode.py" "$n" --label "$c" 2>/dev/null
    done
  done
  PYTHONPATH=/tmp/apb-site-$AFTER "$PY" "$REPO/docs/results/decode-s37/decode.py" "$n" --impl sdpa --label "$AFTER" 2>/dev/null
done
