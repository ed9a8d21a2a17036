"""One query row (a decode step) on CPU: torch's CPU flash kernel as apb called it before
``_grouped_row`` (float32: the row once; bfloat16: the row twice, kernel.txt) against
``_grouped_row`` (``naive``'s softmax without a mask: each KV head's query group as one float32
matrix, so each KV head is read once per group; bfloat16 K/V made float32 1,024 keys at a time).
Query groups of 1-8, head sizes 64-256, 2K-32K keys, 2 threads; random inputs, non-causal; median
ms of 11 calls, and each way's largest error against the float32 ``naive`` softmax (output/LSE).
``rule`` marks the shapes ``_one_row_grouped`` sends to ``_grouped_row``.

Run from the repository root:
  .venv/bin/python docs/results/decode-s37/grouped.py float32 > docs/results/decode-s37/kernel_f32.txt
  .venv/bin/python docs/results/decode-s37/grouped.py bfloat16 > docs/results/decode-s37/kernel_grouped.txt
A second argument replaces the shapes: ``H/KV/D,...`` (query heads, KV heads, head size).
"""

import sys

import torch

from kernel import ms  # this folder's kernel.py

SHAPES = [(8, 8, 64), (16, 16, 128), (8, 4, 64), (9, 3, 64), (12, 4, 64), (16, 4, 64), (16, 8, 128),
          (32, 8, 128), (32, 4, 128), (64, 8, 128), (16, 2, 256), (8, 1, 256)]


def main():
    from apb.kernels.attention import _grouped_row, _naive, _one_row_grouped

    dtype = getattr(torch, sys.argv[1])
    rows = 1 if dtype == torch.float32 else 2
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {sys.argv[1]}, one query row (the kernel "
          f"given it {rows}x); ms per call (median of 11); error vs float32 naive: output/LSE")
    shapes = [tuple(map(int, x.split("/"))) for x in sys.argv[2].split(",")] if len(sys.argv) > 2 else SHAPES
    for h, kvh, d in shapes:
        for n in (2048, 8192, 32768):
            g = torch.Generator().manual_seed(n)
            q = torch.randn(1, h, 1, d, generator=g).to(dtype)
            k, v = (torch.randn(1, kvh, n, d, generator=g).to(dtype) for _ in range(2))
            sent = q.expand(-1, -1, rows, -1).contiguous()

            def flash():
                out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    sent, k, v, 0.0, False, attn_mask=None, scale=d ** -0.5)[:2]
                return out[:, :, :1], lse[:, :, :1]

            def grouped():
                return _grouped_row(q, k, v, d ** -0.5)

            ref, ref_lse = _naive(q, k, v, False, d ** -0.5)
            errs = [f"{(o.float() - ref.float()).abs().max().item():.1e}/{(l.float() - ref_lse).abs().max().item():.1e}"
                    for o, l in (flash(), grouped())]
            a, b = ms(flash, reps=11), ms(grouped, reps=11)
            rule = "grouped" if _one_row_grouped(q, k) else "flash"
            print(f"heads {h:2d} over {kvh} of {d:3d}, {n:5d} keys: flash {a:7.2f}, grouped {b:7.2f} ({a / b:.2f}x); "
                  f"error {errs[0]} and {errs[1]}; rule: {rule}", flush=True)


if __name__ == "__main__":
    main()
