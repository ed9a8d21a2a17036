"""What the decode host receives in `decode.mode: gather`, before and after session 35.

The pretrained Gemma 3 270M (`gemma3-270m`: 18 layers, 15 of them sliding over 512 keys), one
random-token prompt per length, ring at W = 4 on CPU workers, 8 greedy tokens. Each prompt runs
twice on the same workers: whole (what every prefill kept and every gather sent until session 35,
and still what a cache returned for verification is) and trimmed (each host keeps of a sliding
layer only the positions a later token sees, and the decode host receives of each layer only
what transformers' own cache keeps of it). Reported per run: the K/V each host kept from its
prefill, its peak RSS through the prefill, the bytes each host's gather sent (counted by the
Comm, not computed), the decode host's cache as received, and the answer tokens, which must be
the same. Then the driver's memory estimate for the decode host at
32K and 128K, by the formula before and after.

Run from the repository root: .venv/bin/python docs/results/gather-s35/gather.py > docs/results/gather-s35/gather.txt
"""

import sys

import torch
from transformers import AutoConfig

from apb.model.catalog import resolve_model
from apb.parallel.groups.local import LocalWorkerGroup
from apb.runtime.cache import decode_keeps
from apb.runtime.decode import Sampling
from apb.runtime.memory import kv_bytes_per_token
from apb.runtime.worker import PromptRequest
from apb.tools.verify import random_prompt

WORLD, NEW = 4, 8


def gather_bytes(stats: dict) -> int:
    return sum(op["bytes"] for op in stats["ops"] if op["op"] == "gather")


def main():
    path = str(resolve_model("gemma3-270m"))
    cfg = AutoConfig.from_pretrained(path)
    text = cfg.get_text_config()
    layers = text.num_hidden_layers
    print(f"gemma3-270m: {layers} layers, sliding window {text.sliding_window}, "
          f"{sum(t == 'sliding_attention' for t in text.layer_types)} sliding; W = {WORLD}, ring, bfloat16, "
          f"{NEW} greedy tokens")

    with LocalWorkerGroup(WORLD, worker_kwargs={"device": "cpu", "timeout_s": 600, "threads": 1},
                          timeout_s=1800) as group:
        for n in (2048, 8192):
            ids = random_prompt(n, text.vocab_size, 0)
            runs = {}
            for name, whole in (("whole", True), ("trimmed", False)):
                req = PromptRequest(path, ids, "ring", dtype="bfloat16", return_cache=whole, timed=True,
                                    sampling=Sampling(max_new_tokens=NEW, stop_at_eos=False))
                res = group.call("run_prompt", req)
                runs[name] = res
                sent = [gather_bytes(r.stats) for r in res]
                print(f"{n} tokens, gathered {name}: bytes sent per host {sent} (total {sum(sent) / 2**20:.2f} MiB); "
                      f"decode {res[0].decode_s:.2f} s; tokens {res[0].tokens}")
                print(f"  K/V each host kept from its prefill, MiB: {[round(r.cache_bytes / 2**20, 2) for r in res]}; "
                      "peak RSS through the prefill, MiB: "
                      f"{[None if r.peak_prefill_bytes is None else round(r.peak_prefill_bytes / 2**20) for r in res]}")
            keep = decode_keeps(cfg, n)
            held = sum(n - k for k in keep)
            per_tok = kv_bytes_per_token(cfg, 2)
            print(f"  decode host's cache as received: whole {n * layers * per_tok / 2**20:.2f} MiB, "
                  f"trimmed {held * per_tok / 2**20:.2f} MiB ({held / (n * layers):.3f}); layers keep from {keep}")
            same = runs["whole"][0].tokens == runs["trimmed"][0].tokens
            print(f"  same tokens: {same}")
            if not same:
                sys.exit(1)

    per_tok = kv_bytes_per_token(cfg, 2)
    for n in (32768, 131072):
        before = 2 * n * layers * per_tok
        after = 2 * sum(n - k for k in decode_keeps(cfg, n)) * per_tok
        print(f"memory estimate, decode host's cache (received + transformers' copy), {n} tokens, bfloat16: "
              f"before {before / 2**30:.3f} GiB, now {after / 2**30:.3f} GiB ({after / before:.3f})")


if __name__ == "__main__":  # the workers are spawned: they import this file
    main()
