"""Merging partial attentions by their log-sum-exp.

Two attentions of the same queries over disjoint key sets combine exactly into the attention
over the union: weight each partial output by ``exp(lse_i - lse)``. Computed in float32 with
the running max subtracted, so large logits do not overflow; a partial with ``lse = -inf``
(no keys) contributes nothing, and two empty partials merge to an empty one.
"""

from __future__ import annotations

import torch


def merge(out1: torch.Tensor, lse1: torch.Tensor, out2: torch.Tensor, lse2: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge (out, lse) pairs: out (b, h, s, d), lse (b, h, s). Returns float32 out and lse."""
    lse1, lse2 = lse1.float(), lse2.float()
    m = torch.maximum(lse1, lse2)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    w1, w2 = torch.exp(lse1 - m), torch.exp(lse2 - m)
    total = w1 + w2
    lse = m + torch.log(total)
    denom = torch.where(total == 0, torch.ones_like(total), total)
    out = (out1.float() * (w1 / denom)[..., None]) + (out2.float() * (w2 / denom)[..., None])
    return out, lse


def merge_many(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left fold of :func:`merge` over a non-empty list of (out, lse)."""
    if not parts:
        raise ValueError("merge_many needs at least one partial attention")
    out, lse = parts[0][0].float(), parts[0][1].float()
    for o, l in parts[1:]:
        out, lse = merge(out, lse, o, l)
    return out, lse


def merge_(acc_out: torch.Tensor, acc_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """In place: the float32 accumulator ``(acc_out, acc_lse)`` becomes its :func:`merge` with
    ``(out, lse)``, equal to :func:`merge_many`'s fold to float rounding: partials can be merged as
    they arrive, with one buffer per query block and no temporaries of the output's size."""
    lse = lse.float()
    m = torch.maximum(acc_lse, lse)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    w1, w2 = torch.exp(acc_lse - m), torch.exp(lse - m)
    total = w1 + w2
    denom = torch.where(total == 0, torch.ones_like(total), total)
    acc_out.mul_((w1 / denom)[..., None]).addcmul_(out, (w2 / denom)[..., None])
    acc_lse.copy_(m + torch.log(total))
