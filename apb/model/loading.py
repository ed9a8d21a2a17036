"""Loading models: a local Hugging Face checkpoint, or a named tiny preset made on first use.

Presets are random-initialised small decoders of the architectures we support (Llama, Qwen2
with q/k/v bias, Mistral, and one of each of today's families with its distinguishing feature:
sliding and hybrid layers, softcap, sinks, longrope, NoPE layers, MLA), plus two that are
refused on load (LFM2 and Qwen3-Next: layers that are not softmax attention). They are *materialised* once into a checkpoint directory
(``config.json`` + ``model.safetensors``) and then loaded through exactly the same
``from_pretrained`` path as a user's checkpoint. Loading is local-only: no hub access, no
remote code, safetensors preferred (transformers loads any ``.bin`` with ``weights_only=True``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from apb.model.features import check_positions
from apb.model.hf_bridge import ATTN_IMPLEMENTATION  # importing it registers the "apb" attention
from apb.model.text import byte_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# 12 heads split evenly over 1, 2, 3 and 4 hosts; the KV head counts exercise GQA both when
# they divide the world size and when they do not (Ulysses then sends each host the ones it uses).
_COMMON = dict(vocab_size=512, hidden_size=192, intermediate_size=384, num_hidden_layers=2,
               num_attention_heads=12, head_dim=16, max_position_embeddings=8192, rope_theta=10000.0,
               tie_word_embeddings=False)
# families whose default special tokens lie outside the 512-token vocabulary
_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
PRESETS: dict[str, dict] = {
    "tiny-llama": dict(model_type="llama", num_key_value_heads=4, **_COMMON),
    "tiny-qwen2": dict(model_type="qwen2", num_key_value_heads=2, **_COMMON),
    "tiny-mistral": dict(model_type="mistral", num_key_value_heads=6, sliding_window=None, **_COMMON),
    # today's families, each with the feature that sets it apart (sliding windows of 64 tokens, so
    # prompts of a few hundred tokens already slide past them)
    "tiny-qwen3": dict(model_type="qwen3", num_key_value_heads=4, **_COMMON),
    "tiny-mistral-sliding": dict(model_type="mistral", num_key_value_heads=6, sliding_window=64, **_COMMON),
    "tiny-gemma2": dict(model_type="gemma2", num_key_value_heads=4, sliding_window=64, attn_logit_softcapping=20.0,
                        final_logit_softcapping=None, query_pre_attn_scalar=16, **_COMMON),
    "tiny-gemma3": dict(model_type="gemma3_text", num_key_value_heads=4, sliding_window=64, query_pre_attn_scalar=16,
                        **{**_COMMON, "num_hidden_layers": 3},
                        layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
    "tiny-gpt-oss": dict(model_type="gpt_oss", num_key_value_heads=4, sliding_window=64, num_local_experts=4,
                         num_experts_per_tok=2, **_COMMON),
    "tiny-phi3": dict(model_type="phi3", num_key_value_heads=4, **_IDS, **{**_COMMON, "max_position_embeddings": 4096},
                      original_max_position_embeddings=512,
                      rope_scaling={"type": "longrope", "short_factor": [1.0 + i / 8 for i in range(8)],
                                    "long_factor": [1.0 + i / 2 for i in range(8)]}),
    "tiny-smollm3": dict(model_type="smollm3", num_key_value_heads=4, **_IDS, **_COMMON),
    "tiny-deepseek-v3": dict(model_type="deepseek_v3", num_key_value_heads=12, kv_lora_rank=32, q_lora_rank=None,
                             qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12, n_routed_experts=4,
                             num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
                             moe_intermediate_size=32, **{**_COMMON, "head_dim": 8}),
    # refused when loaded (layers that are not softmax attention), to show the message
    "tiny-lfm2": dict(model_type="lfm2", num_key_value_heads=4, full_attn_idxs=[1], **_COMMON),
    "tiny-qwen3-next": dict(model_type="qwen3_next", num_key_value_heads=4, **_COMMON),
    # for benchmarks: wide heads and a thin MLP, so attention dominates the cost at long lengths
    "bench-attn": dict(model_type="llama", vocab_size=512, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, head_dim=64, max_position_embeddings=131072,
                       rope_theta=500000.0, tie_word_embeddings=False),
    # real shapes with random weights (speed only): SmolLM2-135M as it is, and Llama-3.1-8B's
    # layer cut to 2 layers with a 512-token vocabulary (the attention and MLP shapes are the
    # 8B's; 0.9 GB in bfloat16, so 8 local hosts fit in this machine's memory)
    "bench-smollm2": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                          num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                          max_position_embeddings=131072, rope_theta=100000.0, tie_word_embeddings=True),
    "bench-llama8b-2layer": dict(model_type="llama", vocab_size=512, hidden_size=4096, intermediate_size=14336,
                                 num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                 max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=False),
}


def cache_root() -> Path:
    return Path(os.environ.get("APB_CACHE", Path.home() / ".cache" / "apb"))


def materialize_preset(name: str, seed: int = 0, root: Path | None = None) -> Path:
    """Write preset ``name`` (random weights from ``seed``) as a checkpoint directory, once."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; presets: {', '.join(PRESETS)}")
    target = (root or cache_root()) / "models" / f"{name}-seed{seed}"
    if (target / "config.json").exists():
        return target
    spec = dict(PRESETS[name])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
    model.save_pretrained(tmp, safe_serialization=True)
    byte_tokenizer().save_pretrained(tmp)  # byte-level: any text maps into the 512-token vocabulary
    try:
        os.rename(tmp, target)  # atomic: concurrent makers of the same preset cannot tear it
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


#: checkpoints shipped inside the package (trained by ``python -m apb.tools.retrieval``)
PACKAGED = {"apb-retrieval": "retrieval-model"}


def packaged_path(name: str) -> Path:
    path = Path(str(resources.files("apb") / "data" / PACKAGED[name]))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the packaged model {name!r} is missing from {path}; reinstall the package, or "
                                "train it with `python -m apb.tools.retrieval --out apb/data/retrieval-model`")
    return path


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def load_model(path: str | Path, dtype: str = "float32", device: torch.device | str = "cpu",
               attn_implementation: str | None = None) -> torch.nn.Module:
    """Load a causal LM from a local directory, wired to our attention unless told otherwise.

    The weights are read straight into ``dtype`` on ``device`` (one device, so transformers needs
    no accelerate for it): no float32 or host-RAM copy of the whole model on the way."""
    device = torch.device(device)
    implementation = attn_implementation or ATTN_IMPLEMENTATION
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=parse_dtype(dtype), local_files_only=True, trust_remote_code=False,
            attn_implementation=implementation, device_map=device)
    except KeyError as e:
        if implementation != ATTN_IMPLEMENTATION or ATTN_IMPLEMENTATION not in str(e):
            raise
        raise ValueError(_no_interface(AutoConfig.from_pretrained(str(path), local_files_only=True))) from None
    return model.to(device).eval()


def _no_interface(model_config) -> str:
    return (f"model type {getattr(model_config, 'model_type', '?')!r} chooses its attention from its own table, not "
            "through transformers' attention interface (it cannot be built with "
            f"attn_implementation={ATTN_IMPLEMENTATION!r}), so apb cannot run its attention; this family is "
            "not supported")


def check_attention_interface(model_config) -> torch.nn.Module | None:
    """Refuse, from the config alone, a family whose attention apb cannot stand in for: one whose
    modeling code picks its attention class from a table of its own (Falcon), whose layers attend
    both ways (a BERT-like model without ``is_decoder``), or whose forward takes no positions.
    Its skeleton is built on the meta device with apb's attention, as every worker would build
    the model, and returned for other checks of the structure (None where it cannot be built)."""
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_config, attn_implementation=ATTN_IMPLEMENTATION,
                                                     trust_remote_code=False)
    except KeyError as e:
        if ATTN_IMPLEMENTATION in str(e):
            raise ValueError(_no_interface(model_config)) from None
        return None
    except Exception:  # anything else is the workers' to report, with the model loaded
        return None
    check_positions(model)
    for name, module in model.named_modules():
        # an encoder-decoder's decoder also holds cross-attention, which a causal LM never calls
        cross = getattr(module, "is_cross_attention", False) or name.endswith("encoder_attn") or "cross" in name
        if hasattr(module, "layer_idx") and getattr(module, "is_causal", True) is False and not cross:
            raise ValueError(f"model type {getattr(model_config, 'model_type', '?')!r}: layer {module.layer_idx} "
                             f"({type(module).__name__}) attends both ways (is_causal=False); apb runs causal "
                             "decoders only (a BERT-like model is causal only with is_decoder=True in its config)")
    return model


def skeleton(model_config) -> torch.nn.Module | None:
    """The model's modules without weights (on PyTorch's ``meta`` device: no memory, no values),
    for checks that read only its structure and shapes; None where the family cannot be built so."""
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(model_config, trust_remote_code=False)
    except Exception:  # the workers' own check on the loaded model still runs
        return None
