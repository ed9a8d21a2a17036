# Session 29: can a causal call on torch's CPU flash kernel waste fewer keys on its diagonal tiles
# (its 512-key tiles are computed whole where the diagonal crosses them, about 256 wasted keys a
# row) if it is cut into a "staircase": the diagonal as a batch of independent T-row causal calls
# (kv tiles of T) and the rest as non-causal calls, one per level of halving (batched over the
# pairs of that level)? Kernel time only (the staircase would also need its partials merged).
# bench-attn's heads (4 x 64), float32, one thread, median of 15 (each call's first run dropped).
# Run: .venv/bin/python docs/results/bench13/stair_s29.py 2048 4096 > docs/results/bench13/stair_s29.txt
import torch, time, sys
torch.set_num_threads(1)
op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
H, D = 4, 64
def fa(q, k, v, causal):
    o, l = op(q, k, v, 0.0, causal)
    return o, l
def med(f, r=15):
    f(); ts=[]
    for _ in range(r):
        t=time.perf_counter(); f(); ts.append(time.perf_counter()-t)
    ts.sort(); return ts[len(ts)//2]*1e3
def stair(q, k, v, T):
    B, H, n, D = q.shape
    calls = []
    # diag
    g = n // T
    qd = q.reshape(B, H * g, T, D); kd = k.reshape(B, H*g, T, D); vd = v.reshape(B, H*g, T, D)
    calls.append(fa(qd, kd, vd, True))
    s = n // 2
    while s >= T:
        p = n // (2 * s)
        qq = q.view(B, H, p, 2, s, D)[:, :, :, 1].reshape(B, H * p, s, D)
        kk = k.view(B, H, p, 2, s, D)[:, :, :, 0].reshape(B, H * p, s, D)
        vv = v.view(B, H, p, 2, s, D)[:, :, :, 0].reshape(B, H * p, s, D)
        calls.append(fa(qq, kk, vv, False))
        s //= 2
    return calls
for n in [int(a) for a in sys.argv[1:]]:
    q, k, v = (torch.randn(1, H, n, D) for _ in range(3))
    base = med(lambda: fa(q, k, v, True))
    nc = med(lambda: fa(q, k, v, False))
    res = {}
    for T in (128, 256, 512):
        if n % T or (n // T) & (n // T - 1): continue
        res[T] = med(lambda: stair(q, k, v, T))
    print(n, f"causal {base:.1f} noncausal {nc:.1f} ideal {nc/2:.1f}", {t: round(x, 1) for t, x in res.items()}, flush=True)
