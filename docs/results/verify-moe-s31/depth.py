# Session 31: how many tokens a bfloat16 run sends to other experts than float32 as a model with
# experts gets deeper (random gpt-oss shapes, every layer global, 4 and 12 layers; 2,000 tokens;
# `full` at W = 1 and eager bfloat16): the share of tokens left out of the K/V measure by the last
# layer. Random routers have small margins, so this is an upper bound for a trained model's.
# Run: .venv/bin/python docs/results/verify-moe-s31/depth.py 2>/dev/null > docs/results/verify-moe-s31/depth.txt
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from apb.config import MethodConfig
from apb.methods import build_method
from apb.model import routing
from apb.model.loading import load_model
from apb.parallel.comm import Comm, CommStats
from apb.runtime.prefill import prefill
from apb.tools.verify import Floor, judge, random_prompt, reference_run

n = 2000
for layers, experts in ((4, 4), (12, 4), (12, 32)):
    path = Path(tempfile.mkdtemp())
    cfg = AutoConfig.for_model("gpt_oss", vocab_size=512, hidden_size=64, intermediate_size=64, num_hidden_layers=layers,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=experts,
                               num_experts_per_tok=2 if experts == 4 else 4, layer_types=["full_attention"] * layers,
                               sliding_window=64, max_position_embeddings=4096)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path, safe_serialization=True)
    truth_model = load_model(path, "float32", attn_implementation="eager")
    ids = random_prompt(n, 512, n)
    truth = reference_run(truth_model, ids, 1)
    floor = Floor.measure(truth, reference_run(load_model(path, "bfloat16", attn_implementation="eager"), ids, 1))
    res = prefill(load_model(path, "bfloat16"), ids, build_method("full", MethodConfig()), Comm(None, CommStats()),
                  n_query=1, routing=True)
    mine = routing.flips(truth.routing, res.routing, n)
    method_any = torch.stack(list(mine.values())).any(0)
    eager_any = torch.stack(list(floor.flips.values())).any(0)
    r = judge(truth, SimpleNamespace(last_logits=res.last_logits, cache=res.cache, tokens=None), True, "bfloat16",
              floor=floor, choices=res.routing)
    per_layer = [int(f.sum()) for _, f in sorted(mine.items())]
    print(f"{layers:2d} layers, {experts:2d} experts: tokens that took other experts by the last layer: method "
          f"{float(method_any.float().mean()):.1%}, eager {float(eager_any.float().mean()):.1%}, either "
          f"{float((method_any | eager_any).float().mean()):.1%}; method's per router layer {per_layer}; "
          f"K/V {r['kv_layer_rel_diff']:.2e} (floor {floor.layer_rel:.2e}) {'PASS' if r['passed'] else 'FAIL: ' + r['reason']}")
