#!/bin/sh
# Session 22 ran on a different machine: AMD EPYC, 2 cores, AVX2, no AVX512 and no AMX (so no
# native bfloat16: `model.dtype: auto` picks float32 here). The issue's benches again on it.
# Run from the repository root: sh docs/results/bench13/run-s22-epyc.sh
set -e
OUT=docs/results/bench13
APB=".venv/bin/apb"
C="--config configs/tiny-cpu.yaml --model bench-attn"
lscpu | grep -E "Model name|^CPU\(s\)|Flags" | sed 's/Flags:.*\(avx2\).*/Flags: ... \1 ... (no avx512, no amx)/' > $OUT/epyc-cpu.txt
# 1. bench-attn, W=8, 32K, three runs (the first was run by hand with the same command)
for run in b c; do
  $APB bench $C --methods ring,apb,spava --lengths 32768 --world-size 8 --repeats 3 \
    --json $OUT/bench-attn-w8-32k-s22-epyc$run.json > $OUT/bench-attn-w8-32k-s22-epyc$run.txt 2>&1
done
# 2. SmolLM2-135M's shape, 8K, W=2, float32 (what auto picks here), beside transformers' forward
$APB bench $C --model smollm2-135m-instruct --set model.dtype=float32 --methods full,ring,apb,spava --lengths 8192 \
  --world-size 2 --repeats 3 --hf-baseline --json $OUT/smollm2-fp32-w2-s22-epyc.json > $OUT/smollm2-fp32-w2-s22-epyc.txt 2>&1
# 3. the same in bfloat16, which this CPU emulates: what auto avoids
$APB bench $C --model smollm2-135m-instruct --set model.dtype=bfloat16 --methods full,ring --lengths 8192 \
  --world-size 2 --repeats 1 --hf-baseline --json $OUT/smollm2-bf16-w2-s22-epyc.json > $OUT/smollm2-bf16-w2-s22-epyc.txt 2>&1
# 4. bench-attn at W=2, 4K-16K: projected against wall, and each method against its ideal
$APB bench $C --methods full,ring,apb,spava --lengths 4096,8192,16384 --world-size 2 --repeats 3 \
  --json $OUT/bench-attn-w2-s22-epyc.json > $OUT/bench-attn-w2-s22-epyc.txt 2>&1
# 5. a fourth W=8 32K run, after the bench began reporting how far the rates moved (rates_drift)
$APB bench $C --methods ring,apb,spava --lengths 32768 --world-size 8 --repeats 3 \
  --json $OUT/bench-attn-w8-32k-s22-epycd.json > $OUT/bench-attn-w8-32k-s22-epycd.txt 2>&1
