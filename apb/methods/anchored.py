"""What ``star`` and ``apb`` share: anchored context blocks, then an exact query phase.

Context phase, host ``r`` (contiguous block ``B_r``; hosts ``r > 0`` prepend an anchor ``A``)::

    rows \\ keys   P_0..P_{r-1}   A          B_r
    A             -              causal     -
    B_r           all (apb)      all        causal

:class:`Anchored` owns the layout, the plan and this attention step; a subclass adds passing
blocks through two hooks (:meth:`Anchored._share_passing`, :meth:`Anchored._received`) and sets
its default sizes (:meth:`~apb.methods.base.Method.default_sizes`). Anchors go through every
layer but are dropped from outputs and caches. Afterwards the query runs as a second pass in
which each token attends exactly to every host's cache (:mod:`apb.methods.cache_attention`).
In the layers ``method.exact_layers`` names, the blocks instead attend every earlier context
token exactly, at balanced cost (:mod:`apb.methods.exact_layers`; the blocks are the context in
host order, which that exchange needs), and nothing is passed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from apb.kernels import attention, merge
from apb.methods.base import Method
from apb.methods.cost import HostWork, merge_bytes, over_layers
from apb.methods.exact_layers import context_runs, exact_rows, exact_work, with_exchange
from apb.methods.sizes import resolve_exact_layers, resolve_len, resolve_passing
from apb.parallel import layout


@dataclass(frozen=True)
class AnchorPlan:
    anchor_len: int  # context tokens in the anchor (the embedded query comes on top)
    passing: tuple[int, ...]  # per layer, tokens per host (capped by each host's block); 0 in exact layers
    exact: frozenset[int] = frozenset()  # layers whose blocks attend exactly (apb.methods.exact_layers)


class Anchored(Method):
    exact = False
    query_phase = True
    #: True when hosts share passing blocks (apb); the plan then resolves ``passing_len``
    uses_passing = False
    #: True when the anchor embeds the query after ``query_insert_pos`` context tokens (apb)
    embeds_query = False

    def anchor_len(self, n_ctx: int, world_size: int) -> int:
        block = -(-n_ctx // world_size)
        # the anchor copies the start of host 0's block, so it can be no longer than that block
        value = resolve_len(self.config.anchor_len, block, self.default_sizes(n_ctx, block)[0], self.config.round_to,
                            "anchor_len")
        return min(value, block)

    def plan(self, n_tokens, world_size, n_query, num_layers):
        n_ctx = n_tokens - n_query
        block = -(-n_ctx // world_size)
        passing = resolve_passing(self.config.passing_len, block, self.default_sizes(n_ctx, block)[1],
                                  self.config.round_to, num_layers) if self.uses_passing else [0] * num_layers
        exact = resolve_exact_layers(self.config.exact_layers, num_layers) if world_size > 1 else frozenset()
        # an exact layer's blocks see every earlier token: nothing to pass there
        passing = [0 if i in exact else p for i, p in enumerate(passing)]
        return AnchorPlan(self.anchor_len(n_ctx, world_size), tuple(passing), exact)

    @classmethod
    def cost(cls, n, w, shape, sizes):
        q, b = sizes.query, n / w
        a, passing, exact = cls._cost_sizes(n, b, shape.layers, sizes)
        return over_layers([_exact_layer_cost(n, w, shape, q, a) if i in exact else cls._layer_cost(n, w, shape, q, a, p)
                            for i, p in enumerate(passing)])

    @classmethod
    def _layer_cost(cls, n: float, w: int, shape, q: float, a: float, p: float) -> HostWork:
        """The slowest host's work in one layer that is not exact, with anchor ``a`` and passing ``p``."""
        raise NotImplementedError

    @classmethod
    def _cost_sizes(cls, n: float, b: float, layers: int, sizes) -> tuple[float, list[float], frozenset[int]]:
        """(anchor, passing per layer, exact layers) by :meth:`plan`'s rules at block ``b = n/W``;
        an unset size keeps the default's exact value, which plan() rounds to whole tokens."""
        a_def, p_def = cls.default_sizes(n, b)
        a = min(a_def if sizes.anchor_len is None else resolve_len(sizes.anchor_len, b, a_def, 1, "anchor_len"), b)
        if not cls.uses_passing:
            passing = [0.0] * layers
        elif sizes.passing_len is None:
            passing = [min(p_def, b)] * layers
        else:
            passing = resolve_passing(sizes.passing_len, b, p_def, 1, layers)
        if sizes.passing_cap is not None:
            passing = [min(p, sizes.passing_cap) for p in passing]
        exact = resolve_exact_layers(sizes.exact_layers, layers)
        return a, [0 if i in exact else p for i, p in enumerate(passing)], exact

    def tail_hosts(self, n_query: int, world_size: int, anchor_len: int) -> tuple[int, ...]:
        """Hosts that append the query after their block (to score it): none unless a subclass says."""
        return ()

    def transfer_bytes(self, local, n_tokens, world, per_tok, passing, model_config, dtype_bytes):
        passed = super().transfer_bytes(local, n_tokens, world, per_tok, passing, model_config, dtype_bytes)
        return with_exchange(passed, self.config, local, n_tokens, world, model_config, dtype_bytes)

    def layout(self, n_tokens, world_size, n_query=0):
        n_ctx = n_tokens - n_query
        anchor = self.anchor_len(n_ctx, world_size)
        return layout.anchored(n_ctx, n_query, world_size, anchor,
                               self.config.query_insert_pos if self.embeds_query else None,
                               self.tail_hosts(n_query, world_size, anchor))

    def attention(self, ctx, module, q, k, v, scale):
        mine, layer, opts = ctx.mine, int(module.layer_idx), ctx.score_opts
        a, b, t = mine.rows("anchor"), mine.rows("block"), mine.rows("query")
        pending = self._share_passing(ctx, layer, q, k, v, scale, b)
        out = q.new_empty(*q.shape[:3], v.shape[-1])
        if a.stop > a.start:
            out[:, :, a] = attention(q[:, :, a], k[:, :, a], v[:, :, a], causal=True, scale=scale, **opts)[0]
        if t.stop > t.start:  # scoring-only query rows on host 0: they follow the block
            keys = slice(b.start, t.stop)
            out[:, :, t] = attention(q[:, :, t], k[:, :, keys], v[:, :, keys], causal=True, scale=scale, **opts)[0]
        if layer in ctx.plan.exact:
            owners, sizes = context_runs(ctx.slices)
            run = ctx.mine.blocks()[0].chunk_id
            out[:, :, b] = exact_rows(ctx, q, k, v, [(run, b)], owners, sizes, scale)[0]
            return out
        qb = q[:, :, b]
        own, own_lse = attention(qb, k[:, :, b], v[:, :, b], causal=True, scale=scale, **opts)
        extra_k, extra_v = [], []
        if pending is not None:
            extra_k, extra_v = self._received(ctx, layer, pending)
        if a.stop > a.start:
            extra_k.append(k[:, :, a])
            extra_v.append(v[:, :, a])
        if extra_k:
            part, part_lse = attention(qb, torch.cat(extra_k, 2), torch.cat(extra_v, 2), causal=False, scale=scale,
                                       **opts)
            own = merge(own, own_lse, part, part_lse)[0]
        out[:, :, b] = own.to(q.dtype)
        return out

    def _share_passing(self, ctx, layer, q, k, v, scale, b):
        """Start sending this host's passing block; what :meth:`_received` waits on, or None if nothing is sent."""
        return None

    def _received(self, ctx, layer, pending) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The K and V of the passing blocks this host's block sees, once ``pending`` has arrived."""
        raise NotImplementedError


def _exact_layer_cost(n: float, w: int, shape, q: float, a: float) -> HostWork:
    """An exact layer on a host with an anchor: the anchor causally, its head shard of the whole
    context (:func:`apb.methods.exact_layers.exact_work`; the exchange is not hidden behind
    compute), the query phase over its block."""
    pairs, moved = exact_work(n, 0, w, shape)
    return HostWork(a + n / w + q, a * a / 2 + pairs + q * n / w, n / w, comm_bytes=merge_bytes(q, shape) + moved,
                    steps=3, anchor=a)
