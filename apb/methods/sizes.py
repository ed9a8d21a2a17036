"""Anchor and passing sizes: pure functions from config values and prompt sizes to token counts.

A size in the config is ``None`` (the method's default), an ``int`` (tokens), a ``float`` in
(0, 1] (a fraction of the context block, ``n_ctx / W``), or for ``passing_len`` also ``"all"``
(the whole block: no compression), a list with one entry per layer, or
``{"linear": [first, last]}`` (interpolated over layers). Defaults, fractions and schedules are rounded to a multiple of
``round_to`` (never below one unit when the request was positive); explicit token counts are
taken as given.
"""

from __future__ import annotations

from typing import Any

ALL = "all"


def _round(x: float, unit: int) -> int:
    if x <= 0:
        return 0
    if unit <= 1:
        return max(1, int(round(x)))
    return max(unit, int(round(x / unit)) * unit)


def resolve_len(value: Any, block: int, default: float, unit: int, field: str) -> int:
    """One size in tokens. ``default`` is in tokens (already computed by the method)."""
    if value is None:
        return _round(default, unit)
    if value == ALL:
        return block
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{field}={value!r}: expected tokens (int), a block fraction (float in (0, 1]), or 'all'")
    if isinstance(value, float):
        if not 0.0 < value <= 1.0:
            raise ValueError(f"{field}={value}: a fraction must be in (0, 1]; write tokens as an integer")
        return _round(value * block, unit)
    if value < 0:
        raise ValueError(f"{field}={value}: must be >= 0")
    return int(value)


def resolve_passing(value: Any, block: int, default: float, unit: int, layers: int) -> list[int]:
    """Passing length per layer, each capped at ``block``."""
    if isinstance(value, dict):
        if set(value) != {"linear"} or len(value["linear"]) != 2:
            raise ValueError(f"passing_len={value!r}: a schedule must be {{linear: [first, last]}}")
        first, last = (resolve_len(v, block, default, unit, "passing_len") for v in value["linear"])
        steps = max(1, layers - 1)
        per_layer = [_round(first + (last - first) * i / steps, unit) if first or last else 0
                     for i in range(layers)]
    elif isinstance(value, list):
        if len(value) != layers:
            raise ValueError(f"passing_len has {len(value)} entries but the model has {layers} layers; "
                             "give one per layer or a single value")
        per_layer = [resolve_len(v, block, default, unit, f"passing_len[{i}]") for i, v in enumerate(value)]
    else:
        per_layer = [resolve_len(value, block, default, unit, "passing_len")] * layers
    return [min(p, block) for p in per_layer]


def resolve_exact_layers(value: Any, num_layers: int) -> frozenset[int]:
    """``method.exact_layers`` as a set of layer indices: None or 0 none, ``N`` the first ``N``
    layers, a list the layers named."""
    if value is None:
        return frozenset()
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value <= num_layers:
            raise ValueError(f"method.exact_layers={value}, but the model has {num_layers} layers; give at most "
                             f"{num_layers} (the first N layers) or a list of layer indices")
        return frozenset(range(value))
    bad = [i for i in value if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"method.exact_layers names layers {bad}, but the model's layers are 0..{num_layers - 1}")
    return frozenset(value)
