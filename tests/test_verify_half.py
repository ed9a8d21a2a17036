"""``apb verify`` in bfloat16: the rule (apb.tools.verify.HalfRule) passes a right run and fails a
wrong mask, both judged against the float32 eager reference and eager bfloat16's own error."""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import torch

from apb.config import MethodConfig
from apb.methods import build_method
from apb.model.catalog import resolve_model
from apb.model import routing
from apb.model.loading import load_model
from apb.parallel.comm import Comm, CommStats
from apb.runtime.prefill import prefill
from apb.tools.verify import Floor, judge, layer_rel_diff, random_prompt, reference_run

full_module = importlib.import_module("apb.methods.full")
KERNEL = full_module.attention


def next_key(q, k, v, causal=True, **kw):
    """A wrong mask: every query but the last also sees the key after its own."""
    if causal and q.shape[2] == k.shape[2] > 1:
        out, lse = KERNEL(q[:, :, :-1], k, v, causal=True, **kw)
        last, last_lse = KERNEL(q[:, :, -1:], k, v, causal=False, **kw)
        return torch.cat([out, last], 2), torch.cat([lse, last_lse], 2)
    return KERNEL(q, k, v, causal=causal, **kw)


def block_off(q, k, v, causal=True, **kw):
    """A wrong mask, as a block boundary bug would make: rows 100-139 lose the keys before 100."""
    if causal and q.shape[2] == k.shape[2] > 140:
        head, h_lse = KERNEL(q[:, :, :100], k[:, :, :100], v[:, :, :100], causal=True, **kw)
        mid, m_lse = KERNEL(q[:, :, 100:140], k[:, :, 100:140], v[:, :, 100:140], causal=True, **kw)
        rest, r_lse = KERNEL(q[:, :, 140:], k, v, causal=True, **kw)
        return torch.cat([head, mid, rest], 2), torch.cat([h_lse, m_lse, r_lse], 2)
    return KERNEL(q, k, v, causal=causal, **kw)


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
    passed = judge(truth, same, True, "bfloat16", floor=floor, hint=hint)
    assert passed["reason"] is None
    # a model with experts whose routers were not read passes as before, but not silently
    assert "routers were not read" in passed["routing_flips"] and "float32" in passed["routing_flips"]
    assert judge(truth, same, True, "bfloat16", floor=floor)["routing_flips"] is None  # no experts: nothing to say


def _gpt_oss_bf16(n: int, path=None):
    """tiny-gpt-oss (or the checkpoint at ``path``) at ``n`` tokens: the float32 truth, eager
    bfloat16's run, the floor from them, and a runner of ``full`` in bfloat16 on apb's attention."""
    path = path or resolve_model("tiny-gpt-oss")
    truth_model = load_model(path, "float32", attn_implementation="eager")
    ids = random_prompt(n, truth_model.config.vocab_size, n)  # the prompt apb verify uses at n tokens
    truth = reference_run(truth_model, ids, 2)
    half = reference_run(load_model(path, "bfloat16", attn_implementation="eager"), ids, 2)
    model = load_model(path, "bfloat16")

    def run():
        res = prefill(model, ids, build_method("full", MethodConfig()), Comm(None, CommStats()), n_query=1,
                      routing=True)
        return SimpleNamespace(last_logits=res.last_logits, cache=res.cache, tokens=None, routing=res.routing)

    return truth, half, Floor.measure(truth, half), run


def test_a_token_sent_to_other_experts_at_a_near_tie_is_left_out_of_the_measure():
    # session 30's case: at 280 tokens token 186's two best experts are within bfloat16's rounding,
    # and apb's attention sends it to the other one where eager does not; it failed every exact row
    truth, _, floor, run = _gpt_oss_bf16(280)
    assert not floor.flips[0].any()  # eager's own run keeps float32's experts in layer 0
    res = run()
    mine = routing.flips(truth.routing, res.routing, 280)
    assert mine[0].nonzero().flatten().tolist() == [186]  # the hosts report the flip itself
    right = judge(truth, res, True, "bfloat16", floor=floor, choices=res.routing)
    assert right["passed"], right["reason"]
    assert "186 at layer 0" in right["routing_flips"], right["routing_flips"]
    # the same run measured without the routing: token 186 alone fails the layer (the old rule)
    old = judge(truth, res, True, "bfloat16", floor=Floor(floor.layer_rel, floor.kl))
    assert not old["passed"] and old["kv_layer_rel_diff"] > 4 * right["kv_layer_rel_diff"]


def test_eager_sending_a_token_to_other_experts_does_not_loosen_the_floor():
    # at 235 tokens eager bfloat16 itself sends token 167 elsewhere: counted in, that one token made
    # the floor 0.049 (6x a clean layer's) and let a 16-bit row differ by up to 0.098 per layer
    truth, half, floor, run = _gpt_oss_bf16(235)
    assert floor.flips[0].nonzero().flatten().tolist() == [167]
    assert floor.layer_rel < 0.01, floor
    assert layer_rel_diff(truth, half.keys, half.values) > 0.04  # the old floor, from the same runs
    res = run()
    right = judge(truth, res, True, "bfloat16", floor=floor, choices=res.routing)
    assert right["passed"], right["reason"]
    assert "167 at layer 0" in right["routing_flips"].split("eager")[1], right["routing_flips"]


def test_a_wrong_mask_on_a_model_with_experts_still_fails_in_bfloat16(tmp_path, monkeypatch):
    # four global layers, so that a mask in layer 0 shows in three layers' K/V after the experts
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("gpt_oss", vocab_size=512, hidden_size=64, intermediate_size=64, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                               num_experts_per_tok=2, layer_types=["full_attention"] * 4, sliding_window=64,
                               max_position_embeddings=4096)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(tmp_path, safe_serialization=True)
    truth, _, floor, run = _gpt_oss_bf16(300, tmp_path)
    assert floor.ties and any(t.any() for t in floor.ties.values())  # near-ties exist to be abused
    res = run()
    right = judge(truth, res, True, "bfloat16", floor=floor, choices=res.routing)
    assert right["passed"], right["reason"]
    for wrong_mask in (next_key, block_off):
        monkeypatch.setattr(full_module, "attention", wrong_mask)
        res = run()
        wrong = judge(truth, res, True, "bfloat16", floor=floor, choices=res.routing)
        assert not wrong["passed"] and "K/V" in wrong["reason"], (wrong_mask.__name__, wrong)


def test_a_flip_that_is_no_near_tie_fails_the_row():
    truth, _, floor, run = _gpt_oss_bf16(280)
    res = run()
    # the token whose float32 choice was the clearest, reported as having taken other experts
    t = int(truth.routing.margin(0).argmax())
    pos, chosen = res.routing[0]
    forged = chosen.clone()
    forged[pos == t] = torch.tensor([e for e in range(4) if e not in chosen[pos == t][0].tolist()])
    wrong = judge(truth, res, True, "bfloat16", floor=floor, choices={**res.routing, 0: (pos, forged)})
    assert not wrong["passed"] and f"token {t} left the experts" in wrong["reason"], wrong["reason"]
    assert "more than rounding" in wrong["reason"]


def test_verify_on_worker_processes_reads_every_hosts_experts():
    # session 30's 280-token row at W = 2: ring's hosts each report their own tokens' experts
    from apb.config import load_config
    from apb.parallel.groups.local import LocalWorkerGroup
    from apb.tools.verify import verify

    cfg = load_config(None)
    with LocalWorkerGroup(2, worker_kwargs={"device": "cpu", "timeout_s": 120, "threads": 1}, timeout_s=300) as g:
        rows = verify(cfg, g, ["ring", "apb:uncompressed"], [280], models=["tiny-gpt-oss"], dtype="bfloat16",
                      n_tokens=2, query_len=1)
    for row in rows:
        assert row.passed, (row.method, row.reason)
        assert "186 at layer 0" in row.routing_flips.split("eager")[0], row.routing_flips


def test_the_floor_is_the_wider_of_transformers_own_eager_and_sdpa():
    """One 16-bit run's error is one sample of how rounding falls: the floor takes the larger of
    eager's and sdpa's (transformers' default), measure by measure."""
    from apb.tools.verify import half_models

    path = resolve_model("tiny-llama")
    ids = random_prompt(300, load_model(path, "float32").config.vocab_size, 5)
    truth = reference_run(load_model(path, "float32", attn_implementation="eager"), ids, 2)
    models = half_models(path, "bfloat16")
    assert [m.config._attn_implementation for m in models] == ["eager", "sdpa"]
    runs = [reference_run(m, ids, 2) for m in models]
    one = [Floor.measure(truth, r) for r in runs]
    both = Floor.measure(truth, runs)
    assert both.layer_rel == max(f.layer_rel for f in one) and both.kl == max(f.kl for f in one)
    assert one[0].layer_rel != one[1].layer_rel  # two kernels, two roundings
    # each of transformers' own runs, judged as a method, is within the rule
    for r in runs:
        assert judge(truth, SimpleNamespace(last_logits=r.logits, cache=SimpleNamespace(keys=r.keys, values=r.values),
                                            tokens=truth.tokens), True, "bfloat16", floor=both)["passed"]


def test_a_token_either_run_sends_to_other_experts_is_left_out():
    """With experts, the floor of two runs leaves out (and excuses) the tokens either run flipped,
    and counts the near-ties of either."""
    truth, half, _, _ = _gpt_oss_bf16(280)
    n = truth.keys.shape[2]
    layer = sorted(truth.routing.chosen)[0]
    other = SimpleNamespace(**{**vars(half)})  # a second run: token 7 took other experts in the first router
    chosen = {k: v.clone() for k, v in half.routing.chosen.items()}
    experts = half.routing.scores[layer].shape[1]
    chosen[layer][7] = ((chosen[layer][7] + 1) % experts).sort().values  # another set of experts
    other.routing = routing.Routing(scores=half.routing.scores, chosen=chosen, groups=half.routing.groups)
    first, second = Floor.measure(truth, half), Floor.measure(truth, other)
    both = Floor.measure(truth, [half, other])
    assert bool(second.flips[layer][7]) and not bool(first.flips.get(layer, torch.zeros(n, dtype=torch.bool))[7])
    none = torch.zeros(n, dtype=torch.bool)
    for k in set(first.flips) | set(second.flips):
        assert torch.equal(both.flips[k], first.flips.get(k, none) | second.flips.get(k, none))
    assert torch.equal(both.flipped, first.flipped | second.flipped) and bool(both.flipped[layer + 1:, 7].all())
