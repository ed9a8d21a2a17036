# Session 29: full (W=1) and ring (W=2) on a model whose every layer slides (make_model.py), 8K tokens,
# with transformers' own forward beside them (--hf-baseline), float32 (this CPU has no AMX).
# "before" ran the code of 7864552 (its kernels/, apb/, parallel/ checked out in place, then restored),
# "after" this session's. Usage: bash docs/results/bench13/sliding-s29/run.sh LABEL
set -e
D=docs/results/bench13/sliding-s29
test -d /tmp/s29/gemma3-sliding || .venv/bin/python $D/make_model.py /tmp/s29/gemma3-sliding
.venv/bin/apb bench --config configs/tiny-cpu.yaml --model /tmp/s29/gemma3-sliding --methods full,ring \
  --world-size 2 --lengths 8192 --repeats 3 --hf-baseline --json $D/bench-$1.json > $D/bench-$1.txt 2>&1
tail -12 $D/bench-$1.txt
