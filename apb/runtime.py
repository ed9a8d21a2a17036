"""One prefill on one host: the shared model path every method runs through.

Flow on host ``r`` (all hosts of the sequence-parallel group call :func:`prefill` together):

1. the method's layout says which tokens ``r`` holds and their global position ids;
2. the unmodified HF model runs on those tokens (``use_cache=False``); each attention layer
   calls back into the method through :class:`AttnContext`, which also keeps the layer's K/V
   for this host's real tokens;
3. the host holding the last prompt token computes its logits (only that row goes through the
   LM head) and broadcasts them;
4. the host's KV part is returned; :func:`apb.cache.gather_cache` collects the parts for decoding.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from apb.cache import KVCache
from apb.methods.base import AttnContext, Method
from apb.parallel.comm import Comm
from apb.parallel.layout import owner_of, pad_tokens


@dataclass
class PrefillResult:
    last_logits: torch.Tensor  # (vocab,), float32, on every host
    cache: KVCache  # this host's part
    seconds: float


@torch.no_grad()
def prefill(model, input_ids: torch.Tensor, method: Method, comm: Comm, pad_id: int = 0) -> PrefillResult:
    """Prefill the 1-D prompt ``input_ids`` (identical on every host) with ``method``."""
    if input_ids.dim() != 1 or input_ids.numel() == 0:
        raise ValueError(f"prefill takes a non-empty 1-D tensor of token ids, got shape {tuple(input_ids.shape)}")
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    n = int(input_ids.numel())
    method.check(model.config, comm.size)
    slices = method.layout(n, comm.size)
    mine = slices[comm.rank]
    owner, owner_local = owner_of(slices, n - 1)
    ctx = AttnContext(method, slices, comm)
    comm.stats.phase = "context"
    logits = torch.empty(model.config.vocab_size, dtype=torch.float32, device=device)
    if mine.size > 0:
        total = max(c.stop for s in slices for c in s.chunks)
        ids = pad_tokens(input_ids.to(device)[None], total, pad_id)[0, mine.indices.to(device)]
        keep = torch.tensor([owner_local], device=device) if comm.rank == owner else 1
        out = model(input_ids=ids[None], position_ids=mine.positions.to(device)[None], use_cache=False,
                    logits_to_keep=keep, apb_ctx=ctx)
        if comm.rank == owner:
            logits.copy_(out.logits[0, -1].float())
    comm.stats.layer = None
    comm.broadcast(logits, src=owner)
    positions = mine.positions[mine.valid]
    if ctx.kv:
        cache = KVCache.from_layers(positions, ctx.kv)
    else:  # a host holding no tokens contributes an empty cache of the right shape
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        empty = torch.zeros(cfg.num_hidden_layers, cfg.num_key_value_heads, 0, head_dim,
                            dtype=model.dtype, device=device)
        cache = KVCache(positions, empty, empty.clone())
    seconds = time.perf_counter() - t0
    comm.stats.compute_seconds += max(0.0, seconds - comm.stats.comm_seconds())
    return PrefillResult(logits, cache, seconds)
