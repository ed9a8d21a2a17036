"""Gather-mode decoding with transformers' cache as it was (room 0: each global layer grows by
concatenation, copying its whole cache at every step) and with room for the answer (session 36:
each layer copied once into a buffer, each token written in place).

The pretrained SmolLM2-135M-Instruct (30 global layers) in bfloat16 (auto on this AVX512-BF16
CPU), one process, the threads this machine has. One random-token prompt per length is
prefilled once by the model's own forward; each decode starts from a fresh cache built from that
prefill's K/V by ``to_hf_cache`` (as the decode host does after a gather) and picks 32 greedy
tokens (no stop at EOS). Reported: the decode seconds (median of 3, the two ways alternating), the
tokens (which must be the same) and the peak RSS growth while decoding, measured once per way in
a fresh process so that neither sees the other's memory.

Run from the repository root: .venv/bin/python docs/results/decode-s36/decode.py > docs/results/decode-s36/decode.txt
"""

import json
import statistics
import subprocess
import sys
import time

import torch

NEW, LENGTHS, REPEATS = 32, (4096, 16384), 3


def setup(n):
    from transformers import DynamicCache

    from apb.model.catalog import resolve_model
    from apb.model.hf_bridge import output_cache, with_cache
    from apb.model.loading import load_model
    from apb.runtime.cache import KVCache
    from apb.tools.verify import random_prompt, reference_layers

    model = load_model(resolve_model("smollm2-135m-instruct"), "bfloat16", "cpu")
    ids = random_prompt(n, model.config.vocab_size, n)[None]
    with torch.no_grad():
        out = model(ids, use_cache=True, **with_cache(model, DynamicCache(config=model.config)))
    cache = KVCache.from_layers(torch.arange(n), reference_layers(model.config, output_cache(out)))
    return model, cache, out.logits[0, -1].float()


def decode_once(model, cache, first, room):
    from apb.runtime.cache import to_hf_cache
    from apb.runtime.decode import Sampling, decode

    hf = to_hf_cache(cache, model.config, room=room)
    t0 = time.perf_counter()
    tokens = decode(model, hf, first, cache.n_tokens, Sampling(max_new_tokens=NEW, stop_at_eos=False))
    return time.perf_counter() - t0, tokens


def rss_child(n, room):
    """In a fresh process: the RSS growth (kB, VmHWM after the prefill vs after decoding)."""
    from apb.runtime import measure

    model, cache, first = setup(n)
    cpu = torch.device("cpu")
    measure.reset_peak(cpu)
    before = measure.peak_bytes(cpu)
    _, tokens = decode_once(model, cache, first, room)
    print(json.dumps({"peak_growth_mib": (measure.peak_bytes(cpu) - before) / 2**20, "tokens": tokens}))


def main():
    print(f"SmolLM2-135M-Instruct, bfloat16, {torch.get_num_threads()} threads, {NEW} greedy tokens per decode")
    for n in LENGTHS:
        model, cache, first = setup(n)
        times = {0: [], NEW: []}
        tokens = {}
        decode_once(model, cache, first, NEW)  # warm-up
        for _ in range(REPEATS):
            for room in (0, NEW):
                s, tokens[room] = decode_once(model, cache, first, room)
                times[room].append(s)
        old, new = statistics.median(times[0]), statistics.median(times[NEW])
        print(f"{n} tokens: decode without room {old:.3f} s {[round(t, 3) for t in times[0]]}, "
              f"with room {new:.3f} s {[round(t, 3) for t in times[NEW]]}: {old / new:.2f}x; "
              f"same tokens: {tokens[0] == tokens[NEW]}")
        for room in (0, NEW):
            got = subprocess.run([sys.executable, __file__, "rss", str(n), str(room)], capture_output=True, text=True,
                                 check=True).stdout.strip().splitlines()[-1]
            print(f"  room {room}: peak RSS growth while decoding {json.loads(got)['peak_growth_mib']:.1f} MiB")


if __name__ == "__main__":
    if sys.argv[1:2] == ["rss"]:
        rss_child(int(sys.argv[2]), int(sys.argv[3]))
    else:
        main()
