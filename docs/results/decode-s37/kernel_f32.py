"""One float32 query row (a decode step) on CPU: torch's CPU flash kernel against apb's
``_grouped_row`` (``naive``'s softmax without a mask: each KV head's query group as one matrix,
so each KV head is read once for its group), over query groups of 1-8 and
head sizes of 64-256, 2K-32K keys, 2 threads. Random inputs, non-causal; median ms of 11 calls.
``rule`` marks the shapes ``kernels/attention.py`` (``_one_row_grouped``) sends to ``_grouped_row``.

Run from the repository root: .venv/bin/python docs/results/decode-s37/kernel_f32.py > docs/results/decode-s37/kernel_f32.txt
"""

import statistics
import time

import torch

SHAPES = [(8, 8, 64), (16, 16, 128), (8, 4, 64), (9, 3, 64), (12, 4, 64), (16, 4, 64), (16, 8, 128),
          (32, 8, 128), (32, 4, 128), (64, 8, 128), (16, 2, 256), (8, 1, 256)]


def ms(fn, reps=11):
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main():
    from apb.kernels.attention import _grouped_row, _one_row_grouped

    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, one query row; ms per call")
    for h, kvh, d in SHAPES:
        for n in (2048, 8192, 32768):
            g = torch.Generator().manual_seed(n)
            q = torch.randn(1, h, 1, d, generator=g)
            k, v = (torch.randn(1, kvh, n, d, generator=g) for _ in range(2))
            flash = ms(lambda: torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, 0.0, False, attn_mask=None, scale=d ** -0.5))
            grouped = ms(lambda: _grouped_row(q, k, v, d ** -0.5))
            rule = "grouped" if _one_row_grouped(q, k) else "flash"
            print(f"heads {h:2d} over {kvh} of {d:3d}, {n:5d} keys: flash {flash:7.2f}, grouped {grouped:7.2f} "
                  f"({flash / grouped:.2f}x); rule: {rule}", flush=True)


if __name__ == "__main__":
    main()
