"""Which tokens each host holds: pure functions of sizes, tested without processes.

A layout maps a prompt of ``n`` tokens onto ``W`` hosts. When ``n`` does not split evenly, the
sequence is padded at its *end* to a multiple of the split unit; pad tokens sit after every real
token, so no real query ever attends to them under a causal mask, and they are dropped from
every output (logits, cache). Indices ``>= n`` in a :class:`HostSlice` are padding.

* ``single``: everything on host 0 (full).
* ``contiguous``: host ``r`` holds chunk ``r`` of ``W`` equal chunks (Ulysses).
* ``zigzag``: the padded sequence is cut into ``2W`` chunks; host ``r`` holds chunks ``r`` and
  ``2W-1-r``, which gives every host the same amount of causal attention work (ring).
* ``anchored`` (star, apb) and ``spava`` split the context unpadded (block sizes differ by at
  most one) and add anchor and query chunks with their own position ids.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch


class ChunkKind(str, enum.Enum):
    """What a :class:`Chunk` holds; a ``str`` enum, so a kind equals its plain string."""

    BLOCK = "block"  #: context this host owns
    ANCHOR = "anchor"  #: a copy of early context (star, apb, spava), with its own position ids
    QUERY = "query"  #: the question tokens


@dataclass(frozen=True)
class Chunk:
    """A run of consecutive prompt indices ``[start, stop)`` held by one host.

    ``kind`` is a :class:`ChunkKind`: ``block``, ``anchor`` or ``query``. Position ids run from
    ``pos_start`` (default: the index itself). ``cached`` says whether this host keeps the
    tokens' K/V for decoding (default: blocks only). ``chunk_id`` orders blocks globally.
    """

    chunk_id: int
    start: int
    stop: int
    kind: ChunkKind = ChunkKind.BLOCK
    pos_start: int | None = None
    cached: bool | None = None

    @property
    def size(self) -> int:
        return self.stop - self.start

    @property
    def positions(self) -> torch.Tensor:
        first = self.start if self.pos_start is None else self.pos_start
        return torch.arange(first, first + self.size)

    @property
    def is_cached(self) -> bool:
        return self.kind == ChunkKind.BLOCK if self.cached is None else self.cached


@dataclass(frozen=True)
class HostSlice:
    """The tokens one host holds, in the order it holds them."""

    rank: int
    n_tokens: int  # real prompt length n (pad excluded)
    chunks: tuple[Chunk, ...] = field(default_factory=tuple)

    @property
    def indices(self) -> torch.Tensor:
        parts = [torch.arange(c.start, c.stop) for c in self.chunks]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    @property
    def positions(self) -> torch.Tensor:
        """Position ids: a block token's global index (pads continue past n); anchors their own."""
        parts = [c.positions for c in self.chunks]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    @property
    def valid(self) -> torch.Tensor:
        """Which local tokens go to this host's KV cache (cached kinds, padding excluded)."""
        parts = [(torch.arange(c.start, c.stop) < self.n_tokens) & c.is_cached for c in self.chunks]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)

    @property
    def size(self) -> int:
        return sum(c.size for c in self.chunks)

    def rows(self, kind: ChunkKind) -> slice:
        """The local rows of the chunks of ``kind``; they must be adjacent."""
        offset, start, stop = 0, None, None
        for c in self.chunks:
            if c.kind == kind:
                if start is not None and stop != offset:
                    raise ValueError(f"{kind} chunks of host {self.rank} are not adjacent")
                start = offset if start is None else start
                stop = offset + c.size
            offset += c.size
        return slice(0, 0) if start is None else slice(start, stop)

    def blocks(self) -> list[Chunk]:
        return [c for c in self.chunks if c.kind == ChunkKind.BLOCK]

    def chunk_rows(self) -> list[tuple[Chunk, slice]]:
        out, offset = [], 0
        for c in self.chunks:
            out.append((c, slice(offset, offset + c.size)))
            offset += c.size
        return out

    def local_index_of(self, global_index: int,
                       kinds: tuple[ChunkKind, ...] = (ChunkKind.BLOCK, ChunkKind.QUERY)) -> int | None:
        """Where prompt token ``global_index`` sits in this host's local sequence, or None.

        Anchor copies are skipped by default: their outputs are not the token's own.
        """
        offset = 0
        for c in self.chunks:
            if c.kind in kinds and c.start <= global_index < c.stop:
                return offset + global_index - c.start
            offset += c.size
        return None


def padded_length(n: int, unit: int) -> int:
    if n < 1:
        raise ValueError(f"prompt length must be at least 1 token, got {n}")
    if unit < 1:
        raise ValueError(f"split unit must be positive, got {unit}")
    return -(-n // unit) * unit


def _check_world(world_size: int) -> None:
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")


def single(n: int, world_size: int) -> list[HostSlice]:
    """Every token on host 0; other hosts hold nothing (single-device reference)."""
    _check_world(world_size)
    padded_length(n, 1)
    return [HostSlice(0, n, (Chunk(0, 0, n),))] + [HostSlice(r, n) for r in range(1, world_size)]


def contiguous(n: int, world_size: int) -> list[HostSlice]:
    _check_world(world_size)
    size = padded_length(n, world_size) // world_size
    return [HostSlice(r, n, (Chunk(r, r * size, (r + 1) * size),)) for r in range(world_size)]


def zigzag(n: int, world_size: int) -> list[HostSlice]:
    _check_world(world_size)
    size = padded_length(n, 2 * world_size) // (2 * world_size)
    slices = []
    for r in range(world_size):
        first, second = r, 2 * world_size - 1 - r
        slices.append(HostSlice(r, n, (Chunk(first, first * size, (first + 1) * size),
                                       Chunk(second, second * size, (second + 1) * size))))
    return slices


def owner_of(slices: list[HostSlice], global_index: int) -> tuple[int, int]:
    """(rank, local index) of the host holding token ``global_index``."""
    for s in slices:
        local = s.local_index_of(global_index)
        if local is not None:
            return s.rank, local
    raise ValueError(f"token {global_index} is held by no host")


def even_split(start: int, stop: int, parts: int) -> list[tuple[int, int]]:
    """Cut ``[start, stop)`` into ``parts`` consecutive runs whose sizes differ by at most one."""
    if parts < 1:
        raise ValueError(f"cannot split into {parts} parts")
    total = stop - start
    base, extra = divmod(total, parts)
    bounds, cur = [], start
    for i in range(parts):
        nxt = cur + base + (1 if i < extra else 0)
        bounds.append((cur, nxt))
        cur = nxt
    return bounds


def anchor_chunks(n_ctx: int, n_query: int, anchor_len: int, insert_pos: int | None) -> tuple[Chunk, ...]:
    """The anchor: the first ``anchor_len`` context tokens, position ids from 0.

    With ``insert_pos`` set (APB), the query tokens (prompt indices ``n_ctx .. n_ctx+n_query``)
    are embedded after the first ``insert_pos`` context tokens, so the anchor is
    ``anchor_len + n_query`` long and every token after the insert point shifts by ``n_query``.
    """
    anchor_len = min(anchor_len, n_ctx)
    if anchor_len <= 0:
        return ()
    if insert_pos is None or n_query == 0:
        return (Chunk(-1, 0, anchor_len, ChunkKind.ANCHOR, 0),)
    s = min(insert_pos, anchor_len)
    parts = [Chunk(-1, 0, s, ChunkKind.ANCHOR, 0), Chunk(-1, n_ctx, n_ctx + n_query, ChunkKind.ANCHOR, s),
             Chunk(-1, s, anchor_len, ChunkKind.ANCHOR, s + n_query)]
    return tuple(c for c in parts if c.size > 0)


def anchor_share(chunks: tuple[Chunk, ...], lo: int, hi: int) -> tuple[Chunk, ...]:
    """The part of an anchor (``chunks``, as :func:`anchor_chunks` gives them) at its rows
    ``[lo, hi)``, counted from the anchor's first row: the same tokens at the same positions."""
    out, at = [], 0
    for c in chunks:
        a, b = max(lo, at), min(hi, at + c.size)
        if a < b:
            first = c.start if c.pos_start is None else c.pos_start
            out.append(Chunk(c.chunk_id, c.start + a - at, c.start + b - at, c.kind, first + a - at, c.cached))
        at += c.size
    return tuple(out)


def split_anchor_positions(slices: list[HostSlice]) -> torch.Tensor:
    """The position ids of an anchor split over the hosts, in the order the shares are gathered
    (host by host, each share's rows in order)."""
    parts = [c.positions for s in slices for c in s.chunks if c.kind == ChunkKind.ANCHOR]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def anchored(n_ctx: int, n_query: int, world_size: int, anchor_len: int, insert_pos: int | None = None,
             query_tail_on: tuple[int, ...] = (), anchor_on: tuple[int, ...] | None = None,
             split_anchor: bool = False) -> list[HostSlice]:
    """Star / APB: context in ``W`` contiguous blocks; hosts ``r > 0`` prepend the anchor.

    Hosts in ``query_tail_on`` append the query after their block (so its Q vectors exist
    there for scoring); those query tokens are neither cached nor used as outputs. ``anchor_on``
    names the hosts that prepend the anchor when not all ``r > 0`` do (a shared anchor: the
    others receive its K/V instead of computing it). ``split_anchor``: host ``r < W-1`` (host 0
    too) prepends only the ``r``-th of ``W-1`` contiguous shares of the anchor's rows (with an
    embedded query, the query counts as anchor rows), shares differing by at most one row; host
    ``W-1``, whose block attends the most passing blocks, holds none.
    """
    _check_world(world_size)
    if n_ctx < world_size:
        raise ValueError(f"a context of {n_ctx} tokens cannot be split over {world_size} hosts; "
                         f"use a longer context or fewer hosts")
    if split_anchor and anchor_on is not None:
        raise ValueError("a split anchor is held in shares: no host carries the whole anchor")
    n = n_ctx + n_query
    whole = anchor_chunks(n_ctx, n_query, anchor_len, insert_pos)
    shares = even_split(0, sum(c.size for c in whole), max(1, world_size - 1)) + [(0, 0)]
    slices = []
    for r, (lo, hi) in enumerate(even_split(0, n_ctx, world_size)):
        if split_anchor:
            anchor = anchor_share(whole, *shares[r])
        else:
            anchor = whole if (r > 0 if anchor_on is None else r in anchor_on) else ()
        chunks = anchor + (Chunk(r, lo, hi),)
        if r in query_tail_on and n_query:
            chunks += (Chunk(-1, n_ctx, n, ChunkKind.QUERY, n_ctx, cached=False),)
        slices.append(HostSlice(r, n, chunks))
    return slices


def spava(n_ctx: int, n_query: int, world_size: int, anchor_len: int, split_anchor: bool = False) -> list[HostSlice]:
    """Spava: ``[anchor, virtual block r, virtual block 2W-1-r, query]`` on host ``r``.

    The context after the anchor is cut into ``2W`` virtual blocks (zigzag over hosts). Every
    host holds the whole anchor but caches only its ``1/W`` share of it; the query is cached
    by host 0 only. ``split_anchor``: host ``r`` holds only the share it caches (the hosts
    exchange the anchor's K/V instead of each computing all of it).
    """
    _check_world(world_size)
    anchor_len = max(0, min(anchor_len, n_ctx))
    if n_ctx - anchor_len < 2 * world_size:
        raise ValueError(f"spava needs at least {2 * world_size} context tokens after the anchor, got "
                         f"{n_ctx - anchor_len}; use a longer context, a shorter anchor or fewer hosts")
    n = n_ctx + n_query
    blocks = even_split(anchor_len, n_ctx, 2 * world_size)
    shares = even_split(0, anchor_len, world_size)
    slices = []
    for r in range(world_size):
        lo, hi = shares[r]
        anchor = tuple(c for c in (Chunk(-1, 0, lo, ChunkKind.ANCHOR, 0, cached=False),
                                   Chunk(-1, lo, hi, ChunkKind.ANCHOR, lo, cached=True),
                                   Chunk(-1, hi, anchor_len, ChunkKind.ANCHOR, hi, cached=False))
                       if c.size > 0 and (c.cached or not split_anchor))
        first, second = r, 2 * world_size - 1 - r
        chunks = anchor + (Chunk(first, *blocks[first]), Chunk(second, *blocks[second]))
        if n_query:
            chunks += (Chunk(-1, n_ctx, n, ChunkKind.QUERY, n_ctx, cached=r == 0),)
        slices.append(HostSlice(r, n, chunks))
    return slices


def apb_passing_sources(rank: int) -> list[int]:
    """APB: host ``r``'s block sees the passing blocks of hosts ``0 .. r-1``."""
    return list(range(rank))


def spava_holder(block_id: int, world_size: int) -> tuple[int, int]:
    """Spava: (host, slot) holding virtual block ``block_id``; slot 0 is a host's first block."""
    if not 0 <= block_id < 2 * world_size:
        raise ValueError(f"virtual block {block_id} does not exist with {world_size} hosts")
    return (block_id, 0) if block_id < world_size else (2 * world_size - 1 - block_id, 1)


def spava_passing_sources(block_id: int, world_size: int) -> list[tuple[int, int]]:
    """Spava: the (host, slot) passing blocks virtual block ``block_id`` sees.

    Every earlier virtual block held by *another* host; an earlier block on the same host is
    seen in full instead (it is already there).
    """
    me, _ = spava_holder(block_id, world_size)
    return [spava_holder(j, world_size) for j in range(block_id) if spava_holder(j, world_size)[0] != me]


def pad_tokens(input_ids: torch.Tensor, total: int, pad_id: int) -> torch.Tensor:
    """Right-pad a (1, n) id tensor to (1, total) with ``pad_id``."""
    n = input_ids.shape[-1]
    if total < n:
        raise ValueError(f"cannot pad {n} tokens down to {total}")
    if total == n:
        return input_ids
    pad = torch.full((*input_ids.shape[:-1], total - n), pad_id, dtype=input_ids.dtype, device=input_ids.device)
    return torch.cat([input_ids, pad], dim=-1)


def rows_of(mask: torch.Tensor, device: torch.device | str) -> slice | torch.Tensor:
    """The rows a CPU boolean ``mask`` selects: a slice when they are one run (indexing with it
    is a view, no copy), else an index tensor moved to ``device`` without waiting on it. Deciding
    this on the CPU is what keeps a data-dependent selection from syncing with a GPU."""
    if mask.device.type != "cpu":
        raise ValueError(f"rows_of decides on the CPU; got a mask on {mask.device}")
    idx = mask.nonzero().flatten()
    if idx.numel() == 0:
        return slice(0, 0)
    first, last = int(idx[0]), int(idx[-1])
    if last - first + 1 == idx.numel():
        return slice(first, last + 1)
    return idx.to(device, non_blocking=True)
