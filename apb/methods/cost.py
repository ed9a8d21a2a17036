"""The work one host does in a prefill: the types each method's cost formula returns.

Every method class states its own formula in :meth:`apb.methods.base.Method.cost`, from the
context length ``n``, the host count ``w``, the model's attention shape and the what-if knobs
in :class:`Sizes`; its default anchor and passing sizes come from the same
:meth:`~apb.methods.base.Method.default_sizes` its ``plan()`` uses. :mod:`apb.tools.simulate`
turns a :class:`HostWork` into seconds and bytes of memory for a device; ``apb bench`` reports
its attention FLOPs. Units: tokens, (query, key) pairs over all heads, bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Protocol


class AttnShape(Protocol):
    """What a cost formula reads of a model (:class:`apb.tools.simulate.ModelShape` has it)."""

    @property
    def layers(self) -> int: ...

    @property
    def heads(self) -> int: ...

    @property
    def kv_heads(self) -> int: ...

    @property
    def head_dim(self) -> int: ...

    @property
    def bytes_per_param(self) -> int: ...

    def linear_flops(self, tokens: float) -> float: ...

    def attn_flops_per_pair(self) -> float: ...

    @property
    def windows(self) -> tuple[int, ...]:
        """The window of each sliding layer (global layers are not listed): what every method runs
        there is exact and local, whatever its formula says of the global layers."""
        ...

    @property
    def rates(self) -> tuple[float, float]:
        """Seconds per linear and per attention FLOP on the device costed, or any pair in their
        ratio: which of two hosts a formula counts as the slowest depends on it (:func:`slowest`)."""
        ...


@dataclass(frozen=True)
class HostWork:
    """The slowest host's work for one prefill. Where layers differ (a per-layer passing list,
    exact layers) the per-layer fields are means over the layers (:func:`over_layers`), so the
    layer count times each is the whole prefill's."""

    tokens: float  # tokens through the linear layers
    pairs: float  # attended (query, key) pairs per layer, over all heads
    cached: float  # tokens whose K/V the host holds
    comm_bytes: float = 0.0  # sent per layer, not hidden behind compute
    steps: float = 0  # distributed steps per layer (each pays the cost model's per-step overhead)
    overlap_bytes: float = 0.0  # sent per layer behind the attention compute (exposed only if longer)
    anchor: float = 0.0  # anchor tokens the formula assumed
    passing: float = 0.0  # passing tokens per block the formula assumed (after ``Sizes.passing_cap``)


#: the fields of :class:`HostWork` that are per layer
PER_LAYER = ("pairs", "comm_bytes", "steps", "overlap_bytes", "passing")


def over_layers(per_layer: list[HostWork]) -> HostWork:
    """One :class:`HostWork` for layers whose work differs: the per-layer fields averaged (the
    other fields are the same in every layer)."""
    first = per_layer[0]
    if all(w == first for w in per_layer):
        return first
    assert all(replace(w, **{f: 0 for f in PER_LAYER}) == replace(first, **{f: 0 for f in PER_LAYER})
               for w in per_layer), "only the per-layer fields may differ between layers"
    return replace(first, **{f: sum(getattr(w, f) for w in per_layer) / len(per_layer) for f in PER_LAYER})


@dataclass(frozen=True)
class Sizes:
    """What-if knobs of the cost formulas (the published runs' settings are fitted with them)."""

    passing_cap: float | None = None  # cap on apb's passing block (tokens)
    ring_balanced: bool = True  # zigzag ring (ours) or plain ring (host W-1 does 2/W of the work)
    query: int = 128  # query tokens after the context
    # a method config's sizes, as ``method.*`` takes them (None: the method's default); each
    # method reads those it has, resolved by the rules its plan() uses
    anchor_len: Any = None
    passing_len: Any = None
    exact_layers: Any = None
    share_anchor: bool | str | None = None  # None: the method's default; "split" (apb, spava): split over hosts

    def with_method(self, method_config: Any) -> "Sizes":
        """These knobs with a method config's anchor, passing, exact-layer and anchor-sharing settings."""
        return replace(self, anchor_len=method_config.anchor_len, passing_len=method_config.passing_len,
                       exact_layers=method_config.exact_layers, share_anchor=method_config.share_anchor)


def single_device(n: float) -> HostWork:
    """One host attends the whole prompt causally: ``full``, and every method at ``w = 1``."""
    return HostWork(n, n * n / 2, n)


def merge_bytes(query: float, shape: AttnShape) -> float:
    """Bytes of one host's query partials in the exact query merge (fp32; the LSE column is not counted)."""
    return query * shape.heads * shape.head_dim * 4


def attention_flops(work: HostWork, shape: AttnShape, n: float) -> float:
    """A whole prefill's attention FLOPs on the host of ``work``, for a prompt of ``n`` tokens: the
    formula's pairs in each global layer; in each sliding layer whose window ``w`` is shorter than
    the prompt (``shape.windows``), the host's rows times ``w`` keys (at most: rows within ``w`` of
    the prompt's start see fewer), which is what every method attends there."""
    sliding = [w for w in getattr(shape, "windows", ()) if w < n]
    return shape.attn_flops_per_pair() * ((shape.layers - len(sliding)) * work.pairs + work.tokens * sum(sliding))


def work_seconds(work: HostWork, shape: AttnShape, n: float) -> float:
    """A whole prefill's :class:`HostWork` at the shape's device rates (``shape.rates``)."""
    linear, attn = shape.rates
    return linear * shape.linear_flops(work.tokens) + attn * attention_flops(work, shape, n)


def slowest(hosts: list[HostWork], shape: AttnShape, n: float) -> HostWork:
    """The host that takes longest at the shape's device rates, of hosts whose work differs in
    kind (one runs more tokens through the linear layers, another attends more pairs): by FLOPs
    alone the one with more of them may be the faster, where a linear FLOP and an attention FLOP
    take different times."""
    return max(hosts, key=lambda h: work_seconds(h, shape, n))
