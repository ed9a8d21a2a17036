"""``full``: the single-device reference. Host 0 holds the whole prompt; others idle."""

from __future__ import annotations

from apb.kernels import attention
from apb.methods.registry import register_method
from apb.methods.base import Method
from apb.methods.cost import single_device
from apb.parallel import layout


@register_method("full")
class Full(Method):
    one_host = True

    @classmethod
    def cost(cls, n, w, shape, sizes):
        return single_device(n)

    def layout(self, n_tokens, world_size, n_query=0):
        return layout.single(n_tokens, world_size)

    def attention(self, ctx, module, q, k, v, scale):
        return attention(q, k, v, causal=True, scale=scale, **ctx.score_opts)[0]
