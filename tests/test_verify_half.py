"""``apb verify`` in bfloat16: the rule (apb.tools.verify.HalfRule) passes a right run and fails a
wrong mask, both judged against the float32 eager reference and eager bfloat16's own error."""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import torch

from apb.config import MethodConfig
from apb.methods import build_method
from apb.model.catalog import resolve_model
from apb.model.loading import load_model
from apb.parallel.comm import Comm, CommStats
from apb.runtime.prefill import prefill
from apb.tools.verify import Floor, judge, random_prompt, reference_run

full_module = importlib.import_module("apb.methods.full")


def test_bfloat16_rule_passes_a_right_run_and_fails_a_mask_that_shows_the_next_key(monkeypatch):
    path = resolve_model("tiny-llama")
    truth_model = load_model(path, "float32", attn_implementation="eager")
    ids = random_prompt(300, truth_model.config.vocab_size, 0)
    truth = reference_run(truth_model, ids, 4)
    floor = Floor.measure(truth, reference_run(load_model(path, "bfloat16", attn_implementation="eager"), ids, 4))
    assert 0 < floor.layer_rel < 0.05  # eager bfloat16 itself is not float32
    model = load_model(path, "bfloat16")

    def run():
        res = prefill(model, ids, build_method("full", MethodConfig()), Comm(None, CommStats()))
        return SimpleNamespace(last_logits=res.last_logits, cache=res.cache, tokens=None)

    right = judge(truth, run(), True, "bfloat16", floor=floor)
    assert right["passed"], right["reason"]
    kernel = full_module.attention

    def next_key(q, k, v, causal=True, **kw):  # every query but the last also sees the key after its own
        if causal and q.shape[2] == k.shape[2] > 1:
            out, lse = kernel(q[:, :, :-1], k, v, causal=True, **kw)
            last, last_lse = kernel(q[:, :, -1:], k, v, causal=False, **kw)
            return torch.cat([out, last], 2), torch.cat([lse, last_lse], 2)
        return kernel(q, k, v, causal=causal, **kw)

    monkeypatch.setattr(full_module, "attention", next_key)
    wrong = judge(truth, run(), True, "bfloat16", floor=floor)
    assert not wrong["passed"] and "K/V" in wrong["reason"], wrong
    assert wrong["kv_layer_rel_diff"] > 5 * right["kv_layer_rel_diff"]


def test_a_failed_16_bit_row_of_a_model_with_experts_says_a_routing_flip_may_be_why():
    from transformers import AutoConfig

    from apb.tools.verify import routing_hint

    hint = routing_hint(AutoConfig.from_pretrained(resolve_model("tiny-gpt-oss")))
    assert hint and "float32" in hint
    assert routing_hint(AutoConfig.from_pretrained(resolve_model("tiny-deepseek-v3")))
    assert routing_hint(AutoConfig.from_pretrained(resolve_model("tiny-llama"))) is None
    path = resolve_model("tiny-llama")
    truth = reference_run(load_model(path, "float32", attn_implementation="eager"), random_prompt(60, 512, 0), 2)
    floor = Floor(layer_rel=1e-3, kl=1e-6)
    off = SimpleNamespace(last_logits=truth.logits, cache=SimpleNamespace(keys=truth.keys * 1.1, values=truth.values),
                          tokens=None)
    failed = judge(truth, off, True, "bfloat16", floor=floor, hint=hint)
    assert not failed["passed"] and failed["reason"].startswith("K/V") and failed["reason"].endswith(hint)
    same = SimpleNamespace(last_logits=truth.logits, cache=SimpleNamespace(keys=truth.keys, values=truth.values),
                           tokens=None)
    assert judge(truth, same, True, "bfloat16", floor=floor, hint=hint)["reason"] is None
