"""The method registry: every attention method is registered here, by name, in one place.

==========  =======  ============================================================
name        exact    what it does
==========  =======  ============================================================
full        yes      all tokens on host 0, plain causal attention
ring        yes      zigzag layout, K/V blocks passed round a ring, LSE merge
ulysses     yes      all-to-all from sequence to head shards (DeepSpeed)
star        no       anchor + local block, no context communication; exact query
apb         no       anchor with embedded query + compressed passing blocks
spava       no       zigzag virtual blocks, fused query, overlapped passing
==========  =======  ============================================================

A method may define variants (``apb:uncompressed``): named option presets that are checked
like methods; ``:uncompressed`` (no anchor, everything passed) must be exact.
"""

from __future__ import annotations

from typing import Callable

from apb.methods.base import AttnContext, Method

_METHODS: dict[str, type[Method]] = {}


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    def deco(cls: type[Method]) -> type[Method]:
        if name in _METHODS:
            raise ValueError(f"method {name!r} registered twice")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return deco


def method_names(with_variants: bool = False) -> list[str]:
    if not with_variants:
        return list(_METHODS)
    return [n for name, cls in _METHODS.items() for n in [name] + [f"{name}:{v}" for v in cls.variants]]


def check_method_name(name: str) -> tuple[str, str | None]:
    base, _, variant = name.partition(":")
    if base not in _METHODS:
        raise ValueError(f"unknown method {base!r}; valid methods: {', '.join(_METHODS)}")
    if variant and variant not in _METHODS[base].variants:
        known = ", ".join(f"{base}:{v}" for v in _METHODS[base].variants) or "none"
        raise ValueError(f"method {base!r} has no variant {variant!r}; its variants: {known}")
    return base, variant or None


def build_method(name: str, config=None, **options) -> Method:
    """A method instance from its name (``apb`` or ``apb:uncompressed``) and option overrides.

    ``config`` is an :class:`apb.config.MethodConfig` (defaults when omitted); a variant's
    presets win over both.
    """
    from apb.config import MethodConfig

    base, variant = check_method_name(name)
    cls = _METHODS[base]
    fields = (config.model_dump() if config is not None else {}) | options
    if variant:
        fields |= cls.variants[variant]
    fields["name"] = base
    method = cls(MethodConfig(**fields))
    if variant:
        method.variant = variant
        method.exact = variant == "uncompressed" or cls.exact
    return method


# registration happens on import; the order here is the order users see
from apb.methods import full, ring, ulysses, star_apb, spava  # noqa: E402,F401

__all__ = ["AttnContext", "Method", "build_method", "method_names", "register_method"]
