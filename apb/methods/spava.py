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

With ``method.share_anchor`` the anchor is split instead of recomputed: host ``r`` holds only the
share it caches, sends that share's K/V in the same all-gather as the passing blocks, and its
share's rows attend the whole anchor up to them (the shares before theirs arrived with it), so
each anchor row runs through the linear layers on one host, not on all ``W``. Every other row
sees the same keys as before.
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
from apb.parallel.comm import pad_along


@dataclass(frozen=True)
class SpavaPlan:
    anchor_len: int
    passing: tuple[int, ...]  # per layer, tokens per virtual block; 0 in exact layers
    exact: frozenset[int] = frozenset()  # layers whose blocks attend exactly (apb.methods.exact_layers)


@register_method("spava")
class Spava(Method):
    exact = False
    has_anchor = True
    shares_anchor = True
    share_anchor_default = True  # the split anchor: less work, no new message, the same attention
    splits_anchor = True  # share_anchor: split is share_anchor: true
    variants = {"uncompressed": {"anchor_len": 0, "passing_len": "all"}, "shared": {"share_anchor": True},
                "unshared": {"share_anchor": False}}

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
        per_token = 2 * shape.kv_heads * shape.head_dim * shape.bytes_per_param
        if cls.shares_anchor_with(sizes) and a > 0:
            # a split anchor: each host runs its 1/W share of the anchor rows; host W-1's share
            # attends the whole anchor before it. The shares' K/V travel with the passing blocks
            anchor_tokens, anchor_pairs = a / w, a * a / w - a * a / (2 * w * w)
            anchor_bytes = (w - 1) * a / w * per_token
        else:
            anchor_tokens, anchor_pairs, anchor_bytes = a, a * a / 2, 0.0

        def layer(p):
            pairs = anchor_pairs + v * a + v * v / 2 + v * (a + v + (2 * w - 2) * p) + v * v / 2 + fused
            gathered = (w - 1) * 2 * p * per_token + anchor_bytes
            return HostWork(anchor_tokens + 2 * v + q, pairs, a / w + 2 * v, comm_bytes=merge_bytes(q, shape),
                            steps=2, overlap_bytes=gathered, anchor=a, passing=p)

        def exact_layer():  # the anchor, a head shard of the blocks over the anchor and each other, the query
            pairs, moved = exact_work(n - a, a, w, shape)
            # a split anchor's shares arrive before the exchange: a step not hidden behind compute
            return HostWork(anchor_tokens + 2 * v + q, anchor_pairs + pairs + fused, a / w + 2 * v,
                            comm_bytes=merge_bytes(q, shape) + moved + anchor_bytes,
                            steps=3 + (anchor_bytes > 0), anchor=a)

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
        if self.config.share_anchor and world > 1:
            # a split anchor: every host's share received (padded to the largest), then the whole
            # anchor's K/V put together, beside the passing blocks
            share = -(-self.anchor_len(n_tokens, world) // world)
            passed += 2 * world * share * per_tok
        return with_exchange(passed, self.config, local, n_tokens, world, model_config, dtype_bytes)

    def layout(self, n_tokens, world_size, n_query=0):
        n_ctx = n_tokens - n_query
        return layout.spava(n_ctx, n_query, world_size, self.anchor_len(n_ctx, world_size),
                            split_anchor=bool(self.config.share_anchor))

    def attention(self, ctx, module, q, k, v, scale):
        comm, mine, layer, opts = ctx.comm, ctx.mine, int(module.layer_idx), ctx.score_opts
        rows = {(c.kind, c.chunk_id): r for c, r in mine.chunk_rows()}
        a, qr = mine.rows("anchor"), mine.rows("query")
        first, second = mine.blocks()
        r1, r2 = rows[("block", first.chunk_id)], rows[("block", second.chunk_id)]
        q_query = q[:, :, qr]
        split = self._splits_anchor(ctx)
        pending = self._share(ctx, layer, q_query, k, v, scale, (r1, r2), a if split else None)

        out = q.new_empty(*q.shape[:3], v.shape[-1])
        has_anchor = a.stop > a.start
        if has_anchor and not split:
            out[:, :, a] = attention(q[:, :, a], k[:, :, a], v[:, :, a], causal=True, scale=scale, **opts)[0]
        q_part = None
        if qr.stop > qr.start:
            share = [r for c, r in mine.chunk_rows() if c.is_cached and c.kind != "query"]
            keys, vals = _rows(k, share), _rows(v, share)
            q_part = local_partial(q_query, keys, vals, k[:, :, qr], v[:, :, qr], scale, ctx.rank == 0, **opts)
            # the fused query's merge travels while the blocks are attended
            q_part = merge_over_hosts_start(comm, *q_part)
        if layer in ctx.plan.exact:  # both blocks over the anchor and every earlier block, by head shards
            received, anchor_kv = pending.wait() if pending is not None else (None, None)
            if split:
                anchor_kv = _joined(anchor_kv)
                self._anchor_share_rows(ctx, q, a, anchor_kv, out, scale)
            else:
                anchor_kv = (k[:, :, a], v[:, :, a])
            owners, sizes = context_runs(ctx.slices, ctx.plan.anchor_len)
            out[:, :, r1], out[:, :, r2] = exact_rows(ctx, q, k, v, [(first.chunk_id, r1), (second.chunk_id, r2)],
                                                      owners, sizes, scale, prefix=anchor_kv)
            if q_part is not None:
                out[:, :, qr] = q_part().to(q.dtype)
            return out
        # each block causally over itself while the passing blocks (and a split anchor's shares)
        # travel; then, in one call, over what precedes it: the passing blocks it sees and, in
        # full, the anchor and what is here before it
        own1 = attention(q[:, :, r1], k[:, :, r1], v[:, :, r1], causal=True, scale=scale, **opts)
        own2 = attention(q[:, :, r2], k[:, :, r2], v[:, :, r2], causal=True, scale=scale, **opts)
        received, anchor_kv = pending.wait() if pending is not None else (None, None)
        if (has_anchor and a.stop != r1.start) or r1.stop != r2.start:  # [anchor, block, block, query]
            raise RuntimeError(f"spava's layout on host {ctx.rank} is not [anchor, block, block, query]: anchor "
                               f"rows {a}, blocks {r1} and {r2}")
        if split:  # the gathered anchor's shares, then block 1
            here = [*anchor_kv, (k[:, :, r1], v[:, :, r1])]
            n_anchor = sum(kb.shape[2] for kb, _ in anchor_kv)
        else:  # the anchor and block 1 are one run of rows here: a view
            start = a.start if has_anchor else r1.start
            here = [(k[:, :, start:r1.stop], v[:, :, start:r1.stop])]
            n_anchor = a.stop - a.start if has_anchor else 0
        keys, vals, n_first, at = self._keys(ctx, layer, second.chunk_id, received, here, n_anchor, q.shape[-1])
        if split:  # this host's share of the anchor rows, over the anchor up to its last row
            self._anchor_share_rows(ctx, q, a, (keys[:, :, at:], vals[:, :, at:]), out, scale)
        out[:, :, r1] = self._with_before(q, r1, own1, keys[:, :, :n_first], vals[:, :, :n_first], ctx, scale)
        out[:, :, r2] = self._with_before(q, r2, own2, keys, vals, ctx, scale)
        if q_part is not None:
            out[:, :, qr] = q_part().to(q.dtype)
        return out

    def _splits_anchor(self, ctx) -> bool:
        """Whether the anchor's rows are split over the hosts (``method.share_anchor``)."""
        return bool(self.config.share_anchor) and ctx.comm.size > 1 and ctx.plan.anchor_len > 0

    @staticmethod
    def _anchor_share_rows(ctx, q, a, anchor_kv, out, scale) -> None:
        """A split anchor: this host's share of the anchor rows, causally over the whole anchor's
        K/V up to its last row (the shares before it arrived with the all-gather); ``anchor_kv``
        starts with the whole anchor's rows."""
        if a.stop == a.start:
            return
        hi = next(c.stop for c in ctx.mine.chunks if c.kind == "anchor")
        ak, av = anchor_kv
        # the share is the last rows of the keys up to ``hi``: a bottom-right causal call
        out[:, :, a] = attention(q[:, :, a], ak[:, :, :hi], av[:, :, :hi], causal=True, scale=scale,
                                 **ctx.score_opts)[0]

    @staticmethod
    def _with_before(q, rows, own, keys, vals, ctx, scale):
        """``own`` (the block over itself) merged with one call over ``keys``: everything before
        the block that it sees, attended in full."""
        if not keys.shape[2]:
            return own[0].to(q.dtype)
        part = attention(q[:, :, rows], keys, vals, causal=False, scale=scale, **ctx.score_opts)
        return merge_many([own, part])[0].to(q.dtype)

    def _keys(self, ctx, layer, second_id, received, here, n_anchor, dk):
        """The keys and values virtual block 2 attends before itself, in one tensor whose first
        ``n_first`` rows are all that block 1 attends before itself, so one copy serves both:
        the passing blocks block 1 sees (hosts before this one, first slots), the anchor and block
        1 (``here``: (K, V) pairs in that order), then the passing blocks only block 2 sees. Also
        where the anchor starts in it. A single part is returned as it is (a view)."""
        remote = self._remote(second_id, received, ctx, layer, dk)
        # block 1 (virtual block ``rank``) sees exactly the first ``rank`` of block 2's sources
        mine = ctx.rank if remote else 0
        parts = remote[:mine] + here + remote[mine:]
        at = sum(kb.shape[2] for kb, _ in remote[:mine])
        keys, vals = _joined([(kb, vb) for kb, vb in parts if kb.shape[2]])
        return keys, vals, at + n_anchor, at

    def _share(self, ctx, layer, q_query, k, v, scale, block_rows, anchor_rows):
        """Start this layer's one all-gather: both virtual blocks' passing tokens and, where the
        anchor is split (``anchor_rows``: this host's share), the share's K/V. None when neither
        travels."""
        passing = self._passing_shares(ctx, layer, q_query, k, v, scale, block_rows)
        if anchor_rows is None:
            return None if passing is None else _Gathered(ctx.comm.all_gather_start(passing))
        sizes = [sum(c.size for c in s.chunks if c.kind == "anchor") for s in ctx.slices]
        # every host sends the same size: the largest share
        share = pad_along(torch.cat([k[:, :, anchor_rows], v[:, :, anchor_rows]], -1), 2, max(sizes))
        flat = share.reshape(-1) if passing is None else torch.cat([passing.reshape(-1), share.reshape(-1)])
        return _Gathered(ctx.comm.all_gather_start(flat), None if passing is None else passing.shape,
                         (share.shape, sizes, k.shape[-1]))

    def _passing_shares(self, ctx, layer, q_query, k, v, scale, block_rows):
        """Both virtual blocks' passing tokens, K and V side by side, padded to one width:
        (2, batch, kv_heads, width, dk + dv); None where nothing is passed."""
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
            shares.append(pad_along(torch.cat([take(kb, idx), take(vb, idx)], -1), 2, width))
        if chosen:  # both virtual blocks, side by side: (kv_heads, p_first + p_second)
            ctx.scratch[("passing", layer)] = torch.cat(chosen, -1)
        return torch.stack(shares)

    @staticmethod
    def _remote(block_id, received, ctx, layer, dk) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The (K, V) of the passing blocks virtual block ``block_id`` sees, in the order of
        :func:`layout.spava_passing_sources` (none before they arrive)."""
        if received is None:
            return []
        p = ctx.plan.passing[layer]
        parts = []
        for host, slot in layout.spava_passing_sources(block_id, ctx.comm.size):
            size = min(p, ctx.slices[host].blocks()[slot].size)
            parts.append((received[host][slot, :, :, :size, :dk], received[host][slot, :, :, :size, dk:]))
        return parts


class _Gathered:
    """The layer's all-gather in flight; ``wait()`` gives (every host's passing shares or None,
    the anchor's shares as (K, V) views in the hosts' order, or None)."""

    def __init__(self, pending, passing_shape=None, anchor=None):
        self.pending, self.passing_shape, self.anchor = pending, passing_shape, anchor

    def wait(self):
        parts = self.pending.wait()
        if self.anchor is None:
            return parts, None
        shape, sizes, dk = self.anchor
        at = 0 if self.passing_shape is None else self.passing_shape.numel()
        passing = None if self.passing_shape is None else [t[:at].view(self.passing_shape) for t in parts]
        shares = [t[at:].view(shape)[:, :, :n] for t, n in zip(parts, sizes)]
        return passing, [(x[..., :dk], x[..., dk:]) for x in shares if x.shape[2]]


def _joined(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, V) pairs along the rows, as one (K, V) pair."""
    if len(parts) == 1:
        return parts[0]
    return torch.cat([kb for kb, _ in parts], 2), torch.cat([vb for _, vb in parts], 2)


def _rows(x: torch.Tensor, runs: list[slice]) -> torch.Tensor:
    """``x``'s rows (dim 2) at ``runs`` in order: a view when they follow one another, else a
    copy: the part of the anchor a host caches need not sit next to its blocks (the layout caches
    each anchor token on one host only; e.g. 3 hosts, 100 tokens, anchor 10)."""
    if all(a.stop == b.start for a, b in zip(runs, runs[1:])):
        return x[:, :, runs[0].start:runs[-1].stop]
    return torch.cat([x[:, :, r] for r in runs], 2)
