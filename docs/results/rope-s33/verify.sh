#!/bin/sh
# apb verify with apb's default (the query scored at its true positions) at W = 3 on the families
# whose rotary it could not move before session 33 (probe-721aa4c.txt: refused; probe-<new>.txt:
# moves), and on the two presets it had refused (tiny-gemma3, tiny-phi3 past its 512 positions).
# Each row beside apb's exact variant (apb:uncompressed), against transformers' eager forward.
#   MODELS=/tmp/fam/models MODELS2=/tmp/fam/models2 OUT=docs/results/rope-s33/runs sh docs/results/rope-s33/verify.sh
# Run it from a directory without apb/ in it, with PYTHONPATH at an installed wheel of the commit
# under test (see docs/results/fuzz-s30/fuzz.py).
set -u
MODELS=${MODELS:-/tmp/fam/models}
MODELS2=${MODELS2:-/tmp/fam/models2}
OUT=${OUT:-docs/results/rope-s33/runs}
PY=${PY:-python}
mkdir -p "$OUT"
for name in gemma3_text laguna mellum mimo_v2_flash ministral3 modernbert-decoder olmo3 gemma3n_text gemma4_text \
            tiny-gemma3 tiny-phi3; do
  case $name in
    tiny-*) model=$name ;;
    *) model="$MODELS/$name"; [ -d "$model" ] || model="$MODELS2/$name" ;;
  esac
  [ -f "$OUT/$name.json" ] && continue
  timeout 600 "$PY" -m apb verify --model "$model" --methods apb --world-size 3 --prompt-len 900 --query-len 12 \
    --tokens 3 --json "$OUT/$name.json" > "$OUT/$name.log" 2>&1
  echo "$name rc=$?"
done
