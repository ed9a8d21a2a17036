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

from apb.methods.compressors import no_query_tokens
from apb.methods.cost import AttnShape, HostWork, Sizes
from apb.methods.sizes import resolve_exact_layers
from apb.methods.sliding import sliding_attention
from apb.parallel.comm import Comm
from apb.parallel.layout import HostSlice, rows_of

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
    #: True when the method can compute its anchor once and send it (``method.share_anchor``)
    shares_anchor: ClassVar[bool] = False
    #: True when the method has an anchor (so ``method.share_anchor``, if it cannot share it, is refused)
    has_anchor: ClassVar[bool] = False
    #: what an unset ``method.share_anchor`` means for this method (``"split"``: split over hosts)
    share_anchor_default: ClassVar[bool | str] = False
    #: True when ``method.share_anchor: split`` splits the anchor's rows over the hosts (apb, spava)
    splits_anchor: ClassVar[bool] = False
    #: True when host 0 runs the whole prompt alone and the other hosts idle (full)
    one_host: ClassVar[bool] = False
    variant: str | None = None

    def __init__(self, config: MethodConfig):
        if getattr(config, "share_anchor", False) is None:  # unset: this method's own choice
            config = config.model_copy(update={"share_anchor": self.share_anchor_default if self.shares_anchor else False})
        self.config = config

    @classmethod
    def shares_anchor_with(cls, sizes: Sizes) -> bool | str:
        """What the cost formula's knobs ``sizes`` mean for the anchor (unset: the method's
        default): False (every host its own), True (shared) or ``"split"``."""
        if sizes.share_anchor is None:
            return cls.share_anchor_default if cls.shares_anchor else False
        return sizes.share_anchor if sizes.share_anchor == "split" else bool(sizes.share_anchor)

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
        """Whether the runtime must capture q/k/v projections before RoPE for this method: its
        compressor scores on them and some layer chooses a passing block."""
        compressor = getattr(self, "compressor", None)
        return compressor is not None and compressor.needs_pre_rope and self._chooses_passing()

    def attention(self, ctx: "AttnContext", module: torch.nn.Module, q: torch.Tensor, k: torch.Tensor,
                  v: torch.Tensor, scale: float) -> torch.Tensor:
        """Attention output (batch, heads, local_len, dim) for this host's queries."""
        raise NotImplementedError

    def check(self, model_config: Any, world_size: int) -> None:
        """Raise a readable error if this method cannot run this model at this world size."""
        if getattr(self.config, "share_anchor", False) and self.has_anchor and not self.shares_anchor:
            can = ", ".join(dict.fromkeys(c.name for c in _subclasses(Method) if c.name and c.shares_anchor))
            raise ValueError(f"method {self.label!r} computes its anchor on every host and cannot share it "
                             f"(method.share_anchor is for {can}); unset method.share_anchor")
        if getattr(self.config, "share_anchor", False) == "split" and self.has_anchor and not self.splits_anchor:
            can = ", ".join(dict.fromkeys(c.name for c in _subclasses(Method) if c.name and c.splits_anchor))
            raise ValueError(f"method {self.label!r} cannot split its anchor over the hosts (method.share_anchor: "
                             f"split is for {can}); set method.share_anchor to true or false")
        layers = getattr(self.config, "exact_layers", None)
        if layers:  # a multimodal config keeps its layer count in the text model's config
            text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
            resolve_exact_layers(layers, text.num_hidden_layers)

    def min_context(self, world_size: int, n_query: int = 0) -> int:
        """The fewest context tokens (the prompt before its ``n_query`` query tokens) this method's
        layout accepts on ``world_size`` hosts: star and apb need W, spava 2W, the padded layouts
        (full, ring, ulysses) one.

        Found by asking :meth:`layout` itself (pure and cheap), so the figure can never disagree
        with what a worker would refuse: doubling, then bisecting, on the fact that a layout that
        takes a context also takes every longer one.
        """
        def fits(n_ctx: int) -> bool:
            try:
                self.layout(n_ctx + n_query, world_size, n_query)
                return True
            except ValueError:
                return False

        lo, hi = 0, 1  # lo does not fit (or is 0), hi is the candidate
        while not fits(hi):
            lo, hi = hi, hi * 2
            if hi > 1 << 40:
                raise ValueError(f"method {self.label!r} lays out no context length on {world_size} hosts")
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if fits(mid) else (mid, hi)
        return hi

    def moves_query(self) -> bool:
        """Whether this method moves a rotary-embedded query to other positions (``ctx.rope``,
        :func:`apb.model.rope.rope_shift`); only then does the prefill probe the model's RoPE."""
        return False

    def check_model(self, model: Any) -> None:
        """Raise ``ValueError`` if this method cannot run the loaded ``model`` for what only the
        model, not its config, shows. Called on every host before the prefill sends anything."""
        self.check_structure(model)

    def check_structure(self, model: Any) -> None:
        """The part of :meth:`check_model` that reads the model's modules and shapes, not its
        values: the driver runs it on a skeleton without weights (``apb.model.loading.skeleton``)
        before any worker starts."""
        compressor = getattr(self, "compressor", None)
        if compressor is not None and self._chooses_passing():  # with nothing chosen, nothing is scored
            compressor.check_model(model)

    def check_query(self, n_tokens: int, n_query: int, world_size: int) -> None:
        """Raise ``ValueError`` when ``n_query`` cannot be this prompt's query: outside [0, n_tokens),
        or none where the method answers a query after the context, or where its compressor chooses
        passing blocks by scoring against the query (on more than one host)."""
        if not 0 <= n_query < n_tokens:
            raise ValueError(f"query length {n_query} must be in [0, prompt length {n_tokens})")
        if n_query > 0:
            return
        if self.query_phase:
            raise ValueError(f"method {self.label!r} answers a query after the context: give the prompt's "
                             "query length (n_query >= 1)")
        compressor = getattr(self, "compressor", None)
        if compressor is not None and compressor.needs_query and world_size > 1 and self._chooses_passing():
            raise no_query_tokens(self.config.compressor)

    def _chooses_passing(self) -> bool:
        """Whether some layer's passing block is chosen (not none, not all of a block)."""
        p = getattr(self.config, "passing_len", None)
        return any(item not in (0, "all") for item in (p if isinstance(p, list) else [p]))

    def check_sizes(self, n_tokens: int, n_query: int, world_size: int) -> None:
        """Raise ``ValueError`` naming the context length, this method's minimum, W and the fix when
        the prompt cannot be laid out over ``world_size`` hosts (or :meth:`check_query` refuses its
        query): the driver refuses exactly what a worker would, before any worker sees the prompt."""
        self.check_query(n_tokens, n_query, world_size)
        try:
            self.layout(n_tokens, world_size, n_query)
        except ValueError as e:
            need = self.min_context(world_size, n_query)
            raise ValueError(f"the context is {n_tokens - n_query} tokens, but method {self.label!r} needs at least "
                             f"{need} context tokens on W={world_size} hosts ({e}); use a longer context, a smaller "
                             "parallel.world_size or another method") from None

    @classmethod
    def default_sizes(cls, n_ctx: float, block: float) -> tuple[float, float]:
        """(anchor, passing) tokens before rounding when the config leaves them unset.

        The one home of the method's size rule: ``plan()`` calls it with ``block = ceil(n_ctx/W)``
        and rounds, :meth:`cost` with ``block = n_ctx/W``.
        """
        return 0.0, 0.0

    def transfer_bytes(self, local: int, n_tokens: int, world: int, per_tok: int, passing: int, model_config: Any,
                       dtype_bytes: int) -> int:
        """Bytes a host holds in communication buffers at once, for the memory estimate: by
        default every host's passing share (``passing`` K/V tokens per host, two buffers),
        nothing for methods that pass none. ``local``: tokens this host runs; ``per_tok``: K/V
        bytes per token and layer."""
        return 2 * world * passing * per_tok if world > 1 else 0

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
    #: per layer, what this host caches for its real (non-pad) tokens, in local order: (k, v), or
    #: for a multi-head latent attention layer its (latent, rotated key) pair (apb.model.mla)
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    plan: Any = None
    n_query: int = 0
    scratch: dict[Any, Any] = field(default_factory=dict)
    #: record what the method chose (``scratch[("passing", layer)]``: global prompt indices per KV
    #: head) for ``apb diagnose``; off in every other run, where it costs nothing
    diagnostics: bool = False
    #: moves a rotary-embedded vector to another position (None: the model's RoPE cannot be moved)
    rope: Any = None
    #: the current layer's score options for :func:`apb.kernels.attention` (``softcap``, ``sinks``);
    #: set by :meth:`step`, passed by the methods to every kernel call as ``**ctx.score_opts``
    score_opts: dict[str, Any] = field(default_factory=dict)
    #: the layer :meth:`step` is running (None outside one)
    layer: int | None = None
    #: keep every cached position of a sliding layer (a cache returned whole: verification,
    #: diagnosis); otherwise a sliding layer keeps only the positions a later token can still see
    #: (:meth:`window_tail`), and its other K/V are freed as soon as the layer has run
    whole_cache: bool = True

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

    def kept_rows(self, device: torch.device) -> slice | torch.Tensor:
        """The local rows this host caches: a slice when they come first (a view, no copy), else an
        index tensor on ``device``. Built once per prompt from the layout, on the CPU, so that no
        layer waits on a host-to-device copy or a data-dependent mask (each is a GPU sync)."""
        key = ("kept_rows", str(device))
        if key not in self.scratch:
            self.scratch[key] = rows_of(self.mine.valid, device)
        return self.scratch[key]

    def window_tail(self, window: int) -> slice | None:
        """Of the rows this host caches, those a sliding layer of ``window`` must keep: the
        positions the query (the first token after the context) or the first decoded token can
        still see, ``>= n - n_query - (window - 1)``. A slice of the cached rows (they are in
        position order in every layout), or None where that is all of them, or where they are not
        a suffix (then nothing is dropped)."""
        key = ("window_tail", window)
        if key not in self.scratch:
            pos = self.mine.positions[self.mine.valid]
            seen = pos >= self.n_tokens - self.n_query - (window - 1)
            first = int(seen.long().argmax()) if bool(seen.any()) else len(pos)
            suffix = bool(seen[first:].all()) and not bool(seen[:first].any())
            self.scratch[key] = slice(first, None) if suffix and first > 0 else None
        return self.scratch[key]

    def step(self, module: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             scale: float, sliding_window: int | None = None, softcap: float | None = None,
             sinks: torch.Tensor | None = None, latent: tuple[torch.Tensor, torch.Tensor] | None = None,
             expand: Any = None) -> torch.Tensor:
        """Run the method on this layer; ``latent`` is what an MLA layer caches instead of (k, v)
        (``expand``, which rebuilds k and v from it, only matters where a cache is attended)."""
        layer = int(module.layer_idx)
        if layer in self.kv:
            # DiffLlama attends twice per layer with other values each time, HRM runs its layers in a
            # loop: the cache would hold the last call's K/V, where transformers caches the layer's own
            raise ValueError(f"layer {layer} ({type(module).__name__}) calls the attention more than once in one "
                             "forward (differential attention, or a layer run in a loop): the cache apb gathers "
                             "would not be the layer's own K/V, so apb cannot run this model")
        self.layer = self.comm.stats.layer = layer
        self.comm.stats.tick(layer)
        keep = self.kept_rows(k.device)
        self.kv[layer] = tuple(t[:, :, keep] for t in (latent or (k, v)))
        tail = None if sliding_window is None or self.whole_cache else self.window_tail(sliding_window)
        if tail is not None:  # a copy of the tail: a view would hold the layer's whole K/V
            self.kv[layer] = tuple(t[:, :, tail].clone() for t in self.kv[layer])
        self.score_opts = score_options(softcap, sinks)
        try:
            if sliding_window is not None and self.n_tokens > sliding_window:
                # exact in every method; a window that covers the prompt makes this a global layer
                return sliding_attention(self, q, k, v, scale, sliding_window)
            return self.method.attention(self, module, q, k, v, scale)
        finally:
            # a compressor's pre-RoPE projections serve their own layer only: keeping them for every
            # layer would hold 3 x hidden per token per layer on each host through the prefill
            self.scratch.pop(("pre_rope", layer), None)


def _subclasses(cls: type) -> list[type]:
    """Every subclass of ``cls``, depth first, in the order they were defined (the registry's
    order, without importing it: the registry imports this module)."""
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out


def score_options(softcap: float | None, sinks: torch.Tensor | None) -> dict[str, Any]:
    """The kernel keywords for a layer's softcap and sinks (empty for plain softmax attention)."""
    opts: dict[str, Any] = {}
    if softcap is not None:
        opts["softcap"] = softcap
    if sinks is not None:
        opts["sinks"] = sinks
    return opts
