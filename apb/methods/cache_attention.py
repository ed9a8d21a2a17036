"""Exact attention of new tokens over caches that stay spread over the hosts.

Used wherever a token must see *every* cached context token exactly once: the query phase of
star/apb, the fused query of spava, and distributed decoding. Each host attends the new
queries to its own cache (no mask: all of it lies before them); the host that holds the new
tokens also attends them to themselves, causally. The partial outputs and their LSEs are
all-gathered and merged in rank order, so every host ends with the same exact result.

A layer's softcap and sinks reach every kernel call as score options; the sink rides on the
holder's causal call (the one with each new token's own key), so it counts once in the merge.
An MLA layer caches its latent pair, which ``expand`` (the layer's ``expand_kv``) turns back
into keys and values before attending.
"""

from __future__ import annotations

import torch

from apb.kernels import attention, merge_many
from apb.methods.base import score_options
from apb.parallel.comm import Comm


def local_partial(q, cache_k, cache_v, new_k, new_v, scale, holds_new: bool, window: int | None = None,
                  q_pos: torch.Tensor | None = None, cache_pos: torch.Tensor | None = None, **score_opts):
    """This host's share: (out, lse) of ``q`` over its cache, plus the new tokens if it holds them.

    With a sliding ``window``, ``q_pos`` and ``cache_pos`` (the new tokens' and the cache's
    positions) decide which cached keys each new token still sees; the new tokens are
    consecutive, so among themselves the window is aligned.
    """
    parts = []
    if cache_k is not None and cache_k.shape[2] > 0:
        if window is None:
            parts.append(attention(q, cache_k, cache_v, causal=False, scale=scale, **score_opts))
        else:
            near = cache_pos > q_pos.min() - window  # nothing older can be seen: leave it out of the call
            if bool(near.any()):
                parts.append(attention(q, cache_k[:, :, near], cache_v[:, :, near], causal=False, scale=scale,
                                       window=window, q_pos=q_pos, k_pos=cache_pos[near], **score_opts))
    if holds_new:
        extra = {} if window is None or new_k.shape[2] <= window else {"window": window}
        parts.append(attention(q, new_k, new_v, causal=True, scale=scale, **extra, **score_opts))
    if not parts:  # a host with nothing to contribute: the merge's identity
        return torch.zeros(*q.shape[:3], new_v.shape[-1], dtype=torch.float32, device=q.device), \
            torch.full(q.shape[:3], float("-inf"), device=q.device)
    return merge_many(parts)


def merge_over_hosts(comm: Comm, out: torch.Tensor, lse: torch.Tensor, op: str = "partial_merge") -> torch.Tensor:
    """All-gather (out, lse) partials and merge them; float32 result, identical on every host."""
    return merge_over_hosts_start(comm, out, lse, op)()


def merge_over_hosts_start(comm: Comm, out: torch.Tensor, lse: torch.Tensor, op: str = "partial_merge"):
    """:func:`merge_over_hosts` with the all-gather started now: returns ``finish()``, which waits
    and merges, so the caller can compute in between."""
    packed = torch.cat([out.float(), lse.float()[..., None]], dim=-1)
    pending = comm.all_gather_start(packed, op=op)

    def finish() -> torch.Tensor:
        parts = pending.wait()
        return merge_many([(p[..., :-1], p[..., -1]) for p in parts])[0]

    return finish


class CacheAttnContext:
    """Attention context for tokens that come after a distributed cache (query phase, decoding).

    ``kv`` maps layer -> this host's cached (k, v) (an MLA layer: its latent pair); ``positions``
    are their global positions. The host with ``holds_new`` appends the new tokens' entries to its
    cache as they are computed. With ``trim_windows`` (decoding, where the cache is not kept
    afterwards), a sliding layer drops the entries no later token can see, on every host, and
    keeps its own positions from then on.
    """

    def __init__(self, comm: Comm, kv: dict, positions: torch.Tensor, holds_new: bool, trim_windows: bool = False):
        self.comm = comm
        self.kv = dict(kv)
        self.positions = positions
        self.holds_new = holds_new
        self.trim_windows = trim_windows
        self._new_positions: torch.Tensor | None = None
        self._cache_positions = positions
        self._layer_positions: dict[int, torch.Tensor] = {}  # trimmed layers only

    def start_step(self, positions: torch.Tensor) -> None:
        """The new tokens' positions; every layer of this step sees the cache as it was before them."""
        self._new_positions = positions
        self._cache_positions = self.positions

    def step(self, module, q, k, v, scale, sliding_window=None, softcap=None, sinks=None, latent=None,
             expand=None) -> torch.Tensor:
        layer = int(module.layer_idx)
        self.comm.stats.layer = layer
        self.comm.stats.tick(layer)
        cached = self.kv.get(layer)
        cache_pos = self._layer_positions.get(layer, self._cache_positions)
        window = {}
        if sliding_window is not None:
            if self._new_positions is None:
                raise RuntimeError("CacheAttnContext.start_step(positions) must come before a sliding layer")
            new_pos = self._new_positions.to(q.device)
            cache_pos = cache_pos.to(q.device)
            if self.trim_windows and cached is not None:
                seen = cache_pos > new_pos.min() - sliding_window  # positions only grow: the rest is gone for good
                if not bool(seen.all()):
                    cached = tuple(t[:, :, seen] for t in cached)
                    cache_pos = cache_pos[seen]
                    self.kv[layer], self._layer_positions[layer] = cached, cache_pos
            window = dict(window=sliding_window, q_pos=new_pos, cache_pos=cache_pos)
        cache_k, cache_v = (None, None) if cached is None else cached
        if expand is not None and cache_k is not None and cache_k.shape[2] > 0:
            cache_k, cache_v = expand(cache_k, cache_v)
        out, lse = local_partial(q, cache_k, cache_v, k, v, scale, self.holds_new, **window,
                                 **score_options(softcap, sinks))
        merged = merge_over_hosts(self.comm, out, lse)
        if self.holds_new:
            new = latent or (k, v)
            self.kv[layer] = new if cached is None else tuple(torch.cat([c, t], 2) for c, t in zip(cached, new))
            if layer in self._layer_positions:
                self._layer_positions[layer] = torch.cat([self._layer_positions[layer],
                                                          self._new_positions.to(cache_pos.device)])
            if layer == 0 and self._new_positions is not None:
                self.positions = torch.cat([self.positions, self._new_positions.to(self.positions.device)])
        return merged.to(q.dtype)
