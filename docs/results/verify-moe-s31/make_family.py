# Session 31: a 4-layer random checkpoint of one more family with experts (Qwen2-MoE with a shared
# expert, Mixtral, OLMoE, Qwen3-MoE), for families.sh.
# Run: .venv/bin/python docs/results/verify-moe-s31/make_family.py qwen2_moe /tmp/m-qwen2_moe
import sys, torch
from transformers import AutoConfig, AutoModelForCausalLM
kind, out = sys.argv[1], sys.argv[2]
common = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=8192)
extra = {"qwen2_moe": dict(moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=6, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[]),
         "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
         "olmoe": dict(num_experts=8, num_experts_per_tok=2),
         "qwen3_moe": dict(moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, head_dim=16)}[kind]
cfg = AutoConfig.for_model(kind, **common, **extra)
torch.manual_seed(0)
AutoModelForCausalLM.from_config(cfg).save_pretrained(out, safe_serialization=True)
