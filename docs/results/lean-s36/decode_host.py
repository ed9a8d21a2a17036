"""The decode host's memory from the end of its prefill through the gather and the decoding,
with the cache received straight into transformers' layout (session 36) and as before.

The pretrained SmolLM2-135M-Instruct (30 global layers: every position of every layer is kept, so
the gather sends the same K/V either way), ring at W = 2 on CPU workers, bfloat16, one random-token
prompt of 16K tokens, 8 greedy tokens. Each prompt runs twice on the same workers:

- ``returned``: a cache returned for verification (``return_cache``), which takes the way every
  decode took before this session: received into the gather's buffers, copied into transformers'
  cache, both held while decoding;
- ``decoded``: what ``apb run`` does now: each layer received straight into a buffer in
  transformers' layout with room for the answer (each run of positions through one staging
  buffer; the host's own runs copied from its layers), handed to transformers' cache without a
  copy; the host's own part freed after the gather.

Reported per run: host 0's peak RSS through the prefill and from its end through the decoding
(``PromptResult.peak_decode_bytes``, VmHWM reset between them), the cache each host kept, and
the answer tokens, which must be the same.

Run from the repository root: .venv/bin/python docs/results/lean-s36/decode_host.py > docs/results/lean-s36/decode_host.txt
"""

import sys

from transformers import AutoConfig

from apb.model.catalog import resolve_model
from apb.parallel.groups.local import LocalWorkerGroup
from apb.runtime.decode import Sampling
from apb.runtime.memory import kv_bytes_per_token
from apb.runtime.worker import PromptRequest
from apb.tools.verify import random_prompt

WORLD, NEW, N = 2, 8, 16384


def main():
    path = str(resolve_model("smollm2-135m-instruct"))
    cfg = AutoConfig.from_pretrained(path)
    whole = N * cfg.num_hidden_layers * kv_bytes_per_token(cfg, 2) / 2**20
    print(f"smollm2-135m-instruct, ring, W = {WORLD}, bfloat16, {N} tokens, {NEW} greedy tokens; "
          f"the whole cache is {whole:.1f} MiB")
    ids = random_prompt(N, cfg.vocab_size, 0)
    tokens = {}
    with LocalWorkerGroup(WORLD, worker_kwargs={"device": "cpu", "timeout_s": 1200, "threads": 1},
                          timeout_s=3600) as group:
        for name, returned in (("returned", True), ("decoded", False), ("returned", True), ("decoded", False)):
            req = PromptRequest(path, ids, "ring", dtype="bfloat16", return_cache=returned, timed=True,
                                sampling=Sampling(max_new_tokens=NEW, stop_at_eos=False))
            res = group.call("run_prompt", req)
            host = res[0]
            tokens.setdefault(name, host.tokens)
            print(f"{name:9s} host 0: peak RSS through the prefill {host.peak_prefill_bytes / 2**20:.0f} MiB, "
                  f"from its end through the decoding {host.peak_decode_bytes / 2**20:.0f} MiB "
                  f"(+{(host.peak_decode_bytes - host.peak_prefill_bytes) / 2**20:.0f}); K/V kept per host "
                  f"{[round(r.cache_bytes / 2**20, 1) for r in res]} MiB; decode {host.decode_s:.2f} s; "
                  f"tokens {host.tokens}")
    same = tokens["returned"] == tokens["decoded"]
    print(f"same tokens: {same}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":  # the workers are spawned: they import this file
    main()
