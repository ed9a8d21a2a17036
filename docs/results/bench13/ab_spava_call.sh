#!/bin/sh
# Session 23: spava's local part as one causal call ("now": commit cc4426a, reverted since) against the
# five calls before and after it (commit 35a411d), alternated on the same machine state: bench-attn, W=2 8K and W=8 32K, spava and ring,
# each variant twice. Run from the repository root (it swaps apb/methods/spava.py and puts it
# back): sh docs/results/bench13/ab_spava_call.sh > docs/results/bench13/ab_spava_call.txt
# (the session-23 run's JSON reports, from /tmp/ab_spava, are kept in docs/results/bench13/ab_spava/)
set -e
OUT=/tmp/ab_spava
mkdir -p $OUT
cp apb/methods/spava.py $OUT/spava-tree.py
git show cc4426a:apb/methods/spava.py > $OUT/spava-now.py
git show 35a411d:apb/methods/spava.py > $OUT/spava-before.py
trap 'cp $OUT/spava-tree.py apb/methods/spava.py' EXIT
C="--config configs/tiny-cpu.yaml --model bench-attn --methods ring,spava --repeats 3"
for round in 1 2; do
  for variant in before now; do
    cp $OUT/spava-$variant.py apb/methods/spava.py
    .venv/bin/apb bench $C --lengths 8192 --world-size 2 --json $OUT/w2-$variant-$round.json > /dev/null 2>&1
    .venv/bin/apb bench $C --lengths 32768 --world-size 8 --json $OUT/w8-$variant-$round.json > /dev/null 2>&1
  done
done
.venv/bin/python - <<'PY'
import json, statistics
for w in ("w2", "w8"):
    for variant in ("before", "now"):
        spava, ratio = [], []
        for rnd in (1, 2):
            by = {r["method"]: r for r in json.load(open(f"/tmp/ab_spava/{w}-{variant}-{rnd}.json"))["results"]}
            spava.append(by["spava"]["projected_s"])
            ratio.append(by["ring"]["projected_s"] / by["spava"]["projected_s"])
        print(f"{w} {variant:<6} spava projected s {' '.join(f'{x:.3f}' for x in spava)}  "
              f"spava vs ring {' '.join(f'{x:.2f}' for x in ratio)}  median {statistics.median(ratio):.2f}")
PY
