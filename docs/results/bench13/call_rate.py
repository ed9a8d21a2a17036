# Session 20: how the speed per query-key pair of torch's CPU flash kernel (one thread, float32,
# bench-attn's 4 heads of 64) depends on the call's size: the calls spava makes at W=8, 32K
# (2,048-row virtual blocks over 256-6,144 keys) against ring's and apb's (4,096 rows). Output:
# call_rate.txt. Run: .venv/bin/python docs/results/bench13/call_rate.py
import time

import torch

from apb.kernels import attention

torch.set_num_threads(1)
H, D = 4, 64


def bench(f, r=7):
    f()
    ts = []
    for _ in range(r):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[r // 2]


print("rows   keys  causal    ms   ns/pair (causal: pairs = rows*(rows+1)/2)")
for rows, keys, causal in [(4096, 4096, False), (4096, 4096, True), (2048, 2048, True), (1024, 1024, True),
                           (512, 512, True), (2048, 256, False), (2048, 512, False), (2048, 1024, False),
                           (2048, 2048, False), (2048, 3584, False), (2048, 4608, False), (2048, 6144, False),
                           (4096, 1024, False), (4096, 4608, False), (32, 4096, False)]:
    q, k, v = (torch.randn(1, H, n, D) for n in (rows, keys, keys))
    s = bench(lambda: attention(q, k, v, causal=causal))
    pairs = rows * (rows + 1) / 2 if causal else rows * keys
    print(f"{rows:5d} {keys:6d}  {str(causal):6s} {s * 1e3:6.1f}   {s / pairs / H * 1e9:.3f}")
