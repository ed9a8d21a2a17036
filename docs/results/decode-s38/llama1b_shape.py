"""Save a random Llama-3.2-1B-shaped checkpoint cut to 2 layers (32 query heads over 8 KV heads of
64, hidden 2048, MLP 8192, a 512-token vocabulary: the attention and MLP shapes of the real model),
in safetensors, for ``decode-s37/decode.py --model DIR``: the head size of 64 that session 38's
rule sends to ``_grouped_row`` in bfloat16. Usage: ``python llama1b_shape.py DIR``."""

import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

config = LlamaConfig(vocab_size=512, hidden_size=2048, intermediate_size=8192, num_hidden_layers=2,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                     rope_theta=500000.0, tie_word_embeddings=True)
torch.manual_seed(0)
LlamaForCausalLM(config).save_pretrained(sys.argv[1], safe_serialization=True)
