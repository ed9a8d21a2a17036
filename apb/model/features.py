"""Which model features the runtime reproduces, and refusing the others before any work is done.

Every method here runs the model's softmax attention layers through :mod:`apb.model.hf_bridge`;
a layer that is not softmax attention (a convolution, a state-space or linear-attention mixer)
never reaches it, and a distributed prefill cannot split its recurrent state. Such models are
refused by :func:`check_supported` when they are loaded (by the Engine in the driver and by the
prefill on every host), with the layer and its kind named, instead of failing after a whole
prefill. The per-layer kind comes from the config's ``layer_types`` (transformers' convention,
e.g. ``full_attention``, ``sliding_attention``, ``conv``, ``linear_attention``, ``hybrid``), or
from the family when its config has none.

Sliding-window layers pass here: every method runs them exactly (:mod:`apb.methods.sliding`).
"""

from __future__ import annotations

import inspect
from typing import Any

try:  # how transformers' own caches read each layer's kind from a config (transformers 5)
    from transformers.cache_utils import get_layer_types_and_kwargs
except ImportError:
    get_layer_types_and_kwargs = None

#: layer kinds the bridge runs exactly
SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")

#: what the refused layer kinds are, for the message
LAYER_KINDS = {
    "conv": "a short convolution (LFM2)",
    "linear_attention": "linear attention or a state-space (Mamba) mixer",
    "mamba": "a Mamba state-space mixer",
    "hybrid": "attention in parallel with a state-space mixer (Falcon-H1, Zamba)",
    "hybrid_sliding": "sliding attention in parallel with a linear-attention state",
    "chunked_attention": "chunked local attention (Llama 4)",
    "indexed_attention": "sparse attention chosen by an indexer (DeepSeek-V3.2)",
    "compressed_sparse_attention": "compressed sparse attention",
    "heavily_compressed_attention": "heavily compressed attention",
    "window_attention": "non-overlapping window attention",
    "minimax_m3_sparse": "lightning-index sparse attention",
    "reference_sliding_attention": "a ring-buffered sliding window over generated tokens",
    "moe": "a mixture-of-experts block without attention",
    "mlp": "an MLP block without attention",
    "dummy": "a block without attention (no cache)",
}

#: families without softmax attention whose configs carry no ``layer_types``
NON_ATTENTION_FAMILIES = {
    "rwkv": "RWKV time mixing",
    "xlstm": "xLSTM cells",
    "mamba": "a Mamba state-space mixer",
    "mamba2": "a Mamba-2 state-space mixer",
    "falcon_mamba": "a Mamba state-space mixer",
}


def check_supported(model_config: Any) -> None:
    """Raise ``ValueError`` naming the first layer whose kind the runtime cannot run exactly."""
    cfg = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    family = getattr(cfg, "model_type", "?")
    if family in NON_ATTENTION_FAMILIES:
        raise ValueError(f"model type {family!r}: layer 0 is {NON_ATTENTION_FAMILIES[family]}, not softmax attention; "
                         "apb runs decoders whose layers are all softmax attention")
    for i, kind in enumerate(layer_kinds(cfg)):
        if kind not in SUPPORTED_LAYER_TYPES:
            what = LAYER_KINDS.get(kind, "not softmax attention")
            raise ValueError(f"model type {family!r}: layer {i} is {kind!r} ({what}); apb runs only "
                             f"{' and '.join(SUPPORTED_LAYER_TYPES)} layers, so this model is not supported")
    if getattr(cfg, "use_bidirectional_attention", False):
        raise ValueError(f"model type {family!r} has use_bidirectional_attention=True; apb runs causal decoders only")


def layer_kinds(cfg: Any) -> list[str]:
    """Each layer's kind as transformers' own caches read it from the config: ``layer_types``, or,
    where a config has none, its per-layer fields (Falcon-H1's parallel mixers are ``hybrid``,
    Llama 4's chunked layers ``chunked_attention``). A layer that reuses an earlier layer's K/V
    (Gemma 3n's KV sharing) keeps the kind it attends with: it still calls the attention, with
    the keys its source layer made, which every method handles as any other layer's."""
    types = list(getattr(cfg, "layer_types", None) or ())
    if get_layer_types_and_kwargs is None:
        return types
    try:
        read, _ = get_layer_types_and_kwargs(cfg)
    except Exception:  # a config it cannot read: the declared types
        return types
    modes = getattr(cfg, "kv_sharing_modes", None) or ()
    return [types[i] if i < len(modes) and modes[i] == "reuse" and i < len(types) else kind
            for i, kind in enumerate(read)]


def sliding_windows(model_config: Any) -> tuple[int, ...]:
    """The window of each sliding layer (global layers are not listed), as transformers' attention
    modules get it: the ``sliding_attention`` layers of ``layer_types``, or every layer where a
    config sets ``sliding_window`` and has no ``layer_types`` (Mistral). For the cost model; the
    runtime takes each layer's window from the layer itself."""
    cfg = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    window = getattr(cfg, "sliding_window", None)
    if not window:
        return ()
    types = getattr(cfg, "layer_types", None)
    if types:
        return tuple(window for kind in types if kind == "sliding_attention")
    return (window,) * cfg.num_hidden_layers


def qkv_projections(model: Any) -> dict[int, Any]:
    """Each attention layer whose queries, keys and values can be read before RoPE, by layer index:
    what a compressor that scores on those projections reads (:func:`qkv_sizes`). Empty for a model
    whose attention projects otherwise (DeepSeek's MLA projects through a latent)."""
    return {int(m.layer_idx): m for m in model.modules() if hasattr(m, "layer_idx") and qkv_sizes(m) is not None}


def qkv_sizes(module: Any) -> tuple[int | None, int | None, int | None] | None:
    """Widths of an attention layer's q, k and v projections per token: three projections apart
    (``q_proj``, ``k_proj``, ``v_proj``; a width None where one is no ``Linear``), or one matrix
    whose output is q, k and v in that order (Phi-3's ``qkv_proj``: heads, then KV heads, of
    ``head_dim``); None for anything else."""
    if all(hasattr(module, f"{n}_proj") for n in "qkv"):
        return tuple(getattr(getattr(module, f"{n}_proj"), "out_features", None) for n in "qkv")
    fused, config = getattr(module, "qkv_proj", None), getattr(module, "config", None)
    head_dim, kv_heads = getattr(module, "head_dim", None), getattr(module, "num_key_value_heads", None)
    if fused is None or config is None or not head_dim or not kv_heads:
        return None
    sizes = (config.num_attention_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim)
    return sizes if sum(sizes) == getattr(fused, "out_features", None) else None


def check_positions(model: Any) -> None:
    """Refuse a model whose forward takes no ``position_ids``: it numbers positions itself from
    its input (BART's and Blenderbot's learned positions), so every host's slice would be read
    as if it began the prompt, and the prompt would silently be another one."""
    if "position_ids" not in inspect.signature(model.forward).parameters:
        raise ValueError(f"model type {getattr(model.config, 'model_type', '?')!r}: {type(model).__name__}.forward "
                         "takes no position_ids (it numbers positions from its input), so each host's part of the "
                         "prompt would be read as if it began the prompt; apb cannot split this model")


def kv_sources(model_config: Any) -> dict[int, int]:
    """{layer: the earlier layer whose K/V it attends} for a model whose layers share K/V
    (``kv_sharing_modes``): a ``reuse`` layer attends the last ``store`` layer of its own kind
    before it, as transformers' Gemma 3n and Gemma 4 layers do. Empty for every other model."""
    cfg = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    modes = getattr(cfg, "kv_sharing_modes", None) or ()
    kinds = getattr(cfg, "layer_types", None) or ()
    sources, last = {}, {}
    for i, mode in enumerate(modes):
        kind = kinds[i] if i < len(kinds) else None
        if mode == "reuse" and kind in last:
            sources[i] = last[kind]
        elif mode == "store":
            last[kind] = i
    return sources


def attention_sizes(model_config: Any) -> tuple[int, int, int]:
    """(query heads, KV heads, head width) for estimates (memory, bytes moved, cost): the largest
    over the layers where they differ (Gemma 4's global layers are wider, and its config refuses a
    single ``head_dim``), so an estimate is never short."""
    cfg = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    per_layer = getattr(cfg, "per_layer_config", None)
    layers = list(per_layer) if per_layer is not None else [cfg]
    sizes = []
    for layer in layers or [cfg]:
        heads = layer.num_attention_heads
        sizes.append((heads, getattr(layer, "num_key_value_heads", None) or heads,
                      getattr(layer, "head_dim", None) or cfg.hidden_size // heads))
    return tuple(max(s[j] for s in sizes) for j in range(3))
