"""Moving a rotary-embedded vector to another position, with the model's own RoPE.

apb's anchor carries a copy of the query at anchor positions ``s .. s+q-1``, while the real query
sits at ``n_ctx .. n-1``. A compressor that scores block keys with the copy would see relative
distances that the real query never has (and that differ from host to host). RoPE rotates each
vector by an angle linear in its position, so a vector computed at position ``p`` becomes the
same vector at ``p + delta`` by one more rotation by ``delta`` (:meth:`RopeShift.shift`).

That holds only when the frequencies do not depend on the sequence (default, linear, llama3 and
yarn scaling); dynamic NTK and longrope pick frequencies from the length, so for them, and for
any model whose rotary module or ``apply_rotary_pos_emb`` we cannot find, :func:`rope_shift`
returns ``None``; apb then refuses to score at true positions (:func:`shiftable` lets it refuse
on the driver, from the config) rather than silently scoring at the anchor's. Every model is
checked once, layer by layer, against each attention layer's own query at ``p`` and ``p + delta``
(:func:`_layer_turns`): a layer without RoPE (SmolLM3's every fourth, Cohere 2's global layers)
keeps its query as it is, and a model whose rotation the shift does not reproduce is refused.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import AttentionInterface

#: rope types whose frequencies are fixed, so that rotations compose
COMPOSABLE = ("default", "linear", "llama3", "yarn")


def _position(position: int, device: torch.device) -> torch.Tensor:
    """A (1, 1) position id made on ``device`` (a fill, not a copy from host memory, which on a
    GPU waits for the device: the census of ``make gpu-check`` found it inside apb's layers)."""
    return torch.full((1, 1), position, dtype=torch.long, device=device)


@dataclass
class RopeShift:
    rotary: torch.nn.Module  # the model's rotary embedding: forward(x, position_ids) -> (cos, sin)
    apply: Callable  # its modeling module's apply_rotary_pos_emb(q, k, cos, sin)
    #: how many trailing dims of a head the attention rotates, where it splits them off itself
    #: before ``apply`` (multi-head latent attention's rope part: DeepSeek); None: ``apply`` takes
    #: the whole head (cos may be narrower than it: GPT-OSS's holds one angle per pair)
    rope_dim: int | None = None
    #: layer index -> whether that layer's query turns with its position (False: a layer without
    #: RoPE); checked against each layer's own query (:func:`rope_shift`)
    turns: dict[int, bool] = field(default_factory=dict)

    def _cos_sin(self, x: torch.Tensor, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.rotary(x, _position(position, x.device))
        # attention_scaling (yarn) multiplies cos and sin; a vector already carries it once
        scale = float(getattr(self.rotary, "attention_scaling", 1.0) or 1.0)
        return cos / scale, sin / scale

    def shift(self, x: torch.Tensor, delta: int, layer: int) -> torch.Tensor:
        """Layer ``layer``'s query ``x`` (batch, heads, tokens, head_dim) at ``delta`` more positions:
        rotated by ``delta``, or as it is in a layer without RoPE."""
        return self.turn(x, delta) if self.turns[layer] else x

    def turn(self, x: torch.Tensor, delta: int) -> torch.Tensor:
        """``x`` rotated by ``delta`` more positions."""
        if delta == 0:
            return x
        return self._apply(x, *self._cos_sin(x, delta))

    def _apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # multi-head latent attention rotates only a head's last dims, as the model does (its
        # query is [no-rope part, rope part])
        d = self.rope_dim
        if d is not None and x.shape[-1] > d:
            return torch.cat([x[..., :-d], self._apply(x[..., -d:].contiguous(), cos, sin)], -1)
        return self.apply(x, x, cos.to(x.dtype), sin.to(x.dtype))[0]


def shiftable(model_config) -> bool:
    """Whether the config's RoPE has fixed frequencies (one rope type, in :data:`COMPOSABLE`), so
    that :func:`rope_shift` can move vectors; read from the config, before any model is loaded."""
    params = getattr(model_config, "rope_parameters", None) or getattr(model_config, "rope_scaling", None) or {}
    if any(isinstance(v, dict) for v in params.values()):  # one rope per layer type (e.g. Gemma 3)
        return False
    return params.get("rope_type", params.get("type", "default")) in COMPOSABLE


def rope_shift(model: torch.nn.Module) -> RopeShift | None:
    """The model's :class:`RopeShift`, or ``None`` when its rotations cannot be moved safely."""
    cached = getattr(model, "_apb_rope_shift", False)
    if cached is not False:
        return cached
    found = _find(model)
    turns = None if found is None else _layer_turns(found, model)
    model._apb_rope_shift = None if turns is None else RopeShift(found.rotary, found.apply, found.rope_dim, turns)
    return model._apb_rope_shift


def _find(model: torch.nn.Module) -> RopeShift | None:
    rotaries = [m for name, m in model.named_modules() if name.endswith("rotary_emb") and hasattr(m, "inv_freq")]
    if len(rotaries) != 1:  # none (no RoPE), or several (per-layer-type rotaries, e.g. Gemma 3)
        return None
    rotary = rotaries[0]
    if getattr(rotary, "rope_type", "default") not in COMPOSABLE:
        return None
    layers = _attention_layers(model)
    attn = next(iter(layers.values()), None)
    apply = getattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb", None) if attn else None
    if not callable(apply):
        return None
    return RopeShift(rotary, apply, getattr(model.config, "qk_rope_head_dim", None))


def _attention_layers(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """{layer index: attention module}: the modules that hand apb's bridge their query."""
    return {int(m.layer_idx): m for m in model.modules()
            if hasattr(m, "layer_idx") and type(m).__name__.endswith("Attention")}


class _Query(Exception):
    """Carries an attention layer's query out of its forward: the probe stops there."""

    def __init__(self, query: torch.Tensor):
        super().__init__("an attention layer's query, caught by apb's RoPE probe")
        self.query = query


def _catch_query(module, query, key, value, attention_mask, **kwargs):
    raise _Query(query)


_PROBE = "apb_rope_probe"
AttentionInterface.register(_PROBE, _catch_query)


@torch.no_grad()
def _layer_turns(shift: RopeShift, model: torch.nn.Module, delta: int = 1000) -> dict[int, bool] | None:
    """{layer: whether its query turns with its position}, checked against each attention layer's
    own query: the same hidden states at positions ``p`` and ``p + delta``, through the layer's
    projections, norms and rotation as the model runs them. A layer turns when ``shift`` moves its
    query at ``p`` onto its query at ``p + delta``, and stays (a NoPE layer: SmolLM3's every
    fourth) when the two are equal. None when any layer's query moves otherwise, or cannot be
    caught: a model whose rotation ``shift`` does not reproduce (a partial rotary applied to a
    head's first dims, say) is refused rather than scored with a wrongly turned query. It routes
    the model's attention to the probe while it runs: not while another thread runs the model."""
    layers = _attention_layers(model)
    cfg = model.config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if not layers or not isinstance(getattr(text, "hidden_size", None), int):
        return None
    param = next(model.parameters())
    hidden = torch.randn(1, 3, text.hidden_size, generator=torch.Generator().manual_seed(0)).to(param.device,
                                                                                                 param.dtype)
    at = torch.arange(7, 10, device=param.device)[None]
    try:
        angles = [shift.rotary(hidden, at), shift.rotary(hidden, at + delta)]
    except Exception:  # a rotary that takes other arguments: do not guess
        return None
    tol = 1e-3 if param.dtype == torch.float32 else 3e-2
    before = cfg._attn_implementation
    cfg._attn_implementation = _PROBE
    try:
        turns = {}
        for idx, layer in sorted(layers.items()):
            here, there = (_query_of(layer, hidden, a) for a in angles)
            if here is None or there is None:
                return None
            scale = float(there.abs().max()) or 1.0
            try:
                turned = shift.turn(here, delta)
            except Exception:  # an apply_rotary_pos_emb that takes another form
                return None
            if turned.shape == there.shape and float((turned - there).abs().max()) <= tol * scale:
                turns[idx] = True
            elif float((here - there).abs().max()) <= tol * scale:
                turns[idx] = False
            else:
                return None
        return turns
    finally:
        cfg._attn_implementation = before


def _query_of(layer: torch.nn.Module, hidden: torch.Tensor, angles) -> torch.Tensor | None:
    try:
        layer(hidden_states=hidden, position_embeddings=angles, attention_mask=None)
    except _Query as caught:
        return caught.query.float()
    except Exception:  # another forward signature: do not guess
        return None
    return None
