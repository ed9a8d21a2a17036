"""The attention methods, each registered by name (:mod:`apb.methods.registry`) on import.

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

from apb.methods.base import AttnContext, Method
from apb.methods.registry import build_method, check_method_name, method_class, method_names, register_method

# registration happens on import; the order here is the order users see
from apb.methods import full, ring, ulysses, star, apb, spava  # noqa: F401

__all__ = ["AttnContext", "Method", "build_method", "check_method_name", "method_class", "method_names",
           "register_method"]
