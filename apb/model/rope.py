"""Moving a rotary-embedded vector to another position, with the model's own RoPE.

apb's anchor carries a copy of the query at anchor positions ``s .. s+q-1``, while the real query
sits at ``n_ctx .. n-1``. A compressor that scores block keys with the copy would see relative
distances that the real query never has (and that differ from host to host). RoPE rotates each
vector by an angle linear in its position, so a vector computed at position ``p`` becomes the
same vector at ``p + delta`` by one more rotation by ``delta`` (:meth:`RopeShift.shift`).

That holds while the frequencies stay fixed. Dynamic NTK and longrope pick theirs from the
sequence length; inside a prefill every host's rotary is pinned to the whole prompt's length
(:func:`apb.model.hf_bridge.prompt_length`), so within one prompt they are fixed too, and the
shift takes its angles from the same pinned rotary. A rotary with one set of frequencies per
layer type (Gemma 3's local and global layers, Olmo 3, Gemma 4) turns each layer's query with its
own type's angles. Every model is checked once against its own queries: the whole model runs the
same tokens at positions ``p`` and ``p + delta`` with attention that outputs nothing, so each
layer's input is the same at both and only the rotation differs (:func:`_layer_turns`); and each
head's length must stay the same at starts up to the model's longest prompt, which a rotation
keeps, or change by exactly the model's own position scale (Ministral 3's query
temperature), which the shift then applies too (:meth:`RopeShift.ratio`). A
layer without RoPE (SmolLM3's every fourth, Cohere 2's global layers) keeps its query as it is; a
model whose rotation the shift does not reproduce, or whose rotary cannot be found, gets ``None``
from :func:`rope_shift`, and apb refuses to score at true positions rather than silently scoring
at the anchor's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import sys
from dataclasses import dataclass, field
from typing import Callable

import torch

from apb.model import mla
from apb.model.hf_bridge import ATTN_IMPLEMENTATION, prompt_length

#: rope types whose frequencies are fixed, so that rotations compose
COMPOSABLE = ("default", "linear", "llama3", "yarn", "proportional")
#: rope types that pick their frequencies from the sequence length: fixed within one prefill,
#: whose rotaries :func:`apb.model.hf_bridge.prompt_length` pins to the prompt's length
LENGTH_DEPENDENT = ("dynamic", "longrope")


def _position(position: int, device: torch.device) -> torch.Tensor:
    """A (1, 1) position id made on ``device`` (a fill, not a copy from host memory, which on a
    GPU waits for the device: the census of ``make gpu-check`` found it inside apb's layers)."""
    return torch.full((1, 1), position, dtype=torch.long, device=device)


@dataclass
class RopeShift:
    rotary: torch.nn.Module  # the model's rotary embedding: forward(x, position_ids[, layer_type]) -> (cos, sin)
    apply: Callable  # its modeling module's apply_rotary_pos_emb(q, k, cos, sin)
    #: how many trailing dims of a head the attention rotates, where it splits them off itself
    #: before ``apply`` (multi-head latent attention's rope part: DeepSeek); None: ``apply`` takes
    #: the whole head (cos may be narrower than it: GPT-OSS's holds one angle per pair)
    rope_dim: int | None = None
    #: layer index -> whether that layer's query turns with its position (False: a layer without
    #: RoPE); checked against each layer's own query (:func:`rope_shift`)
    turns: dict[int, bool] = field(default_factory=dict)
    #: layer index -> the ``layer_type`` its angles come from, for a rotary with frequencies per
    #: layer type (Gemma 3); empty for a rotary with one set
    kinds: dict[int, str] = field(default_factory=dict)
    #: ``apply`` rotates one tensor, ``apply(x, cos, sin)`` (Gemma 3n, Gemma 4), not a (q, k) pair
    single: bool = False
    #: the longest prompt the check covered (:func:`_far_starts`): a longer one is refused
    checked_to: int = 0
    #: positions (1-D, long) -> the factor the model multiplies a query at each by, where it
    #: scales queries by position (Ministral 3: 1 + beta log(1 + floor(p / L))); None
    position_scale: Callable[[torch.Tensor], torch.Tensor] | None = None
    #: layer index -> whether that layer's query carries ``position_scale`` (checked per layer)
    scaled: dict[int, bool] = field(default_factory=dict)

    def _cos_sin(self, x: torch.Tensor, position: int, kind: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        typed = {} if kind is None else {"layer_type": kind}
        cos, sin = self.rotary(x, _position(position, x.device), **typed)
        # attention_scaling (yarn, longrope) multiplies cos and sin; a vector already carries it once
        name = "attention_scaling" if kind is None else f"{kind}_attention_scaling"
        scale = float(getattr(self.rotary, name, 1.0) or 1.0)
        return cos / scale, sin / scale

    def shift(self, x: torch.Tensor, delta: int, layer: int, ratio: torch.Tensor | None = None) -> torch.Tensor:
        """Layer ``layer``'s query ``x`` (batch, heads, tokens, head_dim) at ``delta`` more positions:
        rotated by ``delta`` with that layer's angles, or as it is in a layer without RoPE; and,
        in a layer that scales its query by position, multiplied per token by ``ratio``
        (:meth:`ratio`, for the tokens' positions before the shift). Inside a prefill (a
        length-dependent rotary is pinned to the prompt's length there)."""
        out = self.turn(x, delta, self.kinds.get(layer)) if self.turns[layer] else x
        if self.scaled.get(layer):
            if ratio is None:
                raise ValueError(f"layer {layer} scales its query by position: the shift needs the tokens' positions")
            out = out * ratio.to(out.dtype)[:, None]
        return out

    def ratio(self, positions: torch.Tensor, delta: int) -> torch.Tensor | None:
        """Per token, the model's query scale at ``positions + delta`` over that at ``positions``
        (float32, on the positions' device); None where the model scales no query by position."""
        if self.position_scale is None:
            return None
        return self.position_scale(positions + delta) / self.position_scale(positions)

    def turn(self, x: torch.Tensor, delta: int, kind: str | None = None) -> torch.Tensor:
        """``x`` rotated by ``delta`` more positions (with layer type ``kind``'s angles)."""
        if delta == 0:
            return x
        return self._apply(x, *self._cos_sin(x, delta, kind))

    def _apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # multi-head latent attention rotates only a head's last dims, as the model does (its
        # query is [no-rope part, rope part])
        d = self.rope_dim
        if d is not None and x.shape[-1] > d:
            return torch.cat([x[..., :-d], self._apply(x[..., -d:].contiguous(), cos, sin)], -1)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        return self.apply(x, cos, sin) if self.single else self.apply(x, x, cos, sin)[0]


def rope_types(model_config) -> list[str]:
    """The rope types the config names: one, or one per layer type where it has several (Gemma 3)."""
    cfg = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    sets = [v for v in params.values() if isinstance(v, dict)] or [params]
    return [p.get("rope_type", p.get("type", "default")) for p in sets]


def shiftable(model_config) -> bool:
    """Whether every rope type the config names is one :func:`rope_shift` can move vectors with
    (fixed frequencies, or frequencies fixed per prompt); read from the config, before any model
    is loaded. The loaded model is checked against its own queries as well (:func:`rope_shift`)."""
    return all(t in COMPOSABLE + LENGTH_DEPENDENT for t in rope_types(model_config))


def rope_shift(model: torch.nn.Module) -> RopeShift | None:
    """The model's :class:`RopeShift`, or ``None`` when its rotations cannot be moved safely."""
    cached = getattr(model, "_apb_rope_shift", False)
    if cached is not False:
        return cached
    found = _find(model)
    checked = None if found is None else _layer_turns(found, model)
    if checked is None:
        model._apb_rope_shift = None
    else:
        turns, scaled = checked
        far = _far_starts(_text_config(model), _DELTA)
        model._apb_rope_shift = dataclasses.replace(found, turns=turns, scaled=scaled,
                                                    checked_to=max([10 + _DELTA, *far]) + 3)
    return model._apb_rope_shift


def _text_config(model: torch.nn.Module):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _find(model: torch.nn.Module) -> RopeShift | None:
    rotaries = [m for name, m in model.named_modules() if name.endswith("rotary_emb")
                and (hasattr(m, "inv_freq") or isinstance(getattr(m, "rope_type", None), dict))]
    if len(rotaries) != 1:  # none (no RoPE), or several
        return None
    rotary = rotaries[0]
    kind = getattr(rotary, "rope_type", "default")
    kinds: dict[int, str] = {}
    if isinstance(kind, dict):  # frequencies per layer type: each layer's type, as the model picks it
        types = list(getattr(_text_config(model), "layer_types", None) or ())
        kinds = {i: t for i, t in enumerate(types) if t in kind}
        if not kinds:
            return None
    if not all(t in COMPOSABLE + LENGTH_DEPENDENT for t in (kind.values() if isinstance(kind, dict) else [kind])):
        return None
    layers = _attention_layers(model)
    attn = next(iter(layers.values()), None)
    apply = getattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb", None) if attn else None
    if not callable(apply):
        return None
    try:
        names = list(inspect.signature(apply).parameters)
    except (TypeError, ValueError):
        return None
    return RopeShift(rotary, apply, getattr(model.config, "qk_rope_head_dim", None), kinds=kinds,
                     single=names[1:2] == ["cos"], position_scale=_position_scale(model, attn))


def _position_scale(model: torch.nn.Module, attn: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The factor by which the model scales a query at each position, from its own modeling code
    (``get_llama_4_attn_scale``, with the config's beta and L, as Ministral 3's attention
    calls it); None for a model that scales none. Which layers carry it is checked
    against their queries (:func:`_layer_turns`)."""
    scale = getattr(sys.modules.get(type(attn).__module__), "get_llama_4_attn_scale", None)
    params = getattr(_text_config(model), "rope_parameters", None) or {}
    beta, span = params.get("llama_4_scaling_beta"), params.get("original_max_position_embeddings")
    if not callable(scale) or beta is None or not span:
        return None
    return lambda positions: scale(positions[None].float(), beta, span).reshape(-1).float()


def _attention_layers(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """{layer index: attention module}: the modules that hand apb's bridge their query."""
    return {int(m.layer_idx): m for m in model.modules()
            if hasattr(m, "layer_idx") and type(m).__name__.endswith("Attention")}


class _QueryProbe:
    """Stands in for a prefill's context in the RoPE probe: records each layer's query and attends
    nothing (a zero output), so each layer's input does not depend on where the tokens sit."""

    def __init__(self) -> None:
        self.queries: dict[int, torch.Tensor] = {}

    def step(self, module, q, k, v, scale, latent=None, **_options) -> torch.Tensor:
        self.queries[int(module.layer_idx)] = q.float()
        return q.new_zeros(*q.shape[:-1], v.shape[-1])


@contextlib.contextmanager
def _apb_attention(model: torch.nn.Module):
    """The model's layers call apb's attention inside the block (a model loaded with another one
    is put back after)."""
    configs = {id(c): c for c in (model.config, _text_config(model))}.values()
    before = [(c, c._attn_implementation) for c in configs]
    for c, _ in before:
        c._attn_implementation = ATTN_IMPLEMENTATION
    try:
        yield
    finally:
        for c, was in before:
            c._attn_implementation = was


_DELTA = 1000  # how far the probe moves its tokens to check the shift


def _far_starts(text_config, delta: int) -> list[int]:
    """Where the probe also puts its tokens: a few starts up to the model's longest prompt, each
    in a decade of its own, so that a query scaled by a step function of the position
    (Llama 4's and Ministral 3's attention temperature: 1 + beta log(1 + floor(p / L)), which is
    1 below L) is seen at each scale a prompt can reach."""
    limit = int(getattr(text_config, "max_position_embeddings", 0) or 0) or 1 << 20
    starts = [7 + delta * 10 ** k for k in range(1, 5) if 7 + delta * 10 ** k + 3 <= limit]
    return starts + ([limit - 3] if limit - 3 > 7 + delta and limit - 3 not in starts else [])


@torch.no_grad()
def _layer_turns(shift: RopeShift, model: torch.nn.Module,
                 delta: int = _DELTA) -> tuple[dict[int, bool], dict[int, bool]] | None:
    """{layer: whether its query turns with its position}, checked against each attention layer's
    own query. The whole model runs the same three tokens at positions ``p`` and ``p + delta``
    with attention that outputs nothing, so every layer's input is the same at both (its norms,
    MLP and experts see the same tokens) and its queries differ only as the model rotates them,
    with the angles the model hands that layer. A layer turns when ``shift`` moves its query at
    ``p`` onto its query at ``p + delta``, and stays (a NoPE layer: SmolLM3's every fourth) when
    the two are equal. A rotation keeps each head's length, so the queries at starts up to the
    model's longest prompt (:func:`_far_starts`) must keep their lengths too, or change them by
    exactly the model's own scale for those positions (``shift.position_scale``: Ministral 3's
    temperature, 1 below 16K positions and more above; the layer is then ``scaled``). A query
    scaled by its position otherwise is refused, where one pair of positions below the step
    would have passed it. Returns (turns, scaled).

    None when any layer's query moves otherwise, or is not seen: a model whose rotation ``shift``
    does not reproduce (a partial rotary applied to a head's first dims, a layer handed another
    type's angles, a position-dependent scale) is refused rather than scored with a wrongly
    turned query. It routes the model's attention to the probe while it runs: not while another
    thread runs the model."""
    layers = _attention_layers(model)
    text = _text_config(model)
    vocab = getattr(text, "vocab_size", None)
    if not layers or not isinstance(vocab, int) or vocab < 1:
        return None
    param = next(model.parameters())
    ids = torch.randint(0, vocab, (1, 3), generator=torch.Generator().manual_seed(0)).to(param.device)
    tol = 1e-3 if param.dtype == torch.float32 else 3e-2
    mla.install(model)  # a latent-attention layer hands the bridge its latent pair, as in a prefill

    def queries(start: int, n_tokens: int) -> dict[int, torch.Tensor]:
        # a length-dependent rotary picks its frequencies for ``n_tokens``, as in a prefill
        with prompt_length(model, n_tokens):
            probe = _QueryProbe()
            model(input_ids=ids, position_ids=torch.arange(start, start + 3, device=param.device)[None],
                  use_cache=False, logits_to_keep=1, apb_ctx=probe)
            return probe.queries

    try:
        with _apb_attention(model):
            n = 10 + delta  # one set of frequencies for both runs of the shift's check
            seen = [queries(7, n), queries(7 + delta, n)]
            turns = {}
            for idx in sorted(layers):
                here, there = seen[0].get(idx), seen[1].get(idx)
                if here is None or there is None or here.shape != there.shape:
                    return None
                scale = float(there.abs().max()) or 1.0
                if shift.kinds and idx not in shift.kinds:
                    turned = None
                else:
                    with prompt_length(model, n):
                        turned = shift.turn(here, delta, shift.kinds.get(idx))
                if turned is not None and float((turned - there).abs().max()) <= tol * scale:
                    turns[idx] = True
                elif float((here - there).abs().max()) <= tol * scale:
                    turns[idx] = False
                else:
                    return None
            scaled: dict[int, bool] = {}
            for start in _far_starts(text, delta):
                far = queries(start, start + 3)
                near = torch.arange(7, 10, device=param.device)
                ratio = shift.ratio(near, start - 7)
                for idx, here in seen[0].items():
                    got = far.get(idx)
                    if got is None or got.shape != here.shape:
                        return None
                    lengths, now = here.norm(dim=-1), got.norm(dim=-1)
                    bound = tol * (float(now.abs().max()) or 1.0)
                    kept = float((now - lengths).abs().max()) <= bound
                    if ratio is None or torch.allclose(ratio, torch.ones_like(ratio)):
                        if not kept:
                            return None
                        continue
                    moved = float((now - lengths * ratio.to(lengths)).abs().max()) <= bound
                    if not (kept or moved):  # scaled by position, but not as the model's scale says
                        return None
                    if kept != moved and scaled.setdefault(idx, moved) != moved:
                        return None
            return turns, {idx: scaled.get(idx, False) for idx in turns}
    except Exception:  # a model or rotary that takes other arguments: do not guess
        return None
