# Session 39: torch's compiled flex_attention on CPU against the flash kernel apb uses, for a block's
# bottom-right causal attention (one call, no merge) against the causal call + the rest + an LSE merge.
# float32, one thread, 4 heads of 64 (bench-attn's shape), median of 7. flex with return_lse fails on CPU
# (torch 2.13: 'torch.compile on CPU only supports inference and return_lse is not supported yet').
# Run: .venv/bin/python docs/results/bench13/flex_s39.py > docs/results/bench13/flex_s39.txt
import time, sys
import torch
from torch.nn.attention.flex_attention import flex_attention, create_block_mask
import torch.nn.functional as F
torch.set_num_threads(1)
H, D = 4, 64
def bench(fn, reps=7):
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts)//2]
flex = torch.compile(flex_attention, dynamic=False)
fa = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
with torch.no_grad():
    for nq, nk in [(2016, 2016), (2016, 6048), (4092, 4092), (4092, 8200)]:
        off = nk - nq
        def br(b, h, q, k):
            return k <= q + off
        g = torch.Generator().manual_seed(0)
        q = torch.randn(1, H, nq, D, generator=g); k, v = (torch.randn(1, H, nk, D, generator=g) for _ in range(2))
        bm = create_block_mask(br, 1, 1, nq, nk, device="cpu")
        t0 = time.perf_counter(); out = flex(q, k, v, block_mask=bm); tc = time.perf_counter() - t0
        tf = bench(lambda: flex(q, k, v, block_mask=bm))
        # current way: causal over own + non-causal over the rest, merged
        def cur():
            o1, l1 = fa(q, k[:, :, off:], v[:, :, off:], is_causal=True)[:2]
            if off:
                o2, l2 = fa(q, k[:, :, :off], v[:, :, :off])[:2]
                m = torch.maximum(l1, l2)
                w1, w2 = (l1 - m).exp(), (l2 - m).exp()
                return (o1 * w1.unsqueeze(-1) + o2 * w2.unsqueeze(-1)) / (w1 + w2).unsqueeze(-1)
            return o1
        tcur = bench(cur)
        mask = torch.ones(nq, nk, dtype=torch.bool).tril(off)
        ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask).float()
        print(f"{nq}x{nk}: flex {tf*1e3:.1f} ms (compile {tc:.1f} s, err {(out-ref).abs().max():.1e}); "
              f"flash cpu causal+rest+merge {tcur*1e3:.1f} ms (err {(cur()-ref).abs().max():.1e})", flush=True)
