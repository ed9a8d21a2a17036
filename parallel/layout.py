"""Which tokens each host holds: pure functions of sizes, tested without processes.

A layout maps a prompt of ``n`` tokens onto ``W`` hosts. When ``n`` does not split evenly, the
sequence is padded at its *end* to a multiple of the split unit; pad tokens sit after every real
token, so no real query ever attends to them under a causal mask, and they are dropped from
every output (logits, cache). Indices ``>= n`` in a :class:`HostSlice` are padding.

* ``contiguous``: host ``r`` holds chunk ``r`` of ``W`` equal chunks (Ulysses, Star, APB).
* ``zigzag``: the padded sequence is cut into ``2W`` chunks; host ``r`` holds chunks ``r`` and
  ``2W-1-r``, which gives every host the same amount of causal attention work (ring).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Chunk:
    """A run of consecutive global token indices ``[start, stop)`` with its chunk id."""

    chunk_id: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


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
        """Position ids: a token's global index (pads continue past n)."""
        return self.indices

    @property
    def valid(self) -> torch.Tensor:
        return self.indices < self.n_tokens

    @property
    def size(self) -> int:
        return sum(c.size for c in self.chunks)

    def local_index_of(self, global_index: int) -> int | None:
        """Where global token ``global_index`` sits in this host's local sequence, or None."""
        offset = 0
        for c in self.chunks:
            if c.start <= global_index < c.stop:
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


def pad_tokens(input_ids: torch.Tensor, total: int, pad_id: int) -> torch.Tensor:
    """Right-pad a (1, n) id tensor to (1, total) with ``pad_id``."""
    n = input_ids.shape[-1]
    if total < n:
        raise ValueError(f"cannot pad {n} tokens down to {total}")
    if total == n:
        return input_ids
    pad = torch.full((*input_ids.shape[:-1], total - n), pad_id, dtype=input_ids.dtype, device=input_ids.device)
    return torch.cat([input_ids, pad], dim=-1)
