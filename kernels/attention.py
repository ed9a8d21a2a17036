"""Attention that returns its log-sum-exp, on every backend, with one mask convention.

Every distributed method here merges partial attentions, so a kernel is only usable if it
returns a true LSE. This module owns the choice of kernel and hides two differences between
them:

* causal alignment: with more keys than queries, the causal mask is *bottom-right* aligned
  (query ``i`` sees keys ``0 .. kv_len - q_len + i``). flash-attn does this natively; torch's
  kernels are top-left aligned, so for them a bottom-right call is split into a non-causal
  part (the keys every query sees) and a square causal part, merged by LSE;
* grouped-query attention: flash-attn takes fewer KV heads natively; the torch CPU kernel
  needs them repeated.

Shapes: ``q`` is (batch, heads, q_len, dim), ``k``/``v`` are (batch, kv_heads, kv_len, dim)
with ``heads % kv_heads == 0``. Returns ``out`` (batch, heads, q_len, dim) in ``q``'s dtype
and ``lse`` (batch, heads, q_len) in float32. A query that sees no key gets ``out = 0`` and
``lse = -inf`` so that merging it with anything is the identity.

Backends, chosen by :func:`select_backend` (``APB_ATTN_BACKEND`` or :func:`force_backend`
override the automatic choice):

=================  ==========================================================
``flash_attn``     flash-attn 2, CUDA tensors in fp16/bf16 (the ``[gpu]`` extra)
``torch_flash``    ``aten._scaled_dot_product_flash_attention_for_cpu`` on CPU,
                   ``aten._scaled_dot_product_efficient_attention`` on CUDA
``naive``          explicit softmax in float32; the reference for tests
=================  ==========================================================
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Callable, Iterator

import torch

from apb.kernels.merge import merge

Backend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool, float], tuple[torch.Tensor, torch.Tensor]]

_BACKENDS: dict[str, Backend] = {}
# per backend: whether it can run in this environment (its library imports)
_AVAILABLE: dict[str, Callable[[], bool]] = {}
# backends whose causal flag is already bottom-right aligned when keys outnumber queries
_BOTTOM_RIGHT_NATIVE = {"naive", "flash_attn"}
_forced: str | None = None


def register_backend(name: str, available: Callable[[], bool] = lambda: True) -> Callable[[Backend], Backend]:
    """Register a backend under ``name``; ``available()`` says whether it can run here."""
    def deco(fn: Backend) -> Backend:
        _BACKENDS[name] = fn
        _AVAILABLE[name] = available
        return fn

    return deco


def available_backends() -> list[str]:
    """The registered backends that can run in this environment, in registration order."""
    return [name for name in _BACKENDS if _AVAILABLE.get(name, lambda: True)()]


@contextlib.contextmanager
def force_backend(name: str | None) -> Iterator[None]:
    """Use backend ``name`` inside the block (``None`` restores the automatic choice)."""
    global _forced
    if name is not None and name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; valid: {sorted(_BACKENDS)}")
    before, _forced = _forced, name
    try:
        yield
    finally:
        _forced = before


def select_backend(q: torch.Tensor) -> str:
    name = _forced or os.environ.get("APB_ATTN_BACKEND") or None
    if name:
        if name not in _BACKENDS:
            raise ValueError(f"APB_ATTN_BACKEND={name!r} is not a backend; valid: {sorted(_BACKENDS)}")
        return name
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and _flash_attn_func() is not None:
        return "flash_attn"
    return "torch_flash"


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of ``q`` over ``k``/``v``; returns ``(out, lse)`` (see module doc)."""
    _check_shapes(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q_len, kv_len = q.shape[2], k.shape[2]
    name = backend or select_backend(q)
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; valid: {sorted(_BACKENDS)}")
    if q_len == 0 or kv_len == 0:
        return _empty(q)
    fn = _BACKENDS[name]
    if not causal:
        return fn(q, k, v, False, scale)
    if kv_len < q_len:
        return _causal_fewer_keys(fn, q, k, v, scale)
    if kv_len == q_len or name in _BOTTOM_RIGHT_NATIVE:
        return fn(q, k, v, True, scale)
    # top-left kernel, kv_len > q_len: the first kv_len - q_len keys are visible to every query
    prefix = kv_len - q_len
    out1, lse1 = fn(q, k[:, :, :prefix], v[:, :, :prefix], False, scale)
    out2, lse2 = fn(q, k[:, :, prefix:], v[:, :, prefix:], True, scale)
    out, lse = merge(out1, lse1, out2, lse2)
    return out.to(q.dtype), lse


def _causal_fewer_keys(fn: Backend, q, k, v, scale):
    """Bottom-right causal with kv_len < q_len: the first q_len - kv_len queries see nothing."""
    blind = q.shape[2] - k.shape[2]
    out_blind, lse_blind = _empty(q[:, :, :blind])
    out, lse = fn(q[:, :, blind:], k, v, True, scale)
    return torch.cat([out_blind, out], dim=2), torch.cat([lse_blind, lse], dim=2)


def _empty(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.zeros_like(q)
    lse = torch.full(q.shape[:3], -math.inf, dtype=torch.float32, device=q.device)
    return out, lse


def _check_shapes(q, k, v) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention expects 4-D (batch, heads, seq, dim) tensors, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"key and value shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"query {tuple(q.shape)} and key {tuple(k.shape)} disagree in batch or head dim")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(b, kv_heads, s, d) -> (b, kv_heads * n_rep, s, d), each KV head serving its query group."""
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


@register_backend("naive")
def _naive(q, k, v, causal: bool, scale: float):
    rep = q.shape[1] // k.shape[1]
    kf, vf = repeat_kv(k, rep).float(), repeat_kv(v, rep).float()
    scores = torch.matmul(q.float(), kf.transpose(-1, -2)) * scale
    if causal:
        q_len, kv_len = q.shape[2], k.shape[2]
        qi = torch.arange(q_len, device=q.device)[:, None]
        kj = torch.arange(kv_len, device=q.device)[None, :]
        scores = scores.masked_fill(kj > qi + (kv_len - q_len), -math.inf)
    lse = torch.logsumexp(scores, dim=-1)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    probs = torch.exp(scores - safe[..., None])
    out = torch.matmul(probs, vf)
    return out.to(q.dtype), lse


@register_backend("torch_flash")
def _torch_flash(q, k, v, causal: bool, scale: float):
    rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, rep), repeat_kv(v, rep)
    if q.is_cuda:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, None, True, 0.0, causal, scale=scale)[:2]
        return out, lse[:, :, : q.shape[2]].float()
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, causal, attn_mask=None, scale=scale)
    return out, lse.float()


def _flash_attn_func():
    try:  # imported here so that flash-attn (the optional [gpu] extra) stays optional
        from flash_attn import flash_attn_func  # type: ignore[import-not-found]
    except Exception:  # not installed, or built for another torch/CUDA
        return None
    return flash_attn_func


@register_backend("flash_attn", available=lambda: _flash_attn_func() is not None)
def _flash_attn(q, k, v, causal: bool, scale: float):
    fn = _flash_attn_func()
    if fn is None:
        raise RuntimeError("attention backend 'flash_attn' was requested but flash-attn is not importable; "
                           "install the [gpu] extra or use APB_ATTN_BACKEND=torch_flash")
    # flash-attn takes (batch, seq, heads, dim), handles GQA itself, and aligns causal bottom-right
    out, lse, _ = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale,
                     causal=causal, return_attn_probs=True)
    return out.transpose(1, 2), lse.float()
