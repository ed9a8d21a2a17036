"""Sliding-window and hybrid layers, exact under every method.

The kernel's window is checked against an explicit masked softmax; the halo plan (pure) against
what each host's rows must see, for every layout; and whole models (random weights, windows far
shorter than the prompt, chunks shorter than the window so halos span several hosts) against one
eager transformers forward and ``generate``, in both decode modes.
"""

import math

import pytest
import torch

from apb.config import MethodConfig
from apb.kernels import attention, merge_many
from apb.methods import build_method
from apb.methods.sliding import aligned, halo_plan, real_chunks
from apb.model.loading import load_model
from apb.parallel.groups.local import LocalWorkerGroup
from apb.runtime.decode import Sampling
from apb.runtime.worker import PromptRequest
from apb.tools.verify import random_prompt, reference_run
from test_model_features import N_NEW, assert_exact, run_methods, save_tiny

WORLD = 3
EXACT = ["full", "ring", "ulysses", "apb:uncompressed", "spava:uncompressed"]
APPROX = ["star", "apb", "spava"]


def _masked_softmax(q, k, v, q_pos, k_pos, window, scale, sinks=None):
    """Explicit reference: scores, mask by positions, softmax (with a sink column), weighted sum."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1).double(), v.repeat_interleave(rep, 1).double()
    s = q.double() @ k.transpose(-1, -2) * scale
    d = q_pos[:, None] - k_pos[None, :]
    s = s.masked_fill(~((d >= 0) & (d < window)), -math.inf)
    if sinks is not None:
        s = torch.cat([s, sinks.double().view(1, -1, 1, 1).expand(*s.shape[:3], 1)], -1)
        v = torch.cat([v, v.new_zeros(*v.shape[:2], 1, v.shape[-1])], 2)
    return torch.softmax(s, -1) @ v


@pytest.mark.parametrize("window", [1, 3, 7, 40])
def test_window_kernel_equals_the_masked_softmax(window):
    torch.manual_seed(window)
    q, k, v = torch.randn(1, 4, 12, 8), torch.randn(1, 2, 20, 8), torch.randn(1, 2, 20, 8)
    sinks = torch.randn(4)
    # aligned: the 12 queries are the last 12 of the 20 keys
    out, _ = attention(q, k, v, causal=True, scale=0.3, window=window, sinks=sinks)
    ref = _masked_softmax(q, k, v, torch.arange(8, 20), torch.arange(20), window, 0.3, sinks)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    # one query, the last (a decode step): its window's keys alone, the sink counted once
    one, _ = attention(q[:, :, -1:], k, v, causal=True, scale=0.3, window=window, sinks=sinks)
    torch.testing.assert_close(one.double(), ref[:, :, -1:], atol=1e-5, rtol=1e-5)
    # by positions, keys shuffled and split over three calls (as over hosts): merged, the same;
    # the sink rides on the one causal call
    perm = torch.randperm(20)
    parts = [attention(q, k[:, :, p], v[:, :, p], causal=i == 2, scale=0.3, window=window, sinks=sinks,
                       q_pos=torch.arange(8, 20), k_pos=p)
             for i, p in enumerate(perm.chunk(3))]
    torch.testing.assert_close(merge_many(parts)[0].double(), ref, atol=1e-5, rtol=1e-5)


def test_a_tile_is_aligned_only_when_its_keys_end_at_its_last_query_without_gaps():
    """An aligned tile's window is applied by the kernel (flash-attn's own), without positions."""
    ar = torch.arange
    assert aligned(ar(10, 14), ar(5, 14)) and aligned(ar(0, 4), ar(0, 4))
    assert not aligned(ar(10, 14), ar(5, 13))  # the last query's own key missing
    assert not aligned(ar(10, 14), torch.cat([ar(9, 14), ar(5, 9)]))  # a halo after the own rows
    assert not aligned(ar(10, 14), torch.cat([ar(5, 8), ar(9, 14)]))  # a gap
    assert not aligned(torch.tensor([10, 12, 13]), ar(5, 14))  # queries with a gap
    assert not aligned(ar(10, 14), ar(12, 14)) and not aligned(ar(0, 0), ar(0, 3))
    # aligned or not, the kernel's answer is the same: by positions, and as an aligned call
    q, k, v = torch.randn(1, 4, 4, 8), torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8)
    by_pos = attention(q, k, v, causal=True, window=3, q_pos=ar(10, 14), k_pos=ar(5, 14))
    as_call = attention(q, k, v, causal=True, window=3)
    torch.testing.assert_close(as_call[0], by_pos[0])
    torch.testing.assert_close(as_call[1], by_pos[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("v_dim", [8, 12])
def test_a_masked_call_on_cpu_runs_torchs_kernel_and_equals_the_masked_softmax(monkeypatch, dtype, v_dim):
    """Calls masked by positions (a halo out of order, decoding's cached keys) run torch's CPU
    flash kernel with the mask, not the naive softmax; rows that see no key stay empty. Only a
    softcap, which torch's kernels lack, still goes to ``naive``."""
    import importlib
    kernels = importlib.import_module("apb.kernels.attention")
    g = torch.Generator().manual_seed(v_dim)
    q = torch.randn(1, 6, 12, 8, generator=g).to(dtype)
    k, v = torch.randn(1, 2, 20, 8, generator=g).to(dtype), torch.randn(1, 2, 20, v_dim, generator=g).to(dtype)
    q_pos, k_pos = torch.arange(8, 20), torch.randperm(20, generator=g)
    k_pos[k_pos >= 17] -= 30  # three keys far back: the window hides them from every query
    assert kernels._masked_ok(torch.device("cpu"), dtype)  # probed once against naive, before the spy
    calls = []
    real = kernels._naive
    monkeypatch.setattr(kernels, "_naive", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    out, lse = attention(q, k, v, causal=True, scale=0.3, window=4, q_pos=q_pos, k_pos=k_pos)
    assert not calls and out.dtype == dtype
    ref = _masked_softmax(q, k, v, q_pos, k_pos, 4, 0.3)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.double(), ref, **tol)
    # one query (a decode step over keys by position): the same as its row of the many
    one, one_lse = attention(q[:, :, -1:], k, v, causal=True, scale=0.3, window=4, q_pos=q_pos[-1:], k_pos=k_pos)
    torch.testing.assert_close(one.double(), ref[:, :, -1:], **tol)
    torch.testing.assert_close(one_lse, lse[:, :, -1:], **tol)
    # queries whose window holds none of these keys (the keys are of another host)
    far = torch.tensor([0, 1, 15])
    out, lse = attention(q, k[:, :, :3], v[:, :, :3], causal=False, scale=0.3, window=4, q_pos=q_pos, k_pos=far)
    d = q_pos[:, None] - far[None]
    blind = ~((d >= 0) & (d < 4)).any(-1)
    assert blind.any() and torch.isneginf(lse[:, :, blind]).all() and (out[:, :, blind] == 0).all()
    assert torch.isfinite(lse[:, :, ~blind]).all()
    attention(q, k, v, causal=True, scale=0.3, window=4, q_pos=q_pos, k_pos=k_pos, softcap=5.0)
    assert calls


def test_window_arguments_are_checked():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="both q_pos and k_pos"):
        attention(q, q, q, window=2, q_pos=torch.arange(4))
    with pytest.raises(ValueError, match="at least one key"):
        attention(q, q, q, window=0)
    with pytest.raises(ValueError, match="causal=True"):
        attention(q, q, q, causal=False, window=2)


LAYOUTS = {
    "ring": lambda n, w, q: build_method("ring", MethodConfig()).layout(n, w, q),
    "ulysses": lambda n, w, q: build_method("ulysses", MethodConfig()).layout(n, w, q),
    "star": lambda n, w, q: build_method("star", MethodConfig()).layout(n, w, q),
    # apb's broadcast anchor: hosts 2.. hold none
    "apb:shared": lambda n, w, q: build_method("apb", MethodConfig(share_anchor=True)).layout(n, w, q),
    "apb:unshared": lambda n, w, q: build_method("apb", MethodConfig(share_anchor=False)).layout(n, w, q),
    "spava": lambda n, w, q: build_method("spava", MethodConfig(anchor_len=20, share_anchor=False)).layout(n, w, q),
    # the anchor split over the hosts (spava's default): its tokens, real and each on one host, come as halo too
    "spava:shared": lambda n, w, q: build_method("spava", MethodConfig(anchor_len=20)).layout(n, w, q),
    # apb's default, the anchor split over hosts 0..W-2: copies (host 0's share too), never real
    "apb": lambda n, w, q: build_method("apb", MethodConfig()).layout(n, w, q),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("n,world,window", [(301, 3, 16), (301, 4, 90), (257, 2, 300), (100, 4, 2)])
def test_halo_plan_gives_every_real_row_its_whole_window_once(name, n, world, window):
    n_query = 9
    slices = LAYOUTS[name](n, world, n_query)
    plans = [halo_plan(slices, r, window) for r in range(world)]
    real = [(s.rank, c) for s in slices for c, is_real in zip(s.chunks, real_chunks(slices, s.rank)) if is_real]
    blocks = {i: r for r, c in real[::-1] for i in range(c.start, min(c.stop, n))}  # the lowest rank holding i
    for r, (s, plan) in enumerate(zip(slices, plans)):
        local = set()
        for c, real in zip(s.chunks, real_chunks(slices, r)):
            if real:
                local.update(range(c.start, min(c.stop, n)))
        received = [int(i) for idx in plan.recv.values() for i in idx]
        assert len(received) == len(set(received)) and not set(received) & local  # nothing twice, nothing held
        for src, idx in plan.recv.items():
            assert all(blocks[int(i)] == src for i in idx)  # from the (first) host holding it as a real token
            assert torch.equal(plans[src].send[r], idx)  # what src sends is what r expects
            rows = plans[src].send_rows[r]
            assert torch.equal(slices[src].indices[rows], idx)  # and the rows it sends hold those tokens
        seen = local | set(received)
        for i in sorted(local):
            assert set(range(max(0, i - window + 1), i + 1)) <= seen, f"host {r} row {i}"
        needed = set()  # nothing beyond the window is sent
        for i in local:
            needed.update(range(max(0, i - window + 1), i + 1))
        assert set(received) <= needed


def test_anchor_copies_are_not_real_and_spava_anchors_are():
    star = LAYOUTS["star"](301, 3, 9)
    assert real_chunks(star, 1) == [False, True]  # anchor copy, block
    apb = LAYOUTS["apb:shared"](301, 3, 9)
    assert [c.kind for c in apb[1].chunks][:3] == ["anchor"] * 3 and not any(real_chunks(apb, 1)[:3])
    split = LAYOUTS["apb"](301, 3, 9)
    kinds = [[c.kind for c in s.chunks] for s in split]  # shares on hosts 0..W-2; host 0 keeps its scoring tail
    assert kinds == [["anchor", "anchor", "block", "query"], ["anchor", "anchor", "block"], ["block"]], kinds
    assert [real_chunks(split, r) for r in range(3)] == [[False, False, True, True], [False, False, True], [True]]
    spava = LAYOUTS["spava"](301, 3, 9)
    kinds = [c.kind for c, real in zip(spava[1].chunks, real_chunks(spava, 1)) if real]
    assert kinds.count("anchor") == 3 and kinds.count("block") == 2 and kinds.count("query") == 1


# ----------------------------------------------------------------------------- whole models


@pytest.fixture(scope="module")
def group():
    with LocalWorkerGroup(WORLD, worker_kwargs={"device": "cpu", "timeout_s": 120}, timeout_s=300) as g:
        yield g


def _all_sliding(path):
    return save_tiny(path, "mistral", sliding_window=40)


@pytest.mark.parametrize("decode_mode", ["gather", "distributed"])
def test_all_sliding_model_is_exact_under_every_method(group, tmp_path, decode_mode):
    """Mistral, every layer sliding over 40 tokens, 301-token prompt (ring's chunks are 51, spava's
    virtual blocks about 47, so halos come from one or two hosts back): with no global layer, even
    the approximate methods have nothing to approximate, and all must equal eager."""
    _, _, rows = run_methods(group, _all_sliding(tmp_path / "m"), 301, EXACT + APPROX, decode_mode=decode_mode)
    assert_exact(rows, f"mistral sliding 40, {decode_mode}")


HYBRIDS = {
    # Gemma 3: two sliding layers, a global one, a sliding one (its own rope per layer type)
    "gemma3_text": dict(sliding_window=24, num_hidden_layers=4, query_pre_attn_scalar=16,
                        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]),
    # Gemma 2: softcapped scores, sliding and global layers alternating
    "gemma2": dict(sliding_window=24, attn_logit_softcapping=20.0, final_logit_softcapping=None,
                   query_pre_attn_scalar=16),
    # gpt-oss: attention sinks on sliding and global layers, MoE
    "gpt_oss": dict(sliding_window=24, num_local_experts=4, num_experts_per_tok=2),
    # Qwen2 with sliding windows on the first layer only (max_window_layers)
    "qwen2": dict(sliding_window=24, use_sliding_window=True, max_window_layers=1),
}


@pytest.mark.parametrize("family", list(HYBRIDS))
def test_hybrid_models_are_exact_under_the_exact_methods(group, tmp_path, family):
    path = save_tiny(tmp_path / family, family, **HYBRIDS[family])
    _, _, rows = run_methods(group, path, 241, EXACT)
    assert_exact(rows, family)
    _, _, rows = run_methods(group, path, 241, ["ring", "spava:uncompressed"], decode_mode="distributed")
    assert_exact(rows, f"{family} distributed")


@pytest.mark.parametrize("name", ["star", "spava", "apb:split"])
def test_approximate_methods_keep_sliding_layers_exact(group, tmp_path, name):
    """Gemma 3 (sliding, sliding, global, sliding): the K/V of layers 0-2 come from the inputs of
    layers 0-2, which only sliding layers computed, so they equal eager's; layer 3's come after the
    approximated global layer 2, and differ."""
    path = save_tiny(tmp_path / "g3", "gemma3_text", **HYBRIDS["gemma3_text"])
    ref_model = load_model(path, attn_implementation="eager")
    ids = random_prompt(241, ref_model.config.vocab_size, 3)
    ref = reference_run(ref_model, ids, N_NEW)
    # apb scores with the query at its true positions, turned with each layer type's own angles
    req = PromptRequest(str(path), ids, name, n_query=17, return_cache=True,
                        sampling=Sampling(max_new_tokens=N_NEW, stop_at_eos=False))
    got = group.call("run_prompt", req)[0]
    for layer in range(3):
        diff = (got.cache.keys[layer] - ref.keys[layer]).abs().max().item()
        diff = max(diff, (got.cache.values[layer] - ref.values[layer]).abs().max().item())
        assert diff <= 1e-4, f"{name} layer {layer}: K/V differ by {diff:.2e} after sliding layers only"
    diff = (got.cache.keys[3] - ref.keys[3]).abs().max().item()
    assert diff > 1e-3, f"{name}: layer 3 was expected to see the approximated global layer (K differs by {diff:.2e})"


@pytest.mark.parametrize("decode_mode", ["gather", "distributed"])
def test_a_prefill_for_decoding_keeps_of_a_sliding_layer_only_what_a_later_token_sees(group, tmp_path, decode_mode):
    """Gemma 3 (sliding over 24, sliding, global, sliding), 241 tokens of which 17 are the query,
    W = 3, every method run twice: with its cache returned whole (verification) and as a user runs
    it. The user's run keeps on each host, of each sliding layer, only the positions from
    ``241 - 17 - 23`` on, and of each global layer all it caches (counted from the method's
    layout, against the bytes the host kept); it answers with the same tokens and logits as the
    whole run, and the exact methods with eager transformers' own. The driver's memory estimate
    of each host's K/V bounds what it kept."""
    import dataclasses

    from apb.runtime import memory

    from transformers import AutoConfig

    n, n_query, window = 241, 17, HYBRIDS["gemma3_text"]["sliding_window"]
    path = save_tiny(tmp_path / "g3", "gemma3_text", **HYBRIDS["gemma3_text"])
    cfg = AutoConfig.from_pretrained(path)
    kinds = cfg.layer_types
    ref = reference_run(load_model(path, attn_implementation="eager"), random_prompt(n, 256, 3), N_NEW)
    cutoff = n - n_query - (window - 1)
    for name in EXACT + APPROX:
        whole = PromptRequest(str(path), random_prompt(n, 256, 3), name, n_query=n_query, decode_mode=decode_mode,
                              return_cache=True, sampling=Sampling(max_new_tokens=N_NEW, stop_at_eos=False))
        full = group.call("run_prompt", whole)
        lean = group.call("run_prompt", dataclasses.replace(whole, return_cache=False))
        assert lean[0].tokens == full[0].tokens, name
        torch.testing.assert_close(lean[0].last_logits, full[0].last_logits, atol=1e-5, rtol=0)
        if name in EXACT:
            assert lean[0].tokens == ref.tokens, name
        method = build_method(name, MethodConfig())
        for s, a, b in zip(method.layout(n, WORLD, n_query), full, lean):
            pos = s.positions[s.valid]
            if method.query_phase and s.rank == 0:  # the query phase appends the query's K/V on host 0
                pos = torch.cat([pos, torch.arange(n - n_query, n)])
            if not len(pos):  # a host that caches nothing (full's idle hosts)
                assert a.cache_bytes == b.cache_bytes == 0, (name, s.rank)
                continue
            per = a.cache_bytes / (len(pos) * len(kinds))  # one position of one layer
            seen = int((pos >= cutoff).sum())
            want = sum(len(pos) if kind == "full_attention" else seen for kind in kinds) * per
            assert b.cache_bytes == want, (name, s.rank, b.cache_bytes, want, a.cache_bytes)
            # the driver's estimate bounds it, and is it on the host that holds the whole window
            est = memory.estimate(method, cfg, 0, n, n_query, WORLD, "float32", decode_mode, N_NEW)[s.rank].kv
            assert b.cache_bytes <= est and (seen < n - cutoff or b.cache_bytes == est), (name, s.rank, est)
        assert sum(b.cache_bytes for b in lean) < sum(a.cache_bytes for a in full), name


def test_one_host_bridge_slides_as_eager(tmp_path):
    """The plain path (no context: one host, or decoding) applies the window itself."""
    path = _all_sliding(tmp_path / "m")
    ids = random_prompt(150, 256, 0)[None]
    with torch.no_grad():
        ours = load_model(path)(ids).logits
        ref = load_model(path, attn_implementation="eager")(ids).logits
        flat = load_model(path, attn_implementation="eager")
        flat.config.sliding_window = None
        assert (flat(ids).logits - ref).abs().max() > 1e-3  # the window matters at this length
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_halo_bytes_are_only_the_window(group, tmp_path):
    """Ring at W=3 on an all-sliding model: each sliding layer's exchange moves exactly the halo
    (window - 1 keys and values before each chunk that another host holds), counted on the wire."""
    path = _all_sliding(tmp_path / "m")
    n = 301
    ids = random_prompt(n, 256, 0)
    req = PromptRequest(str(path), ids, "ring", n_query=17, sampling=Sampling(max_new_tokens=1))
    results = group.call("run_prompt", req)
    slices = build_method("ring", MethodConfig()).layout(n, WORLD, 17)
    model = load_model(path)
    cfg = model.config
    per_token = 2 * cfg.num_key_value_heads * cfg.head_dim * 4  # K and V, float32
    for r, res in enumerate(results):
        expected = sum(idx.numel() for idx in halo_plan(slices, r, 40).send.values()) * per_token
        sent = [o for o in res.stats["ops"] if o["op"] == "halo_exchange"]
        assert len(sent) == cfg.num_hidden_layers
        assert all(o["bytes"] == expected for o in sent), (r, sent, expected)


def test_apb_run_answers_with_a_saved_hybrid_checkpoint(apb_bin, repo, tmp_path):
    """A Gemma 3-style checkpoint (sliding, sliding, global, sliding; window 32) saved by
    save_pretrained, through `apb run` at W=2 on documents of 200-700 tokens: ring answers as
    full does, for every document."""
    import json
    import subprocess

    from transformers import AutoConfig, AutoModelForCausalLM

    from apb.model.text import byte_tokenizer

    ckpt = tmp_path / "hybrid"
    cfg = AutoConfig.for_model("gemma3_text", vocab_size=512, hidden_size=96, intermediate_size=96,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=32,
                               query_pre_attn_scalar=16, num_hidden_layers=4, tie_word_embeddings=False,
                               layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                            "sliding_attention"])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(ckpt, safe_serialization=True)
    byte_tokenizer().save_pretrained(ckpt)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": f"d{i}", "context": "Alpha beta gamma delta. " * (8 + 10 * i),
                                       "question": "Which word comes first?", "max_new_tokens": 6}) + "\n"
                           for i in range(3)))
    answers = {}
    for method in ("full", "ring"):
        dst = tmp_path / f"{method}.jsonl"
        proc = subprocess.run([apb_bin, "run", "--config", str(repo / "configs/tiny-cpu.yaml"), "--set",
                               f"model.name_or_path={ckpt}", "--world-size", "2", "--method", method,
                               "--input", str(src), "--output", str(dst), "--no-progress"],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        recs = [json.loads(x) for x in dst.read_text().splitlines()]
        assert [r["error"] for r in recs] == [None] * 3 and [r["id"] for r in recs] == ["d0", "d1", "d2"]
        assert all(r["prompt_tokens"] > 32 for r in recs)
        answers[method] = [r["answer"] for r in recs]
    assert answers["ring"] == answers["full"]


def test_decoding_drops_what_a_sliding_layer_can_no_longer_see():
    """One host, a 50-token cache, window 8: decoding position 50 keeps positions 43..50 of that
    layer (and all of a global one), and attends exactly as over the whole cache with the window."""
    from types import SimpleNamespace

    from apb.methods.cache_attention import CacheAttnContext
    from apb.parallel.comm import Comm

    torch.manual_seed(0)
    k, v = torch.randn(1, 2, 50, 8), torch.randn(1, 2, 50, 8)
    ctx = CacheAttnContext(Comm(None), {0: (k, v), 1: (k, v)}, torch.arange(50), holds_new=True, trim_windows=True)
    q, nk, nv = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8)
    ctx.start_step(torch.tensor([50]))
    out = ctx.step(SimpleNamespace(layer_idx=0), q, nk, nv, 0.3, sliding_window=8)
    ctx.step(SimpleNamespace(layer_idx=1), q, nk, nv, 0.3)
    assert ctx.kv[0][0].shape[2] == 8 and ctx.kv[1][0].shape[2] == 51
    whole_k, whole_v = torch.cat([k, nk], 2), torch.cat([v, nv], 2)
    ref = _masked_softmax(q, whole_k, whole_v, torch.tensor([50]), torch.arange(51), 8, 0.3)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    ctx.start_step(torch.tensor([51]))  # the next token: one more entry out, one in
    ctx.step(SimpleNamespace(layer_idx=0), q, nk, nv, 0.3, sliding_window=8)
    assert ctx.kv[0][0].shape[2] == 8 and ctx._layer_positions[0][0].tolist() == list(range(44, 52))


def test_decoding_appends_into_one_buffer_and_decides_windows_without_reading_the_device():
    """The holder's cache grows in place (one buffer for ``room`` steps, no per-step copy of the
    cache), a leading cut is a view, and which entries a sliding layer sees is decided from the
    CPU positions: with the cache and its device positions on the meta device (whose values
    cannot be read), the decision still comes out."""
    from apb.methods.cache_attention import CacheAttnContext, _Appendable
    from apb.parallel.comm import Comm

    torch.manual_seed(0)
    k, v = torch.randn(1, 2, 10, 4), torch.randn(1, 2, 10, 4)
    buf = _Appendable((k, v), room=3)
    first = buf.bufs[0].data_ptr()
    steps = [(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4)) for _ in range(5)]
    for i, new in enumerate(steps):
        buf.append(new)
        if i < 3:
            assert buf.bufs[0].data_ptr() == first  # within the room: written in place
    torch.testing.assert_close(buf.view()[0], torch.cat([k] + [s[0] for s in steps], 2))
    buf.keep(slice(4, 15))  # a leading cut: the start moves, nothing is copied
    assert buf.start == 4 and buf.view()[1].shape[2] == 11
    torch.testing.assert_close(buf.view()[1], torch.cat([v] + [s[1] for s in steps], 2)[:, :, 4:])
    buf.keep(torch.tensor([0, 2]))
    torch.testing.assert_close(buf.view()[0], torch.cat([k] + [s[0] for s in steps], 2)[:, :, [4, 6]])

    meta = (torch.empty(1, 2, 50, 4, device="meta"),) * 2
    ctx = CacheAttnContext(Comm(None), {0: meta}, torch.arange(50, device="meta"), holds_new=False,
                           trim_windows=True, positions_cpu=torch.arange(50))
    ctx.start_step(torch.tensor([50]))
    cached, window = ctx._in_window(0, meta, 8, torch.device("meta"))
    assert cached[0].shape[2] == 7 and window["cache_pos"].shape == (7,)  # 43..49, and 50 itself
    assert ctx._layer_positions[0][0].tolist() == list(range(43, 50)) and ctx.kv[0][0].shape[2] == 7
