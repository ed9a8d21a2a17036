"""full / ring / ulysses on real worker processes against transformers' own eager attention.

Every row compares last-token logits, the gathered KV cache and 16 greedy tokens with a
single-process Hugging Face forward and ``generate`` (see apb.tools.verify), for each tiny
architecture, W = 1..4, and prompt lengths divisible by neither W nor 2W.
"""

import pytest
import torch

from apb.config import load_config
from apb.runtime.decode import Sampling
from apb.model.catalog import resolve_model
from apb.parallel.groups.local import LocalWorkerGroup
from apb.tools.verify import expand_methods, random_prompt, verify
from apb.runtime.worker import PromptRequest

MODELS = ["tiny-llama", "tiny-qwen2", "tiny-mistral"]  # the architectures (bench-attn is for speed)
EXACT = ["full", "ring", "ulysses"]
APPROX = expand_methods(["star", "apb", "spava"])  # with apb:uncompressed, spava:uncompressed


@pytest.fixture(scope="module")
def cfg(repo):
    return load_config(repo / "configs" / "tiny-cpu.yaml")


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_methods_match_hugging_face(cfg, world):
    with LocalWorkerGroup(world, worker_kwargs={"device": "cpu", "timeout_s": 120}, timeout_s=300) as group:
        rows = verify(cfg, group, EXACT, [1000, 1237], models=MODELS)
        approx = verify(cfg, group, APPROX, [1001], models=MODELS, query_len=37)
    assert len(rows) == len(MODELS) * 2 * len(EXACT)
    assert {r.method for r in approx} == {"star", "apb", "apb:uncompressed", "spava", "spava:uncompressed"}
    for r in approx:
        assert r.error is None, f"{r.model} {r.method} W={world}: {r.error}"
        if world == 1:  # one host: nothing is approximated
            assert r.max_abs_logit_diff <= 1e-4 and r.kv_max_abs_diff <= 1e-4 and r.tokens_match, r
    rows += [r for r in approx if r.exact_expected]
    for r in rows:
        where = f"{r.model} {r.method} W={world} n={r.prompt_len}"
        assert r.error is None, f"{where}: {r.error}"
        assert r.max_abs_logit_diff <= 1e-4, f"{where}: logits differ by {r.max_abs_logit_diff}"
        assert r.kv_max_abs_diff <= 1e-4, f"{where}: KV cache differs by {r.kv_max_abs_diff}"
        assert r.tokens_match, f"{where}: greedy tokens differ"
        assert r.passed


@pytest.fixture(scope="module")
def group2():
    with LocalWorkerGroup(2, worker_kwargs={"device": "cpu", "timeout_s": 120}, timeout_s=300) as g:
        yield g


def _run(group, method, ids, sampling, model="tiny-qwen2"):
    path = str(resolve_model(model))
    req = PromptRequest(path, ids, method, sampling=sampling)
    return group.call("run_prompt", req)


def test_seeded_sampling_is_reproducible_and_method_independent(group2):
    ids = random_prompt(333, 512, seed=1)
    s = Sampling(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7, stop_at_eos=False)
    ring = _run(group2, "ring", ids, s)[0].tokens
    full = _run(group2, "full", ids, s)[0].tokens
    again = _run(group2, "ring", ids, s)[0].tokens
    other = _run(group2, "ring", ids, Sampling(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=8,
                                                 stop_at_eos=False))[0].tokens
    assert ring == full == again and len(ring) == 12
    assert ring != other, "a different seed should change a 12-token sample from a random model"


def test_stop_at_eos(group2):
    ids = random_prompt(200, 512, seed=2)
    greedy = _run(group2, "ring", ids, Sampling(max_new_tokens=8, stop_at_eos=False))[0].tokens
    eos = greedy[3]
    path = str(resolve_model("tiny-qwen2"))
    req = PromptRequest(path, ids, "ring", sampling=Sampling(max_new_tokens=8), eos_ids=(eos,))
    stopped = group2.call("run_prompt", req)[0].tokens
    assert stopped == greedy[: greedy.index(eos) + 1]


def test_ring_communication_pattern(group2):
    ids = random_prompt(500, 512, seed=3)
    replies = _run(group2, "ring", ids, Sampling(max_new_tokens=1), model="tiny-llama")
    layers = 2
    for r in replies:
        ops = [o for o in r.stats["ops"] if o["phase"] == "context" and o["op"] == "ring_send_recv"]
        assert sorted(o["layer"] for o in ops) == list(range(layers))
        for o in ops:
            # W-1 = 1 step per layer carrying K and V of this host's 2 chunks: 2 x kv_heads x 250 x head_dim
            assert o["calls"] == 1
            assert o["bytes"] == 2 * 4 * 250 * 16 * 4


def test_saved_checkpoint_loads_from_local_path(tmp_path, cfg, group2):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(5)
    model = MistralForCausalLM(MistralConfig(vocab_size=300, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             sliding_window=None, max_position_embeddings=2048))
    model.save_pretrained(tmp_path / "ckpt", safe_serialization=True)
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()
    rows = verify(cfg, group2, EXACT, [301], models=[str(tmp_path / "ckpt")])
    assert [r.passed for r in rows] == [True] * 3, rows


def test_unknown_model_is_a_readable_error():
    with pytest.raises(FileNotFoundError, match="neither a preset"):
        resolve_model("/nonexistent/checkpoint")
