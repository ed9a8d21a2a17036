"""The single bridge between Hugging Face models and our methods.

We register one attention implementation, ``"apb"``, in transformers' ``AttentionInterface``
and deliberately no mask function: transformers then builds no mask for it (our kernels apply
causality themselves, and a dense n x n mask would not fit at these lengths). When a forward call carries ``apb_ctx=`` the layer's
Q/K/V go to that context's method; without it (ordinary decoding after a gathered prefill) the
layer runs plain bottom-right causal attention over its cache.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface

from apb.kernels import attention

ATTN_IMPLEMENTATION = "apb"


def apb_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          **kwargs) -> tuple[torch.Tensor, None]:
    if attention_mask is not None:
        raise ValueError("apb attention takes no attention_mask (padding inside a batch is not supported); "
                         "pass one unpadded prompt at a time")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    window = kwargs.get("sliding_window")
    ctx = kwargs.get("apb_ctx")
    if ctx is not None:
        out = ctx.step(module, query, key, value, scale, sliding_window=window)
    else:
        if window is not None and key.shape[2] > window:
            raise ValueError(f"sequence of {key.shape[2]} tokens exceeds the model's sliding_window={window}, "
                             "which is not supported")
        out, _ = attention(query, key, value, causal=True, scale=scale)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTN_IMPLEMENTATION, apb_attention_forward)
