"""apb.kernels: attention with LSE on every CPU backend, and the LSE merge; softcap, sinks and a
value head size different from the key's (MLA), alone and split into merged partials.

Everything is compared with an independent float64 reference written here (dense scores, an
explicit boolean mask, bottom-right causal alignment). ``flash_attn`` exists only on CUDA: its
calls are checked through a CPU stand-in in ``test_flash_attn_api``.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from apb.kernels import (attention, available_backends, force_backend, merge, merge_, merge_many, register_backend,
                         select_backend)

attn_mod = importlib.import_module("apb.kernels.attention")

BACKENDS = ["naive", "torch_flash"]
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


# ----------------------------------------------------------------------------- reference


def ref_attention(q, k, v, causal, scale=None, softcap=None, sinks=None):
    """Dense float64 softmax attention. Query i sees key j iff (not causal) or j <= i + kv - q.

    Returns out (b, h, s, v_dim) float64 and lse (b, h, s) float64; rows that see no key give
    out 0 and lse -inf. ``softcap`` caps the scores (c * tanh(s / c)); ``sinks`` (h,) adds
    exp(sink) to the denominator of every row that sees a key.
    """
    b, h, q_len, d = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    group = h // kv_heads
    out = torch.zeros(b, h, q_len, v.shape[-1], dtype=torch.float64)
    lse = torch.full((b, h, q_len), -math.inf, dtype=torch.float64)
    mask = torch.ones(q_len, kv_len, dtype=torch.bool)
    if causal:
        for i in range(q_len):
            for j in range(kv_len):
                mask[i, j] = j <= i + (kv_len - q_len)
    head_of = torch.tensor([hi // group for hi in range(h)])  # query head hi uses kv head hi // group
    kk, vv = k.double()[:, head_of], v.double()[:, head_of]
    scores = torch.einsum("bhid,bhjd->bhij", q.double(), kk) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = torch.where(mask, scores, torch.tensor(-math.inf, dtype=torch.float64))
    seen = mask.any(dim=-1)  # (q_len,) rows with at least one visible key
    if bool(seen.any()):
        s = scores[:, :, seen]
        m = s.max(dim=-1, keepdim=True).values
        if sinks is not None:
            sink = sinks.double().view(1, h, 1, 1).expand(b, h, s.shape[2], 1)
            m = torch.maximum(m, sink)
        e = torch.exp(s - m)
        total = e.sum(dim=-1, keepdim=True)
        if sinks is not None:
            total = total + torch.exp(sink - m)
        lse[:, :, seen] = (m + torch.log(total)).squeeze(-1)
        out[:, :, seen] = (e / total) @ vv
    return out, lse


def make_qkv(b, h, kv_heads, q_len, kv_len, d=16, dtype=torch.float32, seed=0, v_dim=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, q_len, d, generator=g).to(dtype)
    k = torch.randn(b, kv_heads, kv_len, d, generator=g).to(dtype)
    v = torch.randn(b, kv_heads, kv_len, v_dim or d, generator=g).to(dtype)
    return q, k, v


def assert_matches(out, lse, ref_out, ref_lse, dtype):
    tol = TOL[dtype]
    assert out.shape == ref_out.shape
    assert lse.shape == ref_lse.shape
    assert lse.dtype == torch.float32
    assert not torch.isnan(out).any(), "NaN in output"
    assert not torch.isnan(lse).any(), "NaN in lse"
    # -inf exactly where the reference has no visible key
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    fin = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse.double()[fin], ref_lse[fin], **tol)
    torch.testing.assert_close(out.double(), ref_out, **tol)


@pytest.fixture(autouse=True)
def _no_env_backend(monkeypatch):
    monkeypatch.delenv("APB_ATTN_BACKEND", raising=False)


# ----------------------------------------------------------------------------- attention

# (batch, heads, kv_heads, q_len, kv_len)
SHAPES = [
    pytest.param(1, 4, 4, 9, 9, id="mha-square"),
    pytest.param(1, 4, 4, 5, 13, id="mha-kv-longer"),
    pytest.param(1, 4, 4, 11, 4, id="mha-kv-shorter"),
    pytest.param(1, 12, 4, 7, 7, id="gqa3-square"),
    pytest.param(1, 12, 4, 6, 15, id="gqa3-kv-longer"),
    pytest.param(1, 12, 2, 8, 3, id="gqa6-kv-shorter"),
    pytest.param(2, 12, 2, 10, 10, id="batch2-gqa6-square"),
    pytest.param(2, 4, 4, 3, 17, id="batch2-kv-longer"),
    pytest.param(1, 4, 2, 1, 12, id="single-query"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("b,h,kvh,q_len,kv_len", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_attention_matches_reference(backend, causal, b, h, kvh, q_len, kv_len, dtype):
    q, k, v = make_qkv(b, h, kvh, q_len, kv_len, dtype=dtype, seed=q_len * 31 + kv_len)
    out, lse = attention(q, k, v, causal=causal, backend=backend)
    assert out.dtype == dtype
    ref_out, ref_lse = ref_attention(q, k, v, causal)
    assert_matches(out, lse, ref_out, ref_lse, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_grouped_query_attention_never_repeats_kv(backend, causal, monkeypatch):
    """Where torch's kernel takes grouped heads itself (this torch's CPU kernel does), no K/V copy
    is made: a repeat would fail the call. Where it cannot, the repeat keeps the result exact."""
    q, k, v = make_qkv(1, 9, 3, 6, 14, seed=5)
    ref_out, ref_lse = ref_attention(q, k, v, causal)
    assert attn_mod._native_gqa("cpu", "cpu")

    def no_repeat(x, n_rep):
        raise AssertionError(f"K/V repeated {n_rep}x")
    with monkeypatch.context() as m:
        m.setattr(attn_mod, "repeat_kv", no_repeat)
        out, lse = attention(q, k, v, causal=causal, backend=backend)
    assert_matches(out, lse, ref_out, ref_lse, torch.float32)
    monkeypatch.setitem(attn_mod._GQA_NATIVE, ("cpu", "cpu"), False)  # a torch whose kernel cannot
    out, lse = attention(q, k, v, causal=causal, backend=backend)
    assert_matches(out, lse, ref_out, ref_lse, torch.float32)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("h,kvh,d,dtype,takes_grouped", [
    (8, 2, 128, torch.float32, True), (8, 8, 128, torch.float32, False), (8, 2, 128, torch.bfloat16, True),
    (8, 8, 128, torch.bfloat16, False), (16, 4, 64, torch.bfloat16, True), (16, 4, 64, torch.float32, False),
    (8, 2, 64, torch.bfloat16, False)],
    ids=["group4-f32", "mha-f32", "group4-bf16", "mha-bf16", "d64-16heads-bf16", "d64-f32", "d64-8heads-bf16"])
def test_one_row_of_a_decode_step_matches_the_reference(causal, h, kvh, d, dtype, takes_grouped, monkeypatch):
    """A decode step's one query: a group of 4 at a head size of 128 (or of 64 in bfloat16 with 12+
    heads) takes the grouped softmax (bfloat16 in blocks of keys, here three), other shapes torch's
    kernel; the same answer."""
    monkeypatch.setattr(attn_mod, "_ROW_BLOCK", 128)
    grouped, real = [], attn_mod._grouped_row
    monkeypatch.setattr(attn_mod, "_grouped_row", lambda *a: grouped.append(1) or real(*a))
    q, k, v = make_qkv(1, h, kvh, 1, 300, d=d, dtype=dtype, seed=h + kvh)
    out, lse = attention(q, k, v, causal=causal, backend="torch_flash")
    assert bool(grouped) == takes_grouped  # the path this case is meant to check is the one that ran
    assert_matches(out, lse, *ref_attention(q, k, v, causal), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("q_len,kv_len", [(300, 520), (520, 300), (257, 257)])
def test_attention_across_kernel_blocks(backend, causal, q_len, kv_len):
    """Lengths past the CPU kernel's tile sizes, so several query/key blocks are involved."""
    q, k, v = make_qkv(1, 4, 2, q_len, kv_len, d=32, seed=q_len + kv_len)
    out, lse = attention(q, k, v, causal=causal, backend=backend)
    ref_out, ref_lse = ref_attention(q, k, v, causal)
    assert_matches(out, lse, ref_out, ref_lse, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("q_len,kv_len", [(6, 6), (4, 11), (9, 5)])
def test_attention_float16(backend, q_len, kv_len):
    q, k, v = make_qkv(1, 12, 4, q_len, kv_len, dtype=torch.float16)
    out, lse = attention(q, k, v, causal=True, backend=backend)
    assert out.dtype == torch.float16
    ref_out, ref_lse = ref_attention(q, k, v, True)
    assert_matches(out, lse, ref_out, ref_lse, torch.bfloat16)  # the loose (2e-2) tolerance


@pytest.mark.parametrize("backend", BACKENDS)
def test_bottom_right_alignment_kv_longer(backend):
    """With kv_len > q_len, the last query sees every key and query 0 sees kv_len - q_len + 1 keys."""
    q_len, kv_len, d = 4, 10, 8
    q = torch.zeros(1, 1, q_len, d)  # uniform attention over visible keys
    k = torch.randn(1, 1, kv_len, d)
    v = torch.arange(kv_len, dtype=torch.float32).view(1, 1, kv_len, 1).expand(1, 1, kv_len, d).contiguous()
    out, lse = attention(q, k, v, causal=True, backend=backend)
    for i in range(q_len):
        n_vis = kv_len - q_len + i + 1
        # mean of 0..n_vis-1, and log(n_vis) for a zero score
        torch.testing.assert_close(out[0, 0, i], torch.full((d,), (n_vis - 1) / 2), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse[0, 0, i], torch.tensor(math.log(n_vis)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kv_shorter_causal_blind_rows(backend):
    q, k, v = make_qkv(1, 4, 2, 9, 3)
    out, lse = attention(q, k, v, causal=True, backend=backend)
    blind = 9 - 3
    assert torch.isneginf(lse[:, :, :blind]).all()
    assert torch.equal(out[:, :, :blind], torch.zeros_like(out[:, :, :blind]))
    assert torch.isfinite(lse[:, :, blind:]).all()
    # row `blind` sees exactly key 0: its output is v[key 0] for its kv head
    torch.testing.assert_close(out[0, 0, blind], v[0, 0, 0])
    torch.testing.assert_close(out[0, 3, blind], v[0, 1, 0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_empty_keys(backend, causal, dtype):
    q, k, v = make_qkv(2, 12, 4, 5, 0, dtype=dtype)
    out, lse = attention(q, k, v, causal=causal, backend=backend)
    assert out.shape == q.shape and out.dtype == dtype
    assert torch.equal(out, torch.zeros_like(q))
    assert lse.shape == (2, 12, 5) and lse.dtype == torch.float32
    assert torch.isneginf(lse).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("scale", [0.05, 1.0, 0.7])
def test_custom_scale(backend, causal, scale):
    q, k, v = make_qkv(1, 4, 2, 6, 11, d=32)
    out, lse = attention(q, k, v, causal=causal, scale=scale, backend=backend)
    ref_out, ref_lse = ref_attention(q, k, v, causal, scale=scale)
    assert_matches(out, lse, ref_out, ref_lse, torch.float32)
    # and the scale really matters: the default scale gives a different answer
    out_default, _ = attention(q, k, v, causal=causal, backend=backend)
    assert not torch.allclose(out, out_default, atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_inputs(backend):
    """(b, s, h, d) tensors transposed to (b, h, s, d), as model code produces them."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 7, 12, 16, generator=g).transpose(1, 2)
    k = torch.randn(2, 13, 4, 16, generator=g).transpose(1, 2)
    v = torch.randn(2, 13, 4, 16, generator=g).transpose(1, 2)
    assert not q.is_contiguous()
    out, lse = attention(q, k, v, causal=True, backend=backend)
    ref_out, ref_lse = ref_attention(q, k, v, True)
    assert_matches(out, lse, ref_out, ref_lse, torch.float32)


def test_backends_agree():
    q, k, v = make_qkv(2, 12, 2, 6, 14, d=64)
    a_out, a_lse = attention(q, k, v, causal=True, backend="naive")
    b_out, b_lse = attention(q, k, v, causal=True, backend="torch_flash")
    torch.testing.assert_close(a_out, b_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a_lse, b_lse, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- backend choice


def _spy(monkeypatch, name):
    calls = []
    real = attn_mod._BACKENDS[name]

    def spy(*args):
        calls.append(name)
        return real(*args)

    monkeypatch.setitem(attn_mod._BACKENDS, name, spy)
    return calls


def test_available_backends_follow_the_registry(monkeypatch):
    monkeypatch.setattr(attn_mod, "_BACKENDS", dict(attn_mod._BACKENDS))
    monkeypatch.setattr(attn_mod, "_AVAILABLE", dict(attn_mod._AVAILABLE))
    register_backend("runs_here")(attn_mod._naive)
    register_backend("cannot_run", available=lambda: False)(attn_mod._naive)
    names = available_backends()
    assert names[:2] == BACKENDS and names[-1] == "runs_here" and "cannot_run" not in names


def test_default_backend_on_cpu_is_torch_flash():
    q, _, _ = make_qkv(1, 2, 2, 3, 3)
    assert select_backend(q) == "torch_flash"


@pytest.mark.parametrize("name", BACKENDS)
def test_force_backend_selects(monkeypatch, name):
    q, k, v = make_qkv(1, 4, 2, 5, 5)
    calls = {n: _spy(monkeypatch, n) for n in BACKENDS}
    with force_backend(name):
        assert select_backend(q) == name
        attention(q, k, v, causal=True)
    assert calls[name] == [name]
    other = [n for n in BACKENDS if n != name][0]
    assert calls[other] == []
    # restored afterwards
    assert select_backend(q) == "torch_flash"


def test_force_backend_none_restores_automatic(monkeypatch):
    q, _, _ = make_qkv(1, 2, 2, 3, 3)
    with force_backend("naive"):
        with force_backend(None):
            assert select_backend(q) == "torch_flash"
        assert select_backend(q) == "naive"
    assert select_backend(q) == "torch_flash"


def test_force_backend_restored_after_exception():
    q, _, _ = make_qkv(1, 2, 2, 3, 3)
    with pytest.raises(RuntimeError):
        with force_backend("naive"):
            raise RuntimeError("boom")
    assert select_backend(q) == "torch_flash"


@pytest.mark.parametrize("name", BACKENDS)
def test_env_var_selects(monkeypatch, name):
    q, k, v = make_qkv(1, 4, 2, 5, 5)
    calls = {n: _spy(monkeypatch, n) for n in BACKENDS}
    monkeypatch.setenv("APB_ATTN_BACKEND", name)
    assert select_backend(q) == name
    attention(q, k, v, causal=False)
    assert calls[name] == [name]
    other = [n for n in BACKENDS if n != name][0]
    assert calls[other] == []


def test_force_backend_beats_env(monkeypatch):
    q, _, _ = make_qkv(1, 2, 2, 3, 3)
    monkeypatch.setenv("APB_ATTN_BACKEND", "torch_flash")
    with force_backend("naive"):
        assert select_backend(q) == "naive"
    assert select_backend(q) == "torch_flash"


def test_explicit_backend_argument_beats_force(monkeypatch):
    q, k, v = make_qkv(1, 4, 2, 5, 5)
    calls = {n: _spy(monkeypatch, n) for n in BACKENDS}
    with force_backend("naive"):
        attention(q, k, v, causal=True, backend="torch_flash")
    assert calls["torch_flash"] == ["torch_flash"]
    assert calls["naive"] == []


def _assert_names_valid(msg):
    assert "naive" in msg and "torch_flash" in msg


def test_unknown_backend_argument_raises():
    q, k, v = make_qkv(1, 2, 2, 3, 3)
    with pytest.raises(ValueError, match="bogus") as ei:
        attention(q, k, v, backend="bogus")
    _assert_names_valid(str(ei.value))


def test_unknown_forced_backend_raises():
    with pytest.raises(ValueError, match="bogus") as ei:
        with force_backend("bogus"):
            pass
    _assert_names_valid(str(ei.value))


def test_unknown_env_backend_raises(monkeypatch):
    q, k, v = make_qkv(1, 2, 2, 3, 3)
    monkeypatch.setenv("APB_ATTN_BACKEND", "bogus")
    with pytest.raises(ValueError, match="bogus") as ei:
        attention(q, k, v)
    _assert_names_valid(str(ei.value))


# ----------------------------------------------------------------------------- merge


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_merge_disjoint_random_split_equals_full(backend, dtype):
    q, k, v = make_qkv(2, 12, 4, 6, 20, dtype=dtype, seed=7)
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(1))
    a, b = perm[:9].sort().values, perm[9:].sort().values
    o1, l1 = attention(q, k[:, :, a], v[:, :, a], causal=False, backend=backend)
    o2, l2 = attention(q, k[:, :, b], v[:, :, b], causal=False, backend=backend)
    out, lse = merge(o1, l1, o2, l2)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert lse.shape == (2, 12, 6)
    ref_out, ref_lse = ref_attention(q, k, v, False)
    assert_matches(out, lse, ref_out, ref_lse, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_causal_blocks_equals_causal(backend):
    """Queries are the last 5 of 12 tokens: a fully visible prefix block and a causal block."""
    q, k, v = make_qkv(1, 4, 2, 5, 12, seed=11)
    o1, l1 = attention(q, k[:, :, :7], v[:, :, :7], causal=False, backend=backend)
    o2, l2 = attention(q, k[:, :, 7:], v[:, :, 7:], causal=True, backend=backend)
    out, lse = merge(o1, l1, o2, l2)
    ref_out, ref_lse = ref_attention(q, k, v, True)
    assert_matches(out, lse, ref_out, ref_lse, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_with_blind_rows(backend):
    """Ring-style: a later key block is causal-invisible to early queries (lse -inf rows)."""
    q, k, v = make_qkv(1, 4, 4, 8, 8, seed=5)
    # queries 0..7, keys split into [0, 3) and [3, 8); query i sees key j iff j <= i
    o1, l1 = attention(q, k[:, :, :3], v[:, :, :3], causal=False, backend=backend)
    # block 2 relative to all 8 queries: bottom-right causal with kv 5 < q 8 -> first 3 rows blind
    o2, l2 = attention(q, k[:, :, 3:], v[:, :, 3:], causal=True, backend=backend)
    assert torch.isneginf(l2[:, :, :3]).all()
    # keys [0,3) must be causal too for queries 0..2
    o1c, l1c = attention(q[:, :, :3], k[:, :, :3], v[:, :, :3], causal=True, backend=backend)
    o1 = torch.cat([o1c, o1[:, :, 3:]], dim=2)
    l1 = torch.cat([l1c, l1[:, :, 3:]], dim=2)
    out, lse = merge(o1, l1, o2, l2)
    ref_out, ref_lse = ref_attention(q, k, v, True)
    assert_matches(out, lse, ref_out, ref_lse, torch.float32)


@pytest.mark.parametrize("order", ["empty-second", "empty-first"])
def test_merge_with_empty_is_identity(order):
    q, k, v = make_qkv(2, 4, 2, 5, 9)
    o, l = attention(q, k, v, causal=True, backend="naive")
    garbage = torch.randn_like(o) * 100  # must be ignored: its weight is exp(-inf) = 0
    empty_lse = torch.full_like(l, -math.inf)
    if order == "empty-second":
        out, lse = merge(o, l, garbage, empty_lse)
    else:
        out, lse = merge(garbage, empty_lse, o, l)
    torch.testing.assert_close(out, o.float(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse, l, atol=1e-6, rtol=1e-6)


def test_merge_with_empty_attention_partial_is_identity():
    q, k, v = make_qkv(1, 12, 4, 4, 6)
    o, l = attention(q, k, v, causal=False)
    oe, le = attention(q, k[:, :, :0], v[:, :, :0], causal=False)
    out, lse = merge(o, l, oe, le)
    torch.testing.assert_close(out, o)
    torch.testing.assert_close(lse, l)


def test_merge_two_empty():
    shape = (2, 3, 4, 8)
    out1 = torch.zeros(shape)
    out2 = torch.randn(shape)
    lse = torch.full(shape[:3], -math.inf)
    out, merged = merge(out1, lse, out2, lse.clone())
    assert not torch.isnan(out).any() and not torch.isnan(merged).any()
    assert torch.isneginf(merged).all()
    assert torch.equal(out, torch.zeros(shape))


def test_merge_mixed_empty_rows():
    """Some rows empty in both, some in one: per-row behaviour, no NaN anywhere."""
    out1, out2 = torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4)
    lse1 = torch.tensor([[[-math.inf, 0.5, -math.inf]]])
    lse2 = torch.tensor([[[-math.inf, -math.inf, 1.5]]])
    out, lse = merge(out1, lse1, out2, lse2)
    assert not torch.isnan(out).any()
    assert torch.isneginf(lse[0, 0, 0]) and torch.equal(out[0, 0, 0], torch.zeros(4))
    torch.testing.assert_close(out[0, 0, 1], out1[0, 0, 1])
    torch.testing.assert_close(out[0, 0, 2], out2[0, 0, 2])
    torch.testing.assert_close(lse[0, 0, 1:], torch.tensor([0.5, 1.5]))


def test_merge_weights_by_lse():
    """Hand-computed: weights exp(l1), exp(l2) normalised; lse = log(e^l1 + e^l2)."""
    out1 = torch.ones(1, 1, 1, 2)
    out2 = torch.full((1, 1, 1, 2), 3.0)
    l1, l2 = torch.tensor([[[0.0]]]), torch.tensor([[[math.log(3.0)]]])
    out, lse = merge(out1, l1, out2, l2)
    torch.testing.assert_close(out, torch.full((1, 1, 1, 2), (1 * 1 + 3 * 3) / 4.0))
    torch.testing.assert_close(lse, torch.tensor([[[math.log(4.0)]]]))


def test_merge_large_lse_no_overflow():
    out1, out2 = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    l1 = torch.full((1, 2, 3), 1.0e4)
    l2 = torch.full((1, 2, 3), 1.0e4 + 1.0)
    out, lse = merge(out1, l1, out2, l2)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    w2 = 1 / (1 + math.exp(-1.0))
    torch.testing.assert_close(out, out1 * (1 - w2) + out2 * w2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, torch.full((1, 2, 3), 1.0e4 + 1.0 + math.log1p(math.exp(-1.0))))


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_large_logits_end_to_end(backend):
    """Scores around 1e4: partial LSEs ~1e4, exp would overflow without the max shift."""
    q, k, v = make_qkv(1, 4, 2, 4, 12, d=16, seed=2)
    q = q * 2000.0
    _, l_full = attention(q, k, v, causal=False, backend="naive")
    assert l_full.abs().max() > 1e3  # the test really exercises large logits
    o1, l1 = attention(q, k[:, :, :5], v[:, :, :5], causal=False, backend=backend)
    o2, l2 = attention(q, k[:, :, 5:], v[:, :, 5:], causal=False, backend=backend)
    out, lse = merge(o1, l1, o2, l2)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    ref_out, ref_lse = ref_attention(q, k, v, False)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-2, rtol=1e-5)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_many_partials(backend):
    q, k, v = make_qkv(2, 12, 2, 5, 23, seed=9)
    bounds = [0, 4, 4, 11, 16, 23]  # includes an empty block [4, 4)
    parts = [attention(q, k[:, :, s:e], v[:, :, s:e], causal=False, backend=backend)
             for s, e in zip(bounds, bounds[1:])]
    assert len(parts) == 5
    out, lse = merge_many(parts)
    assert out.dtype == torch.float32 and lse.shape == (2, 12, 5) and lse.dtype == torch.float32
    ref_out, ref_lse = ref_attention(q, k, v, False)
    assert_matches(out, lse, ref_out, ref_lse, torch.float32)
    # order does not matter
    out_r, lse_r = merge_many(parts[::-1])
    torch.testing.assert_close(out_r, out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse_r, lse, atol=1e-5, rtol=1e-5)


def test_merge_many_three_causal_blocks():
    """Exact causal attention of a 12-token sequence from three key blocks (ring style)."""
    q, k, v = make_qkv(1, 12, 4, 12, 12, seed=4)
    parts = [_causal_block(q, k, v, s, e) for s, e in [(0, 4), (4, 8), (8, 12)]]
    out, lse = merge_many(parts)
    ref_out, ref_lse = ref_attention(q, k, v, True)
    assert_matches(out, lse, ref_out, ref_lse, torch.float32)


def _causal_block(q, k, v, s, e, **kw):
    """Global-causal attention of all queries to keys [s, e): query i sees key j iff j <= i."""
    q_len = q.shape[2]
    # queries before s see nothing; queries in [s, e) are causal (square); later ones see all
    o_blind, l_blind = attention(q[:, :, :s], k[:, :, :0], v[:, :, :0], causal=False, **kw)
    o_diag, l_diag = attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], causal=True, **kw)
    o_after, l_after = attention(q[:, :, e:q_len], k[:, :, s:e], v[:, :, s:e], causal=False, **kw)
    return torch.cat([o_blind, o_diag, o_after], dim=2), torch.cat([l_blind, l_diag, l_after], dim=2)


def test_merge_many_single_and_empty():
    o = torch.randn(1, 2, 3, 4, dtype=torch.bfloat16)
    l = torch.randn(1, 2, 3)
    out, lse = merge_many([(o, l)])
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    torch.testing.assert_close(out, o.float())
    torch.testing.assert_close(lse, l)
    with pytest.raises(ValueError):
        merge_many([])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("q_len,kv_len", [(4, 4), (3, 9), (9, 3)])
def test_lse_shape_and_dtype(backend, dtype, q_len, kv_len):
    q, k, v = make_qkv(2, 12, 4, q_len, kv_len, dtype=dtype)
    for causal in (True, False):
        out, lse = attention(q, k, v, causal=causal, backend=backend)
        assert out.shape == (2, 12, q_len, 16) and out.dtype == dtype
        assert lse.shape == (2, 12, q_len) and lse.dtype == torch.float32
        m_out, m_lse = merge(out, lse, out, lse)
        assert m_out.shape == out.shape and m_lse.shape == (2, 12, q_len) and m_lse.dtype == torch.float32
        # merging a partial with itself: same output, lse + log 2
        fin = torch.isfinite(lse)
        torch.testing.assert_close(m_lse[fin], lse[fin] + math.log(2.0), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(m_out, out.float(), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- softcap, sinks, MLA


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("q_len,kv_len", [(9, 9), (5, 13), (11, 4)])
def test_softcap_matches_reference(backend, causal, q_len, kv_len):
    q, k, v = make_qkv(1, 12, 4, q_len, kv_len, seed=q_len + kv_len)
    q = q * 4  # scores of a few units, so that a cap of 2 really bends them
    out, lse = attention(q, k, v, causal=causal, backend=backend, softcap=2.0)
    ref_out, ref_lse = ref_attention(q, k, v, causal, softcap=2.0)
    assert_matches(out, lse, ref_out, ref_lse, torch.float32)
    plain, _ = ref_attention(q, k, v, causal)
    assert not torch.allclose(ref_out, plain, atol=1e-2), "the cap should change the answer"


def test_softcap_on_torch_flash_runs_the_exact_fallback(monkeypatch):
    q, k, v = make_qkv(1, 4, 2, 5, 5)
    calls = {n: _spy(monkeypatch, n) for n in BACKENDS}
    attention(q, k, v, causal=True, backend="torch_flash", softcap=3.0)
    assert calls == {"naive": ["naive"], "torch_flash": []}
    attention(q, k, v, causal=True, backend="torch_flash")
    assert calls["torch_flash"] == ["torch_flash"]


def test_naive_chunks_rows_without_changing_the_answer(monkeypatch):
    q, k, v = make_qkv(1, 4, 2, 37, 50, seed=8)
    whole = attention(q, k, v, causal=True, backend="naive", softcap=2.0)
    monkeypatch.setattr(attn_mod, "_NAIVE_CHUNK", 4 * 50 * 6)  # 6 rows per chunk
    chunked = attention(q, k, v, causal=True, backend="naive", softcap=2.0)
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_softcapped_partials_merge_exactly(backend):
    """Ring-style causal blocks with a softcap: the merged LSE is the capped scores' LSE."""
    q, k, v = make_qkv(1, 12, 4, 12, 12, seed=4)
    q = q * 4
    parts = [_causal_block(q, k, v, s, e, backend=backend, softcap=2.0) for s, e in [(0, 5), (5, 9), (9, 12)]]
    out, lse = merge_many(parts)
    ref_out, ref_lse = ref_attention(q, k, v, True, softcap=2.0)
    assert_matches(out, lse, ref_out, ref_lse, torch.float32)


def _sinks(h, seed=0):
    return torch.randn(h, generator=torch.Generator().manual_seed(seed)) * 2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("q_len,kv_len", [(9, 9), (5, 13), (1, 12)])
def test_sinks_in_a_causal_call(backend, q_len, kv_len):
    q, k, v = make_qkv(1, 12, 4, q_len, kv_len, seed=3)
    sinks = _sinks(12)
    out, lse = attention(q, k, v, causal=True, backend=backend, sinks=sinks)
    ref_out, ref_lse = ref_attention(q, k, v, True, sinks=sinks)
    assert_matches(out, lse, ref_out, ref_lse, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sinks_skip_non_causal_calls_and_blind_rows(backend):
    q, k, v = make_qkv(1, 4, 2, 9, 3, seed=6)
    sinks = _sinks(4)
    for causal in (True, False):
        with_sinks = attention(q, k, v, causal=causal, backend=backend, sinks=sinks)
        without = attention(q, k, v, causal=causal, backend=backend)
        if causal:  # rows 0..5 see no key (their own key is not in the call): untouched
            torch.testing.assert_close(with_sinks[1][:, :, :6], without[1][:, :, :6])
            assert not torch.allclose(with_sinks[1][:, :, 6:], without[1][:, :, 6:])
        else:
            torch.testing.assert_close(with_sinks, without)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_sinks_count_once_across_partials(backend, softcap):
    """Every partial gets the same sinks, as the methods pass them; the merge has each once."""
    q, k, v = make_qkv(1, 12, 4, 12, 12, seed=12)
    sinks = _sinks(12, seed=1)
    parts = [_causal_block(q, k, v, s, e, backend=backend, softcap=softcap, sinks=sinks)
             for s, e in [(0, 4), (4, 7), (7, 12)]]
    out, lse = merge_many(parts)
    ref_out, ref_lse = ref_attention(q, k, v, True, softcap=softcap, sinks=sinks)
    assert_matches(out, lse, ref_out, ref_lse, torch.float32)
    # the queries of the last block over all earlier keys at once, then themselves (query phase style)
    rows = slice(7, 12)
    o1, l1 = attention(q[:, :, rows], k[:, :, :7], v[:, :, :7], causal=False, backend=backend, softcap=softcap,
                       sinks=sinks)
    o2, l2 = attention(q[:, :, rows], k[:, :, rows], v[:, :, rows], causal=True, backend=backend, softcap=softcap,
                       sinks=sinks)
    out, lse = merge(o1, l1, o2, l2)
    assert_matches(out, lse, ref_out[:, :, rows], ref_lse[:, :, rows], torch.float32)


def test_sinks_shape_is_checked():
    q, k, v = make_qkv(1, 4, 2, 3, 3)
    with pytest.raises(ValueError, match="one logit per query head"):
        attention(q, k, v, sinks=torch.zeros(2))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("v_dim", [12, 24])
@pytest.mark.parametrize("q_len,kv_len", [(7, 7), (5, 13), (11, 4)])
def test_value_head_size_differs_from_the_key(backend, causal, v_dim, q_len, kv_len):
    """Multi-head latent attention: v_dim != dim, with the default scale from the key's size."""
    q, k, v = make_qkv(1, 8, 8, q_len, kv_len, d=16, v_dim=v_dim, seed=v_dim + q_len)
    out, lse = attention(q, k, v, causal=causal, backend=backend)
    assert out.shape == (1, 8, q_len, v_dim)
    ref_out, ref_lse = ref_attention(q, k, v, causal)
    assert_matches(out, lse, ref_out, ref_lse, torch.float32)
    empty_out, _ = attention(q, k[:, :, :0], v[:, :, :0], causal=causal, backend=backend)
    assert empty_out.shape == (1, 8, q_len, v_dim)


@pytest.mark.parametrize("backend", BACKENDS)
def test_value_head_size_differs_merged_across_blocks(backend):
    q, k, v = make_qkv(1, 8, 8, 12, 12, d=16, v_dim=10, seed=5)
    parts = [_causal_block(q, k, v, s, e, backend=backend) for s, e in [(0, 5), (5, 12)]]
    out, lse = merge_many(parts)
    ref_out, ref_lse = ref_attention(q, k, v, True)
    assert_matches(out, lse, ref_out, ref_lse, torch.float32)


def test_merge_in_place_equals_merge_many():
    """The ring merges partials into one accumulator as they arrive: the same result as merging
    the list at the end (to float rounding: a fused multiply-add), empty partials (lse -inf) included."""
    g = torch.Generator().manual_seed(3)
    parts = []
    for i in range(5):
        out = torch.randn(1, 4, 6, 8, generator=g).to(torch.bfloat16 if i % 2 else torch.float32)
        lse = torch.randn(1, 4, 6, generator=g) * 3
        if i == 2:
            lse[:, :, :3] = -math.inf
            out[:, :, :3] = 0
        parts.append((out, lse))
    ref_out, ref_lse = merge_many(parts)
    acc_out = torch.zeros(1, 4, 6, 8)
    acc_lse = torch.full((1, 4, 6), -math.inf)
    for o, l in parts:
        merge_(acc_out, acc_lse, o, l)
    torch.testing.assert_close(acc_out, ref_out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(acc_lse, ref_lse, atol=1e-6, rtol=1e-6)
    empty_out, empty_lse = torch.zeros(1, 4, 6, 8), torch.full((1, 4, 6), -math.inf)
    merge_(empty_out, empty_lse, torch.zeros(1, 4, 6, 8), torch.full((1, 4, 6), -math.inf))
    assert torch.isneginf(empty_lse).all() and not empty_out.isnan().any()


def _cpu_stands_in(monkeypatch, **kernels):
    """torch's CUDA kernels played by its CPU kernel; ``kernels`` replaces named ones (a function
    ``(q, k, v, causal, scale) -> (out, lse)``). Returns the list of kernels called, in order."""
    real = attn_mod._torch_sdpa
    calls = []

    def sdpa(q, k, v, causal, scale, kernel):
        calls.append(kernel)
        return kernels[kernel](q, k, v, causal, scale) if kernel in kernels else real(q, k, v, causal, scale, "cpu")
    monkeypatch.setattr(attn_mod, "_torch_sdpa", sdpa)
    monkeypatch.setattr(attn_mod, "_FUSED_OK", {})
    return calls


def _cpu(q, k, v, causal, scale):
    return attn_mod._torch_sdpa(q, k, v, causal, scale, "cpu")


def _refuse(*a):
    raise RuntimeError("no kernel for this shape on this GPU")


def test_a_fused_kernel_is_used_only_where_it_agrees(monkeypatch):
    """cuDNN's and FlashAttention's LSEs feed every merge: a fused kernel is taken only when its
    output and LSE match the memory-efficient kernel's; one that is missing (this CPU: torch has
    no CPU kernel for either) or returns its statistics in another convention (base 2 here) is
    never used."""
    for kernel in attn_mod._FUSED:
        assert not attn_mod._fused_ok(torch.device("cpu"), torch.float32, kernel)  # refused, not raised
    _cpu_stands_in(monkeypatch)
    assert attn_mod._fused_ok(torch.device("cpu"), torch.float32, "cudnn")
    _cpu_stands_in(monkeypatch, cudnn=lambda *a: (_cpu(*a)[0], _cpu(*a)[1] * math.log2(math.e)))
    assert not attn_mod._fused_ok(torch.device("cpu"), torch.float32, "cudnn")
    q = torch.zeros(1, 2, 3, 8)
    assert attn_mod._next_kernel(q, None) == "flash"  # cuDNN disagreed; flash (the CPU kernel) agrees
    _cpu_stands_in(monkeypatch, cudnn=_refuse, flash=_refuse)  # an older GPU: neither runs
    assert attn_mod._next_kernel(q, None) == "efficient"


@pytest.mark.parametrize("refused,used", [(("cudnn",), "flash"), (("cudnn", "flash"), "efficient")])
def test_a_call_a_fused_kernel_refuses_runs_on_the_next(monkeypatch, refused, used):
    """Probes pass on a small shape; a call whose shape a kernel then refuses goes to the next
    kernel that runs here, down to the memory-efficient one, with the same result."""
    q, k, v = make_qkv(1, 8, 2, 40, 40, seed=9)
    ref_out, ref_lse = ref_attention(q, k, v, True)
    calls = _cpu_stands_in(monkeypatch)
    for kernel in attn_mod._FUSED:
        assert attn_mod._fused_ok(q.device, q.dtype, kernel)  # the probes pass
    for kernel in refused:
        monkeypatch.setattr(attn_mod, "_torch_sdpa", lambda *a, _k=kernel, _f=attn_mod._torch_sdpa:
                            _refuse() if a[-1] == _k else _f(*a))
    monkeypatch.setattr(attn_mod, "_torch_kernel", lambda q: "cudnn")
    for kernel in (*attn_mod._FUSED, "efficient"):
        monkeypatch.setitem(attn_mod._GQA_NATIVE, ("cpu", kernel), True)
    calls.clear()
    out, lse = attention(q, k, v, causal=True, backend="torch_flash")
    assert calls == [used]  # the refused ones raised before reaching the stand-in
    assert_matches(out, lse, ref_out, ref_lse, torch.float32)


# ----------------------------------------------------------------------------- masked calls


def _by_positions(seed=4, window=5):
    """A call masked by positions: keys out of order, some far back so that a few rows see none."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = make_qkv(1, 8, 2, 30, 40, seed=seed)
    k_pos = torch.randperm(40, generator=g)
    k_pos[(k_pos >= 12) & (k_pos <= 20)] -= 100
    q_pos = torch.arange(10, 40)
    d = q_pos[:, None] - k_pos[None, :]
    visible = (d >= 0) & (d < window)
    kk, vv = k.repeat_interleave(4, 1).double(), v.repeat_interleave(4, 1).double()
    scores = (q.double() @ kk.transpose(-1, -2) * 0.3).masked_fill(~visible, -math.inf)
    lse = torch.logsumexp(scores, -1)
    ref = torch.nan_to_num(torch.softmax(scores, -1)) @ vv
    return (q, k, v), dict(causal=True, scale=0.3, window=window, q_pos=q_pos, k_pos=k_pos), ref, lse


def test_a_masked_kernel_that_disagrees_with_naive_is_never_used(monkeypatch):
    """Position-masked calls run torch's masked kernel only where a one-time probe finds it agrees
    with the naive softmax (output, LSE, empty rows); one in another LSE convention is refused and
    the calls stay exact on ``naive``."""
    args, kw, ref, ref_lse = _by_positions()
    monkeypatch.setattr(attn_mod, "_MASKED_OK", {})
    real = attn_mod._masked_sdpa
    monkeypatch.setattr(attn_mod, "_masked_sdpa", lambda *a: (real(*a)[0], real(*a)[1] * math.log2(math.e)))
    out, lse = attention(*args, **kw)
    assert attn_mod._MASKED_OK == {("cpu", torch.float32): False}
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)) and torch.isneginf(lse).any()
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    seen = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse.double()[seen], ref_lse[seen], atol=1e-5, rtol=1e-5)


def test_the_cuda_masked_kernel_gets_an_aligned_bias_and_its_lse_is_cut(monkeypatch):
    """On CUDA the masked calls go to torch's memory-efficient kernel, which reads its bias in rows
    aligned to 16 elements, as (batch, heads, rows, keys), and returns an LSE padded to 32 rows. A
    stand-in with those demands (run by the CPU kernel) checks the plumbing: the probe passes
    through it, and the result equals the reference."""
    seen_biases = []

    def efficient(q, k, v, bias, scale):
        assert bias.dim() == 4 and tuple(bias.shape) == (*q.shape[:3], k.shape[2]), bias.shape
        assert bias.stride(-2) % 16 == 0 and bias.stride(-1) == 1 and k.shape[1] == q.shape[1]
        seen_biases.append(tuple(bias.shape))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=bias[0, 0].contiguous(), scale=scale)
        pad = -(-q.shape[2] // 32) * 32 - q.shape[2]
        return out, torch.cat([lse, torch.full((*lse.shape[:2], pad), math.nan)], 2)  # the padding is junk

    monkeypatch.setattr(attn_mod, "_MASKED_OK", {})
    monkeypatch.setattr(attn_mod, "_masked_kernel", lambda device: "efficient")
    monkeypatch.setattr(attn_mod, "_efficient_with_bias", efficient)
    monkeypatch.setitem(attn_mod._GQA_NATIVE, ("cpu", "efficient"), False)
    args, kw, ref, ref_lse = _by_positions(seed=6)
    out, lse = attention(*args, **kw)
    assert attn_mod._MASKED_OK == {("cpu", torch.float32): True} and len(seen_biases) == 2  # probe, then call
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    seen = torch.isfinite(ref_lse)
    assert torch.equal(torch.isneginf(lse), ~seen)
    torch.testing.assert_close(lse.double()[seen], ref_lse[seen], atol=1e-5, rtol=1e-5)
