"""Small worker classes for multi-process tests of apb.parallel (spawned by LocalWorkerGroup)."""

import os
import time

import torch

from apb.parallel.comm import Comm, CommStats
from apb.parallel.rendezvous import init_distributed
from apb.parallel.state import build_parallel_state


class CommWorker:
    def __init__(self, init_method, rank, world_size, timeout_s=60.0):
        self.env = init_distributed(init_method, rank, world_size, timeout_s=timeout_s, device="cpu")
        self.state = build_parallel_state(self.env)
        self.comm = Comm(self.state.sp_group, CommStats())

    def all_gather_varlen(self):
        r = self.comm.rank
        t = torch.full((r + 1, 3), float(r))  # rank r sends r+1 rows
        return self.comm.all_gather_varlen(t, dim=0)

    def gather_varlen(self, dst):
        r = self.comm.rank
        t = torch.arange(2 * r + 1, dtype=torch.float32)
        return self.comm.gather_varlen(t, dst=dst, dim=0)

    def ring_steps(self):
        """Pass each rank's id all the way round; returns the ids seen in order."""
        seen = []
        cur = torch.tensor([float(self.comm.rank)])
        ring = self.comm.ring()
        for _ in range(self.comm.size - 1):
            ring.send_recv(cur)
            ring.commit()
            cur = ring.wait()
            seen.append(int(cur.item()))
        return seen, self.comm.stats.calls("ring_send_recv")

    def ring_pairs_into_two_buffers(self):
        """Pass (id, 2 x id) pairs all the way round as two messages, received into two buffers
        alternated by step (as the ring method does); returns what was seen and whether each step
        came back in its own buffer."""
        r = self.comm.rank
        cur = (torch.tensor([float(r)]), torch.full((2, 3), 2.0 * r))
        bufs = [tuple(torch.empty_like(t) for t in cur) for _ in range(2)]
        ring, seen, own = self.comm.ring(), [], []
        for step in range(self.comm.size - 1):
            ring.send_recv(cur, into=bufs[step % 2])
            ring.commit()
            cur = ring.wait()
            seen.append((int(cur[0].item()), cur[1].unique().tolist()))
            own.append(all(a.data_ptr() == b.data_ptr() for a, b in zip(cur, bufs[step % 2])))
        return seen, own

    def exchange_broadcast_gather(self):
        """Rank r sends r x 10 + dst to every other rank (exchange), rank 1 broadcasts a tensor, and
        an all-gather is started and waited on; returns what each step gave this rank."""
        r, w = self.comm.rank, self.comm.size
        sends = {dst: torch.full((2, dst + 1), float(10 * r + dst)) for dst in range(w) if dst != r}
        got = self.comm.exchange(sends, {src: (2, r + 1) for src in range(w) if src != r}, torch.float32)
        b = torch.full((3,), float(r))
        self.comm.broadcast(b, src=1)
        pending = self.comm.all_gather_start(torch.tensor([float(r), -float(r)]))
        # a started broadcast from rank 2 (what a shared anchor uses), under the all-gather's wait
        started = self.comm.broadcast_start(torch.full((2, 2), 7.0) if r == 2 else torch.empty(2, 2), src=2)
        return ({src: t.unique().tolist() for src, t in got.items()}, b.tolist(),
                [t.tolist() for t in pending.wait()], self.comm.staged(torch.device("cpu")),
                started.wait()[0].tolist())

    def gather_caches(self, overlap: bool):
        """Each rank holds two runs of positions (zigzag-like) of a 2-layer cache whose entries
        encode (layer, head, position); returns what rank 0 gathered, or the error it raised.
        With ``overlap`` rank 1 repeats one of rank 0's positions."""
        from apb.runtime.cache import KVCache, gather_cache

        r, w = self.comm.rank, self.comm.size
        pos = torch.tensor([2 * r, 2 * r + 1, 4 * w - 2 * r - 2, 4 * w - 2 * r - 1])
        if overlap and r == 1:
            pos[0] = 0
        code = (torch.arange(2)[:, None, None] * 1000 + torch.arange(3)[None, :, None] * 100
                + pos[None, None, :]).float()
        keys, values = code[..., None].expand(2, 3, 4, 5), -code[..., None].expand(2, 3, 4, 2)
        try:
            got = gather_cache(KVCache(pos, tuple(zip(keys.contiguous(), values.contiguous()))), self.comm, dst=0)
        except RuntimeError as e:
            return str(e)
        return None if got is None else (got.positions.tolist(), got.keys.contiguous(), got.values.contiguous())

    def gather_trimmed(self, keep, room=None):
        """A 3-layer cache of different shapes (3 heads of 5 / values 2, 2 heads of 4 / 4, 1 head of
        6 / 3), entries encoding (layer, head, position, width index), each rank holding two runs
        of positions (zigzag-like) in reverse order; gathered with ``keep``. Returns what rank 0
        got, each layer's (k, v), and the bytes this rank's gather sent."""
        from apb.runtime.cache import KVCache, gather_cache

        r, w = self.comm.rank, self.comm.size
        pos = torch.tensor([4 * w - 2 * r - 2, 4 * w - 2 * r - 1, 2 * r, 2 * r + 1])
        kv = []
        for layer, (h, dk, dv) in enumerate(((3, 5, 2), (2, 4, 4), (1, 6, 3))):
            def code(width, sign):
                return sign * (layer * 100000 + torch.arange(h)[:, None, None] * 10000
                               + pos[None, :, None] * 10 + torch.arange(width)[None, None, :]).float()
            kv.append((code(dk, 1), code(dv, -1)))
        stats = CommStats()
        got = gather_cache(KVCache(pos, tuple(kv)), Comm(self.state.sp_group, stats), dst=0, keep=keep, room=room)
        sent = sum(rec.bytes for _, rec in stats._select("gather", None, None))
        if got is None:
            return None, sent
        # with room: each layer's (buffer shapes, whether k and v are the first tokens of them)
        rooms = None if got.rooms is None else [
            None if b is None else ([tuple(t.shape) for t in b],
                                    all(t.data_ptr() == x.data_ptr() for t, x in zip(b, got.layer(i))))
            for i, b in enumerate(got.rooms)]
        return (got.positions.tolist(), [got.layer(i) for i in range(3)], rooms), sent

    def ring_wait_without_commit(self):
        """send_recv then wait, skipping commit (must raise); then the step, committed, still runs."""
        comm = Comm(self.state.sp_group, CommStats())  # own counters: ring_steps counts its calls
        ring = comm.ring()
        ring.send_recv(torch.full((4,), float(comm.rank)))
        try:
            ring.wait()
            error = "wait returned"
        except RuntimeError as e:
            error = str(e)
        ring.commit()
        return error, ring.wait().tolist()

    def pid(self):
        return os.getpid()

    def fail_on(self, bad_rank):
        """bad_rank raises at once; the others enter a collective that can never complete."""
        if self.comm.rank == bad_rank:
            raise RuntimeError("deliberate failure")
        self.comm.all_gather(torch.zeros(1))
        return "unreachable"

    def unsendable_reply(self, bad_rank):
        """bad_rank answers with a tensor autograd keeps (torch refuses to send it between
        processes); the others with a plain one."""
        if self.comm.rank == bad_rank:
            leaf = torch.ones(2, requires_grad=True)
            return leaf * 2
        return torch.arange(3)

    def absent_peer(self, silent_rank):
        """silent_rank skips the collective, so the others must time out rather than hang."""
        if self.comm.rank == silent_rank:
            time.sleep(8)
            return "slept"
        t0 = time.monotonic()
        try:
            self.comm.all_gather(torch.zeros(1))
        except Exception as e:  # gloo raises on timeout
            return ("timed out", time.monotonic() - t0, type(e).__name__)
        return ("completed", time.monotonic() - t0, "")
