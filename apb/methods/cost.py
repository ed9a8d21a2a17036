"""The work one host does in a prefill: the types each method's cost formula returns.

Every method class states its own formula in :meth:`apb.methods.base.Method.cost`, from the
context length ``n``, the host count ``w``, the model's attention shape and the what-if knobs
in :class:`Sizes`; its default anchor and passing sizes come from the same
:meth:`~apb.methods.base.Method.default_sizes` its ``plan()`` uses. :mod:`apb.tools.simulate`
turns a :class:`HostWork` into seconds and bytes of memory for a device; ``apb bench`` reports
its attention FLOPs. Units: tokens, (query, key) pairs over all heads, bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class AttnShape(Protocol):
    """What a cost formula reads of a model (:class:`apb.tools.simulate.ModelShape` has it)."""

    @property
    def heads(self) -> int: ...

    @property
    def kv_heads(self) -> int: ...

    @property
    def head_dim(self) -> int: ...

    @property
    def bytes_per_param(self) -> int: ...


@dataclass(frozen=True)
class HostWork:
    """The slowest host's work for one prefill."""

    tokens: float  # tokens through the linear layers
    pairs: float  # attended (query, key) pairs per layer
    cached: float  # tokens whose K/V the host holds
    comm_bytes: float = 0.0  # sent per layer, not hidden behind compute
    steps: int = 0  # distributed steps per layer (each pays the cost model's per-step overhead)
    overlap_bytes: float = 0.0  # sent per layer behind the attention compute (exposed only if longer)
    anchor: float = 0.0  # anchor tokens the formula assumed (the method's default size)
    passing: float = 0.0  # passing tokens per block the formula assumed (after ``Sizes.passing_cap``)


@dataclass(frozen=True)
class Sizes:
    """What-if knobs of the cost formulas (the published runs' settings are fitted with them)."""

    passing_cap: float | None = None  # cap on apb's passing block (tokens)
    ring_balanced: bool = True  # zigzag ring (ours) or plain ring (host W-1 does 2/W of the work)
    query: int = 128  # query tokens after the context


def single_device(n: float) -> HostWork:
    """One host attends the whole prompt causally: ``full``, and every method at ``w = 1``."""
    return HostWork(n, n * n / 2, n)


def merge_bytes(query: float, shape: AttnShape) -> float:
    """Bytes of one host's query partials in the exact query merge (fp32; the LSE column is not counted)."""
    return query * shape.heads * shape.head_dim * 4
