"""star / apb / spava on real worker processes: communication patterns, decode modes, compressors."""

import pytest
import torch
import torch.distributed as dist
from transformers import AutoConfig

from apb.methods.compressors import random_retaining_heads
from apb.config import load_config
from apb.runtime.decode import Sampling
from apb.model.catalog import resolve_model
from apb.parallel.comm import STAGE_ENV
from apb.parallel.groups.local import LocalWorkerGroup
from apb.tools.verify import random_prompt, verify
from apb.runtime.worker import PromptRequest, Worker

KV_HEADS, HEAD_DIM, LAYERS = 4, 16, 2  # tiny-llama


@pytest.fixture(scope="module")
def group3():
    with LocalWorkerGroup(3, worker_kwargs={"device": "cpu", "timeout_s": 120}, timeout_s=300) as g:
        yield g


def _run(group, method, n=900, n_query=20, decode_mode="gather", tokens=4, model="tiny-llama", **options):
    req = PromptRequest(str(resolve_model(model)), random_prompt(n, 512, seed=n), method,
                        method_options=options, n_query=n_query, decode_mode=decode_mode,
                        sampling=Sampling(max_new_tokens=tokens, stop_at_eos=False))
    return group.call("run_prompt", req)


def _ops(reply, phase, op=None):
    return [o for o in reply.stats["ops"] if o["phase"] == phase and (op is None or o["op"] == op)]


def test_apb_one_all_gather_per_layer_of_the_passing_block(group3):
    p = 24
    for reply in _run(group3, "apb", passing_len=p, anchor_len=64, share_anchor=False):
        ctx_ops = _ops(reply, "context")
        assert sorted((o["layer"], o["op"]) for o in ctx_ops) == [(layer, "all_gather") for layer in range(LAYERS)]
        for o in ctx_ops:
            assert o["calls"] == 1
            assert o["bytes"] == p * 2 * KV_HEADS * HEAD_DIM * 4  # float32


def test_apb_per_layer_passing_budget(group3):
    for reply in _run(group3, "apb", passing_len=[8, 40], share_anchor=False):
        sent = {o["layer"]: o["bytes"] for o in _ops(reply, "context", "all_gather")}
        assert sent == {0: 8 * 2 * KV_HEADS * HEAD_DIM * 4, 1: 40 * 2 * KV_HEADS * HEAD_DIM * 4}


def test_star_context_phase_sends_nothing(group3):
    for reply in _run(group3, "star"):
        assert _ops(reply, "context") == []
        # the query phase merges one partial attention per layer
        assert sorted(o["layer"] for o in _ops(reply, "query", "partial_merge")) == list(range(LAYERS))


def test_spava_one_overlapped_all_gather_per_layer(group3):
    p = 16
    for reply in _run(group3, "spava", passing_len=p, anchor_len=32, share_anchor=False):
        gathers = _ops(reply, "context", "all_gather")
        assert sorted(o["layer"] for o in gathers) == list(range(LAYERS))
        # two virtual blocks per host, each sending p K/V pairs per KV head
        assert all(o["bytes"] == 2 * p * 2 * KV_HEADS * HEAD_DIM * 4 and o["calls"] == 1 for o in gathers)
        merges = _ops(reply, "context", "partial_merge")
        assert sorted(o["layer"] for o in merges) == list(range(LAYERS))


def test_ring_steps_per_layer_at_three_hosts(group3):
    for reply in _run(group3, "ring"):
        steps = _ops(reply, "context", "ring_send_recv")
        assert sorted(o["layer"] for o in steps) == list(range(LAYERS))
        assert all(o["calls"] == 2 for o in steps)  # W - 1


@pytest.mark.parametrize("method", ["full", "ring", "ulysses", "star", "apb", "spava"])
def test_decode_modes_give_identical_tokens(group3, method):
    first = _run(group3, method, tokens=10)[0]
    gathered = first.tokens
    distributed = _run(group3, method, tokens=10, decode_mode="distributed")
    assert distributed[0].tokens == gathered and len(gathered) == 10
    # each token's lead over the runner-up comes back from the decode host in both modes, alike
    assert len(first.leads) == len(distributed[0].leads) == 10 and min(first.leads) >= 0  # greedy
    assert distributed[0].leads == pytest.approx(first.leads, abs=1e-3)
    assert all(r.leads is None for r in distributed[1:])
    # distributed decoding moves partial attentions, never the cache
    assert not _ops(distributed[1], "gather") and _ops(distributed[1], "decode", "partial_merge")


def test_retaining_heads_compressor_runs_from_a_weights_file(group3, tmp_path):
    path = resolve_model("tiny-llama")
    weights = random_retaining_heads(tmp_path / "heads.safetensors", AutoConfig.from_pretrained(path), hidden=32)
    replies = _run(group3, "apb", compressor="retaining_heads", retaining_heads_path=str(weights), passing_len=12,
                   share_anchor=False)
    assert replies[0].tokens and len(replies[0].tokens) == 4
    assert all(o["bytes"] == 12 * 2 * KV_HEADS * HEAD_DIM * 4 for o in _ops(replies[1], "context", "all_gather"))


def test_compressor_choice_changes_the_result(group3):
    a = _run(group3, "apb", passing_len=8, compressor="query")[0].last_logits
    b = _run(group3, "apb", passing_len=8, compressor="stride")[0].last_logits
    assert not torch.allclose(a, b)


def test_uncompressed_variants_are_exact_with_distributed_decode(group3):
    cfg = load_config(None)
    rows = verify(cfg, group3, ["apb:uncompressed", "spava:uncompressed"], [777], models=["tiny-mistral"],
                  query_len=33, decode_mode="distributed")
    for r in rows:
        assert r.passed and r.max_abs_logit_diff <= 1e-4 and r.tokens_match, r


class WireCountingWorker(Worker):
    """The engine's worker, also counting the bytes each ``torch.distributed.all_to_all_single`` sends.

    DeepSpeed performs Ulysses' exchanges itself and the method only reports their size to
    :class:`CommStats` (``record_external``), so this counts at the torch.distributed call instead:
    every input row except the block addressed to this rank leaves the host.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sent: list[int] = []
        real = dist.all_to_all_single

        def counting(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
            world, rank = dist.get_world_size(group), dist.get_rank(group)
            splits = input_split_sizes or [input.shape[0] // world] * world
            row = input[0].numel() * input.element_size()
            self.sent.append((sum(splits) - splits[rank]) * row)
            return real(output, input, output_split_sizes, input_split_sizes, group, async_op)

        dist.all_to_all_single = counting

    def run_prompt(self, req):
        self.sent.clear()
        return super().run_prompt(req), list(self.sent)


@pytest.fixture(scope="module")
def wire3():
    with LocalWorkerGroup(3, "test_approx_methods:WireCountingWorker", {"device": "cpu", "timeout_s": 120},
                          timeout_s=300) as g:
        yield g


@pytest.mark.parametrize("heads,kv_heads,world", [(9, 3, 2), (8, 4, 3), (4, 2, 3), (12, 4, 5), (32, 8, 3), (6, 1, 4)])
def test_ulysses_sends_each_host_the_kv_heads_its_query_heads_use(heads, kv_heads, world):
    from apb.methods.ulysses import kv_shares

    sent, index = kv_shares(heads, kv_heads, world)
    m, share = len(sent) // world, -(-heads // world)
    assert len(sent) == world * m and all(len(ix) == share for ix in index)
    for r in range(world):
        mine = sent[r * m:(r + 1) * m]  # DeepSpeed's even split of the head dim
        for j, h in enumerate(range(r * share, (r + 1) * share)):
            if h < heads:  # a real query head reads the KV head transformers would give it
                assert mine[index[r][j]] == h // (heads // kv_heads), (r, h)
    # never more than one KV head per (padded) query head, the old replication
    assert m <= share


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-mistral"])  # 4 KV heads (uneven over 3 hosts), 6 (split)
def test_ulysses_counts_the_bytes_its_four_all_to_alls_send(wire3, model):
    n, world = 900, 3
    cfg = AutoConfig.from_pretrained(resolve_model(model))
    heads, kv_heads, head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    # indivisible KV heads: each host is sent those its query heads use, as many as the neediest host uses
    share = -(-heads // world)
    used = [{h * kv_heads // heads for h in range(r * share, min((r + 1) * share, heads))} for r in range(world)]
    kv_sent = kv_heads if kv_heads % world == 0 else world * max(len(u) for u in used)
    local = -(-n // world)  # tokens per host: the prompt right-padded to a multiple of W
    itemsize = torch.empty(0, dtype=torch.float32).element_size()  # PromptRequest's default dtype
    # q, k and v out, the attention output back; each host keeps 1/W of every tensor
    per_tensor = [local * h * head_dim * itemsize * (world - 1) // world for h in (heads, kv_sent, kv_sent, heads)]
    req = PromptRequest(str(resolve_model(model)), random_prompt(n, 512, seed=n), "ulysses",
                        sampling=Sampling(max_new_tokens=2, stop_at_eos=False))
    for reply, sent in wire3.call("run_prompt", req):
        assert reply.peak_prefill_bytes is None  # peak memory is a bench measurement (timed requests) only
        ops = _ops(reply, "context", "all_to_all")
        assert {o["layer"]: (o["calls"], o["bytes"]) for o in ops} == \
            {layer: (4, sum(per_tensor)) for layer in range(cfg.num_hidden_layers)}, ops
        # what torch.distributed was handed: the same four exchanges per layer, nothing else
        assert sorted(sent) == sorted(per_tensor * cfg.num_hidden_layers), (sent, per_tensor)
        assert sum(o["calls"] for o in reply.stats["ops"] if o["op"] == "all_to_all") == len(sent)


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-mistral"])
def test_approximate_methods_with_every_layer_exact_equal_full(group3, model):
    """With method.exact_layers covering every layer, the blocks attend every earlier token (for
    spava, its anchor too) and the query is exact: logits, cache and greedy tokens are a
    single-device forward's. tiny-mistral (12 query / 6 KV heads over 3 hosts) sends each host its
    query heads' KV heads unevenly."""
    cfg = load_config(None, {"method.exact_layers": LAYERS})
    rows = verify(cfg, group3, ["star", "apb", "spava"], [701], models=[model], query_len=33)
    assert len(rows) == 3
    for r in rows:
        assert r.passed and r.max_abs_logit_diff <= 1e-4 and r.kv_max_abs_diff <= 1e-4 and r.tokens_match, r
    # the last layer exact, the first approximate: its drift reaches the cache, so apb differs from
    # full. (The other way round is exact: the last layer's context outputs feed nothing the query reads.)
    part = verify(load_config(None, {"method.exact_layers": [LAYERS - 1]}), group3, ["apb"], [701],
                  models=[model], query_len=33)
    assert part[0].max_abs_logit_diff > 1e-3 and part[0].kv_max_abs_diff > 1e-3


def test_an_exact_layer_sends_one_packed_exchange_each_way_and_no_passing(group3):
    """Layer 1 exact at W=3: no all-gather there, two exchanges, and the bytes of the head shards:
    to each other host my rows' 4 query heads and 2 KV heads (12 query / 4 KV heads: hosts need KV
    heads {0,1}, {1,2}, {2,3}), then back to each host its rows of my 4 heads' output."""
    n_ctx = 900 - 20
    sizes = [294, 293, 293]  # the context's even split over 3 hosts
    for rank, reply in enumerate(_run(group3, "apb", exact_layers=[1], share_anchor=False)):
        ctx_ops = _ops(reply, "context")
        assert sorted((o["layer"], o["op"]) for o in ctx_ops) == [(0, "all_gather"), (1, "exact_layer")]
        (ex,) = [o for o in ctx_ops if o["op"] == "exact_layer"]
        out_of_me = 2 * sizes[rank] * (4 * HEAD_DIM + 2 * 2 * HEAD_DIM) * 4  # float32
        back = (n_ctx - sizes[rank]) * 4 * HEAD_DIM * 4
        assert ex["calls"] == 2 and ex["bytes"] == out_of_me + back, ex


def test_messages_through_host_copies_change_nothing(group3, monkeypatch):
    """Ranks sharing a GPU (parallel.share_gpus) talk over gloo, which moves only host memory, so
    every message is staged through host copies (apb.parallel.comm). Forced on here on CPU, every
    method gives what it gives unstaged, in both decode modes: each received tensor lands where the
    method reads it."""
    monkeypatch.setenv(STAGE_ENV, "1")  # the workers spawned below inherit it
    with LocalWorkerGroup(3, worker_kwargs={"device": "cpu", "timeout_s": 120}, timeout_s=300) as staged:
        for method, options in [("ring", {}), ("ulysses", {}), ("star", {}),
                                ("apb", {"passing_len": 24, "share_anchor": False}), ("spava", {"share_anchor": False}),
                                ("apb", {}), ("spava", {"anchor_len": 40})]:  # apb and spava share by default
            for mode in ("gather", "distributed"):
                want = _run(group3, method, decode_mode=mode, **options)[0]
                got = _run(staged, method, decode_mode=mode, **options)[0]
                assert torch.allclose(got.last_logits, want.last_logits, atol=1e-5, rtol=0), (method, mode)
                assert got.tokens == want.tokens, (method, mode)


def test_a_shared_anchor_sends_its_kv_and_the_query_vectors_once_per_layer(group3):
    """apb at W=3: host 1 runs the anchor (64 context tokens, the 20 query tokens embedded) and
    broadcasts its K and V and the query's vectors, which host 2 chooses its passing block with;
    the answer is the one every host's own anchor gives."""
    heads = 12
    want = _run(group3, "apb", passing_len=24, anchor_len=64, share_anchor=False)
    got = _run(group3, "apb", passing_len=24, anchor_len=64, share_anchor=True)
    for rank, reply in enumerate(got):
        sent = {o["layer"]: o["bytes"] for o in _ops(reply, "context", "anchor_broadcast")}
        per_layer = (64 + 20) * 2 * KV_HEADS * HEAD_DIM * 4 + 20 * heads * HEAD_DIM * 4 if rank == 1 else 0
        assert sent == {layer: per_layer for layer in range(LAYERS)}, (rank, sent)
    assert torch.allclose(got[0].last_logits, want[0].last_logits, atol=1e-5, rtol=0)
    assert got[0].tokens == want[0].tokens


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gemma2"])
def test_a_split_anchor_passes_what_every_hosts_own_anchor_passes(group3, model):
    """apb split at W=3: hosts 1 and 2 choose their passing blocks with the query's vectors
    gathered from the anchor's shares, host 0 with its own scoring tail (the query after its
    block, as without the split): in every layer each host passes the very tokens it passes with
    every host's own anchor. (gemma2: softcap, and blocks passed at its global layer only.)"""
    def passing(share):
        options = {"share_anchor": share}
        req = PromptRequest(str(resolve_model(model)), random_prompt(900, 512, seed=900), "apb",
                            method_options=options, n_query=20, diagnostics=True,
                            sampling=Sampling(max_new_tokens=1, stop_at_eos=False))
        return [reply.diagnostics["passing"] for reply in group3.call("run_prompt", req)]

    want, got = passing(False), passing("split")
    for rank, (w, g) in enumerate(zip(want, got)):
        assert w.keys() == g.keys() and w, (rank, w.keys(), g.keys())  # gemma2: its global layer only
        for layer in w:
            assert torch.equal(torch.as_tensor(w[layer]), torch.as_tensor(g[layer])), (rank, layer)


# the same attention whoever computes the anchor: softcap and sliding layers (gemma2), multi-head
# latent attention (deepseek-v3), sinks and sliding layers (gpt-oss); an exact layer (no broadcast
# there; spava's split anchor gathers its shares there too); a compressor that needs no query
# vectors; both decode modes. spava's anchor of 40 is split 13, 13, 14 over the hosts; apb's
# split anchor (its default 30-token anchor and the 20 query tokens) 17, 17, 16, with the query at
# its true positions except where a test says otherwise
SPAVA_SPLIT = {"anchor_len": 40}
APB_SPLIT = {"share_anchor": "split"}


@pytest.mark.parametrize("model,cases", [
    ("tiny-llama", [("star", {}, "gather"), ("apb", {}, "gather"), ("apb", {}, "distributed"),
                    ("apb", {"exact_layers": [1], "passing_len": 24}, "gather"),
                    ("apb", {"compressor": "stride"}, "gather"), ("star", {"anchor_len": 100}, "distributed"),
                    ("spava", SPAVA_SPLIT, "gather"), ("spava", SPAVA_SPLIT, "distributed"),
                    ("spava", {**SPAVA_SPLIT, "exact_layers": [1]}, "gather"),
                    ("apb", APB_SPLIT, "gather"), ("apb", APB_SPLIT, "distributed"),
                    ("apb", {**APB_SPLIT, "exact_layers": [1], "passing_len": 24}, "gather"),
                    ("apb", {**APB_SPLIT, "compressor": "stride"}, "gather")]),
    ("tiny-gemma2", [("star", {}, "gather"), ("apb", {}, "gather"), ("spava", SPAVA_SPLIT, "gather"),
                     ("apb", APB_SPLIT, "gather")]),
    ("tiny-deepseek-v3", [("star", {}, "gather"), ("apb", {}, "gather"), ("spava", SPAVA_SPLIT, "gather"),
                          ("apb", APB_SPLIT, "gather")]),
    ("tiny-gpt-oss", [("star", {}, "gather"), ("apb", {}, "distributed"), ("spava", SPAVA_SPLIT, "distributed"),
                      ("apb", APB_SPLIT, "distributed"), ("apb", {"query_positions": "anchor"}, "gather")]),
])
def test_a_shared_anchor_changes_nothing_but_who_computes_it(group3, model, cases):
    for method, options, mode in cases:
        options = {"share_anchor": True, **options}
        want = _run(group3, method, model=model, decode_mode=mode, **{**options, "share_anchor": False})
        got = _run(group3, method, model=model, decode_mode=mode, **options)
        assert torch.allclose(got[0].last_logits, want[0].last_logits, atol=1e-5, rtol=0), (method, options, mode)
        assert got[0].tokens == want[0].tokens, (method, options, mode)
        exact = set(options.get("exact_layers", []))
        if method == "spava":  # every global layer's all-gather carries the largest share (14 tokens) more
            for before, after in zip(want, got):
                gathered = {o["layer"]: o["bytes"] for o in _ops(before, "context", "all_gather")}
                shared = {o["layer"]: o["bytes"] for o in _ops(after, "context", "all_gather")}
                assert set(shared) == set(gathered) | exact and shared, (shared, gathered)
                share = {layer: shared[layer] - gathered.get(layer, 0) for layer in shared}
                assert len(set(share.values())) == 1 and min(share.values()) > 0, share
            continue
        if options["share_anchor"] == "split":  # one gather of the shares per layer, exact ones too; no broadcast
            for reply in got:
                gathered = {o["layer"] for o in _ops(reply, "context", "anchor_gather")}
                layers = {o["layer"] for o in _ops(reply, "context")}
                assert gathered == layers == set(range(len(layers))) and len(layers) >= 2, (gathered, layers)
                assert not _ops(reply, "context", "anchor_broadcast")
            continue
        broadcasts = [o for r in got for o in _ops(r, "context", "anchor_broadcast")]
        assert broadcasts and all(o["layer"] not in exact for o in broadcasts), broadcasts
