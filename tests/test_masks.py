"""The approximate methods' attention masks, checked against a dense reference, without processes.

Each host runs its method's attention step in a thread; a thread-backed communicator stands in
for the process group. Q/K/V are fixed random vectors per prompt token (no RoPE), so a token's
copies (the anchor) carry the same vectors, and the expected output of every local row is plain
softmax attention over exactly the keys design.md says that row sees, written out here by hand.
The ``stride`` compressor is used because its choice is known in closed form. The same harness
counts the (query, key) pairs each host's attention calls compute, the independent check of the
methods' cost formulas.
"""

import math
import sys
import threading
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from apb.config import MethodConfig
from apb.kernels import attention
from apb.methods import build_method, method_class
from apb.methods.anchored import passing_first
from apb.methods.base import AttnContext
from apb.methods.cache_attention import local_partial
from apb.methods.cost import Sizes, merge_bytes
from apb.parallel.comm import CommStats
from apb.parallel.layout import spava_holder

H, KV, D = 4, 2, 8


class ThreadComm:
    def __init__(self, rank, size, shared):
        self.rank, self.size, self.shared, self.stats, self.group = rank, size, shared, CommStats(), None

    def all_gather_start(self, t, op="all_gather"):
        sh = self.shared
        sh["slots"][self.rank] = t
        sh["barrier"].wait()
        out = list(sh["slots"])
        sh["barrier"].wait()
        self.stats.record(op, t.numel() * t.element_size())
        return SimpleNamespace(wait=lambda: out)

    def broadcast_start(self, t, src, op="broadcast"):
        sh = self.shared
        if self.rank == src:
            sh["slots"][src] = t
        sh["barrier"].wait()
        got = sh["slots"][src].reshape(t.shape).clone()
        sh["barrier"].wait()
        self.stats.record(op, t.numel() * t.element_size() if self.rank == src else 0)
        return SimpleNamespace(wait=lambda: [got])

    def exchange(self, sends, recv_shapes, dtype, device=None, op="exchange"):
        """Every host posts its tensors by destination, then takes what was posted to it."""
        sh = self.shared
        sh["slots"][self.rank] = dict(sends)
        sh["barrier"].wait()
        got = {src: sh["slots"][src][self.rank].reshape(shape) for src, shape in recv_shapes.items()}
        sh["barrier"].wait()
        self.stats.record(op, sum(t.numel() * t.element_size() for t in sends.values()))
        return got

    def ring(self):
        """Each step hands this host's tensor to the next and takes the previous host's."""
        sh, rank, size = self.shared, self.rank, self.size

        def wait():
            sh["barrier"].wait()
            got = sh["slots"][(rank - 1) % size]
            sh["barrier"].wait()
            return got

        return SimpleNamespace(send_recv=lambda t, into=None: sh["slots"].__setitem__(rank, t), commit=lambda: None,
                               wait=wait)


def run_hosts(method, n, n_query, world, vecs, layers=1, layer=0, comms=None):
    """Every host's attention step at ``layer`` of a ``layers``-layer plan, one thread per host;
    ``comms`` (a dict) gets each host's communicator, with its counters."""
    slices = method.layout(n, world, n_query)
    plan = method.plan(n, world, n_query, layers)
    shared = {"slots": [None] * world, "barrier": threading.Barrier(world)}
    outs, errors = [None] * world, []

    def host(r):
        try:
            idx = slices[r].indices
            q = vecs[0][idx].reshape(len(idx), H, D).permute(1, 0, 2)[None]
            k = vecs[1][idx].reshape(len(idx), KV, D).permute(1, 0, 2)[None]
            v = vecs[2][idx].reshape(len(idx), KV, D).permute(1, 0, 2)[None]
            ctx = AttnContext(method, slices, ThreadComm(r, world, shared), plan=plan, n_query=n_query)
            if comms is not None:
                comms[r] = ctx.comm
            outs[r] = method.attention(ctx, SimpleNamespace(layer_idx=layer), q, k, v, D ** -0.5)
        except BaseException as e:  # surface thread failures in the test
            errors.append(e)
            shared["barrier"].abort()

    threads = [threading.Thread(target=host, args=(r,), name=f"host-{r}") for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    return slices, plan, outs


def dense(vecs, g, keys):
    """Attention of prompt token g's query over prompt tokens ``keys`` (a list of indices)."""
    q = vecs[0][g].reshape(H, D).double()
    k = vecs[1][keys].reshape(len(keys), KV, D).double()
    v = vecs[2][keys].reshape(len(keys), KV, D).double()
    out = torch.empty(H, D, dtype=torch.float64)
    for h in range(H):
        s = k[:, h // (H // KV)] @ q[h] / math.sqrt(D)
        out[h] = torch.softmax(s, 0) @ v[:, h // (H // KV)]
    return out


def stride_pick(start, stop, p):
    t = stop - start
    return list(range(start, stop)) if p >= t else [start + (j * t) // p for j in range(p)]


def random_vecs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, H * D, generator=g), torch.randn(n, KV * D, generator=g), torch.randn(n, KV * D, generator=g)]


@pytest.mark.parametrize("world,n_ctx,n_query,anchor,passing", [(3, 91, 7, 9, 4), (4, 130, 5, 12, 6), (2, 50, 3, 0, 5)])
def test_apb_mask(world, n_ctx, n_query, anchor, passing):
    """apb with every host's own anchor (the shared anchor, the default, is tested below)."""
    n = n_ctx + n_query
    method = build_method("apb", MethodConfig(compressor="stride", anchor_len=anchor, passing_len=passing,
                                            query_insert_pos=3, share_anchor=False))
    vecs = random_vecs(n)
    slices, plan, outs = run_hosts(method, n, n_query, world, vecs)
    blocks = [s.blocks()[0] for s in slices]
    for r, s in enumerate(slices):
        idx = s.indices.tolist()
        anchor_rows = [i for i, c in enumerate(s.chunks) for _ in range(c.size) if c.kind == "anchor"]
        n_anchor = len(anchor_rows)
        passed = [t for src in range(r) for t in stride_pick(blocks[src].start, blocks[src].stop, passing)]
        for row, g in enumerate(idx):
            if row < n_anchor:
                keys = idx[: row + 1]  # anchor: causal over the anchor (query embedded in it)
            elif blocks[r].start <= g < blocks[r].stop and row < n_anchor + blocks[r].size:
                keys = passed + idx[:n_anchor] + list(range(blocks[r].start, g + 1))
            else:
                continue  # scoring-only query rows are not outputs
            got = outs[r][0, :, row].double()
            assert torch.allclose(got, dense(vecs, g, keys), atol=1e-5), (r, row, g)


# method.share_anchor: the hosts that receive the anchor hold no anchor rows, and their blocks
# attend exactly what they would with their own copy (the source's anchor, the query embedded)
@pytest.mark.parametrize("name,world,n_ctx,n_query,anchor,passing", [
    ("apb", 3, 91, 7, 9, 4), ("apb", 4, 130, 5, 12, 6), ("star", 3, 91, 0, 20, 0), ("star", 4, 130, 0, None, 0)])
def test_a_shared_anchor_gives_every_block_the_same_keys(name, world, n_ctx, n_query, anchor, passing):
    n = n_ctx + n_query
    method = build_method(name, MethodConfig(compressor="stride", anchor_len=anchor, passing_len=passing or None,
                                             query_insert_pos=3, share_anchor=True))
    vecs = random_vecs(n, seed=5)
    slices, plan, outs = run_hosts(method, n, n_query, world, vecs, comms=(comms := {}))
    source = 1 if name == "apb" else 0
    receivers = [r for r in range(1, world) if r != source]
    assert plan.anchor_from == source and plan.anchor_len > 0
    blocks = [s.blocks()[0] for s in slices]
    kinds = [[c.kind for c in s.chunks] for s in slices]
    for r in receivers:
        assert "anchor" not in kinds[r], kinds  # no host but the source runs the anchor
    if name == "apb":
        assert "anchor" in kinds[source]
        src = slices[source]
        anchor_keys = src.indices[src.rows("anchor")].tolist()  # context start, the query, more context
        assert len(anchor_keys) == plan.anchor_len + n_query
    else:
        assert kinds[0] == ["block"]
        anchor_keys = list(range(plan.anchor_len))  # the start of host 0's own block
    per_token = (2 * KV * D) * 4
    for r, c in comms.items():  # the source sends the anchor's K and V once; the others send nothing
        sent = sum(o.bytes for (_, _, op), o in c.stats.ops.items() if op == "anchor_broadcast")
        assert sent == (len(anchor_keys) * per_token if r == source else 0), (r, sent)
    for r, s in enumerate(slices):
        idx = s.indices.tolist()
        n_anchor = s.rows("anchor").stop - s.rows("anchor").start
        passed = [t for src_host in range(r) for t in stride_pick(blocks[src_host].start, blocks[src_host].stop,
                                                                  passing)] if passing else []
        seen_anchor = anchor_keys if r > 0 else []
        for row, g in enumerate(idx):
            if row < n_anchor:
                keys = idx[: row + 1]
            elif blocks[r].start <= g < blocks[r].stop and row < n_anchor + blocks[r].size:
                keys = passed + seen_anchor + list(range(blocks[r].start, g + 1))
            else:
                continue
            got = outs[r][0, :, row].double()
            assert torch.allclose(got, dense(vecs, g, keys), atol=1e-5), (r, row, g)


# share_anchor: split (apb): hosts 0..W-2, host 0 too, run contiguous shares of the anchor's rows
# (the query embedded counts: 9 + 7 = 16 over hosts 0, 1; 2 + 9 = 11 over hosts 0..2: 4, 4, 3, the
# query over all three; at W = 2 host 0 runs all of it), host W-1 none; gathered with the query's
# scoring vectors, every row attends exactly the keys it attends with its own anchor, and the
# passing blocks chosen with the query are the same
@pytest.mark.parametrize("world,n_ctx,n_query,anchor,passing", [
    (3, 91, 7, 9, 4), (4, 130, 5, 12, 6), (2, 50, 3, 5, 5), (4, 60, 9, 2, 3), (3, 40, 0, 6, 2)])
def test_a_split_anchor_gives_every_row_the_keys_of_its_own_anchor(world, n_ctx, n_query, anchor, passing):
    n = n_ctx + n_query
    method = build_method("apb", MethodConfig(compressor="stride", anchor_len=anchor, passing_len=passing,
                                              query_insert_pos=3, share_anchor="split"))
    vecs = random_vecs(n, seed=6)
    slices, plan, outs = run_hosts(method, n, n_query, world, vecs, comms=(comms := {}))
    assert plan.split and plan.anchor_from is None
    cut = min(3, anchor)  # A': the query after 3 tokens (or the whole anchor, if shorter)
    whole = list(range(cut)) + list(range(n_ctx, n)) + list(range(cut, anchor))
    held = [s.indices[s.rows("anchor")].tolist() for s in slices]
    assert [t for h in held for t in h] == whole  # contiguous shares, in host order, host 0 first
    assert max(map(len, held)) - min(map(len, held[:-1])) <= 1 and not held[-1]
    assert all("query" not in [c.kind for c in s.chunks] for s in slices)  # no scoring tail on host 0
    blocks = [s.blocks()[0] for s in slices]
    per_token = 2 * KV * D * 4
    for r, c in comms.items():  # every host sends the largest share (stride needs no query vectors)
        sent = sum(o.bytes for (_, _, op), o in c.stats.ops.items() if op == "anchor_gather")
        assert sent == max(map(len, held)) * per_token, (r, sent)
    checked = 0
    for r, s in enumerate(slices):
        idx = s.indices.tolist()
        n_anchor = len(held[r])
        before = sum(map(len, held[:r]))
        passed = [t for src in range(r) for t in stride_pick(blocks[src].start, blocks[src].stop, passing)]
        for row, g in enumerate(idx):
            if row < n_anchor:  # the anchor up to this row, the shares before it included
                keys = whole[: before + row + 1]
            else:
                keys = passed + (whole if r > 0 else []) + list(range(blocks[r].start, g + 1))
            got = outs[r][0, :, row].double()
            assert torch.allclose(got, dense(vecs, g, keys), atol=1e-5), (r, row, g)
            checked += 1
    assert checked == n_ctx + len(whole)


@pytest.mark.parametrize("world,n_ctx,n_query,anchor,holders", [(3, 91, 7, 9, 1), (3, 91, 12, 2, 2), (4, 60, 9, 2, 3),
                                                                 (2, 50, 12, 5, 1)])
def test_a_split_anchor_chooses_the_passing_blocks_with_the_querys_own_vectors(world, n_ctx, n_query, anchor, holders):
    """The query compressor scores each block with the query's vectors, which a split anchor
    spreads over one or more hosts: gathered, they choose what every host's own copy chooses."""
    n = n_ctx + n_query
    vecs = random_vecs(n, seed=7)
    outs = {}
    for share in (False, "split"):
        method = build_method("apb", MethodConfig(compressor="query", anchor_len=anchor, passing_len=3,
                                                  query_insert_pos=1, query_positions="anchor", share_anchor=share))
        slices, plan, got = run_hosts(method, n, n_query, world, vecs, comms=(comms := {}))
        outs[share] = {g: got[r][0, :, row] for r, s in enumerate(slices) for row, g in
                       enumerate(s.indices.tolist()) if row >= s.rows("anchor").stop and g < n_ctx}
        if share:
            q_rows = [sum(c.size for c in s.chunks if c.kind == "anchor" and c.start >= n_ctx) for s in slices]
            assert sum(q_rows) == n_query and sum(1 for x in q_rows if x) == holders, q_rows
            for r, c in comms.items():  # the largest share's K/V and the most query rows any host holds
                sent = sum(o.bytes for (_, _, op), o in c.stats.ops.items() if op == "anchor_gather")
                share_rows = max(s.rows("anchor").stop - s.rows("anchor").start for s in slices)
                assert sent == (share_rows * 2 * KV * D + max(q_rows) * H * D) * 4, (r, sent)
    assert outs[False].keys() == outs["split"].keys() and len(outs[False]) == n_ctx
    for g, want in outs[False].items():
        assert torch.allclose(outs["split"][g], want, atol=1e-5), g


# an exact layer at uneven blocks, with GQA shares (H=4 over KV=2 heads: at W=3 two heads per
# host, the last share one real head and one of padding) and with an anchor or none
@pytest.mark.parametrize("name,world,n_ctx,n_query,anchor", [("star", 3, 91, 7, 9), ("apb", 4, 130, 5, 12),
                                                             ("apb", 3, 100, 6, 0), ("spava", 3, 100, 6, 10),
                                                             ("spava", 4, 130, 5, 0), ("spava", 2, 61, 4, 7),
                                                             ("spava:shared", 3, 100, 6, 10), ("apb:split", 4, 130, 5, 12),
                                                             ("apb:split", 3, 100, 6, 2)])
def test_an_exact_layer_attends_every_earlier_context_token(name, world, n_ctx, n_query, anchor):
    n = n_ctx + n_query
    method = build_method(name, MethodConfig(name=name, compressor="stride", anchor_len=anchor, passing_len=3,
                                             exact_layers=[1]))
    vecs = random_vecs(n, seed=4)
    if method.query_phase:  # star and apb run the query in a second pass: the context alone here
        n, n_query = n_ctx, 0
    slices, plan, outs = run_hosts(method, n, n_query, world, vecs, layers=2, layer=1)
    assert plan.exact == {1} and plan.passing[1] == 0 and (name == "star" or plan.passing[0] > 0)
    checked = 0
    for r, s in enumerate(slices):
        for c, rows in s.chunk_rows():
            if c.kind == "anchor" and (name.startswith("spava") or method.config.share_anchor == "split"):
                # the anchor causally over itself (split: gathered; apb's context pass holds no query)
                for row, g in zip(range(rows.start, rows.stop), range(c.start, c.stop)):
                    assert torch.allclose(outs[r][0, :, row].double(), dense(vecs, g, list(range(g + 1))), atol=1e-5)
            if c.kind != "block":
                continue  # apb's and star's anchors and the query are as in the other layers (tests above)
            for row, g in zip(range(rows.start, rows.stop), range(c.start, c.stop)):
                got = outs[r][0, :, row].double()
                assert torch.allclose(got, dense(vecs, g, list(range(g + 1))), atol=1e-5), (r, row, g)
                checked += 1
    assert checked == n_ctx - (plan.anchor_len if name.startswith("spava") else 0)


# with share_anchor the anchor is split: each host holds (and runs) only the share it caches,
# at uneven shares too (anchor 10 over 3 hosts: 3, 3, 4; 7 over 4: 1, 2, 2, 2), and no key changes
@pytest.mark.parametrize("world,n_ctx,n_query,anchor,passing,split", [
    (3, 100, 6, 10, 3, False), (2, 61, 4, 0, 2, False), (1, 40, 3, 5, 2, False),
    (3, 100, 6, 10, 3, True), (4, 130, 5, 7, 2, True), (2, 61, 4, 9, 0, True), (1, 40, 3, 5, 2, True),
    (3, 100, 6, 2, 3, True)])  # host 0 holds none of an anchor of 2
def test_spava_mask_and_exact_query(world, n_ctx, n_query, anchor, passing, split):
    n = n_ctx + n_query
    method = build_method("spava", MethodConfig(compressor="stride", anchor_len=anchor, passing_len=passing,
                                                share_anchor=split))
    vecs = random_vecs(n, seed=1)
    slices, plan, outs = run_hosts(method, n, n_query, world, vecs, comms=(comms := {}))
    vblocks = {c.chunk_id: c for s in slices for c in s.blocks()}
    a = plan.anchor_len
    held = [s.indices[s.rows("anchor")].tolist() for s in slices]
    cached = [s.indices[s.valid].tolist() for s in slices]
    if split:  # each anchor token on exactly one host, the one caching it
        assert sorted(t for h in held for t in h) == list(range(a))
        assert all(set(h) <= set(c) for h, c in zip(held, cached))
    else:
        assert all(h == list(range(a)) for h in held)
    per_token = 2 * KV * D * 4
    for r, c in comms.items():  # one all-gather: both passing blocks and, split, the largest anchor share
        sent = sum(o.bytes for (_, _, op), o in c.stats.ops.items() if op == "all_gather")
        share = -(-a // world) if split and world > 1 else 0
        width = max(min(passing, b.size) for b in vblocks.values()) if world > 1 else 0
        assert sent == (2 * width + share) * per_token, (r, sent)
    for r, s in enumerate(slices):
        first, second = s.blocks()
        for (c, rows) in s.chunk_rows():
            for row, g in zip(range(rows.start, rows.stop), range(c.start, c.stop)):
                if c.kind == "anchor":
                    keys = list(range(0, g + 1))
                elif c.kind == "block":
                    passed = []
                    for host, slot in [spava_holder(j, world) for j in range(c.chunk_id)]:
                        if host != r:
                            src = slices[host].blocks()[slot]
                            passed += stride_pick(src.start, src.stop, passing)
                    local = list(range(0, a)) + (list(range(first.start, first.stop)) if c is second else [])
                    keys = passed + local + list(range(c.start, g + 1))
                else:  # the query: every context token exactly once, then the query causally
                    keys = list(range(0, n_ctx)) + list(range(n_ctx, g + 1))
                got = outs[r][0, :, row].double()
                assert torch.allclose(got, dense(vecs, g, keys), atol=1e-5), (r, c.kind, row, g)
    assert sorted(vblocks) == list(range(2 * world))


def test_passing_visibility_rules():
    from apb.parallel.layout import apb_passing_sources, spava_passing_sources

    assert apb_passing_sources(0) == [] and apb_passing_sources(3) == [0, 1, 2]
    # W=2: virtual blocks 0..3 live on hosts 0, 1, 1, 0
    assert [spava_holder(j, 2) for j in range(4)] == [(0, 0), (1, 0), (1, 1), (0, 1)]
    assert spava_passing_sources(0, 2) == []
    assert spava_passing_sources(1, 2) == [(0, 0)]
    assert spava_passing_sources(2, 2) == [(0, 0)]  # block 1 is on the same host: seen in full
    assert spava_passing_sources(3, 2) == [(1, 0), (1, 1)]  # block 0 is local
    with pytest.raises(ValueError):
        spava_holder(4, 2)


# ---------------------------------------------------------------------------------------------
# cost formulas: the pairs the attention steps compute, counted at the kernel


@pytest.fixture
def pair_counter(monkeypatch):
    """Counts, per host thread, the (query, key) pairs every attention call of a method computes,
    over all ``H`` heads (a call on fewer heads counts its share: an exact layer's head shard).

    A causal call is aligned bottom-right (query i of q_len sees keys 0 .. k_len - q_len + i).
    """
    counts: Counter = Counter()

    def counting(q, k, v, *args, **kwargs):
        causal = kwargs.get("causal", args[0] if args else False)
        q_len, k_len = q.shape[2], k.shape[2]
        seen = torch.arange(k_len - q_len + 1, k_len + 1).clamp(0, k_len) if causal else torch.full((q_len,), k_len)
        counts[threading.current_thread().name] += int(seen.sum()) * q.shape[1] / H
        return attention(q, k, v, *args, **kwargs)

    for name, module in list(sys.modules.items()):
        if name.startswith("apb.methods.") and getattr(module, "attention", None) is attention:
            monkeypatch.setattr(module, "attention", counting)
    return counts


def _query_phase(slices, vecs, n_ctx, n_query):
    """star/apb's second pass at one layer: each host's query partial over its own cache."""
    q = vecs[0][n_ctx:].reshape(n_query, H, D).permute(1, 0, 2)[None]
    k, v = (x[n_ctx:].reshape(n_query, KV, D).permute(1, 0, 2)[None] for x in vecs[1:])
    for r, s in enumerate(slices):
        cached = s.indices[s.valid]
        ck, cv = (x[cached].reshape(len(cached), KV, D).permute(1, 0, 2)[None] for x in vecs[1:])
        t = threading.Thread(target=local_partial, args=(q, ck, cv, k, v, D ** -0.5, r == 0), name=f"host-{r}")
        t.start()
        t.join()


# (method, world, query tokens): at n_ctx = 1024 the default sizes are whole numbers (apb: anchor
# 64, passing 32; spava: anchor 16, passing 8, virtual block 126), so plan() and cost() agree on
# them; full's formula is the single device, ring's ignores the query, so both run without one.
# ulysses is left out: its attention step is DeepSpeed's (test_exact_methods checks it equals full).
@pytest.mark.parametrize("name,world,n_query", [("full", 1, 0), ("ring", 4, 0), ("star", 4, 8), ("apb", 4, 8),
                                                ("spava", 4, 8), ("spava", 3, 0)])
def test_cost_formula_counts_the_pairs_the_attention_steps_compute(pair_counter, name, world, n_query):
    n_ctx = 1024
    method = build_method(name, MethodConfig(compressor="stride"))
    vecs = random_vecs(n_ctx + n_query, seed=2)
    if method.query_phase:  # the context runs alone, then the query as a second pass over the caches
        slices, _, _ = run_hosts(method, n_ctx, 0, world, vecs)
        _query_phase(slices, vecs, n_ctx, n_query)
    else:
        run_hosts(method, n_ctx + n_query, n_query, world, vecs)
    # apb's default split anchor: its cost is the slower of two hosts at the shape's rates, here
    # by pairs alone
    shape = SimpleNamespace(layers=1, heads=H, kv_heads=KV, head_dim=D, bytes_per_param=4,
                            linear_flops=lambda tokens: 0.0, attn_flops_per_pair=lambda: 1.0,
                            rates=(1.0, 1.0))
    formula = method_class(name).cost(n_ctx, world, shape, Sizes(query=n_query)).pairs
    slowest = max(pair_counter.values())
    # the formulas count a causal square of m tokens as m^2/2 pairs; the kernel also computes its
    # diagonal, m/2 more, so the count may exceed the formula by under 1%, never fall short
    assert formula <= slowest <= formula * 1.01, (name, slowest, formula, dict(pair_counter))


# per-layer sizes: star and apb with layer 1 of 3 exact (a head shard of the whole context: at
# W=4 one of the 4 heads, at W=3 two, one of them padding), apb and spava with a different
# passing length in every layer
@pytest.mark.parametrize("name,world,options", [
    ("star", 4, {"exact_layers": [1]}),
    ("star", 3, {"exact_layers": [1], "anchor_len": 64}),
    ("apb", 4, {"exact_layers": [1], "passing_len": 16}),
    ("apb", 4, {"passing_len": [16, "all", 0], "anchor_len": 0.125}),
    ("spava", 4, {"passing_len": [8, "all", 0], "anchor_len": 32}),
    ("spava", 3, {"exact_layers": [1], "anchor_len": 32}),
    ("spava", 4, {"exact_layers": [0, 2], "anchor_len": 0}),
    ("apb", 4, {"share_anchor": True, "passing_len": [16, 64, 0]}),
    ("star", 3, {"share_anchor": True, "anchor_len": 64}),
    ("star", 4, {"share_anchor": True, "exact_layers": [1]}),
    ("apb", 3, {"share_anchor": False, "exact_layers": [2], "passing_len": 16}),
    ("spava", 4, {"share_anchor": True, "passing_len": [8, "all", 0], "anchor_len": 32}),
    ("spava", 3, {"share_anchor": True, "exact_layers": [1], "anchor_len": 30}),
    ("apb", 4, {"share_anchor": "split", "passing_len": [16, 64, 0]}),
    ("apb", 3, {"share_anchor": "split", "exact_layers": [1], "passing_len": 16, "anchor_len": 60}),
    ("apb", 4, {"share_anchor": "split", "exact_layers": [1], "passing_len": 64}),  # passing outweighs the shares
])
def test_cost_formula_counts_each_layers_pairs(pair_counter, name, world, options):
    n_ctx, n_query, layers = 1024, 8, 3
    method = build_method(name, MethodConfig(compressor="stride", **options))
    vecs = random_vecs(n_ctx + n_query, seed=3)
    total, sent, per_host = 0, 0, Counter()
    for layer in range(layers):
        pair_counter.clear()
        comms = {}
        if method.query_phase:
            run_hosts(method, n_ctx, 0, world, vecs, layers, layer, comms)
            _query_phase(method.layout(n_ctx, world, 0), vecs, n_ctx, n_query)
        else:
            run_hosts(method, n_ctx + n_query, n_query, world, vecs, layers, layer, comms)
        sent += max(sum(r.bytes for (_, _, op), r in c.stats.ops.items() if op == "exact_layer")
                    for c in comms.values())
        total += max(pair_counter.values())  # the formula sums the slowest host of each layer
        per_host.update(pair_counter)
    if method.config.share_anchor and name != "spava":  # (apb's default, star's option)
        # except with a shared anchor: then it is the host slower over the whole prefill (the
        # source or the last host; which one can change from layer to layer with the sizes)
        total = max(per_host.values())
    # a shared anchor's cost picks the slower of two hosts at the shape's rates: by pairs alone here
    shape = SimpleNamespace(layers=layers, heads=H, kv_heads=KV, head_dim=D, bytes_per_param=4,
                            linear_flops=lambda tokens: 0.0, attn_flops_per_pair=lambda: 1.0,
                            rates=(1.0, 1.0))
    work = method_class(name).cost(n_ctx, world, shape, Sizes(query=n_query).with_method(method.config))
    formula = layers * work.pairs
    assert formula <= total <= formula * 1.01, (name, options, total, formula)
    if options.get("exact_layers"):  # and the exchange's bytes: the formula's beyond the query merge
        moved = layers * (work.comm_bytes - merge_bytes(n_query, shape))
        if method.config.share_anchor == "split":  # apb: hosts 0..W-2 hold shares; W-1 receives them all
            others = world - 1 if work.tokens == n_ctx / world + n_query else world - 2  # the host costed
            host = others  # host W-1 receives W-1 shares, host W-2 W-2
            shares_in = others * work.anchor / (world - 1) * 2 * KV * D * 4
            moved -= len(options["exact_layers"]) * shares_in  # waited for before the exchange
            # in the other layers the smaller message is waited for (not on host 0): the shares
            # with the query's scoring vectors, or the passing blocks
            p = options["passing_len"]
            other = layers - len(options["exact_layers"])
            if passing_first(p, world, work.anchor + n_query):
                moved -= other * (shares_in + n_query * H * D * 4)
            else:
                moved -= other * host * p * 2 * KV * D * 4
        elif method.config.share_anchor and name == "spava":  # and the split anchor's shares, gathered first
            moved -= len(options["exact_layers"]) * (world - 1) * work.anchor / world * 2 * KV * D * 4
        assert sent == pytest.approx(moved, rel=0.01), (sent, moved)


def test_exact_layers_refuse_a_layout_whose_blocks_are_not_the_context_in_order():
    from apb.methods.exact_layers import context_runs
    from apb.parallel import layout

    assert context_runs(layout.anchored(100, 4, 3, 10, None, ())) == ([0, 1, 2], [34, 33, 33])
    owners, sizes = context_runs(layout.spava(100, 4, 2, 12), 12)  # virtual blocks 0..3 on hosts 0, 1, 1, 0
    assert owners == [0, 1, 1, 0] and sum(sizes) == 88
    with pytest.raises(ValueError, match="starts at 12, expected block 0 at 0"):
        context_runs(layout.spava(100, 4, 2, 12))  # the anchor is not a prefix every host holds


@pytest.mark.parametrize("passing", [64, 8])
def test_a_split_anchor_hides_the_larger_message_behind_the_blocks_own_attention(monkeypatch, passing):
    """apb split at W=4 (anchor 64 rows + an 8-row query): with 64-token passing blocks (3 x 64
    rows received) a host r > 0 waits for the shares, chooses and sends its passing block, then
    attends its block causally, which hides the passing blocks; with 8-token ones (24 rows) it
    attends its block while the shares travel and sends after. Host 0 scores with its own tail
    and sends at once either way. Every block row attends what it attends with its own anchor."""
    from apb.methods import anchored

    n_ctx, n_query, world = 1024, 8, 4
    method = build_method("apb", MethodConfig(share_anchor="split", anchor_len=64, passing_len=passing,
                                              query_positions="anchor"))
    events, real_attention, real_start = [], anchored.attention, ThreadComm.all_gather_start

    def attending(q, k, v, *args, **kwargs):
        if kwargs.get("causal") and q.shape[2] == k.shape[2] == n_ctx // world:  # the block over itself
            events.append((threading.current_thread().name, "block"))
        return real_attention(q, k, v, *args, **kwargs)

    def starting(self, t, op="all_gather"):
        events.append((threading.current_thread().name, op))
        return real_start(self, t, op)

    vecs = random_vecs(n_ctx + n_query, seed=5)
    own = build_method("apb", MethodConfig(share_anchor=False, anchor_len=64, passing_len=passing,
                                           query_positions="anchor"))
    slices, _, want = run_hosts(own, n_ctx + n_query, n_query, world, vecs)
    monkeypatch.setattr(anchored, "attention", attending)
    monkeypatch.setattr(ThreadComm, "all_gather_start", starting)
    split_slices, _, got = run_hosts(method, n_ctx + n_query, n_query, world, vecs)
    for r in range(world):  # every block row as with each host's own anchor
        b, b_own = split_slices[r].rows("block"), slices[r].rows("block")
        assert torch.allclose(got[r][:, :, b], want[r][:, :, b_own], atol=1e-5), r
    order = {h: [e for name, e in events if name == f"host-{h}"] for h in range(world)}
    assert anchored.passing_first(passing, world, 64 + n_query) == (passing == 64)
    assert order[0] == ["anchor_gather", "all_gather", "block"]
    for h in range(1, world):
        assert order[h] == (["anchor_gather", "all_gather", "block"] if passing == 64 else
                            ["anchor_gather", "block", "all_gather"]), (h, order[h])


def test_the_slowest_host_is_the_one_with_more_seconds_at_the_devices_rates():
    """apb's split anchor on SmolLM2-135M's shape, W=8, 8K: host W-2 runs more tokens, host W-1
    attends more pairs. By FLOPs alone host W-1 has more; where a linear FLOP takes 1.2x an
    attention FLOP (this CPU's measured rates in float32, docs/results.md) host W-2 takes longer,
    and the formula must count that host: the ideal would be optimistic otherwise."""
    from dataclasses import replace

    from apb.tools.simulate import ModelShape

    shape = ModelShape("smollm2", 30, 576, 9, 3, 64, 1536, 49152, bytes_per_param=4)
    n, w, sizes = 8192 - 32, 8, Sizes(query=32, share_anchor="split")
    cost = method_class("apb").cost
    tokens_host = cost(n, w, replace(shape, rates=(1.0, 0.0)), sizes)  # counted by its tokens alone
    pairs_host = cost(n, w, replace(shape, rates=(0.0, 1.0)), sizes)
    assert tokens_host.tokens > pairs_host.tokens and tokens_host.pairs < pairs_host.pairs

    def seconds(work, linear, attn):  # independent of the formula's own pick
        return linear * shape.linear_flops(work.tokens) + attn * shape.layers * work.pairs * shape.attn_flops_per_pair()

    by_flops = cost(n, w, shape, sizes)
    at_rates = cost(n, w, replace(shape, rates=(18.77, 15.35)), sizes)
    assert seconds(pairs_host, 1, 1) > seconds(tokens_host, 1, 1) and by_flops == pairs_host
    assert seconds(tokens_host, 18.77, 15.35) > seconds(pairs_host, 18.77, 15.35) and at_rates == tokens_host


def test_a_shared_anchors_cost_is_the_slower_of_source_and_last_host():
    """apb:shared at W=4: the last host attends more passing pairs, the source (host 1) runs the
    anchor's tokens besides; with linear work free the formula is the last host's, with attention
    free the source's, each equal to the pairs and tokens that host's own formula gives."""
    n, w, q = 1024, 4, 8
    b, a, p = n / w, n / w / 4, n / w / 8
    sizes = Sizes(query=q, share_anchor=True)
    by_pairs = SimpleNamespace(layers=1, heads=H, kv_heads=KV, head_dim=D, bytes_per_param=4,
                               linear_flops=lambda tokens: 0.0, attn_flops_per_pair=lambda: 1.0,
                            rates=(1.0, 1.0))
    by_tokens = SimpleNamespace(layers=1, heads=H, kv_heads=KV, head_dim=D, bytes_per_param=4,
                                linear_flops=lambda tokens: tokens, attn_flops_per_pair=lambda: 0.0,
                                rates=(1.0, 1.0))
    last = method_class("apb").cost(n, w, by_pairs, sizes)
    source = method_class("apb").cost(n, w, by_tokens, sizes)
    assert last.tokens == b + q and last.pairs == b * ((w - 1) * p + a) + b * b / 2 + q * n / w
    assert source.tokens == a + b + q and source.pairs == a * a / 2 + b * (p + a) + b * b / 2 + q * n / w
    # not shared: host W-1 with its own anchor, more than either
    own = method_class("apb").cost(n, w, by_pairs, Sizes(query=q, share_anchor=False))
    assert own.tokens == a + b + q and own.pairs > last.pairs
    # split (apb's default): host W-1 does what the broadcast's receiver does, host W-2 runs a
    # share of a/(W-1) anchor tokens, over the whole anchor: by either rate no more than shared
    split = Sizes(query=q, share_anchor="split")
    for shape in (by_pairs, by_tokens):
        assert method_class("apb").cost(n, w, shape, Sizes(query=q)) == method_class("apb").cost(n, w, shape, split)
    by_keys = method_class("apb").cost(n, w, by_pairs, split)
    assert (by_keys.tokens, by_keys.pairs) == (last.tokens, last.pairs)
    share = a / (w - 1)
    by_rows = method_class("apb").cost(n, w, by_tokens, split)
    assert by_rows.tokens == share + b + q < source.tokens
    assert by_rows.pairs == share * a - share * share / 2 + b * ((w - 2) * p + a) + b * b / 2 + q * n / w
