"""One bfloat16 query row (a decode step) on CPU: torch's CPU flash kernel given the row twice
(``kernels/attention.py``'s call for one bfloat16 row, kernel.txt) against ``_grouped_row``, each
KV head's query group as one float32 matrix over blocks of 1,024 keys made float32 one at a time.
Query groups of 1-8, head sizes 64-256, 2K-32K keys, 2 threads; random inputs, non-causal; median ms
of 11 calls, and each way's largest error against the float32 ``naive`` softmax (output/LSE).
``rule`` marks the shapes ``_one_row_grouped`` sends to ``_grouped_row``.

Run from the repository root: .venv/bin/python docs/results/decode-s37/kernel_grouped.py > docs/results/decode-s37/kernel_grouped.txt
"""

import statistics
import time

import torch

SHAPES = [(9, 3, 64), (16, 4, 64), (16, 8, 128), (32, 8, 128), (32, 4, 128), (64, 8, 128), (16, 2, 256), (8, 1, 256)]


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
    from apb.kernels.attention import _grouped_row, _naive, _one_row_grouped

    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, bfloat16, one query row; ms per call")
    for h, kvh, d in SHAPES:
        for n in (2048, 8192, 32768):
            g = torch.Generator().manual_seed(n)
            q = torch.randn(1, h, 1, d, generator=g).bfloat16()
            k, v = (torch.randn(1, kvh, n, d, generator=g).bfloat16() for _ in range(2))
            twice = q.expand(-1, -1, 2, -1).contiguous()

            def flash():
                out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    twice, k, v, 0.0, False, attn_mask=None, scale=d ** -0.5)[:2]
                return out[:, :, :1], lse[:, :, :1]

            def grouped():
                return _grouped_row(q, k, v, d ** -0.5)

            ref, ref_lse = _naive(q, k, v, False, d ** -0.5)
            errs = [f"{(o.float() - ref.float()).abs().max().item():.1e}/{(l.float() - ref_lse).abs().max().item():.1e}"
                    for o, l in (flash(), grouped())]
            a, b = ms(flash), ms(grouped)
            rule = "grouped" if _one_row_grouped(q, k) else "flash"
            print(f"heads {h:2d} over {kvh} of {d:3d}, {n:5d} keys: flash (row twice) {a:7.2f}, grouped {b:7.2f} "
                  f"({a / b:.2f}x); error {errs[0]} and {errs[1]}; rule: {rule}", flush=True)


if __name__ == "__main__":
    main()
