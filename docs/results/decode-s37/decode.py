"""Gather-mode decoding of SmolLM2-135M-Instruct (or ``--model``; bfloat16, the machine's threads), 32 greedy
tokens (no stop at EOS) from a cache built by ``to_hf_cache`` with room for them, as the decode
host runs it: apb's attention (``attn_implementation`` None: the model path's default), or
transformers' own ``sdpa`` for reference.

One random-token prompt per length is prefilled once by the model's own forward; its K/V and the
first logits are saved under ``--prefill-dir`` and reused by every later process, so that every run
decodes from the same cache. Prints one JSON line: the decode seconds of 3 runs, their median and
the tokens. ``run.sh`` runs it on the code before and after session 37.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

NEW, REPEATS = 32, 3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("n", type=int)
    ap.add_argument("--impl", default=None, help="sdpa: transformers' own attention")
    ap.add_argument("--label", default="")
    ap.add_argument("--prefill-dir", default="/tmp/apb-decode-s37")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="a catalog name or preset (session 38: "
                    "gemma3-270m's sliding layers, bench-llama8b-2layer's grouped heads)")
    args = ap.parse_args()

    from transformers import DynamicCache

    from apb.model.catalog import resolve_model
    from apb.model.hf_bridge import output_cache, with_cache
    from apb.model.loading import load_model
    from apb.runtime.cache import KVCache, to_hf_cache
    from apb.runtime.decode import Sampling, decode
    from apb.tools.verify import random_prompt, reference_layers

    model = load_model(resolve_model(args.model), "bfloat16", "cpu", attn_implementation=args.impl)
    tag = "" if args.model == "smollm2-135m-instruct" else f"{Path(args.model).name}-"
    saved = Path(args.prefill_dir) / f"prefill-{tag}{args.n}.pt"
    if not saved.exists():
        ids = random_prompt(args.n, model.config.vocab_size, args.n)[None]
        with torch.no_grad():
            out = model(ids, use_cache=True, **with_cache(model, DynamicCache(config=model.config)))
        saved.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"kv": reference_layers(model.config, output_cache(out)), "first": out.logits[0, -1].float()},
                   saved)
    state = torch.load(saved, weights_only=True)
    cache = KVCache.from_layers(torch.arange(args.n), state["kv"])
    times, tokens = [], None
    for _ in range(REPEATS):
        hf = to_hf_cache(cache, model.config, room=NEW)
        t0 = time.perf_counter()
        got = decode(model, hf, state["first"], args.n, Sampling(max_new_tokens=NEW, stop_at_eos=False))
        times.append(time.perf_counter() - t0)
        assert tokens is None or got == tokens, "the same decode gave different tokens"
        tokens = got
    print(json.dumps({"label": args.label, "model": args.model, "impl": args.impl or "apb", "n": args.n, "threads": torch.get_num_threads(),
                      "seconds": [round(t, 3) for t in times], "median_s": round(statistics.median(times), 3),
                      "tokens": tokens}), flush=True)


if __name__ == "__main__":
    main()
