"""torch's CPU flash kernel (``aten._scaled_dot_product_flash_attention_for_cpu``, apb's
``torch_flash`` backend on CPU) on one query row, as a decode step calls it, against the same row
sent twice (what ``apb.kernels`` now does in bfloat16), and against two distinct rows.

Shapes: SmolLM2-135M (9 query heads over 3 KV heads of 64) and Llama-3.1-8B (32 over 8 of 128),
4K-64K cached keys, bfloat16 and float32, one and two threads. Random inputs, non-causal (a decode
step's query sees every key). Reported: median ms of 15 calls, and each way's largest error
against apb's float32 ``naive`` softmax (output, LSE).

Run from the repository root: .venv/bin/python docs/results/decode-s37/kernel.py > docs/results/decode-s37/kernel.txt
"""

import statistics
import time

import torch

SHAPES = {"smollm2": (9, 3, 64), "llama8b": (32, 8, 128)}


def flash(q, k, v):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=None,
                                                                          scale=q.shape[-1] ** -0.5)[:2]
    return out, lse


def ms(fn, reps=15):
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def err(got, ref):
    (o, l), (ro, rl) = got, ref
    return f"{(o[:, :, :1].float() - ro.float()).abs().max().item():.1e}/{(l[:, :, :1].float() - rl).abs().max().item():.1e}"


def main():
    from apb.kernels.attention import _naive

    print(f"torch {torch.__version__}; ms per call (median of 15); error vs float32 naive: output/LSE")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for dtype in (torch.bfloat16, torch.float32):
            for name, (h, kvh, d) in SHAPES.items():
                for n in (4096, 16384, 65536):
                    if name == "llama8b" and n > 16384:
                        continue
                    g = torch.Generator().manual_seed(n)
                    q = torch.randn(1, h, 1, d, generator=g).to(dtype)
                    k, v = (torch.randn(1, kvh, n, d, generator=g).to(dtype) for _ in range(2))
                    twice = q.expand(-1, -1, 2, -1).contiguous()
                    two = torch.cat([q, torch.randn(1, h, 1, d, generator=g).to(dtype)], 2)
                    ref = _naive(q, k, v, False, d ** -0.5)
                    one_ms, twice_ms, two_ms = ms(lambda: flash(q, k, v)), ms(lambda: flash(twice, k, v)), \
                        ms(lambda: flash(two, k, v))
                    print(f"threads {threads} {str(dtype)[6:]:8s} {name:7s} n={n:5d}: one row {one_ms:8.2f}, "
                          f"the row twice {twice_ms:8.2f} ({one_ms / twice_ms:4.2f}x), two rows {two_ms:8.2f}; "
                          f"error one {err(flash(q, k, v), ref)}, twice {err(flash(twice, k, v), ref)}", flush=True)


if __name__ == "__main__":
    main()
