"""Decoding after a prefill: pick a token (greedy or seeded sampling), feed it back, repeat.

:func:`decode_loop` owns the loop and the stopping rule; two drivers give it a step function:

* :func:`decode` (``decode.mode: gather``): one host, the gathered cache in a transformers
  cache, plain causal attention;
* :func:`decode_distributed` (``decode.mode: distributed``): every host keeps its cache part and
  runs each token through the model; the partial attentions are merged across hosts
  (:class:`CacheAttnContext`, phase ``decode``) and the decode host's token is broadcast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from apb.methods.cache_attention import CacheAttnContext
from apb.model.hf_bridge import with_cache
from apb.parallel.comm import Comm, Phase


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


def token_lead(logits: torch.Tensor, tok: int) -> float:
    """How far ``tok`` leads the most likely other token: ``log p(tok) - max log p(other)``.

    Positive where greedy decoding picks ``tok``; near 0 at a near tie, where a small change in
    the cache (an approximate method's, or a different rounding order) can change the answer."""
    return float(_lead(logits, tok))


def _lead(logits: torch.Tensor, tok: int) -> torch.Tensor:
    """:func:`token_lead` left on the logits' device (read once the loop ends: no wait per token)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    others = torch.arange(logp.shape[-1], device=logp.device) != tok
    return logp[tok] - logp.masked_fill(~others, float("-inf")).max()


def decode_loop(step: Callable[[int, int], torch.Tensor], first_logits: torch.Tensor, n_past: int,
                sampling: Sampling, eos_ids: tuple[int, ...] = (),
                choose: Callable[[int], int] | None = None, leads: list[float] | None = None) -> list[int]:
    """Pick tokens until ``max_new_tokens`` or EOS; ``step(token, position)`` returns the next logits.

    ``choose`` may replace a picked token (distributed decoding broadcasts the decode host's).
    ``leads``, when given, receives each picked token's :func:`token_lead`.
    """
    gen = torch.Generator().manual_seed(sampling.seed) if sampling.temperature > 0 else None
    tokens: list[int] = []
    pending: list[torch.Tensor] = []
    logits = first_logits
    for i in range(sampling.max_new_tokens):
        tok = pick_token(logits, sampling, gen)  # the one wait per token: the next step needs it
        if choose is not None:
            tok = choose(tok)
        tokens.append(tok)
        if leads is not None:
            pending.append(_lead(logits, tok))
        if (sampling.stop_at_eos and tok in eos_ids) or i == sampling.max_new_tokens - 1:
            break
        logits = step(tok, n_past + i)
    if pending:
        leads.extend(torch.stack(pending).tolist())
    return tokens


def _token_ids(tok: int, pos: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step's (1, 1) token and position ids, filled on ``device`` (a copy from host
    memory would wait for a GPU)."""
    return (torch.full((1, 1), tok, dtype=torch.long, device=device),
            torch.full((1, 1), pos, dtype=torch.long, device=device))


@torch.no_grad()
def decode(model, hf_cache, first_logits: torch.Tensor, n_past: int, sampling: Sampling,
           eos_ids: tuple[int, ...] = (), leads: list[float] | None = None) -> list[int]:
    """Single-device decoding from a gathered cache of ``n_past`` tokens (a transformers Cache);
    ``leads`` as in :func:`decode_loop`."""
    device = next(model.parameters()).device

    def step(tok: int, pos: int) -> torch.Tensor:
        ids, position = _token_ids(tok, pos, device)
        out = model(input_ids=ids, position_ids=position, use_cache=True, **with_cache(model, hf_cache))
        return out.logits[0, -1]

    return decode_loop(step, first_logits, n_past, sampling, eos_ids, leads=leads)


@torch.no_grad()
def decode_distributed(model, result, comm: Comm, n_past: int, sampling: Sampling,
                       eos_ids: tuple[int, ...] = (), decode_rank: int = 0,
                       leads: list[float] | None = None) -> list[int]:
    """Decode with every host keeping its cache part; each step merges partial attentions.

    Every host runs the (cheap) per-token layers; only ``decode_rank`` appends new K/V. The
    chosen token is broadcast from ``decode_rank`` so all hosts stay in step. ``leads`` as in
    :func:`decode_loop`, from this host's logits.
    """
    device = next(model.parameters()).device
    cache = result.cache
    kv = {i: tuple(t[None] for t in cache.layer(i)) for i in range(cache.n_layers)}
    ctx = CacheAttnContext(comm, kv, cache.positions, holds_new=comm.rank == decode_rank, trim_windows=True,
                           room=sampling.max_new_tokens)
    comm.stats.phase = Phase.DECODE

    def choose(tok: int) -> int:
        t = torch.tensor([tok], device=device)
        return int(comm.broadcast(t, src=decode_rank).item())

    def step(tok: int, pos: int) -> torch.Tensor:
        ctx.start_step(torch.tensor([pos]))
        ids, position = _token_ids(tok, pos, device)
        out = model(input_ids=ids, position_ids=position, use_cache=False, apb_ctx=ctx)
        comm.stats.tick(None)
        comm.stats.layer = None
        return out.logits[0, -1]

    return decode_loop(step, result.last_logits, n_past, sampling, eos_ids, choose, leads)
