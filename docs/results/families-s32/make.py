"""Make a tiny random checkpoint of every causal-LM family transformers knows.

    python docs/results/families-s32/make.py OUT_DIR [MODEL_TYPE ...] > docs/results/families-s32/make.txt

For each model type in transformers' causal-LM mapping: the family's default config with its
sizes cut down (the names each config uses for width, depth, heads, experts, windows), a random
model from it, saved with apb's byte tokenizer. A family whose model cannot be built so (composite
vision/audio configs, configs that need fields this does not guess) is listed with the reason:
that is a limit of this script, not a finding about apb. `verify.sh` then runs `apb verify` on
every checkpoint made.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from apb.model.text import byte_tokenizer

#: the names a config may use for its depth
LAYERS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers")
# every name a config may use for one size, and the tiny value
SIZES = {
    ("vocab_size",): 512,
    ("hidden_size", "n_embd", "d_model", "dim", "embed_dim", "n_embed", "model_dim"): 64,
    LAYERS: 2,
    ("num_attention_heads", "n_head", "num_heads", "n_heads", "decoder_attention_heads"): 4,
    ("num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num"): 2,
    ("head_dim", "kv_channels"): 16,
    ("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size", "decoder_ffn_dim", "d_ff", "mlp_dim"): 128,
    ("moe_intermediate_size", "shared_expert_intermediate_size", "expert_intermediate_size",
     "moe_ffn_hidden_size"): 32,
    ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"): 4,
    ("num_experts_per_tok", "moe_topk", "top_k", "moe_k"): 2,
    ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length"): 4096,
    ("kv_lora_rank",): 32,
    ("qk_rope_head_dim",): 8,
    ("qk_nope_head_dim",): 8,
    ("v_head_dim",): 16,
    ("pad_token_id",): 0,
    ("bos_token_id",): 1,
    ("eos_token_id",): 2,
}
#: windows shorter than the verify prompt, so sliding layers slide
WINDOWS = ("sliding_window", "attention_window_size", "window_size")


def tiny_kwargs(default: dict) -> dict:
    kw = {}
    for names, value in SIZES.items():
        for name in names:
            if name in default:
                kw[name] = value
    for name in WINDOWS:
        if isinstance(default.get(name), int) and default[name] > 0:
            kw[name] = 48
    if default.get("q_lora_rank"):
        kw["q_lora_rank"] = 32
    for name in ("n_group", "topk_group"):
        if name in default:
            kw[name] = 1
    for name in ("first_k_dense_replace",):
        if name in default:
            kw[name] = 1
    for name, value in default.items():  # vocabularies beside the main one (Gemma 3n/4's per-layer inputs)
        if "vocab_size" in name and isinstance(value, int) and value > 512:
            kw[name] = 512
    if "hidden_size_per_layer_input" in default:
        kw["hidden_size_per_layer_input"] = 16
    if "per_layer_config" in default:  # Gemma 4: the global layers' wider heads, set in __post_init__
        kw["global_head_dim"] = 32
    if default.get("rotary_dim"):
        kw["rotary_dim"] = 8
    if "kv_lora_rank" in default:  # MLA: head_dim is the rope part's width, as DeepSeek's own configs have it
        kw.update(head_dim=8, qk_nope_head_dim=16, v_head_dim=12, num_key_value_heads=4)
    if "attention_types" in default:  # GPT-Neo: one global and one local layer
        kw["attention_types"] = [[["global", "local"], 1]]
    kw["tie_word_embeddings"] = False
    return kw


def per_layer(default: dict, kw: dict) -> None:
    """Per-layer lists cut to the new depth: layer kinds keep one of each kind the family has, in order."""
    n_default = next((default[k] for k in LAYERS if isinstance(default.get(k), int)), None)
    kinds = list(dict.fromkeys(default.get("layer_types") or ()))
    if kinds:
        n = max(2, len(kinds))
        if default.get("num_kv_shared_layers"):  # Gemma 3n: the last layers reuse earlier layers' K/V
            n = 2 * len(kinds)
            kw["num_kv_shared_layers"] = len(kinds)
        kw["num_hidden_layers"] = n
        kw["layer_types"] = (kinds * n)[:n]
    n = kw.get("num_hidden_layers", 2)
    for name, value in default.items():
        if name == "layer_types" or not isinstance(value, list) or len(value) != n_default or not value:
            continue
        if all(isinstance(v, int) and not isinstance(v, bool) and v > 128 for v in value):
            kw[name] = [128] * n
        else:
            kw[name] = (value * n)[:n]


def make(model_type: str, out: Path) -> str:
    target = out / model_type
    if (target / "config.json").exists():
        return "made before"
    default = AutoConfig.for_model(model_type).to_dict()
    if any(isinstance(v, dict) and ("text_config" in k or "vision_config" in k or "audio_config" in k)
           for k, v in default.items()):
        composite = [k for k, v in default.items() if isinstance(v, dict) and k.endswith("_config")]
        # a composite's text part is its own model type where transformers lists one
        return f"skipped: composite config ({', '.join(composite)})"
    kw = tiny_kwargs(default)
    per_layer(default, kw)
    config = AutoConfig.for_model(model_type, **kw)
    with torch.device("meta"):  # counted before any memory is taken
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    if params > 30e6:
        return f"skipped: {params / 1e6:.0f}M parameters after cutting (a size this script does not cut)"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target, safe_serialization=True)
    byte_tokenizer().save_pretrained(target)
    return f"made: {type(model).__name__}, {params / 1e6:.2f}M parameters, layer_types={getattr(config, 'layer_types', None)}"


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    only = set(sys.argv[2:])  # some families only, when given
    for model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        if only and model_type not in only:
            continue
        try:
            results[model_type] = make(model_type, out)
        except Exception as e:  # a family this script cannot build: recorded, not a finding
            results[model_type] = f"not built: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            traceback.print_exc(file=sys.stderr)
        print(f"{model_type}: {results[model_type]}", flush=True)
    made = out / "made.json"  # what earlier calls made stays listed
    earlier = json.loads(made.read_text()) if made.exists() else {}
    made.write_text(json.dumps({**earlier, **results}, indent=1))


if __name__ == "__main__":
    main()
