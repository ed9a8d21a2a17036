"""Exact layers inside an approximate method: chosen layers attend exactly, at balanced cost.

On SmolLM2-135M the approximate methods lose documents that full attention answers, and the loss
goes away when the first third of the layers see every earlier token (``docs/accuracy.md``
sections 6-7): the drift those layers start carries through the residual stream to the query.
Passing whole blocks in those layers gives that back, but unbalanced: host ``r`` then attends
``r + 1`` blocks, so the last host works ``W`` blocks while host 0 works one, and the layer costs
about twice a balanced exact method's (ring's ``n^2 / 2W`` pairs per host).

Here the context rows of an exact layer go from sequence shards to head shards (Ulysses' exchange,
one packed all-to-all each way): host ``j`` receives every host's block rows for its ``ceil(H/W)``
query heads and the KV heads they use (:func:`apb.methods.ulysses.kv_shares`), attends the whole
context causally, and sends each host its rows back. Every host does ``n^2 / 2`` pairs for
``ceil(H/W)`` heads: the balanced exact cost, whatever the layout's block sizes. The rows this
moves are each host's blocks, which must be the context's runs in host order (the anchored
layout puts host ``i``'s block at the ``i``-th run); rows outside them (an anchor's copy of the
prompt's start, a query copy kept for scoring) are the method's own business.
"""

from __future__ import annotations

import torch

from apb.kernels import attention
from apb.methods.ulysses import kv_shares, plain_grouping


def head_plan(heads: int, kv_heads: int, world: int, rank: int) -> tuple[int, list[int], list[int] | None]:
    """(query heads per host ``s = ceil(H/W)``; the KV heads each host is sent, ``m`` per host in
    host order; the KV head among its ``m`` each of this host's query heads reads, or None when
    the kernel's own grouping (``s / m`` query heads per KV head, in order) already does)."""
    share = -(-heads // world)
    sent, index = kv_shares(heads, kv_heads, world)
    m = len(sent) // world
    return share, list(sent), None if plain_grouping(index[rank], share, m) else list(index[rank])


def exact_rows(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: slice, sizes: list[int],
               scale: float) -> torch.Tensor:
    """Exact causal attention of this host's context ``rows`` over every host's, by head shards.

    ``sizes[i]`` is host ``i``'s row count; host ``i``'s rows are the ``i``-th run of the context
    in global order. Returns (batch, H, rows, dv).
    """
    comm, rank, world = ctx.comm, ctx.rank, ctx.comm.size
    batch, heads, _, dq = q.shape
    kv_heads, dk, dv = k.shape[1], k.shape[-1], v.shape[-1]
    share, sent, index = head_plan(heads, kv_heads, world, rank)
    m = len(sent) // world
    qr, kr, vr = q[:, :, rows], k[:, :, rows], v[:, :, rows]
    if share * world > heads:  # zero heads fill the last shares; their outputs are dropped
        qr = torch.cat([qr, qr.new_zeros(batch, share * world - heads, *qr.shape[2:])], 1)
    sent_t = _index(ctx, sent, k.device)

    def packed(j: int) -> torch.Tensor:  # what host j needs of my rows: its query heads and their KV heads
        kv = sent_t[j * m:(j + 1) * m]
        return torch.cat([qr[:, j * share:(j + 1) * share].reshape(-1), kr[:, kv].reshape(-1),
                          vr[:, kv].reshape(-1)])

    width = share * dq + m * (dk + dv)
    got = comm.exchange({j: packed(j) for j in range(world) if j != rank},
                        {i: (batch * sizes[i] * width,) for i in range(world) if i != rank}, q.dtype, q.device,
                        op="exact_layer")
    got[rank] = packed(rank)
    qs, ks, vs = [], [], []
    for i in range(world):
        n, flat = sizes[i], got[i]
        a, b = batch * share * n * dq, batch * m * n * dk
        qs.append(flat[:a].view(batch, share, n, dq))
        ks.append(flat[a:a + b].view(batch, m, n, dk))
        vs.append(flat[a + b:].view(batch, m, n, dv))
    keys, vals = torch.cat(ks, 2), torch.cat(vs, 2)
    if index is not None:  # this host's query heads read its KV heads unevenly: one per query head
        idx = _index(ctx, index, k.device)
        keys, vals = keys[:, idx], vals[:, idx]
    opts = dict(ctx.score_opts)
    if opts.get("sinks") is not None:  # the sinks of this host's heads (zero for the padding heads)
        sinks = opts["sinks"]
        sinks = torch.cat([sinks, sinks.new_zeros(share * world - heads)]) if share * world > heads else sinks
        opts["sinks"] = sinks.view(world, share)[rank]
    out, _ = attention(torch.cat(qs, 2), keys, vals, causal=True, scale=scale, **opts)
    out = out.to(q.dtype)
    starts = [sum(sizes[:i]) for i in range(world)]
    mine = sizes[rank]
    back = comm.exchange({i: out[:, :, starts[i]:starts[i] + sizes[i]].reshape(-1) for i in range(world) if i != rank},
                         {j: (batch * share * mine * dv,) for j in range(world) if j != rank}, q.dtype, q.device,
                         op="exact_layer")
    back[rank] = out[:, :, starts[rank]:starts[rank] + mine]
    parts = [back[j].view(batch, share, mine, dv) for j in range(world)]
    return torch.cat(parts, 1)[:, :heads]


def _index(ctx, values: list[int], device) -> torch.Tensor:
    """A head index on the device, built once per prompt (not a host-to-device copy per layer)."""
    key = ("exact_layers_index", tuple(values), str(device))
    if key not in ctx.scratch:
        ctx.scratch[key] = torch.tensor(values, device=device)
    return ctx.scratch[key]
