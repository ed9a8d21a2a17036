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

import math
from dataclasses import dataclass

import torch

from apb.kernels import attention, merge
from apb.methods.base import Method
from apb.methods.cost import HostWork, merge_bytes, over_layers, slowest
from apb.methods.exact_layers import context_runs, exact_rows, exact_work, with_exchange
from apb.methods.sizes import resolve_exact_layers, resolve_len, resolve_passing
from apb.parallel import layout
from apb.parallel.comm import Pending, pad_along


@dataclass(frozen=True)
class AnchorPlan:
    anchor_len: int  # context tokens in the anchor (the embedded query comes on top)
    passing: tuple[int, ...]  # per layer, tokens per host (capped by each host's block); 0 in exact layers
    exact: frozenset[int] = frozenset()  # layers whose blocks attend exactly (apb.methods.exact_layers)
    #: ``method.share_anchor``: the host whose anchor K/V the hosts without an anchor receive each
    #: layer (:meth:`Anchored.anchor_receivers`); None when every anchored host computes its own
    anchor_from: int | None = None
    #: ``method.share_anchor: split``: hosts ``0..W-2`` each run a share of the anchor's rows and
    #: the shares' K/V (and the query's scoring vectors) are all-gathered each layer
    split: bool = False


class Anchored(Method):
    exact = False
    query_phase = True
    shares_anchor = True
    has_anchor = True
    #: True when hosts share passing blocks (apb); the plan then resolves ``passing_len``
    uses_passing = False
    #: True when the anchor embeds the query after ``query_insert_pos`` context tokens (apb)
    embeds_query = False
    #: with ``method.share_anchor``, the host that computes the anchor for all: star's anchor is the
    #: start of host 0's own block; apb's embeds the query, which no block holds, so host 1 (the
    #: anchored host with the least passing to attend) keeps its anchor and sends it
    anchor_source: int = 0

    def anchor_receivers(self, world_size: int, anchor_len: int) -> tuple[int, ...]:
        """Hosts that receive the anchor's K/V instead of computing it (``method.share_anchor``):
        every host ``r > 0`` but the source; none unless the anchor is shared and not empty."""
        if not self.config.share_anchor or self.config.share_anchor == "split" or anchor_len <= 0:
            return ()
        return tuple(r for r in range(1, world_size) if r != self.anchor_source)

    def splits_anchor_rows(self, world_size: int, anchor_len: int) -> bool:
        """Whether ``method.share_anchor: split`` applies: an anchor to split and hosts to split it over."""
        return self.config.share_anchor == "split" and world_size > 1 and anchor_len > 0

    def _anchor_hosts(self, world_size: int, anchor_len: int) -> tuple[int, ...] | None:
        """Hosts whose sequence carries the anchor: all ``r > 0`` (None) unless it is shared."""
        receivers = self.anchor_receivers(world_size, anchor_len)
        return tuple(r for r in range(1, world_size) if r not in receivers) if receivers else None

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
        anchor = self.anchor_len(n_ctx, world_size)
        source = self.anchor_source if self.anchor_receivers(world_size, anchor) else None
        return AnchorPlan(anchor, tuple(passing), exact, source, self.splits_anchor_rows(world_size, anchor))

    @classmethod
    def cost(cls, n, w, shape, sizes):
        q, b = sizes.query, n / w
        a, passing, exact = cls._cost_sizes(n, b, shape.layers, sizes)
        if cls.shares_anchor_with(sizes) == "split" and cls.splits_anchor and a > 0 and w > 1:
            # host W-2 runs the last share and attends the most passing of the hosts with one;
            # host W-1 runs none and attends the most passing: which is slower depends on the shape
            # and the device's rates (shape.rates)
            hosts = [over_layers([cls._split_layer_cost(n, w, shape, q, a, p, i in exact, host)
                                  for i, p in enumerate(passing)]) for host in (w - 2, w - 1)]
            return slowest(hosts, shape, n)
        if not (cls.shares_anchor_with(sizes) and a > 0 and w > 1 + (cls.anchor_source > 0)):
            return over_layers([_exact_layer_cost(n, w, shape, q, a) if i in exact else
                                cls._layer_cost(n, w, shape, q, a, p) for i, p in enumerate(passing)])
        # a shared anchor: the source host does the anchor's work, the last host attends the most
        # passing; which is slower depends on the shape and the device's rates, so both are costed
        # over the whole prefill
        hosts = []
        for role in ("source", "receiver"):
            own = a if role == "source" and cls.anchor_source > 0 else 0.0  # star's source: its block start
            hosts.append(over_layers([_exact_layer_cost(n, w, shape, q, own, a) if i in exact else
                                      cls._shared_layer_cost(n, w, shape, q, a, p, role) for i, p in enumerate(passing)]))
        return slowest(hosts, shape, n)

    @classmethod
    def _layer_cost(cls, n: float, w: int, shape, q: float, a: float, p: float) -> HostWork:
        """The slowest host's work in one layer that is not exact, with anchor ``a`` and passing ``p``."""
        raise NotImplementedError

    @classmethod
    def _shared_layer_cost(cls, n: float, w: int, shape, q: float, a: float, p: float, role: str) -> HostWork:
        """With a shared anchor, the work in one layer that is not exact of the anchor's source
        (``role`` 'source') or of the last host, which receives it ('receiver')."""
        raise NotImplementedError

    @classmethod
    def _split_layer_cost(cls, n: float, w: int, shape, q: float, a: float, p: float, exact: bool,
                          host: int) -> HostWork:
        """With the anchor split over hosts ``0..W-2`` (``share_anchor: split``), the work in one
        layer (exact or not) of ``host``: ``W-2`` (the last share, which attends the whole anchor)
        or ``W-1`` (no share, the most passing)."""
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
        anchor = self.anchor_len(n_tokens, world)  # the whole prompt's: a bound on the context's
        if self.splits_anchor_rows(world, anchor):
            # every host's share received (padded to the largest), then the whole anchor put
            # together (the query's scoring vectors ride along, a few rows more)
            passed += 2 * world * -(-anchor // (world - 1)) * per_tok
        elif self.anchor_receivers(world, anchor):
            # one layer's anchor K/V in flight (apb's query vectors ride along, a few rows more)
            passed += anchor * per_tok * 2
        return with_exchange(passed, self.config, local, n_tokens, world, model_config, dtype_bytes)

    def layout(self, n_tokens, world_size, n_query=0):
        n_ctx = n_tokens - n_query
        anchor = self.anchor_len(n_ctx, world_size)
        split = self.splits_anchor_rows(world_size, anchor)
        return layout.anchored(n_ctx, n_query, world_size, anchor,
                               self.config.query_insert_pos if self.embeds_query else None,
                               self.tail_hosts(n_query, world_size, anchor),
                               None if split else self._anchor_hosts(world_size, anchor), split_anchor=split)

    def attention(self, ctx, module, q, k, v, scale):
        if ctx.plan.split:
            return self._split_attention(ctx, module, q, k, v, scale)
        mine, layer, opts = ctx.mine, int(module.layer_idx), ctx.score_opts
        a, b, t = mine.rows("anchor"), mine.rows("block"), mine.rows("query")
        shared = self._share_anchor(ctx, layer, q, k, v, a, b)
        receives = shared is not None and ctx.rank in self.anchor_receivers(ctx.comm.size, ctx.plan.anchor_len)
        sends = shared is not None and ctx.rank == ctx.plan.anchor_from
        q_query = None
        if self._scores_with_query(ctx, layer):
            # the source scores with the very vectors it sends (moved once), a receiver with those
            q_query = shared.parts()[2] if sends or receives else self._query_rows(ctx, q)
        pending = self._share_passing(ctx, layer, q_query, k, v, scale, b)
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
        if receives:
            anchor_k, anchor_v, _ = shared.parts()
            extra_k.append(anchor_k)
            extra_v.append(anchor_v)
        elif shared is not None:
            shared.pending.wait()  # the source's send, and host 0 of apb, which the broadcast reaches unused
        if a.stop > a.start:
            extra_k.append(k[:, :, a])
            extra_v.append(v[:, :, a])
        if extra_k:
            part, part_lse = attention(qb, torch.cat(extra_k, 2), torch.cat(extra_v, 2), causal=False, scale=scale,
                                       **opts)
            own = merge(own, own_lse, part, part_lse)[0]
        out[:, :, b] = own.to(q.dtype)
        return out

    def _split_attention(self, ctx, module, q, k, v, scale):
        """The step with the anchor split over the hosts (``method.share_anchor: split``). Host
        ``r < W-1`` holds ``[A'_r, B_r]``, ``A'_r`` its contiguous share of the anchor's rows (the
        query embedded); host ``W-1`` only its block. One all-gather brings every share's K/V and
        the query's scoring vectors; then the share's rows attend the anchor up to their last row
        and the block attends as with its own anchor. Hosts that score with the gathered query
        vectors choose their passing blocks after the gather: before the block attends itself
        where the passing blocks are the larger message (:func:`passing_first`), so that they
        travel behind it, else after (host 0, scoring with its own tail, and every host of a
        compressor without the query, send at once)."""
        layer, opts = int(module.layer_idx), ctx.score_opts
        a, b, t = ctx.mine.rows("anchor"), ctx.mine.rows("block"), ctx.mine.rows("query")
        with_query = self._scores_with_query(ctx, layer)
        gathered = _SplitAnchor.start(self, ctx, q, k, v, a, with_query)
        out = q.new_empty(*q.shape[:3], v.shape[-1])
        if t.stop > t.start:  # host 0's scoring-only query rows follow its block, as without the split
            keys = slice(b.start, t.stop)
            out[:, :, t] = attention(q[:, :, t], k[:, :, keys], v[:, :, keys], causal=True, scale=scale, **opts)[0]
        if layer in ctx.plan.exact:
            gathered.share_rows(ctx, q, a, out, scale)
            owners, sizes = context_runs(ctx.slices)
            out[:, :, b] = exact_rows(ctx, q, k, v, [(ctx.mine.blocks()[0].chunk_id, b)], owners, sizes, scale)[0]
            return out
        # host 0 scores its block with its own tail (the query after its block), the others with
        # the anchor's copy of the query, gathered: what each scores with when every host has its
        # own anchor. Those choose after the gather arrives; the larger of the two messages
        # travels while the block attends itself: the passing blocks (chosen and sent first) or,
        # where the anchor outweighs them (W = 2 and 3 at the default sizes), the gather
        tail = with_query and t.stop > t.start
        wait = with_query and not tail
        first = not wait or passing_first(ctx.plan.passing[layer], ctx.comm.size, sum(gathered.shares))
        if first:
            q_query = self._query_rows(ctx, q, kind="query") if tail else gathered.query() if wait else None
            pending = self._share_passing(ctx, layer, q_query, k, v, scale, b)
        qb = q[:, :, b]
        own, own_lse = attention(qb, k[:, :, b], v[:, :, b], causal=True, scale=scale, **opts)
        if not first:
            pending = self._share_passing(ctx, layer, gathered.query(), k, v, scale, b)
        gathered.share_rows(ctx, q, a, out, scale)
        extra_k, extra_v = self._received(ctx, layer, pending) if pending is not None else ([], [])
        if ctx.rank > 0:  # host 0's block precedes the anchor's copy: it attends only itself
            anchor_k, anchor_v = gathered.anchor()
            extra_k.append(anchor_k)
            extra_v.append(anchor_v)
        if extra_k:
            part, part_lse = attention(qb, torch.cat(extra_k, 2), torch.cat(extra_v, 2), causal=False, scale=scale,
                                       **opts)
            own = merge(own, own_lse, part, part_lse)[0]
        out[:, :, b] = own.to(q.dtype)
        return out

    def gathered_anchor(self, ctx, q, k, v) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A split anchor's whole K and V and its position ids, from every host's share: what a
        sliding layer's anchor rows attend (:mod:`apb.methods.sliding`). Every host must call it."""
        key = "split_anchor_positions"
        if key not in ctx.scratch:
            ctx.scratch[key] = layout.split_anchor_positions(ctx.slices).to(q.device, non_blocking=True)
        return (*_SplitAnchor.start(self, ctx, q, k, v, ctx.mine.rows("anchor"), False).anchor(), ctx.scratch[key])

    def _share_anchor(self, ctx, layer, q, k, v, a, b) -> "_SharedAnchor | None":
        """Start this layer's anchor broadcast (``method.share_anchor``) on every host: the source
        sends the anchor's K and V (after RoPE) and the query vectors it scores with, the receivers
        get them into a buffer of the shape the layout gives. None in layers that need no anchor
        (exact ones: their blocks attend the context itself) or when nothing is shared."""
        source = ctx.plan.anchor_from
        if source is None or layer in ctx.plan.exact:
            return None
        n_anchor = ctx.slices[source].rows("anchor")
        n_anchor = n_anchor.stop - n_anchor.start if source > 0 else ctx.plan.anchor_len
        n_q = ctx.n_query if self._scores_with_query(ctx, layer) else 0
        shapes = [(*k.shape[:2], n_anchor, k.shape[3]), (*v.shape[:2], n_anchor, v.shape[3]),
                  (*q.shape[:2], n_q, q.shape[3])]
        if ctx.rank == source:
            rows = a if source > 0 else slice(b.start, b.start + n_anchor)
            parts = [k[:, :, rows], v[:, :, rows]]
            parts.append(self._query_rows(ctx, q) if n_q else q.new_empty(shapes[2]))
            if [tuple(t.shape) for t in parts] != shapes or any(t.dtype != q.dtype for t in parts):
                raise RuntimeError(f"host {source}'s anchor is {[(tuple(t.shape), t.dtype) for t in parts]}, the "
                                   f"receivers expect {shapes} in {q.dtype}")
            flat = torch.cat([t.reshape(-1) for t in parts])
            return _SharedAnchor(ctx.comm.broadcast_start(flat, source, op="anchor_broadcast"), shapes, tuple(parts))
        flat = q.new_empty(sum(math.prod(s) for s in shapes))
        return _SharedAnchor(ctx.comm.broadcast_start(flat, source, op="anchor_broadcast"), shapes)

    def _scores_with_query(self, ctx, layer) -> bool:
        """Whether this layer's passing block is chosen with the query's vectors (apb's query compressor)."""
        return False

    def _query_rows(self, ctx, q, kind=None) -> torch.Tensor | None:
        """The query's vectors this host scores its block with (from its own copy of the query)."""
        return None

    def _share_passing(self, ctx, layer, q_query, k, v, scale, b):
        """Start sending this host's passing block, chosen with the query's vectors ``q_query``
        where the compressor needs them; what :meth:`_received` waits on, or None if nothing is sent."""
        return None

    def _received(self, ctx, layer, pending) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The K and V of the passing blocks this host's block sees, once ``pending`` has arrived."""
        raise NotImplementedError


@dataclass
class _SharedAnchor:
    """One layer's anchor broadcast in flight: ``parts()`` gives (K, V, query vectors): on the
    source its own (``own``, no wait), elsewhere what arrived."""

    pending: Pending
    shapes: list[tuple[int, ...]]
    own: tuple[torch.Tensor, ...] | None = None

    def parts(self) -> tuple[torch.Tensor, ...]:
        if self.own is None:
            flat, parts, at = self.pending.wait()[0], [], 0
            for shape in self.shapes:
                size = math.prod(shape)
                parts.append(flat[at:at + size].view(shape))
                at += size
            self.own = tuple(parts)
        return self.own


def passing_first(passing: int, world: int, anchor_rows: int) -> bool:
    """With a split anchor, whether a host that scores with the gathered query vectors waits for
    them before its block attends itself, so that its passing all-gather travels behind that
    attention: where the passing blocks it receives (``W-1`` of ``passing`` rows) are no fewer
    rows than the anchor's shares (``anchor_rows``, the query copy included). Else the gather
    travels behind the block's attention and the passing blocks are waited for."""
    return passing * (world - 1) >= anchor_rows


@dataclass
class _SplitAnchor:
    """One layer's all-gather of a split anchor in flight (:meth:`Anchored._split_attention`):
    each host sends its share's K and V side by side (padded to the largest share) and the
    query's scoring vectors it holds (padded to the most any host holds), one flat buffer."""

    pending: Pending
    shares: list[int]  # anchor rows per host
    queries: list[int]  # query rows per host (0 where the query's vectors are not sent)
    kv_shape: tuple[int, ...]  # (batch, kv_heads, largest share, dk + dv)
    q_shape: tuple[int, ...]  # (batch, heads, most query rows, dk)
    dk: int
    _parts: list[torch.Tensor] | None = None
    _anchor: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def start(cls, method, ctx, q, k, v, a, with_query: bool) -> "_SplitAnchor":
        key = "split_anchor_rows"
        if key not in ctx.scratch:  # from the layout, once per prompt: (anchor rows, query copy rows) per host
            ctx.scratch[key] = ([s.rows("anchor").stop - s.rows("anchor").start for s in ctx.slices],
                                [sum(c.size for c in s.chunks if c.kind == "anchor" and c.start >= ctx.n_ctx)
                                 for s in ctx.slices])
        shares, held = ctx.scratch[key]
        queries = held if with_query else [0] * len(held)
        kv = torch.cat([k[:, :, a], v[:, :, a]], -1)
        kv_shape = (*kv.shape[:2], max(shares), kv.shape[3])
        q_shape = (*q.shape[:2], max(queries), q.shape[3])
        mine = [pad_along(kv, 2, kv_shape[2]).reshape(-1)]
        if q_shape[2]:
            rows = method._query_rows(ctx, q, kind="anchor") if queries[ctx.rank] else q[:, :, :0]
            if rows.shape[2] != queries[ctx.rank]:
                raise RuntimeError(f"host {ctx.rank} holds {rows.shape[2]} of the query's rows, its layout says "
                                   f"{queries[ctx.rank]}")
            mine.append(pad_along(rows, 2, q_shape[2]).reshape(-1))
        pending = ctx.comm.all_gather_start(torch.cat(mine) if len(mine) > 1 else mine[0], op="anchor_gather")
        return cls(pending, shares, queries, kv_shape, q_shape, k.shape[-1])

    def _wait(self) -> list[torch.Tensor]:
        if self._parts is None:
            self._parts = self.pending.wait()
        return self._parts

    def anchor(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole anchor's K and V, the shares in host order."""
        if self._anchor is None:
            at = math.prod(self.kv_shape)
            kv = torch.cat([t[:at].view(self.kv_shape)[:, :, :n] for t, n in zip(self._wait(), self.shares)], 2)
            self._anchor = (kv[..., :self.dk], kv[..., self.dk:])
        return self._anchor

    def query(self) -> torch.Tensor:
        """The query's scoring vectors, from the hosts holding them, in order."""
        at, size = math.prod(self.kv_shape), math.prod(self.q_shape)
        return torch.cat([t[at:at + size].view(self.q_shape)[:, :, :n]
                          for t, n in zip(self._wait(), self.queries) if n], 2)

    def share_rows(self, ctx, q, a, out, scale) -> None:
        """This host's share of the anchor's rows, causally over the anchor up to its last row
        (the shares before it arrived with the gather): a bottom-right causal call."""
        if a.stop == a.start:
            self._wait()  # nothing to attend, but the gather must still complete here
            return
        hi = sum(self.shares[:ctx.rank + 1])
        ak, av = self.anchor()
        out[:, :, a] = attention(q[:, :, a], ak[:, :, :hi], av[:, :, :hi], causal=True, scale=scale,
                                 **ctx.score_opts)[0]


def _exact_layer_cost(n: float, w: int, shape, q: float, a: float, assumed: float | None = None) -> HostWork:
    """An exact layer on a host running an anchor of ``a`` rows: the anchor causally, its head
    shard of the whole context (:func:`apb.methods.exact_layers.exact_work`; the exchange is not
    hidden behind compute), the query phase over its block. ``assumed``: the method's anchor
    length where this host runs none of it (a shared anchor's receivers; default ``a``)."""
    pairs, moved = exact_work(n, 0, w, shape)
    return HostWork(a + n / w + q, a * a / 2 + pairs + q * n / w, n / w, comm_bytes=merge_bytes(q, shape) + moved,
                    steps=3, anchor=a if assumed is None else assumed)
