# Session 39: spava's causal call over one virtual block (2,014 rows, bench-attn's 4 heads of 64, float32, one
# thread) on a view of the host's rows against a contiguous copy, and the two blocks as one batch of 2
# (per block), median of 15, three rounds. Run: .venv/bin/python docs/results/bench13/causal_views_s39.py
import time, torch
torch.set_num_threads(1)
fa = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
g = torch.Generator().manual_seed(0)
H, D, N = 4, 64, 4124
q, k, v = (torch.randn(1, H, N, D, generator=g) for _ in range(3))
r1 = slice(512, 512 + 2014)
qv, kv_, vv = q[:, :, r1], k[:, :, r1], v[:, :, r1]
qc, kc, vc = qv.contiguous(), kv_.contiguous(), vv.contiguous()
def t(fn, reps=15):
    fn(); ts = []
    for _ in range(reps):
        t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
    return sorted(ts)[reps // 2] * 1e3
for _ in range(3):
    a = t(lambda: fa(qv, kv_, vv, is_causal=True))
    b = t(lambda: fa(qc, kc, vc, is_causal=True))
    c = t(lambda: fa(qc.expand(2, -1, -1, -1), kc.expand(2, -1, -1, -1), vc.expand(2, -1, -1, -1), is_causal=True)) / 2
    d = t(lambda: fa(torch.cat([qv, qv]), torch.cat([kv_, kv_]), torch.cat([vv, vv]), is_causal=True)) / 2
    print(f"view {a:.1f} ms, contiguous {b:.1f} ms, batch-2 expand per block {c:.1f}, batch-2 cat per block {d:.1f}")
