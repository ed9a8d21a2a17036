"""The one token where decode.py's 16K runs part (the second: 33 before session 37, 34 after):
how close a tie it is. From decode.py's saved prefill, the first two greedy steps are taken with
the apb that is installed (``apb``), transformers' sdpa (``sdpa``), or the model and cache in
float32 (``float32``: the same bfloat16 weights and K/V, every product and sum in float32, the
reference). Printed: the two most likely tokens at step 2 and the log-probability lead of the first.

Run from a directory without apb/, after decode.py has saved its 16K prefill (run.sh's sites):
  for c in b9ac86a AFTER: PYTHONPATH=/tmp/apb-site-$c python tie.py apb
  PYTHONPATH=/tmp/apb-site-AFTER python tie.py sdpa; ... tie.py float32
"""

import sys

import torch

N, PREFILL = 16384, "/tmp/apb-decode-s37/prefill-16384.pt"


def main():
    from apb.model.catalog import resolve_model
    from apb.model.hf_bridge import with_cache
    from apb.model.loading import load_model
    from apb.runtime.cache import KVCache, to_hf_cache

    state = torch.load(PREFILL, weights_only=True)
    first_tok = int(state["first"].argmax())

    name = sys.argv[1]
    impl, dtype = {"apb": (None, torch.bfloat16), "sdpa": ("sdpa", torch.bfloat16),
                   "float32": (None, torch.float32)}[name]
    model = load_model(resolve_model("smollm2-135m-instruct"), str(dtype)[6:], "cpu", attn_implementation=impl)
    kv = {i: tuple(t.to(dtype) for t in pair) for i, pair in state["kv"].items()}
    hf = to_hf_cache(KVCache.from_layers(torch.arange(N), kv), model.config, room=2)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[first_tok]]), position_ids=torch.tensor([[N]]), use_cache=True,
                    **with_cache(model, hf))
    logp = torch.log_softmax(out.logits[0, -1].float(), -1)
    top = torch.topk(logp, 2)
    where = __import__("apb").__file__.rsplit("/", 2)[0]
    print(f"{name} ({where}): step 1 token {first_tok}; step 2 top tokens {top.indices.tolist()} "
          f"log p {[round(x, 5) for x in top.values.tolist()]}, lead {float(top.values[0] - top.values[1]):.5f}; "
          f"log p(33) {float(logp[33]):.5f}, log p(34) {float(logp[34]):.5f}", flush=True)


if __name__ == "__main__":
    main()
