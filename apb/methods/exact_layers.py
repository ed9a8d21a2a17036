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
moves are the hosts' blocks, which together must be the context in prompt order
(:func:`context_runs`): one run per host in the anchored layout, two per host in spava's, after
a prefix every host holds (spava's anchor, attended as keys and never sent). Rows outside them
(apb's and star's anchor copy of the prompt's start, a query copy kept for scoring, spava's
fused query) are the method's own business.
"""

from __future__ import annotations

from typing import Any

import torch

from apb.kernels import attention
from apb.methods.ulysses import kv_shares, plain_grouping
from apb.model.features import attention_sizes


def head_plan(heads: int, kv_heads: int, world: int, rank: int) -> tuple[int, list[int], list[int] | None]:
    """(query heads per host ``s = ceil(H/W)``; the KV heads each host is sent, ``m`` per host in
    host order; the KV head among its ``m`` each of this host's query heads reads, or None when
    the kernel's own grouping (``s / m`` query heads per KV head, in order) already does)."""
    share = -(-heads // world)
    sent, index = kv_shares(heads, kv_heads, world)
    m = len(sent) // world
    return share, list(sent), None if plain_grouping(index[rank], share, m) else list(index[rank])


def exact_work(rows: float, prefix: float, world: int, shape) -> tuple[float, float]:
    """(attended pairs over all heads, bytes sent) of one host in one exact layer, the context
    being ``rows`` tokens split evenly over the hosts after a ``prefix`` every host holds: its
    ``ceil(H/W)`` heads of every row over the prefix and causally over the rows, its rows' query
    and KV heads to each other host, and their rows of its heads' output back. ``shape`` has
    ``heads``, ``kv_heads``, ``head_dim`` and ``bytes_per_param``."""
    share, sent, _ = head_plan(shape.heads, shape.kv_heads, world, 0)
    m = len(sent) // world
    pairs = share / shape.heads * (rows * prefix + rows * rows / 2)
    moved = (world - 1) * rows / world * (2 * share + 2 * m) * shape.head_dim * shape.bytes_per_param
    return pairs, moved


def exchange_bytes(local: int, n_tokens: int, world: int, model_config: Any, dtype_bytes: int) -> int:
    """Bytes an exact layer holds at once on a host running ``local`` of ``n_tokens`` rows: every
    host's rows of its heads (q, k, v) and their output, what it sends of its own rows, and its
    rows' output coming back for every head (the memory estimate's term)."""
    heads, kv_heads, dim = attention_sizes(model_config)
    share, sent, _ = head_plan(heads, kv_heads, world, 0)
    m = len(sent) // world
    held = n_tokens * (2 * share + 2 * m) * dim + local * (heads + share * world + 2 * m * world) * dim
    return held * dtype_bytes


def with_exchange(passed: int, config: Any, local: int, n_tokens: int, world: int, model_config: Any,
                  dtype_bytes: int) -> int:
    """A method's communication buffers (``passed``) or, with exact layers, an exact layer's
    exchange where it is larger (:func:`exchange_bytes`)."""
    if world == 1 or not config.exact_layers:
        return passed
    return max(passed, exchange_bytes(local, n_tokens, world, model_config, dtype_bytes))


def context_runs(slices, prefix: int = 0) -> tuple[list[int], list[int]]:
    """(the host holding each run, each run's size): the hosts' blocks in prompt order, run ``i``
    being the block with ``chunk_id`` ``i``, which must cover the context after the first
    ``prefix`` tokens (those every host holds) without a gap. Raises ``ValueError`` on a layout
    the exchange cannot serve."""
    blocks = sorted((c.start, c.stop, host, c.chunk_id) for host, s in enumerate(slices) for c in s.blocks())
    at = prefix
    for i, (start, stop, host, chunk) in enumerate(blocks):
        if start != at or chunk != i:
            raise ValueError(f"exact layers need the hosts' blocks to be the context after its first {prefix} "
                             f"tokens, numbered in order; host {host}'s block {chunk} starts at {start}, expected "
                             f"block {i} at {at}")
        at = stop
    return [b[2] for b in blocks], [b[1] - b[0] for b in blocks]


def exact_rows(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, runs: list[tuple[int, slice]],
               owners: list[int], sizes: list[int], scale: float,
               prefix: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Exact causal attention of this host's context rows over every earlier context token, by head shards.

    The context is ``len(sizes)`` runs in prompt order, run ``i`` on host ``owners[i]`` with
    ``sizes[i]`` rows (:func:`context_runs`); ``runs`` are this host's, as (run index, local rows).
    ``prefix``: the (K, V) of the tokens before the first run, which every host holds (spava's
    anchor, computed here or gathered from the hosts' shares): keys for every run, sent nowhere.
    Returns each of ``runs``' outputs, (batch, H, rows, dv).
    """
    comm, rank, world = ctx.comm, ctx.rank, ctx.comm.size
    batch, heads, _, dq = q.shape
    kv_heads, dk, dv = k.shape[1], k.shape[-1], v.shape[-1]
    share, sent, index = head_plan(heads, kv_heads, world, rank)
    m = len(sent) // world
    sent_t = _index(ctx, sent, k.device)
    mine = sorted(runs, key=lambda run: run[0])
    held = {i: [j for j, o in enumerate(owners) if o == i] for i in range(world)}

    def q_share(j: int, rows: slice) -> torch.Tensor:  # host j's query heads of my rows
        lo, hi = j * share, min((j + 1) * share, heads)
        qj = q[:, lo:max(lo, hi), rows]
        if qj.shape[1] < share:  # zero heads fill the last shares; their outputs are dropped
            qj = torch.cat([qj, qj.new_zeros(batch, share - qj.shape[1], *qj.shape[2:])], 1)
        return qj

    def packed(j: int) -> torch.Tensor:  # what host j needs of my rows: its query heads and their KV heads
        kv = sent_t[j * m:(j + 1) * m]
        return torch.cat([t for _, rows in mine for t in (q_share(j, rows).reshape(-1), k[:, kv, rows].reshape(-1),
                                                           v[:, kv, rows].reshape(-1))])

    width = share * dq + m * (dk + dv)
    got = comm.exchange({j: packed(j) for j in range(world) if j != rank},
                        {i: (batch * sum(sizes[r] for r in held[i]) * width,) for i in range(world) if i != rank},
                        q.dtype, q.device, op="exact_layer")
    got[rank] = packed(rank)
    parts: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for i in range(world):
        flat, at = got[i], 0
        for r in held[i]:
            n = sizes[r]
            a, b, c = batch * share * n * dq, batch * m * n * dk, batch * m * n * dv
            parts[r] = (flat[at:at + a].view(batch, share, n, dq), flat[at + a:at + a + b].view(batch, m, n, dk),
                        flat[at + a + b:at + a + b + c].view(batch, m, n, dv))
            at += a + b + c
    order = range(len(sizes))
    ks, vs = [parts[r][1] for r in order], [parts[r][2] for r in order]
    if prefix is not None and prefix[0].shape[2]:
        kv = sent_t[rank * m:(rank + 1) * m]
        ks.insert(0, prefix[0][:, kv])
        vs.insert(0, prefix[1][:, kv])
    keys, vals = torch.cat(ks, 2), torch.cat(vs, 2)
    if index is not None:  # this host's query heads read its KV heads unevenly: one per query head
        idx = _index(ctx, index, k.device)
        keys, vals = keys[:, idx], vals[:, idx]
    opts = dict(ctx.score_opts)
    if opts.get("sinks") is not None:  # the sinks of this host's heads (zero for the padding heads)
        sinks = opts["sinks"]
        sinks = torch.cat([sinks, sinks.new_zeros(share * world - heads)]) if share * world > heads else sinks
        opts["sinks"] = sinks.view(world, share)[rank]
    # the runs are the last rows of the keys: a bottom-right causal call
    out, _ = attention(torch.cat([parts[r][0] for r in order], 2), keys, vals, causal=True, scale=scale, **opts)
    out = out.to(q.dtype)
    starts = [sum(sizes[:r]) for r in order]

    def rows_of(i: int) -> torch.Tensor:  # host i's runs of my heads' output
        return torch.cat([out[:, :, starts[r]:starts[r] + sizes[r]].reshape(-1) for r in held[i]])

    back = comm.exchange({i: rows_of(i) for i in range(world) if i != rank},
                         {j: (batch * share * sum(sizes[r] for r, _ in mine) * dv,) for j in range(world) if j != rank},
                         q.dtype, q.device, op="exact_layer")
    back[rank] = rows_of(rank)
    mine_out: dict[int, torch.Tensor] = {}
    at = {j: 0 for j in range(world)}
    for r, _ in mine:
        n = batch * share * sizes[r] * dv
        shards = []
        for j in range(world):
            shards.append(back[j][at[j]:at[j] + n].view(batch, share, sizes[r], dv))
            at[j] += n
        mine_out[r] = torch.cat(shards, 1)[:, :heads]
    return [mine_out[r] for r, _ in runs]


def _index(ctx, values: list[int], device) -> torch.Tensor:
    """A head index on the device, built once per prompt (not a host-to-device copy per layer)."""
    key = ("exact_layers_index", tuple(values), str(device))
    if key not in ctx.scratch:
        ctx.scratch[key] = torch.tensor(values, device=device)
    return ctx.scratch[key]
