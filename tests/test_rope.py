"""Moving rotary-embedded vectors (apb.model.rope), and apb scoring with the query at its true positions."""

import threading

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from apb.config import MethodConfig
from apb.methods import build_method
from apb.methods.base import AttnContext
from apb.model.catalog import resolve_model
from apb.model.loading import load_model
from apb.model.rope import rope_shift
from test_masks import ThreadComm


def naive_rope(x, position, inv_freq, scaling=1.0):
    """RoPE written out: pairs (i, i + d/2) rotated by position * inv_freq[i] (rotate-half layout)."""
    angles = position * inv_freq.double()
    cos, sin = torch.cos(angles) * scaling, torch.sin(angles) * scaling
    half = x.shape[-1] // 2
    a, b = x[..., :half].double(), x[..., half:].double()
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1).float()


def tiny(rope_scaling=None):
    cfg = AutoConfig.for_model("llama", vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                               max_position_embeddings=4096, rope_scaling=rope_scaling)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 4.0},
                                     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}])
def test_shift_moves_a_vector_as_naive_rope_would(scaling):
    model = tiny(scaling)
    shift = rope_shift(model)
    assert shift is not None
    inv_freq, att = shift.rotary.inv_freq, float(getattr(shift.rotary, "attention_scaling", 1.0))
    x = torch.randn(1, 2, 5, 32, generator=torch.Generator().manual_seed(1))
    at_p = naive_rope(x, 37, inv_freq, att)
    moved = shift.turn(at_p, 2000)
    assert torch.allclose(moved, naive_rope(x, 2037, inv_freq, att), atol=1e-4)
    assert not torch.allclose(at_p, naive_rope(x, 2037, inv_freq, att), atol=1e-2)  # the shift did something


def test_length_dependent_rope_is_not_shifted():
    model = tiny({"rope_type": "dynamic", "factor": 2.0})
    assert rope_shift(model) is None


def _layer0_scoring_queries(query_positions: str, preset: str = "tiny-llama", model=None):
    """Run apb's context phase of ``preset`` (or ``model``) with threads as 3 hosts; record, per
    host, the query vectors its compressor scored with at layer 0."""
    model = load_model(resolve_model(preset)) if model is None else model
    world, n_ctx, n_query = 3, 150, 7
    n = n_ctx + n_query
    ids = torch.randint(3, 500, (n,), generator=torch.Generator().manual_seed(0))
    method = build_method("apb", MethodConfig(name="apb", anchor_len=24, passing_len=8,
                                              query_positions=query_positions))
    seen = {}
    real_select = method.compressor.select

    def select(x, p, _seen=seen):
        if x.layer == 0:
            _seen[threading.current_thread().name] = x.q_query.clone()
        return real_select(x, p)

    method.compressor.select = select
    slices = method.layout(n, world, n_query)
    plan = method.plan(n, world, n_query, model.config.num_hidden_layers)
    shared = {"slots": [None] * world, "barrier": threading.Barrier(world)}
    errors = []
    rope = rope_shift(model)  # once, before the hosts share the model: its probe runs the model's layers

    def host(r):
        try:
            mine = slices[r]
            ctx = AttnContext(method, slices, ThreadComm(r, world, shared), plan=plan, n_query=n_query,
                              rope=rope)
            with torch.no_grad():
                model(input_ids=ids[mine.indices][None], position_ids=mine.positions[None], use_cache=False,
                      apb_ctx=ctx)
        except BaseException as e:
            errors.append(e)
            shared["barrier"].abort()

    threads = [threading.Thread(target=host, args=(r,), name=str(r)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return slices, seen


def test_apb_scores_with_the_query_at_its_true_positions():
    # at layer 0 a token's q depends only on the token and its position: host 0 appends the real
    # query at its true positions, hosts 1 and 2 hold a copy in their anchors; shifted, they agree
    slices, seen = _layer0_scoring_queries("true")
    assert slices[1].positions.tolist() != slices[1].indices.tolist()  # the copy does sit elsewhere
    for r in ("1", "2"):
        assert torch.allclose(seen[r], seen["0"], atol=1e-5), f"host {r}"


def test_anchor_positions_keep_the_old_behaviour():
    _, seen = _layer0_scoring_queries("anchor")
    assert not torch.allclose(seen["1"], seen["0"], atol=1e-3)


def test_apb_refuses_true_positions_on_length_dependent_rope_at_load():
    from transformers import AutoConfig

    dynamic = AutoConfig.for_model("llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    fixed = AutoConfig.for_model("llama", rope_scaling={"rope_type": "linear", "factor": 2.0})
    apb = build_method("apb", MethodConfig(name="apb"))
    apb.check(fixed, 4)
    with pytest.raises(ValueError, match="query_positions: anchor"):
        apb.check(dynamic, 4)
    build_method("apb", MethodConfig(name="apb", query_positions="anchor")).check(dynamic, 4)
    build_method("apb:uncompressed", MethodConfig(name="apb")).check(dynamic, 4)  # nothing is scored


@pytest.mark.parametrize("preset", ["tiny-deepseek-v3", "tiny-gpt-oss", "tiny-smollm3"])
def test_shift_moves_a_query_as_the_model_rotates_it(preset):
    """The layer-0 query of the same tokens at positions p and p + 400, as the model computes them,
    differ by the shift. DeepSeek-V3's query is [no-rope part, rope part]: only its rope part turns.
    GPT-OSS's rotary hands its apply_rotary_pos_emb a cos half the head wide (one angle per pair),
    which an earlier shift took for MLA's rope part and turned only half the head."""
    from transformers import AttentionInterface

    from apb.model.hf_bridge import ATTN_IMPLEMENTATION, apb_attention_forward

    model = load_model(resolve_model(preset))
    seen = []

    def spy(module, q, k, v, mask, **kw):
        if module.layer_idx == 0:
            seen.append(q.clone())
        return apb_attention_forward(module, q, k, v, mask, **kw)

    ids = torch.randint(3, 500, (1, 9), generator=torch.Generator().manual_seed(1))
    AttentionInterface.register(ATTN_IMPLEMENTATION, spy)
    try:
        with torch.no_grad():
            for start in (20, 420):
                model(input_ids=ids, position_ids=torch.arange(start, start + 9)[None], use_cache=False)
    finally:
        AttentionInterface.register(ATTN_IMPLEMENTATION, apb_attention_forward)
    shift = rope_shift(model)
    assert shift is not None
    assert shift.turns[0]
    torch.testing.assert_close(shift.shift(seen[0], 400, 0), seen[1], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(seen[0], seen[1], atol=1e-2)  # the positions do change the query
    if preset == "tiny-deepseek-v3":
        assert seen[0].shape[-1] == 24
        torch.testing.assert_close(seen[0][..., :16], seen[1][..., :16])


def _smollm3(no_rope_layers):
    cfg = AutoConfig.for_model("smollm3", vocab_size=512, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, pad_token_id=0,
                               bos_token_id=1, eos_token_id=2, no_rope_layers=no_rope_layers)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="apb").eval()


def test_a_layer_without_rope_keeps_the_query_copy_where_it_is():
    """SmolLM3 leaves every fourth layer without RoPE (``no_rope_layers``): there the query is the
    same at every position, so the anchor's copy scores as it is. Turning it, as every layer was
    turned before, scored host 1's and 2's blocks with a query the real one never is."""
    model = _smollm3([0, 1])  # layer 0 without RoPE, layer 1 with
    shift = rope_shift(model)
    assert shift is not None and shift.turns == {0: False, 1: True}
    _, seen = _layer0_scoring_queries("true", model=model)
    for r in ("1", "2"):
        assert torch.allclose(seen[r], seen["0"], atol=1e-5), f"host {r}"
    # the shift it no longer gets at layer 0 would have moved the copy away from the real query
    assert not torch.allclose(shift.turn(seen["1"], 100), seen["0"], atol=1e-3)


@pytest.mark.parametrize("model_type, extra", [("stablelm", {"partial_rotary_factor": 0.25}),
                                               ("phi", {"partial_rotary_factor": 0.5})])
def test_a_rotation_the_shift_cannot_reproduce_is_refused_before_the_prefill(model_type, extra):
    """StableLM and Phi rotate only a head's first dims (a partial rotary). An earlier shift turned
    the last ones and checked itself against itself, so apb scored these models' blocks with a
    wrongly turned query; the check against each layer's own query now refuses the shift, and apb
    refuses the model on each host before sending anything, naming the fix."""
    cfg = AutoConfig.for_model(model_type, vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=2, **extra)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    assert rope_shift(model) is None
    apb = build_method("apb", MethodConfig(name="apb"))
    apb.check(model.config, 3)  # the config alone promises fixed frequencies
    with pytest.raises(ValueError, match="query_positions: anchor"):
        apb.check_model(model)
    build_method("apb", MethodConfig(name="apb", query_positions="anchor")).check_model(model)
    build_method("apb:uncompressed", MethodConfig(name="apb")).check_model(model)  # nothing is scored


@pytest.mark.parametrize("model_type, layer_types, want", [
    # Cohere 2 and EXAONE 4 rotate their sliding layers only; their global layers have no RoPE
    ("cohere2", ["sliding_attention"] * 3 + ["full_attention"], {0: True, 1: True, 2: True, 3: False}),
    ("exaone4", ["sliding_attention", "full_attention"], {0: True, 1: False}),
])
def test_layers_without_rope_are_found_in_each_family(model_type, layer_types, want):
    cfg = AutoConfig.for_model(model_type, vocab_size=64, hidden_size=64, intermediate_size=64,
                               num_hidden_layers=len(layer_types), num_attention_heads=2, num_key_value_heads=1,
                               pad_token_id=0, bos_token_id=1, eos_token_id=2, sliding_window=16,
                               layer_types=layer_types)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="apb").eval()
    shift = rope_shift(model)
    assert shift is not None and shift.turns == want


def test_only_a_method_that_moves_the_query_probes_the_models_rope():
    """The probe routes the model's attention elsewhere while it runs: methods that never move a
    query (every one but apb scoring at true positions) leave the model untouched."""
    from apb.parallel.comm import Comm
    from apb.runtime.prefill import prefill

    model = load_model(resolve_model("tiny-llama"))
    ids = torch.randint(3, 500, (40,), generator=torch.Generator().manual_seed(0))
    for name, options in (("full", {}), ("ring", {}), ("apb", {"query_positions": "anchor"})):
        prefill(model, ids, build_method(name, MethodConfig(name=name, **options)), Comm(None), n_query=4)
        assert not hasattr(model, "_apb_rope_shift"), name
    assert build_method("apb", MethodConfig(name="apb")).moves_query()
    build_method("apb", MethodConfig(name="apb")).check_model(model)
    assert model._apb_rope_shift is not None
