# Session 36: a random-weight checkpoint with Gemma-3-4B's attention and cache shape (34 layers,
# every sixth global and the rest sliding over 1024 keys; 8 query and 4 KV heads of 256) and a
# thin residual stream (256, MLP 512), so that the K/V a host holds is most of its memory and a
# 16K-token prefill fits this 2-core CPU. Memory only: random weights.
# Run: .venv/bin/python docs/results/lean-s36/make_model.py /tmp/s36/gemma3-4b-kv
import sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM

layers = 34
types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)]
cfg = AutoConfig.for_model("gemma3_text", vocab_size=512, hidden_size=256, intermediate_size=512,
                           num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                           query_pre_attn_scalar=256, sliding_window=1024, layer_types=types,
                           max_position_embeddings=131072, tie_word_embeddings=True,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2)
torch.manual_seed(0)
AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(sys.argv[1], safe_serialization=True)
print("wrote", sys.argv[1], "global layers:", [i for i, t in enumerate(types) if t == "full_attention"])
