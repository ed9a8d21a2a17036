# Session 34: how far one 16-bit run of the pretrained Gemma 3 270M lands from the float32 truth,
# prompt by prompt: transformers' eager and sdpa attention in bfloat16, and apb's `full` (W = 1,
# in one process) in bfloat16; the last-token KL from float32 and the worst layer's K/V relative
# difference (apb verify's two measures). Random prompts as `apb verify` makes them (n, seed).
# Run: PYTHONPATH=<apb> python docs/results/gemma3-s34/bf16_floor.py 2>/dev/null > docs/results/gemma3-s34/bf16_floor.txt
import sys, torch
from apb.config import MethodConfig
from apb.methods import build_method
from apb.model.catalog import resolve_model
from apb.model.loading import load_model
from apb.parallel.comm import Comm, CommStats
from apb.runtime.prefill import prefill
from apb.tools.verify import random_prompt, reference_run, kl_divergence, layer_rel_diff
path = resolve_model('gemma3-270m')
truth_model = load_model(path, "float32", attn_implementation="eager")
eager_model = load_model(path, "bfloat16", attn_implementation="eager")
sdpa_model = load_model(path, "bfloat16", attn_implementation="sdpa")
model = load_model(path, "bfloat16")
for n, seed in ((1500, 1), (1500, 2), (1500, 3), (700, 4), (3000, 5)):
    ids = random_prompt(n, truth_model.config.vocab_size, seed)
    truth = reference_run(truth_model, ids, 1)
    eager = reference_run(eager_model, ids, 1)
    sdpa = reference_run(sdpa_model, ids, 1)
    res = prefill(model, ids, build_method("full", MethodConfig()), Comm(None, CommStats()), n_query=1)
    print(n, seed, "KL eager %.2e sdpa %.2e full %.2e | K/V rel eager %.3f sdpa %.3f full %.3f" % (
        kl_divergence(truth.logits, eager.logits), kl_divergence(truth.logits, sdpa.logits), kl_divergence(truth.logits, res.last_logits),
        layer_rel_diff(truth, eager.keys, eager.values), layer_rel_diff(truth, sdpa.keys, sdpa.values), layer_rel_diff(truth, res.cache.keys, res.cache.values)), flush=True)
