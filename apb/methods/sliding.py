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

So ring and Ulysses stay exact, and star, apb and spava apply their approximation to the
global layers alone: their sliding layers see exactly the keys a single device would, computed
from the hidden states each host has. A layer whose window covers the whole prompt is a global
layer for that prompt and goes to the method as usual (:meth:`AttnContext.step`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from apb.kernels import attention
from apb.parallel.layout import ChunkKind, HostSlice

_REAL_KINDS = (ChunkKind.BLOCK, ChunkKind.QUERY)
#: query rows per kernel call in a sliding layer (at least the window): bounds the masked scores
_TILE = 512


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


def _local_real(slices: list[HostSlice], rank: int) -> dict[int, int]:
    """{global index: local row} of host ``rank``'s real tokens (padding excluded)."""
    out, offset = {}, 0
    for c, real in zip(slices[rank].chunks, real_chunks(slices, rank)):
        if real:
            for i in range(c.start, min(c.stop, slices[rank].n_tokens)):
                out.setdefault(i, offset + i - c.start)
        offset += c.size
    return out


def _needs(slices: list[HostSlice], rank: int, window: int, local: dict[int, int]) -> list[int]:
    """Global indices host ``rank``'s real rows see in the window and do not hold themselves."""
    need: set[int] = set()
    n = slices[rank].n_tokens
    for c, real in zip(slices[rank].chunks, real_chunks(slices, rank)):
        if real and c.start < n:
            need.update(i for i in range(max(0, c.start - window + 1), c.start) if i not in local)
    return sorted(need)


def halo_plan(slices: list[HostSlice], rank: int, window: int) -> HaloPlan:
    """The halo exchange of host ``rank`` (pure: every host derives every other host's needs).

    A needed index comes from the host holding it in a block (each index has at most one).
    """
    locals_ = [_local_real(slices, r) for r in range(len(slices))]
    block_owner = {}
    for s in slices:
        for c in s.blocks():
            for i in range(c.start, min(c.stop, s.n_tokens)):
                block_owner[i] = s.rank
    recv: dict[int, list[int]] = {}
    send: dict[int, list[int]] = {}
    for r in range(len(slices)):
        for i in _needs(slices, r, window, locals_[r]):
            src = block_owner.get(i)
            if src is None:
                raise RuntimeError(f"sliding window: token {i}, needed by host {r}, is held by no host as a block "
                                   "(a layout this exchange does not know)")
            if r == rank:
                recv.setdefault(src, []).append(i)
            if src == rank:
                send.setdefault(r, []).append(i)
    mine = locals_[rank]
    return HaloPlan(window,
                    {s: torch.tensor(ix, dtype=torch.long) for s, ix in sorted(recv.items())},
                    {d: torch.tensor(ix, dtype=torch.long) for d, ix in sorted(send.items())},
                    {d: torch.tensor([mine[i] for i in ix], dtype=torch.long) for d, ix in sorted(send.items())})


def sliding_attention(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      window: int) -> torch.Tensor:
    """This host's rows of one sliding layer, exact (see module doc); ``ctx`` is its AttnContext."""
    mine, opts = ctx.mine, ctx.score_opts
    key = ("halo", window)
    if key not in ctx.scratch:
        ctx.scratch[key] = halo_plan(ctx.slices, ctx.rank, window)
    plan: HaloPlan = ctx.scratch[key]
    dk = k.shape[-1]
    kv = torch.cat([k, v], dim=-1)[0]  # (kv_heads, local_len, dk + dv): one message per peer
    sends = {dst: kv[:, rows.to(kv.device)] for dst, rows in plan.send_rows.items()}
    shapes = {src: (kv.shape[0], idx.numel(), kv.shape[2]) for src, idx in plan.recv.items()}
    got = ctx.comm.exchange(sends, shapes, kv.dtype, kv.device, op="halo_exchange")

    positions = mine.positions.to(q.device)
    real = real_chunks(ctx.slices, ctx.rank)
    rows = mine.chunk_rows()
    real_rows = [r for (c, r), is_real in zip(rows, real) if is_real]
    copy_rows = [r for (c, r), is_real in zip(rows, real) if not is_real]
    # the pool of real keys: this host's real rows (padding included: it lies after every real
    # query, so the causal mask hides it) and the halo, each with its position
    pool_pos = torch.cat([positions[r] for r in real_rows] + [idx.to(q.device) for idx in plan.recv.values()])
    pool = torch.cat([kv[:, r] for r in real_rows] + [got[src] for src in plan.recv], dim=1)
    out = q.new_empty(*q.shape[:3], v.shape[-1])
    tile = max(window, _TILE)  # rows per call: each call sees at most tile + window keys
    for chunk in real_rows:
        for lo in range(chunk.start, chunk.stop, tile):
            r = slice(lo, min(lo + tile, chunk.stop))
            q_pos = positions[r]
            near = (pool_pos > q_pos.min() - window) & (pool_pos <= q_pos.max())
            keys = pool[:, near][None]
            out[:, :, r] = attention(q[:, :, r], keys[..., :dk], keys[..., dk:], causal=True, scale=scale,
                                     window=window, q_pos=q_pos, k_pos=pool_pos[near], **opts)[0]
    if copy_rows:
        cr = torch.cat([torch.arange(r.start, r.stop) for r in copy_rows]).to(q.device)
        out[:, :, cr] = attention(q[:, :, cr], k[:, :, cr], v[:, :, cr], causal=True, scale=scale, window=window,
                                  q_pos=positions[cr], k_pos=positions[cr], **opts)[0]
    return out
