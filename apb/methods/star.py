"""``star`` (Star Attention): anchored blocks with no context communication, then an exact query.

Host ``r > 0`` encodes ``[A, B_r]`` with local attention only, where ``A`` is the first
``anchor_len`` context tokens (one block by default); host 0 encodes ``B_0``. The context phase
sends nothing. The query then attends exactly to every host's cache in a second pass. The shared
layout and attention step are in :mod:`apb.methods.anchored`.
"""

from __future__ import annotations

from apb.methods.registry import register_method
from apb.methods.anchored import Anchored
from apb.methods.cost import HostWork, merge_bytes


@register_method("star")
class Star(Anchored):
    """Star Attention: anchor = the first block by default; no passing."""

    @classmethod
    def default_sizes(cls, n_ctx, block):
        return block, 0.0

    @classmethod
    def _layer_cost(cls, n, w, shape, q, a, p):
        # host r > 0: [A, B_r] causally, then the query over its block in the query phase
        b = n / w
        return HostWork(a + b + q, (a + b) ** 2 / 2 + q * n / w, b, comm_bytes=merge_bytes(q, shape), steps=1, anchor=a)
