"""Collectives and supervision on real gloo process groups (LocalWorkerGroup)."""

import contextlib
import gc
import os
import signal
import time

import pytest
import torch

from apb.parallel.comm import STAGE_ENV, Comm, CommStats, Phase
from apb.parallel.groups import WorkerError
from apb.parallel.groups.local import LocalWorkerGroup
from apb.parallel.state import validate_degrees


@pytest.fixture(scope="module", params=["direct", "staged"])
def group3(request):
    """Three gloo ranks; "staged": every message goes through host copies, as on ranks that share a
    GPU (parallel.share_gpus), so each test also checks that what is received lands where it should."""
    with _stage_env(request.param == "staged"):
        with LocalWorkerGroup(3, "_workers:CommWorker", timeout_s=60) as g:
            g.staged = request.param == "staged"
            yield g


@contextlib.contextmanager
def _stage_env(on: bool):
    """The workers started inside see STAGE_ENV=1 (a spawned process takes the environment as it is)."""
    before = os.environ.get(STAGE_ENV)
    if on:
        os.environ[STAGE_ENV] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(STAGE_ENV, None)
        else:
            os.environ[STAGE_ENV] = before


def test_all_gather_varlen(group3):
    for parts in group3.call("all_gather_varlen"):
        assert [tuple(p.shape) for p in parts] == [(1, 3), (2, 3), (3, 3)]
        for r, p in enumerate(parts):
            assert torch.equal(p, torch.full((r + 1, 3), float(r)))


def test_gather_varlen_only_dst_receives(group3):
    replies = group3.call("gather_varlen", 1)
    assert replies[0] is None and replies[2] is None
    assert [p.tolist() for p in replies[1]] == [torch.arange(2 * r + 1.0).tolist() for r in range(3)]


def test_exchange_broadcast_and_started_all_gather(group3):
    for rank, (got, b, gathered, staged, started) in enumerate(group3.call("exchange_broadcast_gather")):
        assert got == {src: [10.0 * src + rank] for src in range(3) if src != rank}
        assert b == [1.0, 1.0, 1.0]
        assert gathered == [[float(r), -float(r)] for r in range(3)]
        assert started == [[7.0, 7.0], [7.0, 7.0]]
        assert staged == group3.staged  # the switch reached the workers


def test_ring_passes_every_rank_in_order(group3):
    for rank, (seen, calls) in enumerate(group3.call("ring_steps")):
        assert seen == [(rank - s) % 3 for s in range(1, 3)]
        assert calls == 2


def test_ring_moves_pairs_into_alternating_buffers(group3):
    for rank, (seen, own) in enumerate(group3.call("ring_pairs_into_two_buffers")):
        prev = [(rank - s) % 3 for s in (1, 2)]
        assert seen == [(p, [2.0 * p]) for p in prev]
        assert own == [True, True]


def test_ring_refuses_mismatched_buffers():
    ring = Comm(None).ring()
    with pytest.raises(ValueError, match="receive buffers"):
        ring.send_recv((torch.zeros(3), torch.zeros(2)), into=(torch.zeros(3), torch.zeros(3)))


def test_gathered_cache_lands_in_position_order_in_one_buffer(group3):
    """Every host's runs of positions go straight to their places: entry (layer, head, position)
    of the gathered keys is the code its sender wrote there; the value head size differs (MLA)."""
    got = group3.call("gather_caches", False)
    assert got[1] is None and got[2] is None
    positions, keys, values = got[0]
    n = 4 * 3
    assert positions == list(range(n))
    want = (torch.arange(2)[:, None, None] * 1000 + torch.arange(3)[None, :, None] * 100
            + torch.arange(n)[None, None, :]).float()
    assert torch.equal(keys, want[..., None].expand(2, 3, n, 5))
    assert torch.equal(values, -want[..., None].expand(2, 3, n, 2))


def test_gathered_cache_with_a_repeated_position_is_an_error_not_a_hang(group3):
    got = group3.call("gather_caches", True)
    assert "does not hold each position 0..n-1 exactly once" in got[0]
    assert got[1] is None and got[2] is None
    # the group still works afterwards: nothing was left unreceived
    assert group3.call("gather_caches", False)[0][0] == list(range(12))


@pytest.mark.parametrize("keep,room", [(None, None), ([0, 7, 12], None), ([0, 7, 12], 3)])
def test_a_gathered_cache_keeps_each_layer_in_its_own_shape_and_only_the_positions_asked(group3, keep, room):
    """Layers of three shapes travel unpadded: each comes back in its own shape with every entry
    its sender wrote, in position order; with ``keep`` (a sliding layer's window, a layer that
    keeps nothing) a layer holds only its positions from ``keep[layer]`` on, and the bytes sent
    are exactly those entries, nothing for the positions left out. With ``room`` (decoding) the
    same messages land in one buffer per layer, the layer's K/V its first tokens, with room for 3
    more tokens where the layer keeps every position (a trimmed one does not grow in place); a
    layer that keeps nothing gets no buffer."""
    got = group3.call("gather_trimmed", keep, room)
    assert got[1][0] is None and got[2][0] is None
    (positions, layers, rooms), n = got[0][0], 12
    if room is None:
        assert rooms is None
    else:
        assert rooms[2] is None
        for layer, (h, dk, dv) in enumerate(((3, 5, 2), (2, 4, 4))):
            held = n - keep[layer]
            size = held + (room if held == n else 0)
            assert rooms[layer] == ([(1, h, size, dk), (1, h, size, dv)], True), layer
    assert positions == list(range(n))
    first = keep or [0, 0, 0]
    for layer, (h, dk, dv) in enumerate(((3, 5, 2), (2, 4, 4), (1, 6, 3))):
        p = torch.arange(first[layer], n)
        k, v = layers[layer]
        for t, width, sign in ((k, dk, 1), (v, dv, -1)):
            want = sign * (layer * 100000 + torch.arange(h)[:, None, None] * 10000 + p[None, :, None] * 10
                           + torch.arange(width)[None, None, :]).float()
            assert torch.equal(t, want), (layer, sign)
    # rank 0's own part is copied, not sent: ranks 1 and 2 send their 4 positions (int64), then
    # the K/V of the positions they hold from each layer's first on, (2, 3, 8, 9) and (4, 5, 6, 7)
    assert got[0][1] == 0
    for rank, mine in ((1, (2, 3, 8, 9)), (2, (4, 5, 6, 7))):
        assert got[rank][1] == 4 * 8 + sum(sum(1 for q in mine if q >= first[i]) * h * (dk + dv) * 4
                                   for i, (h, dk, dv) in enumerate(((3, 5, 2), (2, 4, 4), (1, 6, 3))))


def test_ring_wait_without_commit_raises(group3):
    for rank, (error, received) in enumerate(group3.call("ring_wait_without_commit")):
        assert "without a committed step" in error
        assert received == [float((rank - 1) % 3)] * 4  # the queued step was kept and runs once committed


def test_ring_wait_before_any_step_raises():
    with pytest.raises(RuntimeError, match="send_recv.*commit.*wait"):
        Comm(None).ring().wait()


def test_stats_keep_phases_as_plain_strings():
    stats = CommStats()
    stats.record("all_gather", 8)
    stats.phase = Phase.LOGITS
    stats.record("broadcast", 4)
    ops = stats.to_dict()["ops"]
    assert [(o["phase"], o["op"]) for o in ops] == [("context", "all_gather"), ("logits", "broadcast")]
    assert all(type(o["phase"]) is str for o in ops)
    assert stats.calls(phase="logits") == stats.calls(phase=Phase.LOGITS) == 1


def test_prefill_phases_include_the_logits_broadcast():
    assert {p for p in Phase if p.is_prefill} == {Phase.CONTEXT, Phase.QUERY, Phase.LOGITS}


def test_failed_rank_is_reported_not_waited_on():
    g = LocalWorkerGroup(2, "_workers:CommWorker", timeout_s=120)
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match="(?s)rank 1 failed.*deliberate failure"):
        g.call("fail_on", 1)
    assert time.monotonic() - t0 < 30, "the driver waited on a peer stuck in a collective"
    assert g.closed and not any(p.is_alive() for p in g.procs)


def test_a_reply_that_cannot_be_sent_is_reported_not_waited_on():
    """A reply the queue cannot pickle used to fail in the queue's feeder thread, printed only:
    the driver waited out its whole timeout for it. Now the worker pickles it first and reports
    the failure at once; a plain tensor still arrives as it was."""
    g = LocalWorkerGroup(2, "_workers:CommWorker", timeout_s=120)
    assert torch.equal(g.call("unsendable_reply", 5)[0], torch.arange(3))  # no rank 5: both send plainly
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match="(?s)rank 1 failed.*cannot be sent to the driver.*requires_grad"):
        g.call("unsendable_reply", 1)
    assert time.monotonic() - t0 < 30, "the driver waited for a reply that was never sent"
    assert g.closed


def test_killed_worker_is_reported():
    g = LocalWorkerGroup(2, "_workers:CommWorker", timeout_s=120)
    pids = g.call("pid")
    os.kill(pids[1], signal.SIGKILL)
    time.sleep(0.5)
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match="rank 1 died"):
        g.call("pid")
    assert time.monotonic() - t0 < 30
    with pytest.raises(WorkerError, match="closed"):
        g.call("pid")


def test_collective_times_out_instead_of_hanging():
    with LocalWorkerGroup(2, "_workers:CommWorker", {"timeout_s": 3.0}, timeout_s=60) as g:
        replies = g.call("absent_peer", 1)
    status, waited, _ = replies[0]
    assert status == "timed out" and waited < 20


def test_validate_degrees_names_choices():
    validate_degrees(4, 2)
    with pytest.raises(ValueError, match=r"sp_size=3 does not divide world_size=4.*\[1, 2, 4\]"):
        validate_degrees(4, 3)


def test_the_per_layer_clocks_add_up_to_the_whole_prefill():
    """The bench projects from the per-layer clocks; with the bucket for the work around the
    forwards they account for the prefill's whole CPU time, measured from outside."""
    from apb.methods import build_method
    from apb.config import MethodConfig
    from apb.model.catalog import resolve_model
    from apb.model.loading import load_model
    from apb.parallel.comm import OUTSIDE
    from apb.runtime.prefill import prefill

    model = load_model(resolve_model("tiny-llama"), "float32", "cpu")
    ids = torch.randint(0, 512, (1024,), generator=torch.Generator().manual_seed(0))

    def once():
        comm = Comm(None)
        t0 = time.process_time()
        prefill(model, ids, build_method("full", MethodConfig()), comm)
        return comm.stats.layer_cpu, time.process_time() - t0

    # process_time counts every thread: intra-op workers that spin after the last kernel, and a
    # garbage collection, land in whichever interval they fall in, so one thread and no
    # collector; a run that still differs by chance is retried, a missing bucket never matches
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    gc.collect()
    gc.disable()
    try:
        once()  # warm-up
        tries = [once() for _ in range(3)]
    finally:
        gc.enable()
        torch.set_num_threads(threads)
    for clocks, _ in tries:
        assert (Phase.CONTEXT, OUTSIDE) in clocks and (Phase.CONTEXT, -1) in clocks
    gaps = [abs(sum(clocks.values()) / whole - 1) for clocks, whole in tries]
    assert min(gaps) < 0.05, gaps
