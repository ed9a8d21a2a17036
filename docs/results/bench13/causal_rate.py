# Session 17: how fast torch's CPU flash kernel runs a causal call against the ideal (half a
# non-causal call of the same size), one thread, float32, bench-attn's heads; and whether splitting
# the causal call helps (it does not). Output: causal_rate.txt. Run: .venv/bin/python docs/results/bench13/causal_rate.py
import time, torch
from apb.kernels import attention, merge_many
torch.set_num_threads(1)
H, D = 4, 64
def t(n): return torch.randn(1, H, n, D)
def bench(f, r=7):
    f(); ts=[]
    for _ in range(r):
        t0=time.perf_counter(); f(); ts.append(time.perf_counter()-t0)
    return sorted(ts)[r//2]
for n in (1024, 2016, 2048, 4096):
    X = t(n)
    one = bench(lambda: attention(X, X, X, causal=True))
    def split(parts):
        s = n // parts
        outs = []
        for i in range(parts):
            qi = X[:, :, i*s:(i+1)*s]
            o = [attention(qi, X[:, :, i*s:(i+1)*s], X[:, :, i*s:(i+1)*s], causal=True)]
            if i: o.append(attention(qi, X[:, :, :i*s], X[:, :, :i*s], causal=False))
            outs.append(merge_many(o) if len(o) > 1 else o[0])
        return outs
    two = bench(lambda: split(2)); four = bench(lambda: split(4))
    nc = bench(lambda: attention(X, X, X, causal=False))
    print(n, f"causal {one*1e3:.1f} ms  split2 {two*1e3:.1f}  split4 {four*1e3:.1f}  noncausal {nc*1e3:.1f} (ideal causal {nc/2*1e3:.1f})")
