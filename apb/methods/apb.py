"""``apb``: anchored blocks with the query embedded in the anchor, plus compressed passing blocks.

``A`` embeds the query after ``query_insert_pos`` context tokens; each layer, every host picks
``P_r`` (``passing_len`` K/V per KV head, by the compressor) from its block and one all-gather
shares them; host ``r`` sees ``P_0..P_{r-1}``. Host 0, whose block sees no anchor, appends the
query after its block when the compressor needs query vectors; those rows are used for scoring
only. By default the anchor's rows are split over hosts ``0..W-2`` (``method.share_anchor:
split``). The shared layout, mask and query phase are in :mod:`apb.methods.anchored`.
"""

from __future__ import annotations

import torch

from apb.methods.registry import register_method
from apb.model.rope import rope_shift, rope_types, shiftable
from apb.methods.anchored import Anchored, passing_first
from apb.methods.compressors import ScoreInputs, build_compressor, take
from apb.methods.cost import HostWork, merge_bytes
from apb.methods.exact_layers import exact_work
from apb.parallel import layout
from apb.parallel.comm import pad_along


@register_method("apb")
class APB(Anchored):
    uses_passing = True
    embeds_query = True
    anchor_source = 1
    # the anchor's rows split over hosts 0..W-2: the same attention, no host doing more work than
    # with host 1's broadcast (share_anchor: true, apb:shared) at the default sizes, less on the
    # host that was slowest where linear work dominates (docs/methods.md, "A shared anchor")
    share_anchor_default = "split"
    splits_anchor = True
    variants = {"uncompressed": {"anchor_len": 0, "passing_len": "all"}, "shared": {"share_anchor": True},
                "unshared": {"share_anchor": False}, "split": {"share_anchor": "split"}}

    def __init__(self, config):
        super().__init__(config)
        self.compressor = build_compressor(self.config.compressor,
                                           **self.config.model_dump(exclude={"name", "compressor"}))

    @classmethod
    def default_sizes(cls, n_ctx, block):
        return block / 4, block / 8

    @classmethod
    def _layer_cost(cls, n, w, shape, q, a, p):
        # host W-1: anchor causally; its block over W-1 passing blocks, the anchor and itself
        # causally; then the query over its block in the query phase. Its passing block's K and
        # V go to the W-1 others while its own block is attended
        b = n / w
        pairs = a * a / 2 + b * ((w - 1) * p + a) + b * b / 2 + q * n / w
        gathered = (w - 1) * p * 2 * shape.kv_heads * shape.head_dim * shape.bytes_per_param
        return HostWork(a + b + q, pairs, b, comm_bytes=merge_bytes(q, shape), steps=2, overlap_bytes=gathered,
                        anchor=a, passing=p)

    @classmethod
    def _shared_layer_cost(cls, n, w, shape, q, a, p, role):
        # the source (host 1) as above but with one passing block; host W-1 runs no anchor rows: it
        # waits for the anchor's K/V and the query's vectors (which choose its passing block), then
        # attends as above. Both hear the broadcast behind their own block's attention
        b = n / w
        kv = 2 * shape.kv_heads * shape.head_dim * shape.bytes_per_param
        sent = (a + q) * kv + q * shape.heads * shape.head_dim * shape.bytes_per_param
        gathered = (w - 1) * p * kv
        if role == "source":
            pairs = a * a / 2 + b * (p + a) + b * b / 2 + q * n / w
            return HostWork(a + b + q, pairs, b, comm_bytes=merge_bytes(q, shape), steps=3,
                            overlap_bytes=gathered + sent, anchor=a, passing=p)
        pairs = b * ((w - 1) * p + a) + b * b / 2 + q * n / w
        return HostWork(b + q, pairs, b, comm_bytes=merge_bytes(q, shape), steps=3, overlap_bytes=gathered + sent,
                        anchor=a, passing=p)

    @classmethod
    def _split_layer_cost(cls, n, w, shape, q, a, p, exact, host):
        # host W-2: its share (a/(W-1) rows) over the anchor up to it, which is the whole anchor;
        # its block over W-2 passing blocks and the anchor (at W = 2 host 0's block sees neither);
        # host W-1: no share, its block over W-1 passing blocks and the anchor. Then the query
        # phase. At W = 2 host W-2 is host 0, which also runs its scoring tail (the query after
        # its block, with a query-scoring compressor, the default). A host r > 0 chooses its
        # passing block after the shares' K/V and the query's scoring vectors arrive: the larger
        # of the two messages travels behind the block's own attention, the other is waited for
        # (anchored.passing_first); host 0 sends both at once. In an exact layer the shares
        # arrive before the exchange, not hidden
        b, share = n / w, (a / (w - 1) if host < w - 1 else 0.0)
        tail = q if host == 0 else 0.0
        kv = 2 * shape.kv_heads * shape.head_dim * shape.bytes_per_param
        anchor_pairs = share * a - share * share / 2
        shares_in = (w - 2 + (host == w - 1)) * a / (w - 1) * kv
        if exact:
            pairs, moved = exact_work(n, 0, w, shape)
            return HostWork(share + b + q + tail, anchor_pairs + pairs + q * n / w + tail * b, b,
                            comm_bytes=merge_bytes(q, shape) + moved + shares_in, steps=4, anchor=a)
        pairs = anchor_pairs + b * (host * p + (a if host > 0 else 0)) + b * b / 2 + q * n / w + tail * b
        sent = shares_in + q * shape.heads * shape.head_dim * shape.bytes_per_param
        passed = host * p * kv
        exposed = 0.0 if host == 0 else sent if passing_first(p, w, a + q) else passed
        return HostWork(share + b + q + tail, pairs, b, comm_bytes=merge_bytes(q, shape) + exposed, steps=3,
                        overlap_bytes=sent + passed - exposed, anchor=a, passing=p)

    def check(self, model_config, world_size):
        super().check(model_config, world_size)
        if self.moves_query() and not shiftable(model_config):
            named = rope_types(model_config)
            raise ValueError(_UNMOVABLE.format(why=f"this model's config names rope type(s) {named}, which apb's "
                                                   "shift does not know"))

    def check_model(self, model):
        super().check_model(model)
        # the config can promise fixed frequencies where the loaded rotary still cannot be moved (its
        # apply_rotary_pos_emb takes another form): refused before any message, not mid-forward
        if self.moves_query() and rope_shift(model) is None:
            raise ValueError(_UNMOVABLE.format(why=f"{type(model).__name__}'s rotary embedding could not be moved "
                                                   "as the model itself rotates (apb.model.rope)"))

    def moves_query(self) -> bool:
        """Whether hosts r > 0 move the anchor's copy of the query to its true positions to score
        with it (with nothing chosen or no anchor, there is no copy to move)."""
        return (self.config.passing_len != "all" and self.config.anchor_len != 0
                and self._scores_at_true_positions())

    def _scores_at_true_positions(self) -> bool:
        return self.compressor.needs_query and self.config.query_positions == "true"

    def tail_hosts(self, n_query: int, world_size: int, anchor_len: int) -> tuple[int, ...]:
        """Hosts that must append the query to score their block: those whose anchor lacks it."""
        if not (self.compressor.needs_query and n_query and world_size > 1):
            return ()
        if self.config.passing_len == "all":  # nothing is chosen, so nothing is scored
            return ()
        return tuple(range(world_size)) if anchor_len == 0 else (0,)

    def _scores_with_query(self, ctx, layer):
        return (self.compressor.needs_query and ctx.comm.size > 1 and ctx.plan.passing[layer] > 0
                and self.config.passing_len != "all")

    def _share_passing(self, ctx, layer, q_query, k, v, scale, b):
        if ctx.comm.size == 1:
            return None
        p = ctx.plan.passing[layer]
        if p <= 0:
            return None
        kb, vb = k[:, :, b], v[:, :, b]
        x = ScoreInputs(layer, kb, vb, q_query=q_query, scale=scale, pre_rope=_pre_rope_rows(ctx, layer, b))
        idx = self.compressor.select(x, min(p, kb.shape[2]))
        if ctx.diagnostics:  # block-local rows -> global prompt indices
            ctx.scratch[("passing", layer)] = ctx.mine.indices[b].to(idx.device)[idx[0]]
        # keys and values side by side in the last dim (their head sizes may differ: MLA)
        packed = torch.cat([take(kb, idx), take(vb, idx)], -1)
        # blocks differ in size by at most one, so with p = 'all' the shares may too: pad to one shape
        width = max(_share(s, p) for s in ctx.slices)
        return ctx.comm.all_gather_start(pad_along(packed, 2, width)), k.shape[-1]

    def _received(self, ctx, layer, pending):
        handle, dk = pending
        parts = handle.wait()
        ks, vs = [], []
        p = ctx.plan.passing[layer]
        for src in layout.apb_passing_sources(ctx.rank):
            size = _share(ctx.slices[src], p)
            ks.append(parts[src][:, :, :size, :dk])
            vs.append(parts[src][:, :, :size, dk:])
        return ks, vs

    def _query_rows(self, ctx, q, kind=None):
        """The query's vectors for scoring, moved to the real query's positions (hosts r > 0 hold a
        copy at anchor positions; see :mod:`apb.model.rope`). ``kind``: only the rows of chunks of
        that kind (``anchor``: the copy; ``query``: host 0's scoring tail), where a host holds
        both (a split anchor's share on host 0); None: the rows this host has."""
        rows, delta = self._query_rows_at(ctx, kind)
        q_rows = q[:, :, rows]
        if delta == 0 or not self._scores_at_true_positions():
            return q_rows
        if ctx.rope is None:  # check_model() refuses this before the forward
            raise RuntimeError("apb cannot move the query to its true positions with this model's rotary embedding; "
                               "set method.query_positions: anchor")
        return ctx.rope.shift(q_rows, delta, ctx.layer, ratio=self._query_ratio(ctx, kind, rows, delta, q.device))

    @staticmethod
    def _query_ratio(ctx, kind, rows: slice, delta: int, device) -> torch.Tensor | None:
        """Per row of the copy, the model's query scale at its true position over that at its
        anchor position (Ministral 3's temperature), once per prompt from the layout on the CPU
        and moved to the device once; None where the model scales no query by position."""
        key = ("query_ratio", kind)
        if key not in ctx.scratch:
            ratio = ctx.rope.ratio(ctx.mine.positions[rows], delta)
            ctx.scratch[key] = None if ratio is None else ratio.to(device)
        return ctx.scratch[key]

    @staticmethod
    def _query_rows_at(ctx, kind=None) -> tuple[slice, int]:
        """(local rows of the query's copy, true position - its position), once per prompt from the
        layout on the CPU: a slice and an int, so no layer syncs with the device over them."""
        key = ("query_rows", kind)
        if key not in ctx.scratch:
            mine = ctx.mine
            held = (mine.indices >= ctx.n_ctx) & (mine.indices < ctx.n_tokens)
            if kind is not None:
                held &= torch.cat([torch.full((c.size,), c.kind == kind) for c in mine.chunks])
            rows = held.nonzero().flatten().tolist()
            if rows and rows != list(range(rows[0], rows[-1] + 1)):
                raise RuntimeError(f"the query's rows on host {ctx.rank} are not contiguous: {rows}")
            deltas = (mine.indices - mine.positions)[rows].tolist()
            if len(set(deltas)) > 1:  # the layout keeps the query contiguous
                raise RuntimeError(f"the query's rows sit at uneven offsets from their true positions: {deltas}")
            ctx.scratch[key] = (slice(rows[0], rows[-1] + 1) if rows else slice(0, 0), deltas[0] if deltas else 0)
        return ctx.scratch[key]


_UNMOVABLE = ("the query compressor scores with the query moved to its true positions, which needs a rotary "
              "embedding whose rotation apb can reproduce (fixed frequencies, or ones fixed per prompt); {why}. "
              "Set method.query_positions: anchor (score at the anchor copy's positions) or use a compressor that "
              "does not score against the query (stride, retaining_heads)")


def _share(host, p: int) -> int:
    """Passing tokens host ``host`` sends: ``p``, or its whole block if that is smaller."""
    return min(p, host.blocks()[0].size)


def _pre_rope_rows(ctx, layer, rows):
    pre = ctx.scratch.get(("pre_rope", layer))
    return None if pre is None else tuple(t[:, rows] for t in pre)
