"""apb.methods.compressors (passing-block selection) and apb.methods.sizes / plan() (anchor and passing sizes).

Scores are checked against explicit loops written here from the definitions in design.md.
"""

from __future__ import annotations

import math

import pytest
import torch

from apb.methods.compressors import (
    ScoreInputs,
    build_compressor,
    compressor_names,
    random_retaining_heads,
    take,
)
from apb.config import MethodConfig
from apb.methods import build_method
from apb.methods.sizes import resolve_len, resolve_passing

B, HEADS, KV, D, T, NQ = 2, 6, 2, 8, 23, 4
GROUP = HEADS // KV


def _inputs(seed=0, t=T, nq=NQ, b=B, heads=HEADS, kv=KV, d=D, scale=None, layer=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(b, kv, t, d, generator=g)
    v = torch.randn(b, kv, t, d, generator=g)
    q = torch.randn(b, heads, nq, d, generator=g)
    return ScoreInputs(layer, k, v, q_query=q, scale=d ** -0.5 if scale is None else scale)


def _query_scores_ref(x: ScoreInputs) -> torch.Tensor:
    b, kv, t, _ = x.k.shape
    heads, nq = x.q_query.shape[1], x.q_query.shape[2]
    group = heads // kv
    out = torch.zeros(b, kv, t, dtype=torch.float64)
    for bi in range(b):
        for h in range(kv):
            for tok in range(t):
                acc, cnt = 0.0, 0
                for i in range(heads):
                    if i // group != h:
                        continue
                    for s in range(nq):
                        acc += float(torch.dot(x.q_query[bi, i, s].double(), x.k[bi, h, tok].double()))
                        cnt += 1
                out[bi, h, tok] = acc / cnt
    return out


def _pool_ref(scores: torch.Tensor, width: int) -> torch.Tensor:
    """Centred max-pool with stride 1 along the last dim, window clipped at the edges."""
    half = width // 2
    t = scores.shape[-1]
    out = torch.empty_like(scores)
    for i in range(t):
        lo, hi = max(0, i - half), min(t, i + half + 1)
        out[..., i] = scores[..., lo:hi].max(dim=-1).values
    return out


def _check_topk(idx: torch.Tensor, pooled: torch.Tensor, p: int):
    """idx is a valid top-p of pooled (ties allowed), unique and ascending per (batch, head)."""
    b, kv, _ = pooled.shape
    assert idx.shape == (b, kv, p)
    for bi in range(b):
        for h in range(kv):
            sel = idx[bi, h].tolist()
            assert sel == sorted(sel) and len(set(sel)) == p
            chosen = pooled[bi, h, sel]
            rest_mask = torch.ones(pooled.shape[-1], dtype=torch.bool)
            rest_mask[sel] = False
            rest = pooled[bi, h, rest_mask]
            if rest.numel():
                assert chosen.min() >= rest.max() - 1e-9


# ---------------------------------------------------------------------------------------------
# query compressor


def test_query_scores_match_reference():
    x = _inputs(1)
    comp = build_compressor("query")
    got = comp.scores(x)
    assert got.shape == (B, KV, T)
    assert torch.allclose(got.double(), _query_scores_ref(x), atol=1e-4)


def test_query_group_assignment_is_consecutive_heads():
    # only query head 0 is non-zero: it belongs to KV head 0, so KV head 1 must score 0 everywhere
    x = _inputs(2, b=1, heads=4, kv=2)
    x.q_query[:, 1:] = 0
    s = build_compressor("query").scores(x)
    assert torch.allclose(s[0, 1], torch.zeros(T))
    assert not torch.allclose(s[0, 0], torch.zeros(T))
    # head 1 is the second member of KV head 0's group (i // 2 == 0), not KV head 1's
    x.q_query.zero_()
    x.q_query[0, 1] = 1.0
    s = build_compressor("query").scores(x)
    assert torch.allclose(s[0, 1], torch.zeros(T))
    # NQ of the group's 2 * NQ (head, position) pairs are all-ones queries: mean = sum(k) / 2
    expected = x.k[0, 0].sum(-1) * NQ / (2 * NQ)
    assert torch.allclose(s[0, 0], expected, atol=1e-5)


@pytest.mark.parametrize("p", [1, 3, 7, 12, 22])
def test_query_select_is_top_p_of_pooled(p):
    x = _inputs(3)
    idx = build_compressor("query").select(x, p)
    pooled = _pool_ref(_query_scores_ref(x), 5)
    _check_topk(idx, pooled, p)


@pytest.mark.parametrize("seed", range(4))
def test_pool_width_one_is_plain_top_p(seed):
    x = _inputs(10 + seed)
    p = 6
    idx = build_compressor("query", pool_width=1).select(x, p)
    ref = _query_scores_ref(x)
    expected = ref.argsort(dim=-1, descending=True)[..., :p].sort(dim=-1).values
    assert torch.equal(idx, expected)


def test_pooling_changes_the_selection():
    # a single strong token at 10: unpooled, p=1 picks exactly it; pooled with width 5, the whole
    # neighbourhood 8..12 ties at the top, so p=5 picks exactly that window
    x = _inputs(4, b=1, kv=1, heads=1, nq=1, t=30)
    x.k.mul_(0.01)
    x.k[0, 0, 10] = x.q_query[0, 0, 0] * 100
    assert build_compressor("query", pool_width=1).select(x, 1).tolist() == [[[10]]]
    assert build_compressor("query", pool_width=5).select(x, 5).tolist() == [[list(range(8, 13))]]
    assert build_compressor("query", pool_width=3).select(x, 3).tolist() == [[list(range(9, 12))]]


@pytest.mark.parametrize("pos", [0, 1, 11, T - 2, T - 1])
@pytest.mark.parametrize("p", [5, 8])
def test_planted_token_is_selected(pos, p):
    x = _inputs(5)
    # key of the planted token points along the mean query of each group, scaled up
    for h in range(KV):
        qmean = x.q_query[:, h * GROUP:(h + 1) * GROUP].mean(dim=(1, 2))  # (b, d)
        x.k[:, h, pos] = qmean / qmean.norm(dim=-1, keepdim=True) * 1e4
    idx = build_compressor("query").select(x, p)
    assert idx.shape == (B, KV, p)
    assert bool((idx == pos).any(dim=-1).all())


def test_planted_token_is_selected_even_when_p_is_below_pool_width():
    # pooling ties inside a peak's window are broken by the raw score
    q = torch.zeros(1, 1, 1, 4)
    q[0, 0, 0, 0] = 1.0
    k = torch.zeros(1, 1, 30, 4)
    k[0, 0, 10, 0] = 100.0
    x = ScoreInputs(0, k, k.clone(), q_query=q)
    assert 10 in build_compressor("query").select(x, 1)[0, 0].tolist()


@pytest.mark.parametrize("width", [0, 2, 4, -1])
def test_even_or_nonpositive_pool_width_raises(width):
    with pytest.raises(ValueError, match="pool_width"):
        build_compressor("query", pool_width=width)


def test_select_all_when_p_covers_block():
    x = _inputs(6)
    for name in ("query", "snapkv", "stride"):
        for p in (T, T + 5):
            idx = build_compressor(name).select(x, p)
            assert idx.shape == (B, KV, T)
            assert torch.equal(idx[1, 1], torch.arange(T))


# ---------------------------------------------------------------------------------------------
# snapkv


def _snapkv_ref(x: ScoreInputs, w: int) -> torch.Tensor:
    b, kv, t, _ = x.k.shape
    heads, nq = x.q_query.shape[1], x.q_query.shape[2]
    group = heads // kv
    out = torch.zeros(b, kv, t, dtype=torch.float64)
    for bi in range(b):
        for h in range(kv):
            for i in range(h * group, (h + 1) * group):
                for s in range(max(0, nq - w), nq):
                    logits = torch.stack([torch.dot(x.q_query[bi, i, s].double(), x.k[bi, h, j].double())
                                          for j in range(t)]) * x.scale
                    e = torch.exp(logits - logits.max())
                    out[bi, h] += e / e.sum()
    return out


@pytest.mark.parametrize("window", [1, 2, 16])
def test_snapkv_scores_match_reference(window):
    x = _inputs(7, nq=5, scale=0.3)
    got = build_compressor("snapkv", snapkv_window=window).scores(x)
    assert got.shape == (B, KV, T)
    assert torch.allclose(got.double(), _snapkv_ref(x, window), atol=1e-5)
    # each KV head sums GROUP * min(w, nq) softmax rows of mass 1
    assert torch.allclose(got.sum(-1), torch.full((B, KV), float(GROUP * min(window, 5))), atol=1e-4)


def test_snapkv_select_is_top_p_of_pooled():
    x = _inputs(8, nq=5)
    idx = build_compressor("snapkv", snapkv_window=3).select(x, 6)
    _check_topk(idx, _pool_ref(_snapkv_ref(x, 3), 5), 6)


def test_snapkv_window_must_be_positive():
    with pytest.raises(ValueError, match="snapkv_window"):
        build_compressor("snapkv", snapkv_window=0)


# ---------------------------------------------------------------------------------------------
# stride


@pytest.mark.parametrize("t,p,expected", [
    (10, 5, [0, 2, 4, 6, 8]),
    (10, 3, [0, 3, 6]),
    (9, 3, [0, 3, 6]),
    (23, 4, [0, 5, 11, 17]),
    (7, 1, [0]),
    (8, 7, [0, 1, 2, 3, 4, 5, 6]),
])
def test_stride_even_spacing(t, p, expected):
    x = _inputs(9, t=t)
    idx = build_compressor("stride").select(x, p)
    assert idx.shape == (B, KV, p)
    for bi in range(B):
        for h in range(KV):
            assert idx[bi, h].tolist() == expected


@pytest.mark.parametrize("t,p", [(100, 7), (64, 64 // 3), (1000, 125), (17, 16)])
def test_stride_gaps_are_near_equal(t, p):
    idx = build_compressor("stride").select(_inputs(0, t=t), p)[0, 0].tolist()
    assert idx[0] == 0 and len(set(idx)) == p and idx == sorted(idx)
    gaps = [b - a for a, b in zip(idx, idx[1:])] + [t - idx[-1]]
    assert set(gaps) <= {t // p, -(-t // p)}


def test_stride_ignores_content_and_query():
    x1, x2 = _inputs(11), _inputs(12)
    x2.q_query = None
    a = build_compressor("stride").select(x1, 5)
    b = build_compressor("stride").select(x2, 5)
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# retaining heads


@pytest.fixture(scope="module")
def llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                       intermediate_size=64, vocab_size=100)


def _pre_rope(cfg, t=13, b=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = cfg.hidden_size // cfg.num_attention_heads
    return (torch.randn(b, t, cfg.num_attention_heads * d, generator=g),
            torch.randn(b, t, cfg.num_key_value_heads * d, generator=g),
            torch.randn(b, t, cfg.num_key_value_heads * d, generator=g))


@pytest.mark.parametrize("layer", [0, 1])
def test_retaining_heads_scores_match_reference(tmp_path, llama_config, layer):
    from safetensors.torch import load_file

    path = random_retaining_heads(tmp_path / "rh.safetensors", llama_config, hidden=16, seed=3)
    assert path.is_file()
    w = load_file(str(path))
    comp = build_compressor("retaining_heads", retaining_heads_path=str(path))
    pre = _pre_rope(llama_config, seed=layer + 1)
    kv_heads, t = llama_config.num_key_value_heads, pre[0].shape[1]
    d = llama_config.hidden_size // llama_config.num_attention_heads
    x = ScoreInputs(layer, torch.randn(1, kv_heads, t, d), torch.randn(1, kv_heads, t, d), pre_rope=pre)
    got = comp.scores(x)
    assert got.shape == (1, kv_heads, t)

    fc1w, fc1b = w[f"layers.{layer}.fc1.weight"].double(), w[f"layers.{layer}.fc1.bias"].double()
    fc2w, fc2b = w[f"layers.{layer}.fc2.weight"].double(), w[f"layers.{layer}.fc2.bias"].double()
    assert fc1w.shape == (16, llama_config.num_attention_heads * d + 2 * kv_heads * d)
    assert fc2w.shape == (kv_heads, 16)
    ref = torch.zeros(1, kv_heads, t, dtype=torch.float64)
    for tok in range(t):
        feat = torch.cat([pre[0][0, tok], pre[1][0, tok], pre[2][0, tok]]).double()
        hid = fc1w @ feat + fc1b
        hid = hid * torch.sigmoid(hid)
        ref[0, :, tok] = fc2w @ hid + fc2b
    assert torch.allclose(got.double(), ref, atol=1e-5)
    # select works without a query (it is not a query compressor)
    idx = comp.select(x, 4)
    _check_topk(idx, _pool_ref(ref, 5), 4)


def test_retaining_heads_file_is_deterministic_per_seed(tmp_path, llama_config):
    from safetensors.torch import load_file

    a = load_file(str(random_retaining_heads(tmp_path / "a.safetensors", llama_config, hidden=8, seed=1)))
    b = load_file(str(random_retaining_heads(tmp_path / "b.safetensors", llama_config, hidden=8, seed=1)))
    c = load_file(str(random_retaining_heads(tmp_path / "c.safetensors", llama_config, hidden=8, seed=2)))
    assert set(a) == {f"layers.{i}.{m}.{p}" for i in range(2) for m in ("fc1", "fc2") for p in ("weight", "bias")}
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["layers.0.fc1.weight"], c["layers.0.fc1.weight"])


def test_retaining_heads_missing_path_raises():
    with pytest.raises(ValueError, match="retaining_heads_path"):
        build_compressor("retaining_heads")
    with pytest.raises(ValueError, match="retaining_heads_path"):
        build_compressor("retaining_heads", retaining_heads_path="")


def test_retaining_heads_missing_file_raises(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        build_compressor("retaining_heads", retaining_heads_path=str(missing))


def test_retaining_heads_wrong_feature_size_raises(tmp_path, llama_config):
    from transformers import LlamaConfig

    other = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2,
                        intermediate_size=64, vocab_size=100)
    path = random_retaining_heads(tmp_path / "other.safetensors", other, hidden=8)
    comp = build_compressor("retaining_heads", retaining_heads_path=str(path))
    pre = _pre_rope(llama_config)
    x = ScoreInputs(0, torch.randn(1, 2, 13, 8), torch.randn(1, 2, 13, 8), pre_rope=pre)
    with pytest.raises(ValueError, match="input features"):
        comp.scores(x)


def test_retaining_heads_missing_layer_and_missing_pre_rope_raise(tmp_path, llama_config):
    path = random_retaining_heads(tmp_path / "rh.safetensors", llama_config, hidden=8)
    comp = build_compressor("retaining_heads", retaining_heads_path=str(path))
    pre = _pre_rope(llama_config)
    with pytest.raises(ValueError, match="layer 5"):
        comp.scores(ScoreInputs(5, torch.randn(1, 2, 13, 8), torch.randn(1, 2, 13, 8), pre_rope=pre))
    with pytest.raises(RuntimeError, match="pre-RoPE"):
        comp.scores(ScoreInputs(0, torch.randn(1, 2, 13, 8), torch.randn(1, 2, 13, 8)))


# ---------------------------------------------------------------------------------------------
# take, query requirement, registry


def test_take_gathers_rows_per_head():
    g = torch.Generator().manual_seed(0)
    kv = torch.randn(2, 3, 10, 4, generator=g)
    idx = torch.tensor([[[0, 4, 9], [1, 2, 3], [9, 8, 7]],
                        [[5, 5, 6], [0, 1, 9], [2, 4, 6]]])
    got = take(kv, idx)
    assert got.shape == (2, 3, 3, 4)
    for b in range(2):
        for h in range(3):
            for j in range(3):
                assert torch.equal(got[b, h, j], kv[b, h, int(idx[b, h, j])])


@pytest.mark.parametrize("name", ["query", "snapkv"])
def test_query_compressor_without_query_raises(name):
    comp = build_compressor(name)
    x = _inputs(0)
    for q in (None, torch.zeros(B, HEADS, 0, D)):
        x.q_query = q
        with pytest.raises(ValueError, match="no query tokens") as err:
            comp.select(x, 3)
        assert "stride" in str(err.value) and "retaining_heads" in str(err.value)


def test_a_prompt_without_a_query_is_refused_before_any_worker_sees_it():
    """What the worker would refuse mid-forward, ``Method.check_sizes`` refuses on the driver
    (``apb run`` makes it the document's error, ``apb verify`` the row's), and only that."""
    from apb.config import MethodConfig
    from apb.methods import build_method

    def refusal(name, world=2, **options):
        try:
            build_method(name, MethodConfig(name=name.split(":")[0], **options)).check_sizes(400, 0, world)
        except ValueError as e:
            return str(e)
        return None

    assert "no query tokens" in refusal("spava") and "stride" in refusal("spava")
    assert "no query tokens" in refusal("spava", compressor="snapkv")
    assert "n_query >= 1" in refusal("star") and "n_query >= 1" in refusal("apb")
    assert refusal("spava", world=1) is None  # one host passes nothing, so nothing is scored
    assert refusal("spava", compressor="stride") is None
    assert refusal("spava:uncompressed") is None and refusal("spava", passing_len=0) is None
    assert refusal("full") is None and refusal("ring") is None


def test_needs_flags():
    assert build_compressor("query").needs_query and build_compressor("snapkv").needs_query
    assert not build_compressor("stride").needs_query


def test_unknown_compressor_lists_valid_names():
    with pytest.raises(ValueError, match="unknown compressor 'bogus'") as err:
        build_compressor("bogus")
    for name in ("query", "snapkv", "retaining_heads", "stride"):
        assert name in str(err.value)
    assert set(compressor_names()) >= {"query", "snapkv", "retaining_heads", "stride"}


# ---------------------------------------------------------------------------------------------
# sizes


@pytest.mark.parametrize("default,unit,expected", [
    (12.2, 1, 12), (12.7, 1, 13), (0.3, 1, 1), (0.0, 1, 0),
    (300.0, 128, 256), (400.0, 128, 384), (50.0, 128, 128), (1.0, 128, 128), (1000.0, 100, 1000),
    (1049.0, 100, 1000), (1051.0, 100, 1100),
])
def test_resolve_len_default_is_rounded(default, unit, expected):
    assert resolve_len(None, 10_000, default, unit, "anchor_len") == expected


def test_resolve_len_int_and_all():
    assert resolve_len(37, 1000, 5.0, 1, "anchor_len") == 37
    assert resolve_len(0, 1000, 5.0, 1, "anchor_len") == 0
    assert resolve_len("all", 777, 5.0, 128, "passing_len") == 777


@pytest.mark.parametrize("frac,block,unit,expected", [
    (0.25, 1000, 1, 250), (1.0, 999, 1, 999), (0.1, 33, 1, 3), (0.001, 100, 1, 1),
    (0.3, 1000, 128, 256), (0.001, 1000, 128, 128), (0.5, 1000, 100, 500),
])
def test_resolve_len_fraction_of_block(frac, block, unit, expected):
    assert resolve_len(frac, block, 0.0, unit, "passing_len") == expected


@pytest.mark.parametrize("bad", [-1, 0.0, 1.5, -0.2, "most", True, [3], {"x": 1}])
def test_resolve_len_invalid_raises_naming_field(bad):
    with pytest.raises(ValueError, match="my_field"):
        resolve_len(bad, 100, 5.0, 1, "my_field")


def test_resolve_passing_single_value_per_layer():
    assert resolve_passing(7, 100, 12.0, 1, 4) == [7, 7, 7, 7]
    assert resolve_passing(None, 100, 12.4, 1, 3) == [12, 12, 12]
    assert resolve_passing(0.5, 90, 0.0, 1, 2) == [45, 45]
    assert resolve_passing("all", 90, 0.0, 1, 2) == [90, 90]


def test_resolve_passing_per_layer_list():
    assert resolve_passing([1, 0.5, "all"], 60, 0.0, 1, 3) == [1, 30, 60]
    with pytest.raises(ValueError, match="3 layers"):
        resolve_passing([1, 2], 60, 0.0, 1, 3)
    with pytest.raises(ValueError, match="3 layers"):
        resolve_passing([1, 2, 3, 4], 60, 0.0, 1, 3)
    with pytest.raises(ValueError, match=r"passing_len\[1\]"):
        resolve_passing([1, -2, 3], 60, 0.0, 1, 3)


def test_resolve_passing_linear_schedule():
    assert resolve_passing({"linear": [10, 50]}, 1000, 0.0, 1, 5) == [10, 20, 30, 40, 50]
    assert resolve_passing({"linear": [40, 0]}, 1000, 0.0, 1, 3) == [40, 20, 0]
    assert resolve_passing({"linear": [0, 0]}, 1000, 0.0, 1, 3) == [0, 0, 0]
    assert resolve_passing({"linear": [0.1, 0.5]}, 100, 0.0, 1, 3) == [10, 30, 50]
    assert resolve_passing({"linear": [128, 1024]}, 5000, 0.0, 128, 3) == [128, 512, 1024]
    assert resolve_passing({"linear": [10, 50]}, 1000, 0.0, 1, 1) == [10]
    for bad in ({"linear": [1]}, {"linear": [1, 2, 3]}, {"steps": [1, 2]}, {"linear": [1, 2], "x": 1}):
        with pytest.raises(ValueError, match="linear"):
            resolve_passing(bad, 100, 0.0, 1, 3)


def test_resolve_passing_caps_at_block():
    assert resolve_passing(500, 100, 0.0, 1, 2) == [100, 100]
    assert resolve_passing([5, 500], 100, 0.0, 1, 2) == [5, 100]
    assert resolve_passing({"linear": [50, 250]}, 100, 0.0, 1, 3) == [50, 100, 100]
    assert resolve_passing(None, 10, 200.0, 1, 1) == [10]


# ---------------------------------------------------------------------------------------------
# plan()


@pytest.mark.parametrize("n_ctx,n_query,W,layers", [(4096, 64, 8, 3), (1000, 7, 6, 2), (131, 5, 4, 1),
                                                    (51, 0, 1, 2), (8003, 20, 5, 4)])
def test_apb_default_plan(n_ctx, n_query, W, layers):
    plan = build_method("apb", MethodConfig()).plan(n_ctx + n_query, W, n_query, layers)
    block = math.ceil(n_ctx / W)
    # round half away is avoided in these cases: block/4 and block/8 are never x.5
    assert (block / 4) % 1 != 0.5 and (block / 8) % 1 != 0.5
    assert plan.anchor_len == max(1, math.floor(block / 4 + 0.5))
    assert plan.passing == (max(1, math.floor(block / 8 + 0.5)),) * layers


@pytest.mark.parametrize("n_ctx,n_query,W", [(4096, 64, 8), (1000, 7, 3), (50, 0, 1)])
def test_star_default_plan(n_ctx, n_query, W):
    plan = build_method("star", MethodConfig()).plan(n_ctx + n_query, W, n_query, 2)
    assert plan.anchor_len == math.ceil(n_ctx / W)
    assert plan.passing == (0, 0)


@pytest.mark.parametrize("n_ctx,n_query,W", [(8192, 64, 8), (20100, 10, 4), (5000, 3, 2)])
def test_spava_default_plan(n_ctx, n_query, W):
    plan = build_method("spava", MethodConfig()).plan(n_ctx + n_query, W, n_query, 3)
    assert (n_ctx / 64) % 1 != 0.5 and (n_ctx / 128) % 1 != 0.5
    assert plan.anchor_len == math.floor(n_ctx / 64 + 0.5)
    assert plan.passing == (math.floor(n_ctx / 128 + 0.5),) * 3


def test_spava_plan_rounds_to_unit_and_caps():
    plan = build_method("spava", MethodConfig(round_to=128)).plan(100_000 + 50, 4, 50, 2)
    assert plan.anchor_len == 1536  # 100000/64 = 1562.5 -> 12.2 units -> 12 * 128
    assert plan.passing == (768, 768)  # 100000/128 = 781.25 -> 6.1 units -> 6 * 128
    # passing is capped by the virtual block, (n_ctx - anchor) / 2W
    plan = build_method("spava", MethodConfig(anchor_len=10, passing_len=10_000)).plan(1000, 2, 0, 1)
    assert plan.anchor_len == 10
    assert plan.passing == (math.ceil(990 / 4),)


def test_apb_config_overrides():
    n_ctx, n_query, W = 1000, 10, 4
    block = 250
    plan = build_method("apb", MethodConfig(anchor_len=0.5, passing_len=[10, 20])).plan(n_ctx + n_query, W, n_query, 2)
    assert plan.anchor_len == block // 2
    assert plan.passing == (10, 20)
    plan = build_method("apb", MethodConfig(anchor_len=40, passing_len=0.2)).plan(n_ctx + n_query, W, n_query, 3)
    assert plan.anchor_len == 40
    assert plan.passing == (50, 50, 50)
    # anchor can be no longer than a block
    plan = build_method("apb", MethodConfig(anchor_len=5000)).plan(n_ctx + n_query, W, n_query, 1)
    assert plan.anchor_len == block
    with pytest.raises(ValueError):
        build_method("apb", MethodConfig(passing_len=[10, 20])).plan(n_ctx + n_query, W, n_query, 3)


def test_apb_uncompressed_plan():
    m = build_method("apb:uncompressed", MethodConfig())
    assert m.exact is True
    assert build_method("apb", MethodConfig()).exact is False
    for n_ctx, W in [(1000, 4), (1001, 4), (37, 3)]:
        plan = m.plan(n_ctx + 6, W, 6, 2)
        assert plan.anchor_len == 0
        assert plan.passing == (math.ceil(n_ctx / W),) * 2


def _skeleton(name):
    from transformers import AutoConfig

    from apb.model.catalog import resolve_model
    from apb.model.loading import skeleton

    return skeleton(AutoConfig.from_pretrained(resolve_model(name)))


def test_retaining_heads_is_refused_before_the_prefill_where_it_cannot_score(tmp_path, llama_config):
    # a worker used to stop mid-prefill on these, losing every row of an `apb verify` run (session 31's fuzz)
    model = _skeleton("tiny-llama")
    cfg = model.config
    good = random_retaining_heads(tmp_path / "good.safetensors", cfg, hidden=8)
    options = dict(compressor="retaining_heads", passing_len=8)
    build_method("apb", MethodConfig(name="apb", retaining_heads_path=str(good), **options)).check_structure(model)
    # DeepSeek's MLA has no q_proj/k_proj/v_proj for the heads to read
    deepseek = build_method("spava", MethodConfig(name="spava", retaining_heads_path=str(good), **options))
    with pytest.raises(ValueError, match=r"neither q_proj/k_proj/v_proj nor a qkv_proj.*method.compressor 'query'"):
        deepseek.check_structure(_skeleton("tiny-deepseek-v3"))
    with pytest.raises(ValueError, match=r"\(it projects with q_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj\)"):
        deepseek.check_model(_skeleton("tiny-deepseek-v3"))  # the hosts' own check runs it too
    # Phi-3 projects q, k and v in one matrix, which splits into them: a file of its width runs
    phi3 = _skeleton("tiny-phi3")
    fused = random_retaining_heads(tmp_path / "phi3.safetensors", phi3.config, hidden=8)
    build_method("apb", MethodConfig(name="apb", retaining_heads_path=str(fused), **options)).check_structure(phi3)
    # nothing chosen, nothing scored: the uncompressed variant runs on any model
    uncompressed = build_method("apb:uncompressed", MethodConfig(name="apb", retaining_heads_path=str(good), **options))
    uncompressed.check_structure(_skeleton("tiny-deepseek-v3"))
    assert not uncompressed.capture_pre_rope() and deepseek.capture_pre_rope()
    # a file made for another shape or depth names the layer and the sizes
    wide = llama_config.__class__(**{**llama_config.to_dict(), "hidden_size": cfg.hidden_size * 2,
                                     "num_attention_heads": cfg.num_attention_heads,
                                     "num_key_value_heads": cfg.num_key_value_heads,
                                     "num_hidden_layers": cfg.num_hidden_layers})
    other = random_retaining_heads(tmp_path / "other.safetensors", wide, hidden=8)
    with pytest.raises(ValueError, match=r"layer 0 expects \d+ input features, the model gives \d+ \(q \d+ \+ k \d+"):
        build_method("apb", MethodConfig(name="apb", retaining_heads_path=str(other), **options)).check_structure(model)
    shallow = llama_config.__class__(**{**cfg.to_dict(), "num_hidden_layers": cfg.num_hidden_layers - 1})
    short = random_retaining_heads(tmp_path / "short.safetensors", shallow, hidden=8)
    with pytest.raises(ValueError, match=rf"no weights for layer {cfg.num_hidden_layers - 1}"):
        build_method("apb", MethodConfig(name="apb", retaining_heads_path=str(short), **options)).check_structure(model)


def test_apb_run_refuses_retaining_heads_on_mla_before_any_worker_starts(tmp_path, llama_config, monkeypatch):
    from apb.config import ConfigError
    from apb.engine import Engine

    path = random_retaining_heads(tmp_path / "rh.safetensors", llama_config, hidden=8)
    # one skeleton per start: the attention check's, which the compressor's check reads too
    import apb.model.loading
    from apb.model.catalog import resolve_model

    resolve_model("tiny-deepseek-v3")  # made on first use (a model of its own), before the count
    built, real = [], apb.model.loading.AutoModelForCausalLM.from_config
    monkeypatch.setattr(apb.model.loading.AutoModelForCausalLM, "from_config",
                        lambda config, **kw: built.append(config) or real(config, **kw))
    Engine.from_config(None, {"model.name_or_path": "tiny-deepseek-v3", "method.name": "apb"})
    assert len(built) == 1
    with pytest.raises(ConfigError, match=r"method.name='apb': compressor 'retaining_heads'.*q_proj"):
        Engine.from_config(None, {"model.name_or_path": "tiny-deepseek-v3", "method.name": "apb",
                                  "method.compressor": "retaining_heads", "method.retaining_heads_path": str(path)})
    assert len(built) == 2  # the compressor that reads projections checked that skeleton


def test_a_fused_qkv_projection_is_captured_as_the_attention_sees_it():
    """Phi-3's qkv_proj output, split as the compressor reads it: its V part is the V the attention
    step receives (V has no RoPE), in every layer, so the split falls where Phi-3's own does."""
    import apb.methods.base as base
    from apb.model.catalog import resolve_model
    from apb.model.loading import load_model
    from apb.parallel.comm import Comm
    from apb.runtime.prefill import prefill

    model = load_model(resolve_model("tiny-phi3"))
    ids = torch.randint(0, model.config.vocab_size, (50,), generator=torch.Generator().manual_seed(0))
    seen, captured = {}, {}
    step = base.AttnContext.step

    def spy(self, module, q, k, v, scale, **kw):
        seen[int(module.layer_idx)] = v.detach().clone()
        captured[int(module.layer_idx)] = self.scratch.get(("pre_rope", int(module.layer_idx)))
        return step(self, module, q, k, v, scale, **kw)

    method = build_method("full", MethodConfig())
    base.AttnContext.step = spy
    try:
        method.capture_pre_rope = lambda: True  # full never scores; capture as a scoring method would
        prefill(model, ids, method, Comm(None))
    finally:
        base.AttnContext.step = step
    heads, d = model.config.num_key_value_heads, model.config.hidden_size // model.config.num_attention_heads
    for layer, v in seen.items():
        q_pre, k_pre, v_pre = captured[layer]
        assert q_pre.shape[-1] == model.config.num_attention_heads * d and k_pre.shape[-1] == heads * d
        torch.testing.assert_close(v_pre.view(1, -1, heads, d).transpose(1, 2), v, rtol=0, atol=0)
    assert len(seen) == model.config.num_hidden_layers
