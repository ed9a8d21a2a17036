#!/bin/bash
# The one call made on a lent GPU machine (the `device` tool: one H200, its own python3 with
# torch, transformers and no registry), from the checkout's root with the wheels in .whl/:
#   apb (`pip wheel --no-deps --no-build-isolation -w .whl .`), transformers 5.24.0 (the version
#   tested here), pydantic and its parts, deepspeed (built without ops), hjson, regex,
#   typing-extensions; see docs/results.md "On a GPU" for how they were fetched.
# Writes under $OUT: nvidia-smi.txt, gpu-check.json and .log (python -m apb.tools.gpu_check: what
# `make gpu-check` runs), and bench-llama8b-w1.json and .log (full at W=1 against transformers'
# own forward on the GPU, the Llama-3.1-8B layer shape), profile-full.txt (profile_full.py: the
# two kernel by kernel at half the longest length).
# STAGES=kernels,verify runs only those stages of the check (the third run did). The check has
# since gained a `baseline` stage that is the separate bench below; STAGES=kernels,verify,bench
# (the default here) runs what runs 1-2 ran.
# QUICK=1 WHEELS=.whl/apb-*.whl runs the same steps on CPU with small sizes (a rehearsal of the
# script, not a result).
set -u
cd "$(dirname "$0")/../../.."
REPO=$PWD
OUT=${OUT:-/tmp/apb-gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ${WHEELS:-.whl/*.whl} \
  || exit 3
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
# not the checkout: its apb/ would shadow the installed one (apb.parallel lives in parallel/ there)
mkdir -p /tmp/apb-run && cd /tmp/apb-run
python3 -c "import apb.parallel, apb.kernels, transformers, pydantic, torch; print('apb', apb.__file__, 'transformers', \
transformers.__version__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())" || exit 4
if [ "${QUICK:-0}" = 1 ]; then
  CHECK="--device cpu --quick --budget-s 200"; DEV=cpu; DT=float32; LENS=512,1024; MODEL=bench-attn
else
  CHECK="--budget-s 400"; DEV=cuda; DT=bfloat16; LENS=32768,65536,131072; MODEL=bench-llama8b-2layer
fi
timeout 440 python3 -m apb.tools.gpu_check $CHECK --stages ${STAGES:-kernels,verify,bench} --json "$OUT/gpu-check.json" 2>&1 | tee "$OUT/gpu-check.log"
timeout 150 python3 -m apb bench --model $MODEL --methods full --world-size 1 --lengths $LENS --repeats 3 \
  --hf-baseline --set model.dtype=$DT --set parallel.device=$DEV --json "$OUT/bench-llama8b-w1.json" 2>&1 \
  | tee "$OUT/bench-llama8b-w1.log"
timeout 90 python3 "$REPO/docs/results/gpu/profile_full.py" $((${LENS##*,} / 2)) $MODEL > "$OUT/profile-full.txt" 2>&1
echo "done in ${SECONDS} s"
