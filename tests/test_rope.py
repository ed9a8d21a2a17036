"""Moving rotary-embedded vectors (apb.model.rope), and apb scoring with the query at its true positions."""

import threading

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from apb.config import MethodConfig
from apb.methods import build_method
from apb.methods.base import AttnContext
from apb.model.catalog import resolve_model
from apb.model.hf_bridge import prompt_length
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


def _dynamic_ntk(n, max_pos, factor, dim, base=10000.0):
    """Dynamic NTK's frequencies for an ``n``-token sequence, written out: the base grows with the length."""
    base = base * ((factor * n / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))


def _longrope(factors, dim, base=10000.0):
    """longrope's frequencies, written out: each pair's divided by its factor."""
    return 1.0 / (torch.tensor(factors, dtype=torch.float64) * base ** (torch.arange(0, dim, 2) / dim))


@pytest.mark.parametrize("scaling, frequencies", [
    ({"rope_type": "dynamic", "factor": 2.0}, lambda n: _dynamic_ntk(n, 4096, 2.0, 32)),
    ({"rope_type": "longrope", "original_max_position_embeddings": 1024, "short_factor": [1.0] * 16,
      "long_factor": [1.0 + i / 4 for i in range(16)]},
     lambda n: _longrope([1.0 + i / 4 for i in range(16)], 32)),  # long: n is past 1024
])
def test_a_length_dependent_rope_is_shifted_with_the_prompts_frequencies(scaling, frequencies):
    """Dynamic NTK and longrope pick their frequencies from the sequence length. Inside a prefill
    every rotary is pinned to the prompt's length (10,000 tokens here, past both models' original
    lengths), and the shift turns with the frequencies the whole prompt is rotated with."""
    model = tiny(scaling)
    shift = rope_shift(model)
    assert shift is not None and shift.turns == {0: True}
    n = 10_000
    want = frequencies(n)
    assert not torch.allclose(want, shift.rotary.original_inv_freq.double())  # the length does change them
    att = float(getattr(shift.rotary, "attention_scaling", 1.0))
    x = torch.randn(1, 2, 5, 32, generator=torch.Generator().manual_seed(1))
    with prompt_length(model, n):
        moved = shift.turn(naive_rope(x, 37, want, att), 2000)
    # float32 angles near 2,000 radians are good to about 1e-4 (the shift composes two of them)
    assert torch.allclose(moved, naive_rope(x, 2037, want, att), atol=5e-4)
    short = naive_rope(x, 2037, shift.rotary.original_inv_freq, att)
    assert not torch.allclose(moved, short, atol=1e-2)  # a shift outside the prompt's frequencies would be off


def _layer0_scoring_queries(query_positions: str, preset: str = "tiny-llama", model=None, n_ctx: int = 150):
    """Run apb's context phase of ``preset`` (or ``model``) with threads as 3 hosts; record, per
    host, the query vectors its compressor scored with at layer 0."""
    model = load_model(resolve_model(preset)) if model is None else model
    world, n_query = 3, 7
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
    with prompt_length(model, n):  # as prefill() pins a length-dependent rotary to the prompt's length
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


def test_apb_scores_a_longrope_model_at_true_positions_with_the_long_frequencies():
    """Phi-3's longrope rotates a prompt past 512 tokens (its original length) with its long
    factors. Every host rotates with the frequencies of the whole prompt, and so does the shift:
    hosts 1 and 2's turned copies equal host 0's real query. (Before, apb refused the model.)"""
    slices, seen = _layer0_scoring_queries("true", preset="tiny-phi3", n_ctx=700)
    assert slices[1].positions.tolist() != slices[1].indices.tolist()
    for r in ("1", "2"):
        assert torch.allclose(seen[r], seen["0"], atol=1e-5), f"host {r}"


GEMMA3_ROPE = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
               "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}


def _gemma3(layer_types):
    """A tiny Gemma 3 with the real one's two rotaries: global layers at base 1e6 scaled 8x, local
    (sliding) layers at base 1e4."""
    cfg = AutoConfig.for_model("gemma3_text", vocab_size=512, hidden_size=64, intermediate_size=64,
                               num_hidden_layers=len(layer_types), num_attention_heads=4, num_key_value_heads=2,
                               head_dim=16, sliding_window=16, query_pre_attn_scalar=16, layer_types=layer_types,
                               rope_parameters=GEMMA3_ROPE, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="apb").eval()


def test_a_rotary_per_layer_type_turns_each_layer_with_its_own_angles():
    """Gemma 3 has one rotary module with frequencies per layer type: each layer's query turns
    with its own type's (written out here from the config), not with one set for every layer."""
    types = ["sliding_attention", "full_attention", "sliding_attention"]
    shift = rope_shift(_gemma3(types))
    assert shift is not None and shift.turns == {0: True, 1: True, 2: True}
    assert shift.kinds == dict(enumerate(types))
    dim = torch.arange(0, 16, 2, dtype=torch.float64) / 16
    freqs = {"full_attention": 1.0 / (8.0 * 1e6 ** dim), "sliding_attention": 1.0 / (1e4 ** dim)}
    x = torch.randn(1, 4, 5, 16, generator=torch.Generator().manual_seed(1))
    for layer, kind in enumerate(types):
        moved = shift.shift(naive_rope(x, 37, freqs[kind]), 2000, layer)
        assert torch.allclose(moved, naive_rope(x, 2037, freqs[kind]), atol=5e-4), layer
        other = freqs["full_attention" if kind == "sliding_attention" else "sliding_attention"]
        assert not torch.allclose(moved, naive_rope(x, 2037, other), atol=1e-2), layer


def test_apb_scores_gemma3_at_true_positions_with_its_global_layers_angles():
    """apb passes blocks at Gemma 3's global layers (its sliding layers stay exact): there the
    turned copies equal host 0's real query. (Before, apb refused the model.)"""
    _, seen = _layer0_scoring_queries("true", model=_gemma3(["full_attention", "sliding_attention"]))
    assert seen.keys() == {"0", "1", "2"}
    for r in ("1", "2"):
        assert torch.allclose(seen[r], seen["0"], atol=1e-5), f"host {r}"


@pytest.mark.parametrize("model_type, extra", [
    ("gemma4_text", {"global_head_dim": 32}),  # global layers: heads twice as wide, "proportional" RoPE
    ("gemma3n_text", {"intermediate_size": [64] * 2, "activation_sparsity_pattern": [0.0] * 2,
                      "num_kv_shared_layers": 0}),
])
def test_apb_scores_gemma4_and_gemma3n_at_true_positions(model_type, extra):
    """Gemma 4 and Gemma 3n rotate one tensor at a time (``apply_rotary_pos_emb(x, cos, sin)``,
    not a (q, k) pair) with a rotary per layer type: the turned copies at their global layer 0
    equal host 0's real query. (Before, apb refused both; a shift that called the pair form
    could not turn them at all.)"""
    cfg = AutoConfig.for_model(model_type, **{"vocab_size": 512, "hidden_size": 64, "intermediate_size": 64, **extra},
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                               sliding_window=16, layer_types=["full_attention", "sliding_attention"],
                               vocab_size_per_layer_input=512, hidden_size_per_layer_input=16,
                               max_position_embeddings=4096, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="apb").eval()
    shift = rope_shift(model)
    assert shift is not None and shift.single and shift.turns == {0: True, 1: True}
    _, seen = _layer0_scoring_queries("true", model=model)
    assert seen.keys() == {"0", "1", "2"}
    for r in ("1", "2"):
        assert torch.allclose(seen[r], seen["0"], atol=1e-5), f"host {r}"


def _ministral3(original_max):
    """Ministral 3 multiplies its query by 1 + 0.1 log(1 + floor(p / L)) (Llama 4's attention
    temperature), L = ``original_max``: 1 below L, more above; 4,096 positions at most."""
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": original_max,
            "llama_4_scaling_beta": 0.1, "rope_theta": 1e6, "beta_fast": 32.0, "beta_slow": 1.0}
    cfg = AutoConfig.for_model("ministral3", vocab_size=512, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                               pad_token_id=0, bos_token_id=1, eos_token_id=2, rope_parameters=rope)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="apb").eval()


def _query_length(model, start):
    """Layer 0's query heads' lengths for the same 3 tokens at ``start``, as the model computes them."""
    from transformers import AttentionInterface

    from apb.model.hf_bridge import ATTN_IMPLEMENTATION, apb_attention_forward

    seen = []

    def spy(module, q, k, v, attention_mask=None, **kw):
        seen.append(q.norm(dim=-1))
        return apb_attention_forward(module, q, k, v, attention_mask, **kw)

    AttentionInterface.register(ATTN_IMPLEMENTATION, spy)
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([[5, 6, 7]]), position_ids=torch.arange(start, start + 3)[None],
                  use_cache=False)
    finally:
        AttentionInterface.register(ATTN_IMPLEMENTATION, apb_attention_forward)
    return seen[0]


def test_a_query_scaled_by_its_position_is_turned_and_rescaled(monkeypatch):
    """Ministral 3's step lies inside its 4,096 positions (L = 1,024): the query at 2,000 is longer
    than at 7 (the model's own forward). The shift turns the copy and multiplies it by the model's
    scale at the true position over that at the copy's, so hosts 1 and 2 score with host 0's real
    query past the step. Without that scale (the model's scaling function not found) the check
    sees the lengths change, though the two positions the turn is checked at (7 and 1,007) sit
    below the step, and refuses the model. Where the step lies past every position the model
    takes (L = 16,384) nothing is scaled, and a prompt longer than the positions the check
    covered is refused before the prefill."""
    from apb.model import rope
    from apb.parallel.comm import Comm
    from apb.runtime.prefill import prefill

    stepped = _ministral3(1024)
    assert not torch.allclose(_query_length(stepped, 2000), _query_length(stepped, 7), rtol=1e-3)
    torch.testing.assert_close(_query_length(stepped, 1007), _query_length(stepped, 7))
    shift = rope_shift(stepped)
    assert shift is not None and shift.turns == {0: True} and shift.scaled == {0: True}
    _, seen = _layer0_scoring_queries("true", model=stepped, n_ctx=2000)
    for r in ("1", "2"):
        assert torch.allclose(seen[r], seen["0"], atol=1e-5), f"host {r}"
    _, unscaled = _layer0_scoring_queries("anchor", model=stepped, n_ctx=2000)
    assert not torch.allclose(unscaled["1"].norm(), seen["0"].norm(), rtol=1e-3)  # the copy's scale is 1

    monkeypatch.setattr(rope, "_position_scale", lambda model, attn: None)
    assert rope_shift(_ministral3(1024)) is None

    flat = _ministral3(16384)
    shift = rope_shift(flat)
    assert shift is not None and shift.turns == {0: True} and shift.checked_to == 4096
    apb = build_method("apb", MethodConfig(name="apb", anchor_len=16, passing_len=4))
    with pytest.raises(ValueError, match="longer than the 4096 positions.*query_positions: anchor"):
        prefill(flat, torch.randint(3, 500, (4100,)), apb, Comm(None), n_query=4)


def test_apb_refuses_true_positions_on_a_rope_it_does_not_know_at_load():
    """A rope type the shift does not know is refused on the driver, from the config, naming the
    fix; the variants that score nothing, or at the copy's positions, still run."""
    known = AutoConfig.for_model("llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    unknown = AutoConfig.for_model("llama")
    unknown.rope_parameters = {"rope_type": "a_future_rope", "rope_theta": 10000.0}
    per_type = AutoConfig.for_model("llama")
    per_type.rope_parameters = {"full_attention": {"rope_type": "a_future_rope"}, "sliding_attention": {}}
    apb = build_method("apb", MethodConfig(name="apb"))
    apb.check(known, 4)
    for cfg in (unknown, per_type):
        with pytest.raises(ValueError, match="query_positions: anchor"):
            apb.check(cfg, 4)
        build_method("apb", MethodConfig(name="apb", query_positions="anchor")).check(cfg, 4)
        build_method("apb:uncompressed", MethodConfig(name="apb")).check(cfg, 4)  # nothing is scored


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
