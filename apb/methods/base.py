"""What a method is: a layout plus an attention step. Everything else is shared.

The runtime runs the unmodified Hugging Face model on this host's slice of the prompt. Every
attention layer calls back into :meth:`AttnContext.step`, which records the K/V this host keeps
for decoding and hands the layer's Q/K/V (after RoPE) to :meth:`Method.attention`. A method
therefore decides only (1) which tokens each host holds, with which position ids
(:meth:`Method.layout`), and (2) how a host's queries attend, possibly talking to other hosts
through ``ctx.comm``. A method class also states what it costs (:meth:`Method.cost`, used by
``apb simulate`` and ``apb bench``) and its default sizes (:meth:`Method.default_sizes`, used by
both ``plan()`` and ``cost()``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from apb.methods.cost import AttnShape, HostWork, Sizes
from apb.parallel.comm import Comm
from apb.parallel.layout import HostSlice

if TYPE_CHECKING:  # apb.config imports the method registry to validate names, so not at run time
    from apb.config import MethodConfig


class Method:
    """Base class; subclasses are registered by name in :mod:`apb.methods`."""

    name: ClassVar[str] = ""
    #: True when the method must reproduce single-device attention to float tolerance
    exact: bool = True
    #: option presets selectable as ``name:variant``
    variants: ClassVar[dict[str, dict]] = {}
    #: True when the query runs as a second, exact pass over the context caches (star, apb)
    query_phase: ClassVar[bool] = False
    #: True when host 0 runs the whole prompt alone and the other hosts idle (full)
    one_host: ClassVar[bool] = False
    variant: str | None = None

    def __init__(self, config: MethodConfig):
        self.config = config

    @property
    def label(self) -> str:
        return f"{self.name}:{self.variant}" if self.variant else self.name

    def layout(self, n_tokens: int, world_size: int, n_query: int = 0) -> list[HostSlice]:
        """Which tokens each host holds. The last ``n_query`` prompt tokens are the query."""
        raise NotImplementedError

    def plan(self, n_tokens: int, world_size: int, n_query: int, num_layers: int) -> Any:
        """Per-prompt sizes the attention step needs (anchor, passing per layer); None if none."""
        return None

    def capture_pre_rope(self) -> bool:
        """Whether the runtime must capture q/k/v projections before RoPE for this method."""
        return False

    def attention(self, ctx: "AttnContext", module: torch.nn.Module, q: torch.Tensor, k: torch.Tensor,
                  v: torch.Tensor, scale: float) -> torch.Tensor:
        """Attention output (batch, heads, local_len, dim) for this host's queries."""
        raise NotImplementedError

    def check(self, model_config: Any, world_size: int) -> None:
        """Raise a readable error if this method cannot run this model at this world size."""

    @classmethod
    def default_sizes(cls, n_ctx: float, block: float) -> tuple[float, float]:
        """(anchor, passing) tokens before rounding when the config leaves them unset.

        The one home of the method's size rule: ``plan()`` calls it with ``block = ceil(n_ctx/W)``
        and rounds, :meth:`cost` with ``block = n_ctx/W``.
        """
        return 0.0, 0.0

    @classmethod
    def cost(cls, n: float, w: int, shape: AttnShape, sizes: Sizes) -> HostWork:
        """The slowest host's work prefilling ``n`` context tokens and ``sizes.query`` query tokens
        over ``w > 1`` hosts, with the default sizes (see ``docs/methods.md`` for each formula)."""
        raise NotImplementedError(f"method {cls.name!r} has no cost formula")


@dataclass
class AttnContext:
    """One host's view of one prefill; passed to the attention layers through the model kwargs."""

    method: Method
    slices: list[HostSlice]
    comm: Comm
    #: per layer, the (k, v) of this host's real (non-pad) tokens, in local order
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    plan: Any = None
    n_query: int = 0
    scratch: dict[Any, Any] = field(default_factory=dict)
    #: record what the method chose (``scratch[("passing", layer)]``: global prompt indices per KV
    #: head) for ``apb diagnose``; off in every other run, where it costs nothing
    diagnostics: bool = False
    #: moves a rotary-embedded vector to another position (None: the model's RoPE cannot be moved)
    rope: Any = None

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def mine(self) -> HostSlice:
        return self.slices[self.comm.rank]

    @property
    def n_tokens(self) -> int:
        return self.mine.n_tokens

    @property
    def n_ctx(self) -> int:
        return self.n_tokens - self.n_query

    def step(self, module: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             scale: float, sliding_window: int | None = None) -> torch.Tensor:
        layer = int(module.layer_idx)
        if sliding_window is not None and self.n_tokens > sliding_window:
            raise ValueError(f"prompt of {self.n_tokens} tokens exceeds the model's sliding_window={sliding_window}; "
                             "sliding-window attention is not supported by the distributed methods, "
                             "use a shorter prompt or a model without sliding_window")
        self.comm.stats.layer = layer
        self.comm.stats.tick(layer)
        valid = self.mine.valid.to(k.device)
        self.kv[layer] = (k[:, :, valid], v[:, :, valid])
        return self.method.attention(self, module, q, k, v, scale)
