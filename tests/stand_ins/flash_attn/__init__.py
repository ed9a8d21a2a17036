"""A CPU stand-in for flash-attn 2's ``flash_attn_func``, for tests only.

flash-attn runs only on CUDA, so nothing on the CPU machines ever calls it; this module lets the
tests run apb's ``flash_attn`` backend (the transposes, the GQA and causal conventions, the
window, the softcap, the LSE it merges) through the same code. It is written from flash-attn's
documented contract (``flash_attn_interface.flash_attn_func``'s docstring) and refuses what the
real one refuses, computing in float64 with an explicit mask:

* q ``(batch, seqlen_q, heads, dim)``, k/v ``(batch, seqlen_k, heads_k, dim)``, ``heads %
  heads_k == 0`` (query head ``h`` uses KV head ``h // (heads // heads_k)``), one head size for
  q, k and v, at most 256; float16 or bfloat16 only, one dtype for all three;
* ``causal`` aligned bottom-right: query ``i`` sees key ``j`` iff ``j <= i + seqlen_k - seqlen_q``;
* ``window_size=(left, right)``: query ``i`` sees keys ``i + seqlen_k - seqlen_q - left`` to
  ``i + seqlen_k - seqlen_q + right`` inclusive, ``-1`` meaning unbounded on that side;
* ``softcap > 0``: scores become ``softcap * tanh(scale * q.k / softcap)``;
* ``return_attn_probs=True`` returns ``(out, softmax_lse, S_dmask)``, ``softmax_lse`` float32
  ``(batch, heads, seqlen_q)``. A row that sees no key has ``out = 0`` (documented) and
  ``lse = +inf`` (the CUDA kernel writes INFINITY where the row's sum is 0): callers that merge
  by LSE must keep such rows away from it.
"""

from __future__ import annotations

import math
import os

import torch

__version__ = "2.8.3+cpu.stand-in"

calls: list[dict] = []  # one entry per call: what the caller passed, for tests to inspect
LOG_ENV = "APB_FLASH_STAND_IN_LOG"  # a file: each process appends a line per call (workers are processes)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise RuntimeError("FlashAttention only support fp16 and bf16 data type")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise RuntimeError("query and key must have the same dtype")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise RuntimeError("flash_attn_func takes (batch, seqlen, heads, dim) tensors")
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    if tuple(k.shape) != (b, sk, hk, d) or tuple(v.shape) != (b, sk, hk, d):
        raise RuntimeError(f"k and v must be (batch, seqlen_k, heads_k, {d}); got {tuple(k.shape)}, {tuple(v.shape)}")
    if h % hk:
        raise RuntimeError("Number of heads in key/value must divide number of heads in query")
    if d > 256:
        raise RuntimeError("FlashAttention forward only supports head dimension at most 256")
    if dropout_p or alibi_slopes is not None:
        raise NotImplementedError("the stand-in computes neither dropout nor ALiBi")
    calls.append(dict(shape_q=tuple(q.shape), shape_k=tuple(k.shape), causal=causal, window_size=tuple(window_size),
                      softcap=softcap))
    if os.environ.get(LOG_ENV):
        with open(os.environ[LOG_ENV], "a") as log:
            log.write(f"{os.getpid()} {tuple(q.shape)} {tuple(k.shape)} causal={causal} window={tuple(window_size)} "
                      f"softcap={softcap}\n")
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    head_of = torch.arange(h) // (h // hk)
    qd = q.double().transpose(1, 2)  # (b, h, sq, d)
    kd, vd = k.double().transpose(1, 2)[:, head_of], v.double().transpose(1, 2)[:, head_of]
    scores = qd @ kd.transpose(-1, -2) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    i = torch.arange(sq)[:, None] + (sk - sq)  # each query's own diagonal, bottom-right
    j = torch.arange(sk)[None, :]
    left, right = window_size
    seen = torch.ones(sq, sk, dtype=torch.bool)
    if causal:
        right = 0 if right < 0 else min(right, 0)
    if right >= 0:
        seen &= j <= i + right
    if left >= 0:
        seen &= j >= i - left
    scores = scores.masked_fill(~seen, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)  # -inf where a row sees nothing
    probs = torch.exp(scores - lse.nan_to_num(neginf=0.0)[..., None]).masked_fill(~seen, 0.0)
    out = (probs @ vd).transpose(1, 2).to(q.dtype).contiguous()
    lse = torch.where(seen.any(-1), lse, torch.full_like(lse, math.inf)).float()
    if not return_attn_probs:
        return out
    return out, lse, torch.empty(0, dtype=q.dtype)
