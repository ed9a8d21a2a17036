"""``spava``: APB refined for balance and overlap.

Host ``r`` holds ``[A, V_r, V_{2W-1-r}, Q]``: the anchor ``A`` (the first ``anchor_len``
context tokens, exact: it only sees itself), two zigzag virtual blocks of the rest of the
context, and the query ``Q``, fused into the same pass. Per layer::

    rows \\ keys  P_j (other hosts)       A        V_r      V_{2W-1-r}   Q
    A            -                      causal   -        -            -
    V_r          j < r                  all      causal   -            -
    V_{2W-1-r}   j < 2W-1-r, j != r     all      all      causal       -
    Q            exact over every host's cached share (A/W slice, V_r, V_{2W-1-r}) + Q causally

A virtual block sees the local block before it in full (it is already here) and the passing
blocks of the earlier virtual blocks held elsewhere. The passing all-gather is issued before the
anchor, the query and each block's causal attention over itself, and waited on only after them,
so it overlaps compute; each block then attends everything before it in one call.
Each host caches its ``1/W`` share of the anchor; host 0 caches the query.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from apb.kernels import attention, merge_many
from apb.methods.registry import register_method
from apb.methods.base import Method
from apb.methods.cache_attention import local_partial, merge_over_hosts_start
from apb.methods.compressors import ScoreInputs, build_compressor, take
from apb.methods.cost import HostWork, merge_bytes, over_layers
from apb.methods.exact_layers import context_runs, exact_rows, exact_work, with_exchange
from apb.methods.sizes import resolve_exact_layers, resolve_len, resolve_passing
from apb.parallel import layout


@dataclass(frozen=True)
class SpavaPlan:
    anchor_len: int
    passing: tuple[int, ...]  # per layer, tokens per virtual block; 0 in exact layers
    exact: frozenset[int] = frozenset()  # layers whose blocks attend exactly (apb.methods.exact_layers)


@register_method("spava")
class Spava(Method):
    exact = False
    has_anchor = True
    variants = {"uncompressed": {"anchor_len": 0, "passing_len": "all"}}

    def __init__(self, config):
        super().__init__(config)
        self.compressor = build_compressor(self.config.compressor, **self.config.model_dump(exclude={"name", "compressor"}))

    @classmethod
    def default_sizes(cls, n_ctx, block):
        # fractions of the whole context, not of a block: the anchor and the passing blocks of
        # every virtual block grow with n alone
        return n_ctx / 64, n_ctx / 128

    @classmethod
    def cost(cls, n, w, shape, sizes):
        # host 0 holds the first and last virtual blocks: the last sees 2W-2 passing blocks;
        # the fused query sees a 1/W share of the anchor and both local blocks. Its two passing
        # blocks' K and V go to the W-1 others while its blocks attend themselves
        q = sizes.query
        a_def, p_def = cls.default_sizes(n, n / w)
        a = a_def if sizes.anchor_len is None else resolve_len(sizes.anchor_len, n / w, a_def, 1, "anchor_len")
        a = max(0.0, min(a, n - 2 * w))
        v = (n - a) / (2 * w)
        if sizes.passing_len is None:
            passing = [min(p_def, v)] * shape.layers
        else:
            passing = resolve_passing(sizes.passing_len, v, p_def, 1, shape.layers)

        exact = resolve_exact_layers(sizes.exact_layers, shape.layers)
        fused = q * (a / w + 2 * v)

        def layer(p):
            pairs = a * a / 2 + v * a + v * v / 2 + v * (a + v + (2 * w - 2) * p) + v * v / 2 + fused
            gathered = (w - 1) * 2 * p * 2 * shape.kv_heads * shape.head_dim * shape.bytes_per_param
            return HostWork(a + 2 * v + q, pairs, a / w + 2 * v, comm_bytes=merge_bytes(q, shape), steps=2,
                            overlap_bytes=gathered, anchor=a, passing=p)

        def exact_layer():  # the anchor, a head shard of the blocks over the anchor and each other, the query
            pairs, moved = exact_work(n - a, a, w, shape)
            return HostWork(a + 2 * v + q, a * a / 2 + pairs + fused, a / w + 2 * v,
                            comm_bytes=merge_bytes(q, shape) + moved, steps=3, anchor=a)

        return over_layers([exact_layer() if i in exact else layer(p) for i, p in enumerate(passing)])

    def anchor_len(self, n_ctx: int, world_size: int) -> int:
        block = -(-n_ctx // world_size)
        value = resolve_len(self.config.anchor_len, block, self.default_sizes(n_ctx, block)[0], self.config.round_to,
                            "anchor_len")
        return max(0, min(value, n_ctx - 2 * world_size))

    def plan(self, n_tokens, world_size, n_query, num_layers):
        n_ctx = n_tokens - n_query
        anchor = self.anchor_len(n_ctx, world_size)
        vblock = -(-(n_ctx - anchor) // (2 * world_size))
        default = self.default_sizes(n_ctx, -(-n_ctx // world_size))[1]
        passing = resolve_passing(self.config.passing_len, vblock, default, self.config.round_to, num_layers)
        exact = resolve_exact_layers(self.config.exact_layers, num_layers) if world_size > 1 else frozenset()
        # an exact layer's blocks see every earlier token: nothing to pass there
        return SpavaPlan(anchor, tuple(0 if i in exact else p for i, p in enumerate(passing)), exact)

    def transfer_bytes(self, local, n_tokens, world, per_tok, passing, model_config, dtype_bytes):
        passed = super().transfer_bytes(local, n_tokens, world, per_tok, passing, model_config, dtype_bytes)
        return with_exchange(passed, self.config, local, n_tokens, world, model_config, dtype_bytes)

    def layout(self, n_tokens, world_size, n_query=0):
        n_ctx = n_tokens - n_query
        return layout.spava(n_ctx, n_query, world_size, self.anchor_len(n_ctx, world_size))

    def capture_pre_rope(self) -> bool:
        return self.compressor.needs_pre_rope

    def attention(self, ctx, module, q, k, v, scale):
        comm, mine, layer, opts = ctx.comm, ctx.mine, int(module.layer_idx), ctx.score_opts
        rows = {(c.kind, c.chunk_id): r for c, r in mine.chunk_rows()}
        a, qr = mine.rows("anchor"), mine.rows("query")
        first, second = mine.blocks()
        r1, r2 = rows[("block", first.chunk_id)], rows[("block", second.chunk_id)]
        q_query = q[:, :, qr]
        pending = self._share_passing(ctx, layer, q_query, k, v, scale, (r1, r2))

        out = q.new_empty(*q.shape[:3], v.shape[-1])
        has_anchor = a.stop > a.start
        if has_anchor:
            out[:, :, a] = attention(q[:, :, a], k[:, :, a], v[:, :, a], causal=True, scale=scale, **opts)[0]
        q_part = None
        if qr.stop > qr.start:
            share = [r for c, r in mine.chunk_rows() if c.is_cached and c.kind != "query"]
            keys, vals = _rows(k, share), _rows(v, share)
            q_part = local_partial(q_query, keys, vals, k[:, :, qr], v[:, :, qr], scale, ctx.rank == 0, **opts)
            # the fused query's merge travels while the blocks are attended
            q_part = merge_over_hosts_start(comm, *q_part)
        if layer in ctx.plan.exact:  # both blocks over the anchor and every earlier block, by head shards
            owners, sizes = context_runs(ctx.slices, a.stop - a.start)
            out[:, :, r1], out[:, :, r2] = exact_rows(ctx, q, k, v, [(first.chunk_id, r1), (second.chunk_id, r2)],
                                                      owners, sizes, scale, prefix=a)
            if q_part is not None:
                out[:, :, qr] = q_part().to(q.dtype)
            return out
        # each block causally over itself while the passing blocks travel; then, in one call, over
        # what precedes it: the passing blocks it sees and, in full, what is here before it
        own1 = attention(q[:, :, r1], k[:, :, r1], v[:, :, r1], causal=True, scale=scale, **opts)
        own2 = attention(q[:, :, r2], k[:, :, r2], v[:, :, r2], causal=True, scale=scale, **opts)
        received = pending.wait() if pending is not None else None
        if (has_anchor and a.stop != r1.start) or r1.stop != r2.start:  # "before" is one run of rows
            raise RuntimeError(f"spava's layout on host {ctx.rank} is not [anchor, block, block, query]: anchor "
                               f"rows {a}, blocks {r1} and {r2}")
        before1 = a if has_anchor else slice(r1.start, r1.start)
        before2 = slice(before1.start, r1.stop)
        out[:, :, r1] = self._with_before(q, k, v, r1, own1, before1, first.chunk_id, received, ctx, layer, scale)
        out[:, :, r2] = self._with_before(q, k, v, r2, own2, before2, second.chunk_id, received, ctx, layer, scale)
        if q_part is not None:
            out[:, :, qr] = q_part().to(q.dtype)
        return out

    def _with_before(self, q, k, v, rows, own, before, block_id, received, ctx, layer, scale):
        """``own`` (the block over itself) merged with one call over the passing blocks this block
        sees and the local rows ``before`` it (in full)."""
        ks, vs = self._remote(block_id, received, ctx, layer, q.shape[-1])
        if before.stop > before.start:
            ks.append(k[:, :, before])
            vs.append(v[:, :, before])
        if not ks:
            return own[0].to(q.dtype)
        keys, vals = (ks[0], vs[0]) if len(ks) == 1 else (torch.cat(ks, 2), torch.cat(vs, 2))
        part = attention(q[:, :, rows], keys, vals, causal=False, scale=scale, **ctx.score_opts)
        return merge_many([own, part])[0].to(q.dtype)

    def _share_passing(self, ctx, layer, q_query, k, v, scale, block_rows):
        world = ctx.comm.size
        p = ctx.plan.passing[layer]
        if world == 1 or p <= 0:
            return None
        width = max(min(p, c.size) for s in ctx.slices for c in s.blocks())
        shares, chosen = [], []
        for rows in block_rows:
            kb, vb = k[:, :, rows], v[:, :, rows]
            pre = ctx.scratch.get(("pre_rope", layer))
            x = ScoreInputs(layer, kb, vb, q_query=q_query, scale=scale,
                            pre_rope=None if pre is None else tuple(t[:, rows] for t in pre))
            idx = self.compressor.select(x, min(p, kb.shape[2]))
            if ctx.diagnostics:  # block-local rows -> global prompt indices
                chosen.append(ctx.mine.indices[rows].to(idx.device)[idx[0]])
            # keys and values side by side in the last dim (their head sizes may differ: MLA)
            share = torch.cat([take(kb, idx), take(vb, idx)], -1)
            if share.shape[2] < width:
                share = torch.cat([share, share.new_zeros(*share.shape[:2], width - share.shape[2],
                                                          share.shape[3])], 2)
            shares.append(share)
        if chosen:  # both virtual blocks, side by side: (kv_heads, p_first + p_second)
            ctx.scratch[("passing", layer)] = torch.cat(chosen, -1)
        return ctx.comm.all_gather_start(torch.stack(shares))

    @staticmethod
    def _remote(block_id, received, ctx, layer, dk) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The K and V of the passing blocks virtual block ``block_id`` sees (none before they arrive)."""
        ks, vs = [], []
        if received is None:
            return ks, vs
        p = ctx.plan.passing[layer]
        for host, slot in layout.spava_passing_sources(block_id, ctx.comm.size):
            size = min(p, ctx.slices[host].blocks()[slot].size)
            ks.append(received[host][slot, :, :, :size, :dk])
            vs.append(received[host][slot, :, :, :size, dk:])
        return ks, vs


def _rows(x: torch.Tensor, runs: list[slice]) -> torch.Tensor:
    """``x``'s rows (dim 2) at ``runs`` in order: a view when they follow one another, else a
    copy: the part of the anchor a host caches need not sit next to its blocks (the layout caches
    each anchor token on one host only; e.g. 3 hosts, 100 tokens, anchor 10)."""
    if all(a.stop == b.start for a, b in zip(runs, runs[1:])):
        return x[:, :, runs[0].start:runs[-1].stop]
    return torch.cat([x[:, :, r] for r in runs], 2)
