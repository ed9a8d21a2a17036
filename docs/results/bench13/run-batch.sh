#!/bin/sh
# apb run at W=4 on 2 cores, the same 4 passkey documents (6K tokens, SmolLM2-135M-Instruct):
# as it ran before issue 13 (float32, each of the 4 workers at torch's default of 2 threads) and
# as it runs now by default (dtype auto = bfloat16 here, the 2 cores split between the workers).
OUT=docs/results/bench13
APB=".venv/bin/apb"
for setting in "before --set model.dtype=float32 --set parallel.threads=2" "now"; do
  set -- $setting; name=$1; shift
  rm -f $OUT/batch-$name.jsonl
  /usr/bin/time -f "$name wall %e s" $APB run --config configs/tiny-cpu.yaml --set model.name_or_path=smollm2-135m-instruct \
    --method apb --world-size 4 --no-progress "$@" --input $OUT/batch-passkey6k.jsonl --output $OUT/batch-$name.jsonl
done
