"""Attention that returns its log-sum-exp, on every backend, with one mask convention.

Every distributed method here merges partial attentions, so a kernel is only usable if it
returns a true LSE. This module owns the choice of kernel and hides two differences between
them:

* causal alignment: with more keys than queries, the causal mask is *bottom-right* aligned
  (query ``i`` sees keys ``0 .. kv_len - q_len + i``). flash-attn does this natively; torch's
  kernels are top-left aligned, so for them a bottom-right call is split into a non-causal
  part (the keys every query sees) and a square causal part, merged by LSE;
* grouped-query attention: flash-attn, ``naive`` and each of torch's kernels that a one-time
  probe finds takes them (:func:`_native_gqa`; torch's CPU flash kernel does) take fewer KV heads
  as they are; K/V are repeated (a copy)
  only for a torch kernel that cannot.

Shapes: ``q`` is (batch, heads, q_len, dim), ``k`` is (batch, kv_heads, kv_len, dim) and ``v``
is (batch, kv_heads, kv_len, v_dim) with ``heads % kv_heads == 0``; ``v_dim`` may differ from
``dim`` (multi-head latent attention: DeepSeek-V3). Returns ``out`` (batch, heads, q_len, v_dim)
in ``q``'s dtype and ``lse`` (batch, heads, q_len) in float32. A query that sees no key gets
``out = 0`` and ``lse = -inf`` so that merging it with anything is the identity.

Beyond the scale, two things a layer may do to its scores (both keep the LSE a true one, so
every merge of partials stays exact):

* ``softcap``: scores become ``softcap * tanh(scores / softcap)`` before the softmax (Gemma 2);
  the LSE is that of the capped scores. Backends without it (``torch_flash``: torch's kernels
  have no soft-capping) hand the call to ``naive``, which is exact and returns a true LSE;
* ``sinks``: one logit per query head added to the softmax denominator (gpt-oss), i.e. one more
  key whose value is zero. A sink belongs to each query's softmax once, however its keys are
  split over calls and hosts, so it joins the one call that holds the query's *own* key: the
  causal call (bottom-right, query ``i`` is key ``kv_len - q_len + i``). Non-causal calls hold
  only keys before their queries (that is how every caller here uses them) and ignore it, so
  passing the same ``sinks`` to every call adds each exactly once.

Sliding windows (``window=w``): a query sees only the keys less than ``w`` positions before it
(transformers' convention: key ``j`` is visible to query ``i`` when ``i - w < j <= i``). Without
positions, the query and key indices are those of the bottom-right causal alignment; with
``q_pos``/``k_pos`` (the tokens' positions in the prompt), visibility is decided by positions
alone (``k_pos <= q_pos`` and ``k_pos > q_pos - w``), whatever order the keys come in. flash-attn
applies an aligned window itself (``window_size``), so a sliding layer hands it its tiles without
positions wherever they are aligned (``apb.methods.sliding.aligned``: its own rows and the halo in
position order). Every other windowed or position-masked call runs one of torch's kernels with the
mask added to its scores (:func:`_masked`: the CPU flash kernel, or on CUDA the memory-efficient
one), where a one-time probe finds it agrees with ``naive``; else, and for softcapped calls,
``naive`` with the mask. Both bound their memory by row chunks.

flash-attn takes float16 and bfloat16 only (anything else is refused, naming the fix), and writes
``lse = +inf`` for a row that sees no key; its LSE is turned into this module's ``-inf`` before
anything merges it.

Backends that need equal key and value head sizes (all but ``naive``) get zero-padded inputs:
zeros appended to ``v`` (or to ``q`` and ``k``, which adds nothing to ``q . k``) and the output
cut back; exact.

Backends, chosen by :func:`select_backend` (``APB_ATTN_BACKEND`` or :func:`force_backend`
override the automatic choice):

=================  ==========================================================
``flash_attn``     flash-attn 2, CUDA tensors in fp16/bf16 (the ``[gpu]`` extra)
``torch_flash``    ``aten._scaled_dot_product_flash_attention_for_cpu`` on CPU; on CUDA
                   in fp16/bf16 (head size <= 256, a multiple of 8) cuDNN's attention,
                   else ``..._flash_attention``, whichever first is probed to run and
                   agree; else ``..._efficient_attention``
``naive``          explicit softmax in float32; the reference for tests
=================  ==========================================================
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Callable, Iterator

import torch

from apb.kernels.merge import merge, merge_

#: ``fn(q, k, v, causal, scale)``, plus ``softcap`` as a sixth argument for backends in ``_SOFTCAP_NATIVE``
Backend = Callable[..., tuple[torch.Tensor, torch.Tensor]]

_BACKENDS: dict[str, Backend] = {}
# per backend: whether it can run in this environment (its library imports)
_AVAILABLE: dict[str, Callable[[], bool]] = {}
# backends whose causal flag is already bottom-right aligned when keys outnumber queries
_BOTTOM_RIGHT_NATIVE = {"naive", "flash_attn"}
# backends that apply a softcap themselves; the others' softcapped calls go to "naive"
_SOFTCAP_NATIVE = {"naive", "flash_attn"}
# backends that take a value head size different from the key's; the others get padded inputs
_UNEQUAL_DIMS_NATIVE = {"naive"}
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
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    window: int | None = None,
    q_pos: torch.Tensor | None = None,
    k_pos: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of ``q`` over ``k``/``v``; returns ``(out, lse)`` (see module doc).

    ``softcap`` caps the scores; ``sinks`` (heads,) adds one logit per query head to the
    denominator of the rows whose own key is in this call (causal calls only). ``window``
    restricts each query to its last ``window`` positions; ``q_pos``/``k_pos`` (1-D) make the mask
    one of positions (see module doc).
    """
    _check_shapes(q, k, v, sinks)
    if q_pos is not None or k_pos is not None or window is not None:
        return _positional(q, k, v, causal, scale, backend, softcap, sinks, window, q_pos, k_pos)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q_len, kv_len = q.shape[2], k.shape[2]
    name = backend or select_backend(q)
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; valid: {sorted(_BACKENDS)}")
    if softcap is not None and name not in _SOFTCAP_NATIVE:
        name = "naive"
    if q_len == 0 or kv_len == 0:
        return _empty(q, v.shape[-1])
    fn = _kernel(name, scale, softcap)
    v_dim = v.shape[-1]
    if v_dim != q.shape[-1] and name not in _UNEQUAL_DIMS_NATIVE:
        q, k, v = _pad_to_equal_dims(q, k, v)
    if not causal:
        out, lse = fn(q, k, v, False)
    elif kv_len < q_len:
        out, lse = _causal_fewer_keys(fn, q, k, v)
    elif q_len == 1:  # bottom-right, one query (a decode step) sees every key: no split, no merge
        out, lse = fn(q, k, v, False)
    elif kv_len == q_len or name in _BOTTOM_RIGHT_NATIVE:
        out, lse = fn(q, k, v, True)
    else:
        # top-left kernel, kv_len > q_len: the first kv_len - q_len keys are visible to every query
        prefix = kv_len - q_len
        out1, lse1 = fn(q, k[:, :, :prefix], v[:, :, :prefix], False)
        out2, lse2 = fn(q, k[:, :, prefix:], v[:, :, prefix:], True)
        out, lse = merge(out1, lse1, out2, lse2)
        out = out.to(q.dtype)
    out = out[..., :v_dim]
    if sinks is not None and causal:
        out, lse = _add_sinks(out, lse, sinks, first=max(0, q_len - kv_len))
    return out, lse


def _positional(q, k, v, causal, scale, backend, softcap, sinks, window, q_pos, k_pos):
    """A windowed call, or one masked by positions: see :func:`attention`."""
    if (q_pos is None) != (k_pos is None):
        raise ValueError("give both q_pos and k_pos (the positions of the queries and of the keys), or neither")
    if window is not None and window < 1:
        raise ValueError(f"a sliding window must hold at least one key, got window={window}")
    q_len, kv_len = q.shape[2], k.shape[2]
    if q_pos is None:
        if not causal:
            raise ValueError("a window without positions is aligned as a causal call: pass causal=True, or "
                             "q_pos and k_pos")
        if window is not None and q_len == 1:  # one query (a decode step): its last `window` keys, no mask
            return attention(q, k[:, :, -window:], v[:, :, -window:], True, scale, backend, softcap, sinks)
        if window is not None and windows_natively(q, v.shape[-1], backend):
            return _flash_attn_windowed(q, k, v, scale, softcap, sinks, window)
        q_pos = torch.arange(kv_len - q_len, kv_len, device=q.device)
        k_pos = torch.arange(kv_len, device=q.device)
    if tuple(q_pos.shape) != (q_len,) or tuple(k_pos.shape) != (kv_len,):
        raise ValueError(f"q_pos and k_pos must hold one position per query and key: {tuple(q_pos.shape)} for "
                         f"{q_len} queries, {tuple(k_pos.shape)} for {kv_len} keys")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if q_len == 0 or kv_len == 0:
        return _empty(q, v.shape[-1])
    visible = _window_mask(q_pos.to(q.device), k_pos.to(q.device), window)
    # flash-attn takes no mask of positions: its calls by position go to torch's masked kernel too
    if softcap is None and (backend or select_backend(q)) in ("torch_flash", "flash_attn") and \
            _masked_ok(q.device, q.dtype):
        out, lse = _masked(q, k, v, scale, visible)
    else:
        out, lse = _naive(q, k, v, False, scale, softcap, visible=visible)
    if sinks is not None and causal:
        out, lse = _add_sinks(out, lse, sinks, first=0)
    return out, lse


def _masked(q, k, v, scale: float, visible):
    """A call masked by ``visible`` (see :func:`_window_mask`) on one of torch's kernels that takes
    an additive mask (:func:`_masked_kernel`): on this CPU 2.1-6.6x faster than ``naive`` on a
    sliding layer's attention (session 29, ``docs/results.md``), the same to float32 rounding. Rows
    in chunks, so the mask stays within ``_NAIVE_CHUNK`` elements; a row that sees no key comes
    back empty (``out = 0``, ``lse = -inf``) whatever the kernel made of it."""
    kernel = _masked_kernel(q.device)
    v_dim = v.shape[-1]
    if v_dim != q.shape[-1]:
        q, k, v = _pad_to_equal_dims(q, k, v)
    q, k, v = _grouped(q, k, v, kernel)
    q_len, kv_len = q.shape[2], k.shape[2]
    rows = max(1, _NAIVE_CHUNK // max(1, kv_len))
    outs, lses = [], []
    for s in range(0, q_len, rows):
        seen = visible(slice(s, s + rows))
        mask = torch.zeros(seen.shape, dtype=q.dtype, device=q.device).masked_fill_(~seen, -math.inf)
        out, lse = _masked_sdpa(q[:, :, s:s + rows], k, v, mask, scale, kernel)
        seen = seen.any(-1)
        outs.append(out[..., :v_dim].masked_fill(~seen[:, None], 0.0))
        lses.append(lse.masked_fill(~seen, -math.inf))
    return torch.cat(outs, 2), torch.cat(lses, 2)


def _masked_kernel(device: torch.device) -> str:
    """torch's kernel that takes an additive mask and returns its LSE on ``device``: the CPU flash
    kernel, or on CUDA the memory-efficient one (its fused kernels take no mask)."""
    return "cpu" if device.type == "cpu" else "efficient"


def _masked_sdpa(q, k, v, mask, scale: float, kernel: str):
    """One call of ``kernel`` (:func:`_masked_kernel`) under ``mask`` (rows, keys) in ``q``'s dtype."""
    if kernel == "cpu":
        return _cpu_flash(q, k, v, False, scale, mask)
    # the memory-efficient kernel reads its bias in rows aligned to 16 elements (torch's own sdpa
    # pads a mask the same way before handing it over) and returns an LSE padded to 32 rows
    rows, keys = mask.shape
    padded = mask.new_zeros(rows, -(-keys // 16) * 16)
    padded[:, :keys] = mask
    bias = padded[:, :keys].expand(q.shape[0], q.shape[1], rows, keys)
    out, lse = _efficient_with_bias(q, k, v, bias, scale)
    return out, lse[:, :, :rows].float()


def _efficient_with_bias(q, k, v, bias, scale: float):
    return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, 0.0, False, scale=scale)[:2]


# per (device, dtype): whether torch's masked kernel there agrees with the naive softmax
_MASKED_OK: dict[tuple[str, torch.dtype], bool] = {}


def _masked_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """Probed once per device and dtype against ``naive``, output and LSE, on a call masked by
    positions with keys out of order and rows that see no key: a kernel that is missing, refuses
    the mask, or disagrees is never used, and those calls stay on ``naive`` (exact, slower)."""
    key = (str(device), dtype)
    if key not in _MASKED_OK:
        g = torch.Generator().manual_seed(0)
        q = torch.randn(1, 4, 37, 64, generator=g).to(device, dtype)
        k, v = (torch.randn(1, 2, 45, 64, generator=g).to(device, dtype) for _ in range(2))
        k_pos = torch.randperm(45, generator=g)
        k_pos[(k_pos >= 10) & (k_pos <= 20)] += 100  # keys no query reaches: queries 15-20 see none
        visible = _window_mask(torch.arange(8, 45).to(device), k_pos.to(device), 6)
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        try:
            out, lse = _masked(q, k, v, 0.125, visible)
            ref, ref_lse = _naive(q, k, v, False, 0.125, visible=visible)
            seen = torch.isfinite(ref_lse)
            ok = bool(torch.equal(torch.isneginf(lse), ~seen) and torch.allclose(out.float(), ref.float(), atol=tol)
                      and torch.allclose(lse[seen], ref_lse[seen], atol=tol))
        except (RuntimeError, AttributeError, TypeError, NotImplementedError):
            ok = False
        _MASKED_OK[key] = ok
    return _MASKED_OK[key]


def windows_natively(q: torch.Tensor, v_dim: int, backend: str | None = None) -> bool:
    """Whether an aligned windowed call (no positions) with these queries runs a kernel that applies
    the window itself and skips what it hides (flash-attn's ``window_size``), rather than one that
    computes every key it is given under a mask: callers may then hand it long calls."""
    return (backend or select_backend(q)) == "flash_attn" and q.shape[-1] == v_dim


def _window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None):
    """``visible(rows)``: the (len(rows), kv_len) mask of what queries ``rows`` see."""
    def visible(rows: slice) -> torch.Tensor:
        d = q_pos[rows, None] - k_pos[None, :]
        return (d >= 0) if window is None else (d >= 0) & (d < window)
    return visible


def _kernel(name: str, scale: float, softcap: float | None):
    """Backend ``name`` as ``fn(q, k, v, causal)``."""
    fn = _BACKENDS[name]
    if softcap is None:
        return lambda q, k, v, causal: fn(q, k, v, causal, scale)
    return lambda q, k, v, causal: fn(q, k, v, causal, scale, float(softcap))


def _causal_fewer_keys(fn, q, k, v):
    """Bottom-right causal with kv_len < q_len: the first q_len - kv_len queries see nothing."""
    blind = q.shape[2] - k.shape[2]
    out_blind, lse_blind = _empty(q[:, :, :blind], v.shape[-1])
    out, lse = fn(q[:, :, blind:], k, v, True)
    return torch.cat([out_blind, out], dim=2), torch.cat([lse_blind, lse], dim=2)


def _pad_to_equal_dims(q, k, v):
    """Zero-pad ``v``, or ``q`` and ``k``, to one head size: ``q . k`` and the weighted sum of the
    first ``v_dim`` value columns are unchanged (the scale is already fixed)."""
    d, dv = q.shape[-1], v.shape[-1]
    if dv < d:
        return q, k, torch.nn.functional.pad(v, (0, d - dv))
    pad = (0, dv - d)
    return torch.nn.functional.pad(q, pad), torch.nn.functional.pad(k, pad), v


def _add_sinks(out, lse, sinks, first: int):
    """Merge rows ``first:`` with one more partial, ``out = 0`` and ``lse = sink`` of their head."""
    rows = slice(first, None)
    sink = sinks.float().to(lse.device).view(1, -1, 1).expand_as(lse[:, :, rows])
    o, l = merge(out[:, :, rows], lse[:, :, rows], torch.zeros_like(out[:, :, rows]), sink)
    return torch.cat([out[:, :, :first], o.to(out.dtype)], 2), torch.cat([lse[:, :, :first], l], 2)


def _empty(q: torch.Tensor, v_dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    out = q.new_zeros(*q.shape[:3], q.shape[-1] if v_dim is None else v_dim)
    lse = torch.full(q.shape[:3], -math.inf, dtype=torch.float32, device=q.device)
    return out, lse


def _check_shapes(q, k, v, sinks) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention expects 4-D (batch, heads, seq, dim) tensors, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"key and value differ in batch, heads or length: {tuple(k.shape)} vs {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"query {tuple(q.shape)} and key {tuple(k.shape)} disagree in batch or head dim")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if sinks is not None and tuple(sinks.shape) != (q.shape[1],):
        raise ValueError(f"sinks must hold one logit per query head, shape ({q.shape[1]},), got {tuple(sinks.shape)}")


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(b, kv_heads, s, d) -> (b, kv_heads * n_rep, s, d), each KV head serving its query group."""
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


#: score elements per naive chunk (float32): bounds its memory at long lengths (softcap fallback)
_NAIVE_CHUNK = 1 << 26


@register_backend("naive")
def _naive(q, k, v, causal: bool, scale: float, softcap: float | None = None, visible=None):
    """``visible(rows)``, when given, is the mask of the keys rows ``rows`` see (``causal`` unused).

    Grouped-query heads are folded into the rows of their KV head, so K/V are never repeated."""
    kf, vf = k.float(), v.float()
    q_len, kv_len = q.shape[2], k.shape[2]
    rows = max(1, _NAIVE_CHUNK // max(1, q.shape[0] * q.shape[1] * kv_len))
    parts = [_naive_rows(q[:, :, s:s + rows], kf, vf, causal, scale, softcap, s + kv_len - q_len,
                         None if visible is None else visible(slice(s, s + rows)))
             for s in range(0, q_len, rows)]
    return torch.cat([o for o, _ in parts], 2).to(q.dtype), torch.cat([l for _, l in parts], 2)


def _naive_rows(q, kf, vf, causal, scale, softcap, offset, visible=None):
    """Rows of the naive softmax; row ``i`` sees keys ``0 .. offset + i`` when causal, or ``visible``."""
    b, h, r, _ = q.shape
    g, rep = kf.shape[1], h // kf.shape[1]
    # (b, g, rep * r, d): each KV head's query group as one matrix; a (r, kv) mask broadcasts over rep
    scores = torch.matmul(q.float().reshape(b, g, rep * r, -1), kf.transpose(-1, -2)) * scale
    scores = scores.view(b, g, rep, r, kf.shape[2])
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if visible is not None:
        scores = scores.masked_fill(~visible, -math.inf)
    elif causal:
        qi = torch.arange(r, device=q.device)[:, None]
        kj = torch.arange(kf.shape[2], device=q.device)[None, :]
        scores = scores.masked_fill(kj > qi + offset, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    probs = torch.exp(scores - safe[..., None]).view(b, g, rep * r, kf.shape[2])
    return torch.matmul(probs, vf).view(b, h, r, vf.shape[-1]), lse.view(b, h, r)


@register_backend("torch_flash")
def _torch_flash(q, k, v, causal: bool, scale: float):
    kernel = _torch_kernel(q)
    if kernel == "cpu" and not causal and _one_row_grouped(q, k):
        return _grouped_row(q, k, v, scale)
    while kernel in _FUSED:
        try:
            return _torch_sdpa(*_grouped(q, k, v, kernel), causal, scale, kernel)
        except RuntimeError:  # a shape this kernel does not take: the next one that runs here
            kernel = _next_kernel(q, kernel)
    return _torch_sdpa(*_grouped(q, k, v, kernel), causal, scale, kernel)


def _one_row_grouped(q, k) -> bool:
    """One float32 or bfloat16 query row (a decode step) with large query groups, on CPU:
    :func:`_grouped_row` reads each KV head once for its whole group, where torch's CPU flash
    kernel reads it once per query head. At a group of 4-8 and a head size of 128-256 it was the
    faster on every shape of the recorded runs: over 2K-32K keys, 1.2-6.1x in float32 and
    1.4-4.3x in bfloat16 (against the kernel given the row twice). At a head size of 64 it is so
    only in bfloat16 with 12 or more query heads (Llama-3.2-1B's 32 over 8, Qwen2.5-0.5B's 14 over
    2: 1.05-1.90x); float32 there gains only at long caches (0.84-1.39x at 2K-8K keys, 1.6-2.7x at
    32K). Smaller groups or fewer heads ranged from a third of the kernel's speed to 2.2x, so they
    keep the kernel (docs/results/decode-s37/kernel_f32.txt, kernel_grouped.txt;
    docs/results/decode-s38/kernel_d64.txt)."""
    if q.shape[2] != 1 or q.dtype not in (torch.float32, torch.bfloat16) or q.shape[1] < 4 * k.shape[1]:
        return False
    return q.shape[-1] >= 128 or (q.dtype == torch.bfloat16 and q.shape[-1] >= 64 and q.shape[1] >= 12)


#: keys per block of :func:`_grouped_row` in bfloat16: a block's float32 copy stays in cache
_ROW_BLOCK = 1024


def _grouped_row(q, k, v, scale: float):
    """One query row over every key (non-causal): ``naive``'s rows without a mask, each KV head's
    query group as one float32 matrix. A bfloat16 K/V is made float32 a block of keys at a time (a
    copy of the whole cache would cost more than the kernel call it replaces); the blocks'
    partials merge by LSE."""
    block = k.shape[2] if k.dtype == torch.float32 else _ROW_BLOCK
    out = lse = None
    for start in range(0, k.shape[2], block):
        part, part_lse = _naive_rows(q, k[:, :, start:start + block].float(), v[:, :, start:start + block].float(),
                                     False, scale, None, 0)
        if out is None:
            out, lse = part, part_lse
        else:
            merge_(out, lse, part, part_lse)
    return out.to(q.dtype), lse


def _grouped(q, k, v, kernel: str):
    """``q, k, v`` as ``kernel`` takes them: K/V repeated per query head only where it needs it."""
    if k.shape[1] != q.shape[1] and not _native_gqa(q.device.type, kernel):
        rep = q.shape[1] // k.shape[1]
        k, v = repeat_kv(k, rep), repeat_kv(v, rep)
    return q, k, v


#: torch's half-precision CUDA kernels that must pass :func:`_fused_ok` first, fastest first:
#: cuDNN's fused attention (what ``F.scaled_dot_product_attention``, and so transformers' ``sdpa``,
#: runs on a Hopper GPU: 56 ms a layer where torch's flash kernel took 104 and its memory-
#: efficient one about twice that, Llama-3.1-8B's heads at 64K tokens on an H200), then torch's
#: flash kernel (FlashAttention-2, sm80 and newer). The memory-efficient kernel runs the rest.
_FUSED = ("cudnn", "flash")


def _torch_kernel(q: torch.Tensor) -> str:
    """Which of torch's kernels runs ``q``'s call: the first of :data:`_FUSED` that runs here and
    agrees with the memory-efficient kernel, for fp16/bf16 with a head size they take (<= 256, a
    multiple of 8); else the memory-efficient kernel (float32, other head sizes, older GPUs)."""
    if not q.is_cuda:
        return "cpu"
    d = q.shape[-1]
    if q.dtype in (torch.float16, torch.bfloat16) and d <= 256 and d % 8 == 0:
        return _next_kernel(q, None)
    return "efficient"


def _next_kernel(q: torch.Tensor, after: str | None) -> str:
    """The first kernel of :data:`_FUSED` after ``after`` (None: from the start) that passes its
    probe on ``q``'s device and dtype, else the memory-efficient one."""
    later = _FUSED if after is None else _FUSED[_FUSED.index(after) + 1:]
    return next((k for k in later if _fused_ok(q.device, q.dtype, k)), "efficient")


def _torch_sdpa(q, k, v, causal: bool, scale: float, kernel: str):
    """One call of torch's ``kernel`` (see :func:`_torch_kernel`). Only square causal calls reach
    here (attention() splits the others), so the fused kernels' bottom-right alignment and
    torch's top-left one agree."""
    if kernel == "cudnn":
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False,
                                                                      scale=scale)[:2]
        return out, lse.reshape(q.shape[:3]).float()  # (b, h, q_len, 1) -> (b, h, q_len)
    if kernel == "flash":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[:2]
        return out, lse.float()
    if kernel == "efficient":
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, None, True, 0.0, causal, scale=scale)[:2]
        return out, lse[:, :, : q.shape[2]].float()
    return _cpu_flash(q, k, v, causal, scale)


def _cpu_flash(q, k, v, causal: bool, scale: float, mask: torch.Tensor | None = None):
    """torch's CPU flash kernel, under an additive ``mask`` (rows, keys) when given."""
    if q.shape[2] == 1 and q.dtype == torch.bfloat16:
        # it runs one bfloat16 query row 2.2-3.4x slower than two, on every shape measured
        # (docs/results/decode-s37/kernel.txt): a decode step's row is sent twice, the copy dropped.
        # Row 0 sees the same keys either way (top-left causal: key 0 alone)
        twice = None if mask is None else mask.expand(2, -1).contiguous()
        out, lse = _cpu_flash(q.expand(-1, -1, 2, -1).contiguous(), k, v, causal, scale, twice)
        return out[:, :, :1], lse[:, :, :1]
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=mask,
                                                                         scale=scale)
    return out, lse.float()


# per (device, dtype, kernel of _FUSED): whether it runs here and agrees with the memory-efficient one
_FUSED_OK: dict[tuple[str, torch.dtype, str], bool] = {}


def _fused_ok(device: torch.device, dtype: torch.dtype, kernel: str) -> bool:
    """Probed once per device, dtype and kernel against torch's memory-efficient kernel, output and
    LSE, causal and not, at an odd length: a kernel that is missing (cuDNN's attention before
    Ampere, or not built in; FlashAttention-2 before sm80), refuses, or returns its statistics in
    another convention is never used (its LSE feeds every merge of partial attentions)."""
    key = (str(device), dtype, kernel)
    if key not in _FUSED_OK:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 4, 37, 64, generator=g).to(device, dtype) for _ in range(3))
        ok = True
        try:
            for causal in (True, False):
                out, lse = _torch_sdpa(q, k, v, causal, 0.125, kernel)
                ref, ref_lse = _torch_sdpa(q, k, v, causal, 0.125, "efficient")
                ok = ok and bool(torch.allclose(out.float(), ref.float(), atol=2e-2) and
                                 torch.allclose(lse, ref_lse, atol=2e-2))
        except (RuntimeError, AttributeError):
            ok = False
        _FUSED_OK[key] = ok
    return _FUSED_OK[key]


# per (device type, torch kernel): whether it takes fewer KV heads than query heads itself
_GQA_NATIVE: dict[tuple[str, str], bool] = {}


def _native_gqa(device_type: str, kernel: str = "cpu") -> bool:
    """Whether torch's ``kernel`` on ``device_type`` does grouped-query attention without repeated
    K/V.

    Probed once per kernel against the repeated call (torch >= 2.5's CPU flash kernel does; a
    kernel that raises or differs does not), so every torch in the supported range gets the
    copy-free call where it exists and the repeat where it does not; ``make gpu-check`` records
    the answers for the CUDA kernels (``kernels.probes``)."""
    key = (device_type, kernel)
    if key not in _GQA_NATIVE:
        g = torch.Generator().manual_seed(0)
        dtype = torch.bfloat16 if kernel in ("flash", "cudnn") else torch.float32
        q, k, v = (torch.randn(1, h, 5, 8, generator=g).to(device_type, dtype) for h in (4, 2, 2))
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
        try:
            out, lse = _torch_sdpa(q, k, v, True, 0.35, kernel)
            ref, ref_lse = _torch_sdpa(q, repeat_kv(k, 2), repeat_kv(v, 2), True, 0.35, kernel)
            _GQA_NATIVE[key] = bool(torch.allclose(out.float(), ref.float(), atol=tol) and
                                    torch.allclose(lse, ref_lse, atol=tol))
        except RuntimeError:
            _GQA_NATIVE[key] = False
    return _GQA_NATIVE[key]


def _flash_attn_func():
    try:  # imported here so that flash-attn (the optional [gpu] extra) stays optional
        from flash_attn import flash_attn_func  # type: ignore[import-not-found]
    except Exception:  # not installed, or built for another torch/CUDA
        return None
    return flash_attn_func


def _flash_inputs(q: torch.Tensor):
    """flash-attn itself, once ``q`` is known to be what it takes."""
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"attention backend 'flash_attn' takes float16 or bfloat16 tensors, got {q.dtype}: set "
                         "model.dtype to bfloat16 (or float16), or use APB_ATTN_BACKEND=torch_flash")
    fn = _flash_attn_func()
    if fn is None:
        raise RuntimeError("attention backend 'flash_attn' was requested but flash-attn is not importable; "
                           "install the [gpu] extra or use APB_ATTN_BACKEND=torch_flash")
    return fn


def _flash_lse(lse: torch.Tensor) -> torch.Tensor:
    """flash-attn's LSE in this module's convention: its kernel writes ``+inf`` for a row that sees
    no key (a window with fewer keys than queries), which would turn every merge into NaN; such a
    row is ``-inf`` here, the merge's identity (its output is already 0)."""
    lse = lse.float()
    return lse.masked_fill(lse == math.inf, -math.inf)


def _flash_attn_windowed(q, k, v, scale, softcap, sinks, window: int):
    """flash-attn's own sliding window (bottom-right aligned, as transformers' is): ``window - 1``
    keys to the left of each query's own."""
    fn = _flash_inputs(q)
    extra = {} if softcap is None else {"softcap": softcap}
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out, lse, _ = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale, causal=True,
                     window_size=(window - 1, 0), return_attn_probs=True, **extra)
    out, lse = out.transpose(1, 2), _flash_lse(lse)
    if sinks is not None:
        out, lse = _add_sinks(out, lse, sinks, first=max(0, q.shape[2] - k.shape[2]))
    return out, lse


@register_backend("flash_attn", available=lambda: _flash_attn_func() is not None)
def _flash_attn(q, k, v, causal: bool, scale: float, softcap: float | None = None):
    fn = _flash_inputs(q)
    # softcap only when set: flash-attn before 2.6 has no such argument, and uncapped calls need none
    extra = {} if softcap is None else {"softcap": softcap}
    # flash-attn takes (batch, seq, heads, dim), handles GQA itself, and aligns causal bottom-right
    try:
        out, lse, _ = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale,
                         causal=causal, return_attn_probs=True, **extra)
    except TypeError as e:
        if not extra:
            raise
        raise RuntimeError(f"this flash-attn has no attention softcap ({e}); install flash-attn >= 2.6, or use "
                           "APB_ATTN_BACKEND=naive for models with attn_logit_softcapping") from e
    return out.transpose(1, 2), _flash_lse(lse)
