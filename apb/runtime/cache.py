"""KV caches: this host's part, the gather to the decode host, and conversion to a HF cache.

A :class:`KVCache` stores all layers stacked, ``keys``/``values`` of shape
(layers, kv_heads, tokens, head_dim), with each token's global position (a multi-head latent
attention model stores what transformers caches for it instead: its latent and rotated-key
parts, one "head" each, of different sizes; see :mod:`apb.model.mla`). Gathering sends every
host's part to the decode host in one variable-length gather, orders tokens by position and
checks that every position 0..n-1 appears exactly once; the decode host receives every part
straight into its place in one preallocated buffer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

try:  # transformers' stand-in for a layer that keeps no cache (KV sharing, layers without attention)
    from transformers.cache_utils import DummyLayer as _DUMMY
except ImportError:  # a transformers without one has no such layers
    _DUMMY = ()

from apb.parallel.comm import Comm


@dataclass
class KVCache:
    positions: torch.Tensor  # (tokens,) long
    keys: torch.Tensor  # (layers, kv_heads, tokens, head_dim)
    values: torch.Tensor
    #: per layer (kv_heads, key width, value width) where the layers differ (Gemma 4's global
    #: layers have wider heads): ``keys``/``values`` are then zero-padded to the largest, and
    #: :meth:`layer` cuts each layer back to its own; None where every layer has one shape
    shapes: tuple[tuple[int, int, int], ...] | None = None

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``i``'s (k, v) in its own shape: (kv_heads, tokens, width), views."""
        if self.shapes is None:
            return self.keys[i], self.values[i]
        heads, dk, dv = self.shapes[i]
        return self.keys[i, :heads, :, :dk], self.values[i, :heads, :, :dv]

    @property
    def n_tokens(self) -> int:
        return int(self.positions.numel())

    @classmethod
    def from_layers(cls, positions: torch.Tensor, kv: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> "KVCache":
        """From per-layer (k, v) of shape (1, kv_heads, tokens, head_dim)."""
        layers = sorted(kv)
        if layers != list(range(len(layers))):
            missing = sorted(set(range(max(layers, default=-1) + 1)) - set(layers))
            raise ValueError(f"cache is missing layers {missing or [len(layers)]} (got {layers}): those layers never "
                             "called the attention, so they are not softmax attention; "
                             "apb.model.features.check_supported should have refused this model")
        ks, vs = [kv[i][0][0] for i in layers], [kv[i][1][0] for i in layers]
        shapes = tuple((k.shape[0], k.shape[-1], v.shape[-1]) for k, v in zip(ks, vs))
        if len(set(shapes)) <= 1:
            return cls(positions.to(torch.long), torch.stack(ks), torch.stack(vs))
        n = ks[0].shape[1]
        heads, dk, dv = (max(s[j] for s in shapes) for j in range(3))
        keys, values = ks[0].new_zeros(len(ks), heads, n, dk), vs[0].new_zeros(len(vs), heads, n, dv)
        for i, (k, v) in enumerate(zip(ks, vs)):
            keys[i, :k.shape[0], :, :k.shape[-1]] = k
            values[i, :v.shape[0], :, :v.shape[-1]] = v
        return cls(positions.to(torch.long), keys, values, shapes)

    def sorted(self) -> "KVCache":
        order = torch.argsort(self.positions)
        return KVCache(self.positions[order], self.keys[:, :, order], self.values[:, :, order], self.shapes)


def position_runs(positions: torch.Tensor) -> list[tuple[int, int]]:
    """``[lo, hi)`` ranges of local rows whose positions are consecutive (a host's chunks)."""
    p = positions.tolist()
    runs, lo = [], 0
    for i in range(1, len(p) + 1):
        if i == len(p) or p[i] != p[i - 1] + 1:
            runs.append((lo, i))
            lo = i
    return runs


def gather_cache(local: KVCache, comm: Comm, dst: int = 0) -> KVCache | None:
    """Send every host's cache to ``dst``; returns the whole cache, in position order, on ``dst``.

    The positions travel first, so ``dst`` can check that every position 0..n-1 comes exactly once
    and allocate the whole cache once, token-major; then each run of consecutive positions of a
    host is one message, received straight into its place. The returned keys and values are views
    of that one buffer: no concatenation or sort copies on the decode host.
    """
    pos = comm.gather_varlen(local.positions.to(local.keys.device), dst=dst, dim=0)
    layers, heads, t, dk = local.keys.shape
    dv = local.values.shape[-1]
    # keys and values side by side in the last dim (their sizes may differ: an MLA layer's latent
    # pair); token-major, so a run of positions is one contiguous slice
    packed = local.keys.new_empty(t, layers, heads, dk + dv)
    packed[..., :dk] = local.keys.permute(2, 0, 1, 3)
    packed[..., dk:] = local.values.permute(2, 0, 1, 3)
    mine = position_runs(local.positions)
    if pos is None:  # not the decode host: send each run
        comm.p2p([(dst, packed[lo:hi]) for lo, hi in mine], [], op="gather")
        return None
    cpu = [p.cpu() for p in pos]
    n = sum(int(p.numel()) for p in cpu)
    every = torch.sort(torch.cat(cpu)).values if n else torch.zeros(0, dtype=torch.long)
    if not torch.equal(every, torch.arange(n)):
        comm.p2p([], [(r, packed.new_empty(hi - lo, layers, heads, dk + dv)) for r, p in enumerate(cpu)
                      if r != comm.rank for lo, hi in position_runs(p)], op="gather")  # drain the sends
        raise RuntimeError("gathered cache does not hold each position 0..n-1 exactly once: "
                           f"first positions {every[:8].tolist()}, total {n}")
    whole = packed.new_empty(n, layers, heads, dk + dv)
    recvs = []
    for r, p in enumerate(cpu):
        for lo, hi in position_runs(p):
            start = int(p[lo])
            if r == comm.rank:
                whole[start:start + hi - lo] = packed[lo:hi]
            else:
                recvs.append((r, whole[start:start + hi - lo]))
    del packed
    comm.p2p([], recvs, op="gather")
    return KVCache(torch.arange(n, device=whole.device), whole[..., :dk].permute(1, 2, 0, 3),
                   whole[..., dk:].permute(1, 2, 0, 3), local.shapes)


def to_hf_cache(cache: KVCache, model_config):
    """A transformers ``DynamicCache`` holding ``cache`` (batch 1), ready for decoding."""
    hf = DynamicCache(config=model_config)
    for layer in range(cache.keys.shape[0]):
        if isinstance(hf.layers[layer], _DUMMY):  # a layer that reuses an earlier one's K/V keeps none
            continue
        k, v = cache.layer(layer)
        hf.update(k[None].contiguous(), v[None].contiguous(), layer)
    return hf
