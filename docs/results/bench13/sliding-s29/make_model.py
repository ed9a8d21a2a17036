# Session 29: a random-weight checkpoint whose every layer slides, at Gemma-3-1B's attention shape
# (4 query heads and 1 KV head of 256, window 512) with a thin MLP (1152) and 6 layers, so that the
# sliding layers' attention is a visible share of the prefill on this CPU. Speed only: random weights.
# Run: .venv/bin/python docs/results/bench13/sliding-s29/make_model.py /tmp/s29/gemma3-sliding
import sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM

layers = 6
cfg = AutoConfig.for_model("gemma3_text", vocab_size=512, hidden_size=1152, intermediate_size=1152,
                           num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                           query_pre_attn_scalar=256, sliding_window=512, layer_types=["sliding_attention"] * layers,
                           max_position_embeddings=32768, tie_word_embeddings=False,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2)
torch.manual_seed(0)
AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(sys.argv[1], safe_serialization=True)
print("wrote", sys.argv[1])
