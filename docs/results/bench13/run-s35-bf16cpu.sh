#!/bin/sh
# Session 35's machine: AMD EPYC, 2 cores, with AVX512-BF16 (a CPU type the issue's benches had
# not run on: session 22's EPYC had no bfloat16 in hardware, sessions 10-21's Intel had AMX).
# The commands on it. Run from the repository root (OUT and APB may be overridden):
#   sh docs/results/bench13/run-s35-bf16cpu.sh
OUT=${OUT:-docs/results/bench13}
APB=${APB:-.venv/bin/apb}
C="--config configs/tiny-cpu.yaml"
lscpu | grep -E "Model name|^CPU\(s\)" > $OUT/bf16cpu-s35-cpu.txt
lscpu | grep -o -E "avx512_bf16|amx_bf16|avx512f " | sort -u >> $OUT/bf16cpu-s35-cpu.txt
# 1. apb run at W=4: the 4 passkey documents, before (float32, 4 workers x torch's default
#    threads) and with the defaults (auto: bfloat16 on this CPU; the 2 cores split among workers)
for setting in "before --set model.dtype=float32 --set parallel.threads=2" "now"; do
  set -- $setting; name=$1; shift
  rm -f $OUT/batch-$name-s35-bf16cpu.jsonl
  /usr/bin/time -f "$name wall %e s" $APB run $C --set model.name_or_path=smollm2-135m-instruct \
    --method apb --world-size 4 --no-progress "$@" --input batch-passkey6k.jsonl \
    --output $OUT/batch-$name-s35-bf16cpu.jsonl
done > $OUT/batch-s35-bf16cpu.txt 2>&1
# 2. SmolLM2-135M, 8K, W=2, in bfloat16 and float32, beside transformers' own forward (sdpa)
for dt in bfloat16 float32; do
  $APB bench $C --model smollm2-135m-instruct --set model.dtype=$dt --methods full,ring,apb,spava \
    --lengths 8192 --world-size 2 --repeats 3 --hf-baseline \
    --json $OUT/smollm2-$dt-w2-s35-bf16cpu.json > $OUT/smollm2-$dt-w2-s35-bf16cpu.txt 2>&1
done
# 3. the bench-attn command, W=8, 32K (float32, as in every earlier session), three runs
for run in a b c; do
  $APB bench $C --model bench-attn --methods ring,apb,spava --lengths 32768 --world-size 8 --repeats 3 \
    --json $OUT/bench-attn-w8-32k-s35-bf16cpu$run.json > $OUT/bench-attn-w8-32k-s35-bf16cpu$run.txt 2>&1
done
