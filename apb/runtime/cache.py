"""KV caches: this host's part, the gather to the decode host, and conversion to a HF cache.

A :class:`KVCache` stores all layers stacked, ``keys``/``values`` of shape
(layers, kv_heads, tokens, head_dim), with each token's global position (a multi-head latent
attention model stores what transformers caches for it instead: its latent and rotated-key
parts, one "head" each, of different sizes; see :mod:`apb.model.mla`). Gathering sends every
host's part to the decode host in one variable-length gather, orders tokens by position and
checks that every position 0..n-1 appears exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from apb.parallel.comm import Comm


@dataclass
class KVCache:
    positions: torch.Tensor  # (tokens,) long
    keys: torch.Tensor  # (layers, kv_heads, tokens, head_dim)
    values: torch.Tensor

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
        keys = torch.stack([kv[i][0][0] for i in layers])
        values = torch.stack([kv[i][1][0] for i in layers])
        return cls(positions.to(torch.long), keys, values)

    def sorted(self) -> "KVCache":
        order = torch.argsort(self.positions)
        return KVCache(self.positions[order], self.keys[:, :, order], self.values[:, :, order])


def gather_cache(local: KVCache, comm: Comm, dst: int = 0) -> KVCache | None:
    """Send every host's cache to ``dst``; returns the whole cache, in position order, on ``dst``."""
    # keys and values side by side in the last dim: their sizes may differ (an MLA layer's latent pair)
    dk = local.keys.shape[-1]
    packed = torch.cat([local.keys, local.values], dim=-1)  # (L, H, t, Dk + Dv)
    parts = comm.gather_varlen(packed, dst=dst, dim=2)
    pos = comm.gather_varlen(local.positions.to(packed.device), dst=dst, dim=0)
    if parts is None or pos is None:
        return None
    whole = torch.cat(parts, dim=2)
    cache = KVCache(torch.cat(pos), whole[..., :dk].contiguous(), whole[..., dk:].contiguous()).sorted()
    expected = torch.arange(cache.n_tokens, device=cache.positions.device)
    if not torch.equal(cache.positions, expected):
        raise RuntimeError("gathered cache does not hold each position 0..n-1 exactly once: "
                           f"first positions {cache.positions[:8].tolist()}, total {cache.n_tokens}")
    return cache


def to_hf_cache(cache: KVCache, model_config):
    """A transformers ``DynamicCache`` holding ``cache`` (batch 1), ready for decoding."""
    hf = DynamicCache(config=model_config)
    for layer in range(cache.keys.shape[0]):
        hf.update(cache.keys[layer][None].contiguous(), cache.values[layer][None].contiguous(), layer)
    return hf
