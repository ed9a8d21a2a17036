"""apb.model.routing: the routers of a model with experts found by shape, each token's choice and
its margin read from transformers' own forward, and the near-ties that rounding could flip."""

from __future__ import annotations

import torch

from apb.model.catalog import resolve_model
from apb.model.loading import load_model
from apb.model import routing
from apb.tools.verify import random_prompt


def _routed(name: str, n: int = 50, dtype: str = "float32"):
    model = load_model(resolve_model(name), dtype, attn_implementation="eager")
    ids = random_prompt(n, model.config.vocab_size, 1)
    with routing.record(model) as got, torch.no_grad():
        model(ids[None])
    return model, ids, got


def test_routers_are_found_in_every_layer_with_experts_and_nowhere_else():
    gpt = load_model(resolve_model("tiny-gpt-oss"), attn_implementation="eager")
    assert {k: type(m).__name__ for k, m in routing.routers(gpt).items()} == {0: "GptOssTopKRouter",
                                                                               1: "GptOssTopKRouter"}
    ds = load_model(resolve_model("tiny-deepseek-v3"), attn_implementation="eager")
    assert list(routing.routers(ds)) == [1]  # first_k_dense_replace = 1: layer 0 has a dense MLP
    assert routing.routers(load_model(resolve_model("tiny-llama"), attn_implementation="eager")) == {}


def test_recorded_choices_and_margins_are_the_routers_own():
    model, ids, got = _routed("tiny-gpt-oss")
    router = model.model.layers[1].mlp.router
    calls = []
    hook = router.register_forward_hook(lambda m, i, o: calls.append((i[0].detach(), o)))
    with torch.no_grad():
        model(ids[None])
    hook.remove()
    hidden, (logits, _, indices) = calls[0]
    assert torch.equal(got.chosen[1], indices.sort(-1).values)
    assert torch.allclose(got.scores[1], logits.float())
    # the margin by hand: the weaker of the two chosen logits minus the best of the other two
    top = logits.float().sort(-1, descending=True).values
    assert torch.allclose(got.margin(1), top[:, 1] - top[:, 2])


def test_deepseek_chooses_by_sigmoid_plus_bias():
    model, ids, got = _routed("tiny-deepseek-v3")
    gate = model.model.layers[1].mlp.gate
    with torch.no_grad():
        gate.e_score_correction_bias.copy_(torch.tensor([0.0, 5.0, 0.0, 0.0]))  # expert 1 always wins
        with routing.record(model) as biased:
            model(ids[None])
    assert bool((biased.chosen[1] == 1).any(-1).all())
    assert bool((biased.margin(1) > 0).all())  # the scores it reads are the ones that chose
    assert not bool((got.chosen[1] == 1).any(-1).all())


def test_near_ties_are_the_tokens_rounding_could_flip():
    _, _, truth = _routed("tiny-gpt-oss", 300)
    _, _, half = _routed("tiny-gpt-oss", 300, "bfloat16")
    ties = routing.near_ties(truth, half, 4.0)
    scale = routing.rounding_scale(truth, half, 0)
    assert 0 < scale < 0.05
    assert torch.equal(ties[0], truth.margin(0) <= 4.0 * scale)
    flipped = (truth.chosen[0] != half.chosen[0]).any(-1)
    assert bool(ties[0][flipped].all())  # every token bfloat16 really flipped was a near-tie
    assert 0 < float(ties[0].float().mean()) < 0.25


def test_with_expert_groups_the_margin_counts_the_group_choice(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("deepseek_v3", vocab_size=512, hidden_size=64, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, head_dim=8,
                               kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=16,
                               v_head_dim=12, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
                               first_k_dense_replace=0, moe_intermediate_size=32)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(tmp_path, safe_serialization=True)
    model = load_model(tmp_path, "float32", attn_implementation="eager")
    with torch.no_grad():  # a bias that favours one expert per group, so groups and scores disagree
        for layer in model.model.layers:
            layer.mlp.gate.e_score_correction_bias.copy_(torch.tensor([0.3, 0, 0, 0.2, 0, 0, 0.1, 0]))
        with routing.record(model) as got:
            model(random_prompt(200, 512, 3)[None])
    assert got.groups == {0: (4, 2), 1: (4, 2)}
    s, chosen, margin = got.scores[1], got.chosen[1], got.margin(1)
    assert bool((margin >= 0).all())  # the groups explain every choice
    # by hand: the gap inside the two chosen groups, and the gap between the 2nd and 3rd group
    group = s.view(-1, 4, 2).topk(2, -1).values.sum(-1)
    g_sorted = group.sort(-1, descending=True).values
    for t in range(0, 200, 37):
        groups = group[t].topk(2).indices.tolist()
        inside = [e for e in range(8) if e // 2 in groups]
        rest = [float(s[t, e]) for e in inside if e not in chosen[t].tolist()]
        expert_gap = float(s[t, chosen[t]].min()) - max(rest)
        want = min(expert_gap, float(g_sorted[t, 1] - g_sorted[t, 2]))
        assert abs(float(margin[t]) - want) < 1e-6
    # without the groups, many tokens would look tied (an expert of an unchosen group scores higher)
    plain = routing.Routing(got.scores, got.chosen)
    assert bool((plain.margin(1) < 0).any())
