"""``star`` and ``apb``: anchored context blocks, then an exact query phase.

Context phase, host ``r`` (contiguous block ``B_r``; hosts ``r > 0`` prepend an anchor ``A``)::

    rows \\ keys   P_0..P_{r-1}   A          B_r
    A             -              causal     -
    B_r           all (apb)      all        causal

* ``star``: ``A`` is the first ``anchor_len`` context tokens; no passing blocks, so the context
  phase sends nothing.
* ``apb``: ``A`` embeds the query after ``query_insert_pos`` context tokens; each layer, every
  host picks ``P_r`` (``passing_len`` K/V per KV head, by the compressor) from its block and one
  all-gather shares them. Host 0, which has no anchor, appends the query after its block when
  the compressor needs query vectors; those rows are used for scoring only.

Anchors go through every layer but are dropped from outputs and caches. Afterwards the query
runs as a second pass in which each token attends exactly to every host's cache
(:mod:`apb.methods.cache_attention`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from apb.methods.compressors import ScoreInputs, build_compressor, take
from apb.kernels import attention, merge
from apb.methods import register_method
from apb.methods.base import Method
from apb.methods.sizes import resolve_len, resolve_passing
from apb.parallel import layout


@dataclass(frozen=True)
class AnchorPlan:
    anchor_len: int  # context tokens in the anchor (the embedded query comes on top)
    passing: tuple[int, ...]  # per layer, tokens per host (capped by each host's block)


class Anchored(Method):
    exact = False
    query_phase = True
    uses_passing = False
    embeds_query = False

    def __init__(self, config=None):
        super().__init__(config)
        self.compressor = build_compressor(self.config.compressor, **self.config.model_dump(exclude={"name", "compressor"})) \
            if self.uses_passing else None

    def default_anchor(self, block: int) -> float:
        raise NotImplementedError

    def anchor_len(self, n_ctx: int, world_size: int) -> int:
        block = -(-n_ctx // world_size)
        # the anchor copies the start of host 0's block, so it can be no longer than that block
        value = resolve_len(self.config.anchor_len, block, self.default_anchor(block), self.config.round_to,
                            "anchor_len")
        return min(value, block)

    def plan(self, n_tokens, world_size, n_query, num_layers):
        n_ctx = n_tokens - n_query
        block = -(-n_ctx // world_size)
        passing = resolve_passing(self.config.passing_len, block, block / 8, self.config.round_to, num_layers) \
            if self.uses_passing else [0] * num_layers
        return AnchorPlan(self.anchor_len(n_ctx, world_size), tuple(passing))

    def tail_hosts(self, n_query: int, world_size: int, anchor_len: int) -> tuple[int, ...]:
        """Hosts that must append the query to score their block: those whose anchor lacks it."""
        if not (self.uses_passing and self.compressor.needs_query and n_query and world_size > 1):
            return ()
        if self.config.passing_len == "all":  # nothing is chosen, so nothing is scored
            return ()
        return tuple(range(world_size)) if anchor_len == 0 else (0,)

    def layout(self, n_tokens, world_size, n_query=0):
        n_ctx = n_tokens - n_query
        anchor = self.anchor_len(n_ctx, world_size)
        return layout.anchored(n_ctx, n_query, world_size, anchor,
                               self.config.query_insert_pos if self.embeds_query else None,
                               self.tail_hosts(n_query, world_size, anchor))

    def capture_pre_rope(self) -> bool:
        return bool(self.compressor is not None and self.compressor.needs_pre_rope)

    def attention(self, ctx, module, q, k, v, scale):
        mine, layer = ctx.mine, int(module.layer_idx)
        a, b, t = mine.rows("anchor"), mine.rows("block"), mine.rows("query")
        pending = self._share_passing(ctx, layer, q, k, v, scale, b) if self.uses_passing else None
        out = torch.empty_like(q)
        if a.stop > a.start:
            out[:, :, a] = attention(q[:, :, a], k[:, :, a], v[:, :, a], causal=True, scale=scale)[0]
        if t.stop > t.start:  # scoring-only query rows on host 0: they follow the block
            keys = slice(b.start, t.stop)
            out[:, :, t] = attention(q[:, :, t], k[:, :, keys], v[:, :, keys], causal=True, scale=scale)[0]
        qb = q[:, :, b]
        own, own_lse = attention(qb, k[:, :, b], v[:, :, b], causal=True, scale=scale)
        extra_k, extra_v = [], []
        if pending is not None:
            extra_k, extra_v = self._received(ctx, layer, pending)
        if a.stop > a.start:
            extra_k.append(k[:, :, a])
            extra_v.append(v[:, :, a])
        if extra_k:
            part, part_lse = attention(qb, torch.cat(extra_k, 2), torch.cat(extra_v, 2), causal=False, scale=scale)
            own = merge(own, own_lse, part, part_lse)[0]
        out[:, :, b] = own.to(q.dtype)
        return out

    def _share_passing(self, ctx, layer, q, k, v, scale, b):
        if ctx.comm.size == 1:
            return None
        p = ctx.plan.passing[layer]
        if p <= 0:
            return None
        kb, vb = k[:, :, b], v[:, :, b]
        x = ScoreInputs(layer, kb, vb, q_query=self._query_rows(ctx, q), scale=scale,
                        pre_rope=_pre_rope_rows(ctx, layer, b))
        idx = self.compressor.select(x, min(p, kb.shape[2]))
        packed = torch.stack([take(kb, idx), take(vb, idx)])
        # blocks differ in size by at most one, so with p = 'all' the shares may too: pad to one shape
        width = max(_share(s, p) for s in ctx.slices)
        if packed.shape[3] < width:
            packed = torch.cat([packed, packed.new_zeros(*packed.shape[:3], width - packed.shape[3],
                                                         packed.shape[4])], 3)
        return ctx.comm.all_gather_start(packed)

    def _received(self, ctx, layer, pending):
        parts = pending.wait()
        ks, vs = [], []
        p = ctx.plan.passing[layer]
        for src in layout.apb_passing_sources(ctx.rank):
            size = _share(ctx.slices[src], p)
            ks.append(parts[src][0][:, :, :size])
            vs.append(parts[src][1][:, :, :size])
        return ks, vs

    def _query_rows(self, ctx, q):
        if not self.compressor.needs_query:
            return None
        rows = (ctx.mine.indices >= ctx.n_ctx).nonzero().flatten().to(q.device)
        return q[:, :, rows]


def _share(host, p: int) -> int:
    """Passing tokens host ``host`` sends: ``p``, or its whole block if that is smaller."""
    return min(p, host.blocks()[0].size)


def _pre_rope_rows(ctx, layer, rows):
    pre = ctx.scratch.get(("pre_rope", layer))
    return None if pre is None else tuple(t[:, rows] for t in pre)


@register_method("star")
class Star(Anchored):
    """Star Attention: anchor = the first block by default; no passing."""

    def default_anchor(self, block):
        return block


@register_method("apb")
class APB(Anchored):
    uses_passing = True
    embeds_query = True
    variants = {"uncompressed": {"anchor_len": 0, "passing_len": "all"}}

    def default_anchor(self, block):
        return block / 4
