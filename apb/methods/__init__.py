"""The method registry: every attention method is registered here, by name, in one place.

==========  =======  ========================================================
name        exact    what it does
==========  =======  ========================================================
full        yes      all tokens on host 0, plain causal attention
ring        yes      zigzag layout, K/V blocks passed round a ring, LSE merge
ulysses     yes      all-to-all from sequence to head shards (DeepSpeed)
==========  =======  ========================================================
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


def method_names() -> list[str]:
    return list(_METHODS)


def build_method(name: str, **options) -> Method:
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(_METHODS)}")
    return _METHODS[name](**options)


# registration happens on import; the order here is the order users see
from apb.methods import full, ring, ulysses  # noqa: E402,F401

__all__ = ["AttnContext", "Method", "build_method", "method_names", "register_method"]
