# Session 31: FLOPs of one forward over 64 tokens (no head) as torch's FLOP counter counts them in
# transformers' own forward (eager attention: the whole square; eager experts: each token through
# its top-k), against the cost model's shape before session 31 (one dense MLP of
# intermediate_size per layer, config.head_dim for every head) and now (ModelShape.from_config).
# Run: .venv/bin/python docs/results/cost-s31/flops.py 2>/dev/null > docs/results/cost-s31/flops.txt
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM

from apb.model.catalog import resolve_model
from apb.tools.simulate import ModelShape

N = 64
print(f"{'model':18s} {'counted MFLOP':>14s} {'before':>8s} {'x counted':>9s} {'now':>8s} {'x counted':>9s}")
for name in ["tiny-llama", "tiny-phi3", "tiny-gpt-oss", "tiny-deepseek-v3"]:
    model = AutoModelForCausalLM.from_pretrained(resolve_model(name), attn_implementation="eager",
                                                 experts_implementation="eager").eval()
    c = model.config
    ids = torch.randint(0, c.vocab_size, (1, N), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.model(ids)
    counted = counter.get_total_flops()
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    per_layer = c.hidden_size * head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads) \
        + 3 * c.hidden_size * c.intermediate_size
    before = 2 * N * per_layer * c.num_hidden_layers + N * N * 4 * c.num_attention_heads * head_dim * c.num_hidden_layers
    shape = ModelShape.from_config(c)
    now = shape.linear_flops(N) + N * N * shape.attn_flops_per_pair() * shape.layers
    print(f"{name:18s} {counted / 1e6:14.3f} {before / 1e6:8.3f} {before / counted:9.2f} {now / 1e6:8.3f} {now / counted:9.2f}")
