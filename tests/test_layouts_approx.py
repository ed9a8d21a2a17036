"""Layouts of the approximate methods (star / apb: ``anchored``; spava: ``spava``), pure functions.

Every expectation is computed here from the description of the layout (design.md), never by
calling the layout code a second way.
"""

from __future__ import annotations

import pytest
import torch

from apb.config import MethodConfig
from apb.methods import build_method
from apb.parallel.layout import anchor_chunks, anchored, even_split, spava


def _ints(t: torch.Tensor) -> list[int]:
    return [int(x) for x in t.tolist()]


def _expected_anchor(n_ctx: int, n_query: int, anchor_len: int, insert_pos: int | None) -> list[int]:
    """Prompt indices of the anchor, written out from the spec."""
    a = min(anchor_len, n_ctx)
    if a <= 0:
        return []
    if insert_pos is None or n_query == 0:
        return list(range(a))
    s = min(insert_pos, a)
    return list(range(s)) + list(range(n_ctx, n_ctx + n_query)) + list(range(s, a))


# ---------------------------------------------------------------------------------------------
# even_split


@pytest.mark.parametrize("start,stop,parts", [(0, 10, 3), (5, 6, 1), (3, 3, 2), (0, 7, 7), (10, 101, 8)])
def test_even_split_partitions(start, stop, parts):
    bounds = even_split(start, stop, parts)
    assert len(bounds) == parts
    flat = [i for lo, hi in bounds for i in range(lo, hi)]
    assert flat == list(range(start, stop))
    assert all(hi >= lo for lo, hi in bounds)
    assert all(bounds[i][1] == bounds[i + 1][0] for i in range(parts - 1))
    sizes = [hi - lo for lo, hi in bounds]
    assert max(sizes) - min(sizes) <= 1


def test_even_split_rejects_zero_parts():
    with pytest.raises(ValueError):
        even_split(0, 10, 0)


# ---------------------------------------------------------------------------------------------
# anchor_chunks


@pytest.mark.parametrize("n_ctx,n_query,anchor_len,s", [
    (100, 5, 20, 4), (100, 1, 20, 0), (50, 7, 7, 7), (33, 3, 9, 1), (64, 16, 16, 16), (1000, 17, 250, 16),
])
def test_anchor_with_embedded_query(n_ctx, n_query, anchor_len, s):
    chunks = anchor_chunks(n_ctx, n_query, anchor_len, s)
    assert all(c.kind == "anchor" for c in chunks)
    idx = [i for c in chunks for i in range(c.start, c.stop)]
    expected = list(range(s)) + list(range(n_ctx, n_ctx + n_query)) + list(range(s, anchor_len))
    assert idx == expected
    pos = torch.cat([c.positions for c in chunks])
    assert _ints(pos) == list(range(anchor_len + n_query))
    # anchors are never cached
    assert not any(c.is_cached for c in chunks)


@pytest.mark.parametrize("n_ctx,anchor_len", [(100, 20), (10, 10), (7, 1), (1000, 333)])
def test_anchor_without_query(n_ctx, anchor_len):
    for chunks in (anchor_chunks(n_ctx, 5, anchor_len, None), anchor_chunks(n_ctx, 0, anchor_len, 3)):
        idx = [i for c in chunks for i in range(c.start, c.stop)]
        assert idx == list(range(anchor_len))
        assert _ints(torch.cat([c.positions for c in chunks])) == list(range(anchor_len))


@pytest.mark.parametrize("insert_pos", [None, 0, 5])
def test_anchor_len_zero_gives_nothing(insert_pos):
    assert anchor_chunks(100, 5, 0, insert_pos) == ()
    assert anchor_chunks(100, 0, 0, insert_pos) == ()


@pytest.mark.parametrize("n_ctx,n_query,anchor_len,s", [(100, 4, 10, 16), (100, 4, 10, 11), (30, 2, 3, 1000)])
def test_insert_pos_beyond_anchor_is_clamped(n_ctx, n_query, anchor_len, s):
    chunks = anchor_chunks(n_ctx, n_query, anchor_len, s)
    idx = [i for c in chunks for i in range(c.start, c.stop)]
    # clamped: all anchor context first, then the query at the end
    assert idx == list(range(anchor_len)) + list(range(n_ctx, n_ctx + n_query))
    assert _ints(torch.cat([c.positions for c in chunks])) == list(range(anchor_len + n_query))


def test_anchor_longer_than_context_is_clamped():
    chunks = anchor_chunks(6, 2, 50, None)
    assert [i for c in chunks for i in range(c.start, c.stop)] == list(range(6))


# ---------------------------------------------------------------------------------------------
# anchored (star / apb)

ANCHORED_CASES = [
    # n_ctx, n_query, W, anchor_len, insert_pos, query_tail_on
    (40, 0, 1, 0, None, ()),
    (40, 5, 1, 10, 4, (0,)),
    (37, 3, 2, 9, 4, (0,)),
    (101, 7, 3, 13, 16, ()),
    (101, 7, 3, 13, None, (0, 2)),
    (64, 4, 4, 16, 0, (0,)),
    (23, 1, 5, 4, 2, (1, 3)),
    (5, 2, 5, 1, 1, (0,)),
    (1000, 17, 8, 250, 16, (0,)),
    (999, 0, 7, 0, 16, (0,)),
]


@pytest.mark.parametrize("n_ctx,n_query,W,a,s,tail", ANCHORED_CASES)
def test_anchored_layout(n_ctx, n_query, W, a, s, tail):
    n = n_ctx + n_query
    slices = anchored(n_ctx, n_query, W, a, s, tail)
    assert len(slices) == W
    assert [h.rank for h in slices] == list(range(W))
    assert all(h.n_tokens == n for h in slices)
    anchor = _expected_anchor(n_ctx, n_query, a, s)

    all_blocks = []
    for r, h in enumerate(slices):
        idx, pos, valid = _ints(h.indices), _ints(h.positions), h.valid
        assert len(idx) == len(pos) == valid.numel() == h.size
        assert valid.dtype == torch.bool

        # anchor: host 0 has none; hosts r > 0 start with it, positions 0.. contiguous
        n_anchor = 0 if r == 0 else len(anchor)
        assert idx[:n_anchor] == (anchor if r > 0 else [])
        assert pos[:n_anchor] == list(range(n_anchor))
        arows = h.rows("anchor")
        assert (arows.start, arows.stop) == ((0, n_anchor) if n_anchor else (0, 0))

        # exactly one block, right after the anchor, positions = indices
        blocks = h.blocks()
        assert len(blocks) == 1
        blk = blocks[0]
        assert idx[n_anchor:n_anchor + blk.size] == list(range(blk.start, blk.stop))
        assert pos[n_anchor:n_anchor + blk.size] == list(range(blk.start, blk.stop))
        all_blocks.append((blk.start, blk.stop))

        # query tail: only on the listed hosts, after the block, positions n_ctx.., not cached
        rest_idx, rest_pos = idx[n_anchor + blk.size:], pos[n_anchor + blk.size:]
        if r in tail and n_query:
            assert rest_idx == list(range(n_ctx, n))
            assert rest_pos == list(range(n_ctx, n))
            qrows = h.rows("query")
            assert (qrows.start, qrows.stop) == (h.size - n_query, h.size)
        else:
            assert rest_idx == []
            assert h.rows("query") == slice(0, 0)

        # valid (cached) is exactly the block tokens
        expected_valid = [False] * n_anchor + [True] * blk.size + [False] * len(rest_idx)
        assert valid.tolist() == expected_valid

        # local_index_of: block tokens found where they sit; anchors skipped by default
        for g in (blk.start, (blk.start + blk.stop) // 2, blk.stop - 1):
            li = h.local_index_of(g)
            assert li is not None and idx[li] == g and li >= n_anchor
        if r > 0 and anchor:
            for g in anchor:
                if g < n_ctx and not blk.start <= g < blk.stop:
                    assert h.local_index_of(g) is None
            assert h.local_index_of(anchor[-1], kinds=("anchor",)) == len(anchor) - 1
        if n_query:
            li = h.local_index_of(n_ctx)
            if r in tail:
                assert li == h.size - n_query
            else:
                assert li is None

    # blocks partition [0, n_ctx) exactly once, contiguous and in rank order, near-equal sizes
    assert all_blocks[0][0] == 0 and all_blocks[-1][1] == n_ctx
    assert all(all_blocks[i][1] == all_blocks[i + 1][0] for i in range(W - 1))
    flat = [i for lo, hi in all_blocks for i in range(lo, hi)]
    assert flat == list(range(n_ctx))
    sizes = [hi - lo for lo, hi in all_blocks]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1

    # cached tokens over all hosts: every context token exactly once, never a query token
    cached = torch.cat([h.indices[h.valid] for h in slices])
    assert _ints(cached.sort().values) == list(range(n_ctx))


@pytest.mark.parametrize("n_ctx,W", [(3, 4), (0, 1), (7, 8)])
def test_anchored_context_shorter_than_world_raises(n_ctx, W):
    with pytest.raises(ValueError, match="cannot be split"):
        anchored(n_ctx, 2, W, 1, 16)


def test_anchored_without_insert_pos_is_star():
    slices = anchored(80, 6, 4, 20, None)
    for h in slices[1:]:
        assert _ints(h.indices[:20]) == list(range(20))
        # no query token anywhere
        assert not bool((h.indices >= 80).any())
    assert not bool((slices[0].indices >= 80).any())


def test_apb_every_scoring_host_has_query_rows_without_anchor():
    # regression: with anchor_len=0 no query is embedded on hosts r > 0; unless they get a query
    # tail, the 'query' compressor there has nothing to score against ("this prompt has no query")
    n_ctx, n_query, W = 400, 8, 4
    m = build_method("apb", MethodConfig(anchor_len=0, passing_len=0.1))
    plan = m.plan(n_ctx + n_query, W, n_query, 1)
    assert 0 < plan.passing[0] < n_ctx // W  # a real selection happens on every host
    for h in m.layout(n_ctx + n_query, W, n_query):
        assert int((h.indices >= n_ctx).sum()) == n_query, f"host {h.rank} has no query rows to score with"


# ---------------------------------------------------------------------------------------------
# spava

SPAVA_CASES = [
    # n_ctx, n_query, W, anchor_len
    (40, 0, 1, 0),
    (40, 5, 1, 8),
    (37, 3, 2, 9),
    (101, 7, 3, 13),
    (64, 4, 4, 16),
    (23, 1, 5, 4),
    (10, 2, 5, 0),
    (33, 3, 3, 2),
    (4096, 64, 8, 64),
    (1001, 11, 7, 15),
]


@pytest.mark.parametrize("n_ctx,n_query,W,a", SPAVA_CASES)
def test_spava_layout(n_ctx, n_query, W, a):
    n = n_ctx + n_query
    slices = spava(n_ctx, n_query, W, a)
    assert len(slices) == W
    assert all(h.n_tokens == n for h in slices)

    virtual = {}
    anchor_shares = []
    for r, h in enumerate(slices):
        idx, pos = _ints(h.indices), _ints(h.positions)
        # the whole anchor first, positions = indices 0..a-1
        assert idx[:a] == list(range(a))
        assert pos[:a] == list(range(a))
        arows = h.rows("anchor")
        assert (arows.start, arows.stop) == ((0, a) if a else (0, 0))

        # then virtual blocks r and 2W-1-r, in that order, positions = indices
        blocks = h.blocks()
        assert [b.chunk_id for b in blocks] == [r, 2 * W - 1 - r]
        off = a
        for b in blocks:
            assert b.size >= 1
            assert idx[off:off + b.size] == list(range(b.start, b.stop))
            assert pos[off:off + b.size] == list(range(b.start, b.stop))
            assert b.chunk_id not in virtual
            virtual[b.chunk_id] = (b.start, b.stop)
            off += b.size

        # then the query, positions n_ctx..n-1; cached by host 0 only
        assert idx[off:] == list(range(n_ctx, n))
        assert pos[off:] == list(range(n_ctx, n))
        valid = h.valid.tolist()
        assert valid[off:] == [r == 0] * n_query
        # blocks always cached
        assert all(valid[a:off])
        # the cached part of the anchor
        anchor_shares.append([i for i, v in zip(idx[:a], valid[:a]) if v])

        # local_index_of finds the query and the blocks, not the anchor by default
        if n_query:
            assert h.local_index_of(n - 1) == h.size - 1
        if a:
            assert h.local_index_of(0) is None
            assert h.local_index_of(a - 1, kinds=("anchor",)) == a - 1

    # 2W consecutive near-equal virtual blocks partition [a, n_ctx)
    assert sorted(virtual) == list(range(2 * W))
    ordered = [virtual[i] for i in range(2 * W)]
    assert ordered[0][0] == a and ordered[-1][1] == n_ctx
    assert all(ordered[i][1] == ordered[i + 1][0] for i in range(2 * W - 1))
    sizes = [hi - lo for lo, hi in ordered]
    assert max(sizes) - min(sizes) <= 1

    # anchor shares partition [0, a) exactly once, each a contiguous run
    flat = sorted(i for share in anchor_shares for i in share)
    assert flat == list(range(a))
    for share in anchor_shares:
        if share:
            assert share == list(range(share[0], share[0] + len(share)))
    if a >= W:
        assert all(len(share) >= 1 for share in anchor_shares)

    # gather-for-decode: cached positions over all hosts are 0..n-1, once each, and equal indices
    cached_pos = torch.cat([h.positions[h.valid] for h in slices])
    cached_idx = torch.cat([h.indices[h.valid] for h in slices])
    assert torch.equal(cached_pos, cached_idx)
    assert _ints(cached_pos.sort().values) == list(range(n))


@pytest.mark.parametrize("n_ctx,W,a", [(5, 3, 0), (20, 4, 13), (1, 1, 0), (12, 2, 9)])
def test_spava_too_short_raises(n_ctx, W, a):
    assert n_ctx - a < 2 * W
    with pytest.raises(ValueError, match="spava needs"):
        spava(n_ctx, 3, W, a)


def test_spava_world_zero_raises():
    with pytest.raises(ValueError):
        spava(100, 3, 0, 10)


def test_spava_world_one_holds_everything():
    (h,) = spava(30, 4, 1, 6)
    assert _ints(h.indices) == list(range(34))
    assert _ints(h.positions) == list(range(34))
    assert h.valid.all()
