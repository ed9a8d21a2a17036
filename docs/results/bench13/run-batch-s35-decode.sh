#!/bin/sh
# After the decode host took all local cores while it decodes alone (decode_threads): the
# "now" batch of run-s35-bf16cpu.sh (same 4 passkey documents, apb, W=4, defaults) against the
# same with parallel.threads=1 (each worker 1 thread, decoding included: the old default here),
# in turn, twice. Run from the repository root: sh docs/results/bench13/run-batch-s35-decode.sh
OUT=docs/results/bench13
APB=".venv/bin/apb"
for round in 1 2; do
  for setting in "decodethreads" "onethread --set parallel.threads=1"; do
    set -- $setting; name=$1-$round; shift
    rm -f $OUT/batch-$name-s35-bf16cpu.jsonl
    /usr/bin/time -f "$name wall %e s" $APB run --config configs/tiny-cpu.yaml \
      --set model.name_or_path=smollm2-135m-instruct --method apb --world-size 4 --no-progress "$@" \
      --input $OUT/batch-passkey6k.jsonl --output $OUT/batch-$name-s35-bf16cpu.jsonl 2>&1 \
      | grep -v -i "warn\|forward_call\|resource_tracker"
  done
done > $OUT/batch-decodethreads-s35-bf16cpu.txt
