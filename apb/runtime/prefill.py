"""One prefill on one host: the shared model path every method runs through.

Flow on host ``r`` (all hosts of the sequence-parallel group call :func:`prefill` together):

0. the model is checked (:func:`apb.model.features.check_supported`: layers that are not softmax
   attention are refused here, before any work), MLA layers get their latent recorded
   (:mod:`apb.model.mla`), and every rotary embedding takes the whole prompt's length
   (:func:`apb.model.hf_bridge.prompt_length`);
1. the method's layout says which prompt tokens ``r`` holds and their position ids; the last
   ``n_query`` prompt tokens are the query (exact methods treat the prompt as one sequence);
2. context phase: the unmodified HF model runs on those tokens (``use_cache=False``); each
   attention layer calls back into the method through :class:`AttnContext`, which also keeps
   the layer's K/V for the tokens this host caches;
3. query phase (star, apb): the query tokens run through the model again, each attending
   exactly to every host's cache (:class:`CacheAttnContext`), which leaves the same logits on
   every host; for other methods the host holding the last prompt token computes them (only that
   row goes through the LM head) and broadcasts them (phase ``logits``, counted as prefill);
4. the host's KV part is returned; :func:`apb.runtime.cache.gather_cache` collects the parts for
   decoding, or :func:`apb.runtime.decode.decode_distributed` decodes with the parts left in place.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from apb.methods.base import AttnContext, Method
from apb.methods.cache_attention import CacheAttnContext
from apb.model import mla
from apb.model import routing as routing_mod
from apb.model.features import check_positions, check_supported, qkv_projections, qkv_sizes
from apb.model.hf_bridge import output_cache, prefilling, prompt_length
from apb.model.rope import rope_shift
from apb.parallel.comm import OUTSIDE, Comm, Phase
from apb.parallel.layout import owner_of, pad_tokens
from apb.runtime import measure
from apb.runtime.cache import KVCache


@dataclass
class PrefillResult:
    last_logits: torch.Tensor  # (vocab,), float32, on every host
    cache: KVCache  # this host's part
    seconds: float
    #: with ``diagnostics``: per layer, the global prompt indices this host passed, (kv_heads, p)
    passing: dict[int, torch.Tensor] | None = None
    #: with ``routing``: the experts this host's forwards chose, ``{layer: (positions, chosen)}``
    #: (:func:`apb.model.routing.host_choices`; empty for a model without experts)
    routing: dict | None = None


def _device(model) -> torch.device:
    return next(model.parameters()).device


def check_model(model, method: Method, world_size: int) -> None:
    """Everything a prefill refuses about the model itself, whatever the prompt: its layers
    (:func:`apb.model.features.check_supported`), a one-token forward through apb's attention
    (:func:`cache_shapes`) and what ``method`` needs of it (for apb's default, a rotary the query
    can be moved with). A host runs it before its first prompt; the probes run once per model.
    Raises ``ValueError`` naming what is refused."""
    check_supported(model.config)
    cache_shapes(model)
    method.check(model.config, world_size)
    method.check_model(model)


@torch.no_grad()
def prefill(model, input_ids: torch.Tensor, method: Method, comm: Comm, n_query: int = 0,
            pad_id: int = 0, diagnostics: bool = False, routing: bool = False,
            whole_cache: bool = True) -> PrefillResult:
    """Prefill the 1-D prompt ``input_ids`` (identical on every host) whose last ``n_query``
    tokens are the query; ``diagnostics`` also returns what the method chose (``apb diagnose``),
    ``routing`` the experts this host's forwards chose for each of its tokens (``apb verify``).
    Without ``whole_cache`` a sliding layer's cache keeps only the positions a later token can
    see (its last ones: ``AttnContext.window_tail``), for decoding; with it every position."""
    if input_ids.dim() != 1 or input_ids.numel() == 0:
        raise ValueError(f"prefill takes a non-empty 1-D tensor of token ids, got shape {tuple(input_ids.shape)}")
    n = int(input_ids.numel())
    method.check_query(n, n_query, comm.size)
    device = _device(model)
    check_model(model, method, comm.size)  # before the clock: its probes run once per model
    rope = rope_shift(model) if method.moves_query() else None
    if rope is not None and n > rope.checked_to:  # the same on every host: refused before any message
        raise ValueError(f"a {n}-token prompt is longer than the {rope.checked_to} positions over which apb's query "
                         "shift was checked against this model (its max_position_embeddings): beyond them a query "
                         "may be scaled by its position as well as turned; shorten the prompt or set "
                         "method.query_positions: anchor")
    measure.sync(device)  # the clock starts when the device is idle, and stops when it is again
    t0, cpu0 = time.perf_counter(), comm.stats.compute_clock()
    inside0 = sum(comm.stats.layer_cpu.values())
    input_ids = input_ids.to(device)
    mla.install(model)
    # every host's rotary embedding sees the whole prompt's length (dynamic NTK, longrope)
    with prompt_length(model, n):
        logits, kv, positions, passing, chosen = _run(model, input_ids, method, comm, n, n_query, pad_id,
                                                      diagnostics, routing, rope, whole_cache)
    cache = KVCache.from_layers(positions, kv)
    measure.sync(device)
    seconds = time.perf_counter() - t0
    # the per-layer clocks cover the forwards; what the prefill did around them is work too
    inside = sum(comm.stats.layer_cpu.values()) - inside0
    comm.stats.layer_cpu[(Phase.CONTEXT, OUTSIDE)] += max(0.0, comm.stats.compute_clock() - cpu0 - inside)
    comm.stats.compute_seconds += max(0.0, seconds - comm.stats.comm_seconds())
    return PrefillResult(logits, cache, seconds, passing, chosen)


def _run(model, input_ids, method, comm, n, n_query, pad_id, diagnostics, record_routing=False, rope=None,
         whole_cache=True):
    """Context phase, then the query phase or the logits broadcast; (logits, kv, positions, passing,
    routing)."""
    choices = []
    device = input_ids.device
    slices = method.layout(n, comm.size, n_query)
    mine = slices[comm.rank]
    ctx = AttnContext(method, slices, comm, plan=method.plan(n, comm.size, n_query, model.config.num_hidden_layers),
                      n_query=n_query, rope=rope, diagnostics=diagnostics, whole_cache=whole_cache)
    comm.stats.phase = Phase.CONTEXT
    logits = torch.empty(model.config.vocab_size, dtype=torch.float32, device=device)
    owner, owner_local = (None, None) if method.query_phase else owner_of(slices, n - 1)
    if mine.size > 0:
        total = max(max(c.stop for s in slices for c in s.chunks), n)
        ids = pad_tokens(input_ids[None], total, pad_id)[0, mine.indices.to(device)]
        keep = torch.tensor([owner_local], device=device) if comm.rank == owner else 1
        comm.stats.tick(-1)  # the embedding and layer 0's projections count too
        with _pre_rope_capture(model, ctx) if method.capture_pre_rope() else contextlib.nullcontext(), \
                _routing(model, record_routing) as chose, prefilling():
            out = model(input_ids=ids[None], position_ids=mine.positions.to(device)[None], use_cache=False,
                        logits_to_keep=keep, apb_ctx=ctx)
        comm.stats.tick(None)
        if chose is not None:
            # every row but padding: an anchor's copy chooses experts too, for its host's block
            choices.append(routing_mod.host_choices(chose, mine.positions, mine.indices < n))
        if comm.rank == owner:
            logits.copy_(out.logits[0, -1].float())
        del out
    comm.stats.layer = None
    positions_cpu = mine.positions[mine.valid]
    positions = positions_cpu.to(device)
    kv = ctx.kv if mine.size > 0 else cache_shapes(model)
    _check_every_layer(model, kv)
    if method.query_phase:
        comm.stats.phase = Phase.QUERY
        qctx = CacheAttnContext(comm, kv, positions, holds_new=comm.rank == 0, positions_cpu=positions_cpu)
        q_pos = torch.arange(n - n_query, n)
        qctx.start_step(q_pos)
        comm.stats.tick(-1)
        with _routing(model, record_routing) as chose, prefilling():
            out = model(input_ids=input_ids[None, n - n_query:], position_ids=q_pos.to(device)[None],
                        use_cache=False, logits_to_keep=1, apb_ctx=qctx)
        comm.stats.tick(None)
        if chose is not None:
            choices.append(routing_mod.host_choices(chose, q_pos))
        logits.copy_(out.logits[0, -1].float())
        kv, positions = qctx.kv, qctx.positions
        comm.stats.layer = None
    else:
        comm.stats.phase = Phase.LOGITS
        comm.broadcast(logits, src=owner)
    comm.stats.phase = Phase.CONTEXT
    passing = {key[1]: idx.cpu() for key, idx in ctx.scratch.items() if key[0] == "passing"} if diagnostics else None
    return logits, kv, positions, passing, routing_mod.merge_choices(choices) if record_routing else None


def _routing(model, on: bool):
    """:func:`apb.model.routing.record` when ``on``; else a block that yields None."""
    return routing_mod.record(model) if on else contextlib.nullcontext()


def _n_layers(model) -> int:
    """The layers that attend: one past the largest ``layer_idx`` of the model's modules (an
    encoder-decoder's ``num_hidden_layers`` counts its encoder's), else the config's count. Read
    once per model (its modules do not change), not at every prefill."""
    known = getattr(model, "_apb_n_layers", None)
    if known is None:
        indices = [m.layer_idx for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)]
        known = model._apb_n_layers = max(indices) + 1 if indices else model.config.num_hidden_layers
    return known


def _check_every_layer(model, kv: dict) -> None:
    """Every layer's attention must have run through apb's: a layer whose attention the model
    computes its own way (not through transformers' attention interface) would attend only its
    host's tokens, silently."""
    missing = sorted(set(range(_n_layers(model))) - set(kv))
    if missing:
        raise ValueError(f"model type {getattr(model.config, 'model_type', '?')!r}: layer(s) {missing[:8]} never "
                         "reached apb's attention during the prefill: the model computes their attention its own "
                         "way, not through transformers' attention interface, so apb cannot split this model")


class _CacheShapes:
    """Stands in for a prefill's context in a one-token forward: records, per layer, the K/V the
    attention receives (or an MLA layer's latent pair), with no rows."""

    def __init__(self) -> None:
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def step(self, module, q, k, v, scale, latent=None, **_options) -> torch.Tensor:
        self.kv[int(module.layer_idx)] = tuple(t[:, :, :0] for t in (latent or (k, v)))
        return q.new_zeros(*q.shape[:-1], v.shape[-1])  # the output is never read


def cache_shapes(model) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's cache with no rows, as the layer hands it to the attention; checked once per
    model against what the model caches itself.

    apb caches what a layer passes to its attention, and decoding continues from that cache in
    transformers' own layers: a model that caches something else (JetMoe caches its K/V heads and
    attends them repeated for its experts) would decode from the wrong cache, so it is refused
    here, naming the layer and both shapes. A host holding no tokens reports these empty tensors
    as its cache (read from the layers, so per-layer widths and configs that name their sizes
    otherwise, as GPT-2's ``n_head``, come out right). A layer that keeps no cache of its own
    (Gemma 3n's layers that reuse an earlier layer's K/V) is not compared."""
    known = getattr(model, "_apb_cache_shapes", None)
    if known is not None:
        return known
    check_positions(model)
    mla.install(model)
    device = _device(model)
    shapes = _CacheShapes()
    try:
        with torch.no_grad(), prefilling():
            out = model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device),
                        position_ids=torch.zeros(1, 1, dtype=torch.long, device=device), use_cache=True,
                        logits_to_keep=1, apb_ctx=shapes)
    except ValueError:  # the bridge's own refusals name the layer already
        raise
    except Exception as e:  # MPT builds a mask from the attention it was given, and cannot without one
        raise ValueError(f"model type {getattr(model.config, 'model_type', '?')!r} fails a one-token forward with "
                         f"apb's attention ({type(e).__name__}: {e}): its modeling code depends on an attention "
                         "implementation of transformers' own, so apb cannot run this model") from e
    _check_every_layer(model, shapes.kv)
    own = output_cache(out)
    for i, layer in enumerate(getattr(own, "layers", None) or ()):
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if i not in shapes.kv or not isinstance(keys, torch.Tensor) or keys.numel() == 0:
            continue
        ours = tuple(tuple(t.shape[1:2]) + tuple(t.shape[3:]) for t in shapes.kv[i])
        theirs = tuple(tuple(t.shape[1:2]) + tuple(t.shape[3:]) for t in (keys, values))
        if ours != theirs:
            raise ValueError(f"model type {getattr(model.config, 'model_type', '?')!r}: layer {i} caches K/V of "
                             f"(heads, width) {theirs} but passes {ours} to its attention, so a cache gathered "
                             "from what the attention sees would not be the model's own; apb cannot run this model")
    model._apb_cache_shapes = shapes.kv
    return shapes.kv


@contextlib.contextmanager
def _pre_rope_capture(model, ctx: AttnContext):
    """Record each layer's q/k/v projections (before RoPE) for compressors that score on them."""
    handles = []
    for layer, module in qkv_projections(model).items():
        if not hasattr(module, "q_proj"):  # one matrix for all three (Phi-3): its output split
            def split(_mod, _inp, output, layer=layer, sizes=qkv_sizes(module)):
                ctx.scratch[("pre_rope", layer)] = tuple(output.split(sizes, dim=-1))

            handles.append(module.qkv_proj.register_forward_hook(split))
            continue
        store: dict[str, torch.Tensor] = {}

        def hook(name, store=store, layer=layer):
            def fn(_mod, _inp, output):
                store[name] = output
                if len(store) == 3:
                    ctx.scratch[("pre_rope", layer)] = (store["q"], store["k"], store["v"])
            return fn

        for name in ("q", "k", "v"):
            handles.append(getattr(module, f"{name}_proj").register_forward_hook(hook(name)))
    if not handles:  # Method.check_model refuses this first (Compressor.check_model)
        raise ValueError("this compressor needs q/k/v projections before RoPE, which this model does not have")
    try:
        yield
    finally:
        for h in handles:
            h.remove()
