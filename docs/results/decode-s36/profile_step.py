"""One decoding step of SmolLM2-135M-Instruct (bfloat16, 2 threads) over a 4K-token cache in
transformers' own DynamicCache: 8 steps timed with apb's attention (None) and with transformers' sdpa,
then one step under the torch profiler (apb's attention). Session 36 ran it while nothing else ran;
its output, copied from the terminal (the weight-loading progress bars dropped), is profile_step.txt.
Run from the repository root: .venv/bin/python docs/results/decode-s36/profile_step.py
"""
import time

import torch
from transformers import DynamicCache
from apb.model.catalog import resolve_model
from apb.model.hf_bridge import output_cache, with_cache
from apb.model.loading import load_model
from apb.tools.verify import random_prompt
torch.set_num_threads(2)
n = 4096
for impl in [None, "sdpa"]:
    model = load_model(resolve_model("smollm2-135m-instruct"), "bfloat16", "cpu", attn_implementation=impl)
    ids = random_prompt(n, model.config.vocab_size, n)[None]
    with torch.no_grad():
        out = model(ids, use_cache=True, **with_cache(model, DynamicCache(config=model.config)))
        cache = output_cache(out)
        ts = []
        for i in range(8):
            t0 = time.perf_counter()
            model(input_ids=torch.tensor([[5]]), position_ids=torch.tensor([[n + i]]), use_cache=True, **with_cache(model, cache))
            ts.append(time.perf_counter() - t0)
    print(impl, [round(t * 1000, 1) for t in ts])
    if impl is None:
        from torch.profiler import profile
        with torch.no_grad(), profile() as p:
            model(input_ids=torch.tensor([[5]]), position_ids=torch.tensor([[n + 8]]), use_cache=True, **with_cache(model, cache))
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
