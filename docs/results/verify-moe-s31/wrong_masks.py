# Session 31: the bfloat16 rule on a model with experts, in one process (`full`, W = 1, apb's own
# attention), against the float32 eager truth: a right run, and two wrong masks (each query also
# sees the next key; rows 100-139 lose the keys before 100). Per run: the worst layer's K/V
# relative difference over the kept tokens, the limit, the tokens that took other experts than
# float32 (read from the routers: left out after that layer), and the verdict. Also
# each router layer's share of near-tied tokens (what a wrong mask on one token could hide behind).
# Run: .venv/bin/python docs/results/verify-moe-s31/wrong_masks.py /tmp/gpt-oss-4l 2>/dev/null \
#        > docs/results/verify-moe-s31/wrong_masks.txt
import importlib
import sys
from types import SimpleNamespace

from apb.config import MethodConfig
from apb.methods import build_method
from apb.model.loading import load_model
from apb.parallel.comm import Comm, CommStats
from apb.runtime.prefill import prefill
from apb.tools.verify import HALF_RULE, Floor, judge, random_prompt, reference_run

sys.path.insert(0, "tests")
from test_verify_half import block_off, next_key  # noqa: E402  the tests' wrong masks

full_module = importlib.import_module("apb.methods.full")
kernel = full_module.attention

path = sys.argv[1]
for n in (300, 1000, 2000):
    truth_model = load_model(path, "float32", attn_implementation="eager")
    ids = random_prompt(n, truth_model.config.vocab_size, n)
    truth = reference_run(truth_model, ids, 2)
    floor = Floor.measure(truth, reference_run(load_model(path, "bfloat16", attn_implementation="eager"), ids, 2))
    model = load_model(path, "bfloat16")
    limit = max(HALF_RULE.layer_factor * floor.layer_rel, HALF_RULE.layer_min)
    ties = ", ".join(f"layer {k}: {float(v.float().mean()):.1%}" for k, v in sorted(floor.ties.items()))
    print(f"n={n}: floor {floor.layer_rel:.2e} (limit {limit:.2e}), KL {floor.kl:.2e}; near-tied tokens {ties}")
    for name, fn in (("right", kernel), ("next key", next_key), ("rows 100-139 lose keys < 100", block_off)):
        full_module.attention = fn
        res = prefill(model, ids, build_method("full", MethodConfig()), Comm(None, CommStats()), n_query=1,
                      routing=True)
        full_module.attention = kernel
        r = judge(truth, SimpleNamespace(last_logits=res.last_logits, cache=res.cache, tokens=None), True, "bfloat16",
                  floor=floor, choices=res.routing)
        print(f"  {name:30s} K/V {r['kv_layer_rel_diff']:.2e} KL {r['kl_div']:.2e} "
              f"{'PASS' if r['passed'] else 'FAIL'} | {r['routing_flips']} | {r['reason']}")
