"""The single bridge between Hugging Face models and our methods.

We register one attention implementation, ``"apb"``, in transformers' ``AttentionInterface``
and deliberately no mask function: transformers then builds no mask for it (our kernels apply
causality themselves, and a dense n x n mask would not fit at these lengths). When a forward
call carries ``apb_ctx=`` the layer's Q/K/V go to that context's method; without it (ordinary
decoding after a gathered prefill) the layer runs plain bottom-right causal attention over its
cache.

Every keyword a layer passes is either applied (:data:`APPLIED`: the scale, soft-capping, sinks,
the sliding window), known not to change the
attention (:data:`HARMLESS`), or an error naming the layer and the keyword: a model feature we do
not implement must never be dropped silently.

:func:`prompt_length` makes every host build its rotary embedding for the whole prompt, as one
device would, for the RoPE variants whose frequencies depend on the sequence length.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
from typing import Iterator

import torch
from transformers import AttentionInterface

from apb.kernels import attention
from apb.model import mla

ATTN_IMPLEMENTATION = "apb"

#: keywords the bridge applies: scale, score options, sliding window, and our own context
APPLIED = frozenset({"scaling", "softcap", "s_aux", "sliding_window", "dropout", "is_causal", "apb_ctx"})
#: keywords that models pass down to every layer and that do not change what attention computes
HARMLESS = frozenset({"position_ids", "cache_position", "use_cache", "output_attentions", "output_hidden_states",
                      "output_router_logits", "return_dict"})


#: set while a distributed prefill runs its forwards (:func:`prefilling`): every attention call
#: must then carry the prefill's context, or the layer would attend only its host's own tokens
_PREFILLING: contextvars.ContextVar[bool] = contextvars.ContextVar("apb_prefilling", default=False)


@contextlib.contextmanager
def prefilling() -> Iterator[None]:
    """Inside the block, an attention call without ``apb_ctx`` is an error, not plain attention."""
    token = _PREFILLING.set(True)
    try:
        yield
    finally:
        _PREFILLING.reset(token)


def apb_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, None]:
    if attention_mask is not None:
        raise ValueError(f"{_layer(module)} passes an attention_mask to the attention, but apb builds none (it "
                         "applies causality, windows, softcap and sinks itself): the model adds its own bias or "
                         "mask to the scores (as Doge's dynamic mask does), or the prompt was padded. apb runs one "
                         "unpadded prompt at a time, and cannot run a model that masks its scores itself")
    _check_kwargs(module, kwargs)
    scaling = kwargs.get("scaling")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    window = kwargs.get("sliding_window")
    scores = {"softcap": kwargs.get("softcap"), "sinks": kwargs.get("s_aux")}
    ctx = kwargs.get("apb_ctx")
    if ctx is None and _PREFILLING.get():
        raise ValueError(f"{_layer(module)} was called without apb's context during a distributed prefill: the "
                         f"model ({type(module).__module__.rsplit('.', 1)[-1]}) does not pass keyword arguments "
                         "down to its attention layers, so each host would attend only its own tokens. apb "
                         "cannot split this model")
    if ctx is not None:
        pair = mla.latent(module, key, value)
        extra = {} if pair is None else {"latent": pair, "expand": module.expand_kv}
        out = ctx.step(module, query, key, value, scale, sliding_window=window, **scores, **extra)
    else:
        mla.discard(module)
        # keys end at the last query (one sequence, or a cache then new tokens): the window aligns there
        slide = {"window": window} if window is not None and key.shape[2] > window else {}
        out, _ = attention(query, key, value, causal=True, scale=scale, **slide, **scores)
    return out.transpose(1, 2).contiguous(), None


def _layer(module: torch.nn.Module) -> str:
    return f"layer {getattr(module, 'layer_idx', '?')} ({type(module).__name__})"


def _check_kwargs(module: torch.nn.Module, kwargs: dict) -> None:
    layer = _layer(module)
    unknown = sorted(set(kwargs) - APPLIED - HARMLESS)
    if unknown:
        shown = ", ".join(f"{k}={_short(kwargs[k])}" for k in unknown)
        raise ValueError(f"{layer} passes attention argument(s) {shown}, which the apb attention does not "
                         "implement; its results would silently differ from the model's. Applied: "
                         f"{', '.join(sorted(APPLIED))}; known harmless: {', '.join(sorted(HARMLESS))}")
    if kwargs.get("dropout"):
        raise ValueError(f"{layer} passes attention dropout={kwargs['dropout']}: the model is in training mode; "
                         "call model.eval() (apb runs inference only)")
    # a layer says so by keyword, or (BERT-like models, whose decoder flag is off) by its own attribute,
    # which transformers' kernels read where no keyword is passed
    causal = kwargs.get("is_causal")
    if causal is False or (causal is None and getattr(module, "is_causal", True) is False):
        raise ValueError(f"{layer} asks for bidirectional attention (is_causal=False); apb runs causal decoders only"
                         " (a BERT-like model runs causally only with is_decoder=True in its config)")


def _short(value) -> str:
    return f"<tensor {tuple(value.shape)}>" if isinstance(value, torch.Tensor) else repr(value)[:40]


AttentionInterface.register(ATTN_IMPLEMENTATION, apb_attention_forward)


# ----------------------------------------------------------------------------- length-dependent RoPE


def _length_types(rotary: torch.nn.Module) -> dict[str | None, str]:
    """{layer_type or None: rope type} for the rope types transformers picks by sequence length."""
    kind = getattr(rotary, "rope_type", None)
    if kind is None or next(rotary.buffers(recurse=False), None) is None:  # not a rotary embedding
        return {}
    kinds = kind if isinstance(kind, dict) else {None: kind}
    return {t: k for t, k in kinds.items() if isinstance(k, str) and ("dynamic" in k or k == "longrope")}


@contextlib.contextmanager
def prompt_length(model: torch.nn.Module, n_tokens: int) -> Iterator[None]:
    """Inside the block, rotary embeddings choose their length-dependent frequencies for ``n_tokens``.

    transformers' ``dynamic_rope_update`` takes the sequence length as ``max(position_ids) + 1``,
    so a host holding tokens 0..199 of a 600-token prompt would rotate with other frequencies than
    the host holding 400..599 (dynamic NTK, longrope). A pre-hook appends the prompt's last
    position to every call (and clamps padding positions beyond it) and a post-hook drops the
    extra cos/sin row again, so the choice is the one a single device makes for the whole prompt.
    Dynamic NTK also keeps state from earlier calls (it only grows, or resets below the original
    length): it is reset first, as in a freshly loaded model. Decoding, outside the block,
    continues as transformers does.
    """
    handles = []
    for rotary in model.modules():
        types = _length_types(rotary)
        if not types:
            continue
        _reset_dynamic(rotary, types)
        handles.append(rotary.register_forward_pre_hook(_with_last_position(n_tokens - 1), with_kwargs=True))
        handles.append(rotary.register_forward_hook(_drop_last_position, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _reset_dynamic(rotary: torch.nn.Module, types: dict[str | None, str]) -> None:
    """Run the rotary once at position 0: dynamic NTK then returns to its original frequencies."""
    buffer = next(rotary.buffers())
    x = torch.zeros(1, 1, 1, device=buffer.device)
    for layer_type, kind in types.items():
        if "dynamic" in kind:
            extra = {} if layer_type is None else {"layer_type": layer_type}
            rotary(x, torch.zeros(1, 1, dtype=torch.long, device=buffer.device), **extra)


def _with_last_position(last: int):
    def hook(_module, args, kwargs):
        args = list(args)
        in_args = len(args) > 1
        pos = args[1] if in_args else kwargs["position_ids"]
        # padding past the prompt (ring, ulysses) is clamped to its last position: no real token sees it
        pos = torch.cat([pos.clamp(max=last), pos.new_full((pos.shape[0], 1), last)], dim=1)
        if in_args:
            args[1] = pos
        else:
            kwargs["position_ids"] = pos
        return tuple(args), kwargs
    return hook


def _drop_last_position(_module, _args, _kwargs, output):
    return tuple(t[:, :-1] for t in output)


@functools.cache
def _cache_keyword(forward) -> str:
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def with_cache(model: torch.nn.Module, cache) -> dict:
    """The keyword argument that hands ``cache`` to ``model``'s forward: ``cache`` in transformers'
    5.2x models, ``past_key_values`` before them (still accepted there with a warning; removed in 5.40)."""
    return {_cache_keyword(type(model).forward): cache}


def output_cache(out):
    """The cache a forward or ``generate`` returned, under either name (see :func:`with_cache`)."""
    found = out.get("cache")
    return out.get("past_key_values") if found is None else found
