#!/bin/sh
# apb verify on every checkpoint make.py made: the exact methods at W = 2 against transformers'
# eager forward, float32, a prompt longer than the windows make.py set (48), 3 greedy tokens.
#   MODELS=/tmp/fam/models OUT=docs/results/families-s32/runs sh docs/results/families-s32/verify.sh
# Run it from a directory without apb/ in it, with PYTHONPATH at an installed wheel of the commit
# under test (see docs/results/fuzz-s30/fuzz.py); each family gets 300 s.
set -u
MODELS=${MODELS:-/tmp/fam/models}
OUT=${OUT:-docs/results/families-s32/runs}
PY=${PY:-python}
mkdir -p "$OUT"
for dir in "$MODELS"/*/; do
  name=$(basename "$dir")
  [ -f "$OUT/$name.json" ] && continue
  [ -n "${ONLY:-}" ] && ! echo ",$ONLY," | grep -q ",$name," && continue
  timeout 300 "$PY" -m apb verify --model "$dir" --methods full,ring,ulysses,apb:uncompressed,spava:uncompressed \
    --world-size 2 --prompt-len 157 --query-len 12 --tokens 3 --json "$OUT/$name.json" > "$OUT/$name.log" 2>&1
  echo "$name rc=$?"
done
