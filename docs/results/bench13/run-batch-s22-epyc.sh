#!/bin/sh
# run-batch.sh again on session 22's AMD EPYC (no bfloat16 in hardware, so `auto` is float32
# here): the same 4 passkey documents, before (float32, 4 workers x torch's default 2 threads)
# and now (the defaults: float32 on this CPU, the 2 cores split between the 4 workers).
OUT=docs/results/bench13
APB=".venv/bin/apb"
for setting in "before --set model.dtype=float32 --set parallel.threads=2" "now"; do
  set -- $setting; name=$1; shift
  rm -f $OUT/batch-$name-s22-epyc.jsonl
  /usr/bin/time -f "$name wall %e s" $APB run --config configs/tiny-cpu.yaml --set model.name_or_path=smollm2-135m-instruct \
    --method apb --world-size 4 --no-progress "$@" --input $OUT/batch-passkey6k.jsonl --output $OUT/batch-$name-s22-epyc.jsonl
done
