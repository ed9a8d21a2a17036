"""apb.tools.routing: the routers of a model with experts found by shape, each token's choice and
its margin read from transformers' own forward, and the near-ties that rounding could flip."""

from __future__ import annotations

import torch

from apb.model.catalog import resolve_model
from apb.model.loading import load_model
from apb.tools import routing
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
