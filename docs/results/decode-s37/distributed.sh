#!/bin/sh
# Distributed decoding (decode.mode: distributed) before session 37 (b9ac86a, installed by run.sh
# in /tmp/apb-site-b9ac86a) and after it (the checkout's .venv), alternated: SmolLM2-135M-Instruct
# (bfloat16, auto), ring, W = 2, two copies of one 5,212-token document, 48 new tokens. Prints
# each run's per-document prefill and decode seconds and answers. Usage, from a directory
# without an apb/ folder: sh REPO/docs/results/decode-s37/distributed.sh REPO > distributed.txt
set -eu
REPO=$1
PY=$REPO/.venv/bin/python
python3 - <<'PYEOF'
import json, random
random.seed(0)
colors = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
ctx = "\n".join(f"Line {i}: the {random.choice(colors)} box holds {random.randint(10, 99)} marbles." for i in range(330))
with open("in.jsonl", "w") as f:
    for i in range(2):
        f.write(json.dumps({"id": f"doc-{i}", "context": ctx, "question": "Copy the first twenty lines exactly, one per line."}) + "\n")
PYEOF
for round in 1 2; do
  for c in b9ac86a now; do
    if [ $c = now ]; then site=; else site=/tmp/apb-site-$c; fi
    rm -f out-$c.jsonl
    PYTHONPATH=$site "$PY" -m apb run --config "$REPO/configs/tiny-cpu.yaml" --set model.name_or_path=smollm2-135m-instruct \
      --method ring --world-size 2 --input in.jsonl --output out-$c.jsonl --set decode.mode=distributed \
      --set decode.max_new_tokens=48 >/dev/null 2>&1
    "$PY" -c "
import json, sys
for l in open('out-$c.jsonl'):
    d = json.loads(l)
    print('$c', 'round $round', d['id'], 'prefill', round(d['prefill_s'], 2), 's, decode', round(d['decode_s'], 2), 's', json.dumps(d['answer']))
"
  done
done
