#!/bin/sh
# Issue 13's measurements, in order (docs/results.md, "Fast where it runs"). Run from the
# repository root with nothing else busy (each worker pinned to one thread). About 40 minutes on
# 2 cores. Raw JSON, traces and logs beside this file.
set -x
OUT=docs/results/bench13
APB=".venv/bin/apb"
C="--config configs/tiny-cpu.yaml --model bench-attn"
# 1. bench-attn, W=8, 32K: apb vs ring, spava vs apb, peak memory, ideal (cost model) vs measured
$APB bench $C --methods ring,apb,spava --lengths 32768 --world-size 8 --repeats 3 \
  --json $OUT/bench-attn-w8-32k.json --trace $OUT/bench-attn-w8-32k.trace.json > $OUT/bench-attn-w8-32k.txt 2>&1
# 2. bench-attn, W=2, 4K-16K: projected vs wall
$APB bench $C --methods full,ring,apb,spava --lengths 4096,8192,16384 --world-size 2 --repeats 3 \
  --json $OUT/bench-attn-w2.json > $OUT/bench-attn-w2.txt 2>&1
# 3. SmolLM2-135M (the real checkpoint; dtype auto = bfloat16 here), W=2, 8K, beside transformers' own forward
$APB bench $C --model smollm2-135m-instruct --methods full,ring,apb,spava --lengths 4096,8192 --world-size 2 \
  --repeats 3 --hf-baseline --json $OUT/smollm2-bf16-w2.json > $OUT/smollm2-bf16-w2.txt 2>&1
# 4. the same in float32, 4K: the bfloat16 speedup
$APB bench $C --model smollm2-135m-instruct --set model.dtype=float32 --methods full,ring --lengths 4096 \
  --world-size 2 --repeats 1 --hf-baseline --json $OUT/smollm2-fp32-w2.json > $OUT/smollm2-fp32-w2.txt 2>&1
# 5. Llama-3.1-8B's layer shape (2 layers), W=2, 4K, bfloat16 and float32
$APB bench $C --model bench-llama8b-2layer --set model.dtype=bfloat16 --methods full,ring,apb,spava --lengths 4096 \
  --world-size 2 --repeats 1 --json $OUT/llama8b2l-bf16-w2.json > $OUT/llama8b2l-bf16-w2.txt 2>&1
$APB bench $C --model bench-llama8b-2layer --set model.dtype=float32 --methods full,ring --lengths 4096 \
  --world-size 2 --repeats 1 --json $OUT/llama8b2l-fp32-w2.json > $OUT/llama8b2l-fp32-w2.txt 2>&1
sh docs/results/bench13/run-batch.sh > docs/results/bench13/batch.txt 2>&1
# session 17 (after spava's fused calls and the clock for the work around the forwards): 1 and 2 again
$APB bench $C --methods ring,apb,spava --lengths 32768 --world-size 8 --repeats 3 \
  --json $OUT/bench-attn-w8-32k-s17.json > $OUT/bench-attn-w8-32k-s17.txt 2>&1
$APB bench $C --methods full,ring,apb,spava --lengths 4096,8192,16384 --world-size 2 --repeats 3 \
  --json $OUT/bench-attn-w2-s17.json > $OUT/bench-attn-w2-s17.txt 2>&1
# session 20: 1 again, to check the per-host split of call_rate.py (docs/results.md) on a fresh run
$APB bench $C --methods ring,apb,spava --lengths 32768 --world-size 8 --repeats 3 \
  --json $OUT/bench-attn-w8-32k-s20.json > $OUT/bench-attn-w8-32k-s20.txt 2>&1
# session 21: 1 again, with the ideal at this device's two measured rates (apb.tools.calibrate)
$APB bench $C --methods ring,apb,spava --lengths 32768 --world-size 8 --repeats 3 \
  --json $OUT/bench-attn-w8-32k-s21.json > $OUT/bench-attn-w8-32k-s21.txt 2>&1
$APB bench $C --methods ring,apb,spava --lengths 32768 --world-size 8 --repeats 3 \
  --json $OUT/bench-attn-w8-32k-s21b.json > $OUT/bench-attn-w8-32k-s21b.txt 2>&1  # after the view above
# session 21: the real shapes again, with the ideal at this device's two rates
$APB bench $C --model smollm2-135m-instruct --methods full,ring,apb,spava --lengths 8192 --world-size 2 \
  --repeats 3 --hf-baseline --json $OUT/smollm2-bf16-w2-s21.json > $OUT/smollm2-bf16-w2-s21.txt 2>&1
$APB bench $C --model bench-llama8b-2layer --set model.dtype=bfloat16 --methods full,ring,apb,spava --lengths 4096 \
  --world-size 2 --repeats 1 --json $OUT/llama8b2l-bf16-w2-s21.json > $OUT/llama8b2l-bf16-w2-s21.txt 2>&1
