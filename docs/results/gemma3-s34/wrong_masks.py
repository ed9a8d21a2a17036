# Session 34: does `apb verify`'s float32 rule (1e-4 + 3e-5 x the largest value of each layer's K
# or V, and of the logits) pass a right run and fail wrong masks on the pretrained Gemma 3 270M,
# whose keys reach about 100? One process, `full` (apb's own attention, W = 1), against the
# float32 eager truth, on a random prompt: a right run; each query also sees the next key; rows
# 100-139 lose the keys before 100; each sliding layer's window one key too wide (513); and the
# window one key too narrow (511). The first two replace the kernel call of full's global layers,
# the windows that of the sliding layers' exact path (apb.methods.sliding); greedy tokens are not decoded (the
# truth's are passed), so each verdict is the logits' and the K/V's.
# With a second argument `bfloat16`, the same runs in bfloat16, judged by the 16-bit rule against
# the floor of transformers' own eager and sdpa runs in bfloat16 (apb.tools.verify.Floor).
# Run: .venv/bin/python docs/results/gemma3-s34/wrong_masks.py gemma3-270m 2>/dev/null \
#        > docs/results/gemma3-s34/wrong_masks.txt
#      .venv/bin/python docs/results/gemma3-s34/wrong_masks.py gemma3-270m bfloat16 2>/dev/null \
#        > docs/results/gemma3-s34/wrong_masks-bf16.txt
# (wrong_masks-bf16.txt was written before a 16-bit failure named its floor "transformers' own"
# instead of "eager": the floor in it is already the wider of eager and sdpa, as its header line says.)
import importlib
import sys
from types import SimpleNamespace

from apb.config import MethodConfig
from apb.methods import build_method
from apb.model.catalog import resolve_model
from apb.model.loading import load_model
from apb.parallel.comm import Comm, CommStats
from apb.runtime.prefill import prefill
from apb.tools.verify import HALF_RULE, Floor, half_models, judge, random_prompt, reference_run

sys.path.insert(0, "tests")
from test_verify_half import block_off, next_key  # noqa: E402  the tests' wrong masks

full_module = importlib.import_module("apb.methods.full")
sliding_module = importlib.import_module("apb.methods.sliding")  # sliding layers' calls (window=512)
kernel = full_module.attention


def window_by(delta):
    def wrong(q, k, v, causal=True, window=None, **kw):
        return kernel(q, k, v, causal=causal, window=None if window is None else window + delta, **kw)
    return wrong


path = resolve_model(sys.argv[1])
dtype = sys.argv[2] if len(sys.argv) > 2 else "float32"
truth_model = load_model(path, "float32", attn_implementation="eager")
model = load_model(path, dtype)
halves = half_models(path, dtype) if dtype != "float32" else []
for n in (700, 1500):
    ids = random_prompt(n, truth_model.config.vocab_size, n)
    truth = reference_run(truth_model, ids, 2)
    floor = Floor.measure(truth, [reference_run(m, ids, 2) for m in halves]) if halves else None
    print(f"n={n}: max|logit| {truth.logits.abs().max():.1f}, max|K| per layer "
          + " ".join(f"{float(k.abs().max()):.0f}" for k in truth.keys))
    if floor is not None:
        print(f"  floor (eager, sdpa {dtype}): K/V rel {floor.layer_rel:.2e}, KL {floor.kl:.2e}; limits "
              f"{max(HALF_RULE.layer_factor * floor.layer_rel, HALF_RULE.layer_min):.2e} and "
              f"{max(HALF_RULE.kl_factor * floor.kl, HALF_RULE.kl_min):.2e}")
    for name, in_full, in_sliding in (("right", kernel, kernel), ("next key", next_key, kernel),
                                      ("rows 100-139 lose keys < 100", block_off, kernel),
                                      ("window 513", kernel, window_by(1)), ("window 511", kernel, window_by(-1))):
        full_module.attention, sliding_module.attention = in_full, in_sliding
        res = prefill(model, ids, build_method("full", MethodConfig()), Comm(None, CommStats()), n_query=1)
        full_module.attention = sliding_module.attention = kernel
        # the greedy tokens are not decoded here: the truth's are passed, so the verdict is the logits' and K/V's
        r = judge(truth, SimpleNamespace(last_logits=res.last_logits, cache=res.cache, tokens=truth.tokens), True,
                  dtype, floor=floor)
        print(f"  {name:30s} max|dlogit| {r['max_abs_logit_diff']:.2e} max|dKV| {r['kv_max_abs_diff']:.2e} "
              f"K/V rel {r['kv_layer_rel_diff']:.2e} KL {r['kl_div']:.2e} {'PASS' if r['passed'] else 'FAIL'} | "
              + (r['reason'] or ''))
