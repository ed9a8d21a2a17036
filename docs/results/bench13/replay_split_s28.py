# Session 28: one layer's attention step of apb:shared and apb:split alone (one process, one thread,
# the other hosts' messages stand-ins of the right shape), SmolLM2-135M's shape (9 heads, 3 KV heads of
# 64), 8K, W=8, hosts 7, 3, 1, 0; best and median of 15.
# Run: .venv/bin/python docs/results/bench13/replay_split_s28.py > docs/results/bench13/replay_split_s28.txt
import timeit
from types import SimpleNamespace
import torch
from apb.config import MethodConfig
from apb.methods import build_method
from apb.methods.base import AttnContext
from apb.parallel.comm import CommStats
torch.set_num_threads(1)
NQ, H, KV, D = 32, 9, 3, 64



def stand_in_comm(rank, size):
    """Every collective answered at once: an all-gather with ``size`` copies of this host's part
    (the others' parts have its shape), a broadcast with the buffer as it is."""
    def gather(t, op="all_gather"):
        done = [t.clone() for _ in range(size)]
        return SimpleNamespace(wait=lambda: done)

    return SimpleNamespace(rank=rank, size=size, stats=CommStats(), group=None, all_gather_start=gather,
                           broadcast_start=lambda t, src, op="broadcast": SimpleNamespace(wait=lambda: [t]))


def replay(name, n, world, rank, reps=15):
    """Best and median seconds of host ``rank``'s step, and its rows."""
    share = {"apb:shared": True, "apb:split": "split"}[name]
    method = build_method("apb", MethodConfig(share_anchor=share))
    slices, plan = method.layout(n, world, NQ), method.plan(n, world, NQ, 2)
    rows = len(slices[rank].indices)
    qkv = torch.randn(1, H + 2 * KV, rows, D, generator=torch.Generator().manual_seed(0))
    q, k, v = qkv.split([H, KV, KV], dim=1)
    layer, ident = SimpleNamespace(layer_idx=0), SimpleNamespace(shift=lambda x, delta: x)

    def step():
        ctx = AttnContext(method, slices, stand_in_comm(rank, world), plan=plan, n_query=NQ, rope=ident)
        method.attention(ctx, layer, q, k, v, D ** -0.5)

    times = sorted(timeit.repeat(step, number=1, repeat=reps + 1)[1:])  # the first warms up
    return times[0], times[len(times) // 2], rows

for rank in (7, 3, 1, 0):
    for name in ("apb:shared", "apb:split"):
        best, med, rows = replay(name, 8192, 8, rank)
        print(f"host {rank} {name:<11} rows {rows:>5}  best {best*1e3:7.2f} ms  median {med*1e3:7.2f} ms", flush=True)
