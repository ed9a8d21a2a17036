"""Model features beyond plain softmax attention: exact, or refused with the layer named.

Tiny random checkpoints of today's families (built with transformers' own configs and saved with
``save_pretrained``) run through real worker processes and are compared with one eager
transformers forward and ``generate`` (``apb.tools.verify.reference_run``): Gemma 2's soft-capped
scores, gpt-oss's attention sinks (MoE included), DeepSeek-V3's multi-head latent attention, and
RoPE whose frequencies depend on the prompt length (dynamic NTK, longrope) with prompts past the
model's original length. Layers that are not softmax attention, and attention arguments the
bridge does not implement, are refused with the layer named.
"""

import inspect
import warnings
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from apb.config import MethodConfig
from apb.methods import build_method
from apb.model.catalog import resolve_model
from apb.model.features import check_supported
from apb.model.hf_bridge import apb_attention_forward, output_cache, prompt_length
from apb.model.loading import load_model
from apb.parallel.comm import CommStats
from apb.parallel.groups.local import LocalWorkerGroup
from apb.runtime.decode import Sampling
from apb.runtime.prefill import prefill
from apb.runtime.worker import PromptRequest
from apb.tools.verify import compare, random_prompt, reference_run

WORLD = 3
N_NEW = 4  # greedy tokens compared after the prompt
EXACT = ["full", "ring", "ulysses", "apb:uncompressed", "spava:uncompressed"]
# 6 heads split over 3 hosts (ulysses); 2 KV heads are replicated there
SMALL = dict(vocab_size=256, hidden_size=96, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
             num_key_value_heads=2, head_dim=16, pad_token_id=0, tie_word_embeddings=False)


# per family, what SMALL lacks; DeepSeek-V3: value heads of 12 for keys of 24 (16 + 8 rotated, the
# rotary's head_dim), a 32-wide latent
FAMILY_EXTRA = {
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=4096),
    "deepseek_v3": dict(num_key_value_heads=6, head_dim=8, kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=8,
                        qk_nope_head_dim=16, v_head_dim=12, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
                        topk_group=1, first_k_dense_replace=1, moe_intermediate_size=32),
    "gemma2": dict(sliding_window=4096), "gemma3_text": dict(sliding_window=4096), "mistral": dict(sliding_window=4096),
}


def save_tiny(path, model_type, seed=0, tweak=None, **overrides):
    """A random-weight checkpoint of ``model_type`` (``SMALL`` sizes, then ``overrides``) at ``path``."""
    cfg = AutoConfig.for_model(model_type, **{**SMALL, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    if tweak is not None:
        tweak(model)
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def group():
    with LocalWorkerGroup(WORLD, worker_kwargs={"device": "cpu", "timeout_s": 120}, timeout_s=300) as g:
        yield g


def run_methods(group, path, n, methods, decode_mode="gather", n_query=17, seed=1):
    """Every method on ``group`` against one eager forward; returns {method: (logit, kv, tokens same)}."""
    ref_model = load_model(path, attn_implementation="eager")
    ids = random_prompt(n, ref_model.config.vocab_size, seed)
    ref = reference_run(ref_model, ids, N_NEW)
    rows = {}
    for name in methods:
        req = PromptRequest(str(path), ids, name, n_query=n_query, decode_mode=decode_mode, return_cache=True,
                            sampling=Sampling(max_new_tokens=N_NEW, stop_at_eos=False))
        rows[name] = compare(ref, group.call("run_prompt", req)[0])
    return ref_model, ids, rows


def assert_exact(rows, what):
    for name, (logit_diff, kv_diff, same) in rows.items():
        assert logit_diff <= 1e-4 and kv_diff <= 1e-4 and same, f"{what} {name}: logits {logit_diff:.2e}, " \
                                                                 f"KV {kv_diff:.2e}, tokens same: {same}"


def _differs(model, ids, change) -> float:
    """How much the eager logits move when ``change(model)`` switches a feature off (it must matter)."""
    with torch.no_grad():
        before = model(ids[None]).logits[0, -1]
        change(model)
        after = model(ids[None]).logits[0, -1]
    return float((before - after).abs().max())


# ----------------------------------------------------------------------------- exact, end to end


def _large_scores(model):
    """Random projections give scores near 0, where a cap does nothing: scale them up."""
    for layer in model.model.layers:
        layer.self_attn.q_proj.weight.data *= 8
        layer.self_attn.k_proj.weight.data *= 8


def test_softcap_is_exact(group, tmp_path):
    """Gemma 2: softcap 5 over scores large enough to bend; its sliding window is longer than the prompt."""
    path = save_tiny(tmp_path / "gemma2", "gemma2", tweak=_large_scores, attn_logit_softcapping=5.0,
                     final_logit_softcapping=None, query_pre_attn_scalar=16, sliding_window=4096)
    model, ids, rows = run_methods(group, path, 301, EXACT)
    assert_exact(rows, "gemma2")
    gap = _differs(model, ids, lambda m: [setattr(l.self_attn, "attn_logit_softcapping", None)
                                            for l in m.model.layers])
    assert gap > 1e-2, "the softcap should change this model's logits"


def _big_sinks(model):
    for layer in model.model.layers:
        layer.self_attn.sinks.data.normal_(0.0, 2.0, generator=torch.Generator().manual_seed(layer.self_attn.layer_idx))


@pytest.mark.parametrize("decode_mode", ["gather", "distributed"])
def test_attention_sinks_count_once(group, tmp_path, decode_mode):
    """gpt-oss: one sink per head (MoE, sliding window longer than the prompt), in both decode modes."""
    path = save_tiny(tmp_path / "gpt-oss", "gpt_oss", tweak=_big_sinks, **FAMILY_EXTRA["gpt_oss"])
    methods = EXACT if decode_mode == "gather" else ["ring", "spava:uncompressed"]
    model, ids, rows = run_methods(group, path, 301, methods, decode_mode=decode_mode)
    assert_exact(rows, f"gpt-oss ({decode_mode} decode)")
    if decode_mode == "gather":
        gap = _differs(model, ids, lambda m: [l.self_attn.sinks.data.fill_(-1e4) for l in m.model.layers])
        assert gap > 1e-2, "the sinks should change this model's logits"


def test_multi_head_latent_attention(group, tmp_path):
    """DeepSeek-V3: value heads of 12 for keys of 24 (16 + 8 rotated); the cache holds the latent."""
    path = save_tiny(tmp_path / "deepseek-v3", "deepseek_v3", **FAMILY_EXTRA["deepseek_v3"])
    _, _, rows = run_methods(group, path, 301, EXACT)
    assert_exact(rows, "deepseek-v3")
    _, _, rows = run_methods(group, path, 301, ["ring", "apb:uncompressed"], decode_mode="distributed")
    assert_exact(rows, "deepseek-v3 (distributed decode)")


@pytest.mark.parametrize("model_type,rope", [
    ("llama", {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}),
    ("phi3", {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8,
              "long_factor": [1.0 + i for i in range(8)], "original_max_position_embeddings": 256}),
])
def test_length_dependent_rope_uses_the_whole_prompt(group, tmp_path, model_type, rope):
    """A 601-token prompt past the original 256: every host rotates with the whole prompt's frequencies."""
    extra = dict(max_position_embeddings=256) if rope["rope_type"] == "dynamic" else \
        dict(max_position_embeddings=4096, original_max_position_embeddings=256)
    path = save_tiny(tmp_path / model_type, model_type, rope_parameters=rope, **extra)
    _, _, rows = run_methods(group, path, 601, ["ring", "ulysses", "apb:uncompressed"])
    assert_exact(rows, f"{model_type} {rope['rope_type']}")


# ----------------------------------------------------------------------------- refused, with the layer named


@pytest.mark.parametrize("model_type,overrides,message", [
    ("lfm2", dict(full_attn_idxs=[1]), "layer 0 is 'conv'"),
    ("qwen3_next", dict(layer_types=["full_attention", "linear_attention"]), "layer 1 is 'linear_attention'"),
    ("falcon_h1", {}, "layer 0 is 'hybrid'"),
    ("llama4_text", dict(layer_types=["full_attention", "chunked_attention"]), "layer 1 is 'chunked_attention'"),
    ("mamba", {}, "not softmax attention"),
    ("rwkv", {}, "RWKV"),
])
def test_layers_that_are_not_softmax_attention_are_refused(model_type, overrides, message):
    cfg = AutoConfig.for_model(model_type, num_hidden_layers=2, **overrides)
    with pytest.raises(ValueError, match=message):
        check_supported(cfg)


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma2", "gemma3_text", "gpt_oss", "phi3", "smollm3",
                                        "deepseek_v3", "mistral", "olmo3"])
def test_softmax_attention_families_pass(model_type):
    check_supported(AutoConfig.for_model(model_type))


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral", "qwen3", "gemma2", "gemma3_text", "gpt_oss",
                                        "phi3", "smollm3", "deepseek_v3"])
def test_every_family_passes_only_known_arguments(tmp_path, model_type):
    """One host, plain causal attention through the bridge: each family's keywords are all known, and
    the logits equal eager's (sliding windows longer than the prompt)."""
    path = save_tiny(tmp_path / model_type, model_type, **FAMILY_EXTRA.get(model_type, {}))
    ids = random_prompt(40, 256, 0)[None]
    with torch.no_grad():
        ours = load_model(path)(ids).logits
        ref = load_model(path, attn_implementation="eager")(ids).logits
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def _call(**kwargs):
    module = SimpleNamespace(layer_idx=3)
    q = torch.randn(1, 2, 4, 8)
    return apb_attention_forward(module, q, q, q, None, **kwargs)


def test_unknown_attention_argument_is_an_error():
    out, _ = _call(scaling=0.3, position_ids=torch.arange(4)[None], use_cache=False, sliding_window=None)
    assert out.shape == (1, 4, 2, 8)
    with pytest.raises(ValueError, match=r"layer 3 \(SimpleNamespace\) passes attention argument\(s\) "
                                         r"head_mask=<tensor \(2,\)>"):
        _call(scaling=0.3, head_mask=torch.ones(2))
    with pytest.raises(ValueError, match="layer 3 .* dropout=0.1"):
        _call(dropout=0.1)


def _host0_of_three():
    """Rank 0 of 3 as the prefill sees it; enough for what is refused before any communication."""
    return SimpleNamespace(rank=0, size=3, stats=CommStats())


def test_refused_by_the_prefill_before_any_work(tmp_path):
    path = save_tiny(tmp_path / "lfm2", "lfm2", full_attn_idxs=[1])
    with pytest.raises(ValueError, match="layer 0 is 'conv'"):
        prefill(load_model(path), random_prompt(50, 256, 0), build_method("ring", MethodConfig()), _host0_of_three())


def test_prompt_length_rotary_equals_the_whole_prompts():
    """A host's rotary call at positions 100..199 equals rows 100..199 of the whole 600-token call."""
    cfg = AutoConfig.for_model("llama", **{**SMALL, "max_position_embeddings": 256},
                               rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    model = AutoModelForCausalLM.from_config(cfg).eval()
    rotary = model.model.rotary_emb
    x = torch.zeros(1, 1, 1)
    whole = rotary(x, torch.arange(600)[None])
    part = rotary(x, torch.arange(100, 200)[None])  # alone it picks the frequencies of 200 tokens
    assert not torch.allclose(part[0], whole[0][:, 100:200], atol=1e-3)
    with prompt_length(model, 600):
        part = rotary(x, torch.arange(100, 200)[None])
    torch.testing.assert_close(part[0], whole[0][:, 100:200])
    torch.testing.assert_close(part[1], whole[1][:, 100:200])
    # state from a longer earlier prompt does not leak into a shorter one (as with a fresh model)
    rotary(x, torch.arange(900)[None])
    with prompt_length(model, 600):
        part = rotary(x, torch.arange(100, 200)[None])
    torch.testing.assert_close(part[0], whole[0][:, 100:200])


def test_engine_refuses_a_model_without_softmax_attention_at_load(tmp_path):
    from transformers import AutoConfig

    from apb.config import ConfigError
    from apb.engine import Engine
    from apb.model.text import byte_tokenizer

    cfg = AutoConfig.for_model("lfm2", vocab_size=300, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, layer_types=["full_attention", "conv"])
    cfg.save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"layer 1 .*convolution"):
        Engine.from_config(None, model=str(tmp_path), world_size=2)


@pytest.mark.parametrize("preset,message", [("tiny-lfm2", r"layer 0 is 'conv' \(a short convolution"),
                                            ("tiny-qwen3-next", r"layer 0 is 'linear_attention'")])
def test_engine_refuses_the_non_attention_presets_at_once(preset, message):
    """Refused when the Engine loads the model, before any worker process starts."""
    from apb.config import ConfigError
    from apb.engine import Engine

    with pytest.raises(ConfigError, match=message):
        Engine.from_config(None, model=preset, world_size=2)


def test_ulysses_pads_heads_that_do_not_divide_by_the_world_size(group, tmp_path):
    """4 query heads over 3 hosts: padded with 2 zero heads to 6 (2 per host), exact; the bytes on
    the wire are those of the tensors sent: q and out padded (6/4 of an even split's traffic, the
    price of the uneven count), k and v one KV head per host (the one its query heads share; the
    third host's is filler) instead of one per query head."""
    path = save_tiny(tmp_path / "four-heads", "llama", num_attention_heads=4, num_key_value_heads=2)
    _, ids, rows = run_methods(group, path, 301, ["ulysses"])
    assert_exact(rows, "ulysses, 4 heads over 3 hosts")
    req = PromptRequest(str(path), ids, "ulysses", sampling=Sampling(max_new_tokens=1))
    local = -(-301 // WORLD)
    q_bytes = local * 6 * 16 * 4 * (WORLD - 1) // WORLD  # padded heads x head_dim x float32
    kv_bytes = local * 3 * 16 * 4 * (WORLD - 1) // WORLD  # one KV head per host
    per_layer = 2 * q_bytes + 2 * kv_bytes
    for reply in group.call("run_prompt", req):
        ops = [o for o in reply.stats["ops"] if o["op"] == "all_to_all" and o["phase"] == "context"]
        assert {o["layer"]: (o["calls"], o["bytes"]) for o in ops} == {0: (4, per_layer), 1: (4, per_layer)}


def test_pre_rope_captures_are_freed_once_their_layer_has_run():
    """A compressor's pre-RoPE projections live for their own layer only (the hooks store them
    just before it): no host keeps them for every layer through the prefill."""
    from apb.methods.base import AttnContext, Method
    from apb.parallel import layout

    seen = []

    class Recorder(Method):
        def attention(self, ctx, module, q, k, v, scale):
            seen.append(sorted(key[1] for key in ctx.scratch if key[0] == "pre_rope"))
            return q

    ctx = AttnContext(Recorder(MethodConfig()), layout.contiguous(4, 1), SimpleNamespace(rank=0, size=1,
                                                                                         stats=CommStats()))
    q, kv = torch.zeros(1, 2, 4, 8), torch.zeros(1, 1, 4, 8)
    for layer in range(3):
        ctx.scratch[("pre_rope", layer)] = (torch.zeros(1, 4, 16),) * 3
        ctx.step(SimpleNamespace(layer_idx=layer), q, kv, kv, 1.0)
    assert seen == [[0], [1], [2]]
    assert not [key for key in ctx.scratch if key[0] == "pre_rope"]


# ----------------------------------------------------------------------------- families the sweep found
# (docs/results/families-s32: every causal-LM family transformers knows, through `apb verify`)


def test_a_family_without_kv_head_fields_runs_exactly_with_hosts_holding_nothing(group, tmp_path):
    """GPT-2: its config names its sizes otherwise (``n_head``, no ``num_key_value_heads``), q/k/v
    come from one fused matrix and positions are learned. Under ``full`` two of the three hosts
    hold no tokens and still report each layer's (empty) cache, read from the layers themselves."""
    cfg = AutoConfig.for_model("gpt2", vocab_size=256, n_embd=96, n_layer=2, n_head=6, n_positions=1024,
                               bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "gpt2", safe_serialization=True)
    assert not hasattr(cfg, "num_key_value_heads")
    _, _, rows = run_methods(group, tmp_path / "gpt2", 301, ["full", "ring", "ulysses", "apb:uncompressed"])
    assert_exact(rows, "gpt2")


def test_a_layer_whose_attention_does_not_come_through_apb_is_an_error(tmp_path):
    """A layer that computes attention its own way would attend only its host's tokens: here layer 1
    is switched to transformers' eager attention, and the prefill refuses instead of returning it."""
    import copy

    from apb.parallel.comm import Comm

    path = save_tiny(tmp_path / "llama", "llama")
    model = load_model(path)
    own = copy.copy(model.config)
    own._attn_implementation = "eager"
    model.model.layers[1].self_attn.config = own
    with pytest.raises(ValueError, match=r"layer\(s\) \[1\] never reached apb's attention"):
        prefill(model, random_prompt(50, 256, 0), build_method("full", MethodConfig()), Comm(None))


def test_an_attention_call_without_the_context_during_a_prefill_is_an_error():
    """A model that does not pass keyword arguments down to its layers calls the attention without
    apb's context; inside a prefill that is refused, outside (decoding) it is plain attention."""
    from apb.model.hf_bridge import prefilling

    out, _ = _call(scaling=0.3)
    assert out.shape == (1, 4, 2, 8)
    with prefilling(), pytest.raises(ValueError, match=r"layer 3 .* without apb's context during a distributed "
                                                       r"prefill"):
        _call(scaling=0.3)


def test_a_model_that_masks_its_own_scores_is_refused_naming_the_layer():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match=r"layer 3 \(SimpleNamespace\) passes an attention_mask"):
        apb_attention_forward(SimpleNamespace(layer_idx=3), q, q, q, torch.zeros(1, 1, 4, 4))


@pytest.mark.parametrize("model_type,overrides,message", [
    ("bert", {}, r"layer 0 \(BertSelfAttention\) attends both ways"),
    ("roberta", {}, r"layer 0 \(RobertaSelfAttention\) attends both ways"),
    ("falcon", {}, r"'falcon' chooses its attention from its own table"),
])
def test_families_apb_cannot_stand_in_for_are_refused_from_the_config(model_type, overrides, message):
    """Checked on a skeleton built on the meta device, before any worker starts (Engine, verify)."""
    from apb.model.loading import check_attention_interface

    cfg = AutoConfig.for_model(model_type, vocab_size=256, hidden_size=64, num_hidden_layers=2,
                               num_attention_heads=4, intermediate_size=64, **overrides)
    with pytest.raises(ValueError, match=message):
        check_attention_interface(cfg)


def test_a_bert_like_decoder_is_not_refused_and_cross_attention_is_not_counted():
    """``is_decoder=True`` makes BERT causal. BART's decoder holds cross-attention (``is_causal=False``)
    that a causal LM never calls: it is refused for its positions, not for that layer."""
    from apb.model.loading import check_attention_interface

    small = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    check_attention_interface(AutoConfig.for_model("bert", is_decoder=True, **small))
    check_attention_interface(AutoConfig.for_model("llama", **small))
    with pytest.raises(ValueError, match="takes no position_ids"):
        check_attention_interface(AutoConfig.for_model("bart", vocab_size=256, d_model=64, decoder_layers=2,
                                                       decoder_attention_heads=4, decoder_ffn_dim=64))


def test_the_layer_kinds_are_read_as_transformers_caches_read_them():
    """Falcon-H1's config has no ``layer_types``: its per-layer mixers are still refused; DeepSeek-V3.2's
    indexer and a Llama 4 chunked layer are named."""
    from apb.model.features import layer_kinds

    h1 = AutoConfig.for_model("falcon_h1", num_hidden_layers=2)
    assert layer_kinds(h1) == ["hybrid", "hybrid"]
    with pytest.raises(ValueError, match="layer 0 is 'hybrid'"):
        check_supported(h1)
    with pytest.raises(ValueError, match="layer 0 is 'indexed_attention'"):
        check_supported(AutoConfig.for_model("deepseek_v32", num_hidden_layers=2))
    assert layer_kinds(AutoConfig.for_model("llama", num_hidden_layers=2)) == ["full_attention"] * 2


def test_a_layer_that_attends_twice_is_refused(tmp_path):
    """DiffLlama calls the attention twice per layer, each time with half of the values repeated: the
    cache would have held the second call's values, not the layer's own, and the answer decoded from
    it would differ from transformers'. The prefill refuses it at the second call."""
    from apb.parallel.comm import Comm

    path = save_tiny(tmp_path / "diffllama", "diffllama")
    with pytest.raises(ValueError, match=r"layer 0 \(DiffLlamaAttention\) calls the attention more than once"):
        prefill(load_model(path), random_prompt(50, 256, 0), build_method("full", MethodConfig()), Comm(None))


def test_a_model_that_caches_other_kv_than_it_attends_is_refused(tmp_path):
    """JetMoe caches its 2 K/V heads and attends them repeated for its 2 experts (4 heads): a cache
    gathered from what the attention sees would not be the model's, and decoding from it fails or
    differs. The one-token probe of each model refuses it, naming the layer and both shapes."""
    from apb.parallel.comm import Comm

    cfg = AutoConfig.for_model("jetmoe", vocab_size=256, hidden_size=64, num_hidden_layers=2, num_key_value_heads=2,
                               kv_channels=16, num_local_experts=4, num_experts_per_tok=2, intermediate_size=64)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "jetmoe", safe_serialization=True)
    with pytest.raises(ValueError, match=r"layer 0 caches K/V of \(heads, width\) \(\(2, 16\), \(2, 16\)\) but "
                                         r"passes \(\(4, 16\), \(4, 16\)\)"):
        prefill(load_model(tmp_path / "jetmoe"), random_prompt(50, 256, 0), build_method("full", MethodConfig()),
                Comm(None))


def test_a_model_that_numbers_its_own_positions_is_refused(tmp_path):
    """Blenderbot's forward takes no ``position_ids``: it ignores the positions apb passes (the logits
    do not move with them) and would read each host's slice as the prompt's start, which the family
    sweep measured as a silent 0.4 logit difference under ring. Refused from the config (driver)
    and from the loaded model (each host)."""
    from apb.model.features import check_positions
    from apb.model.loading import check_attention_interface

    cfg = AutoConfig.for_model("blenderbot", vocab_size=256, d_model=64, decoder_layers=2, encoder_layers=2,
                               decoder_attention_heads=4, decoder_ffn_dim=64, max_position_embeddings=512)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    ids = random_prompt(20, 256, 0)[None]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, model(ids, position_ids=torch.arange(100, 120)[None]).logits)
    with pytest.raises(ValueError, match=r"BlenderbotForCausalLM.forward takes no position_ids"):
        check_attention_interface(cfg)
    with pytest.raises(ValueError, match=r"takes no position_ids"):
        check_positions(model)
    check_positions(load_model(save_tiny(tmp_path / "llama", "llama")))


def test_a_model_that_drops_the_context_on_the_way_to_its_layers_is_refused(tmp_path):
    """Nemotron's decoder layer does not pass keyword arguments on to its attention: the probe
    (inside a prefill) finds the attention called without apb's context, and says so."""
    from apb.parallel.comm import Comm

    path = save_tiny(tmp_path / "nemotron", "nemotron", partial_rotary_factor=0.5)
    with pytest.raises(ValueError, match=r"layer 0 \(NemotronAttention\) was called without apb's context"):
        prefill(load_model(path), random_prompt(50, 256, 0), build_method("full", MethodConfig()), Comm(None))


def _gemma_text(path, model_type, **extra):
    cfg = AutoConfig.for_model(model_type, **{"vocab_size": 256, "hidden_size": 64, "intermediate_size": 64, **extra},
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=48,
                               vocab_size_per_layer_input=256, hidden_size_per_layer_input=16,
                               max_position_embeddings=4096, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path, safe_serialization=True)
    return path


def test_layers_whose_kv_shapes_differ_run_exactly(group, tmp_path):
    """Gemma 4: its global layers have heads twice as wide (32) as its sliding ones (16). The cache
    holds each layer in its own shape, and every exact method equals eager over a prompt longer
    than the window, in both decode modes."""
    path = _gemma_text(tmp_path / "gemma4", "gemma4_text", num_hidden_layers=2, global_head_dim=32,
                       layer_types=["sliding_attention", "full_attention"])
    model, _, rows = run_methods(group, path, 301, EXACT)
    assert [tuple(layer.keys.shape[1::2]) for layer in output_cache(model(torch.zeros(1, 4, dtype=torch.long)))
            .layers] == [(2, 16), (2, 32)]
    assert_exact(rows, "gemma4")
    _, _, rows = run_methods(group, path, 301, ["ring", "apb:uncompressed"], decode_mode="distributed")
    assert_exact(rows, "gemma4 (distributed decode)")


def test_layers_that_reuse_earlier_layers_kv_run_exactly(group, tmp_path):
    """Gemma 3n: its last two layers attend the K/V of the last earlier layer of their own kind
    and keep no cache of their own (transformers' cache holds a dummy there, which the gathered
    cache skips); every exact method equals eager, in both decode modes."""
    kinds = ["sliding_attention", "full_attention"]
    path = _gemma_text(tmp_path / "gemma3n", "gemma3n_text", num_hidden_layers=4, num_kv_shared_layers=2,
                       layer_types=kinds * 2, intermediate_size=[64] * 4, activation_sparsity_pattern=[0.0] * 4)
    model, _, rows = run_methods(group, path, 301, EXACT)
    assert model.config.kv_sharing_modes == ["store", "store", "reuse", "reuse"]
    assert_exact(rows, "gemma3n")
    _, _, rows = run_methods(group, path, 301, ["ring", "apb:uncompressed"], decode_mode="distributed")
    assert_exact(rows, "gemma3n (distributed decode)")


@pytest.mark.parametrize("family", ["gemma3_text", "gemma4_text", "gemma3n_text"])
def test_a_cache_trimmed_for_decoding_is_what_transformers_own_prefill_keeps(tmp_path, family):
    """After a gather, the decode host receives of each layer only what transformers' own cache
    keeps (``decode_keeps``): a sliding layer's last ``window - 1`` positions, nothing for a layer
    that reuses another's K/V. The cache built from those tails holds what transformers' own
    prefill leaves in its cache, layer by layer (K/V and length), and the next token's logits over
    both are the same."""
    from transformers import DynamicCache

    from apb.model.hf_bridge import with_cache
    from apb.runtime.cache import KVCache, decode_keeps, to_hf_cache
    from apb.tools.verify import reference_layers

    kinds = ["sliding_attention", "full_attention"]
    extra = {"gemma3_text": dict(num_hidden_layers=2, layer_types=kinds, query_pre_attn_scalar=16),
             "gemma4_text": dict(num_hidden_layers=2, global_head_dim=32, layer_types=kinds),
             "gemma3n_text": dict(num_hidden_layers=4, num_kv_shared_layers=2, layer_types=kinds * 2,
                                  intermediate_size=[64] * 4, activation_sparsity_pattern=[0.0] * 4)}[family]
    model = load_model(_gemma_text(tmp_path / family, family, **extra), attn_implementation="eager")
    n, window = 130, 48
    ids = random_prompt(n, 256, 1)[None]
    with torch.no_grad():
        own = output_cache(model(ids, use_cache=True, **with_cache(model, DynamicCache(config=model.config))))
        whole = output_cache(model(ids, use_cache=True, **with_cache(model, DynamicCache())))
    keep = decode_keeps(model.config, n)
    # sliding layers keep window - 1, global ones all; Gemma 3n's last two keep nothing of their own
    assert keep == [n - window + 1, 0] + ([n, n] if family == "gemma3n_text" else [])
    trimmed = KVCache.from_layers(torch.arange(n), reference_layers(model.config, whole)).tails(keep)
    assert [trimmed.layer(i)[0].shape[1] for i in range(len(keep))] == [n - k for k in keep]
    ours = to_hf_cache(trimmed, model.config)
    for i, (a, b) in enumerate(zip(ours.layers, own.layers, strict=True)):
        assert type(a) is type(b), i
        if getattr(b, "keys", None) is None:  # a layer that keeps no K/V of its own
            continue
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values), i
        assert a.get_seq_length() == b.get_seq_length() == n, i
    step = dict(input_ids=torch.tensor([[5]]), position_ids=torch.tensor([[n]]), use_cache=True)
    with torch.no_grad():
        got = model(**step, **with_cache(model, ours)).logits
        want = model(**step, **with_cache(model, own)).logits
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("implementation", ["eager", None])  # None: apb's own, as the workers decode
def test_a_cache_with_room_decodes_in_place_as_transformers_own_cache_does(tmp_path, implementation):
    """Gather-mode decoding builds transformers' cache with room for the answer: a global layer's
    K/V are copied once into a buffer with ``room`` more tokens and each decoded token is written
    into place (transformers' own layer concatenates, copying the layer's cache at every step). Step
    by step, the logits and every layer's K/V equal those of transformers' own cache after its own
    prefill; the global layer's keys stay views of one buffer while the room lasts, and past it the
    layer grows as transformers' does. A cache gathered with room (``KVCache.rooms``) is taken as
    it is: transformers' layer holds the gathered buffer, not a copy, and decodes the same."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    from apb.model.hf_bridge import with_cache
    from apb.runtime.cache import KVCache, decode_keeps, to_hf_cache
    from apb.tools.verify import reference_layers

    model = load_model(_gemma_text(tmp_path / "g3", "gemma3_text", num_hidden_layers=2, query_pre_attn_scalar=16,
                                   layer_types=["sliding_attention", "full_attention"]),
                       attn_implementation=implementation)
    n, room = 130, 3
    ids = random_prompt(n, 256, 1)[None]
    with torch.no_grad():
        own = output_cache(model(ids, use_cache=True, **with_cache(model, DynamicCache(config=model.config))))
        whole = output_cache(model(ids, use_cache=True, **with_cache(model, DynamicCache())))
    cache = KVCache.from_layers(torch.arange(n), reference_layers(model.config, whole))
    keep = decode_keeps(model.config, n)
    ours = to_hf_cache(cache.tails(keep), model.config, room=room)
    # as a gather with room leaves it: the global layer the first tokens of buffers with room
    bufs = tuple(t.new_zeros(1, t.shape[0], n + room, t.shape[-1]) for t in cache.layer(1))
    for buf, t in zip(bufs, cache.layer(1)):
        buf[0, :, :n] = t
    gathered = KVCache(cache.positions, (cache.layer(0), (bufs[0][0, :, :n], bufs[1][0, :, :n])), (None, bufs))
    adopted = to_hf_cache(gathered.tails(keep), model.config, room=room)
    assert adopted.layers[1].keys.data_ptr() == bufs[0].data_ptr()
    assert type(own.layers[1]) is DynamicLayer and type(ours.layers[1]) is not DynamicLayer
    assert type(ours.layers[0]) is type(own.layers[0])  # the sliding layer keeps transformers' own rules
    buffer = ours.layers[1].keys.data_ptr()
    for i, tok in enumerate([5, 17, 9, 200, 3]):  # two steps past the room
        step = dict(input_ids=torch.tensor([[tok]]), position_ids=torch.tensor([[n + i]]), use_cache=True)
        with torch.no_grad():
            got = model(**step, **with_cache(model, ours)).logits
            taken = model(**step, **with_cache(model, adopted)).logits
            want = model(**step, **with_cache(model, own)).logits
        assert torch.equal(got, want) and torch.equal(taken, want), i
        for a, b in zip(ours.layers, own.layers, strict=True):
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values), i
            assert a.get_seq_length() == b.get_seq_length(), i
        assert (ours.layers[1].keys.data_ptr() == buffer) == (i < room), i


def test_a_cache_of_layers_in_different_shapes_gives_each_layer_back_as_it_was():
    """Two layers of (2 heads x 16) and (4 heads x 32, values of 24): each layer comes back in its
    own shape and values (the same tensors, not copies), after a sort by position too; stacked for
    comparing whole caches, zero-padded to the widest; one shape for all layers has no ``shapes``."""
    from apb.runtime.cache import KVCache

    torch.manual_seed(0)
    kv = {0: (torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)),
          1: (torch.randn(1, 4, 5, 32), torch.randn(1, 4, 5, 24))}
    cache = KVCache.from_layers(torch.tensor([3, 0, 4, 1, 2]), kv)
    assert cache.shapes == ((2, 16, 16), (4, 32, 24)) and cache.keys.shape == (2, 4, 5, 32)
    assert cache.keys[0, 2:].abs().sum() == 0 and torch.equal(cache.keys[0, :2, :, :16], kv[0][0][0])
    assert cache.keys is cache.keys  # stacked once, however often verify reads it
    for i in (0, 1):
        assert torch.equal(cache.layer(i)[0], kv[i][0][0]) and torch.equal(cache.layer(i)[1], kv[i][1][0])
        assert cache.layer(i)[0].data_ptr() == kv[i][0].data_ptr()
    order = torch.tensor([1, 3, 4, 0, 2])
    ordered = cache.sorted()
    assert ordered.positions.tolist() == [0, 1, 2, 3, 4]
    assert torch.equal(ordered.layer(1)[1], kv[1][1][0][:, order])
    same = KVCache.from_layers(torch.arange(5), {0: kv[0], 1: kv[0]})
    assert same.shapes is None and torch.equal(same.layer(1)[0], kv[0][0][0])


def test_a_layer_that_reuses_kv_attends_the_last_earlier_layer_of_its_kind():
    from apb.model.features import kv_sources

    cfg = SimpleNamespace(kv_sharing_modes=["store", "store", "store", "reuse", "reuse"],
                          layer_types=["sliding_attention", "full_attention", "sliding_attention",
                                       "sliding_attention", "full_attention"])
    assert kv_sources(cfg) == {3: 2, 4: 1}
    assert kv_sources(SimpleNamespace(layer_types=["full_attention"])) == {}


def test_estimates_take_the_largest_layer_where_layers_differ():
    """Gemma 4's config refuses a single ``head_dim``: the estimates read each layer's sizes and
    take the largest (the global layers' 32), which is also the width the gathered cache pads to."""
    from apb.model.features import attention_sizes
    from apb.runtime.memory import kv_bytes_per_token

    cfg = AutoConfig.for_model("gemma4_text", vocab_size=256, hidden_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
                               layer_types=["sliding_attention", "full_attention"])
    with pytest.raises(RuntimeError, match="per-layer attribute"):
        cfg.head_dim
    assert attention_sizes(cfg) == (4, 2, 32)
    assert kv_bytes_per_token(cfg, 2) == 2 * 2 * 32 * 2
    assert attention_sizes(AutoConfig.for_model("gpt2", n_embd=96, n_head=6)) == (6, 6, 16)


def test_a_model_whose_forward_fails_with_apbs_attention_is_refused_naming_why(tmp_path):
    """The one-token probe turns a failure inside the model's own code (MPT built its mask from
    transformers' attention implementations) into a refusal naming the model and the error."""
    from apb.parallel.comm import Comm

    model = load_model(save_tiny(tmp_path / "llama", "llama"))

    def broken(*_args, **_kwargs):
        raise AttributeError("'NoneType' object has no attribute 'to'")

    model.model.norm.forward = broken
    with pytest.raises(ValueError, match=r"'llama' fails a one-token forward with apb's attention \(AttributeError"):
        prefill(model, random_prompt(50, 256, 0), build_method("full", MethodConfig()), Comm(None))


def test_the_cache_goes_in_and_comes_out_under_the_forwards_own_name():
    """transformers 5.2x names the cache ``cache`` (``past_key_values`` warns, and goes in 5.40);
    earlier releases only know ``past_key_values``: each forward gets the name its signature has."""
    from transformers import DynamicCache

    from apb.model.hf_bridge import with_cache

    class Old(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, use_cache=None):
            return {"past_key_values": past_key_values}

    class New(torch.nn.Module):
        def forward(self, input_ids, cache=None, use_cache=None):
            return {"cache": cache}

    cache = DynamicCache()
    for model in (Old(), New()):
        assert output_cache(model(None, **with_cache(model, cache))) is cache
    model = load_model(resolve_model("tiny-llama"), "float32")
    assert set(with_cache(model, cache)) == ({"cache"} if "cache" in inspect.signature(model.forward).parameters
                                             else {"past_key_values"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecation on the way in or out
        out = model(torch.zeros(1, 3, dtype=torch.long), use_cache=True, **with_cache(model, DynamicCache()))
        assert output_cache(out).layers[0].keys.shape[2] == 3
