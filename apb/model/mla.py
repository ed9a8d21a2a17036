"""Multi-head latent attention (DeepSeek-V2/V3 and kin): what the cache holds for such a layer.

An MLA layer caches a compressed latent per token, not its keys and values: transformers' MLA
modules keep ``(kv_nope, k_rot)`` (the normalised latent, one "head" of ``kv_lora_rank``, and the
rotated shared key part) and rebuild per-head keys and values from them with ``expand_kv`` on
every call. The attention interface only sees the rebuilt keys and values, so to cache what a
single-device run caches (and what decoding from a transformers cache expects), we record the
latent on its way: a forward hook on ``kv_a_layernorm`` keeps it on the attention module, and the
rotated part is the tail of any head of the key. The first call of each layer checks that
``expand_kv`` rebuilds exactly the keys and values the layer attends with, so a family that
builds its latent differently is refused rather than cached wrongly.

Flow: :func:`install` (once per model, from the prefill) -> the bridge calls :func:`latent` for
each attention call -> the contexts cache that pair, and expand it with ``module.expand_kv``
where they attend over a cache (query phase, distributed decoding).
"""

from __future__ import annotations

import torch

_STASH = "_apb_latent"
_CHECKED = "_apb_latent_checked"


def is_mla(module: torch.nn.Module) -> bool:
    """Whether ``module`` is an attention layer that caches an MLA latent (transformers' ``expand_kv``)."""
    return callable(getattr(module, "expand_kv", None)) and hasattr(module, "layer_idx")


def install(model: torch.nn.Module) -> bool:
    """Hook every MLA layer of ``model`` once; returns whether the model has any."""
    if getattr(model, "_apb_mla", None) is not None:
        return model._apb_mla
    layers = [m for m in model.modules() if is_mla(m)]
    for attn in layers:
        norm = getattr(attn, "kv_a_layernorm", None)
        if norm is None or not hasattr(attn, "qk_nope_head_dim"):
            raise ValueError(f"layer {attn.layer_idx} ({type(attn).__name__}) is multi-head latent attention without "
                             "the kv_a_layernorm / qk_nope_head_dim of transformers' DeepSeek layers, so its latent "
                             "cache cannot be recorded; this model is not supported")

        def keep(_norm, _inp, output, attn=attn):
            attn.__dict__[_STASH] = output
        norm.register_forward_hook(keep)
    model._apb_mla = bool(layers)
    return model._apb_mla


def discard(module: torch.nn.Module) -> None:
    """Drop a recorded latent nobody needs (plain decoding from a transformers cache)."""
    module.__dict__.pop(_STASH, None)


def latent(module: torch.nn.Module, key: torch.Tensor, value: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The (kv_latent, k_rot) pair the layer caches for these tokens, or None for a plain layer.

    ``kv_latent`` is (batch, 1, tokens, kv_lora_rank), ``k_rot`` (batch, 1, tokens, rope dim).
    """
    stash = module.__dict__.pop(_STASH, None)
    if stash is None:
        if is_mla(module):
            raise RuntimeError(f"layer {module.layer_idx}: multi-head latent attention ran without its latent "
                               "recorded; call apb.model.mla.install(model) before the forward")
        return None
    b, t = stash.shape[0], stash.shape[1]
    if key.shape[2] != t:
        raise RuntimeError(f"layer {module.layer_idx}: {key.shape[2]} keys for {t} recorded latents; the apb "
                           "contexts run without a transformers cache (use_cache=False)")
    pair = (stash.reshape(b, 1, t, stash.shape[-1]), key[:, :1, :, module.qk_nope_head_dim:])
    if not module.__dict__.get(_CHECKED):
        k2, v2 = module.expand_kv(*pair)
        if not (torch.allclose(k2, key, rtol=1e-4, atol=1e-5) and torch.allclose(v2, value, rtol=1e-4, atol=1e-5)):
            raise ValueError(f"layer {module.layer_idx} ({type(module).__name__}): expand_kv of the recorded latent "
                             "does not rebuild the keys and values it attends with; this MLA variant is not supported")
        module.__dict__[_CHECKED] = True
    return pair
