# Session 30: why every exact method failed the bfloat16 rule on tiny-gpt-oss at 280 tokens
# (runs/3-77): `full` in bfloat16 on the torch_flash and naive backends, against float32. Prints
# layer 0's attention outputs' largest difference between the backends, the tokens whose experts
# differ at layer 0 with their router logits, and each layer's K/V against float32.
# Run: .venv/bin/python docs/results/fuzz-s30/routing_flip.py 2>/dev/null > docs/results/fuzz-s30/routing_flip.txt
import torch

import apb.methods.base as base
from apb.config import MethodConfig
from apb.kernels.attention import force_backend
from apb.methods import build_method
from apb.model.catalog import resolve_model
from apb.model.loading import load_model
from apb.parallel.comm import Comm
from apb.runtime.prefill import prefill
from apb.tools.verify import random_prompt

path = str(resolve_model("tiny-gpt-oss", 0))
ids = random_prompt(280, 512, 280)  # the prompt apb verify uses at 280 tokens


def run(model, backend):
    attn, router = [], []
    step = base.AttnContext.step

    def spy(self, module, q, k, v, scale, **kw):
        out = step(self, module, q, k, v, scale, **kw)
        attn.append(out.float())
        return out

    base.AttnContext.step = spy
    hook = model.model.layers[0].mlp.router.register_forward_hook(lambda m, i, o: router.append(o))
    try:
        with force_backend(backend):
            res = prefill(model, ids, build_method("full", MethodConfig(name="full")), Comm(None), n_query=1)
    finally:
        base.AttnContext.step = step
        hook.remove()
    return res.cache, attn, router[0]


truth, _, _ = run(load_model(path, "float32", "cpu"), "naive")
half = load_model(path, "bfloat16", "cpu")
runs = {b: run(half, b) for b in ("torch_flash", "naive")}
(_, a_flash, r_flash), (_, a_naive, r_naive) = runs["torch_flash"], runs["naive"]
print(f"layer 0 attention output, torch_flash vs naive: max diff {float((a_flash[0] - a_naive[0]).abs().max()):.4f}")
chosen = [r[2].sort(-1).values for r in (r_flash, r_naive)]
flipped = (chosen[0] != chosen[1]).any(-1).nonzero().flatten().tolist()
print(f"tokens whose experts differ at layer 0: {flipped}")
for t in flipped:
    print(f"  token {t}: router logits torch_flash {[round(x, 4) for x in r_flash[0][t].float().tolist()]}, "
          f"naive {[round(x, 4) for x in r_naive[0][t].float().tolist()]}; experts {chosen[0][t].tolist()} "
          f"vs {chosen[1][t].tolist()}")
for backend, (cache, _, _) in runs.items():
    for layer in range(len(truth.keys)):
        k, v = cache.keys[layer].float(), cache.values[layer].float()
        rel = max(float((k - truth.keys[layer]).norm() / truth.keys[layer].norm()),
                  float((v - truth.values[layer]).norm() / truth.values[layer].norm()))
        print(f"{backend:<12} layer {layer}: K/V max |diff| from float32 "
              f"{float(max((k - truth.keys[layer]).abs().max(), (v - truth.values[layer]).abs().max())):.3f}, "
              f"relative {rel:.2e}")
