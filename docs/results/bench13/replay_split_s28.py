# Session 28: one layer's attention step of apb:shared and apb:split alone (one process, one thread,
# the other hosts' messages stand-ins of the right shape), SmolLM2-135M's shape (9 heads, 3 KV heads of
# 64), 8K, W=8, hosts 7, 3, 1, 0; best and median of 15.
# Run: .venv/bin/python docs/results/bench13/replay_split_s28.py > docs/results/bench13/replay_split_s28.txt
import sys, time
from types import SimpleNamespace
import torch
from apb.config import MethodConfig
from apb.methods import build_method
from apb.methods.base import AttnContext
from apb.parallel.comm import CommStats
torch.set_num_threads(1)
NQ, H, KV, D = 32, 9, 3, 64

class ReplayComm:
    def __init__(self, rank, size):
        self.rank, self.size, self.stats, self.group = rank, size, CommStats(), None
    def all_gather_start(self, t, op="all_gather"):
        parts = [t.clone() for _ in range(self.size)]
        return SimpleNamespace(wait=lambda: parts)
    def broadcast_start(self, t, src, op="broadcast"):
        return SimpleNamespace(wait=lambda: [t])

def replay(name, n, world, rank, reps=15):
    method = build_method(name, MethodConfig(name=name.split(":")[0], **({"share_anchor": True} if name.endswith("shared") else {"share_anchor": "split"} if name.endswith("split") else {})))
    slices = method.layout(n, world, NQ)
    plan = method.plan(n, world, NQ, 2)
    rows = len(slices[rank].indices)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, rows, D, generator=g) for h in (H, KV, KV))
    def once():
        ctx = AttnContext(method, slices, ReplayComm(rank, world), plan=plan, n_query=NQ)
        ctx.rope = SimpleNamespace(shift=lambda x, delta: x)
        return method.attention(ctx, SimpleNamespace(layer_idx=0), q, k, v, D ** -0.5)
    once()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter(); once(); ts.append(time.perf_counter() - t0)
    return min(ts), sorted(ts)[len(ts)//2], rows

for rank in (7, 3, 1, 0):
    for name in ("apb:shared", "apb:split"):
        best, med, rows = replay(name, 8192, 8, rank)
        print(f"host {rank} {name:<11} rows {rows:>5}  best {best*1e3:7.2f} ms  median {med*1e3:7.2f} ms", flush=True)
