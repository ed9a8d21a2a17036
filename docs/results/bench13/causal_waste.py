"""Why spava's causal calls cost more per kept pair than apb's on this CPU: torch's CPU flash
kernel computes whole (query tile x key tile) blocks and masks the upper half of those on the
diagonal, so a causal b x b call computes about b x (tile width) pairs beyond the b^2/2 it keeps.
spava's two virtual blocks per host are half apb's block, so twice the diagonal per kept pair.

    python docs/results/bench13/causal_waste.py   (one thread, bench-attn's heads, float32)

Prints, per block size b: ns per kept pair of one causal b x b call, ns per pair of one
non-causal b x b call, and their ratio (1 + waste).
"""

import time

import torch

from apb.kernels import attention

torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
print(f"{'b':>6} {'causal ns/kept pair':>20} {'non-causal ns/pair':>19} {'ratio':>6}")
for b in (1024, 2048, 4096, 8192):
    q, k, v = (torch.randn(1, 4, b, 64, generator=g) for _ in range(3))
    best = {}
    for causal in (True, False):
        attention(q, k, v, causal=causal)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            attention(q, k, v, causal=causal)
            times.append(time.perf_counter() - t0)
        pairs = b * (b + 1) / 2 if causal else b * b
        best[causal] = min(times) / (pairs * 4) * 1e9  # per pair and head
    print(f"{b:>6} {best[True]:>20.3f} {best[False]:>19.3f} {best[True] / best[False]:>6.2f}")
