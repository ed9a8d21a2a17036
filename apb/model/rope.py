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
on the driver, from the config) rather than silently scoring at the anchor's. Every shift is checked once per model
against the model's own rotation at ``p + delta``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import torch

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

    def _cos_sin(self, x: torch.Tensor, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.rotary(x, _position(position, x.device))
        # attention_scaling (yarn) multiplies cos and sin; a vector already carries it once
        scale = float(getattr(self.rotary, "attention_scaling", 1.0) or 1.0)
        return cos / scale, sin / scale

    def shift(self, x: torch.Tensor, delta: int) -> torch.Tensor:
        """``x`` (batch, heads, tokens, head_dim), rotated by ``delta`` more positions."""
        if delta == 0:
            return x
        return self._apply(x, *self._cos_sin(x, delta))

    def rotate(self, x: torch.Tensor, position: int) -> torch.Tensor:
        """``x`` rotated as the model rotates a vector at ``position`` (used to check :meth:`shift`)."""
        return self._apply(x, *self.rotary(x, _position(position, x.device)))

    def _apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # a head wider than the rotary (multi-head latent attention: DeepSeek) rotates only its
        # last dims, as the model does (its query is [no-rope part, rope part])
        d = cos.shape[-1]
        if x.shape[-1] > d:
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
    model._apb_rope_shift = found if found is not None and _composes(found, model) else None
    return model._apb_rope_shift


def _find(model: torch.nn.Module) -> RopeShift | None:
    rotaries = [m for name, m in model.named_modules() if name.endswith("rotary_emb") and hasattr(m, "inv_freq")]
    if len(rotaries) != 1:  # none (no RoPE), or several (per-layer-type rotaries, e.g. Gemma 3)
        return None
    rotary = rotaries[0]
    if getattr(rotary, "rope_type", "default") not in COMPOSABLE:
        return None
    attn = next((m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "q_proj")), None)
    apply = getattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb", None) if attn else None
    return RopeShift(rotary, apply) if callable(apply) else None


@torch.no_grad()
def _composes(shift: RopeShift, model: torch.nn.Module) -> bool:
    """Whether rotating at ``p`` then shifting by ``d`` equals the model's rotation at ``p + d``."""
    cfg = model.config
    head_dim = getattr(cfg, "qk_head_dim", None) or getattr(cfg, "head_dim", None) \
        or cfg.hidden_size // cfg.num_attention_heads
    param = next(model.parameters())
    x = torch.randn(1, 2, 3, head_dim, generator=torch.Generator().manual_seed(0)).to(param.device)
    try:
        moved = shift.shift(shift.rotate(x, 7), 1000)
        direct = shift.rotate(x, 1007)
    except Exception:  # an apply_rotary_pos_emb with another signature: do not guess
        return False
    return bool(torch.allclose(moved, direct, rtol=1e-3, atol=1e-4))
