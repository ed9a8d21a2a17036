"""Exact attention of new tokens over caches that stay spread over the hosts.

Used wherever a token must see *every* cached context token exactly once: the query phase of
star/apb, the fused query of spava, and distributed decoding. Each host attends the new
queries to its own cache (no mask: all of it lies before them); the host that holds the new
tokens also attends them to themselves, causally. The partial outputs and their LSEs are
all-gathered and merged in rank order, so every host ends with the same exact result.
"""

from __future__ import annotations

import torch

from apb.kernels import attention, merge_many
from apb.parallel.comm import Comm


def local_partial(q, cache_k, cache_v, new_k, new_v, scale, holds_new: bool):
    """This host's share: (out, lse) of ``q`` over its cache, plus the new tokens if it holds them."""
    parts = []
    if cache_k is not None and cache_k.shape[2] > 0:
        parts.append(attention(q, cache_k, cache_v, causal=False, scale=scale))
    if holds_new:
        parts.append(attention(q, new_k, new_v, causal=True, scale=scale))
    if not parts:  # a host with nothing to contribute: the merge's identity
        return torch.zeros(q.shape, dtype=torch.float32, device=q.device), \
            torch.full(q.shape[:3], float("-inf"), device=q.device)
    return merge_many(parts)


def merge_over_hosts(comm: Comm, out: torch.Tensor, lse: torch.Tensor, op: str = "partial_merge") -> torch.Tensor:
    """All-gather (out, lse) partials and merge them; float32 result, identical on every host."""
    packed = torch.cat([out.float(), lse.float()[..., None]], dim=-1)
    parts = comm.all_gather_start(packed, op=op).wait()
    return merge_many([(p[..., :-1], p[..., -1]) for p in parts])[0]


class CacheAttnContext:
    """Attention context for tokens that come after a distributed cache (query phase, decoding).

    ``kv`` maps layer -> this host's cached (k, v); ``positions`` are their global positions.
    The host with ``holds_new`` appends the new tokens' K/V to its cache as they are computed.
    """

    def __init__(self, comm: Comm, kv: dict, positions: torch.Tensor, holds_new: bool):
        self.comm = comm
        self.kv = dict(kv)
        self.positions = positions
        self.holds_new = holds_new
        self._new_positions: torch.Tensor | None = None

    def start_step(self, positions: torch.Tensor) -> None:
        self._new_positions = positions

    def step(self, module, q, k, v, scale, sliding_window=None) -> torch.Tensor:
        layer = int(module.layer_idx)
        self.comm.stats.layer = layer
        self.comm.stats.tick(layer)
        if sliding_window is not None:
            raise ValueError("sliding-window attention is not supported with distributed caches")
        cache_k, cache_v = self.kv.get(layer, (None, None))
        out, lse = local_partial(q, cache_k, cache_v, k, v, scale, self.holds_new)
        merged = merge_over_hosts(self.comm, out, lse)
        if self.holds_new:
            self.kv[layer] = (k, v) if cache_k is None else (torch.cat([cache_k, k], 2), torch.cat([cache_v, v], 2))
            if layer == 0 and self._new_positions is not None:
                self.positions = torch.cat([self.positions, self._new_positions.to(self.positions.device)])
        return merged.to(q.dtype)
