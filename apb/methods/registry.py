"""The registry of attention methods: name -> class, filled by :func:`register_method`.

Each method module registers its class on import; :mod:`apb.methods` imports them all, in the
order users see, so a name is known whenever the package is. Nothing here imports
:mod:`apb.config`: :func:`build_method` is handed a config object and validates overrides with
that object's own class.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from apb.methods.base import Method

if TYPE_CHECKING:  # apb.config imports this registry to validate names, so not at run time
    from apb.config import MethodConfig

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


def method_class(name: str) -> type[Method]:
    """The registered class of ``name`` (a variant names its base method's class)."""
    return _METHODS[check_method_name(name)[0]]


def build_method(name: str, config: MethodConfig, **options) -> Method:
    """A method instance from its name (``apb`` or ``apb:uncompressed``), its config and overrides.

    ``options`` override fields of ``config`` (an :class:`apb.config.MethodConfig`) and a variant's
    presets override both; the result is validated again by ``config``'s own class, so the
    registry never imports :mod:`apb.config` (which imports the registry to check names).
    """
    base, variant = check_method_name(name)
    cls = _METHODS[base]
    fields = config.model_dump() | options
    if variant:
        fields |= cls.variants[variant]
    fields["name"] = base
    method = cls(type(config).model_validate(fields))
    if variant:
        method.variant = variant
        method.exact = variant == "uncompressed" or cls.exact
    return method
