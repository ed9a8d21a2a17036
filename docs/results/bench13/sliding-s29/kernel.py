# Session 29: one sliding layer's attention on this CPU, one thread, float32, 4096 query rows at three
# shapes (gpt-oss's window of 128 with 64-wide heads, Gemma 3's 512 with 256-wide, Mistral's 4096 with
# 128-wide; query/KV heads cut to fit), each way the code has run it:
#   naive, tiles of max(window, 512) rows   -- before this session (the naive softmax under a mask)
#   torch, tiles of max(window, 512) rows   -- torch's CPU flash kernel with the mask, the old tiles
#   torch, tiles of 256 rows                -- this session's
# ms for the 4096 rows, median of 5; each call is aligned (keys end at the last query), as sliding tiles are.
# Run: .venv/bin/python docs/results/bench13/sliding-s29/kernel.py > docs/results/bench13/sliding-s29/kernel.txt
import time

import torch

from apb.kernels import attention

torch.set_num_threads(1)
N = 4096


def median_ms(fn, repeats=5):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[len(times) // 2]


def layer_ms(w, heads, kv_heads, dim, rows, backend):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, rows, dim, generator=g)
    k, v = (torch.randn(1, kv_heads, rows + w - 1, dim, generator=g) for _ in range(2))
    return median_ms(lambda: attention(q, k, v, causal=True, window=w, backend=backend)) * N / rows


print(f"{'window':>6} {'heads':>9} {'dim':>4} {'naive, old tiles':>17} {'torch, old tiles':>17} {'torch, 256 rows':>16} "
      f"{'speedup':>8}")
for w, heads, kv_heads, dim in [(128, 16, 2, 64), (512, 4, 1, 256), (4096, 8, 2, 128)]:
    old = max(w, 512)
    naive = layer_ms(w, heads, kv_heads, dim, old, "naive")
    masked_old = layer_ms(w, heads, kv_heads, dim, old, "torch_flash")
    new = layer_ms(w, heads, kv_heads, dim, 256, "torch_flash")
    print(f"{w:>6} {f'{heads}/{kv_heads}':>9} {dim:>4} {naive:>17.1f} {masked_old:>17.1f} {new:>16.1f} {naive / new:>7.2f}x",
          flush=True)
