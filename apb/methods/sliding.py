"""Sliding-window layers, exact under every method: each host fetches the halo its chunks need.

In a sliding layer a query at position ``i`` sees only the keys ``i-w+1 .. i``. Whatever the
method's layout, a host therefore needs, besides its own keys, the ``w-1`` keys before each of
its chunks; they sit on the hosts that hold those positions, possibly several hosts back when
chunks are shorter than the window. Every host computes the same :func:`halo_plan` from the
layout (a pure function), so each knows what to send to whom without asking; one batch of
point-to-point sends moves exactly those keys and values, nothing else.

Rows and keys, on a host:

* *real* rows are the prompt tokens themselves: blocks, the query, and (spava) anchor tokens
  that no host holds as a block. They attend to real keys only, chosen by position: their own
  host's and the halo's; never to an anchor *copy* of a position (star, apb), which is
  computed differently from the real token;
* *copy* rows (an anchor that repeats the start of the context, with or without the embedded
  query) attend to the copy chunks of their own host, by their position ids, as the anchor does
  in every other layer.

Each call is *aligned* wherever it can be (:func:`aligned`): the keys in position order, ending at
the last query's own, so the kernel applies the window itself (flash-attn's ``window_size`` on a
GPU) instead of a mask by positions; the halo is sorted into place and the copy rows see the
anchor only up to their last position, so at the layouts here every call is aligned.

So ring and Ulysses stay exact, and star, apb and spava apply their approximation to the
global layers alone: their sliding layers see exactly the keys a single device would, computed
from the hidden states each host has. A layer whose window covers the whole prompt is a global
layer for that prompt and goes to the method as usual (:meth:`AttnContext.step`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from apb.kernels import attention, windows_natively
from apb.parallel.layout import ChunkKind, HostSlice, split_anchor_positions

_REAL_KINDS = (ChunkKind.BLOCK, ChunkKind.QUERY)
#: query rows per call in a sliding layer whose kernel computes every key it is given under a mask
#: (torch's and the naive one): each call has ``_TILE + window - 1`` keys, so fewer rows waste fewer
#: keys; 1.3-2x faster than tiles of ``max(window, 512)`` rows at windows of 128-4096 on this CPU
#: (session 29). A kernel with its own window (flash-attn) gets a whole chunk per call.
_TILE = 256


def real_chunks(slices: list[HostSlice], rank: int) -> list[bool]:
    """For each chunk of host ``rank``: whether its rows are real prompt tokens (see module doc)."""
    held = [(c.start, c.stop) for s in slices for c in s.chunks if c.kind == ChunkKind.BLOCK]
    out = []
    for c in slices[rank].chunks:
        if c.kind in _REAL_KINDS:
            out.append(True)
        else:  # an anchor is real only where it is the sole holder of its positions, at their own ids
            own_ids = c.pos_start is None or c.pos_start == c.start
            out.append(own_ids and not any(lo < c.stop and c.start < hi for lo, hi in held))
    return out


@dataclass(frozen=True)
class HaloPlan:
    """What one host sends and receives in a sliding layer of window ``window``.

    ``recv[src]`` / ``send[dst]`` are global prompt indices, ascending; ``send_rows[dst]`` are the
    local rows of those indices on this host.
    """

    window: int
    recv: dict[int, torch.Tensor]
    send: dict[int, torch.Tensor]
    send_rows: dict[int, torch.Tensor]


Interval = tuple[int, int]  # [lo, hi) of global prompt indices


def _union(iv: list[Interval]) -> list[Interval]:
    out: list[Interval] = []
    for lo, hi in sorted(i for i in iv if i[0] < i[1]):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _intersect(a: list[Interval], b: list[Interval]) -> list[Interval]:
    """Sorted, disjoint ``a`` and ``b`` -> their intersection, sorted."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if lo < hi:
            out.append((lo, hi))
        i, j = (i + 1, j) if a[i][1] < b[j][1] else (i, j + 1)
    return out


def _subtract(a: list[Interval], b: list[Interval]) -> list[Interval]:
    """Sorted, disjoint ``a`` minus sorted, disjoint ``b``."""
    out = []
    for lo, hi in a:
        for blo, bhi in b:
            if bhi <= lo or blo >= hi:
                continue
            if blo > lo:
                out.append((lo, blo))
            lo = max(lo, bhi)
            if lo >= hi:
                break
        if lo < hi:
            out.append((lo, hi))
    return out


def _arange(iv: list[Interval]) -> torch.Tensor:
    return torch.cat([torch.arange(lo, hi) for lo, hi in iv]) if iv else torch.zeros(0, dtype=torch.long)


def _real_runs(slices: list[HostSlice], rank: int) -> list[tuple[int, int, int]]:
    """(lo, hi, local row of lo) of host ``rank``'s real tokens (padding excluded), each global
    index once (its first chunk)."""
    s, out, seen, offset = slices[rank], [], [], 0
    for c, real in zip(s.chunks, real_chunks(slices, rank)):
        if real:
            for lo, hi in _subtract([(c.start, min(c.stop, s.n_tokens))] if c.start < s.n_tokens else [], _union(seen)):
                out.append((lo, hi, offset + lo - c.start))
            seen.append((c.start, c.stop))
        offset += c.size
    return out


def _needs(slices: list[HostSlice], rank: int, window: int) -> list[Interval]:
    """Global indices host ``rank``'s real rows see in the window and do not hold themselves."""
    n = slices[rank].n_tokens
    want = [(max(0, c.start - window + 1), c.start)
            for c, real in zip(slices[rank].chunks, real_chunks(slices, rank)) if real and c.start < n]
    return _subtract(_union(want), _union([(lo, hi) for lo, hi, _ in _real_runs(slices, rank)]))


def halo_plan(slices: list[HostSlice], rank: int, window: int) -> HaloPlan:
    """The halo exchange of host ``rank`` (pure: every host derives every other host's needs).

    A needed index comes from a host holding it as a real token: in a block, or in spava's anchor
    (split over the hosts, each token on one; whole, every host holds it and needs none of it from
    another); where several hold it, the lowest rank sends. Works on intervals, so its cost grows
    with the number of chunks, not with the prompt's length.
    """
    blocks: dict[int, list[Interval]] = {}
    taken: list[Interval] = []
    for s in slices:
        real = _union([(lo, hi) for lo, hi, _ in _real_runs(slices, s.rank)])
        blocks[s.rank] = _subtract(real, _union(taken))
        taken += real
    held = _union(taken)
    recv: dict[int, torch.Tensor] = {}
    send: dict[int, torch.Tensor] = {}
    send_rows: dict[int, torch.Tensor] = {}
    mine = _real_runs(slices, rank)
    for r in range(len(slices)):
        need = _needs(slices, r, window)
        orphan = _subtract(need, held)
        if orphan:
            raise RuntimeError(f"sliding window: token {orphan[0][0]}, needed by host {r}, is held by no host as a "
                               "real token (a layout this exchange does not know)")
        if r == rank:
            for src, ivs in blocks.items():
                got = _intersect(need, ivs)
                if got:
                    recv[src] = _arange(got)
        if r != rank:
            out = _intersect(need, blocks[rank])
            if out:
                send[r] = _arange(out)
                send_rows[r] = _rows_of(out, mine)
    return HaloPlan(window, dict(sorted(recv.items())), dict(sorted(send.items())), dict(sorted(send_rows.items())))


def _rows_of(iv: list[Interval], runs: list[tuple[int, int, int]]) -> torch.Tensor:
    """Local rows of the global indices ``iv`` (ascending) on a host whose real tokens are ``runs``."""
    parts = []
    for a, b in iv:
        for lo, hi, row in sorted(runs):
            lo2, hi2 = max(a, lo), min(b, hi)
            if lo2 < hi2:
                parts.append(torch.arange(lo2, hi2) - lo + row)
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


@dataclass(frozen=True)
class _Tiles:
    """One host's index work for one window, done once per prompt on the CPU and moved to the
    device once, so a sliding layer indexes with device tensors and never syncs with the host."""

    send_rows: dict[int, torch.Tensor]
    real_rows: list[slice]
    #: the pool's entries in position order (None: they already are)
    order: torch.Tensor | None
    #: (query rows, their positions, the pool entries they may see: a run of the sorted pool, those
    #: entries' positions, whether the call is aligned: see :func:`aligned`)
    tiles: list[tuple[slice, torch.Tensor, slice, torch.Tensor, bool]]
    copy_rows: torch.Tensor | None
    copy_pos: torch.Tensor | None
    #: the copy rows' call is aligned over the anchor's first ``copy_end`` keys (the rest lie after
    #: every copy row of this host); None: masked by positions
    copy_end: int | None


def _tiles(ctx, plan: HaloPlan, device, whole_chunks: bool) -> _Tiles:
    # built on the CPU in the first sliding layer; moved without waiting, so no layer syncs with a GPU
    def dev(t: torch.Tensor) -> torch.Tensor:
        return t.to(device, non_blocking=True)

    mine, window = ctx.mine, plan.window
    positions = mine.positions
    real = real_chunks(ctx.slices, ctx.rank)
    rows = mine.chunk_rows()
    real_rows = [r for (c, r), is_real in zip(rows, real) if is_real]
    copy_rows = [r for (c, r), is_real in zip(rows, real) if not is_real]
    # the pool of real keys: this host's real rows (padding included: it lies after every real
    # query, so the causal mask hides it) and the halo, each with its position
    pool_pos = torch.cat([positions[r] for r in real_rows] + list(plan.recv.values()))
    # in position order (the halo came after this host's rows), what a tile sees is one run of the
    # pool: a view, where copying each tile's keys would copy every key about (tile + window) / tile times
    order = pool_pos.argsort(stable=True)
    pool_pos = pool_pos[order]
    tiles = []
    for chunk in real_rows:
        step = chunk.stop - chunk.start if whole_chunks else _TILE
        for lo in range(chunk.start, chunk.stop, max(1, step)):
            r = slice(lo, min(lo + step, chunk.stop))
            q_pos = positions[r]
            run = slice(int(torch.searchsorted(pool_pos, q_pos.min() - window, right=True)),
                        int(torch.searchsorted(pool_pos, q_pos.max(), right=True)))
            k_pos = pool_pos[run]
            tiles.append((r, dev(q_pos), run, dev(k_pos), aligned(q_pos, k_pos)))
    order = None if torch.equal(order, torch.arange(len(order))) else dev(order)
    cr = torch.cat([torch.arange(r.start, r.stop) for r in copy_rows]) if copy_rows else None
    copy_end = None
    if cr is not None:  # the keys sliding_attention gives the copy rows: the gathered anchor, or the rows themselves
        key_pos = split_anchor_positions(ctx.slices) if getattr(ctx.plan, "split", False) else positions[cr]
        end = int((key_pos <= positions[cr].max()).sum())
        copy_end = end if aligned(positions[cr], key_pos[:end]) else None
    return _Tiles({d: dev(rows) for d, rows in plan.send_rows.items()}, real_rows, order, tiles,
                  None if cr is None else dev(cr), None if cr is None else dev(positions[cr]), copy_end)


def aligned(q_pos: torch.Tensor, k_pos: torch.Tensor) -> bool:
    """Whether queries at ``q_pos`` over keys at ``k_pos`` (in that order) are a bottom-right
    aligned causal call: consecutive queries, and keys the consecutive positions that end at the
    last query's. Such a call's window needs no positions, so a kernel with its own window
    (flash-attn) applies it; any other call is masked by positions (see ``apb.kernels.attention``)."""
    n, m = len(q_pos), len(k_pos)
    if not 0 < n <= m:
        return False
    last = int(q_pos[-1])
    return torch.equal(q_pos, torch.arange(last - n + 1, last + 1)) and \
        torch.equal(k_pos, torch.arange(last - m + 1, last + 1))


def sliding_attention(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      window: int) -> torch.Tensor:
    """This host's rows of one sliding layer, exact (see module doc); ``ctx`` is its AttnContext."""
    opts = ctx.score_opts
    whole_chunks = windows_natively(q, v.shape[-1])
    key = ("halo", window, str(q.device), whole_chunks)
    if key not in ctx.scratch:
        plan = halo_plan(ctx.slices, ctx.rank, window)
        ctx.scratch[key] = (plan, _tiles(ctx, plan, q.device, whole_chunks))
    plan, t = ctx.scratch[key]
    dk = k.shape[-1]
    kv = torch.cat([k, v], dim=-1)[0]  # (kv_heads, local_len, dk + dv): one message per peer
    sends = {dst: kv.index_select(1, rows) for dst, rows in t.send_rows.items()}
    shapes = {src: (kv.shape[0], idx.numel(), kv.shape[2]) for src, idx in plan.recv.items()}
    got = ctx.comm.exchange(sends, shapes, kv.dtype, kv.device, op="halo_exchange")
    pool = torch.cat([kv[:, r] for r in t.real_rows] + [got[src] for src in plan.recv], dim=1)
    if t.order is not None:
        pool = pool.index_select(1, t.order)
    out = q.new_empty(*q.shape[:3], v.shape[-1])
    for r, q_pos, run, k_pos, is_aligned in t.tiles:
        keys = pool[None, :, run]
        by_pos = {} if is_aligned else dict(q_pos=q_pos, k_pos=k_pos)
        out[:, :, r] = attention(q[:, :, r], keys[..., :dk], keys[..., dk:], causal=True, scale=scale,
                                 window=window, **by_pos, **opts)[0]
    if getattr(ctx.plan, "split", False):  # a split anchor: each host's copy rows are a share of it
        copy_k, copy_v, copy_pos = ctx.method.gathered_anchor(ctx, q, k, v)
    elif t.copy_rows is not None:
        copy_k, copy_v, copy_pos = k[:, :, t.copy_rows], v[:, :, t.copy_rows], t.copy_pos
    if t.copy_rows is not None:
        cr, end = t.copy_rows, t.copy_end
        if end is None:
            out[:, :, cr] = attention(q[:, :, cr], copy_k, copy_v, causal=True, scale=scale, window=window,
                                      q_pos=t.copy_pos, k_pos=copy_pos, **opts)[0]
        else:
            out[:, :, cr] = attention(q[:, :, cr], copy_k[:, :, :end], copy_v[:, :, :end], causal=True, scale=scale,
                                      window=window, **opts)[0]
    return out
