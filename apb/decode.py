"""Single-device decoding from a prefilled cache: greedy, or sampling with a seed."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 16
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    seed: int = 0
    stop_at_eos: bool = True


def pick_token(logits: torch.Tensor, sampling: Sampling, gen: torch.Generator | None) -> int:
    if sampling.temperature <= 0:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_p, idx = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        drop = torch.cumsum(sorted_p, dim=-1) - sorted_p >= sampling.top_p
        sorted_p[drop] = 0.0
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
    return int(torch.multinomial(probs.cpu(), 1, generator=gen).item())


@torch.no_grad()
def decode(model, hf_cache, first_logits: torch.Tensor, n_past: int, sampling: Sampling,
           eos_ids: tuple[int, ...] = ()) -> list[int]:
    """Continue from a cache of ``n_past`` tokens whose last-token logits are ``first_logits``."""
    gen = torch.Generator().manual_seed(sampling.seed) if sampling.temperature > 0 else None
    device = next(model.parameters()).device
    tokens: list[int] = []
    logits = first_logits
    for step in range(sampling.max_new_tokens):
        tok = pick_token(logits, sampling, gen)
        tokens.append(tok)
        if (sampling.stop_at_eos and tok in eos_ids) or step == sampling.max_new_tokens - 1:
            break
        out = model(input_ids=torch.tensor([[tok]], device=device),
                    position_ids=torch.tensor([[n_past + step]], device=device),
                    past_key_values=hf_cache, use_cache=True)
        logits = out.logits[0, -1]
    return tokens
