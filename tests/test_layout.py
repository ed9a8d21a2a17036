"""apb.parallel.layout: which tokens each host holds (pure functions, no processes)."""

from __future__ import annotations

import json

import pytest
import torch

from apb.parallel import layout
from apb.parallel.layout import contiguous, owner_of, pad_tokens, padded_length, single, zigzag

NS = [1, 2, 7, 1000, 1237, 4096]
WORLDS = [1, 2, 3, 4, 5]
LAYOUTS = {"contiguous": (contiguous, lambda w: w), "zigzag": (zigzag, lambda w: 2 * w)}


def _all_indices(slices):
    return torch.cat([s.indices for s in slices])


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("n", NS)
def test_cover_pad_and_balance(name, world, n):
    fn, unit_of = LAYOUTS[name]
    unit = unit_of(world)
    slices = fn(n, world)
    assert len(slices) == world
    assert [s.rank for s in slices] == list(range(world))
    assert all(s.n_tokens == n for s in slices)

    idx = _all_indices(slices)
    padded = idx.numel()
    # padded to a multiple of the split unit, by fewer than one unit
    assert padded % unit == 0
    assert n <= padded < n + unit
    assert padded == padded_length(n, unit)
    # every index 0..padded-1 exactly once across hosts
    assert torch.equal(idx.sort().values, torch.arange(padded))
    # every host the same size, and size agrees with indices
    sizes = {s.size for s in slices}
    assert sizes == {padded // world}
    assert all(s.indices.numel() == s.size for s in slices)
    # padding only at the global end: the pad indices are exactly n..padded-1
    pads = idx[idx >= n].sort().values
    assert torch.equal(pads, torch.arange(n, padded))
    assert pads.numel() < unit


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("n", NS)
def test_positions_and_valid(name, world, n):
    fn, _ = LAYOUTS[name]
    for s in fn(n, world):
        assert torch.equal(s.positions, s.indices)
        assert s.valid.dtype == torch.bool
        assert torch.equal(s.valid, s.indices < n)
        assert s.valid.numel() == s.size
    total_valid = sum(int(s.valid.sum()) for s in fn(n, world))
    assert total_valid == n


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("n", NS)
def test_contiguous_chunks_in_rank_order(world, n):
    slices = contiguous(n, world)
    size = slices[0].size
    for r, s in enumerate(slices):
        assert [c.chunk_id for c in s.chunks] == [r]
        assert torch.equal(s.indices, torch.arange(r * size, (r + 1) * size))


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("n", NS)
def test_zigzag_chunk_ids(world, n):
    slices = zigzag(n, world)
    chunk = padded_length(n, 2 * world) // (2 * world)
    for r, s in enumerate(slices):
        assert [c.chunk_id for c in s.chunks] == [r, 2 * world - 1 - r]
        for c in s.chunks:
            assert (c.start, c.stop) == (c.chunk_id * chunk, (c.chunk_id + 1) * chunk)
            assert c.size == chunk
        first, second = r, 2 * world - 1 - r
        expect = torch.cat([torch.arange(first * chunk, (first + 1) * chunk),
                            torch.arange(second * chunk, (second + 1) * chunk)])
        assert torch.equal(s.indices, expect)


def test_zigzag_explicit_small_case():
    # n = 7, W = 2: padded to 8, chunks of 2: host 0 holds chunks 0, 3; host 1 holds chunks 1, 2
    s0, s1 = zigzag(7, 2)
    assert s0.indices.tolist() == [0, 1, 6, 7]
    assert s1.indices.tolist() == [2, 3, 4, 5]
    assert s0.valid.tolist() == [True, True, True, False]
    assert s1.valid.tolist() == [True, True, True, True]


def test_contiguous_explicit_small_case():
    s0, s1, s2 = contiguous(7, 3)
    assert s0.indices.tolist() == [0, 1, 2]
    assert s1.indices.tolist() == [3, 4, 5]
    assert s2.indices.tolist() == [6, 7, 8]
    assert s2.valid.tolist() == [True, False, False]


@pytest.mark.parametrize("name", ["contiguous", "zigzag", "single"])
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("n", NS)
def test_owner_of_last_token(name, world, n):
    fn = {"contiguous": contiguous, "zigzag": zigzag, "single": single}[name]
    slices = fn(n, world)
    rank, local = owner_of(slices, n - 1)
    assert slices[rank].rank == rank
    assert int(slices[rank].indices[local]) == n - 1
    # no other host holds it
    holders = [s.rank for s in slices if bool((s.indices == n - 1).any())]
    assert holders == [rank]


@pytest.mark.parametrize("name", ["contiguous", "zigzag", "single"])
@pytest.mark.parametrize("world", [1, 3, 4])
@pytest.mark.parametrize("n", [1, 7, 37])
def test_owner_of_every_token(name, world, n):
    fn = {"contiguous": contiguous, "zigzag": zigzag, "single": single}[name]
    slices = fn(n, world)
    for g in range(n):
        rank, local = owner_of(slices, g)
        assert int(slices[rank].indices[local]) == g
        assert slices[rank].local_index_of(g) == local
        for s in slices:
            if s.rank != rank:
                assert s.local_index_of(g) is None


def test_owner_of_unheld_token_raises():
    slices = contiguous(7, 3)  # padded to 9
    with pytest.raises(ValueError):
        owner_of(slices, 9)
    with pytest.raises(ValueError):
        owner_of(single(5, 2), 5)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("n", NS)
def test_single(world, n):
    slices = single(n, world)
    assert len(slices) == world
    assert [s.rank for s in slices] == list(range(world))
    assert torch.equal(slices[0].indices, torch.arange(n))
    assert torch.equal(slices[0].positions, torch.arange(n))
    assert bool(slices[0].valid.all())
    assert slices[0].size == n
    for s in slices[1:]:
        assert s.size == 0
        assert s.indices.numel() == 0 and s.indices.dtype == torch.long
        assert s.valid.numel() == 0
    assert owner_of(slices, n - 1) == (0, n - 1)


def test_pad_tokens():
    ids = torch.tensor([[5, 6, 7]], dtype=torch.long)
    out = pad_tokens(ids, 6, pad_id=0)
    assert out.tolist() == [[5, 6, 7, 0, 0, 0]]
    assert out.dtype == ids.dtype
    assert pad_tokens(ids, 4, pad_id=-1).tolist() == [[5, 6, 7, -1]]
    same = pad_tokens(ids, 3, pad_id=9)
    assert same.tolist() == [[5, 6, 7]]
    with pytest.raises(ValueError):
        pad_tokens(ids, 2, pad_id=0)


def test_pad_tokens_int32_keeps_dtype():
    ids = torch.arange(1, 8, dtype=torch.int32).view(1, 7)
    out = pad_tokens(ids, padded_length(7, 4), pad_id=99)
    assert out.shape == (1, 8) and out.dtype == torch.int32
    assert out[0, -1].item() == 99 and torch.equal(out[:, :7], ids)


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("world", WORLDS)
def test_pad_tokens_matches_layout(n, world):
    slices = zigzag(n, world)
    total = sum(s.size for s in slices)
    ids = torch.arange(100, 100 + n).view(1, n)
    padded = pad_tokens(ids, total, pad_id=-7)
    assert padded.shape == (1, total)
    for s in slices:
        local = padded[0, s.indices]
        assert torch.equal(local[s.valid], s.indices[s.valid] + 100)
        assert bool((local[~s.valid] == -7).all())


def test_padded_length():
    assert padded_length(1, 1) == 1
    assert padded_length(7, 4) == 8
    assert padded_length(8, 4) == 8
    assert padded_length(1237, 10) == 1240


@pytest.mark.parametrize("fn", [contiguous, zigzag, single], ids=lambda f: f.__name__)
@pytest.mark.parametrize("n,world", [(0, 2), (-3, 2), (5, 0), (5, -1), (0, 0)])
def test_invalid_inputs_raise(fn, n, world):
    with pytest.raises(ValueError):
        fn(n, world)


@pytest.mark.parametrize("n,unit", [(0, 2), (-1, 2), (5, 0), (5, -2)])
def test_padded_length_invalid(n, unit):
    with pytest.raises(ValueError):
        padded_length(n, unit)


def test_chunk_and_empty_host_slice():
    c = layout.Chunk(3, 10, 14)
    assert c.size == 4
    s = layout.HostSlice(1, 20, (c, layout.Chunk(5, 18, 22)))
    assert s.indices.tolist() == [10, 11, 12, 13, 18, 19, 20, 21]
    assert s.valid.tolist() == [True] * 6 + [False] * 2
    assert s.local_index_of(19) == 5 and s.local_index_of(14) is None
    empty = layout.HostSlice(2, 20)
    assert empty.size == 0 and empty.local_index_of(0) is None


def test_chunk_kinds_equal_their_strings():
    # a str enum: code and JSON that use the plain names keep working
    s = layout.HostSlice(1, 9, (layout.Chunk(-1, 0, 2, layout.ChunkKind.ANCHOR, 0), layout.Chunk(1, 4, 9)))
    assert s.chunks[0].kind == "anchor" and s.rows("anchor") == s.rows(layout.ChunkKind.ANCHOR) == slice(0, 2)
    assert s.rows("block") == slice(2, 7) and layout.Chunk(0, 0, 1).kind is layout.ChunkKind.BLOCK
    assert json.dumps([k for k in layout.ChunkKind]) == '["block", "anchor", "query"]'


def test_ring_fuses_adjacent_earlier_chunks_into_one_call():
    """A query chunk sees every earlier chunk whole: two adjacent ones held by the same host are
    one kernel call; its own chunk is causal; later ones are skipped."""
    from apb.methods.ring import _calls
    from apb.parallel import layout as L

    slices = L.zigzag(64, 2)  # host 0: chunks 0 and 3, host 1: chunks 1 and 2, 16 tokens each
    host0, host1 = slices[0].chunks, slices[1].chunks
    assert _calls(host1, 3, 16) == [(slice(0, 32), False)]  # chunks 1 and 2 for query chunk 3: one call
    assert _calls(host0, 3, 16) == [(slice(0, 16), False), (slice(16, 32), True)]
    assert _calls(host0, 0, 16) == [(slice(0, 16), True)]
    assert _calls(host1, 0, 16) == []
    assert _calls(host0, 2, 16) == [(slice(0, 16), False)]


def test_rows_of_gives_a_view_for_one_run_and_an_index_otherwise():
    from apb.parallel.layout import rows_of

    assert rows_of(torch.tensor([False, True, True, False]), "cpu") == slice(1, 3)
    assert rows_of(torch.zeros(4, dtype=torch.bool), "cpu") == slice(0, 0)
    idx = rows_of(torch.tensor([True, False, True]), "cpu")
    assert isinstance(idx, torch.Tensor) and idx.tolist() == [0, 2]
    with pytest.raises(ValueError, match="on the CPU"):
        rows_of(torch.ones(3, dtype=torch.bool, device="meta"), "cpu")


@pytest.mark.parametrize("build", [
    lambda: layout.anchored(300, 17, 3, 90, split_anchor=True),
    lambda: layout.anchored(300, 17, 3, 90, insert_pos=40, split_anchor=True),  # the query inside the anchor
    lambda: layout.spava(300, 17, 4, 90, split_anchor=True),
], ids=["apb", "apb-query-inside", "spava"])
def test_a_split_anchors_gathered_positions_run_from_zero_without_gaps(build):
    """What a sliding layer's copy rows attend (the shares gathered host by host) are the anchor's
    positions in order, so their calls are aligned (``apb.methods.sliding.aligned``)."""
    slices = build()
    got = layout.split_anchor_positions(slices)
    own = [c.positions for s in slices for c in s.chunks if c.kind == layout.ChunkKind.ANCHOR]
    assert sum(len(p) for p in own) == len(got) > 0
    assert torch.equal(got, torch.arange(len(got)))
