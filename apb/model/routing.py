"""Which experts each token chose in a forward, and how near its choice was to a tie.

Used by ``apb verify`` in 16-bit dtypes, on the reference forwards on the driver and on each
host's own forwards (``prefill(..., routing=True)``): a model that routes tokens to experts makes a
discrete choice per token and layer, so one rounding step in the attention output can send a
near-tied token to other experts, and that token's K/V then differ in every later layer (session
30, ``docs/results/fuzz-s30/routing_flip.txt``). Such a change is rounding, not a wrong mask, only
if the token's choice really was near a tie: :func:`near_ties` says so from the float32 reference's
own router scores, against how far the same dtype's eager forward moves them.

Routers are found by name, not by family: a module whose class name ends in ``Router`` inside a
decoder layer, whose output holds a float tensor of one score per expert for each token (every
router in transformers 5 returns its logits first) and the chosen experts. The scores that choose
are the logits (softmax and top-k keep their order), or ``sigmoid + bias`` where the router has
DeepSeek's ``e_score_correction_bias``, with its expert groups. A router this does not recognise
records nothing, and its model is judged as one without experts.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass
class Routing:
    """Per decoder layer with a router: each token's selection score for every expert ``(n, E)``
    in float32, and the experts it chose ``(n, k)``, sorted."""

    scores: dict[int, torch.Tensor]
    chosen: dict[int, torch.Tensor]
    #: layers whose router first picks ``topk_group`` of ``n_group`` expert groups (DeepSeek-V3)
    groups: dict[int, tuple[int, int]] = field(default_factory=dict)

    def margin(self, layer: int) -> torch.Tensor:
        """Per token ``(n,)``: how far its scores are from choosing otherwise. The lowest chosen
        score minus the highest one not chosen; with expert groups, among the chosen groups' experts,
        and no more than the lowest chosen group's score (the sum of its two best) minus the highest
        other group's. Negative where something else chose: counted as a tie."""
        s, c = self.scores[layer], self.chosen[layer]
        picked = torch.zeros_like(s, dtype=torch.bool).scatter_(1, c, True)
        allowed = torch.ones_like(picked)
        group_gap = None
        if layer in self.groups:
            n_group, topk_group = self.groups[layer]
            by_group = s.view(s.shape[0], n_group, -1)
            group_score = by_group.topk(min(2, by_group.shape[-1]), dim=-1).values.sum(-1)
            ranked = group_score.sort(-1, descending=True).values
            if topk_group < n_group:
                group_gap = ranked[:, topk_group - 1] - ranked[:, topk_group]
            top = group_score.topk(topk_group, dim=-1).indices
            in_group = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, top, True)
            allowed = in_group[:, :, None].expand_as(by_group).reshape_as(s)
        low = s.masked_fill(~picked, float("inf")).min(1).values
        high = s.masked_fill(picked | ~allowed, float("-inf")).max(1).values
        gap = low - high
        return gap if group_gap is None else torch.minimum(gap, group_gap)


def routers(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """The router of each decoder layer that has one, by layer index."""
    out = {}
    for name, module in model.named_modules():
        m = _LAYER.search(name + ".")
        if m and type(module).__name__.lower().endswith("router"):
            out.setdefault(int(m.group(1)), module)
    return out


def _read(module: torch.nn.Module, output) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(selection scores (n, E) float32, chosen experts (n, k) sorted) from a router's output, or
    None when its output does not have that shape. (Groups: :func:`_groups`.)"""
    tensors = [output] if torch.is_tensor(output) else [t for t in output if torch.is_tensor(t)]
    n_experts = getattr(module, "num_experts", None) or getattr(module, "out_features", None)
    floats = [t for t in tensors if t.is_floating_point() and t.dim() == 2 and t.shape[-1] == n_experts]
    if not floats:
        return None
    logits = floats[0].float()  # every router above returns its logits first, or alone
    ints = [t for t in tensors if not t.is_floating_point() and t.dim() == 2 and t.shape[0] == logits.shape[0]]
    bias = getattr(module, "e_score_correction_bias", None)
    scores = logits if bias is None else logits.sigmoid() + bias.float()
    if ints:
        chosen = ints[0].long()
    elif isinstance(getattr(module, "top_k", None), int):
        chosen = scores.topk(module.top_k, dim=-1).indices
    else:
        return None
    return scores.detach().cpu(), chosen.sort(-1).values.cpu()


def _groups(module: torch.nn.Module) -> tuple[int, int] | None:
    """(n_group, topk_group) of a router that chooses expert groups first, else None."""
    n_group, topk_group = getattr(module, "num_group", None), getattr(module, "topk_group", None)
    if isinstance(n_group, int) and isinstance(topk_group, int) and n_group > 1:
        return n_group, topk_group
    return None


@contextmanager
def record(model: torch.nn.Module):
    """Collect the routing of every forward run inside the block (the last one wins); yields the
    :class:`Routing`, filled when the block ends. A model without routers yields an empty one."""
    routing = Routing({}, {})
    hooks = []
    for layer, module in routers(model).items():
        def hook(module, args, output, layer=layer):
            got = _read(module, output)
            if got is not None:
                routing.scores[layer], routing.chosen[layer] = got
                if _groups(module):
                    routing.groups[layer] = _groups(module)
        hooks.append(module.register_forward_hook(hook))
    try:
        yield routing
    finally:
        for h in hooks:
            h.remove()


def rounding_scale(truth: Routing, half: Routing, layer: int, quantile: float = 0.99) -> float:
    """How far the 16-bit eager forward moved this layer's router scores from float32's: per
    token the largest move over the experts, and of those the ``quantile`` (a high one, not the
    largest: the tail is the tokens whose input moved most) over the tokens that chose the same
    experts in both at this layer and every router before it (a token that chose otherwise moves
    by its new input, not by rounding)."""
    same = None
    for at in sorted(k for k in truth.chosen if k <= layer and k in half.chosen):
        here = (truth.chosen[at] == half.chosen[at]).all(-1)
        same = here if same is None else same & here
    if same is None or not bool(same.any()):
        return 0.0
    moved = (truth.scores[layer][same] - half.scores[layer][same]).abs().max(-1).values
    return float(torch.quantile(moved.double(), quantile))


def near_ties(truth: Routing, half: Routing, factor: float) -> dict[int, torch.Tensor]:
    """Per router layer, which tokens' float32 choice was within ``factor`` x the dtype's rounding
    of the scores (:func:`rounding_scale`) of a tie ``(n,)`` bool: a rounding difference could
    have sent them to other experts there. (To swap two experts a rounding must move their scores'
    difference by the margin, so by half of it each: ``factor`` 4 leaves room for a method that
    rounds up to twice as far as eager.)"""
    return {layer: truth.margin(layer) <= factor * rounding_scale(truth, half, layer)
            for layer in truth.scores if layer in half.scores}


def host_choices(routing: Routing, positions: torch.Tensor, rows: torch.Tensor | None = None) -> dict:
    """One forward's choices keyed by layer, ``{layer: (positions (m,), chosen (m, k))}``, for the
    forward's ``rows`` (a bool mask, e.g. the rows that are not padding) at their prompt ``positions``."""
    out = {}
    for layer, chosen in routing.chosen.items():
        keep = slice(None) if rows is None else rows.cpu()
        out[layer] = (positions.cpu()[keep], chosen[keep])
    return out


def merge_choices(parts: list[dict]) -> dict:
    """Several forwards' or hosts' :func:`host_choices` as one ``{layer: (positions, chosen)}``
    (a position computed on more than one host, as an anchor's copies, appears once per copy)."""
    out: dict = {}
    for part in parts:
        for layer, (pos, chosen) in (part or {}).items():
            if layer in out:
                out[layer] = (torch.cat([out[layer][0], pos]), torch.cat([out[layer][1], chosen]))
            else:
                out[layer] = (pos, chosen)
    return out


def flips(truth: Routing, choices: dict, n: int) -> dict[int, torch.Tensor]:
    """Per router layer, which prompt positions ``(n,)`` bool were sent to other experts than
    ``truth`` sent them (by any of their copies)."""
    out = {}
    for layer, (pos, chosen) in choices.items():
        if layer not in truth.chosen:
            continue
        differ = (chosen != truth.chosen[layer][pos]).any(-1)
        mask = torch.zeros(n, dtype=torch.bool)
        mask[pos[differ]] = True
        out[layer] = mask
    return out
