# A 4-layer gpt-oss with every layer global, random weights (the shape of
# tests/test_verify_half.py's wrong-mask test): the tiny-gpt-oss preset has 2 layers, so a token
# that takes other experts shows in one layer's K/V only.
# Run: .venv/bin/python docs/results/verify-moe-s31/make_model.py /tmp/gpt-oss-4l
import sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM

cfg = AutoConfig.for_model("gpt_oss", vocab_size=512, hidden_size=64, intermediate_size=64, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                           num_experts_per_tok=2, layer_types=["full_attention"] * 4, sliding_window=64,
                           max_position_embeddings=4096)
torch.manual_seed(0)
AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(sys.argv[1], safe_serialization=True)
