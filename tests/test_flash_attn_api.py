"""The ``flash_attn`` backend's plumbing, run on CPU through a stand-in for flash-attn 2.

flash-attn exists only on CUDA and no GPU here has it, so ``tests/stand_ins/flash_attn`` takes
its place: flash-attn's documented ``flash_attn_func`` (layout, bottom-right causal mask,
window, softcap, GQA, fp16/bf16 only), computed in float64, with the CUDA kernel's ``lse = +inf``
for a row that sees no key. Through it, every call apb makes to flash-attn is checked against the
independent float64 reference of ``test_kernels`` (and the masked softmax of ``test_sliding`` for
windows), and whole models run by ``apb verify`` on the backend against transformers' eager
forward. What this does not show: flash-attn's own numerics and speed on a GPU.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from apb.kernels import attention, available_backends, merge_many, select_backend
from apb.model.loading import PRESETS
from test_kernels import SHAPES, make_qkv, ref_attention  # SHAPES: (batch, heads, kv_heads, q_len, kv_len)
from test_sliding import _masked_softmax

attn_mod = importlib.import_module("apb.kernels.attention")
STAND_INS = Path(__file__).resolve().parent / "stand_ins"
HALF = [torch.bfloat16, torch.float16]


@pytest.fixture
def fa(monkeypatch):
    """flash-attn's stand-in importable as ``flash_attn``, its call log emptied; gone afterwards, so
    no later test in this process finds a flash-attn."""
    monkeypatch.syspath_prepend(str(STAND_INS))
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    monkeypatch.delenv("APB_ATTN_BACKEND", raising=False)
    module = importlib.import_module("flash_attn")
    assert module.__file__.startswith(str(STAND_INS))
    module.calls.clear()
    yield module
    sys.modules.pop("flash_attn", None)


def _tol(dtype):
    return dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=2e-3, rtol=2e-3)


def _check(out, lse, ref_out, ref_lse, dtype):
    """``out`` in the inputs' dtype; both within half precision's rounding of the reference, and
    ``lse = -inf`` exactly where the reference row sees no key."""
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert not torch.isnan(lse).any() and not torch.isnan(out).any()
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    fin = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse.double()[fin], ref_lse[fin], **_tol(dtype))
    torch.testing.assert_close(out.double(), ref_out, **_tol(dtype))


def test_the_backend_is_offered_where_flash_attn_imports_and_chosen_only_on_cuda(fa):
    assert "flash_attn" in available_backends()
    assert select_backend(torch.zeros(1, 1, 1, 8, dtype=torch.bfloat16)) == "torch_flash"  # CPU tensors


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("b,h,kvh,q_len,kv_len", SHAPES)
def test_flash_attn_calls_match_the_reference(fa, dtype, causal, b, h, kvh, q_len, kv_len, monkeypatch):
    """Every shape apb hands flash-attn, grouped heads passed as they are (a repeat would fail)."""
    q, k, v = make_qkv(b, h, kvh, q_len, kv_len, dtype=dtype, seed=q_len * 31 + kv_len)
    monkeypatch.setattr(attn_mod, "repeat_kv", lambda *a: pytest.fail("K/V repeated for flash-attn"))
    out, lse = attention(q, k, v, causal=causal, backend="flash_attn")
    _check(out, lse, *ref_attention(q, k, v, causal), dtype)
    assert fa.calls and all(c["shape_k"][2] == kvh for c in fa.calls)


@pytest.mark.parametrize("q_len,kv_len", [(9, 9), (5, 13), (11, 4)])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_softcap_goes_to_flash_attn_itself(fa, q_len, kv_len, causal):
    q, k, v = make_qkv(1, 4, 2, q_len, kv_len, dtype=torch.bfloat16, seed=7)
    q = q * 4  # scores large enough that the cap bites
    out, lse = attention(q, k, v, causal=causal, scale=0.3, softcap=2.0, backend="flash_attn")
    _check(out, lse, *ref_attention(q, k, v, causal, scale=0.3, softcap=2.0), torch.bfloat16)
    assert {c["softcap"] for c in fa.calls} == {2.0}


@pytest.mark.parametrize("q_len,kv_len", [(9, 9), (5, 13), (11, 4)])
def test_sinks_join_the_causal_call_once(fa, q_len, kv_len):
    q, k, v = make_qkv(1, 12, 4, q_len, kv_len, dtype=torch.bfloat16, seed=3)
    sinks = torch.randn(12, generator=torch.Generator().manual_seed(1)) * 2
    out, lse = attention(q, k, v, causal=True, sinks=sinks, backend="flash_attn")
    _check(out, lse, *ref_attention(q, k, v, True, sinks=sinks), torch.bfloat16)


@pytest.mark.parametrize("v_dim", [8, 24])
def test_a_value_head_size_unlike_the_keys_is_padded_for_flash_attn(fa, v_dim):
    q, k, v = make_qkv(1, 4, 2, 7, 12, dtype=torch.bfloat16, seed=2, v_dim=v_dim)
    out, lse = attention(q, k, v, causal=True, backend="flash_attn")
    _check(out, lse, *ref_attention(q, k, v, True), torch.bfloat16)
    assert all(c["shape_q"][-1] == c["shape_k"][-1] == max(16, v_dim) for c in fa.calls)


@pytest.mark.parametrize("q_len,kv_len", [(12, 12), (12, 20), (20, 12)], ids=["square", "kv-longer", "kv-shorter"])
@pytest.mark.parametrize("window", [1, 3, 7, 40])
def test_a_window_goes_to_flash_attn_and_rows_that_see_nothing_stay_empty(fa, q_len, kv_len, window):
    """The aligned window is flash-attn's own ``window_size``. With fewer keys than queries the
    first rows see nothing: flash-attn gives them ``lse = +inf``, which merged with anything is
    NaN, so they must come back as ``-inf`` and zeros like every other backend's."""
    q, k, v = make_qkv(1, 4, 2, q_len, kv_len, dtype=torch.bfloat16, seed=window)
    sinks = torch.randn(4, generator=torch.Generator().manual_seed(window))
    out, lse = attention(q, k, v, causal=True, scale=0.3, window=window, sinks=sinks, backend="flash_attn")
    q_pos = torch.arange(kv_len - q_len, kv_len)
    ref = _masked_softmax(q, k, v, q_pos, torch.arange(kv_len), window, 0.3, sinks)
    blind = q_pos < 0
    assert torch.isneginf(lse[:, :, blind]).all() and not torch.isinf(lse[:, :, ~blind]).any()
    assert (out[:, :, blind] == 0).all()
    torch.testing.assert_close(out[:, :, ~blind].double(), ref[:, :, ~blind], **_tol(torch.bfloat16))
    assert {c["window_size"] for c in fa.calls} == {(window - 1, 0)}
    # merged with a partial over other keys, the result stays finite
    other = make_qkv(1, 4, 2, q_len, 5, dtype=torch.bfloat16, seed=99)
    merged, merged_lse = merge_many([(out, lse), attention(q, other[1], other[2], causal=False,
                                                           backend="flash_attn")])
    assert torch.isfinite(merged).all() and torch.isfinite(merged_lse).all()


def test_float32_on_flash_attn_is_refused_with_the_fix(fa):
    q, k, v = make_qkv(1, 4, 4, 6, 6)
    with pytest.raises(ValueError, match="float16 or bfloat16.*model.dtype"):
        attention(q, k, v, causal=True, backend="flash_attn")


# ----------------------------------------------------------------------------- whole models


MODELS = {
    # plain GQA, every method (Ulysses too: 12 query heads over 2 hosts, 4 KV heads)
    "tiny-llama": ["full", "ring", "ulysses", "star", "apb", "spava"],
    # sliding layers of 64 (flash-attn's own window) and softcapped scores
    "tiny-gemma2": ["full", "ring", "star", "apb", "apb:split", "spava"],
    # attention sinks on sliding and global layers; YaRN, and apb's query turned to its true positions
    "tiny-gpt-oss": ["full", "ring", "star", "apb", "spava"],
    # MLA: value heads of 12 beside keys of 24, padded for flash-attn
    "tiny-deepseek-v3": ["full", "ring", "apb", "spava"],
}


@pytest.mark.parametrize("model", list(MODELS))
def test_apb_verify_passes_every_method_on_flash_attn(apb_bin, repo, tmp_path, model):
    """``apb verify`` in bfloat16 at W=2 with ``APB_ATTN_BACKEND=flash_attn``: every exact method
    within bfloat16's own error of transformers' float32 eager forward (the rule that fails a mask
    off by one key, ``test_verify_half``), the approximate ones run to the end, and the stand-in's
    log shows that both worker processes called flash-attn, with the window and softcap."""
    log = tmp_path / "calls.log"
    out = tmp_path / "verify.json"
    env = dict(os.environ, APB_ATTN_BACKEND="flash_attn", APB_FLASH_STAND_IN_LOG=str(log),
               PYTHONPATH=os.pathsep.join([str(STAND_INS)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    proc = subprocess.run([apb_bin, "verify", "--config", str(repo / "configs/tiny-cpu.yaml"), "--model", model,
                           "--methods", ",".join(MODELS[model]), "--world-size", "2", "--dtype", "bfloat16",
                           "--prompt-len", "300", "--tokens", "3", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert {r["method"] for r in rows} >= set(MODELS[model])
    for r in rows:
        assert r["passed"] and r["error"] is None and r["finite_logits"], r
    assert any(r["exact_expected"] for r in rows)
    calls = log.read_text().splitlines()
    assert len({c.split()[0] for c in calls}) == 2, "flash-attn was not called by both workers"
    spec = PRESETS[model]
    if spec.get("sliding_window"):
        assert any(f"window=({spec['sliding_window'] - 1}, 0)" in c for c in calls), "no window reached flash-attn"
    assert all(f"softcap={float(spec.get('attn_logit_softcapping') or 0.0)}" in c for c in calls)
