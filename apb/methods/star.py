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

    variants = {"shared": {"share_anchor": True}}

    @classmethod
    def default_sizes(cls, n_ctx, block):
        return block, 0.0

    @classmethod
    def _layer_cost(cls, n, w, shape, q, a, p):
        # host r > 0: [A, B_r] causally, then the query over its block in the query phase
        b = n / w
        return HostWork(a + b + q, (a + b) ** 2 / 2 + q * n / w, b, comm_bytes=merge_bytes(q, shape), steps=1, anchor=a)

    @classmethod
    def _shared_layer_cost(cls, n, w, shape, q, a, p, role):
        # host 0 sends the K/V of its block's first a tokens; a host r > 0 runs its block alone and
        # attends the received anchor besides, hearing it behind its block's causal call
        b = n / w
        sent = a * 2 * shape.kv_heads * shape.head_dim * shape.bytes_per_param
        pairs = b * b / 2 + (b * a if role == "receiver" else 0.0) + q * n / w
        return HostWork(b + q, pairs, b, comm_bytes=merge_bytes(q, shape), steps=2, overlap_bytes=sent, anchor=a)
