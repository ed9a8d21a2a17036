# Session 22: one host's attention step of apb and spava run alone (one process, one thread,
# nothing else on the machine), at bench-attn's W=8 32K and W=2 8K shapes, to separate what the
# step's code costs from what 8 processes sharing 2 cores cost. The other hosts' parts of each
# all-gather are stand-ins of the right shape (copies of this host's own), so the step does the
# work it does in a run. Each kernel call is timed too, by kind (causal or not), with its
# (query, key) pairs times heads, causal calls counted as the pairs they keep; every figure of a
# host is from its fastest repeat (step and calls from the same run).
# Run: .venv/bin/python docs/results/bench13/replay_step.py > docs/results/bench13/replay_step.txt
import sys
import time
from collections import defaultdict
from types import SimpleNamespace

import torch

from apb.config import MethodConfig
from apb.methods import anchored, build_method, cache_attention, spava
from apb.methods import apb as apb_module
from apb.methods.base import AttnContext
from apb.parallel.comm import CommStats

torch.set_num_threads(1)
N_QUERY, H, KV, D = 32, 4, 4, 64
REPEATS = int(sys.argv[1]) if len(sys.argv) > 1 else 9
CASES = [(32768, 8, [("apb", 7), ("apb", 4), ("spava", 0), ("spava", 5), ("spava", 7)]),
         (8192, 2, [("apb", 1), ("spava", 0), ("spava", 1)])]


class ReplayComm:
    def __init__(self, rank, size):
        self.rank, self.size, self.stats, self.group = rank, size, CommStats(), None

    def all_gather_start(self, t, op="all_gather"):
        parts = [t.clone() for _ in range(self.size)]
        return SimpleNamespace(wait=lambda: parts)


def timed_calls(fn):
    """Run ``fn`` with every kernel call of the methods timed: {causal: [seconds, pair-heads, calls]}."""
    real = spava.attention
    tally = defaultdict(lambda: [0.0, 0.0, 0])

    def timing(q, k, v, causal=False, **kw):
        nq, nk = q.shape[2], k.shape[2]
        t0 = time.perf_counter()
        out = real(q, k, v, causal=causal, **kw)
        row = tally[causal]
        row[0] += time.perf_counter() - t0
        row[1] += q.shape[1] * (nq * (nk - nq) + nq * (nq + 1) / 2 if causal else nq * nk)
        row[2] += 1
        return out

    mods = [spava, apb_module, anchored, cache_attention]
    for m in mods:
        m.attention = timing
    try:
        fn()
    finally:
        for m in mods:
            m.attention = real
    return tally


def replay(name, n, world, rank):
    method = build_method(name, MethodConfig(name=name))
    slices = method.layout(n, world, N_QUERY)
    plan = method.plan(n, world, N_QUERY, 2)
    rows = len(slices[rank].indices)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, rows, D, generator=g) for h in (H, KV, KV))

    def once():
        ctx = AttnContext(method, slices, ReplayComm(rank, world), plan=plan, n_query=N_QUERY)
        ctx.rope = SimpleNamespace(shift=lambda x, delta: x)  # positions do not change the work
        return method.attention(ctx, SimpleNamespace(layer_idx=0), q, k, v, D ** -0.5)

    def timed():
        t0 = time.perf_counter()
        calls = timed_calls(once)
        return time.perf_counter() - t0, calls

    once()
    return (*min((timed() for _ in range(REPEATS)), key=lambda tc: tc[0]), rows)  # the fastest repeat, whole


print(f"bench-attn shape (4 heads of 64, 4 KV heads), one layer, query {N_QUERY} tokens, float32, one thread, "
      f"best of {REPEATS}; ns/pair is per (query, key) pair and head")
for n, world, hosts in CASES:
    print(f"\nn={n}, W={world}")
    print(f"{'method':<7}{'host':>5}{'rows':>6}{'step s':>9}{'pair-heads M':>13}{'ns/pair':>9}"
          f"{'causal: ms':>12}{'M':>7}{'ns':>6}{'calls':>6}{'non-causal: ms':>16}{'M':>7}{'ns':>6}{'calls':>6}{'other ms':>9}")
    res = {}
    for name, rank in hosts:
        t, calls, rows = replay(name, n, world, rank)
        pairs = sum(r[1] for r in calls.values())
        kernel = sum(r[0] for r in calls.values())
        res[(name, rank)] = (t, pairs)
        line = f"{name:<7}{rank:>5}{rows:>6}{t:>9.4f}{pairs / 1e6:>13.1f}{t / pairs * 1e9:>9.3f}"
        for causal in (True, False):
            s, p, c = calls.get(causal, [0.0, 0.0, 0])
            line += f"{s * 1e3:>{12 if causal else 16}.1f}{p / 1e6:>7.1f}{(s / p * 1e9 if p else 0):>6.2f}{c:>6}"
        print(line + f"{(t - kernel) * 1e3:>9.1f}")
    a = max((res[h] for h in res if h[0] == "apb"), key=lambda x: x[0])
    s = max((res[h] for h in res if h[0] == "spava"), key=lambda x: x[0])
    print(f"slowest spava host against slowest apb host: step time ratio {a[0] / s[0]:.3f}, pair ratio "
          f"{a[1] / s[1]:.3f}, efficiency {(a[0] / s[0]) / (a[1] / s[1]):.3f}")
